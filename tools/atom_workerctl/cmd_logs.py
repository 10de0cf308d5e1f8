"""`atom-workerctl logs`: the instances' logs, merged in time order and tagged by instance.

systemd hosts: the journal (one journalctl process, journal.py). supervisord and circus hosts: the log files
in sites.json's `supervisor.log_dir` / `circus.log_dir` (`<instance>.log` and its rotations) and the
atom-worker-policy engine's lines about each instance (journal.py's second half); -f follows them across
rotation and restarts by polling.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from . import journal, model
from .errors import EXIT_OK, WorkerctlError

FOLLOW_POLL = 0.25


def _units(args, host: model.Host, backend) -> list[str]:
    loaded = list(backend.units([], model.UNIT_GLOB)) if backend is not None else []
    sel = model.select(host, args.instances, args.site, args.pool, loaded=loaded)
    units = list(sel.units)
    if not sel.explicit and args.site is None and args.pool is None:
        units += [u for u in loaded if u not in units]
    if not units:
        raise WorkerctlError("no instance selected")
    return units


FILE_MANAGERS = ("supervisor", "circus")


def file_settings(host: model.Host) -> tuple[str, str]:
    """(log_dir, the policy lines' source) of a host whose workers log to files (supervisord, circus)."""
    if host.manager == "circus":
        from .circus import settings_of

        return settings_of(host)["log_dir"], "circus"
    from .supervisor import settings_of

    return settings_of(host)["log_dir"], "supervisor"


def run(args, host: model.Host, backend) -> int:
    if host.manager in FILE_MANAGERS:
        return run_files(args, host, backend)
    units = _units(args, host, backend)
    lines = args.lines
    if lines is None and not args.since:
        lines = 10 if args.follow else 50
    cmd = journal.command(units, lines=lines, since=args.since, follow=args.follow, until=args.until)
    wanted = set(units)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise WorkerctlError("journalctl not found: reading logs needs systemd's journal") from None
    out = sys.stdout
    try:
        for raw in proc.stdout:
            entry = journal.parse_line(raw, wanted)
            if entry is None:
                continue
            out.write((json.dumps(entry.as_dict()) if args.json else entry.human()) + "\n")
            if args.follow:
                out.flush()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        return 130
    except BrokenPipeError:  # `| head`
        proc.terminate()
        proc.wait()
        return EXIT_OK
    finally:
        if proc.poll() is None:
            proc.terminate()
    proc.wait()
    err = proc.stderr.read().decode("utf-8", "replace").strip()
    if proc.returncode not in (0, None, -15):
        raise WorkerctlError(f"journalctl failed: {err.splitlines()[-1] if err else 'exit ' + str(proc.returncode)}")
    for line in err.splitlines():
        if line.startswith("Hint:") or "not seeing messages" in line:
            sys.stderr.write("note: " + line + " (run as root to see the workers' lines)\n")
    return EXIT_OK


def read_entries(host: model.Host, backend, units: list[str], lines: int | None = None,
                 since: str | None = None) -> list[journal.Entry]:
    """The instances' log entries, oldest first, not following (doctor's evidence, jobs' ties): the journal,
    or on supervisord and circus hosts the log files and the policy engine's lines."""
    if host.manager in FILE_MANAGERS:
        log_dir, source = file_settings(host)
        return journal.read_files(log_dir, units, namespecs_of(host, units, backend), lines=lines, since=since,
                                  source=source)
    return journal.read(units, lines=lines, since=since)


def namespecs_of(host: model.Host, units: list[str], backend=None) -> dict[str, str]:
    """group:process -> unit (the policy engine names processes so). From the manager when it answers, else
    from the model (the group is the site's target without `.target`)."""
    out = {}
    states = {}
    if backend is not None:
        try:
            states = backend.units(units, "")
        except WorkerctlError:
            states = {}
    for unit in units:
        ns = getattr(states.get(unit), "namespec", "")
        if not ns:
            pool = host.pool_of(unit)
            group = pool.site.target.removesuffix(".target") if pool and pool.site.target else "atom-workers"
            ns = f"{group}:{unit.removesuffix('.service')}"
        out[ns] = unit
    return out


def run_files(args, host: model.Host, backend) -> int:
    units = _units(args, host, backend)
    log_dir, source = file_settings(host)
    lines = args.lines
    if lines is None and not args.since:
        lines = 10 if args.follow else 50
    namespecs = namespecs_of(host, units, backend)
    entries = journal.read_files(log_dir, units, namespecs, lines=lines, since=args.since, until=args.until,
                                 source=source)
    out = sys.stdout

    def write(batch) -> None:
        for entry in batch:
            out.write((json.dumps(entry.as_dict()) if args.json else entry.human()) + "\n")
        out.flush()

    sources = journal.file_sources(log_dir, units, namespecs, source) if args.follow else []
    for src in sources:
        src.start_following()  # before printing: nothing written meanwhile is lost
    try:
        write(entries)
        if not args.follow:
            return EXIT_OK
        while True:
            batch = []
            for src in sources:
                batch += src.poll()
            batch.sort(key=lambda e: e.usec)
            if batch:
                write(batch)
            time.sleep(FOLLOW_POLL)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
    finally:
        for src in sources:
            src.close()
