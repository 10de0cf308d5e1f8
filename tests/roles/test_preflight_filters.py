"""The atom_worker role's preflight checks and drift decision as filters, on this machine (no Ansible run).

tasks/preflight.yml fails once per line atom_worker_preflight_errors and atom_worker_probe_errors return, and
tasks/main.yml includes the apply steps only when _atom_worker_drift names something; these filters decide
both. Each refusal here has its positive control (the sound values return nothing). The lab tests run the
same filters through Ansible (tests/roles/test_roles_lab.py: bad values, a repaired host, a no-change run).
"""

import copy
import hashlib
import sys
from pathlib import Path

import pytest

FILTERS = Path(__file__).resolve().parents[2] / "roles" / "atom_worker" / "filter_plugins"
sys.path.insert(0, str(FILTERS))

import atom_worker as aw  # noqa: E402
import atom_worker_preflight as pf  # noqa: E402

sys.path.remove(str(FILTERS))

VALUES = {
    "atom_worker_manager": "systemd", "atom_worker_root": "/srv/atom", "atom_worker_workers_key": "",
    "atom_worker_sites": [], "atom_worker_instances": 2, "atom_worker_types": [], "atom_worker_abilities": [],
    "atom_worker_max_job_count": 0, "atom_worker_max_mem_usage": 0, "atom_worker_pools": [],
    "atom_worker_user": "www-data", "atom_worker_group": "www-data", "atom_worker_restart": "always",
    "atom_worker_restart_sec": 30, "atom_worker_start_limit_interval_sec": "24h", "atom_worker_start_limit_burst": 3,
    "atom_worker_timeout_stop_sec": 90, "atom_worker_kill_signal": "SIGTERM", "atom_worker_gearman_servers": [],
    "atom_worker_gearman_group": "gearman_job_servers", "atom_worker_circus_service": "",
    "atom_worker_php": "/usr/bin/php", "atom_worker_recycle_helper": "/usr/local/lib/atom-worker/atom-worker-recycle",
}
CONTEXT = {"service_mgr": "systemd", "name_pattern": "^[a-z][a-z0-9_]*$", "host": "w1", "listen": {"gm": "10.0.0.5"}}


def model(values):
    return aw.atom_worker_model({
        "sites": values["atom_worker_sites"], "root": values["atom_worker_root"],
        "workers_key": values["atom_worker_workers_key"], "instances": values["atom_worker_instances"],
        "types": values["atom_worker_types"], "abilities": values["atom_worker_abilities"],
        "max_job_count": values["atom_worker_max_job_count"], "max_mem_usage": values["atom_worker_max_mem_usage"],
        "pools": values["atom_worker_pools"], "user": values["atom_worker_user"], "group": values["atom_worker_group"],
        "gearman_servers": values["atom_worker_gearman_servers"] or ["10.0.0.5:4730"]})


def errors(context=None, **changes):
    values = {**VALUES, **changes}
    return pf.atom_worker_preflight_errors(values, model(values), {**CONTEXT, **(context or {})})


def test_sound_values_pass():
    assert errors() == []
    assert errors(atom_worker_pools=[{"name": "serial", "instances": 1, "types": ["move"]}]) == []


@pytest.mark.parametrize("changes, context, needle", [
    ({"atom_worker_manager": "runit"}, None, "atom_worker_manager=runit is not a process manager this role knows"),
    ({}, {"service_mgr": "sysvinit"}, "atom_worker_manager=systemd needs systemd as PID 1; this host runs sysvinit."),
    ({"atom_worker_instances": -1}, None, "atom_worker_instances (site default, pool default)"),
    ({"atom_worker_instances": True}, None, "instances must be an integer >= 0 (got True)"),
    ({"atom_worker_pools": [{"name": "serial", "instances": 1}]}, None,
     "atom_worker_pools[0] (site default, pool serial) has no types"),
    ({"atom_worker_restart_sec": "soon"}, None, "atom_worker_restart_sec (got soon)"),
    ({"atom_worker_gearman_servers": ["jobs:99999"]}, None, "Job server jobs:99999 (atom_worker_gearman_servers"),
    ({}, {"listen": {"gm": None}}, "gm (group gearman_job_servers) listens on 127.0.0.1, which this worker host (w1)"),
    ({"atom_worker_sites": [{"name": "a-b", "root": "/srv/a"}]}, None, "atom_worker_sites[0].name=a-b: a site name"),
    ({"atom_worker_manager": "circus", "atom_worker_circus_endpoint": "tcp://127.0.0.1:5555",
      "atom_worker_circus_pubsub_endpoint": "ipc:///run/c/p", "atom_worker_circus_requirements": ["circus==0.19.0"],
      "atom_worker_circus_log_max_bytes": "50MB", "atom_worker_circus_log_backups": 5}, None,
     "got tcp://127.0.0.1:5555"),
    ({"atom_worker_php": "php"}, None, "atom_worker_php='php': must be an absolute path"),
])
def test_each_bad_value_is_one_line_naming_it(changes, context, needle):
    found = errors(context, **changes)
    assert len(found) == 1 and needle in found[0], found


def test_a_control_character_is_its_only_line():
    found = errors(atom_worker_start_limit_interval_sec="24h\nUser=root")
    assert len(found) == 1 and "holds a control character" in found[0], found


def test_a_job_server_on_its_own_loopback_is_fine_for_itself():
    assert errors(context={"listen": {"w1": "127.0.0.1"}}) == []
    assert errors(atom_worker_gearman_servers=["10.0.0.5:4730"], context={"listen": {"gm": "127.0.0.1"}}) == []


ROOT = "/srv/atom"
FILES = {"systemd": "/etc/systemd/system/atom-workers.target", "supervisor": "/etc/supervisor/conf.d/atom-worker.conf",
         "circus": "/etc/atom-worker/circus.ini"}
GEARMAN_YML = "all:\n  servers:\n    default: 127.0.0.1:4730\n  worker_types:\n    general: [a]\n    move: [b]\n"


def probe(**changes):
    found = {
        "stat": {FILES["supervisor"]: {"exists": False}, FILES["circus"]: {"exists": False},
                 f"{ROOT}/symfony": {"exists": True, "type": "file"}},
        "realpath": {ROOT: ROOT},
        "users": {"www-data": "www-data:x:33:33::/var/www:/usr/sbin/nologin"}, "groups": {"www-data": 33},
        "read": {f"{ROOT}/config/gearman.yml": GEARMAN_YML, f"{ROOT}/config/app.yml": "all:\n  x: 1\n",
                 "/etc/atom-worker/sites.json": None},
    }
    for key, value in changes.items():
        found[key] = {**found[key], **value}
    return found


def probe_errors(found, pools=None):
    values = {**VALUES, "atom_worker_root": ROOT, "atom_worker_pools": pools or []}
    context = {"state_file": "/etc/atom-worker/sites.json", "circus_unit": "", "circus_config": FILES["circus"],
               "files": FILES}
    return pf.atom_worker_probe_errors("systemd", model(values), found, context)


def test_a_ready_host_passes():
    assert probe_errors(probe(), pools=[{"name": "serial", "types": ["move"]}]) == []


@pytest.mark.parametrize("changes, pools, needle", [
    ({"stat": {FILES["supervisor"]: {"exists": True}}}, None,
     f"atom_worker_manager=systemd, but {FILES['supervisor']} exists: this host's workers run under supervisord."),
    ({"realpath": {ROOT: None}}, None, f"atom_worker_root: {ROOT} is not an AtoM root here"),
    ({"users": {"www-data": None}}, None, "passwd www-data does not exist on this host"),
    ({"read": {f"{ROOT}/config/gearman.yml": "all:\n  servers: [unclosed\n"}}, None,
     f"{ROOT}/config/gearman.yml is not valid YAML ("),
    ({"read": {f"{ROOT}/config/app.yml": "- a list\n"}}, None,
     f"{ROOT}/config/app.yml is not valid YAML (not a mapping)"),
    ({}, [{"name": "serial", "types": ["nope"]}], "type nope is not a key of worker_types"),
])
def test_each_unready_thing_is_one_line(changes, pools, needle):
    found = probe_errors(probe(**changes), pools)
    assert len(found) == 1 and needle in found[0], found


# -- the drift decision's parts -----------------------------------------------------------------------------------
def test_files_differ_compares_content_mode_and_owner():
    text = "unit\n"
    digest = hashlib.sha256(text.encode()).hexdigest()
    as_wanted = {"type": "file", "mode": "0644", "owner": "root", "group": "root"}
    spec = [{"dest": "/x", "content": text}]
    assert aw.atom_worker_files_differ(spec, {"stat": {"/x": as_wanted}, "sha256": {"/x": digest}}) == []
    for st, sha in (({**as_wanted, "mode": "0600"}, digest), ({**as_wanted, "owner": "www-data"}, digest),
                    (as_wanted, "0" * 64), ({"exists": False}, None), ({**as_wanted, "type": "link"}, digest)):
        assert aw.atom_worker_files_differ(spec, {"stat": {"/x": st}, "sha256": {"/x": sha}}) == ["/x"]
    # A spec's own mode is what counts (notify.json is 0600); a path the probe did not read differs.
    assert aw.atom_worker_files_differ([{**spec[0], "mode": "0600"}],
                                       {"stat": {"/x": {**as_wanted, "mode": "0600"}}, "sha256": {"/x": digest}}) == []
    assert aw.atom_worker_files_differ(spec, {"stat": {}, "sha256": {}}) == ["/x"]


def test_yaml_edits_due_uses_the_modules_own_edit():
    library = FILTERS.parent / "library"
    sys.path.insert(0, str(library))
    try:
        import atom_worker_yaml_keys as module
    finally:
        sys.path.remove(str(library))
    edits = [{"path": "/g", "keys": {"all.servers": {"default": "10.0.0.5:4730"}}}]
    current = module.edit(GEARMAN_YML, edits[0]["keys"])[0]
    due = aw.atom_worker_yaml_edits_due
    saved = sys.modules.get("ansible_collections.atom.workers.plugins.modules.atom_worker_yaml_keys")
    sys.modules["ansible_collections.atom.workers.plugins.modules.atom_worker_yaml_keys"] = module
    try:
        assert due(edits, {"/g": current}) == []
        assert due(edits, {"/g": GEARMAN_YML}) == ["/g"]
        assert due(edits, {"/g": None}) == ["/g"]
        # The module reads in text mode: a CRLF file it would leave alone is not due either.
        assert due(edits, {"/g": current.replace("\n", "\r\n")}) == []
        assert due(edits, {"/g": GEARMAN_YML.replace("\n", "\r\n")}) == ["/g"]
    finally:
        if saved is None:
            sys.modules.pop("ansible_collections.atom.workers.plugins.modules.atom_worker_yaml_keys")


def test_leftovers_are_what_the_model_does_not_want():
    pools = [{"unit_template": "atom-worker@.service", "units": ["atom-worker@1.service", "atom-worker@2.service"]}]
    targets = [{"name": "atom-workers.target"}]
    unit_dir = "/etc/systemd/system"
    on_host = {
        "units_loaded": {"atom-worker@1.service": {}, "atom-worker@3.service": {}},
        "glob": {"a": [{"path": f"{unit_dir}/atom-workers.target.wants/atom-worker@4.service", "type": "link"},
                       {"path": f"{unit_dir}/atom-worker@.service", "type": "file"},
                       {"path": f"{unit_dir}/atom-worker-old-x@.service", "type": "file"},
                       {"path": f"{unit_dir}/atom-workers-old.target", "type": "file"},
                       {"path": f"{unit_dir}/atom-workers.target", "type": "file"}]},
    }
    left = aw.atom_worker_leftovers(on_host, pools, targets)
    assert left == {"instances": ["atom-worker@3.service", "atom-worker@4.service"],
                    "targets": ["atom-workers-old.target"],
                    "files": ["atom-worker-old-x@.service", "atom-workers-old.target"]}
    clean = copy.deepcopy(on_host)
    clean["units_loaded"].pop("atom-worker@3.service")
    clean["glob"]["a"] = [e for e in clean["glob"]["a"] if "old" not in e["path"] and "@4" not in e["path"]]
    assert aw.atom_worker_leftovers(clean, pools, targets) == {"instances": [], "targets": [], "files": []}

