"""sshmux.Session's answers to what a master may do that a real one is hard to make do on cue: refuse the
session, go away before answering, answer late, send the exit status before the last output. Which of them
let the caller start ssh instead (Refused: nothing ran) decides whether a command can run twice.

The peer here speaks the master's side of OpenSSH's PROTOCOL.mux; the real master is asked in the fleet lab
test (tests/fleet/test_fleet_cli_lab.py), which compares every answer with ssh's own.
"""

import gc
import os
import socket
import subprocess
import threading
import time
import uuid
import warnings

import pytest
from atom_workerctl import fleet_ssh, sshmux

OPENED, FAILURE, EXIT = sshmux.S_SESSION_OPENED, sshmux.S_FAILURE, sshmux.S_EXIT_MESSAGE


def packet(kind, *fields):
    body = kind.to_bytes(4, "big") + b"".join(f if isinstance(f, bytes) else f.to_bytes(4, "big") for f in fields)
    return len(body).to_bytes(4, "big") + body


def read_packet(conn):
    size = int.from_bytes(conn.recv(4, socket.MSG_WAITALL), "big")
    return conn.recv(size, socket.MSG_WAITALL)


class Master:
    """A listening socket whose one client is served by `script(conn, fds)` in a thread, after the hello,
    the request and the three descriptors (stdin, stdout, stderr); what it read is kept.

    The fake master lives in the test's own process, so its descriptors count in /proc/self/fd: every test
    waits for its masters to end (`masters_ended`), or one test's master still closing its descriptors is
    seen by the next test's count."""

    started: list["Master"] = []

    def __init__(self, script):
        # An abstract socket: no path, so no length limit whatever the temporary folder's name.
        self.path = f"\0atom-workerctl-test-{uuid.uuid4().hex}"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.request = None
        self.thread = threading.Thread(target=self.serve, args=(script,), daemon=True)
        self.thread.start()
        Master.started.append(self)

    def serve(self, script):
        conn, _ = self.listener.accept()
        self.listener.close()
        with conn:
            conn.sendall(packet(sshmux.HELLO, sshmux.VERSION))
            read_packet(conn)
            self.request = read_packet(conn)
            fds = [socket.recv_fds(conn, 1, 1)[1][0] for _ in range(3)]
            try:
                script(conn, fds)
            finally:
                for fd in fds:
                    os.close(fd)


@pytest.fixture(autouse=True)
def masters_ended():
    yield
    ended_all_masters()


def ended_all_masters():
    while Master.started:
        master = Master.started.pop()
        master.thread.join(10)
        assert not master.thread.is_alive(), "a fake master did not end"


def ended(session):
    """What the session printed (stdout, stderr), its files closed."""
    with session.stdout, session.stderr:
        return session.stdout.read(), session.stderr.read()


def failure(reason):
    return packet(FAILURE, 1, len(reason), reason)


def test_a_session_reads_every_output_after_the_exit_status_and_the_status(tmp_path):
    def script(conn, fds):
        conn.sendall(packet(OPENED, 1, 7))
        os.write(fds[1], b"first\n")
        conn.sendall(packet(EXIT, 7, 3))  # the status comes before the last output, as sshd may send it
        time.sleep(0.2)
        conn.setblocking(False)
        try:
            left = conn.recv(1) == b""
        except BlockingIOError:
            left = False
        if not left:  # a real master drops what it still holds for a client that has left
            os.write(fds[1], b"last\n")
            os.write(fds[2], b"an error\n")

    master = Master(script)
    session = sshmux.Session(master.path, "atom-workerctl --json status", 5)
    assert b"atom-workerctl --json status" in master.request
    assert session.wait(5) == 3 and session.poll() == 3 and session.error is None
    assert ended(session) == ("first\nlast\n", "an error\n")


def test_no_exit_status_before_the_master_closes_is_255_with_nothing_to_retry(tmp_path):
    master = Master(lambda conn, fds: conn.sendall(packet(OPENED, 1, 7)))
    session = sshmux.Session(master.path, "restart", 5)
    assert session.wait(5) == 255 and session.error is None  # fleet_ssh reports it as ssh's exit 255
    assert ended(session) == ("", "")


def test_a_refusal_or_a_master_gone_before_its_answer_lets_ssh_be_started(tmp_path):
    # Control first: a peer that answers gives a session (so the refusals below are the answers').
    ok = Master(lambda conn, fds: conn.sendall(packet(OPENED, 1, 7) + packet(EXIT, 7, 0)))
    session = sshmux.Session(ok.path, "true", 5)
    assert session.wait(5) == 0 and ended(session) == ("", "")
    refusing = Master(lambda conn, fds: conn.sendall(failure(b"open failed")))
    with pytest.raises(sshmux.Refused, match="refused a session: open failed"):
        sshmux.Session(refusing.path, "restart", 5)
    gone = Master(lambda conn, fds: None)  # closes without a word
    with pytest.raises(sshmux.Refused):
        sshmux.Session(gone.path, "restart", 5)
    with pytest.raises(sshmux.Refused):  # no master: the socket's path holds nothing
        sshmux.Session(str(tmp_path / "none"), "restart", 5)


def test_an_answer_later_than_the_connect_timeout_is_waited_for_and_a_late_refusal_is_an_error(tmp_path):
    late = threading.Event()

    def script(conn, fds):
        late.wait(5)
        conn.sendall(failure(b"no more sessions"))

    master = Master(script)
    session = sshmux.Session(master.path, "restart", 0.2)  # no answer within 0.2 s: not refused, waiting
    with pytest.raises(subprocess.TimeoutExpired):
        session.wait(0.2)
    late.set()
    assert session.wait(5) == 255 and session.error == "the ssh master refused a session: no more sessions"
    ended(session)


def fds_open() -> set[int]:
    """This process's open descriptors. The listing's own descriptor is closed by the time it returns,
    so only the ones still open count."""
    def still_open(fd):
        try:
            os.fstat(fd)
        except OSError:
            return False
        return True
    return {fd for fd in map(int, os.listdir("/proc/self/fd")) if still_open(fd)}


def left_open_by(call):
    """(call's result, descriptors it left open, files it left to be closed by their finalizer).

    Garbage of earlier tests (the whole suite runs in one process) is collected first and the collector is
    off during the call, so a descriptor closed meanwhile or a finalizer's warning is the call's own; the
    fake masters have ended before each count."""
    ended_all_masters()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    before = fds_open()
    gc.disable()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            result = call()
            ended_all_masters()
            left = fds_open() - before
            gc.collect()  # a file of the call's kept alive by a cycle: its finalizer's warning is recorded too
    finally:
        gc.enable()
    return result, left, [str(w.message) for w in caught if w.category is ResourceWarning]


def test_the_probe_sees_a_descriptor_left_open_and_a_file_left_to_its_finalizer():
    # Control for the two tests below: what they assert is absent is seen when it is there.
    kept = []
    _, left, finalized = left_open_by(lambda: kept.append(os.open(os.devnull, os.O_RDONLY)))
    assert (left, finalized) == ({kept[0]}, [])
    os.close(kept[0])
    _, left, finalized = left_open_by(lambda: open(os.devnull).fileno())  # noqa: SIM115 - the leak is the point
    assert left == set() and len(finalized) == 1 and "unclosed file" in finalized[0]


@pytest.fixture()
def through(monkeypatch):
    """fleet_ssh.run() asks the given fake master (its Target's socket)."""
    def use(master):
        monkeypatch.setattr(fleet_ssh.Target, "shared_connection", lambda self: master.path)
        return fleet_ssh.Target("w1", "192.0.2.10")
    return use


def test_run_reads_a_hosts_answer_through_the_master(through):
    def script(conn, fds):
        conn.sendall(packet(OPENED, 1, 7))
        os.write(fds[1], b'{"schema": 1}\n')
        os.write(fds[2], b"Warning: Permanently added 'x'\na warning\n")
        conn.sendall(packet(EXIT, 7, 3))

    result, left, finalized = left_open_by(
        lambda: fleet_ssh.run(through(Master(script)), ["atom-workerctl", "--json", "status"], 5))
    assert (result.reached, result.code, result.data, result.stderr, result.error) == \
        (True, 3, {"schema": 1}, ["a warning"], None)
    assert (left, finalized) == (set(), [])


def test_run_leaves_a_session_that_outlasts_the_host_timeout(through):
    def script(conn, fds):
        conn.sendall(packet(OPENED, 1, 7))
        conn.recv(1)  # until the client leaves

    started = time.monotonic()
    result, left, finalized = left_open_by(lambda: fleet_ssh.run(through(Master(script)), ["sleep", "30"], 1))
    assert not result.reached and result.error == "no answer within 1 s (--host-timeout)"
    assert time.monotonic() - started < 5
    assert (left, finalized) == (set(), [])  # the master's recv(1) ended: run() closed its side
