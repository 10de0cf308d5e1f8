#!/usr/bin/python3
"""The one client for gearmand's administrative text protocol (same port as the job protocol, no auth).

`status` -> lines `FUNCTION\\tTOTAL\\tRUNNING\\tAVAILABLE_WORKERS`, then `.`;
`workers` -> lines `FD IP CLIENT-ID : FUNCTION ...`, then `.`. gearmand answers an unknown command with
`ERR ...`. Every failure is a GearmanError that names the server and says what happened in words.

A peer is not trusted to behave: one connection has ONE deadline (connect and every answer together, so a
peer that trickles a byte at a time cannot hold the caller past it) and a cap on the bytes and lines of
its answers (so a peer that floods cannot grow the caller's memory).

Standard library only, and two ways to run:
- imported as `atom_workerctl.gearman` by atom-workerctl (status, doctor, waits, fleet status);
- as a script on a worker host where atom-workerctl may not be installed: the playbooks ship this very
  file with ansible.builtin.script (playbooks/tasks/files/atom_gearman_check.py is a symlink to it) and
  run it with the host's python3. It reads the host's model (/etc/atom-worker/sites.json) and asks each
  job server for its `workers` from the host itself: the socket's own local address is the one gearmand
  lists this host's workers at, so no inventory address or route needs guessing.

    gearman.py wait [--timeout S]   until every job server lists, from this host, at least as many worker
                                    connections with the sites' functions as the sites have instances;
                                    exit 1 when S seconds (one deadline for the whole wait) run out
    gearman.py coverage             for each function this host's workers register: how many workers
                                    other hosts have for it (0 = restarting this host leaves it without)

  Both print one JSON object (for the playbook to read); exit 0 unless the wait timed out or a job server
  did not answer (coverage); a model file they cannot use is one line on stderr and exit 2.
"""

from __future__ import annotations

# The C socket module, not socket.py: importing that costs ~1.6 ms of every status run (selectors, four
# IntEnums), even in the thread that asks gearmand (it holds the interpreter while systemd's answers wait).
# What it would add here is create_connection, which _connect() below does the same way.
import _socket
import re
import sys
import time

TIMEOUT = 3.0                 # seconds: connect plus every answer on one connection
MAX_REPLY = 8 * 1024 * 1024   # bytes of answers on one connection: `workers` of ~6000 AtoM workers
MAX_LINES = 100_000           # lines of one answer (a flood of short lines costs memory per line)
DEFAULT_PORT = 4730

if __package__:
    from .errors import GearmanError
else:  # run as a script (the playbooks' check): the same error, without the CLI's package around it

    class GearmanError(Exception):
        def __init__(self, server: str, message: str):
            super().__init__(f"gearmand {server}: {message}")
            self.server, self.reason = server, message


def split_server(text: str) -> tuple[str, int]:
    """'host:port', '[v6]:port' or 'host' (port 4730) -> (host, port), as AtoM's Net_Gearman reads them;
    ValueError for anything else. The one parser of a server name: the CLI (AtoM's gearman.yml, --gearman)
    and the playbooks' registration check. A host is an IP address or a DNS name of non-empty labels: `a..b`
    would fail deep inside the resolver, and a leading '-' or a control character must never reach a command
    line or a log line."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad server {text!r}")
        port = rest[1:] if rest else str(DEFAULT_PORT)
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, str(DEFAULT_PORT)
    if not _valid_host(host) or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"bad server {text!r}")
    return host, int(port)


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _valid_host(host: str) -> bool:
    # The ipaddress module only for what may be an address (it costs ~1.5 ms of start-up): a dotted quad
    # inet_pton takes is one for it too; a name with neither ':' nor only digits and dots cannot be one.
    dotted = host.isascii() and host.replace(".", "").isdigit()
    if dotted:
        try:
            _socket.inet_pton(_socket.AF_INET, host)
            return True
        except OSError:
            pass
    if dotted or ":" in host:
        import ipaddress

        try:
            ipaddress.ip_address(host)
            return True
        except ValueError:
            pass
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    return len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


def format_server(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _connect(host, port: int, timeout: float) -> _socket.socket:
    """socket.create_connection's way: each address the name resolves to in turn, the first that accepts;
    else the last address's error (gaierror when the name resolves to none)."""
    error: OSError | None = None
    for family, kind, proto, _canon, address in _socket.getaddrinfo(host, port, 0, _socket.SOCK_STREAM):
        sock = None
        try:  # the socket too: an address of a family this host cannot open (IPv6 off) moves on to the next
            sock = _socket.socket(family, kind | _socket.SOCK_CLOEXEC, proto)
            sock.settimeout(timeout)
            sock.connect(address)
            return sock
        except OSError as exc:
            if sock is not None:
                sock.close()
            error = exc
    raise error or OSError("getaddrinfo returned no address")


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
    """The open connections of `workers`. A connection gearmand is closing is listed with fd -1 (its socket
    is gone, the entry not yet freed: seen in the lab while other hosts' admin connections ended); it is no
    worker, nor one of ours, so it is left out."""
    out = []
    for line in lines:
        head, sep, funcs = line.partition(" :")
        parts = head.split()
        if not sep or len(parts) != 3 or not (parts[0].isdigit() or parts[0] == "-1"):
            raise GearmanError(server, f"unexpected line in the answer to `workers`: {line[:80]!r}")
        if parts[0] != "-1":
            out.append(WorkerConnection(int(parts[0]), parts[1], parts[2], tuple(funcs.split())))
    return out


class GearmanAdmin:
    """One admin connection to one gearmand, with one deadline from connect on; use as a context manager."""

    def __init__(self, server: str, timeout: float = TIMEOUT, max_reply: int = MAX_REPLY,
                 max_lines: int = MAX_LINES, limit: str | None = None):
        try:
            self.host, self.port = split_server(server)
        except ValueError:
            raise GearmanError(server, "not host:port") from None
        self.server = format_server(self.host, self.port)
        self.timeout, self.max_reply, self.max_lines = timeout, max_reply, max_lines
        # The deadline in words, for the errors: a caller that hands over what is left of its own wait says so.
        self.limit = limit or f"within {timeout:g} s"
        self.sock: _socket.socket | None = None
        self.deadline = 0.0
        self.received = 0
        self._buf = bytearray()
        self.local_ip: str | None = None

    def __enter__(self) -> GearmanAdmin:
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def connect(self) -> None:
        self.deadline = time.monotonic() + self.timeout
        try:
            # An ASCII name as bytes: a str makes getaddrinfo import the idna codec (~1 ms of start-up).
            host = self.host.encode() if self.host.isascii() else self.host
            self.sock = _connect(host, self.port, self.timeout)
        except TimeoutError:
            raise GearmanError(self.server, f"no answer to connect {self.limit} "
                                            "(host down, or a firewall drops the packets)") from None
        except ConnectionRefusedError:
            raise GearmanError(self.server, "connection refused (gearmand not running or not listening "
                                            "on that address)") from None
        except _socket.gaierror as exc:
            raise GearmanError(self.server, f"cannot resolve {self.host}: {exc.strerror}") from None
        except UnicodeError:  # `a..b`: the IDNA codec refuses an empty label before any lookup
            raise GearmanError(self.server, f"{self.host} is not a valid host name") from None
        except OSError as exc:
            raise GearmanError(self.server, exc.strerror or str(exc)) from None
        self.local_ip = self.sock.getsockname()[0]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _recv(self, command: str) -> int:
        """One chunk more into the buffer, within the deadline and the byte cap; returns its line ends."""
        remaining = self.deadline - time.monotonic()
        late = f"no complete answer to `{command}` {self.limit}"
        if remaining <= 0:
            raise GearmanError(self.server, late)
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise GearmanError(self.server, late) from None
        except OSError as exc:
            raise GearmanError(self.server, f"reading the answer to `{command}`: {exc.strerror or exc}") from None
        if not chunk:
            raise GearmanError(self.server, f"closed the connection while answering `{command}`")
        self.received += len(chunk)
        if self.received > self.max_reply:
            raise GearmanError(self.server, f"answered `{command}` with more than {self.max_reply} bytes "
                                            "(the cap on a reply); not gearmand, or a broken one")
        self._buf += chunk
        return chunk.count(b"\n")

    def _send(self, command: str) -> None:
        if self.sock is None:
            self.connect()
        self.sock.settimeout(max(self.deadline - time.monotonic(), 0.001))
        try:
            self.sock.sendall(command.encode() + b"\n")
        except OSError as exc:
            raise GearmanError(self.server, f"sending `{command}`: {exc.strerror or exc}") from None

    def _take(self, end: int, skip: int) -> str:
        text = self._buf[:end].decode("utf-8", "replace")
        del self._buf[:end + skip]
        return text

    def listing(self, command: str) -> list[str]:
        """A command answered by lines ending with `.` (status, workers, show jobs)."""
        self._send(command)
        searched, lines = 0, self._buf.count(b"\n")
        while True:
            if self._buf.startswith(b"ERR ") and b"\n" in self._buf:
                line = self._take(self._buf.index(b"\n"), 1).rstrip("\r")
                raise GearmanError(self.server, f"refused `{command}`: {line[4:]}")
            if self._buf.startswith(b".\n"):
                self._take(0, 2)
                return []
            end = self._buf.find(b"\n.\n", max(searched - 2, 0))
            if end >= 0:
                return [line.rstrip("\r") for line in self._take(end, 3).split("\n")]
            searched = len(self._buf)
            if lines > self.max_lines:
                raise GearmanError(self.server, f"answered `{command}` with more than {self.max_lines} lines "
                                                "(the cap on a reply); not gearmand, or a broken one")
            lines += self._recv(command)

    def line(self, command: str) -> str:
        """A command answered by one line (version, getpid, maxqueue)."""
        self._send(command)
        while b"\n" not in self._buf:
            self._recv(command)
        line = self._take(self._buf.index(b"\n"), 1).rstrip("\r")
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


def query(server: str, timeout: float = TIMEOUT) -> ServerView:
    """`status` and `workers` of one server, both within `timeout`; errors are recorded, not raised."""
    view = ServerView(server)
    started = time.monotonic()
    try:
        with GearmanAdmin(server, timeout) as admin:
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


# -- the playbooks' registration check (run as a script on a worker host) -------------------------------------
STATE_FILE = "/etc/atom-worker/sites.json"


def load_model(path: str) -> tuple[dict[str, int], dict[str, set[str]]]:
    """From sites.json: per job server, the instances this host must have registered there and the sites'
    function-name prefixes. ValueError (one line) for a file of another shape."""
    import json

    with open(path, encoding="utf-8") as handle:
        try:
            state = json.load(handle)
        except ValueError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from None
    expected: dict[str, int] = {}
    prefixes: dict[str, set[str]] = {}
    try:
        for site in state["sites"]:
            prefix, servers, pools = site["prefix"], site["gearman_servers"], site["pools"]
            if not (isinstance(prefix, str) and isinstance(servers, list) and isinstance(pools, list)):
                raise TypeError("a site's prefix, gearman_servers or pools")
            instances = sum(int(pool["instances"]) for pool in pools)
            for server in servers:
                expected[str(server)] = expected.get(str(server), 0) + instances
                prefixes.setdefault(str(server), set()).add(prefix + "-")
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"{path}: not the atom_worker role's model ({type(exc).__name__}: {exc})") from None
    return expected, prefixes


def observe(server: str, prefixes: set[str], timeout: float, limit: str | None = None) -> tuple[str, int, dict]:
    """This host's registered worker connections on one server, and every function's workers by host."""
    with GearmanAdmin(server, timeout, limit=limit) as admin:
        local, workers = admin.local_ip, admin.workers()
    mine = 0
    by_function: dict[str, dict[str, int]] = {}  # function -> {"mine": n, "others": n}
    for w in workers:
        ours = [f for f in w.functions if any(f.startswith(p) for p in prefixes)]
        if w.ip == local and ours:
            mine += 1
        for function in ours if w.ip == local else w.functions:
            counts = by_function.setdefault(function, {"mine": 0, "others": 0})
            counts["mine" if w.ip == local else "others"] += 1
    return local, mine, by_function


def _wait(args, expected, prefixes) -> int:
    import json

    deadline = time.monotonic() + args.timeout
    while True:
        report, done = {}, True
        for server, want in sorted(expected.items()):
            # Each question within what is left of the wait (and at most TIMEOUT): the wait ends on time.
            left = deadline - time.monotonic()
            cut = f"before the {args.timeout:g} s wait ended" if left <= TIMEOUT else None
            try:
                if left <= 0:
                    raise GearmanError(server, f"not asked: the {args.timeout:g} s wait was over")
                local, mine, _ = observe(server, prefixes[server], min(TIMEOUT, left), cut)
                report[server] = {"address": local, "registered": mine, "expected": want}
                done = done and mine >= want
            except GearmanError as exc:
                report[server] = {"error": str(exc), "expected": want}
                done = False
        left = deadline - time.monotonic()
        if not done and left > 0:
            time.sleep(min(args.interval, left))
            if time.monotonic() < deadline:
                continue
        # Done, or no time left to ask again: this round's answers are the report (a round now would only say
        # "not asked" of every server and hide why they were not registered).
        print(json.dumps({"registered": done, "servers": report, "timeout": args.timeout}, sort_keys=True))
        return 0 if done else 1


def _coverage(args, expected, prefixes) -> int:
    import json

    report, uncovered, errors = {}, [], []
    for server in sorted(expected):
        try:
            local, mine, by_function = observe(server, prefixes[server], TIMEOUT)
        except GearmanError as exc:
            errors.append(str(exc))
            continue
        functions = {f: c for f, c in by_function.items() if c["mine"] > 0}
        report[server] = {"address": local, "registered": mine, "functions": functions}
        uncovered += [f"{server} {f}" for f, c in sorted(functions.items()) if c["others"] == 0]
    print(json.dumps({"servers": report, "uncovered": uncovered, "errors": errors}, sort_keys=True))
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    import argparse
    import math

    def seconds(text: str) -> float:
        value = float(text)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(text)
        return value

    parser = argparse.ArgumentParser(description="Ask gearmand which of this host's AtoM workers are registered.")
    parser.add_argument("mode", choices=["wait", "coverage"])
    parser.add_argument("--state-file", default=STATE_FILE)
    parser.add_argument("--timeout", type=seconds, default=60.0, help="wait: the whole wait's deadline, seconds")
    parser.add_argument("--interval", type=seconds, default=0.5)
    args = parser.parse_args(argv)
    try:
        expected, prefixes = load_model(args.state_file)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"atom_gearman_check: {exc}\n")
        return 2
    return _wait(args, expected, prefixes) if args.mode == "wait" else _coverage(args, expected, prefixes)


if __name__ == "__main__":
    sys.exit(main())
