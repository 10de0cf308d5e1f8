#!/usr/bin/env python3
"""Why fleet commands run the host's own CLI over ssh: one round trip of each way of asking a host.

Run inside the lab network, against a converged worker host with the CLI (bench/fleet/run.py boots them):
    tools/lab/lab exec -- .venv/bin/python bench/fleet/transport.py INVENTORY HOST [--rounds 15]

  ssh_cli      ssh HOST atom-workerctl --json status   (systemd + gearmand + /proc registration)
  dbus_remote  pystemd DBusRemote (sd_bus_open_system_remote: ssh HOST systemd-stdio-bridge), then every
               atom-worker unit read over that bus: the listing, then GetAll of each unit's Unit and Service
               interfaces, one call at a time as pystemd makes them (systemd's view only: no gearmand, no
               registration, which needs the host's /proc). The CLI's own reader (dbuswire) talks to a
               local socket only.
  ssh_true     ssh HOST true (the floor: one ssh connection)
Prints JSON {method: [seconds...]}; run.py puts the medians in results.md.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))


def measure(inventory: str, host: str, rounds: int) -> dict:
    inv = yaml.safe_load(Path(inventory).read_text())
    hv = {}
    for group in inv["all"]["children"].values():
        hv.update({k: v for k, v in ((group or {}).get("hosts") or {}).items() if k == host})
    allvars = inv["all"].get("vars") or {}
    address, key = hv[host]["ansible_host"], allvars["ansible_ssh_private_key_file"]
    opts = ["-i", key, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "BatchMode=yes"]
    # sd-bus runs `ssh -xT HOST systemd-stdio-bridge` (ssh from PATH): a wrapper first in PATH adds the key.
    real_ssh = shutil.which("ssh")
    wrapper = Path(tempfile.mkdtemp()) / "ssh"
    wrapper.write_text(f"#!/bin/sh\nexec {real_ssh} " + " ".join(opts) + ' "$@"\n')
    wrapper.chmod(0o755)
    os.environ["PATH"] = f"{wrapper.parent}:{os.environ['PATH']}"
    from atom_workerctl import model
    from atom_workerctl.systemd import _dbuslib

    dbuslib, _ = _dbuslib()
    dest, manager = b"org.freedesktop.systemd1", b"org.freedesktop.systemd1.Manager"

    def ssh_cli():
        subprocess.run(["ssh", *opts, f"root@{address}", "atom-workerctl --json status"], check=True,
                       capture_output=True)

    def ssh_true():
        subprocess.run(["ssh", *opts, f"root@{address}", "true"], check=True, capture_output=True)

    def dbus_remote():
        bus = dbuslib.DBusRemote(f"root@{address}".encode())
        bus.open()
        # pystemd gives a reply of one value as that value: the listing's rows
        listing = bus.call_method(dest, b"/org/freedesktop/systemd1", manager, b"ListUnitsByPatterns",
                                  dbuslib.apply_signature(b"asas", [[], [model.UNIT_GLOB.encode()]])).body
        assert listing, "no units over DBusRemote"
        for row in listing:
            for interface in (b"org.freedesktop.systemd1.Unit", b"org.freedesktop.systemd1.Service"):
                bus.call_method(dest, row[6], b"org.freedesktop.DBus.Properties", b"GetAll",
                                dbuslib.apply_signature(b"s", [interface]))
        bus.close() if hasattr(bus, "close") else None

    methods = {"ssh_cli": ssh_cli, "dbus_remote": dbus_remote, "ssh_true": ssh_true}
    for fn in methods.values():
        fn()
    times = {k: [] for k in methods}
    for _ in range(rounds):
        for k, fn in methods.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return times


if __name__ == "__main__":
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 15
    times = measure(sys.argv[1], sys.argv[2], rounds)
    print(json.dumps({k: {"median": statistics.median(v), "min": min(v), "all": v} for k, v in times.items()}))
