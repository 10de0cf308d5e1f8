"""Who runs AtoM's jobs in progress: the workers' own log lines, the rows' own log, gearmand's counts.

What AtoM writes (docs/facts.md, "AtoM's job table"): a worker's console (the journal) has `PID n` when it
starts, then for each job `Job started.` and `Parameters: {"id":N,...}` (a move or import logs that only
after waiting for older ones: `Another sensitive job is being executed...` meanwhile), and at the end
`Job finished.` or an error, then `Jobs completed: n` (or `Job failed: ...`). The console lines carry no job
id; the row's `output` column has the same lines as `[info] [Y-m-d H:i:s] Job N "Class": ...`, stamped by
the same PHP process. So a worker's current job is tied to its row by the id of its `Parameters` line, or,
before that line (a move waiting), by the time stamp of `Job started.`, which its console line and the
row's output line share (within a second, and only when exactly one row matches).

Per instance, the job of the last `Job started.` with no end after it is the job of the process that logged
it: running if that process is still alive among the instance's processes, abandoned if it is gone.

A row in progress is *stale* when nothing runs it and nothing will: no worker here runs it, every job
server of its site answers, none holds a job of its class waiting, and every job of its class they run is
tied to another row. A job server that does not answer, a job waiting, or a running job not tied to a row
(another host's worker, a journal that no longer reaches back) leaves the row *uncertain*, never stale.
Rows younger than GRACE_S are left alone: the web app commits the row just before it submits the job.
"""

from __future__ import annotations

import json
import re
import time

from . import model
from .jobtable import SENSITIVE, Job
from .render import ago

GRACE_S = 10
_PID = re.compile(r"^PID (\d+)$")
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) > ")   # the worker's own prefix (kept by journald)
_OUTPUT_STARTED = re.compile(r'^\[\w+\] \[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\] Job \d+ "[^"]*": Job started\.$')
_ENDS = ("Job finished.", "Jobs completed: ", "Job failed: ")
_WAITING = "Another sensitive job is being executed"


class Taken:
    """The job a worker process started last and did not end: running (alive) or abandoned (gone)."""

    __slots__ = ("instance", "pid", "started", "usec", "job_id", "tied_by", "waiting", "alive")

    def __init__(self, instance: str, pid: int | None, started: str, usec: int):
        self.instance, self.pid, self.started, self.usec = instance, pid, started, usec
        self.job_id: int | None = None
        self.tied_by = ""      # "Parameters" (its id) or "time" (its start's time stamp)
        self.waiting = False
        self.alive = False

    def where(self) -> str:
        return f"{self.instance} (PID {self.pid})" if self.pid else self.instance

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}

    @classmethod
    def from_dict(cls, d: dict, host: str) -> Taken:
        """Another host's taken job; its instance named with the host (`w2:atom-worker@1`)."""
        t = cls(f"{host}:{d['instance']}", d.get("pid"), d["started"], int(d["usec"]))
        t.job_id, t.tied_by, t.waiting, t.alive = d.get("job_id"), d.get("tied_by") or "", \
            bool(d.get("waiting")), bool(d.get("alive"))
        return t


def _text(entry) -> tuple[str, str]:
    """(the worker's time stamp, the message without it)."""
    m = _STAMP.match(entry.message)
    if m:
        return m.group(1), entry.message[m.end():]
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.usec / 1e6)), entry.message


def scan(entries, alive_pids: dict[str, set[int]]) -> list[Taken]:
    """Every job started and not ended, per instance: the current one and the abandoned ones, oldest first."""
    out: list[Taken] = []
    current: dict[str, Taken | None] = {}
    pid_of: dict[str, int | None] = {}
    for e in entries:
        if e.source != "worker":
            continue
        stamp, msg = _text(e)
        m = _PID.match(msg)
        if m:  # a new process: what the old one had open was abandoned (alive stays False)
            current[e.unit] = None
            pid_of[e.unit] = int(m.group(1))
            continue
        if msg == "Job started.":
            taken = Taken(model.short(e.unit), pid_of.get(e.unit) or e.pid, stamp, e.usec)
            current[e.unit] = taken
            out.append(taken)
            continue
        taken = current.get(e.unit)
        if taken is None:
            continue
        if msg.startswith("Parameters: "):
            try:
                job_id = json.loads(msg[len("Parameters: "):]).get("id")
            except (ValueError, AttributeError):
                job_id = None
            if isinstance(job_id, int) or (isinstance(job_id, str) and job_id.isdigit()):
                taken.job_id, taken.tied_by = int(job_id), "Parameters"
        elif msg.startswith(_WAITING):
            taken.waiting = True
        elif msg.startswith(_ENDS):
            out.remove(taken)
            current[e.unit] = None
    for unit, taken in current.items():
        if taken is not None:
            taken.alive = taken.pid is not None and taken.pid in alive_pids.get(unit, set())
    return out


def _output_started(job: Job) -> str | None:
    for line in reversed(job.output_lines()):
        m = _OUTPUT_STARTED.match(line)
        if m:
            return m.group(1)
    return None


def _seconds(stamp: str) -> float:
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S"))


def tie(takens: list[Taken], rows: list[Job]) -> None:
    """Give each job without a Parameters id the one row in progress whose output says it started within a
    second of the worker's `Job started.` (live workers first; a row is tied once)."""
    tied = {t.job_id for t in takens if t.job_id is not None}
    starts = {j.id: _output_started(j) for j in rows}
    for t in sorted((t for t in takens if t.job_id is None), key=lambda t: not t.alive):
        match = [i for i, s in starts.items() if s and i not in tied and abs(_seconds(s) - _seconds(t.started)) <= 1]
        if len(match) == 1:
            t.job_id, t.tied_by = match[0], "time"
            tied.add(match[0])


class Verdict:
    """What is known about one row in progress: state is running, waiting, uncertain or stale."""

    __slots__ = ("job", "state", "summary", "evidence", "blocking")

    def __init__(self, job: Job, state: str, summary: str, evidence: list[str]):
        self.job, self.state, self.summary, self.evidence = job, state, summary, evidence
        self.blocking: list[Job] = []

    def as_dict(self) -> dict:
        return {"state": self.state, "summary": self.summary, "evidence": self.evidence,
                "blocking": [j.id for j in self.blocking]}


def judge(jobs: list[Job], prefix: str, servers: list[str], gearman: dict, takens: list[Taken],
          now: float, logs_error: str | None = None, grace: float = GRACE_S) -> dict[int, Verdict]:
    """A verdict for every row in progress of one site (`jobs` with their output; gearman: server ->
    ServerView, asked after the rows were read; takens: scan() of the site's instances; logs_error: why the
    workers' logs could not be read, which leaves every row not running here uncertain)."""
    tie(takens, jobs)
    live = {t.job_id: t for t in takens if t.alive and t.job_id is not None}
    gone = {t.job_id: t for t in takens if not t.alive and t.job_id is not None}
    untied = [t for t in takens if t.alive and t.job_id is None]
    rows_of: dict[str, list[Job]] = {}
    for j in jobs:
        rows_of.setdefault(j.name, []).append(j)
    verdicts: dict[int, Verdict] = {}
    for cls, rows in rows_of.items():
        function = f"{prefix}-{cls}"
        busy = waiting = 0
        counts, doubts = [], ([f"the workers' logs could not be read ({logs_error})"] if logs_error else [])
        for server in servers:
            view = gearman.get(server)
            if view is None or not view.reachable:
                doubts.append(f"gearmand {server} did not answer ({view.error if view else 'not asked'})")
                continue
            st = view.functions.get(function)
            total, running = (st.queued, st.running) if st else (0, 0)
            busy += running
            waiting += total - running
            counts.append(f"gearmand {server}: {cls}: {total - running} waiting, {running} running")
        if waiting:
            doubts.append(f"{waiting} {cls} job(s) wait at gearmand: it may be one of them")
        tied_here = [j.id for j in rows if j.id in live]
        if tied_here:
            counts.append(f"running here, tied to their rows: {', '.join(map(str, tied_here))}")
        unaccounted = busy - len(tied_here)
        if unaccounted > 0:
            doubts.append(f"gearmand runs {unaccounted} {cls} job(s) not tied to a row"
                          + (f" ({len(untied)} worker(s) here run a job not tied to a row)" if untied
                             else " (another host's workers?)"))
        for job in rows:
            taken = live.get(job.id)
            if taken is not None:
                how = "its Parameters line" if taken.tied_by == "Parameters" else "its start's time stamp"
                evidence = [f"{taken.instance}: started it {ago(taken.usec, now)} (tied by {how})"]
                if taken.waiting:
                    verdicts[job.id] = Verdict(job, "waiting", f"on {taken.where()}, waiting for older "
                                               "moves/imports", evidence)
                else:
                    verdicts[job.id] = Verdict(job, "running", f"on {taken.where()}", evidence)
                continue
            evidence = list(counts)
            lines = job.output_lines()
            evidence.append(f"its own log ends: {lines[-1]}" if lines else "its own log is empty: no worker "
                            "ever started it")
            dead = gone.get(job.id)
            if dead is not None:
                evidence.append(f"{dead.where()} started it {ago(dead.usec, now)} and that process is gone "
                                "without ending it (killed or crashed)")
            if (job.age_s or 0) < grace:
                verdicts[job.id] = Verdict(job, "uncertain", "just submitted", evidence)
            elif doubts:
                verdicts[job.id] = Verdict(job, "uncertain", doubts[0], evidence + doubts[1:])
            elif not servers:
                verdicts[job.id] = Verdict(job, "uncertain", "the site names no job server", evidence)
            else:
                verdicts[job.id] = Verdict(job, "stale", "nothing runs it or will: no worker has it, no job "
                                           "server holds it", evidence)
    # A stale move or import blocks every later one (AtoM runs them one at a time, oldest first).
    order = sorted(jobs, key=lambda j: (j.created_at, j.id))
    for v in verdicts.values():
        if v.state == "stale" and v.job.name in SENSITIVE:
            v.blocking = [j for j in order if j.name in SENSITIVE and j.id != v.job.id
                          and (j.created_at, j.id) > (v.job.created_at, v.job.id)]
    return verdicts
