"""Every Molecule scenario, run by Molecule itself (`molecule test -s NAME`: create, converge, idempotence,
verify, destroy) on lab hosts, as `make molecule` runs them.

They run from pytest so that `make test` can give them a test worker of their own: with
`-n 2 --dist loadfile` this module runs beside the other lab modules instead of after all of them. Each
scenario boots hosts whose names no other module uses (`r-mol-*`, `f-mol-*`, `sv-mol-*`, `cr-mol-*`).
"""

import os
import subprocess

import pytest
from labhosts import REPO, VENV_BIN

# The checkout's in-place collection (ansible.cfg): one link to plugins/. Molecule's prerun would install the
# repository over it (the scenarios turn prerun off); a scenario must leave it as it found it.
IN_PLACE = REPO / "collections" / "ansible_collections" / "atom" / "workers"
SCENARIOS = sorted(p.name for p in (REPO / "molecule").iterdir() if (p / "molecule.yml").is_file())


def test_every_scenario_is_collected():
    """The control for the parametrized test below: it runs the scenarios on disk, not a list kept here."""
    assert {"default", "fleet", "supervisor", "circus"} <= set(SCENARIOS)


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario(scenario, tmp_path):
    assert [p.name for p in IN_PLACE.iterdir()] == ["plugins"] and (IN_PLACE / "plugins").is_symlink()
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "ANSIBLE_NOCOLOR": "1", "NO_COLOR": "1"}
    log = tmp_path / f"molecule-{scenario}.log"
    with open(log, "w") as out:
        proc = subprocess.run([str(VENV_BIN / "molecule"), "test", "-s", scenario], cwd=REPO, env=env,
                              stdout=out, stderr=subprocess.STDOUT, timeout=1450, check=False)
    text = log.read_text()
    assert proc.returncode == 0, f"molecule test -s {scenario} exited {proc.returncode} (log {log}):\n{text[-6000:]}"
    # Molecule really ran its sequence: testinfra's verify ran tests and they passed.
    assert " passed" in text, text[-3000:]
    assert [p.name for p in IN_PLACE.iterdir()] == ["plugins"] and (IN_PLACE / "plugins").is_symlink(), \
        sorted(p.name for p in IN_PLACE.iterdir())
