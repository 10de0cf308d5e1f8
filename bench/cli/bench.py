#!/usr/bin/env python3
"""Benchmark: `atom-workerctl status --json` against systemctl, on a lab host with real units.

Run from the repository root, inside the lab network:
    tools/lab/lab exec -- .venv/bin/python bench/cli/bench.py [--rounds 15] [--keep]

It boots lab host c-bench (gearmand + the AtoM stand-in + the atom_worker role's units, converged with
site.yml), installs atom-workerctl with the atom_workerctl role, then times inside the host, for 16 and
then 64 instances, each of these (rounds interleaved, so drift hits every method alike):
  A  atom-workerctl status --json            (systemd over D-Bus + gearmand + /proc)
  A' atom-workerctl status --json --no-gearman
  B  for i in 1..N: systemctl show atom-worker@$i.service   (a shell loop: N processes)
  C  systemctl show atom-worker@1.service ... @N.service     (one process naming all N)
  D  systemctl list-units 'atom-worker@*'
  M  atom-workerctl metrics                   (the same snapshot as status, in Prometheus' format)
  M' atom-workerctl metrics --output FILE     (as the role's timer runs it: written atomically)
  F  the floor under A: the CLI's Python alone; with the systemd backend's D-Bus connection open; and with
     the backend reading every instance (nothing else); and, for comparison, pystemd's connection opened
     too (what the backend used for reading before issue 18; commands that act still open it)
Writes bench/cli/results.json and bench/cli/results.md (median and min wall time, ratios to A, and the
cost per extra instance (T64 - T16) / 48).
"""

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from labhosts import VENV_BIN, LabHosts  # noqa: E402

HOST = "c-bench"
INVENTORY = {"all": {"children": {
    "gearman_job_servers": {"hosts": {HOST: None}},
    "atom_workers": {"hosts": {HOST: {"atom_worker_instances": 16}}},
}}}

# Runs inside the host: times each command with perf_counter around subprocess.run.
TIMER = r'''
import json, subprocess, sys, time
n, rounds = int(sys.argv[1]), int(sys.argv[2])
PY = "/opt/atom-workerctl/bin/python3"  # the atom_workerctl role's venv: the CLI's own interpreter
units = " ".join(f"atom-worker@{i}.service" for i in range(1, n + 1))
methods = {
    "A": "atom-workerctl status --json > /dev/null",
    "A_no_gearman": "atom-workerctl status --json --no-gearman > /dev/null",
    "B": f"for i in $(seq 1 {n}); do systemctl show atom-worker@$i.service; done > /dev/null",
    "C": f"systemctl show {units} > /dev/null",
    "D": "systemctl list-units --no-pager 'atom-worker@*' > /dev/null",
    "M": "atom-workerctl metrics > /dev/null",
    "M_file": "atom-workerctl metrics --output /tmp/atom-worker.prom",
    # The floor under status: the CLI's interpreter alone, then with the systemd backend's D-Bus connection
    # open, then with the backend reading every instance (its D-Bus round trips; no config, gearmand, output).
    "F_python": f"{PY} -c pass",
    "F_connect": f"{PY} -c 'from atom_workerctl.systemd import SystemdBackend; SystemdBackend()'",
    "F_read": f"{PY} -c 'from atom_workerctl.systemd import SystemdBackend; "
              f"SystemdBackend().units([], \"atom-worker*@*.service\")'",
    # For comparison: pystemd's connection opened as well (its import is most of it).
    "F_pystemd": f"{PY} -c 'from atom_workerctl.systemd import SystemdBackend; SystemdBackend().bus'",
}
for cmd in methods.values():                      # warm up caches once
    subprocess.run(["sh", "-c", cmd], check=True)
times = {k: [] for k in methods}
for _ in range(rounds):
    for key, cmd in methods.items():
        t = time.perf_counter()
        subprocess.run(["sh", "-c", cmd], check=True)
        times[key].append(time.perf_counter() - t)
print(json.dumps(times))
'''

NAMES = {
    "A": "`atom-workerctl status --json`",
    "A_no_gearman": "`atom-workerctl status --json --no-gearman`",
    "B": "shell loop of `systemctl show` (one per instance)",
    "C": "one `systemctl show` naming every instance",
    "D": "`systemctl list-units 'atom-worker@*'`",
    "M": "`atom-workerctl metrics`",
    "M_file": "`atom-workerctl metrics --output FILE` (as the role's timer runs it)",
    "F_python": "floor: the CLI's Python starting and exiting (`python3 -c pass`)",
    "F_connect": "floor: ... with the systemd backend's D-Bus connection open (dbuswire)",
    "F_read": "floor: ... and the systemd backend reading every instance (its D-Bus round trips only)",
    "F_pystemd": "for comparison: the backend's connection and pystemd's (as commands that act open it)",
}


def median(values):
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--keep", action="store_true", help="leave the host running")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    subprocess.run([str(VENV_BIN / "pip"), "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(work / "wheel"), str(REPO)], check=True, capture_output=True)
    wheel = next((work / "wheel").glob("atom_workerctl-*.whl"))
    hosts = LabHosts(INVENTORY, work)
    hosts.down()
    hosts.up()
    try:
        for playbook, extra in (("playbooks/lab/site.yml", None),
                                ("tests/cli/install.yml", {"workerctl_wheel": str(wheel)})):
            result = hosts.playbook(playbook, extra_vars=extra)
            if result.returncode != 0:
                print(result, file=sys.stderr)
                return 1
        hosts.run(HOST, f"cat > /root/timer.py <<'EOF'\n{TIMER}\nEOF")
        machine = {
            "cpu": hosts.run(HOST, "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").stdout.strip(),
            "cores": int(hosts.run(HOST, "nproc").stdout),
            "systemd": hosts.run(HOST, "systemctl --version | head -1").stdout.strip(),
            "python": hosts.run(HOST, "python3 --version").stdout.strip(),
            "kernel": hosts.run(HOST, "uname -r").stdout.strip(),
        }
        results = {}
        for n in (16, 64):
            hosts.run(HOST, f"atom-workerctl scale {n}", timeout=600)
            status = json.loads(hosts.run(HOST, "atom-workerctl status --json").stdout)
            assert status["summary"]["active"] == n and status["summary"]["registered"] == n, status["summary"]
            out = hosts.run(HOST, f"python3 /root/timer.py {n} {args.rounds}", timeout=1800).stdout
            results[n] = {k: {"median_s": median(v), "min_s": min(v), "runs": v} for k, v in json.loads(out).items()}
        hosts.run(HOST, "atom-workerctl scale 16")
    finally:
        if not args.keep:
            hosts.down()
    write(results, machine, args.rounds)
    return 0


def write(results: dict, machine: dict, rounds: int) -> None:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    data = {"date": now, "machine": machine, "rounds": rounds, "results": {str(k): v for k, v in results.items()}}
    (REPO / "bench/cli/results.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        "# atom-workerctl status and metrics: benchmark results",
        "",
        (f"Recorded {now} by `bench/cli/bench.py` inside lab host {HOST} ({machine['cores']} cores of"
        f" {machine['cpu']}; {machine['systemd']}; {machine['python']}; kernel {machine['kernel']})."),
        (f"Wall time of each command, {rounds} interleaved rounds after one warm-up; median (min). Ratio: median"
        " over the median of `atom-workerctl status --json` (below 1: faster than atom-workerctl)."),
        "",
        "| command | 16 instances | ratio | 64 instances | ratio | per extra instance |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, name in NAMES.items():
        a16, a64 = results[16]["A"]["median_s"], results[64]["A"]["median_s"]
        r16, r64 = results[16][key], results[64][key]
        per = (r64["median_s"] - r16["median_s"]) / 48
        lines.append(f"| {name} | {r16['median_s'] * 1000:.1f} ms ({r16['min_s'] * 1000:.1f}) |"
                     f" {r16['median_s'] / a16:.2f} | {r64['median_s'] * 1000:.1f} ms ({r64['min_s'] * 1000:.1f}) |"
                     f" {r64['median_s'] / a64:.2f} | {per * 1000:.2f} ms |")
    a16, a64, c16, c64 = (results[n][k]["median_s"] for n, k in ((16, "A"), (64, "A"), (16, "C"), (64, "C")))
    f16 = results[16]["F_read"]["median_s"]
    lines += [
        "",
        "Issue 18's goals for status on one host, from the medians above:",
        "",
        (f"- `status --json` over one `systemctl show` of the same 16 units: **{a16 / c16:.2f}x** (goal 1.5x); "
        f"at 64 units {a64 / c64:.2f}x."),
        f"- cost per extra instance (16 to 64): **{(a64 - a16) / 48 * 1000:.2f} ms** (goal 1 ms).",
        (f"- the floor (the CLI's Python, the systemd backend's D-Bus connection and its reads of 16 units,"
        f" nothing else): {f16 * 1000:.1f} ms, {f16 / c16:.2f}x one `systemctl show`; what status costs above it"
        f" ({(a16 - f16) * 1000:.1f} ms) is argparse, the site's configuration, gearmand's view (asked in a thread"
        f" while systemd is read), /proc and the output."),
    ]
    lines += [
        "",
        ("`atom-workerctl status --json` does more than each systemctl command: per instance it reads state,"
        " result, restarts, start-limit policy, PID, memory and enablement over one D-Bus connection (all in"
        " two round trips: the unit listing, then every property of every unit in one batch), reads the"
        " site's config/gearman.yml and app.yml, asks gearmand `status` and `workers` in a thread meanwhile, and"
        " ties each worker to its line by the process its client id names (the stand-in, as AtoM's"
        " net_gearman, names it: so the host's TCP table is not read). The"
        " `--no-gearman` row is the systemd part alone. `metrics` reads the host"
        " through the same snapshot. The bench host's site has no database (no config/config.php), so AtoM's"
        " job table is not read here; where there is one, `--output` reads it at most every 300 s"
        " (`--jobs-every`). A site's parsed configuration is kept in /run/atom-workerctl (root only) under"
        " the files' identity, so these runs read it without PyYAML, as every run after the first does on a"
        " host whose configuration did not change."),
        "",
    ]
    (REPO / "bench/cli/results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
