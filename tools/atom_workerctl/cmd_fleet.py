"""Fleet commands: `atom-workerctl --inventory FILE [--limit P] | -H HOST ... COMMAND`.

Each worker host runs its own `atom-workerctl COMMAND ... --json` over ssh (fleet_ssh.py), at most
`--parallel` hosts at a time, each within `--host-timeout`; the answers are merged here. `status` also
asks every job server once, from this host, for its `workers` and `status`, and sets each host's
units beside the connections gearmand has from that host's address: a host whose units run but which
has no connection to the job server stands out. `restart --rolling` goes one host at a time.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

from . import fleet_ssh
from .errors import EXIT_ERROR, EXIT_NO_SUCH, EXIT_NOT_ACTIVE, EXIT_OK, EXIT_USAGE, WorkerctlError
from .render import Out, dump_json, iso

EXIT_PARTIAL = 5  # some host could not be asked (unreachable, timed out, no atom-workerctl): the rest answered
FLEET_COMMANDS = ("status", "reset", "restart", "scale", "logs", "doctor", "daemon-reload", "jobs")
# Options that belong to the fleet and are not passed on to the hosts (name -> takes a value).
FLEET_OPTIONS = {"--inventory": True, "-i": True, "--limit": True, "-l": True, "--host": True, "-H": True,
                 "--parallel": True, "--host-timeout": True, "--group": True, "--json": False}
DEFAULT_TIMEOUT = {"status": 30.0, "doctor": 30.0, "daemon-reload": 30.0, "logs": 60.0, "jobs": 60.0}
ACTION_TIMEOUT = 300.0  # reset, restart, scale: their own waits (--wait-timeout per instance) come first


def wanted(args) -> bool:
    return bool(getattr(args, "inventory", None) or getattr(args, "hosts", None))


def remote_argv(argv: list[str], long_options: list[str]) -> list[str]:
    """The command line for the hosts: ours without the fleet's options (and with --json in front).

    Abbreviated long options (argparse accepts `--inv`) are resolved the way argparse does.
    """
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            out += argv[i:]
            break
        name, eq, _ = tok.partition("=")
        if name.startswith("--") and name not in FLEET_OPTIONS:
            matches = [o for o in long_options if o.startswith(name)]
            if len(matches) == 1 and matches[0] != name:
                name = matches[0]
                tok = name + tok[len(tok.partition("=")[0]):]  # the hosts get the whole name
        if name in FLEET_OPTIONS:
            i += 1 + (1 if FLEET_OPTIONS[name] and not eq else 0)
            continue
        if tok[:2] in ("-H", "-i", "-l") and len(tok) > 2 and not tok.startswith("--"):
            i += 1  # -Hhost
            continue
        out.append(tok)
        i += 1
    return [fleet_ssh.REMOTE, "--json", *out]


def targets(args) -> list[fleet_ssh.Target]:
    if args.inventory and args.hosts:
        raise WorkerctlError("--inventory and -H do not go together: name the hosts one way", EXIT_USAGE)
    if args.limit and not args.inventory:
        raise WorkerctlError("--limit needs --inventory", EXIT_USAGE)
    if args.inventory:
        found = fleet_ssh.from_inventory(args.inventory, args.limit, args.group or fleet_ssh.DEFAULT_GROUP)
        if not found:
            raise WorkerctlError(f"no host in group {args.group or fleet_ssh.DEFAULT_GROUP} of {args.inventory}"
                                 + (f" matches --limit {args.limit}" if args.limit else ""), EXIT_NO_SUCH)
        return found
    seen, out = set(), []
    for text in args.hosts:
        t = fleet_ssh.parse_host_option(text)
        if t.name not in seen:
            seen.add(t.name)
            out.append(t)
    return out


def overall_code(results) -> int:
    """5 when some host was not reached; else the worst of the hosts' codes (1, then 4, then 3)."""
    if any(not r.reached for r in results):
        return EXIT_PARTIAL
    codes = {r.code for r in results}
    for code in (EXIT_ERROR, EXIT_USAGE, EXIT_NO_SUCH, EXIT_NOT_ACTIVE):
        if code in codes:
            return code
    other = codes - {EXIT_OK}
    return max(other) if other else EXIT_OK


def run(args, argv: list[str], long_options: list[str]) -> int:
    if args.command not in FLEET_COMMANDS:
        raise WorkerctlError(f"{args.command} is not a fleet command (fleet commands: {', '.join(FLEET_COMMANDS)})",
                             EXIT_USAGE)
    if getattr(args, "watch", None) is not None:
        raise WorkerctlError("status --watch runs on one host (ssh to it, or use Prometheus: README, Monitoring)",
                             EXIT_USAGE)
    if args.parallel is None:
        # A rolling restart goes a host after another unless told to take batches: its promise is availability.
        args.parallel = 1 if args.command == "restart" and args.rolling else 10
    if args.parallel < 1:
        raise WorkerctlError("--parallel must be 1 or more", EXIT_USAGE)
    hosts = targets(args)
    fleet_ssh.env_ssh_args()  # a bad $ATOM_WORKERCTL_SSH_ARGS stops here, before any host
    remote = remote_argv(argv, long_options)
    timeout = args.host_timeout or DEFAULT_TIMEOUT.get(args.command, ACTION_TIMEOUT)
    if args.command == "status":
        return status(args, hosts, remote, timeout)
    if args.command == "doctor":
        return doctor(args, hosts, remote, timeout)
    if args.command == "logs":
        return logs(args, hosts, remote, timeout)
    if args.command == "jobs":
        from . import fleet_jobs

        return fleet_jobs.run(args, hosts, remote, timeout)
    if args.command == "restart" and args.rolling:
        return rolling(args, hosts, remote, timeout)
    return action(args, hosts, remote, timeout)


# -- output helpers ------------------------------------------------------------------------------------------
def _fleet_json(command: str, results: dict, code: int, **extra) -> dict:
    return {"schema": 1, "command": command, "mode": "fleet", "time": iso(time.time() * 1e6), "exit_code": code,
            "partial": code == EXIT_PARTIAL,
            # A host's own JSON; else why there is none (not reached, an error, or daemon-reload's plain lines).
            "hosts": {n: (r.data if r.data is not None else {"error": r.error, "exit_code": r.code,
                                                              "stderr": r.stderr[-5:]})
                      for n, r in results.items()},
            "fleet": {n: r.as_dict() for n, r in results.items()}, **extra}


def _unreached_line(out: Out, results: dict) -> None:
    down = [r for r in results.values() if not r.reached]
    if down:
        out.line(out.paint(f"{len(down)} of {len(results)} host{'s' if len(results) != 1 else ''} not reached "
                           f"(exit {EXIT_PARTIAL}, partial):", "red"))
        for r in down:
            out.line(f"  {r.target.name}: {r.error}")


# -- status --------------------------------------------------------------------------------------------------
def _servers(results: dict) -> list[str]:
    servers: list[str] = []
    for r in results.values():
        for site in (r.data or {}).get("sites") or []:
            for g in site.get("gearman") or []:
                if g.get("server") and g["server"] not in servers:
                    servers.append(g["server"])
    return servers


def _resolve(address: str) -> str | None:
    try:
        return socket.gethostbyname(address)
    except OSError:
        return None


def merge_status(results: dict, views: dict) -> dict:
    """gearmand's view (per server, from this host) beside each host's units.

    A host is matched to gearmand's `workers` lines by the address gearmand sees it at: the host's own
    `local_ip` towards that server (from its status), else its inventory address resolved here.
    """
    from .cmd_status import NOT_QUERIED

    ip_of: dict[str, dict[str, str | None]] = {}
    for name, r in results.items():
        ip_of[name] = {}
        for site in (r.data or {}).get("sites") or []:
            for g in site.get("gearman") or []:
                if g.get("local_ip"):
                    ip_of[name][g["server"]] = g["local_ip"]
    fallback = {name: _resolve(r.target.address) for name, r in results.items()}
    gearman, per_host = {}, {name: {"connections": {}, "notes": []} for name in results}
    prefixes = set()
    for r in results.values():
        for site in (r.data or {}).get("sites") or []:
            if site.get("prefix"):
                prefixes.add(site["prefix"])
    for server, view in views.items():
        entry = {"reachable": view.reachable, "error": view.error, "asked_from": "control host",
                 "functions": [], "connections": {}, "other_connections": []}
        gearman[server] = entry
        if not view.reachable:
            continue
        host_at = {}
        for name in results:
            ip = ip_of[name].get(server) or fallback[name]
            if ip:
                host_at.setdefault(ip, name)
        by_func: dict[str, dict[str, int]] = {}
        counts: dict[str, int] = {name: 0 for name in results}
        bare: dict[str, int] = {name: 0 for name in results}
        others: dict[str, int] = {}
        for w in view.workers:
            if not w.functions:  # connected, registered nothing: serves no job
                if host_at.get(w.ip):
                    bare[host_at[w.ip]] += 1
                continue
            who = host_at.get(w.ip)
            if who:
                counts[who] += 1
            else:
                others[w.ip] = others.get(w.ip, 0) + 1
            for f in w.functions:
                by_func.setdefault(f, {})
                key = who or w.ip
                by_func[f][key] = by_func[f].get(key, 0) + 1
        entry["connections"] = counts
        entry["other_connections"] = [{"ip": ip, "connections": n} for ip, n in sorted(others.items())]
        entry["no_function"] = {name: n for name, n in bare.items() if n}
        for name in results:
            per_host[name]["connections"][server] = counts[name]
            per_host[name].setdefault("no_function", {})[server] = bare[name]
        for fname in sorted(set(view.functions) | set(by_func)):
            fs = view.functions.get(fname)
            prefix, _, job = fname.partition("-")
            entry["functions"].append({
                "function": fname, "job": job if prefix in prefixes else fname,
                "queued": fs.queued if fs else 0, "running": fs.running if fs else 0,
                "available_workers": fs.available if fs else 0, "by_host": by_func.get(fname, {})})
    # What stands out, per host.
    for name, r in results.items():
        notes = per_host[name]["notes"]
        if not r.reached:
            notes.append(f"UNREACHABLE: {r.error}")
            per_host[name]["stands_out"] = True
            continue
        data = r.data or {}
        if not data:  # no answer to read (an error, or output that is not the host's JSON): it stands out
            notes.append(f"error: {r.error}")
            per_host[name]["stands_out"] = True
            continue
        summary = data.get("summary") or {}
        active = summary.get("active", 0)
        if summary.get("not_active"):
            notes.append(f"{summary['not_active']} not active")
        host_servers = []
        for site in data.get("sites") or []:
            for g in site.get("gearman") or []:
                if g["server"] not in host_servers:
                    host_servers.append(g["server"])
                # NOT_QUERIED: the host was asked with --no-gearman; it could not fail to reach what it never asked.
                if not g.get("reachable") and g.get("error") != NOT_QUERIED:
                    notes.append(f"cannot reach gearmand {g['server']}: {g.get('error')}")
        for server in host_servers:
            view = views.get(server)
            if not view or not view.reachable:
                continue
            n = per_host[name]["connections"].get(server, 0)
            idle = per_host[name].get("no_function", {}).get(server, 0)
            if idle:
                notes.append(f"{idle} connection{'s' if idle != 1 else ''} at gearmand {server} with no function "
                             "(connected, registered nothing)")
            if active and n == 0:
                notes.append(f"units active but NO worker connection at gearmand {server}")
            elif n < active:
                notes.append(f"{n} of {active} active instances connected to gearmand {server}")
        per_host[name]["stands_out"] = bool(notes)
    return {"gearman": gearman, "per_host": per_host}


def status(args, hosts, remote, timeout) -> int:
    results = fleet_ssh.run_many(hosts, remote, timeout, args.parallel)
    views = {}
    servers = _servers(results)
    if servers and not getattr(args, "no_gearman", False):
        from .gearman import query_all

        views = query_all(servers, timeout=args.gearman_timeout)
    merged = merge_status(results, views)
    code = overall_code(results.values())
    if code == EXIT_OK and any(p.get("stands_out") for p in merged["per_host"].values()):
        code = EXIT_NOT_ACTIVE
    if args.json:
        data = _fleet_json("status", results, code, gearman=merged["gearman"])
        for name, p in merged["per_host"].items():
            data["fleet"][name].update({"gearman_connections": p["connections"], "notes": p["notes"],
                                        "stands_out": bool(p.get("stands_out"))})
        data["summary"] = _summary(results, merged)
        dump_json(data)
        return code
    _render_status(Out(), results, merged)
    return code


def _summary(results, merged) -> dict:
    answered = [r for r in results.values() if r.reached and r.data]
    funcs_without = sorted({f["function"] for g in merged["gearman"].values() for f in g["functions"]
                            if f["available_workers"] == 0})
    return {
        "hosts": len(results), "reached": sum(r.reached for r in results.values()),
        "unreachable": [n for n, r in results.items() if not r.reached],
        "instances": sum((r.data.get("summary") or {}).get("instances", 0) for r in answered),
        "active": sum((r.data.get("summary") or {}).get("active", 0) for r in answered),
        "registered": sum((r.data.get("summary") or {}).get("registered", 0) for r in answered),
        "hosts_standing_out": [n for n, p in merged["per_host"].items() if p.get("stands_out")],
        "functions_without_worker": funcs_without,
    }


def _render_status(out: Out, results, merged) -> None:
    s = _summary(results, merged)
    head = (f"fleet: {s['hosts']} host{'s' if s['hosts'] != 1 else ''}, {s['reached']} answered; "
            f"{s['instances']} instances, {s['active']} active, {s['registered']} registered")
    out.line(head)
    rows, styles = [], []
    for name, r in results.items():
        p = merged["per_host"][name]
        summ = (r.data or {}).get("summary") or {}
        conns = ",".join(str(n) for n in p["connections"].values()) or "-"
        if r.reached and r.data:
            cells = [name, r.target.address, str(summ.get("instances", "-")), str(summ.get("active", "-")),
                     str(summ.get("registered", "-")), conns, "; ".join(p["notes"])]
        else:
            cells = [name, r.target.address, "-", "-", "-", conns, "; ".join(p["notes"])]
        rows.append(cells)
        bad = "red" if p.get("stands_out") else ""
        styles.append([bad, "", "", "", "", bad if conns in ("0", "-") else "", bad])
    out.line()
    out.table(["HOST", "ADDRESS", "INSTANCES", "ACTIVE", "REGISTERED", "GEARMAND", "NOTE"], rows, styles)
    for server, g in merged["gearman"].items():
        out.line()
        if not g["reachable"]:
            out.line(f"gearmand {server}: " + out.paint(f"not reachable from this host: {g['error']}", "yellow")
                     + " (each host's own view is in its status; --json)")
            continue
        total = sum(g["connections"].values()) + sum(o["connections"] for o in g["other_connections"])
        others = ", ".join(f"{o['ip']} ({o['connections']})" for o in g["other_connections"])
        out.line(f"gearmand {server}: {total} worker connection{'s' if total != 1 else ''}"
                 + (f"; not from these hosts: {others}" if others else ""))
        frows, fstyles = [], []
        for f in g["functions"]:
            by = " ".join(f"{h}:{n}" for h, n in sorted(f["by_host"].items()))
            frows.append([f["job"], str(f["queued"]), str(f["running"]), str(f["available_workers"]), by])
            fstyles.append(["", "yellow" if f["queued"] and not f["available_workers"] else "", "",
                            "red" if not f["available_workers"] else "", ""])
        out.table(["JOB", "QUEUED", "RUNNING", "WORKERS", "BY HOST"], frows, fstyles, indent="  ")
    _unreached_line(out, results)


# -- doctor --------------------------------------------------------------------------------------------------
def doctor(args, hosts, remote, timeout) -> int:
    """Each host's own doctor, and the job servers' view of each host asked from here (as `status` does): a
    host whose workers are connected but registered nothing stands out in both."""
    results = fleet_ssh.run_many(hosts, remote, timeout, args.parallel)
    views = {}
    servers = _servers(results)
    if servers:
        from .gearman import query_all

        views = query_all(servers, timeout=args.gearman_timeout)
    merged = merge_status(results, views)
    # AtoM's job table, judged once per database with every host's workers: those rows' per-host verdicts
    # (each host alone sees its own workers only) give way to it.
    from . import fleet_jobs

    groups = fleet_jobs.for_doctor(args, hosts, remote, timeout)
    judged = fleet_jobs.judged_here(groups)
    stale = fleet_jobs.stale_findings(groups)
    for name, r in results.items():
        if r.data and r.data.get("findings"):
            r.data["findings"] = [f for f in r.data["findings"]
                                  if not (f["code"] == "stale_job" and (name, _job_id(f)) in judged)]
    code = overall_code(results.values())
    if code == EXIT_OK and (stale or any(p.get("stands_out") for p in merged["per_host"].values())):
        code = EXIT_NOT_ACTIVE
    if args.json:
        data = _fleet_json("doctor", results, code, gearman=merged["gearman"], jobs=stale)
        for name, p in merged["per_host"].items():
            data["fleet"][name].update({"gearman_connections": p["connections"], "notes": p["notes"],
                                        "stands_out": bool(p.get("stands_out"))})
        data["healthy"] = code == EXIT_OK
        dump_json(data)
        return code
    out = Out()
    for name, r in results.items():
        if not r.reached:
            out.line(out.paint(f"{name}: not reached: {r.error}", "red"))
            continue
        if r.data is None:
            out.line(out.paint(f"{name}: {r.error}", "red"))
            continue
        findings = r.data.get("findings") or []
        faults = sum(f["severity"] == "fault" for f in findings)
        warnings = len(findings) - faults
        more = f", {warnings} warning{'s' if warnings != 1 else ''}" if warnings else ""
        if not faults:
            out.line(f"{name}: " + out.paint("healthy", "green") + more)
        else:
            out.line(f"{name}: " + out.paint(f"{faults} fault{'s' if faults != 1 else ''}", "red") + more)
        for f in findings:
            out.line(f"  {out.paint(f['severity'].upper(), 'red' if f['severity'] == 'fault' else 'yellow')} "
                     f"{f['code']} {f['subject']}: {f['summary']}")
            for fix in f.get("fix") or []:
                out.line(f"    fix: {fix}")
        p = merged["per_host"][name]
        for server, n in p["connections"].items():
            idle = p.get("no_function", {}).get(server, 0)
            out.line(f"  gearmand {server} (asked from here): {n} worker connection{'s' if n != 1 else ''} "
                     "serving jobs" + (out.paint(f", {idle} with no function (registered nothing)", "red")
                                       if idle else ""))
        for note in p["notes"]:
            out.line("  " + out.paint(f"stands out: {note}", "red"))
    for server, g in merged["gearman"].items():
        if not g["reachable"]:
            out.line(f"gearmand {server}: " + out.paint(f"not reachable from this host: {g['error']}", "yellow"))
    if stale:
        out.line(out.paint(f"AtoM's jobs, judged with every host's workers: {len(stale)} stale", "red"))
    for f in stale:
        out.line(f"  {out.paint('FAULT', 'red')} stale_job {f['subject']}: {f['summary']}")
        for e in f["evidence"]:
            out.line(f"    evidence: {e}")
        for fix in f["fix"]:
            out.line(f"    fix: {fix}")
    _unreached_line(out, results)
    return code


def _job_id(finding: dict) -> int | None:
    """The row a host's stale_job finding is about (its subject: `job ID (site S)`)."""
    import re

    m = re.match(r"^job (\d+) ", finding.get("subject") or "")
    return int(m.group(1)) if m else None


# -- reset, restart, scale, daemon-reload --------------------------------------------------------------------
def action(args, hosts, remote, timeout) -> int:
    out = Out(sys.stderr) if args.json else Out()
    lock = threading.Lock()

    def done(r) -> None:
        with lock:
            if not r.reached:
                out.line(out.paint(f"[{r.target.name}] not reached: {r.error}", "red"))
                return
            for line in r.stderr:
                out.line(f"[{r.target.name}] {line}")
            verdict = "ok" if r.code == EXIT_OK else f"exit {r.code}" + (f": {r.error}" if r.error else "")
            out.line(f"[{r.target.name}] {verdict} ({r.seconds:.1f} s)")
            out.flush()

    results = fleet_ssh.run_many(hosts, remote, timeout, args.parallel, on_done=done)
    code = overall_code(results.values())
    _unreached_line(out, results)
    if args.json:
        dump_json(_fleet_json(args.command, results, code))
    return code


def rolling(args, hosts, remote, timeout) -> int:
    """--parallel hosts at a time (default 1), each its own rolling restart (one instance after another, each
    registered again before the next); the next batch only when the whole batch is done. Stop after a batch in
    which a host's instances did not come back (the hosts after it are not touched). A host that cannot be
    reached is skipped and reported."""
    out = Out(sys.stderr) if args.json else Out()
    lock = threading.Lock()
    results: dict = {}
    code = EXIT_OK
    stopped_at = None

    def say(line: str, style: str = "") -> None:
        with lock:  # the hosts of a batch report from their own threads
            out.line(out.paint(line, style) if style else line)
            out.flush()

    for first in range(0, len(hosts), args.parallel):
        batch = hosts[first:first + args.parallel]
        for n, t in enumerate(batch, first + 1):
            say(f"[{n}/{len(hosts)}] {t.name}: rolling restart")
        done = fleet_ssh.run_many(batch, remote, timeout, len(batch),
                                  on_stderr=lambda name, line: say(f"[{name}] {line}"))
        results.update(done)
        failed = []
        for n, t in enumerate(batch, first + 1):
            r = done[t.name]
            if not r.reached:
                say(f"[{t.name}] not reached, skipped: {r.error}", "red")
            elif r.code != EXIT_OK:
                failed.append(t.name)
                say(f"[{t.name}] exit {r.code}{': ' + r.error if r.error else ''}", "red")
            else:
                say(f"[{n}/{len(hosts)}] {t.name}: done in {r.seconds:.1f} s")
        if failed:
            stopped_at = failed[0]
            code = done[failed[0]].code
            rest = [h.name for h in hosts[first + len(batch):]]
            say("stopped the rolling restart" + (f": {', '.join(rest)} not restarted" if rest else ""), "red")
            break
    if code == EXIT_OK and any(not r.reached for r in results.values()):
        code = EXIT_PARTIAL
    _unreached_line(out, results)
    if args.json:
        data = _fleet_json("restart", results, code, rolling=True, parallel=args.parallel, stopped_at=stopped_at,
                           not_restarted=[h.name for h in hosts if h.name not in results])
        dump_json(data)
    return code


# -- logs ----------------------------------------------------------------------------------------------------
def _human_log(host: str, e: dict) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.get("usec", 0) / 1e6))
    tag = f"{host}/{e.get('instance')}" + (" [systemd]" if e.get("source") == "systemd" else "")
    return f"{stamp} {tag}: {e.get('message', '')}"


def journal_entry(text: str) -> dict | None:
    """One line of a host's `logs --json` as an entry, or None when it is not one (a stray warning, a line
    that is JSON but not an object, a time that is not a number): such a line is skipped, never merged."""
    try:
        e = json.loads(text)
    except ValueError:
        return None
    if not isinstance(e, dict) or isinstance(e.get("usec", 0), bool) or not isinstance(e.get("usec", 0), int):
        return None
    return e


def _emit(args, host: str, e: dict) -> str:
    if args.json:
        return json.dumps({"host": host, **e})
    return _human_log(host, e)


def logs(args, hosts, remote, timeout) -> int:
    if not args.follow:
        results = fleet_ssh.run_many(hosts, remote, timeout, args.parallel)
        entries = []
        for name, r in results.items():
            if r.reached and r.code == EXIT_OK:
                entries += [(e, name) for e in map(journal_entry, r.stdout.splitlines()) if e is not None]
            elif r.reached:
                sys.stderr.write(f"[{name}] exit {r.code}: {r.error}\n")
        entries.sort(key=lambda x: x[0].get("usec", 0))
        for e, name in entries:
            sys.stdout.write(_emit(args, name, e) + "\n")
        _unreached_line(Out(sys.stderr), results)
        return overall_code(results.values())
    return _follow(args, hosts, remote)


RECONNECT_EVERY = 5.0  # seconds between tries to follow a host again


def resumed_argv(remote: list[str], usec: int) -> list[str]:
    """The host's follow command again, from the last line seen (journalctl's --since is inclusive: that
    line comes again and is dropped) instead of its last -n lines."""
    out, tail, i = [], [], 2
    while i < len(remote):
        tok = remote[i]
        if tok == "--":
            tail = remote[i:]
            break
        name, eq, _ = tok.partition("=")
        if name in ("-n", "--lines", "--since"):
            i += 1 if eq else 2
            continue
        if tok.startswith("-n") and not tok.startswith("--"):  # -n5
            i += 1
            continue
        out.append(tok)
        i += 1
    return [*remote[:2], *out, "--since", f"@{usec / 1e6:.6f}", *tail]


class _HostFollow:
    """One host's place in the merged follow: what was last written, so that nothing repeats on reconnect."""

    def __init__(self):
        self.last_usec: int | None = None
        self.seen_at_last: set = set()
        self.out_of_reach = False
        self.skipped = 0  # lines that were not journal entries (the first one is noted on stderr)

    def fresh(self, e: dict) -> bool:
        usec = e.get("usec", 0)
        # As text: a host's JSON may hold lists or objects there, which a set cannot keep.
        key = json.dumps([e.get("unit"), e.get("pid"), e.get("message")], sort_keys=True, default=str)
        if self.last_usec is not None and (usec < self.last_usec or (usec == self.last_usec
                                                                      and key in self.seen_at_last)):
            return False
        if usec != self.last_usec:
            self.last_usec, self.seen_at_last = usec, set()
        self.seen_at_last.add(key)
        return True


def _note(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _follow(args, hosts, remote) -> int:
    """Every host followed at once (one ssh each, not bounded by --parallel: a follow never ends); lines are
    held 0.3 s and written in time order, so hosts' lines interleave as they happened. A host that drops out
    (rebooted, network gone) is tried again every RECONNECT_EVERY s and resumes from its last line seen; only
    a host whose CLI refused the command (usage, no such instance, an error) is given up."""
    import heapq
    import queue
    import signal

    q: queue.Queue = queue.Queue()
    stop = threading.Event()
    results: dict = {}

    def follow(t) -> None:
        place = _HostFollow()

        def line(text, name=t.name) -> None:
            e = journal_entry(text)
            if e is None:
                if not place.skipped:
                    _note(f"[{name}] skipped a line that is not a journal entry: {text.strip()[:80]!r}")
                place.skipped += 1
                return
            if place.out_of_reach:
                place.out_of_reach = False
                _note(f"[{name}] following again")
            if place.fresh(e):
                q.put((e, name))

        # Before any line from the host, a retry resumes from when following began, by this host's clock: a
        # skew between the two clocks that is shorter than the time followed loses nothing.
        began, argv = int(time.time() * 1e6), remote
        while True:
            r = fleet_ssh.run(t, argv, 0, on_stdout_line=line, stop=stop)
            results[t.name] = r
            if stop.is_set():
                break
            why = r.error or f"exit {r.code}"
            if r.reached and r.code in (EXIT_ERROR, EXIT_USAGE, EXIT_NO_SUCH):
                _note(f"[{t.name}] stopped following: {why}")
                break
            if not place.out_of_reach:
                place.out_of_reach = True
                _note(f"[{t.name}] stopped following: {why}; trying again every {RECONNECT_EVERY:g} s")
            if stop.wait(RECONNECT_EVERY):
                break
            argv = resumed_argv(remote, began if place.last_usec is None else place.last_usec)
        q.put(None)

    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    threads = [threading.Thread(target=follow, args=(t,), daemon=True) for t in hosts]
    for t in threads:
        t.start()
    heap, seq, ended = [], 0, 0
    try:
        while ended < len(hosts) or heap:
            try:
                item = q.get(timeout=0.1)
                if item is None:
                    ended += 1
                else:
                    e, name = item
                    heapq.heappush(heap, (e.get("usec", 0), seq, time.monotonic(), name, e))
                    seq += 1
            except queue.Empty:
                pass
            now = time.monotonic()
            while heap and (now - heap[0][2] > 0.3 or ended == len(hosts)):
                _, _, _, name, e = heapq.heappop(heap)
                sys.stdout.write(_emit(args, name, e) + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        stop.set()
        for t in threads:
            t.join(3)
        return 130 if not results or all(r.reached for r in results.values()) else EXIT_PARTIAL
    return overall_code(results.values())
