"""testinfra checks of the converged scenario (molecule verify): real state on the lab hosts."""

import hashlib
import json
import os
import time

import pytest
import testinfra
from testinfra.utils.ansible_runner import AnsibleRunner

ROOT = "/usr/share/nginx/atom"


def hosts_in(group):
    """The scenario's hosts in an inventory group: each test runs on exactly those (none is skipped)."""
    return AnsibleRunner(os.environ["MOLECULE_INVENTORY_FILE"]).get_hosts(group)


def other(name):
    """A host of the scenario, through molecule's inventory."""
    return testinfra.get_host(f"ansible://{name}", ansible_inventory=os.environ["MOLECULE_INVENTORY_FILE"])


def _show(host, unit, *props):
    out = host.check_output(
        f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props)
    )
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _journal_on_failure(host, unit):
    return host.run(f"journalctl --no-pager -n 50 -u {unit}").stdout


@pytest.mark.parametrize("name", hosts_in("atom_workers"))
@pytest.mark.parametrize("unit", ["atom-worker@1.service"])
def test_worker_unit_properties(name, unit):
    host = other(name)
    props = _show(
        host,
        unit,
        "ActiveState",
        "Restart",
        "RestartUSec",
        "StartLimitBurst",
        "StartLimitIntervalUSec",
        "After",
        "User",
        "Group",
        "WorkingDirectory",
    )
    assert props["ActiveState"] == "active", _journal_on_failure(host, unit)
    assert props["Restart"] == "on-failure"
    assert props["RestartUSec"] == "30s"
    assert props["StartLimitBurst"] == "3"
    assert props["StartLimitIntervalUSec"] == "1d"
    assert "network-online.target" in props["After"].split()
    assert props["User"] == "www-data" and props["Group"] == "www-data"
    assert props["WorkingDirectory"] == ROOT
    assert host.service("atom-workers.target").is_enabled


def test_files_owners_and_modes(host):
    groups = host.ansible.get_variables().get("group_names", [])
    if "atom_workers" in groups:
        unit = host.file("/etc/systemd/system/atom-worker@.service")
        assert (unit.user, unit.group, unit.mode) == ("root", "root", 0o644)
        helper = host.file("/usr/local/lib/atom-worker/atom-worker-recycle")
        assert (helper.user, helper.mode) == ("root", 0o755)
        state = json.loads(host.file("/etc/atom-worker/sites.json").content_string)
        site = state["sites"][0]
        assert site["prefix"] == hashlib.md5(site["realpath"].encode()).hexdigest()
        assert site["pools"][0]["units"] == ["atom-worker@1.service"]
    if "gearman_job_servers" in groups:
        default = host.file("/etc/default/gearman-job-server")
        assert (default.user, default.mode) == ("root", 0o644)
        assert "--queue-type=libsqlite3" in default.content_string
        queue = host.file("/var/lib/gearman/queue.sqlite3")
        assert queue.exists and queue.user == "gearman"


@pytest.mark.parametrize("name", hosts_in("gearman_job_servers"))
def test_gearmand_listens_on_its_address_behind_the_allowlist(name):
    host = other(name)
    address = host.ansible.get_variables()["ansible_host"]
    assert host.socket(f"tcp://{address}:4730").is_listening
    assert not host.socket("tcp://0.0.0.0:4730").is_listening
    rules = host.check_output("nft list table inet atom_gearman")
    assert "tcp dport != 4730 accept" in rules
    assert "reject with tcp reset" in rules
    assert host.service("atom-gearman-firewall.service").is_enabled


@pytest.mark.parametrize("name", hosts_in("atom_workers"))
def test_a_job_round_trip(name):
    host = other(name)
    job_id = host.check_output(
        f"cd {ROOT} && runuser -u www-data -- php symfony standin:submit --class=arFindingAidJob --count=1"
    ).strip()
    for _ in range(60):
        record = host.file(f"{ROOT}/log/standin-record.jsonl").content_string
        done = [
            json.loads(line) for line in record.splitlines() if f'"{job_id}"' in line
        ]
        if any(
            e.get("event") == "job" and e.get("status") == "completed" for e in done
        ):
            return
        time.sleep(0.5)
    raise AssertionError(
        f"job {job_id} did not complete:\n"
        + _journal_on_failure(host, "atom-worker@1.service")
    )
