"""The atom_worker role with atom_worker_manager=circus on a real host (tools/lab).

cr-host runs gearmand and two workers of the AtoM stand-in as circus watchers, converged with site.yml: circus
installed into /opt/atom-worker-circus from build/circus-wheels (`make circus-wheels`; lab hosts have no
package index), circusd run by atom-worker-circus.service, RestartSec=2, the start limit the docs' 3 starts in
24 h, atom-workerctl installed from a wheel of this checkout. Checked here: the workers are watchers, not
systemd units, and run as www-data with the systemd unit's command; they register with gearmand; a new pool
is applied by reloadconfig without touching the running watchers, and a second site.yml run changes nothing
and restarts nothing; a crash loop stops after exactly 3 starts, each at least RestartSec after the exit
before it, and stays down (a start while failed is refused); reset recovers it; a converge resets and starts a
watcher that is down; recycling under load (exit 111 after every job) never counts; a worker SIGKILLed
mid-job loses no job (gearmand hands it out again, it completes) and is restarted RestartSec later;
`atom-workerctl restart --rolling` keeps every function served (gearmand sampled every 20 ms).

Run inside the lab network: tools/lab/lab exec -- .venv/bin/pytest tests/circus/test_circus_lab.py
ATOM_KEEP_LAB=1 keeps the host after the module (it is removed before the next boot anyway).
"""

import json
import os
import shlex
import subprocess
import time

import pytest
import yaml
from circus_harness import make_units
from gearman_sampler import HostSampler, hold_stopped
from gsubmit import GSUBMIT
from labhosts import ATOM_ROOT, REPO, VENV_BIN, LabHosts, booted_per_module, build_project_wheel
from manager_tests import assert_burst_starts_apart, assert_lab_worker_runs_as_the_unit, lab_exec_start
from polling import wait_until
from standin import KNOWN_CLASSES

pytestmark = pytest.mark.timeout(900)

HOST = "cr-host"
RESTART_SEC = 2
INSTANCES = 2
WHEELS = REPO / "build" / "circus-wheels"
VENV = "/opt/atom-worker-circus"
ENDPOINT = "ipc:///run/atom-worker/circus.sock"
CONFIG = "/etc/atom-worker/circus.ini"
LOG_DIR = "/var/log/atom-worker"
POLICY = "/usr/local/lib/atom-worker/atom-worker-policy"
STATE = "/run/atom-worker/circus-policy.json"
SERVICE = "atom-worker-circus.service"
RECORD = f"{ATOM_ROOT}/log/standin-record.jsonl"
CONTROL = f"{ATOM_ROOT}/standin/control.json"
PENDING = "/etc/atom-worker/apply-pending.json"
HOST_VARS = {
    "atom_worker_manager": "circus",
    "atom_worker_instances": INSTANCES,
    "atom_worker_restart_sec": RESTART_SEC,
    "atom_worker_circus_wheels_dir": str(WHEELS),
}
INVENTORY = {"all": {"children": {
    "gearman_job_servers": {"hosts": {HOST: None}},
    "atom_workers": {"hosts": {HOST: dict(HOST_VARS)}},
}}}
# Watchers are the systemd instances without `.service`; the policy's namespec is GROUP:WATCHER.
W1, W2 = "atom-worker@1", "atom-worker@2"
RECYCLED = "atom-worker-default-recycled@1"
RECYCLE_POOL = {"name": "recycled", "instances": 1, "types": ["csv_validation"], "max_job_count": 1}
GROUP = "atom-workers"
# circusd's view in one call on the host (its venv's client): {watcher: {"state": ..., "pid": int or None}}.
SNAPSHOT = (
    "import json\n"
    "from circus.client import CircusClient\n"
    f"c = CircusClient(endpoint={ENDPOINT!r}, timeout=30)\n"
    "out = {}\n"
    "for name, state in c.call({'command': 'status', 'properties': {}})['statuses'].items():\n"
    "    pids = c.call({'command': 'list', 'properties': {'name': name}}).get('pids') or []\n"
    "    out[name] = {'state': state, 'pid': pids[0] if pids else None}\n"
    "print(json.dumps(out))\n"
)
# Counted as gearmand's admin `workers` lists them: one line per connection, its functions.
GEARMAN_WORKERS = (
    "import socket\n"
    "s=socket.create_connection(('127.0.0.1',4730),5); s.sendall(b'workers\\n'); b=b''\n"
    "while not b.endswith(b'\\n.\\n'): b+=s.recv(65536)\n"
    "print(b.decode())\n"
)


def ns(watcher):
    return f"{GROUP}:{watcher}"


class CircusLab:
    """cr-host, converged with site.yml (atom_worker_manager=circus), and helpers to drive it."""

    def __init__(self, hosts: LabHosts, wheel: str):
        self.hosts = hosts
        self.wheel = wheel

    def run(self, command, check=True, timeout=180):
        return self.hosts.run(HOST, command, check=check, timeout=timeout)

    def playbook(self, extra_vars=None, with_cli=False):
        """site.yml against cr-host, with the wheel the fixture built (so a re-run changes nothing)."""
        return self.hosts.playbook("playbooks/lab/site.yml",
                                   extra_vars={"atom_workerctl_wheel": self.wheel, **(extra_vars or {})},
                                   with_cli=with_cli)

    def circusctl(self, *args, check=True):
        return self.run(f"{VENV}/bin/circusctl --endpoint {ENDPOINT} --timeout 60 "
                        + " ".join(shlex.quote(a) for a in args), check=check)

    def policy(self, *args, check=False):
        """atom-worker-policy ARGS --state-file (status, reset, cancel), on the circus state file."""
        command, *rest = args
        return self.run(f"{POLICY} {command} --state-file {STATE} " + " ".join(shlex.quote(a) for a in rest),
                        check=check)

    def workerctl(self, *args):
        return self.run("atom-workerctl " + " ".join(shlex.quote(a) for a in args), check=False, timeout=300)

    def snapshot(self):
        return json.loads(self.run(f"{VENV}/bin/python -c {shlex.quote(SNAPSHOT)}").stdout)

    def pids(self):
        return {name: w["pid"] for name, w in self.snapshot().items()}

    def circusd_pid(self):
        return self.run(f"systemctl show -p MainPID --value {SERVICE}").stdout.strip()

    def policy_state(self):
        proc = self.run(f"cat {STATE}", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else {}

    def entry(self, watcher):
        return self.policy_state().get("processes", {}).get(ns(watcher), {})

    def sites(self):
        return json.loads(self.run("cat /etc/atom-worker/sites.json").stdout)

    def prefix(self):
        return self.sites()["sites"][0]["prefix"]

    def record(self):
        out = self.run(f"cat {RECORD} 2>/dev/null || true").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def control(self, **knobs):
        if knobs:
            self.run(f"echo {shlex.quote(json.dumps(knobs))} > {CONTROL}")
        else:
            self.run(f"rm -f {CONTROL}")

    def submit(self, job_class, prefix, count, **payload):
        """Background jobs straight to gearmand (tests/gsubmit.py); their ids."""
        args = ["127.0.0.1", "4730", f"{self.prefix()}-{job_class}", prefix, str(count)]
        args += [json.dumps(payload)] if payload else []
        ids = self.run("python3 /root/gsubmit.py " + " ".join(shlex.quote(a) for a in args)).stdout.split()
        assert len(ids) == count
        return ids

    def completed(self, since=0):
        counts = {}
        for event in self.record()[since:]:
            if event.get("event") == "job" and event.get("status") == "completed":
                counts[str(event["id"])] = counts.get(str(event["id"]), 0) + 1
        return counts

    def registered(self):
        """How many connections to gearmand register the site's whole set of functions."""
        out = self.run(f"python3 -c {shlex.quote(GEARMAN_WORKERS)}").stdout
        prefix = self.prefix()
        return sum(1 for line in out.splitlines()
                   if line.count(f"{prefix}-") >= 18 and f"{prefix}-arFindingAidJob" in line)

    def host_time(self):
        return float(self.run("date +%s.%N").stdout)

    def wait(self, predicate, timeout=60, what="condition"):
        return wait_until(predicate, timeout, 0.5, what, self.diagnostics)

    def wait_active(self, names, timeout=90):
        return self.wait(lambda: (s := self.snapshot()) and all(s.get(n, {}).get("state") == "active" and s[n]["pid"]
                                                                 for n in names) and s,
                         timeout, f"{names} active")

    def diagnostics(self):
        return self.run(f"{VENV}/bin/circusctl --endpoint {ENDPOINT} status; "
                        f"tail -n 30 {LOG_DIR}/atom-worker-policy.log; journalctl -u {SERVICE} -n 30 --no-pager",
                        check=False).stdout


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    assert any(WHEELS.glob("circus-*.whl")), f"no circus wheels in {WHEELS}: run `make circus-wheels`"
    wheel = str(build_project_wheel(tmp_path_factory.mktemp("circus-wheel")))
    with booted_per_module(tmp_path_factory, lambda hosts: CircusLab(hosts, wheel), prefix="circus-lab") as make:
        lab = make(INVENTORY)
        converge = lab.playbook(with_cli=True)
        assert converge.returncode == 0, converge
        lab.run(f"cat > /root/gsubmit.py <<'EOF'\n{GSUBMIT}EOF")
        lab.wait_active([W1, W2])
        yield lab


def test_the_workers_are_circus_watchers_not_systemd_units(lab):
    assert lab.run(f"systemctl is-active {SERVICE}; systemctl is-enabled {SERVICE}").stdout.split() == [
        "active", "enabled"]
    units = lab.run("systemctl list-units --all --plain --no-legend --no-pager 'atom-worker@*' 'atom-worker-*@*' "
                    "'atom-workers*'").stdout
    assert units.strip() == ""
    assert lab.run("ls /etc/systemd/system | grep '^atom-worker' || true").stdout.split() == [SERVICE]
    snapshot = lab.snapshot()
    assert {n: w["state"] for n, w in snapshot.items()} == {W1: "active", W2: "active"}
    command = shlex.split(lab_exec_start({"name": "default", "instances": INSTANCES}))
    for name in (W1, W2):
        pid = snapshot[name]["pid"]
        assert_lab_worker_runs_as_the_unit(lab, pid, command)
        # A child of circusd, in the service's cgroup.
        assert lab.run(f"ps -o ppid= -p {pid}").stdout.strip() == lab.circusd_pid()
        assert f"/{SERVICE}" in lab.run(f"cat /proc/{pid}/cgroup").stdout
    conf = lab.run(f"cat {CONFIG}").stdout
    assert "[watcher:atom-worker@2]" in conf and "respawn = false" in conf and "singleton = true" in conf
    assert f"atom_restart_sec = {RESTART_SEC}" in conf and "atom_start_limit_burst = 3" in conf
    assert "Running worker..." in lab.run(f"cat {LOG_DIR}/{W1}.log").stdout
    # The hooks are loaded in circusd: the policy's state names circusd's pid, each start counted once.
    state = lab.policy_state()
    assert str(state["listener"]["pid"]) == lab.circusd_pid(), state.get("listener")
    assert [len(lab.entry(n)["starts"]) for n in (W1, W2)] == [1, 1]
    versions = lab.run(f"{VENV}/bin/python -c 'import circus, zmq, tornado, psutil; "
                       "print(circus.__version__, zmq.__version__, tornado.version, psutil.__version__)'").stdout
    assert versions.split() == ["0.19.0", "26.4.0", "6.6.1", "7.2.2"]


def test_sites_json_carries_the_circus_contract(lab):
    state = lab.sites()
    assert state["manager"] == "circus" and state["schema"] == 1
    assert state["circus"] == {"endpoint": ENDPOINT, "config": CONFIG, "state_file": STATE, "log_dir": LOG_DIR,
                               "service": SERVICE, "venv": VENV}
    pool = state["sites"][0]["pools"][0]
    assert pool["unit_template"] == "atom-worker@.service"
    assert pool["units"] == ["atom-worker@1.service", "atom-worker@2.service"]
    assert "supervisor" not in state


def test_the_workers_register_with_gearmand(lab):
    lab.wait(lambda: lab.registered() == INSTANCES, 60, "both workers registered with gearmand")


def test_fleet_commands_answer_for_a_circus_host(lab):
    """The fleet form runs each host's own CLI over ssh: a circus host answers status, restart --rolling and
    doctor as a systemd host does (gearmand here listens on the host's loopback: --no-gearman for status)."""
    lab_vars = yaml.safe_load(lab.hosts.inventory.read_text())["all"]["vars"]
    env = {**os.environ, "NO_COLOR": "1", "ATOM_WORKERCTL_SSH_ARGS": " ".join(
        ["-i", lab_vars["ansible_ssh_private_key_file"], lab_vars["ansible_ssh_common_args"]])}

    def fleet(*args):
        proc = subprocess.run([str(VENV_BIN / "atom-workerctl"), "-i", str(lab.hosts.inventory), *args, "--json"],
                              capture_output=True, text=True, env=env, timeout=300, check=False)
        data = json.loads(proc.stdout)
        assert data["mode"] == "fleet" and list(data["hosts"]) == [HOST], data
        return proc.returncode, data, proc

    code, data, proc = fleet("status", "--no-gearman")
    assert code == 0 and data["hosts"][HOST]["exit_code"] == 0, proc.stdout + proc.stderr
    before = lab.pids()
    code, data, proc = fleet("restart", "--rolling")
    assert code == 0 and data["stopped_at"] is None, proc.stderr
    after = lab.pids()
    assert set(after) == set(before) and all(after[w] != before[w] for w in before), (before, after)
    lab.wait(lambda: lab.registered() == INSTANCES, 60, "both workers registered again")
    code, data, proc = fleet("doctor")
    assert code == 0 and data["hosts"][HOST]["exit_code"] == 0, proc.stdout + proc.stderr


def test_a_new_pool_starts_alone_and_a_second_run_changes_nothing(lab):
    before = lab.pids()
    circusd = lab.circusd_pid()
    result = lab.playbook({"atom_worker_pools": [RECYCLE_POOL]})
    assert result.returncode == 0, result
    # reloadconfig started the new watcher only: the others kept their processes, circusd its pid.
    snapshot = lab.wait_active([W1, W2, RECYCLED])
    assert {n: snapshot[n]["pid"] for n in (W1, W2)} == before
    assert lab.circusd_pid() == circusd
    assert len(lab.entry(RECYCLED)["starts"]) == 1
    # Without the CLI's role (its own tests run it twice); everything else of site.yml.
    now = lab.pids()
    result = lab.playbook({"atom_worker_pools": [RECYCLE_POOL]})
    assert result.returncode == 0 and result.changed() == 0, result
    assert lab.pids() == now and lab.circusd_pid() == circusd
    assert all(len(lab.entry(n)["starts"]) == 1 for n in (W1, W2, RECYCLED))


def _converge_takes_up_the_note(lab, pools, watchers):
    """A converge with the note there: it succeeds, removes the note, clears the cache and then starts each
    watcher once more (new pids)."""
    before = lab.wait_active(watchers)
    mark = len(lab.record())
    result = lab.playbook(pools)
    assert result.returncode == 0, result
    assert lab.run(f"test -e {PENDING}", check=False).returncode != 0, "the note is still there"
    events = [e["event"] for e in lab.record()[mark:] if e["event"] in ("cc", "start")]
    assert events == ["cc"] + ["start"] * len(watchers), events
    after = lab.wait_active(watchers)
    assert all(after[n]["pid"] != before[n]["pid"] for n in watchers), (before, after)


def test_a_note_left_by_another_manager_is_taken_up_and_removed(lab):
    """The role's note of what an unfinished apply owes (apply-pending.json), left by a systemd converge of this
    host before it moved to circus: circus writes none of its own, but takes up its sites as the other managers
    take up another manager's note (the site's cache cleared, then its watchers restarted, each once) and
    removes it, so doctor's apply_pending finding goes with the next site.yml; the run after changes nothing."""
    pools = {"atom_worker_pools": [RECYCLE_POOL]}
    watchers = [W1, W2, RECYCLED]
    note = {"config_sites": ["default"], "restart_globs": ["atom-worker@*.service"], "daemon_reload": True,
            "manager": "systemd"}
    settled = lab.playbook(pools)  # the host as the file's order leaves it (also when this test runs alone)
    assert settled.returncode == 0, settled
    lab.run(f"printf %s {shlex.quote(json.dumps(note))} > {PENDING}")
    try:
        # The positive control: the note is there, and doctor says what it owes (under circus: its sites only).
        assert lab.run(f"test -s {PENDING}", check=False).returncode == 0
        proc = lab.workerctl("doctor", "--json")
        found = [f for f in json.loads(proc.stdout)["findings"] if f["code"] == "apply_pending"]
        assert proc.returncode == 3 and len(found) == 1, proc.stdout
        assert ("it still owes: clear the cache of site default (if the role clears caches); restart "
                "atom-worker@1, atom-worker@2, atom-worker-default-recycled@1 (note") in found[0]["summary"], found
        circusd = lab.circusd_pid()
        _converge_takes_up_the_note(lab, pools, watchers)
        assert lab.circusd_pid() == circusd  # the watchers restarted, not circusd
        assert all(len(lab.entry(n)["starts"]) == 1 for n in watchers)  # deliberate: reset first
        proc = lab.workerctl("doctor", "--json")
        assert not [f for f in json.loads(proc.stdout)["findings"] if f["code"] == "apply_pending"], proc.stdout
        now = lab.pids()
        again = lab.playbook(pools)
        assert again.returncode == 0 and again.changed() == 0, again
        assert lab.pids() == now
        lab.wait(lambda: lab.registered() == INSTANCES, 60, "both workers registered again")
    finally:
        lab.run(f"rm -f {PENDING}")


def test_a_note_is_kept_while_circusd_was_not_running(lab):
    """circusd not running when the converge begins (a host moving to circus, or stopped by hand): it starts every
    watcher before the handlers clear the note's caches, so those watchers still run on the old cache and the
    note stays (doctor keeps reporting it). The next converge, circusd running, restarts them and removes it.
    Positive control: the same note is removed by that next converge (and by the test above, circusd running)."""
    pools = {"atom_worker_pools": [RECYCLE_POOL]}
    watchers = [W1, W2, RECYCLED]
    note = {"config_sites": ["default"], "manager": "systemd"}
    settled = lab.playbook(pools)
    assert settled.returncode == 0, settled
    lab.run(f"systemctl stop {SERVICE}")
    lab.run(f"printf %s {shlex.quote(json.dumps(note))} > {PENDING}")
    try:
        first = lab.playbook(pools)
        assert first.returncode == 0, first
        assert lab.run(f"test -s {PENDING}", check=False).returncode == 0, "the note was removed"
        proc = lab.workerctl("doctor", "--json")
        assert [f for f in json.loads(proc.stdout)["findings"] if f["code"] == "apply_pending"], proc.stdout
        _converge_takes_up_the_note(lab, pools, watchers)
        lab.wait(lambda: lab.registered() == INSTANCES, 60, "both workers registered again")
    finally:
        lab.run(f"rm -f {PENDING}")
        lab.run(f"systemctl start {SERVICE}")


def test_a_crash_loop_stops_after_exactly_three_starts_with_the_restart_delay_and_stays_down(lab):
    w1_pid = lab.pids()[W1]
    since = lab.host_time()
    lab.control(crash_at_start=3)
    try:
        # A deliberate restart resets the counter first (as the role and atom-workerctl do).
        lab.policy("reset", ns(W2), check=True)
        lab.circusctl("restart", "--waiting", W2)
        lab.wait(lambda: lab.entry(W2).get("failed"), 90, f"{W2} to hit the start limit")
    finally:
        lab.control()
    e = lab.entry(W2)
    assert e["result"] == "start-limit-hit" and e["n_restarts"] == 2, e
    assert e["last_exit"]["exit_status"] == 3 and e["last_exit"]["result"] == "exit-code", e
    # Exactly StartLimitBurst starts, each at least RestartSec after the previous one's exit.
    assert_burst_starts_apart(lab.record(), since, e, RESTART_SEC)
    assert lab.policy("status", ns(W2)).returncode == 3
    assert "start-limit-hit" in lab.run(f"cat {LOG_DIR}/atom-worker-policy.log").stdout
    assert "start-limit-hit" in lab.run(f"journalctl -u {SERVICE} --no-pager -o cat").stdout

    # A start while failed is refused before anything spawns (systemd's start-limit-hit).
    lab.circusctl("start", "--waiting", W2)
    # It stays down: several RestartSec and circusd ticks later, no new start.
    time.sleep(2 * RESTART_SEC + 3)
    assert not [ev for ev in lab.record() if ev["time"] > since and ev["event"] == "start"][3:]
    snapshot = lab.snapshot()
    assert snapshot[W2]["state"] == "stopped" and lab.entry(W2)["failed"]
    assert snapshot[W1] == {"state": "active", "pid": w1_pid}


def test_reset_recovers_the_failed_worker(lab):
    assert lab.entry(W2).get("failed"), "the crash-loop test leaves the worker failed"
    proc = lab.policy("reset", ns(W2))
    assert proc.returncode == 0 and f"reset {ns(W2)}" in proc.stdout, proc
    lab.circusctl("start", "--waiting", W2)
    lab.wait_active([W2])
    e = lab.entry(W2)
    assert not e["failed"] and len(e["starts"]) == 1 and e["n_restarts"] == 0, e
    assert lab.policy("status").returncode == 0
    lab.wait(lambda: lab.registered() == INSTANCES, 60, "the reset worker registered again")


def test_a_converge_resets_and_starts_a_watcher_that_is_down(lab):
    lab.circusctl("stop", "--waiting", W1)
    assert lab.snapshot()[W1]["state"] == "stopped"
    result = lab.playbook({"atom_worker_pools": [RECYCLE_POOL]})
    assert result.returncode == 0 and result.changed() > 0, result
    lab.wait_active([W1, W2, RECYCLED])
    e = lab.entry(W1)
    assert not e["failed"] and len(e["starts"]) == 1, e


def test_recycling_under_load_never_counts(lab):
    helper_pid = lab.pids()[RECYCLED]
    command = shlex.split(lab_exec_start(RECYCLE_POOL))
    assert command[:2] == ["/usr/local/lib/atom-worker/atom-worker-recycle", "--"] and "--max-job-count=1" in command
    assert lab.run(f"tr '\\0' '\\n' < /proc/{helper_pid}/cmdline").stdout.splitlines() == ["/usr/bin/python3", *command]
    before = lab.entry(RECYCLED)
    # The recycling worker alone takes the load: the other two are stopped meanwhile (deliberately).
    lab.circusctl("stop", "--waiting", "--match", "regex", "^atom-worker@[12]$")
    try:
        mark = len(lab.record())
        ids = lab.submit("arValidateCsvJob", "recycle", 20)
        lab.wait(lambda: set(ids) <= set(lab.completed(mark)), 180, "20 jobs through the recycling worker")
        exits = [ev for ev in lab.record()[mark:] if ev["event"] == "exit"]
        assert [(ev["code"], ev["reason"]) for ev in exits] == [(111, "max-job-count")] * 20, exits
    finally:
        lab.policy("reset", ns(W1), ns(W2), check=True)
        lab.circusctl("start", "--waiting", "--match", "regex", "^atom-worker@[12]$")
    # The helper re-ran php each time inside one circus start: same process, one counted start, never failed.
    snapshot = lab.snapshot()
    assert snapshot[RECYCLED] == {"state": "active", "pid": helper_pid}
    e = lab.entry(RECYCLED)
    assert e["starts"] == before["starts"] and not e["failed"] and e["n_restarts"] == 0, e
    assert "recycle #20" in lab.run(f"cat {LOG_DIR}/{RECYCLED}.log").stdout
    lab.wait_active([W1, W2])


def test_sigkill_mid_job_loses_no_job_and_the_worker_restarts_after_restartsec(lab):
    lab.wait(lambda: lab.registered() == INSTANCES, 60, "both workers registered")
    watcher_of = {pid: name for name, pid in lab.pids().items()}
    restarts = {n: lab.entry(n)["n_restarts"] for n in (W1, W2)}
    mark = len(lab.record())
    # A 15 s job: long enough to be killed in the middle even on a busy machine.
    [job] = lab.submit("arFindingAidJob", "kill", 1, sleep=15)
    started = lab.wait(lambda: [e for e in lab.record()[mark:] if e["event"] == "job-start" and e["id"] == job],
                       60, "the job to start")
    pid = started[0]["pid"]
    killed_at = lab.host_time()
    lab.run(f"kill -KILL {pid}")
    watcher = watcher_of[pid]
    lab.wait(lambda: job in lab.completed(mark), 120, "the killed worker's job completed")
    ends = [e for e in lab.record()[mark:] if e["event"] == "job" and e["id"] == job]
    assert pid not in {e["pid"] for e in ends}, ends                  # the killed process never finished it
    starts = [e["pid"] for e in lab.record()[mark:] if e["event"] == "job-start" and e["id"] == job]
    assert starts[0] == pid and len(starts) >= 2, starts              # gearmand handed it out again
    # The policy restarted the killed instance (Restart=on-failure), RestartSec after the kill, counted.
    snapshot = lab.wait_active([watcher])
    assert snapshot[watcher]["pid"] != pid
    e = lab.entry(watcher)
    assert e["n_restarts"] == restarts[watcher] + 1 and e["last_exit"]["result"] == "signal", e
    assert e["starts"][-1] - killed_at >= RESTART_SEC - 0.1, (e["starts"], killed_at)
    lab.wait(lambda: lab.registered() == INSTANCES, 60, "both workers registered again")


def test_rolling_restart_keeps_every_function_served(lab):
    assert (REPO / "tools" / "atom_workerctl" / "circus.py").exists(), "atom-workerctl has no circus backend"
    lab.wait(lambda: lab.registered() == INSTANCES, 60, "both workers registered")
    functions = [f"{lab.prefix()}-{c}" for c in KNOWN_CLASSES]
    before = lab.pids()
    # gearmand (on the host's loopback) sampled every 20 ms around the rolling restart.
    sampler = HostSampler(lab.hosts, HOST, interval=0.02)

    def start_w2():
        lab.policy("reset", ns(W2), check=True)
        lab.circusctl("start", "--waiting", W2)

    # The control: W2 held stopped for a second; the probe must see every function one worker short then.
    held = hold_stopped(lambda: lab.circusctl("stop", "--waiting", W2), start_w2)
    lab.wait(lambda: lab.registered() == INSTANCES, 60, "W2 registered again")
    began = time.monotonic()
    proc = lab.workerctl("restart", "--rolling")
    ended = time.monotonic()
    time.sleep(0.5)  # samples after the restart, too
    sampler.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = lab.pids()
    assert all(after[n] != before[n] for n in (W1, W2, RECYCLED)), (before, after)
    assert not sampler.errors, sampler.errors
    baseline = sampler.samples[0][1]
    sampler.check_held(held, {f: baseline.get(f, (0, 0, 0))[2] - 1 for f in functions}, "W2 held stopped")
    sampler.check_window(began, ended)
    lowest = sampler.minimum(functions, between=(began, ended))
    assert min(lowest.values()) >= 1, lowest
    # Deliberate restarts never spend the budget.
    for name in (W1, W2, RECYCLED):
        e = lab.entry(name)
        assert not e["failed"] and len(e["starts"]) <= 1, (name, e)


def test_the_model_maps_watchers_and_reloadconfig_changes():
    """No lab needed: the filters behind the watcher names, sites.json and what reloadconfig restarts."""
    from manager_tests import filters

    units = make_units("/srv/a", [], sites=[
        {"name": "default", "root": "/srv/a", "pools": [{"name": "default", "instances": 2}]},
        {"name": "b", "root": "/srv/b", "pools": [{"name": "big", "instances": 1, "types": ["general"]}]}])
    watchers = filters.atom_worker_supervisor_processes(units)
    assert [(w["name"], w["namespec"]) for w in watchers] == [
        ("atom-worker@1", "atom-workers:atom-worker@1"), ("atom-worker@2", "atom-workers:atom-worker@2"),
        ("atom-worker-b-big@1", "atom-workers-b:atom-worker-b-big@1")]
    model = filters.atom_worker_model({"sites": [{"name": "default", "root": "/srv/a"}]})
    meta = {"schema": 1, "recycle_helper": "/x", "unit_dir": "/etc/systemd/system", "circus": {"endpoint": "e"}}
    assert "circus" not in filters.atom_worker_state(model, {}, units, {**meta, "manager": "supervisor"})
    assert filters.atom_worker_state(model, {}, units, {**meta, "manager": "circus"})["circus"] == {"endpoint": "e"}

    old = "[circus]\nendpoint = a\n[watcher:w@1]\ncmd = x\n[env:w@1]\nUSER = u\n[watcher:w@2]\ncmd = x\n"
    changes = filters.atom_worker_circus_changes
    assert changes(old, old) == {"started": [], "stopped": [], "all": False, "changed": False}
    assert changes(old, "; a comment\n" + old)["started"] == []
    assert changes(old, old.replace("USER = u", "USER = v")) == {
        "started": ["w@1"], "stopped": [], "all": False, "changed": True}
    assert changes(old, old.replace("[watcher:w@2]\ncmd = x\n", "[watcher:w@3]\ncmd = x\n")) == {
        "started": ["w@3"], "stopped": ["w@2"], "all": False, "changed": True}
    assert changes(old, old.replace("endpoint = a", "endpoint = b"))["started"] == ["w@1", "w@2"]
    assert changes(None, old) == {"started": ["w@1", "w@2"], "stopped": [], "all": True, "changed": True}


def test_the_wheels_are_the_pins_of_the_role():
    """`make circus-wheels` downloads exactly the role's pins (atom_worker_circus_requirements)."""
    import yaml

    pins = yaml.safe_load((REPO / "roles/atom_worker/defaults/main.yml").read_text())["atom_worker_circus_requirements"]
    wheels = sorted(p.name.split("-")[0].lower() + "==" + p.name.split("-")[1] for p in WHEELS.glob("*.whl"))
    if not wheels:
        pytest.skip("no build/circus-wheels (make circus-wheels)")
    assert wheels == sorted(pins)
