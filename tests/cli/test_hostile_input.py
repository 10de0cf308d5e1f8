"""Hostile or odd input, on this machine: each gets one clear line and a defined exit code, changes nothing,
and never reaches what it tries to reach. Every refusal has a positive control: the same probe with a sound
value gets through, so "refused" means refused for the right reason.

- the atom_worker role's preflight (ansible-playbook on localhost, check mode, preflight tags only);
- the one gearmand admin client (tools/atom_workerctl/gearman.py) against fake peers on 127.0.0.1 that
  flood or trickle, imported by the CLI and run as the playbooks' check with Debian's plain python3;
- fleet commands: host names that ssh would read as options (with the real ssh, whose ProxyCommand would
  touch a marker), an inventory printer that prints garbage, a port that is not a number, a followed host
  that sends lines that are not journal entries, timeouts that are not timeouts;
- atom-worker-policy status on a state file of the wrong shape.
"""

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from atom_workerctl import fleet_ssh, gearman  # noqa: E402
from atom_workerctl.errors import GearmanError  # noqa: E402
from standin import free_port  # noqa: E402

VENV = REPO / ".venv" / "bin"
CLI = [sys.executable, "-m", "atom_workerctl"]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "tools")}
CHECK = REPO / "playbooks" / "tasks" / "files" / "atom_gearman_check.py"
POLICY = REPO / "roles" / "atom_worker" / "files" / "atom-worker-policy"
SYSTEM_PYTHON = "/usr/bin/python3"  # what worker hosts run the check with: no venv, no atom_workerctl


def one_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# -- the role's preflight ----------------------------------------------------------------------------------------
PLAY = """- hosts: localhost
  connection: local
  gather_facts: false
  vars:
    ansible_python_interpreter: "{{ ansible_playbook_python }}"
  roles:
    - role: atom_worker
"""


@pytest.fixture(scope="module")
def preflight(tmp_path_factory):
    """Run the role's preflight (and nothing else) in check mode against an AtoM root made here."""
    tmp = tmp_path_factory.mktemp("preflight")
    root = tmp / "atom"
    (root / "config").mkdir(parents=True)
    (root / "symfony").write_text("")
    (root / "config" / "gearman.yml").write_text("all:\n  servers:\n    default: 127.0.0.1:4730\n")
    (tmp / "play.yml").write_text(PLAY)
    base = {"atom_worker_root": str(root), "atom_worker_user": "root", "atom_worker_group": "root",
            "atom_worker_after_services_detect": False, "atom_worker_gearman_servers": ["127.0.0.1:4730"]}

    return lambda extra: run_preflight(tmp, "atom_worker_preflight", {**base, **extra})


def run_preflight(tmp, tag: str, variables: dict, inventory: str = "localhost,",
                  select: str = "--tags") -> subprocess.CompletedProcess:
    """tmp/play.yml's role, only the tasks tagged `tag` (select="--skip-tags": all but those), in check mode on
    this machine, with `variables`."""
    (tmp / "vars.json").write_text(json.dumps(variables))
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(REPO / "roles"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")}
    return subprocess.run([str(VENV / "ansible-playbook"), "-i", inventory, str(tmp / "play.yml"), "--check",
                           select, tag, "-e", f"@{tmp / 'vars.json'}"],
                          capture_output=True, text=True, env=env, cwd=tmp, timeout=300, check=False)


# (case, extra vars, one entry per expected failure line: words that line must hold)
PREFLIGHT_BAD = [
    ("ability-newline", {"atom_worker_abilities": ["X\nUser=root"]},
     [["atom_worker_abilities[0]='X\\nUser=root' holds a control character"]]),
    ("site-workers-key-newline", {"atom_worker_sites": [{"name": "a", "root": "/srv/a", "workers_key": "k\nx: 1"}]},
     [["atom_worker_sites[0].workers_key='k\\nx: 1' holds a control character"]]),
    ("interval-newline", {"atom_worker_start_limit_interval_sec": "24h\nUser=root"},
     [["atom_worker_start_limit_interval_sec='24h\\nUser=root' holds a control character"]]),
    ("server-trailing-newline", {"atom_worker_gearman_servers": ["127.0.0.1:4730\n"]},
     [["atom_worker_gearman_servers[0]='127.0.0.1:4730\\n' holds a control character"]]),
    ("nul-deep-in-a-site", {"atom_worker_sites": [{"name": "a", "root": "/srv/a",
                                                   "pools": [{"name": "p", "abilities": ["a\u0000"]}]}]},
     [["atom_worker_sites[0].pools[0].abilities[0]='a\\x00' holds a control character ('\\x00')"]]),
    # Two bad values: two lines, each naming its variable.
    ("php-with-arguments-and-a-type-with-a-blank",
     {"atom_worker_php": "/usr/bin/php -d x", "atom_worker_types": ["general move"]},
     [["atom_worker_php='/usr/bin/php -d x': must be an absolute path"],
      ["atom_worker_types[0]='general move': must be a worker type or job class name"]]),
    ("php-relative", {"atom_worker_php": "php"}, [["atom_worker_php='php': must be an absolute path"]]),
    ("ability-with-a-specifier", {"atom_worker_pools": [{"name": "s", "abilities": ["a%n"]}]},
     [["atom_worker_pools[0].abilities[0]='a%n': must be a worker type or job class name"]]),
    ("read-write-dir-with-a-blank", {"atom_worker_read_write_dirs": ["cache /etc"]},
     [["atom_worker_read_write_dirs[0]='cache /etc': must be a path"]]),
    ("site-user-option", {"atom_worker_sites": [{"name": "a", "root": "/srv/a", "user": "-r"}]},
     [["atom_worker_sites[0].user='-r': must be a user or group name"]]),
    # The role's argument spec refuses these first, in its own words.
    ("restart-mode", {"atom_worker_restart": "sometimes"}, [["atom_worker_restart", "sometimes"]]),
    ("kill-signal", {"atom_worker_kill_signal": "SIGFOO"}, [["atom_worker_kill_signal", "SIGFOO"]]),
]


def test_preflight_passes_sound_values(preflight):
    """The positive control of every case below: the same run with sound values gets through."""
    proc = preflight({"atom_worker_pools": [{"name": "s", "types": ["move"], "abilities": ["arFindingAidJob"]}],
                      "atom_worker_read_write_dirs": ["cache", "/srv/atom-data/uploads"]})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "failed=0" in proc.stdout and "changed=0" in proc.stdout


@pytest.mark.parametrize("case, extra, expected", PREFLIGHT_BAD, ids=[c[0] for c in PREFLIGHT_BAD])
def test_preflight_refuses_hostile_values_one_line_each(preflight, case, extra, expected):
    assert_refused_one_line_each(preflight(extra), expected)


def assert_refused_one_line_each(proc, expected):
    """The run failed, with one failed line per expected entry, each naming its value; nothing changed."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    failed = [ln for ln in proc.stdout.splitlines() if ln.startswith(("failed:", "fatal:"))]
    assert len(failed) == len(expected), (failed, out[-3000:])
    for words in expected:  # each on one line (a loop item's header, or the message of a failed task)
        assert any(all(w in ln for w in words) for ln in out.splitlines()), (words, out[-3000:])
    assert "changed=0" in proc.stdout, out[-3000:]


@pytest.mark.parametrize("gm_vars, role_vars, refused", [
    # A job server that relies on the gearmand role's default listens on its own loopback: unreachable.
    ({}, {}, True),
    ({"gearman_job_server_listen_address": "10.0.0.5"}, {}, False),
    # The role's own list of job servers: the group's addresses are not asked at all.
    ({}, {"atom_worker_gearman_servers": ["10.0.0.5:4730"]}, False),
])
def test_preflight_reads_the_job_servers_listen_address_or_its_default(tmp_path, gm_vars, role_vars, refused):
    """The job servers of the inventory's group, with and without their listen address (the gearmand role's
    default is loopback): refused in one line when unreachable from this host, else passed (the controls)."""
    root = tmp_path / "atom"
    (root / "config").mkdir(parents=True)
    (root / "symfony").write_text("")
    (root / "config" / "gearman.yml").write_text("all:\n  servers:\n    default: 127.0.0.1:4730\n")
    (tmp_path / "play.yml").write_text(PLAY)
    (tmp_path / "inventory.json").write_text(json.dumps({"all": {"children": {
        "gearman_job_servers": {"hosts": {"gm": gm_vars or None}},
        "atom_workers": {"hosts": {"localhost": None}}}}}))
    proc = run_preflight(tmp_path, "atom_worker_preflight", {
        "atom_worker_root": str(root), "atom_worker_user": "root", "atom_worker_group": "root",
        "atom_worker_after_services_detect": False, **role_vars}, inventory=str(tmp_path / "inventory.json"))
    needle = "gm (group gearman_job_servers) listens on 127.0.0.1, which this worker host (localhost) cannot reach"
    assert (proc.returncode != 0) == refused, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert (needle in proc.stdout) == refused, proc.stdout[-3000:]
    assert "HostVarsVars" not in proc.stdout + proc.stderr


# -- the gearman_job_server role's preflight ---------------------------------------------------------------------
GEARMAND_PLAY = PLAY.replace("role: atom_worker", "role: gearman_job_server")
GEARMAND_BAD = [
    ("sqlite-db-newline", {"gearman_job_server_sqlite_db": "/var/lib/gearman/q\nExecStartPre=/bin/sh -c id"},
     [["gearman_job_server_sqlite_db='/var/lib/gearman/q\\nExecStartPre=/bin/sh -c id' holds a control character"]]),
    ("extra-arg-newline", {"gearman_job_server_extra_args": ["--keepalive\nUser=root"]},
     [["gearman_job_server_extra_args[0]='--keepalive\\nUser=root' holds a control character"]]),
    ("allowed-address-tab", {"gearman_job_server_allowed_addresses": ["10.0.0.1\t"]},
     [["gearman_job_server_allowed_addresses[0]='10.0.0.1\\t' holds a control character"]]),
    ("mysql-no-password", {"gearman_job_server_queue_type": "mysql"}, [["queue_type mysql needs", "password empty"]]),
    ("mysql-password-newline", {"gearman_job_server_queue_type": "mysql",
                                "gearman_job_server_mysql_password": "s3cret\nExecStartPre=/bin/id"},
     [["queue_type mysql needs", "password set"]]),
]


@pytest.fixture(scope="module")
def gearmand_preflight(tmp_path_factory):
    """The gearman_job_server role's preflight alone, in check mode on this machine (it changes nothing)."""
    tmp = tmp_path_factory.mktemp("gearmand-preflight")
    (tmp / "play.yml").write_text(GEARMAND_PLAY)

    return lambda extra: run_preflight(tmp, "gearman_job_server_preflight", extra)


def test_gearmand_preflight_passes_sound_values(gearmand_preflight):
    """The positive control: the same run with sound values (and an extra argument) gets through."""
    proc = gearmand_preflight({"gearman_job_server_extra_args": ["--keepalive"],
                               "gearman_job_server_allowed_addresses": ["10.0.0.1"]})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "failed=0" in proc.stdout and "changed=0" in proc.stdout


def test_gearmand_role_refuses_to_run_without_its_preflight(tmp_path):
    """Every step decides from the preflight's probe: with it skipped the role stops in one line, changing
    nothing, instead of doing nothing silently. The control: with the preflight run, the same refusal is skipped
    and the run passes (so the refusal is the missing probe's)."""
    (tmp_path / "play.yml").write_text(GEARMAND_PLAY)
    skipped = run_preflight(tmp_path, "gearman_job_server_preflight", {}, select="--skip-tags")
    assert_refused_one_line_each(skipped, [["needs its preflight", "--skip-tags gearman_job_server_preflight"]])
    control = run_preflight(tmp_path, "gearman_job_server_preflight", {})
    assert control.returncode == 0 and "failed=0" in control.stdout, control.stdout[-3000:]
    read = "TASK [gearman_job_server : Read the host"  # the preflight's probe: skipped, then run
    assert read not in skipped.stdout and read in control.stdout, control.stdout[-3000:]
    assert re.search(r"TASK \[gearman_job_server : Refuse to run without the preflight\] \*+\nskipping:",
                     control.stdout), control.stdout[-3000:]


@pytest.mark.parametrize("case, extra, expected", GEARMAND_BAD, ids=[c[0] for c in GEARMAND_BAD])
def test_gearmand_preflight_refuses_control_characters(gearmand_preflight, case, extra, expected):
    proc = gearmand_preflight(extra)
    assert_refused_one_line_each(proc, expected)
    assert "s3cret" not in proc.stdout + proc.stderr  # the queue's password is never shown


def test_gearmand_preflight_passes_a_sound_mysql_queue(gearmand_preflight):
    proc = gearmand_preflight({"gearman_job_server_queue_type": "mysql",
                               "gearman_job_server_mysql_password": "s3cret#'x"})
    assert proc.returncode == 0 and "failed=0" in proc.stdout, proc.stdout[-3000:]
    assert "s3cret" not in proc.stdout + proc.stderr


# -- the gearmand admin client against peers that misbehave ------------------------------------------------------
PREFIX = "0123456789abcdef0123456789abcdef"
WORKERS = (f"5 127.0.0.1 - : {PREFIX}-arFindingAidJob {PREFIX}-arObjectMoveJob\n"
           f"6 10.9.9.9 - : {PREFIX}-arObjectMoveJob\n")


def well_behaved(conn):
    """Answers like gearmand: each command line gets its listing and the final `.`."""
    buf = b""
    while True:
        data = conn.recv(4096)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            command, _, buf = buf.partition(b"\n")
            if command == b"status":
                conn.sendall(f"{PREFIX}-arFindingAidJob\t0\t0\t1\n{PREFIX}-arObjectMoveJob\t2\t0\t2\n.\n".encode())
            elif command == b"workers":
                conn.sendall(WORKERS.encode() + b".\n")
            else:
                conn.sendall(b"ERR UNKNOWN_COMMAND Unknown+server+command\n")


def flood(conn):
    """Never ends its answer: worker lines as fast as the socket takes them."""
    conn.recv(4096)
    functions = " ".join(f"{PREFIX}-arJob{n}" for n in range(30))  # ~1.3 KB a line, as a busy worker's
    line = f"5 127.0.0.1 - : {functions}\n".encode() * 100
    while True:
        conn.sendall(line)


def flood_lines(conn):
    conn.recv(4096)
    while True:
        conn.sendall(b"x\n" * 50000)


def trickle(conn):
    """A byte every 0.2 s, never a whole answer: each read gets something, so only a deadline ends it."""
    conn.recv(4096)
    while True:
        conn.sendall(b"5")
        threading.Event().wait(0.2)


class Peer:
    """A TCP server on 127.0.0.1 that serves each connection with `behaviour` until the client goes away."""

    def __init__(self, behaviour):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.server = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.behaviour = behaviour
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn, contextlib.suppress(OSError):  # OSError: the client closed, done
            self.behaviour(conn)

    def close(self):
        self.sock.close()


@pytest.fixture
def peer():
    peers = []

    def make(behaviour):
        peers.append(Peer(behaviour))
        return peers[-1]

    yield make
    for p in peers:
        p.close()


def query_in_thread(server, **kw):
    """gearman.query in a thread joined with a generous guard: a client without a deadline fails here, by
    hanging past the guard, instead of hanging the suite."""
    box = {}
    thread = threading.Thread(target=lambda: box.update(view=gearman.query(server, **kw)), daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), f"gearman.query({server}, {kw}) still running after the 60 s guard"
    return box["view"]


def test_gearman_client_reads_a_well_behaved_peer(peer):
    """The positive control of the caps and the deadline: a peer that answers like gearmand is read whole."""
    view = query_in_thread(peer(well_behaved).server, timeout=1)
    assert view.reachable, view.error
    assert view.functions[f"{PREFIX}-arObjectMoveJob"].available == 2
    assert [w.ip for w in view.workers] == ["127.0.0.1", "10.9.9.9"]
    assert len(view.local_workers()) == 1


def test_gearman_client_stops_a_trickling_peer_at_its_deadline(peer):
    view = query_in_thread(peer(trickle).server, timeout=1)
    assert view.error == "no complete answer to `status` within 1 s", view.error


def test_gearman_client_stops_a_flooding_peer_at_the_cap(peer):
    view = query_in_thread(peer(flood).server, timeout=30)
    assert view.error == ("answered `status` with more than 8388608 bytes (the cap on a reply); not gearmand, "
                          "or a broken one"), view.error
    view = query_in_thread(peer(flood_lines).server, timeout=30)
    assert view.error.startswith("answered `status` with more than 100000 lines"), view.error


def test_gearman_client_memory_stays_small_under_a_flood(peer):
    """The CLI's own process, flooded: its peak RSS stays far below what an uncapped reader reaches."""
    server = peer(flood).server
    code = ("import resource, sys; from atom_workerctl import gearman; "
            f"v = gearman.query({server!r}, timeout=30); print(v.error); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120,
                          check=False)
    error, peak_kib = proc.stdout.splitlines()
    assert "more than 8388608 bytes" in error
    assert int(peak_kib) < 100 * 1024, f"peak RSS {int(peak_kib) // 1024} MiB"
    # The control: the same probe sees memory that is really used (a 64 MiB buffer shows up in the peak).
    used = subprocess.run([sys.executable, "-c", ("import resource; b = bytearray(64 << 20); "
                           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")],
                          capture_output=True, text=True, timeout=60, check=True)
    assert int(used.stdout) > 64 * 1024


def test_gearman_client_refuses_a_server_that_is_not_host_port():
    # One parser for the CLI and the playbooks' check: `a..b` is refused before any resolver sees it.
    for bad in ("a:b", "-oProxy:4730", "host\n:4730", "[::1:4730", "h:0", "h:70000", "a..b:4730", "x" * 64 + ":1"):
        with pytest.raises(GearmanError, match="not host:port"):
            gearman.GearmanAdmin(bad)
    assert gearman.split_server("[::1]:4731") == ("::1", 4731) and gearman.split_server("h") == ("h", 4730)


def sites_json(tmp_path, server, instances=1):
    path = tmp_path / "sites.json"
    path.write_text(json.dumps({"schema": 1, "sites": [
        {"name": "default", "prefix": PREFIX, "gearman_servers": [server],
         "pools": [{"name": "default", "instances": instances}]}]}))
    return path


def check(*args):
    """The playbooks' check as the hosts run it: Debian's python3, isolated (no venv, no PYTHONPATH)."""
    return subprocess.run([SYSTEM_PYTHON, "-I", str(CHECK), *args], capture_output=True, text=True, timeout=120,
                          check=False, cwd="/")


def test_playbook_check_is_the_cli_client_and_runs_with_plain_python3(tmp_path, peer):
    assert CHECK.resolve() == (REPO / "tools" / "atom_workerctl" / "gearman.py").resolve()
    state = sites_json(tmp_path, peer(well_behaved).server)
    wait = check("wait", "--timeout", "5", "--state-file", str(state))
    assert wait.returncode == 0, wait.stderr
    report = json.loads(wait.stdout)
    assert report["registered"] is True and list(report["servers"].values())[0]["registered"] == 1
    coverage = check("coverage", "--state-file", str(state))
    report = json.loads(coverage.stdout)
    assert coverage.returncode == 0 and report["errors"] == [], coverage.stderr
    # arFindingAidJob has no worker elsewhere (10.9.9.9 only serves moves): restarting this host leaves it bare.
    assert report["uncovered"] == [f"{list(report['servers'])[0]} {PREFIX}-arFindingAidJob"]


def test_playbook_check_wait_ends_at_its_deadline_against_a_trickling_peer(tmp_path, peer):
    state = sites_json(tmp_path, peer(trickle).server)
    wait = check("wait", "--timeout", "2", "--state-file", str(state))
    assert wait.returncode == 1, wait.stderr
    report = json.loads(wait.stdout)
    error = list(report["servers"].values())[0]["error"]
    assert report["registered"] is False, report
    assert "no complete answer to `workers` before the 2 s wait ended" in error, report
    flooded = check("coverage", "--state-file", str(sites_json(tmp_path, peer(flood).server)))
    assert flooded.returncode == 1 and "more than 8388608 bytes" in json.loads(flooded.stdout)["errors"][0]


def test_playbook_check_wait_that_times_out_says_why(tmp_path):
    """A wait that ends unregistered reports each server's last answer (here: refused), not that the
    last round had no time to ask; the control is the well-behaved peer's registered report above."""
    state = sites_json(tmp_path, f"127.0.0.1:{free_port()}")  # a port nothing listens on
    wait = check("wait", "--timeout", "1", "--interval", "0.3", "--state-file", str(state))
    assert wait.returncode == 1, wait.stderr
    error = list(json.loads(wait.stdout)["servers"].values())[0]["error"]
    assert "connection refused" in error, error


@pytest.mark.parametrize("text", [
    "{", "[]", '{"sites": 5}', '{"sites": [{"pools": []}]}',
    '{"sites": [{"prefix": "p", "gearman_servers": ["h:1"], "pools": [{"instances": "x"}]}]}'])
def test_playbook_check_refuses_a_model_of_the_wrong_shape_in_one_line(tmp_path, text):
    state = tmp_path / "sites.json"
    state.write_text(text)
    proc = check("wait", "--timeout", "1", "--state-file", str(state))
    assert proc.returncode == 2 and not proc.stdout
    assert one_line(proc).startswith(f"atom_gearman_check: {state}: ")


# -- fleet: host names ssh would read as options -----------------------------------------------------------------
# Records what it was asked (the host after `--`, the whole argv) and answers as a host's atom-workerctl would.
SSH_STANDIN = r'''#!/usr/bin/env python3
import json, os, sys
with open(os.environ["SSH_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\n")
host = sys.argv[sys.argv.index("--") + 1]
if host == "list":
    print("[1]")
    sys.exit(0)
if host == "journal":
    remote = sys.argv[-1]
    for line in ["42", '"text"', "[1]", '{"usec": "soon", "message": "x"}', "not json at all",
                 '{"usec": 100, "unit": "atom-worker@1.service", "instance": "atom-worker@1", "pid": 7, '
                 '"message": {"odd": ["but", "an", "object"]}}',
                 '{"usec": 200, "unit": "atom-worker@1.service", "instance": "atom-worker@1", "pid": 7, '
                 '"message": "a real line"}']:
        print(line, flush=True)
    if " -f" in remote:
        sys.stderr.write("atom-workerctl: error: no such instance\n")  # ends the follow
        sys.exit(4)
    sys.exit(0)
print(json.dumps({"schema": 1, "host": host, "exit_code": 0, "summary": {"instances": 1, "active": 1,
                  "not_active": 0, "registered": 1}, "sites": []}))
'''


@pytest.fixture
def fleet(tmp_path):
    """The CLI with the ssh stand-in, or with the real ssh (`real_ssh=True`); the stand-in's log of calls."""
    standin = tmp_path / "ssh-standin"
    standin.write_text(SSH_STANDIN)
    standin.chmod(0o755)
    log = tmp_path / "ssh.log"

    def run(*args, real_ssh=False, path_first=None):
        env = {**ENV, "SSH_LOG": str(log)}
        if not real_ssh:
            env["ATOM_WORKERCTL_SSH"] = str(standin)
        if path_first:
            env["PATH"] = f"{path_first}:{env['PATH']}"
        return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=120, check=False,
                              cwd=tmp_path)

    run.calls = lambda: [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []
    return run


def test_real_ssh_runs_a_proxy_command_given_as_an_option(tmp_path):
    """The control of the marker probe below: the very option, where ssh reads options, runs its command."""
    marker, option = proxy_command(tmp_path)
    subprocess.run(["ssh", "-o", "BatchMode=yes", option, "nohost.invalid", "true"],
                   capture_output=True, timeout=60, check=False)
    assert marker.exists()


def proxy_command(tmp_path):
    """A ProxyCommand without blanks (a blank would be refused for itself) that leaves a marker when run."""
    marker, script = tmp_path / "marker", tmp_path / "leave-marker"
    script.write_text(f"#!/bin/sh\ntouch {marker}\n")
    script.chmod(0o755)
    return marker, f"-oProxyCommand={script}"


def test_a_host_name_starting_with_a_dash_never_reaches_ssh(tmp_path, fleet):
    marker, option = proxy_command(tmp_path)
    for host in (option, f"root@{option}", f"{option}@host", f"-oProxyCommand=touch {marker}"):
        proc = fleet(f"-H{host}", "status", real_ssh=True)  # as in the report: `-H-oProxyCommand=...`
        assert proc.returncode == 2 and not proc.stdout, proc.stderr
        assert "starts with '-' (ssh would read it as an option)" in one_line(proc)
    inventory = tmp_path / "inventory.yml"
    inventory.write_text("all:\n  children:\n    atom_workers:\n      hosts:\n"
                         f"        w1:\n          ansible_host: '{option}'\n")
    proc = fleet("-i", str(inventory), "status", real_ssh=True)
    assert proc.returncode == 2 and not proc.stdout, proc.stderr
    assert one_line(proc).startswith("atom-workerctl: error: inventory host 'w1': ansible_host '-oProxyCommand=")
    assert not marker.exists()
    # Positive control: a sound name from the same inventory reaches ssh (the stand-in), after `--`.
    inventory.write_text("all:\n  children:\n    atom_workers:\n      hosts:\n        w1:\n"
                         "          ansible_host: ok\n          ansible_port: 2200\n")
    proc = fleet("-i", str(inventory), "status", "--no-gearman")
    assert proc.returncode == 0, proc.stderr
    argv = fleet.calls()[-1]
    assert argv[argv.index("--") + 1] == "ok" and argv[argv.index("-p"):argv.index("-p") + 2] == ["-p", "2200"]


def test_ssh_gets_the_destination_after_double_dash(tmp_path):
    """Even a target that slipped past the checks is a destination to ssh, never an option."""
    marker, option = proxy_command(tmp_path)
    target = fleet_ssh.Target("w", option)
    result = fleet_ssh.run(target, ["true"], 30)
    assert not result.reached and not marker.exists(), result.error


@pytest.mark.parametrize("port", ["22x", "0", "70000", "true"])
def test_an_ansible_port_that_is_not_a_port_is_one_line(tmp_path, fleet, port):
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(f"all:\n  children:\n    atom_workers:\n      hosts:\n        w1:\n"
                         f"          ansible_port: '{port}'\n")
    proc = fleet("-i", str(inventory), "status")
    assert proc.returncode == 2 and not proc.stdout and not fleet.calls(), proc.stderr
    assert f"ansible_port '{port}' is not a port number" in one_line(proc)


GARBAGE = ["Warning: something\nnot json", "[1, 2]", '{"atom_workers": 5}', '{"atom_workers": {"hosts": "w1"}}',
           '{"atom_workers": {"hosts": ["w1"]}, "_meta": {"hostvars": []}}',
           '{"atom_workers": {"hosts": ["w1"], "vars": [1]}}']


@pytest.mark.parametrize("printed", GARBAGE)
def test_ansible_inventory_printing_garbage_is_one_line(tmp_path, fleet, printed):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "ansible-inventory"
    fake.write_text(f"#!/bin/sh\ncat <<'EOF'\n{printed}\nEOF\n")
    fake.chmod(0o755)
    (tmp_path / "inv").write_text("")
    proc = fleet("-i", str(tmp_path / "inv"), "status", path_first=bindir)
    assert proc.returncode == 1 and not proc.stdout and not fleet.calls(), proc.stderr
    assert one_line(proc).startswith(f"atom-workerctl: error: ansible-inventory -i {tmp_path / 'inv'} printed ")
    # Positive control: the same printer with a sound inventory gets the host asked.
    fake.write_text("#!/bin/sh\necho '{\"atom_workers\": {\"hosts\": [\"ok\"]}, \"_meta\": {\"hostvars\": {}}}'\n")
    proc = fleet("-i", str(tmp_path / "inv"), "status", "--no-gearman", path_first=bindir)
    assert proc.returncode == 0 and fleet.calls()[-1][-2:] == ["ok", "atom-workerctl --json status --no-gearman"]


def test_a_host_answering_json_that_is_not_an_object_is_reported(fleet):
    proc = fleet("-H", "list", "-H", "ok", "status", "--no-gearman")
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
    assert "JSON, but not an object" in proc.stdout


def test_followed_lines_that_are_not_journal_entries_are_skipped_with_one_note(fleet):
    proc = fleet("-H", "journal", "logs", "-f", "--json")
    assert proc.returncode == 4 and "Traceback" not in proc.stderr, proc.stderr
    assert [json.loads(ln)["usec"] for ln in proc.stdout.splitlines()] == [100, 200]
    notes = proc.stderr.splitlines()
    assert notes[0] == "[journal] skipped a line that is not a journal entry: '42'", notes
    assert notes[-1] == "[journal] stopped following: error: no such instance" and len(notes) == 2, notes
    once = fleet("-H", "journal", "logs", "--json")
    assert once.returncode == 0 and not once.stderr, once.stderr
    assert [json.loads(ln)["usec"] for ln in once.stdout.splitlines()] == [100, 200]


# -- timeouts that are not timeouts -----------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["--gearman-timeout", "0", "status"], ["--gearman-timeout", "-1", "status"],
    ["--gearman-timeout", "nan", "status"], ["--gearman-timeout", "inf", "status"],
    ["status", "--gearman-timeout=-inf"], ["--gearman-timeout", "soon", "status"],
    ["reset", "--wait-timeout", "nan"], ["-H", "ok", "--host-timeout", "0", "status"],
])
def test_a_timeout_that_is_not_a_positive_number_is_one_line_exit_2(fleet, args):
    proc = fleet(*args)
    option = next(a.split("=")[0] for a in args if a.endswith("-timeout") or "-timeout=" in a)
    assert proc.returncode == 2 and not proc.stdout and not fleet.calls(), proc.stderr
    line = one_line(proc)
    assert f"argument {option}: " in line and ("above 0" in line or "not a number" in line), line


def test_a_sound_timeout_is_accepted(tmp_path, fleet):
    """Control: the same options with sound values get past the parser (to the missing model here)."""
    proc = fleet("--config", str(tmp_path / "missing.json"), "--gearman-timeout", "0.5", "reset", "--wait-timeout",
                 "1e3")
    assert proc.returncode == 1 and "does not exist" in one_line(proc)


# -- atom-worker-policy status on a state file of the wrong shape -------------------------------------------------
def policy(*args):
    return subprocess.run([SYSTEM_PYTHON, "-I", str(POLICY), *args], capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.mark.parametrize("text", [
    "[]", '{"processes": []}', '{"processes": {"g:p": []}}', '{"processes": {"g:p": {"starts": "x"}}}',
    '{"processes": {"g:p": {"starts": [1e300]}}}', '{"processes": {"g:p": {"next_restart": "soon"}}}',
    '{"processes": {"g:p": {"failed": "yes"}}}', '{"processes": {"g:p": {"n_restarts": 1.5}}}',
])
def test_policy_status_on_a_state_file_of_the_wrong_shape_is_one_line(tmp_path, text):
    state = tmp_path / "state.json"
    state.write_text(text)
    for args in (["status"], ["status", "--json"]):
        proc = policy(*args, "--state-file", str(state))
        assert proc.returncode == 1 and not proc.stdout, (args, proc.stderr)
        assert one_line(proc).startswith(f"atom-worker-policy: state file {state}: not a supervisor-policy state (")
    assert state.read_text() == text


def test_policy_status_reads_a_sound_state_file(tmp_path):
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"schema": 1, "processes": {"atom-workers:atom-worker@1": {
        "group": "atom-workers", "name": "atom-worker@1", "starts": [1700000000.5], "failed": False,
        "result": "success", "failed_at": None, "next_restart": None, "last_exit": None, "n_restarts": 0,
        "n_recycles": 2, "pending_start": None, "policy": {"start_limit_burst": 3}}}}))
    proc = policy("status", "--state-file", str(state))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].split()[:4] == ["atom-workers:atom-worker@1", "ok", "success", "1/3"]
