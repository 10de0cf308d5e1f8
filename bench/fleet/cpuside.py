"""Where a fleet command's CPU goes on the shared cores: each lab host's cgroup (cgroup v2 keeps every
group's CPU time, its children's included, in cpu.stat's usage_usec), split by what runs there, and the
control host (this machine's busy time less the hosts').

Per run of a command, in CPU milliseconds:
  control     this machine less the fleet's hosts: the CLI, its ssh clients, ansible-inventory (here,
              outside the hosts); also whatever else runs on the machine (other lab hosts: results.md's
              first paragraph names them) and the kernel's interrupt time, which no cgroup is charged
              (a fraction of a percent here)
  logins      the worker hosts' user.slice: the ssh logins, i.e. sshd's session and the host's own CLI
  systemd     the worker hosts' init.scope (PID 1 answering D-Bus)
  workers     the worker hosts' atom-worker instances
  gearmand    the job server's gearman-job-server.service
  rest        everything else in the hosts (journald, dbus, nspawn itself; the web node, all of it)

Run by run.py inside `lab exec`, whose /sys has no cgroup tree: the tree is read through the mount namespace
of the `lab exec` process outside ($ATOM_LAB_ROOT_PID), as the lab itself reads it.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "lab"))

from atomlab import cgroups

TICK = os.sysconf("SC_CLK_TCK")
WORKER_PARTS = {"logins": "payload/user.slice", "systemd": "payload/init.scope",
                "workers": "payload/system.slice/system-atom\\x2dworker.slice"}
JOBS_PARTS = {"gearmand": "payload/system.slice/gearman-job-server.service"}


def _outside(path: Path) -> Path:
    root = os.environ.get("ATOM_LAB_ROOT_PID")
    return Path(f"/proc/{root}/root") / path.relative_to("/") if root else path


def host_group(name: str) -> Path | None:
    """The host's group in the cgroup v2 tree (the one with cpu.stat), whichever layout the lab made."""
    roots = [cgroups.CGROUP_FS, *cgroups.HYBRID_ROOTS]
    for root in roots:
        for relative in (Path(cgroups.GROUP, name), Path(cgroups.SLICE, f"atom-lab-{name}.scope")):
            group = _outside(root / relative)
            if (group / "cpu.stat").exists():
                return group
    return None


def _usec(path: Path) -> int:
    try:
        for line in (path / "cpu.stat").read_text().splitlines():
            if line.startswith("usage_usec "):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def busy() -> float:
    """Seconds of CPU this machine has spent busy (every core, every process: hosts, control host, others)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICK


def read(groups: dict[str, Path], jobs: str, workers: set[str]) -> dict[str, float]:
    """Cumulative CPU seconds by part (see the module's list), summed over the hosts."""
    out = {"machine": busy(), "hosts": 0.0, "logins": 0.0, "systemd": 0.0, "workers": 0.0, "gearmand": 0.0}
    for name, group in groups.items():
        total = _usec(group) / 1e6
        out["hosts"] += total
        parts = JOBS_PARTS if name == jobs else WORKER_PARTS if name in workers else {}
        for part, sub in parts.items():
            out[part] += _usec(group / sub) / 1e6
    return out


def per_run(argv: list[str], env: dict, cwd: Path, groups: dict[str, Path], jobs: str, workers: set[str],
            runs: int) -> dict:
    """Run argv `runs` times (once first, unmeasured); CPU milliseconds per run by part, and wall ms."""
    subprocess.run(argv, env=env, cwd=cwd, capture_output=True, check=True)
    before, started = read(groups, jobs, workers), time.perf_counter()
    for _ in range(runs):
        subprocess.run(argv, env=env, cwd=cwd, capture_output=True, check=True)
    wall = time.perf_counter() - started
    after = read(groups, jobs, workers)
    d = {k: (after[k] - before[k]) * 1000 / runs for k in after}
    named = d["logins"] + d["systemd"] + d["workers"] + d["gearmand"]
    return {"runs": runs, "wall_ms": round(wall * 1000 / runs, 1), "total": round(d["machine"], 1),
            "control": round(d["machine"] - d["hosts"], 1), "logins": round(d["logins"], 1),
            "systemd": round(d["systemd"], 1), "workers": round(d["workers"], 1), "gearmand": round(d["gearmand"], 1),
            "rest": round(d["hosts"] - named, 1)}
