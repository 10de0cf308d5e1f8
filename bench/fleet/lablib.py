"""Boot and converge a fleet for the fleet CLI's benchmark (and reuse it across runs).

A job server `<prefix>jobs`, a web node `<prefix>web` (site.yml's atom_web play: AtoM's gearman.yml and
workers_key, no workers; it stands for the node that submits jobs) and worker hosts `<prefix>w1..wN`
(2 default instances each, the CLI installed by site.yml's atom_workerctl role); the control host's
address is added to gearmand's allowlist, as the fleet `status` and the bench's sampler read gearmand
from the control host.
"""

import socket
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from labhosts import LabHosts  # noqa: E402

INSTANCES = 2  # atom_worker_instances on every worker host


def inventory(prefix: str, workers: int) -> dict:
    return {"all": {"children": {
        "gearman_job_servers": {"hosts": {f"{prefix}jobs": None},
                                "vars": {"gearman_job_server_listen_address": "{{ ansible_host }}"}},
        "atom_web": {"hosts": {f"{prefix}web": None}},
        "atom_workers": {"hosts": {f"{prefix}w{i}": None for i in range(1, workers + 1)},
                         "vars": {"atom_worker_instances": INSTANCES}},
    }}}


def control_address(server) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(server)
        return probe.getsockname()[0]


def boot(prefix: str, workers: int, workdir: Path, converge: bool = True) -> tuple[LabHosts, dict]:
    """Boot (kept if running) and converge with the CLI; the generated inventory as a dict."""
    workdir.mkdir(parents=True, exist_ok=True)
    hosts = LabHosts(inventory(prefix, workers), workdir)
    hosts.up()
    generated = yaml.safe_load(hosts.inventory.read_text())
    jobs = generated["all"]["children"]["gearman_job_servers"]
    address = next(iter(jobs["hosts"].values()))["ansible_host"]
    jobs.setdefault("vars", {})["gearman_job_server_allowed_addresses"] = [control_address((address, 4730))]
    hosts.inventory.write_text(yaml.safe_dump(generated, sort_keys=False))
    if converge:
        # 24 worker hosts converge in batches of ansible.cfg's forks (10) on 2 shared cores: allow an hour.
        result = hosts.playbook("playbooks/lab/site.yml", with_cli=True, timeout=3600)
        if result.returncode != 0:
            raise SystemExit(f"site.yml failed: {result}")
    return hosts, generated
