"""gearmand's admin `status`, sampled every 100 ms: proof that no function loses its workers.

Two ways to run it, one implementation:
- `StatusSampler(server)`: a thread in the test process (a job server the lab network reaches);
- `HostSampler(hosts, host)`: this file run by python3 inside a lab host, for a gearmand that listens on
  that host's loopback only (tests/cli, tests/supervisor). It samples until its stdin closes, then prints
  the samples as JSON. Lab hosts share this machine's kernel and so its CLOCK_MONOTONIC (no time
  namespace): their sample times compare with the test's own `time.monotonic()`.

What a sampling proves, and the checks that make it mean something (`check_window`, `minimum`):
- a function missing from a sample had no worker then: it counts as 0 available, not as "not seen";
- the operation ran inside the window: samples before it began and after it ended, or a restart that
  outlived the sampling could have left a function without workers unseen;
- the probe sees a worker gone when one is: the control is a worker held stopped for a second while
  sampling (every function at all-but-one there). A restart's own gap is no control: a stand-in worker
  is back within about 100 ms, and whether a sample falls inside that gap is chance.
"""
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def admin(server, command, conn=None, timeout=3.0):
    """One admin command over TCP; the lines before the final `.`."""
    own = conn is None
    conn = conn or socket.create_connection(server, timeout=timeout)
    try:
        conn.sendall(command.encode() + b"\n")
        buf = b""
        while not (buf == b".\n" or buf.endswith(b"\n.\n")):
            chunk = conn.recv(65536)
            if not chunk:
                raise OSError("gearmand closed the admin connection")
            buf += chunk
        return buf.decode().splitlines()[:-1]
    finally:
        if own:
            conn.close()


def parse_status(lines):
    """`FUNCTION\\tTOTAL\\tRUNNING\\tAVAILABLE` lines -> {function: (total, running, available)}."""
    out = {}
    for line in lines:
        parts = line.split("\t")
        if len(parts) == 4:
            out[parts[0]] = tuple(int(p) for p in parts[1:])
    return out


class Samples:
    """samples: [(monotonic time, {function: (total, running, available)})]; errors: failed reads."""

    samples: list
    errors: list

    def minimum(self, functions, between: tuple[float, float] | None = None):
        """The lowest available-worker count each function had (missing = 0), over all samples or over those
        taken between two monotonic times."""
        samples = [(t, s) for t, s in self.samples if between is None or between[0] < t < between[1]]
        assert samples, f"no sample taken{'' if between is None else f' between {between[0]:.2f} and {between[1]:.2f}'}"
        return {f: min(s.get(f, (0, 0, 0))[2] for _, s in samples) for f in functions}

    def check_held(self, held: tuple[float, float], expected: dict, what: str) -> None:
        """The control of a sampling: over `held` (from hold_stopped) the lowest available count of each
        function was exactly `expected` ({function: count}), so the probe does see a worker missing."""
        seen = self.minimum(expected, between=held)
        assert seen == expected, f"the probe missed {what}: lowest available {seen}, expected {expected}"

    def check_window(self, began: float, ended: float) -> None:
        """Fail unless samples were taken both before `began` and after `ended` (monotonic times)."""
        before = sum(1 for t, _ in self.samples if t < began)
        after = sum(1 for t, _ in self.samples if t > ended)
        assert before and after, (f"the operation ({began:.2f}..{ended:.2f}) is not inside the sampling window: "
                                  f"{before} samples before it, {after} after it, {len(self.samples)} in all")


def hold_stopped(stop, start, seconds=1.0) -> tuple[float, float]:
    """The control for a sampling: call `stop` (one worker instance stops), keep it stopped `seconds`, then
    call `start`. Returns the monotonic interval over which every sample must show that worker gone: it
    begins 0.2 s after `stop` returned, time enough for gearmand to see the connection close."""
    stop()
    stopped = time.monotonic()
    held = (stopped + 0.2, stopped + 0.2 + seconds)
    time.sleep(0.2 + seconds)
    start()
    return held


def _sample_loop(server, interval, samples, errors, stop: threading.Event):
    conn = None
    while not stop.is_set():
        started = time.monotonic()
        try:
            conn = conn or socket.create_connection(server, timeout=2)
            samples.append((time.monotonic(), parse_status(admin(server, "status", conn))))
        except OSError as exc:
            errors.append(f"{time.monotonic():.2f}: {exc}")
            if conn:
                conn.close()
            conn = None
        stop.wait(max(0.0, interval - (time.monotonic() - started)))
    if conn:
        conn.close()


class StatusSampler(Samples, threading.Thread):
    """Reads gearmand's `status` every `interval` seconds over one admin connection, until stopped."""

    def __init__(self, server, interval=0.1):
        threading.Thread.__init__(self, daemon=True)
        self.server, self.interval = server, interval
        self.samples, self.errors = [], []
        self._stop_event = threading.Event()

    def run(self):
        _sample_loop(self.server, self.interval, self.samples, self.errors, self._stop_event)

    def start(self):
        """Start sampling and return once the first sample is in: an operation begun right after start()
        then always has a sample before it (on a loaded machine the thread's first read came too late for
        check_window)."""
        threading.Thread.start(self)
        deadline = time.monotonic() + 30
        while not self.samples and not self.errors and self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.samples, f"the sampler took no first sample of {self.server}: {self.errors[:1]}"

    def stop(self):
        self._stop_event.set()
        self.join(10)


class HostSampler(Samples):
    """This file run inside lab host `host` against its gearmand (127.0.0.1:4730 by default)."""

    def __init__(self, hosts, host, server=("127.0.0.1", 4730), interval=0.1):
        from labhosts import LAB  # here: on the lab host this file runs alone, without tests/

        self.samples, self.errors = [], []
        hosts.run(host, f"cat > /root/gearman_sampler.py <<'EOF'\n{Path(__file__).read_text()}EOF")
        self.proc = subprocess.Popen(
            [str(LAB), "run", host, "--", "python3", "/root/gearman_sampler.py", server[0],
             str(server[1]), str(interval)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Its first line says it has taken a sample: from then on the window is open.
        first = self.proc.stdout.readline()
        assert first.strip() == "sampling", f"the sampler on {host} did not start: {first}{self.proc.stderr.read()}"

    def stop(self):
        out, err = self.proc.communicate("", timeout=60)
        assert self.proc.returncode == 0, f"the sampler failed ({self.proc.returncode}): {err}"
        data = json.loads(out)
        self.samples = [(t, {f: tuple(v) for f, v in s.items()}) for t, s in data["samples"]]
        self.errors = data["errors"]


def _main(argv):
    """On a lab host: sample gearmand until stdin closes; print "sampling" once the first sample is taken,
    then the samples as one JSON object."""
    server, interval = (argv[0], int(argv[1])), float(argv[2])
    samples, errors, stop = [], [], threading.Event()
    thread = threading.Thread(target=_sample_loop, args=(server, interval, samples, errors, stop), daemon=True)
    thread.start()
    while not samples and not errors and thread.is_alive():
        time.sleep(0.01)
    print("sampling", flush=True)
    sys.stdin.read()
    stop.set()
    thread.join(10)
    print(json.dumps({"samples": samples, "errors": errors}))


if __name__ == "__main__":
    _main(sys.argv[1:])
