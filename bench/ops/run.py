"""Operations benchmark on a 3-host lab (b-gm: gearmand; b-w1, b-w2: 2 workers each), measured side by side.

Run inside the lab network from the repository (writes bench/ops/results.md and results.json):
    tools/lab/lab exec -- .venv/bin/python bench/ops/run.py

  converge  `site.yml` first converge (everything installed: packages, units, the CLI's venv with pystemd
            built on each worker host) and the no-change re-run, against `ansible all -m ping` on the
            same hosts (the floor: an ssh round trip per host and a Python module run).
  recovery  `kill -9` of a worker's main process -> systemd has started it again -> gearmand lists its
            connection again, measured on the worker host itself (50 ms polling), with the role's
            default RestartSec=30: what matters is how much it adds to RestartSec.
  rolling   `playbooks/rolling-restart.yml` over the fleet: total time, and the fewest available workers
            gearmand's `status` showed for any function (sampled every 100 ms on the job server).
  fleet     the same converge figures on 7 hosts (a job server and 6 worker hosts with 2 instances each), booted
            after the 3-host lab is down: ping, first converge, no-change re-runs with their phases.
"""
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from labhosts import VENV_BIN, LabHosts, in_lab_network  # noqa: E402

GM, W1, W2 = "b-gm", "b-w1", "b-w2"
INVENTORY = {"all": {"children": {
    "gearman_job_servers": {"hosts": {GM: {"gearman_job_server_listen_address": "{{ ansible_host }}"}}},
    "atom_workers": {"hosts": {W1: None, W2: None}, "vars": {"atom_worker_instances": 2}},
}}}
FLEET_WORKERS = [f"b-f{n}" for n in range(1, 7)]
FLEET_INVENTORY = {"all": {"children": {
    "gearman_job_servers": {"hosts": {"b-fgm": {"gearman_job_server_listen_address": "{{ ansible_host }}"}}},
    "atom_workers": {"hosts": dict.fromkeys(FLEET_WORKERS), "vars": {"atom_worker_instances": 2}},
}}}
PING_ROUNDS, RERUN_ROUNDS, RECOVERY_ROUNDS, ROLLING_ROUNDS = 5, 3, 3, 2
OUT = Path(__file__).resolve().parent

# Runs on the worker host: kill -9 the unit's main PID, then time the new main PID and the registration
# (gearmand's admin `workers` lists the host's connections again). Each round first resets the unit's start
# limit as `atom-workerctl reset` would: the rounds are deliberate kills, and three of them in a row would
# otherwise spend the 3-starts budget (the converge's start counts too), so the last restart is refused.
RECOVERY = r'''
import json, os, signal, socket, subprocess, sys, time
unit, server, address, instances = sys.argv[1], (sys.argv[2], 4730), sys.argv[3], int(sys.argv[4])
def show(*props):
    out = subprocess.run(["systemctl", "show", unit] + ["-p" + p for p in props], capture_output=True,
                         text=True).stdout
    return dict(l.split("=", 1) for l in out.splitlines() if "=" in l)
def workers():
    s = socket.create_connection(server, timeout=3); s.sendall(b"workers\n"); buf = b""
    while not buf.endswith(b"\n.\n"): buf += s.recv(65536)
    s.close()
    return buf.decode().splitlines()[:-1]
restart_sec = int(show("RestartUSec")["RestartUSec"].rstrip("s"))
subprocess.run(["systemctl", "reset-failed", unit], check=True)
old = show("MainPID")["MainPID"]
t0 = time.monotonic(); os.kill(int(old), signal.SIGKILL)
def give_up(what):
    if time.monotonic() - t0 > restart_sec + 60:
        sys.exit(f"{what} within RestartSec + 60 s: {show('ActiveState', 'SubState', 'NRestarts', 'Result')}")
while True:
    p = show("MainPID", "ActiveState")
    if p["MainPID"] not in ("0", old) and p["ActiveState"] == "active":
        t_start = time.monotonic(); new = p["MainPID"]; break
    give_up("not started again")
    time.sleep(0.05)
# By now the killed process's connection is gone (RestartSec later): registered again when gearmand lists
# as many connections with functions from this host's address as the host has instances.
while True:
    ours = [l for l in workers() if " : " in l and l.split()[1] == address and l.split(" : ", 1)[1].strip()]
    if len(ours) >= instances:
        t_reg = time.monotonic(); break
    give_up("not registered again")
    time.sleep(0.05)
print(json.dumps({"restart_sec": restart_sec, "started": t_start - t0, "registered": t_reg - t0}))
'''

# Runs on the job server: gearmand `status` every 100 ms until a stop file appears; fewest available per function.
SAMPLER = r'''
import json, os, socket, sys, time
low, n = {}, 0
s = socket.create_connection((sys.argv[2], 4730), timeout=3)
while not os.path.exists(sys.argv[1]):
    s.sendall(b"status\n"); buf = b""
    while not buf.endswith(b"\n.\n"): buf += s.recv(65536)
    for l in buf.decode().splitlines()[:-1]:
        f, t, r, a = l.split("\t"); low[f] = min(low.get(f, 99), int(a))
    n += 1; time.sleep(0.1)
print(json.dumps({"samples": n, "low": low}))
'''


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def ansible_ping(hosts):
    proc = subprocess.run([str(VENV_BIN / "ansible"), "-i", str(hosts.inventory), "all", "-m", "ping"],
                          capture_output=True, text=True, cwd=REPO, check=False,
                          env={**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("SUCCESS") == len(hosts.names), proc.stdout


def converge(hosts, expect_changed=None):
    result = hosts.playbook("playbooks/lab/site.yml", with_cli=True)
    assert result.returncode == 0, result
    if expect_changed is not None:
        assert (result.changed() == 0) == (expect_changed == 0), result
    return result.changed()


# Tasks that run only on the control host (they cost no round trip to the lab hosts).
LOCAL_ACTIONS = {"ansible.builtin.assert", "ansible.builtin.fail", "ansible.builtin.set_fact", "ansible.builtin.meta",
                 "ansible.builtin.include_tasks", "ansible.builtin.include_role", "ansible.builtin.group_by",
                 "ansible.builtin.validate_argument_spec", "ansible.builtin.debug"}


def timed_rerun(hosts, work, n):
    """A no-change converge with per-task timing (bench/ops/callback_plugins): its time and its phases."""
    path = work / f"timing-{n}.jsonl"
    path.unlink(missing_ok=True)
    env = {"ANSIBLE_CALLBACK_PLUGINS": str(OUT / "callback_plugins"), "ANSIBLE_CALLBACKS_ENABLED": "task_timing",
           "ATOM_TASK_TIMING": str(path)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        seconds, _ = timed(lambda: converge(hosts, expect_changed=0))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    phases = {}
    for row in rows:
        phase = phases.setdefault(row["role"] or "play (facts, registration wait)",
                                  {"seconds": 0.0, "tasks": 0, "remote_tasks": 0})
        phase["seconds"] += row["seconds"]
        phase["tasks"] += 1
        # A skipped task takes a few ms; a remote one at least one round trip.
        phase["remote_tasks"] += row["action"] not in LOCAL_ACTIONS and row["seconds"] > 0.2
    return seconds, phases


def converge_figures(hosts, work):
    """Ping rounds, the first converge and timed no-change re-runs on booted hosts, side by side."""
    ansible_ping(hosts)   # opens the ssh control connections, as a converge's first task would
    ping = [timed(lambda: ansible_ping(hosts))[0] for _ in range(PING_ROUNDS)]
    first, changed = timed(lambda: converge(hosts))
    timed_reruns = [timed_rerun(hosts, work, n) for n in range(RERUN_ROUNDS)]
    ping += [timed(lambda: ansible_ping(hosts))[0] for _ in range(PING_ROUNDS)]
    # The phases of the median re-run.
    phases = sorted(timed_reruns, key=lambda r: r[0])[len(timed_reruns) // 2][1]
    return {"ping": ping, "first": first, "first_changed": changed, "rerun": [s for s, _ in timed_reruns],
            "rerun_phases": phases}


def fleet_figures(work):
    fleet = LabHosts(FLEET_INVENTORY, work / "fleet")
    fleet.down()
    fleet.up()
    try:
        return {"hosts": len(fleet.names), **converge_figures(fleet, work / "fleet")}
    finally:
        if not os.environ.get("ATOM_KEEP_LAB"):
            fleet.down()


def main() -> int:
    if not in_lab_network():
        print("run inside the lab network: tools/lab/lab exec -- .venv/bin/python bench/ops/run.py", file=sys.stderr)
        return 2
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "bench-ops"
    work.mkdir(parents=True, exist_ok=True)
    hosts = LabHosts(INVENTORY, work)
    hosts.down()
    hosts.up()
    data = {}
    try:
        data["converge"] = converge_figures(hosts, work)
        print("converge:", json.dumps(data["converge"]), flush=True)

        gm_address, w1_address = hosts.address(GM), hosts.address(W1)
        hosts.run(W1, f"cat > /root/recovery.py <<'EOF'\n{RECOVERY}EOF")
        recovery = []
        for _ in range(RECOVERY_ROUNDS):
            out = hosts.run(W1, f"python3 /root/recovery.py atom-worker@1.service {gm_address} {w1_address} 2",
                            timeout=300)
            recovery.append(json.loads(out.stdout))
        data["recovery"] = recovery
        print("recovery:", json.dumps(recovery), flush=True)

        hosts.run(GM, f"cat > /root/sampler.py <<'EOF'\n{SAMPLER}EOF")
        rolling = []
        for _ in range(ROLLING_ROUNDS):
            hosts.run(GM, "rm -f /root/stop")
            sampler = subprocess.Popen([str(REPO / "tools/lab/lab"), "run", GM, "--", "python3", "/root/sampler.py",
                                        "/root/stop", gm_address], stdout=subprocess.PIPE, text=True)
            time.sleep(1)
            seconds, result = timed(lambda: hosts.playbook("playbooks/rolling-restart.yml"))
            assert result.returncode == 0, result
            time.sleep(0.5)
            hosts.run(GM, "touch /root/stop")
            sample = json.loads(sampler.communicate(timeout=60)[0])
            rolling.append({"seconds": seconds, "samples": sample["samples"],
                            "min_available": min(sample["low"].values()), "functions": len(sample["low"])})
        data["rolling"] = rolling
        print("rolling:", json.dumps(rolling), flush=True)
    finally:
        if not os.environ.get("ATOM_KEEP_LAB"):
            hosts.down()
    (work / "fleet").mkdir(exist_ok=True)
    data["fleet"] = fleet_figures(work)
    print("fleet:", json.dumps(data["fleet"]), flush=True)
    write(data)
    return 0


def write(data):
    med = statistics.median
    conv, rec, roll = data["converge"], data["recovery"], data["rolling"]
    ping = med(conv["ping"])
    first, rerun = conv["first"], med(conv["rerun"])
    restart_sec = rec[0]["restart_sec"]
    started, registered = med(r["started"] for r in rec), med(r["registered"] for r in rec)
    roll_s = med(r["seconds"] for r in roll)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0]
    phases = conv.get("rerun_phases", {})
    fl = data["fleet"]
    fping, frerun = med(fl["ping"]), med(fl["rerun"])
    lines = [
        "# Operations benchmark",
        "",
        (f"Recorded {now} by `bench/ops/run.py` on {platform.node()} ({os.cpu_count()} cores of {cpu}; "
        f"kernel {platform.release()}; load average {load:.1f} at the end). "
        "Lab of 3 hosts: `b-gm` (gearmand on its lab address, allowlist on), `b-w1` and `b-w2` (2 workers of "
        "the AtoM stand-in each). All figures from one run, measured side by side."),
        "",
        "| what | time | ratio |",
        "| --- | --- | --- |",
        (f"| `ansible all -m ping` (3 hosts, median of {len(conv['ping'])}; min {min(conv['ping']):.1f} s) | "
        f"{ping:.1f} s | 1.0 |"),
        (f"| `site.yml` first converge (packages, units, the CLI's venv on each worker host, with Debian's pystemd; "
        f"changed={conv['first_changed']}) | {first:.1f} s | {first / ping:.1f} × ping |"),
        (f"| `site.yml` no-change re-run (changed=0, median of {len(conv['rerun'])}; min {min(conv['rerun']):.1f} s) | "
        f"{rerun:.1f} s | {rerun / ping:.1f} × ping |"),
        (f"| recovery: `kill -9` → systemd started the worker again (RestartSec={restart_sec}, median of {len(rec)}) | "
        f"{started:.1f} s | RestartSec + {started - restart_sec:.2f} s |"),
        (f"| recovery: `kill -9` → registered with gearmand again | {registered:.1f} s | "
        f"RestartSec + {registered - restart_sec:.2f} s |"),
        (f"| `playbooks/rolling-restart.yml`, 2 hosts × 2 workers (median of {len(roll)}) | {roll_s:.1f} s | "
        f"{roll_s / ping:.1f} × ping |"),
        (f"| fewest available workers of any function during the rolling restarts "
        f"({sum(r['samples'] for r in roll)} samples of gearmand `status`, every 100 ms) | "
        f"{min(r['min_available'] for r in roll)} (of 4) | |"),
        (f"| fleet of {fl['hosts']} hosts (a job server, {fl['hosts'] - 1} worker hosts × 2): `ansible all -m ping` "
         f"(median of {len(fl['ping'])}) | {fping:.1f} s | 1.0 |"),
        (f"| fleet: `site.yml` first converge (changed={fl['first_changed']}) | {fl['first']:.1f} s | "
         f"{fl['first'] / fping:.1f} × ping |"),
        (f"| fleet: `site.yml` no-change re-run (changed=0, median of {len(fl['rerun'])}; "
         f"min {min(fl['rerun']):.1f} s) | {frerun:.1f} s | {frerun / fping:.1f} × ping |"),
        "",
        ("Where the no-change re-run's time goes (its median run, per-task wall time from "
        "`bench/ops/callback_plugins/task_timing.py`; a remote task is one that made at least one round trip "
        "to the hosts, the others run on the control host or were skipped):"),
        "",
        "| phase | time | tasks | remote tasks |",
        "| --- | --- | --- | --- |",
        *(f"| {name} | {p['seconds']:.1f} s | {p['tasks']} | {p['remote_tasks']} |" for name, p in phases.items()),
        "",
        f"The same on the fleet of {fl['hosts']} hosts (its median no-change re-run):",
        "",
        "| phase | time | tasks | remote tasks |",
        "| --- | --- | --- | --- |",
        *(f"| {name} | {p['seconds']:.1f} s | {p['tasks']} | {p['remote_tasks']} |"
          for name, p in fl["rerun_phases"].items()),
        "",
        "Raw figures (seconds) are in `results.json`.",
        "",
    ]
    (OUT / "results.md").write_text("\n".join(lines))
    (OUT / "results.json").write_text(json.dumps({"recorded": now, "host": platform.node(), **data}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
