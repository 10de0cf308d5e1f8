"""Helpers for the drills: real faults on lab hosts, and the stand-in's record to prove nothing was lost.

Run inside the lab network: tools/lab/lab exec -- .venv/bin/pytest tests/drills
Each module boots hosts of its own, named with its prefix (`d-` test_drills_lab, `dc-` test_hard_crash_lab).
"""

import hashlib
import json
import shlex
import subprocess

import pytest
from gsubmit import GSUBMIT
from labhosts import ATOM_ROOT, LAB, LabHosts, booted_per_module
from polling import wait_until


class Drill:
    """Booted and converged drill hosts plus the helpers every drill uses."""

    def __init__(self, hosts: LabHosts):
        self.hosts = hosts
        self.address = hosts.addresses()

    def run(self, host, command, check=True, timeout=120):
        return self.hosts.run(host, command, check=check, timeout=timeout)

    def converge(self, *extra, extra_vars=None, check=True):
        result = self.hosts.playbook("playbooks/lab/site.yml", *extra, extra_vars=extra_vars)
        if check:
            assert result.returncode == 0, result
        return result

    def show(self, host, unit, *props):
        out = self.run(host, f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    @staticmethod
    def function(job_class="arFindingAidJob", workers_key=""):
        """The Gearman function of `job_class` for workers at the lab's AtoM root (QubitJob's prefix:
        md5 of the root's real path, which has no symlink on lab hosts, and workers_key)."""
        return hashlib.md5((ATOM_ROOT + workers_key).encode()).hexdigest() + "-" + job_class

    def record(self, host, root=ATOM_ROOT):
        out = self.run(host, f"cat {root}/log/standin-record.jsonl 2>/dev/null || true").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def marks(self, *hosts):
        """Where each host's record ends now: {host: events so far}, for `completed` and `wait_all_completed`."""
        return {host: len(self.record(host)) for host in hosts}

    def completed(self, where, since=0):
        """Job id -> how many times it completed, from the stand-in record of host `where` (events after
        `since`), or of several hosts, summed: `where` is then {host: mark} as `marks` returns it."""
        marks = where if isinstance(where, dict) else {where: since}
        counts = {}
        for host, mark in marks.items():
            for event in self.record(host)[mark:]:
                if event.get("event") == "job" and event.get("status") == "completed":
                    counts[str(event["id"])] = counts.get(str(event["id"]), 0) + 1
        return counts

    def wait_all_completed(self, where, ids, since=0, timeout=180, what="the jobs"):
        """Every id completed at least once (none missing) on `where` (as in `completed`); returns the counts."""
        ids = set(ids)

        def done():
            counts = self.completed(where, since)
            return counts if ids <= set(counts) else None

        def missing():
            counts = self.completed(where, since)
            return f"missing {len(ids - set(counts))} of {len(ids)}: {sorted(ids - set(counts))[:10]}"

        return wait_until(done, timeout, 0.5, what, details=missing)

    def install_submitter(self, host):
        self.run(host, f"cat > /root/gsubmit.py <<'EOF'\n{GSUBMIT}EOF")

    def submit(self, host, server, function, prefix, count, **payload):
        """Queue `count` background jobs on gearmand `server` (host:port as seen from `host`)."""
        address, port = server.rsplit(":", 1)
        args = [address, port, function, prefix, str(count)] + ([json.dumps(payload)] if payload else [])
        out = self.run(host, "python3 /root/gsubmit.py " + " ".join(shlex.quote(a) for a in args)).stdout
        ids = out.split()
        assert len(ids) == count, out
        return ids

    def gearman_status(self, host, address="127.0.0.1"):
        """gearmand `status` read on `host`: function -> (total, running, available)."""
        out = self.run(host, f"gearadmin -h {address} --status").stdout
        status = {}
        for line in out.splitlines():
            cols = line.split("\t")
            if len(cols) == 4:
                status[cols[0]] = tuple(int(c) for c in cols[1:])
        return status

    def gearman_workers(self, host, address="127.0.0.1"):
        """gearmand's `workers` read on `host`: client address -> connections that registered a function."""
        out = self.run(host, f"gearadmin -h {address} --workers").stdout
        counts = {}
        for line in out.splitlines():
            client, _, functions = line.partition(" : ")
            fields = client.split()
            if len(fields) >= 2 and functions.strip():
                counts[fields[1]] = counts.get(fields[1], 0) + 1
        return counts

    def powercut(self, host):
        """The host loses power (`lab powercut`: unplugged first, so nothing it sends as it dies reaches a peer)."""
        self.hosts.powercut(host)

    def boot(self, host):
        """Boot a host that was cut off or shut down; returns once systemd runs."""
        self.hosts.boot(host)

    def control(self, host, **knobs):
        self.hosts.standin_control(host, **knobs)

    def journal(self, host, unit, since=""):
        flag = f" --since=@{since}" if since else ""
        return self.run(host, f"journalctl --no-pager -o cat -u '{unit}'{flag}", check=False).stdout

    def lab_run_bg(self, host, *argv):
        """A command inside a host, in the background (its stdout is piped)."""
        return subprocess.Popen([str(LAB), "run", host, "--", *argv], stdout=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def make_drill(tmp_path_factory):
    """Boot the hosts of an inventory (dict) for the whole module; remove them afterwards."""
    with booted_per_module(tmp_path_factory, Drill, "drill") as make:
        yield make
