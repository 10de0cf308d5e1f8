"""Fixtures for the role tests: lab hosts booted per module, converged with site.yml.

Lab tests run inside the lab network: `tools/lab/lab exec -- .venv/bin/pytest tests/roles`.
Host names start with `r-` (the roles' tests), then the module's own prefix.
"""

import json
import os

import pytest
from labhosts import ATOM_ROOT, LabHosts, booted_per_module
from polling import wait_until

RECORD = f"{ATOM_ROOT}/log/standin-record.jsonl"
# The playbook the lab tests converge with (the lab's: the stand-in, then site.yml; overridable).
PLAYBOOK = os.environ.get("ATOM_ROLES_PLAYBOOK", "playbooks/lab/site.yml")


class Lab:
    """Booted hosts plus the helpers the role tests share."""

    def __init__(self, hosts: LabHosts):
        self.hosts = hosts

    # -- running things ----------------------------------------------------------------------------------
    def run(self, host, command, check=True, timeout=120):
        return self.hosts.run(host, command, check=check, timeout=timeout)

    def address(self, host):
        return self.hosts.address(host)

    def converge(self, extra_vars=None, *extra, check=True):
        result = self.hosts.playbook(PLAYBOOK, *extra, extra_vars=extra_vars)
        if check:
            assert result.returncode == 0, result
        return result

    # -- systemd -----------------------------------------------------------------------------------------
    def show(self, host, unit, *props):
        out = self.run(
            host, f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props)
        ).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def units(self, host, pattern="atom-worker*@*.service", state=None):
        """Loaded instances matching pattern (optionally only those in `state`)."""
        flag = f" --state={state}" if state else ""
        out = self.run(
            host,
            f"systemctl list-units --all --plain --no-legend --no-pager{flag} '{pattern}'",
        ).stdout
        return sorted(line.split()[0] for line in out.splitlines() if line.strip())

    def wanted(self, host):
        """Instances enabled on disk (symlinks in *.wants of /etc/systemd/system)."""
        out = self.run(
            host,
            "find /etc/systemd/system -path '*.wants/atom-worker*@*.service' -printf '%f\\n'",
        ).stdout
        return sorted(out.split())

    def wait_for(self, predicate, timeout=60, interval=0.5, what="condition"):
        return wait_until(predicate, timeout, interval, what)

    # -- the stand-in ------------------------------------------------------------------------------------
    def record(self, host, root=ATOM_ROOT):
        out = self.run(
            host, f"cat {root}/log/standin-record.jsonl 2>/dev/null || true"
        ).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def events(self, host, kind, since=0, root=ATOM_ROOT):
        return [e for e in self.record(host, root)[since:] if e.get("event") == kind]

    def submit(self, host, cls="arFindingAidJob", count=1, root=ATOM_ROOT):
        proc = self.run(
            host,
            f"cd {root} && runuser -u www-data -- php symfony standin:submit --class={cls} --count={count}",
            check=False,
        )
        assert proc.returncode == 0, f"submit failed: {proc.stdout}\n{proc.stderr}"
        return proc.stdout.split()

    def control(self, host, root=ATOM_ROOT, **knobs):
        self.hosts.standin_control(host, root, **knobs)

    def journal(self, host, unit):
        return self.run(
            host, f"journalctl --no-pager -o cat -u {unit}", check=False
        ).stdout


@pytest.fixture(scope="module")
def make_lab(tmp_path_factory):
    """Boot the hosts of an inventory (dict) for the whole module; remove them afterwards."""
    with booted_per_module(tmp_path_factory, Lab) as make:
        yield make
