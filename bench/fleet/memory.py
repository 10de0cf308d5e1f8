"""What one lab host costs in memory: every process of the host (its own PID namespace) summed by PSS.

PSS (proportional set size) splits each shared page among all the processes that map it, machine-wide:
the golden image's libraries, mapped by every host through the same overlay lower layer, are counted once
over all hosts, so the hosts' PSS sums add up to what they take together. USS (private pages) is what one
more host adds at least. Pages in the host's tmpfs mounts (/run: the journal; /tmp) are memory too and
mapped by no process: counted apart. Not counted: the kernel's share (network namespace, page tables,
socket buffers) and the page cache of the host's overlay upper layer (reclaimable).

Run by run.py on each host with `lab run HOST -- python3 -c SCRIPT` (nothing installed on the host), and on
the control host for each host's systemd-nspawn process, which lives outside the host.
"""

import json
import os
import re
import subprocess
from pathlib import Path

# Inside a host: one JSON object, in KiB.
HOST_SCRIPT = r'''
import json, os, re
me = os.getpid()
out = {"processes": 0, "pss_kib": 0, "uss_kib": 0, "rss_kib": 0, "by_unit": {}, "tmpfs_kib": 0}
for pid in filter(str.isdigit, os.listdir("/proc")):
    if int(pid) == me:
        continue
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            roll = f.read()
        with open(f"/proc/{pid}/cgroup") as f:
            cg = f.read()
    except OSError:
        continue
    v = {k: int(n) for k, n in re.findall(r"^(\w+):\s+(\d+) kB", roll, re.M)}
    if not v:
        continue
    paths = [ln.split(":", 2)[2] for ln in cg.splitlines() if ln.startswith(("0::", "1:name=systemd:"))]
    unit = (paths[-1].rstrip("/").rsplit("/", 1)[-1] if paths else "") or "-"
    unit = re.sub(r"@[^.]*\.", "@.", unit)
    unit = re.sub(r"^session-\d+\.scope$", "session-N.scope", unit)  # ssh logins (Ansible's ControlPersist)
    uss = v.get("Private_Clean", 0) + v.get("Private_Dirty", 0)
    out["processes"] += 1
    out["pss_kib"] += v.get("Pss", 0)
    out["uss_kib"] += uss
    out["rss_kib"] += v.get("Rss", 0)
    u = out["by_unit"].setdefault(unit, {"processes": 0, "pss_kib": 0, "uss_kib": 0})
    u["processes"] += 1
    u["pss_kib"] += v.get("Pss", 0)
    u["uss_kib"] += uss
seen = set()
with open("/proc/self/mounts") as f:
    for ln in f:
        dev, mnt, fstype = ln.split()[:3]
        if fstype != "tmpfs" or mnt in seen:
            continue
        seen.add(mnt)
        try:
            st = os.statvfs(mnt.encode().decode("unicode_escape"))
        except OSError:
            continue
        out["tmpfs_kib"] += (st.f_blocks - st.f_bfree) * st.f_frsize // 1024
print(json.dumps(out))
'''


def host(lab: Path, name: str) -> dict:
    proc = subprocess.run([str(lab), "run", name, "--", "python3", "-c", HOST_SCRIPT], capture_output=True,
                          text=True, timeout=120, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-500:]}
    data = json.loads(proc.stdout)
    data["nspawn_pss_kib"] = nspawn_pss(name)
    return data


def nspawn_pss(name: str) -> int | None:
    """PSS of the host's systemd-nspawn process (on the control host; `-M NAME` on its command line)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if not argv[0].endswith(b"systemd-nspawn") or b"-M" not in argv:
                continue
            if argv[argv.index(b"-M") + 1].decode() != name:
                continue
            roll = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except (OSError, IndexError, ValueError):
            continue
        m = re.search(r"^Pss:\s+(\d+) kB", roll, re.M)
        return int(m.group(1)) if m else None
    return None


def machine() -> dict:
    """This machine's /proc/meminfo (KiB): MemTotal, MemAvailable, Shmem, Cached."""
    info = dict(re.findall(r"^(\w+):\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M))
    return {k: int(info[k]) for k in ("MemTotal", "MemAvailable", "Shmem", "Cached") if k in info}
