"""The restart policy under circus (atom_worker_circus's hooks around the atom-worker-policy engine) on a real
circusd: systemd's Restart=on-failure, RestartSec and StartLimitIntervalSec/StartLimitBurst for singleton
watchers with respawn = false.

The policy here is RestartSec=1, StartLimitIntervalSec=60, StartLimitBurst=3 unless a test says otherwise.
Waits poll with a deadline that only guards against hangs; timing assertions are lower bounds (and one
generous safety net). Each "nothing happened" is checked once something that would have happened in the same
time did happen (a sibling watcher's restart, a synchronous log line).
"""

import os
import signal
import time

import manager_tests
import pytest
from circus_harness import ADAPTER, make_units, watcher
from manager_tests import BURST, CLEAN, CRASH, RECYCLE, RESTART_SEC, SLEEP, entry_of, ns, wait_failed, wait_starts

pytestmark = pytest.mark.timeout(120)


def with_policy(units, pool, **settings):
    """units with the named pool's policy changed (the role's settings are host-wide; the template is not)."""
    for unit in units:
        if unit["pool"] == pool:
            unit.update(settings)
    return units


def control_restarted(cd, pool):
    """The positive control of a "not restarted": SIGKILL the sibling's worker and wait until the policy has
    restarted it (RestartSec later): a restart that was due in the same time would have happened too."""
    name = watcher(pool)
    before = len(cd.starts(name))
    pid = cd.pids(name)[0]
    os.kill(pid, signal.SIGKILL)
    cd.wait(lambda: len(cd.starts(name)) == before + 1 and cd.status(name) == "active", 30,
            f"the control {name} to be restarted after SIGKILL")
    assert cd.entry(ns(pool))["last_exit"]["signal"] == "SIGKILL"


def test_crash_loop_stops_after_exactly_burst_starts_and_stays_down(circusd):
    loop = {"name": "loop", "instances": 1, "types": ["crash"]}
    units = with_policy(make_units(circusd.root, [CRASH, loop]), "loop", start_limit_burst=0)  # no limit
    cd = circusd.start(units)
    name, w = ns("crash"), watcher("crash")

    entry = wait_failed(cd, name)
    # Stays down: the control (same RestartSec, no start limit) goes on being restarted meanwhile.
    control = len(cd.starts(watcher("loop")))
    cd.wait(lambda: len(cd.starts(watcher("loop"))) >= control + 2, 30, "two more restarts of the control")

    assert len(cd.starts(w)) == BURST
    assert cd.status(w) == "stopped"
    entry = cd.entry(name)
    assert entry["failed"] is True and entry["result"] == "start-limit-hit"
    assert len(entry["starts"]) == BURST and entry["n_restarts"] == BURST - 1
    assert entry["next_restart"] is None
    assert entry["last_exit"]["exit_status"] == 1 and entry["last_exit"]["result"] == "exit-code"
    assert entry["failed_at"] >= entry["starts"][-1]
    assert entry["policy"] == {"restart": "on-failure", "restart_sec": 1.0, "start_limit_interval_sec": 60.0,
                               "start_limit_burst": 3}
    hits = cd.policy_lines("start-limit-hit")
    assert len(hits) == 1 and name in hits[0] and f"atom-workerctl reset {w}" in hits[0]
    assert not entry_of(cd, ns("loop")).get("failed")

    # A later start is refused before anything is spawned.
    assert cd.start_watcher(w) == {"started": [], "kept": []}
    assert cd.status(w) == "stopped"
    assert len(cd.starts(w)) == BURST
    assert cd.policy_lines(f"{name}: start refused: failed (start-limit-hit)")
    assert cd.entry(name)["failed"] is True

    # The state file names this circusd (the hooks are loaded) and the shared log holds stdout and stderr.
    listener = cd.state()["listener"]
    assert listener["pid"] == cd.proc.pid and listener["manager"] == "circus"
    assert listener["adapter"] == str(cd.lib_dir / ADAPTER.name)
    log = cd.log_text(w).splitlines()
    assert log.count(f"fake worker {w}: crash (stdout)") == BURST
    assert log.count(f"fake worker {w}: crash (stderr)") == BURST


def test_restart_sec_is_observed_after_each_exit(circusd):
    cd = circusd.start(with_policy(make_units(circusd.root, [CRASH]), "crash", restart_sec=2))
    w = watcher("crash")
    wait_failed(cd, ns("crash"))
    runs = cd.runs(w)
    assert [r["event"] for r in runs] == ["start", "exit"] * BURST
    for exited, started in zip(runs[1::2], runs[2::2], strict=False):
        gap = started["t"] - exited["t"]
        assert gap >= 2, runs  # never before RestartSec after the exit
        assert gap < 2 + 15, runs  # a safety net only (circusd looks every second; a busy host is slow)
    lines = cd.policy_lines("restart at")
    assert len(lines) == BURST and all("RestartSec=2s" in line for line in lines)


def test_reset_and_start_recovers_with_a_whole_budget(circusd):
    cd = circusd.start(make_units(circusd.root, [CRASH]))
    name, w = ns("crash"), watcher("crash")
    first = wait_failed(cd, name)

    cd.reset(name)  # as atom-workerctl does, then a start
    info = cd.start_watcher(w)
    assert len(info["started"]) == 1
    second = wait_failed(cd, name)  # still crashing: exactly BURST more starts
    assert len(cd.starts(w)) == 2 * BURST
    assert len(second["starts"]) == BURST and min(second["starts"]) > first["failed_at"]

    cd.set_mode(w, "sleep")  # fixed: reset + start brings it back for good
    cd.reset(name)
    info = cd.start_watcher(w)
    assert len(info["started"]) == 1 and cd.status(w) == "active"
    entry = cd.entry(name)
    assert entry["failed"] is False and len(entry["starts"]) == 1 and entry["result"] == "success"
    assert cd.pids(w) == info["started"]


def test_exit_111_restarts_at_once_and_never_counts(circusd):
    # RestartSec=30: were recycles restarted as failures, five of them would take minutes, not seconds.
    cd = circusd.start(with_policy(make_units(circusd.root, [RECYCLE]), "recycle", restart_sec=30))
    name, w = ns("recycle"), watcher("recycle")
    cd.wait(lambda: entry_of(cd, name).get("n_recycles", 0) >= BURST + 2, 40, "more recycles than the burst")
    cd.wait(lambda: len(cd.starts(w)) >= BURST + 3, 20, "the start after the last recycle")

    entry = cd.entry(name)
    assert entry["failed"] is False
    assert len(entry["starts"]) == 1  # only the start at boot counted
    assert entry["n_restarts"] == 0
    assert not cd.policy_lines("start-limit-hit") and not cd.policy_lines("restart at")
    assert len(cd.policy_lines(f"{name}: exited (exit status 111 (recycle)): started again at once")) >= BURST + 2


def test_deliberate_stop_and_restart_are_never_failures_nor_restarted(circusd):
    control = {"name": "control", "instances": 1, "types": ["sleep"]}
    cd = circusd.start(make_units(circusd.root, [SLEEP, control]),
                       wait_active=[watcher("sleep"), watcher("control")])
    name, w = ns("sleep"), watcher("sleep")
    wait_starts(cd, name, 1)

    cd.set_mode(w, "trap:1")  # from its next start on, the worker ends a stop with exit status 1
    info = cd.restart_watcher(w)  # a deliberate restart: its start counts, the old run's end is no failure
    assert len(info["stopped"]) == 1 and len(info["started"]) == 1
    wait_starts(cd, name, 2)
    cd.wait_runs(w, 2)
    cd.stop_watcher(w)  # a deliberate stop of a worker that exits 1 when stopped
    assert cd.status(w) == "stopped"
    assert cd.exits(w)[-1]["code"] == 1

    control_restarted(cd, "control")  # a restart due in this time happened: this one was not
    assert cd.status(w) == "stopped"
    assert len(cd.starts(w)) == 2
    entry = cd.entry(name)
    assert entry["next_restart"] is None and entry["failed"] is False
    assert entry["last_exit"] is None and entry["result"] == "success" and entry["n_restarts"] == 0
    assert len(cd.policy_lines(f"{name}: stopped (")) == 2
    assert all("a deliberate stop, not restarted" in line for line in cd.policy_lines(f"{name}: stopped ("))

    # Deliberate starts count as every start does (the CLI resets first): the 4th in the window is refused.
    assert len(cd.start_watcher(w)["started"]) == 1
    info = cd.restart_watcher(w)
    assert len(info["stopped"]) == 1 and info["started"] == []
    assert cd.status(w) == "stopped"
    assert cd.entry(name)["failed"] is True and cd.entry(name)["result"] == "start-limit-hit"


def test_sigterm_is_a_clean_exit_and_sigkill_is_restarted(circusd):
    control = {"name": "control", "instances": 1, "types": ["sleep"]}
    cd = circusd.start(make_units(circusd.root, [SLEEP, control]),
                       wait_active=[watcher("sleep"), watcher("control")])
    name, w = ns("sleep"), watcher("sleep")

    cd.signal(w, signal.SIGTERM)  # dies by SIGTERM: clean for Restart=on-failure
    cd.wait(lambda: (entry_of(cd, name).get("last_exit") or {}).get("signal"), 20, "the SIGTERM death")
    control_restarted(cd, "control")
    assert cd.status(w) == "stopped" and len(cd.starts(w)) == 1
    entry = cd.entry(name)
    assert entry["last_exit"]["signal"] == "SIGTERM" and entry["last_exit"]["result"] == "success"
    assert entry["next_restart"] is None and entry["result"] == "success"
    assert cd.policy_lines(f"{name}: exited (killed by SIGTERM): not restarted (Restart=on-failure)")

    assert len(cd.start_watcher(w)["started"]) == 1
    cd.wait_runs(w, 2)
    pid = cd.pids(w)[0]
    cd.signal(w, signal.SIGKILL)  # an unclean signal: restarted RestartSec later
    cd.wait(lambda: len(cd.starts(w)) == 3 and cd.status(w) == "active", 20, "the restart after SIGKILL")
    entry = cd.entry(name)
    assert entry["last_exit"]["signal"] == "SIGKILL" and entry["last_exit"]["result"] == "signal"
    assert entry["n_restarts"] == 1 and len(entry["starts"]) == 3
    assert cd.pids(w) != [pid]
    assert cd.starts(w)[2]["t"] - entry["last_exit"]["at"] >= RESTART_SEC


def test_circusctl_kill_is_an_exit_as_any_other(circusd):
    # `kill` signals the process and, when it polls it first, reaps it itself (no after_reap then: the hooks see
    # the end when circus stops the watcher).
    cd = circusd.start(make_units(circusd.root, [SLEEP]), wait_active=[watcher("sleep")])
    name, w = ns("sleep"), watcher("sleep")
    cd.set_mode(w, "trap:3")
    cd.restart_watcher(w)
    cd.wait_runs(w, 2)
    cd.kill(w)  # SIGTERM: the worker exits 3, an unclean exit: restarted
    cd.wait(lambda: len(cd.starts(w)) == 3 and cd.status(w) == "active", 20, "the restart after the kill")
    entry = cd.entry(name)
    assert entry["last_exit"]["exit_status"] == 3 and entry["last_exit"]["result"] == "exit-code"
    assert entry["n_restarts"] == 1
    lines = cd.policy_lines(f"{name}: exited (exit status 3")  # reaped by circus or by the kill itself
    assert len(lines) == 1 and "restart at" in lines[0]


def test_the_window_expires_and_the_start_is_allowed_again(circusd):
    units = with_policy(make_units(circusd.root, [SLEEP]), "sleep", start_limit_interval_sec=5,
                        start_limit_burst=2)
    cd = circusd.start(units, wait_active=[watcher("sleep")])
    name, w = ns("sleep"), watcher("sleep")
    wait_starts(cd, name, 1)
    assert len(cd.restart_watcher(w)["started"]) == 1  # start 2/2
    assert cd.restart_watcher(w)["started"] == []  # start 3 within 5 s: refused
    first = cd.entry(name)
    assert first["failed"] is True and len(first["starts"]) == 2

    cd.wait(lambda: time.time() > first["starts"][0] + 5 + 0.1, 10, "the window to be over")
    assert len(cd.start_watcher(w)["started"]) == 1  # no reset: the window is over
    entry = cd.entry(name)
    assert entry["failed"] is False and len(entry["starts"]) == 1 and entry["starts"][0] > first["failed_at"]
    assert cd.policy_lines(f"{name}: start-limit window over (StartLimitIntervalSec=5s): start allowed")


def test_the_notice_command_runs_once_per_give_up(circusd, tmp_path):
    notices = tmp_path / "notices.jsonl"
    command = tmp_path / "atom-workerctl"
    command.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {notices}\necho notice output for \"$2\"\n")
    command.chmod(0o755)
    cd = circusd.start(make_units(circusd.root, [CRASH, CLEAN]), circus={"notify_command": str(command)})
    name, w = ns("crash"), watcher("crash")
    wait_failed(cd, name)
    cd.wait(lambda: notices.exists() and notices.read_text().strip(), 20, "the notice")
    assert cd.start_watcher(w)["started"] == []  # refused: failed already, no new give-up

    assert len(cd.policy_lines("sends the notice")) == 1  # logged at the give-up itself (synchronous)
    assert notices.read_text().splitlines() == [f"notify {w}"]
    cd.wait(lambda: cd.policy_lines(f"notice output for {w}"), 20, "the command's output in the policy log")
    assert (entry_of(cd, ns("clean")).get("last_exit") or {}).get("result") == "success"  # no notice for it


def test_spawn_errors_are_failed_starts(circusd):
    cd = circusd.start(make_units(circusd.root, [SLEEP], php="/nonexistent/php"))
    name, w = ns("sleep"), watcher("sleep")
    entry = wait_failed(cd, name)
    assert len(entry["starts"]) == BURST and entry["result"] == "start-limit-hit"
    assert entry["last_exit"]["spawn_error"] == "can't find command '/nonexistent/php'"
    assert len(cd.policy_lines(f"{name}: could not be started (can't find command")) == BURST
    assert cd.status(w) == "stopped"


def test_the_failed_state_survives_a_circusd_restart(circusd):
    cd = circusd.start(make_units(circusd.root, [CRASH, SLEEP]))
    wait_failed(cd, ns("crash"))
    old = cd.proc.pid
    cd.quit()  # systemctl stop: every watcher stopped, deliberately
    assert not cd.entry(ns("sleep"))["failed"]

    cd.start(make_units(circusd.root, [CRASH, SLEEP]), wait_active=[watcher("sleep")])  # autostart again
    assert cd.proc.pid != old and cd.state()["listener"]["pid"] == cd.proc.pid
    assert cd.status(watcher("crash")) == "stopped"  # refused at boot, nothing spawned
    assert len(cd.starts(watcher("crash"))) == BURST
    assert len(cd.policy_lines(f"{ns('crash')}: start refused: failed")) == 1
    assert len(cd.entry(ns("sleep"))["starts"]) == 2  # the boot start of the new circusd counted


def test_a_broken_policy_allows_starts_and_says_so(circusd, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    cd = circusd.start(make_units(circusd.root, [SLEEP]), circus={"state_file": str(blocker / "state.json")},
                       wait_active=[watcher("sleep")])
    assert cd.status(watcher("sleep")) == "active"  # the hook failed: the start went ahead
    assert cd.policy_lines("internal error in hook before_start of atom-worker-default-sleep@1")
    assert cd.policy_lines("atom-worker-default-sleep@1: start ALLOWED without the restart policy")
    assert cd.call("status")["status"] == "ok"  # circusd is fine


def test_the_shared_log_rotates_as_one_file(circusd):
    units = make_units(circusd.root, [SLEEP])
    cd = circusd.start(units, circus={"log_max_bytes": 300, "log_backups": 2}, wait_active=[watcher("sleep")])
    w = watcher("sleep")
    cd.wait_runs(w, 1)
    for n in range(2, 8):
        cd.restart_watcher(w)  # each start writes one stdout and one stderr line (~50 bytes each)
        cd.wait_runs(w, n)
        cd.reset(ns("sleep"))
    cd.wait((cd.log_dir / f"{w}.log.1").exists, 20, "a rotation")
    files = sorted(p.name for p in cd.log_dir.glob(f"{w}.log*"))
    assert files == [f"{w}.log", f"{w}.log.1", f"{w}.log.2"]
    text = "".join((cd.log_dir / f).read_text() for f in files)
    assert text.count("(stdout)") == text.count("(stderr)") == 7  # every line once, none lost to a second rotator
    assert all(line.startswith("fake worker ") for line in text.splitlines())  # no time stamp prefix


def test_the_rendered_command_is_the_systemd_execstart(circusd):
    pool = dict(SLEEP, abilities=["x"], max_job_count=10)
    units = make_units(circusd.root, [pool, dict(RECYCLE, max_job_count=5)], recycle_helper="/usr/local/bin/rec")
    text = circusd.render(units)
    env = manager_tests.plain_env()
    for unit in units[1:]:
        unit_file = env.get_template("atom-worker@.service.j2").render(unit=unit)
        exec_start = next(line for line in unit_file.splitlines() if line.startswith("ExecStart="))
        assert f"cmd = {exec_start[len('ExecStart='):]}" in text
    assert "[watcher:atom-worker-default-sleep@1]" in text and "[env:atom-worker-default-recycle@1]" in text
    assert "stop_children = false" in text  # the recycling pool: KillMode=mixed
