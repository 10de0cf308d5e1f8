"""atom-workerctl's fleet mode from the control host (this test process), over ssh, on real systemd hosts:
a job server and two worker hosts converged with site.yml, the CLI installed on the workers by the role.

Run inside the lab network: tools/lab/lab exec -- .venv/bin/pytest tests/fleet/test_fleet_cli_lab.py
The tests share the hosts and run in file order; each leaves both worker hosts up with 2 registered
instances.
"""

import json
import os
import shlex
import signal
import subprocess
import threading
import time

import pytest
import yaml
from gearman_sampler import StatusSampler, admin, hold_stopped, parse_status
from labhosts import ATOM_ROOT, VENV_BIN, LabHosts, booted_per_module
from polling import wait_until

pytestmark = pytest.mark.timeout(400)

P = "fc-"
JOBS, W1, W2 = f"{P}jobs", f"{P}w1", f"{P}w2"
WORKERS = [W1, W2]
CTL = [str(VENV_BIN / "atom-workerctl")]
EXIT_PARTIAL = 5


class Lab:
    def __init__(self, hosts: LabHosts, generated: dict):
        self.hosts = hosts
        self.inventory = str(hosts.inventory)
        self.address = hosts.addresses()
        self.gearmand = (self.address[JOBS], 4730)
        self.server = f"{self.address[JOBS]}:4730"
        lab_vars = generated["all"]["vars"]
        # `-H` hosts are reached with the user's own ssh settings; here, the lab's key.
        self.env = {**os.environ, "NO_COLOR": "1", "ATOM_WORKERCTL_SSH_ARGS": " ".join(
            ["-i", lab_vars["ansible_ssh_private_key_file"], lab_vars["ansible_ssh_common_args"]])}

    def ctl(self, *args, timeout=240):
        started = time.monotonic()
        proc = subprocess.run([*CTL, *args], capture_output=True, text=True, env=self.env, timeout=timeout,
                              check=False)
        proc.seconds = time.monotonic() - started
        return proc

    def fleet(self, *args, timeout=240):
        """`atom-workerctl -i INVENTORY ... --json`: (exit code, the JSON, the process)."""
        proc = self.ctl("-i", self.inventory, *args, "--json", timeout=timeout)
        assert proc.stdout.strip(), proc.stderr
        data = json.loads(proc.stdout)
        assert data["schema"] == 1 and data["mode"] == "fleet" and data["exit_code"] == proc.returncode, data
        return proc.returncode, data, proc

    def run(self, host, command, check=True):
        return self.hosts.run(host, command, check=check)

    def status(self):
        return parse_status(admin(self.gearmand, "status"))

    def worker_ips(self):
        """gearmand's worker connections (with functions) per client address; None while gearmand does not
        answer (it is being restarted: systemd has started it before it listens)."""
        try:
            lines = admin(self.gearmand, "workers")
        except OSError:
            return None
        out = {}
        for line in lines:
            head, _, funcs = line.partition(" :")
            if funcs.split():
                out[head.split()[1]] = out.get(head.split()[1], 0) + 1
        return out

    def functions(self):
        return sorted(f for f in self.status() if f.count("-") == 1 and len(f.split("-")[0]) == 32)

    def main_pids(self, host):
        return self.hosts.main_pids(host)

    def completed(self):
        done = set()
        for host in WORKERS:
            out = self.run(host, f"cat {ATOM_ROOT}/log/standin-record.jsonl 2>/dev/null || true").stdout
            done |= {e["id"] for e in map(json.loads, filter(None, out.splitlines()))
                     if e.get("event") == "job" and e.get("status") == "completed"}
        return done

    def submit(self, cls, count, payload):
        command = (f"cd {ATOM_ROOT} && runuser -u www-data -- php symfony standin:submit --class={cls} "
                   f"--count={count} --payload={shlex.quote(json.dumps(payload))}")
        return self.run(W1, command, check=False)

    def all_registered(self):
        """Both hosts' 2 instances registered, seen by gearmand (2 connections from each address)."""
        ips = self.worker_ips() or {}
        return all(ips.get(self.address[h], 0) == 2 for h in WORKERS)


def control_address(server):
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(server)
        return probe.getsockname()[0]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    source = {"all": {"children": {
        "gearman_job_servers": {"hosts": {JOBS: None},
                                "vars": {"gearman_job_server_listen_address": "{{ ansible_host }}"}},
        "atom_workers": {"hosts": {W1: None, W2: None}, "vars": {"atom_worker_instances": 2}},
    }}}

    def wrap(hosts):
        generated = yaml.safe_load(hosts.inventory.read_text())
        jobs = generated["all"]["children"]["gearman_job_servers"]
        address = hosts.address(JOBS)
        # The fleet's status asks gearmand from the control host: admit it (in the test's copy only).
        jobs["vars"]["gearman_job_server_allowed_addresses"] = [control_address((address, 4730))]
        hosts.inventory.write_text(yaml.safe_dump(generated, sort_keys=False))
        result = hosts.playbook("playbooks/lab/site.yml", with_cli=True)
        assert result.returncode == 0, result
        lab = Lab(hosts, generated)
        wait_until(lab.all_registered, 60, 0.5, "every worker registered after the converge")
        return lab

    with booted_per_module(tmp_path_factory, wrap, prefix="fleet-cli") as make:
        yield make(source)


def test_status_over_the_inventory_and_over_named_hosts(lab):
    code, data, _ = lab.fleet("status")
    assert code == 0, data
    assert list(data["hosts"]) == WORKERS  # the group atom_workers, not the job server
    for host in WORKERS:
        assert data["hosts"][host]["summary"]["active"] == 2 and data["hosts"][host]["summary"]["registered"] == 2
        assert data["fleet"][host]["reached"] and not data["fleet"][host]["stands_out"], data["fleet"][host]
    view = data["gearman"][lab.server]
    assert view["reachable"] and view["connections"] == {W1: 2, W2: 2} and not view["other_connections"]
    # The merged view is gearmand's own, split by host.
    truth = lab.status()
    functions = lab.functions()
    assert len(functions) == 18
    merged = {f["function"]: f for f in view["functions"]}
    for name in functions:
        assert merged[name]["available_workers"] == truth[name][2] == 4
        assert merged[name]["by_host"] == {W1: 2, W2: 2}
    # --limit, Ansible's pattern.
    code, data, _ = lab.fleet("--limit", W2, "status")
    assert code == 0 and list(data["hosts"]) == [W2]
    assert data["gearman"][lab.server]["other_connections"] == [{"ip": lab.address[W1], "connections": 2}]
    # -H, the human table.
    proc = lab.ctl("-H", f"root@{W1}", "-H", W2, "status")
    assert proc.returncode == 0, proc.stderr
    assert "fleet: 2 hosts, 2 answered; 4 instances, 4 active, 4 registered" in proc.stdout, proc.stdout
    assert "arFindingAidJob" in proc.stdout and f"{W1}:2 {W2}:2" in proc.stdout
    # Bad input: one line, usage exit code, nothing run.
    for args in (["-i", "/nonexistent.yml", "status"], ["-i", lab.inventory, "-H", W1, "status"],
                 ["-l", W1, "status"], ["-H", W1, "completion", "bash"], ["-i", lab.inventory, "--group", "nope",
                                                                        "status"]):
        proc = lab.ctl(*args)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
        assert proc.stderr.startswith("atom-workerctl: error: ") and not proc.stdout


def test_fleet_commands_reuse_one_ssh_connection_per_host(lab):
    """ControlMaster/ControlPersist: a command within 60 s of the last rides on its connection; each host's
    sshd counts the logins."""
    def logins():
        count = "journalctl _COMM=sshd -o cat --no-pager | grep -c 'Accepted publickey' || true"
        return {host: int(lab.run(host, count).stdout.strip() or 0) for host in WORKERS}

    def status(env):
        proc = subprocess.run([*CTL, "-i", lab.inventory, "status", "--json"], capture_output=True, text=True,
                              env=env, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr

    # Control: turned off the way the README says (the user's options come first and win), every command
    # logs in to every host again, and the count sees it.
    off = {**lab.env, "ATOM_WORKERCTL_SSH_ARGS": lab.env["ATOM_WORKERCTL_SSH_ARGS"] + " -o ControlPath=none"}
    before = logins()
    status(off)
    status(off)
    assert logins() == {host: n + 2 for host, n in before.items()}
    # Reused: at most one login per host for the first command (a connection of an earlier test may still
    # be up), none for the next ones.
    status(lab.env)
    first = logins()
    assert all(first[host] - before[host] in (2, 3) for host in WORKERS), (before, first)
    status(lab.env)
    status(lab.env)
    assert logins() == first


def test_an_open_connection_is_asked_for_the_session_without_starting_ssh(lab, tmp_path):
    """With a connection open, the CLI asks its ssh master for the session itself (sshmux.py): no ssh client
    is started, and what each host's command printed, its exit code and its errors arrive as through ssh.
    A master killed without cleaning up (its socket left behind) makes the next command start ssh again."""
    calls = tmp_path / "ssh-calls"
    (tmp_path / "ssh").write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec /usr/bin/ssh "$@"\n')
    (tmp_path / "ssh").chmod(0o755)
    # `ssh` is the counting wrapper; a variable that ssh's SendEnv names (and the hosts' sshd accepts: LC_*).
    shared = {**lab.env, "PATH": f"{tmp_path}:{os.environ['PATH']}", "LC_ATOM_TEST": "sent",
              "ATOM_WORKERCTL_SSH_ARGS": lab.env["ATOM_WORKERCTL_SSH_ARGS"] + " -o SendEnv=LC_ATOM_TEST"}
    # The control: the same wrapper with connection sharing off (ssh's own option, the user's first) is
    # started once per host and command, so the count sees ssh clients when there are any.
    through_ssh = {**shared, "ATOM_WORKERCTL_SSH_ARGS": shared["ATOM_WORKERCTL_SSH_ARGS"] + " -o ControlPath=none"}

    def started():
        return len(calls.read_text().splitlines()) if calls.exists() else 0

    def fleet(env, *args, answers=False):
        """Exit code and each host's part of the fleet's JSON (and, for the fakes below, its answer)."""
        proc = subprocess.run([*CTL, "-i", lab.inventory, *args, "--json"], capture_output=True, text=True,
                              env=env, timeout=120, check=False)
        data = json.loads(proc.stdout)
        out = (proc.returncode, {h: {k: v for k, v in f.items() if k != "seconds"} for h, f in data["fleet"].items()})
        return (*out, data["hosts"]) if answers else out

    # Host commands in place of the host's CLI: an error and exit 4; output that is not JSON; 1 MB of JSON
    # whose end leaves the host after the exit status (the session must be read to its end, not to the
    # status); a command killed by a signal (no exit status at all); the environment it was given.
    fakes = ("echo 'it went wrong' >&2; exit 4",
             "echo hello",
             "printf '{\"schema\": 1, \"big\": \"'; head -c 1000000 /dev/zero | tr '\\0' x; echo '\"}'",
             "kill -9 $$",
             "printf '{\"schema\": 1, \"variable\": \"%s\"}\\n' \"${LC_ATOM_TEST-not sent}\"")

    def answers(env):
        out = [fleet(env, "status")]
        for script in fakes:
            for host in WORKERS:
                lab.run(host, f"cat > /usr/local/bin/fake-ctl <<'EOF'\n#!/bin/sh\n{script}\nEOF\n"
                              "chmod 755 /usr/local/bin/fake-ctl")
            out.append(fleet({**env, "ATOM_WORKERCTL_REMOTE": "fake-ctl"}, "status", answers=True))
        return out

    try:
        before = started()
        via_ssh = answers(through_ssh)
        assert started() == before + (1 + len(fakes)) * len(WORKERS)
        fleet(shared, "status")  # opens the connections when no earlier test left them open
        before = started()
        via_master = answers(shared)
        assert started() == before, calls.read_text()
    finally:
        for host in WORKERS:
            lab.run(host, "rm -f /usr/local/bin/fake-ctl")
    assert via_master == via_ssh
    (code, status), (code4, failed, _), (code3, garbled, _), (big_code, big, answer), (_, killed, _), \
        (_, _, environment) = via_master
    assert code == 0 and all(status[h]["reached"] and status[h]["exit_code"] == 0 for h in WORKERS), status
    assert code4 == 4 and all(failed[h]["exit_code"] == 4 and failed[h]["error"] == "it went wrong"
                              for h in WORKERS), failed
    assert code3 == 3 and garbled[W1]["error"] == "unexpected output from fake-ctl (not JSON): hello", garbled
    assert big_code == 0 and all(big[h]["reached"] and big[h]["error"] is None for h in WORKERS), big
    assert all(len(answer[h]["big"]) == 1000000 for h in WORKERS)
    assert all(environment[h] == {"schema": 1, "variable": "sent"} for h in WORKERS), environment
    assert all(not killed[h]["reached"] and killed[h]["error"] == "ssh failed (exit 255)" for h in WORKERS), killed

    # Our masters for these hosts killed at once (ssh names a master "ssh: SOCKET [mux]"): their sockets
    # stay, nobody answers on them; the next command starts ssh for each host, and the one after it asks
    # the new masters directly again.
    paths = ("import json, sys; from atom_workerctl import fleet_ssh; print(json.dumps("
             "[t.shared_connection() for t in fleet_ssh.from_inventory(sys.argv[1], None, 'atom_workers')]))")
    sockets = json.loads(subprocess.run([str(VENV_BIN / "python"), "-c", paths, lab.inventory], capture_output=True,
                                        text=True, env=shared, check=True).stdout)
    masters = [int(pid) for pid in os.listdir("/proc") if pid.isdigit()
               and _cmdline(pid) in {f"ssh: {path} [mux]" for path in sockets}]
    assert len(masters) >= len(WORKERS), (sockets, masters)
    for pid in masters:
        os.kill(pid, signal.SIGKILL)
    assert all(os.path.exists(path) for path in sockets), sockets  # stale, not removed
    before = started()
    code, now = fleet(shared, "status")
    assert code == 0 and all(now[h]["reached"] for h in WORKERS), now
    destinations = [words[words.index("--") + 1] for words in map(str.split, calls.read_text().splitlines()[before:])]
    assert sorted(destinations) == sorted(lab.address[h] for h in WORKERS), calls.read_text()
    before = started()
    assert fleet(shared, "status")[0] == 0 and started() == before


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().rstrip(b"\0").decode(errors="replace")
    except OSError:
        return ""


def test_a_host_whose_units_run_but_cannot_reach_gearmand_stands_out(lab):
    # W2 can no longer send to the job server (a `prohibit` route: the worker hosts have no nftables);
    # gearmand is restarted so that it drops every connection: W1's workers reconnect, W2's cannot.
    lab.run(W2, f"ip route add prohibit {lab.address[JOBS]}/32")
    try:
        lab.run(JOBS, "systemctl restart gearman-job-server")
        wait_until(lambda: lab.worker_ips() == {lab.address[W1]: 2}, 60, 0.5, "only W1's workers at gearmand",
                   details=lambda: f"gearmand's workers by address: {lab.worker_ips()}")
        code, data, _ = lab.fleet("status", "--gearman-timeout", "1")
        assert code == 3, data["fleet"]
        assert data["hosts"][W2]["summary"]["active"] == 2  # the units run ...
        w2 = data["fleet"][W2]
        assert w2["stands_out"] and w2["gearman_connections"] == {lab.server: 0}, w2  # ... with no connection
        assert any("NO worker connection" in n for n in w2["notes"]), w2["notes"]
        assert any("cannot reach gearmand" in n for n in w2["notes"]), w2["notes"]
        assert not data["fleet"][W1]["stands_out"], data["fleet"][W1]
        assert data["summary"]["hosts_standing_out"] == [W2]
        human = lab.ctl("-i", lab.inventory, "status", "--gearman-timeout", "1")
        assert human.returncode == 3
        row = next(line for line in human.stdout.splitlines() if line.startswith(W2))
        assert "NO worker connection" in row, human.stdout
    finally:
        lab.run(W2, f"ip route del prohibit {lab.address[JOBS]}/32", check=False)
    wait_until(lab.all_registered, 60, 0.5, "W2's workers to reconnect on their own")
    code, data, _ = lab.fleet("status")
    assert code == 0 and not data["summary"]["hosts_standing_out"], data["summary"]


def test_rolling_restart_over_the_fleet_keeps_a_worker_for_every_function(lab):
    functions = lab.functions()
    before = {h: lab.main_pids(h) for h in WORKERS}
    sampler = StatusSampler(lab.gearmand, interval=0.1)
    submitted, failures, done = [], [], threading.Event()

    def submit_meanwhile():
        while not done.is_set():
            proc = lab.submit("arFindingAidJob", 2, {"sleep": 0.2})
            (submitted.extend(proc.stdout.split()) if proc.returncode == 0 else failures.append(proc.stderr))

    def start_w2_instance():
        lab.run(W2, "systemctl start atom-worker@2")
        wait_until(lab.all_registered, 60, 0.2, "W2's atom-worker@2 to register again")

    submitter = threading.Thread(target=submit_meanwhile, daemon=True)
    sampler.start()
    # The control: one instance of W2 held stopped for a second; the probe must see 3 of 4 then.
    held = hold_stopped(lambda: lab.run(W2, "systemctl stop atom-worker@2"), start_w2_instance)
    before[W2] = lab.main_pids(W2)
    submitter.start()
    try:
        began = time.monotonic()
        code, data, proc = lab.fleet("restart", "--rolling")
        ended = time.monotonic()
        time.sleep(0.5)  # samples after the restart, too
    finally:
        done.set()
        submitter.join(30)
        sampler.stop()
    assert code == 0, proc.stderr
    assert data["rolling"] and data["stopped_at"] is None and data["not_restarted"] == []
    for host in WORKERS:
        assert data["hosts"][host]["exit_code"] == 0
        assert all(a["registered"] for a in data["hosts"][host]["actions"]), data["hosts"][host]
    # One host at a time: W1's last line before W2's first.
    lines = proc.stderr.splitlines()
    assert max(i for i, ln in enumerate(lines) if ln.startswith(f"[{W1}]")) < \
        min(i for i, ln in enumerate(lines) if ln.startswith(f"[{W2}]")), proc.stderr
    after = {h: lab.main_pids(h) for h in WORKERS}
    for host in WORKERS:
        assert all(after[host][u] not in (pid, "0") for u, pid in before[host].items()), (before, after)
    # gearmand every 100 ms: never fewer than all workers but one, for every function, during the restart;
    # the same probe saw 3 of 4 for every function while W2's instance was held stopped.
    assert not sampler.errors, sampler.errors
    sampler.check_held(held, dict.fromkeys(functions, 3), "W2's instance held stopped")
    sampler.check_window(began, ended)
    lowest = sampler.minimum(functions, between=(began, ended))
    assert min(lowest.values()) >= 3, lowest
    assert not failures, failures[:3]
    assert len(submitted) >= 4, submitted
    wait_until(lambda: set(submitted) <= lab.completed(), 60, 0.5, f"the {len(submitted)} jobs submitted meanwhile")
    print(f"fleet rolling restart: {proc.seconds:.1f} s, {len(sampler.samples)} samples, "
          f"{len(submitted)} jobs, lowest available {min(lowest.values())}")


def test_rolling_restart_in_batches_runs_the_hosts_of_a_batch_together(lab):
    """--parallel 2: both hosts at once, each still one instance after another, so at most one worker per
    host is down at any moment (2 of 4 for every function); every worker is new afterwards."""
    functions = lab.functions()
    before = {h: lab.main_pids(h) for h in WORKERS}
    sampler = StatusSampler(lab.gearmand, interval=0.1)
    sampler.start()
    try:
        began = time.monotonic()
        code, data, proc = lab.fleet("restart", "--rolling", "--parallel", "2")
        ended = time.monotonic()
        time.sleep(0.5)
    finally:
        sampler.stop()
    assert code == 0 and data["parallel"] == 2 and data["stopped_at"] is None, proc.stderr
    # Together: W2 began before W1 was done (with one host at a time, W1's last line comes first).
    lines = proc.stderr.splitlines()
    assert min(i for i, ln in enumerate(lines) if ln.startswith(f"[{W2}]")) < \
        max(i for i, ln in enumerate(lines) if ln.startswith(f"[{W1}]")), proc.stderr
    after = {h: lab.main_pids(h) for h in WORKERS}
    for host in WORKERS:
        assert all(after[host][u] not in (pid, "0") for u, pid in before[host].items()), (before, after)
    assert not sampler.errors, sampler.errors
    sampler.check_window(began, ended)
    lowest = sampler.minimum(functions, between=(began, ended))
    assert min(lowest.values()) >= 2, lowest


def test_a_host_powered_off_mid_operation_is_reported_and_the_others_answer(lab, request):
    # A rolling restart over the fleet; W2 goes down while W1 is being restarted. W1's workers take 3 s to
    # start (the stand-in's start_delay), so W1's part lasts long enough for the power-off to land in it.
    lab.run(W1, f"echo '{{\"start_delay\": 3}}' > {ATOM_ROOT}/standin/control.json")
    follower = Follower(lab)  # logs -f over the fleet, through W2's power-off and boot
    request.addfinalizer(follower.stop)
    rolling = subprocess.Popen([*CTL, "-i", lab.inventory, "--host-timeout", "60", "restart", "--rolling", "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=lab.env)
    err_lines = []
    reader = threading.Thread(target=lambda: err_lines.extend(ln.rstrip("\n") for ln in rolling.stderr), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any(ln.startswith(f"[{W1}] [1/") for ln in err_lines), 60, 0.1,
                   "W1's rolling restart to begin", details=lambda: "\n".join(err_lines))
        powered_off = time.time()
        lab.hosts.poweroff(W2)
        status = lab.ctl("-i", lab.inventory, "--host-timeout", "10", "status", "--json")
        out = rolling.stdout.read()
        rolling.wait(180)
        reader.join(10)
        err = "\n".join(err_lines)
    finally:
        lab.run(W1, f"rm -f {ATOM_ROOT}/standin/control.json")
        if rolling.poll() is None:
            rolling.kill()
    try:
        # status: W2 reported, W1 answered, exit "partial".
        assert status.returncode == EXIT_PARTIAL, status.stderr
        data = json.loads(status.stdout)
        assert data["partial"] and data["summary"]["unreachable"] == [W2]
        assert not data["fleet"][W2]["reached"] and data["fleet"][W2]["error"], data["fleet"][W2]
        assert "error" in data["hosts"][W2]
        assert data["fleet"][W1]["reached"] and data["hosts"][W1]["summary"]["instances"] == 2
        assert data["fleet"][W1]["seconds"] < 10  # it did not wait for W2
        # The rolling restart: W1 done, W2 skipped and reported, exit "partial".
        assert rolling.returncode == EXIT_PARTIAL, err
        result = json.loads(out)
        assert result["hosts"][W1]["exit_code"] == 0 and not result["fleet"][W2]["reached"], result["fleet"]
        assert f"[{W2}] not reached, skipped" in err, err
        # doctor over the fleet: the same.
        proc = lab.ctl("-i", lab.inventory, "--host-timeout", "10", "doctor")
        assert proc.returncode == EXIT_PARTIAL and f"{W1}: healthy" in proc.stdout, proc.stdout + proc.stderr
        assert f"{W2}: not reached" in proc.stdout
    finally:
        booted = time.time()
        lab.hosts.boot(W2)
    try:
        wait_until(lab.all_registered, 120, 0.5, "W2's workers to register after its boot")
        # logs -f: W1's lines went on while W2 was off; W2 is followed again once it is back.
        wait_until(lambda: follower.lines(W2, "Running worker", after=booted), 60, 0.5,
                   "W2's workers' start lines after its boot in the fleet's logs -f", details=follower.details)
        assert follower.lines(W1, "Running worker", after=powered_off, before=booted), follower.details()
    finally:
        err = follower.stop()
    assert f"[{W2}] stopped following: " in err and f"[{W2}] following again" in err, err
    assert f"[{W1}] stopped following" not in err, err


class Follower:
    """`atom-workerctl -i INVENTORY logs -f -n 0 --json`, read in a thread."""

    def __init__(self, lab):
        self.proc = subprocess.Popen([*CTL, "-i", lab.inventory, "logs", "-f", "-n", "0", "--json"], text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=lab.env)
        self.entries, self.err = [], []
        self.readers = [threading.Thread(target=lambda: self.entries.extend(map(json.loads, self.proc.stdout)),
                                         daemon=True),
                        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True)]
        for reader in self.readers:
            reader.start()

    def lines(self, host, text, after=0.0, before=float("inf")):
        return [e for e in list(self.entries)
                if e["host"] == host and text in e["message"] and after * 1e6 < e["usec"] < before * 1e6]

    def details(self):
        return "".join(self.err) + f"{len(self.entries)} lines, the last: {self.entries[-5:]}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)
        for reader in self.readers:
            reader.join(5)
        return "".join(self.err)


def test_reset_scale_and_doctor_over_the_fleet(lab):
    for host in WORKERS:
        lab.run(host, "systemctl stop atom-worker@2.service")
    code, data, _ = lab.fleet("doctor")
    assert code == 3 and not data["healthy"]
    for host in WORKERS:
        assert "instance_down" in {f["code"] for f in data["hosts"][host]["findings"]}, data["hosts"][host]
    code, data, proc = lab.fleet("reset")
    assert code == 0, proc.stderr
    for host in WORKERS:
        assert [a["unit"] for a in data["hosts"][host]["actions"]] == ["atom-worker@2.service"]
        assert data["hosts"][host]["wait"]["registered"] == ["atom-worker@2.service"]
    assert lab.all_registered()
    code, data, _ = lab.fleet("doctor")
    assert code == 0 and data["healthy"], data
    # scale: every host at once.
    code, data, proc = lab.fleet("scale", "3")
    assert code == 0, proc.stderr
    assert all(data["hosts"][h]["to"] == 3 for h in WORKERS)
    status = lab.status()
    assert all(status[f][2] == 6 for f in lab.functions()), status
    code, data, _ = lab.fleet("scale", "2")
    assert code == 0
    wait_until(lab.all_registered, 30, 0.5, "2 instances a host again")


def test_logs_follow_merged_from_every_host(lab):
    # -n 1: each host's follower prints its last line first, so the test knows both are following before it
    # makes new lines (a fixed sleep was not enough on a loaded machine: the restart's systemd lines came
    # before one follower had started).
    proc = subprocess.Popen([*CTL, "-i", lab.inventory, "logs", "-f", "-n", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=lab.env)
    lines, following, seen = [], threading.Event(), threading.Event()
    mark = []  # the index of the first line after both followers started

    def read():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if all(any(f" {h}/" in ln for ln in lines) for h in WORKERS):
                following.set()
            new = lines[mark[0]:] if mark else []
            if all(any(f" {h}/atom-worker@1: " in ln and "Running worker" in ln for ln in new) for h in WORKERS):
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert following.wait(60), lines
        mark.append(len(lines))
        for host in WORKERS:
            lab.run(host, "systemctl restart atom-worker@1.service")
        assert seen.wait(60), lines
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    # systemd's own lines are tagged too; each host's lines in time order.
    assert any(f" {W1}/atom-worker@1 [systemd]: " in ln for ln in lines[mark[0]:]), lines
    for host in WORKERS:
        stamps = [ln[:19] for ln in lines if f" {host}/" in ln]
        assert stamps and stamps == sorted(stamps), lines
    # Without -f: the last lines of every host, merged, as JSON with the host.
    proc = lab.ctl("-i", lab.inventory, "logs", "-n", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    entries = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert {e["host"] for e in entries} == set(WORKERS)
    assert [e["usec"] for e in entries] == sorted(e["usec"] for e in entries)
    wait_until(lab.all_registered, 60, 0.5, "the restarted workers to register")
