"""Booting, finding, powering off and removing lab hosts: systemd-nspawn on an overlay of the golden image."""
import contextlib
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

from . import network, paths
from .run import LabError, run

BOOT_TIMEOUT = 60
POWEROFF_TIMEOUT = 20
HOST_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def nspawn_pid(name: str) -> int | None:
    """The nspawn process of a running host, or None if the host is not running."""
    pidfile = paths.host_dir(name) / "nspawn.pid"
    if not pidfile.exists():
        return None
    pid = int(pidfile.read_text())
    if not _pid_alive(pid):
        return None
    try:
        if Path(f"/proc/{pid}/comm").read_text().strip() != "systemd-nspawn":
            return None
    except FileNotFoundError:
        return None
    return pid


def known_hosts() -> list[str]:
    if not paths.HOSTS_DIR.exists():
        return []
    return sorted(p.name for p in paths.HOSTS_DIR.iterdir() if p.is_dir())


def running_hosts() -> list[str]:
    return [n for n in known_hosts() if nspawn_pid(n)]


# cgroups ---------------------------------------------------------------------------------------------
def _cgroups(name: str) -> list[Path]:
    return [root / paths.CGROUP_NAME / name for root in paths.CGROUP_ROOTS if root.exists()]


def _cgroup_pids(name: str) -> list[int]:
    pids = []
    for group in _cgroups(name):
        # nspawn and the host's systemd create and remove sub-groups while a host boots or stops: a directory
        # may vanish while it is walked (os.walk skips it; Path.rglob raises) or before its file is read.
        for directory, _, files in os.walk(group):
            if "cgroup.procs" in files:
                with contextlib.suppress(OSError):
                    pids += [int(p) for p in Path(directory, "cgroup.procs").read_text().split()]
    return sorted(set(pids))


def _kill_cgroups(name: str) -> None:
    """SIGKILL every process of the host in one step: the kernel's cgroup.kill (cgroup v2, Linux 5.14+) kills
    the whole subtree, including processes forked meanwhile. nspawn moved itself into the group, so it dies too."""
    for group in _cgroups(name):
        kill = group / "cgroup.kill"
        if kill.exists():
            kill.write_text("1")
            return


def _empty_cgroups(name: str) -> None:
    """After a crash or SIGKILL the container's init can outlive nspawn: kill what is left, drop the groups."""
    for _ in range(50):
        pids = _cgroup_pids(name)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    for group in _cgroups(name):
        if group.exists():
            for sub in sorted((d for d in group.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
                sub.rmdir()
            group.rmdir()


def init_pid(name: str) -> int | None:
    """PID (in our namespace) of the host's systemd: the process in its cgroup that is PID 1 inside."""
    for pid in _cgroup_pids(name):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            continue
        for line in status.splitlines():
            if line.startswith("NSpid:"):
                ids = line.split()[1:]
                if len(ids) > 1 and ids[-1] == "1":
                    return pid
    return None


# overlay ---------------------------------------------------------------------------------------------
def _merged(name: str) -> Path:
    return paths.host_dir(name) / "merged"


def _is_mounted(path: Path) -> bool:
    return any(line.split()[1] == str(path) for line in Path("/proc/mounts").read_text().splitlines())


def prepare(name: str, golden: Path, address: str) -> None:
    """Create (or re-mount) the host's disk: an overlay whose upper layer survives power cycles."""
    base = paths.host_dir(name)
    for sub in ("upper", "work", "merged"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    lower_file = base / "lower"
    if not lower_file.exists():
        lower_file.write_text(str(golden) + "\n")
    lower = lower_file.read_text().strip()
    if not Path(lower).exists():
        raise LabError(f"host {name}: its image {lower} is gone; run `lab down {name}` and up again")
    merged = _merged(name)
    if not _is_mounted(merged):
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={lower},upperdir={base / 'upper'},workdir={base / 'work'}", str(merged)])
    machine_id = merged / "etc/machine-id"
    if not machine_id.read_text().strip():
        machine_id.write_text(uuid.uuid4().hex + "\n")
    (merged / "etc/hostname").write_text(name + "\n")
    # No DNS in the lab: names come from /etc/hosts, and an empty resolv.conf fails fast instead of waiting.
    (merged / "etc/resolv.conf").write_text("# lab host: no DNS, names are in /etc/hosts\n")
    keys = merged / "root/.ssh/authorized_keys"
    keys.parent.mkdir(mode=0o700, exist_ok=True)
    keys.write_text(Path(str(paths.SSH_KEY) + ".pub").read_text())
    keys.chmod(0o600)


def write_hosts_file(name: str, content: str) -> None:
    with open(_merged(name) / "etc/hosts", "w") as handle:
        handle.write(content)


# power -------------------------------------------------------------------------------------------------
def start(name: str) -> None:
    """Launch nspawn for a prepared host, each from its own cgroup; does not wait for the boot."""
    groups = _cgroups(name)
    for group in groups:
        group.mkdir(parents=True, exist_ok=True)
    base = paths.host_dir(name)
    paths.PIP_CACHE.mkdir(parents=True, exist_ok=True)
    log = open(base / "console.log", "ab")  # noqa: SIM115 - nspawn writes to it for the host's whole life

    def enter_own_cgroup():
        for group in groups:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    cmd = ["systemd-nspawn", "-b", "-D", str(_merged(name)), "--register=no", "--keep-unit", "-M", name,
           "--console=passive", "--resolv-conf=off", "--timezone=off", "--link-journal=no",
           # nftables on the job server: the host has its own network namespace, so this is its own.
           "--capability=CAP_NET_ADMIN",
           f"--bind={paths.PIP_CACHE}:/root/.cache/pip",
           f"--network-namespace-path=/run/netns/{paths.host_netns(name)}"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True, preexec_fn=enter_own_cgroup)  # noqa: PLW1509 - no threads here
    (base / "nspawn.pid").write_text(str(proc.pid))


def wait_booted(name: str, timeout: float = BOOT_TIMEOUT) -> str:
    """Wait until the host's systemd says running (or degraded); return that state."""
    deadline = time.monotonic() + timeout
    state = "no init yet"
    while time.monotonic() < deadline:
        if not nspawn_pid(name):
            tail = (paths.host_dir(name) / "console.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise LabError(f"host {name} stopped while booting: {' | '.join(tail)}")
        pid = init_pid(name)
        if pid:
            proc = subprocess.run(["nsenter", "-t", str(pid), "-a", "systemctl", "is-system-running"],
                                  capture_output=True, text=True, check=False)
            state = proc.stdout.strip() or proc.stderr.strip()
            if state in ("running", "degraded"):
                return state
        time.sleep(0.1)
    raise LabError(f"host {name} did not finish booting in {timeout:.0f} s (last state: {state})")


def poweroff(name: str) -> None:
    """SIGTERM to nspawn shuts the host down cleanly; whatever survives is killed with its cgroup."""
    pid = nspawn_pid(name)
    if pid:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + POWEROFF_TIMEOUT
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    _empty_cgroups(name)
    (paths.host_dir(name) / "nspawn.pid").unlink(missing_ok=True)


def powercut(name: str) -> bool:
    """The host loses power: nspawn and every process of the host SIGKILLed at once, so systemd runs no
    shutdown. The disk (the overlay's upper layer) is kept. False if the host was not running."""
    was_running = nspawn_pid(name) is not None
    _kill_cgroups(name)
    _empty_cgroups(name)
    (paths.host_dir(name) / "nspawn.pid").unlink(missing_ok=True)
    return was_running


def remove(name: str) -> None:
    poweroff(name)
    merged = _merged(name)
    if _is_mounted(merged):
        run(["umount", str(merged)], check=False)
        if _is_mounted(merged):
            run(["umount", "-l", str(merged)], check=False)
    network.unplug(name)
    network.release(name)
    run(["rm", "-rf", "--one-file-system", str(paths.host_dir(name))])


def exec_args(name: str, command: list[str]) -> list[str]:
    """argv that runs `command` inside host `name` (all its namespaces, a clean root environment)."""
    pid = init_pid(name)
    if not pid:
        raise LabError(f"host {name} is not running (lab status lists the hosts)")
    return ["nsenter", "-t", str(pid), "-a", "--", "env", "-i", HOST_PATH, "LANG=C.UTF-8", "HOME=/root",
            "TERM=" + os.environ.get("TERM", "dumb"), *command]
