"""Reading the inventory that names the lab's hosts, and writing one Ansible can use to reach them."""
import copy
import re
from pathlib import Path

import yaml

from . import network, paths
from .run import LabError

HOST_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")


def load(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise LabError(f"cannot read inventory {path}: {exc}") from None
    if not isinstance(data, dict) or "all" not in data:
        raise LabError(f"inventory {path}: expected a YAML inventory with a top-level 'all' group")
    return data


def generated(count: int) -> dict:
    """`lab up --hosts N`: lab1 is the job server (and submits jobs as a web node), the rest are workers."""
    if not 1 <= count <= 40:
        raise LabError("--hosts takes a number from 1 to 40")
    names = [f"lab{i}" for i in range(1, count + 1)]
    workers = names[1:] or names
    return {"all": {"children": {
        "gearman_job_servers": {"hosts": {names[0]: None}},
        "atom_web": {"hosts": {names[0]: None}},
        "atom_workers": {"hosts": {n: None for n in workers}},
        "atom_standin": {"children": {"atom_web": None, "atom_workers": None}},
    }}}


def _groups(group: dict):
    yield group
    for child in ((group or {}).get("children") or {}).values():
        yield from _groups(child)


def host_names(inventory: dict) -> list[str]:
    names = []
    for group in _groups(inventory["all"]):
        for name in (group or {}).get("hosts") or {}:
            if name not in names:
                names.append(name)
    for name in names:
        if not HOST_NAME.match(str(name)):
            raise LabError(f"host name {name!r}: a lab host name is lowercase letters, digits and '-'")
    if not names:
        raise LabError("the inventory names no hosts")
    return names


def with_connection(inventory: dict, source: str) -> str:
    """The inventory as given, plus how to reach each host in the lab (address, key, user)."""
    out = copy.deepcopy(inventory)
    lab_vars = {
        "ansible_user": "root",
        "ansible_ssh_private_key_file": str(paths.SSH_KEY),
        # Only lab hosts skip ssh's host-key check (disposable hosts, addresses reused);
        # ansible.cfg keeps it on for every other inventory.
        "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
        "ansible_python_interpreter": "/usr/bin/python3",
        "atom_lab": True,
    }
    out["all"] = out["all"] or {}
    out["all"]["vars"] = {**(out["all"].get("vars") or {}), **lab_vars}
    for group in _groups(out["all"]):
        hosts = (group or {}).get("hosts") or {}
        for name in list(hosts):
            hosts[name] = {**(hosts[name] or {}), "ansible_host": network.address_of(name)}
    header = f"# Written by `tools/lab/lab up` from {source}; rewritten at every `up`: do not edit.\n"
    return header + yaml.safe_dump(out, sort_keys=False, default_flow_style=False)
