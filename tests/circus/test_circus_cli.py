"""atom-workerctl on a circus host, locally: a private circusd (circus_harness) running the AtoM stand-in (real PHP
worker, real gearmand) as watchers rendered from templates/circus/, the restart policy in circusd's hooks with
RestartSec=1, StartLimitIntervalSec=60, StartLimitBurst=3, and a sites.json with "manager": "circus".

One circusd for the module; the tests run in order and leave it as they found it (both instances of pool
default active and registered), except the last ones (circusd restarted, errors). Mirrors
tests/supervisor/test_supervisor_cli.py, plus what only circus does: scale and daemon-reload start, stop or
restart only the watchers that change.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import circus_harness
import manager_tests
import prom_text
import pytest
import standin
from circus_harness import write_sites_json
from manager_tests import BASELINE, BURST, ENV, codes, fix_as_printed, shape
from standin import Gearmand

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from atom_workerctl import model  # noqa: E402
from atom_workerctl.journal import Entry  # noqa: E402

pytestmark = pytest.mark.timeout(90)
UNIT1, UNIT2, UNIT3 = "atom-worker@1.service", "atom-worker@2.service", "atom-worker@3.service"
W1, W2, W3 = "atom-worker@1", "atom-worker@2", "atom-worker@3"
NS1, NS2 = f"atom-workers:{W1}", f"atom-workers:{W2}"


class Lab(manager_tests.WorkerctlLab):
    """atom-workerctl on the module's circus host; the printed commands find `atom-workerctl` on PATH."""

    def __init__(self, cd, gearmand, root, config, units, circus):
        super().__init__(cd, config)
        self.cd, self.gearmand, self.root, self.units_, self.circus = cd, gearmand, root, units, circus

    def pid(self, name):
        pids = self.cd.pids(name)
        return pids[0] if pids else None

    def settle_after_fixes(self):
        """circus's fixes restart circusd or reset the workers: both back before doctor looks again."""
        self.cd.wait(lambda: self.registered(UNIT1, UNIT2), 30, "both registered after the fixes")

    def restart_circusd(self, as_on_disk=False, wait=True):
        """Kill this circusd and everything below it, start it again: with the module's configuration rendered
        again, or (as_on_disk) with circus.ini as it is now. Each start at circusd's start counts in the
        workers' budgets (as a `systemctl restart` does): wait=False for a budget that may be used up."""
        self.cd.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.cd.endpoint[len("ipc://"):])
        text = self.cd.conf.read_text()
        if as_on_disk:
            self.cd.render = lambda *args, **kwargs: self.cd.conf.write_text(text)
        try:
            self.cd.start(self.units_, circus=self.circus, wait_active=[W1, W2] if wait else [])
        finally:
            vars(self.cd).pop("render", None)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    for tool in ("php", "gearmand"):
        assert shutil.which(tool), f"missing {tool}: apt-get install php-cli php-gearman gearman-job-server"
    if not circus_harness.CIRCUSD.exists():
        pytest.skip(f"{circus_harness.CIRCUSD} is missing (.venv/bin/pip install -r requirements.txt)")
    base = tmp_path_factory.mktemp("circuscli")
    sockdir = Path(tempfile.mkdtemp(prefix="circ-"))
    gearmand = Gearmand().start()
    cd = circus_harness.Circusd(base, sockdir)
    try:
        root, sites, units = manager_tests.standin_site(base, gearmand)
        config = base / "sites.json"
        write_sites_json(config, cd, sites, units, root)
        # Small log files, so that -f is seen to follow circus's own rotation.
        circus = {"log_max_bytes": "2KB", "log_backups": 3}
        cd.start(units, circus=circus, wait_active=[W1, W2])
        lab = Lab(cd, gearmand, root, config, units, circus)
        cd.wait(lambda: lab.registered(UNIT1, UNIT2), 30, "both workers registered")
        yield lab
    finally:
        cd.stop()
        gearmand.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


def test_a_busy_circusd_is_asked_again_until_the_deadline():
    """circusd runs one command at a time and refuses the others with errno 5: every call retries that with
    backoff until its deadline; an unknown watcher is exit 4; a timeout is one line."""
    from atom_workerctl.circus import CircusBackend
    from atom_workerctl.errors import ManagerError, NoSuchError

    class Client:
        def __init__(self, *replies):
            self.replies, self.timeout, self.sent = list(replies), None, 0

        def send_message(self, command, **props):
            self.sent += 1
            reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
            if isinstance(reply, Exception):
                raise reply
            return reply

    busy = {"status": "error", "errno": 5, "reason": "arbiter is already running watcher_stop command"}
    backend = CircusBackend.__new__(CircusBackend)
    backend.endpoint, backend._call_error = "ipc:///run/x.sock", RuntimeError
    backend._client = Client(busy, busy, busy, {"status": "ok", "info": {"started": [1], "kept": []}})
    assert backend._call("start", timeout=10, name="atom-worker@1")["info"]["started"] == [1]
    assert backend._client.sent == 4
    backend._client = Client(busy)
    started = time.monotonic()
    with pytest.raises(ManagerError, match=r"start atom-worker@1: circusd was busy for 0.5s \(arbiter is already"):
        backend._call("start", what="start atom-worker@1", timeout=0.5)
    assert 0.4 < time.monotonic() - started < 2 and backend._client.sent > 2
    backend._client = Client({"status": "error", "errno": 3, "reason": "program atom-worker@9 not found"})
    with pytest.raises(NoSuchError):
        backend._call("start", name="atom-worker@9")
    backend._client = Client(RuntimeError("Timed out."))
    with pytest.raises(ManagerError, match="did not answer within 10s"):
        backend._call("stop", timeout=10, name="atom-worker@1")


def test_status_json_has_systemds_schema_and_both_workers_registered(lab):
    code, data = lab.status()
    assert code == 0
    assert data["manager"] == "circus"
    reference = manager_tests.systemd_status_json(lab.config)
    assert shape(data) == shape(reference)
    units = lab.units()
    for unit, name in ((UNIT1, W1), (UNIT2, W2)):
        u = units[unit]
        assert (u["active_state"], u["sub_state"], u["result"]) == ("active", "running", "success")
        assert u["main_pid"] == lab.pid(name)
        assert u["memory_bytes"] > 0 and u["since_usec"] > 0
        assert u["enabled"] is True and u["need_daemon_reload"] is False
        assert u["start_limit"] == {"burst": BURST, "interval_sec": 60, "hit": False, "reason": None}
        assert u["gearman"]["registered"] is True
    human = lab.cli("status")
    assert human.returncode == 0, human.stderr
    assert "(circus): 2 instances, 2 active" in human.stdout
    assert human.stdout.count("registered") >= 2
    text = lab.cli("metrics", "--jobs", "no").stdout
    assert prom_text.value(text, "atom_worker_instance_active", worker=W1) == 1
    assert prom_text.value(text, "atom_worker_instance_registered", worker=W2) == 1


def test_restarts_reset_the_budget_first_and_rolling_restart_registers_each(lab):
    pids = {name: lab.pid(name) for name in (W1, W2)}
    for _ in range(BURST + 1):  # more deliberate restarts than the start limit allows
        result = lab.cli("restart", W1, "--no-wait")
        assert result.returncode == 0, result.stderr
    lab.cd.wait(lambda: lab.registered(UNIT1), 30, f"{W1} registered again")
    entry = lab.cd.entry(NS1)
    assert entry["failed"] is False and len(entry["starts"]) == 1 and entry["n_restarts"] == 0
    assert lab.pid(W2) == pids[W2]  # one watcher per instance: the other one was not touched
    rolling = lab.cli("restart", "--rolling", "--json")
    assert rolling.returncode == 0, rolling.stderr
    data = json.loads(rolling.stdout)
    assert [a["unit"] for a in data["actions"]] == [UNIT1, UNIT2]
    assert all(a["registered"] is True for a in data["actions"])
    assert "[2/2] atom-worker@2: registered again" in rolling.stderr
    assert all(lab.pid(name) != pids[name] for name in (W1, W2))
    assert all(len(lab.cd.entry(ns)["starts"]) == 1 and not lab.cd.entry(ns)["failed"] for ns in (NS1, NS2))
    assert lab.registered(UNIT1, UNIT2)


def test_a_restart_while_circusd_restarts_another_watcher_waits_its_turn(lab):
    """The real errno 5: while circusd restarts atom-worker@2 (its one command at a time), the backend's restart
    of atom-worker@1 is refused, asked again, and done."""
    from atom_workerctl.circus import CircusBackend

    pids = {name: lab.pid(name) for name in (W1, W2)}
    backend = CircusBackend(model.load(str(lab.config)))
    client = backend._connect()
    answers = []
    send = client.send_message

    def spy(command, **props):
        answer = send(command, **props)
        answers.append((command, answer.get("errno")))
        return answer

    client.send_message = spy
    try:
        backend.statuses(), backend.options(W1)  # the reads first: they are never refused
        # W2's worker frozen: its restart takes circus graceful_timeout (5 s), then SIGKILL; circusd answers
        # at once (waiting=false) and holds its one command slot meanwhile.
        os.kill(pids[W2], signal.SIGSTOP)
        lab.cd.call("restart", name=W2, waiting=False)
        backend.restart(UNIT1)
    finally:
        backend.close()
    assert ("restart", 5) in answers and answers[-1] == ("restart", None), answers
    assert lab.cd.entry(NS2)["failed"] is False  # killed at the end of a deliberate stop: not a failure
    lab.cd.wait(lambda: lab.registered(UNIT1, UNIT2), 30, "both registered again")
    assert all(lab.pid(name) != pids[name] for name in (W1, W2))


def test_logs_merged_json_and_follow_across_rotation_and_restarts(lab):
    result = lab.cli("logs", "-n", "20", "--json")
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stdout.splitlines()]
    assert 8 <= len(entries) <= 20  # two workers' start lines at least
    last = [json.loads(line) for line in lab.cli("logs", "-n", "5", "--json").stdout.splitlines()]
    assert last == entries[-5:]
    assert set(entries[0]) == set(Entry(0, UNIT1, None, None, "worker", "").as_dict())
    assert [e["usec"] for e in entries] == sorted(e["usec"] for e in entries)
    assert {e["unit"] for e in entries} <= {UNIT1, UNIT2}
    # The policy's lines about an instance (circusd's hooks, atom-worker-policy.log) are tagged as such.
    policy = lab.cli("logs", "-n", "200", W1)
    assert f"{W1} [policy]: started (start 1/{BURST}" in policy.stdout, policy.stdout
    assert "atom-worker@2" not in policy.stdout
    policy_json = [json.loads(line) for line in lab.cli("logs", "-n", "200", "--json", W1).stdout.splitlines()]
    assert {e["source"] for e in policy_json} == {"worker", "circus"}

    follow = subprocess.Popen([sys.executable, "-m", "atom_workerctl", "--config", str(lab.config), "logs", "-f",
                               "-n", "1", W2], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        # Its first line (the last one written) comes once it follows the files: nothing after is missed.
        assert follow.stdout.readline().startswith(time.strftime("%Y-")), "logs -f printed nothing"
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        log = lab.cd.log_dir / f"{W2}.log"
        inode = log.stat().st_ino
        restarts = 0
        while log.stat().st_ino == inode or restarts < 2:  # until circus rotated the file (2KB)
            # Waiting until registered: the worker has written its start lines before the next stop.
            assert lab.cli("restart", W2).returncode == 0
            restarts += 1
            assert restarts < 12, "the log was never rotated"
    finally:
        time.sleep(1)
        follow.terminate()
        out, _ = follow.communicate(timeout=10)
    # Every line the files got since -f began was printed, across the rotation. (Not one per restart: circus
    # drops what a worker writes in the moment before it exits when it stops it, sometimes its last line.)
    files = [line for p in sorted(lab.cd.log_dir.glob(f"{W2}.log*"), reverse=True)
             for line in p.read_text(errors="replace").splitlines() if line[:19] >= since]
    said = [line.split(f" {W2}: ", 1)[1] for line in out.splitlines() if f" {W2}: " in line]
    worker_lines = [line.split(" > ", 1)[1] for line in files if " > " in line]
    assert said[-3:] == worker_lines[-3:], (said, files)  # the new file's lines, after the rotation
    termination = "Job worker termination requested."
    assert said.count(termination) >= worker_lines.count(termination) >= restarts // 2, (said, worker_lines)
    assert out.count(f"{W2} [policy]: started") >= restarts
    assert "atom-worker@1" not in out


def test_crash_loop_shows_the_start_limit_then_reset_brings_it_back(lab):
    other = lab.pid(W2)
    standin.write_control(lab.root, crash_at_start=1)
    try:
        assert lab.cli("restart", W1, "--no-wait").returncode == 0
        lab.cd.wait(lambda: lab.units()[UNIT1]["start_limit"]["hit"], 30, "the start limit")
    finally:
        standin.clear_control(lab.root)
    code, _ = lab.status()
    u = lab.units()[UNIT1]
    assert code == 3
    assert (u["active_state"], u["result"], u["n_restarts"]) == ("failed", "start-limit-hit", BURST - 1)
    assert u["exit"] == {"code": "exited", "status": 1}
    assert "the restart policy refused a restart" in u["start_limit"]["reason"]
    assert lab.cd.status(W1) == "stopped"
    human = lab.cli("status", W1, "--no-gearman")
    assert human.returncode == 3 and "START LIMIT HIT" in human.stdout
    text = lab.cli("metrics", "--jobs", "no").stdout
    assert prom_text.value(text, "atom_worker_instance_start_limit_hit", worker=W1) == 1
    assert prom_text.value(text, "atom_worker_instance_restarts_total", worker=W1) == BURST - 1
    doctor = lab.cli("doctor", "--json")
    notice = None
    try:
        assert doctor.returncode == 3
        finding = next(f for f in json.loads(doctor.stdout)["findings"] if f["code"] == "start_limit_hit")
        assert finding["subject"] == W1
        assert f"atom-workerctl reset {W1}" in finding["fix"]
        assert any("crash_at_start" in e for e in finding["evidence"])  # the worker's own last line
        assert any(e.startswith("log (atom-worker-policy): ") and "start-limit-hit" in e
                   for e in finding["evidence"]), finding
        # The notice the policy's atom_notify_command would send (notify.json beside sites.json).
        (lab.config.parent / "notify.json").write_text(json.dumps({"channels": []}))
        notice = lab.cli("notify", W1, "--dry-run")
    finally:
        reset = lab.cli("reset", W1)  # also when an assertion above failed: the next tests need it running
    assert notice.returncode == 0 and f"atom-workerctl reset {W1}" in notice.stdout, notice
    assert "start-limit-hit" in notice.stdout
    assert reset.returncode == 0, reset.stderr
    assert f"{W1}: active and registered" in reset.stdout
    entry = lab.cd.entry(NS1)
    assert entry["failed"] is False and len(entry["starts"]) == 1
    assert lab.status()[0] == 0
    assert lab.pid(W2) == other


def test_reset_of_an_instance_waiting_for_its_restart_starts_it_at_once(lab):
    """activating (auto-restart): reset cancels the due restart, gives the budget back and starts it itself."""
    lab.cd.stop_watcher(W1)
    # What the policy leaves after an unclean exit: a restart due RestartSec later (here: in a minute).
    with manager_tests.policy_module.StateStore(str(lab.cd.state_file)).update() as state:
        entry = state["processes"][NS1]
        entry.update(next_restart=round(time.time() + 60, 3), n_restarts=1, result="signal",
                     last_exit={"at": round(time.time(), 3), "exit_status": -1, "signal": "SIGKILL",
                                "expected": False, "result": "signal"})
    u = lab.units()[UNIT1]
    assert (u["active_state"], u["sub_state"], u["result"]) == ("activating", "auto-restart", "signal")
    assert u["exit"] == {"code": "killed", "status": 9} and u["crash_loop"] is True
    reset = lab.cli("reset", W1)
    assert reset.returncode == 0, reset.stdout + reset.stderr
    assert f"{W1}: was activating (auto-restart), Result=signal: stop, reset-failed, started" in reset.stdout
    entry = lab.cd.entry(NS1)
    assert entry["failed"] is False and entry["n_restarts"] == 0 and entry["next_restart"] is None
    assert lab.registered(UNIT1, UNIT2)


def test_scale_adds_and_stops_watchers_and_leaves_the_others_running(lab):
    conf = lab.cd.conf
    pids = {name: lab.pid(name) for name in (W1, W2)}
    grow = lab.cli("scale", "3", "--json")
    assert grow.returncode == 0, grow.stderr
    data = json.loads(grow.stdout)
    assert data["from"] == 2 and data["to"] == 3 and data["inventory_instances"] == 2
    assert f"[watcher:{W3}]" in conf.read_text() and f"[env:{W3}]" in conf.read_text()
    assert "applied with reloadconfig (the other workers keep running)" in grow.stderr
    assert lab.cd.status(W3) == "active"
    assert {name: lab.pid(name) for name in (W1, W2)} == pids
    recorded = json.loads(lab.config.read_text())["sites"][0]["pools"][0]
    assert recorded["instances"] == 3 and recorded["scaled"]["inventory_instances"] == 2
    assert lab.registered(UNIT1, UNIT2, UNIT3)
    assert lab.units()[UNIT3]["need_daemon_reload"] is False
    assert lab.cd.entry(f"atom-workers:{W3}")["starts"].__len__() == 1

    shrink = lab.cli("scale", "2")
    assert shrink.returncode == 0, shrink.stderr
    assert lab.cd.status(W3) == "stopped"
    section = conf.read_text().split(f"[watcher:{W3}]", 1)[1].split("\n[", 1)[0]
    assert "autostart = false" in section
    assert {name: lab.pid(name) for name in (W1, W2)} == pids
    recorded = json.loads(lab.config.read_text())["sites"][0]["pools"][0]
    assert recorded["instances"] == 2 and "scaled" not in recorded
    code, data = lab.status()
    assert code == 0 and data["strays"] == []
    assert lab.cli("daemon-reload").stdout.strip() == \
        "circus: reloadconfig changed nothing: the workers' configuration did not change"

    # Back to 3: the disabled watcher's section is enabled again, not copied twice.
    again = lab.cli("scale", "3", "--no-wait")
    assert again.returncode == 0, again.stderr
    assert conf.read_text().count(f"[watcher:{W3}]") == 1
    lab.cd.wait(lambda: lab.registered(UNIT3), 30, f"{W3} registered")
    assert lab.cli("scale", "2").returncode == 0
    assert lab.cd.status(W3) == "stopped"


def test_a_changed_configuration_is_seen_not_applied_until_daemon_reload(lab):
    conf = lab.cd.conf
    pids = {name: lab.pid(name) for name in (W1, W2)}
    text = conf.read_text()
    head, sep, tail = text.partition(f"[watcher:{W1}]")
    conf.write_text(head + sep + tail.replace("graceful_timeout = 5", "graceful_timeout = 6", 1))
    units = lab.units()
    assert units[UNIT1]["need_daemon_reload"] is True and units[UNIT2]["need_daemon_reload"] is False
    assert lab.pid(W1) == pids[W1]  # compared, nothing applied
    doctor = json.loads(lab.cli("doctor", "--json").stdout)
    finding = next(f for f in doctor["findings"] if f["code"] == "unit_changed_not_reloaded")
    assert finding["subject"] == W1 and finding["fix"][0].startswith("atom-workerctl daemon-reload")
    reload = lab.sh(finding["fix"][0])  # as printed
    assert reload.returncode == 0, reload.stderr
    assert f"restarted {W1} (" in reload.stdout
    lab.cd.wait(lambda: lab.registered(UNIT1, UNIT2), 30, "registered after reloadconfig")
    assert lab.pid(W1) != pids[W1] and lab.pid(W2) == pids[W2]
    assert lab.units()[UNIT1]["need_daemon_reload"] is False
    assert lab.cd.entry(NS1)["starts"].__len__() == 1  # its budget was reset before circus restarted it
    conf.write_text(text)
    assert lab.cli("daemon-reload").returncode == 0


def test_doctor_says_when_the_hooks_are_not_loaded_and_its_fixes_work(lab):
    doctor = lab.cli("doctor")
    assert doctor.returncode == 0 and codes(doctor.stdout) == BASELINE, doctor.stdout  # positive control
    # What a circusd whose hooks never ran leaves: the state file's listener block from another circusd.
    state = lab.cd.state()
    state["listener"]["pid"] = 1
    lab.cd.state_file.write_text(json.dumps(state))
    first = json.loads(lab.cli("doctor", "--json").stdout)["findings"][0]
    assert first["code"] == "restart_policy_down" and first["subject"] == "circusd"
    assert "from pid 1" in first["evidence"][1]

    def restart_circusd(fix):
        assert fix.startswith("by hand: stop circusd and start it again"), fix
        lab.restart_circusd(wait=False)

    fixes = fix_as_printed(lab, ["restart_policy_down"], human=restart_circusd)
    assert fixes[0] == f"tail -n 20 {lab.cd.policy_log}   # what the policy said last", fixes
    assert fixes[-1].startswith("atom-workerctl reset   # "), fixes


def test_a_changed_circus_section_asks_for_a_restart_of_circusd(lab):
    conf = lab.cd.conf
    text = conf.read_text()
    conf.write_text(text.replace("check_delay = 1\n", "check_delay = 2\n", 1))
    try:
        units = lab.units()
        assert units[UNIT1]["need_daemon_reload"] is True and units[UNIT2]["need_daemon_reload"] is True
        doctor = json.loads(lab.cli("doctor", "--json").stdout)
        finding = next(f for f in doctor["findings"] if f["code"] == "unit_changed_not_reloaded")
        assert finding["subject"] == "[circus]", finding

        def restart_circusd(fix):
            assert fix.startswith("by hand: stop circusd and start it again"), fix
            lab.restart_circusd(as_on_disk=True, wait=False)

        fix_as_printed(lab, ["unit_changed_not_reloaded"], human=restart_circusd)
        assert lab.cd.call("globaloptions")["options"]["check_delay"] == 2.0
        # A third restart of circusd within StartLimitIntervalSec: the workers' starts at circusd's start use up
        # their budget (3), as three `systemctl restart`s would; the printed reset brings them back.
        lab.restart_circusd(as_on_disk=True, wait=False)
        lab.cd.wait(lambda: lab.units()[UNIT1]["start_limit"]["hit"], 15, "the start limit")
        assert lab.sh("atom-workerctl reset").returncode == 0
    finally:
        conf.write_text(text)
    lab.restart_circusd(as_on_disk=True, wait=False)
    assert lab.sh("atom-workerctl reset").returncode == 0
    lab.cd.wait(lambda: lab.registered(UNIT1, UNIT2), 30, "both registered")


def test_errors_are_one_line(lab, tmp_path):
    def with_circus(**settings):
        data = json.loads(lab.config.read_text())
        data["circus"].update(settings)
        path = tmp_path / f"sites-{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps(data))
        return path

    no_socket = with_circus(endpoint=f"ipc://{tmp_path}/nothing.sock", service="atom-worker-circus.service")
    missing = lab.cli("status", config=no_socket)
    logs = lab.cli("logs", "-n", "3", W1, config=no_socket)  # the files need no circusd
    assert logs.returncode == 0 and len(logs.stdout.splitlines()) == 3, logs
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))  # bound, never listening: connection refused
    refused = lab.cli("doctor", config=with_circus(endpoint=f"ipc://{dead}"))
    s.close()
    readable = Path(tempfile.mkdtemp(prefix="circcfg-"))
    readable.chmod(0o755)
    shutil.copy(lab.config, readable / "sites.json")
    (readable / "sites.json").chmod(0o644)
    denied = lab.cli("status", config=readable / "sites.json", user=65534)  # the socket's folder: root's, 0700
    shutil.rmtree(readable)
    # A Python without circus (-S: no site-packages): the venv named in sites.json lends its client library...
    isolated = {**ENV, "PYTHONPATH": str(REPO / "tools")}
    venv = Path(sys.prefix)
    lent = lab.cli("status", "--no-gearman", config=with_circus(venv=str(venv)), python=(sys.executable, "-S"),
                   env=isolated)
    assert lent.returncode == 0 and "(circus): 2 instances, 2 active" in lent.stdout, lent.stdout + lent.stderr
    # ... and without one, one line says what to do.
    nolib = lab.cli("status", "--no-gearman", python=(sys.executable, "-S"), env=isolated)
    for result, text in ((missing, "no socket"), (missing, "systemctl start atom-worker-circus.service"),
                         (refused, "circusd is not running: start it: /nonexistent/bin/circusd"),
                         (denied, "permission denied"),
                         (nolib, "cannot import circus's client library"), (nolib, "run site.yml")):
        assert result.returncode == 1, result
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("atom-workerctl: error: ") and text in lines[0], lines
    unknown = lab.cli("status", "atom-worker-nope@1")
    assert unknown.returncode == 4 and len(unknown.stderr.splitlines()) == 1
    beyond = lab.cli("restart", "atom-worker@7", "--no-wait")
    assert beyond.returncode == 4 and "circusd has no such watcher" in beyond.stderr, beyond
    assert len(beyond.stderr.splitlines()) == 1
