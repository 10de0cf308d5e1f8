"""The process-manager interface every command talks to, and the state of one worker instance.

A backend knows how to list instances and act on them; it knows nothing about sites, gearmand or
output. systemd (systemd.py, pystemd over D-Bus), supervisord (supervisor.py, XML-RPC on its unix
socket plus the atom-worker-policy listener's state file) and circus (circus.py, circusd's control socket
through circus's client library plus the same policy's state file, policystate.py) implement the same
methods and fill the same UnitState fields, so every command and the `--json` schema stay the same.

Policy that lives here, once: every deliberate start or restart resets the instance's failed state and
start-limit counter first (docs/facts.md, "systemd's start limit"), so only crash loops ever spend the start limit.
"""

from __future__ import annotations

# For each Restart= setting, the Results after which systemd restarts the service (systemd.service(5)).
RESTART_APPLIES = {
    "always": {"success", "exit-code", "signal", "core-dump", "timeout", "watchdog"},
    "on-success": {"success"},
    "on-failure": {"exit-code", "signal", "core-dump", "timeout", "watchdog"},
    "on-abnormal": {"signal", "core-dump", "timeout", "watchdog"},
    "on-watchdog": {"watchdog"},
    "on-abort": {"signal", "core-dump"},
    "no": set(),
}


class UnitState:
    """One instance as the process manager sees it. Times are microseconds since the epoch (0 = never)."""

    __slots__ = ("unit", "load_state", "active_state", "sub_state", "result", "n_restarts", "since_usec",
                 "main_pid", "memory_bytes", "unit_file_state", "need_reload", "start_limit_burst",
                 "start_limit_interval_usec", "restart", "restart_usec", "restart_prevent", "exit_code",
                 "exit_status", "job", "limit_hit", "limit_reason", "namespec")

    def __init__(self, unit: str, **fields):
        self.unit = unit
        self.load_state = "not-found"
        self.active_state = "inactive"
        self.sub_state = "dead"
        self.result = "success"
        self.n_restarts = 0
        self.since_usec = 0
        self.main_pid = 0
        self.memory_bytes: int | None = None
        self.unit_file_state = ""
        self.need_reload = False
        self.start_limit_burst = 0
        self.start_limit_interval_usec = 0
        self.restart = "no"
        self.restart_usec = 0
        self.restart_prevent: tuple = ()
        self.exit_code = ""       # how the main process ended last: exited, killed, dumped ("" = unknown)
        self.exit_status: int | None = None
        self.job = ""             # a queued job (start, stop, restart) or ""
        # A backend that knows whether the start limit is used up (supervisord: the policy listener's
        # `failed`) sets these; None: derive it from the unit's state as on systemd (start_limit()).
        self.limit_hit: bool | None = None
        self.limit_reason: str | None = None
        self.namespec = ""        # the policy's group:process under supervisord and circus ("" on systemd)
        for key, value in fields.items():
            setattr(self, key, value)

    @property
    def active(self) -> bool:
        return self.active_state == "active"

    @property
    def enabled(self) -> bool:
        return self.unit_file_state in ("enabled", "enabled-runtime", "static", "alias", "indirect", "generated")

    def start_limit(self) -> tuple[bool, str | None]:
        """Whether the start limit is used up (the instance stays down until reset), and why we think so.

        Two signs, either is enough:
        1. Result is `start-limit-hit`: systemd says so (a unit that was healthy before, e.g. after
           StartLimitBurst deliberate restarts without reset-failed).
        2. The unit is `failed` with a Result after which its Restart= policy restarts it (on-failure
           after exit-code, signal, core-dump, timeout, watchdog), the exit status is not one of
           RestartPreventExitStatus=, and the limit is on (StartLimitBurst and StartLimitIntervalSec
           > 0). systemd only leaves such a unit failed when it refused the restart, and for our units
           the one reason it refuses is the start rate limiter. systemd 252 keeps the first failure's
           Result (`exit-code`) when the limiter then refuses the restart, so 1 alone misses every
           crash loop. NRestarts (automatic restarts since the last reset) is given as evidence: a crash
           loop stops with NRestarts == StartLimitBurst.
        """
        if self.limit_hit is not None:
            return self.limit_hit, (self.limit_reason if self.limit_hit else None)
        burst, interval = self.start_limit_burst, self.start_limit_interval_usec
        if self.result == "start-limit-hit":
            return True, "Result=start-limit-hit"
        if self.active_state != "failed" or burst <= 0 or interval <= 0:
            return False, None
        if self.result not in RESTART_APPLIES.get(self.restart, set()):
            return False, None
        if self.exit_code == "exited" and self.exit_status in self.restart_prevent:
            return False, None
        return True, (f"failed with Result={self.result} although Restart={self.restart} restarts after that: "
                      f"the start limiter refused the restart ({self.n_restarts} automatic restarts, "
                      f"StartLimitBurst={burst} within {format_usec(interval)})")

    def crash_looping(self) -> bool:
        """Restarted automatically after failures since the last reset, and not (yet) stopped by the limit."""
        return self.n_restarts > 0 and not self.start_limit()[0] and self.active_state != "inactive"


def format_usec(usec: int) -> str:
    seconds = usec // 1_000_000
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


class Backend:
    """What a process manager must offer. Unit names are full (`atom-worker@1.service`)."""

    name = "abstract"

    def units(self, names: list[str], glob: str) -> dict[str, UnitState]:
        """The state of each named unit, plus every loaded unit matching glob (strays included)."""
        raise NotImplementedError

    def state(self, unit: str) -> UnitState:
        return self.units([unit], "")[unit]

    def reset_failed(self, unit: str) -> None:
        raise NotImplementedError

    def start(self, unit: str) -> None:
        """Reset the failed state and start-limit counter, then start."""
        raise NotImplementedError

    def restart(self, unit: str) -> None:
        """Reset the failed state and start-limit counter, then restart (start when stopped)."""
        raise NotImplementedError

    def stop(self, unit: str) -> None:
        raise NotImplementedError

    def enable(self, units: list[str]) -> list[str]:
        """Enable at boot; returns what changed (for the report)."""
        raise NotImplementedError

    def disable(self, units: list[str]) -> list[str]:
        raise NotImplementedError

    def reload(self) -> None:
        """Make the manager reread its configuration (systemd: daemon-reload)."""
        raise NotImplementedError

    def pids(self, state: UnitState) -> list[int]:
        """Every process of the instance (main process and its children)."""
        return _process_tree(state.main_pid) if state.main_pid else []

    def close(self) -> None:
        pass


def _process_tree(pid: int) -> list[int]:
    out = [pid]
    i = 0
    while i < len(out):
        p = out[i]
        i += 1
        try:
            with open(f"/proc/{p}/task/{p}/children") as fh:
                out += [int(c) for c in fh.read().split()]
        except OSError:
            pass
    return out


def open_backend(manager: str, host=None) -> Backend:
    """The backend for the manager named in sites.json (imported only when needed).

    The supervisord and circus backends need the host's model (sites.json's `supervisor` / `circus`
    settings and the sites' groups); without `host`, the model loaded last (model.load) is used."""
    if manager == "systemd":
        from .systemd import SystemdBackend

        return SystemdBackend()
    if manager == "supervisor":
        from . import model
        from .supervisor import SupervisorBackend

        return SupervisorBackend(host if host is not None else model.current())
    if manager == "circus":
        from . import model
        from .circus import CircusBackend

        return CircusBackend(host if host is not None else model.current())
    from .errors import ConfigError

    raise ConfigError(f"process manager {manager!r} is not supported by atom-workerctl "
                      "(supported: systemd, supervisor, circus)")
