"""A host's command through the ssh connection a fleet command left open, without starting an ssh client.

A fleet command keeps one ssh connection per host open for 60 s (ControlMaster, fleet_ssh.py). Riding on
it, an ssh client process is started per host only to hand its stdin, stdout and stderr to the master and
wait: ~4 ms of the control host's CPU a host, most of what a fleet `status` costs the control host per
host (bench/fleet/results.md). Here we ask the master ourselves, over its socket, in OpenSSH's own
multiplexing protocol (its PROTOCOL.mux, version 4, "passenger" mode), which is what that client does:

    both sides       MUX_MSG_HELLO, version 4
    us               MUX_C_NEW_SESSION (no tty, no escape character; X11 and agent forwarding asked for and
                     our environment given: the master grants and passes on what its own options say,
                     ForwardX11, ForwardAgent and SendEnv, as for ssh's own client; the command)
    us               our stdin, stdout and stderr, one descriptor per message (SCM_RIGHTS)
    the master       MUX_S_SESSION_OPENED, or MUX_S_FAILURE / MUX_S_PERMISSION_DENIED with a reason
    the master       MUX_S_EXIT_MESSAGE with the command's exit status when it ends

Every uint32 is big-endian, every string a uint32 length and its bytes, every packet a uint32 length and
its body; the flags are uint32 in OpenSSH's mux.c (the document says "bool").

Only our own masters are asked (the socket in our private folder, fleet_ssh.control_dir), and only for
sessions ssh would ask for the same way (fleet_ssh.Target.shared_connection). Refused tells the caller to
start ssh as before, which makes a new master, where ssh's own client would also connect afresh: no socket
or a stale one, a master that refuses the session or goes away before it answers. Once the master has
answered, nothing is retried: a command such as `restart` must never run twice.
"""

from __future__ import annotations

import os
import socket
import subprocess

VERSION = 4
HELLO = 0x00000001
NEW_SESSION = 0x10000002
S_PERMISSION_DENIED = 0x80000002
S_FAILURE = 0x80000003
S_EXIT_MESSAGE = 0x80000004
S_SESSION_OPENED = 0x80000006
NO_ESCAPE = 0xFFFFFFFF
MAX_PACKET = 256 * 1024  # OpenSSH's own limit for a mux message


class Refused(Exception):
    """No session was opened and the command was not sent: starting ssh instead is safe."""


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def _string(data: bytes) -> bytes:
    return _u32(len(data)) + data


def _packet(kind: int, *fields: bytes) -> bytes:
    body = _u32(kind) + b"".join(fields)
    return _u32(len(body)) + body


class Session:
    """The command running on the host through the master, read the way fleet_ssh.run reads an ssh client's
    subprocess.Popen: `stdout`/`stderr` text files, wait(timeout), poll(), `returncode`; close() leaves it
    (the master closes the session, as when an ssh client is killed). `error` is the master's reason when it
    refused a session it had left waiting (exit 255, as ssh exits then)."""

    def __init__(self, path: str, command: str, timeout: float):
        self.returncode: int | None = None
        self.error: str | None = None
        self.stdout = self.stderr = None
        self._buf = b""
        self._opened = False
        self._exit: int | None = None
        self._sock: socket.socket | None = None
        made: list[int] = []  # descriptors to close if the session cannot be asked for

        def give_up(why: str) -> Refused:
            for fd in made:
                os.close(fd)
            if self._sock is not None:
                self._sock.close()
            return Refused(why)

        try:
            # ssh's client asks for forwarding when its options say so and gives the variables its SendEnv
            # names; the master then grants and passes on only what its options allow (mux.c, clientloop.c's
            # client_session2_setup). Ours was made with the same options: asking for both and giving every
            # variable lets it decide as ssh's client would have.
            environment = b"".join(_string(os.fsencode(f"{k}={v}")) for k, v in os.environ.items())
            request = _packet(NEW_SESSION, _u32(1), _string(b""), _u32(0), _u32(1), _u32(1), _u32(0),
                              _u32(NO_ESCAPE), _string(b""), _string(os.fsencode(command)), environment)
            if len(request) - 4 > MAX_PACKET:
                raise Refused("the environment is too large for one mux message")
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.settimeout(timeout)
            self._sock.connect(path)  # none there, or a master gone (a stale socket): ssh makes a new one
            self._sock.sendall(_packet(HELLO, _u32(VERSION)))
            kind, body = self._read()
            if kind != HELLO or body[:4] != _u32(VERSION):
                raise give_up(f"the ssh master does not speak mux protocol {VERSION}")
            out_r, out_w = os.pipe()
            made += [out_r, out_w]
            err_r, err_w = os.pipe()
            made += [err_r, err_w]
            made.append(os.open(os.devnull, os.O_RDONLY))
            self._sock.sendall(request)
            for fd in (made[-1], out_w, err_w):
                socket.send_fds(self._sock, [b"\0"], [fd])
        except (OSError, EOFError, UnicodeError) as exc:
            # The master starts nothing before it holds all three descriptors.
            raise give_up(str(exc) or type(exc).__name__) from None
        for fd in made[-1], out_w, err_w:
            os.close(fd)  # the master holds its own copies now; stdout ends when the command's does
        self.stdout = os.fdopen(out_r, "r", errors="replace")
        self.stderr = os.fdopen(err_r, "r", errors="replace")
        try:
            kind, body = self._read()
        except TimeoutError:
            return  # the host has not opened the session yet: wait() reads on, within the caller's deadline
        except (OSError, EOFError) as exc:
            # The master went away before answering. It asks the host to run the command in the same step as
            # it answers, so without an answer the command almost surely never started; ssh's own client
            # connects afresh then, and so do we (Refused: the caller starts ssh).
            self._discard()
            raise Refused(str(exc) or type(exc).__name__) from None
        if kind in (S_FAILURE, S_PERMISSION_DENIED):
            self._discard()  # refused before anything ran (sshd refused the channel, say)
            raise Refused(f"the ssh master refused a session: {_reason(body)}")
        self._answered(kind, body)

    def _discard(self) -> None:
        self._sock.close()
        self.stdout.close()
        self.stderr.close()

    def _answered(self, kind: int, body: bytes) -> None:
        """The master's answer to the request. Read by wait() when it came after the connect timeout, a
        refusal is then the host's result (exit 255 with the reason), not a reason to start ssh: the
        caller's loop has begun, and that case needs a host whose sshd took that long to say no."""
        if kind == S_SESSION_OPENED:
            self._opened = True
            return
        self.returncode = 255
        self.error = (f"the ssh master refused a session: {_reason(body)}"
                      if kind in (S_FAILURE, S_PERMISSION_DENIED)
                      else f"the ssh master answered message {kind:#x} to a new session")
        self._sock.close()

    def _read(self) -> tuple[int, bytes]:
        """One packet; what arrived of the next one stays for the next call (wait() reads with timeouts)."""
        while True:
            if len(self._buf) >= 4:
                size = int.from_bytes(self._buf[:4], "big")
                if not 4 <= size <= MAX_PACKET:
                    raise EOFError(f"a mux packet of {size} bytes")
                if len(self._buf) >= 4 + size:
                    body, self._buf = self._buf[4:4 + size], self._buf[4 + size:]
                    return int.from_bytes(body[:4], "big"), body[4:]
            chunk = self._sock.recv(4096)
            if not chunk:
                raise EOFError("the ssh master closed the connection")
            self._buf += chunk

    def wait(self, timeout: float | None = None) -> int:
        """The exit status once the master has closed our socket: it sends the status as soon as the
        command has exited, and the command's last output may come after it; the master closes the socket
        once the session is over (leaving earlier would make it drop that output, as ssh's own client says).
        No status before the close (the connection dropped, the command was killed by a signal): 255, as ssh
        exits then."""
        if self.returncode is not None:
            return self.returncode
        self._sock.settimeout(timeout)
        try:
            while True:
                kind, body = self._read()
                if not self._opened:
                    self._answered(kind, body)
                    if self.returncode is not None:
                        return self.returncode
                elif kind == S_EXIT_MESSAGE and len(body) >= 8:
                    self._exit = int.from_bytes(body[4:8], "big")
                # MUX_S_TTY_ALLOC_FAIL and anything newer: nothing to act on without a tty
        except TimeoutError:
            raise subprocess.TimeoutExpired("ssh (shared connection)", timeout) from None
        except (OSError, EOFError):
            self.returncode = 255 if self._exit is None else self._exit
            self._sock.close()
            return self.returncode

    def poll(self) -> int | None:
        return self.returncode

    def close(self) -> None:
        if self.returncode is None:
            self.returncode = 255  # left before its end: no status, as ssh killed exits without one
        self._sock.close()


def _reason(body: bytes) -> str:
    """MUX_S_FAILURE's and MUX_S_PERMISSION_DENIED's reason: after the request id, a string."""
    return body[8:8 + int.from_bytes(body[4:8], "big")].decode(errors="replace")
