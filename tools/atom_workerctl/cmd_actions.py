"""The commands that change things: reset, restart [--rolling], scale, daemon-reload."""

from __future__ import annotations

import sys
import time

from . import model
from .errors import EXIT_NOT_ACTIVE, EXIT_OK, WorkerctlError
from .render import Out, dump_json, iso
from .snapshot import take
from .waiting import report, wait_registered


def _outs(args) -> tuple[Out, Out]:
    # With --json the human lines go to stderr, so stdout stays one JSON document.
    out = Out(sys.stderr) if getattr(args, "json", False) else Out()
    return out, Out(sys.stderr)


def _result_json(action: str, acted: list[dict], wait, code: int) -> dict:
    data = {"schema": 1, "command": action, "time": iso(time.time() * 1e6), "exit_code": code, "actions": acted}
    if wait is not None:
        data["wait"] = {"registered": wait.registered, "failed": wait.failed, "pending": wait.pending,
                        "seconds": round(wait.elapsed, 2)}
    return data


# -- reset ---------------------------------------------------------------------------------------------------
def reset(args, host: model.Host, backend) -> int:
    """Give instances their whole start budget back and run them.

    Not active (failed, stopped, or waiting to be restarted after a crash: `activating (auto-restart)`):
    stop (cancels a pending automatic restart, which would otherwise count as one more start and leave
    NRestarts at 1), reset-failed (failed state, start-limit counter and NRestarts), start. Active with
    NRestarts > 0 (it crashed since the last reset): reset-failed only, which zeroes the counter of a running
    unit. Verified on systemd 252 by tests/cli/test_doctor_fixes_lab.py.
    """
    out, err = _outs(args)
    snap = take(host, backend, gearman=False, configs=False)
    names = [] if args.all else args.instances
    sel = model.select(host, names, args.site, args.pool, loaded=list(snap.instances))
    acted = []
    for unit in sel.units:
        inst = snap.instances.get(unit)
        state = inst.state if inst else backend.state(unit)
        if state.active:
            if state.n_restarts:
                backend.reset_failed(unit)
                out.line(f"{model.short(unit)}: active after {state.n_restarts} automatic restart"
                         f"{'s' if state.n_restarts != 1 else ''}: reset-failed (its whole start budget back)")
                acted.append({"unit": unit, "was": "active", "start_limit_hit": False, "result": state.result,
                              "n_restarts": state.n_restarts, "did": ["reset-failed"]})
            elif sel.explicit:
                out.line(f"{model.short(unit)}: already active (use `atom-workerctl restart "
                         f"{model.short(unit)}` to restart it)")
            continue
        hit, _ = state.start_limit()
        was = f"{state.active_state}" + (f" ({state.sub_state})" if state.sub_state == "auto-restart" else "") + \
              (" (start limit hit)" if hit else "") + \
              (f", Result={state.result}" if state.result != "success" else "")
        did = []
        if state.active_state not in ("inactive", "failed") or state.job:
            backend.stop(unit)  # cancels the pending automatic restart (or a queued job)
            _wait_stopped(backend, [unit], args.wait_timeout, out)
            did.append("stop")
        backend.start(unit)  # ResetFailedUnit, then StartUnit
        did += ["reset-failed", "start"]
        out.line(f"{model.short(unit)}: was {was}: {', '.join(did[:-2] + ['reset-failed', 'started'])}")
        acted.append({"unit": unit, "was": state.active_state, "start_limit_hit": hit, "result": state.result,
                      "n_restarts": state.n_restarts, "did": did})
    started = [a["unit"] for a in acted if "start" in a["did"]]
    if acted and not started:
        if args.json:
            dump_json(_result_json("reset", acted, None, EXIT_OK))
        return EXIT_OK
    if not acted:
        out.line("nothing to reset: every selected instance is active")
        if args.json:
            dump_json(_result_json("reset", acted, None, EXIT_OK))
        return EXIT_OK
    wait = None
    code = EXIT_OK
    if not args.no_wait:
        wait = wait_registered(host, backend, started, args.wait_timeout, out,
                               gearman_timeout=args.gearman_timeout)
        code = report(out, wait, err)
    if args.json:
        dump_json(_result_json("reset", acted, wait, code))
    return code


# -- restart -------------------------------------------------------------------------------------------------
def restart(args, host: model.Host, backend) -> int:
    out, err = _outs(args)
    snap = take(host, backend, gearman=args.rolling, timeout=args.gearman_timeout)
    sel = model.select(host, args.instances, args.site, args.pool, loaded=list(snap.instances))
    units = sel.units
    if not units:
        raise WorkerctlError("no instance to restart")
    acted = []
    # The main PID of each before its restart: the wait must see a new process, not the old one still running
    # in the moment before the manager acts on the restart (waiting.wait_registered).
    old_pids = {u: i.state.main_pid for u, i in snap.instances.items() if u in units and i.state.main_pid}
    if not args.rolling:
        for unit in units:
            backend.restart(unit)  # ResetFailedUnit, then RestartUnit
            out.line(f"{model.short(unit)}: reset-failed, restarted")
            acted.append({"unit": unit, "did": ["reset-failed", "restart"]})
        wait = None
        code = EXIT_OK
        if not args.no_wait:
            wait = wait_registered(host, backend, units, args.wait_timeout, out, gearman_timeout=args.gearman_timeout,
                                   replacing=old_pids)
            code = report(out, wait, err)
        if args.json:
            dump_json(_result_json("restart", acted, wait, code))
        return code

    # Rolling: one at a time; the next only once this one is registered with gearmand again.
    code = EXIT_OK
    last_wait = None
    for n, unit in enumerate(units, 1):
        gap = _would_leave_without_worker(snap, unit)
        if gap:
            err.line(f"warning: while {model.short(unit)} restarts, no other worker takes {', '.join(gap[:4])}"
                     f"{' ...' if len(gap) > 4 else ''} (jobs wait in gearmand's queue meanwhile)")
        backend.restart(unit)
        out.line(f"[{n}/{len(units)}] {model.short(unit)}: reset-failed, restarted")
        entry = {"unit": unit, "did": ["reset-failed", "restart"], "registered": None}
        acted.append(entry)
        pid = snap.instances[unit].state.main_pid if unit in snap.instances else old_pids.get(unit)
        last_wait = wait_registered(host, backend, [unit], args.wait_timeout, out,
                                    gearman_timeout=args.gearman_timeout, replacing={unit: pid} if pid else None)
        entry["registered"] = last_wait.ok
        entry["seconds"] = round(last_wait.elapsed, 2)
        if not last_wait.ok:
            report(out, last_wait, err)
            rest = [model.short(u) for u in units[n:]]
            if rest:
                err.line(f"stopped the rolling restart: {', '.join(rest)} not restarted")
            code = EXIT_NOT_ACTIVE
            break
        out.line(f"[{n}/{len(units)}] {model.short(unit)}: registered again after {last_wait.elapsed:.1f}s")
        snap = last_wait.snapshot
    if args.json:
        dump_json(_result_json("restart", acted, last_wait, code))
    return code


def _would_leave_without_worker(snap, unit: str) -> list[str]:
    """Job classes of unit's pool that no other registered worker (any host) takes right now."""
    inst = snap.instances.get(unit)
    if inst is None or inst.pool is None or not inst.state.active:
        return []
    sv = snap.site_view(inst.pool.site)
    pv = snap.pool_view(inst.pool)
    gaps = []
    for cls in pv.classes:
        func = f"{sv.prefix}-{cls}"
        available = sum(v.functions[func].available for s in sv.servers
                        if (v := snap.gearman.get(s)) and v.reachable and func in v.functions)
        if available <= 1:
            gaps.append(cls)
    return gaps


# -- scale ---------------------------------------------------------------------------------------------------
INVENTORY_NOTE = ("This is a runtime change recorded in {path}: the next site.yml run returns the pool to "
                  "the inventory's size ({inventory}); set {var} in the inventory to keep {n}.")


def scale(args, host: model.Host, backend) -> int:
    out, err = _outs(args)
    if args.count < 0:
        raise WorkerctlError("N must be 0 or more", exit_code=2)
    site = args.site or ("default" if any(s.name == "default" for s in host.sites) else None)
    if site is None and len(host.sites) == 1:
        site = host.sites[0].name
    pool = host.pool(args.pool or "default", site)
    template = pool.unit_template
    target = [model.instance_unit(template, str(i)) for i in range(1, args.count + 1)]
    loaded = [u for u in backend.units([], pool.prefix + "@*.service") if pool.owns(u)]
    current = list(dict.fromkeys(pool.units + loaded))
    remove = [u for u in current if u not in target]
    remove.sort(key=lambda u: (model.instance_number(u) or 0, u))
    acted = []
    supervisor = backend.name == "supervisor"
    # supervisord: instances beyond the program's numprocs are added by raising numprocs (enable), and
    # applying it (reload) restarts every process of the site's group; the stopped ones stay configured.
    changes = backend.enable(target) if target else []
    changes += backend.disable(remove) if remove else []
    restarted: list[str] = []
    if changes:
        backend.reload()
        if supervisor:
            restarted = [u for p in pool.site.pools for u in (target if p is pool else p.units)]
            out.line(f"supervisord: {'; '.join(changes)}; applied with `supervisorctl update`, which restarted "
                     f"every worker of site {pool.site.name} (their restart budgets reset first)")
        elif backend.name == "circus":
            # One watcher per instance: reloadconfig starts and stops only the watchers that changed.
            out.line(f"circus: {'; '.join(changes)}; applied with reloadconfig (the other workers keep running)")
            if getattr(backend, "reload_note", ""):  # a changed [circus] section: circusd itself was restarted
                out.line(backend.reload_note)
    states = backend.units(target + remove, "")
    for unit in target:
        if not states[unit].active:
            backend.start(unit)  # ResetFailedUnit, then StartUnit
            out.line(f"{model.short(unit)}: {'' if supervisor else 'enabled, '}reset-failed, started")
            acted.append({"unit": unit, "did": ["reset-failed", "start"] if supervisor
                          else ["enable", "reset-failed", "start"]})
    for unit in remove:
        if states[unit].active_state != "inactive" or states[unit].job:
            backend.stop(unit)
        backend.reset_failed(unit)
        if supervisor:
            out.line(f"{model.short(unit)}: stopped (it stays in supervisord's configuration: numprocs is not "
                     "lowered, which would restart the whole site)")
            acted.append({"unit": unit, "did": ["stop", "reset-failed"]})
        else:
            out.line(f"{model.short(unit)}: stopped, disabled")
            acted.append({"unit": unit, "did": ["stop", "disable", "reset-failed"]})
    stopping = [a["unit"] for a in acted if "stop" in a["did"]]
    if stopping and not args.no_wait:
        _wait_stopped(backend, stopping, args.wait_timeout, out)
    before = len(pool.units)
    recorded = _record(host, pool, target)
    inventory = recorded.get("inventory_instances", before)
    var = "atom_worker_instances" if (pool.site.name, pool.name) == ("default", "default") else \
        f"instances of pool {pool.name} (site {pool.site.name})"
    out.line(f"pool {pool.label()}: {before} -> {args.count} instance{'s' if args.count != 1 else ''}")
    out.line(INVENTORY_NOTE.format(path=host.path, inventory=inventory, var=var, n=args.count))
    wait = None
    code = EXIT_OK
    starting = [a["unit"] for a in acted if "start" in a["did"]]
    starting += [u for u in restarted if u not in starting]
    if starting and not args.no_wait:
        wait = wait_registered(host, backend, starting, args.wait_timeout, out, gearman_timeout=args.gearman_timeout)
        code = report(out, wait, err)
    if args.json:
        data = _result_json("scale", acted, wait, code)
        data.update({"site": pool.site.name, "pool": pool.name, "from": before, "to": args.count,
                     "inventory_instances": inventory, "enable_changes": changes})
        dump_json(data)
    return code


def _wait_stopped(backend, units: list[str], timeout: float, out: Out) -> None:
    """Until the stopped instances are really down (a worker mid-job gets TimeoutStopSec)."""
    from .render import Progress

    bar = Progress(out)
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    while True:
        states = backend.units(units, "")
        busy = [u for u, s in states.items() if s.active_state not in ("inactive", "failed") or s.job]
        if not busy or time.monotonic() > deadline:
            break
        bar.update(f"waiting: {len(units) - len(busy)}/{len(units)} stopped; {model.short(busy[0])} is "
                   f"{states[busy[0]].active_state} ({time.monotonic() - started:.0f}s/{timeout:g}s)")
        time.sleep(0.2)
    bar.done()
    for unit in units:
        backend.reset_failed(unit)


def _record(host: model.Host, pool: model.Pool, units: list[str]) -> dict:
    """Write the new size into sites.json, remembering the inventory's size the first time."""
    previous = pool.raw.get("scaled") if isinstance(pool.raw.get("scaled"), dict) else None
    inventory = previous.get("inventory_instances") if previous else len(pool.units)
    scaled = {"by": "atom-workerctl scale", "at": iso(time.time() * 1e6), "inventory_instances": inventory}
    pool.raw["units"] = units
    pool.raw["instances"] = len(units)
    if len(units) == inventory:
        pool.raw.pop("scaled", None)
    else:
        pool.raw["scaled"] = scaled
    pool.units = units
    pool.scaled = pool.raw.get("scaled")
    model.save(host)
    return scaled


# -- daemon-reload -------------------------------------------------------------------------------------------
def daemon_reload(args, host: model.Host, backend) -> int:
    out, _ = _outs(args)
    backend.reload()
    if backend.name == "supervisor":
        groups = getattr(backend, "changed_groups", [])
        out.line("supervisord: reread its configuration and updated " +
                 (f"group{'s' if len(groups) != 1 else ''} {', '.join(groups)} (supervisorctl update: every "
                  "process of a changed group was restarted, its restart budget reset first)" if groups
                  else "nothing: the workers' groups did not change"))
        return EXIT_OK
    if backend.name == "circus":
        names = getattr(backend, "changed_watchers", [])
        out.line("circus: reloadconfig " + (f"started, stopped or restarted {', '.join(names)} (each one whose "
                                            "configuration changed, restart budgets reset first); the other workers "
                                            "kept running" if names else
                                            "changed nothing: the workers' configuration did not change"))
        if getattr(backend, "reload_note", ""):
            out.line(backend.reload_note)
        return EXIT_OK
    out.line("reloaded the process manager's configuration (systemd daemon-reload); running workers keep their "
             "old settings until restarted: atom-workerctl restart --rolling")
    return EXIT_OK
