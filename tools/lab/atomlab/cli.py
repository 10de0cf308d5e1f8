"""`lab`: boot, inspect and remove the lab's systemd hosts. See tools/lab/README.md."""
import argparse
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import cgroups, golden, hosts, inventory, network, paths
from .run import LabError, progress, run

CHANGES_STATE = {"up", "down", "poweroff", "powercut", "boot"}


ROOT_PID_ENV = "ATOM_LAB_ROOT_PID"


def _outer_mount_namespace_pid() -> int | None:
    """Inside `lab exec`, the PID of that `lab exec` process, which sits in the machine's mount namespace."""
    pid = os.environ.get(ROOT_PID_ENV)
    if not pid:
        return None
    try:
        if os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            return None
    except OSError:
        raise LabError(f"{ROOT_PID_ENV}={pid}: that `lab exec` is gone; run lab from a plain shell") from None
    return int(pid)


def _lock():
    paths.STATE.mkdir(parents=True, exist_ok=True)
    handle = open(paths.STATE / "lock", "w")  # noqa: SIM115 - returned to the caller's `with`
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def _ensure_ssh_key() -> None:
    if not paths.SSH_KEY.exists():
        paths.SSH_KEY.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "atom-lab", "-f", str(paths.SSH_KEY)])


def _refresh_names() -> None:
    """Every running host, and `lab exec`, resolves every lab host by name."""
    names = hosts.running_hosts()
    content = network.hosts_file(names)
    for name in names:
        hosts.write_hosts_file(name, content)
    network.write_control_hosts(names)


def cmd_up(args) -> int:
    if args.inventory:
        source = Path(args.inventory)
        inv = inventory.load(source)
        source_label = str(source)
    elif args.hosts:
        inv, source_label = inventory.generated(args.hosts), f"--hosts {args.hosts}"
    else:
        inv = inventory.load(paths.DEFAULT_INVENTORY)
        source_label = str(paths.DEFAULT_INVENTORY.relative_to(paths.REPO))
    names = inventory.host_names(inv)
    started = time.monotonic()
    progress(f"cgroups: {cgroups.describe()}")
    _ensure_ssh_key()
    image = golden.ensure_golden()
    network.ensure_bridge()
    to_boot = []
    for name in names:
        if hosts.nspawn_pid(name):
            continue
        lower = paths.host_dir(name) / "lower"
        if lower.exists() and lower.read_text().strip() != str(image):
            progress(f"{name}: built from an older image; recreating it")
            hosts.remove(name)
        hosts.poweroff(name)  # a host left over from a crashed run: clear its processes and cgroups first
        if not network.netns_exists(paths.host_netns(name)):
            network.plug(name)
        hosts.prepare(name, image, network.address_of(name))
        to_boot.append((name, hosts.start(name)))
    for name, nspawn in to_boot:
        state = hosts.wait_booted(name, nspawn)
        progress(f"{name} booted ({state}) at {network.address_of(name)}")
    _refresh_names()
    out = Path(args.out) if args.out else paths.DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(inventory.with_connection(inv, source_label))
    progress(f"{len(names)} host(s) up in {time.monotonic() - started:.1f} s; inventory: {out}")
    return 0


def cmd_down(args) -> int:
    names = args.names or hosts.known_hosts()
    for name in names:
        if name not in hosts.known_hosts():
            raise LabError(f"no lab host named {name}")
        hosts.remove(name)
        progress(f"{name} removed")
    # Only a full `lab down` removes the network: commands running inside `lab exec` (a test run that
    # removes its own hosts) stay in the lab namespace, and a new one would leave them cut off.
    if not args.names and not hosts.known_hosts():
        # Nothing left: also clear what a crashed run may have left behind.
        for ns in Path("/run/netns").glob("atomlab-*") if Path("/run/netns").exists() else []:
            run(["ip", "netns", "del", ns.name], check=False)
        network.remove_bridge()
        paths.ADDRESSES.unlink(missing_ok=True)
        paths.LAST_ADDRESS.unlink(missing_ok=True)
        cgroups.remove_all()
        Path("/etc/netns", paths.LAB_NETNS, "hosts").unlink(missing_ok=True)
    else:
        _refresh_names()
    return 0


def cmd_status(args) -> int:
    print(f"cgroups: {cgroups.describe()}")
    rows = []
    for name in hosts.known_hosts():
        pid = hosts.nspawn_pid(name)
        state = "stopped"
        if pid and hosts.init_pid(name):
            proc = run(hosts.exec_args(name, ["systemctl", "is-system-running"]), check=False, capture=True)
            state = proc.stdout.strip() or "unknown"
        try:
            address = network.address_of(name)
        except KeyError:
            address = "-"
        rows.append((name, address, "running" if pid else "off", state))
    if not rows:
        print("no lab hosts (tools/lab/lab up boots them)")
        return 0
    print(f"{'HOST':<20} {'ADDRESS':<15} {'POWER':<8} SYSTEM")
    for row in rows:
        print(f"{row[0]:<20} {row[1]:<15} {row[2]:<8} {row[3]}")
    return 0


def cmd_poweroff(args) -> int:
    hosts.poweroff(args.name)
    progress(f"{args.name} powered off (its disk is kept; `lab boot {args.name}` starts it)")
    return 0


def cmd_powercut(args) -> int:
    known = hosts.known_hosts()
    for name in args.names:
        if name not in known:
            raise LabError(f"no lab host named {name}")
    for name in args.names:
        if hosts.powercut(name):
            progress(f"{name}: power cut (every process killed, no shutdown; `lab boot {name}` starts it)")
        else:
            progress(f"{name} was not running")
    return 0


def cmd_boot(args) -> int:
    name = args.name
    if hosts.nspawn_pid(name):
        progress(f"{name} is already running")
        return 0
    if name not in hosts.known_hosts():
        raise LabError(f"no lab host named {name}")
    lower = (paths.host_dir(name) / "lower").read_text().strip()
    if not network.netns_exists(paths.host_netns(name)):
        network.plug(name)
    hosts.prepare(name, Path(lower), network.address_of(name))
    progress(f"{name} booted ({hosts.wait_booted(name, hosts.start(name))})")
    _refresh_names()
    return 0


def cmd_exec(args) -> int:
    if not args.command:
        raise LabError("usage: lab exec -- COMMAND [ARGS...]")
    control_hosts = Path("/etc/netns", paths.LAB_NETNS, "hosts")
    if not network.netns_exists(paths.LAB_NETNS) or not paths.SSH_KEY.exists() or not control_hosts.exists():
        # The lab network, key and hosts file, so that what runs inside can boot hosts itself and reach
        # them by name: ip netns exec binds the hosts file only if it exists when the command starts.
        with _lock():
            _ensure_ssh_key()
            network.ensure_bridge()
            network.write_control_hosts(hosts.running_hosts())
    # Stay alive as the parent: commands inside may need our (the machine's) mount namespace, see above.
    env = {**os.environ, ROOT_PID_ENV: str(os.getpid())}
    proc = subprocess.Popen(["ip", "netns", "exec", paths.LAB_NETNS, *args.command], env=env)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)


def cmd_run(args) -> int:
    if not args.command:
        raise LabError("usage: lab run HOST -- COMMAND [ARGS...]")
    argv = hosts.exec_args(args.name, args.command)
    os.execvp(argv[0], argv)


def cmd_shell(args) -> int:
    argv = hosts.exec_args(args.name, ["/bin/bash", "-l"])
    os.execvp(argv[0], argv)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lab", description=__doc__, epilog=(
        "examples:\n  lab up                       boot the default lab (inventory/lab.yml)\n"
        "  lab up --hosts 3             boot lab1..lab3\n"
        "  lab up --inventory inventory/examples/fleet.yml --out /tmp/fleet-lab.yml\n"
        "  lab exec -- ansible-playbook playbooks/lab/site.yml\n  lab run worker1 -- systemctl status 'atom-worker@*'\n"
        "  lab down"), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="boot hosts (kept if already running) and write their inventory")
    which = up.add_mutually_exclusive_group()
    which.add_argument("--hosts", type=int, metavar="N", help="boot lab1..labN (lab1: job server and web)")
    which.add_argument("--inventory", metavar="FILE", help="boot every host this inventory names")
    up.add_argument("--out", metavar="FILE",
                    help=f"inventory to write (default {paths.DEFAULT_OUT.relative_to(paths.REPO)})")
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="remove hosts (all by default): processes, disks, namespaces, cgroups")
    down.add_argument("names", nargs="*")
    down.set_defaults(func=cmd_down)
    sub.add_parser("status", help="list hosts and their systemd state").set_defaults(func=cmd_status)
    for name, func, text in (("poweroff", cmd_poweroff, "shut a host down cleanly, keeping its disk"),
                             ("boot", cmd_boot, "boot a powered-off host again"),
                             ("shell", cmd_shell, "a root shell inside a host")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("name")
        sp.set_defaults(func=func)
    cut = sub.add_parser("powercut", help="cut a host's power: every process killed at once, no shutdown; disk kept")
    cut.add_argument("names", nargs="+", metavar="name")
    cut.set_defaults(func=cmd_powercut)
    ex = sub.add_parser("exec", help="run a command in the lab network (where lab hosts are reachable)")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    ex.set_defaults(func=cmd_exec)
    rn = sub.add_parser("run", help="run a command inside a host (no ssh; exit code kept)")
    rn.add_argument("name")
    rn.add_argument("command", nargs=argparse.REMAINDER)
    rn.set_defaults(func=cmd_run)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "command", None) and args.command[:1] == ["--"]:
        args.command = args.command[1:]
    try:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (namespaces, mounts, cgroups)")
        # Inside `lab exec`, /sys is remounted for the lab netns (no cgroup tree) and new mounts stay private:
        # every command but exec itself works from the outer mount namespace.
        outer = _outer_mount_namespace_pid() if args.cmd != "exec" else None
        if outer:
            os.execvp("nsenter", ["nsenter", "-t", str(outer), "-m", "-n", f"--wd={os.getcwd()}", "--",
                                  sys.executable, "-m", "atomlab", *sys.argv[1:]])
        if args.cmd in CHANGES_STATE:
            with _lock():
                return args.func(args)
        return args.func(args)
    except LabError as exc:
        print(f"lab: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
