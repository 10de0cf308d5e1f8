"""circus: the state file's lock is root's alone and never freezes circusd, a deliberate stop is no failure
(also after a crash and an automatic restart), the listener block comes back when the state file goes, a spawn
error is told apart from a refused start, and a changed [circus] section is seen whole (the copy circusd was
started with) and never "reloaded". A private circusd per test (circus_harness), fake workers, and the CLI's
CircusBackend in this process.
"""

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import manager_tests
import pytest
from circus_harness import make_units, watcher
from manager_tests import CRASH, SLEEP, ns

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from atom_workerctl.circus import CircusBackend  # noqa: E402
from atom_workerctl.errors import ManagerError  # noqa: E402
from atom_workerctl.policystate import PolicyState  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def backend(cd, **extra):
    settings = {"endpoint": cd.endpoint, "config": str(cd.conf), "state_file": str(cd.state_file),
                "log_dir": str(cd.log_dir), "service": "", "venv": "/nonexistent",
                "running_config": str(cd.base / "run" / "circus.running.ini"), **extra}
    return CircusBackend(None, settings)


def can_open_as_nobody(path):
    """Whether uid 65534 can open PATH read-only (all flock needs)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (setpriv to uid 65534)")
    probe = f"import os; os.open({str(path)!r}, os.O_RDONLY)"
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                             probe], capture_output=True, text=True, timeout=30, check=False)
    return result.returncode == 0


@pytest.mark.parametrize("who", ["cli", "engine"])
def test_the_lock_file_is_root_only_and_an_old_0644_one_is_tightened(tmp_path, who):
    # A folder uid 65534 can reach (pytest's own tmp_path is under a 0700 folder).
    tmp = Path(tempfile.mkdtemp(prefix="lock-"))
    try:
        lock_checks(tmp, who)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def lock_checks(tmp_path, who):
    run = tmp_path / "run"
    run.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(run, 0o755)
    state = run / "policy.json"
    lock = Path(f"{state}.lock")
    lock.write_text("")
    os.chmod(lock, 0o644)
    assert can_open_as_nobody(lock)  # positive control: what an older version left behind
    if who == "cli":
        with PolicyState(str(state)).update() as data:
            data["processes"]["g:w"] = {"name": "w"}
    else:
        with manager_tests.policy_module.StateStore(str(state)).update() as data:
            data["processes"]["g:w"] = {"name": "w"}
    assert lock.stat().st_mode & 0o777 == 0o600
    assert not can_open_as_nobody(lock)
    os.open(lock, os.O_RDONLY)  # root still can
    # A new lock file is 0600 from the start; a symlink in its place is refused.
    lock.unlink()
    with PolicyState(str(state)).update():
        pass
    assert lock.stat().st_mode & 0o777 == 0o600
    lock.unlink()
    lock.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ManagerError, match="cannot lock"), PolicyState(str(state)).update():
        pass
    with pytest.raises(manager_tests.policy_module.PolicyError, match="cannot lock"), \
            manager_tests.policy_module.StateStore(str(state)).update():
        pass


def test_a_held_lock_neither_freezes_circusd_nor_loses_the_exit(circusd, monkeypatch):
    cd = circusd.start(make_units(circusd.root, [SLEEP]), wait_active=[watcher("sleep")])
    w = watcher("sleep")
    fd = os.open(f"{cd.state_file}.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        os.kill(cd.pids(w)[0], signal.SIGKILL)
        time.sleep(1.5)  # circusd reaps it (check_delay 1) while the lock is held
        began = time.monotonic()
        assert cd.call("status", retry_for=0)["status"] == "ok"
        assert time.monotonic() - began < 1.0  # circusd's loop runs
        # The CLI gives up after a bounded wait, with one line.
        monkeypatch.setattr("atom_workerctl.policystate.LOCK_WAIT", 0.3)
        with pytest.raises(ManagerError, match="still locked by another process"):
            PolicyState(str(cd.state_file)).reset([ns("sleep")])
    finally:
        os.close(fd)
    # Released: the exit is recorded and the worker restarted (RestartSec later).
    cd.wait(lambda: (cd.entry(ns("sleep")) or {}).get("n_restarts") == 1 and cd.status(w) == "active", 30,
            "the exit recorded and the worker restarted")
    assert cd.entry(ns("sleep"))["last_exit"]["signal"] == "SIGKILL"


def test_a_deliberate_stop_after_a_crash_and_its_restart_is_inactive_not_failed(circusd):
    cd = circusd.start(make_units(circusd.root, [SLEEP]), wait_active=[watcher("sleep")])
    w, unit = watcher("sleep"), f"{watcher('sleep')}.service"
    os.kill(cd.pids(w)[0], signal.SIGKILL)
    cd.wait(lambda: (cd.entry(ns("sleep")) or {}).get("n_restarts") == 1 and cd.status(w) == "active", 30,
            "the automatic restart")
    cd.wait_runs(w, 2)
    assert cd.entry(ns("sleep"))["result"] == "success"  # the counted start reset it, as systemd's Result
    b = backend(cd)
    try:
        b.stop(unit)
        assert cd.status(w) == "stopped"  # waiting=True: stopped when stop() returns
        entry = cd.entry(ns("sleep"))
        assert entry["next_restart"] is None
        s = b.units([unit], "")[unit]
        assert (s.active_state, s.sub_state, s.result) == ("inactive", "dead", "success")
    finally:
        b.close()


def test_the_listener_block_is_written_again_when_the_state_file_goes(circusd):
    cd = circusd.start(make_units(circusd.root, [SLEEP]), wait_active=[watcher("sleep")])
    w = watcher("sleep")
    assert cd.state()["listener"]["pid"] == cd.proc.pid
    cd.state_file.unlink()
    os.kill(cd.pids(w)[0], signal.SIGKILL)
    cd.wait(lambda: cd.state().get("listener", {}).get("pid") == cd.proc.pid, 30, "the listener block again")
    cd.wait(lambda: cd.status(w) == "active", 30, "the restart")
    assert cd.policy_lines("the listener block was missing")


def test_a_spawn_error_is_not_blamed_on_the_policy(circusd):
    units = make_units(circusd.root, [SLEEP, CRASH])
    for unit in units:
        if unit["pool"] == "crash":
            unit["php"] = str(circusd.base / "no-such-php")
            unit["restart"] = "no"
    cd = circusd.start(units, wait_active=[watcher("sleep")])
    w = watcher("crash")
    cd.wait(lambda: ((cd.entry(ns("crash")) or {}).get("last_exit") or {}).get("spawn_error"), 30,
            "the spawn error at circusd's start")
    b = backend(cd)
    try:
        with pytest.raises(ManagerError, match="could not be spawned: can't find command") as err:
            b.start(f"{w}.service")
        assert "refused" not in str(err.value)
    finally:
        b.close()


def test_a_changed_circus_section_is_seen_whole_and_not_reloaded(circusd):
    units = make_units(circusd.root, [SLEEP])
    copy = circusd.base / "run" / "circus.running.ini"
    circusd.render(units)
    shutil.copy(circusd.conf, copy)  # what the unit's ExecStartPre does
    cd = circusd.start(units, wait_active=[watcher("sleep")])
    w, unit = watcher("sleep"), f"{watcher('sleep')}.service"
    b = backend(cd)
    try:
        assert b.changes()["arbiter"] is False
        text = cd.conf.read_text().replace("[circus]\n", "[circus]\nfqdn_prefix = changed\n", 1)
        assert "fqdn_prefix = changed" in text
        cd.conf.write_text(text)
        os.utime(cd.conf, (time.time() + 5, time.time() + 5))
        b = backend(cd)
        assert b.changes()["arbiter"] is True  # a key circusctl globaloptions does not tell
        assert b.units([unit], "")[unit].need_reload
        pid = cd.pids(w)[0]
        with pytest.raises(ManagerError, match=r"only a restart of circusd applies it"):
            b.reload()  # no service: one line, and no reloadconfig restarting every worker
        assert cd.pids(w) == [pid]
        # Without the copy (circusd started by other means) only globaloptions' keys are compared.
        copy.unlink()
        assert backend(cd).changes()["arbiter"] is False
    finally:
        b.close()
