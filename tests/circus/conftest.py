"""The private circusd of the local circus tests (circus_harness.py): one per test, killed at teardown."""

import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from circus_harness import CIRCUSD, Circusd


@pytest.fixture
def circusd(tmp_path, request):
    """A Circusd to start(); it and every process it started are killed at teardown."""
    if not CIRCUSD.exists():
        pytest.skip(f"{CIRCUSD} is missing (.venv/bin/pip install -r requirements.txt)")
    sockdir = Path(tempfile.mkdtemp(prefix="circ-"))  # ipc socket paths must stay short
    cd = Circusd(tmp_path, sockdir)
    failures = request.session.testsfailed
    yield cd
    if request.session.testsfailed > failures:  # this test failed: show what circusd saw
        sys.stderr.write(cd.diagnostics() + "\n")
    cd.stop()
    shutil.rmtree(sockdir, ignore_errors=True)
