"""`atom-workerctl -i INVENTORY jobs`: AtoM's one database judged once with every worker host's workers.

A job server (gearmand drops a job whose worker died: one attempt) and two worker hosts converged with
site.yml; fj-w1's MariaDB holds the site's database, fj-w2's config/config.php names fj-w1 (as AtoM's hosts
share one database). One host alone sees only its own workers: with a finding aid running on fj-w1, fj-w2
cannot tell a lost finding aid from the one fj-w1 runs and calls it uncertain; the fleet ties the running one
to its row on fj-w1 and calls the lost one stale. Its printed fix, run as printed, fails that row alone.

Run inside the lab network: tools/lab/lab exec -- .venv/bin/pytest tests/fleet/test_fleet_jobs_lab.py
The tests share the hosts and run in file order.
"""

import json
import os
import re
import shlex
import subprocess

import pytest
import yaml
from labhosts import ATOM_ROOT, VENV_BIN, LabHosts, booted_per_module
from polling import wait_until

pytestmark = pytest.mark.timeout(600)

P = "fj-"
JOBS, W1, W2 = f"{P}jobs", f"{P}w1", f"{P}w2"
UNITS = "atom-worker@1 atom-worker@2"
FIX = re.compile(r"^    fix: {6}(?P<fix>atom-workerctl .+)$", re.M)


class Lab:
    def __init__(self, hosts: LabHosts):
        self.hosts = hosts
        self.inventory = str(hosts.inventory)
        self.env = {**os.environ, "NO_COLOR": "1", "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
        self.state: dict = {}

    def sh(self, host, command, check=True):
        return self.hosts.run(host, command, check=check)

    def ctl(self, *args):
        """`atom-workerctl -i INVENTORY ARGS` from the control host: (exit code, stdout, stderr)."""
        proc = subprocess.run([str(VENV_BIN / "atom-workerctl"), "-i", self.inventory, *args], capture_output=True,
                              text=True, env=self.env, timeout=240, check=False)
        return proc.returncode, proc.stdout, proc.stderr

    def fleet_json(self, *args):
        code, out, err = self.ctl(*args, "--json")
        assert out.strip(), err
        data = json.loads(out)
        assert data["mode"] == "fleet" and data["exit_code"] == code, data
        return code, data

    def local_json(self, host, *args):
        proc = self.sh(host, "atom-workerctl --json " + " ".join(map(shlex.quote, args)), check=False)
        return proc.returncode, json.loads(proc.stdout)

    def sql(self, query):
        """A query on the one database (fj-w1's MariaDB, as root by its socket): rows of tab-separated text."""
        out = self.sh(W1, f"mariadb --batch --skip-column-names atom -e {shlex.quote(query)}").stdout
        return [line.split("\t") for line in out.splitlines()]

    def submit(self, payload, cls="arFindingAidJob"):
        out = self.sh(W1, f"cd {ATOM_ROOT} && runuser -u www-data -- php symfony standin:submit --class={cls} "
                          f"--user=archivist --payload={shlex.quote(json.dumps(payload))}").stdout
        return int(out.split()[0])

    def started(self, host, job_id):
        """The PID of the worker process on `host` that started job_id (the stand-in's record), or None."""
        out = self.sh(host, f"cat {ATOM_ROOT}/log/standin-record.jsonl 2>/dev/null || true").stdout
        for line in out.splitlines():
            event = json.loads(line)
            if event.get("event") == "job-start" and event.get("id") == job_id:
                return event["pid"]
        return None

    def run_on(self, host, other, units, payload):
        """Submit a job while `other`'s idle `units` are stopped, so that `host` takes it; they serve again after.
        (Never a unit running a job: stopping it would end that job.)"""
        self.sh(other, f"systemctl stop {units}")
        try:
            job = self.submit(payload)
            pid = wait_until(lambda: self.started(host, job), 60, 0.5, f"job {job} started on {host}")
        finally:
            self.sh(other, f"systemctl start {units}")
        return job, pid

    def unit_of(self, host, pid):
        return next(u for u, p in self.hosts.main_pids(host).items() if p == str(pid))

    def gearadmin(self, what):
        """gearmand's admin answer, asked on the job server (it listens on its lab address only)."""
        return self.sh(JOBS, f"gearadmin -h {self.hosts.address(JOBS)} --{what}").stdout

    def registered(self):
        out = self.gearadmin("workers")
        return sum(1 for line in out.splitlines() if " : " in line and line.split(" : ", 1)[1].strip()) == 4


def _row(data, job_id):
    for db in data.get("databases") or data.get("sites"):
        for j in db["jobs"]:
            if j["id"] == job_id:
                return j
    return None


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    source = {"all": {"children": {
        "gearman_job_servers": {"hosts": {JOBS: None},
                                "vars": {"gearman_job_server_listen_address": "{{ ansible_host }}",
                                         "gearman_job_server_job_retries": 1}},
        "atom_workers": {"hosts": {W1: None, W2: None},
                         "vars": {"atom_worker_instances": 2, "atom_worker_restart_sec": 10,
                                  "atom_standin_database": True}},
    }}}

    def wrap(hosts):
        generated = yaml.safe_load(hosts.inventory.read_text())
        workers = generated["all"]["children"]["atom_workers"]["hosts"]
        workers[W1] = {**(workers[W1] or {}), "atom_standin_database_clients": [hosts.address(W2)]}
        workers[W2] = {**(workers[W2] or {}), "atom_standin_database_host": hosts.address(W1)}
        hosts.inventory.write_text(yaml.safe_dump(generated, sort_keys=False))
        result = hosts.playbook("playbooks/lab/site.yml", with_cli=True)
        assert result.returncode == 0, result
        lab = Lab(hosts)
        wait_until(lab.registered, 60, 0.5, "both hosts' workers registered")
        return lab

    with booted_per_module(tmp_path_factory, wrap, prefix="fleet-jobs") as make:
        yield make(source)


def test_both_hosts_use_the_one_database(lab):
    assert "host=" + lab.hosts.address(W1) in lab.sh(W2, f"cat {ATOM_ROOT}/config/config.php").stdout
    job = lab.submit({})
    wait_until(lambda: lab.sql(f"SELECT status_id FROM job WHERE id = {job}") == [["184"]], 60, 0.5,
               f"job {job} completed")
    code, data = lab.fleet_json("jobs")
    assert code == 0, data
    (db,) = data["databases"]  # one database, though one host names it by socket and the other by address
    assert db["hosts"] == [W1, W2] and _row(data, job)["status"] == "completed", db


def test_a_job_running_on_the_other_host_is_running_there(lab):
    """Positive control: a finding aid running on fj-w1 is running, named with its host and instance."""
    busy, pid = lab.run_on(W1, W2, UNITS, {"sleep": 600})
    lab.state["busy"] = busy
    lab.state["busy_unit"] = lab.unit_of(W1, pid)
    wait_until(lab.registered, 60, 0.5, "fj-w2's workers registered again")
    code, data = lab.fleet_json("jobs", "--status", "running")
    assert code == 0, data
    now = _row(data, busy)["now"]
    assert now["state"] == "running" and re.search(rf"on {W1}:atom-worker@\d \(PID {pid}\)", now["summary"]), now
    code, data = lab.fleet_json("jobs", "--stale")
    assert code == 0 and not data["databases"][0]["jobs"], data


def test_a_lost_job_is_stale_for_the_fleet_and_only_uncertain_for_one_host(lab):
    idle = next(u for u in UNITS.split() if not lab.state["busy_unit"].startswith(u + "."))
    lost, pid = lab.run_on(W2, W1, idle, {"sleep": 600})
    lab.state["lost"] = lost
    lab.sh(W2, f"kill -KILL {pid}")
    wait_until(lambda: re.search(r"-arFindingAidJob\t1\t1\t", lab.gearadmin("status")),
               30, 0.5, "gearmand dropped the lost job (one left: the one running on fj-w1)")
    wait_until(lambda: int(lab.sql(f"SELECT TIMESTAMPDIFF(SECOND, created_at, NOW()) FROM object "
                                   f"WHERE id = {lost}")[0][0]) > 10, 20, 1, "the lost row older than the grace time")
    wait_until(lab.registered, 60, 0.5, "fj-w2's killed worker back and registered")
    # fj-w2 alone: gearmand runs a finding aid none of its workers took, so the lost row may be that one.
    code, data = lab.local_json(W2, "jobs", "--status", "running")
    assert code == 0 and _row(data, lost)["now"]["state"] == "uncertain", _row(data, lost)
    # The fleet ties that running one to its row on fj-w1: the lost row is stale, with fj-w2's evidence.
    code, data = lab.fleet_json("jobs", "--stale")
    assert code == 3, data
    (row,) = data["databases"][0]["jobs"]
    assert row["id"] == lost and row["now"]["state"] == "stale", row
    assert any(f"{W2}:atom-worker@" in e and f"(PID {pid}) started it" in e for e in row["now"]["evidence"]), row
    assert _row(lab.fleet_json("jobs", "--status", "running")[1], lab.state["busy"])["now"]["state"] == "running"
    # doctor over the fleet reports it once, with the fleet's fix; fj-w2's own doctor cannot tell.
    local = json.loads(lab.sh(W2, "atom-workerctl doctor --json", check=False).stdout)
    assert not [f for f in local["findings"] if f["code"] == "stale_job"], local["findings"]
    code, data = lab.fleet_json("doctor")
    (finding,) = data["jobs"]
    assert code == 3 and finding["subject"] == f"job {lost} (site default)", data["jobs"]
    assert finding["fix"] == [f"atom-workerctl -i {lab.inventory} jobs fail {lost} --site default"], finding
    assert not [f for h in data["hosts"].values() for f in h.get("findings") or [] if f["code"] == "stale_job"]


def test_the_printed_fix_fails_the_lost_row_alone(lab):
    lost, busy = lab.state["lost"], lab.state["busy"]
    code, out, err = lab.ctl("jobs", "--stale")
    assert code == 3, out + err
    fixes = FIX.findall(out)
    assert fixes == [f"atom-workerctl -i {lab.inventory} jobs fail {lost} --site default"], out
    others = lab.sql(f"SELECT id, status_id FROM job WHERE id != {lost} ORDER BY id")
    proc = subprocess.run(fixes[0], shell=True, capture_output=True, text=True, env=lab.env, timeout=240,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"job {lost} arFindingAidJob: marked error" in proc.stdout, proc.stdout
    assert lab.sql(f"SELECT status_id, completed_at IS NOT NULL FROM job WHERE id = {lost}") == [["185", "1"]]
    note = lab.sql(f"SELECT i.content FROM note n JOIN note_i18n i ON i.id = n.id WHERE n.object_id = {lost}")
    assert note and "asking 2 worker host(s)" in note[0][0], note
    assert lab.sql(f"SELECT id, status_id FROM job WHERE id != {lost} ORDER BY id") == others
    code, data = lab.fleet_json("jobs", "--stale")
    assert code == 0 and not data["databases"][0]["jobs"], data
    assert lab.fleet_json("doctor")[1]["jobs"] == []
    # The same command refuses a row a worker runs, and changes nothing.
    code, out, err = lab.ctl("jobs", "fail", str(busy), "--site", "default")
    assert code == 1 and f"job {busy} is not stale (running" in err and len(err.strip().splitlines()) == 1, err
    assert lab.sql(f"SELECT status_id FROM job WHERE id = {busy}") == [["183"]]
