"""Harness for tests/supervisor: a private supervisord per test, running programs from templates/supervisor/.

No systemd and no lab host needed: Debian's `supervisor` package (supervisord, supervisorctl) on the
machine running the tests. Each test gets its own supervisord (own unix socket, pidfile, logs in
tmp_path, `-n` in the background, killed at teardown), the listener rendered from
atom-worker-policy.conf.j2 with a short policy (RestartSec=1, StartLimitIntervalSec=60,
StartLimitBurst=3), and worker pools from atom-worker.conf.j2 whose `php` is a stand-in
(fake_php.py) that behaves as the pool's `--types=` says: crash, clean, recycle, sleep.
"""

import contextlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import jinja2
import pytest
from polling import wait_until

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "roles" / "atom_worker" / "files" / "atom-worker-policy"
TEMPLATES = REPO / "templates"
FAKE_PHP = Path(__file__).resolve().parent / "fake_php.py"
SUPERVISORD = shutil.which("supervisord") or "/usr/bin/supervisord"
SUPERVISORCTL = shutil.which("supervisorctl") or "/usr/bin/supervisorctl"

# The short policy of these tests (the defaults are 30 s, 24h, 3).
RESTART_SEC = 1
INTERVAL = 60
BURST = 3


def load_policy_module():
    loader = importlib.machinery.SourceFileLoader("atom_worker_policy", str(POLICY))
    spec = importlib.util.spec_from_loader("atom_worker_policy", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


policy_module = load_policy_module()


def load_filters():
    path = REPO / "roles" / "atom_worker" / "filter_plugins" / "atom_worker.py"
    spec = importlib.util.spec_from_file_location("atom_worker_filters", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


filters = load_filters()


def plain_env():
    """How the CLI renders templates/: plain Jinja2 with Ansible's template defaults."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        trim_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )


def make_units(root, pools, php=str(FAKE_PHP), recycle_helper="/nonexistent", sites=None, **common):
    """The role's model for one site `default` at ROOT with POOLS, merged with the common settings."""
    cfg = {
        "sites": sites
        or [{"name": "default", "root": str(root), "pools": [{"name": "default", "instances": 0}, *pools]}],
        "user": "root",
        "group": "root",
        "gearman_servers": ["127.0.0.1:4730"],
    }
    model = filters.atom_worker_model(cfg)
    settings = {
        "php": php,
        "restart": "on-failure",
        "restart_sec": RESTART_SEC,
        "start_limit_interval_sec": INTERVAL,
        "start_limit_burst": BURST,
        "kill_signal": "SIGTERM",
        "timeout_stop_sec": 5,
        "after": [],
        "wants": [],
        "hardening": True,
        "read_write_dirs": [],
        "recycle_helper": recycle_helper,
    }
    settings.update(common)
    return filters.atom_worker_units(model["pools"], settings)


# Pools of the fake workers (fake_php.py's job types), one instance each.
CRASH = {"name": "crash", "instances": 1, "types": ["crash"]}
SLEEP = {"name": "sleep", "instances": 1, "types": ["sleep"]}
CLEAN = {"name": "clean", "instances": 1, "types": ["clean"]}
RECYCLE = {"name": "recycle", "instances": 1, "types": ["recycle"]}


def ns(pool, n=1):
    """The namespec of instance n of a pool of site default."""
    return f"atom-workers:atom-worker-default-{pool}@{n}"


def write_sites_json(path, sv, sites, units, root):
    """The sites.json the role writes on a supervisord host, naming this harness's supervisord, logs and
    listener: what atom-workerctl reads (`--config PATH`)."""
    model = filters.atom_worker_model(
        {"sites": sites, "user": "root", "group": "root", "gearman_servers": sites[0]["gearman_servers"]})
    state = filters.atom_worker_state(model, {"default": os.path.realpath(root)}, units, {"manager": "supervisor"})
    state["supervisor"] = {"server_url": sv.url, "conf_file": str(sv.conf_dir / "atom-worker.conf"),
                           "policy_conf_file": str(sv.conf_dir / "atom-worker-policy.conf"),
                           "log_dir": str(sv.log_dir), "policy_command": str(POLICY),
                           "policy_state_file": str(sv.state_file)}
    Path(path).write_text(json.dumps(state, indent=2))
    return state


class Supervisord:
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
        self.rpc = policy_module.Supervisor(self.url, timeout=10)
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
        """Freeze supervisord, kill it, then kill every process group it started."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGSTOP)  # no more spawns while we look
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == self.proc.pid:
                    children.append(int(stat.parent.name))
        self.proc.kill()
        self.proc.wait(10)
        for pid in children:  # each child runs in its own process group (supervisord's setpgrp)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)

    # -- looking -----------------------------------------------------------------------------------
    def wait(self, predicate, timeout, what):
        """Poll PREDICATE (a safety net against hangs, not a timing assertion)."""
        return wait_until(predicate, timeout, 0.05, what, details=self.diagnostics)

    def info(self, namespec):
        return self.rpc.call("supervisor.getProcessInfo", namespec)

    def statename(self, namespec):
        return self.info(namespec)["statename"]

    def state(self):
        if not self.state_file.exists():
            return {"processes": {}}
        return json.loads(self.state_file.read_text())

    def entry(self, namespec):
        return self.state()["processes"].get(namespec)

    def records(self, namespec):
        """What the fake php wrote at each of its starts (one JSON object per start)."""
        path = self.root / f"starts-{namespec.split(':', 1)[1]}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def policy_lines(self, needle=""):
        if not self.policy_log.exists():
            return []
        return [line for line in self.policy_log.read_text().splitlines() if needle in line]

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
    sockdir = Path(tempfile.mkdtemp(prefix="sv-"))  # unix socket paths must stay short
    sv = Supervisord(tmp_path, sockdir)
    failures = request.session.testsfailed
    yield sv
    if request.session.testsfailed > failures:  # this test failed: show what supervisord saw
        sys.stderr.write(sv.diagnostics() + "\n")
    sv.stop()
    shutil.rmtree(sockdir, ignore_errors=True)
