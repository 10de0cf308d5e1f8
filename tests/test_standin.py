"""The AtoM stand-in (tests/fixtures/atom) behaves as AtoM's worker does.

Each test runs the real PHP worker against a real gearmand on a free loopback
port, in a temporary copy of the stand-in root. Needs: php-cli, php-gearman,
gearman-job-server, gearman-tools.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from standin import (
    KNOWN_CLASSES,
    NO_SERVERS,
    NO_WORKER,
    Gearmand,
    SubmitError,
    Worker,
    admin,
    clear_cache,
    events,
    free_port,
    function_name,
    function_prefix,
    job_counts,
    make_root,
    read_record,
    set_servers,
    set_workers_key,
    submit,
    symfony,
    wait_until,
    worker_argv,
    write_control,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    missing = [t for t in ("php", "gearmand", "gearadmin") if not shutil.which(t)]
    if not missing:
        modules = subprocess.run(["php", "-m"], check=False, capture_output=True, text=True).stdout.split()
        missing = [m for m in ("gearman", "pcntl") if m not in modules]
    if missing:
        pytest.fail(
            f"missing {', '.join(missing)}: apt-get install -y php-cli php-gearman gearman-job-server gearman-tools"
        )


@pytest.fixture
def root(tmp_path: Path, gearmand: Gearmand) -> Path:
    return make_root(tmp_path / "atom", servers=[gearmand.server])


def start(workers: list[Worker], root: Path, *options: str) -> Worker:
    w = Worker(root, *options)
    workers.append(w)
    return w


def registered(gearmand: Gearmand, *functions: str) -> bool:
    status = gearmand.status()
    return all(status.get(f, (0, 0, 0))[2] >= 1 for f in functions)


def gearadmin_status(port: int) -> dict[str, list[int]]:
    out = subprocess.run(
        ["gearadmin", "-h", "127.0.0.1", "-p", str(port), "--status"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {
        cols[0]: [int(c) for c in cols[1:]]
        for cols in (line.split("\t") for line in out.splitlines())
        if len(cols) == 4
    }


# --- registration ------------------------------------------------------------


def test_registers_prefixed_functions_and_logs_like_atom(root, gearmand, workers):
    w = start(workers, root, "--types=general,move")
    w.wait_for_message("PID ")
    prefix = function_prefix(root)
    assert re.fullmatch(r"[0-9a-f]{32}-", prefix)
    wanted = {prefix + "arFindingAidJob", prefix + "arObjectMoveJob"}
    wait_until(lambda: registered(gearmand, *wanted))

    status = gearadmin_status(gearmand.port)
    assert {f for f, cols in status.items() if cols[2] == 1} == wanted

    lines = w.output().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d > ", line) for line in lines), lines
    assert w.messages() == [
        "New ability: arFindingAidJob",
        "New ability: arObjectMoveJob",
        "Running worker...",
        f"PID {w.pid}",
    ]
    (started,) = events(root, "start")
    assert started["pid"] == w.pid
    assert set(started["functions"]) == wanted


def test_no_options_means_every_known_class(root, gearmand, workers):
    w = start(workers, root)
    w.wait_for_message("Running worker...")
    wanted = {function_name(root, c) for c in KNOWN_CLASSES}
    assert len(wanted) == 18
    wait_until(lambda: registered(gearmand, *wanted))
    assert set(events(root, "start")[0]["functions"]) == wanted


def test_abilities_option_and_unknown_ability(root, gearmand, workers):
    w = start(workers, root, "--abilities=arFileImportJob,arNoSuchJob")
    w.wait_for_message("Running worker...")
    assert w.messages()[:2] == [
        "New ability: arFileImportJob",
        (
            "Ability not defined: arNoSuchJob. Please ensure the job is in the "
            "lib/task/job directory or that the plugin is enabled."
        ),
    ]
    wait_until(lambda: registered(gearmand, function_name(root, "arFileImportJob")))
    assert function_name(root, "arNoSuchJob") not in gearmand.status()


def test_unknown_type_is_an_error(root):
    proc = subprocess.run(
        ["php", "symfony", "jobs:worker", "--types=general,nope"],
        check=False,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert proc.returncode == 1
    assert "Invalid type specified: nope -- does it exist in the gearman config file?" in proc.stderr
    assert "New ability" not in proc.stdout


def test_workers_key_changes_prefix_after_cc(root, gearmand, workers):
    # As in AtoM, config is cached per environment: a changed key needs `cc`.
    symfony(root, "standin:config", check=True)
    set_workers_key(root, "site-b")
    stale = start(workers, root, "--types=general")
    stale.wait_for_message("Running worker...")
    wait_until(lambda: registered(gearmand, function_name(root, "arFindingAidJob")))
    stale.stop()

    clear_cache(root)
    w = start(workers, root, "--types=general")
    w.wait_for_message("Running worker...")
    new = function_name(root, "arFindingAidJob", workers_key="site-b")
    assert new != function_name(root, "arFindingAidJob")
    wait_until(lambda: registered(gearmand, new))
    assert events(root, "start")[-1]["functions"] == [new]

    # The web app (env prod) uses the same key: submit reaches this worker.
    (job,) = submit(root, "arFindingAidJob")
    wait_until(lambda: job_counts(root)[job] == 1)


def test_connects_to_every_server(tmp_path, workers):
    with Gearmand() as one, Gearmand() as two:
        down = free_port()
        root = make_root(tmp_path / "atom", servers=[one.server, ("127.0.0.1", down), two.server])
        w = start(workers, root, "--types=general")
        w.wait_for_message("Running worker...")
        fn = function_name(root, "arFindingAidJob")
        wait_until(lambda: registered(one, fn) and registered(two, fn))
        # A server that comes up later is joined too.
        with Gearmand(port=down) as late:
            wait_until(lambda: registered(late, fn))
        ids = submit(root, "arFindingAidJob", count=6)
        wait_until(lambda: set(job_counts(root)) == set(ids))


# --- reconnects: as AtoM's net_gearman ------------------------------------------


def worker_lines(g: Gearmand, pid: int) -> list[list[str]]:
    """The functions of each connection gearmand's `workers` lists for the worker process `pid` (its client
    id is net_gearman's `pid_<PID>_<uniqid>`)."""
    out = []
    for line in admin(g.host, g.port, "workers"):
        head, _, funcs = line.partition(" :")
        if len(head.split()) == 3 and head.split()[2].startswith(f"pid_{pid}_"):
            out.append(funcs.split())
    return out


def test_reregisters_after_the_job_server_restarts(tmp_path, workers):
    port = free_port()
    with Gearmand(port=port) as g:
        root = make_root(tmp_path / "atom", servers=[g.server])
        w = start(workers, root, "--types=general")
        fn = function_name(root, "arFindingAidJob")
        wait_until(lambda: worker_lines(g, w.pid) == [[fn]], what="registered at start, with its client id")
    with Gearmand(port=port) as again:
        # Retried every 5 s; after the reconnect every ability is sent again: the same process serves jobs.
        wait_until(lambda: worker_lines(again, w.pid) == [[fn]], timeout=30, what="registered again")
        ids = submit(root, "arFindingAidJob", count=2)
        wait_until(lambda: set(job_counts(root)) == set(ids))
    assert w.returncode is None and {e["pid"] for e in events(root, "start")} == {w.pid}


def test_reregister_knob_leaves_the_worker_connected_with_no_function(tmp_path, workers):
    port = free_port()
    with Gearmand(port=port) as g:
        root = make_root(tmp_path / "atom", servers=[g.server])
        write_control(root, reregister=False)
        w = start(workers, root, "--types=general")
        fn = function_name(root, "arFindingAidJob")
        wait_until(lambda: worker_lines(g, w.pid) == [[fn]], what="registered at start all the same")
    with Gearmand(port=port) as again:
        wait_until(lambda: worker_lines(again, w.pid) == [[]], timeout=30, what="connected again, no function")
        # A job finds no worker: what AtoM's web app reports as "No Gearman worker available".
        with pytest.raises(SubmitError) as refused:
            submit(root, "arFindingAidJob")
        assert NO_WORKER.format("arFindingAidJob") in str(refused.value)
        # The same probe that saw the functions in the test above, later: still none (the worker runs).
        wait_until(lambda: w.returncode is None and worker_lines(again, w.pid) == [[]] and
                   "Running worker..." in w.messages(), what="still connected with nothing")


class Blackhole:
    """A TCP relay to gearmand that can lose power: `cut()` keeps every socket open but drops every byte
    (no FIN, no RST: a dead peer), `restore()` resets the old connections at their next byte (what a
    rebooted host's kernel does) and relays new ones again."""

    def __init__(self, target: tuple[str, int]):
        import socket
        import threading

        self.target, self.powered, self.epoch = target, True, 0
        self.upstreams = {}  # open upstream socket -> the epoch it was made in
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.threading, self.socket = threading, socket
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.lsock.accept()
            except OSError:
                return
            self.threading.Thread(target=self._serve, args=(client, self.epoch), daemon=True).start()

    def _serve(self, client, epoch):
        import select
        import struct

        upstream = None
        try:
            while True:
                if self.powered and epoch == self.epoch and upstream is None:
                    upstream = self.socket.create_connection(self.target)
                    self.upstreams[upstream] = epoch
                socks = [client] + ([upstream] if upstream else [])
                ready, _, _ = select.select(socks, [], [], 0.2)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if epoch != self.epoch and self.powered:
                        # Rebooted: this connection is unknown; its next byte is answered with a reset.
                        client.setsockopt(self.socket.SOL_SOCKET, self.socket.SO_LINGER, struct.pack("ii", 1, 0))
                        return
                    if not self.powered or upstream is None:
                        continue  # the packets vanish
                    (upstream if sock is client else client).sendall(data)
        except OSError:
            return
        finally:
            client.close()
            if upstream is not None:
                upstream.close()
                self.upstreams.pop(upstream, None)

    def cut(self):
        self.powered = False
        self.epoch += 1

    def restore(self):
        self.powered = True

    def stale(self) -> int:
        """Upstream connections still open from before the last cut: gearmand lists each as a live worker."""
        return sum(1 for epoch in list(self.upstreams.values()) if epoch != self.epoch)

    def close(self):
        self.lsock.close()


def test_notices_a_dead_connection_and_registers_again(tmp_path, gearmand, workers):
    """The job server loses power (packets vanish, nothing closes) and comes back: the worker notices at its
    next GRAB_JOB, retries, and registers again by itself."""
    relay = Blackhole(gearmand.server)
    try:
        root = make_root(tmp_path / "atom", servers=[("127.0.0.1", relay.port)])
        w = start(workers, root, "--types=general")
        fn = function_name(root, "arFindingAidJob")
        wait_until(lambda: worker_lines(gearmand, w.pid) == [[fn]], what="registered through the relay")
        relay.cut()
        # gearmand still lists the relay's upstream connection while the power is out; once it is back...
        time.sleep(1)
        relay.restore()
        # gearmand lists the old connection (with its function) until the worker's next byte on it is
        # answered with a reset: only then does a listing mean the new registration. Waiting for the listing
        # alone let a submit in between find no worker at all (a CI run under load did).
        wait_until(lambda: relay.stale() == 0, timeout=40, what="the worker's dead connection reset")
        wait_until(lambda: worker_lines(gearmand, w.pid) == [[fn]] and
                   len(events(root, "start")) == 1, timeout=40, what="registered again after the power came back")
        ids = submit(root, "arFindingAidJob", count=2)
        wait_until(lambda: set(job_counts(root)) == set(ids))
        assert w.returncode is None
    finally:
        relay.close()


# --- jobs --------------------------------------------------------------------


def test_jobs_are_processed_and_recorded(root, gearmand, workers):
    w = start(workers, root, "--types=general")
    w.wait_for_message("Running worker...")
    ids = submit(root, "arFindingAidJob", count=5)
    assert len(set(ids)) == 5
    wait_until(lambda: set(job_counts(root)) == set(ids))
    assert job_counts(root) == {i: 1 for i in ids}
    assert {e["pid"] for e in events(root, "job")} == {w.pid}
    w.wait_for_message("Jobs completed: 5")
    # As AtoM's console: the job's own lines without its id (the id is in the Parameters line).
    messages = w.messages()
    assert messages.count("Job started.") == 5 and messages.count("Job finished.") == 5
    assert f'Parameters: {{"id":"{ids[0]}","name":"arFindingAidJob"}}' in messages
    assert [e["id"] for e in events(root, "submit")] == ids


def test_fail_knob_logs_job_failed_and_goes_on(root, gearmand, workers):
    w = start(workers, root, "--types=general")
    w.wait_for_message("Running worker...")
    (bad,) = submit(root, "arFindingAidJob", payload={"fail": "disk full"})
    (good,) = submit(root, "arFindingAidJob")
    wait_until(lambda: good in job_counts(root))
    assert "Job failed: disk full" in w.messages()
    assert job_counts(root, status="failed") == {bad: 1}
    assert w.returncode is None


def test_submit_without_worker_is_refused(root, gearmand, workers):
    with pytest.raises(SubmitError) as err:
        submit(root, "arFindingAidJob")
    assert err.value.message == NO_WORKER.format("arFindingAidJob")
    assert err.value.returncode == 1

    # A worker for other classes does not help, and nothing was queued.
    w = start(workers, root, "--types=move")
    w.wait_for_message("Running worker...")
    wait_until(lambda: registered(gearmand, function_name(root, "arObjectMoveJob")))
    with pytest.raises(SubmitError, match="No Gearman worker available"):
        submit(root, "arFindingAidJob")
    assert gearmand.status().get(function_name(root, "arFindingAidJob"), (0, 0, 0))[0] == 0
    assert events(root, "submit") == []


# --- limits: exit 111 ----------------------------------------------------------


def test_max_job_count_exits_111(root, gearmand, workers):
    w = start(workers, root, "--types=general", "--max-job-count=2")
    w.wait_for_message("Running worker...")
    ids = submit(root, "arFindingAidJob", count=3)
    assert w.wait(10) == 111
    assert w.messages()[-3:] == [
        "Jobs completed: 2",
        "Worker shutting down - max-job-count reached.",
        "Job worker stopped.",
    ]
    assert sum(job_counts(root).values()) == 2
    assert events(root, "exit")[-1] | {"pid": w.pid} == events(root, "exit")[-1]
    assert events(root, "exit")[-1]["code"] == 111
    assert events(root, "exit")[-1]["reason"] == "max-job-count"
    # The third job waits in gearmand for the next worker.
    fn = function_name(root, "arFindingAidJob")
    wait_until(lambda: gearmand.status()[fn] == (1, 0, 0))
    w2 = start(workers, root, "--types=general")
    w2.wait_for_message("Jobs completed: 1")
    assert set(job_counts(root)) == set(ids)


def test_max_mem_usage_exits_111(root, gearmand, workers):
    w = start(workers, root, "--types=general", "--max-mem-usage=102400")
    w.wait_for_message("Running worker...")
    (small,) = submit(root, "arFindingAidJob")
    w.wait_for_message("Jobs completed: 1")
    time.sleep(0.3)
    assert w.returncode is None  # a small job stays under 100 MB
    (big,) = submit(root, "arFindingAidJob", payload={"alloc_mb": 150})
    assert w.wait(10) == 111
    assert "Worker shutting down - max-mem-usage reached." in w.messages()
    assert w.messages()[-1] == "Job worker stopped."
    assert set(job_counts(root)) == {small, big}
    (ended,) = events(root, "exit")
    assert ended["reason"] == "max-mem-usage"
    assert ended["rss_kb"] > 102400


# --- gearmand down, signals, crashes ----------------------------------------


def test_gearmand_unreachable_exits_1(tmp_path):
    root = make_root(tmp_path / "atom", servers=[("127.0.0.1", free_port())])
    w = Worker(root)
    assert w.wait(10) == 1
    assert NO_SERVERS in w.output()
    assert "Running worker..." not in w.messages()
    assert events(root, "exit")[-1]["reason"] == "no-servers"


@pytest.mark.parametrize(
    ("sig", "message"),
    [
        (signal.SIGTERM, "Job worker termination requested."),
        (signal.SIGINT, "Job worker termination requested by user."),
        (signal.SIGHUP, "Job worker hang up requested."),
        (signal.SIGQUIT, "Job worker quit requested."),
    ],
)
def test_signals_exit_0_when_idle(root, gearmand, workers, sig, message):
    w = start(workers, root, "--types=general")
    w.wait_for_message("Running worker...")
    t0 = time.monotonic()
    assert w.stop(sig) == 0
    assert time.monotonic() - t0 < 2
    assert w.messages()[-2:] == [message, "Job worker stopped."]
    assert events(root, "exit")[-1]["signal"] == sig.name


def test_sigterm_mid_job_exits_0_at_once_and_job_is_requeued(root, gearmand, workers):
    w = start(workers, root, "--types=general")
    w.wait_for_message("Running worker...")
    (job,) = submit(root, "arFindingAidJob", payload={"sleep": 60})
    wait_until(lambda: events(root, "job-start", id=job))
    fn = function_name(root, "arFindingAidJob")
    assert gearmand.status()[fn] == (1, 1, 1)
    t0 = time.monotonic()
    assert w.stop(signal.SIGTERM) == 0
    assert time.monotonic() - t0 < 2
    assert w.messages()[-2:] == ["Job worker termination requested.", "Job worker stopped."]
    assert job_counts(root, status=None) == {}
    # gearmand got no result: the job goes back to the queue (as with AtoM's net_gearman).
    wait_until(lambda: gearmand.status()[fn] == (1, 0, 0))


def test_crash_at_start(root, gearmand):
    write_control(root, crash_at_start=3)
    w = Worker(root, "--types=general")
    assert w.wait(10) == 3
    assert "Running worker..." not in w.messages()
    assert [e["event"] for e in read_record(root)] == ["start", "exit"]
    assert function_name(root, "arFindingAidJob") not in gearmand.status()


def test_crash_after_jobs(root, gearmand, workers):
    write_control(root, crash_after_jobs=2, crash_exit_code=2)
    w = start(workers, root, "--types=general")
    w.wait_for_message("Running worker...")
    submit(root, "arFindingAidJob", count=3)
    assert w.wait(10) == 2
    assert sum(job_counts(root).values()) == 2
    assert events(root, "exit")[-1]["reason"] == "crash_after_jobs"


def test_crash_in_job_requeues_it(root, gearmand, workers):
    w = start(workers, root, "--types=general")
    w.wait_for_message("Running worker...")
    (job,) = submit(root, "arFindingAidJob", payload={"crash": 5})
    assert w.wait(10) == 5
    assert job_counts(root, status=None) == {}
    fn = function_name(root, "arFindingAidJob")
    wait_until(lambda: gearmand.status()[fn] == (1, 0, 0))
    assert events(root, "exit")[-1] | {"id": job} == events(root, "exit")[-1]


def test_start_delay(root, gearmand, workers):
    write_control(root, start_delay=1)
    t0 = time.monotonic()
    w = start(workers, root, "--types=general")
    w.wait_for_message("Running worker...")
    assert time.monotonic() - t0 >= 1


# --- other tasks ---------------------------------------------------------------


def test_cc_clears_cache_and_is_recorded(root):
    symfony(root, "standin:config", check=True)
    assert (root / "cache" / "qubit" / "worker" / "config" / "config_gearman.yml.php").exists()
    proc = symfony(root, "cc")
    assert proc.returncode == 0
    assert sorted(p.name for p in (root / "cache").iterdir()) == [".gitkeep"]
    assert len(events(root, "cc")) == 1


def test_unknown_task_fails(root):
    proc = symfony(root, "jobs:nothing")
    assert proc.returncode != 0
    assert 'Task "jobs:nothing" is not defined.' in proc.stderr


def test_config_reader_tolerates_real_world_yaml(root, gearmand):
    """Comments, flow maps, quoting, extra keys and env sections, as roles may write them."""
    (root / "config" / "gearman.yml").write_text(
        "# Ansible managed\n"
        "---\n"
        "all:\n"
        "  servers: {default: '127.0.0.1:1', other: \"127.0.0.1:2\"}  # two\n"
        "  worker_types:\n"
        "    general: [arFindingAidJob]  # flow\n"
        "    custom:\n"
        "    - arObjectMoveJob\n"
        "worker:\n"
        "  servers:\n"
        f"    default: {gearmand.host}:{gearmand.port}\n"
    )
    (root / "config" / "app.yml").write_text(
        "all:\n"
        "  csp:\n"
        "    directives: >\n"
        "      default-src 'self'; # not a comment\n"
        "  upload_limit: -1\n"
        '  workers_key: "k #1"\n'
    )
    proc = symfony(root, "standin:config", check=True)
    assert '"workers_key": "k #1"' in proc.stdout
    assert f'"{gearmand.host}:{gearmand.port}"' in proc.stdout
    proc = symfony(root, "standin:config", "--env=prod", check=True)
    assert '"127.0.0.1:1"' in proc.stdout and '"127.0.0.1:2"' in proc.stdout
    assert function_prefix(root, "k #1")[:-1] in proc.stdout


def test_set_servers_helper_round_trips(root):
    set_servers(root, [("10.0.0.1", 4730), ("10.0.0.2", 4731)])
    proc = symfony(root, "standin:config", check=True)
    assert '"10.0.0.1:4730"' in proc.stdout and '"10.0.0.2:4731"' in proc.stdout


# --- the test-only role ---------------------------------------------------------

ROLES = Path(__file__).resolve().parent / "fixtures" / "roles"
PLAY = """\
- name: Install the AtoM stand-in
  hosts: localhost
  connection: local
  gather_facts: false
  roles:
    - role: atom_standin
"""


# The role's include of its steps, and one of the steps (tasks/main.yml, tasks/apply.yml).
APPLY = "TASK [atom_standin : Install or repair the stand-in (only what the read found out of place)]"
STEP = "TASK [atom_standin : Copy the stand-in's entry point (symfony)]"


def skipped_include(output: str) -> bool:
    """The include task ran and was skipped (Ansible's default output: its header, then `skipping:`)."""
    return bool(re.search(re.escape(APPLY) + r"\s*\*+\s*\nskipping: \[localhost\]", output))


@pytest.mark.timeout(120)
@pytest.mark.skipif(os.geteuid() != 0, reason="the role chowns to www-data: run as root")
def test_role_installs_a_working_root_idempotently(tmp_path, gearmand, workers):
    playbook = Path(sys.executable).with_name("ansible-playbook")
    # www-data must be able to reach the root (pytest's tmp_path is 0700).
    base = Path(tempfile.mkdtemp(prefix="standin-role-", dir="/tmp"))
    try:
        base.chmod(0o755)
        dest = base / "atom"
        argv = [
            str(playbook),
            "-i",
            "localhost,",
            "-e",
            "ansible_python_interpreter=/usr/bin/python3",
            "-e",
            f"atom_standin_root={dest}",
            # Install from the apt cache as it is: no `apt-get update` in a unit test.
            "-e",
            "atom_standin_apt_cache_valid_time=315360000",
            str(tmp_path / "play.yml"),
        ]
        (tmp_path / "play.yml").write_text(PLAY)
        env = os.environ | {"ANSIBLE_ROLES_PATH": str(ROLES), "ANSIBLE_NOCOLOR": "1"}
        recaps, outputs = [], []
        for _ in range(2):
            run = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
            assert run.returncode == 0, run.stdout + run.stderr
            recaps.append(re.search(r"localhost\s+:.*", run.stdout).group(0))
            outputs.append(run.stdout)
        assert "changed=0" not in recaps[0]
        assert "changed=0" in recaps[1] and "failed=0" in recaps[1]
        # The second run read the host and included none of the steps (tasks/apply.yml): nothing drifted.
        assert APPLY in outputs[0] and STEP in outputs[0]
        assert skipped_include(outputs[1]) and STEP not in outputs[1], outputs[1]

        owners = {p: (dest / p).owner() for p in ("symfony", "config", "cache", "log", "uploads")}
        assert owners == {
            "symfony": "root",
            "config": "root",
            "cache": "www-data",
            "log": "www-data",
            "uploads": "www-data",
        }
        # Configuration that someone changed is kept by the next run (force: false).
        set_servers(dest, [gearmand.server])
        run = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
        assert "changed=0" in run.stdout
        assert f"{gearmand.host}:{gearmand.port}" in (dest / "config" / "gearman.yml").read_text()

        # What the role owns, damaged: the entry point edited, a folder AtoM writes to made private. The
        # next run includes the steps again and repairs both; the run after that includes nothing.
        symfony = (ROLES.parent / "atom" / "symfony").read_bytes()
        with open(dest / "symfony", "ab") as edited:
            edited.write(b"// edited\n")
        (dest / "cache").chmod(0o700)
        run = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
        assert run.returncode == 0 and not skipped_include(run.stdout) and STEP in run.stdout, run.stdout
        assert re.search(r"localhost\s+:.*changed=2 ", run.stdout), run.stdout
        assert (dest / "symfony").read_bytes() == symfony
        assert oct((dest / "cache").stat().st_mode & 0o7777) == "0o755"
        run = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
        assert "changed=0" in run.stdout and skipped_include(run.stdout), run.stdout

        # The installed root works for www-data, which may write only cache/ and log/.
        w = subprocess.Popen(
            ["runuser", "-u", "www-data", "--", *worker_argv("--types=general", "--max-job-count=1")],
            cwd=dest,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            fn = function_name(dest, "arFindingAidJob")
            wait_until(lambda: registered(gearmand, fn) or w.poll() is not None)
            (job,) = submit(dest, "arFindingAidJob")
            assert w.wait(10) == 111, w.stdout.read() if w.stdout else ""
        finally:
            if w.poll() is None:
                w.kill()
                w.wait()
            if w.stdout:
                w.stdout.close()
        assert job_counts(dest) == {job: 1}
        assert events(dest, "start")[0]["user"] == "www-data"
    finally:
        shutil.rmtree(base, ignore_errors=True)
