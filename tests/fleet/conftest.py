"""Fixtures for the fleet tests: the hosts of inventory/examples/fleet.yml, booted and converged once per module.

Run inside the lab network: tools/lab/lab exec -- .venv/bin/pytest tests/fleet
Host names are the example's with an `f-` prefix (f-jobs1, f-web1, f-worker1..3), plus `f-out`, a host in no
group (outside gearmand's allowlist). The test process itself reads gearmand's admin `status` over TCP, so
the inventory copy adds the lab's control address to `gearman_job_server_allowed_addresses`.
"""

import json
import os
import shlex
import socket
import time

import pytest
import yaml
from gearman_sampler import StatusSampler, admin, parse_status  # noqa: F401 - fixtures use them
from labhosts import ATOM_ROOT, REPO, LabHosts
from polling import wait_until

PREFIX = "f-"
EXAMPLE = REPO / "inventory" / "examples" / "fleet.yml"


def prefixed(inventory: dict, prefix: str) -> dict:
    """The inventory with every host name prefixed (groups and variables kept)."""

    def walk(group):
        group = group or {}
        if group.get("hosts"):
            group["hosts"] = {prefix + name: hvars for name, hvars in group["hosts"].items()}
        for child in (group.get("children") or {}).values():
            walk(child)

    walk(inventory["all"])
    return inventory


def group_hosts(inventory: dict, name: str) -> list[str]:
    def find(group):
        for child_name, child in ((group or {}).get("children") or {}).items():
            if child_name == name:
                return child
            found = find(child)
            if found is not None:
                return found
        return None

    group = find(inventory["all"]) or {}
    names = list((group.get("hosts") or {}).keys())
    for child in (group.get("children") or {}).values():
        names += list(((child or {}).get("hosts") or {}).keys())
    return names


class Fleet:
    """The booted, converged fleet and the helpers the tests share."""

    def __init__(self, hosts: LabHosts, source: dict):
        self.hosts = hosts
        self.job_server = group_hosts(source, "gearman_job_servers")[0]
        self.web = group_hosts(source, "atom_web")[0]
        self.workers = group_hosts(source, "atom_workers")
        self.outsider = group_hosts(source, "outsiders")[0]
        self.address = hosts.addresses()
        self.gearmand = (self.address[self.job_server], 4730)

    # -- running things ----------------------------------------------------------------------------------
    def run(self, host, command, check=True, timeout=120):
        return self.hosts.run(host, command, check=check, timeout=timeout)

    def playbook(self, playbook, *extra, extra_vars=None, check=True):
        start = time.monotonic()
        result = self.hosts.playbook(playbook, *extra, extra_vars=extra_vars)
        result.seconds = time.monotonic() - start
        changed = result.changed() if result.recap else "no recap"  # changed() raises without one
        print(f"{playbook} {' '.join(extra)} {extra_vars or ''}: {result.seconds:.1f} s, changed={changed}")
        if check:
            assert result.returncode == 0, result
        return result

    def wait_for(self, predicate, timeout=60, interval=0.5, what="condition"):
        return wait_until(predicate, timeout, interval, what)

    # -- systemd -----------------------------------------------------------------------------------------
    def show(self, host, unit, *props):
        out = self.run(host, f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def units(self, host, state=None):
        flag = f" --state={state}" if state else ""
        out = self.run(host, "systemctl list-units --all --plain --no-legend --no-pager"
                             f"{flag} 'atom-worker@*' 'atom-worker-*@*'").stdout
        return sorted(line.split()[0] for line in out.splitlines() if line.strip())

    def main_pids(self, host):
        return self.hosts.main_pids(host)

    def journal(self, host, unit="atom-worker*@*"):
        return self.run(host, f"journalctl --no-pager -n 60 -o short-monotonic -u '{unit}'", check=False).stdout

    # -- the stand-in ------------------------------------------------------------------------------------
    def record(self, host, root=ATOM_ROOT):
        out = self.run(host, f"cat {root}/log/standin-record.jsonl 2>/dev/null || true").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def completed(self, hosts=None):
        """Completed job ids per worker host."""
        return {h: {e["id"] for e in self.record(h) if e.get("event") == "job" and e.get("status") == "completed"}
                for h in (hosts or self.workers)}

    def submit(self, cls="arFindingAidJob", count=1, payload=None, host=None, check=True):
        """Submit from the web node as AtoM's web app does; the job ids (or the failed process)."""
        command = f"standin:submit --class={cls} --count={count}"
        if payload:
            command += f" --payload={shlex.quote(json.dumps(payload))}"
        proc = self.run(host or self.web, f"cd {ATOM_ROOT} && runuser -u www-data -- php symfony {command}",
                        check=False)
        if check:
            assert proc.returncode == 0, f"submit failed: {proc.stdout}\n{proc.stderr}"
            return proc.stdout.split()
        return proc

    def control(self, host, **knobs):
        self.hosts.standin_control(host, **knobs)

    # -- gearmand, read from the test process (inside the lab network) -------------------------------------
    def status(self):
        return parse_status(admin(self.gearmand, "status"))

    def can_connect(self, host, port=4730):
        code = (f"import socket; s=socket.socket(); s.settimeout(3); "
                f"print(s.connect_ex(('{self.gearmand[0]}', {port})))")
        return self.run(host, f'python3 -c "{code}"').stdout.strip() == "0"


def control_address(server) -> str:
    """This process's source address towards `server` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(server)
        return probe.getsockname()[0]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """The fleet example booted with `f-` names, converged once with site.yml."""
    source = prefixed(yaml.safe_load(EXAMPLE.read_text()), PREFIX)
    source["all"]["children"]["outsiders"] = {"hosts": {f"{PREFIX}out": None}}
    hosts = LabHosts(source, tmp_path_factory.mktemp("fleet"))
    hosts.down()
    hosts.up()
    fleet = Fleet(hosts, source)
    # The test process reads gearmand's status itself: admit this address too (in the test's copy only).
    generated = yaml.safe_load(hosts.inventory.read_text())
    jobs = generated["all"]["children"]["gearman_job_servers"]
    jobs.setdefault("vars", {})["gearman_job_server_allowed_addresses"] = [control_address(fleet.gearmand)]
    hosts.inventory.write_text(yaml.safe_dump(generated, sort_keys=False))
    fleet.first_converge = fleet.playbook("playbooks/lab/site.yml")
    yield fleet
    if not os.environ.get("ATOM_KEEP_LAB"):
        hosts.down()
