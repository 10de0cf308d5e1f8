"""`atom-workerctl jobs`: AtoM's job table beside gearmand's queue and the workers' logs.

    jobs [--status S] [--since T] [--stale]     the rows, newest first; for rows in progress, who runs them
    jobs fail ID... [--note TEXT] [--force]     mark stale rows error, as AtoM's own error path does
    jobs export [--status S] [--since T] [--before T]   the history as AtoM's jobs CSV, on stdout
    jobs clear --before T [--status completed,error] [--yes]   delete finished rows older than T

Each site's database comes from its config/config.php (phpconfig.py); sites sharing one database are read
once. Only `fail` and `clear` write, and only the rows they name or select.
"""

from __future__ import annotations

import os
import sys
import time

from . import job_evidence, model
from .errors import EXIT_NOT_ACTIVE, EXIT_OK, EXIT_USAGE, NoSuchError, WorkerctlError
from .jobtable import COMPLETED, ERROR, IN_PROGRESS, STATUS_IDS, Job, JobTable, stamp
from .phpconfig import Database
from .render import Out, dump_json

CSV_COLUMNS = ["startDate", "endDate", "jobName", "jobStatus", "jobInfo", "jobUser"]
CSV_STATUS = {COMPLETED: "Completed", IN_PROGRESS: "Running", ERROR: "Error"}


class SiteJobs:
    """One database and the sites of this host that use it."""

    def __init__(self, db, sites: list[model.Site]):
        self.db = db
        self.sites = sites
        self.table: JobTable | None = None
        self.jobs: list[Job] = []          # the rows shown
        self.in_progress: list[Job] = []   # every row in progress, judged whether shown or not
        self.verdicts: dict[int, job_evidence.Verdict] = {}
        self.evidence: Evidence | None = None
        self.fail_prefix = "atom-workerctl"  # a fleet's: atom-workerctl -i INVENTORY

    def database_identity(self) -> dict:
        """Where the database is, as another host would name it: a fleet merges the hosts' answers by it."""
        from .cmd_doctor import is_local

        db = self.db
        local = db.unix_socket is not None or is_local(db.host)
        address = None
        if not local:
            import socket

            try:
                address = socket.gethostbyname(db.host)
            except OSError:
                address = db.host
        return {"local": local, "address": address, "port": db.port or 3306, "dbname": db.dbname}

    @property
    def name(self) -> str:
        return ", ".join(s.name for s in self.sites)


def databases(host: model.Host, site: str | None) -> list[SiteJobs]:
    """The databases of the selected sites. Without --site, sites with no config/config.php are left out
    (an error only when none has one)."""
    from .phpconfig import site_database

    chosen = [host.site(site)] if site else host.sites
    out: dict[tuple, SiteJobs] = {}
    errors = []
    for s in chosen:
        try:
            db = site_database(s.root)
        except WorkerctlError as exc:
            if site:
                raise
            errors.append(str(exc))
            continue
        out.setdefault(db.key, SiteJobs(db, [])).sites.append(s)
    if not out:
        raise WorkerctlError(errors[0] if len(errors) == 1 else "no site of this host has a database configured: "
                             + "; ".join(errors))
    return list(out.values())


def _time(text: str | None) -> str | None:
    """A --since/--before time as the database's DATETIME text (this host's local time)."""
    if not text:
        return None
    from .journal import parse_time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(parse_time(text) / 1e6))


def _statuses(text: str | None, default: list[int] | None) -> list[int] | None:
    if not text:
        return default
    out = []
    for raw in text.split(","):
        word = raw.strip().lower()
        if word == "all":
            return None
        if word not in STATUS_IDS:
            raise WorkerctlError(f"unknown status {word!r} (running, completed, error, all)", exit_code=EXIT_USAGE)
        out.append(STATUS_IDS[word])
    return out


# The workers' logs are read back this far at most (a row older than that is judged on gearmand's counts
# and the rows' own logs: a job running longer, tied to no row, leaves rows of its class uncertain).
LOG_WINDOW_S = 7 * 86400
# What a verdict weighs when several sites share one database: the most cautious one wins.
_CAUTION = {"running": 0, "waiting": 1, "uncertain": 2, "stale": 3}


class SiteEvidence:
    """One site's side of a database's rows in progress: its job servers, and its workers' jobs (Taken)."""

    __slots__ = ("name", "prefix", "servers", "takens")

    def __init__(self, name: str, prefix: str, servers: list[str], takens: list):
        self.name, self.prefix, self.servers, self.takens = name, prefix, servers, takens

    def as_dict(self) -> dict:
        return {"name": self.name, "prefix": self.prefix, "servers": self.servers,
                "takens": [t.as_dict() for t in self.takens]}


class Evidence:
    """What one host knows about the rows in progress of one database: gearmand's counts (asked at
    taken_at, after the rows were read), each site's workers' jobs, and why the logs could not be read.
    `jobs --json` carries it, so that a fleet judges each database once with every host's workers."""

    def __init__(self, taken_at: float, logs_error: str | None, gearman: dict, sites: list[SiteEvidence]):
        self.taken_at, self.logs_error, self.gearman, self.sites = taken_at, logs_error, gearman, sites

    def as_dict(self) -> dict:
        return {"taken_at": self.taken_at, "logs_error": self.logs_error,
                "gearman": {s: {"error": v.error, "functions": {f: [st.queued, st.running, st.available]
                                                                for f, st in v.functions.items()}}
                            for s, v in self.gearman.items()},
                "sites": [s.as_dict() for s in self.sites]}

    @classmethod
    def from_dict(cls, d: dict, host: str) -> Evidence:
        """Another host's evidence (its `jobs --json`); its workers' instances named host:instance."""
        from .gearman import FunctionStatus, ServerView

        views = {}
        for server, g in (d.get("gearman") or {}).items():
            view = views[server] = ServerView(server)
            view.error = g.get("error")
            view.functions = {f: FunctionStatus(f, *counts) for f, counts in (g.get("functions") or {}).items()}
        sites = [SiteEvidence(s["name"], s["prefix"], list(s["servers"]),
                              [job_evidence.Taken.from_dict(t, host) for t in s.get("takens") or []])
                 for s in d.get("sites") or []]
        return cls(d["taken_at"], d.get("logs_error"), views, sites)


def decide(rows: list[Job], ev: Evidence) -> dict:
    """Verdicts on the rows in progress, judged as each site of the evidence; the most cautious stays."""
    verdicts: dict = {}
    grace = job_evidence.GRACE_S + max(0.0, time.time() - ev.taken_at)
    for s in ev.sites:
        merge(verdicts, job_evidence.judge(rows, s.prefix, s.servers, ev.gearman, s.takens, ev.taken_at,
                                           ev.logs_error, grace))
    return verdicts


def judge_sites(host: model.Host, backend, groups: list[SiteJobs], timeout: float, snap=None) -> None:
    """Evidence and verdicts for every row in progress: gearmand asked after the rows were read (or doctor's
    snapshot, taken before them: the grace time then grows by the snapshot's age), the workers' logs since
    the oldest such row (at most LOG_WINDOW_S). A database several sites share is judged as each site: a row
    is stale only when it is stale for every one of them."""
    pending = [g for g in groups if g.in_progress]
    if not pending:
        return
    from .snapshot import take

    units = [u for g in pending for s in g.sites for p in s.pools for u in p.units]
    if snap is None:
        snap = take(host, backend, units=units, timeout=timeout)
    oldest = min(max(j.age_s or 0 for g in pending for j in g.in_progress), LOG_WINDOW_S)
    alive = {u: set(i.pids) for u, i in snap.instances.items() if i.state.active}
    # Without the workers' logs nothing can be tied to a row: then no row is called stale (judge's doubt).
    try:
        from .cmd_logs import read_entries

        since = f"@{time.time() - oldest - 60:.0f}"
        takens, logs_error = job_evidence.scan(read_entries(host, backend, units, since=since), alive), None
    except (WorkerctlError, OSError) as exc:
        takens, logs_error = [], str(exc)
    for g in pending:
        sites = []
        for s in g.sites:
            sv = snap.site_view(s)
            own = {model.short(u) for p in s.pools for u in p.units}
            sites.append(SiteEvidence(s.name, sv.prefix, list(sv.servers),
                                      [t for t in takens if t.instance in own]))
        g.evidence = Evidence(snap.taken_at, logs_error, snap.gearman, sites)
        g.verdicts = decide(g.in_progress, g.evidence)


def merge(verdicts: dict, more: dict) -> None:
    """Another site's verdicts on the same rows: the most cautious one stays (running before waiting before
    uncertain before stale), so a row is stale only when every site sharing the database finds it so."""
    for job_id, v in more.items():
        if job_id not in verdicts or _CAUTION[v.state] < _CAUTION[verdicts[job_id].state]:
            verdicts[job_id] = v


def judge_host(host: model.Host, backend, snap) -> tuple[list[SiteJobs], list[tuple]]:
    """Every row in progress of this host's sites' databases, judged (doctor and metrics read the host this
    way): the databases read, and (site names, error, database or None) for each that could not be. Sites
    without config/config.php are not looked at."""
    from .phpconfig import CONFIG_PHP

    groups: list[SiteJobs] = []
    unreadable: list[tuple] = []
    for name in [s.name for s in host.sites if os.path.exists(os.path.join(s.root, CONFIG_PHP))]:
        try:
            (g,) = databases(host, name)
        except WorkerctlError as exc:
            unreadable.append(([name], exc, None))
            continue
        same = next((x for x in groups if x.db.key == g.db.key), None)
        if same is None:
            groups.append(g)
        else:
            same.sites += g.sites  # one database, judged as each of its sites
    try:
        for g in groups:
            try:
                g.table = JobTable(g.db)
                g.in_progress = g.table.jobs(statuses=[IN_PROGRESS], output=True)
            except WorkerctlError as exc:
                unreadable.append(([s.name for s in g.sites], exc, g.db))
        judge_sites(host, backend, [g for g in groups if g.table is not None], 0, snap=snap)
    finally:
        _close(groups)
    return [g for g in groups if g.table is not None], unreadable


def stale_findings(host: model.Host, backend, snap, Finding, fault: str, warning: str) -> list:
    """doctor: a stale row is a fault with its fixing command; a database that cannot be read, a warning."""
    groups, unreadable = judge_host(host, backend, snap)
    findings = [Finding("jobs_unreadable", warning, f"site {', '.join(names)}",
                        "AtoM's job table cannot be read: stale jobs are not looked for", [str(exc)],
                        _database_fix(db, str(exc), backend))
                for names, exc, db in unreadable]
    for g in groups:
        for v in g.verdicts.values():
            if v.state != "stale":
                continue
            findings.append(Finding(
                "stale_job", fault, *stale_text(g, v),
                [f"job {v.job.id}: {v.job.name}, in progress since {_short(v.job.created_at)}", *v.evidence],
                [_fail_command(g, v)]))
    return findings


def stale_text(g: SiteJobs, v, where: str = "") -> tuple[str, str]:
    """A stale row's finding: its subject and summary (`where`: a fleet's "on any of N host(s)")."""
    blocks = (f"; it blocks {len(v.blocking)} later move/import job(s): "
              + ", ".join(str(b.id) for b in v.blocking)) if v.blocking else ""
    return (f"job {v.job.id} (site {g.name})",
            f"AtoM shows job {v.job.id} {v.job.name} as Running, but nothing runs it or will{where}{blocks}")


def _database_fix(db, error: str, backend) -> list[str]:
    """What to do when the job table cannot be read: start the database when it runs here and does not
    answer; otherwise the settings or the server elsewhere are a person's step."""
    if "PyMySQL" in error:
        return ["apt-get install -y python3-pymysql"]
    if db is None:
        return ["by hand: correct config/config.php (named above): AtoM reads its database settings there"]
    from .cmd_doctor import is_local

    local = db.unix_socket is not None or is_local(db.host)
    refused = "Can't connect" in error or "Connection refused" in error or "No such file" in error
    if local and refused:
        start = "systemctl start mariadb" if backend is not None and backend.name == "systemd" else \
            "service mariadb start"
        return [f"{start}   # the site's database runs on this host and does not answer"]
    if refused:
        return [f"on {db.host}: start the database server, and check it accepts connections from this host"]
    return [f"by hand: correct config/config.php's database settings, or {db.username}'s grants in the database"]


def _open(groups: list[SiteJobs]) -> None:
    for g in groups:
        g.table = JobTable(g.db)


def _close(groups: list[SiteJobs]) -> None:
    for g in groups:
        if g.table is not None:
            g.table.close()


def check_args(args, host: model.Host) -> None:
    """Everything the command line says, checked before a database, gearmand or systemd is asked."""
    if args.site:
        host.site(args.site)
    check_options(args)


def check_options(args) -> None:
    """The options that need no host (a fleet checks them before any host is asked)."""
    _statuses(getattr(args, "status", None), None)
    for name in ("since", "before"):
        _time(getattr(args, name, None))
    if getattr(args, "lines", 0) < 0:
        raise WorkerctlError("-n must be 0 (all) or more", exit_code=EXIT_USAGE)


def run(args, host: model.Host, backend) -> int:
    action = getattr(args, "jobs_action", None)
    if action == "export":
        return export(args, host)
    if action == "clear":
        return clear(args, host)
    if action == "fail":
        return fail(args, host, backend)
    return listing(args, host, backend)


# -- jobs [--stale] -------------------------------------------------------------------------------------------

def listing(args, host: model.Host, backend) -> int:
    groups = databases(host, args.site)
    statuses = [IN_PROGRESS] if args.stale else _statuses(args.status, None)
    since = _time(args.since)
    try:
        _open(groups)
        for g in groups:
            # Every row in progress is judged, shown or not; with --stale (and no --since) they are the rows shown.
            g.in_progress = g.table.jobs(statuses=[IN_PROGRESS], output=True, notes=args.stale and not since)
            g.jobs = g.in_progress if args.stale and not since else \
                g.table.jobs(statuses=statuses, since=since, notes=True,
                             limit=None if args.stale or not args.lines else args.lines)
        judge_sites(host, backend, groups, args.gearman_timeout)
    finally:
        _close(groups)
    code = EXIT_NOT_ACTIVE if args.stale and any_stale(groups) else EXIT_OK
    if args.json:
        dump_json({"schema": 1, "command": "jobs", "exit_code": code, "sites": groups_json(args, groups)})
        return code
    show(args, groups, Out())
    return code


def any_stale(groups: list[SiteJobs]) -> bool:
    return any(v.state == "stale" for g in groups for v in g.verdicts.values())


def groups_json(args, groups: list[SiteJobs]) -> list[dict]:
    """The rows shown, each in progress with what is known of it; and each database's evidence, which
    a fleet merges (the rows in progress with their output, the hosts' workers, gearmand's counts)."""
    out = []
    for g in groups:
        shown = [j for j in g.jobs if not args.stale or (j.id in g.verdicts and g.verdicts[j.id].state == "stale")]
        item = {"sites": [s.name for s in g.sites], "database": g.db.describe(),
                "jobs": [{**j.as_dict(), **({"now": g.verdicts[j.id].as_dict()} if j.id in g.verdicts else {})}
                         for j in shown]}
        if isinstance(g.db, Database):  # read here, not merged from other hosts
            item["database_identity"] = g.database_identity()
            item["in_progress"] = [j.as_dict(output=True) for j in g.in_progress]
            item["evidence"] = g.evidence.as_dict() if g.evidence else None
        out.append(item)
    return out


def show(args, groups: list[SiteJobs], out: Out) -> None:
    statuses = [IN_PROGRESS] if args.stale else _statuses(args.status, None)
    for n, g in enumerate(groups):
        if n:
            out.line()
        out.line(out.paint(f"site {g.name}", "bold") + f": {g.db.describe()}")
        if args.stale:
            _render_stale(out, g)
            continue
        if not g.jobs:
            out.line("  no jobs" + (" of that status" if statuses else "")
                     + (f" since {args.since}" if args.since else ""))
            continue
        rows, styles = [], []
        for j in g.jobs:
            v = g.verdicts.get(j.id)
            now = "" if v is None else (f"STALE: {v.summary}" if v.state == "stale" else v.summary)
            rows.append([str(j.id), j.name or "-", j.user or "-", j.status, _short(j.created_at),
                         _short(j.completed_at), _age(j.age_s), now])
            styles.append(["", "", "", {"error": "red", "completed": "green"}.get(j.status, "yellow"), "", "", "",
                           "red" if v is not None and v.state == "stale" else ""])
        out.table(["ID", "CLASS", "USER", "STATUS", "STARTED", "COMPLETED", "AGE", "NOW"], rows, styles,
                  indent="  ")
        for v in g.verdicts.values():
            if v.state == "stale":
                out.line()
                out.line(f"  job {v.job.id} is stale: `{g.fail_prefix} jobs --stale` shows why; fix: "
                         + out.paint(_fail_command(g, v), "bold"))


def _render_stale(out: Out, g: SiteJobs) -> None:
    stale = [v for v in g.verdicts.values() if v.state == "stale"]
    others = [v for v in g.verdicts.values() if v.state != "stale"]
    if not stale:
        out.line(f"  no stale job ({len(others)} in progress: "
                 + ", ".join(f"{v.job.id} {v.state}" for v in others) + ")" if others else "  no job in progress")
        return
    for v in stale:
        j = v.job
        out.line(f"  {out.paint('STALE', 'red')} job {j.id} {j.name} (user {j.user or 'none'}), in progress since "
                 f"{_short(j.created_at)} ({_age(j.age_s)}): {v.summary}")
        for e in v.evidence:
            out.line(f"    evidence: {e}")
        if v.blocking:
            out.line(f"    blocks:   {len(v.blocking)} later move/import job(s), AtoM runs them one at a time: "
                     + ", ".join(f"{b.id} {b.name}" for b in v.blocking))
        out.line("    fix:      " + out.paint(_fail_command(g, v), "bold"))
    for v in others:
        out.line(f"  job {v.job.id} {v.job.name}: {v.state}, {v.summary}")


def _fail_command(g: SiteJobs, v) -> str:
    # Always with --site: on a host whose sites use several databases, `jobs fail` needs it.
    return f"{g.fail_prefix} jobs fail {v.job.id} --site {g.sites[0].name}"


def _short(value) -> str:
    return stamp(value) or "-"


def _age(seconds) -> str:
    if seconds is None:
        return "-"
    from .render import ago

    return ago(int((time.time() - seconds) * 1e6)).removesuffix(" ago")


# -- jobs fail ------------------------------------------------------------------------------------------------

def fail(args, host: model.Host, backend) -> int:
    groups = databases(host, args.site)
    if len(groups) > 1:
        raise WorkerctlError("this host's sites use several databases: name one with --site", exit_code=EXIT_USAGE)
    g = groups[0]
    ids = list(dict.fromkeys(args.ids))
    out = Out()
    try:
        _open(groups)
        g.jobs = g.table.jobs(ids=ids)
        g.in_progress = g.table.jobs(statuses=[IN_PROGRESS], output=True)  # all of them: which later ones each blocks
        found = {j.id: j for j in g.jobs}
        missing = [i for i in ids if i not in found]
        if missing:
            raise NoSuchError(f"no such job in {g.db.describe()}: {', '.join(map(str, missing))}")
        finished = [j for j in g.jobs if not j.running]
        if finished:
            raise WorkerctlError("not in progress, nothing to do: "
                                 + ", ".join(f"job {j.id} is {j.status}" for j in finished) + " (nothing changed)")
        judge_sites(host, backend, groups, args.gearman_timeout)
        gone = [i for i in ids if i not in g.verdicts]  # finished between the two reads
        if gone:
            raise WorkerctlError(f"job {gone[0]} is no longer in progress: nothing changed")
        refused = [g.verdicts[i] for i in ids if g.verdicts[i].state != "stale"]
        if refused and not args.force:
            v = refused[0]
            raise WorkerctlError(f"job {v.job.id} is not stale ({v.state}: {v.summary}); nothing changed "
                                 "(--force marks it failed anyway)")
        note = args.note or (f"Marked as failed by atom-workerctl on {_hostname()}: no worker ran it and no job "
                             "server held it")
        changed = g.table.fail(ids, note)
        # Rows that blocked later moves or imports: say which can go on now.
        unblocked = sorted({b.id for i in changed for b in g.verdicts[i].blocking} - set(changed))
    finally:
        _close(groups)
    if args.json:
        dump_json({"schema": 1, "command": "jobs fail", "failed": changed, "note": note, "unblocked": unblocked})
        return EXIT_OK
    for i in changed:
        j = found[i]
        out.line(f"job {i} {j.name}: marked error (in progress since {_short(j.created_at)}), note: {note}")
    if unblocked:
        out.line(f"later moves/imports it held back can run now: {', '.join(map(str, unblocked))}")
    return EXIT_OK


def _hostname() -> str:
    from .snapshot import hostname

    return hostname()


# -- jobs export ----------------------------------------------------------------------------------------------

def export(args, host: model.Host) -> int:
    groups = databases(host, args.site)
    try:
        _open(groups)
        for g in groups:
            g.jobs = g.table.jobs(statuses=_statuses(args.status, None), since=_time(args.since),
                                  before=_time(args.before), oldest_first=True, notes=True)
    finally:
        _close(groups)
    write = sys.stdout.write
    write(csv_line(CSV_COLUMNS))
    for g in groups:
        for j in g.jobs:
            write(csv_line([_atom_date(j.created_at), _atom_date(j.completed_at), j.name or "",
                            CSV_STATUS.get(j.status_id, "Unknown"), " | ".join(j.notes), j.user or "None"]))
    return EXIT_OK


def _atom_date(value) -> str:
    """QubitJob::formatDate(): 'Y-m-d h:i A', 'N/A' when unset."""
    return value.strftime("%Y-%m-%d %I:%M %p") if value is not None else "N/A"


def csv_line(fields: list[str]) -> str:
    """One line as PHP's fputcsv writes it (AtoM's export uses it): a field is quoted when it holds the
    delimiter, a quote, a backslash, a space, a tab or a line break; quotes inside are doubled."""
    out = []
    for field in fields:
        text = str(field)
        if any(c in text for c in ',"\\ \t\r\n'):
            text = '"' + text.replace('"', '""') + '"'
        out.append(text)
    return ",".join(out) + "\n"


# -- jobs clear -----------------------------------------------------------------------------------------------

def clear(args, host: model.Host) -> int:
    statuses = _statuses(args.status, [COMPLETED, ERROR])
    if statuses is None or IN_PROGRESS in statuses:
        raise WorkerctlError("jobs clear deletes finished jobs only: --status completed, error or both",
                             exit_code=EXIT_USAGE)
    before = _time(args.before)
    groups = databases(host, args.site)
    out = Out(sys.stderr)
    total = 0
    try:
        _open(groups)
        for g in groups:
            g.jobs = g.table.jobs(statuses=statuses, before=before)
            total += len(g.jobs)
        if not total:
            out.line(f"no finished jobs before {before}: nothing to delete")
            return EXIT_OK
        for g in groups:
            counts = {s: sum(1 for j in g.jobs if j.status == s) for s in ("completed", "error")}
            out.line(f"site {g.name} ({g.db.describe()}): {len(g.jobs)} finished job(s) before {before} "
                     f"({counts['completed']} completed, {counts['error']} error) and their notes will be deleted; "
                     "rows in progress and later rows stay")
        if not args.yes:
            if not sys.stdin.isatty():
                raise WorkerctlError(f"refusing to delete {total} job(s) without --yes (not on a terminal); "
                                     "keep them first: atom-workerctl jobs export > jobs.csv", exit_code=EXIT_USAGE)
            sys.stderr.write(f"delete {total} job(s)? [y/N] ")
            sys.stderr.flush()
            if sys.stdin.readline().strip().lower() not in ("y", "yes"):
                out.line("nothing deleted")
                return EXIT_OK
        deleted = sum(g.table.clear([j.id for j in g.jobs]) for g in groups)
    finally:
        _close(groups)
    out.line(f"deleted {deleted} job(s)")
    return EXIT_OK
