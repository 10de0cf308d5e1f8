"""dbuswire, the systemd backend's D-Bus reader, against a stand-in peer on a unix socket: authentication
(AUTH and BEGIN in one write, nothing more before the server's OK),
a batch of calls answered out of order with a signal in between, error replies, either byte order, and a
peer that is not there. The bytes the stand-in answers with are written here by hand (struct), not by
dbuswire, so a reader and a writer that agree on a mistake cannot pass. The real systemd: the lab modules
(test_cli_lab.py) read every instance through it. Local: no lab host needed."""

import os
import select
import socket
import struct
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from atom_workerctl import dbuswire  # noqa: E402


def _pad(buf: bytearray, n: int) -> None:
    buf += b"\0" * (-len(buf) % n)


def _string(e: str, text: str) -> bytes:
    data = text.encode()
    return struct.pack(e + "I", len(data)) + data + b"\0"


def message(e: str, kind: int, serial: int, reply_serial: int | None, signature: str, body: bytes,
            error_name: str | None = None) -> bytes:
    """A whole message in byte order e ('<' or '>'), header fields by hand: REPLY_SERIAL, ERROR_NAME, SIGNATURE."""
    fields = bytearray()
    if reply_serial is not None:
        _pad(fields, 8)
        fields += bytes((5, 1, ord("u"), 0)) + struct.pack(e + "I", reply_serial)
    if error_name is not None:
        _pad(fields, 8)
        fields += bytes((4, 1, ord("s"), 0)) + _string(e, error_name)
    if signature:
        _pad(fields, 8)
        fields += bytes((8, 1, ord("g"), 0, len(signature))) + signature.encode() + b"\0"
    head = bytearray(struct.pack(e + "cBBBIII", b"l" if e == "<" else b"B", kind, 0, 1, len(body), serial,
                                 len(fields)))
    head += fields
    _pad(head, 8)
    return bytes(head + body)


def read_calls(conn: socket.socket, count: int, buf: bytearray) -> list[tuple[int, str, list]]:
    """(serial, member, string arguments) of COUNT little-endian method calls, parsed by hand."""
    calls = []
    while len(calls) < count:
        while len(buf) < 16 or len(buf) < _size(buf):
            buf += conn.recv(65536)
        size = _size(buf)
        m = bytes(buf[:size])
        del buf[:size]
        assert m[0:1] == b"l" and m[1] == 1  # little-endian, METHOD_CALL
        body_len, serial, fields_len = struct.unpack_from("<III", m, 4)
        member, signature, p = None, "", 16
        while p < 16 + fields_len:
            p += -p % 8
            code, n = m[p], m[p + 1]
            sig = m[p + 2:p + 2 + n].decode()
            p += 3 + n
            if sig == "g":
                value = m[p + 1:p + 1 + m[p]].decode()
                p += 2 + m[p]
            else:
                p += -p % 4
                length = struct.unpack_from("<I", m, p)[0]
                value = m[p + 4:p + 4 + length].decode() if sig in "so" else length
                p += 4 + (length + 1 if sig in "so" else 0)
            if code == 3:
                member = value
            elif code == 8:
                signature = value
        body_at = 16 + fields_len + (-(16 + fields_len) % 8)
        args, q = [], body_at
        for code in signature:
            if code == "s":
                q += -q % 4
                length = struct.unpack_from("<I", m, q)[0]
                args.append(m[q + 4:q + 4 + length].decode())
                q += 5 + length
        assert q <= body_at + body_len
        calls.append((serial, member, args))
    return calls


def _size(buf) -> int:
    fields_len = struct.unpack_from("<I", buf, 12)[0]
    end = 16 + fields_len
    return end + (-end % 8) + struct.unpack_from("<I", buf, 4)[0]


class Peer:
    """A unix socket that takes EXTERNAL authentication, then runs SCRIPT(conn, buffer) in a thread."""

    def __init__(self, path: Path, script, auth_reply: bytes = b"OK 0123456789abcdef0123456789abcdef\r\n"):
        self.path = str(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.auth = b""
        self.begin_early = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, args=(script, auth_reply), daemon=True)
        self.thread.start()

    def _serve(self, script, auth_reply: bytes) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                buf = bytearray()
                while b"\r\n" not in buf:
                    buf += conn.recv(4096)
                self.auth = bytes(buf[:buf.index(b"\r\n") + 2])
                del buf[:len(self.auth)]
                # BEGIN came with AUTH, before our answer (as sd-bus's clients send it): nothing else did.
                self.begin_early = bytes(buf) == b"BEGIN\r\n"
                conn.sendall(auth_reply)
                if not auth_reply.startswith(b"OK"):
                    return
                del buf[:7]
                script(conn, buf)
        except BaseException as exc:
            self.error = exc

    def join(self) -> None:
        self.thread.join(10)
        self.listener.close()
        if self.error is not None:
            raise self.error


def test_a_batch_answered_out_of_order_with_a_signal_between(bus):
    """Hello first (the system bus), then three Gets written at once: the answers come in reverse order, a
    signal (NameAcquired) before them, and each reaches its own call; an error reply is a DBusError."""
    seen = {}

    def script(conn, buf):
        (hello_serial, hello, _), = read_calls(conn, 1, buf)
        seen["hello"] = hello
        conn.sendall(message("<", 2, 1, hello_serial, "s", _string("<", ":1.42")))
        calls = read_calls(conn, 3, buf)
        seen["calls"] = calls
        signal = message("<", 4, 2, None, "s", _string("<", ":1.42"))
        # Get(ActiveState) -> variant 's'; Get(NRestarts) -> variant 'u'; the third -> an error reply.
        active = bytes((1,)) + b"s\0" + b"\0" + _string("<", "active")   # sig 's' then pad to 4
        restarts = bytes((1,)) + b"u\0" + b"\0" + struct.pack("<I", 3)
        error = _string("<", "Unit nope.service not loaded.")
        conn.sendall(signal
                     + message("<", 3, 5, calls[2][0], "s", error, "org.freedesktop.systemd1.NoSuchUnit")
                     + message("<", 2, 4, calls[1][0], "v", restarts)
                     + message("<", 2, 3, calls[0][0], "v", active))
        conn.recv(1)  # until the client closes

    peer = Peer(bus, script)
    wire = dbuswire.Connection()
    props = "org.freedesktop.DBus.Properties"
    replies = wire.batch([
        ("org.freedesktop.systemd1", "/org/freedesktop/systemd1/unit/a", props, "Get", "ss",
         ["org.freedesktop.systemd1.Unit", "ActiveState"]),
        ("org.freedesktop.systemd1", "/org/freedesktop/systemd1/unit/a", props, "Get", "ss",
         ["org.freedesktop.systemd1.Service", "NRestarts"]),
        ("org.freedesktop.systemd1", "/org/freedesktop/systemd1/unit/nope", props, "Get", "ss",
         ["org.freedesktop.systemd1.Unit", "ActiveState"]),
    ])
    wire.close()
    peer.join()
    assert peer.auth == b"\0AUTH EXTERNAL " + str(os.geteuid()).encode().hex().encode() + b"\r\n"
    assert peer.begin_early  # and no message before the OK (systemd could leave it unread: dbuswire.py)
    assert seen["hello"] == "Hello"
    assert [c[1:] for c in seen["calls"]] == [
        ("Get", ["org.freedesktop.systemd1.Unit", "ActiveState"]),
        ("Get", ["org.freedesktop.systemd1.Service", "NRestarts"]),
        ("Get", ["org.freedesktop.systemd1.Unit", "ActiveState"])]
    assert replies[0] == ["active"] and replies[1] == [3]
    assert isinstance(replies[2], dbuswire.DBusError)
    assert replies[2].name == "org.freedesktop.systemd1.NoSuchUnit"
    assert replies[2].message == "Unit nope.service not loaded."


def test_a_big_endian_reply_of_structs_and_arrays(bus):
    """ListUnitsByPatterns' a(ssssssouso) and a (aiai) variant in big-endian byte order (a peer may use
    either): strings, an object path, uint32s and the padding between them land where they belong."""
    e = ">"

    def row(name, active, job):
        out = bytearray()
        for text in (name, "desc", "loaded", active, "running", ""):
            _pad(out, 4)
            out += _string(e, text)
        _pad(out, 4)
        out += _string(e, f"/org/freedesktop/systemd1/unit/{name.replace('@', '_40').replace('.', '_2e')}")
        _pad(out, 4)
        out += struct.pack(e + "I", job)
        for text in ("start" if job else "", "/"):
            _pad(out, 4)
            out += _string(e, text)
        return bytes(out)

    def script(conn, buf):
        (hello_serial, _, _), = read_calls(conn, 1, buf)
        conn.sendall(message(e, 2, 1, hello_serial, "s", _string(e, ":1.7")))
        (serial, member, _), (serial2, _, _) = read_calls(conn, 2, buf)
        assert member == "ListUnitsByPatterns"
        # The array: its length, padding to 8 (a struct's alignment; not counted), then 8-aligned rows.
        items = bytearray()
        for name, active, job in (("atom-worker@1.service", "active", 0), ("atom-worker@2.service", "failed", 9)):
            _pad(items, 8)
            items += row(name, active, job)
        body = struct.pack(e + "I", len(items)) + b"\0" * 4 + bytes(items)
        # (aiai) in a variant: signature, then the struct (8-aligned), two int32 arrays.
        prevent = bytearray(bytes((6,)) + b"(aiai)\0")
        _pad(prevent, 8)
        prevent += struct.pack(e + "I", 8) + struct.pack(e + "ii", 1, 6) + struct.pack(e + "I", 4)
        prevent += struct.pack(e + "i", 15)
        conn.sendall(message(e, 2, 2, serial, "a(ssssssouso)", body) + message(e, 2, 3, serial2, "v", bytes(prevent)))
        conn.recv(1)

    peer = Peer(bus, script)
    wire = dbuswire.Connection()
    rows, prevent = wire.batch([
        ("org.freedesktop.systemd1", "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager",
         "ListUnitsByPatterns", "asas", [[], ["atom-worker*@*.service"]]),
        ("org.freedesktop.systemd1", "/org/freedesktop/systemd1/unit/x", "org.freedesktop.DBus.Properties", "Get",
         "ss", ["org.freedesktop.systemd1.Service", "RestartPreventExitStatus"]),
    ])
    wire.close()
    peer.join()
    assert rows[0] == [
        ("atom-worker@1.service", "desc", "loaded", "active", "running", "",
         "/org/freedesktop/systemd1/unit/atom-worker_401_2eservice", 0, "", "/"),
        ("atom-worker@2.service", "desc", "loaded", "failed", "running", "",
         "/org/freedesktop/systemd1/unit/atom-worker_402_2eservice", 9, "start", "/"),
    ]
    assert prevent == [([1, 6], [15])]


def test_a_call_is_written_as_the_specification_says():
    """The writer against hand-made bytes: header fields (path, interface, member, destination, signature),
    8-byte padding before the body, a string array's length not counting its own padding."""
    got = dbuswire.method_call(7, "d.e", "/p", "i.f", "M", "sas", ["ab", ["c", "de"]])
    fields = bytearray()
    for code, kind, text in ((1, "o", "/p"), (2, "s", "i.f"), (3, "s", "M"), (6, "s", "d.e")):
        _pad(fields, 8)
        fields += bytes((code, 1, ord(kind), 0)) + _string("<", text)
    _pad(fields, 8)
    fields += bytes((8, 1, ord("g"), 0, 3)) + b"sas\0"
    body = _string("<", "ab") + b"\0"  # "ab\0" is 7 bytes: pad to 8 for the array's length
    array = _string("<", "c") + b"\0\0" + _string("<", "de")
    body += struct.pack("<I", len(array)) + array
    head = bytearray(struct.pack("<cBBBIII", b"l", 1, 0, 1, len(body), 7, len(fields))) + fields
    _pad(head, 8)
    assert got == bytes(head) + body


def test_no_bus_and_a_refusal_are_clear_errors(bus, tmp_path):
    """No socket at all: DBusError naming the socket (systemd.py turns it into 'no system bus socket');
    a peer that rejects the authentication: DBusError saying so. Positive control: the first test."""
    with pytest.raises(dbuswire.DBusError, match=f"no such socket: {bus}"):
        dbuswire.Connection()
    peer = Peer(bus, lambda conn, buf: None, auth_reply=b"REJECTED EXTERNAL\r\n")
    with pytest.raises(dbuswire.DBusError, match="refused us .REJECTED EXTERNAL."):
        dbuswire.Connection()
    peer.join()


# -- the review's findings (session 25): limits, one deadline, failures that leave no broken connection ----------
def drain(conn: socket.socket, buf: bytearray, idle: float = 0.3) -> list | None:
    """Every call the client writes until it pauses for IDLE s (it is then waiting for answers); None once
    it has closed the connection."""
    while True:
        ready, _, _ = select.select([conn], [], [], idle)
        if not ready:
            break
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    calls = []
    while len(buf) >= 16 and len(buf) >= _size(buf):
        calls += read_calls(conn, 1, buf)
    return calls


def _active(e: str = "<") -> bytes:
    return bytes((1,)) + b"s\0" + b"\0" + _string(e, "active")


def _hello(conn, buf) -> None:
    (hello_serial, _, _), = read_calls(conn, 1, buf)
    conn.sendall(message("<", 2, 1, hello_serial, "s", _string("<", ":1.42")))


def _gets(n: int) -> list[tuple]:
    return [("org.freedesktop.systemd1", f"/org/freedesktop/systemd1/unit/u{k}", "org.freedesktop.DBus.Properties",
             "Get", "ss", ["org.freedesktop.systemd1.Unit", "ActiveState"]) for k in range(n)]


@pytest.mark.parametrize("others, expect_ok", [(0, True), (60, True), (200, False)])
def test_over_the_bus_at_most_100_calls_in_flight_and_limits_exceeded_retried_once(bus, others, expect_ok):
    """As dbus-daemon does: a connection's calls beyond 128 awaiting a reply (OTHERS of them already
    counted: replies it waits for elsewhere) are refused with LimitsExceeded. Over the bus dbuswire keeps
    at most 100 in flight, and sends a refused call once more: with 60 others, the 32 refused of each 100
    pass the second time. With 200 others every call is refused, twice and no more (the error is the reply)."""
    rounds: list[int] = []

    def script(conn, buf):
        _hello(conn, buf)
        while (calls := drain(conn, buf)) is not None:
            if not calls:
                continue
            rounds.append(len(calls))
            out = bytearray()
            for n, (serial, _member, _args) in enumerate(calls):
                if others + n < 128:
                    out += message("<", 2, 1000 + serial, serial, "v", _active())
                else:
                    text = _string("<", "The maximum number of pending replies per connection has been reached")
                    out += message("<", 3, 1000 + serial, serial, "s", text, dbuswire.LIMITS)
            conn.sendall(out)

    peer = Peer(bus, script)
    wire = dbuswire.Connection()
    replies = wire.batch(_gets(250))
    wire.close()
    peer.join()
    assert max(rounds) <= 100
    if expect_ok:
        assert replies == [["active"]] * 250
        assert rounds == ([100, 100, 50] if others == 0 else [100, 32, 100, 32, 50])
    else:
        assert all(isinstance(r, dbuswire.DBusError) and r.name == dbuswire.LIMITS for r in replies)
        assert rounds == [100, 100, 100, 100, 50, 50]


def test_one_deadline_for_a_batch_however_many_signals_arrive(bus):
    """systemd sends a direct connection every signal: with a timeout per read, signals every 0.1 s kept a
    call that is never answered waiting (here: until the stand-in gives up signalling after 5 s and answers).
    One deadline per batch: the timeout's error, and the connection closed so the next batch says so."""
    def script(conn, buf):
        _hello(conn, buf)
        (serial, _, _), = read_calls(conn, 1, buf)
        signal = message("<", 4, 2, None, "s", _string("<", ":1.42"))
        try:
            for _ in range(50):
                conn.sendall(signal)
                if select.select([conn], [], [], 0.1)[0] and not conn.recv(1):
                    return  # the client gave up and closed
            conn.sendall(message("<", 2, 3, serial, "v", _active()))
            conn.recv(1)
        except OSError:
            return

    peer = Peer(bus, script)
    wire = dbuswire.Connection(timeout=0.5)
    with pytest.raises(dbuswire.DBusError, match="no answer within 0.5 s") as info:
        wire.batch(_gets(1))
    assert info.value.name == "org.freedesktop.DBus.Error.Timeout"
    assert wire.sock is None
    with pytest.raises(dbuswire.DBusError, match="closed after an earlier failure") as again:
        wire.batch(_gets(1))
    assert again.value.name == dbuswire.DISCONNECTED
    peer.join()


def _bad_order(serial):
    return b"X" + message("<", 2, 9, serial, "v", _active())[1:]


def _bad_version(serial):
    m = bytearray(message("<", 2, 9, serial, "v", _active()))
    m[3] = 2
    return bytes(m)


def _bad_field_signature(serial):
    # A header field whose signature is not ASCII (UnicodeDecodeError) before the reply serial.
    fields = bytearray(bytes((7, 1)) + b"\xff\0")
    fields += b"\0" * 4
    fields += bytes((5, 1, ord("u"), 0)) + struct.pack("<I", serial)
    head = bytearray(struct.pack("<cBBBIII", b"l", 2, 0, 1, 0, 9, len(fields))) + fields
    _pad(head, 8)
    return bytes(head)


def _unknown_type(serial):
    return message("<", 2, 9, serial, "z", b"\0" * 8)  # no D-Bus type 'z' (KeyError)


def _short_body(serial):
    return message("<", 2, 9, serial, "t", b"\0\0")  # a uint64 in two bytes (struct.error)


def _long_string(serial):
    # A string's length past the message's end: read as far as there was, before.
    return message("<", 2, 9, serial, "s", struct.pack("<I", 1000) + b"ab\0")


@pytest.mark.parametrize("reply", [_bad_order, _bad_version, _bad_field_signature, _unknown_type, _short_body,
                                   _long_string])
def test_a_malformed_reply_is_a_dbus_error_and_closes_the_connection(bus, reply):
    """Whatever is wrong with a reply, batch() raises DBusError(InvalidMessage), one line; the connection is
    closed (what is left of the stream cannot be trusted) and the next batch() says DISCONNECTED instead of
    failing on a socket that is gone. Positive control: the well-formed replies of the first tests."""
    def script(conn, buf):
        _hello(conn, buf)
        (serial, _, _), = read_calls(conn, 1, buf)
        conn.sendall(reply(serial))
        conn.settimeout(5)
        conn.recv(1)

    peer = Peer(bus, script)
    wire = dbuswire.Connection(timeout=5)
    with pytest.raises(dbuswire.DBusError) as info:
        wire.batch(_gets(1))
    peer.join()
    assert info.value.name == "org.freedesktop.DBus.Error.InvalidMessage"
    assert "\n" not in str(info.value)
    assert wire.sock is None and not wire._buf
    with pytest.raises(dbuswire.DBusError) as again:
        wire.batch(_gets(1))
    assert again.value.name == dbuswire.DISCONNECTED


def test_a_failed_hello_closes_the_socket(bus):
    """The bus refuses Hello: Connection() raises the error and has closed its socket (the stand-in sees
    the end of the stream) rather than leaving it open for as long as the error is kept."""
    seen = {}

    def script(conn, buf):
        (serial, _, _), = read_calls(conn, 1, buf)
        denied = "org.freedesktop.DBus.Error.AccessDenied"
        conn.sendall(message("<", 3, 1, serial, "s", _string("<", "not you"), denied))
        conn.settimeout(5)
        try:
            seen["eof"] = conn.recv(1) == b""
        except TimeoutError:
            seen["eof"] = False

    peer = Peer(bus, script)
    with pytest.raises(dbuswire.DBusError, match="not you") as info:
        dbuswire.Connection(timeout=10)
    peer.join()
    assert info.value.name == "org.freedesktop.DBus.Error.AccessDenied"
    assert seen["eof"] is True
