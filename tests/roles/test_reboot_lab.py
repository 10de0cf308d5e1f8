"""A host that runs gearmand and the workers: after a reboot the workers start after gearmand, spend no start.

Run inside the lab network: tools/lab/lab exec -- .venv/bin/pytest tests/roles
"""

import pytest

pytestmark = pytest.mark.timeout(600)

HOST = "r-solo"
INVENTORY = {
    "all": {
        "children": {
            "gearman_job_servers": {"hosts": {HOST: None}},
            "atom_workers": {"hosts": {HOST: None}},
            "atom_standin": {"children": {"atom_workers": None}},
        },
        "vars": {"atom_worker_instances": 2},
    }
}
UNITS = ["atom-worker@1.service", "atom-worker@2.service"]


@pytest.fixture(scope="module")
def lab(make_lab):
    lab = make_lab(INVENTORY)
    lab.converge()
    return lab


def test_workers_order_after_the_local_gearmand(lab):
    for unit in UNITS:
        props = lab.show(HOST, unit, "After", "Wants", "ActiveState")
        assert props["ActiveState"] == "active"
        assert "gearman-job-server.service" in props["After"].split()
        assert "gearman-job-server.service" in props["Wants"].split()
        assert "network-online.target" in props["After"].split()
    assert (
        "After=network-online.target"
        in lab.run(HOST, "systemctl cat gearman-job-server.service").stdout
    )


def boot_id(lab):
    return lab.run(HOST, "cat /proc/sys/kernel/random/boot_id").stdout.strip()


def test_after_a_reboot_workers_run_with_no_start_spent(lab):
    # The boot id proves the host really booted again (systemd-nspawn gives each boot of a host a new one):
    # without it, "active with NRestarts=0" would also hold for a host that never went down.
    before = boot_id(lab)
    assert before
    lab.hosts.poweroff(HOST)
    lab.hosts.boot(HOST)
    lab.wait_for(
        lambda: (
            lab.run(HOST, "systemctl is-system-running", check=False).stdout.strip()
            in ("running", "degraded")
        ),
        timeout=60,
        what="the host to boot",
    )
    after = boot_id(lab)
    assert after and after != before
    gearmand = lab.show(
        HOST,
        "gearman-job-server.service",
        "ActiveState",
        "ActiveEnterTimestampMonotonic",
    )
    assert gearmand["ActiveState"] == "active"
    for unit in UNITS:
        props = lab.show(
            HOST,
            unit,
            "ActiveState",
            "NRestarts",
            "ExecMainStartTimestampMonotonic",
            "Result",
        )
        assert props["ActiveState"] == "active", lab.journal(HOST, unit)
        assert props["NRestarts"] == "0", lab.journal(HOST, unit)
        assert int(props["ExecMainStartTimestampMonotonic"]) >= int(
            gearmand["ActiveEnterTimestampMonotonic"]
        )
    journal = lab.run(HOST, "journalctl -b --no-pager -o cat -u 'atom-worker@*'").stdout
    assert "Couldn't connect" not in journal
    assert "Failed with result" not in journal
    # one start of each instance in this boot, and they registered with the local gearmand
    starts = lab.run(
        HOST,
        "journalctl -b --no-pager -o cat -u 'atom-worker@*' | grep -c 'Running worker'",
        check=False,
    ).stdout.strip()
    assert starts == "2"
