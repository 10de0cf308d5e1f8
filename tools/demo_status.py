"""The last step of `make demo`: the workers' state, gearmand's view, then one job through the fleet.

Runs inside the lab network (`tools/lab/lab exec -- .venv/bin/python tools/demo_status.py`) and reaches
every host over ssh, as an operator would. The job is submitted from a web host exactly as AtoM's web
app does it (admin `status` first, then a background job), and shown completed by whichever worker took it.
"""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
INVENTORY = REPO / "inventory" / "lab" / "hosts.yml"
ATOM_ROOT = "/usr/share/nginx/atom"
JOB_CLASS = "arFindingAidJob"
WAIT_SECONDS = 60


def group_hosts(inventory: dict, group: str) -> list[str]:
    """Hosts of a group, its child groups' included (children are named, and defined at the top level)."""
    groups = inventory["all"].get("children") or {}
    node = groups.get(group) or {}
    names = list(node.get("hosts") or {})
    for child in node.get("children") or {}:
        names += [n for n in group_hosts(inventory, child) if n not in names]
    return names


def ssh(inventory: dict, host: str, command: str, check=True) -> subprocess.CompletedProcess:
    conn = inventory["all"]["vars"]
    args = ["ssh", "-i", conn["ansible_ssh_private_key_file"], *conn["ansible_ssh_common_args"].split(),
            "-o", "BatchMode=yes", f"{conn['ansible_user']}@{host}", command]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    if check and proc.returncode != 0:
        sys.exit(f"demo: {host}: `{command}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def section(title: str) -> None:
    width = shutil.get_terminal_size((100, 20)).columns
    print(f"\n== {title} " + "=" * max(0, min(width, 100) - len(title) - 4))


def show_workers(inventory: dict, workers: list[str]) -> None:
    for host in workers:
        section(f"{host}: worker units")
        has_cli = ssh(inventory, host, "command -v atom-workerctl", check=False).returncode == 0
        command = "atom-workerctl status" if has_cli else (
            "systemctl list-units --all --no-pager --plain --no-legend 'atom-worker*' 'atom-workers*'")
        print(ssh(inventory, host, command, check=False).stdout.rstrip())


def host_address(inventory: dict, host: str) -> str:
    for group in (inventory["all"].get("children") or {}).values():
        host_vars = ((group or {}).get("hosts") or {}).get(host)
        if host_vars and "ansible_host" in host_vars:
            return host_vars["ansible_host"]
    return host


def show_gearmand(inventory: dict, job_server: str) -> None:
    section(f"{job_server}: gearmand's view (FUNCTION  QUEUED  RUNNING  AVAILABLE WORKERS)")
    # gearmand listens on the host's lab address, not on localhost.
    print(ssh(inventory, job_server, f"gearadmin -h {host_address(inventory, job_server)} --status").stdout.rstrip())


def submit_and_follow(inventory: dict, web: str, workers: list[str]) -> int:
    section(f"{web}: submitting one {JOB_CLASS} as AtoM's web app does")
    submit = ssh(inventory, web, f"cd {ATOM_ROOT} && runuser -u www-data -- php symfony standin:submit "
                                 f"--class={JOB_CLASS}", check=False)
    print(submit.stdout.rstrip() or submit.stderr.rstrip())
    if submit.returncode != 0:
        return 1
    job_id = submit.stdout.split()[-1]
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        for host in workers:
            record = ssh(inventory, host, f"cat {ATOM_ROOT}/log/standin-record.jsonl 2>/dev/null", check=False).stdout
            for line in record.splitlines():
                event = json.loads(line)
                if event.get("event") == "job" and event.get("id") == job_id:
                    section("done")
                    print(f"job {job_id} completed on {host} by worker PID {event.get('pid')}")
                    return 0
        time.sleep(0.5)
    print(f"job {job_id} did not complete within {WAIT_SECONDS} s", file=sys.stderr)
    return 1


def main() -> int:
    inventory = yaml.safe_load(INVENTORY.read_text())
    workers = group_hosts(inventory, "atom_workers")
    show_workers(inventory, workers)
    show_gearmand(inventory, group_hosts(inventory, "gearman_job_servers")[0])
    return submit_and_follow(inventory, group_hosts(inventory, "atom_web")[0], workers)


if __name__ == "__main__":
    sys.exit(main())
