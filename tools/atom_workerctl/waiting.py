"""Bounded waits: until instances are active and registered with gearmand again, with a progress line."""

from __future__ import annotations

import time

from . import model
from .render import Out, Progress
from .snapshot import Snapshot, take

POLL = 0.25


class WaitResult:
    def __init__(self):
        self.registered: list[str] = []
        self.failed: dict[str, str] = {}      # unit -> why it will not come up by itself
        self.pending: dict[str, str] = {}     # unit -> what it was still doing at the deadline
        self.snapshot: Snapshot | None = None
        self.elapsed = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.pending


def _why_failed(inst) -> str | None:
    s = inst.state
    if s.start_limit()[0]:
        return f"start limit hit again (Result={s.result})"
    if s.active_state == "failed":
        status = f", status {s.exit_status}" if s.exit_status is not None and s.exit_code == "exited" else ""
        return f"failed (Result={s.result}{status})"
    if s.sub_state == "auto-restart":
        return f"exited and waits to be restarted (Result={s.result}, restart {s.n_restarts})"
    if s.load_state != "loaded":
        return f"not loaded ({s.load_state})"
    return None


def _gearmand_counts_pool(snap: Snapshot, inst) -> bool:
    """gearmand's own `status` agrees: every function of the pool has at least as many available workers
    as the pool has active instances here. A second check beside the per-connection one, because a
    rolling restart must not move on while a new worker still lacks some of its functions."""
    pv = snap.pool_view(inst.pool)
    site = next((sv for sv in snap.sites if pv in sv.pools), None)
    # Instances still registered under an old prefix (registered False) do not serve these functions.
    active = sum(1 for i in snap.of_pool(inst.pool) if i.state.active and i.registered is not False)
    for server in site.servers if site else []:
        view = snap.gearman.get(server)
        if view is None or not view.reachable:
            continue
        for function in pv.functions:
            status = view.functions.get(function)
            if status is None or status.available < active:
                return False
    return True


def wait_registered(host: model.Host, backend, units: list[str], timeout: float, out: Out,
                    progress: bool = True, gearman_timeout: float | None = None,
                    label: str = "registered with gearmand", replacing: dict[str, int] | None = None) -> WaitResult:
    """Poll until every unit is active and registered at every reachable server of its site.

    An instance that fails, or is waiting for an automatic restart, is not waited for any longer:
    a crash loop must not keep an operator waiting for the full timeout.

    A unit with a job queued is not done yet: systemd's RestartUnit returns once the job is queued, and
    for a moment after it the unit is still active and running its old, registered process (seen on lab
    hosts in about one immediate read of eight). `replacing` (unit -> the main PID before a restart) makes
    that old process never count as the restarted one, whatever the manager reports meanwhile.
    """
    result = WaitResult()
    started = time.monotonic()
    bar = Progress(out, progress)
    remaining = list(units)
    while True:
        snap = take(host, backend, timeout=gearman_timeout)
        result.snapshot = snap
        waiting = []
        for unit in remaining:
            inst = snap.instances.get(unit)
            if inst is None:
                waiting.append((unit, "not loaded"))
                continue
            old_pid = (replacing or {}).get(unit)
            if inst.state.job or (old_pid and inst.state.main_pid == old_pid):
                waiting.append((unit, (f"is still being {'restarted' if old_pid else 'started or stopped'} "
                                      f"({'a job is queued' if inst.state.job else f'PID {old_pid} still runs'})")))
                continue
            why = _why_failed(inst)
            if why and time.monotonic() - started > 1.0:
                result.failed[unit] = why
                continue
            if inst.state.active and inst.registered is True and _gearmand_counts_pool(snap, inst):
                result.registered.append(unit)
                continue
            if inst.state.active and inst.registered is None and inst.pool is not None:
                pv = snap.pool_view(inst.pool)
                if not pv.functions:  # the site's configuration is unreadable: active is all we can check
                    result.registered.append(unit)
                    continue
            waiting.append((unit, _doing(inst, snap)))
        remaining = [u for u, _ in waiting]
        elapsed = time.monotonic() - started
        result.elapsed = elapsed
        if not waiting:
            break
        if elapsed >= timeout:
            result.pending = dict(waiting)
            break
        done = len(result.registered)
        total = len(units)
        first = waiting[0]
        bar.update(f"waiting: {done}/{total} {label}; {model.short(first[0])} {first[1]} ({elapsed:.0f}s/{timeout:g}s)")
        time.sleep(POLL)
    bar.done()
    return result


def _doing(inst, snap: Snapshot) -> str:
    s = inst.state
    if not s.active:
        return f"is {s.active_state} ({s.sub_state})"
    if inst.pool is not None:
        sv = snap.site_view(inst.pool.site)
        down = [srv for srv in sv.servers if srv in snap.gearman and not snap.gearman[srv].reachable]
        if down and len(down) == len(sv.servers):
            return f"is active, but gearmand {', '.join(down)} is unreachable"
    if inst.connected == []:
        return "is active, not connected to gearmand yet"
    return "is active, not registered yet"


def report(out: Out, result: WaitResult, err_out: Out) -> int:
    """Print what the wait found; 0 when everything registered, 3 otherwise."""
    from .errors import EXIT_NOT_ACTIVE, EXIT_OK

    for unit in result.registered:
        out.line(f"{model.short(unit)}: active and registered")
    for unit, why in result.failed.items():
        err_out.line(f"{model.short(unit)}: {why}; see: atom-workerctl logs -n 30 {model.short(unit)}")
    for unit, doing in result.pending.items():
        err_out.line(f"{model.short(unit)}: still not registered after {result.elapsed:.0f}s: {doing}; "
                     "see: atom-workerctl doctor")
    return EXIT_OK if result.ok else EXIT_NOT_ACTIVE
