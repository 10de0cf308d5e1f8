"""The systemd backend's reading and procnet's TCP tables, locally (no systemd, no lab host): a reconnect
that fails leaves a usable backend, an alias named by the caller is read once and is no stray, a worker's
connection made after the table was read is still found, and a sock_diag answer that is cut short, ends
with an error or was interrupted falls back to /proc. The real systemd and gearmand: test_cli_lab.py."""

import os
import socket
import struct
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "tests" / "cli"))

from atom_workerctl import procnet, systemd  # noqa: E402
from atom_workerctl.errors import ManagerError  # noqa: E402
from test_dbuswire import Peer, _hello, read_calls  # noqa: E402


def test_a_failed_reconnect_leaves_a_backend_that_fails_cleanly_again(bus):
    """systemd closes the connection; the reconnect finds nobody listening: one readable ManagerError. The
    next read tries again and fails the same way (it raised AttributeError on the closed socket: shown
    as 'internal error')."""
    holder = {}

    def script(conn, buf):
        _hello(conn, buf)
        read_calls(conn, 1, buf)
        holder["peer"].listener.close()  # nobody to reconnect to

    holder["peer"] = peer = Peer(bus, script)
    backend = systemd.SystemdBackend()
    for _ in range(2):
        with pytest.raises(ManagerError) as info:
            backend.list_loaded("atom-worker@*.service")
        assert "\n" not in str(info.value) and str(info.value).startswith("list units: ")
    peer.join()
    backend.close()


class FakeWire:
    """dbuswire.Connection's batch(), answered from a table: what units() asks and how often."""

    direct = True

    def __init__(self, by_pattern, by_name):
        self.by_pattern, self.by_name, self.asked = by_pattern, by_name, []

    def batch(self, calls):
        out = []
        for _dest, path, _iface, member, _sig, args in calls:
            self.asked.append((member, path, args[1] if member == "Get" else args))
            if member == "ListUnitsByPatterns":
                out.append([self.by_pattern])
            elif member == "ListUnitsByNames":
                out.append([self.by_name])
            elif member == "LoadUnit":
                out.append([f"/unit/{args[0]}"])
            else:
                values = {"Result": "success", "NRestarts": 0, "StateChangeTimestamp": 1, "MainPID": 42,
                          "MemoryCurrent": 1, "UnitFileState": "enabled", "NeedDaemonReload": False,
                          "RestartPreventExitStatus": ([], []), "StartLimitBurst": 5,
                          "StartLimitIntervalUSec": 10, "Restart": "always", "RestartUSec": 100,
                          "LoadState": "loaded", "ActiveState": "active", "SubState": "running", "Job": (0, "/")}
                out.append([values[args[1]]])
        return out

    def close(self):
        pass


def _row(name):
    return (name, "", "loaded", "active", "running", "", f"/unit/{name}", 0, "", "/")


def test_an_alias_is_read_once_and_its_real_name_is_no_stray(monkeypatch):
    """ListUnitsByNames answers under the unit's real name: the named alias is that row (no LoadUnit and
    Gets of its own), and the real name, which the glob did not list, is not reported as well. Positive
    control: a unit the glob lists is reported beside the named one."""
    wire = FakeWire([_row("atom-worker@1.service")], [_row("atom-worker-real@1.service")])
    monkeypatch.setattr(systemd.dbuswire, "Connection", lambda: wire)
    out = systemd.SystemdBackend().units(["atom-worker-alias.service"], "atom-worker@*.service")
    assert list(out) == ["atom-worker-alias.service", "atom-worker@1.service"]
    assert out["atom-worker-alias.service"].active_state == "active"
    assert not [a for a in wire.asked if a[0] == "LoadUnit"]
    gets = [a for a in wire.asked if a[0] == "Get"]
    assert sum(1 for a in gets if a[1:] == ("/unit/atom-worker-real@1.service", "MainPID")) == 1
    assert sum(1 for a in gets if a[1:] == ("/unit/atom-worker@1.service", "MainPID")) == 1


def test_a_connection_made_after_the_table_was_read_is_found(tmp_path):
    """snapshot.take reads the TCP table before systemd and gearmand: a connection made since is not in it.
    Connections reads the table once more when nothing of a process was found. Negative control: a server
    this process is not connected to is not reported."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    try:
        stale = [(procnet._netns("self"), {})]  # read before the connection existed
        server = f"127.0.0.1:{port}"
        assert procnet.Connections([server], stale).of([os.getpid()]) == [server]
        assert procnet.Connections(["127.0.0.1:1"], stale).of([os.getpid()]) == []
    finally:
        client.close()
        listener.close()


def test_a_cut_short_sock_diag_answer_falls_back_to_proc(monkeypatch):
    """own_table: a struct.error from a truncated dump is /proc's turn, as a refusal (OSError) was."""
    def truncated(family):
        raise struct.error("unpack_from requires a buffer of at least 4 bytes")

    monkeypatch.setattr(procnet, "diag_table", truncated)
    monkeypatch.setattr(procnet, "tcp_table", lambda pid, names: {7: ("10.0.0.1", 1, "10.0.0.2", 4730)})
    assert procnet.own_table(socket.AF_INET)[1] == {7: ("10.0.0.1", 1, "10.0.0.2", 4730)}


class FakeNetlink:
    """A netlink socket whose dump answer is DATA."""

    def __init__(self, data):
        self.data = data

    def __call__(self, *args):
        return self

    def sendall(self, data):
        pass

    def recv(self, n):
        data, self.data = self.data, b""
        return data

    def close(self):
        pass


def _done(error: int, flags: int = 2) -> bytes:
    return struct.pack("=IHHIIi", 20, 3, flags, 1, 0, error)


@pytest.mark.parametrize("answer, ok", [(_done(0), True), (_done(-16), False), (_done(0, 2 | 0x10), False)],
                         ids=["clean", "error", "interrupted"])
def test_sock_diag_done_with_an_error_or_interrupted_is_refused(monkeypatch, answer, ok):
    """NLMSG_DONE carries the dump's error code; NLM_F_DUMP_INTR says the table changed mid-dump: either is
    OSError (own_table then reads /proc). Positive control: a clean DONE is an (empty) table."""
    monkeypatch.setattr(procnet._socket, "socket", FakeNetlink(answer))
    if ok:
        assert procnet.diag_table(socket.AF_INET) == {}
    else:
        with pytest.raises(OSError, match="sock_diag"):
            procnet.diag_table(socket.AF_INET)
