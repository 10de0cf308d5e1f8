"""Fleet commands reuse one ssh connection per host (ControlMaster/ControlPersist, as Ansible does): the
options the CLI gives ssh, read back with the real ssh's `-G` (its effective configuration, no connection),
and when the CLI gives none. That a second command really rides on the first one's connection is shown on
lab hosts by their sshd's logins (tests/fleet/test_fleet_cli_lab.py).
"""

import os
import shlex
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
    fleet_ssh.control_dir.cache_clear()
    yield folder
    fleet_ssh.control_dir.cache_clear()
    shutil.rmtree(folder)


def effective(argv: list[str]) -> dict[str, str]:
    """What the real ssh would use for this command line: `ssh -G` prints it without connecting."""
    dash = argv.index("--")
    # -F /dev/null: this machine's own ssh configuration is not the test's
    proc = subprocess.run(["ssh", "-G", "-F", "/dev/null", *argv[1:dash], argv[dash + 1]], capture_output=True,
                          text=True, check=True, timeout=10)
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)


def test_a_host_is_reached_through_a_persistent_connection_in_a_private_folder(runtime):
    argv = fleet_ssh.Target("w1", "192.0.2.10", "root", 2222).ssh_argv(["atom-workerctl", "status"], 10)
    seen = effective(argv)
    folder = runtime / "atom-workerctl-ssh"
    assert seen["controlmaster"] == "auto" and seen["controlpersist"] == "60", seen
    path = Path(seen["controlpath"])
    assert path.parent == folder and len(path.name) == 24 and all(c in "0123456789abcdef" for c in path.name)
    # The same destination, the same socket; another address, user, port or option, another socket.
    again = fleet_ssh.Target("w1-again", "192.0.2.10", "root", 2222).ssh_argv(["y"], 10)
    assert effective(again)["controlpath"] == seen["controlpath"]
    for other in (fleet_ssh.Target("w2", "192.0.2.11", "root", 2222),
                  fleet_ssh.Target("w1", "192.0.2.10", "atom", 2222),
                  fleet_ssh.Target("w1", "192.0.2.10", "root", 22),
                  fleet_ssh.Target("w1", "192.0.2.10", "root", 2222, ssh_args=["-o", "ProxyJump=bastion2"])):
        assert effective(other.ssh_argv(["x"], 10))["controlpath"] != seen["controlpath"], other.as_dict()
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


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root (CI runs as root)")
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
    assert fleet_ssh.connection_reuse_args(fleet_ssh.Target("w1"), []) == []
    seen = effective(fleet_ssh.Target("w1", "192.0.2.10").ssh_argv(["x"], 10))
    assert seen["controlmaster"] == "false" and seen.get("controlpath", "none") == "none", seen
    # Control: the same folder made private again is used.
    if spoil == "symlink":
        folder.unlink()
    else:
        os.chown(folder, os.geteuid(), os.getegid())
        folder.chmod(0o700)
    fleet_ssh.control_dir.cache_clear()
    assert "ControlMaster=auto" in fleet_ssh.connection_reuse_args(fleet_ssh.Target("w1"), [])


def test_two_sites_hosts_at_one_address_behind_different_jump_hosts_never_share_a_connection(runtime):
    # ssh's own %C would give both the same socket (it hashes local host, address, port and user only).
    site1 = fleet_ssh.Target("s1-w1", "10.0.0.5", "root", ssh_args=["-o", "ProxyJump=bastion1"])
    site2 = fleet_ssh.Target("s2-w1", "10.0.0.5", "root", ssh_args=["-o", "ProxyJump=bastion2"])
    paths = [effective(t.ssh_argv(["x"], 10)) for t in (site1, site2)]
    assert paths[0]["controlpath"] != paths[1]["controlpath"]
    assert [p["proxyjump"] for p in paths] == ["bastion1", "bastion2"]  # control: the options did reach ssh


def test_runtime_folder_not_ours_alone_falls_back_to_the_home_of_our_user(runtime, monkeypatch):
    import pwd

    home_cache = os.path.join(pwd.getpwuid(os.geteuid()).pw_dir, ".cache", "atom-workerctl-ssh")
    runtime.chmod(0o755)  # e.g. someone else's, kept by `sudo -E`
    assert fleet_ssh.control_dir() == home_cache
    # Control: 0700 again, it is the one used.
    runtime.chmod(0o700)
    fleet_ssh.control_dir.cache_clear()
    assert fleet_ssh.control_dir() == str(runtime / "atom-workerctl-ssh")


def test_no_reuse_when_the_socket_path_would_be_too_long(runtime, monkeypatch):
    deep = runtime / ("d" * 60)  # the folder's path must leave room for a 24-character name in 90 bytes
    deep.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(deep))
    assert fleet_ssh.control_dir() is None and fleet_ssh.connection_reuse_args(fleet_ssh.Target("w1"), []) == []
    # Control: the shorter folder is used (ssh binds the socket's temporary name, 17 bytes longer, first).
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    fleet_ssh.control_dir.cache_clear()
    assert "ControlMaster=auto" in fleet_ssh.connection_reuse_args(fleet_ssh.Target("w1"), [])


@pytest.mark.parametrize("name", ["50%h", "a b", "x$HOME", "q'uote"])
def test_no_reuse_from_a_folder_ssh_would_misread(runtime, monkeypatch, name):
    odd = runtime / name
    odd.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(odd))
    argv = fleet_ssh.Target("w1", "192.0.2.10").ssh_argv(["x"], 10)
    assert "ControlMaster=auto" not in argv
    assert effective(argv).get("controlpath", "none") == "none"  # and ssh still reads the command line


# Whether an open master is asked directly (sshmux.py) or ssh is started: only options that change nothing
# in a session keep the direct way (fleet_ssh._session_neutral).
NEUTRAL = ["", "-i /k -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null", "-oPort=2222 -p22",
           "-4p 22", "-vo Port=22", "-4C -vvv -q", "-J jump -o ProxyJump=j2", "-o 'LogLevel ERROR'",
           "-F /dev/null", "-A -o ForwardAgent=yes", "-X -Y -x", "-o SendEnv=LANG -o SetEnv=FOO=1", "-T"]
NOT_NEUTRAL = ["-o ControlPath=none", "-oControlMaster=no", "-S /x", "-M", "-t", "-tt", "-o RequestTTY=force",
               "-N", "-s", "-L 8080:a:80", "-R 1:a:2", "-D 1080", "-W a:1", "-O check", "-o RemoteCommand=x",
               "-o", "-4t", "--", "host"]


@pytest.mark.parametrize("words", NEUTRAL)
def test_options_that_change_nothing_in_a_session_keep_the_direct_way(words):
    assert fleet_ssh._session_neutral(shlex.split(words))
    # ssh reads them the same way: every word an option or its argument, the next word the destination.
    proc = subprocess.run(["ssh", "-G", *shlex.split(words), "destination.example"], capture_output=True, text=True,
                          check=True, timeout=10)
    settings = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert settings["hostname"] == "destination.example" and settings.get("sessiontype", "default") == "default"


@pytest.mark.parametrize("words", NOT_NEUTRAL)
def test_any_other_option_starts_ssh(words):
    assert not fleet_ssh._session_neutral(shlex.split(words))
