"""The private circusd of the local circus tests (circus_harness.py): one per test, killed at teardown."""

import pytest
from circus_harness import CIRCUSD, Circusd
from manager_tests import private_manager


@pytest.fixture
def circusd(tmp_path, request):
    """A Circusd to start(); it and every process it started are killed at teardown."""
    if not CIRCUSD.exists():
        pytest.skip(f"{CIRCUSD} is missing (.venv/bin/pip install -r requirements.txt)")
    yield from private_manager(request, lambda sockdir: Circusd(tmp_path, sockdir), "circ-")
