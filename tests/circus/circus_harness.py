"""Harness for tests/circus: a private circusd per test, running watchers rendered from templates/circus/.

No systemd and no lab host needed: circusd and its client come from the test venv (requirements.txt pins
circus 0.19.0 with pyzmq, tornado, psutil). Each test gets its own circusd: the configuration rendered from
templates/circus/atom-worker.ini.j2 with plain Jinja2 (as atom-workerctl renders it), its control and pub/sub
ipc sockets in a short temporary folder, logs, state file and AtoM root in the test's tmp_path, and the
policy code (atom-worker-policy + atom_worker_circus.py, copied as the role installs them) in a lib folder
on circusd's PYTHONPATH (hosts use a .pth file). The workers' `php` is fake_worker.py, whose behaviour a test
sets per pool (--types=: crash, clean, recycle, sleep) or per instance at any time (set_mode()).

The API (R's and C's tests reuse it; what the supervisord tests use too is in tests/manager_tests.py: the
pools CRASH, SLEEP, CLEAN, RECYCLE, ns(pool, n), the short policy, the policy's state and log):

    make_units(root, pools, **settings)   the role's pools (atom_worker_units) for site `default` at root, the
                                          fake worker as their php
    watcher(pool, n=1)                    "atom-worker-default-crash@1" (its namespec: manager_tests.ns())
    write_sites_json(path, cd, sites, units, root, **circus)   the role's sites.json naming this circusd
    circusd fixture (conftest.py)         a Circusd to start(); everything it started is killed at teardown

    Circusd(base, sockdir)
      .start(units, circus=None, wait_active=())   render, launch, wait until it answers and the named watchers
                                                   are active (their fake worker set up)
      .render(units, circus=None) -> text          write circus.ini (start() does it)
      .call(command, timeout=30, **properties)     one circus command (CircusClient), retried while circusd
                                                   answers errno 5 ("already running a command"); returns
                                                   the reply dict, raises CircusError on an error reply
      .start_watcher(name) / .stop_watcher(name) / .restart_watcher(name)   waiting=true; the reply's "info"
      .status(name) -> "active" | "stopped" | "starting" | "stopping";  .pids(name) -> [pid]
      .signal(name, signum) (circus `signal`);  .kill(name) (circus `kill`: stop signal, then SIGKILL)
      .reloadconfig()                              circusctl reloadconfig (after render())
      .ctl(*args) -> CompletedProcess              the circusctl CLI against this circusd
      .state() / .entry(namespec)                  the policy's state file (README-supervisor.md schema)
      .reset(namespec, cancel=False)               reset the entry as atom-workerctl does (under the flock)
      .set_mode(name, mode) / .runs(name) / .starts(name) / .exits(name)   the fake worker's control and record
      .wait_runs(name, count)                      until the fake worker recorded COUNT starts (it is set up:
                                                   a stop before that kills a process that never ran)
      .policy_lines(needle="")                     lines of <log_dir>/atom-worker-policy.log
      .log_text(name)                              the instance's log file (stdout and stderr)
      .wait(predicate, timeout, what)              poll (a safety net against hangs, never a timing assertion)
      .quit()                                      circus `quit`: circusd stops its watchers and exits
      .stop()                                      kill circusd and every process it started
      attributes: base, root, log_dir, lib_dir, conf, state_file, policy_log, endpoint, pubsub_endpoint, proc

The short policy of these tests (manager_tests): RestartSec=1, StartLimitIntervalSec=60, StartLimitBurst=3
(make_units settings override them).
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import manager_tests
from manager_tests import POLICY, REPO, PrivateManager, plain_env

ADAPTER = REPO / "roles" / "atom_worker" / "files" / "atom_worker_circus.py"
FAKE_WORKER = Path(__file__).resolve().parent / "fake_worker.py"
BIN = Path(sys.executable).parent
CIRCUSD = BIN / "circusd"
CIRCUSCTL = BIN / "circusctl"
BUSY_ERRNO = 5  # circus: "arbiter is already running <command> command"


def make_units(root, pools, php=str(FAKE_WORKER), **settings):
    """manager_tests.make_units with this harness's fake worker as `php` unless given."""
    return manager_tests.make_units(root, pools, php=php, **settings)


def write_sites_json(path, cd, sites, units, root, **circus):
    """The sites.json the role writes on a circus host (roles/atom_worker/tasks/state.yml), naming this harness's
    circusd, configuration, state file and logs; `service` "": circusd is started by other means (here the test)."""
    settings = {"endpoint": cd.endpoint, "config": str(cd.conf), "state_file": str(cd.state_file),
                "log_dir": str(cd.log_dir), "service": "", "venv": "/nonexistent", **circus}
    return manager_tests.write_sites_json(path, sites, units, root, "circus", settings)


def watcher(pool, n=1):
    """The watcher of instance n of a pool of site default (= the systemd instance without .service)."""
    return f"atom-worker-default-{pool}@{n}"


class CircusError(AssertionError):
    """circusd answered a command with an error."""


class Circusd(PrivateManager):
    def __init__(self, base: Path, sockdir: Path):
        self.base = Path(base)
        self.root = self.base / "atom"  # the pools' AtoM root: the fake worker's cwd, records and mode files
        self.log_dir = self.base / "log"
        self.lib_dir = self.base / "lib"
        self.conf = self.base / "circus.ini"
        self.state_file = self.base / "run" / "circus-policy.json"
        self.policy_log = self.log_dir / "atom-worker-policy.log"
        self.output_file = self.base / "circusd.out"
        self.endpoint = f"ipc://{sockdir}/ctl.sock"
        self.pubsub_endpoint = f"ipc://{sockdir}/pub.sock"
        self.proc = None
        self._client = None
        for directory in (self.root, self.log_dir, self.lib_dir, self.state_file.parent):
            directory.mkdir(parents=True, exist_ok=True)
        for source in (POLICY, ADAPTER):  # as the role installs them: side by side in lib_dir
            shutil.copy2(source, self.lib_dir / source.name)

    # -- configuration ---------------------------------------------------------------------------------
    def circus_settings(self, circus=None):
        settings = {"endpoint": self.endpoint, "pubsub_endpoint": self.pubsub_endpoint,
                    "log_dir": str(self.log_dir), "log_max_bytes": "1MB", "log_backups": 2,
                    "state_file": str(self.state_file), "lib_dir": str(self.lib_dir)}
        settings.update(circus or {})
        return settings

    def render(self, units, circus=None):
        text = plain_env().get_template("circus/atom-worker.ini.j2").render(
            units=units, circus=self.circus_settings(circus))
        self.conf.write_text(text)
        return text

    def start(self, units, circus=None, wait_active=()):
        if not CIRCUSD.exists():
            raise AssertionError(f"{CIRCUSD} is missing: .venv/bin/pip install -r requirements.txt")
        self.render(units, circus)
        fakes = {f"{u['unit_prefix']}@{n}" for u in units if u["php"] == str(FAKE_WORKER)
                 for n in range(1, int(u["instances"]) + 1)}
        before = {name: len(self.starts(name)) for name in wait_active}
        env = dict(os.environ, PYTHONPATH=str(self.lib_dir))
        with open(self.output_file, "ab") as out:
            self.proc = subprocess.Popen([str(CIRCUSD), str(self.conf)], stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, env=env,
                                         cwd=str(self.base))
        self.wait(self._answers, 20, "circusd to answer")
        for name in wait_active:
            self.wait(lambda n=name: self.status(n) == "active" and self.pids(n), 15, f"{name} to be active")
            if name in fakes:  # and its fake worker set up (a stop before that kills a process that never ran)
                self.wait_runs(name, before[name] + 1)
        return self

    def _answers(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"circusd exited {self.proc.returncode}:\n{self.output()}")
        try:
            return self.call("status", timeout=2, retry_for=0)["status"] == "ok"  # circusd's own status
        except Exception:
            return False

    def output(self):
        return self.output_file.read_text(errors="replace") if self.output_file.exists() else ""

    # -- commands --------------------------------------------------------------------------------------
    def client(self, timeout):
        from circus.client import CircusClient

        if self._client is None or self._client._timeout != timeout:
            if self._client is not None:
                self._client.stop()
            self._client = CircusClient(endpoint=self.endpoint, timeout=timeout)
        return self._client

    def call(self, command, timeout=30, retry_for=30, **properties):
        """One circus command; while circusd answers errno 5 (busy with another command), again with backoff
        for up to retry_for seconds. The reply dict; CircusError on an error reply."""
        deadline = time.monotonic() + retry_for
        delay = 0.05
        while True:
            reply = self.client(timeout).call({"command": command, "properties": properties})
            if reply.get("status") != "error":  # "ok", or the watcher's status for `status NAME`
                return reply
            if reply.get("errno") == BUSY_ERRNO and time.monotonic() < deadline:
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            raise CircusError(f"circus {command} {properties}: {reply}")

    def start_watcher(self, name):
        return self.call("start", name=name, waiting=True)["info"]

    def stop_watcher(self, name):
        return self.call("stop", name=name, waiting=True)["info"]

    def restart_watcher(self, name):
        return self.call("restart", name=name, waiting=True)["info"]

    def status(self, name):
        return self.call("status", name=name)["status"]

    def pids(self, name):
        return self.call("list", name=name).get("pids", [])

    def signal(self, name, signum):
        return self.call("signal", name=name, signum=int(signum))

    def kill(self, name):
        return self.call("kill", name=name)

    def reloadconfig(self):
        return self.call("reloadconfig", timeout=60)

    def ctl(self, *args, check=False):
        result = subprocess.run([str(CIRCUSCTL), "--endpoint", self.endpoint, "--timeout", "30", *args],
                                capture_output=True, text=True, timeout=60, check=False)
        if check:
            assert result.returncode == 0, result
        return result

    # -- the policy's state (state(), entry(), policy_lines(): PrivateManager) -------------------------------
    def reset(self, namespec, cancel=False):
        """systemctl reset-failed, as atom-workerctl does it (tools/atom_workerctl/policystate.py): under the
        state file's flock, never held across a circus call."""
        with manager_tests.policy_module.StateStore(str(self.state_file)).update() as state:
            entry = state["processes"].get(namespec)
            if isinstance(entry, dict):
                entry.update(starts=[], failed=False, failed_at=None, n_restarts=0, result="success")
                if cancel:
                    entry["next_restart"] = None

    def log_text(self, name):
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- the fake worker ---------------------------------------------------------------------------------
    def set_mode(self, name, mode):
        """The fake worker's mode at its next starts (crash, clean, recycle, sleep, exit:CODE[:SECONDS]);
        None: back to its pool's --types=."""
        path = self.root / f"mode-{name}"
        if mode is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(mode)

    def runs(self, name):
        path = self.root / f"runs-{name}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def starts(self, name):
        return [r for r in self.runs(name) if r["event"] == "start"]

    def exits(self, name):
        return [r for r in self.runs(name) if r["event"] == "exit"]

    def wait_runs(self, name, count, timeout=20):
        self.wait(lambda: len(self.starts(name)) >= count, timeout, f"{name}'s fake worker to start {count} times")
        return self.starts(name)

    # -- looking (wait(): PrivateManager) ----------------------------------------------------------------
    def diagnostics(self):
        parts = [f"--- state file {self.state_file}", json.dumps(self.state(), indent=1)]
        if self.policy_log.exists():
            parts += [f"--- {self.policy_log}", self.policy_log.read_text(errors="replace")[-6000:]]
        parts += ["--- circusd output", self.output()[-6000:]]
        return "\n".join(parts)

    # -- the end -----------------------------------------------------------------------------------------
    def quit(self, timeout=30):
        """circusd's orderly end (what systemctl stop does): every watcher stopped, then circusd exits. start()
        may follow (the same configuration, state file and logs)."""
        with contextlib.suppress(Exception):
            self.call("quit", timeout=timeout)
        self.proc.wait(timeout)
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.stop()
            self._client = None

    def stop(self):
        """Freeze circusd, kill it, then kill every process (and process group) below it."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.stop()
            self._client = None
        self.kill_tree()
