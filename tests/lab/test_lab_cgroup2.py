"""The lab on the unified cgroup v2 tree, as on a stock Debian 12 or Ubuntu host, here on this hybrid machine.

A private mount namespace gets the cgroup2 hierarchy on /sys/fs/cgroup (a bind mount of this machine's
unified hierarchy, whole: a stock host's view minus systemd as PID 1; a bind, because a fresh cgroup2 mount
would set the hierarchy-wide mount options for everyone). `lab` run there finds the unified world,
makes the host's cgroup itself and boots it; nspawn and the host's systemd run in unified mode.
That host is then a stock systemd host in its own right (systemd as PID 1 on cgroup2), and the lab run
inside it takes the systemd-run path (a scope with Delegate=yes per host): see the tests at the end.

The namespace also gets a private hosts folder and control hosts file, so that the rest of the lab (other
test modules, in the machine's namespace) never sees a host whose disk is mounted only in here. Address
allocation, the lock, the image and the network stay shared, as for any host.
"""
import os
import subprocess
from pathlib import Path

import pytest
from labhosts import LAB, REPO

HOST = "t-v2-a"
STATE = Path("/var/lib/atom-lab")
ROOT_PID = os.environ.get("ATOM_LAB_ROOT_PID", "")
SETUP = """set -e
mount --bind /sys/fs/cgroup/unified /sys/fs/cgroup
mount --bind {private}/hosts {state}/hosts
mount --bind {private}/control-hosts /etc/netns/atomlab/hosts
echo ready
exec sleep 3600
"""


class UnifiedNamespace:
    """A process holding a mount namespace whose /sys/fs/cgroup is cgroup2; commands run inside it."""

    def __init__(self, private: Path):
        (private / "hosts").mkdir(parents=True)
        (private / "control-hosts").write_text("")
        # From the machine's mount namespace (`lab exec`'s has no cgroup tree); `unchanged` keeps /run/netns
        # shared with it, so host network namespaces made in here are visible (and checked) outside.
        self.holder = subprocess.Popen(
            ["nsenter", "-t", ROOT_PID, "-m", "-n", "--", "unshare", "-m", "--propagation", "unchanged", "--",
             "sh", "-c", SETUP.format(private=private, state=STATE)], stdout=subprocess.PIPE, text=True)
        assert self.holder.stdout.readline().strip() == "ready", "could not set up the cgroup2 namespace"
        # Not ATOM_LAB_ROOT_PID: with it, lab would go back to the machine's mount namespace.
        self.env = {k: v for k, v in os.environ.items() if k != "ATOM_LAB_ROOT_PID"}

    def run(self, *command: str, check=True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["nsenter", "-t", str(self.holder.pid), "-m", "-n", f"--wd={REPO}", "--", *command],
                              capture_output=True, text=True, timeout=600, env=self.env, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def lab(self, *args: str, check=True) -> subprocess.CompletedProcess:
        return self.run(str(LAB), *args, check=check)

    def close(self) -> None:
        self.lab("down", HOST, check=False)  # names only: a full `lab down` would drop everyone's network
        self.holder.kill()
        self.holder.wait()


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cgroup2")
    ns = UnifiedNamespace(workdir / "private")
    (workdir / "inventory.yml").write_text(f"all:\n  hosts:\n    {HOST}:\n")
    ns.workdir = workdir
    yield ns
    ns.close()


def test_the_namespace_is_a_unified_world_and_the_machine_is_not(v2):
    assert v2.run("stat", "-fc", "%T", "/sys/fs/cgroup").stdout.strip() == "cgroup2fs"
    machine = subprocess.run([str(LAB), "status"], capture_output=True, text=True, check=True).stdout
    assert machine.splitlines()[0].startswith("cgroups: hybrid cgroup v1"), machine


def test_up_boots_a_host_in_its_own_v2_cgroup_and_says_which_world(v2):
    up = v2.lab("up", "--inventory", str(v2.workdir / "inventory.yml"), "--out", str(v2.workdir / "out.yml"))
    assert "lab: cgroups: unified cgroup v2, PID 1 is not systemd" in up.stderr, up.stderr
    status = v2.lab("status").stdout
    assert status.splitlines()[0].startswith("cgroups: unified cgroup v2, PID 1 is not systemd"), status
    assert status.split(HOST, 1)[1].split()[1:3] == ["running", "running"], status
    inside = v2.lab("run", HOST, "--", "sh", "-c", "stat -fc %T /sys/fs/cgroup; cat /proc/1/comm").stdout.split()
    assert inside == ["cgroup2fs", "systemd"]  # the host's systemd runs in unified mode too
    # The host's init, as this machine sees it, sits in the host's cgroup subtree the lab made.
    procs = v2.run("cat", f"/sys/fs/cgroup/atom-lab/{HOST}/payload/init.scope/cgroup.procs").stdout.split()
    assert len(procs) == 1 and v2.run("cat", f"/proc/{procs[0]}/comm").stdout.strip() == "systemd"


def _next_pid_after(pid: int) -> None:
    """The kernel hands out the next PIDs of this machine's PID namespace (the lab's) from above `pid` on."""
    Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid))


def _init_pid(v2, group: str) -> int:
    """The machine's PID of the systemd in cgroup `group` (below /sys/fs/cgroup, the unified tree)."""
    procs = v2.run("cat", f"/sys/fs/cgroup/{group}/init.scope/cgroup.procs").stdout.split()
    assert len(procs) == 1, procs
    return int(procs[0])


def test_powercut_and_boot_in_the_unified_world(v2):
    v2.lab("run", HOST, "--", "sh", "-c", "echo kept > /root/plain")
    v2.lab("powercut", HOST)
    assert v2.run("test", "-e", f"/sys/fs/cgroup/atom-lab/{HOST}", check=False).returncode == 1
    # The host comes back with PIDs near the top, so the nested host below can be given lower ones.
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    _next_pid_after(pid_max - 5000)
    v2.lab("boot", HOST)
    assert v2.lab("run", HOST, "--", "cat", "/root/plain").stdout.strip() == "kept"


# A stock systemd host, nested: the unified-world host above is one (systemd as PID 1, cgroup2 at
# /sys/fs/cgroup), so the lab run inside it takes the systemd-run path. What the nested lab needs that a
# stock host would have: systemd-nspawn (copied in from this machine: same Debian systemd 252), PyYAML (from
# the image's local repository) and a golden image: the host's own root, bind-mounted where the recipe hash
# names it (nested hosts then share the host's machine-id; nothing here depends on it). Their overlay upper
# layers go on a tmpfs, as overlayfs cannot be an upper layer itself.
INNER = "t-v2-inner"
NESTED_LAB = "/opt/nest/tools/lab"
NESTED_SETUP = f"""set -e
apt-get install -y -qq python3-yaml >/dev/null
golden=$(cd {NESTED_LAB} && python3 -c 'from atomlab import golden; print(golden.golden_path())')
mkdir -p /var/lib/atom-lab/hosts "$golden"
mount -t tmpfs tmpfs /var/lib/atom-lab/hosts
touch /.complete
mount --bind / "$golden"
printf 'all:\n  hosts:\n    {INNER}:\n' > /root/inner.yml
"""
SCOPE = f"atom-lab-{INNER}.scope"


def _inside(v2, command: str, check=True) -> subprocess.CompletedProcess:
    proc = v2.lab("run", HOST, "--", "sh", "-c", f"cd {NESTED_LAB} && {command}", check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{command} exited {proc.returncode}: {proc.stderr}\n{_journal(v2)}")
    return proc


def _journal(v2) -> str:
    """What the host's systemd said lately (the inner host's scope starting and ending): a failure's context."""
    return v2.lab("run", HOST, "--", "journalctl", "--no-pager", "-n", "30", check=False).stdout


def _scope_units(v2) -> str:
    return _inside(v2, f"systemctl list-units --all --no-legend --plain {SCOPE}").stdout.strip()


def test_on_a_systemd_host_each_lab_host_runs_in_a_delegated_scope(v2):
    merged = STATE / "hosts" / HOST / "merged"
    v2.run("sh", "-c", f"cp /usr/bin/systemd-nspawn {merged}/usr/local/bin/ && mkdir -p {merged}/opt/nest/tools"
                       f" && cp -r {REPO}/tools/lab {merged}/opt/nest/tools/"
                       f" && rm -rf {merged}{NESTED_LAB}/atomlab/__pycache__")
    _inside(v2, NESTED_SETUP)
    # The nested host's init gets a lower PID than the host's own, as when PIDs wrap around (pid_max is
    # 32768 here): both are PID 1 of a namespace in the host's cgroup subtree, and `lab run HOST` must still
    # pick the host's (it once ran the commands below inside the nested host).
    host_init = _init_pid(v2, f"atom-lab/{HOST}/payload")
    _next_pid_after(300)
    up = _inside(v2, "./lab up --inventory /root/inner.yml --out /root/inner-out.yml")
    assert _init_pid(v2, f"atom-lab/{HOST}/payload/atomlab.slice/{SCOPE}/payload") < host_init
    assert "lab: cgroups: unified cgroup v2, PID 1 is systemd: each host in scope atomlab.slice" in up.stderr, up.stderr
    show = _inside(v2, f"systemctl show -p ActiveState -p Delegate -p ControlGroup {SCOPE}").stdout.split()
    assert sorted(show) == ["ActiveState=active", f"ControlGroup=/atomlab.slice/{SCOPE}", "Delegate=yes"], \
        f"{show}\n{_journal(v2)}"
    assert _inside(v2, f"./lab run {INNER} -- systemctl is-system-running").stdout.strip() == "running"
    # Its systemd sits in the scope's delegated subtree, where nspawn put the host.
    init = _inside(v2, f"cat /sys/fs/cgroup/atomlab.slice/{SCOPE}/payload/init.scope/cgroup.procs").stdout.split()
    assert len(init) == 1 and _inside(v2, f"cat /proc/{init[0]}/comm").stdout.strip() == "systemd"


def test_on_a_systemd_host_powercut_poweroff_and_down_leave_no_unit(v2):
    assert _scope_units(v2).startswith(SCOPE), f"the probe sees the running host's scope\n{_journal(v2)}"
    _inside(v2, f"./lab run {INNER} -- sh -c 'echo kept > /root/plain'")
    _inside(v2, f"./lab powercut {INNER}")
    assert _scope_units(v2) == ""
    assert _inside(v2, f"test -e /sys/fs/cgroup/atomlab.slice/{SCOPE}", check=False).returncode == 1
    _inside(v2, f"./lab boot {INNER}")
    assert _inside(v2, f"./lab run {INNER} -- cat /root/plain").stdout.strip() == "kept"
    _inside(v2, f"./lab poweroff {INNER}")
    assert _scope_units(v2) == ""
    _inside(v2, f"./lab boot {INNER}")
    assert _scope_units(v2).startswith(SCOPE)
    _inside(v2, f"./lab down {INNER}")
    assert _scope_units(v2) == ""
    for probe in (f"test -e /sys/fs/cgroup/atomlab.slice/{SCOPE}", f"grep -q {INNER} /proc/self/mounts",
                  f"test -e /run/netns/atomlab-{INNER}"):
        assert _inside(v2, probe, check=False).returncode == 1, f"left behind: {probe}"
    # A full `lab down` (the nested lab is this host's alone) also stops the lab's slice, which outlives its
    # last scope.
    slice_units = "systemctl list-units --all --no-legend --plain atomlab.slice"
    assert _inside(v2, slice_units).stdout.startswith("atomlab.slice loaded active")
    _inside(v2, "./lab down")
    assert _inside(v2, slice_units).stdout.strip() == ""
    assert _inside(v2, "test -e /sys/fs/cgroup/atomlab.slice", check=False).returncode == 1


def test_down_leaves_no_cgroup_mount_or_namespace(v2):
    # Positive control first: each probe sees the host's cgroup, mount and network namespace while it runs.
    probes = {"cgroup": ["test", "-d", f"/sys/fs/cgroup/atom-lab/{HOST}"],
              "mount": ["grep", "-q", f"/{HOST}/merged", "/proc/self/mounts"],
              "netns": ["test", "-e", f"/run/netns/atomlab-{HOST}"]}
    for what, probe in probes.items():
        assert v2.run(*probe, check=False).returncode == 0, f"no {what} while the host runs: the probe is wrong"
    assert Path(f"/run/netns/atomlab-{HOST}").exists()  # the machine's side sees the namespace too
    v2.lab("down", HOST)
    for what, probe in probes.items():
        assert v2.run(*probe, check=False).returncode == 1, f"lab down left its {what} behind"
    assert not Path(f"/run/netns/atomlab-{HOST}").exists()  # and the machine's side agrees
    assert v2.run("ls", str(STATE / "hosts")).stdout.strip() == ""
