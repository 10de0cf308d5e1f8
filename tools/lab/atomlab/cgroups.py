"""Which cgroup world the lab runs in, and each host's cgroup in it: one place for that knowledge.

Two questions decide how a host's nspawn gets a cgroup of its own (two nspawns in one cgroup collide):
- the layout at /sys/fs/cgroup: the v1 "hybrid" one (name=systemd v1 at `systemd/`, cgroup2 at `unified/`)
  or the unified cgroup v2 tree alone (cgroup2fs at /sys/fs/cgroup: stock Debian 12, Ubuntu 22.04+);
- whether systemd is PID 1. Then systemd owns the tree: each nspawn runs in a transient scope with
  Delegate=yes (`atomlab.slice/atom-lab-NAME.scope`), so nspawn and the host's systemd get a subtree that
  systemd leaves alone. Without systemd the lab makes `atom-lab/NAME` under each root itself and moves
  nspawn there before it starts.
With `--keep-unit`, nspawn keeps that cgroup as its own and makes `supervisor/` (itself) and `payload/` (the
host) inside it, so everything of a host is in that subtree.
"""
import contextlib
import functools
import os
import signal
import time
from pathlib import Path

from .run import LabError, run

CGROUP_FS = Path("/sys/fs/cgroup")
HYBRID_ROOTS = (CGROUP_FS / "systemd", CGROUP_FS / "unified")
GROUP = "atom-lab"  # without systemd: <root>/atom-lab/NAME
SLICE = "atomlab.slice"  # with systemd (no dash: a dash in a slice name means a parent slice)


def _fs_type(mountpoint: Path) -> str | None:
    """The file system mounted at `mountpoint` (the last mount there wins, as for path lookups)."""
    found = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mountpoint):
            found = fields[fields.index("-") + 1]
    return found


@functools.cache
def world() -> tuple[str, bool]:
    """("unified" or "hybrid", systemd is PID 1). systemd's own test for that is /run/systemd/system."""
    systemd = Path("/run/systemd/system").is_dir()
    if _fs_type(CGROUP_FS) == "cgroup2":
        return "unified", systemd
    if _fs_type(HYBRID_ROOTS[0]) == "cgroup":
        return "hybrid", systemd
    raise LabError(f"{CGROUP_FS} is neither cgroup2 nor the hybrid layout with a name=systemd hierarchy: "
                   "systemd-nspawn cannot boot hosts here")


def describe() -> str:
    layout, systemd = world()
    where = (f"each host in scope {SLICE}/atom-lab-NAME.scope (systemd-run, Delegate=yes)" if systemd
             else f"each host in {GROUP}/NAME, made by the lab")
    kind = "unified cgroup v2" if layout == "unified" else "hybrid cgroup v1 (systemd/ + unified/)"
    return f"{kind}, PID 1 {'is' if systemd else 'is not'} systemd: {where}"


def _roots() -> list[Path]:
    layout, _ = world()
    return [CGROUP_FS] if layout == "unified" else [root for root in HYBRID_ROOTS if root.exists()]


def _unit(name: str) -> str:
    return f"atom-lab-{name}.scope"


def groups(name: str) -> list[Path]:
    """The host's cgroup in each hierarchy (they may not exist: a host that is off has none)."""
    _, systemd = world()
    relative = Path(SLICE, _unit(name)) if systemd else Path(GROUP, name)
    return [root / relative for root in _roots()]


def pids(name: str) -> list[int]:
    """Every process of the host: nspawn and everything in the host, read from its cgroup subtree."""
    found = []
    for group in groups(name):
        # nspawn and the host's systemd create and remove sub-groups while a host boots or stops: a directory
        # may vanish while it is walked (os.walk skips it; Path.rglob raises) or before its file is read.
        for directory, _, files in os.walk(group):
            if "cgroup.procs" in files:
                with contextlib.suppress(OSError):
                    found += [int(p) for p in Path(directory, "cgroup.procs").read_text().split()]
    return sorted(set(found))


def launch(name: str, command: list[str]) -> tuple[list[str], object]:
    """argv and preexec_fn that start `command` (nspawn) in the host's own cgroup."""
    _, systemd = world()
    if systemd:
        # A scope, not a service: systemd-run execs nspawn in place, so it stays our child with our output.
        run(["systemctl", "reset-failed", _unit(name)], check=False, quiet=True)
        return ["systemd-run", "--scope", "--quiet", "--collect", f"--unit={_unit(name)}", f"--slice={SLICE}",
                "--property=Delegate=yes", "--", *command], None
    targets = groups(name)
    for group in targets:
        group.mkdir(parents=True, exist_ok=True)
    _delegate_controllers(targets)

    def enter_own_cgroup():
        for group in targets:
            (group / "cgroup.procs").write_text(str(os.getpid()))
    return command, enter_own_cgroup


def _delegate_controllers(targets: list[Path]) -> None:
    """On cgroup v2, nspawn passes the controllers its cgroup has on to the host (cgroup.subtree_control):
    offer it those our parent group has. Optional: hosts boot without any (the hybrid layout offers none);
    the machine's own root is left as it is."""
    for group in targets:
        available, enabled = group.parent / "cgroup.controllers", group.parent / "cgroup.subtree_control"
        if not available.exists():  # a v1 hierarchy
            continue
        for controller in sorted(set(available.read_text().split()) - set(enabled.read_text().split())):
            with contextlib.suppress(OSError):  # a controller that cannot be enabled: the host does without
                enabled.write_text(f"+{controller}")


def kill(name: str) -> None:
    """SIGKILL every process of the host in one step: cgroup.kill (cgroup v2, Linux 5.14+) makes the kernel kill
    the whole subtree, processes forked meanwhile included. nspawn is in the subtree, so it dies too."""
    for group in groups(name):
        if (group / "cgroup.kill").exists():  # the v2 group; a host that is off has none
            with contextlib.suppress(FileNotFoundError):  # the host stopped meanwhile
                (group / "cgroup.kill").write_text("1")
            return


def remove(name: str) -> None:
    """After a crash or SIGKILL the host's init can outlive nspawn: kill what is left, then drop the cgroup."""
    for _ in range(50):
        left = pids(name)
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    _, systemd = world()
    if systemd:
        # systemd removes an empty scope with its delegated subtree; stop makes that happen now and waits.
        run(["systemctl", "stop", _unit(name)], check=False, quiet=True)
        run(["systemctl", "reset-failed", _unit(name)], check=False, quiet=True)
        return
    for group in groups(name):
        _rmdir_tree(group)


def remove_all() -> None:
    """A full `lab down`, no host left: drop the lab's parent group (or slice) too."""
    _, systemd = world()
    if systemd:
        run(["systemctl", "stop", SLICE], check=False, quiet=True)
        return
    for root in _roots():
        _rmdir_tree(root / GROUP)


def _rmdir_tree(group: Path) -> None:
    if group.exists():
        for sub in sorted((d for d in group.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
            sub.rmdir()
        group.rmdir()
