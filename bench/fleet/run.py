#!/usr/bin/env python3
"""Benchmark: fleet commands over 1..24 worker hosts, side by side with Ansible, in one run.

Run from the repository root, inside the lab network (`make wheel` first: site.yml installs the CLI from it):
    tools/lab/lab exec -- .venv/bin/python bench/fleet/run.py [--sizes 1,6,12,24] [--workers 24] [--rounds 3]
        [--forks 10] [--batch 6] [--serial 1,6] [--no-converge] [--keep]
Quick check (4 hosts, a few minutes): --sizes 1,2 --workers 2 --rounds 1

Boots lab hosts fb-jobs (gearmand), fb-web (a web node: site.yml's atom_web play) and fb-w1..fb-wW (2 atom-worker
instances each, atom-workerctl installed by site.yml's atom_workerctl role), converges once, records what each
idle host costs in memory (bench/fleet/memory.py), then for N in --sizes (`--limit fb-w1..fb-wN`), rounds
interleaved so that drift hits every method alike, times from the control host:
  status            atom-workerctl -i INV -l HOSTS --parallel F --json status
  status_fresh      the same with ATOM_WORKERCTL_SSH_ARGS="-o ControlPath=none": a new ssh connection to every
                    host, as atom-workerctl made before it kept them (ControlPersist 60 s, as Ansible does)
  status_client     the same with ATOM_WORKERCTL_SSH=/usr/bin/ssh: an ssh client started per host on the open
                    connections (the CLI asks an open master itself only when the program is the plain `ssh`)
  ansible_status    ansible -i INV HOSTS --forks F -m ansible.builtin.systemd_service -a name=atom-worker@1
  ansible_status_fresh  the same with ANSIBLE_SSH_ARGS="-o ControlMaster=no": a new ssh connection to every host
  (status, status_client and ansible_status each run once, untimed, right before their timed run: the
  connections they keep are then open, as for an operator's second command within a minute; the _fresh rows
  never keep one)
  reset             atom-workerctl ... --parallel F --json reset        (atom-worker@1 stopped on each host
                    first, untimed: reset starts it and waits until gearmand lists it again)
  ansible_start     ansible ... --forks F -a "name=atom-worker@1 state=started"   (the same; no wait for gearmand)
  rolling           atom-workerctl ... --parallel B --json restart --rolling   (B hosts at a time, each host's
                    instances one after another, each registered again before the next)
  restart_batch     atom-workerctl ... --parallel B --json restart   (B hosts at a time, each host's instances
                    together, each host waiting until gearmand lists them again)
  playbook_sK       ansible-playbook -i INV playbooks/rolling-restart.yml --limit HOSTS, for each K in --serial:
                    K = 1 is the playbook as shipped (serial: 1); another K runs a copy whose play says serial: K
                    (the playbook has no variable for it)
  ansible_restart   ansible ... --forks F -a "name=atom-worker@1 state=restarted", then the same for @2
Before each timed command (untimed): wait until gearmand lists every worker of the fleet, and for the Ansible
commands `systemctl reset-failed` of both units (their starts count against the units' start limit, 3 in 24 h,
and the bench starts them many times; the CLI and the playbook reset-failed themselves).
At the largest size, every restart is sampled: gearmand's `status` every 100 ms (tests/gearman_sampler.py),
with the tests' control first (one instance held stopped for a second: the probe must see every function one
below the full count), and the lowest count of available workers per function over the restart is kept.
Also one host's transport (bench/fleet/transport.py): ssh + the host's CLI vs pystemd's DBusRemote.
Writes bench/fleet/results.json (raw) and bench/fleet/results.md.
"""

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import cpuside  # noqa: E402
import lablib  # noqa: E402
import memory  # noqa: E402
import transport  # noqa: E402
from gearman_sampler import StatusSampler, admin, hold_stopped, parse_status  # noqa: E402 (tests/, via lablib)
from labhosts import LAB  # noqa: E402

PREFIX = "fb-"
WORKDIR = Path("/tmp/fb-lab")  # the generated inventory, the playbook copies, a failed command's output
BIN = REPO / ".venv" / "bin"
ENV = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "NO_COLOR": "1", "ANSIBLE_NOCOLOR": "1"}
PLAYBOOK = REPO / "playbooks" / "rolling-restart.yml"
CPU_KEYS = ("status", "status_client", "ansible_status")  # CPU by side (cpuside.py), each size
# run once untimed right before (the connections they keep stay open)
WARMED = ("status", "status_client", "ansible_status")
RESTARTS = ("rolling", "restart_batch", "playbook", "ansible_restart")  # sampled at the largest size

HOST_SECONDS: dict = {}  # "N:key" -> [[slowest host's own seconds, mean over hosts], per run] (atom-workerctl JSON)
CPU: dict = {}  # "N:key" -> [machine-wide CPU seconds used while the command ran, per run]


def csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def timed(argvs, key=None) -> float:
    """Run the command lines one after the other; their wall time together. A command line may come as
    (argv, environment variables to add)."""
    cpu0, started = cpuside.busy(), time.perf_counter()
    procs = []
    for entry in argvs:
        argv, extra = entry if isinstance(entry, tuple) else (entry, {})
        proc = subprocess.run(argv, capture_output=True, text=True, env={**ENV, **extra}, cwd=REPO, timeout=900,
                              check=False)
        if proc.returncode != 0:
            # The whole answer, for the reason (a fleet's JSON is longer than a terminal's scrollback).
            kept = WORKDIR / f"failed-{time.time_ns()}.out"
            try:
                kept.write_text(f"{' '.join(argv)}\nexit {proc.returncode}\n{proc.stdout}\n--- stderr\n{proc.stderr}")
            except OSError as exc:
                kept = f"not kept: {exc}"
            raise SystemExit(f"{' '.join(argv)}: exit {proc.returncode} (all of it: {kept})\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-2000:]}")
        procs.append((argv, proc))
    elapsed = time.perf_counter() - started
    if key is not None:
        CPU.setdefault(key, []).append(round(cpuside.busy() - cpu0, 3))
        for argv, proc in procs:
            if "atom-workerctl" in argv[0]:
                # Whether more hosts cost more because each host took longer (shared CPU) or because they
                # waited for each other: each host's own ssh round trip, as the fleet JSON reports it.
                own = [h["seconds"] for h in json.loads(proc.stdout)["fleet"].values()]
                HOST_SECONDS.setdefault(key, []).append([round(max(own), 3), round(statistics.mean(own), 3)])
    return elapsed


def batched_playbook(serial: int, workdir: Path) -> Path:
    """playbooks/rolling-restart.yml with its play's `serial: 1` replaced by `serial: K` (the playbook has no
    variable for it), its task files included from playbooks/tasks/ by absolute path."""
    text = PLAYBOOK.read_text()
    new, count = re.subn(r"^  serial: 1$", f"  serial: {serial}", text, flags=re.M)
    new, tasks = re.subn(r"(include_tasks: )tasks/", rf"\g<1>{PLAYBOOK.parent}/tasks/", new)
    if count != 1 or tasks < 3:
        raise SystemExit(f"{PLAYBOOK}: no single `serial: 1` play or no tasks/ includes to rewrite")
    path = workdir / f"rolling-restart-serial{serial}.yml"
    path.write_text(f"# Generated by bench/fleet/run.py from {PLAYBOOK.relative_to(REPO)}: serial {serial}.\n" + new)
    return path


class Fleet:
    def __init__(self, hosts, workers: int):
        self.hosts = hosts
        self.inv = str(hosts.inventory)
        self.workers = [f"{PREFIX}w{i}" for i in range(1, workers + 1)]
        address = hosts.addresses()[f"{PREFIX}jobs"]
        self.gearmand = (address, 4730)
        self.full_count = lablib.INSTANCES * workers
        self.functions: list[str] = []

    def on_hosts(self, names, command):
        with ThreadPoolExecutor(min(len(names), 12)) as pool:
            list(pool.map(lambda h: self.hosts.run(h, command), names))

    def status(self) -> dict:
        return parse_status(admin(self.gearmand, "status"))

    def settle(self, timeout=180.0) -> None:
        """Until gearmand lists every worker of the fleet for every function (AtoM's: `<md5>-<job>`)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            funcs = sorted(f for f in status if f.count("-") == 1 and len(f.split("-")[0]) == 32)
            if funcs and all(status[f][2] == self.full_count for f in funcs):
                if not self.functions:
                    self.functions = funcs
                if set(funcs) == set(self.functions):
                    return
            if time.monotonic() > deadline:
                raise SystemExit(f"gearmand does not list {self.full_count} workers for every function after "
                                 f"{timeout:.0f} s: {status}")
            time.sleep(0.2)


def methods(fleet: Fleet, n: int, args, playbooks: dict) -> dict:
    """key -> (hosts to prepare, prep command, [argv, ...])."""
    names = fleet.workers[:n]
    limit = ":".join(names)
    ctl = [str(BIN / "atom-workerctl"), "-i", fleet.inv, "-l", limit]
    ans = [str(BIN / "ansible"), "-i", fleet.inv, limit, "--forks", str(args.forks), "-m",
           "ansible.builtin.systemd_service"]
    reset_failed = "systemctl reset-failed atom-worker@1.service atom-worker@2.service"
    out = {
        "status": (None, None, [ctl + ["--parallel", str(args.forks), "--json", "status"]]),
        "status_fresh": (None, None, [(ctl + ["--parallel", str(args.forks), "--json", "status"],
                                       {"ATOM_WORKERCTL_SSH_ARGS": "-o ControlPath=none"})]),
        "status_client": (None, None, [(ctl + ["--parallel", str(args.forks), "--json", "status"],
                                        {"ATOM_WORKERCTL_SSH": "/usr/bin/ssh"})]),
        "ansible_status": (None, None, [ans + ["-a", "name=atom-worker@1"]]),
        "ansible_status_fresh": (None, None, [(ans + ["-a", "name=atom-worker@1"],
                                               {"ANSIBLE_SSH_ARGS": "-o ControlMaster=no"})]),
        "reset": (names, "systemctl stop atom-worker@1.service",
                  [ctl + ["--parallel", str(args.forks), "--json", "reset"]]),
        "ansible_start": (names, f"{reset_failed}; systemctl stop atom-worker@1.service",
                          [ans + ["-a", "name=atom-worker@1 state=started"]]),
        "rolling": (None, None, [ctl + ["--parallel", str(args.batch), "--json", "restart", "--rolling"]]),
        "restart_batch": (None, None, [ctl + ["--parallel", str(args.batch), "--json", "restart"]]),
    }
    # One worker host has no other host to keep its functions served: the playbook's check says no then.
    alone = ["-e", "atom_worker_rolling_require_coverage=false"] if len(fleet.workers) == 1 else []
    for k, path in playbooks.items():
        out[f"playbook_s{k}"] = (None, None, [[str(BIN / "ansible-playbook"), "-i", fleet.inv, str(path),
                                               "--limit", limit, *alone]])
    out["ansible_restart"] = (names, reset_failed, [ans + ["-a", f"name=atom-worker@{i} state=restarted"]
                                                    for i in (1, 2)])
    return out


def sampled(fleet: Fleet, prepare, run) -> dict:
    """`prepare()`, then `run()` under the 100 ms sampler, with the control first; what the samples say."""
    held_host = fleet.workers[0]

    def start_held():
        fleet.hosts.run(held_host, "systemctl reset-failed atom-worker@2.service; "
                                   "systemctl start atom-worker@2.service")
        fleet.settle()

    sampler = StatusSampler(fleet.gearmand, interval=0.1)
    sampler.start()
    try:
        held = hold_stopped(lambda: fleet.hosts.run(held_host, "systemctl stop atom-worker@2.service"), start_held)
        prepare()
        began = time.monotonic()
        seconds = run()
        ended = time.monotonic()
        time.sleep(0.5)  # samples after the restart, too
    finally:
        sampler.stop()
    funcs = fleet.functions
    try:
        control = sampler.minimum(funcs, between=held)
    except AssertionError:  # no sample while the instance was held stopped
        control = {}
    window = [s for t, s in sampler.samples if began < t < ended]
    before = sum(1 for t, _ in sampler.samples if t < began)
    after = sum(1 for t, _ in sampler.samples if t > ended)
    lowest = sampler.minimum(funcs, between=(began, ended)) if window else {}
    per_sample = [min(s.get(f, (0, 0, 0))[2] for f in funcs) for s in window]
    return {
        "seconds": seconds, "full": fleet.full_count, "samples": len(window), "errors": sampler.errors[:5],
        "window_ok": bool(before and after and window),
        "control_expected": fleet.full_count - 1, "control_seen": sorted(set(control.values())),
        "control_ok": bool(control) and all(v == fleet.full_count - 1 for v in control.values()),
        "lowest": min(lowest.values()) if lowest else None,
        "lowest_by_function": lowest,
        "highest_sample_minimum": max(per_sample) if per_sample else None,
        "samples_with_a_function_unserved": sum(1 for m in per_sample if m == 0),
        "served_every_sample": bool(per_sample) and min(per_sample) >= 1,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=csv_ints, default=[1, 6, 12, 24], help="worker hosts per step (default 1,6,12,24)")
    ap.add_argument("--workers", type=int, default=None, help="worker hosts to boot (default: the largest size)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--forks", type=int, default=10, help="atom-workerctl --parallel and ansible --forks for "
                    "status, reset, start and the ad hoc restart (both tools' default: 10)")
    ap.add_argument("--batch", type=int, default=6, help="atom-workerctl --parallel for restart [--rolling]")
    ap.add_argument("--serial", type=csv_ints, default=[1, 6], help="rolling-restart.yml's serial, each measured")
    ap.add_argument("--no-converge", action="store_true", help="the fb- hosts are up and converged already")
    ap.add_argument("--keep", action="store_true", help="leave the hosts up")
    args = ap.parse_args()
    sizes = sorted(set(args.sizes))
    workers = args.workers or max(sizes)
    if max(sizes) > workers or min(sizes) < 1:
        raise SystemExit(f"--sizes {sizes} must lie within 1..--workers {workers}")
    run_began = time.monotonic()
    workdir = WORKDIR
    others = other_lab_hosts()
    mem_before = memory.machine()
    already = all(h in running_lab_hosts() for h in [f"{PREFIX}jobs", f"{PREFIX}web", f"{PREFIX}w{workers}"])
    hosts, _ = lablib.boot(PREFIX, workers, workdir, converge=not args.no_converge)
    fleet = Fleet(hosts, workers)
    fleet.settle(timeout=300)
    boot_seconds = time.monotonic() - run_began
    time.sleep(5)  # idle: the converge's last tasks and the first registrations done
    mem = {"hosts": {}, "machine_before_boot": None if already else mem_before, "machine_after_converge": None}
    with ThreadPoolExecutor(4) as pool:
        mem["hosts"] = dict(zip(hosts.names, pool.map(lambda h: memory.host(LAB, h), hosts.names), strict=True))
    mem["machine_after_converge"] = memory.machine()
    print(f"booted and converged {len(hosts.names)} hosts in {boot_seconds:.0f} s; functions: {len(fleet.functions)}"
          f", {fleet.full_count} workers each", flush=True)

    playbooks = {k: (PLAYBOOK if k == 1 else batched_playbook(k, workdir)) for k in args.serial}
    plan = {n: methods(fleet, n, args, playbooks) for n in sizes}
    sample_keys = [k for k in plan[max(sizes)] if k.startswith(RESTARTS)]

    def prepare(n, key):
        names, prep, argvs = plan[n][key]
        fleet.settle()
        if prep:
            fleet.on_hosts(names, prep)
        if key in WARMED:
            timed(argvs)  # untimed: the ssh connections it keeps are the timed run's

    def one(n, key, record=True):
        prepare(n, key)
        return timed(plan[n][key][2], key=f"{n}:{key}" if record else None)

    # One warm-up of each command at the smallest size, and of the two status commands over every host (the
    # hosts' own caches: Python's bytecode, the CLI's parsed configuration in /run; Ansible's on this host).
    for key in plan[min(sizes)]:
        one(min(sizes), key, record=False)
    every = methods(fleet, workers, args, playbooks)
    for key in ("status", "ansible_status"):
        fleet.settle()
        timed(every[key][2])
    print(f"warm-up done ({time.monotonic() - run_began:.0f} s)", flush=True)

    times = {n: {k: [] for k in plan[n]} for n in sizes}
    sampling = {k: [] for k in sample_keys}
    for r in range(args.rounds):
        for n in sizes:
            for key in plan[n]:
                if n == max(sizes) and key in sample_keys:
                    s = sampled(fleet, lambda n=n, key=key: prepare(n, key),
                                lambda n=n, key=key: timed(plan[n][key][2], key=f"{n}:{key}"))
                    s["round"] = r + 1
                    sampling[key].append(s)
                    times[n][key].append(s["seconds"])
                else:
                    times[n][key].append(one(n, key))
        print(f"round {r + 1}/{args.rounds} done ({time.monotonic() - run_began:.0f} s)", flush=True)
    trans = transport.measure(fleet.inv, fleet.workers[0], max(5, args.rounds * 2))

    # Where the CPU of a status goes, by side (control host, hosts' logins, systemd, gearmand): each size.
    groups = {h: cpuside.host_group(h) for h in hosts.names}
    groups = {h: g for h, g in groups.items() if g is not None}
    where = {}
    if groups:
        for n in sizes:
            for key in CPU_KEYS:
                fleet.settle()
                entry = plan[n][key][2][0]
                argv, extra = entry if isinstance(entry, tuple) else (entry, {})
                where.setdefault(key, {})[str(n)] = cpuside.per_run(argv, {**ENV, **extra}, REPO, groups,
                                                                    f"{PREFIX}jobs", set(fleet.workers),
                                                                    max(5, args.rounds * 2))

    # The fleet is whole after the runs: every host answers, every instance is registered.
    fleet.settle()
    check = subprocess.run([str(BIN / "atom-workerctl"), "-i", fleet.inv, "--json", "status"], capture_output=True,
                           text=True, env=ENV, check=False)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr

    meta = {"sizes": sizes, "workers": workers, "rounds": args.rounds, "forks": args.forks, "batch": args.batch,
            "serial": args.serial, "boot_converge_seconds": round(boot_seconds, 1),
            "converged_here": not args.no_converge, "other_lab_hosts": others,
            "functions": len(fleet.functions), "workers_per_function": fleet.full_count,
            "run_seconds": round(time.monotonic() - run_began, 1)}
    write(times, sampling, mem, trans, where, meta)
    if not args.keep:
        hosts.down()


def running_lab_hosts() -> list[str]:
    out = subprocess.run([str(LAB), "status"], capture_output=True, text=True, check=False).stdout
    return [ln.split()[0] for ln in out.splitlines()[2:] if ln.split() and "running" in ln.split()[2:3]]


def other_lab_hosts() -> list[str]:
    return [h for h in running_lab_hosts() if not h.startswith(PREFIX)]


# -- results -------------------------------------------------------------------------------------------------
def med(values):
    return statistics.median(values) if values else float("nan")


def labels(meta) -> dict:
    f, b = meta["forks"], meta["batch"]
    out = {
        "status": f"`atom-workerctl -i INV -l HOSTS --parallel {f} --json status`",
        "status_fresh": ("the same, a new ssh connection to each host "
                         "(`ATOM_WORKERCTL_SSH_ARGS='-o ControlPath=none'`)"),
        "status_client": ("the same, an `ssh` client per host on the open connections "
                          "(`ATOM_WORKERCTL_SSH=/usr/bin/ssh`)"),
        "ansible_status": f"`ansible -i INV HOSTS --forks {f} -m ansible.builtin.systemd_service "
                          "-a name=atom-worker@1`",
        "ansible_status_fresh": ("the same, a new ssh connection to each host "
                                 "(`ANSIBLE_SSH_ARGS='-o ControlMaster=no'`)"),
        "reset": f"`atom-workerctl ... --parallel {f} --json reset` (atom-worker@1 down on each host)",
        "ansible_start": f"`ansible ... --forks {f} -m ansible.builtin.systemd_service -a 'name=atom-worker@1 "
                         "state=started'` (the same)",
        "rolling": f"`atom-workerctl ... --parallel {b} --json restart --rolling` ({b} hosts at a time, each "
                   "host's instances one after another)",
        "restart_batch": f"`atom-workerctl ... --parallel {b} --json restart` ({b} hosts at a time)",
    }
    for k in meta["serial"]:
        out[f"playbook_s{k}"] = ("`ansible-playbook -i INV playbooks/rolling-restart.yml --limit HOSTS` "
                                 + ("(as shipped: serial 1)" if k == 1 else f"(a copy with serial: {k})"))
    out["ansible_restart"] = (f"`ansible ... --forks {f} -m ansible.builtin.systemd_service -a "
                              "'name=atom-worker@1 state=restarted'`, then `@2`")
    return out


def kib(v) -> str:
    if v is None:
        return "-"
    return f"{v / 1024:.1f} MiB" if v < 10240 else f"{v / 1024:.0f} MiB"


SESSIONS = "session-N.scope"  # ssh logins open at the time: Ansible's ControlPersist connections, not the host's own


def memory_lines(mem, meta) -> list[str]:
    hosts = mem["hosts"]
    workers = {h: v for h, v in hosts.items() if re.fullmatch(rf"{PREFIX}w\d+", h) and "pss_kib" in v}
    if not workers:
        return ["No memory figures (the hosts could not be read)."]

    def own(v, field):  # the host without the ssh logins that happened to be open
        return v[field] - (v["by_unit"].get(SESSIONS, {}).get(field, 0) if field in ("pss_kib", "uss_kib") else 0)

    def mid(field):
        return statistics.median(own(v, field) for v in workers.values())

    rows = []
    for name, label in ((f"{PREFIX}jobs", "job server (gearmand)"), (f"{PREFIX}web", "web node")):
        v = hosts.get(name) or {}
        if "pss_kib" in v:
            rows.append(f"| {name}: {label} | {kib(own(v, 'pss_kib'))} | {kib(own(v, 'uss_kib'))} | "
                        f"{kib(v['tmpfs_kib'])} | {kib(v.get('nspawn_pss_kib'))} | {v['processes']} |")
    nsp = [v.get("nspawn_pss_kib") for v in workers.values() if v.get("nspawn_pss_kib") is not None]
    rows.append(f"| one worker host (median of {len(workers)}) | {kib(mid('pss_kib'))} | {kib(mid('uss_kib'))} | "
                f"{kib(mid('tmpfs_kib'))} | {kib(med(nsp)) if nsp else '-'} | {mid('processes'):.0f} |")
    units = {}
    for v in workers.values():
        for u, d in v["by_unit"].items():
            if u != SESSIONS:
                units.setdefault(u, []).append(d["pss_kib"])
    top = sorted(units, key=lambda u: -med(units[u]))[:6]
    parts = ", ".join(f"{u} {med(units[u]) / 1024:.1f} MiB" for u in top)
    total_pss = sum(own(v, "pss_kib") + v["tmpfs_kib"] + (v.get("nspawn_pss_kib") or 0)
                    for v in hosts.values() if "pss_kib" in v)
    sessions = statistics.median(v["by_unit"].get(SESSIONS, {}).get("pss_kib", 0) for v in workers.values())
    lines = [
        ("| host | PSS of its processes | of which private (USS) | its tmpfs (/run, /tmp) | its systemd-nspawn "
         "(outside it) | processes |"),
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        (f"**One idle worker host (2 instances, after the converge) costs about "
         f"{(mid('pss_kib') + mid('tmpfs_kib') + (med(nsp) if nsp else 0)) / 1024:.0f} MiB** (PSS of its processes "
         f"+ its tmpfs + its nspawn), of which {mid('uss_kib') / 1024:.0f} MiB are its own private pages (what one "
         f"more host adds at least). Largest parts, median PSS per unit: {parts}. All {len(hosts)} fb- hosts "
         f"together: {total_pss / 1024:.0f} MiB. Left out above: the ssh logins open on a host at the time "
         f"(session-*.scope: Ansible's ControlPersist connections from the converge, closed after 60 s idle), "
         f"median {kib(sessions)} a worker host."),
    ]
    before, after = mem.get("machine_before_boot"), mem.get("machine_after_converge")
    if before and after:
        used = (before["MemAvailable"] - after["MemAvailable"]) / 1024
        lines.append(
            f"Cross-check, this machine's MemAvailable before the boot and after the converge: {used:.0f} MiB less "
            f"for {len(hosts)} hosts ({used / len(hosts):.0f} MiB a host; this also counts the kernel's share, the "
            "hosts' page cache that is not reclaimable at once, and whatever else changed on the machine "
            f"meanwhile). MemTotal {after['MemTotal'] / 1024 / 1024:.1f} GiB.")
    lines.append("PSS splits each shared page among every process that maps it, machine-wide (the golden image's "
                 "libraries are one set of pages for all hosts), so the hosts' figures add up; the kernel's "
                 "share (network namespace, page tables, socket buffers) is not in them.")
    return lines


def side_lines(where: dict, sizes: list[int], cores: int) -> list[str]:
    """The CPU of one run of each command by side (cpuside.py), each size, and what each added host costs."""
    if not where:
        return ["(No CPU by side: the hosts' cgroups could not be read.)", ""]
    parts = ("control", "logins", "systemd", "workers", "gearmand", "rest")
    runs = next(iter(next(iter(where.values())).values()))["runs"]
    lines = [
        "### Where the CPU goes",
        "",
        ("CPU milliseconds per run, by side, from the hosts' cgroups (cpuside.py; each command run "
         f"{runs} times after one unmeasured run, right after the rounds above): the "
         "control host (this machine less the hosts: the CLI or Ansible, their ssh clients, ansible-inventory), "
         "the worker hosts' ssh logins (sshd's session and the command it runs: the host's own atom-workerctl, or "
         "Ansible's module), their systemd (PID 1 answering D-Bus), their atom-worker instances, the job server's "
         "gearmand, and the rest of the hosts. The last column is the wall time of those runs."),
        "",
        "| command | hosts | total | " + " | ".join(parts) + " | wall |",
        "| --- | --- | --- | " + " | ".join("---" for _ in parts) + " | --- |",
    ]
    notes = []
    for key, by_n in where.items():
        for n in sizes:
            w = by_n.get(str(n))
            if w:
                lines.append(f"| {key} | {n} | {w['total']:.0f} | " + " | ".join(f"{w[p]:.0f}" for p in parts)
                             + f" | {w['wall_ms']:.0f} |")
        lo, hi = by_n.get(str(sizes[0])), by_n.get(str(sizes[-1]))
        if lo and hi and sizes[-1] > sizes[0]:
            dn = sizes[-1] - sizes[0]
            each = {p: (hi[p] - lo[p]) / dn for p in ("total", *parts)}
            floor = lo["wall_ms"] + (hi["total"] - lo["total"]) / cores
            notes.append(
                f"- `{key}`: each added host costs {each['total']:.0f} ms of CPU ("
                + ", ".join(f"{p} {each[p]:.1f}" for p in parts if abs(each[p]) >= 0.5)
                + f"). On {cores} shared cores, {sizes[-1]} hosts take about T({sizes[0]}) plus that extra CPU "
                f"spread over every core (less only by what T({sizes[0]}) spends waiting rather than computing): "
                f"{lo['wall_ms']:.0f} + {hi['total'] - lo['total']:.0f} / {cores} = {floor:.0f} ms, "
                f"T({sizes[-1]})/T({sizes[0]}) ≈ {floor / lo['wall_ms']:.2f} "
                f"(measured in these runs: {hi['wall_ms']:.0f} ms, {hi['wall_ms'] / lo['wall_ms']:.2f}). On a fleet "
                "of separate machines only the control host's share is spent on one machine's cores: "
                f"{lo['wall_ms']:.0f} + {sizes[-1] - sizes[0]} × {each['control']:.1f} / {cores} = "
                f"{lo['wall_ms'] + dn * each['control'] / cores:.0f} ms "
                f"({(lo['wall_ms'] + dn * each['control'] / cores) / lo['wall_ms']:.2f}), plus the slowest host's "
                "own time.")
    return [*lines, "", *notes, ""]


def write(times, sampling, mem, trans, where, meta) -> None:
    sizes = meta["sizes"]
    base, top = sizes[0], sizes[-1]
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    ansible = subprocess.run([str(BIN / "ansible"), "--version"], capture_output=True, text=True,
                             check=False).stdout.splitlines()[0]
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cores = os.cpu_count()
    raw = {"recorded": now, "cpu": cpu, "cores": cores, "python": platform.python_version(), "ansible": ansible,
           **meta, "times": {str(n): t for n, t in times.items()}, "cpu_seconds": CPU,
           "host_seconds_max_mean": HOST_SECONDS, "sampling": sampling, "memory": mem, "transport": trans,
           "cpu_by_side_ms": where}
    (HERE / "results.json").write_text(json.dumps(raw, indent=1) + "\n")

    names = labels(meta)
    keys = list(times[base])
    t = {k: {n: med(times[n][k]) for n in sizes} for k in keys}
    ratio_heads = [f"T({n})/T({base})" for n in sizes[1:]]
    head = ("| command | " + " | ".join(f"{n} host{'s' if n != 1 else ''}" for n in sizes) + " | "
            + " | ".join(ratio_heads) + " |")
    rows = []
    for k in keys:
        mins = {n: min(times[n][k]) for n in sizes}
        rows.append(f"| {names[k]} | " + " | ".join(f"{t[k][n]:.2f} s ({mins[n]:.2f})" for n in sizes) + " | "
                    + " | ".join(f"{t[k][n] / t[k][base]:.2f}" for n in sizes[1:]) + " |")
    for k in ("status", "reset", "rolling"):
        hs = {n: med([m for m, _ in HOST_SECONDS.get(f"{n}:{k}", [])]) for n in sizes}
        rows.append(f"| slowest host's own round trip within `{k}` (its JSON) | "
                    + " | ".join(f"{hs[n]:.2f} s" for n in sizes) + " | "
                    + " | ".join(f"{hs[n] / hs[base]:.2f}" for n in sizes[1:]) + " |")
    cpu_rows = []
    for k in keys:
        c = {n: med(CPU.get(f"{n}:{k}", [])) for n in sizes}
        cpu_rows.append(f"| {k} | " + " | ".join(f"{c[n]:.1f} s ({c[n] / (t[k][n] * cores):.0%})" for n in sizes)
                        + " |")

    # The goals.
    goal_lines = []
    for fleet_key, adhoc_key, how in (("status", "ansible_status", "connections kept from a command just before"),
                                      ("status_fresh", "ansible_status_fresh", "a new ssh connection to each host")):
        st = t[fleet_key][top] / t[fleet_key][base]
        adhoc = t[adhoc_key][top] / t[fleet_key][top]
        goal_lines += [
            f"- {how}: fleet `status` T({top})/T({base}) = **{st:.2f}** (goal: at most 2): "
            + ("met." if st <= 2 else "**not met**."),
            f"- {how}: `ansible` ad hoc status / fleet `status` at {top} hosts = **{adhoc:.2f}** (goal: at least 3): "
            + ("met." if adhoc >= 3 else "**not met**."),
        ]
    sample_rows = []
    for k, runs in sampling.items():
        if not runs:
            continue
        served = all(s["served_every_sample"] for s in runs)
        control = all(s["control_ok"] and s["window_ok"] and not s["errors"] for s in runs)
        lows = [s["lowest"] for s in runs]
        sample_rows.append(
            f"| {k} | {len(runs)} | {sum(s['samples'] for s in runs)} | {min(x for x in lows if x is not None)} "
            f"(per round: {', '.join(str(x) for x in lows)}) | {runs[0]['full']} | "
            f"{sum(s['samples_with_a_function_unserved'] for s in runs)} | {'yes' if served else '**no**'} | "
            + ("yes" if control else "**no**: " + "; ".join(
                f"round {s['round']}: saw {s['control_seen']}, window {s['window_ok']}, errors {s['errors'][:1]}"
                for s in runs if not (s["control_ok"] and s["window_ok"] and not s["errors"]))) + " |")
    rolling_keys = [k for k in sampling if k == "rolling" or k.startswith("playbook")]
    rolling_ok = all(s["served_every_sample"] and s["control_ok"] and s["window_ok"] and not s["errors"]
                     for k in rolling_keys for s in sampling[k]) and any(sampling[k] for k in rolling_keys)
    goal_lines.append(
        f"- the rolling restarts ({', '.join(rolling_keys)}) keep every function served at every 100 ms sample on "
        f"{top} hosts, the probe's control seen in every round: " + ("met." if rolling_ok else "**not met**."))

    # Growth against the host count: the cost each added host brings, between successive sizes.
    growth, growth_notes = [], []
    for k in keys:
        steps = [(a, b, (t[k][b] - t[k][a]) / (b - a)) for a, b in zip(sizes, sizes[1:], strict=False)]
        marg = ", ".join(f"{a}→{b}: {m * 1000:+.0f} ms" for a, b, m in steps)
        superlinear = t[k][top] / t[k][base] > top / base
        rising = len(steps) > 1 and steps[-1][2] > 1.25 * max(steps[0][2], 0.01)
        growth.append(f"| {k} | {marg} | {'**yes**' if superlinear else 'no'} | "
                      f"{'rises' if rising else 'flat or falls'} |")
        if superlinear or rising:
            c0, c1 = med(CPU.get(f"{base}:{k}", [])), med(CPU.get(f"{top}:{k}", []))
            note = (f"- `{k}`: T({top})/T({base}) = {t[k][top] / t[k][base]:.2f}; machine-wide CPU seconds "
                    f"{c0:.1f} → {c1:.1f} (×{c1 / c0 if c0 else float('nan'):.1f}), {c1 / (t[k][top] * cores):.0%} "
                    f"of the {cores} cores at {top} hosts")
            hs = HOST_SECONDS.get(f"{top}:{k}")
            if hs:
                h0 = med([m for m, _ in HOST_SECONDS.get(f"{base}:{k}", [])])
                note += (f"; each host's own time (mean) at {top} hosts {med([a for _, a in hs]):.2f} s, the slowest "
                         f"{med([m for m, _ in hs]):.2f} s, against {h0:.2f} s at {base}")
            growth_notes.append(note + ".")

    if growth_notes:
        growth_text = [("The steps flagged above, with what this run measured about them (a share of the cores near "
                        "100% means the shared cores were the limit: every added host's ssh, CLI or Ansible work "
                        "queued for them; hosts' own times that grow with N say the same from the hosts' side):"),
                       "", *growth_notes, ""]
    else:
        growth_text = [("No step grew faster than the host count, and none cost more per added host as the "
                        "fleet grew, in this run."), ""]
    tr = {k: (statistics.median(v), min(v)) for k, v in trans.items()}
    mt = (mem.get("machine_after_converge") or {}).get("MemTotal", 0)
    lines = [
        "# Fleet commands: benchmark results",
        "",
        (f"Recorded {now} by `bench/fleet/run.py` on the control host of the lab ({cpu}, **{cores} cores shared "
         f"by every host and by the control host**, {mt / 1024 / 1024:.0f} GiB; Python {platform.python_version()};"
         f" {ansible}). One run booted fb-jobs (gearmand), fb-web (a web node) and fb-w1..fb-w{meta['workers']} "
         f"(Debian 12, systemd, 2 atom-worker instances each: {meta['workers_per_function']} workers for each of "
         f"AtoM's {meta['functions']} functions), "
         + (f"converged them once with playbooks/lab/site.yml ({meta['boot_converge_seconds']:.0f} s with the boot)"
            if meta["converged_here"] else "converged before this run (--no-converge)")
         + f", then measured for {', '.join(map(str, sizes))} "
         f"worker hosts; the whole run took {meta['run_seconds'] / 60:.0f} min. Other lab hosts running meanwhile: "
         f"{', '.join(meta['other_lab_hosts']) or 'none'}."),
        "",
        "## Goals (issue 18 §2)",
        "",
        *goal_lines,
        "",
        "## Wall time",
        "",
        (f"Each command from the control host, {meta['rounds']} interleaved rounds after one warm-up; median (min). "
         "Hosts are chosen with `--limit` (atom-workerctl, ansible-playbook) and the same pattern (ansible) on the "
         f"same inventory. T(N)/T({base}) is of the medians: 1.0 means N hosts cost what one does, N means each "
         "host adds what the first cost."),
        "",
        head,
        "| --- | " + " | ".join("---" for _ in sizes) + " | " + " | ".join("---" for _ in sizes[1:]) + " |",
        *rows,
        "",
        (f"What each does. `status` asks each host's own `atom-workerctl status --json` over ssh, at most "
         f"`--parallel` ({meta['forks']}) hosts at a time, then asks gearmand once for `status` and `workers`; "
         "Ansible's module only reads the unit's properties. `reset` starts the stopped instance and waits until "
         "gearmand lists it again; `state=started` returns once systemd has started it. The fleet's "
         f"`restart --rolling --parallel {meta['batch']}` takes {meta['batch']} hosts at a time (each host one "
         "instance at a time, each registered before the next; the next batch once the whole batch is done), so "
         f"its time grows with N / {meta['batch']} batches by design. `restart --parallel {meta['batch']}` (no "
         f"`--rolling`) is the CLI's batched restart: {meta['batch']} hosts at a time, each restarting its "
         "instances together and waiting until gearmand lists them. `rolling-restart.yml` as shipped has "
         "`serial: 1` (per host: read sites.json, check with gearmand that other hosts serve its functions, "
         "reset-failed, restart, wait until registered); the batched rows run a copy with another `serial` (the "
         "playbook has no variable for it: `atom_worker_serial` belongs to site.yml). The ad hoc restart is "
         "two commands (every host's @1, then every host's @2), with no coverage check and no wait for gearmand. "
         "Ansible runs with this repository's ansible.cfg (pipelining, ssh ControlPersist 60 s: it reuses its "
         "ssh connections between commands); so does atom-workerctl (its own ControlPersist 60 s sockets), and "
         "while a connection is open it asks that ssh master for the host's session itself instead of starting "
         "an `ssh` client (`status_client` is the same command with an `ssh` client per host, on the same open "
         "connections). The status commands run once, untimed, right before their timed run, so the timed one "
         "finds its "
         "connections open, as an operator's second command within a minute does; the rows with new "
         "connections are the same commands made to connect to every host afresh (atom-workerctl did so before "
         "it kept them): the difference is what the key exchange and login cost. The other rows are not warmed: "
         "each finds open whatever connections the commands before it left within 60 s, both tools alike."),
        "",
        "### Cost per added host",
        "",
        ("Wall time each added host brings between successive sizes (ΔT/ΔN), whether the step grows faster than "
         f"the host count (T({top})/T({base}) > {top}/{base}), and whether the cost per added host rises with "
         "the size (by more than 25% from the first step to the last)."),
        "",
        "| command | ΔT/ΔN | faster than the host count | cost per added host |",
        "| --- | --- | --- | --- |",
        *growth,
        "",
        *growth_text,
        (f"Machine-wide CPU seconds used while each command ran (every process on the {cores} cores: the hosts, "
         "the control host's ssh/ansible/CLI, other lab hosts), median, and in brackets that as a share of "
         f"{cores} cores × the wall time: near 100% the command was bound by the shared CPU, not by waiting."),
        "",
        "| command | " + " | ".join(f"{n} host{'s' if n != 1 else ''}" for n in sizes) + " |",
        "| --- | " + " | ".join("---" for _ in sizes) + " |",
        *cpu_rows,
        "",
        *side_lines(where, sizes, cores),
        "## Availability during the restarts",
        "",
        (f"At {top} hosts, every restart ran under gearmand's `status` sampled every 100 ms from the control host "
         "(tests/gearman_sampler.py, as the rolling-restart tests do). The control, before each restart: one "
         "instance of fb-w1 held stopped for a second, and the probe must see every function at exactly one "
         "below the full count then; the restart must lie inside the sampling (samples before and after it). "
         "`lowest` is the fewest available workers any function had in any sample during the restart."),
        "",
        ("| restart | rounds | samples | lowest (per round) | full | samples with a function unserved | "
         "every function served at every sample | control seen, window ok, no read error |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *sample_rows,
        "",
        "## Memory: what one host costs",
        "",
        *memory_lines(mem, meta),
        "",
        f"## One host, one round trip: ssh + the host's CLI vs pystemd's DBusRemote ({len(trans['ssh_cli'])} rounds)",
        "",
        "| how | median | min |",
        "| --- | --- | --- |",
        (f"| `ssh HOST atom-workerctl --json status` (everything `status` shows) | {tr['ssh_cli'][0] * 1000:.0f} ms "
         f"| {tr['ssh_cli'][1] * 1000:.0f} ms |"),
        (f"| pystemd `DBusRemote` (ssh + systemd-stdio-bridge) reading every atom-worker unit: the listing, "
         f"then GetAll of each unit's Unit and Service interfaces (systemd's view only) | "
         f"{tr['dbus_remote'][0] * 1000:.0f} ms | "
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
        ("Raw figures (every run's seconds, CPU seconds, each host's own seconds, every sampling, every host's "
         "memory by unit): `results.json`."),
        "",
    ]
    (HERE / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
