"""`lab powercut`: the host loses power. Every process dies at once, systemd runs no shutdown, the disk stays.

A unit whose ExecStop= writes a marker tells a shutdown from a power cut: after `lab poweroff` (the positive
control) the marker is there, after `lab powercut` it is not.
"""
import os
from pathlib import Path

import pytest
from labhosts import LabHosts, lab

HOST = "t-pcut-a"
STATE = Path("/var/lib/atom-lab")
# Tests run inside `lab exec`, whose /sys has no cgroup tree: read the machine's through `lab exec`'s root.
HOST_CGROUP = Path(f"/proc/{os.environ.get('ATOM_LAB_ROOT_PID')}/root/sys/fs/cgroup/unified/atom-lab", HOST)
MARKER_UNIT = """[Unit]
Description=writes /root/stopped when systemd stops it (only a shutdown does)
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true
ExecStop=/bin/sh -c 'echo stopped > /root/stopped'
[Install]
WantedBy=multi-user.target
"""


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    hosts = LabHosts({"all": {"hosts": {HOST: None}}}, tmp_path_factory.mktemp("powercut"))
    hosts.down()
    hosts.up()
    hosts.run(HOST, f"cat > /etc/systemd/system/stop-marker.service <<'EOF'\n{MARKER_UNIT}EOF\n"
                    "systemctl daemon-reload && systemctl enable --now stop-marker.service")
    yield hosts
    hosts.down()


def _boot_id(hosts) -> str:
    return hosts.run(HOST, "cat /proc/sys/kernel/random/boot_id").stdout.strip()


def _host_pids() -> list[str]:
    """Every process in the host's cgroup subtree, read on this machine (not through the host)."""
    pids = []
    for procs in HOST_CGROUP.rglob("cgroup.procs"):
        pids += procs.read_text().split()
    return pids


def _dead(pid: int) -> bool:
    """Gone, or a zombie its new parent has not reaped yet (nspawn outlives the `lab up` that started it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _power(host_status: str) -> str:
    return host_status.split(HOST, 1)[1].split()[1]


def test_powercut_kills_everything_runs_no_shutdown_and_keeps_the_disk(hosts):
    assert hosts.run(HOST, "systemctl is-active stop-marker.service").stdout.strip() == "active"
    hosts.run(HOST, "rm -f /root/stopped; echo written > /root/plain")  # a plain write, no sync
    boot_id = _boot_id(hosts)
    nspawn = int((STATE / "hosts" / HOST / "nspawn.pid").read_text())
    assert _host_pids(), "the host's processes are in its cgroup (else the check below proves nothing)"

    lab("powercut", HOST)

    assert _dead(nspawn)
    assert not HOST_CGROUP.exists()
    assert _power(lab("status").stdout) == "off"
    lab("boot", HOST)
    assert hosts.run(HOST, "cat /root/plain").stdout.strip() == "written"
    assert hosts.run(HOST, "test -e /root/stopped", check=False).returncode == 1, "systemd ran a shutdown"
    assert _boot_id(hosts) != boot_id


def test_poweroff_runs_the_shutdown_the_powercut_skips(hosts):
    """Positive control: the same marker unit, stopped by a clean shutdown, writes its marker."""
    hosts.run(HOST, "rm -f /root/stopped")
    boot_id = _boot_id(hosts)
    lab("poweroff", HOST)
    lab("boot", HOST)
    assert hosts.run(HOST, "cat /root/stopped").stdout.strip() == "stopped"
    assert _boot_id(hosts) != boot_id


def test_powercut_of_an_unknown_host_is_one_line():
    proc = lab("powercut", "t-pcut-missing", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "lab: error: no lab host named t-pcut-missing"
