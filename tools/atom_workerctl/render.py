"""Output helpers: tables for humans (colour only on a terminal, never with NO_COLOR), JSON for machines."""

from __future__ import annotations

import os
import sys
import time


class Out:
    def __init__(self, stream=None, color: bool | None = None):
        self.stream = stream or sys.stdout
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.tty = tty
        self.color = tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb" \
            if color is None else color

    def paint(self, text: str, style: str) -> str:
        if not self.color or not style:
            return text
        codes = {"bold": "1", "red": "31", "green": "32", "yellow": "33", "dim": "2", "cyan": "36"}
        return f"\033[{codes[style]}m{text}\033[0m"

    def line(self, text: str = "") -> None:
        self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()

    def table(self, headers: list[str], rows: list[list[str]], styles: list[list[str]] | None = None,
              indent: str = "") -> None:
        """Columns padded to their widest cell; the last column is not padded."""
        widths = [len(h) for h in headers]
        for row in rows:
            for i, cell in enumerate(row):
                widths[i] = max(widths[i], len(cell))
        head = "  ".join(h.ljust(widths[i]) if i < len(headers) - 1 else h for i, h in enumerate(headers))
        self.line(indent + self.paint(head.rstrip(), "bold"))
        for r, row in enumerate(rows):
            cells = []
            for i, cell in enumerate(row):
                padded = cell.ljust(widths[i]) if i < len(row) - 1 else cell
                style = styles[r][i] if styles and styles[r] and i < len(styles[r]) else ""
                cells.append(self.paint(padded, style) if style else padded)
            self.line((indent + "  ".join(cells)).rstrip())


def dump_json(data, stream=None) -> None:
    """Indented for a person at a terminal; one compact line for a program (json's C encoder writes that
    several times faster than the indented form, which is Python code: it grew with every instance)."""
    import json

    stream = stream or sys.stdout
    pretty = stream.isatty() if hasattr(stream, "isatty") else False
    stream.write((json.dumps(data, indent=2) if pretty else json.dumps(data, separators=(",", ":"))) + "\n")


def ago(usec: int, now: float | None = None) -> str:
    if not usec:
        return "-"
    seconds = int((now or time.time()) - usec / 1e6)
    if seconds < 0:
        seconds = 0
    if seconds < 60:
        return f"{seconds}s ago"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}min {seconds}s ago" if minutes < 10 else f"{minutes}min ago"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes}min ago"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h ago"


def iso(usec: int | float) -> str | None:
    """UTC ISO 8601 with seconds, or None for 0 (never)."""
    if not usec:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(usec / 1e6))


def size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return "-"


class Progress:
    """One line that rewrites itself on a terminal; elsewhere a line only when the text changes."""

    def __init__(self, out: Out, enabled: bool = True):
        self.out = out
        self.enabled = enabled
        self.last = ""
        self.shown = False

    def update(self, text: str) -> None:
        if not self.enabled:
            return
        if self.out.tty:
            self.out.stream.write("\r\033[K" + text)
            self.out.flush()
            self.shown = True
        elif text.split(" (")[0] != self.last.split(" (")[0]:
            self.out.line(text)
        self.last = text

    def done(self) -> None:
        if self.enabled and self.out.tty and self.shown:
            self.out.stream.write("\r\033[K")
            self.out.flush()
            self.shown = False
