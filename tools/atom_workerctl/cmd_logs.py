"""`atom-workerctl logs`: the journal of the selected instances, merged in time order, tagged by instance."""

from __future__ import annotations

import json
import subprocess
import sys

from . import journal, model
from .errors import EXIT_OK, WorkerctlError


def run(args, host: model.Host, backend) -> int:
    loaded = list(backend.units([], model.UNIT_GLOB)) if backend is not None else []
    sel = model.select(host, args.instances, args.site, args.pool, loaded=loaded)
    units = list(sel.units)
    if not sel.explicit and args.site is None and args.pool is None:
        units += [u for u in loaded if u not in units]
    if not units:
        raise WorkerctlError("no instance selected")
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
