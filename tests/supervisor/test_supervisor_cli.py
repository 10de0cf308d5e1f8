"""atom-workerctl on a supervisord host, locally: a private supervisord (supervisor_harness) running the AtoM
stand-in (real PHP worker, real gearmand) from templates/supervisor/, the atom-worker-policy listener with
RestartSec=1, StartLimitIntervalSec=60, StartLimitBurst=3, and a sites.json with "manager": "supervisor".

One supervisord for the module; the tests run in order and leave it as they found it (both instances of
pool default active and registered), except the last two (config change, errors).
"""

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import manager_tests
import prom_text
import pytest
import standin
import supervisor_harness
from gsubmit import submit_here
from manager_tests import BASELINE, BURST, ENV, codes, fix_as_printed, shape
from promtool import promtool_path
from standin import Gearmand, free_port, make_root
from supervisor_harness import write_sites_json

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from atom_workerctl import model  # noqa: E402
from atom_workerctl.journal import Entry  # noqa: E402

pytestmark = pytest.mark.timeout(60)
UNIT1, UNIT2 = "atom-worker@1.service", "atom-worker@2.service"
NS1, NS2 = "atom-workers:atom-worker@1", "atom-workers:atom-worker@2"


class Lab(manager_tests.WorkerctlLab):
    """atom-workerctl on the module's supervisord host; the printed commands find `atom-workerctl` and
    `supervisorctl` (reading /etc/supervisor/supervisord.conf, here this supervisord's by -c) on PATH."""

    timeout = 45

    def __init__(self, sv, gearmand, root, config):
        super().__init__(sv, config,
                         {"supervisorctl": f"{supervisor_harness.SUPERVISORCTL} -c {shlex.quote(str(sv.conf))}"})
        self.sv, self.gearmand, self.root = sv, gearmand, root

    def metrics(self, *args, config=None):
        result = self.cli("metrics", *args, config=config)
        assert result.returncode == 0, result.stderr
        return result.stdout


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    for tool in ("php", "gearmand", supervisor_harness.SUPERVISORD):
        assert shutil.which(tool), f"missing {tool}: apt-get install supervisor php-cli php-gearman gearman-job-server"
    base = tmp_path_factory.mktemp("svcli")
    sockdir = Path(tempfile.mkdtemp(prefix="sv-"))
    gearmand = Gearmand().start()
    sv = supervisor_harness.Supervisord(base, sockdir)
    try:
        root, sites, units = manager_tests.standin_site(base, gearmand)
        config = base / "sites.json"
        write_sites_json(config, sv, sites, units, root)
        # Small log files, so that -f is seen to follow supervisord's own rotation.
        sv.start(units, supervisor={"log_max_bytes": "2KB", "log_backups": 3}, wait_running=[NS1, NS2])
        lab = Lab(sv, gearmand, root, config)
        sv.wait(lambda: lab.registered(UNIT1, UNIT2), 30, "both workers registered")
        yield lab
    finally:
        sv.stop()
        gearmand.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


def test_status_json_has_systemds_schema_and_both_workers_registered(lab):
    code, data = lab.status()
    assert code == 0
    assert data["manager"] == "supervisor"
    reference = manager_tests.systemd_status_json(lab.config)
    assert shape(data) == shape(reference)
    units = lab.units()
    for unit, ns in ((UNIT1, NS1), (UNIT2, NS2)):
        u = units[unit]
        assert (u["active_state"], u["sub_state"], u["result"]) == ("active", "running", "success")
        assert u["main_pid"] == lab.sv.info(ns)["pid"]
        assert u["memory_bytes"] > 0 and u["since_usec"] > 0
        assert u["enabled"] is True and u["need_daemon_reload"] is False
        assert u["start_limit"] == {"burst": BURST, "interval_sec": 60, "hit": False, "reason": None}
        assert u["gearman"]["registered"] is True
    human = lab.cli("status")
    assert human.returncode == 0, human.stderr
    assert "(supervisor): 2 instances, 2 active" in human.stdout
    assert human.stdout.count("registered") >= 2


def test_metrics_say_what_status_says_and_pass_promtool(lab, tmp_path):
    text = lab.metrics()
    _, data = lab.status()
    units = lab.units()
    for unit in (UNIT1, UNIT2):
        labels = {"site": "default", "pool": "default", "worker": model.short(unit)}
        got = {name: prom_text.value(text, f"atom_worker_instance_{name}", **labels)
               for name in ("expected", "active", "failed", "start_limit_hit", "registered", "restarts_total")}
        assert got == {"expected": 1, "active": 1, "failed": 0, "start_limit_hit": 0, "registered": 1,
                       "restarts_total": units[unit]["n_restarts"]}
    gearman = data["sites"][0]["gearman"][0]
    assert prom_text.value(text, "atom_worker_gearmand_up", site="default", server=gearman["server"]) == 1
    assert gearman["functions"], "the site has expected functions"
    for fn in gearman["functions"]:
        labels = {"site": "default", "server": gearman["server"], "function": fn["function"], "job_class": fn["job"]}
        assert prom_text.value(text, "atom_worker_function_jobs_queued", **labels) == fn["queued"] - fn["running"]
        assert prom_text.value(text, "atom_worker_function_jobs_running", **labels) == fn["running"]
        assert prom_text.value(text, "atom_worker_function_workers_available", **labels) == 2

    def check_metrics(exposition):
        return subprocess.run([promtool_path(), "check", "metrics"], input=exposition, capture_output=True,
                              text=True, check=False)

    check = check_metrics(text)
    assert check.returncode == 0, check.stdout + check.stderr
    # The same check does fail on a broken exposition: a counter without _total.
    bad = text.replace("atom_worker_instance_restarts_total", "atom_worker_instance_restarts")
    check = check_metrics(bad)
    assert check.returncode != 0 and "_total" in check.stdout + check.stderr

    # No site here has config/config.php: no job table series (tests/supervisor/test_jobs_supervisor.py has them).
    assert not [n for n, _, _ in prom_text.samples(text) if n.startswith("atom_worker_jobs_")]
    names = {name for name, _, _ in prom_text.samples(lab.metrics("--functions", "no"))}
    assert "atom_worker_gearmand_up" in names and "atom_worker_instance_active" in names
    assert not [n for n in names if n.startswith("atom_worker_function_")]
    # Named sites: only theirs (in a fleet where sites live on different hosts, each site's view is exported
    # by one of its hosts). This host has one site: naming it is yes.
    def function_series(exposition):
        return sorted((n, sorted(ls.items())) for n, ls, _ in prom_text.samples(exposition)
                      if n.startswith("atom_worker_function_"))

    assert function_series(lab.metrics("--functions", "default")) == function_series(text) != []

    out = tmp_path / "atom-worker.prom"
    # What a reading killed mid-write leaves: an old one is removed, a recent one (a run going on) is not.
    for name, age in ((".atom-worker-old.tmp", 7200), (".atom-worker-new.tmp", 0)):
        (tmp_path / name).write_text("partial")
        os.utime(tmp_path / name, (time.time() - age, time.time() - age))
    assert lab.metrics("--output", str(out)) == ""
    assert (tmp_path / ".atom-worker-new.tmp").exists() and not (tmp_path / ".atom-worker-old.tmp").exists()
    (tmp_path / ".atom-worker-new.tmp").unlink()
    assert prom_text.value(out.read_text(), "atom_worker_instance_active", worker="atom-worker@1") == 1
    assert out.stat().st_mode & 0o777 == 0o644
    # No temporary file left; beside the file, the job table's counts kept for --jobs-every (none here).
    assert sorted(p.name for p in tmp_path.iterdir()) == [".atom-worker-jobs.json", "atom-worker.prom"]
    assert (tmp_path / ".atom-worker-jobs.json").stat().st_mode & 0o777 == 0o600
    # A run that cannot read the host says so in one line and leaves the file as it was.
    before = out.read_bytes()
    for result in (lab.cli("metrics", "--output", str(out), config=tmp_path / "missing.json"),
                   lab.cli("metrics", "--output", str(tmp_path / "nowhere" / "atom-worker.prom"))):
        assert result.returncode == 1 and result.stdout == "", result
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("atom-workerctl: error: ")
    assert out.read_bytes() == before


def test_status_watch_shows_the_queue_rising_while_the_workers_are_stopped(lab):
    assert shutil.which("tmux"), "missing tmux: apt-get install tmux"
    _, data = lab.status()
    gearman = data["sites"][0]["gearman"][0]
    job = gearman["functions"][0]
    host, port = gearman["server"].rsplit(":", 1)
    command = (f"env PYTHONPATH={REPO / 'tools'} NO_COLOR=1 TERM=xterm {sys.executable} -m atom_workerctl "
               f"--config {lab.config} status --watch 0.5; echo WATCH-EXIT=$?; sleep 60")
    # Every worker that runs now is stopped, then started again.
    running = [f"{p['group']}:{p['name']}" for p in lab.sv.rpc.call("supervisor.getAllProcessInfo")
               if p["group"] == "atom-workers" and p["statename"] == "RUNNING"]
    workers = str(job["available_workers"])
    assert workers == str(len(running)), (workers, running)
    tmux = Tmux("atomwatch", command)

    def row():
        return watched_row(tmux.screen(), job["job"]) or [None] * 5

    try:
        # Positive control first: with both workers up the view shows them and nothing queued.
        lab.sv.wait(lambda: row()[:3] == ["0", "0", workers], 20, "the watch view with every worker")
        assert "every instance active and registered" in tmux.screen()
        lab.sv.ctl("stop", *running, check=True)
        lab.sv.wait(lambda: row()[2] == "0", 20, "no worker")
        assert "needs attention" in tmux.screen() and "atom-workerctl reset atom-worker@1" in tmux.screen()
        submit_here(host, int(port), job["function"], "watch-a-", 2)
        lab.sv.wait(lambda: row()[0] == "2", 20, "2 queued on the screen")
        submit_here(host, int(port), job["function"], "watch-b-", 3)
        lab.sv.wait(lambda: row()[0] == "5", 20, "5 queued on the screen")
        cells = row()
        assert cells[4] == "+5" and cells[3][-1] == "█" and cells[3][0] == "▁", cells  # the trend: risen from 0 to 5
        # The view's printed fixes, run as printed, bring every worker back and the queue drains.
        fixes = [line.split("  ")[-1].strip() for line in tmux.screen().splitlines()
                 if "atom-workerctl reset" in line]
        assert sorted(fixes) == ["atom-workerctl reset atom-worker@1", "atom-workerctl reset atom-worker@2"], fixes
        for fix in fixes:
            argv = shlex.split(fix)
            assert lab.cli(*argv[1:]).returncode == 0
    finally:
        lab.sv.ctl("start", *running)  # a no-op when the fixes worked; else the module's state comes back
    try:
        lab.sv.wait(lambda: lab.registered(UNIT1, UNIT2), 30, "both workers registered again")
        lab.sv.wait(lambda: row()[:3] == ["0", "0", workers], 30, "the queue drained")
        assert "every instance active and registered" in tmux.screen()
        tmux.keys("q")
        lab.sv.wait(lambda: "WATCH-EXIT=0" in tmux.screen(), 10, "the watch to quit on q")
        assert watched_row(tmux.screen(), job["job"]) is None  # the alternate screen is gone with it
    finally:
        tmux.close()


def test_restarts_reset_the_budget_first_and_rolling_restart_registers_each(lab):
    pids = {ns: lab.sv.info(ns)["pid"] for ns in (NS1, NS2)}
    for _ in range(BURST + 1):  # more deliberate restarts than the start limit allows
        result = lab.cli("restart", "atom-worker@1", "--no-wait")
        assert result.returncode == 0, result.stderr
    lab.sv.wait(lambda: lab.registered(UNIT1), 30, "atom-worker@1 registered again")
    entry = lab.sv.entry(NS1)
    assert entry["failed"] is False and len(entry["starts"]) == 1 and entry["n_restarts"] == 0
    rolling = lab.cli("restart", "--rolling", "--json")
    assert rolling.returncode == 0, rolling.stderr
    data = json.loads(rolling.stdout)
    assert [a["unit"] for a in data["actions"]] == [UNIT1, UNIT2]
    assert all(a["registered"] is True for a in data["actions"])
    assert "[2/2] atom-worker@2: registered again" in rolling.stderr
    assert all(lab.sv.info(ns)["pid"] != pids[ns] for ns in (NS1, NS2))
    assert lab.registered(UNIT1, UNIT2)


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
    # The policy listener's lines about an instance are tagged as such.
    policy = lab.cli("logs", "-n", "200", "atom-worker@1")
    assert "atom-worker@1 [policy]: started" in policy.stdout
    assert "atom-worker@2" not in policy.stdout

    follow = subprocess.Popen([sys.executable, "-m", "atom_workerctl", "--config", str(lab.config), "logs", "-f",
                               "-n", "1", "atom-worker@2"], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        # Its first line (the last one written) comes once it follows the files: nothing after is missed.
        assert follow.stdout.readline().startswith(time.strftime("%Y-")), "logs -f printed nothing"
        log = lab.sv.log_dir / "atom-worker@2.log"
        inode = log.stat().st_ino
        restarts = 0
        while log.stat().st_ino == inode or restarts < 2:  # until supervisord rotated the file (2KB)
            # Waiting until registered: the worker has written its start lines before the next stop.
            assert lab.cli("restart", "atom-worker@2").returncode == 0
            restarts += 1
            assert restarts < 12, "the log was never rotated"
    finally:
        time.sleep(1)
        follow.terminate()
        out, _ = follow.communicate(timeout=10)
    assert out.count("atom-worker@2: Job worker termination requested.") >= restarts
    assert out.count("atom-worker@2 [policy]: started") >= restarts
    assert "atom-worker@1" not in out


def test_crash_loop_shows_the_start_limit_then_reset_brings_it_back(lab):
    standin.write_control(lab.root, crash_at_start=1)
    try:
        assert lab.cli("restart", "atom-worker@1", "--no-wait").returncode == 0
        lab.sv.wait(lambda: lab.units()[UNIT1]["start_limit"]["hit"], 30, "the start limit")
    finally:
        standin.clear_control(lab.root)
    code, _ = lab.status()
    u = lab.units()[UNIT1]
    assert code == 3
    assert (u["active_state"], u["result"], u["n_restarts"]) == ("failed", "start-limit-hit", BURST - 1)
    assert u["exit"] == {"code": "exited", "status": 1}
    human = lab.cli("status", "atom-worker@1", "--no-gearman")
    assert human.returncode == 3 and "START LIMIT HIT" in human.stdout
    text = lab.metrics()
    assert prom_text.value(text, "atom_worker_instance_start_limit_hit", worker="atom-worker@1") == 1
    assert prom_text.value(text, "atom_worker_instance_failed", worker="atom-worker@1") == 1
    assert prom_text.value(text, "atom_worker_instance_restarts_total", worker="atom-worker@1") == BURST - 1
    assert prom_text.value(text, "atom_worker_instance_start_limit_hit", worker="atom-worker@2") == 0
    doctor = lab.cli("doctor", "--json")
    assert doctor.returncode == 3
    finding = next(f for f in json.loads(doctor.stdout)["findings"] if f["code"] == "start_limit_hit")
    assert finding["subject"] == "atom-worker@1"
    assert "atom-workerctl reset atom-worker@1" in finding["fix"]
    assert any("start-limit-hit" in e for e in finding["evidence"])
    assert any("crash_at_start" in e for e in finding["evidence"])  # the worker's own last line

    reset = lab.cli("reset", "atom-worker@1")
    assert reset.returncode == 0, reset.stderr
    assert "atom-worker@1: active and registered" in reset.stdout
    assert lab.sv.entry(NS1)["failed"] is False
    assert lab.status()[0] == 0
    assert prom_text.value(lab.metrics(), "atom_worker_instance_start_limit_hit", worker="atom-worker@1") == 0


def test_scale_grows_numprocs_and_shrinks_by_stopping(lab):
    conf = lab.sv.conf_dir / "atom-worker.conf"
    grow = lab.cli("scale", "3", "--json")
    assert grow.returncode == 0, grow.stderr
    data = json.loads(grow.stdout)
    assert data["from"] == 2 and data["to"] == 3 and data["inventory_instances"] == 2
    assert "numprocs=3\n" in conf.read_text()
    assert "restarted every worker of site default" in grow.stderr
    assert lab.sv.statename("atom-workers:atom-worker@3") == "RUNNING"
    recorded = json.loads(lab.config.read_text())["sites"][0]["pools"][0]
    assert recorded["instances"] == 3 and recorded["scaled"]["inventory_instances"] == 2
    assert lab.registered(UNIT1, UNIT2, "atom-worker@3.service")

    shrink = lab.cli("scale", "2")
    assert shrink.returncode == 0, shrink.stderr
    assert lab.sv.statename("atom-workers:atom-worker@3") == "STOPPED"
    assert "numprocs=3\n" in conf.read_text()  # stopping one process must not restart the others
    recorded = json.loads(lab.config.read_text())["sites"][0]["pools"][0]
    assert recorded["instances"] == 2 and "scaled" not in recorded
    code, data = lab.status()
    assert code == 0 and data["strays"] == []


LISTENER = "atom-worker-policy:atom-worker-policy"


def test_doctor_says_when_the_restart_policy_listener_is_down(lab):
    doctor = lab.cli("doctor")
    assert doctor.returncode == 0 and codes(doctor.stdout) == BASELINE, doctor.stdout  # positive control
    lab.sv.ctl("stop", LISTENER, check=True)
    try:
        first = json.loads(lab.cli("doctor", "--json").stdout)["findings"][0]
        assert first["code"] == "restart_policy_down" and "STOPPED" in first["evidence"][0]
        fixes = fix_as_printed(lab, ["restart_policy_down"])
        assert fixes == [f"tail -n 20 {lab.sv.policy_log}   # why it stopped", f"supervisorctl start {LISTENER}"]
    finally:
        lab.sv.ctl("start", LISTENER)  # a no-op when the fixes worked
    assert lab.sv.statename(LISTENER) == "RUNNING"


def test_doctor_says_when_the_restart_policy_listener_is_not_configured(lab):
    """Its configuration file gone and supervisord updated: site.yml (a person's step) writes the file again,
    then the printed daemon-reload adds the listener's group."""
    conf = lab.sv.conf_dir / "atom-worker-policy.conf"
    saved = conf.read_text()
    conf.unlink()
    try:
        assert lab.cli("daemon-reload").returncode == 0
        assert LISTENER not in [f"{i['group']}:{i['name']}" for i in lab.sv.rpc.call("supervisor.getAllProcessInfo")]
        fixes = fix_as_printed(lab, ["restart_policy_down"], human=lambda fix: conf.write_text(saved))
        assert fixes[0].startswith("by hand: run site.yml again"), fixes
    finally:
        if not conf.exists():
            conf.write_text(saved)
            lab.sv.ctl("update")
    lab.sv.wait(lambda: lab.sv.statename(LISTENER) == "RUNNING", 15, "the listener back")


def test_a_changed_configuration_is_seen_not_applied_until_daemon_reload(lab):
    conf = lab.sv.conf_dir / "atom-worker.conf"
    pid = lab.sv.info(NS1)["pid"]
    conf.write_text(conf.read_text().replace("stopwaitsecs=", "stopwaitsecs=1"))
    units = lab.units()
    assert units[UNIT1]["need_daemon_reload"] is True
    assert lab.sv.info(NS1)["pid"] == pid  # reloadConfig compared, changed nothing
    doctor = json.loads(lab.cli("doctor", "--json").stdout)
    finding = next(f for f in doctor["findings"] if f["code"] == "unit_changed_not_reloaded")
    assert finding["fix"][0].startswith("atom-workerctl daemon-reload")
    reload = lab.cli("daemon-reload")
    assert reload.returncode == 0 and "updated group atom-workers" in reload.stdout
    lab.sv.wait(lambda: lab.registered(UNIT1, UNIT2), 30, "registered after the update")
    assert lab.sv.info(NS1)["pid"] != pid
    assert lab.units()[UNIT1]["need_daemon_reload"] is False


def test_errors_are_one_line(lab, tmp_path):
    def with_url(url):
        data = json.loads(lab.config.read_text())
        data["supervisor"]["server_url"] = url
        path = tmp_path / f"sites-{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps(data))
        return path

    no_socket = with_url(f"unix://{tmp_path}/nothing.sock")
    missing = lab.cli("status", config=no_socket)
    logs = lab.cli("logs", "-n", "3", "atom-worker@1", config=no_socket)  # the files need no supervisord
    assert logs.returncode == 0 and len(logs.stdout.splitlines()) == 3, logs
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))  # bound, never listening: connection refused
    refused = lab.cli("status", config=with_url(f"unix://{dead}"))
    s.close()
    readable = Path(tempfile.mkdtemp(prefix="svcfg-"))
    readable.chmod(0o755)
    shutil.copy(lab.config, readable / "sites.json")
    (readable / "sites.json").chmod(0o644)
    denied = lab.cli("status", config=readable / "sites.json", user=65534)  # the socket: chmod 0700, root's
    shutil.rmtree(readable)
    for result, text in ((missing, "no socket"), (refused, "supervisord is not running"),
                         (denied, "permission denied")):
        assert result.returncode == 1, result
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("atom-workerctl: error: ") and text in lines[0], lines
    unknown = lab.cli("status", "atom-worker-nope@1")
    assert unknown.returncode == 4 and len(unknown.stderr.splitlines()) == 1
    unknown = lab.cli("metrics", "--functions", "default,nope")
    assert unknown.returncode == 4 and "no such site: nope" in unknown.stderr and unknown.stdout == ""
    for args, words in ((["metrics", "--jobs-every", "-1"], "0 or more seconds"),
                        (["metrics", "--functions", "a,,b"], "site names separated by commas"),
                        (["status", "--watch", "0"], "above 0"),
                        (["status", "--watch", "--json"], "status --watch shows the whole host"),
                        (["status", "--watch", "1", "atom-worker@1"], "status --watch shows the whole host"),
                        (["-H", "nohost.invalid", "status", "--watch"], "runs on one host"),
                        (["-H", "nohost.invalid", "metrics"], "not a fleet command")):
        result = lab.cli(*args)
        assert result.returncode == 2 and result.stdout == "", (args, result)
        assert len(result.stderr.splitlines()) == 1 and words in result.stderr, (args, result.stderr)


class Tmux:
    """A private tmux server (its own socket) running one command in a fixed-size window."""

    def __init__(self, name, command):
        self.base = ["tmux", "-L", f"{name}-{os.getpid()}"]
        subprocess.run([*self.base, "new-session", "-d", "-s", "w", "-x", "150", "-y", "45", command], check=True)

    def screen(self):
        return subprocess.run([*self.base, "capture-pane", "-p", "-t", "w"], capture_output=True, text=True,
                              check=True).stdout

    def keys(self, *keys):
        subprocess.run([*self.base, "send-keys", "-t", "w", *keys], check=True)

    def close(self):
        subprocess.run([*self.base, "kill-server"], check=False, capture_output=True)


def watched_row(screen, job_class):
    """The watch view's row of a job class: [WAITING, RUNNING, WORKERS, TREND, CHANGE], or None."""
    for line in screen.splitlines():
        cells = line.split()
        if len(cells) == 6 and cells[0] == job_class:
            return cells[1:]
    return None


def test_metrics_count_queued_jobs_and_say_when_gearmand_is_unreachable(lab, tmp_path):
    # Last in the module: the queued jobs stay (no worker has their function).
    host, port = lab.gearmand.server
    _, data = lab.status()
    prefix = data["sites"][0]["prefix"]
    assert len(submit_here(host, port, f"{prefix}-arNoWorkerJob", "queued-", 3)) == 3
    text = lab.metrics()
    labels = {"function": f"{prefix}-arNoWorkerJob", "job_class": "arNoWorkerJob"}
    assert prom_text.value(text, "atom_worker_function_jobs_queued", **labels) == 3
    assert prom_text.value(text, "atom_worker_function_workers_available", **labels) == 0

    # The same site with a job server nobody listens at: a series says so, the command succeeds.
    dead = f"127.0.0.1:{free_port()}"
    config = json.loads(lab.config.read_text())
    config["sites"][0]["root"] = str(make_root(tmp_path / "root", servers=[("127.0.0.1", int(dead.split(":")[1]))]))
    config["sites"][0]["gearman_servers"] = [dead]
    path = tmp_path / "sites.json"
    path.write_text(json.dumps(config))
    text = lab.metrics("--gearman-timeout", "1", config=path)
    assert prom_text.value(text, "atom_worker_gearmand_up", site="default", server=dead) == 0
    assert not [n for n, _, _ in prom_text.samples(text) if n.startswith("atom_worker_function_")]
    assert prom_text.value(text, "atom_worker_instance_active", worker="atom-worker@1") == 1
    # Whether it is registered cannot be told without a job server: no series (1 in the first metrics test).
    assert prom_text.value(text, "atom_worker_instance_registered", worker="atom-worker@1") is None
