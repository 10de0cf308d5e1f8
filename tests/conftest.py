"""Test order: the longest lab modules first.

`make test` runs two modules at a time (pytest-xdist, `--dist loadfile --no-loadscope-reorder`): each test
worker takes the next module in collection order when it is free. Left to itself xdist would start with
the modules holding the most tests (the quick unit modules) and leave the few-but-long lab modules for
last, where one of them runs alone at the end. Starting the longest first lets the short ones fill the
gaps. The list is ordered by the module times of the last timed run (README: Tests and CI); a module not
listed keeps its place after them, lab modules before the rest.
"""

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from standin import Gearmand, Worker

LONGEST_FIRST = [
    "tests/roles/test_roles_restarts_lab.py",
    "tests/fleet/test_fleet_lab.py",
    "tests/roles/test_gearmand_firewall_lab.py",
    "tests/molecule/test_molecule_lab.py",
    "tests/cli/test_doctor_fixes_lab.py",
    "tests/drills/test_drills_lab.py",
    "tests/cli/test_cli_lab.py",
    "tests/roles/test_notify_lab.py",
    "tests/circus/test_circus_lab.py",
    "tests/roles/test_metrics_lab.py",
    "tests/drills/test_hard_crash_lab.py",
    "tests/drills/test_hostile_input_lab.py",
    "tests/security/test_security_lab.py",
    "tests/roles/test_roles_lab.py",
    "tests/fleet/test_fleet_cli_lab.py",
    "tests/roles/test_collection_lab.py",
]
REPO = Path(__file__).resolve().parents[1]


def _rank(item) -> tuple[int, int]:
    path = Path(str(item.fspath)).resolve().relative_to(REPO).as_posix()
    if path in LONGEST_FIRST:
        return (0, LONGEST_FIRST.index(path))
    return (1, 0) if path.endswith("_lab.py") else (2, 0)


def pytest_collection_modifyitems(session, config, items):
    missing = [p for p in LONGEST_FIRST if not (REPO / p).is_file()]
    if missing:  # a renamed module would silently lose its place
        raise pytest.UsageError(f"tests/conftest.py LONGEST_FIRST names modules that do not exist: {missing}")
    items.sort(key=_rank)  # stable: tests keep their file order within a module


# -- the AtoM stand-in's local tests (a throw-away gearmand, the workers a test starts) ---------------------------
@pytest.fixture
def gearmand() -> Iterator[Gearmand]:
    with Gearmand() as g:
        yield g


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    """Workers a test starts; whatever still runs is killed at teardown."""
    started: list[Worker] = []
    yield started
    for w in started:
        w.stop(signal.SIGKILL)
