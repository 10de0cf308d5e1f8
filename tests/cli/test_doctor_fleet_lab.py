"""`atom-workerctl -i INVENTORY doctor` from the control host (this test process), over ssh, on real systemd hosts:
a job server and two worker hosts converged by site.yml, the CLI installed on the workers from this checkout.

Each host's verdict and the job server's view (asked from here) are printed; a host whose workers are connected
but registered nothing stands out (exit 3) while the other host, in the same run, is healthy.

Run inside the lab network: tools/lab/lab exec -- .venv/bin/pytest tests/cli/test_doctor_fleet_lab.py
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from gearman_sampler import admin  # noqa: E402
from labhosts import VENV_BIN, booted_per_module, build_project_wheel  # noqa: E402
from polling import wait_until  # noqa: E402

pytestmark = pytest.mark.timeout(900)

P = "dfl-"
JOBS, W1, W2 = f"{P}jobs", f"{P}w1", f"{P}w2"
WORKERS = [W1, W2]
# The control host's address on the lab network: gearmand admits it, so fleet doctor can ask gearmand itself.
CONTROL = "10.231.0.1"
INVENTORY = {"all": {"children": {
    "gearman_job_servers": {"hosts": {JOBS: None},
                            "vars": {"gearman_job_server_listen_address": "{{ ansible_host }}",
                                     "gearman_job_server_allowed_addresses": [CONTROL]}},
    "atom_workers": {"hosts": {W1: None, W2: None}, "vars": {"atom_worker_instances": 2}},
}}}
# AtoM's worker retries a lost job server every 5 s (the stand-in does as net_gearman does).
RECONNECT = 30


class Lab:
    def __init__(self, hosts):
        self.hosts = hosts
        self.inventory = str(hosts.inventory)
        generated = yaml.safe_load(hosts.inventory.read_text())
        self.address = hosts.addresses()
        self.gearmand = (self.address[JOBS], 4730)
        self.server = f"{self.address[JOBS]}:4730"
        lab_vars = generated["all"]["vars"]
        # The hosts are reached over ssh with the lab's key.
        self.env = {**os.environ, "NO_COLOR": "1", "ATOM_WORKERCTL_SSH_ARGS": " ".join(
            ["-i", lab_vars["ansible_ssh_private_key_file"], lab_vars["ansible_ssh_common_args"]])}

    def doctor(self, *args):
        return subprocess.run([str(VENV_BIN / "atom-workerctl"), "-i", self.inventory, "doctor", *args],
                              capture_output=True, text=True, env=self.env, timeout=240, check=False)

    def doctor_json(self):
        proc = self.doctor("--json")
        assert "Traceback" not in proc.stderr, proc.stderr
        data = json.loads(proc.stdout)
        assert data["mode"] == "fleet" and data["exit_code"] == proc.returncode, data
        return proc.returncode, data

    def connections(self):
        """gearmand's worker connections per client address: (with functions, with none); None while gearmand
        does not answer (being restarted)."""
        try:
            lines = admin(self.gearmand, "workers")
        except OSError:
            return None
        served, bare = {}, {}
        for line in lines:
            head, _, funcs = line.partition(" :")
            ip = head.split()[1]
            counts = served if funcs.split() else bare
            counts[ip] = counts.get(ip, 0) + 1
        return served, bare

    def registered(self, host, n=2):
        seen = self.connections()
        return bool(seen) and seen[0].get(self.address[host], 0) == n

    def bare(self, host, n=2):
        seen = self.connections()
        return bool(seen) and seen[1].get(self.address[host], 0) == n and not seen[0].get(self.address[host])


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    wheel = build_project_wheel(Path(tmp_path_factory.mktemp("dfl-wheel")))

    def wrap(hosts):
        result = hosts.playbook("playbooks/lab/site.yml")
        assert result.returncode == 0, result
        result = hosts.playbook("tests/cli/install.yml", "--limit", "atom_workers",
                                extra_vars={"workerctl_wheel": str(wheel)})
        assert result.returncode == 0, result
        lab = Lab(hosts)
        wait_until(lambda: all(lab.registered(h) for h in WORKERS), timeout=60, interval=0.5,
                   what="every worker registered after the converge", details=lab.connections)
        return lab

    with booted_per_module(tmp_path_factory, wrap, prefix="dfl") as make:
        yield make(INVENTORY)


def test_healthy_fleet(lab):
    proc = lab.doctor()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for host in WORKERS:
        assert re.search(rf"^{host}: healthy$", proc.stdout, re.M), proc.stdout
    view = re.findall(rf"^  gearmand {re.escape(lab.server)} \(asked from here\): 2 worker connections serving jobs$",
                      proc.stdout, re.M)
    assert len(view) == 2 and "stands out" not in proc.stdout, proc.stdout
    code, data = lab.doctor_json()
    assert code == 0 and data["healthy"] and list(data["hosts"]) == WORKERS, data
    assert data["gearman"][lab.server]["connections"] == {W1: 2, W2: 2}, data["gearman"]
    assert not any(data["fleet"][h]["stands_out"] for h in WORKERS), data["fleet"]


def test_host_connected_but_registered_nothing_stands_out(lab):
    # W2's workers without the re-registration (the stand-in's knob, read at start), then gearmand restarts:
    # W1's workers register again by themselves (the positive control), W2's come back with no function.
    lab.hosts.standin_control(W2, reregister=False)
    try:
        lab.hosts.run(W2, "systemctl restart atom-worker@1 atom-worker@2")
        wait_until(lambda: lab.registered(W2), timeout=RECONNECT, interval=0.5,
                   what=f"{W2}'s workers with the knob registered at start", details=lab.connections)
        lab.hosts.run(JOBS, "systemctl restart gearman-job-server")
        wait_until(lambda: lab.registered(W1) and lab.bare(W2), timeout=RECONNECT, interval=0.5,
                   what=f"{W1} registered again, {W2} connected with no function", details=lab.connections)
        proc = lab.doctor()
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert re.search(rf"^{W1}: healthy$", proc.stdout, re.M), proc.stdout
        assert re.search(rf"^{W2}: 1 fault$", proc.stdout, re.M), proc.stdout
        w2 = proc.stdout.split(f"\n{W2}: ", 1)[1]
        w1 = proc.stdout.split(f"{W1}: ", 1)[1].split(f"\n{W2}: ", 1)[0]
        assert "FAULT not_registered" in w2 and "2 with no function (registered nothing)" in w2, proc.stdout
        assert "stands out: 2 connections at gearmand" in w2, proc.stdout
        assert "stands out" not in w1 and "2 worker connections serving jobs" in w1, proc.stdout
        code, data = lab.doctor_json()
        assert code == 3 and not data["healthy"], data
        assert data["fleet"][W2]["stands_out"] and not data["fleet"][W1]["stands_out"], data["fleet"]
        assert data["gearman"][lab.server]["no_function"] == {W2: 2}, data["gearman"]
        assert [f["code"] for f in data["hosts"][W2]["findings"]] == ["not_registered"], data["hosts"][W2]
        assert data["hosts"][W1]["findings"] == [], data["hosts"][W1]
    finally:
        lab.hosts.standin_control(W2)
        lab.hosts.run(W2, "atom-workerctl restart")
    wait_until(lambda: lab.registered(W2), timeout=RECONNECT, interval=0.5, what=f"{W2} registered again")
    # Healthy again once W2's workers registered (the same probe that made it stand out).
    wait_until(lambda: lab.doctor().returncode == 0, timeout=RECONNECT, interval=1, what="fleet doctor healthy",
               details=lambda: lab.doctor().stdout)
