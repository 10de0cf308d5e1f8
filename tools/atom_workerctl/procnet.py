"""Which worker processes hold a TCP connection to which gearmand, from /proc (root needed).

gearmand's `workers` lists each connection's IP but not its port, so it cannot say which instance a
connection belongs to. The kernel can: a process's fds name socket inodes, and /proc/PID/net/tcp{,6}
maps inodes to endpoints. An instance is *connected* to a server when one of its processes has an
ESTABLISHED socket to that server's address and port.
"""

from __future__ import annotations

# The C module: what this needs (a netlink socket, inet_ntop, getaddrinfo's addresses) is all there, and
# socket.py would add ~1.6 ms to status's start-up (selectors, four IntEnums).
import _socket
import os
import struct

ESTABLISHED = "01"


def _hex_addr(text: str) -> tuple[str, int]:
    addr, port = text.split(":")
    raw = bytes.fromhex(addr)
    if len(raw) == 4:
        ip = _socket.inet_ntop(_socket.AF_INET, raw[::-1])
    else:
        # Four host-order 32-bit words.
        words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        ip = _socket.inet_ntop(_socket.AF_INET6, words)
        if ip.startswith("::ffff:") and "." in ip:
            ip = ip[7:]
    return ip, int(port, 16)


def tcp_table(pid: int | str = "self", names: tuple[str, ...] = ("tcp", "tcp6")
              ) -> dict[int, tuple[str, int, str, int]]:
    """inode -> (local ip, local port, remote ip, remote port) of ESTABLISHED sockets in pid's netns."""
    out = {}
    for name in names:
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
            # An ASCII name as bytes: a str makes getaddrinfo import the idna codec (~1 ms of start-up).
            infos = _socket.getaddrinfo(host.encode() if host.isascii() else host, port, type=_socket.SOCK_STREAM)
        except (ValueError, OSError):
            continue
        for info in infos:
            out[(info[4][0], port)] = server
    return out


def _netns(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x301
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_DUMP_INTR = 0x10  # the table changed while being dumped: the answer may miss sockets


def diag_table(family: int) -> dict[int, tuple[str, int, str, int]]:
    """tcp_table's answer for one address family of our network namespace, from the kernel's sock_diag
    netlink interface (what `ss` uses): binary, only ESTABLISHED sockets asked for, and no listening table
    walked, so cheaper than /proc/net/tcp{,6}. OSError when the kernel refuses it."""
    sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG)
    try:
        # struct inet_diag_req_v2: family, protocol, ext, pad, states (1 << TCP_ESTABLISHED), a zero sockid.
        req = struct.pack("=BBBBI", family, _socket.IPPROTO_TCP, 0, 0, 1 << 1) + bytes(48)
        sock.sendall(struct.pack("=IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, 1, 0) + req)
        size = 4 if family == _socket.AF_INET else 16
        out = {}
        while True:
            data = sock.recv(1 << 16)
            if not data:
                raise OSError("sock_diag: the dump ended early")
            p = 0
            while p + 16 <= len(data):
                length, kind, flags = struct.unpack_from("=IHH", data, p)
                if flags & _NLM_F_DUMP_INTR:
                    raise OSError("sock_diag: the dump was interrupted")
                if kind == _NLMSG_DONE:
                    # Its payload, when there, is the dump's error code (0, or a negative errno).
                    if length >= 20 and struct.unpack_from("=i", data, p + 16)[0] != 0:
                        raise OSError("sock_diag: the dump ended with an error")
                    return out
                if kind == _NLMSG_ERROR or length < 16 + 72:
                    raise OSError("sock_diag: refused")
                m = p + 16
                # struct inet_diag_msg: family, state, timer, retrans; sockid (sport, dport big-endian, src,
                # dst, interface, cookie); expires, rqueue, wqueue, uid, inode.
                lport, rport = struct.unpack_from(">HH", data, m + 4)
                lip = _ip(family, data[m + 8:m + 8 + size])
                rip = _ip(family, data[m + 24:m + 24 + size])
                out[struct.unpack_from("=I", data, m + 68)[0]] = (lip, lport, rip, rport)
                p += (length + 3) & ~3
    finally:
        sock.close()


def _ip(family: int, raw: bytes) -> str:
    ip = _socket.inet_ntop(family, raw)
    if ip.startswith("::ffff:") and "." in ip:  # as _hex_addr: a v4-mapped address is the v4 one
        ip = ip[7:]
    return ip


def own_table(family: int) -> tuple[str | None, dict]:
    """Our network namespace and its TCP table of one address family. Either way the kernel walks its
    whole hash table of established sockets, sized by the host's memory (milliseconds on a host with much
    of it), so snapshot.py reads it only when some instance needs it. sock_diag, else /proc/net/tcp{,6}."""
    try:
        table = diag_table(family)
    except (OSError, struct.error, ValueError):  # refused, or an answer cut short: /proc says the same
        name = "tcp" if family == _socket.AF_INET else "tcp6"
        table = tcp_table("self", names=(name,))
    return _netns("self"), table


class Connections:
    """Connections of processes to gearman servers; `None` results mean "could not look"."""

    def __init__(self, servers: list[str], own: list[tuple[str | None, dict]] | None = None):
        self.addresses = resolve(servers)
        self._table: dict | None = None
        self._own = own  # own_table()'s answers (both families), used when the processes share our netns
        self._source: int | None = None  # whose /proc/PID/net self._table is from (None: own_table's)
        self._reread = False

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
                own = self._own
                ns = _netns(pid) if own else None
                same = own and ns is not None and all(o[0] == ns for o in own)
                self._table = {k: v for o in own for k, v in o[1].items()} if same else tcp_table(pid)
                self._source = None if same else pid
                self._reread = not same  # read just now, from /proc/PID: nothing to catch up on
            mine = self._servers(inodes)
            if not mine and not self._reread and not inodes <= self._table.keys():
                # The table may have been read for another instance a moment before: a worker that
                # connected since has a socket it does not list. Read it once more (a worker's other
                # sockets, unix ones, are never in it: only when nothing of this process was found).
                self._reread = True
                if self._source is None:
                    for family in (_socket.AF_INET, _socket.AF_INET6):
                        self._table.update(own_table(family)[1])
                else:
                    self._table.update(tcp_table(self._source))
                mine = self._servers(inodes)
            found |= mine
        if denied and not found:
            return None
        return sorted(found)

    def _servers(self, inodes: set[int]) -> set[str]:
        out = set()
        for inode in inodes:
            ends = self._table.get(inode)
            if ends is not None and (ends[2], ends[3]) in self.addresses:
                out.add(self.addresses[(ends[2], ends[3])])
        return out
