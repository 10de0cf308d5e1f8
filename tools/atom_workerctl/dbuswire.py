"""Reading systemd over D-Bus in pure Python, many calls in flight at once.

Why not pystemd for reads: pystemd calls one method at a time (sd_bus_call waits for each answer), so
`status` paid a full round trip for each of ~7 properties of every instance, and importing pystemd.dbuslib
costs ~14 ms (it imports pprint, hence dataclasses, inspect and ast). Here a batch of calls is written at
once and the answers read as they come: two round trips for a whole host (the unit listing, then every
property of every unit), and the standard library only (_socket, struct). pystemd still does every call
that changes something (systemd.py opens it on the first such call).

The wire format is D-Bus's (dbus-specification, "Message Protocol"): little-endian messages out, either
byte order in. Only what reading systemd needs: method calls with string, object path, uint32, boolean and
string-array arguments; any reply's body. Where the connection goes:
- as root, systemd's private socket /run/systemd/private (as systemctl does): straight to systemd, no bus
  daemon in between and no Hello;
- otherwise (or when that socket refuses), the system bus ($DBUS_SYSTEM_BUS_ADDRESS when it is a plain
  unix:path=, else /run/dbus/system_bus_socket), which a non-root user may read unit properties through.
Authentication is EXTERNAL (the kernel tells the peer our uid).
"""

from __future__ import annotations

# The C socket object alone: socket.py costs ~1.6 ms of every start-up (it imports selectors and builds four
# IntEnums), and this reader needs none of what it adds (a unix stream: connect, sendall, recv, close).
import _socket
import os
import struct
import time

PRIVATE_SOCKET = "/run/systemd/private"
SYSTEM_BUS_SOCKET = "/run/dbus/system_bus_socket"
TIMEOUT = 25.0            # seconds for one batch's answers (sd-bus's default method call timeout)
BATCH = 256               # calls written before their answers are read (keeps every socket buffer small)
# Through the bus daemon: dbus-daemon refuses a connection's calls beyond 128 awaiting a reply
# (max_replies_per_connection) with LimitsExceeded, so stay well under it there.
BUS_BATCH = 100
MAX_MESSAGE = 128 << 20   # the specification's limit on one message

METHOD_CALL, METHOD_RETURN, ERROR = 1, 2, 3
DISCONNECTED = "org.freedesktop.DBus.Error.Disconnected"
INVALID = "org.freedesktop.DBus.Error.InvalidMessage"
LIMITS = "org.freedesktop.DBus.Error.LimitsExceeded"
TIMED_OUT = "org.freedesktop.DBus.Error.Timeout"
_ALIGN = {"y": 1, "b": 4, "n": 2, "q": 2, "i": 4, "u": 4, "x": 8, "t": 8, "d": 8, "h": 4, "s": 4, "o": 4,
          "g": 1, "a": 4, "(": 8, "{": 8, "v": 1}
_FIXED = {"y": ("B", 1), "b": ("I", 4), "n": ("h", 2), "q": ("H", 2), "i": ("i", 4), "u": ("I", 4),
          "x": ("q", 8), "t": ("Q", 8), "d": ("d", 8), "h": ("I", 4)}


class DBusError(Exception):
    """An error reply (name: org.freedesktop.systemd1.NoSuchUnit, ...), or a failed connection (name '')."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name, self.message = name, message


def system_bus_path() -> str:
    address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", "")
    if address.startswith("unix:path=") and "," not in address and ";" not in address:
        return address[len("unix:path="):]
    return SYSTEM_BUS_SOCKET


# -- writing ----------------------------------------------------------------------------------------------------
def _pad(buf: bytearray, n: int) -> None:
    buf += b"\0" * (-len(buf) % n)


def _put(buf: bytearray, code: str, value) -> None:
    if code in ("s", "o"):
        _pad(buf, 4)
        data = value.encode() if isinstance(value, str) else bytes(value)
        buf += struct.pack("<I", len(data)) + data + b"\0"
    elif code == "g":
        data = value.encode()
        buf += bytes((len(data),)) + data + b"\0"
    elif code in ("u", "b"):
        _pad(buf, 4)
        buf += struct.pack("<I", int(value))
    elif code == "as":
        _pad(buf, 4)
        at = len(buf)
        buf += b"\0\0\0\0"
        start = len(buf)
        for item in value:
            _put(buf, "s", item)
        struct.pack_into("<I", buf, at, len(buf) - start)
    else:
        raise ValueError(f"cannot send D-Bus type {code!r}")


def _split(signature: str) -> list[str]:
    """'sas' -> ['s', 'as'] (only the argument types _put writes)."""
    out, i = [], 0
    while i < len(signature):
        n = 2 if signature[i] == "a" else 1
        out.append(signature[i:i + n])
        i += n
    return out


def method_call(serial: int, destination: str | None, path, interface: str, member: str, signature: str,
                args: list) -> bytes:
    body = bytearray()
    for code, value in zip(_split(signature), args, strict=True):
        _put(body, code, value)
    fields = bytearray()
    for code, kind, value in ((1, "o", path), (2, "s", interface), (3, "s", member), (6, "s", destination),
                              (8, "g", signature)):
        if value is None or (code == 8 and not value):
            continue
        _pad(fields, 8)  # each header field is a struct; the fields start at offset 16, itself 8-aligned
        fields += bytes((code, 1, ord(kind), 0))
        _put(fields, kind, value)
    head = bytearray(struct.pack("<cBBBIII", b"l", METHOD_CALL, 0, 1, len(body), serial, len(fields)))
    head += fields
    _pad(head, 8)
    return bytes(head + body)


# -- reading ----------------------------------------------------------------------------------------------------
def _end_of(sig: str, i: int) -> int:
    """The index just past the single complete type that starts at sig[i]."""
    c = sig[i]
    if c == "a":
        return _end_of(sig, i + 1)
    if c in "({":
        close, depth = (")" if c == "(" else "}"), 0
        for j in range(i, len(sig)):
            if sig[j] == c:
                depth += 1
            elif sig[j] == close:
                depth -= 1
                if depth == 0:
                    return j + 1
        raise ValueError(f"unbalanced D-Bus signature {sig!r}")
    return i + 1


def _read(buf, p: int, sig: str, i: int, e: str):
    """One value of type sig[i] at buf[p:] -> (value, next p, next i). Offsets are from the message's start,
    so D-Bus's alignment rules apply to them directly. Strings come back as str, bytes of `y` as int."""
    c = sig[i]
    p += -p % _ALIGN[c]
    fixed = _FIXED.get(c)
    if fixed is not None:
        value = struct.unpack_from(e + fixed[0], buf, p)[0]
        return (bool(value) if c == "b" else value), p + fixed[1], i + 1
    if c in ("s", "o"):
        n = struct.unpack_from(e + "I", buf, p)[0]
        if p + 5 + n > len(buf):
            raise ValueError("a string runs past the end of its message")
        return bytes(buf[p + 4:p + 4 + n]).decode("utf-8", "replace"), p + 5 + n, i + 1
    if c == "g":
        n = buf[p]
        if p + 2 + n > len(buf):
            raise ValueError("a signature runs past the end of its message")
        return bytes(buf[p + 1:p + 1 + n]).decode("ascii", "replace"), p + 2 + n, i + 1
    if c == "v":
        inner, p, _ = _read(buf, p, "g", 0, e)
        value, p, _ = _read(buf, p, inner, 0, e)
        return value, p, i + 1
    if c in "({":
        out, j, end = [], i + 1, _end_of(sig, i) - 1
        while j < end:
            value, p, j = _read(buf, p, sig, j, e)
            out.append(value)
        return tuple(out), p, end + 1
    if c == "a":
        n = struct.unpack_from(e + "I", buf, p)[0]
        p += 4
        item = sig[i + 1]
        p += -p % _ALIGN[item]  # the first element's padding is not counted in the array's length
        stop, end, out = p + n, _end_of(sig, i), []
        if stop > len(buf):
            raise ValueError("an array runs past the end of its message")
        while p < stop:
            value, q, _ = _read(buf, p, sig, i + 1, e)
            if q <= p:  # an element of no bytes (an empty struct): the array would never end
                raise ValueError("an array of empty elements")
            p = q
            out.append(value)
        if item == "{":
            return dict(out), p, end
        return out, p, end
    raise ValueError(f"unknown D-Bus type {c!r} in {sig!r}")


def _body(buf, p: int, sig: str, e: str) -> list:
    out, i = [], 0
    while i < len(sig):
        value, p, i = _read(buf, p, sig, i, e)
        out.append(value)
    return out


class Connection:
    """One connection to systemd; call() one method, batch() many at once. After any failure (no answer in
    time, the peer gone, a message we cannot parse) the connection is closed: the stream may be out of step,
    and the next batch() says DISCONNECTED, which the caller may answer by opening a new one."""

    def __init__(self, timeout: float = TIMEOUT):
        self.timeout = timeout
        self.serial = 0
        self._buf = bytearray()
        self.direct = False
        self.sock: _socket.socket | None = None
        candidates = ([PRIVATE_SOCKET] if os.geteuid() == 0 and os.path.exists(PRIVATE_SOCKET) else [])
        candidates.append(system_bus_path())
        for n, path in enumerate(candidates):
            try:
                self._open(path)
                self.direct = path == PRIVATE_SOCKET
                break
            except DBusError:
                self.close()
                if n == len(candidates) - 1:
                    raise
        if not self.direct:
            try:
                self.call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "Hello", "", [])
            except DBusError:
                self.close()  # not left open until the half-made object is collected
                raise

    @property
    def batch_size(self) -> int:
        """Calls in flight at once: systemd's private socket has no limit of its own; the bus daemon has."""
        return BATCH if self.direct else BUS_BATCH

    def _open(self, path: str) -> None:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        self.sock = sock
        # One deadline for the whole of connecting and authenticating, however the answer is split.
        deadline = time.monotonic() + self.timeout
        sock.settimeout(self.timeout)
        try:
            sock.connect(path)
            uid = str(os.geteuid()).encode().hex().encode()
            # AUTH and BEGIN in one write, then no message before the server's OK: as sd-bus's own clients
            # do. The server takes BEGIN as soon as its OK is written, so our first message reaches it in a
            # read of its own. Sending BEGIN after the OK, the first message could arrive in the same read as
            # BEGIN, and systemd 252 leaves such bytes in its buffer unprocessed until more arrive (a status
            # run waited out its 25 s once in the bench that way).
            sock.sendall(b"\0AUTH EXTERNAL " + uid + b"\r\nBEGIN\r\n")
            line = bytearray()
            while not line.endswith(b"\r\n"):
                _settimeout(sock, deadline)
                chunk = sock.recv(256)
                if not chunk or len(line) > 4096:
                    raise DBusError("", f"{path} closed the connection while authenticating")
                line += chunk
            if not line.startswith(b"OK "):
                raise DBusError("", f"{path} refused us ({bytes(line).strip().decode('ascii', 'replace')})")
        except FileNotFoundError:
            raise DBusError("", f"no such socket: {path}") from None
        except PermissionError:
            raise DBusError("org.freedesktop.DBus.Error.AccessDenied", f"{path}: permission denied") from None
        except TimeoutError:
            raise DBusError(TIMED_OUT, f"{path} did not answer") from None
        except OSError as exc:
            raise DBusError("", f"{path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._buf.clear()  # a part of a message read before a failure must not prefix the next connection's

    def call(self, destination: str | None, path, interface: str, member: str, signature: str, args: list):
        reply = self.batch([(destination, path, interface, member, signature, args)])[0]
        if isinstance(reply, DBusError):
            raise reply
        return reply

    def batch(self, calls: list[tuple]) -> list:
        """Each call (destination, path, interface, member, signature, args) -> its reply's body (a list of
        values) or the DBusError it was answered with, in the calls' order. A call the bus daemon refused
        with LimitsExceeded (too many in flight, ours and whatever else it counts) is sent once more."""
        replies: list = [None] * len(calls)
        size = self.batch_size
        for start in range(0, len(calls), size):
            self._round(calls, range(start, min(start + size, len(calls))), replies)
            again = [k for k in range(start, min(start + size, len(calls)))
                     if isinstance(replies[k], DBusError) and replies[k].name == LIMITS]
            if again:
                self._round(calls, again, replies)
        return replies

    def _round(self, calls: list[tuple], ks, replies: list) -> None:
        """Write calls[k] for each k at once, then file their answers, all within one timeout."""
        if self.sock is None:
            raise DBusError(DISCONNECTED, "the connection to systemd was closed after an earlier failure")
        pending: dict[int, int] = {}
        out = bytearray()
        for k in ks:
            self.serial += 1
            pending[self.serial] = k
            out += method_call(self.serial, *calls[k])
        # One deadline for the whole round: signals (systemd sends a direct connection every one) keep
        # arriving, and a timeout per read would start again with each of them.
        deadline = time.monotonic() + self.timeout
        try:
            self.sock.settimeout(self.timeout)
            self.sock.sendall(out)
            while pending:
                self._receive(pending, replies, deadline)
        except TimeoutError:
            self.close()
            raise DBusError(TIMED_OUT, f"no answer within {self.timeout:g} s") from None
        except OSError as exc:
            self.close()
            raise DBusError(DISCONNECTED, exc.strerror or str(exc)) from None
        except DBusError:
            self.close()
            raise

    def _receive(self, pending: dict[int, int], replies: list, deadline: float) -> None:
        """Read what has come and file every complete reply; other messages (signals) are dropped."""
        _settimeout(self.sock, deadline)
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise DBusError(DISCONNECTED, "systemd closed the connection")
        buf = self._buf
        buf += chunk
        p = 0
        while len(buf) - p >= 16:
            order, version = buf[p], buf[p + 3]
            if order not in (0x6C, 0x42) or version != 1:  # 'l' or 'B'; the protocol's only version
                raise DBusError(INVALID, f"not a D-Bus message (byte order {order:#x}, version {version})")
            e = "<" if order == 0x6C else ">"
            body_len, _serial, fields_len = struct.unpack_from(e + "III", buf, p + 4)
            fields_end = 16 + fields_len
            body_at = fields_end + (-fields_end % 8)
            size = body_at + body_len
            if size > MAX_MESSAGE:
                raise DBusError(LIMITS, "a message over D-Bus's size limit")
            if len(buf) - p < size:
                break
            message = memoryview(buf)[p:p + size]
            try:
                self._file(message, e, fields_end, body_at, pending, replies)
            except (KeyError, IndexError, ValueError, TypeError, struct.error, RecursionError) as exc:
                # (UnicodeDecodeError is a ValueError.) One readable line, never a traceback.
                raise DBusError(INVALID, f"a malformed message from systemd ({exc})") from None
            finally:
                message.release()
            p += size
        del buf[:p]

    def _file(self, m, e: str, fields_end: int, body_at: int, pending: dict, replies: list) -> None:
        kind = m[1]
        if kind not in (METHOD_RETURN, ERROR):
            return
        reply_serial, signature, error_name = None, "", ""
        q = 16
        while q < fields_end:
            q += -q % 8
            code, n = m[q], m[q + 1]
            sig = bytes(m[q + 2:q + 2 + n]).decode("ascii")
            value, q, _ = _read(m, q + 3 + n, sig, 0, e)
            if code == 5:
                reply_serial = value
            elif code == 8:
                signature = value
            elif code == 4:
                error_name = value
        k = pending.pop(reply_serial, None)
        if k is None:
            return
        body = _body(m, body_at, signature, e) if signature else []
        if kind == ERROR:
            text = body[0] if body and isinstance(body[0], str) else error_name
            replies[k] = DBusError(str(error_name), str(text))
        else:
            replies[k] = body


def _settimeout(sock: _socket.socket, deadline: float) -> None:
    """What is left of the deadline as the socket's timeout; TimeoutError once none is."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    sock.settimeout(left)
