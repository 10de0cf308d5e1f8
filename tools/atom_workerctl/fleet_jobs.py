"""Fleet `jobs`: AtoM's job table judged once per database, with every worker host's evidence.

AtoM's sites share one database and their workers run on several hosts. One host alone sees only its own
workers: a move running on worker2 is, from worker1, a job gearmand runs that no worker of worker1 took,
which leaves every row of that class "uncertain". Here every host runs `atom-workerctl --json jobs` (its
rows, and for those in progress its evidence: its workers' jobs tied to rows, gearmand's counts as it sees
them); the answers are grouped by database and each database is judged once (cmd_jobs.decide, the same
rules as on one host) with the workers of all hosts: a row is running on `worker2:atom-worker@1`, and a row
nothing runs anywhere is stale.

    -i INV jobs [--stale] ...     the rows of each database, and who runs those in progress, fleet-wide
    -i INV jobs fail ID... [--site S] [--note T] [--force]
                                  judged fleet-wide, then written by one host that uses that database

A host that does not answer is named (exit 5); its workers' jobs are then not tied to rows, so gearmand's
counts leave the rows of their classes uncertain, never stale. `jobs export` and `jobs clear` read or
write the one database and run on one host.
"""

from __future__ import annotations

import shlex
import socket

from . import cmd_jobs, fleet_ssh, gearman
from .errors import EXIT_NOT_ACTIVE, EXIT_OK, EXIT_USAGE, WorkerctlError
from .jobtable import Job, stamp
from .render import Out, dump_json


class FleetDatabase:
    """A database as the fleet knows it: the description one host gave, and the hosts that use it."""

    def __init__(self, description: str):
        self.description = description
        self.hosts: list[str] = []

    def describe(self) -> str:
        return f"{self.description}; used by {', '.join(self.hosts)}"


class SiteName:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class FleetGroup(cmd_jobs.SiteJobs):
    """One database and every host's answer about it."""

    def __init__(self, description: str, fail_prefix: str):
        super().__init__(FleetDatabase(description), [])
        self.fail_prefix = fail_prefix
        self.answers: list[tuple[str, dict]] = []   # (host, its `sites` item)

    def add(self, host: str, item: dict) -> None:
        self.db.hosts.append(host)
        self.answers.append((host, item))
        for name in item.get("sites") or []:
            if name not in [s.name for s in self.sites]:
                self.sites.append(SiteName(name))

    def site_on(self, host: str) -> str:
        return next(item["sites"][0] for h, item in self.answers if h == host)

    def judge(self, stale_only: bool, since: str | None = None) -> None:
        """The rows come from the first host's answer; a row is judged only when every host read it in
        progress (one that finished between two hosts' reads is not judged at all)."""
        first = self.answers[0][1]
        in_progress = [Job.from_dict(d) for d in first.get("in_progress") or []]
        still = set.intersection(*({d["id"] for d in item.get("in_progress") or []} for _, item in self.answers))
        self.in_progress = [j for j in in_progress if j.id in still]
        # --stale: the rows in progress (submitted since `since`), judged here; the hosts' own lists hold only
        # what each host alone found stale.
        self.jobs = [j for j in self.in_progress if since is None or (stamp(j.created_at) or "") >= since] \
            if stale_only else [Job.from_dict(d) for d in first.get("jobs") or []]
        parts = [(h, item["evidence"]) for h, item in self.answers if item.get("evidence")]
        if self.in_progress and parts:
            self.evidence = merged_evidence(parts)
            self.verdicts = cmd_jobs.decide(self.in_progress, self.evidence)


def merged_evidence(parts: list[tuple[str, dict]]) -> cmd_jobs.Evidence:
    """Every host's evidence as one: each job server as the first host that reached it saw it, the
    workers' jobs of all hosts (instances named host:instance), the earliest time asked (the grace grows
    from there), and any host's unreadable logs as a doubt."""
    views: dict[str, gearman.ServerView] = {}
    sites: dict[tuple, cmd_jobs.SiteEvidence] = {}
    errors = []
    for host, d in parts:
        ev = cmd_jobs.Evidence.from_dict(d, host)
        if ev.logs_error:
            errors.append(f"{host}: {ev.logs_error}")
        for server, view in ev.gearman.items():
            if server not in views or not views[server].reachable:
                views[server] = view
        for s in ev.sites:
            same = sites.setdefault((s.prefix, tuple(s.servers)), s)
            if same is not s:
                same.takens += s.takens
    return cmd_jobs.Evidence(min(d["taken_at"] for _, d in parts), "; ".join(errors) or None, views,
                             list(sites.values()))


def database_key(identity: dict, target: fleet_ssh.Target) -> tuple:
    """A database on the host itself (localhost, a socket) is that host's, at the address the fleet
    reaches it by: another host's config naming that address is the same database."""
    from .cmd_fleet import _resolve

    where = (_resolve(target.address) or target.address) if identity.get("local") else identity.get("address")
    return (where, identity.get("port") or 3306, identity.get("dbname"))


def fail_prefix(args) -> str:
    """The fleet part of a printed command: the same hosts, named the same way."""
    words = ["atom-workerctl"]
    if args.inventory:
        words += ["-i", args.inventory]
        if args.limit:
            words += ["--limit", args.limit]
        if args.group:
            words += ["--group", args.group]
    else:
        for h in args.hosts:
            words += ["-H", h]
    return shlex.join(words)


def run(args, hosts, remote: list[str], timeout: float) -> int:
    action = getattr(args, "jobs_action", None)
    if action in ("export", "clear"):
        raise WorkerctlError(f"jobs {action} reads or writes the one database: run it on one host "
                             f"(atom-workerctl jobs {action} ...), not over the fleet", EXIT_USAGE)
    cmd_jobs.check_options(args)
    if action == "fail":
        return fail(args, hosts, remote, timeout)
    return listing(args, hosts, remote, timeout)


def gather(args, hosts, remote: list[str], timeout: float, stale_only: bool, since: str | None = None):
    results = fleet_ssh.run_many(hosts, remote, timeout, args.parallel)
    groups: dict[tuple, FleetGroup] = {}
    prefix = fail_prefix(args)
    for name, r in results.items():
        for item in (r.data or {}).get("sites") or []:
            identity = item.get("database_identity")
            if identity is None:
                continue
            key = database_key(identity, r.target)
            groups.setdefault(key, FleetGroup(item["database"], prefix)).add(name, item)
    for g in groups.values():
        g.judge(stale_only, since)
    return results, list(groups.values())


def _code(results, groups, stale: bool) -> int:
    from .cmd_fleet import overall_code

    code = overall_code(list(results.values()))
    if code in (EXIT_OK, EXIT_NOT_ACTIVE):  # the hosts' own verdicts are replaced by the fleet's
        code = EXIT_NOT_ACTIVE if stale and cmd_jobs.any_stale(groups) else EXIT_OK
    return code


def _host_errors(out: Out, results) -> None:
    from .cmd_fleet import _unreached_line

    for name, r in results.items():
        if r.reached and r.code not in (EXIT_OK, EXIT_NOT_ACTIVE):
            out.line(out.paint(f"{name}: {r.error or (r.data or {}).get('error') or f'exit {r.code}'}", "red"))
    _unreached_line(out, results)


def listing(args, hosts, remote: list[str], timeout: float) -> int:
    results, groups = gather(args, hosts, remote, timeout, args.stale,
                             cmd_jobs._time(args.since) if args.stale else None)
    code = _code(results, groups, args.stale)
    if args.json:
        from .cmd_fleet import _fleet_json

        dump_json(_fleet_json("jobs", results, code, databases=[
            {**item, "hosts": g.db.hosts} for g, item in zip(groups, cmd_jobs.groups_json(args, groups), strict=True)]))
        return code
    out = Out()
    cmd_jobs.show(args, groups, out)
    if not groups and all(r.reached for r in results.values()):
        out.line("no host answered with a database")
    _host_errors(out, results)
    return code


def _common(remote: list[str], command: str = "jobs") -> list[str]:
    """The options every host gets (--config, --gearman-timeout), taken from the hosts' command line."""
    out, i = [], 0
    while i < len(remote) and remote[i] != command:
        tok = remote[i]
        if tok.split("=", 1)[0] in ("--config", "--gearman-timeout"):
            out.append(tok)
            if "=" not in tok and i + 1 < len(remote):
                out.append(remote[i + 1])
                i += 1
        i += 1
    return out


def for_doctor(args, hosts, remote: list[str], timeout: float) -> list[FleetGroup]:
    """Fleet doctor's stale rows: each database judged once with every host's workers (each host's own
    doctor sees only its own, and calls a row another host's worker runs uncertain, never stale). Hosts
    without a database answer with an error, which is left to their own doctor."""
    ask = [fleet_ssh.REMOTE, "--json", *_common(remote, "doctor"), "jobs", "--stale"]
    _, groups = gather(args, hosts, ask, timeout, True)
    return groups


def judged_here(groups: list[FleetGroup]) -> set[tuple[str, int]]:
    """(host, job id) of every row a fleet judgement covered: those hosts' own verdicts on them give way."""
    return {(h, i) for g in groups for h in g.db.hosts for i in g.verdicts}


def stale_findings(groups: list[FleetGroup]) -> list[dict]:
    """The stale rows as doctor findings (the fix names the fleet's hosts)."""
    out = []
    for g in groups:
        for v in g.verdicts.values():
            if v.state != "stale":
                continue
            subject, summary = cmd_jobs.stale_text(g, v, f" on any of {len(g.db.hosts)} host(s)")
            out.append({"code": "stale_job", "severity": "fault", "subject": subject, "summary": summary,
                        "evidence": v.evidence, "fix": [cmd_jobs._fail_command(g, v)], "hosts": g.db.hosts})
    return out


def fail(args, hosts, remote: list[str], timeout: float) -> int:
    """Judged with every host's workers; written by one host that uses the database (`jobs fail --force`
    there: the judgement that counts is this one, which saw the other hosts' workers)."""
    ids = list(dict.fromkeys(args.ids))
    site = getattr(args, "site", None)
    common = _common(remote)
    ask = [fleet_ssh.REMOTE, "--json", *common, "jobs", "--stale", *(["--site", site] if site else [])]
    results, groups = gather(args, hosts, ask, timeout, True)
    if site:
        groups = [g for g in groups if site in [s.name for s in g.sites]]
    if not groups:
        out = Out()
        _host_errors(out, results)
        raise WorkerctlError("no host answered with the database" + (f" of site {site}" if site else "")
                             + ": nothing changed")
    if len(groups) > 1:
        raise WorkerctlError("the hosts' sites use several databases: name one with --site (nothing changed)",
                             exit_code=EXIT_USAGE)
    g = groups[0]
    refused = [g.verdicts[i] for i in ids if i in g.verdicts and g.verdicts[i].state != "stale"]
    if refused and not args.force:
        v = refused[0]
        raise WorkerctlError(f"job {v.job.id} is not stale ({v.state}: {v.summary}); nothing changed "
                             "(--force marks it failed anyway)")
    writer = next(h for h, _ in g.answers)
    target = next(t for t in hosts if t.name == writer)
    note = args.note or (f"Marked as failed by atom-workerctl on {socket.gethostname()}, asking "
                         f"{len(g.db.hosts)} worker host(s): no worker ran it and no job server held it")
    write = [fleet_ssh.REMOTE, "--json", *common, "jobs", "fail", *map(str, ids), "--site", site or g.site_on(writer),
             "--force", "--note", note]
    r = fleet_ssh.run(target, write, timeout)
    data = r.data or {}
    if not r.reached or r.code != EXIT_OK or "failed" not in data:
        raise WorkerctlError(f"{writer}: {r.error or data.get('error') or f'exit {r.code}'}",
                             exit_code=r.code if r.reached and r.code else 1)
    changed = data["failed"]
    unblocked = sorted({b.id for i in changed if i in g.verdicts for b in g.verdicts[i].blocking} - set(changed))
    if args.json:
        dump_json({"schema": 1, "command": "jobs fail", "mode": "fleet", "written_by": writer, "failed": changed,
                   "note": note, "unblocked": unblocked, "hosts_asked": g.db.hosts})
        return EXIT_OK
    out = Out()
    rows = {j.id: j for j in g.in_progress}
    for i in changed:
        j = rows.get(i)
        since = f" (in progress since {cmd_jobs._short(j.created_at)})" if j else ""
        out.line(f"job {i} {j.name if j else ''}: marked error{since} by {writer}, note: {note}")
    if unblocked:
        out.line(f"later moves/imports it held back can run now: {', '.join(map(str, unblocked))}")
    _host_errors(out, results)
    return EXIT_OK

