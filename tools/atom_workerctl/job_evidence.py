"""Who runs AtoM's jobs in progress: the workers' own log lines beside gearmand's counts.

A worker logs `PID n` when it starts, then for each job `Job <id> "<Class>": Job started.` and at the end
`Job finished.`, an error (`Exception: ...`, `Maximum retries reached ...`), `Job failed: ...` or
`Jobs completed: n`. So, per instance, the last job started by a process that logged no end is the job that
process is running, if the process is still alive among the instance's processes; if it is gone (killed,
crashed, restarted), the job was abandoned by it. A move or import that logged `Another sensitive job is
being executed` is waiting behind an older one.

A row in progress is *stale* when nothing runs it and nothing will: no worker here runs it, and at every job
server of its site its function has no job waiting and no running job that this host's workers do not
account for. A job server that does not answer, a job waiting, or a running job of another host makes the
row *uncertain*, never stale. Rows younger than GRACE_S are left alone: the web app commits the row just
before it submits the job.
"""

from __future__ import annotations

import re

from . import model
from .jobtable import SENSITIVE, Job
from .render import ago

GRACE_S = 10
_PID = re.compile(r"^PID (\d+)$")
_STARTED = re.compile(r'^Job (\d+) "([^"]*)": Job started\.$')
_ENDED = re.compile(r'^Job (\d+) "[^"]*": (?:Job finished\.|Exception: |Maximum retries reached)')
_WAITING = re.compile(r'^Job (\d+) "[^"]*": Another sensitive job is being executed')
_ANY_END = re.compile(r"^(?:Job failed: |Jobs completed: )")


class Taken:
    """A job a worker process started: running (its process alive) or abandoned (gone without an end)."""

    __slots__ = ("instance", "pid", "job_id", "cls", "usec", "waiting", "alive")

    def __init__(self, instance: str, pid: int | None, job_id: int, cls: str, usec: int):
        self.instance, self.pid, self.job_id, self.cls, self.usec = instance, pid, job_id, cls, usec
        self.waiting = False
        self.alive = False

    def where(self) -> str:
        return f"{self.instance} (PID {self.pid})" if self.pid else self.instance


def scan(entries, alive_pids: dict[str, set[int]]) -> tuple[dict[int, Taken], dict[int, Taken]]:
    """(running, abandoned) by job id, from the instances' log entries (oldest first)."""
    current: dict[str, Taken | None] = {}
    pid_of: dict[str, int | None] = {}
    abandoned: dict[int, Taken] = {}
    for e in entries:
        if e.source != "worker":
            continue
        unit, msg = e.unit, e.message
        m = _PID.match(msg)
        if m:
            _drop(current, unit, abandoned)
            pid_of[unit] = int(m.group(1))
            continue
        m = _STARTED.match(msg)
        if m:
            _drop(current, unit, abandoned)
            current[unit] = Taken(model.short(unit), pid_of.get(unit) or e.pid, int(m.group(1)), m.group(2), e.usec)
            continue
        taken = current.get(unit)
        if taken is None:
            continue
        m = _ENDED.match(msg)
        if (m and int(m.group(1)) == taken.job_id) or _ANY_END.match(msg):
            current[unit] = None
            continue
        m = _WAITING.match(msg)
        if m and int(m.group(1)) == taken.job_id:
            taken.waiting = True
    running: dict[int, Taken] = {}
    for unit, taken in current.items():
        if taken is None:
            continue
        taken.alive = taken.pid is not None and taken.pid in alive_pids.get(unit, set())
        if taken.alive:
            running[taken.job_id] = taken
        else:
            abandoned[taken.job_id] = taken
    for job_id in running:
        abandoned.pop(job_id, None)
    return running, abandoned


def _drop(current: dict, unit: str, abandoned: dict[int, Taken]) -> None:
    """A new process or a new job while one was open: the open one was left without an end."""
    taken = current.get(unit)
    if taken is not None:
        abandoned[taken.job_id] = taken
    current[unit] = None


class Verdict:
    """What is known about one row in progress: state is running, waiting, uncertain or stale."""

    __slots__ = ("job", "state", "summary", "evidence", "blocking")

    def __init__(self, job: Job, state: str, summary: str, evidence: list[str]):
        self.job, self.state, self.summary, self.evidence = job, state, summary, evidence
        self.blocking: list[Job] = []

    def as_dict(self) -> dict:
        return {"state": self.state, "summary": self.summary, "evidence": self.evidence,
                "blocking": [j.id for j in self.blocking]}


def judge(jobs: list[Job], prefix: str, servers: list[str], gearman: dict, running: dict[int, Taken],
          abandoned: dict[int, Taken], now: float) -> dict[int, Verdict]:
    """A verdict for every row in progress of one site (gearman: server -> ServerView, queried after the
    rows were read)."""
    verdicts: dict[int, Verdict] = {}
    in_progress = [j for j in jobs if j.running]
    # Running jobs of each class this host's workers account for (any row of that class), and what the
    # site's job servers run of each class altogether: a job runs at one server, a worker may hold several.
    here: dict[str, int] = {}
    for taken in running.values():
        here[taken.cls] = here.get(taken.cls, 0) + 1
    busy_total: dict[str, int] = {}
    for server in servers:
        view = gearman.get(server)
        for name, st in (view.functions.items() if view is not None and view.reachable else ()):
            if name.startswith(prefix + "-"):
                cls = name[len(prefix) + 1:]
                busy_total[cls] = busy_total.get(cls, 0) + st.running
    for job in in_progress:
        taken = running.get(job.id)
        if taken is not None:
            since = ago(taken.usec, now)
            if taken.waiting:
                verdicts[job.id] = Verdict(job, "waiting", f"on {taken.where()}, waiting for older moves/imports",
                                           [(f"{taken.instance}: started it {since}, then logged that another "
                                             "sensitive job is being executed")])
            else:
                verdicts[job.id] = Verdict(job, "running", f"on {taken.where()}",
                                           [f"{taken.instance}: started it {since}"])
            continue
        function = f"{prefix}-{job.name}"
        evidence, doubts = [], []
        for server in servers:
            view = gearman.get(server)
            if view is None or not view.reachable:
                doubts.append(f"gearmand {server} did not answer ({view.error if view else 'not asked'})")
                continue
            st = view.functions.get(function)
            total, busy = (st.queued, st.running) if st else (0, 0)
            waiting = total - busy
            evidence.append(f"gearmand {server}: {job.name}: {waiting} waiting, {busy} running")
            if waiting > 0:
                doubts.append(f"gearmand {server} holds {waiting} {job.name} job(s) waiting: it may be one")
        unclaimed = busy_total.get(job.name, 0) - here.get(job.name, 0)
        if here.get(job.name):
            evidence.append(f"this host's workers run {here[job.name]} {job.name} job(s): rows "
                            + ", ".join(str(t.job_id) for t in running.values() if t.cls == job.name))
        if unclaimed > 0:
            doubts.append(f"the job servers run {unclaimed} {job.name} job(s) no worker here accounts for "
                          "(another host's workers?)")
        gone = abandoned.get(job.id)
        if gone is not None:
            evidence.append(f"{gone.where()} started it {ago(gone.usec, now)} and that process is gone without "
                            "ending it (killed or crashed)")
        else:
            evidence.append("no worker of this host logged it as running")
        if (job.age_s or 0) < GRACE_S:
            verdicts[job.id] = Verdict(job, "uncertain", "just submitted", evidence)
        elif doubts:
            verdicts[job.id] = Verdict(job, "uncertain", doubts[0], evidence + doubts[1:])
        elif not servers:
            verdicts[job.id] = Verdict(job, "uncertain", "the site names no job server", evidence)
        else:
            verdicts[job.id] = Verdict(job, "stale", "nothing runs it or will: no worker has it, no job server "
                                       "holds it", evidence)
    # A stale move or import blocks every later one (AtoM runs them one at a time, oldest first).
    order = sorted(in_progress, key=lambda j: (j.created_at, j.id))
    for v in verdicts.values():
        if v.state == "stale" and v.job.name in SENSITIVE:
            v.blocking = [j for j in order if j.name in SENSITIVE and j.id != v.job.id
                          and (j.created_at, j.id) > (v.job.created_at, v.job.id)]
    return verdicts
