"""Fleet commands reuse one ssh connection per host (ControlMaster/ControlPersist, as Ansible does): the
options the CLI gives ssh, read back with the real ssh's `-G` (its effective configuration, no connection),
and when the CLI gives none. That a second command really rides on the first one's connection is shown on
lab hosts by their sshd's logins (tests/fleet/test_fleet_cli_lab.py).
"""

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from atom_workerctl import fleet_ssh  # noqa: E402


@pytest.fixture()
def runtime(monkeypatch):
    # Short, as a real $XDG_RUNTIME_DIR (/run/user/UID) is: pytest's own folders are too long for a socket.
    folder = Path(tempfile.mkdtemp(prefix="awc-", dir="/tmp"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(folder))
    monkeypatch.delenv("ATOM_WORKERCTL_SSH_ARGS", raising=False)
    fleet_ssh.connection_reuse_args.cache_clear()
    yield folder
    fleet_ssh.connection_reuse_args.cache_clear()
    shutil.rmtree(folder)


def effective(argv: list[str]) -> dict[str, str]:
    """What the real ssh would use for this command line: `ssh -G` prints it without connecting."""
    dash = argv.index("--")
    proc = subprocess.run(["ssh", "-G", *argv[1:dash], argv[dash + 1]], capture_output=True, text=True,
                          check=True, timeout=10, env={**os.environ, "HOME": os.environ.get("HOME", "/root")})
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)


def test_a_host_is_reached_through_a_persistent_connection_in_a_private_folder(runtime):
    argv = fleet_ssh.Target("w1", "192.0.2.10", "root", 2222).ssh_argv(["atom-workerctl", "status"], 10)
    seen = effective(argv)
    folder = runtime / "atom-workerctl-ssh"
    assert seen["controlmaster"] == "auto" and seen["controlpersist"] == "60", seen
    # %C: one socket per (local host, address, port, user); ssh -G prints it expanded
    path = Path(seen["controlpath"])
    assert path.parent == folder and len(path.name) == 40 and all(c in "0123456789abcdef" for c in path.name)
    other = effective(fleet_ssh.Target("w2", "192.0.2.11", "root", 2222).ssh_argv(["x"], 10))
    assert other["controlpath"] != seen["controlpath"]
    mode = folder.lstat().st_mode
    assert stat.S_ISDIR(mode) and stat.S_IMODE(mode) == 0o700
    assert argv[-1] == "atom-workerctl status" and argv[-2] == "192.0.2.10"  # the command stays last


def test_the_users_and_the_inventorys_own_options_win(runtime, monkeypatch):
    # Control: without them, ours are in effect (the test above).
    # ControlPath=none is the way to turn it off: ControlMaster=no alone still uses a master already there.
    monkeypatch.setenv("ATOM_WORKERCTL_SSH_ARGS", "-o ControlPath=none")
    assert effective(fleet_ssh.Target("w1", "192.0.2.10").ssh_argv(["x"], 10)).get("controlpath", "none") == "none"
    monkeypatch.delenv("ATOM_WORKERCTL_SSH_ARGS")
    inventory = fleet_ssh.Target("w1", "192.0.2.10", ssh_args=["-o", "ControlPath=/tmp/theirs-%C",
                                                                  "-o", "ControlPersist=5m"])
    seen = effective(inventory.ssh_argv(["x"], 10))
    assert seen["controlpath"].startswith("/tmp/theirs-") and seen["controlpersist"] == "300", seen
    assert seen["controlmaster"] == "auto"  # what they did not set is still ours


@pytest.mark.parametrize("spoil", ["group", "symlink", "not_ours"])
def test_no_reuse_when_the_folder_is_not_private(runtime, spoil):
    folder = runtime / "atom-workerctl-ssh"
    if spoil == "group":
        folder.mkdir(mode=0o770)
        folder.chmod(0o770)
    elif spoil == "symlink":
        target = runtime / "elsewhere"
        target.mkdir(mode=0o700)
        folder.symlink_to(target)
    else:
        folder.mkdir(mode=0o700)
        os.chown(folder, 65534, 65534)
    assert fleet_ssh.connection_reuse_args() == []
    seen = effective(fleet_ssh.Target("w1", "192.0.2.10").ssh_argv(["x"], 10))
    assert seen["controlmaster"] == "false" and seen.get("controlpath", "none") == "none", seen
    # Control: the same folder made private again is used.
    if spoil == "symlink":
        folder.unlink()
    else:
        os.chown(folder, os.geteuid(), os.getegid())
        folder.chmod(0o700)
    fleet_ssh.connection_reuse_args.cache_clear()
    assert "ControlMaster=auto" in fleet_ssh.connection_reuse_args()


def test_no_reuse_when_the_socket_path_would_be_too_long(runtime, monkeypatch):
    deep = runtime / ("d" * 60)
    deep.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(deep))
    assert fleet_ssh.connection_reuse_args() == []
    # Control: the shorter folder is used (ssh binds the socket's temporary name, 17 bytes longer, first).
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    fleet_ssh.connection_reuse_args.cache_clear()
    assert "ControlMaster=auto" in fleet_ssh.connection_reuse_args()


def test_a_percent_sign_in_the_folder_is_not_read_as_a_token(runtime, monkeypatch):
    odd = runtime / "50%h"
    odd.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(odd))
    seen = effective(fleet_ssh.Target("w1", "192.0.2.10").ssh_argv(["x"], 10))
    assert Path(seen["controlpath"]).parent == odd / "atom-workerctl-ssh", seen
