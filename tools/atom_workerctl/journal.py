"""The workers' journal through `journalctl -o json` (pystemd cannot read the journal); on supervisord and
circus hosts, their log files (the second half of this module).

One journalctl process reads every selected unit (`-u` once per unit): it merges their entries in time
order itself, and `-f` keeps following a unit by name across its restarts. Each entry is tagged with
its instance: the worker's own lines carry `_SYSTEMD_UNIT`, systemd's lines about the unit ("Started",
"Start request repeated too quickly") carry `UNIT`.
"""

from __future__ import annotations

import json
import os
import re
import time

FIELDS = ("MESSAGE", "PRIORITY", "_SYSTEMD_UNIT", "UNIT", "_PID", "SYSLOG_IDENTIFIER", "MESSAGE_ID",
          "__REALTIME_TIMESTAMP")
JOURNALCTL = "journalctl"

# systemd's catalog ids of its own lines about a unit's jobs (sd-messages.h): "Started X.", "Failed to start
# X." (a start job that failed: the start limiter refused the start), "Stopping X...", "Stopped X." (a stop
# job, or the stop half of a restart).
UNIT_STARTED = "39f53479d3a045ac8e11786248231fbf"
UNIT_FAILED = "be02cf6855d2428ba40df7e9d022f03d"
UNIT_STOPPING = "de5b426a63be47a7b6ac3eaac82e2f6f"
UNIT_STOPPED = "9d1aaa27d60140bd96365438aad20286"
JOB_LINES = (UNIT_STARTED, UNIT_FAILED, UNIT_STOPPING, UNIT_STOPPED)


def last_job_line(entries) -> str | None:
    """The catalog id of systemd's last line about a job on the unit, among these entries (None: none)."""
    for entry in reversed(entries or []):
        if entry.source == "systemd" and entry.message_id in JOB_LINES:
            return entry.message_id
    return None


def stopped_on_purpose(entries) -> bool:
    """systemd's last job on the unit was a stop. A deliberate stop that ends uncleanly (the worker killed by
    its stop signal, or at TimeoutStopSec) leaves the unit failed with the Result a crash leaves: only this
    tells it from a crash loop the start limiter ended."""
    return last_job_line(entries) in (UNIT_STOPPING, UNIT_STOPPED)


class Entry:
    __slots__ = ("usec", "unit", "pid", "priority", "source", "message", "message_id")

    def __init__(self, usec: int, unit: str, pid: int | None, priority: int | None, source: str, message: str,
                 message_id: str | None = None):
        self.usec, self.unit, self.pid, self.priority = usec, unit, pid, priority
        self.source, self.message, self.message_id = source, message, message_id

    @property
    def instance(self) -> str:
        return self.unit.removesuffix(".service")

    def as_dict(self) -> dict:
        t = time.gmtime(self.usec // 1_000_000)
        return {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{self.usec % 1_000_000:06d}Z",
            "usec": self.usec,
            "unit": self.unit,
            "instance": self.instance,
            "source": self.source,
            "pid": self.pid,
            "priority": self.priority,
            "message": self.message,
        }

    def human(self) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.usec / 1e6))
        tag = self.instance + {"systemd": " [systemd]", "supervisor": " [policy]", "circus": " [policy]"}.get(
            self.source, "")
        return f"{stamp} {tag}: {self.message}"


def _text(value) -> str:
    if isinstance(value, list):  # journalctl's JSON gives non-UTF-8 data as an array of bytes
        try:
            return bytes(value).decode("utf-8", "replace")
        except (ValueError, TypeError):
            return str(value)
    if value is None:
        return ""
    return str(value)


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def parse_line(line: str | bytes, units: set[str] | None = None) -> Entry | None:
    """One line of `journalctl -o json`; None for a line that is not an entry of the given units."""
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    own = _text(data.get("_SYSTEMD_UNIT"))
    about = _text(data.get("UNIT"))
    if own and (own in units if units is not None else own.startswith("atom-worker")):
        unit, source = own, "worker"
    elif about and (about in units if units is not None else True):
        unit, source = about, "systemd"
    else:
        return None
    usec = _int(data.get("__REALTIME_TIMESTAMP")) or 0
    return Entry(usec, unit, _int(data.get("_PID")), _int(data.get("PRIORITY")), source,
                 _text(data.get("MESSAGE")).rstrip("\n"), _text(data.get("MESSAGE_ID")) or None)


def command(units: list[str], lines: int | None = None, since: str | None = None, follow: bool = False,
            until: str | None = None) -> list[str]:
    cmd = [JOURNALCTL, "-o", "json", "--no-pager", "--output-fields=" + ",".join(FIELDS)]
    if lines is not None:
        cmd += ["-n", str(lines)]
    if since:
        cmd += ["--since", since]
    if until:
        cmd += ["--until", until]
    if follow:
        cmd.append("-f")
    for unit in units:
        cmd += ["-u", unit]
    return cmd


def read(units: list[str], **kw) -> list[Entry]:
    """Entries of units (not following), oldest first."""
    import subprocess

    from .errors import WorkerctlError

    try:
        proc = subprocess.run(command(units, **kw), capture_output=True, timeout=60, check=False)
    except FileNotFoundError:
        raise WorkerctlError("journalctl not found: reading logs needs systemd's journal") from None
    except subprocess.TimeoutExpired:
        raise WorkerctlError("journalctl did not finish within 60 s") from None
    if proc.returncode != 0:
        msg = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise WorkerctlError(f"journalctl failed: {msg[-1] if msg else 'exit ' + str(proc.returncode)}")
    wanted = set(units)
    out = [e for e in (parse_line(raw, wanted) for raw in proc.stdout.splitlines()) if e is not None]
    out.sort(key=lambda e: e.usec)
    return out


# -- supervisord and circus hosts: the workers' log files -------------------------------------------------------
# supervisord writes each process's stdout and stderr (redirect_stderr=true) to <log_dir>/<process>.log
# (`atom-worker@1.log`), rotated to `.1`, `.2`... (higher is older), and the atom-worker-policy listener
# logs its decisions about each process to <log_dir>/atom-worker-policy.log. circusd writes the same files
# (one watcher per instance, stdout and stderr into one file, rotated by circus's FileStream the same way,
# no time stamp of its own), and the same policy engine in its hooks writes the same policy log. These files
# stand in for the journal: the worker's lines are entries of source "worker", the policy's lines about a
# process are entries of source "supervisor" or "circus" (the manager's: the counterpart of systemd's own
# lines about a unit).
#
# Time. AtoM's worker prints `YYYY-MM-DD HH:MM:SS > message` (PHP's date(), the server's time zone) and
# the listener `YYYY-MM-DD HH:MM:SS atom-worker-policy[PID]: ...`; both are read as local time. A line
# without a time stamp (a PHP warning, a stack trace) takes the time of the line before it in the same
# file (or the next stamped line, at the start of a file; the file's mtime when no line has one). Lines
# are merged in time order across instances, stably: within one second, each file keeps its own order.

# (json imports re already: no start-up cost)
_STAMP = re.compile(r"^(\d{4})-(\d\d)-(\d\d)[ T](\d\d):(\d\d):(\d\d)(?:[.,](\d{1,6}))?(?: > | )?")


def _stamp(line: str) -> tuple[int | None, str]:
    """(usec or None, the message without its time stamp)."""
    m = _STAMP.match(line)
    if not m:
        return None, line
    y, mo, d, h, mi, s = (int(x) for x in m.groups()[:6])
    frac = m.group(7) or ""
    try:
        seconds = time.mktime((y, mo, d, h, mi, s, 0, 0, -1))
    except (OverflowError, ValueError):
        return None, line
    return int(seconds) * 1_000_000 + int(frac.ljust(6, "0") or 0), line[m.end():]


POLICY_LOG = "atom-worker-policy.log"


class LogSource:
    """One instance's log file (and its rotations), or the policy listener's log filtered for instances."""

    def __init__(self, path: str, unit: str | None, namespecs: dict[str, str] | None = None,
                 source: str = "supervisor"):
        self.path = path
        self.unit = unit                  # the instance (a worker log), or None (the policy log)
        self.namespecs = namespecs or {}  # policy log: group:process -> unit
        self.source = source              # policy log: the entries' source (the manager's name)
        self.last_usec = 0
        self.fh = None
        self.inode = None
        self.buffer = b""

    def files(self) -> list[str]:
        """Oldest first: path.N ... path.1, path."""
        import glob as _glob

        rotated = []
        for p in _glob.glob(_glob.escape(self.path) + ".*"):
            tail = p[len(self.path) + 1:]
            if tail.isdigit():
                rotated.append((int(tail), p))
        return [p for _, p in sorted(rotated, reverse=True)] + [self.path]

    def entries(self, raw_lines: list[bytes], mtime: float | None = None, now: bool = False) -> list[Entry]:
        """Entries of these lines (oldest first), timestamps filled in as the module says."""
        parsed = []
        for raw in raw_lines:
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not text.strip():
                continue
            usec, message = _stamp(text)
            parsed.append([usec, message])
        # Lines before the first stamp take the first stamp's time (or the last known one).
        fill = self.last_usec or next((u for u, _ in parsed if u is not None), None)
        if fill is None:
            fill = int((time.time() if now or mtime is None else mtime) * 1_000_000)
        out = []
        for stamp, message in parsed:
            fill = fill if stamp is None else stamp
            entry = self._entry(fill, message)
            if entry is not None:
                out.append(entry)
        self.last_usec = fill
        return out

    def _entry(self, usec: int, message: str) -> Entry | None:
        if self.unit is not None:
            return Entry(usec, self.unit, None, None, "worker", message)
        # atom-worker-policy[PID]: group:process: what it did
        head, sep, rest = message.partition(": ")
        if not sep or not head.startswith("atom-worker-policy["):
            return None
        namespec, sep, what = rest.partition(": ")
        unit = self.namespecs.get(namespec)
        if unit is None or not sep:
            return None
        pid = _int(head[len("atom-worker-policy["):].rstrip("]"))
        return Entry(usec, unit, pid, None, self.source, what)

    def read_all(self, since_usec: int | None = None) -> list[Entry]:
        out: list[Entry] = []
        for path in self.files():
            try:
                st = os.stat(path)
            except OSError:
                continue
            if since_usec is not None and st.st_mtime * 1_000_000 < since_usec and path != self.path:
                continue  # an older rotation written to last before --since
            with open(path, "rb") as fh:
                out += self.entries(fh.readlines(), st.st_mtime)
        return out

    def tail(self, n: int) -> list[Entry]:
        """The last n entries, from the current file and, if it has fewer, its rotations."""
        collected: list[list[bytes]] = []
        count = 0
        for path in reversed(self.files()):
            try:
                lines = _tail_lines(path, n - count if self.unit is not None else max(n * 20, 2000))
            except OSError:
                continue
            collected.insert(0, lines)
            count += len(lines)
            if count >= n and self.unit is not None:
                break
        out: list[Entry] = []
        for lines in collected:
            out += self.entries(lines)
        return out[-n:] if n else []

    # -- following ------------------------------------------------------------------------------------------
    def start_following(self) -> None:
        """From the current end of the file (what was printed before came from tail()/read_all())."""
        try:
            self.fh = open(self.path, "rb")  # noqa: SIM115 - kept open while following
            self.fh.seek(0, os.SEEK_END)
            self.inode = os.fstat(self.fh.fileno()).st_ino
        except OSError:
            self.fh = None

    def poll(self) -> list[Entry]:
        """New complete lines; across rotation (a new inode: finish the old file, then read the new one
        from its start) and truncation."""
        lines: list[bytes] = []
        if self.fh is not None:
            lines += self._read_lines()
        try:
            st = os.stat(self.path)
        except OSError:
            st = None
        if st is not None and (self.fh is None or st.st_ino != self.inode or st.st_size < self.fh.tell()):
            if self.fh is not None:
                self.fh.close()
            try:
                self.fh = open(self.path, "rb")  # noqa: SIM115
                self.inode = os.fstat(self.fh.fileno()).st_ino
                self.buffer = b""
                lines += self._read_lines()
            except OSError:
                self.fh = None
        return self.entries(lines, now=True) if lines else []

    def _read_lines(self) -> list[bytes]:
        data = self.buffer + self.fh.read()
        if not data:
            return []
        parts = data.split(b"\n")
        self.buffer = parts.pop()
        return [p + b"\n" for p in parts]

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def _tail_lines(path: str, n: int) -> list[bytes]:
    """The last n lines of a file, reading backwards in blocks (log files are up to tens of MB)."""
    if n <= 0:
        return []
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        end = fh.tell()
        block = 65536
        data = b""
        pos = end
        while pos > 0 and data.count(b"\n") <= n:
            step = min(block, pos)
            pos -= step
            fh.seek(pos)
            data = fh.read(step) + data
        lines = data.splitlines(keepends=True)
        if pos > 0:
            lines = lines[1:]  # the first one is cut
        return lines[-n:]


def file_sources(log_dir: str, units: list[str], namespecs: dict[str, str],
                 source: str = "supervisor") -> list[LogSource]:
    """One source per instance (<log_dir>/<instance>.log) and the policy's log (its entries of `source`)."""
    sources = [LogSource(os.path.join(log_dir, unit.removesuffix(".service") + ".log"), unit) for unit in units]
    sources.append(LogSource(os.path.join(log_dir, POLICY_LOG), None, namespecs, source))
    return sources


def read_files(log_dir: str, units: list[str], namespecs: dict[str, str], lines: int | None = None,
               since: str | None = None, until: str | None = None, source: str = "supervisor") -> list[Entry]:
    """Entries of the instances' log files, merged in time order (oldest first), as journalctl -n/--since."""
    since_usec = parse_time(since) if since else None
    until_usec = parse_time(until) if until else None
    out: list[Entry] = []
    for src in file_sources(log_dir, units, namespecs, source):
        if since_usec is not None or lines is None:
            out += src.read_all(since_usec)
        else:
            out += src.tail(lines)
    out.sort(key=lambda e: e.usec)  # stable: each file keeps its order within a time stamp
    if since_usec is not None:
        out = [e for e in out if e.usec >= since_usec]
    if until_usec is not None:
        out = [e for e in out if e.usec <= until_usec]
    if lines is not None:
        out = out[-lines:] if lines else []
    return out


def parse_time(text: str, now: float | None = None) -> int:
    """journalctl's --since/--until forms: `YYYY-MM-DD [HH:MM[:SS]]`, `HH:MM[:SS]` (today), `today`,
    `yesterday`, `now`, `N UNIT ago`, `-N UNIT`/`+N UNIT` (s, min, h, d, w), `@EPOCH`. Microseconds."""
    from .errors import WorkerctlError

    now = time.time() if now is None else now
    t = text.strip().lower()
    lt = time.localtime(now)
    midnight = time.mktime((lt.tm_year, lt.tm_mon, lt.tm_mday, 0, 0, 0, 0, 0, -1))
    units = {"s": 1, "sec": 1, "second": 1, "seconds": 1, "secs": 1, "m": 60, "min": 60, "mins": 60,
             "minute": 60, "minutes": 60, "h": 3600, "hour": 3600, "hours": 3600, "d": 86400, "day": 86400,
             "days": 86400, "w": 604800, "week": 604800, "weeks": 604800}
    fixed = {"now": now, "today": midnight, "yesterday": midnight - 86400, "tomorrow": midnight + 86400}
    if t in fixed:
        return int(fixed[t] * 1_000_000)
    if t.startswith("@") and t[1:].replace(".", "", 1).isdigit():
        return int(float(t[1:]) * 1_000_000)
    m = re.fullmatch(r"(?:([+-])\s*)?(\d+(?:\.\d+)?)\s*([a-z]+)(\s+ago)?", t)
    if m and m.group(3) in units and (m.group(1) or m.group(4)):
        delta = float(m.group(2)) * units[m.group(3)]
        return int((now + delta if m.group(1) == "+" else now - delta) * 1_000_000)
    m = re.fullmatch(r"(?:(\d{4})-(\d\d)-(\d\d))?\s*(?:(\d\d?):(\d\d)(?::(\d\d))?)?", t)
    if m and t and (m.group(1) or m.group(4)):
        y, mo, d = (int(m.group(i)) for i in (1, 2, 3)) if m.group(1) else (lt.tm_year, lt.tm_mon, lt.tm_mday)
        h, mi, s = (int(m.group(i) or 0) for i in (4, 5, 6))
        try:
            return int(time.mktime((y, mo, d, h, mi, s, 0, 0, -1)) * 1_000_000)
        except (OverflowError, ValueError):
            pass
    raise WorkerctlError(f"cannot parse the time {text!r} (e.g. '2026-05-01 10:00', '10:00', '1 hour ago', "
                         "'-30min', 'today', 'yesterday')", exit_code=2)
