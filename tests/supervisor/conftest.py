"""The supervisord lab tests' host, booted and converged once per session (supervisor_lab.py says how).

The constants and the SupervisorLab class live in supervisor_lab.py, which the tests import by that name: a
module imported as `conftest` is whichever conftest.py pytest loaded last (tests/circus has one too).
"""

import os
import time

import pytest
from labhosts import LabHosts, build_project_wheel
from supervisor_lab import INVENTORY, SupervisorLab


@pytest.fixture(scope="session")
def supervisor_lab(tmp_path_factory):
    work = tmp_path_factory.mktemp("supervisor-lab")
    wheel = str(build_project_wheel(work / "wheel"))
    hosts = LabHosts(INVENTORY, work)
    hosts.down()
    hosts.up()
    lab = SupervisorLab(hosts, wheel)
    try:
        started = time.monotonic()
        lab.converge = lab.playbook()
        assert lab.converge.returncode == 0, lab.converge
        lab.converge_seconds = time.monotonic() - started
        lab.wait_running()
        yield lab
    finally:
        if not os.environ.get("ATOM_KEEP_LAB"):
            hosts.down()
