"""The atom_worker role with atom_worker_manager=supervisor on a real host (tools/lab, Debian's supervisor).

sv-host (the session fixture `supervisor_lab`, conftest.py) runs gearmand and two workers of the AtoM
stand-in as supervisord programs, converged with site.yml; RestartSec=2, the start limit the docs' 3
starts in 24 h. Checked here: the workers are not systemd units and run as www-data with the systemd
unit's command; they register with gearmand; a crash loop stops after StartLimitBurst starts, each at
least RestartSec after the exit before it, and stays down; `atom-worker-policy reset --start` brings it
back; recycling (exit 111 at --max-job-count) never counts; a second site.yml run changes nothing and
restarts nothing.

Run inside the lab network: tools/lab/lab exec -- .venv/bin/pytest tests/supervisor/test_supervisor_lab.py
"""

import hashlib
import json
import shlex
import time

import pytest
from labhosts import ATOM_ROOT
from manager_tests import assert_burst_starts_apart, assert_lab_worker_runs_as_the_unit, lab_exec_start
from supervisor_harness import make_units
from supervisor_lab import (
    CONF_FILE,
    INSTANCES,
    LOG_DIR,
    POLICY,
    POLICY_CONF_FILE,
    POLICY_STATE,
    RESTART_SEC,
    SERVER_URL,
)

pytestmark = pytest.mark.timeout(900)

W1, W2 = "atom-workers:atom-worker@1", "atom-workers:atom-worker@2"
LISTENER = "atom-worker-policy"
RECYCLED = "atom-workers:atom-worker-default-recycled@1"
RECYCLE_POOL = {"name": "recycled", "instances": 1, "types": ["csv_validation"], "max_job_count": 1}
# Counted the same way gearmand's admin `workers` lists them: one line per connection, its functions.
GEARMAN_WORKERS = (
    "import socket,sys\n"
    "s=socket.create_connection(('127.0.0.1',4730),5); s.sendall(b'workers\\n'); b=b''\n"
    "while not b.endswith(b'\\n.\\n'): b+=s.recv(65536)\n"
    "print(b.decode())\n"
)


def host_time(lab):
    return float(lab.run("date +%s.%N").stdout)


def registered(lab, prefix):
    """How many connections to gearmand register the site's whole set of functions."""
    out = lab.run(f"python3 -c {shlex.quote(GEARMAN_WORKERS)}").stdout
    return sum(1 for line in out.splitlines()
               if line.count(f"{prefix}-") >= 18 and f"{prefix}-arFindingAidJob" in line)


def pids(lab):
    procs = lab.processes()
    return {name: p["pid"] for name, p in procs.items()}


def entry(lab, name):
    return lab.policy_state().get("processes", {}).get(name, {})


def test_the_workers_are_supervisord_programs_not_systemd_units(supervisor_lab):
    lab = supervisor_lab
    units = lab.run("systemctl list-units --all --plain --no-legend --no-pager 'atom-worker*' 'atom-workers*'").stdout
    assert units.strip() == ""
    files = lab.run("ls /etc/systemd/system | grep -c '^atom-worker' || true").stdout.strip()
    assert files == "0"
    assert lab.run("systemctl is-active supervisor").stdout.strip() == "active"

    procs = lab.processes()
    assert {n for n, p in procs.items() if p["state"] == "RUNNING"} == {W1, W2, LISTENER}, procs
    command = shlex.split(lab_exec_start({"name": "default", "instances": INSTANCES}))
    for name in (W1, W2):
        pid = procs[name]["pid"]
        assert_lab_worker_runs_as_the_unit(lab, pid, command)
    conf = lab.run(f"cat {CONF_FILE}").stdout
    assert "stopsignal=TERM" in conf and "numprocs=2" in conf and "stdout_logfile_maxbytes=50MB" in conf
    assert "Running worker..." in lab.run(f"cat {LOG_DIR}/atom-worker@1.log").stdout
    listener = lab.run(f"cat {POLICY_CONF_FILE}").stdout
    assert f"--restart-sec {RESTART_SEC} " in listener and "--start-limit-burst 3 " in listener


def test_sites_json_carries_the_supervisor_contract(supervisor_lab):
    state = supervisor_lab.sites()
    assert state["manager"] == "supervisor" and state["schema"] == 1
    assert state["supervisor"] == {
        "server_url": SERVER_URL,
        "conf_file": CONF_FILE,
        "policy_conf_file": POLICY_CONF_FILE,
        "log_dir": LOG_DIR,
        "policy_command": POLICY,
        "policy_state_file": POLICY_STATE,
    }
    pool = state["sites"][0]["pools"][0]
    assert pool["unit_template"] == "atom-worker@.service"
    assert pool["units"] == ["atom-worker@1.service", "atom-worker@2.service"]
    assert state["sites"][0]["target"] == "atom-workers.target"


def test_the_workers_register_with_gearmand(supervisor_lab):
    lab = supervisor_lab
    prefix = lab.sites()["sites"][0]["prefix"]
    lab.wait(lambda: registered(lab, prefix) == INSTANCES, 60, "both workers registered with gearmand")


def test_a_crash_loop_stops_after_the_burst_with_the_restart_delay_and_stays_down(supervisor_lab):
    lab = supervisor_lab
    w1_pid = lab.processes()[W1]["pid"]
    since = host_time(lab)
    lab.control(crash_at_start=3)
    try:
        # A deliberate restart resets the counter first (as the role and atom-workerctl do).
        lab.policy("reset", W2, check=True)
        lab.supervisorctl("restart", W2, check=True)
        lab.wait(lambda: entry(lab, W2).get("failed"), 90, f"{W2} to hit the start limit")
    finally:
        lab.control()
    e = entry(lab, W2)
    assert e["result"] == "start-limit-hit" and e["n_restarts"] == 2, e
    assert e["last_exit"]["exit_status"] == 3 and e["last_exit"]["result"] == "exit-code", e
    # Exactly StartLimitBurst starts, each at least RestartSec after the previous one's exit.
    assert_burst_starts_apart(lab.record(), since, e, RESTART_SEC)
    assert lab.policy("status", W2).returncode == 3
    assert "start-limit-hit" in lab.run(f"cat {LOG_DIR}/atom-worker-policy.log").stdout

    # It stays down: several RestartSec and listener ticks (TICK_5) later, no new start.
    time.sleep(2 * RESTART_SEC + 6)
    assert not [ev for ev in lab.record() if ev["time"] > since and ev["event"] == "start"][3:]
    assert lab.processes()[W2]["state"] == "EXITED"
    assert entry(lab, W2)["failed"]
    w1 = lab.processes()[W1]
    assert w1["state"] == "RUNNING" and w1["pid"] == w1_pid


def test_reset_start_recovers_the_failed_worker(supervisor_lab):
    lab = supervisor_lab
    assert entry(lab, W2).get("failed"), "the crash-loop test leaves the worker failed"
    proc = lab.policy("reset", "--start", W2)
    assert proc.returncode == 0 and f"started {W2}" in proc.stdout, proc
    lab.wait_running([W2])
    e = entry(lab, W2)
    assert not e["failed"] and len(e["starts"]) == 1 and e["n_restarts"] == 0, e
    assert lab.policy("status").returncode == 0
    prefix = lab.sites()["sites"][0]["prefix"]
    lab.wait(lambda: registered(lab, prefix) == INSTANCES, 60, "the reset worker registered again")


def test_what_a_failed_apply_owed_is_done_by_the_next_converge(supervisor_lab):
    """As under systemd (tests/roles/test_roles_restarts_lab.py): a converge that rewrote app.yml but whose
    cache clear failed (a cache file root left behind) leaves the workers on the old key; the next converge,
    with no file left to write, clears the cache and restarts them, and the one after changes nothing.
    In between, `atom-workerctl doctor` names what the unfinished converge owes; after site.yml, nothing."""
    lab = supervisor_lab
    key = {"atom_worker_workers_key": "site-c"}
    new_prefix = hashlib.md5(f"{ATOM_ROOT}site-c".encode()).hexdigest()
    before = pids(lab)
    stuck = f"{ATOM_ROOT}/cache/qubit/stuck"
    try:
        lab.run(f"mkdir -p {stuck} && touch {stuck}/file")  # root's: the site's user cannot remove it
        failed = lab.playbook(key, with_cli=False)
        assert failed.returncode != 0 and "Unable to remove" in failed.stdout, failed
        assert pids(lab) == before and registered(lab, new_prefix) == 0  # still the old key
        proc = lab.workerctl("doctor", "--json")
        found = [f for f in json.loads(proc.stdout)["findings"] if f["code"] == "apply_pending"]
        assert proc.returncode == 3 and len(found) == 1, proc.stdout
        owes = found[0]["summary"]
        assert owes.startswith(
            "an earlier converge stopped before it applied everything; it still owes: clear the cache of site "
            "default (if the role clears caches); ") and "restart atom-worker@1, atom-worker@2" in owes, found
        assert found[0]["fix"][0].startswith("by hand: run site.yml again"), found
        lab.run(f"rm -r {stuck}")
        mark = len(lab.record())
        result = lab.playbook(key, with_cli=False)
        assert result.returncode == 0, result
        events = [e["event"] for e in lab.record()[mark:] if e["event"] in ("cc", "start")]
        assert events == ["cc"] + ["start"] * INSTANCES, events
        lab.wait(lambda: registered(lab, new_prefix) == INSTANCES, 60, "the new key's workers registered")
        after = pids(lab)
        assert after[W1] != before[W1] and after[W2] != before[W2]
        again = lab.playbook(key, with_cli=False)
        assert again.returncode == 0 and again.changed() == 0, again
        assert pids(lab) == after
        proc = lab.workerctl("doctor", "--json")
        assert not [f for f in json.loads(proc.stdout)["findings"] if f["code"] == "apply_pending"], proc.stdout
    finally:  # the next tests start from a converged host, whatever failed here
        lab.run(f"rm -rf {stuck}")
        result = lab.playbook(with_cli=False)
        assert result.returncode == 0, result


@pytest.fixture(scope="module")
def recycling_pool(supervisor_lab):
    """A second pool that recycles after every job, for this module's tests; removed again at the end, since
    test_supervisor_cli_lab.py shares the host and may run after this module (pytest-xdist)."""
    lab = supervisor_lab
    result = lab.playbook({"atom_worker_pools": [RECYCLE_POOL]}, with_cli=False)
    assert result.returncode == 0, result
    # update restarted the site's group (its program list changed), after resetting its counters.
    lab.wait_running([W1, W2, RECYCLED])
    yield lab
    result = lab.playbook(with_cli=False)
    assert result.returncode == 0, result
    lab.wait_running([W1, W2])


def test_a_second_run_changes_nothing_and_restarts_nothing(recycling_pool):
    lab = recycling_pool
    before = pids(lab)
    supervisord = lab.supervisorctl("pid").stdout.strip()
    # Without the CLI's role (its own tests run it twice); everything else of site.yml.
    result = lab.playbook({"atom_worker_pools": [RECYCLE_POOL]}, with_cli=False)
    assert result.returncode == 0 and result.changed() == 0, result
    assert pids(lab) == before
    assert lab.supervisorctl("pid").stdout.strip() == supervisord
    # The deliberate restart by update was reset first: one counted start each.
    assert all(len(entry(lab, name)["starts"]) == 1 for name in (W1, W2, RECYCLED))


def test_recycling_never_counts_as_a_failure(recycling_pool):
    lab = recycling_pool
    lab.wait_running([W1, W2, RECYCLED])
    helper_pid = lab.processes()[RECYCLED]["pid"]
    # The recycle helper (a python3 script) in front of php, as in the systemd unit's ExecStart.
    command = shlex.split(lab_exec_start(RECYCLE_POOL))
    assert command[:2] == ["/usr/local/lib/atom-worker/atom-worker-recycle", "--"] and "--max-job-count=1" in command
    assert lab.run(f"tr '\\0' '\\n' < /proc/{helper_pid}/cmdline").stdout.splitlines() == ["/usr/bin/python3", *command]

    def recycles():
        return [ev for ev in lab.record() if ev["event"] == "exit" and ev["reason"] == "max-job-count"]

    def submit_and_count():
        # Every pool takes csv_validation jobs; submit until the recycling worker has done more than a burst.
        lab.run(f"cd {ATOM_ROOT} && runuser -u www-data -- php symfony standin:submit --class=arValidateCsvJob "
                "--count=6 >/dev/null")
        return len(recycles()) >= 4

    lab.wait(submit_and_count, 120, "four recycles of the recycling worker")
    # The helper re-ran php each time inside one supervisord start: same PID, one counted start.
    proc = lab.processes()[RECYCLED]
    assert proc["state"] == "RUNNING" and proc["pid"] == helper_pid
    e = entry(lab, RECYCLED)
    assert not e["failed"] and len(e["starts"]) == 1 and e["n_restarts"] == 0 and e["n_recycles"] == 0, e
    assert "recycle #4" in lab.run(f"cat {LOG_DIR}/atom-worker-default-recycled@1.log").stdout
    assert json.loads(lab.run(f"cat {POLICY_STATE}").stdout)["processes"][W1]["failed"] is False


def test_the_model_maps_units_to_processes_and_keeps_systemd_hosts_unchanged():
    """No lab needed: the filters behind sites.json and the role's process names."""
    from manager_tests import filters

    sites = [{"name": "default", "root": "/srv/a", "pools": [{"name": "default", "instances": 2}]},
             {"name": "b", "root": "/srv/b", "pools": [{"name": "default", "instances": 0},
                                                       {"name": "big", "instances": 1, "types": ["general"]}]}]
    units = make_units("/srv/a", [], sites=sites)
    names = [p["namespec"] for p in filters.atom_worker_supervisor_processes(units)]
    assert names == ["atom-workers:atom-worker@1", "atom-workers:atom-worker@2", "atom-workers-b:atom-worker-b-big@1"]
    model = filters.atom_worker_model({"sites": sites})
    meta = {"schema": 1, "recycle_helper": "/x", "unit_dir": "/etc/systemd/system", "supervisor": {"server_url": "u"}}
    assert "supervisor" not in filters.atom_worker_state(model, {}, units, {**meta, "manager": "systemd"})
    state = filters.atom_worker_state(model, {}, units, {**meta, "manager": "supervisor"})
    assert state["manager"] == "supervisor" and state["supervisor"] == {"server_url": "u"}
    assert filters.atom_worker_passwd_homes(["www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin", "bad"]) == {
        "www-data": "/var/www"}
