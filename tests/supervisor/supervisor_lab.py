"""The lab host of the supervisord lab tests (its fixture, `supervisor_lab`, is in conftest.py).

`supervisor_lab` boots `sv-host` (tools/lab), runs site.yml with atom_worker_manager=supervisor,
gearmand on the same host, two workers of the AtoM stand-in, RestartSec=2 (the start limit is the
docs': 3 starts in 24 h), and atom-workerctl installed from a wheel built from this checkout. The
workers are supervisord programs (Debian's supervisor package, run by its supervisor.service); no
atom-worker@*.service exists. Used by test_supervisor_lab.py and test_supervisor_cli_lab.py.

Run inside the lab network: tools/lab/lab exec -- .venv/bin/pytest tests/supervisor/test_supervisor_lab.py
ATOM_KEEP_LAB=1 keeps the host after the session (it is removed before the next boot anyway).
"""

import json
import os
import shlex
import subprocess

from labhosts import ATOM_ROOT, LabHosts, PlaybookResult
from polling import wait_until

# The session's supervisord host. Two test workers (pytest-xdist) may each run a module that uses it: each
# boots its own (sv-host-gw0, sv-host-gw1), so neither removes the other's.
HOST = "sv-host" + (f"-{os.environ['PYTEST_XDIST_WORKER']}" if os.environ.get("PYTEST_XDIST_WORKER") else "")
RESTART_SEC = 2
INSTANCES = 2
# The role's supervisord settings (its defaults), as sites.json records them.
SERVER_URL = "unix:///run/supervisor.sock"
CONF_FILE = "/etc/supervisor/conf.d/atom-worker.conf"
POLICY_CONF_FILE = "/etc/supervisor/conf.d/atom-worker-policy.conf"
LOG_DIR = "/var/log/atom-worker"
POLICY = "/usr/local/lib/atom-worker/atom-worker-policy"
POLICY_STATE = "/run/atom-worker/supervisor-policy.json"
STATE_FILE = "/etc/atom-worker/sites.json"
RECORD = f"{ATOM_ROOT}/log/standin-record.jsonl"
CONTROL = f"{ATOM_ROOT}/standin/control.json"
HOST_VARS = {
    "atom_worker_manager": "supervisor",
    "atom_worker_instances": INSTANCES,
    "atom_worker_restart_sec": RESTART_SEC,
}
INVENTORY = {"all": {"children": {
    "gearman_job_servers": {"hosts": {HOST: None}},
    "atom_workers": {"hosts": {HOST: dict(HOST_VARS)}},
}}}
# Process names: unit atom-worker@N.service <-> supervisord process atom-workers:atom-worker@N.
WORKERS = [f"atom-workers:atom-worker@{n}" for n in range(1, INSTANCES + 1)]


class SupervisorLab:
    """sv-host, converged with site.yml (atom_worker_manager=supervisor), and helpers to drive it.

    Attributes: hosts (LabHosts), host ("sv-host"), converge (the first site.yml run's PlaybookResult),
    wheel (the atom-workerctl wheel installed on the host), workers (["atom-workers:atom-worker@1", ...]).
    """

    def __init__(self, hosts: LabHosts, wheel: str):
        self.hosts = hosts
        self.host = HOST
        self.wheel = wheel
        self.workers = list(WORKERS)
        self.converge: PlaybookResult | None = None

    # -- commands on the host -----------------------------------------------------------------------
    def run(self, command: str, check=True, timeout=180) -> subprocess.CompletedProcess:
        """A shell command on sv-host as root (no ssh)."""
        return self.hosts.run(HOST, command, check=check, timeout=timeout)

    def playbook(self, extra_vars: dict | None = None, with_cli=True) -> PlaybookResult:
        """site.yml against sv-host, with the wheel the fixture built (so a re-run changes nothing)."""
        return self.hosts.playbook("playbooks/lab/site.yml",
                                   extra_vars={"atom_workerctl_wheel": self.wheel, **(extra_vars or {})},
                                   with_cli=with_cli)

    def supervisorctl(self, *args: str, check=False) -> subprocess.CompletedProcess:
        return self.run(f"supervisorctl -s {SERVER_URL} " + " ".join(shlex.quote(a) for a in args), check=check)

    def policy(self, *args: str, check=False) -> subprocess.CompletedProcess:
        """atom-worker-policy ARGS on the host (status, reset, cancel)."""
        return self.run(f"{POLICY} " + " ".join(shlex.quote(a) for a in args), check=check)

    def workerctl(self, *args: str, check=False) -> subprocess.CompletedProcess:
        return self.run("atom-workerctl " + " ".join(shlex.quote(a) for a in args), check=check)

    # -- state --------------------------------------------------------------------------------------
    def processes(self) -> dict:
        """supervisord's view: {"group:name": {"state": "RUNNING", "pid": 123 or None, "line": ...}}."""
        out = self.supervisorctl("status").stdout
        procs = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) < 2:
                continue
            pid = None
            if len(parts) >= 4 and parts[2] == "pid":
                pid = int(parts[3].rstrip(","))
            procs[parts[0]] = {"state": parts[1], "pid": pid, "line": line}
        return procs

    def policy_state(self) -> dict:
        """The listener's state file (README-supervisor.md), {} while it does not exist."""
        proc = self.run(f"cat {POLICY_STATE}", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else {}

    def sites(self) -> dict:
        return json.loads(self.run(f"cat {STATE_FILE}").stdout)

    def record(self) -> list[dict]:
        """The AtoM stand-in's record (tests/fixtures/atom/README.md), one event per line."""
        out = self.run(f"cat {RECORD} 2>/dev/null || true").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def control(self, **knobs) -> None:
        """The stand-in's knobs for the next worker starts (none: remove the file)."""
        if knobs:
            self.run(f"echo {shlex.quote(json.dumps(knobs))} > {CONTROL}")
        else:
            self.run(f"rm -f {CONTROL}")

    def wait(self, predicate, timeout=60, what="condition", details=None):
        return wait_until(predicate, timeout, 0.5, what, details or self.diagnostics)

    def wait_running(self, names=None, timeout=90):
        names = names or self.workers
        return self.wait(lambda: (p := self.processes()) and all(p.get(n, {}).get("state") == "RUNNING" for n in names)
                         and p, timeout, f"{names} RUNNING")

    def diagnostics(self) -> str:
        return self.run(f"supervisorctl -s {SERVER_URL} status; tail -n 30 {LOG_DIR}/atom-worker-policy.log; "
                        "tail -n 30 /var/log/supervisor/supervisord.log", check=False).stdout
