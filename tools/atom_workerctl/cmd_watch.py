"""`atom-workerctl status --watch [SECONDS]`: the queues and the unhealthy instances, refreshed in place.

Each refresh reads the host once, as `status` does. Per function it shows gearmand's queue, running jobs and
available workers, and the queue's trend over the last refreshes (a sparkline and the change since the
oldest one kept); below, only the instances that need someone. On a terminal the view redraws in place
(the alternate screen, as `top` uses, restored on exit); `q` or Ctrl-C quits, any other key refreshes now.
Elsewhere (a pipe, a log) each refresh is printed after the last.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import sys
import time
from collections import deque

from . import cmd_status, model
from .errors import EXIT_OK
from .render import Out
from .snapshot import InstanceView, Snapshot, hostname, take

HISTORY = 30  # refreshes kept for the trend
SPARK = "▁▂▃▄▅▆▇█"


class Trends:
    """The queue of each (server, function) over the last refreshes."""

    def __init__(self, size: int = HISTORY):
        self.size = size
        self.queues: dict[tuple[str, str], deque[int]] = {}

    def add(self, key: tuple[str, str], queued: int) -> deque[int]:
        history = self.queues.setdefault(key, deque(maxlen=self.size))
        history.append(queued)
        return history


def sparkline(values) -> str:
    values = list(values)
    top = max(values) if values else 0
    if top == 0:
        return SPARK[0] * len(values)
    return "".join(SPARK[min(len(SPARK) - 1, round(v * (len(SPARK) - 1) / top))] for v in values)


def change(values) -> str:
    values = list(values)
    delta = values[-1] - values[0] if values else 0
    return f"{delta:+d}" if delta else "="


def unhealthy(snap: Snapshot) -> list[tuple[InstanceView, str]]:
    """Instances that need someone, each with what to run (empty when nothing does)."""
    out = []
    for inst in [*snap.instances.values()]:
        s = inst.state
        short = model.short(s.unit)
        if inst.expected and s.crash_looping():
            # Between two automatic restarts (activating, auto-restart) as well as up again: a reset would
            # give the loop its whole start budget back and hide it; its log says why it fails.
            out.append((inst, f"atom-workerctl logs {short}"))
        elif inst.expected and (not s.active or s.start_limit()[0]):
            out.append((inst, f"atom-workerctl reset {short}"))
        elif inst.expected and inst.registered is False:
            out.append((inst, "atom-workerctl doctor"))
        elif not inst.expected and s.active:
            out.append((inst, "atom-workerctl status"))
    return out


def frame(out: Out, snap: Snapshot, trends: Trends, interval: float) -> None:
    expected = [i for i in snap.instances.values() if i.expected]
    active = sum(i.state.active for i in expected)
    stamp = time.strftime("%H:%M:%S", time.localtime(snap.taken_at))
    out.line(out.paint(f"{hostname()} ({snap.host.manager})", "bold") +
             f"  {len(expected)} instance{'s' if len(expected) != 1 else ''}, {active} active"
             f"  every {interval:g}s  {stamp}  (q quits)")
    span = f"last {trends.size * interval:g}s"
    for sv in snap.sites:
        for server in sv.servers:
            view = snap.gearman.get(server)
            out.line()
            title = f"site {sv.site.name}  gearmand {server}"
            if view is None or not view.reachable:
                out.line(out.paint(title, "bold") + "  " +
                         out.paint(f"UNREACHABLE: {view.error if view else 'not queried'}", "red"))
                continue
            out.line(out.paint(title, "bold"))
            rows, styles = [], []
            for name, job_class, queued, running, avail in sv.function_rows(view):
                history = trends.add((server, name), queued)
                rows.append([job_class, str(queued), str(running), str(avail), sparkline(history),
                             change(history)])
                styles.append(["", "yellow" if queued and not avail else "", "", "red" if not avail else "",
                               "", "red" if len(history) > 1 and history[-1] > history[0] else ""])
            out.table(["JOB", "WAITING", "RUNNING", "WORKERS", f"WAITING ({span})", "CHANGE"], rows, styles,
                      indent="  ")
    bad = unhealthy(snap)
    out.line()
    if not bad:
        out.line(out.paint("every instance active and registered", "green"))
        return
    out.line(out.paint("needs attention", "bold"))
    out.table(["INSTANCE", "STATE", "RESTARTS", "NOTE", "RUN"],
              [[model.short(i.state.unit), cmd_status.state_cell(i)[0],
                f"{i.state.n_restarts}/{i.state.start_limit_burst}" if i.state.start_limit_burst
                else str(i.state.n_restarts),
                cmd_status.note_cell(i)[0] or cmd_status.gearman_cell(i)[0], fix] for i, fix in bad],
              [["", cmd_status.state_cell(i)[1], "", "red", ""] for i, _ in bad], indent="  ")


class Screen:
    """The terminal while watching: alternate screen, no cursor, keys read one at a time; all restored."""

    def __init__(self, stream):
        self.stream = stream
        self.tty = stream.isatty()
        self.keys = sys.stdin if self.tty and sys.stdin.isatty() else None
        self._saved = None

    def __enter__(self) -> Screen:
        if self.tty:
            self.stream.write("\033[?1049h\033[?25l")
            self.stream.flush()
        if self.keys is not None:
            import termios
            import tty

            self._saved = termios.tcgetattr(self.keys)
            tty.setcbreak(self.keys)
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            import termios

            termios.tcsetattr(self.keys, termios.TCSADRAIN, self._saved)
        if self.tty:
            self.stream.write("\033[?25h\033[?1049l")
            self.stream.flush()

    def show(self, text: str) -> None:
        if self.tty:
            # Home, each line cleared to its end, the rest of the screen cleared: no flicker, no leftovers.
            body = "".join(line + "\033[K\n" for line in text.splitlines())
            self.stream.write("\033[H" + body + "\033[J")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def wait(self, seconds: float) -> bool:
        """Sleep until the next refresh; False when the user asked to quit."""
        if self.keys is None:
            time.sleep(seconds)
            return True
        ready, _, _ = select.select([self.keys], [], [], seconds)
        if ready:
            key = os.read(self.keys.fileno(), 1)
            return key not in (b"q", b"Q")
        return True


def run(args, host: model.Host, backend) -> int:
    interval = args.watch
    trends = Trends()
    stream = sys.stdout
    color = Out(stream).color
    with Screen(stream) as screen, contextlib.suppress(KeyboardInterrupt):
        while True:
            snap = take(host, backend, gearman=True, timeout=min(args.gearman_timeout, max(interval, 1.0)))
            buffer = io.StringIO()
            frame(Out(buffer, color=color), snap, trends, interval)
            screen.show(buffer.getvalue())
            if not screen.wait(interval):
                break
    return EXIT_OK
