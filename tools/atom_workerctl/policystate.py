"""The restart policy's state file, as both the supervisord and the circus backend read and reset it.

One engine applies Restart=/RestartSec=/StartLimit* under supervisord (the atom-worker-policy event
listener) and under circus (the same engine in circusd's hooks, atom_worker_circus): both keep their
decisions in a JSON file of the same schema (roles/atom_worker/files/README-supervisor.md, "The state
file"): {"schema": 1, "processes": {"group:name": entry}}, entry as atom-worker-policy's new_entry(), written
whole under an exclusive flock on `<file>.lock`. This module reads it, resets entries as
`atom-worker-policy reset` does (what systemd's reset-failed is to a unit), and turns an entry into
UnitState's policy fields with systemd's meanings. Imports: the standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from . import atomicfile
from .errors import ManagerError

# The engine's defaults (atom-worker-policy DEFAULT_POLICY): used when neither the state file nor the
# manager's configuration says otherwise.
DEFAULT_POLICY = {"restart": "on-failure", "restart_sec": 30.0, "start_limit_interval_sec": 86400.0,
                  "start_limit_burst": 3}


# How long the CLI waits for the state file's lock (the engine holds it for a read-modify-write of a small file).
LOCK_WAIT = 10.0


def open_lock(path: str) -> int:
    """The state file's lock, as atom-worker-policy's open_lock: created 0600, never through a symlink, an
    existing one must be a regular file owned by this user (root) and is set to 0600 (flock works on a read-only
    fd: a lock file others can open lets any local user stop the restart policy, and circusd, by holding it)."""
    import stat

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise OSError(f"not a regular file owned by uid {os.geteuid()}")
        if stat.S_IMODE(st.st_mode) != 0o600:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


class PolicyState:
    """The state file at `path` (it may not exist yet: nothing was counted)."""

    def __init__(self, path: str):
        self.path = path

    def read(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as fh:
                state = json.load(fh)
        except FileNotFoundError:
            return {"processes": {}}
        except PermissionError:
            raise ManagerError(f"cannot read {self.path}: permission denied (run as root)") from None
        except (OSError, ValueError) as exc:
            raise ManagerError(f"cannot read the restart policy's state file {self.path}: {exc}") from None
        if not isinstance(state, dict) or not isinstance(state.get("processes"), dict):
            raise ManagerError(f"{self.path}: not an atom-worker-policy state file")
        return state

    @contextlib.contextmanager
    def update(self):
        """The state under the engine's exclusive flock, written back atomically when changed (the protocol of
        atom-worker-policy's StateStore). Never held across a call to the process manager: the engine takes
        the same lock inside it (circusd's hooks run on its one thread)."""
        import fcntl

        directory = os.path.dirname(self.path) or "."
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
            fd = open_lock(self.path + ".lock")
        except PermissionError:
            raise ManagerError(f"cannot lock {self.path}.lock: permission denied (run as root)") from None
        except OSError as exc:
            raise ManagerError(f"cannot lock {self.path}.lock: {exc}") from None
        try:
            deadline = time.monotonic() + LOCK_WAIT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise ManagerError(f"{self.path}.lock: still locked by another process after "
                                           f"{LOCK_WAIT:g}s (the restart policy's state file; try again)") from None
                    time.sleep(0.05)
            state = self.read()
            before = json.dumps(state, sort_keys=True)
            yield state
            if json.dumps(state, sort_keys=True) != before:
                state["schema"] = state.get("schema", 1)
                state["updated"] = round(time.time(), 3)
                # The temporary file's name as atom-worker-policy's StateStore makes it.
                prefix = "." + os.path.basename(self.path).removesuffix(".json") + "."
                atomicfile.replace(self.path, json.dumps(state, indent=2, sort_keys=True) + "\n", prefix=prefix)
        finally:
            os.close(fd)

    def reset(self, namespecs: list[str], cancel: bool = False) -> None:
        """systemctl reset-failed: failed state, start counter, NRestarts and Result cleared (as
        `atom-worker-policy reset`, which also clears Result=start-limit-hit; systemd's reset-failed sets
        Result=success whatever it was). cancel: also drop a scheduled restart."""
        if not os.path.exists(self.path):
            return  # the engine has counted nothing yet
        with self.update() as state:
            for ns in namespecs:
                entry = state["processes"].get(ns)
                if not isinstance(entry, dict):
                    continue
                entry.update(starts=[], failed=False, failed_at=None, n_restarts=0, result="success")
                if cancel:
                    entry["next_restart"] = None

    def cancel(self, namespecs: list[str]) -> None:
        """Drop a scheduled restart (systemd's StopUnit cancels a pending auto-restart too). A state file that
        cannot be written is no reason to refuse the stop itself."""
        if not os.path.exists(self.path):
            return
        with contextlib.suppress(ManagerError), self.update() as state:
            for ns in namespecs:
                entry = state["processes"].get(ns)
                if isinstance(entry, dict):
                    entry["next_restart"] = None


def policy_of(defaults: dict, entry: dict | None) -> dict:
    """The policy the engine applies to one process: its entry's own (written at each decision) over the
    defaults."""
    policy = dict(defaults)
    if entry and isinstance(entry.get("policy"), dict) and entry["policy"]:
        policy.update(entry["policy"])
    return policy


def apply_policy(s, policy: dict) -> float:
    """UnitState's StartLimitBurst/StartLimitIntervalSec/Restart=/RestartSec= from a policy; the interval in
    seconds (2**63: infinity)."""
    burst = int(policy.get("start_limit_burst") or 0)
    interval = policy.get("start_limit_interval_sec")
    interval = 2**63 if interval in ("infinity", None) else float(interval)
    s.start_limit_burst = burst
    s.start_limit_interval_usec = int(min(interval, 2**63 / 1e6) * 1_000_000)
    s.restart = str(policy.get("restart") or "no")
    s.restart_usec = int(float(policy.get("restart_sec") or 0) * 1_000_000)
    return interval


def last_exit(entry: dict | None) -> dict | None:
    last = (entry or {}).get("last_exit")
    return last if isinstance(last, dict) else None


def exit_fields(last: dict) -> tuple[str, int | None] | None:
    """(ExecMainCode as systemctl shows it, status) of the engine's last_exit; None when it says nothing."""
    status = last.get("exit_status")
    if last.get("spawn_error"):
        return "exited", 203  # systemd's 203/EXEC
    if status == -1 or last.get("signal"):
        return "killed", signal_number(last.get("signal"))
    if status is not None:
        return "exited", int(status)
    return None


def limit_reason(entry: dict, burst: int, interval: float, path: str) -> str:
    starts = entry.get("starts") or []
    return (f"the restart policy refused a restart at {clock(entry.get('failed_at'))}: "
            f"{len(starts)} starts since {clock((starts or [0])[0])}, StartLimitBurst={burst} within "
            f"{span(interval)} (atom-worker-policy state {path})")


def span(seconds: float) -> str:
    if seconds >= 2**62:
        return "infinity"
    from .backend import format_usec

    return format_usec(int(seconds * 1_000_000))


def clock(ts) -> str:
    if not isinstance(ts, (int, float)) or not ts:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def signal_number(name) -> int | None:
    import signal

    try:
        return int(getattr(signal, str(name)))
    except (AttributeError, TypeError, ValueError):
        return None


def rss_tree(pid: int) -> int | None:
    """Resident memory of the process and its children (systemd's MemoryCurrent counts the cgroup)."""
    from .backend import _process_tree

    total = 0
    found = False
    for p in _process_tree(pid):
        try:
            with open(f"/proc/{p}/statm") as fh:
                total += int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                found = True
        except (OSError, ValueError, IndexError):
            continue
    return total if found else None
