"""Which worker processes hold a TCP connection to which gearmand, from /proc (root needed).

gearmand's `workers` lists each connection's IP but not its port, so it cannot say which instance a
connection belongs to. The kernel can: a process's fds name socket inodes, and /proc/PID/net/tcp{,6}
maps inodes to endpoints. An instance is *connected* to a server when one of its processes has an
ESTABLISHED socket to that server's address and port.
"""

from __future__ import annotations

import os
import socket

ESTABLISHED = "01"


def _hex_addr(text: str) -> tuple[str, int]:
    addr, port = text.split(":")
    raw = bytes.fromhex(addr)
    if len(raw) == 4:
        ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:
        # Four host-order 32-bit words.
        words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        ip = socket.inet_ntop(socket.AF_INET6, words)
        if ip.startswith("::ffff:") and "." in ip:
            ip = ip[7:]
    return ip, int(port, 16)


def tcp_table(pid: int | str = "self") -> dict[int, tuple[str, int, str, int]]:
    """inode -> (local ip, local port, remote ip, remote port) of ESTABLISHED sockets in pid's netns."""
    out = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as fh:
                next(fh, None)
                for line in fh:
                    # Split the state off first: most lines of a busy host are not ESTABLISHED (TIME_WAIT).
                    head = line.split(None, 4)
                    if len(head) < 5 or head[3] != ESTABLISHED:
                        continue
                    cols = line.split()
                    if len(cols) < 10:
                        continue
                    lip, lport = _hex_addr(cols[1])
                    rip, rport = _hex_addr(cols[2])
                    out[int(cols[9])] = (lip, lport, rip, rport)
        except OSError:
            continue
    return out


def socket_inodes(pid: int) -> set[int] | None:
    """Socket inodes of pid's open fds; None when we may not look (not root)."""
    base = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(base)
    except PermissionError:
        return None
    except OSError:
        return set()
    out = set()
    for fd in fds:
        try:
            target = os.readlink(f"{base}/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def resolve(servers: list[str]) -> dict[tuple[str, int], str]:
    """(ip, port) -> server name, for every address each server name resolves to."""
    from .atomconfig import parse_server

    out = {}
    for server in servers:
        try:
            host, port = parse_server(server)
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (ValueError, OSError):
            continue
        for info in infos:
            out[(info[4][0], port)] = server
    return out


class Connections:
    """Connections of processes to gearman servers; `None` results mean "could not look"."""

    def __init__(self, servers: list[str]):
        self.addresses = resolve(servers)
        self._table: dict | None = None

    def of(self, pids: list[int]) -> list[str] | None:
        """The servers these processes are connected to (sorted), or None without permission."""
        if not pids:
            return []
        found = set()
        denied = False
        for pid in pids:
            inodes = socket_inodes(pid)
            if inodes is None:
                denied = True
                continue
            if not inodes:
                continue
            if self._table is None:
                self._table = tcp_table(pid)
            for inode in inodes:
                ends = self._table.get(inode)
                if ends is not None and (ends[2], ends[3]) in self.addresses:
                    found.add(self.addresses[(ends[2], ends[3])])
        if denied and not found:
            return None
        return sorted(found)
