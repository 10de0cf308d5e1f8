"""atom-workerctl on this machine (no systemd here): YAML, AtoM config, the model, the gearman client
against a real gearmand with real stand-in workers, registration from /proc, the journal parser, and
the CLI's errors. The commands on real systemd units are in test_cli_lab.py.
"""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "tests"))

import standin  # noqa: E402
from atom_workerctl import atomconfig, gearman, journal, model, snapshot  # noqa: E402
from atom_workerctl.backend import UnitState  # noqa: E402
from atom_workerctl.errors import ConfigError, GearmanError, NoSuchError  # noqa: E402

CLI = [sys.executable, "-m", "atom_workerctl"]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "tools")}


def cli(*args, config=None, timeout=30):
    cmd = [*CLI, *(["--config", str(config)] if config else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout, check=False)


# -- AtoM configuration ---------------------------------------------------------------------------------------
@pytest.fixture()
def root(tmp_path):
    return standin.make_root(tmp_path / "atom", servers=[("127.0.0.1", 4730), ("gm2", 4731)], workers_key="k1")


def test_site_config_prefix_servers_and_abilities(root):
    cfg = atomconfig.SiteConfig(str(root))
    assert cfg.prefix == hashlib.md5((os.path.realpath(root) + "k1").encode()).hexdigest()
    assert cfg.prefix + "-" == standin.function_prefix(root, "k1")
    assert cfg.servers == ["127.0.0.1:4730", "gm2:4731"]
    assert cfg.server_keys["127.0.0.1:4730"] == "default"
    assert cfg.abilities(["move", "file_import"], []) == ["arObjectMoveJob", "arFileImportJob"]
    assert cfg.abilities([], ["arFindingAidJob"]) == ["arFindingAidJob"]
    assert set(cfg.all_classes()) == set(standin.KNOWN_CLASSES)


def test_site_config_agrees_with_the_standin(root):
    """The stand-in's own reader (standin:config) says the same servers and prefix."""
    out = json.loads(standin.symfony(root, "standin:config", check=True).stdout)
    cfg = atomconfig.SiteConfig(str(root))
    assert out["job_prefix"] == cfg.prefix + "-"
    assert out["servers"] == cfg.servers
    assert out["workers_key"] == cfg.workers_key


def test_symlinked_root_uses_the_real_path(root, tmp_path):
    link = tmp_path / "current"
    link.symlink_to(root)
    cfg = atomconfig.SiteConfig(str(link))
    assert cfg.realpath == str(root.resolve())
    assert cfg.prefix == atomconfig.job_prefix(str(root.resolve()), "k1")


def test_env_sections_and_php_casts(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "gearman.yml").write_text("all:\n  servers: 'a:1,b'\nworker:\n  servers: c:2\n")
    (tmp_path / "config" / "app.yml").write_text("all:\n  workers_key: 12\nprod:\n  workers_key: web\n")
    cfg = atomconfig.SiteConfig(str(tmp_path))
    assert cfg.servers == ["c:2"]          # the worker environment wins over all
    assert cfg.workers_key == "12"          # an integer key, as PHP casts it


@pytest.mark.parametrize("text", ["all:\n  servers: [\n", "all: {servers: {}}\n", "all:\n  other: 1\n"])
def test_malformed_gearman_yml_is_a_config_error(tmp_path, text):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "gearman.yml").write_text(text)
    (tmp_path / "config" / "app.yml").write_text("all:\n  workers_key: ''\n")
    with pytest.raises(ConfigError) as err:
        atomconfig.SiteConfig(str(tmp_path))
    assert "gearman.yml" in str(err.value)


# -- the host model -------------------------------------------------------------------------------------------
def sites_json(tmp_path, root="/usr/share/nginx/atom", servers=("127.0.0.1:4730",), pools=None):
    pools = pools or [{"name": "default", "unit_template": "atom-worker@.service", "instances": 2,
                       "units": ["atom-worker@1.service", "atom-worker@2.service"], "types": [], "abilities": []},
                      {"name": "serial", "unit_template": "atom-worker-default-serial@.service", "instances": 1,
                       "units": ["atom-worker-default-serial@1.service"], "types": ["move"], "abilities": []}]
    data = {"schema": 1, "manager": "systemd", "target": "atom-workers.target", "sites": [{
        "name": "default", "root": str(root), "realpath": os.path.realpath(root), "workers_key": "",
        "prefix": atomconfig.job_prefix(os.path.realpath(root), ""),
        "gearman_servers": list(servers), "target": "atom-workers.target",
        # The workers these tests start run as this user, in a root only it can reach (pytest's tmp_path).
        "user": "root", "group": "root", "pools": pools}]}
    path = tmp_path / "sites.json"
    path.write_text(json.dumps(data))
    return path


def test_model_selection(tmp_path):
    host = model.load(str(sites_json(tmp_path)))
    assert host.expected_units() == ["atom-worker@1.service", "atom-worker@2.service",
                                     "atom-worker-default-serial@1.service"]
    assert model.select(host, []).units == host.expected_units()
    assert model.select(host, ["2"]).units == ["atom-worker@2.service"]
    assert model.select(host, ["atom-worker-default-serial@1"]).units == ["atom-worker-default-serial@1.service"]
    assert model.select(host, ["atom-worker@*"]).units == ["atom-worker@1.service", "atom-worker@2.service"]
    assert model.select(host, [], pool="serial").units == ["atom-worker-default-serial@1.service"]
    assert model.select(host, ["1"], pool="serial").units == ["atom-worker-default-serial@1.service"]
    assert host.pool_of("atom-worker@7.service").name == "default"
    for bad in (["nginx"], ["atom-worker-other-x@1"], ["zz*"]):
        with pytest.raises(NoSuchError):
            model.select(host, bad)
    with pytest.raises(NoSuchError):
        model.select(host, [], site="nope")


@pytest.mark.parametrize("text, words", [
    ("{", "malformed JSON"), ("[]", "not an object"), ('{"schema": 9, "sites": []}', "schema 9"),
    ('{"sites": [{"name": "x"}]}', "root"), ('{"sites": [{"name": "x", "root": "/r", "pools": [{}]}]}', "name"),
])
def test_malformed_sites_json(tmp_path, text, words):
    path = tmp_path / "sites.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        model.load(str(path))
    assert words in str(err.value)


# -- the gearman admin client against a real gearmand ---------------------------------------------------------
def test_gearman_status_and_workers_with_real_workers(gearmand, tmp_path):
    root = standin.make_root(tmp_path / "atom", servers=[gearmand.server])
    worker = standin.start_worker(root, "--types=general,move")
    try:
        worker.wait_for_message("Running worker")
        prefix = standin.function_prefix(root)
        standin.wait_until(lambda: gearmand_status_has(gearmand, prefix + "arObjectMoveJob"))
        view = gearman.query(f"127.0.0.1:{gearmand.port}")
        assert view.reachable, view.error
        assert view.functions[prefix + "arFindingAidJob"].available == 1
        local = view.local_workers()
        assert len(local) == 1 and set(local[0].functions) == {prefix + "arFindingAidJob", prefix + "arObjectMoveJob"}
        assert local[0].ip == "127.0.0.1"
    finally:
        worker.stop()


def gearmand_status_has(server, function):
    return standin.gearman_status(*server.server).get(function, (0, 0, 0))[2] > 0


def test_gearman_errors_are_clear():
    port = standin.free_port()
    view = gearman.query(f"127.0.0.1:{port}")
    assert not view.reachable and "connection refused" in view.error
    with pytest.raises(GearmanError) as err:
        gearman.GearmanAdmin("nohost.invalid:4730").connect()
    assert "cannot resolve" in str(err.value)
    with pytest.raises(GearmanError):
        gearman.GearmanAdmin("a:b")


def test_gearman_tries_each_address_of_a_name(gearmand, monkeypatch):
    """The admin client connects as socket.create_connection does (it uses the C module, _connect): every
    address the name resolves to in turn, the first that accepts; else the last one's error."""
    import _socket

    closed = standin.free_port()
    good = (_socket.AF_INET, _socket.SOCK_STREAM, 6, "", ("127.0.0.1", gearmand.port))
    refusing = (_socket.AF_INET, _socket.SOCK_STREAM, 6, "", ("127.0.0.1", closed))
    unopenable = (255, _socket.SOCK_STREAM, 6, "", ("127.0.0.1", gearmand.port))  # no such address family
    answers = {b"two": [refusing, good], b"one": [refusing], b"odd": [unopenable, good]}
    real = _socket.getaddrinfo

    def getaddrinfo(host, port, *args):
        return answers[host] if host in answers else real(host, port, *args)

    monkeypatch.setattr(_socket, "getaddrinfo", getaddrinfo)
    view = gearman.query("two:4730")
    assert view.reachable, view.error
    assert view.local_ip == "127.0.0.1"
    # An address whose family cannot be opened here (a socket() error, as IPv6 on a host without it) is
    # passed over like a refusing one.
    view = gearman.query("odd:4730")
    assert view.reachable, view.error
    # Control: the same name with only the refusing address fails with that address's error.
    view = gearman.query("one:4730")
    assert not view.reachable and "connection refused" in view.error


def test_workers_lines_of_closing_connections_are_left_out():
    """gearmand lists a connection it is closing with fd -1 (seen in the fleet bench, while other hosts' admin
    connections ended): it is no worker, and no error. Control: the open ones are kept, and a line that is
    not gearmand's shape is still refused."""
    lines = ["35 10.0.0.7 pid_41_a : p-arFindingAidJob p-arObjectMoveJob", "-1 10.0.0.9 - :", "36 10.0.0.7 - :"]
    workers = gearman.parse_workers(lines, "gm:4730")
    assert [(w.fd, w.ip, w.client_id, w.functions) for w in workers] == [
        (35, "10.0.0.7", "pid_41_a", ("p-arFindingAidJob", "p-arObjectMoveJob")), (36, "10.0.0.7", "-", ())]
    for bad in ("-2 10.0.0.9 - :", "x 10.0.0.9 - :", "35 10.0.0.7 pid_41_a p-arFindingAidJob"):
        with pytest.raises(GearmanError, match="unexpected line in the answer to `workers`"):
            gearman.parse_workers([bad], "gm:4730")


def test_gearman_read_timeout_and_refusal():
    import socket
    import threading

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    port = silent.getsockname()[1]
    view = gearman.query(f"127.0.0.1:{port}", timeout=0.3)
    assert "within 0.3 s" in view.error
    silent.close()

    refusing = socket.socket()
    refusing.bind(("127.0.0.1", 0))
    refusing.listen()

    def answer():
        conn, _ = refusing.accept()
        conn.recv(100)
        conn.sendall(b"ERR UNKNOWN_COMMAND Unknown+server+command\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    view = gearman.query(f"127.0.0.1:{refusing.getsockname()[1]}")
    assert "refused `status`" in view.error
    refusing.close()


# -- registration: real workers, their sockets in /proc, gearmand's lines -------------------------------------
class FakeBackend:
    def __init__(self, states):
        self.states = states

    def units(self, names, glob):
        return {n: self.states[n] for n in list(names) + [u for u in self.states if glob and u not in names]}

    def pids(self, state):
        from atom_workerctl.backend import _process_tree

        return _process_tree(state.main_pid) if state.main_pid else []


def test_registration_from_proc_and_gearmand(gearmand, tmp_path):
    root = standin.make_root(tmp_path / "atom", servers=[gearmand.server])
    config = sites_json(tmp_path, root=root, servers=[f"127.0.0.1:{gearmand.port}"])
    host = model.load(str(config))
    prefix = standin.function_prefix(root)
    w1 = standin.start_worker(root)
    w2 = standin.start_worker(root, "--types=move")
    try:
        for w in (w1, w2):
            w.wait_for_message("Running worker")
        standin.wait_until(lambda: gearmand_status_has(gearmand, prefix + "arFindingAidJob")
                           and gearmand_status_has(gearmand, prefix + "arObjectMoveJob"))
        states = {
            "atom-worker@1.service": UnitState("atom-worker@1.service", load_state="loaded", active_state="active",
                                               sub_state="running", main_pid=w1.pid, since_usec=1),
            "atom-worker@2.service": UnitState("atom-worker@2.service", load_state="loaded", active_state="inactive",
                                               sub_state="dead"),
            "atom-worker-default-serial@1.service": UnitState(
                "atom-worker-default-serial@1.service", load_state="loaded", active_state="active",
                sub_state="running", main_pid=w2.pid, since_usec=2),
        }
        snap = standin.wait_until(lambda: _registered(snapshot.take(host, FakeBackend(states))), timeout=10)
        one = snap.instances["atom-worker@1.service"]
        assert one.connected == [f"127.0.0.1:{gearmand.port}"]
        assert snap.instances["atom-worker@2.service"].registered is False
        serial = snap.instances["atom-worker-default-serial@1.service"]
        assert serial.registered is True
        # The workers_key changes: the running workers now hold the old prefix, which nobody expects.
        standin.set_workers_key(root, "changed")
        snap = snapshot.take(host, FakeBackend(states))
        assert snap.instances["atom-worker@1.service"].registered is False
        from atom_workerctl import cmd_doctor

        codes = {f.code for f in cmd_doctor.diagnose(snap)}
        assert {"prefix_mismatch", "no_worker_for_job"} <= codes
        mismatch = next(f for f in cmd_doctor.diagnose(snap) if f.code == "prefix_mismatch")
        assert any("workers_key" in e for e in mismatch.evidence)
        assert "atom-workerctl restart --rolling --site default" in mismatch.fix
    finally:
        w1.stop()
        w2.stop()


# A worker as php-gearman's are: it registers its functions but sends no client id (gearmand shows `-`).
_ANONYMOUS_WORKER = """
import socket, struct, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
for name in sys.argv[2:]:
    s.sendall(b"\\0REQ" + struct.pack(">II", 1, len(name)) + name.encode())  # CAN_DO
print("registered", flush=True)
sys.stdin.readline()  # told to: the connection is closed, the process stays
s.close()
print("closed", flush=True)
sys.stdin.read()
"""


def test_connections_of_workers_that_name_their_process_need_no_tcp_table(gearmand, tmp_path, monkeypatch):
    """A worker that names its process in its client id (net_gearman, the stand-in) is tied to its line and
    is connected where its line is: the kernel's TCP table (a walk of its whole established-socket hash,
    milliseconds on a host with much memory) is not read. Positive control: a worker that sends no id is
    found connected and registered through the table, read once, for it alone."""
    from atom_workerctl import procnet

    reads = []  # the tables read by the latest take(): own_table as root, /proc/PID/net/tcp{,6} otherwise
    for name in ("own_table", "tcp_table"):
        real = getattr(procnet, name)
        monkeypatch.setattr(procnet, name, lambda *a, real=real, name=name: reads.append(name) or real(*a))

    def until(unit, ready):
        """The snapshot once ready(unit's InstanceView); `reads` then holds that snapshot's reads only."""
        def attempt():
            reads.clear()
            snap = snapshot.take(host, FakeBackend(states))
            return snap if ready(snap.instances[unit]) else None
        return standin.wait_until(attempt, timeout=10)

    def running(unit, pid, since):
        states[unit] = UnitState(unit, load_state="loaded", active_state="active", sub_state="running",
                                 main_pid=pid, since_usec=since)

    server = f"127.0.0.1:{gearmand.port}"
    root = standin.make_root(tmp_path / "atom", servers=[gearmand.server])
    host = model.load(str(sites_json(tmp_path, root=root, servers=[server])))
    prefix = standin.function_prefix(root)
    named = standin.start_worker(root)
    anonymous = None
    try:
        named.wait_for_message("Running worker")
        states = {u: UnitState(u, load_state="loaded", active_state="inactive", sub_state="dead")
                  for u in host.expected_units()}
        running("atom-worker@1.service", named.pid, 1)
        snap = until("atom-worker@1.service", lambda i: i.registered)
        assert snap.instances["atom-worker@1.service"].connected == [server]
        assert reads == []

        functions = sorted(snap.pool_view(host.sites[0].pools[0]).functions)
        assert functions and all(f.startswith(prefix) for f in functions)
        anonymous = subprocess.Popen([sys.executable, "-c", _ANONYMOUS_WORKER, str(gearmand.port), *functions],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert anonymous.stdout.readline().strip() == "registered"
        running("atom-worker@2.service", anonymous.pid, 2)
        snap = until("atom-worker@2.service", lambda i: i.registered)
        assert snap.instances["atom-worker@2.service"].connected == [server]
        assert snap.instances["atom-worker@1.service"].connected == [server]
        assert reads  # read, for the worker its line does not name
        # Its connection closed, its process still there: no line, and no connection is found for it.
        anonymous.stdin.write("close\n")
        anonymous.stdin.flush()
        assert anonymous.stdout.readline().strip() == "closed"
        snap = until("atom-worker@2.service", lambda i: i.connected == [])
        assert snap.instances["atom-worker@2.service"].registered is False
        assert snap.instances["atom-worker@1.service"].registered is True
    finally:
        named.stop()
        if anonymous is not None and anonymous.poll() is None:
            anonymous.kill()
            anonymous.wait()


def _registered(snap):
    insts = snap.instances
    ok = insts["atom-worker@1.service"].registered and insts["atom-worker-default-serial@1.service"].registered
    return snap if ok else None


class RestartingBackend(FakeBackend):
    """Reports atom-worker@1 as systemd does right after RestartUnit returns (issue 13 §2): for the first
    `pending` reads still active, running the old process (with the restart job queued, when `job`); then the
    new one."""

    def __init__(self, states, unit, new_pid, pending, job=True):
        super().__init__(states)
        self.unit, self.new_pid, self.pending, self.job, self.reads = unit, new_pid, pending, job, 0

    def units(self, names, glob):
        self.reads += 1
        if self.reads > self.pending:
            self.states[self.unit] = UnitState(self.unit, load_state="loaded", active_state="active",
                                               sub_state="running", main_pid=self.new_pid, since_usec=2)
        else:
            self.states[self.unit].job = "queued" if self.job else ""
        return super().units(names, glob)


def test_a_restart_is_not_done_while_the_old_worker_still_runs(gearmand, tmp_path):
    """The wait after a restart must see the new process registered: the old one is registered too, and for a
    moment after RestartUnit returns systemd still shows it active with the restart job queued."""
    from atom_workerctl.render import Out
    from atom_workerctl.waiting import wait_registered

    root = standin.make_root(tmp_path / "atom", servers=[gearmand.server])
    host = model.load(str(sites_json(tmp_path, root=root, servers=[f"127.0.0.1:{gearmand.port}"],
                                     pools=[{"name": "default", "unit_template": "atom-worker@.service",
                                             "instances": 1, "units": ["atom-worker@1.service"], "types": [],
                                             "abilities": []}])))
    prefix = standin.function_prefix(root)
    unit = "atom-worker@1.service"
    old, new = standin.start_worker(root), standin.start_worker(root)
    out = Out(stream=open(os.devnull, "w"), color=False)  # noqa: SIM115 - closed with the test process
    try:
        for w in (old, new):
            w.wait_for_message("Running worker")
        standin.wait_until(lambda: standin.gearman_status(*gearmand.server).get(prefix + "arFindingAidJob",
                                                                                (0, 0, 0))[2] == 2)

        def states():
            return {unit: UnitState(unit, load_state="loaded", active_state="active", sub_state="running",
                                    main_pid=old.pid, since_usec=1)}

        # The control: the same wait accepts a registered worker at its first read when nothing is pending.
        backend = RestartingBackend(states(), unit, new.pid, pending=0)
        result = wait_registered(host, backend, [unit], 10, out, progress=False)
        assert result.registered == [unit] and backend.reads == 1
        # Restarting: the old, registered worker with a queued job is not the restarted one; the new one is.
        backend = RestartingBackend(states(), unit, new.pid, pending=3)
        result = wait_registered(host, backend, [unit], 10, out, progress=False, replacing={unit: old.pid})
        assert result.registered == [unit] and backend.reads == 4
        assert result.snapshot.instances[unit].state.main_pid == new.pid
        # Without a queued job, the old PID alone still tells (supervisord and circus show no jobs).
        backend = RestartingBackend(states(), unit, new.pid, pending=2, job=False)
        result = wait_registered(host, backend, [unit], 10, out, progress=False, replacing={unit: old.pid})
        assert result.registered == [unit] and backend.reads == 3
    finally:
        old.stop()
        new.stop()


def test_doctor_names_an_unreachable_gearmand(tmp_path):
    port = standin.free_port()
    root = standin.make_root(tmp_path / "atom", servers=[("127.0.0.1", port)])
    host = model.load(str(sites_json(tmp_path, root=root, servers=[f"127.0.0.1:{port}"])))
    states = {u: UnitState(u, load_state="loaded", active_state="active", sub_state="running", main_pid=os.getpid())
              for u in host.expected_units()}
    from atom_workerctl import cmd_doctor

    findings = cmd_doctor.diagnose(snapshot.take(host, FakeBackend(states)))
    assert findings[0].code == "gearmand_unreachable"
    assert "config/gearman.yml all.servers.default" in findings[0].evidence[0]
    assert findings[0].fix[0].startswith("systemctl start gearman-job-server")


# -- start limit ---------------------------------------------------------------------------------------------
def _state(**kw):
    base = dict(load_state="loaded", active_state="failed", sub_state="failed", result="exit-code", n_restarts=3,
                start_limit_burst=3, start_limit_interval_usec=86400 * 10**6, restart="on-failure",
                exit_code="exited", exit_status=1)
    base.update(kw)
    return UnitState("atom-worker@1.service", **base)


def test_start_limit_detection():
    assert _state().start_limit()[0]                                  # systemd 252: Result stays exit-code
    assert _state(result="start-limit-hit", n_restarts=0).start_limit()[0]
    assert not _state(restart="no").start_limit()[0]                  # no restart was due
    assert not _state(start_limit_burst=0).start_limit()[0]           # limit off
    assert not _state(restart_prevent=(1,)).start_limit()[0]          # RestartPreventExitStatus=1
    assert not _state(active_state="activating", sub_state="auto-restart", n_restarts=1).start_limit()[0]
    assert _state(active_state="activating", sub_state="auto-restart", n_restarts=1).crash_looping()
    assert not _state(active_state="active", sub_state="running", result="success", n_restarts=0).crash_looping()


# -- journal ----------------------------------------------------------------------------------------------------
def test_journal_lines_are_tagged():
    units = {"atom-worker@1.service"}
    own = json.dumps({"_SYSTEMD_UNIT": "atom-worker@1.service", "MESSAGE": "PID 7", "__REALTIME_TIMESTAMP": "5",
                      "_PID": "7", "PRIORITY": "6"})
    about = json.dumps({"_SYSTEMD_UNIT": "init.scope", "UNIT": "atom-worker@1.service",
                        "MESSAGE": "atom-worker@1.service: Start request repeated too quickly.",
                        "__REALTIME_TIMESTAMP": "6"})
    raw = json.dumps({"_SYSTEMD_UNIT": "atom-worker@1.service", "MESSAGE": [104, 105, 255],
                      "__REALTIME_TIMESTAMP": "7"})
    other = json.dumps({"_SYSTEMD_UNIT": "cron.service", "MESSAGE": "x", "__REALTIME_TIMESTAMP": "8"})
    a, b, c = (journal.parse_line(x, units) for x in (own, about, raw))
    assert (a.instance, a.source, a.pid, a.message) == ("atom-worker@1", "worker", 7, "PID 7")
    assert (b.instance, b.source) == ("atom-worker@1", "systemd")
    assert c.message == "hi\ufffd"
    assert journal.parse_line(other, units) is None
    assert journal.parse_line("not json", units) is None
    assert a.as_dict()["time"] == "1970-01-01T00:00:00.000005Z"
    cmd = journal.command(["atom-worker@1.service"], lines=5, follow=True)
    assert cmd[:3] == ["journalctl", "-o", "json"] and "-f" in cmd and cmd[-2:] == ["-u", "atom-worker@1.service"]


# -- the command line ----------------------------------------------------------------------------------------
def test_help_lists_commands_and_examples():
    out = cli("--help").stdout
    for word in ("status", "reset", "restart", "scale", "logs", "doctor", "completion", "examples:", "exit codes"):
        assert word in out
    for command in ("status", "reset", "restart", "scale", "logs", "doctor"):
        assert "example" in cli(command, "--help").stdout


def test_bash_completion_is_valid_bash(tmp_path):
    script = cli("completion", "bash").stdout
    assert "complete -F _atom_workerctl atom-workerctl" in script
    path = tmp_path / "c.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0


def test_completion_words_from_sites_json(tmp_path):
    config = sites_json(tmp_path)
    assert cli("_complete", "instances", config=config).stdout.split() == [
        "atom-worker@1", "atom-worker@2", "atom-worker-default-serial@1"]
    assert cli("_complete", "pools", config=config).stdout.split() == ["default", "serial"]


@pytest.mark.parametrize("args, code, words", [
    (["status"], 1, "does not exist"),
    (["--config", "{bad}", "status"], 1, "malformed JSON"),
    (["--config", "{good}", "status", "nginx"], 4, "no such instance"),
    (["--config", "{good}", "status", "--site", "nope"], 4, "no such site"),
    (["--config", "{good}", "scale", "2", "--pool", "nope"], 4, "no such pool"),
    (["--config", "{good}", "status"], 1, "D-Bus"),          # this machine has no systemd
    (["--config", "{good}", "restart", "--rolling"], 1, "D-Bus"),
])
def test_errors_are_one_line_with_an_exit_code(tmp_path, args, code, words):
    good = sites_json(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    args = [a.format(bad=bad, good=good) for a in args]
    env = {**ENV, "ATOM_WORKERCTL_CONFIG": str(tmp_path / "missing.json")}
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=30, check=False)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert words in lines[0] and lines[0].startswith("atom-workerctl: ")


def test_status_imports_stay_small():
    """Start-up is most of `status`'s cost: no lxml, no pystemd wrappers, no dataclasses, no yaml."""
    code = ("import sys; sys.argv=['x','--config','/nonexistent','status'];"
            "from atom_workerctl import cli; cli.main(['--config','/nonexistent','status']);"
            "print(' '.join(sorted(sys.modules)))")
    mods = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                          check=False).stdout.split()
    for heavy in ("lxml", "lxml.etree", "pystemd.systemd1", "yaml", "dataclasses", "jinja2"):
        assert heavy not in mods


# -- fleet options (cmd_fleet.py, fleet_ssh.py): parsing, inventories, unreachable hosts ------------------------
FAKE_SSH = r'''#!/usr/bin/env python3
# Stands in for ssh: the host name after `--` picks the behaviour.
import json, sys, time
host = sys.argv[sys.argv.index("--") + 1]
if host == "down":
    sys.stderr.write("ssh: connect to host down port 22: No route to host\n")
    sys.exit(255)
if host == "slow":
    time.sleep(60)
if host == "nocli":
    sys.stderr.write("bash: line 1: atom-workerctl: command not found\n")
    sys.exit(127)
print(json.dumps({"schema": 1, "host": host, "exit_code": 0, "argv": sys.argv[-1],
                  "summary": {"instances": 2, "active": 2, "not_active": 0, "registered": 2},
                  "sites": []}))
'''


def fleet_env(tmp_path):
    ssh = tmp_path / "fake-ssh"
    ssh.write_text(FAKE_SSH)
    ssh.chmod(0o755)
    return {**ENV, "ATOM_WORKERCTL_SSH": str(ssh)}


def test_fleet_options_are_not_passed_to_the_hosts():
    from atom_workerctl import cli as cli_mod
    from atom_workerctl import cmd_fleet

    parser = cli_mod.build_parser()
    longs = cli_mod._long_options(parser)
    cases = [
        (["-i", "inv.yml", "status", "--json"], ["status"]),
        (["--inv=inv.yml", "--lim", "w1", "status", "--pool", "p"], ["status", "--pool", "p"]),
        (["-Hw1", "-H", "root@w2", "--parallel", "3", "restart", "--rolling", "--host-timeout=9"],
         ["restart", "--rolling"]),
        (["-H", "w1", "logs", "-f", "-n", "5", "--", "atom-worker@1"],
         ["logs", "-f", "-n", "5", "--", "atom-worker@1"]),
        (["-i", "inv", "--group", "g", "scale", "3", "--pool", "serial"], ["scale", "3", "--pool", "serial"]),
        # An abbreviation goes to the hosts whole: their CLI may have more options than this one.
        (["-H", "w1", "status", "--gearman-t=3", "--no-g"], ["status", "--gearman-timeout=3", "--no-gearman"]),
    ]
    for argv, remote in cases:
        parser.parse_args(argv)  # every case is valid for the parser itself
        assert cmd_fleet.remote_argv(argv, longs) == ["atom-workerctl", "--json", *remote], argv


def test_fleet_hosts_named_before_and_after_the_command_are_all_worked_on(tmp_path):
    proc = subprocess.run([*CLI, "-H", "ok", "status", "-H", "ok2", "--host", "ok3", "--json"],
                          capture_output=True, text=True, env=fleet_env(tmp_path), timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert list(json.loads(proc.stdout)["hosts"]) == ["ok", "ok2", "ok3"]


def test_fleet_logs_follow_resumes_from_the_last_line_after_a_host_drops_out():
    from atom_workerctl import cmd_fleet

    remote = ["atom-workerctl", "--json", "logs", "-f", "-n", "5", "--lines=7", "-n3", "--since", "1 hour ago",
              "--pool", "p", "--", "atom-worker@1"]
    assert cmd_fleet.resumed_argv(remote, 1_700_000_000_250_000) == [
        "atom-workerctl", "--json", "logs", "-f", "--pool", "p", "--since", "@1700000000.250000", "--",
        "atom-worker@1"]


FLAKY_SSH = r'''#!/usr/bin/env python3
# A host that drops out twice while followed: refused, then lost after two lines, then back (the command
# must now ask --since the last line seen) and finally refusing the command (which ends the follow).
import json, os, sys
state = os.environ["FAKE_STATE"]
attempt = int(open(state).read()) + 1 if os.path.exists(state) else 1
open(state, "w").write(str(attempt))
with open(state + ".argv", "a") as log:
    log.write(sys.argv[-1] + "\n")
line = lambda usec, msg: print(json.dumps({"usec": usec, "unit": "atom-worker@1.service", "instance": "atom-worker@1",
                                           "source": "worker", "pid": 7, "message": msg}), flush=True)
if attempt == 1:
    sys.stderr.write("ssh: connect to host flaky port 22: Connection refused\n")
    sys.exit(255)
if attempt == 2:
    line(100, "one"); line(200, "two")
    sys.stderr.write("Connection to flaky closed by remote host.\n")
    sys.exit(255)
line(200, "two"); line(300, "three")
sys.stderr.write("atom-workerctl: error: no such instance\n")
sys.exit(4)
'''


def test_fleet_logs_follow_reconnects_a_host_that_drops_out(tmp_path, monkeypatch, capsys):
    from atom_workerctl import cli as cli_mod
    from atom_workerctl import cmd_fleet, fleet_ssh

    ssh = tmp_path / "flaky-ssh"
    ssh.write_text(FLAKY_SSH)
    ssh.chmod(0o755)
    monkeypatch.setattr(fleet_ssh, "SSH", str(ssh))
    monkeypatch.setattr(cmd_fleet, "RECONNECT_EVERY", 0.1)
    monkeypatch.setenv("FAKE_STATE", str(tmp_path / "state"))
    began = time.time()
    code = cli_mod.main(["-H", "flaky", "logs", "-f", "-n", "0", "--json"])
    out, err = capsys.readouterr()
    assert code == 4, err  # the host's last answer: no such instance
    assert [json.loads(ln)["message"] for ln in out.splitlines()] == ["one", "two", "three"]  # none twice
    assert all(json.loads(ln)["host"] == "flaky" for ln in out.splitlines())
    sent = (tmp_path / "state.argv").read_text().splitlines()
    # The first retry, before any line: from when following began; the next one: from the last line seen.
    assert sent[0] == "atom-workerctl --json logs -f -n 0" and len(sent) == 3, sent
    assert sent[1].startswith("atom-workerctl --json logs -f --since @"), sent
    assert began <= float(sent[1].rpartition("@")[2]) <= time.time()
    assert sent[2] == "atom-workerctl --json logs -f --since @0.000200"
    notes = err.splitlines()
    assert notes[0] == ("[flaky] stopped following: ssh: connect to host flaky port 22: Connection refused; "
                        "trying again every 0.1 s"), notes
    assert "[flaky] following again" in notes
    assert notes[-1] == "[flaky] stopped following: error: no such instance", notes
    assert notes.count("[flaky] following again") == 2, notes


def test_fleet_hosts_from_an_inventory_ansible_and_the_fallback_reader_agree(tmp_path):
    from atom_workerctl import fleet_ssh

    inventory = str(REPO / "inventory" / "examples" / "fleet.yml")
    for limit, names in [(None, ["worker1", "worker2", "worker3"]), ("worker1:worker3", ["worker1", "worker3"]),
                         ("all:!worker2", ["worker1", "worker3"]), ("*3:worker2", ["worker2", "worker3"]),
                         ("atom_workers:&worker2", ["worker2"])]:
        ansible = fleet_ssh.from_inventory(inventory, limit, "atom_workers")
        ours = fleet_ssh._from_yaml(inventory, limit, "atom_workers")
        assert [t.name for t in ansible] == [t.name for t in ours] == names, limit
        assert [t.address for t in ansible] == [t.address for t in ours]
    # Connection variables become ssh options; templated ones are refused for that host only.
    target = fleet_ssh.target_from_vars("w", {"ansible_host": "10.0.0.5", "ansible_user": "ops", "ansible_port": 2222,
                                              "ansible_ssh_private_key_file": "/k", "ansible_become": True,
                                              "ansible_ssh_common_args": "-o ProxyJump=bastion"})
    argv = target.ssh_argv(["atom-workerctl", "--json", "status"], 5)
    assert argv[-3:] == ["--", "10.0.0.5", "sudo -n atom-workerctl --json status"]
    for pair in (["-p", "2222"], ["-i", "/k"], ["-l", "ops"], ["-o", "ProxyJump=bastion"], ["-o", "BatchMode=yes"]):
        assert any(argv[i:i + 2] == pair for i in range(len(argv))), (pair, argv)
    assert "template" in fleet_ssh.target_from_vars("w", {"ansible_host": "{{ x }}"}).error


def test_fleet_unreachable_slow_and_cli_less_hosts_are_reported_and_the_rest_answers(tmp_path):
    env = fleet_env(tmp_path)
    proc = subprocess.run([*CLI, "-H", "ok", "-H", "down", "-H", "slow", "-H", "nocli", "-H", "ops@ok2:2200",
                           "--host-timeout", "2", "status", "--json"],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 5, proc.stderr  # partial
    data = json.loads(proc.stdout)
    assert data["schema"] == 1 and data["mode"] == "fleet" and data["partial"] and data["exit_code"] == 5
    assert list(data["hosts"]) == ["ok", "down", "slow", "nocli", "ok2"]
    assert data["hosts"]["ok"]["argv"] == "atom-workerctl --json status"
    assert data["fleet"]["ok2"] == {**data["fleet"]["ok2"], "user": "ops", "port": 2200, "reached": True}
    assert "No route to host" in data["fleet"]["down"]["error"]
    assert "no answer within 2 s" in data["fleet"]["slow"]["error"]
    assert "not found on the host" in data["fleet"]["nocli"]["error"]
    assert data["summary"]["unreachable"] == ["down", "slow", "nocli"]
    assert data["fleet"]["ok"]["seconds"] < 2  # the slow host did not hold the others up
    human = subprocess.run([*CLI, "-H", "ok", "-H", "down", "status", "--no-gearman"], capture_output=True,
                           text=True, env=env, timeout=60, check=False)
    assert human.returncode == 5 and "UNREACHABLE: ssh: connect to host down" in human.stdout, human.stdout


@pytest.mark.parametrize("args, words", [
    (["-H", "a", "--parallel", "0", "status"], "--parallel"),
    (["-H", "a b", "status"], "expected [user@]host[:port]"),
    (["-H", "a:x", "status"], "port must be a number"),
    (["-l", "w1", "status"], "--limit needs --inventory"),
    (["-i", "/nonexistent.yml", "status"], "no such file"),
    (["-H", "a", "completion", "bash"], "not a fleet command"),
    (["-H", "a", "jobs", "export"], "run it on one host"),
    (["-H", "a", "jobs", "clear", "--before", "1 day ago"], "run it on one host"),
    (["-H", "a", "jobs", "--status", "stuck"], "unknown status 'stuck'"),
])
def test_fleet_bad_usage_is_one_line_exit_2(tmp_path, args, words):
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, env=fleet_env(tmp_path), timeout=30,
                          check=False)
    assert proc.returncode == 2 and not proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("atom-workerctl: error: "), lines


def test_fleet_code_is_not_imported_without_fleet_options():
    code = ("import sys; from atom_workerctl import cli; cli.main(['--config','/nonexistent','status']);"
            "print(' '.join(sorted(sys.modules)))")
    mods = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                          check=False).stdout.split()
    assert "atom_workerctl.cli" in mods
    assert "atom_workerctl.cmd_fleet" not in mods and "atom_workerctl.fleet_ssh" not in mods
    assert "atom_workerctl.fleet_jobs" not in mods and "atom_workerctl.sshmux" not in mods
    assert "concurrent.futures" not in mods
