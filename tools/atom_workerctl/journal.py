"""The workers' journal through `journalctl -o json` (pystemd cannot read the journal).

One journalctl process reads every selected unit (`-u` once per unit): it merges their entries in time
order itself, and `-f` keeps following a unit by name across its restarts. Each entry is tagged with
its instance: the worker's own lines carry `_SYSTEMD_UNIT`, systemd's lines about the unit ("Started",
"Start request repeated too quickly") carry `UNIT`.
"""

from __future__ import annotations

import json
import time

FIELDS = ("MESSAGE", "PRIORITY", "_SYSTEMD_UNIT", "UNIT", "_PID", "SYSLOG_IDENTIFIER", "MESSAGE_ID",
          "__REALTIME_TIMESTAMP")
JOURNALCTL = "journalctl"


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
        tag = self.instance + (" [systemd]" if self.source == "systemd" else "")
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
