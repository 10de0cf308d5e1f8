"""The gearman_job_server role decides on the controller what drifted (vars/main.yml, _gearman_job_server_todo_*)
from its one probe, and includes tasks/apply.yml only then. Checked here without a lab host:

- the include and the steps name the same conditions, and every step has one (none runs unconditionally);
- the role's own conditions, evaluated by Ansible over a probe that saw the files exactly as the role's
  `template` tasks render them, find nothing to do: the `template` lookup renders byte for byte what the
  `template` action writes (otherwise every converge would include apply.yml);
- and the same conditions do find each kind of drift (the positive control of the line above).
The lab test (tests/roles/test_gearmand_firewall_lab.py) checks the same on a real job server.
"""

import copy
import hashlib
import json
import os
import re
import subprocess

import pytest
import yaml
from labhosts import repo_path

ROLE = repo_path("roles", "gearman_job_server")
TODO = re.compile(r"_gearman_job_server_todo_\w+")


def load(name):
    return yaml.safe_load((ROLE / "tasks" / name).read_text())


def flatten(tasks):
    for task in tasks:
        if "block" in task:
            yield from flatten(task["block"])
        else:
            yield task


def apply_steps():
    """Every task tasks/apply.yml runs, through its imports, in order."""
    return [task for step in load("apply.yml") for task in flatten(load(step["ansible.builtin.import_tasks"]))]


def when_text(task):
    when = task.get("when", [])
    return " ".join(when) if isinstance(when, list) else str(when)


def todo_names():
    return sorted(name for name in yaml.safe_load((ROLE / "vars" / "main.yml").read_text()) if TODO.fullmatch(name))


def test_the_include_and_the_steps_name_the_same_conditions():
    include = next(t for t in load("main.yml") if "ansible.builtin.include_tasks" in t)
    assert include["ansible.builtin.include_tasks"] == "apply.yml"
    in_include = set(TODO.findall(when_text(include)))
    in_steps = set()
    for task in apply_steps():
        if task.get("ansible.builtin.meta") == "flush_handlers":
            continue  # runs no module: the handlers it runs were notified by steps
        names = TODO.findall(when_text(task))
        assert names, f"{task['name']!r} has no _gearman_job_server_todo_* condition: it would run on every apply"
        in_steps |= set(names)
    assert in_include == in_steps == set(todo_names())
    # The preflight and the include always run and carry no step's tag (--skip-tags of one step must not skip
    # them, and with them every step); the steps keep their own tags, so --tags picks the same steps as before.
    step_tags = {tag for step in load("apply.yml") for tag in step["tags"]} - {"gearman_job_server"}
    preflight = next(t for t in load("main.yml") if t.get("ansible.builtin.import_tasks") == "preflight.yml")
    for task in (include, preflight):
        assert "always" in task["tags"] and not step_tags & set(task["tags"]), task["tags"]


def template_steps():
    """The role's template tasks: (src, dest expression, vars, mode, owner, group, todo name)."""
    out = []
    for task in apply_steps():
        args = task.get("ansible.builtin.template")
        if args:
            (todo,) = TODO.findall(when_text(task))
            out.append({"src": args["src"], "dest": args["dest"], "vars": task.get("vars", {}), "mode": args["mode"],
                        "owner": args["owner"], "group": args["group"], "todo": todo})
    return out


def folder_steps():
    return [task["ansible.builtin.file"]["path"] for task in apply_steps()
            if task.get("ansible.builtin.file", {}).get("state") == "directory"]


# An allowlist with IPv4 and IPv6 entries, extra arguments and the MySQL queue (a password with the characters
# a template could mangle); and a loopback job server with the other options.
CASES = {
    "allowlist-mysql": ({"gearman_job_server_listen_address": "10.0.0.5",
                         "gearman_job_server_allowed_addresses": ["10.0.1.0/24", "fd00::/64"],
                         "gearman_job_server_extra_args": ["--round-robin"],
                         "gearman_job_server_queue_type": "mysql", "gearman_job_server_mysql_host": "127.0.0.1",
                         "gearman_job_server_mysql_password": "p#w'd\"\\x%"}, True, True),
    "loopback-sqlite": ({"gearman_job_server_queue_durability": "clean-shutdown", "gearman_job_server_hardening": False,
                         "gearman_job_server_keepalive": False, "gearman_job_server_threads": 0}, False, False),
}
INVENTORY = {"all": {"hosts": {"localhost": {"ansible_connection": "local"}},
                     "children": {"atom_workers": {"hosts": {"w1": {"ansible_host": "10.0.2.3"}}},
                                  "atom_web": {"hosts": {"web1": None}}}}}
RESOLVED = {"10.0.2.3": ["10.0.2.3"], "web1": ["10.0.2.4", "fd00::4"]}
ACTIVE = {"ActiveState": "active", "SubState": "exited", "UnitFileState": "enabled", "LoadState": "loaded"}


def playbook(tmp_path, tasks, probe):
    """Run `tasks` on localhost with the role's defaults and vars, the probe's result being `probe`."""
    (tmp_path / "templates").unlink(missing_ok=True)
    (tmp_path / "templates").symlink_to(ROLE / "templates")
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(INVENTORY))
    play = [{"hosts": "localhost", "gather_facts": False,
             "vars_files": [str(ROLE / "defaults" / "main.yml"), str(ROLE / "vars" / "main.yml")],
             "vars": {"ansible_python_interpreter": "{{ ansible_playbook_python }}",
                      "_gearman_job_server_probe": probe},
             "tasks": tasks}]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play, sort_keys=False))
    env = {**os.environ, "ANSIBLE_CONFIG": str(repo_path("ansible.cfg")), "ANSIBLE_NOCOLOR": "1"}
    proc = subprocess.run([str(repo_path(".venv", "bin", "ansible-playbook")), "-i", str(tmp_path / "inventory.yml"),
                           str(tmp_path / "play.yml"), "-e", f"@{tmp_path / 'case.json'}"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def mutations(base, steps, folders, firewall, mysql):
    """(what, probe, the conditions that must then hold): one kind of drift each. Conditions are named by
    their suffix (_gearman_job_server_todo_<suffix>)."""
    out = []
    unit = "atom-gearman-firewall.service"
    units = lambda p: p["units"]  # noqa: E731
    stat = lambda p: p["stat"]  # noqa: E731

    def drift(what, expected, change):
        probe = copy.deepcopy(base)
        change(probe)
        out.append((what, probe, {f"_gearman_job_server_todo_{name}" for name in expected}))

    for step in steps:
        if not step["wanted"]:
            continue
        expected = [step["todo"].removeprefix("_gearman_job_server_todo_")]
        path = step["path"]
        drift(f"{path} content", expected, lambda p, path=path: p["sha256"].update({path: "0" * 64}))
        drift(f"{path} missing", expected, lambda p, path=path: (p["sha256"].update({path: None}),
                                                                 stat(p).update({path: {"exists": False}})))
        for key, value in (("mode", "0600"), ("owner", "nobody"), ("group", "nogroup")):
            drift(f"{path} {key}", expected,
                  lambda p, path=path, key=key, value=value: stat(p)[path].update({key: value}))
    for folder in folders:
        expected = {"/etc/systemd/system/gearman-job-server.service.d": ["dropin_dir"],
                    "/etc/atom-gearman": (["firewall_dir"] if firewall else []) + (["mysql_dir"] if mysql else [])}
        drift(f"{folder} mode", expected[folder], lambda p, folder=folder: stat(p)[folder].update({"mode": "0700"}))
    drift("a package missing", ["packages"], lambda p: p["packages_missing"].append("gearman-tools"))
    drift("gearmand stopped", ["gearmand"],
          lambda p: units(p)["gearman-job-server.service"].update({"ActiveState": "failed"}))
    drift("gearmand disabled", ["gearmand"],
          lambda p: units(p)["gearman-job-server.service"].update({"UnitFileState": "disabled"}))
    if firewall:
        drift("the table missing", ["firewall_reload"], lambda p: p["commands"][0].update({"rc": 1, "stdout": ""}))
        drift("the table emptied", ["firewall_reload"],
              lambda p: p["commands"][0].update({"stdout": "table inet atom_gearman {}"}))
        drift("nftables stopped (its start flushes)", ["nftables", "firewall_reload"],
              lambda p: units(p)["nftables.service"].update({"ActiveState": "inactive"}))
        # Started by the run, which loads the table: no reload on top.
        drift("the allowlist unit stopped, its table gone", ["firewall_start"],
              lambda p: (units(p)[unit].update({"ActiveState": "inactive"}), p["commands"][0].update({"rc": 1})))
        drift("the allowlist unit disabled", ["firewall_start"],
              lambda p: units(p)[unit].update({"UnitFileState": "disabled"}))
    else:
        drift("the allowlist unit left", ["firewall_remove"],
              lambda p: stat(p).update({f"/etc/systemd/system/{unit}": {"exists": True}}))
        drift("the allowlist file left", ["firewall_remove"],
              lambda p: stat(p).update({"/etc/atom-gearman/allowlist.nft": {"exists": True}}))
    if not mysql:
        drift("the MySQL options file left", ["mysql_remove"],
              lambda p: stat(p).update({"/etc/atom-gearman/gearmand-mysql.conf": {"exists": True}}))
    return out


@pytest.mark.parametrize("case", CASES)
def test_files_as_the_role_writes_them_are_no_drift_and_each_drift_is_seen(tmp_path, case):
    extra, firewall, mysql = CASES[case]
    (tmp_path / "case.json").write_text(json.dumps(extra))
    # 1. The role's own template tasks (its src and vars; dest here), as the `template` action renders them.
    steps = template_steps()
    render = [{"name": f"render {n}", "ansible.builtin.template": {"src": s["src"], "dest": str(tmp_path / f"{n}.out")},
               "vars": s["vars"]} for n, s in enumerate(steps)]
    # Their real destinations, as the role's variables say.
    for what, paths in (("dests", [s["dest"] for s in steps]), ("folders", folder_steps())):
        render.append({"name": what, "vars": {"_paths": paths}, "ansible.builtin.copy": {
            "content": "{{ _paths | to_json }}", "dest": str(tmp_path / f"{what}.json")}})
    playbook(tmp_path, render, {"resolve": RESOLVED})
    dests = json.loads((tmp_path / "dests.json").read_text())
    for n, step in enumerate(steps):
        step["path"] = dests[n]
        step["wanted"] = not (("firewall" in step["todo"] and not firewall) or ("mysql" in step["todo"] and not mysql))

    # 2. The probe of a host where each wanted file is exactly that content with the task's mode and owners.
    folders = sorted(set(json.loads((tmp_path / "folders.json").read_text())))
    base = {
        "resolve": RESOLVED,
        "sha256": {s["path"]: hashlib.sha256((tmp_path / f"{n}.out").read_bytes()).hexdigest()
                   for n, s in enumerate(steps) if s["wanted"]},
        "stat": {s["path"]: ({"exists": True, "type": "file", "mode": s["mode"], "owner": s["owner"],
                              "group": s["group"]} if s["wanted"] else {"exists": False}) for s in steps}
        | {f: {"exists": True, "type": "dir", "mode": "0755", "owner": "root", "group": "root"} for f in folders},
        "units": {u: dict(ACTIVE) for u in ("nftables.service", "atom-gearman-firewall.service",
                                            "gearman-job-server.service")},
        "commands": [{"rc": 0, "stderr": "", "stdout": "table inet atom_gearman {\n\tchain input {\n"
                      "\t\tcounter packets 0 bytes 0 reject with tcp reset\n\t}\n}\n"}] if firewall else [],
        "packages_missing": [],
    }
    cases = [("nothing", base, set())] + mutations(base, steps, folders, firewall, mysql)
    # Each case's probe as a task variable (above the role's vars), every condition's value to a file.
    values = "{{ dict(_names | zip(lookup('ansible.builtin.vars', *_names, wantlist=True))) | to_json }}"
    decide = [{"name": f"decide {n}", "vars": {"_gearman_job_server_probe": probe, "_names": todo_names()},
               "ansible.builtin.copy": {"content": values, "dest": str(tmp_path / f"decided-{n}.json")}}
              for n, (_, probe, _) in enumerate(cases)]
    playbook(tmp_path, decide, base)

    for n, (what, _, expected) in enumerate(cases):
        decided = json.loads((tmp_path / f"decided-{n}.json").read_text())
        assert all(isinstance(v, bool) for v in decided.values()), (what, decided)
        assert {name for name, value in decided.items() if value} == expected, what
