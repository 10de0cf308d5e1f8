"""doctor: why the job server on this host does not answer, from its unit and its journal.

Debian's `gearman-job-server.service` reads gearmand's options from `/etc/default/gearman-job-server`
(`PARAMS`, which the gearman_job_server role writes). With `--queue-type=libsqlite3`, gearmand opens its
queue file at start; a file that is not an SQLite database (a crash mid-write, a disk fault) makes it exit
at once, again at every restart, until systemd's start limit stops it. The queue is lost either way: the fix
moves the file aside (kept for a post-mortem) so gearmand starts with a new, empty one.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess

UNIT = "gearman-job-server.service"
DEFAULTS = "/etc/default/gearman-job-server"
SQLITE_MAGIC = b"SQLite format 3\x00"


def _journal(lines: int = 6) -> list[str]:
    try:
        proc = subprocess.run(["journalctl", "-u", UNIT, "-n", str(lines), "-o", "cat", "--no-pager", "-q"],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line for line in proc.stdout.splitlines() if line.strip()]


def sqlite_db() -> str | None:
    """The --libsqlite3-db path of gearmand's options, if it uses that queue."""
    try:
        with open(DEFAULTS, encoding="utf-8") as fh:
            text = fh.read().replace("\\\n", " ")
    except OSError:
        return None
    if "libsqlite3" not in text:
        return None
    m = re.search(r"--libsqlite3-db[= ]([^\s\"']+)", text)
    return m.group(1) if m else None


def corrupt(path: str) -> str | None:
    """Why `path` is not a usable SQLite file, or None (missing or empty is fine: gearmand creates it)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if head and head != SQLITE_MAGIC[: len(head)] or 0 < len(head) < len(SQLITE_MAGIC):
        return "is not an SQLite database (its header is not \"SQLite format 3\")"
    return None


def diagnose(backend, host: str, port: int) -> tuple[list[str], list[str]]:
    """(evidence, fix) for gearmand on this host not answering at host:port."""
    from .errors import WorkerctlError

    try:
        state = backend.units([UNIT], "")[UNIT]
    except WorkerctlError as exc:
        return [f"{UNIT}: cannot be read ({exc})"], ["systemctl start gearman-job-server"]
    if state.load_state != "loaded":
        return ([f"{UNIT}: LoadState={state.load_state}: gearmand is not installed on this host"],
                [("by hand: run site.yml again (role gearman_job_server), or point config/gearman.yml at the job "
                 "server")])
    said = _journal()
    evidence = [(f"{UNIT}: {state.active_state} ({state.sub_state}), Result={state.result}, "
                f"NRestarts={state.n_restarts}")] + [f"journal ({UNIT}): {line}" for line in said[-3:]]
    if state.active:
        return evidence, [(f"ss -ltnp 'sport = :{port}'   # gearmand runs: check it listens on {host} "
                          f"(--listen in {DEFAULTS})")]
    start = "systemctl reset-failed gearman-job-server && systemctl start gearman-job-server"
    db = sqlite_db()
    why = corrupt(db) if db else None
    if db and why:
        evidence.append(f"queue file {db} {why}: gearmand exits at start while it is there")
        aside = shlex.quote(db + ".corrupt")
        return evidence, [f"mv {shlex.quote(db)} {aside}   # keeps it for a post-mortem; its queued jobs are lost",
                          start]
    if os.path.exists(DEFAULTS):
        evidence.append(f"gearmand's options: {DEFAULTS}")
    return evidence, [start + "   # reset-failed first: a start limit hit would refuse it",
                      "journalctl -u gearman-job-server -n 30 --no-pager   # if it fails again: why"]
