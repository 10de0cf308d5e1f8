"""gearmand's admin `status`, sampled every 100 ms in a thread: proof that no function loses its workers."""
import socket
import threading
import time


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


class StatusSampler(threading.Thread):
    """Reads gearmand's `status` every `interval` seconds over one admin connection, until stopped."""

    def __init__(self, server, interval=0.1):
        super().__init__(daemon=True)
        self.server, self.interval = server, interval
        self.samples, self.errors = [], []
        self._stop_event = threading.Event()

    def run(self):
        conn = None
        while not self._stop_event.is_set():
            started = time.monotonic()
            try:
                conn = conn or socket.create_connection(self.server, timeout=2)
                self.samples.append((time.monotonic(), parse_status(admin(self.server, "status", conn))))
            except OSError as exc:
                self.errors.append(f"{time.monotonic():.2f}: {exc}")
                if conn:
                    conn.close()
                conn = None
            self._stop_event.wait(max(0.0, self.interval - (time.monotonic() - started)))
        if conn:
            conn.close()

    def stop(self):
        self._stop_event.set()
        self.join(10)

    def minimum(self, functions):
        """The lowest available-worker count each function had over all samples (missing = 0)."""
        return {f: min(s.get(f, (0, 0, 0))[2] for _, s in self.samples) for f in functions}
