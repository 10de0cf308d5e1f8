"""Booting, finding, powering off and removing lab hosts: systemd-nspawn on an overlay of the golden image."""
import contextlib
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

from . import cgroups, network, paths
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
        # On a systemd host nspawn is started through systemd-run, which execs it in place within milliseconds.
        if Path(f"/proc/{pid}/comm").read_text().strip() not in ("systemd-nspawn", "systemd-run"):
            return None
    except (FileNotFoundError, ProcessLookupError):  # gone between the check and the read
        return None
    return pid


def known_hosts() -> list[str]:
    if not paths.HOSTS_DIR.exists():
        return []
    return sorted(p.name for p in paths.HOSTS_DIR.iterdir() if p.is_dir())


def running_hosts() -> list[str]:
    return [n for n in known_hosts() if nspawn_pid(n)]


# init: found in the host's cgroup subtree (atomlab/cgroups.py knows where that is) ----------------------
def init_pid(name: str) -> int | None:
    """PID (in our namespace) of the host's systemd: the process in its cgroup that is PID 1 of the PID
    namespace right below ours (NSpid: ours, then 1). A lab run inside the host has hosts of its own in the
    same cgroup subtree, whose inits are PID 1 one namespace further down (NSpid: ours, the host's, 1); with
    PIDs wrapping around (pid_max 32768 on this machine) such an init can have the lower PID, and taking it
    ran `lab run HOST` inside the nested host instead."""
    for pid in cgroups.pids(name):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            # Listed, then gone: a process exiting between the listing and the read (opened but exited before
            # the read) fails with ESRCH, not ENOENT; a drill killing workers meets that window.
            continue
        for line in status.splitlines():
            if line.startswith("NSpid:") and line.split()[2:] == ["1"]:  # "NSpid: OURS 1", nothing further
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
# Each booted host's systemd holds a few dozen inotify instances, all counted against root's
# fs.inotify.max_user_instances: Debian's default of 128 runs out at about 16 hosts, and the next boot
# fails ("Failed to create control group inotify object: Too many open files") or comes up degraded.
INOTIFY_INSTANCES = Path("/proc/sys/fs/inotify/max_user_instances")
INOTIFY_INSTANCES_MIN = 8192


def _ensure_inotify_instances() -> None:
    if int(INOTIFY_INSTANCES.read_text()) < INOTIFY_INSTANCES_MIN:
        # Read-only /proc/sys (a lab run inside a container): boot anyway, fewer hosts will fit.
        with contextlib.suppress(OSError):
            INOTIFY_INSTANCES.write_text(str(INOTIFY_INSTANCES_MIN))


def start(name: str) -> subprocess.Popen:
    """Launch nspawn for a prepared host, each from its own cgroup; does not wait for the boot."""
    _ensure_inotify_instances()
    base = paths.host_dir(name)
    paths.PIP_CACHE.mkdir(parents=True, exist_ok=True)
    log = open(base / "console.log", "ab")  # noqa: SIM115 - nspawn writes to it for the host's whole life

    cmd = ["systemd-nspawn", "-b", "-D", str(_merged(name)), "--register=no", "--keep-unit", "-M", name,
           "--console=passive", "--resolv-conf=off", "--timezone=off", "--link-journal=no",
           # nftables on the job server: the host has its own network namespace, so this is its own.
           "--capability=CAP_NET_ADMIN",
           f"--bind={paths.PIP_CACHE}:/root/.cache/pip",
           f"--network-namespace-path=/run/netns/{paths.host_netns(name)}"]
    argv, enter_own_cgroup = cgroups.launch(name, cmd)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True, preexec_fn=enter_own_cgroup)  # noqa: PLW1509 - no threads here
    (base / "nspawn.pid").write_text(str(proc.pid))
    return proc


def wait_booted(name: str, nspawn: subprocess.Popen, timeout: float = BOOT_TIMEOUT) -> str:
    """Wait until the host's systemd says running (or degraded); return that state. `nspawn` is what start()
    returned: whether it still runs is asked of the process itself, not of nspawn_pid(), whose name check
    can see the short window of exec in which the kernel has already let Popen return but still shows the
    child's old name ("python3"); under load that window was seen, and a booting host taken for stopped."""
    deadline = time.monotonic() + timeout
    state = "no init yet"
    while time.monotonic() < deadline:
        if nspawn.poll() is not None:
            tail = (paths.host_dir(name) / "console.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise LabError(f"host {name} stopped while booting (nspawn exited {nspawn.returncode}): "
                           f"{' | '.join(tail)}")
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
    cgroups.remove(name)
    (paths.host_dir(name) / "nspawn.pid").unlink(missing_ok=True)


def powercut(name: str) -> bool:
    """The host loses power: nspawn and every process of the host SIGKILLed at once, so systemd runs no
    shutdown. The disk (the overlay's upper layer) is kept. False if the host was not running."""
    was_running = nspawn_pid(name) is not None
    # A machine that loses power sends nothing: its peers learn it is gone only from their own timeouts.
    # The host's network namespace would outlive its processes and close their TCP connections with
    # FIN/RST, telling every peer at once; so the link goes down first, and the namespace (with its TCP
    # state and firewall rules, which a real reboot does not keep either) goes after. `lab boot` plugs
    # the host in anew at the same address.
    network.cut(name)
    cgroups.kill(name)
    cgroups.remove(name)
    network.unplug(name)
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
