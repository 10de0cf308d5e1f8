"""A small client for gearmand's administrative text protocol (same port as the job protocol).

`status` -> lines `FUNCTION\\tTOTAL\\tRUNNING\\tAVAILABLE_WORKERS`, then `.`;
`workers` -> lines `FD IP CLIENT-ID : FUNCTION ...`, then `.`. gearmand answers an unknown command with
`ERR ...`. There is no authentication. Every call has a connect and a read timeout, and every failure
is a GearmanError that names the server and says what happened in words.
"""

from __future__ import annotations

import socket
import time

from .atomconfig import format_server, parse_server
from .errors import GearmanError

CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 3.0
MAX_REPLY = 16 * 1024 * 1024


class FunctionStatus:
    __slots__ = ("name", "queued", "running", "available")

    def __init__(self, name: str, queued: int, running: int, available: int):
        self.name, self.queued, self.running, self.available = name, queued, running, available

    def as_dict(self) -> dict:
        return {"function": self.name, "queued": self.queued, "running": self.running,
                "available_workers": self.available}


class WorkerConnection:
    """One line of `workers`: a connection to gearmand and the functions it registered."""

    __slots__ = ("fd", "ip", "client_id", "functions")

    def __init__(self, fd: int, ip: str, client_id: str, functions: tuple[str, ...]):
        self.fd, self.ip, self.client_id, self.functions = fd, ip, client_id, functions

    def as_dict(self) -> dict:
        return {"fd": self.fd, "ip": self.ip, "client_id": self.client_id, "functions": list(self.functions)}


def parse_status(lines: list[str], server: str = "?") -> dict[str, FunctionStatus]:
    out = {}
    for line in lines:
        cols = line.split("\t")
        if len(cols) != 4:
            raise GearmanError(server, f"unexpected line in the answer to `status`: {line[:80]!r}")
        try:
            out[cols[0]] = FunctionStatus(cols[0], int(cols[1]), int(cols[2]), int(cols[3]))
        except ValueError:
            raise GearmanError(server, f"unexpected line in the answer to `status`: {line[:80]!r}") from None
    return out


def parse_workers(lines: list[str], server: str = "?") -> list[WorkerConnection]:
    out = []
    for line in lines:
        head, sep, funcs = line.partition(" :")
        parts = head.split()
        if not sep or len(parts) != 3 or not parts[0].isdigit():
            raise GearmanError(server, f"unexpected line in the answer to `workers`: {line[:80]!r}")
        out.append(WorkerConnection(int(parts[0]), parts[1], parts[2], tuple(funcs.split())))
    return out


class GearmanAdmin:
    """One admin connection to one gearmand; use as a context manager."""

    def __init__(self, server: str, connect_timeout: float = CONNECT_TIMEOUT, read_timeout: float = READ_TIMEOUT):
        try:
            self.host, self.port = parse_server(server)
        except ValueError:
            raise GearmanError(server, "not host:port") from None
        self.server = format_server(self.host, self.port)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.sock: socket.socket | None = None
        self._buf = b""
        self.local_ip: str | None = None

    def __enter__(self) -> GearmanAdmin:
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def connect(self) -> None:
        try:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except TimeoutError:
            raise GearmanError(self.server, f"no answer to connect within {self.connect_timeout:g} s "
                                            "(host down, or a firewall drops the packets)") from None
        except ConnectionRefusedError:
            raise GearmanError(self.server, "connection refused (gearmand not running or not listening "
                                            "on that address)") from None
        except socket.gaierror as exc:
            raise GearmanError(self.server, f"cannot resolve {self.host}: {exc.strerror}") from None
        except OSError as exc:
            raise GearmanError(self.server, exc.strerror or str(exc)) from None
        self.sock.settimeout(self.read_timeout)
        self.local_ip = self.sock.getsockname()[0]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _readline(self, command: str, deadline: float) -> str:
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GearmanError(self.server, f"no complete answer to `{command}` within {self.read_timeout:g} s")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise GearmanError(self.server, f"no complete answer to `{command}` within "
                                                f"{self.read_timeout:g} s") from None
            except OSError as exc:
                raise GearmanError(self.server, f"reading the answer to `{command}`: "
                                                f"{exc.strerror or exc}") from None
            if not chunk:
                raise GearmanError(self.server, f"closed the connection while answering `{command}`")
            self._buf += chunk
            if len(self._buf) > MAX_REPLY:
                raise GearmanError(self.server, f"answer to `{command}` too long")
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode("utf-8", "replace").rstrip("\r")

    def _send(self, command: str) -> None:
        if self.sock is None:
            self.connect()
        try:
            self.sock.sendall(command.encode() + b"\n")
        except OSError as exc:
            raise GearmanError(self.server, f"sending `{command}`: {exc.strerror or exc}") from None

    def listing(self, command: str) -> list[str]:
        """A command answered by lines ending with `.` (status, workers, show jobs)."""
        self._send(command)
        deadline = time.monotonic() + self.read_timeout
        lines = []
        while True:
            line = self._readline(command, deadline)
            if line == ".":
                return lines
            if not lines and line.startswith("ERR "):
                raise GearmanError(self.server, f"refused `{command}`: {line[4:]}")
            lines.append(line)

    def line(self, command: str) -> str:
        """A command answered by one line (version, getpid, maxqueue)."""
        self._send(command)
        line = self._readline(command, time.monotonic() + self.read_timeout)
        if line.startswith("ERR "):
            raise GearmanError(self.server, f"refused `{command}`: {line[4:]}")
        return line

    def status(self) -> dict[str, FunctionStatus]:
        return parse_status(self.listing("status"), self.server)

    def workers(self) -> list[WorkerConnection]:
        return parse_workers(self.listing("workers"), self.server)


class ServerView:
    """What one gearmand said (or why it said nothing)."""

    __slots__ = ("server", "error", "functions", "workers", "local_ip", "elapsed")

    def __init__(self, server: str):
        self.server = server
        self.error: str | None = None
        self.functions: dict[str, FunctionStatus] = {}
        self.workers: list[WorkerConnection] = []
        self.local_ip: str | None = None
        self.elapsed = 0.0

    @property
    def reachable(self) -> bool:
        return self.error is None

    def local_workers(self) -> list[WorkerConnection]:
        """Connections from this host (the address gearmand sees us at) that registered functions."""
        return [w for w in self.workers if w.functions and w.ip == self.local_ip]


def query(server: str, connect_timeout: float = CONNECT_TIMEOUT, read_timeout: float = READ_TIMEOUT) -> ServerView:
    """`status` and `workers` of one server; errors are recorded, not raised."""
    view = ServerView(server)
    started = time.monotonic()
    try:
        with GearmanAdmin(server, connect_timeout, read_timeout) as admin:
            view.server = admin.server
            view.local_ip = admin.local_ip
            view.functions = admin.status()
            view.workers = admin.workers()
    except GearmanError as exc:
        view.error = exc.reason
    view.elapsed = time.monotonic() - started
    return view


def query_all(servers: list[str], **kw) -> dict[str, ServerView]:
    """Query several servers at once (threads: one slow server costs its timeout, not the sum)."""
    if len(servers) <= 1:
        return {s: query(s, **kw) for s in servers}
    import threading

    views: dict[str, ServerView] = {}

    def one(s: str) -> None:
        views[s] = query(s, **kw)

    threads = [threading.Thread(target=one, args=(s,), daemon=True) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {s: views[s] for s in servers}
