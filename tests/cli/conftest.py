"""Fixtures shared by the CLI's local modules."""

import pytest
from atom_workerctl import dbuswire  # tools/ is on pytest's path (pytest.ini)


@pytest.fixture
def bus(tmp_path, monkeypatch):
    """Where dbuswire connects: the test's socket as the system bus (no private socket of systemd's)."""
    path = tmp_path / "bus"
    monkeypatch.setattr(dbuswire, "PRIVATE_SOCKET", str(tmp_path / "no-private-socket"))
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={path}")
    return path
