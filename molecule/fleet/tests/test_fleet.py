"""testinfra checks of the converged fleet (molecule verify -s fleet): real state on the four lab hosts."""

import hashlib
import json
import os
import time

import pytest
import testinfra
from testinfra.utils.ansible_runner import AnsibleRunner

ROOT = "/usr/share/nginx/atom"
PREFIX = hashlib.md5(ROOT.encode()).hexdigest()
JOBS, WEB, WORKERS = "f-mol-jobs", "f-mol-web", ["f-mol-w1", "f-mol-w2"]
INSTANCES = 2


def hosts_in(group):
    """The scenario's hosts in an inventory group: each test runs on exactly those (none is skipped)."""
    return AnsibleRunner(os.environ["MOLECULE_INVENTORY_FILE"]).get_hosts(group)


def other(name):
    """Another host of the scenario, through molecule's inventory."""
    return testinfra.get_host(f"ansible://{name}", ansible_inventory=os.environ["MOLECULE_INVENTORY_FILE"])


def jobs_address():
    return other(JOBS).ansible.get_variables()["ansible_host"]


def gearadmin(option):
    return other(JOBS).check_output(f"gearadmin -h {jobs_address()} {option}")


@pytest.mark.parametrize("name", hosts_in("atom_workers"))
def test_workers_run_and_point_at_the_job_server(name):
    host = other(name)
    for i in range(1, INSTANCES + 1):
        unit = f"atom-worker@{i}.service"
        assert host.service(unit).is_running, host.run(f"journalctl --no-pager -n 40 -u {unit}").stdout
        assert host.service(unit).is_enabled
    state = json.loads(host.file("/etc/atom-worker/sites.json").content_string)
    assert state["sites"][0]["gearman_servers"] == [f"{jobs_address()}:4730"]
    assert f"default: {jobs_address()}:4730" in host.file(f"{ROOT}/config/gearman.yml").content_string


@pytest.mark.parametrize("name", hosts_in("atom_web"))
def test_web_node_points_at_the_job_server_and_runs_no_worker(name):
    host = other(name)
    assert f"default: {jobs_address()}:4730" in host.file(f"{ROOT}/config/gearman.yml").content_string
    assert not host.file("/etc/atom-worker/sites.json").exists
    assert host.run("systemctl list-units --all --plain --no-legend 'atom-worker*'").stdout.strip() == ""


def test_gearmand_lists_every_worker_of_every_host():
    status = {line.split("\t")[0]: line.split("\t") for line in gearadmin("--status").splitlines() if "\t" in line}
    assert status[f"{PREFIX}-arFindingAidJob"][3] == str(INSTANCES * len(WORKERS)), status
    workers = [line.split() for line in gearadmin("--workers").splitlines() if f"{PREFIX}-" in line]
    for name in WORKERS:
        address = other(name).ansible.get_variables()["ansible_host"]
        assert sum(1 for w in workers if w[1] == address) == INSTANCES, (name, workers)


@pytest.mark.parametrize("name", hosts_in("gearman_job_servers"))
def test_allowlist_admits_the_web_and_worker_hosts_only(name):
    host = other(name)
    rules = host.check_output("nft list table inet atom_gearman")

    def listed(address):
        # Membership as nftables decides it: the set is an interval set with auto-merge, so neighbouring
        # addresses (lab hosts get consecutive ones) are listed as one range, which a text search misses.
        return host.run(f"nft get element inet atom_gearman allowed_v4 {{ {address} }}").rc == 0

    for peer in [WEB, *WORKERS]:
        assert listed(other(peer).ansible.get_variables()["ansible_host"]), (peer, rules)
    assert not listed("192.0.2.1"), rules  # the same probe says no for an address nobody listed
    assert "reject with tcp reset" in rules
    assert host.socket(f"tcp://{jobs_address()}:4730").is_listening


@pytest.mark.parametrize("name", hosts_in("atom_web"))
def test_a_job_from_the_web_node_completes_on_a_worker_host(name):
    host = other(name)
    ids = host.check_output(
        f"cd {ROOT} && runuser -u www-data -- php symfony standin:submit --class=arFindingAidJob --count=4"
    ).split()
    assert len(ids) == 4
    for _ in range(60):
        done = set()
        for name in WORKERS:
            record = other(name).file(f"{ROOT}/log/standin-record.jsonl").content_string
            done |= {e["id"] for e in map(json.loads, record.splitlines())
                     if e.get("event") == "job" and e.get("status") == "completed"}
        if set(ids) <= done:
            return
        time.sleep(0.5)
    raise AssertionError(f"jobs {set(ids) - done} did not complete")
