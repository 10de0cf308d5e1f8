"""Which host exports each site's gearmand view (atom_workerctl_metrics_functions: auto), as the role's own
expression (roles/atom_workerctl/vars/main.yml) computes it, by real Ansible templating on local hosts.

Each site's view must come from exactly one host of the play, also when sites live on different hosts
(tests/roles/test_metrics_lab.py shows the one-site case on lab hosts, with the series node_exporter serves).
"""

import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent

PLAY = """
- hosts: all
  gather_facts: false
  vars_files: [{vars}]
  tasks:
    - ansible.builtin.copy:
        content: "{{{{ _atom_workerctl_metrics_functions_auto }}}}"
        dest: "{out}/{{{{ inventory_hostname }}}}"
      delegate_to: localhost
"""


def choices(tmp_path, hosts: dict) -> dict:
    """host -> --functions, for an inventory of local hosts with these atom_worker_sites (None: unset)."""
    inventory = {"all": {"hosts": {h: {"ansible_connection": "local", **({"atom_worker_sites": [
        {"name": n} for n in sites]} if sites is not None else {})} for h, sites in hosts.items()}}}
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inventory))
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "play.yml").write_text(PLAY.format(vars=REPO / "roles/atom_workerctl/vars/main.yml", out=out))
    run = subprocess.run([str(VENV / "ansible-playbook"), "-i", str(tmp_path / "inventory.yml"),
                          str(tmp_path / "play.yml")], capture_output=True, text=True, check=False, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {h: (out / h).read_text() for h in hosts}


def exporters(result: dict, hosts: dict) -> dict:
    """site -> the hosts that export its view."""
    out: dict = {}
    for host, choice in result.items():
        mine = hosts[host] or ["default"]
        for site in mine if choice == "yes" else [] if choice == "no" else choice.split(","):
            out.setdefault(site, []).append(host)
    return out


def test_one_site_everywhere_the_first_host_exports_it(tmp_path):
    hosts = {"w2": None, "w1": None, "w3": None}
    result = choices(tmp_path, hosts)
    assert result == {"w1": "yes", "w2": "no", "w3": "no"}


def test_sites_on_different_hosts_each_exported_once(tmp_path):
    hosts = {"a1": ["archive", "library"], "b1": ["library", "museum"], "c1": ["museum"], "d1": None}
    result = choices(tmp_path, hosts)
    # b1 is first only for museum; c1 for nothing; d1 alone has the default site.
    assert result == {"a1": "yes", "b1": "museum", "c1": "no", "d1": "yes"}, json.dumps(result)
    assert {site: sorted(h) for site, h in exporters(result, hosts).items()} == {
        "archive": ["a1"], "library": ["a1"], "museum": ["b1"], "default": ["d1"]}
