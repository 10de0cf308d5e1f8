#!/usr/bin/python3
"""Ask gearmand which of this host's AtoM workers are registered. Run on a worker host (stdlib only).

The playbooks copy it to the host with ansible.builtin.script; it reads the host's model
(/etc/atom-worker/sites.json, written by the atom_worker role) and the admin `workers` list of each job
server the sites use (plain TCP, the same port as the jobs: gearmand's admin protocol has no auth).

gearmand lists each connection as `FD IP CLIENT-ID : FUNCTION ...` with the peer address it sees. This
script connects from the host to the same server address, so its own socket's local address is the one
gearmand sees for this host's workers: no inventory address or route needs to be guessed.

  atom_gearman_check.py wait [--timeout S]   until every job server lists, from this host, at least as many
                                             worker connections with the sites' functions as the sites
                                             have instances; exit 1 on timeout
  atom_gearman_check.py coverage             for each function this host's workers register: how many
                                             workers other hosts have for it (0 = restarting this host
                                             leaves the function without a worker)

Both print one JSON object (for the playbook to read) and exit 0 unless the wait timed out or no job
server answered.
"""

import argparse
import json
import socket
import sys
import time

STATE_FILE = "/etc/atom-worker/sites.json"


def split_server(server):
    """`host:port` or `[v6]:port` -> (host, port)."""
    host, _, port = server.rpartition(":")
    return host.strip("[]"), int(port)


def admin(server, command, timeout=3.0):
    """Send one admin command; return (our local address, the lines before the final `.`)."""
    host, port = split_server(server)
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.settimeout(timeout)
        local = conn.getsockname()[0]
        conn.sendall(command.encode() + b"\n")
        buf = b""
        while not (buf == b".\n" or buf.endswith(b"\n.\n")):
            chunk = conn.recv(65536)
            if not chunk:
                raise OSError(f"{server}: connection closed before the end of `{command}`")
            buf += chunk
    return local, buf.decode(errors="replace").splitlines()[:-1]


def parse_workers(lines):
    """`FD IP CLIENT-ID : F1 F2` lines -> [(ip, [functions])]."""
    out = []
    for line in lines:
        left, sep, right = line.partition(" : ")
        if not sep and line.endswith(" :"):
            left, right = line[:-2], ""
        parts = left.split()
        if len(parts) >= 2:
            out.append((parts[1], right.split()))
    return out


def load_model(path):
    with open(path, encoding="utf-8") as handle:
        state = json.load(handle)
    expected = {}  # server -> instances this host must have registered there
    prefixes = {}  # server -> function-name prefixes of this host's sites
    for site in state.get("sites", []):
        instances = sum(int(pool.get("instances", 0)) for pool in site.get("pools", []))
        for server in site.get("gearman_servers", []):
            expected[server] = expected.get(server, 0) + instances
            prefixes.setdefault(server, set()).add(site["prefix"] + "-")
    return expected, prefixes


def observe(server, prefixes):
    """This host's registered worker connections on one server, and every function's workers by host."""
    local, lines = admin(server, "workers")
    mine = 0
    by_function = {}  # function -> {"mine": n, "others": n}
    for ip, functions in parse_workers(lines):
        ours = [f for f in functions if any(f.startswith(p) for p in prefixes)]
        if ip == local and ours:
            mine += 1
        for function in ours if ip == local else functions:
            counts = by_function.setdefault(function, {"mine": 0, "others": 0})
            counts["mine" if ip == local else "others"] += 1
    return local, mine, by_function


def wait(args):
    expected, prefixes = load_model(args.state_file)
    deadline = time.monotonic() + args.timeout
    while True:
        report, done = {}, True
        for server, want in sorted(expected.items()):
            try:
                local, mine, _ = observe(server, prefixes[server])
                report[server] = {"address": local, "registered": mine, "expected": want}
                done = done and mine >= want
            except (OSError, ValueError) as exc:
                report[server] = {"error": str(exc), "expected": want}
                done = False
        if done or time.monotonic() >= deadline:
            print(json.dumps({"registered": done, "servers": report, "timeout": args.timeout}, sort_keys=True))
            return 0 if done else 1
        time.sleep(args.interval)


def coverage(args):
    expected, prefixes = load_model(args.state_file)
    report, uncovered, errors = {}, [], []
    for server in sorted(expected):
        try:
            local, mine, by_function = observe(server, prefixes[server])
        except (OSError, ValueError) as exc:
            errors.append(f"{server}: {exc}")
            continue
        functions = {f: c for f, c in by_function.items() if c["mine"] > 0}
        report[server] = {"address": local, "registered": mine, "functions": functions}
        uncovered += [f"{server} {f}" for f, c in sorted(functions.items()) if c["others"] == 0]
    print(json.dumps({"servers": report, "uncovered": uncovered, "errors": errors}, sort_keys=True))
    return 1 if errors else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("mode", choices=["wait", "coverage"])
    parser.add_argument("--state-file", default=STATE_FILE)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=0.5)
    args = parser.parse_args(argv)
    return wait(args) if args.mode == "wait" else coverage(args)


if __name__ == "__main__":
    sys.exit(main())
