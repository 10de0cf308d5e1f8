"""atom-workerctl on a real supervisord host: sv-host converged by site.yml with atom_worker_manager=supervisor
(the session fixture `supervisor_lab`, tests/supervisor/conftest.py): Debian's supervisor package, the
atom-worker-policy listener (RestartSec=2, the docs' start limit: 3 starts in 24 h), gearmand and two
AtoM stand-in workers, atom-workerctl installed by the role.

Run inside the lab network: tools/lab/lab exec -- .venv/bin/pytest tests/supervisor/test_supervisor_cli_lab.py
The module leaves the host as it found it (two workers registered, numprocs=2, budgets reset) for the
other modules sharing the fixture.
"""

import json
import subprocess
import time

import pytest
from gearman_sampler import HostSampler, hold_stopped
from labhosts import REPO
from standin import KNOWN_CLASSES

pytestmark = pytest.mark.timeout(600)

CONF = "/etc/supervisor/conf.d/atom-worker.conf"
W1, W2 = "atom-worker@1", "atom-worker@2"


def ctl(lab, *args):
    proc = lab.workerctl(*args)
    return proc.returncode, proc.stdout, proc.stderr


def status(lab, *args):
    code, out, err = ctl(lab, "status", "--json", *args)
    data = json.loads(out)
    assert data["exit_code"] == code, err
    return code, data


def instances(data):
    return {u["instance"]: u for s in data["sites"] for p in s["pools"] for u in p["units"]}


def all_registered(lab, count=2):
    code, data = status(lab)
    return code == 0 and data["summary"]["registered"] == count == data["summary"]["active"]


def run_fix(lab, fix):
    return lab.run(fix.split("#", 1)[0].strip(), check=False, timeout=180)


def test_status_and_doctor_on_supervisord(supervisor_lab):
    lab = supervisor_lab
    lab.wait(lambda: all_registered(lab), 60, "both workers registered")
    code, data = status(lab)
    assert data["manager"] == "supervisor" and data["host"] == lab.host
    assert data["summary"] == {"instances": 2, "active": 2, "not_active": 0, "start_limit_hit": 0, "registered": 2,
                               "gearman_unreachable": 0}
    procs = lab.processes()
    for n, unit in instances(data).items():
        assert unit["active_state"] == "active" and unit["enabled"] and not unit["need_daemon_reload"]
        assert unit["main_pid"] == procs[f"atom-workers:atom-worker@{n}"]["pid"]
        assert unit["start_limit"] == {"burst": 3, "interval_sec": 86400, "hit": False, "reason": None}
        assert unit["gearman"]["registered"] is True and unit["gearman"]["connected"]
    code, out, _ = ctl(lab, "status")
    assert code == 0 and "(supervisor): 2 instances, 2 active" in out
    code, out, _ = ctl(lab, "doctor")
    assert code == 0 and out.startswith("healthy"), out


def test_rolling_restart_and_deliberate_restarts_keep_the_budget(supervisor_lab):
    lab = supervisor_lab
    functions = [f"{status(lab)[1]['sites'][0]['prefix']}-{c}" for c in KNOWN_CLASSES]
    # gearmand (on the host's loopback) sampled every 20 ms around the rolling restart.
    sampler = HostSampler(lab.hosts, lab.host, interval=0.02)
    # The control: W2 held stopped for a second, then started by `reset`; the probe must see 1 of 2 then.
    def reset():
        assert ctl(lab, "reset")[0] == 0, "reset did not start W2"
    held = hold_stopped(lambda: lab.supervisorctl("stop", f"atom-workers:{W2}", check=True), reset)
    before = {n: u["main_pid"] for n, u in instances(status(lab)[1]).items()}
    began = time.monotonic()
    code, out, err = ctl(lab, "restart", "--rolling")
    ended = time.monotonic()
    time.sleep(0.5)  # samples after the restart, too
    sampler.stop()
    assert code == 0, out + err
    assert "[1/2] atom-worker@1: registered again" in out and "[2/2] atom-worker@2: registered again" in out
    after = {n: u["main_pid"] for n, u in instances(status(lab)[1]).items()}
    assert all(before[n] != after[n] for n in before)
    # Never 0 available for any function (missing counts as 0) during the rolling restart; the same probe
    # saw every function at 1 of 2 while W2 was held stopped.
    assert not sampler.errors, sampler.errors
    sampler.check_held(held, dict.fromkeys(functions, 1), "W2 held stopped")
    sampler.check_window(began, ended)
    lowest = sampler.minimum(functions, between=(began, ended))
    assert min(lowest.values()) >= 1, lowest
    for _ in range(4):  # more than StartLimitBurst deliberate restarts
        assert ctl(lab, "restart", W1, "--no-wait")[0] == 0
    lab.wait(lambda: all_registered(lab), 60, "registered after the restarts")
    entry = lab.policy_state()["processes"]["atom-workers:atom-worker@1"]
    assert entry["failed"] is False and len(entry["starts"]) == 1 and entry["n_restarts"] == 0


def test_logs_from_the_log_files_merged_and_followed(supervisor_lab):
    lab = supervisor_lab
    code, out, _ = ctl(lab, "logs", "-n", "30", "--json")
    assert code == 0
    entries = [json.loads(line) for line in out.splitlines()]
    assert entries and {e["instance"] for e in entries} <= {W1, W2}
    assert [e["usec"] for e in entries] == sorted(e["usec"] for e in entries)
    assert any(e["source"] == "worker" and "Running worker" in e["message"] for e in entries), entries
    follow = subprocess.Popen([str(REPO / "tools/lab/lab"), "run", lab.host, "--", "timeout", "15", "atom-workerctl",
                               "logs", "-f", "-n", "0", W1], stdout=subprocess.PIPE, text=True)
    time.sleep(2.5)
    ctl(lab, "restart", W1, "--no-wait")
    time.sleep(1.5)
    ctl(lab, "restart", W1, "--no-wait")
    out = follow.communicate(timeout=40)[0]
    assert out.count(f"{W1} [policy]: started") == 2, out
    assert out.count(f"{W1}: Job worker termination requested.") == 2, out
    assert W2 not in out
    lab.wait(lambda: all_registered(lab), 60, "registered after the restarts")


def test_crash_loop_start_limit_then_reset_registers_again(supervisor_lab):
    lab = supervisor_lab
    lab.control(crash_at_start=3)
    try:
        assert ctl(lab, "restart", W2, "--no-wait")[0] == 0
        lab.wait(lambda: instances(status(lab, W2)[1])["2"]["start_limit"]["hit"], 60, "the start limit")
    finally:
        lab.control()
    code, data = status(lab)
    w2 = instances(data)["2"]
    assert code == 3 and data["summary"]["start_limit_hit"] == 1
    assert (w2["active_state"], w2["result"], w2["n_restarts"]) == ("failed", "start-limit-hit", 2)
    assert w2["exit"] == {"code": "exited", "status": 3}
    code, out, _ = ctl(lab, "status", W2)
    assert code == 3 and "START LIMIT HIT" in out
    code, out, _ = ctl(lab, "doctor", "--json")
    finding = next(f for f in json.loads(out)["findings"] if f["code"] == "start_limit_hit")
    assert code == 3 and finding["subject"] == W2
    assert any("start-limit-hit" in e for e in finding["evidence"])
    assert any("crash_at_start" in e for e in finding["evidence"])
    assert finding["fix"][-1] == f"atom-workerctl reset {W2}"
    time.sleep(5)  # stays down by itself
    assert lab.processes()[f"atom-workers:{W2}"]["state"] == "EXITED"
    proc = run_fix(lab, finding["fix"][-1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{W2}: was failed (start limit hit)" in proc.stdout and f"{W2}: active and registered" in proc.stdout
    assert all_registered(lab)
    assert ctl(lab, "doctor")[0] == 0


def test_scale_raises_numprocs_and_stops_beyond(supervisor_lab):
    lab = supervisor_lab
    try:
        code, out, err = ctl(lab, "scale", "3")
        assert code == 0, out + err
        assert "numprocs atom-worker 2 -> 3" in out and "next site.yml run returns the pool" in out
        assert "numprocs=3" in lab.run(f"grep '^numprocs=' {CONF}").stdout
        assert all_registered(lab, 3)
        assert lab.sites()["sites"][0]["pools"][0]["instances"] == 3
        code, out, err = ctl(lab, "scale", "2")
        assert code == 0, out + err
        assert lab.processes()["atom-workers:atom-worker@3"]["state"] == "STOPPED"
        assert all_registered(lab, 2)
        assert status(lab)[1]["strays"] == []
    finally:
        # Back to the role's configuration (numprocs=2) for the modules after this one.
        lab.run(f"sed -i 's/^numprocs=3$/numprocs=2/' {CONF}")
        ctl(lab, "daemon-reload")
    lab.wait(lambda: all_registered(lab), 60, "registered after daemon-reload")
    assert "atom-workers:atom-worker@3" not in lab.processes()
    assert ctl(lab, "doctor")[0] == 0


def test_errors_are_one_line(supervisor_lab):
    lab = supervisor_lab
    proc = lab.run("runuser -u nobody -- atom-workerctl status", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("atom-workerctl: error: ") and "permission denied" in proc.stderr
    proc = lab.run("systemctl stop supervisor && atom-workerctl status; echo rc=$?; systemctl start supervisor",
                   check=False)
    assert "rc=1" in proc.stdout and proc.stderr.count("\n") == 1, proc
    assert "cannot reach supervisord" in proc.stderr
    lab.wait_running()
    lab.wait(lambda: all_registered(lab), 90, "registered after supervisord's restart")
    lab.policy("reset", "--all")  # supervisord's autostart counted a start: a whole budget for what follows
    code, _, err = ctl(lab, "reset", "atom-worker-nope@1")
    assert code == 4 and err.count("\n") == 1 and "no such instance" in err
