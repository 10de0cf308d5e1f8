"""Harness for tests/supervisor: a private supervisord per test, running programs from templates/supervisor/.

No systemd and no lab host needed: Debian's `supervisor` package (supervisord, supervisorctl) on the
machine running the tests. Each test gets its own supervisord (own unix socket, pidfile, logs in
tmp_path, `-n` in the background, killed at teardown), the listener rendered from
atom-worker-policy.conf.j2 with a short policy (RestartSec=1, StartLimitIntervalSec=60,
StartLimitBurst=3), and worker pools from atom-worker.conf.j2 whose `php` is a stand-in
(fake_php.py) that behaves as the pool's `--types=` says: crash, clean, recycle, sleep.

What the circus tests use too is in tests/manager_tests.py: the pools CRASH, SLEEP, CLEAN, RECYCLE, ns(pool, n),
the short policy, the policy's state file and log, the teardown.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import manager_tests
import pytest
from manager_tests import POLICY, PrivateManager, plain_env, private_manager

FAKE_PHP = Path(__file__).resolve().parent / "fake_php.py"
SUPERVISORD = shutil.which("supervisord") or "/usr/bin/supervisord"
SUPERVISORCTL = shutil.which("supervisorctl") or "/usr/bin/supervisorctl"


def make_units(root, pools, php=str(FAKE_PHP), **settings):
    """manager_tests.make_units with this harness's fake php unless given."""
    return manager_tests.make_units(root, pools, php=php, **settings)


def write_sites_json(path, sv, sites, units, root):
    """The sites.json the role writes on a supervisord host, naming this harness's supervisord, logs and
    listener: what atom-workerctl reads (`--config PATH`)."""
    return manager_tests.write_sites_json(path, sites, units, root, "supervisor", {
        "server_url": sv.url, "conf_file": str(sv.conf_dir / "atom-worker.conf"),
        "policy_conf_file": str(sv.conf_dir / "atom-worker-policy.conf"), "log_dir": str(sv.log_dir),
        "policy_command": str(POLICY), "policy_state_file": str(sv.state_file)})


class Supervisord(PrivateManager):
    def __init__(self, base: Path, sockdir: Path):
        self.base = base
        self.root = base / "atom"  # the pools' AtoM root: fake php writes its records here
        self.log_dir = base / "log"
        self.conf_dir = base / "conf.d"
        self.conf = base / "supervisord.conf"
        self.sock = sockdir / "supervisor.sock"
        self.url = f"unix://{self.sock}"
        self.main_log = base / "supervisord.log"
        self.state_file = base / "run" / "supervisor-policy.json"
        self.policy_log = self.log_dir / "atom-worker-policy.log"
        self.proc = None
        self.rpc = manager_tests.policy_module.Supervisor(self.url, timeout=10)
        for directory in (self.root, self.log_dir, self.conf_dir):
            directory.mkdir(parents=True, exist_ok=True)

    # -- configuration -----------------------------------------------------------------------------
    def render(self, units, supervisor=None):
        env = plain_env()
        sv = {"log_dir": str(self.log_dir), "log_max_bytes": "1MB", "log_backups": 2,
              "policy_command": str(POLICY), "policy_state_file": str(self.state_file)}
        sv.update(supervisor or {})
        workers = env.get_template("supervisor/atom-worker.conf.j2").render(units=units, supervisor=sv)
        listener = env.get_template("supervisor/atom-worker-policy.conf.j2").render(units=units, supervisor=sv)
        (self.conf_dir / "atom-worker.conf").write_text(workers)
        (self.conf_dir / "atom-worker-policy.conf").write_text(listener)
        return workers, listener

    def start(self, units, supervisor=None, wait_running=()):
        self.render(units, supervisor)
        self.conf.write_text(
            f"""[unix_http_server]
file={self.sock}
chmod=0700

[supervisord]
logfile={self.main_log}
pidfile={self.base / "supervisord.pid"}
childlogdir={self.log_dir}
loglevel=info
nodaemon=true

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl={self.url}

[include]
files = {self.conf_dir}/*.conf
"""
        )
        out = open(self.base / "supervisord.out", "wb")  # noqa: SIM115 - kept open for the process
        self.proc = subprocess.Popen(
            [SUPERVISORD, "-n", "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        out.close()
        self.wait(lambda: self._state() == "RUNNING", 15, "supervisord to answer")
        self.wait(lambda: self.statename("atom-worker-policy:atom-worker-policy") == "RUNNING", 15,
                  "the listener to run")
        for namespec in wait_running:
            self.wait(lambda ns=namespec: self.statename(ns) == "RUNNING", 15, f"{namespec} to run")
        return self

    def _state(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"supervisord exited {self.proc.returncode}: {self.output()}")
        try:
            return self.rpc.call("supervisor.getState")["statename"]
        except OSError:
            return None

    def output(self):
        path = self.base / "supervisord.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self):
        """Freeze supervisord, kill it, then kill every process (and process group) below it."""
        self.kill_tree()

    # -- looking (state(), entry(), policy_lines(), wait(): PrivateManager) ------------------------
    def info(self, namespec):
        return self.rpc.call("supervisor.getProcessInfo", namespec)

    def statename(self, namespec):
        return self.info(namespec)["statename"]

    def records(self, namespec):
        """What the fake php wrote at each of its starts (one JSON object per start)."""
        path = self.root / f"starts-{namespec.split(':', 1)[1]}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def ctl(self, *args, check=False):
        result = subprocess.run([SUPERVISORCTL, "-c", str(self.conf), *args], capture_output=True,
                                text=True, timeout=30, check=False)
        if check:
            assert result.returncode == 0, result
        return result

    def policy(self, *args):
        """Run the operator's command (atom-worker-policy ...) against this supervisord."""
        return subprocess.run(
            [str(POLICY), *args, "--state-file", str(self.state_file), "--server-url", self.url],
            capture_output=True, text=True, timeout=30, check=False,
        )

    def diagnostics(self):
        parts = [f"--- state file {self.state_file}", json.dumps(self.state(), indent=1)]
        for path in (self.policy_log, self.main_log):
            if path.exists():
                parts += [f"--- {path}", path.read_text(errors="replace")[-6000:]]
        try:
            parts += ["--- supervisorctl status", self.ctl("status").stdout]
        except Exception as exc:
            parts.append(f"(supervisorctl status failed: {exc})")
        return "\n".join(parts)


@pytest.fixture
def supervisord(tmp_path, request):
    """A Supervisord to start(); killed at teardown. Imported by each test module (not a conftest:
    tests/ has several test folders and their conftest modules would shadow each other)."""
    if not os.path.exists(SUPERVISORD):
        pytest.skip("supervisord is not installed (apt-get install supervisor)")
    yield from private_manager(request, lambda sockdir: Supervisord(tmp_path, sockdir), "sv-")
