"""Finding a host's init while processes of that host come and go (no lab host needed).

`init_pid` lists the processes of a host's cgroup, then reads each one's /proc status. A process that exits
after its status file is opened and before it is read makes the read fail with ESRCH (ProcessLookupError),
not ENOENT. A drill that SIGKILLs workers meets that window; CI once saw `lab run` die of it.
"""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from atomlab import hosts


@pytest.fixture
def init_of_a_pid_namespace():
    """A real process that is PID 1 of a PID namespace right below ours, as a lab host's systemd is."""
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "sleep", "60"])
    try:
        for _ in range(100):
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            if children:
                yield int(children[0])
                break
            time.sleep(0.05)
        else:
            pytest.fail("unshare started no child")
    finally:
        proc.kill()
        proc.wait()


def _exits_after_open(monkeypatch, dying: subprocess.Popen) -> None:
    """Make the read of `dying`'s status happen after it was opened and the process exited (the kernel's ESRCH)."""
    real_read_text = Path.read_text

    def read_text(self, *args, **kwargs):
        if str(self) != f"/proc/{dying.pid}/status":
            return real_read_text(self, *args, **kwargs)
        with open(self) as fh:
            dying.kill()
            dying.wait()
            return fh.read()

    monkeypatch.setattr(Path, "read_text", read_text)


def test_a_process_gone_between_open_and_read_is_skipped(monkeypatch, init_of_a_pid_namespace):
    dying = subprocess.Popen(["sleep", "60"])
    monkeypatch.setattr(hosts.cgroups, "pids", lambda name: [dying.pid, init_of_a_pid_namespace])
    _exits_after_open(monkeypatch, dying)
    assert hosts.init_pid("any") == init_of_a_pid_namespace
    assert dying.returncode == -signal.SIGKILL  # the window was really met


def test_the_kernel_answers_esrch_in_that_window():
    """The condition the test above recreates is the kernel's, not an invention of the test."""
    dying = subprocess.Popen(["sleep", "60"])
    with open(f"/proc/{dying.pid}/status") as fh:
        os.kill(dying.pid, signal.SIGKILL)
        dying.wait()
        with pytest.raises(ProcessLookupError):
            fh.read()


def test_control_the_init_is_found_when_nothing_exits(monkeypatch, init_of_a_pid_namespace):
    monkeypatch.setattr(hosts.cgroups, "pids", lambda name: [os.getpid(), init_of_a_pid_namespace])
    assert hosts.init_pid("any") == init_of_a_pid_namespace
