"""`atom-workerctl doctor`: name the cause of "No Gearman worker available..." and the other usual faults.

Each finding has a code, a severity (`fault` makes the exit code 3; `warning` does not), what it is
about, the evidence read from the host, and the command that fixes it. Exit 0 only when healthy.
"""

from __future__ import annotations

import os
import socket

from . import model
from .errors import EXIT_NOT_ACTIVE, EXIT_OK
from .render import Out, ago, dump_json, iso
from .snapshot import Snapshot, hostname, take

FAULT, WARNING = "fault", "warning"
# Causes before their symptoms: an unreachable gearmand or a wrong prefix explains "no worker for job"; a converge
# that stopped before its restarts explains workers on an old configuration (a wrong prefix).
ORDER = ["apply_pending",
         "config_unreadable", "worker_cannot_read", "executable_missing", "gearmand_unreachable", "prefix_mismatch",
         "restart_policy_down", "unit_changed_not_reloaded",
         "start_limit_hit", "crash_loop", "unit_missing", "instance_down", "not_registered", "no_worker_for_job",
         "stale_job"]
# A fix line is a command to run as root on this host, as printed, unless it starts with one of these: a step for
# a person (edit a file, change the inventory) or a command for another host.
HUMAN = "by hand: "


class Finding:
    def __init__(self, code: str, severity: str, subject: str, summary: str, evidence: list[str], fix: list[str]):
        self.code, self.severity, self.subject, self.summary = code, severity, subject, summary
        self.evidence, self.fix = evidence, fix

    def as_dict(self) -> dict:
        return {"code": self.code, "severity": self.severity, "subject": self.subject, "summary": self.summary,
                "evidence": self.evidence, "fix": self.fix}


def _order(f: Finding) -> tuple:
    """Faults first, causes before their symptoms (ORDER), then the rest."""
    return (f.severity != FAULT, ORDER.index(f.code) if f.code in ORDER else len(ORDER))


def is_local(host: str) -> bool:
    """Whether an address (or name) is this host's: binding to it succeeds only here."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, _, _, _, addr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((addr[0], 0))
                return True
        except OSError:
            continue
    return False


def _server_fix(server: str, supervisor: bool = False, backend=None) -> tuple[list[str], list[str]]:
    """(evidence, fix) for an unreachable gearmand: on this host, why its unit does not run."""
    from .atomconfig import parse_server

    host, port = parse_server(server)
    if not is_local(host):
        return [], [f"on {host}: systemctl start gearman-job-server (or check `systemctl status gearman-job-server`)",
                    f"on {host}: check the allowlist admits this host: nft list table inet atom_gearman"]
    if supervisor or backend is None or backend.name != "systemd":
        start = "service gearman-job-server start" if supervisor else "systemctl start gearman-job-server"
        return [], [f"{start}   # gearmand runs on this host",
                    f"ss -ltnp 'sport = :{port}'   # then check it listens on {host}"]
    from . import gearmand_local

    return gearmand_local.diagnose(backend, host, port)


def diagnose(snap: Snapshot, journal_lines: dict[str, list] | None = None, backend=None) -> list[Finding]:
    """Every finding about the host. `backend` (optional) lets doctor look further: the programs units run,
    the local gearmand's unit."""
    findings: list[Finding] = []
    journal_lines = journal_lines or {}
    host = snap.host
    supervisor = host.manager == "supervisor"

    # -- a converge that stopped before it applied everything (the role's note beside sites.json) ---------------
    from . import pending

    findings += pending.findings(host, Finding, FAULT, HUMAN, snap.taken_at)

    # -- the sites' own configuration ------------------------------------------------------------------------
    for sv in snap.sites:
        site = sv.site
        if sv.config_error:
            findings.append(Finding("config_unreadable", FAULT, f"site {site.name}",
                                    "the site's AtoM configuration cannot be read",
                                    [sv.config_error],
                                    [f"{HUMAN}fix the file named above",
                                     f"atom-workerctl restart --rolling --site {site.name}"]))
            continue
        cfg = sv.config
        if site.gearman_servers and sorted(site.gearman_servers) != sorted(cfg.servers):
            findings.append(Finding(
                "servers_differ", WARNING, f"site {site.name}",
                "config/gearman.yml names other job servers than the role installed",
                [f"config/gearman.yml all.servers: {', '.join(cfg.servers)}",
                 f"{host.path}: {', '.join(site.gearman_servers)}"],
                [f"{HUMAN}run site.yml again (the atom_worker role writes all.servers), or correct config/gearman.yml",
                 f"cd {site.root} && runuser -u {site.user} -- php symfony cc",
                 f"atom-workerctl restart --rolling --site {site.name}"]))

    # -- gearmand -----------------------------------------------------------------------------------------------
    reported = set()
    for sv in snap.sites:
        for server in sv.servers:
            view = snap.gearman.get(server)
            if view is None or view.reachable or server in reported:
                continue
            reported.add(server)
            key = sv.config.server_keys.get(server) if sv.config else None
            where = f"config/gearman.yml all.servers.{key}" if key is not None else "sites.json gearman_servers"
            evidence, fix = _server_fix(server, supervisor, backend)
            findings.append(Finding(
                "gearmand_unreachable", FAULT, f"gearmand {server}",
                f"gearmand {server} is unreachable: workers cannot register and AtoM cannot submit jobs",
                [f"connect to {server} (from {where} of site {sv.site.name}): {view.error}"] + evidence, fix))

    # -- what the worker user can read, the programs the units run -------------------------------------------------
    from . import worker_access

    findings += worker_access.findings(snap, Finding, FAULT, HUMAN)
    if backend is not None and backend.name == "systemd":
        findings += worker_access.executable_findings(snap, backend, journal_lines, Finding, FAULT, HUMAN)

    # -- instances ----------------------------------------------------------------------------------------------
    prefix_findings = _prefix_findings(snap)
    # Instances of a site whose workers run under an old prefix are "not registered" because of it.
    mismatched = {f.subject.removeprefix("site ") for f in prefix_findings}
    registration = _registration_findings(snap, mismatched)
    short_sites = {f.subject.split(" at ", 1)[0].removeprefix("site ") for f in registration}
    for unit, inst in snap.instances.items():
        s = inst.state
        short = model.short(unit)
        logs = journal_lines.get(unit, [])
        tail = _journal_evidence(logs, "journal" if host.manager == "systemd" else "log")
        if not inst.expected:
            if s.active_state in ("active", "activating", "failed"):
                findings.append(Finding(
                    "stray_instance", WARNING, short,
                    f"{short} is {s.active_state} but no pool of {host.path} expects it",
                    [f"{short}: {s.active_state} ({s.sub_state}), {s.unit_file_state or 'not enabled'}"],
                    [f"atom-workerctl scale {len(inst.pool.units)} --pool {inst.pool.name} --site "
                     f"{inst.pool.site.name}   # the pool's size: stops and disables the instances beyond it"
                     if inst.pool else
                     f"supervisorctl stop {s.namespec}" if supervisor and s.namespec else
                     f"systemctl disable --now {unit}"]))
            continue
        hit, reason = s.start_limit()
        if hit:
            findings.append(Finding(
                "start_limit_hit", FAULT, short,
                f"{short} used up its start limit and stays down until it is reset",
                [f"{short}: {s.active_state} since {ago(s.since_usec, snap.taken_at)}, {reason}"] + tail,
                [f"atom-workerctl logs -n 30 {short}   # the cause, first",
                 f"atom-workerctl reset {short}"]))
            continue
        if s.crash_looping():
            left = max(s.start_limit_burst - s.n_restarts - 1, 0)
            findings.append(Finding(
                "crash_loop", FAULT, short,
                f"{short} is crash-looping: {s.n_restarts} automatic restart{'s' if s.n_restarts != 1 else ''} "
                f"since the last reset",
                [f"{short}: {s.active_state} ({s.sub_state}), Result={s.result}, NRestarts={s.n_restarts}, "
                 f"StartLimitBurst={s.start_limit_burst}: " +
                 (f"{left} more failure{'s' if left != 1 else ''} and it stays down" if s.start_limit_burst
                  else "no start limit")] + tail,
                [f"atom-workerctl logs -n 50 {short}   # find why it exits",
                 f"atom-workerctl reset {short}   # once fixed: its whole start budget back, started"]))
            continue
        if not s.active:
            if s.load_state != "loaded":
                if supervisor:
                    findings.append(Finding(
                        "unit_missing", FAULT, short, f"supervisord has no process {short}",
                        [f"{short}: not in supervisord's processes (getAllProcessInfo)"],
                        [("atom-workerctl daemon-reload   # supervisorctl update for the workers' groups, if "
                          "the configuration on disk has it"),
                         f"atom-workerctl scale {len(inst.pool.units)} --pool {inst.pool.name} --site "
                         f"{inst.pool.site.name}   # raises the program's numprocs" if inst.pool else
                         f"{HUMAN}run site.yml again (it writes the supervisord configuration)"]))
                    continue
                findings.append(Finding(
                    "unit_missing", FAULT, short, f"{short} cannot be loaded ({s.load_state})",
                    [f"{short}: LoadState={s.load_state}"],
                    [f"{HUMAN}run site.yml again (it installs the unit files)"]))
                continue
            findings.append(Finding(
                "instance_down", FAULT, short, f"{short} is not running",
                [(f"{short}: {s.active_state} ({s.sub_state}) since {ago(s.since_usec, snap.taken_at)}, "
                 f"Result={s.result}")] + tail,
                [f"atom-workerctl reset {short}"]))
            continue
        if inst.pool is not None and snap.gearman and inst.registered is False and \
                inst.pool.site.name not in mismatched and inst.pool.site.name not in short_sites:
            sv = snap.site_view(inst.pool.site)
            up = [x for x in sv.servers if snap.gearman.get(x) and snap.gearman[x].reachable]
            if up:
                findings.append(Finding(
                    "not_registered", FAULT, short,
                    f"{short} runs but is not registered with gearmand",
                    [(f"{short}: active since {ago(s.since_usec, snap.taken_at)}, connected to: "
                     f"{', '.join(inst.connected) if inst.connected else 'no job server'}; reachable job servers: "
                     f"{', '.join(up)}")],
                    [f"atom-workerctl restart {short}"]))
    for unit, inst in snap.instances.items():
        if inst.expected and inst.state.load_state == "loaded" and not inst.state.enabled and inst.pool:
            findings.append(Finding(
                "not_enabled", WARNING, model.short(unit),
                f"{model.short(unit)} is not enabled: it will not start at boot",
                [f"{model.short(unit)}: UnitFileState={inst.state.unit_file_state or '(none)'}"],
                [f"atom-workerctl scale {len(inst.pool.units)} --pool {inst.pool.name} --site {inst.pool.site.name}"]))
    stale = sorted(u for u, i in snap.instances.items() if i.state.need_reload)
    if stale and supervisor:
        groups = sorted({i.state.namespec.split(":", 1)[0] for u, i in snap.instances.items()
                         if i.state.need_reload and i.state.namespec})
        findings.append(Finding(
            "unit_changed_not_reloaded", FAULT, ", ".join(groups),
            "the workers' supervisord configuration changed on disk but supervisord still runs the old one",
            [f"supervisord reloadConfig (supervisorctl reread): group {g} changed" for g in groups],
            [("atom-workerctl daemon-reload   # supervisorctl update of these groups: restarts their workers, "
              "restart budgets reset first")]))
    elif stale and host.manager != "circus":  # circus: circus.policy_findings() names them
        findings.append(Finding(
            "unit_changed_not_reloaded", FAULT, ", ".join(model.short(u) for u in stale),
            "unit files changed on disk but systemd still runs the old ones",
            [f"{model.short(u)}: NeedDaemonReload=yes" for u in stale],
            ["atom-workerctl daemon-reload", "atom-workerctl restart --rolling   # to run the new unit"]))

    findings += registration

    # -- functions at gearmand ----------------------------------------------------------------------------------
    findings += _function_findings(snap)
    findings += prefix_findings
    findings.sort(key=_order)
    return findings


def _registration_findings(snap: Snapshot, mismatched: set[str]) -> list[Finding]:
    """Per site and job server: gearmand must list, from this host, at least as many connections carrying one
    of the site's pools' whole function sets as the site has active instances. A connection with no function
    (`FD IP ID :`: reconnected and registered nothing) does not count, and is named."""
    findings = []
    for sv in snap.sites:
        if sv.config is None or sv.site.name in mismatched:
            continue  # config_unreadable / prefix_mismatch explain it
        active = [i for pv in sv.pools for i in snap.of_pool(pv.pool) if i.state.active]
        if not active:
            continue
        for server in sv.servers:
            view = snap.gearman.get(server)
            if view is None or not view.reachable:
                continue
            serving = sv.serving.get(server, 0)
            if serving >= len(active):
                continue
            bare = sv.bare.get(server, [])
            suspects = [i for i in active if i.per_server.get(server) is not True] or active
            names = [model.short(i.state.unit) for i in suspects]
            evidence = [(f"gearmand {server}: {serving} connection{'s' if serving != 1 else ''} from this host "
                        f"({view.local_ip}) with site {sv.site.name}'s functions, for {len(active)} active "
                        f"instance{'s' if len(active) != 1 else ''}")]
            if bare:
                shown = ", ".join(f"`{w.fd} {w.ip} {w.client_id} :`" for w in bare[:4])
                evidence.append(f"{len(bare)} connection{'s' if len(bare) != 1 else ''} from this host with no "
                                f"function at all (connected, registered nothing; not counted): {shown}"
                                + (" ..." if len(bare) > 4 else ""))
            for inst in suspects:
                evidence.append(f"{model.short(inst.state.unit)}: active since "
                                f"{ago(inst.state.since_usec, snap.taken_at)}, connected to: "
                                + (", ".join(inst.connected) if inst.connected else
                                   "unknown (not root)" if inst.connected is None else "no job server"))
            findings.append(Finding(
                "not_registered", FAULT, f"site {sv.site.name} at {server}",
                f"{len(active) - serving} of {len(active)} active instance{'s' if len(active) != 1 else ''} of site "
                f"{sv.site.name} serve no job at gearmand {server}",
                evidence, [(f"atom-workerctl restart {' '.join(names)}   # reset-failed, then restart: they register "
                           "again")]))
    return findings


def _journal_evidence(entries, label: str = "journal") -> list[str]:
    """systemd's (or the supervisord policy listener's) word on the start limit (or its last line), and the
    worker's last distinct lines."""
    out = []
    systemd = [e for e in entries if e.source == "systemd"]
    limit = [e for e in systemd if "repeated too quickly" in e.message]
    policy = [e for e in entries if e.source in ("supervisor", "circus")]
    if limit:
        out.append(f"journal (systemd): {limit[-1].message}")
    elif systemd:
        out.append(f"journal (systemd): {systemd[-1].message}")
    hits = [e for e in policy if "start-limit-hit" in e.message]
    if hits:
        out.append(f"log (atom-worker-policy): {hits[-1].message}")
    elif policy:
        out.append(f"log (atom-worker-policy): {policy[-1].message}")
    last: list[str] = []
    for e in reversed([e for e in entries if e.source == "worker"]):
        if e.message not in last:
            last.insert(0, e.message)
        if len(last) == 2:
            break
    out += [f"{label} (worker): {m}" for m in last]
    return out


def _pool_jobs(pool) -> str:
    return f"{pool.label()} ({', '.join(pool.types or pool.abilities or ['every job'])})"


def _function_findings(snap: Snapshot) -> list[Finding]:
    """Job types with no available worker at any reachable server, grouped by the pools meant to take them."""
    findings = []
    for sv in snap.sites:
        if sv.config is None:
            continue
        up = [s for s in sv.servers if snap.gearman.get(s) and snap.gearman[s].reachable]
        if not up:
            continue  # gearmand_unreachable says it all
        takers: dict[str, list] = {}
        for pv in sv.pools:
            for cls in pv.classes:
                takers.setdefault(cls, []).append(pv)
        groups: dict[tuple, list[tuple[str, str, int]]] = {}
        for cls in sv.config.all_classes():
            func = f"{sv.prefix}-{cls}"
            available = queued = 0
            for s in up:
                fs = snap.gearman[s].functions.get(func)
                if fs:
                    available += fs.available
                    queued += fs.queued
            if not available:
                key = tuple(pv.pool.label() for pv in takers.get(cls, []))
                groups.setdefault(key, []).append((cls, func, queued))
        for key, jobs in groups.items():
            pools = [pv for pv in sv.pools if pv.pool.label() in key]
            classes = [j[0] for j in jobs]
            evidence = [f"gearmand {', '.join(up)}: {func}: 0 available workers"
                        + (f", {queued} job{'s' if queued != 1 else ''} waiting" if queued else "")
                        for _, func, queued in jobs[:3]]
            if len(jobs) > 3:
                evidence.append(f"... and {len(jobs) - 3} more job types: {', '.join(classes[3:])}")
            subject = f"site {sv.site.name}: " + (classes[0] if len(classes) == 1 else f"{len(classes)} job types")
            if not pools:
                findings.append(Finding(
                    "no_pool_for_job", WARNING, subject,
                    f"no worker anywhere takes {', '.join(classes)}, and no pool on this host is meant to",
                    evidence + ["pools here: " + ", ".join(_pool_jobs(p.pool) for p in sv.pools)],
                    [(f"{HUMAN}add the job types to a pool's types or abilities in the inventory and run site.yml "
                     "(unless another host's workers are meant to take them)")]))
                continue
            fixes = []
            for pv in pools:
                insts = snap.of_pool(pv.pool)
                down = [i for i in insts if not i.state.active]
                evidence.append(f"pool {pv.pool.label()}: " + (", ".join(
                    f"{model.short(i.state.unit)} {i.state.active_state}" +
                    (" (start limit hit)" if i.state.start_limit()[0] else "") for i in insts) or "0 instances"))
                if not insts:
                    fixes.append(f"atom-workerctl scale 1 --pool {pv.pool.name} --site {sv.site.name}")
                elif down:
                    fixes.append(f"atom-workerctl reset --pool {pv.pool.name} --site {sv.site.name}")
                else:
                    fixes.append(f"atom-workerctl restart --rolling --pool {pv.pool.name} --site {sv.site.name}")
            more = f" (and {len(classes) - 1} more job type{'s' if len(classes) > 2 else ''})" \
                if len(classes) > 1 else ""
            findings.append(Finding(
                "no_worker_for_job", FAULT, subject,
                f'AtoM fails with "No Gearman worker available that can handle the job {classes[0]}."{more}',
                evidence, list(dict.fromkeys(fixes))))
    return findings


def _prefix_findings(snap: Snapshot) -> list[Finding]:
    """Worker connections from this host registered under a prefix that no site here expects."""
    findings = []
    live = {sv.prefix: sv for sv in snap.sites if sv.config}
    seen: dict[tuple[str, str], list] = {}
    for server, view in snap.gearman.items():
        if not view.reachable:
            continue
        for line in view.local_workers():
            prefixes = {f.split("-", 1)[0] for f in line.functions if "-" in f}
            for prefix in prefixes - set(live):
                if len(prefix) == 32:
                    seen.setdefault((server, prefix), []).append(line)
    for (server, prefix), lines in seen.items():
        example = next(f for f in lines[0].functions if f.startswith(prefix))
        # Which site was it? The one that recorded this prefix at install time, if any.
        owner = next((sv for sv in snap.sites if sv.site.prefix == prefix), None)
        if owner is None and len(snap.sites) == 1:
            owner = snap.sites[0]
        evidence = [(f"gearmand {server}: {len(lines)} worker connection{'s' if len(lines) != 1 else ''} from "
                    f"this host ({lines[0].ip}) registered under {prefix} (e.g. {example})")]
        fixes = []
        subject = f"prefix {prefix}"
        if owner is not None and owner.config is not None:
            cfg = owner.config
            subject = f"site {owner.site.name}"
            evidence.append(f"site {owner.site.name} expects md5('{cfg.realpath}' . '{cfg.workers_key}') = "
                            f"{cfg.prefix}")
            if owner.site.realpath and owner.site.realpath != cfg.realpath:
                evidence.append(f"{owner.site.root} now resolves to {cfg.realpath}; it was "
                                f"{owner.site.realpath} when the role installed the site: the release symlink "
                                "moved and the workers still run the old release")
            if owner.site.workers_key != cfg.workers_key and owner.site.prefix == prefix:
                evidence.append(f"workers_key in config/app.yml is now '{cfg.workers_key}' (it was "
                                f"'{owner.site.workers_key}'): changed without restarting the workers")
            if cfg.cache_stale:
                evidence.append("Symfony's config cache is older than config/*.yml: AtoM still uses the cache")
                fixes.append(f"cd {owner.site.root} && runuser -u {owner.site.user} -- php symfony cc")
            fixes.append(f"atom-workerctl restart --rolling --site {owner.site.name}")
        else:
            fixes.append("atom-workerctl restart --rolling")
        findings.append(Finding(
            "prefix_mismatch", FAULT, subject,
            "workers are registered under another job prefix than the site's: AtoM submits jobs nobody takes",
            evidence, fixes))
    return findings


def _policy_findings(backend) -> list[Finding]:
    """supervisord hosts: the atom-worker-policy listener must run, or no crashed worker is ever restarted
    (and no start limit is kept)."""
    from .supervisor import POLICY_GROUP, POLICY_PROCESS

    info = backend.listener_info()
    findings = []
    if POLICY_GROUP in backend.changed_groups:
        findings.append(Finding(
            "unit_changed_not_reloaded", FAULT, POLICY_GROUP,
            "the restart policy listener's configuration changed on disk but supervisord runs the old one",
            [f"supervisord reloadConfig (supervisorctl reread): group {POLICY_GROUP} changed"],
            ["atom-workerctl daemon-reload   # restarts the listener only; its state file keeps every budget"]))
    if info is not None and info.get("statename") == "RUNNING":
        return findings
    state = info.get("statename") if info else "not configured"
    evidence = [f"supervisord: {POLICY_PROCESS} is {state}"]
    if info and info.get("spawnerr"):
        evidence.append(f"spawn error: {info['spawnerr']}")
    log = f"{backend.settings['log_dir']}/atom-worker-policy.log"
    if info is None:
        fixes = [f"{HUMAN}run site.yml again (it installs the listener's configuration)",
                 "atom-workerctl daemon-reload   # supervisorctl update: adds the listener's group"]
    else:
        # Its log, when it ever wrote one: a fix line must run as printed (tail fails on a missing file).
        fixes = [f"tail -n 20 {log}   # why it stopped"] if os.path.exists(log) else []
        fixes.append(f"supervisorctl start {POLICY_PROCESS}")
    return [Finding("restart_policy_down", FAULT, POLICY_PROCESS,
                    "the restart policy listener is not running: crashed workers stay down, no start limit is kept",
                    evidence, fixes), *findings]


def run(args, host: model.Host, backend) -> int:
    snap = take(host, backend, timeout=args.gearman_timeout)
    troubled = [u for u, i in snap.instances.items()
                if not i.state.active or i.state.n_restarts or i.state.start_limit()[0]]
    journal_lines: dict[str, list] = {}
    if troubled:
        try:
            from .cmd_logs import read_entries

            for entry in read_entries(host, backend, troubled, lines=20 * len(troubled)):
                journal_lines.setdefault(entry.unit, []).append(entry)
        except Exception as exc:
            journal_lines = {}
            journal_error = str(exc)
        else:
            journal_error = None
    else:
        journal_error = None
    findings = diagnose(snap, journal_lines, backend)
    from .cmd_jobs import stale_findings

    findings += stale_findings(host, backend, snap, Finding, FAULT, WARNING)
    findings.sort(key=_order)
    if backend.name == "supervisor":
        findings = _policy_findings(backend) + findings
    if backend.name == "circus":
        from .circus import policy_findings

        findings = policy_findings(backend) + findings
    # The manager's own findings come before the host's, but an unfinished converge stays first of all (ORDER):
    # it may be what left the manager so (its update or restarts not applied yet).
    findings = [f for f in findings if f.code == "apply_pending"] + [f for f in findings if f.code != "apply_pending"]
    faults = [f for f in findings if f.severity == FAULT]
    code = EXIT_NOT_ACTIVE if faults else EXIT_OK
    if args.json:
        expected = [i for i in snap.instances.values() if i.expected]
        dump_json({"schema": 1, "command": "doctor", "host": hostname(), "time": iso(snap.taken_at * 1e6),
                   "healthy": not faults, "exit_code": code, "findings": [f.as_dict() for f in findings],
                   # What the fleet form needs to put gearmand's own view beside this host's verdict.
                   "summary": {"instances": len(expected), "active": sum(i.state.active for i in expected),
                               "not_active": sum(not i.state.active for i in expected)},
                   "sites": [{"name": sv.site.name, "gearman": [
                       {"server": s, "reachable": snap.gearman[s].reachable, "error": snap.gearman[s].error,
                        "local_ip": snap.gearman[s].local_ip, "serving": sv.serving.get(s),
                        "no_function": len(sv.bare.get(s, []))}
                       for s in sv.servers if s in snap.gearman]} for sv in snap.sites]})
        return code
    out = Out()
    warnings = len(findings) - len(faults)
    if not findings:
        n = sum(1 for i in snap.instances.values() if i.expected)
        out.line(out.paint("healthy", "green") + f": {n} instance{'s' if n != 1 else ''} active and registered, "
                 f"{len(snap.gearman)} job server{'s' if len(snap.gearman) != 1 else ''} reachable")
        return code
    out.line(f"{hostname()}: {len(faults)} fault{'s' if len(faults) != 1 else ''}, "
             f"{warnings} warning{'s' if warnings != 1 else ''}")
    for f in findings:
        out.line()
        mark = out.paint("FAULT", "red") if f.severity == FAULT else out.paint("WARNING", "yellow")
        out.line(f"{mark} [{f.code}] {f.summary}")
        for e in f.evidence:
            out.line(f"  evidence: {e}")
        for fix in f.fix:
            out.line("  fix:      " + out.paint(fix, "bold"))
    if journal_error:
        out.line()
        out.line(f"({'logs' if host.manager == 'supervisor' else 'journal'} not read: {journal_error})")
    return code
