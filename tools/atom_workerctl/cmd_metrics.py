"""`atom-workerctl metrics`: the host's workers and gearmand's queues in Prometheus' text format.

node_exporter's textfile collector reads the file `--output` writes (the atom_workerctl role's timer runs
this every few seconds). One run reads the host once, through the same snapshot as `status`.

Names follow Prometheus' conventions: the `atom_worker_` namespace, base units (seconds), `_total` for the
one counter. The instance's label is `worker`, not `instance`: Prometheus puts `instance` (the scraped
target) on every series, and a series of ours carrying it would be renamed `exported_instance`.
"""

from __future__ import annotations

import contextlib
import os
import time

from . import atomicfile, model
from .errors import EXIT_OK, WorkerctlError
from .snapshot import InstanceView, Snapshot, take

# name -> (type, help). The order here is the order in the output.
METRICS: dict[str, tuple[str, str]] = {
    "atom_worker_scrape_timestamp_seconds": ("gauge", "Unix time atom-workerctl read the host."),
    "atom_worker_scrape_duration_seconds": ("gauge", "Seconds reading the host took."),
    "atom_worker_instance_expected": ("gauge", "1 if sites.json expects the instance, 0 for a stray one."),
    "atom_worker_instance_active": ("gauge", "1 if the instance is active (running), else 0."),
    "atom_worker_instance_failed": ("gauge", "1 if the instance is in state failed, else 0."),
    "atom_worker_instance_start_limit_hit": (
        "gauge", ("1 if the process manager gave up restarting the instance (start limit hit); "
                 "atom-workerctl reset brings it back.")),
    "atom_worker_instance_restarts_total": (
        "counter", "Automatic restarts of the instance since it was last started or reset on purpose."),
    "atom_worker_instance_registered": (
        "gauge", ("1 if the instance is registered with every reachable gearmand, 0 if not; "
                 "absent when it cannot be told.")),
    "atom_worker_gearmand_up": ("gauge", "1 if the site's gearmand answered its admin protocol, else 0."),
    "atom_worker_function_jobs_queued": (
        "gauge", "Jobs of the function waiting in gearmand's queue (its total minus those running)."),
    "atom_worker_function_jobs_running": ("gauge", "Jobs of the function a worker is running."),
    "atom_worker_function_workers_available": (
        "gauge", "Workers registered with gearmand for the function, from any host."),
    "atom_worker_jobs_database_up": ("gauge", "1 if AtoM's job table of the site could be read, else 0."),
    "atom_worker_jobs_in_progress": ("gauge", "AtoM job rows of the site's database in progress."),
    "atom_worker_jobs_stale": (
        "gauge", ("AtoM job rows in progress that nothing runs or will (atom-workerctl jobs --stale), as far as "
                  "this host can tell.")),
}


class Exposition:
    """Samples grouped by metric name, written with one HELP and TYPE line each."""

    def __init__(self):
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {name: [] for name in METRICS}

    def add(self, name: str, value: float, **labels: str) -> None:
        self.samples[name].append((labels, value))

    def text(self) -> str:
        out = []
        for name, (kind, help_text) in METRICS.items():
            if not self.samples[name]:
                continue
            out.append(f"# HELP {name} {_escape_help(help_text)}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in self.samples[name]:
                out.append(f"{name}{_labels(labels)} {_value(value)}")
        return "\n".join(out) + "\n"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in labels.items())
    return "{" + body + "}"


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _value(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def collect(snap: Snapshot, functions: bool | set[str], started: float, jobs: list | None = None) -> Exposition:
    """`functions`: export gearmand's per-function view for every site, none, or these sites' only.
    `jobs`: the job table's samples (job_samples), or None to leave them out."""
    exp = Exposition()
    exp.add("atom_worker_scrape_timestamp_seconds", round(snap.taken_at, 3))
    for inst in _instances(snap):
        _instance(exp, inst, snap)
    for sv in snap.sites:
        for server in sv.servers:
            view = snap.gearman.get(server)
            up = bool(view and view.reachable)
            exp.add("atom_worker_gearmand_up", int(up), site=sv.site.name, server=server)
            if up and (functions is True or (functions and sv.site.name in functions)):
                _functions(exp, sv, server, view)
    for name, labels, value in jobs or []:
        exp.add(name, value, **labels)
    exp.add("atom_worker_scrape_duration_seconds", round(time.monotonic() - started, 3))
    return exp


def _instances(snap: Snapshot) -> list[InstanceView]:
    """Expected instances pool by pool, then the strays."""
    ordered = [i for sv in snap.sites for pv in sv.pools for i in snap.of_pool(pv.pool)]
    return ordered + [i for i in snap.strays() if i not in ordered]


def _reachable(inst: InstanceView, snap: Snapshot) -> bool:
    return bool(inst.pool and snap.reachable(snap.site_view(inst.pool.site)))


def _instance(exp: Exposition, inst: InstanceView, snap: Snapshot) -> None:
    s = inst.state
    labels = {"site": inst.pool.site.name if inst.pool else "", "pool": inst.pool.name if inst.pool else "",
              "worker": model.short(s.unit)}
    exp.add("atom_worker_instance_expected", int(inst.expected), **labels)
    exp.add("atom_worker_instance_active", int(s.active), **labels)
    exp.add("atom_worker_instance_failed", int(s.active_state == "failed"), **labels)
    exp.add("atom_worker_instance_start_limit_hit", int(s.start_limit()[0]), **labels)
    exp.add("atom_worker_instance_restarts_total", s.n_restarts or 0, **labels)
    # Only where it can be told: an instance that runs, of a pool, with a gearmand answering.
    if inst.expected and s.active and inst.registered is not None and _reachable(inst, snap):
        exp.add("atom_worker_instance_registered", int(inst.registered), **labels)


def _functions(exp: Exposition, sv, server: str, view) -> None:
    for name, job_class, waiting, running, available in sv.function_rows(view):
        labels = {"site": sv.site.name, "server": server, "function": name, "job_class": job_class}
        exp.add("atom_worker_function_jobs_queued", waiting, **labels)
        exp.add("atom_worker_function_jobs_running", running, **labels)
        exp.add("atom_worker_function_workers_available", available, **labels)


def job_samples(host: model.Host, backend, snap: Snapshot) -> list:
    """AtoM's job table per site as (name, labels, value); sites sharing one database show the same rows."""
    from .cmd_jobs import judge_host

    groups, unreadable = judge_host(host, backend, snap)
    out = []
    for g in groups:
        stale = sum(1 for v in g.verdicts.values() if v.state == "stale")
        for site in g.sites:
            out += [("atom_worker_jobs_database_up", {"site": site.name}, 1),
                    ("atom_worker_jobs_in_progress", {"site": site.name}, len(g.in_progress)),
                    ("atom_worker_jobs_stale", {"site": site.name}, stale)]
    out += [("atom_worker_jobs_database_up", {"site": name}, 0) for names, _exc, _db in unreadable for name in names]
    return out


def kept_job_samples(cache: str) -> tuple[float, list] | None:
    """The job table's counts kept beside the output by an earlier run, and their age; None: none kept."""
    import json

    try:
        with open(cache, encoding="utf-8") as f:
            kept = json.load(f)
        return time.time() - kept["at"], [tuple(x) for x in kept["samples"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def keep_job_samples(cache: str, samples: list) -> None:
    import json

    write_atomically(cache, json.dumps({"at": time.time(), "samples": samples}), mode=0o600)


def _remove_leftovers(directory: str, older_than: float = 3600) -> None:
    """Temporary files of readings killed mid-write (a timeout's SIGKILL skips every cleanup)."""
    import glob

    limit = time.time() - older_than
    for path in glob.glob(os.path.join(glob.escape(directory), ".atom-worker-*.tmp")):
        with contextlib.suppress(OSError):
            if os.stat(path).st_mtime < limit:
                os.unlink(path)


def write_atomically(path: str, text: str, mode: int = 0o644) -> None:
    """Readers (node_exporter) see the old file or the new one, never a part."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise WorkerctlError(f"--output: no such directory: {directory}")
    atomicfile.replace(path, text, mode, fsync=True, prefix=".atom-worker-")


def functions_of(host: model.Host, choice: str) -> bool | set[str]:
    """--functions: yes, no, or site names (an unknown one fails in one line, exit 4)."""
    if choice in ("yes", "no"):
        return choice == "yes"
    names = {name.strip() for name in choice.split(",")}
    for name in names:
        host.site(name)
    return names


def _emit(args, text: str) -> int:
    if args.output:
        _remove_leftovers(os.path.dirname(os.path.abspath(args.output)))
        write_atomically(args.output, text)
    else:
        print(text, end="")
    return EXIT_OK


def run(args, host: model.Host, backend) -> int:
    functions = functions_of(host, args.functions)  # bad input fails before anything is asked
    started = time.monotonic()
    snap = take(host, backend, gearman=True, timeout=args.gearman_timeout)
    if args.jobs == "no":
        return _emit(args, collect(snap, functions, started).text())
    if not args.output or args.jobs_every <= 0:
        return _emit(args, collect(snap, functions, started, job_samples(host, backend, snap)).text())
    # The role's timer: the job table is read at most every --jobs-every seconds. Judging a row in progress
    # reads the workers' logs back to when it began (up to a week for the very rows the alert is about): too
    # much every few seconds, and a stale row is news over minutes. When it is due, the instances' and
    # gearmand's series are written first (with the counts kept from the last read), so a slow or killed
    # read of the table never holds them back.
    cache = os.path.join(os.path.dirname(os.path.abspath(args.output)), ".atom-worker-jobs.json")
    kept = kept_job_samples(cache)
    if kept is not None and 0 <= kept[0] < args.jobs_every:
        return _emit(args, collect(snap, functions, started, kept[1]).text())
    _emit(args, collect(snap, functions, started, kept[1] if kept else None).text())
    samples = job_samples(host, backend, snap)
    keep_job_samples(cache, samples)
    _emit(args, collect(snap, functions, started, samples).text())
    return EXIT_OK
