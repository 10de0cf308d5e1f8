#!/usr/bin/env python3
"""Benchmark: fleet `status` and `reset` wall time for 1, 3 and 6 worker hosts, beside Ansible ad hoc.

Run from the repository root, inside the lab network:
    tools/lab/lab exec -- .venv/bin/python bench/fleet/run.py [--rounds 5] [--no-converge] [--keep]

Boots lab hosts fb-jobs (gearmand) and fb-w1..fb-w6 (2 instances each, atom-workerctl installed by
site.yml's atom_workerctl role), converges once, then for N = 1, 3, 6 (`--limit fb-w1..fb-wN`), rounds
interleaved so that drift hits every method alike, times from the control host:
  status          atom-workerctl -i INV -l HOSTS --json status
  ansible status  ansible -i INV HOSTS -m ansible.builtin.systemd_service -a name=atom-worker@1
  reset           atom-workerctl -i INV -l HOSTS --json reset     (atom-worker@1 stopped on each host
                  first, untimed: reset starts it and waits until gearmand lists it again)
  ansible start   ansible -i INV HOSTS -m ansible.builtin.systemd_service -a "name=atom-worker@1
                  state=started"   (the same stopped unit; Ansible does not wait for gearmand)
and one host's transport (bench/fleet/transport.py): ssh + the host's CLI vs pystemd's DBusRemote.
Writes bench/fleet/results.json and bench/fleet/results.md (medians, min, T(3)/T(1), T(6)/T(1)).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import lablib  # noqa: E402
import transport  # noqa: E402

PREFIX = "fb-"
SIZES = (1, 3, 6)
BIN = REPO / ".venv" / "bin"
ENV = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "NO_COLOR": "1", "ANSIBLE_NOCOLOR": "1"}


SLOWEST: dict = {}  # (n, key) -> [the slowest host's own seconds, per run], from atom-workerctl's JSON


def timed(argv, ok=(0,), record=None) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode not in ok:
        raise SystemExit(f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    if record is not None and "atom-workerctl" in argv[0]:
        # Whether more hosts cost more because each host took longer (shared CPU) or because they waited
        # for each other: the slowest host's own ssh round trip, as the fleet JSON reports it.
        SLOWEST.setdefault(record, []).append(max(h["seconds"] for h in json.loads(proc.stdout)["fleet"].values()))
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-converge", action="store_true", help="the fb- hosts are up and converged already")
    ap.add_argument("--keep", action="store_true", help="leave the hosts up")
    args = ap.parse_args()

    hosts, _ = lablib.boot(PREFIX, max(SIZES), Path("/tmp/fb-lab"), converge=not args.no_converge)
    inv = str(hosts.inventory)
    workers = [f"{PREFIX}w{i}" for i in range(1, max(SIZES) + 1)]

    def stop_unit(names):
        with ThreadPoolExecutor(len(names)) as pool:
            list(pool.map(lambda h: hosts.run(h, "systemctl stop atom-worker@1.service"), names))

    def methods(n):
        limit = ":".join(workers[:n])
        ctl = [str(BIN / "atom-workerctl"), "-i", inv, "-l", limit, "--json"]
        ans = [str(BIN / "ansible"), "-i", inv, limit, "-m", "ansible.builtin.systemd_service"]
        return {
            "status": (None, ctl + ["status"]),
            "ansible_status": (None, ans + ["-a", "name=atom-worker@1"]),
            "reset": (workers[:n], ctl + ["reset"]),
            "ansible_start": (workers[:n], ans + ["-a", "name=atom-worker@1 state=started"]),
        }

    times = {n: {k: [] for k in methods(n)} for n in SIZES}
    for n in SIZES:  # one warm-up of each (ssh, Python and Ansible caches)
        for prep, argv in methods(n).values():
            if prep:
                stop_unit(prep)
            timed(argv)
    for r in range(args.rounds):
        for n in SIZES:
            for key, (prep, argv) in methods(n).items():
                if prep:
                    stop_unit(prep)
                times[n][key].append(timed(argv, record=(n, key)))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    trans = transport.measure(inv, workers[0], max(5, args.rounds * 2))

    # Check that the fleet is whole after the runs (every reset ended registered).
    check = subprocess.run([str(BIN / "atom-workerctl"), "-i", inv, "--json", "status"], capture_output=True,
                           text=True, env=ENV, check=False)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr

    write(times, trans, args.rounds)
    if not args.keep:
        hosts.down()


def med(values):
    return statistics.median(values)


def write(times, trans, rounds) -> None:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    ansible = subprocess.run([str(BIN / "ansible"), "--version"], capture_output=True, text=True,
                             check=False).stdout.splitlines()[0]
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    raw = {"recorded": now, "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
           "ansible": ansible, "rounds": rounds, "times": {str(n): t for n, t in times.items()},
           "transport": trans, "slowest_host": {f"{n}:{k}": v for (n, k), v in SLOWEST.items()}}
    (HERE / "results.json").write_text(json.dumps(raw, indent=1) + "\n")
    labels = {
        "status": "`atom-workerctl -i INV -l HOSTS status --json`",
        "ansible_status": "`ansible -i INV HOSTS -m ansible.builtin.systemd_service -a name=atom-worker@1`",
        "reset": "`atom-workerctl -i INV -l HOSTS reset --json` (atom-worker@1 down on each host)",
        "ansible_start": "`ansible ... -m ansible.builtin.systemd_service -a 'name=atom-worker@1 state=started'` "
                         "(same)",
    }
    rows = []
    for key, label in labels.items():
        t = {n: med(times[n][key]) for n in times}
        mins = {n: min(times[n][key]) for n in times}
        rows.append(f"| {label} | " + " | ".join(f"{t[n]:.2f} s ({mins[n]:.2f})" for n in SIZES)
                    + f" | {t[3] / t[1]:.2f} | {t[6] / t[1]:.2f} |")
    for key in ("status", "reset"):
        t = {n: med(SLOWEST[(n, key)]) for n in SIZES}
        rows.append(f"| slowest host's own round trip within `{key}` (from its JSON) | "
                    + " | ".join(f"{t[n]:.2f} s" for n in SIZES) + f" | {t[3] / t[1]:.2f} | {t[6] / t[1]:.2f} |")
    tr = {k: (statistics.median(v), min(v)) for k, v in trans.items()}
    lines = [
        "# Fleet commands: benchmark results",
        "",
        (f"Recorded {now} by `bench/fleet/run.py` on the control host of the lab ({cpu}, {os.cpu_count()} cores; "
        f"Python {platform.python_version()}; {ansible}), against lab hosts fb-w1..fb-w6 (Debian 12, systemd, "
        "2 atom-worker instances each) and job server fb-jobs. Other work shared the 2 cores during the run."),
        (f"Wall time of each command from the control host, {rounds} interleaved rounds after one warm-up; "
        "median (min). Hosts are chosen with `--limit` (atom-workerctl) and the same pattern (Ansible) on the "
        "same inventory, in the same run. The ratios T(3)/T(1) and T(6)/T(1) are of the medians: 1.0 means "
        "six hosts cost what one does."),
        "",
        "| command | 1 host | 3 hosts | 6 hosts | T(3)/T(1) | T(6)/T(1) |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        ("What each does: `status` asks each host's own `atom-workerctl status --json` over ssh (systemd over "
        "D-Bus, gearmand's view, registration from /proc), at most `--parallel` (10) hosts at a time, then "
        "asks gearmand once for `status` and `workers` and merges; Ansible's module only reads the unit's "
        "properties. `reset` starts the stopped instance and waits until gearmand lists it again; Ansible's "
        "`state=started` returns as soon as systemd has started it. Ansible runs with this repository's "
        "ansible.cfg (forks 10, pipelining, ssh ControlPersist 60 s: it reuses its ssh connections between "
        "runs); atom-workerctl opens one new ssh connection per host and command. The last two rows "
        "are each host's own time inside the fleet command (ssh, the host's CLI, its waits): where they "
        "grow with the number of hosts, the hosts were slower, not queued behind each other (`--parallel` "
        "10 > 6). The lab's hosts share the control host's 2 cores: six hosts starting PHP workers and "
        "running their CLI at once compete for them, which separate machines would not."),
        "",
        f"## One host, one round trip: ssh + the host's CLI vs pystemd's DBusRemote ({len(trans['ssh_cli'])} rounds)",
        "",
        "| how | median | min |",
        "| --- | --- | --- |",
        (f"| `ssh HOST atom-workerctl --json status` (everything `status` shows) | {tr['ssh_cli'][0] * 1000:.0f} ms "
        f"| {tr['ssh_cli'][1] * 1000:.0f} ms |"),
        (f"| pystemd `DBusRemote` (ssh + systemd-stdio-bridge), the CLI's SystemdBackend reading every "
        f"atom-worker unit (systemd's view only) | {tr['dbus_remote'][0] * 1000:.0f} ms | "
        f"{tr['dbus_remote'][1] * 1000:.0f} ms |"),
        (f"| `ssh HOST true` (one ssh connection, the floor) | {tr['ssh_true'][0] * 1000:.0f} ms | "
        f"{tr['ssh_true'][1] * 1000:.0f} ms |"),
        "",
        ("Both ways pay one ssh connection, which is most of the cost. DBusRemote gives systemd's properties "
        "only: whether a worker is registered needs the host's /proc (its TCP connections to gearmand) and "
        "its sites.json and config/gearman.yml, and `reset`/`restart` wait on the host for registration. "
        "Running the host's own CLI gets all of it in the one round trip, with the same code and the same "
        "JSON as on the host; so fleet commands use ssh + the host's CLI."),
        "",
    ]
    (HERE / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
