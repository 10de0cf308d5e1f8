"""`atom-workerctl status`: every instance's state beside gearmand's view of its site's functions."""

from __future__ import annotations

from . import model
from .errors import EXIT_NOT_ACTIVE, EXIT_OK
from .render import Out, ago, dump_json, iso, size
from .snapshot import InstanceView, Snapshot, hostname, take

JSON_SCHEMA_VERSION = 1
# A job server's "error" when the host was asked with --no-gearman (the fleet merge does not count it).
NOT_QUERIED = "not queried"


def instance_json(inst: InstanceView) -> dict:
    s = inst.state
    hit, reason = s.start_limit()
    return {
        "unit": s.unit,
        "instance": s.unit.rsplit("@", 1)[-1].removesuffix(".service"),
        "site": inst.pool.site.name if inst.pool else None,
        "pool": inst.pool.name if inst.pool else None,
        "expected": inst.expected,
        "load_state": s.load_state,
        "active_state": s.active_state,
        "sub_state": s.sub_state,
        "result": s.result,
        "n_restarts": s.n_restarts,
        "since": iso(s.since_usec),
        "since_usec": s.since_usec,
        "main_pid": s.main_pid or None,
        "memory_bytes": s.memory_bytes,
        "enabled": s.enabled,
        "unit_file_state": s.unit_file_state,
        "need_daemon_reload": s.need_reload,
        "exit": {"code": s.exit_code, "status": s.exit_status} if s.exit_code else None,
        "start_limit": {
            "burst": s.start_limit_burst,
            "interval_sec": s.start_limit_interval_usec // 1_000_000,
            "hit": hit,
            "reason": reason,
        },
        "crash_loop": s.crash_looping(),
        "gearman": {"connected": inst.connected, "registered": inst.registered},
    }


def snapshot_json(snap: Snapshot, selected: list[str], exit_code: int) -> dict:
    chosen = set(selected)
    sites = []
    for sv in snap.sites:
        site = sv.site
        expected_funcs: dict[str, str] = {}
        for pv in sv.pools:
            for cls in pv.classes:
                expected_funcs[f"{sv.prefix}-{cls}"] = cls
        gearman = []
        for server in sv.servers:
            view = snap.gearman.get(server)
            entry = {"server": server, "reachable": bool(view and view.reachable),
                     "error": view.error if view else NOT_QUERIED, "local_ip": view.local_ip if view else None,
                     "workers_from_this_host": len(view.local_workers()) if view and view.reachable else None,
                     "functions": []}
            if view and view.reachable:
                names = sorted(set(expected_funcs) | {f for f in view.functions if f.startswith(sv.prefix + "-")})
                for name in names:
                    fs = view.functions.get(name)
                    entry["functions"].append({
                        "function": name, "job": name.split("-", 1)[1] if "-" in name else name,
                        "expected": name in expected_funcs,
                        "queued": fs.queued if fs else 0, "running": fs.running if fs else 0,
                        "available_workers": fs.available if fs else 0})
            gearman.append(entry)
        pools = []
        for pv in sv.pools:
            pool = pv.pool
            pools.append({
                "name": pool.name, "unit_template": pool.unit_template, "instances": len(pool.units),
                "scaled": pool.scaled, "recycling": pool.recycling, "jobs": pv.classes,
                "gearman": {s: {"connected": pv.connected.get(s), "registered_lines": pv.lines.get(s)}
                            for s in sv.servers},
                "units": [instance_json(i) for i in snap.of_pool(pool) if i.state.unit in chosen],
            })
        sites.append({
            "name": site.name, "root": site.root, "realpath": sv.config.realpath if sv.config else site.realpath,
            "workers_key": sv.config.workers_key if sv.config else site.workers_key,
            "prefix": sv.prefix, "prefix_recorded": site.prefix, "config_error": sv.config_error,
            "target": site.target, "gearman": gearman, "pools": pools,
        })
    units = [snap.instances[u] for u in selected if u in snap.instances]
    expected = [i for i in units if i.expected]
    return {
        "schema": JSON_SCHEMA_VERSION,
        "host": hostname(),
        "manager": snap.host.manager,
        "config": snap.host.path,
        "time": iso(snap.taken_at * 1e6),
        "exit_code": exit_code,
        "summary": {
            "instances": len(expected),
            "active": sum(i.state.active for i in expected),
            "not_active": sum(not i.state.active for i in expected),
            "start_limit_hit": sum(i.state.start_limit()[0] for i in expected),
            "registered": sum(i.registered is True for i in expected),
            "gearman_unreachable": sum(1 for v in snap.gearman.values() if not v.reachable),
        },
        "sites": sites,
        "strays": [instance_json(i) for i in snap.strays() if i.state.unit in chosen],
    }


def exit_code_for(snap: Snapshot, selected: list[str], explicit: bool) -> int:
    """3 when an expected instance (or any instance named on the command line) is not active."""
    for unit in selected:
        inst = snap.instances.get(unit)
        if inst is None or ((inst.expected or explicit) and not inst.state.active):
            return EXIT_NOT_ACTIVE
    return EXIT_OK


def gearman_cell(inst: InstanceView, queried: bool = True) -> tuple[str, str]:
    if not inst.state.active or not queried:
        return "-", ""
    if inst.registered is True:
        return "registered", "green"
    if inst.connected is None:
        return "?", "yellow"
    if inst.connected and inst.registered is None:
        return "connected", "yellow"
    return "not registered", "red"


def state_cell(inst: InstanceView) -> tuple[str, str]:
    s = inst.state
    text = f"{s.active_state} {s.sub_state}" if s.sub_state != s.active_state else s.active_state
    if s.load_state != "loaded":
        return s.load_state, "red"
    style = "green" if s.active else ("red" if s.active_state == "failed" else "yellow")
    return text, style


def note_cell(inst: InstanceView) -> tuple[str, str]:
    s = inst.state
    notes = []
    style = ""
    if s.start_limit()[0]:
        notes.append("START LIMIT HIT")
        style = "red"
    elif s.crash_looping():
        notes.append(f"crash loop ({s.n_restarts} of {s.start_limit_burst} starts)")
        style = "red"
    if not inst.expected:
        notes.append("not in sites.json")
        style = style or "yellow"
    if inst.expected and not s.enabled and s.load_state == "loaded":
        notes.append("not enabled")
        style = style or "yellow"
    if s.need_reload:
        notes.append("unit file changed: daemon-reload")
        style = style or "yellow"
    return ", ".join(notes), style


def render(out: Out, snap: Snapshot, selected: list[str], gearman: bool) -> None:
    chosen = set(selected)
    units = [snap.instances[u] for u in selected if u in snap.instances]
    expected = [i for i in units if i.expected]
    active = sum(i.state.active for i in expected)
    plural = "s" if len(expected) != 1 else ""
    head = f"{hostname()} ({snap.host.manager}): {len(expected)} instance{plural}, {active} active"
    failed = len(expected) - active
    if failed:
        head += f", {out.paint(str(failed) + ' not active', 'red')}"
    out.line(head)
    for sv in snap.sites:
        rows, styles = [], []
        for pv in sv.pools:
            for inst in snap.of_pool(pv.pool):
                if inst.state.unit not in chosen:
                    continue
                rows.append(_row(inst, snap))
                styles.append(_styles(inst, snap))
        if not rows:
            continue
        out.line()
        out.line(out.paint(f"site {sv.site.name}", "bold") + f"  {sv.site.root}  prefix {sv.prefix}")
        if sv.config_error:
            out.line("  " + out.paint(f"config: {sv.config_error}", "red"))
        out.table(["INSTANCE", "POOL", "STATE", "RESULT", "RESTARTS", "SINCE", "PID", "MEMORY", "GEARMAN", "NOTE"],
                  rows, styles)
        if gearman:
            _render_gearman(out, snap, sv)
    strays = [i for i in snap.strays() if i.state.unit in chosen]
    if strays:
        out.line()
        out.line(out.paint("instances no pool expects", "bold") + " (scaled down outside sites.json?)")
        out.table(["INSTANCE", "POOL", "STATE", "RESULT", "RESTARTS", "SINCE", "PID", "MEMORY", "GEARMAN", "NOTE"],
                  [_row(i, snap) for i in strays], [_styles(i, snap) for i in strays])


def _row(inst: InstanceView, snap: Snapshot) -> list[str]:
    s = inst.state
    return [model.short(s.unit), inst.pool.label() if inst.pool else "?", state_cell(inst)[0], s.result,
            f"{s.n_restarts}/{s.start_limit_burst}" if s.start_limit_burst else str(s.n_restarts),
            ago(s.since_usec, snap.taken_at), str(s.main_pid or "-"), size(s.memory_bytes),
            gearman_cell(inst, snap.gearman_queried)[0], note_cell(inst)[0]]


def _styles(inst: InstanceView, snap: Snapshot) -> list[str]:
    s = inst.state
    return ["", "", state_cell(inst)[1], "" if s.result == "success" else "red",
            "red" if s.n_restarts else "", "", "", "", gearman_cell(inst, snap.gearman_queried)[1],
            note_cell(inst)[1]]


def _render_gearman(out: Out, snap: Snapshot, sv) -> None:
    for server in sv.servers:
        view = snap.gearman.get(server)
        out.line()
        if view is None or not view.reachable:
            out.line(f"gearmand {server}: " + out.paint(f"UNREACHABLE: {view.error if view else 'not queried'}",
                                                         "red"))
            continue
        local = view.local_workers()
        out.line(f"gearmand {server}: up, {len(local)} worker connection{'s' if len(local) != 1 else ''} "
                 f"from this host ({view.local_ip})")
        expected: dict[str, str] = {}
        for pv in sv.pools:
            for cls in pv.classes:
                expected.setdefault(cls, pv.pool.label())
        names = list(expected) + sorted(
            f.split("-", 1)[1] for f in view.functions if f.startswith(sv.prefix + "-")
            and f.split("-", 1)[1] not in expected)
        rows, styles = [], []
        for cls in names:
            fs = view.functions.get(f"{sv.prefix}-{cls}")
            queued, running, avail = (fs.queued, fs.running, fs.available) if fs else (0, 0, 0)
            rows.append([cls, str(queued), str(running), str(avail), expected.get(cls, "(no pool here)")])
            styles.append(["", "yellow" if queued and not avail else "", "", "red" if not avail else "", ""])
        out.table(["JOB", "QUEUED", "RUNNING", "WORKERS", "POOL"], rows, styles, indent="  ")


def run(args, host: model.Host, backend) -> int:
    # Unknown names fail before any D-Bus call (globs may match stray instances: checked below).
    model.select(host, [n for n in args.instances if not any(c in n for c in "*?[")], args.site, args.pool)
    snap = take(host, backend, gearman=not args.no_gearman, timeout=args.gearman_timeout)
    sel = model.select(host, args.instances, args.site, args.pool, loaded=list(snap.instances))
    selected = list(sel.units)
    if not sel.explicit and args.site is None and args.pool is None:
        selected += [i.state.unit for i in snap.strays()]
    for unit in selected:
        if unit not in snap.instances:  # named, but neither expected nor loaded
            snap.instances[unit] = InstanceView(backend.state(unit), host.pool_of(unit), False)
    code = exit_code_for(snap, selected, sel.explicit)
    if args.json:
        dump_json(snapshot_json(snap, selected, code))
    else:
        render(Out(), snap, selected, gearman=not args.no_gearman)
    return code
