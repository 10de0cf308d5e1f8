"""The roles' own modules, run as Ansible runs them (a JSON file of arguments), on this machine.

atom_files writes only what differs, attributes alone without a new file, content by an atomic rename, and
nothing in check mode. atom_host_probe answers every kind of read, null where there is nothing to read.
The lab tests use both on real hosts (tests/roles/test_roles_lab.py: a converge repairs a damaged host).
"""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIBRARY = REPO / "roles/atom_worker/library"


def run_module(name, tmp_path, check_mode=False, **args):
    argfile = tmp_path / f"{name}-args.json"
    argfile.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {**args, "_ansible_check_mode": check_mode}}))
    proc = subprocess.run([sys.executable, str(LIBRARY / f"{name}.py"), str(argfile)],
                          capture_output=True, text=True, check=False)
    result = json.loads(proc.stdout)
    assert not result.get("failed"), result
    return result


def files(tmp_path, **content):
    return [{"dest": str(tmp_path / name), "content": text, "mode": "0600" if name == "b" else "0644"}
            for name, text in content.items()]


def test_atom_files_writes_only_what_differs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    first = run_module("atom_files", tmp_path, files=files(tmp_path, a="one\n", b="two\n"))
    assert first["changed"] and first["changed_files"] == [str(a), str(b)]
    assert (a.read_text(), b.read_text()) == ("one\n", "two\n")
    assert (a.stat().st_mode & 0o777, b.stat().st_mode & 0o777) == (0o644, 0o600)

    again = run_module("atom_files", tmp_path, files=files(tmp_path, a="one\n", b="two\n"))
    assert not again["changed"] and again["changed_files"] == []

    # A mode alone is set in place (the same inode); a content is a new file renamed over the old one.
    a.chmod(0o600)
    inode_a, inode_b = a.stat().st_ino, b.stat().st_ino
    fixed = run_module("atom_files", tmp_path, files=files(tmp_path, a="one\n", b="three\n"))
    assert fixed["changed_files"] == [str(a), str(b)]
    assert a.stat().st_mode & 0o777 == 0o644 and a.stat().st_ino == inode_a
    assert b.read_text() == "three\n" and b.stat().st_ino != inode_b and b.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".atom-files-")) == []


def test_atom_files_check_mode_reports_and_writes_nothing(tmp_path):
    a = tmp_path / "a"
    a.write_text("old\n")
    checked = run_module("atom_files", tmp_path, check_mode=True, files=files(tmp_path, a="new\n", b="x"))
    assert checked["changed_files"] == [str(a), str(tmp_path / "b")]
    assert a.read_text() == "old\n" and not (tmp_path / "b").exists()


def test_atom_host_probe_answers_every_read(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "file").write_bytes(b"text\n")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    os.chmod(tmp_path / "real" / "file", 0o640)
    missing = str(tmp_path / "missing")
    broken = tmp_path / "broken"  # a script whose interpreter is gone, as in a venv after a Python upgrade
    broken.write_text("#!/no/such/python3\n")
    broken.chmod(0o755)
    found = run_module(
        "atom_host_probe", tmp_path,
        stat=[str(tmp_path / "link"), str(tmp_path / "real/file"), missing],
        realpath=[str(tmp_path / "link"), missing],
        sha256=[str(tmp_path / "real/file"), missing],
        read=[str(tmp_path / "link/file"), missing],
        users=["root", "no-such-user-x"], groups=["root", "no-such-group-x"],
        resolve=["127.0.0.1", "no-such-host.invalid"],
        glob=[str(tmp_path / "real/*")],
        packages=["dpkg", "no-such-package-x"],
        units=["atom-worker@1.service"],
        commands=[["sh", "-c", "echo out; echo err >&2; exit 3"], ["true"], ["/no/such/command-x"],
                  [str(broken)]],
    )
    assert found["stat"][str(tmp_path / "link")] | {"uid": 0} == {
        "exists": True, "type": "link", "target": str(tmp_path / "real"), "mode": "0777", "uid": 0,
        "gid": 0, "owner": "root", "group": "root"}
    assert found["stat"][str(tmp_path / "real/file")]["mode"] == "0640"
    assert found["stat"][missing] == {"exists": False}
    assert found["realpath"] == {str(tmp_path / "link"): str(tmp_path / "real"), missing: None}
    assert found["sha256"] == {str(tmp_path / "real/file"): hashlib.sha256(b"text\n").hexdigest(), missing: None}
    assert found["read"] == {str(tmp_path / "link/file"): "text\n", missing: None}
    assert found["users"]["root"].startswith("root:x:0:0:") and found["users"]["no-such-user-x"] is None
    assert found["groups"] == {"root": 0, "no-such-group-x": None}
    assert found["resolve"] == {"127.0.0.1": ["127.0.0.1"], "no-such-host.invalid": None}
    assert found["glob"] == {str(tmp_path / "real/*"): [{"path": str(tmp_path / "real/file"), "type": "file"}]}
    version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "dpkg"], capture_output=True, text=True,
                             check=True).stdout
    assert found["packages"] == {"dpkg": version, "no-such-package-x": None}
    # Units are answered where systemd is PID 1 (the lab's role tests); elsewhere the probe says so.
    booted = os.path.isdir("/run/systemd/system")
    assert found["systemd"] == booted
    if not booted:
        assert found["units"] == {}
    else:
        assert found["units"]["atom-worker@1.service"]["LoadState"] in ("loaded", "not-found")
    assert found["commands"][0] == {"rc": 3, "stdout": "out\n", "stderr": "err\n"}
    assert found["commands"][1]["rc"] == 0
    assert found["commands"][2]["rc"] == 127 and "command-x" in found["commands"][2]["stderr"]
    assert found["commands"][3]["rc"] == 127 and str(broken) in found["commands"][3]["stderr"]
    assert found["changed"] is False


def test_stat_is_tells_a_path_as_wanted_from_one_that_is_not(tmp_path):
    """The filter the roles skip a step with: a probe's stat entry against the wanted type and attributes."""
    spec = importlib.util.spec_from_file_location("filters", REPO / "roles/atom_worker/filter_plugins/atom_worker.py")
    filters = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(filters)
    (tmp_path / "d").mkdir(mode=0o755)
    (tmp_path / "d").chmod(0o755)
    (tmp_path / "l").symlink_to(tmp_path / "d")
    paths = [str(tmp_path / n) for n in ("d", "l", "missing")]
    d, link, missing = (run_module("atom_host_probe", tmp_path, stat=paths)["stat"][p] for p in paths)
    stat_is = filters.atom_worker_stat_is
    assert stat_is(d, "dir", "0755", "root", "root") and stat_is(d, "dir")
    assert not stat_is(d, "dir", "0700") and not stat_is(d, "dir", owner="www-data") and not stat_is(d, "file")
    assert stat_is(link, "link", target=str(tmp_path / "d")) and not stat_is(link, "link", target="/elsewhere")
    assert not stat_is(link, "dir") and not stat_is(missing, "dir") and not stat_is(None, "dir")
