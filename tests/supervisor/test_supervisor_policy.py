"""The atom-worker-policy listener on a real supervisord: systemd's Restart=on-failure, RestartSec and
StartLimitIntervalSec/StartLimitBurst for supervisord programs.

The policy here is RestartSec=1, StartLimitIntervalSec=60, StartLimitBurst=3. Waits poll with a
deadline that only guards against hangs; timing assertions are lower bounds and ordering only.
"""

import json
import subprocess
import time

import manager_tests
import pytest
import supervisor_harness
from manager_tests import BURST, CLEAN, CRASH, RECYCLE, RESTART_SEC, SLEEP, entry_of, ns, wait_failed, wait_starts
from supervisor_harness import make_units

pytestmark = pytest.mark.timeout(60)
# The fixture, from the harness (tests/ has several test folders: no shared conftest module).
supervisord = supervisor_harness.supervisord


def test_crash_loop_stops_after_exactly_burst_starts_with_the_delay_and_stays_down(supervisord):
    sv = supervisord.start(make_units(supervisord.root, [CRASH]))
    name = ns("crash")

    entry = wait_failed(sv, name)
    time.sleep(3 * RESTART_SEC)  # several RestartSec later: still down, nothing started

    assert len(sv.records(name)) == BURST
    assert sv.statename(name) == "EXITED"  # as the last crash left it; supervisord never restarts it
    entry = sv.entry(name)
    assert entry["failed"] is True
    assert entry["result"] == "start-limit-hit"
    assert len(entry["starts"]) == BURST
    assert entry["next_restart"] is None
    assert entry["n_restarts"] == BURST - 1
    assert entry["last_exit"]["exit_status"] == 1
    assert entry["last_exit"]["result"] == "exit-code"
    assert entry["failed_at"] >= entry["starts"][-1]
    assert entry["policy"] == {"restart": "on-failure", "restart_sec": 1.0,
                               "start_limit_interval_sec": 60.0, "start_limit_burst": 3}
    hits = sv.policy_lines("start-limit-hit")
    assert len(hits) == 1 and name in hits[0] and "atom-worker-policy reset --start" in hits[0]

    # The restart delay: each start at least RestartSec after the one before (a lower bound only).
    times = [record["t"] for record in sv.records(name)]
    for before, after in zip(times, times[1:], strict=False):
        assert after - before >= RESTART_SEC

    status = sv.policy("status")
    assert status.returncode == 3, status  # some process failed
    assert "failed" in status.stdout and "start-limit-hit" in status.stdout
    as_json = json.loads(sv.policy("status", "--json", name).stdout)
    assert as_json["processes"][name]["result"] == "start-limit-hit"


def test_reset_recovers_with_a_whole_budget(supervisord):
    sv = supervisord.start(make_units(supervisord.root, [CRASH]))
    name = ns("crash")
    first = wait_failed(sv, name)

    reset = sv.policy("reset", "--start", name)
    assert reset.returncode == 0, reset
    assert f"reset {name} (was failed (start-limit-hit))" in reset.stdout
    assert f"started {name}" in reset.stdout

    second = wait_failed(sv, name)
    assert len(sv.records(name)) == 2 * BURST  # exactly BURST more starts after the reset
    assert len(second["starts"]) == BURST
    assert min(second["starts"]) > first["failed_at"]
    assert second["failed_at"] > first["failed_at"]


def test_exit_zero_is_not_restarted(supervisord):
    sv = supervisord.start(make_units(supervisord.root, [CLEAN]))
    name = ns("clean")
    sv.wait(lambda: entry_of(sv, name).get("last_exit"), 15, "the clean exit")
    time.sleep(2 * RESTART_SEC + 0.5)

    assert len(sv.records(name)) == 1
    assert sv.statename(name) == "EXITED"
    entry = sv.entry(name)
    assert entry["last_exit"]["exit_status"] == 0
    assert entry["last_exit"]["expected"] is True
    assert entry["result"] == "success"
    assert entry["next_restart"] is None and entry["failed"] is False
    assert any("not restarted (Restart=on-failure)" in line for line in sv.policy_lines(name))


def test_manual_starts_count_and_a_failed_process_refuses_starts_until_reset(supervisord):
    sv = supervisord.start(make_units(supervisord.root, [SLEEP]), wait_running=[ns("sleep")])
    name = ns("sleep")
    wait_starts(sv, name, 1)  # the start at boot counts

    for expected in (2, 3):  # deliberate restarts without reset spend the budget, as with systemd
        sv.ctl("restart", name, check=True)
        wait_starts(sv, name, expected)
        assert sv.statename(name) == "RUNNING"

    sv.ctl("restart", name)  # the 4th start within the interval
    entry = wait_failed(sv, name)
    sv.wait(lambda: sv.statename(name) == "STOPPED", 15, "the refused start to be stopped")
    assert entry["result"] == "start-limit-hit"
    assert len(entry["starts"]) == BURST

    sv.ctl("start", name)  # a failed process refuses starts until it is reset
    sv.wait(lambda: sv.policy_lines("start refused: failed"), 15, "the refusal")
    sv.wait(lambda: sv.statename(name) == "STOPPED", 15, "the refused start to be stopped")
    assert sv.entry(name)["failed"] is True

    reset = sv.policy("reset", "--start", "atom-workers")  # a group name: every process of the group
    assert reset.returncode == 0, reset
    sv.wait(lambda: sv.statename(name) == "RUNNING", 15, "the start after reset")
    wait_starts(sv, name, 1)
    time.sleep(0.5)
    assert sv.statename(name) == "RUNNING"
    assert sv.entry(name)["failed"] is False


def test_exit_111_reaching_the_listener_restarts_at_once_and_never_counts(supervisord):
    # No recycle helper in front: php's 111 reaches supervisord and the listener.
    sv = supervisord.start(make_units(supervisord.root, [RECYCLE]))
    name = ns("recycle")
    sv.wait(lambda: len(sv.records(name)) >= BURST + 2, 30, "more recycles than the burst")
    sv.wait(lambda: entry_of(sv, name).get("n_recycles", 0) >= BURST + 1, 15, "the listener to see them")

    entry = sv.entry(name)
    assert entry["failed"] is False
    assert len(entry["starts"]) == 1  # only the first start counted
    assert entry["n_restarts"] == 0
    assert not sv.policy_lines("start-limit-hit")
    times = [record["t"] for record in sv.records(name)]
    assert times == sorted(times)


def test_the_recycle_helper_keeps_recycling_inside_one_start(supervisord):
    helper = supervisord.base / "atom-worker-recycle"
    helper.write_text(manager_tests.plain_env().get_template("atom-worker-recycle.j2").render())
    helper.chmod(0o755)
    pool = dict(RECYCLE, max_job_count=1)
    units = make_units(supervisord.root, [pool], recycle_helper=str(helper))
    assert units[-1]["recycle"] is True
    sv = supervisord.start(units, wait_running=[ns("recycle")])
    name = ns("recycle")
    pid = sv.info(name)["pid"]
    sv.wait(lambda: len(sv.records(name)) >= BURST + 2, 30, "more recycles than the burst, inside the helper")

    assert sv.info(name)["pid"] == pid and sv.statename(name) == "RUNNING"
    wait_starts(sv, name, 1)
    entry = sv.entry(name)
    assert len(entry["starts"]) == 1 and entry["n_recycles"] == 0 and entry["failed"] is False
    assert all(record["argv"][-1] == "--max-job-count=1" for record in sv.records(name))

    sv.ctl("stop", name, check=True)  # TERM to the helper, forwarded to php: a clean stop
    assert sv.statename(name) == "STOPPED"


def test_signals_as_systemd_on_failure(supervisord):
    sv = supervisord.start(make_units(supervisord.root, [SLEEP]), wait_running=[ns("sleep")])
    name = ns("sleep")
    wait_starts(sv, name, 1)
    sv.wait(lambda: len(sv.records(name)) == 1, 15, "the first run's record")

    sv.ctl("signal", "TERM", name, check=True)  # a clean signal: not restarted
    sv.wait(lambda: (entry_of(sv, name).get("last_exit") or {}).get("signal"), 15, "the TERM death")
    time.sleep(2 * RESTART_SEC + 0.5)
    assert sv.statename(name) == "EXITED"
    assert len(sv.records(name)) == 1
    assert sv.entry(name)["last_exit"]["signal"] == "SIGTERM"
    assert sv.entry(name)["last_exit"]["result"] == "success"

    sv.ctl("start", name, check=True)
    wait_starts(sv, name, 2)
    sv.wait(lambda: len(sv.records(name)) == 2, 15, "the second run's record")
    sv.ctl("signal", "KILL", name, check=True)  # an unclean signal: restarted after RestartSec
    wait_starts(sv, name, 3)
    sv.wait(lambda: sv.statename(name) == "RUNNING", 15, "the restart after SIGKILL")
    sv.wait(lambda: len(sv.records(name)) == 3, 15, "the third run's record")
    entry = sv.entry(name)
    assert entry["last_exit"]["signal"] == "SIGKILL"
    assert entry["last_exit"]["result"] == "signal"
    assert entry["n_restarts"] == 1
    records = sv.records(name)
    assert len(records) == 3 and records[2]["t"] - records[1]["t"] >= RESTART_SEC


def test_spawn_errors_are_failed_starts_and_end_fatal(supervisord):
    units = make_units(supervisord.root, [SLEEP], php="/nonexistent/php")
    sv = supervisord.start(units)
    name = ns("sleep")
    entry = wait_failed(sv, name)
    assert len(entry["starts"]) == BURST
    assert entry["result"] == "start-limit-hit"
    assert "can't find command" in entry["last_exit"]["spawn_error"]
    assert sv.statename(name) == "FATAL"


def test_the_budget_survives_a_listener_crash(supervisord):
    sv = supervisord.start(make_units(supervisord.root, [SLEEP]), wait_running=[ns("sleep")])
    name = ns("sleep")
    listener = "atom-worker-policy:atom-worker-policy"
    wait_starts(sv, name, 1)
    sv.ctl("restart", name, check=True)
    wait_starts(sv, name, 2)

    old_pid = sv.info(listener)["pid"]
    sv.ctl("signal", "KILL", listener, check=True)
    sv.ctl("restart", name, check=True)  # start 3, while the listener is down: queued for it
    sv.wait(lambda: sv.info(listener)["pid"] not in (0, old_pid) and sv.statename(listener) == "RUNNING",
            20, "supervisord to restart the listener")
    wait_starts(sv, name, 3)

    sv.ctl("restart", name)  # start 4: refused
    assert wait_failed(sv, name)["result"] == "start-limit-hit"


def test_the_failed_state_survives_a_supervisord_reload(supervisord):
    sv = supervisord.start(make_units(supervisord.root, [SLEEP]), wait_running=[ns("sleep")])
    name = ns("sleep")
    wait_starts(sv, name, 1)
    for _ in range(BURST):
        sv.ctl("restart", name)
    wait_failed(sv, name)
    pid = sv.info("atom-worker-policy:atom-worker-policy")["pid"]

    sv.ctl("reload", check=True)  # supervisord stops everything, rereads, autostarts everything
    sv.wait(lambda: len(sv.policy_lines("start refused: failed")) >= 1, 20, "the autostart to be refused")
    sv.wait(lambda: sv.statename(name) == "STOPPED", 15, "the refused autostart to be stopped")
    assert sv.info("atom-worker-policy:atom-worker-policy")["pid"] != pid
    assert sv.entry(name)["failed"] is True


def test_the_listener_survives_malformed_events(tmp_path):
    """Feed the listener protocol by hand (no supervisord behind it: every XML-RPC call fails)."""
    state_file = tmp_path / "state.json"
    proc = subprocess.Popen(
        [str(manager_tests.POLICY), "listen", "--state-file", str(state_file), "--server-url",
         f"unix://{tmp_path}/nothing.sock", "--restart-sec", "1", "--start-limit-interval-sec", "60",
         "--start-limit-burst", "3"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )

    def expect(data):
        assert proc.stdout.read(len(data)) == data

    def send(raw):
        proc.stdin.write(raw)
        proc.stdin.flush()
        expect(b"RESULT 2\nOK")
        expect(b"READY\n")

    def event(name, payload):
        body = payload if isinstance(payload, bytes) else payload.encode()
        header = f"ver:3.0 server:supervisor serial:1 pool:p poolserial:1 eventname:{name} len:{len(body)}\n"
        send(header.encode() + body)

    try:
        expect(b"READY\n")
        send(b"garbage without a length\n")
        send(b"ver:3.0 eventname:TICK_5 len:notanumber\n")
        send(b"ver:3.0 eventname:TICK_5 len:-3\n")
        event("PROCESS_STATE_EXITED", "processname:x")  # no group
        event("PROCESS_STATE_STARTING", b"\xff\xfe not utf-8 \x00")
        event("SOMETHING_ELSE", "a b c")
        event("TICK_5", "when:1")
        event("PROCESS_STATE_EXITED", "processname:p@1 groupname:atom-workers from_state:RUNNING expected:zz pid:x")
        for _ in range(4):  # four starts of a managed process: the fourth hits the limit
            event("PROCESS_STATE_STARTING", "processname:p@1 groupname:atom-workers from_state:STOPPED tries:0")
        event("PROCESS_STATE_STARTING", "processname:other groupname:unmanaged from_state:STOPPED tries:0")

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if state_file.exists():
                entry = json.loads(state_file.read_text())["processes"].get("atom-workers:p@1") or {}
                if entry.get("failed"):
                    break
            time.sleep(0.05)
        state = json.loads(state_file.read_text())
        assert state["processes"]["atom-workers:p@1"]["result"] == "start-limit-hit"
        assert len(state["processes"]["atom-workers:p@1"]["starts"]) == 3
        assert "unmanaged:other" not in state["processes"]
        assert proc.poll() is None  # still serving
    finally:
        proc.stdin.close()
        assert proc.wait(10) == 0  # EOF on stdin: supervisord is stopping it
        stderr = proc.stderr.read().decode()
        proc.stdout.close()
        proc.stderr.close()
    assert "malformed event" in stderr
    assert "start-limit-hit" in stderr
