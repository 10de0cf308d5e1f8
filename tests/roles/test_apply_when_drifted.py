"""The atom_workerctl role and the lab's atom_standin role include their steps (tasks/apply.yml) only when
their read of the host found something out of place: the include's condition is the OR of named conditions
(vars/main.yml), and every step must run under one of those names. A step that ran under none of them
would be skipped on a host where only its part drifted, and never repair it; a name no step uses would
include the steps for nothing. Lab tests show the behaviour (tests/roles/test_production_defaults_lab.py,
tests/test_standin.py); this checks the wiring of every step, statically.
"""

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ROLES = {
    # role folder, the OR named by main.yml's include, the files apply.yml brings in
    "atom_workerctl": (REPO / "roles" / "atom_workerctl", "_atom_workerctl_drifted",
                       ["present.yml", "metrics.yml", "absent.yml"]),
    "atom_standin": (REPO / "tests" / "fixtures" / "roles" / "atom_standin", "_atom_standin_drifted", ["apply.yml"]),
}
NAME = re.compile(r"\b_atom_(?:workerctl|standin)_\w+")
# A variable that is only names joined by `or`: an OR of conditions, expanded to them.
OR_OF_NAMES = re.compile(r"^\{\{\s*(_\w+)(\s+or\s+_\w+)*\s*\}\}$")


def conditions(role_vars: dict, name: str) -> set:
    """The conditions an OR stands for (itself, when it is one condition)."""
    text = " ".join(str(role_vars.get(name, "")).split())
    if not OR_OF_NAMES.match(text):
        return {name}
    return set().union(*(conditions(role_vars, part) for part in NAME.findall(text)))


def ors(role_vars: dict, name: str) -> set:
    """The name and every OR inside it: a step may run under one of those too (its parts are in the include's)."""
    text = " ".join(str(role_vars.get(name, "")).split())
    if not OR_OF_NAMES.match(text):
        return set()
    return {name}.union(*(ors(role_vars, part) for part in NAME.findall(text)))


def steps(tasks: list, inherited: str = ""):
    """Every task of a task list with its `when` text, a block's `when` passed on to its tasks."""
    for task in tasks:
        when = inherited + " " + str(task.get("when", ""))
        if "block" in task:
            for part in ("block", "rescue", "always"):
                yield from steps(task.get(part, []), when)
        elif not any(key.endswith("import_tasks") for key in task):
            yield task["name"], when


@pytest.mark.parametrize("role", ROLES)
def test_every_step_runs_under_a_condition_of_the_include(role):
    folder, drifted, files = ROLES[role]
    role_vars = yaml.safe_load((folder / "vars" / "main.yml").read_text())
    names = conditions(role_vars, drifted)
    assert len(names) > 3, names  # the expansion found the OR's parts

    includes = [t for t in yaml.safe_load((folder / "tasks" / "main.yml").read_text())
                if t.get("ansible.builtin.include_tasks") == "apply.yml"]
    assert [t["when"] for t in includes] == [drifted]

    allowed = names | (ors(role_vars, drifted) - {drifted})
    used = set()
    for file in files:
        for step, when in steps(yaml.safe_load((folder / "tasks" / file).read_text())):
            mine = set(NAME.findall(when)) & allowed
            assert mine, f"{file}: {step!r} runs under none of {drifted}'s conditions (when: {when.strip()!r})"
            used |= set().union(*(conditions(role_vars, name) for name in mine))
    assert used == names, f"conditions of the include that no step uses: {names - used}"


def test_the_expansion_sees_a_missing_condition():
    """The check's positive control: a step whose condition is not in the OR is caught."""
    role_vars = {"_atom_standin_drifted": "{{ _atom_standin_a or _atom_standin_b }}"}
    names = conditions(role_vars, "_atom_standin_drifted")
    assert names == {"_atom_standin_a", "_atom_standin_b"}
    [(_, when)] = steps([{"name": "x", "when": "_atom_standin_c and _atom_standin_host.stat"}])
    assert not set(NAME.findall(when)) & names
