"""The lab itself: real systemd hosts, isolated network, power cycles, crash recovery, clean teardown."""
import json
import subprocess
from pathlib import Path

import pytest
from labhosts import LAB, LabHosts, lab, still_in_lab_network

STATE = Path("/var/lib/atom-lab")
INVENTORY = {"all": {"hosts": {"t-lab-a": None, "t-lab-b": None}}}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    hosts = LabHosts(INVENTORY, tmp_path_factory.mktemp("lab")).up()
    yield hosts
    hosts.down()


def test_hosts_run_systemd_as_pid1(hosts):
    for name in hosts.names:
        assert hosts.run(name, "cat /proc/1/comm").stdout.strip() == "systemd"
        state = hosts.run(name, "systemctl is-system-running", check=False).stdout.strip()
        # A failed unit says why in its journal: show it with the failure.
        assert state == "running", hosts.run(name, "systemctl --failed --no-legend; journalctl -b -p warning "
                                                   "--no-pager | tail -40", check=False).stdout
        assert hosts.run(name, "hostname").stdout.strip() == name


def test_every_host_has_its_own_machine_id(hosts):
    ids = {hosts.run(n, "cat /etc/machine-id").stdout.strip() for n in hosts.names}
    assert len(ids) == len(hosts.names) and all(len(i) == 32 for i in ids)


def test_hosts_reach_each_other_by_name_and_ssh_works(hosts):
    assert hosts.run("t-lab-a", "nc -z -w 2 t-lab-b 22", check=False).returncode == 0
    key = STATE / "ssh" / "id_ed25519"
    out = subprocess.run(["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                          "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "root@t-lab-b", "hostname"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.stdout.strip() == "t-lab-b", out.stderr


def test_no_route_out_of_the_machine(hosts):
    # Routing decisions only: no packet is sent anywhere.
    lab_routes = subprocess.run(["ip", "-j", "route", "show"], capture_output=True, text=True, check=False).stdout
    assert all(r["dst"] != "default" for r in json.loads(lab_routes)), lab_routes
    outside = subprocess.run(["ip", "route", "get", "192.0.2.1"], capture_output=True, text=True, check=False)
    assert outside.returncode != 0 and "unreachable" in outside.stderr.lower()


def test_root_namespace_cannot_reach_the_lab_subnet():
    root_ns = subprocess.run(["nsenter", "-t", _outer_pid(), "-n", "ip", "route", "get", "10.231.0.10"],
                             capture_output=True, text=True, check=False)
    assert root_ns.returncode != 0, root_ns.stdout


def test_packages_install_offline_from_the_local_repository(hosts):
    hosts.run("t-lab-a", "apt-get update -qq && apt-get install -y -qq gearman-tools >/dev/null", timeout=300)
    assert hosts.run("t-lab-a", "command -v gearadmin").returncode == 0
    assert Path(hosts.run("t-lab-a", "ls /opt/lab-pip").stdout.split()[0])  # the pip folder is served too
    assert "pystemd-0.15.3.tar.gz" in hosts.run("t-lab-a", "ls /opt/lab-pip").stdout


def test_power_cycle_keeps_the_disk(hosts):
    hosts.run("t-lab-b", "echo kept > /root/marker")
    hosts.poweroff("t-lab-b")
    assert "off" in lab("status").stdout.split("t-lab-b", 1)[1].splitlines()[0]
    hosts.boot("t-lab-b")
    assert hosts.run("t-lab-b", "cat /root/marker").stdout.strip() == "kept"


def test_up_twice_is_harmless(hosts):
    before = hosts.run("t-lab-a", "cat /proc/1/stat").stdout.split()[21]  # init's start time
    hosts.up()
    assert hosts.run("t-lab-a", "cat /proc/1/stat").stdout.split()[21] == before


def test_up_recovers_a_host_whose_nspawn_was_killed(hosts):
    pid = int((STATE / "hosts" / "t-lab-a" / "nspawn.pid").read_text())
    subprocess.run(["kill", "-KILL", str(pid)], check=True)
    hosts.up()
    assert hosts.run("t-lab-a", "systemctl is-system-running").stdout.strip() == "running"


def test_down_removes_host_namespace_mount_and_cgroup(tmp_path):
    extra = LabHosts({"all": {"hosts": {"t-lab-gone": None}}}, tmp_path).up()
    extra.down()
    assert not (STATE / "hosts" / "t-lab-gone").exists()
    assert not Path("/run/netns/atomlab-t-lab-gone").exists()
    assert "t-lab-gone" not in Path("/proc/mounts").read_text()
    # Inside `lab exec` /sys has no cgroup tree: look at the machine's, through `lab exec`'s root.
    cgroup_fs = Path(f"/proc/{_outer_pid()}/root/sys/fs/cgroup")
    assert (cgroup_fs / "unified/atom-lab").is_dir(), "the lab's cgroups are visible here (else this proves nothing)"
    assert not any((cgroup_fs / root / "atom-lab/t-lab-gone").exists() for root in ("systemd", "unified"))
    assert "t-lab-gone" not in lab("status").stdout
    # Removing named hosts never removes the lab network that this run (inside `lab exec`) lives in.
    assert still_in_lab_network()


def test_lab_errors_are_one_line_without_traceback():
    proc = subprocess.run([str(LAB), "run", "t-lab-missing", "--", "true"], capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "lab: error: host t-lab-missing is not running (lab status lists the hosts)"


def _outer_pid() -> str:
    import os
    return os.environ["ATOM_LAB_ROOT_PID"]
