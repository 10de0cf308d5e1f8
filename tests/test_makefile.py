"""What a fresh machine's `make` does before anything is built (issue 12 §2), run for real where it is cheap:
the venv's stamp lives inside the venv (deleting .venv is noticed), Debian's Python is checked before a venv
is made, what `clean` and `distclean` remove, and the lab's debootstrap mirror setting.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools" / "lab"))

from atomlab import golden  # noqa: E402
from atomlab.run import LabError  # noqa: E402


def make(*args, check=False):
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO), *args], capture_output=True,
                          text=True, timeout=60, check=check)


@pytest.fixture()
def places(tmp_path):
    """A venv and a stamps folder of the test's own, the Debian packages' stamp already there (no apt-get)."""
    venv, stamps = tmp_path / "venv", tmp_path / "build"
    stamps.mkdir()
    (stamps / "apt").touch()
    return venv, stamps


def test_deleting_the_venv_is_noticed(places):
    venv, stamps = places
    args = [f"VENV={venv}", f"STAMPS={stamps}", "-n", "venv"]
    # Control: a venv whose stamp is newer than requirements.txt and pyproject.toml is left alone.
    venv.mkdir()
    (venv / ".installed").touch()
    assert "-m venv" not in make(*args).stdout
    # Gone: the next make builds it again.
    (venv / ".installed").unlink()
    venv.rmdir()
    planned = make(*args).stdout
    assert f"/usr/bin/python3 -m venv --clear {venv}" in planned, planned


def test_a_python_older_than_3_11_is_refused_before_a_venv_is_made(places, tmp_path):
    venv, stamps = places
    old = tmp_path / "python3.10"
    old.write_text('#!/bin/sh\n[ "$1" = -V ] && { echo "Python 3.10.12"; exit 0; }\nexit 1\n')
    old.chmod(0o755)
    proc = make(f"VENV={venv}", f"STAMPS={stamps}", f"PYTHON={old}", "venv")
    assert proc.returncode != 0
    assert f"{old} is Python 3.10.12; this needs Python 3.11 or newer (Debian 12)" in proc.stderr, proc.stderr
    assert not venv.exists()
    # Control: the same check passes with Debian's Python (the dry run stops before anything is made).
    check = subprocess.run(["/usr/bin/python3", "-c", "import sys; sys.exit(sys.version_info < (3, 11))"],
                           check=False)
    assert check.returncode == 0


def test_clean_removes_the_lab_hosts_and_distclean_also_what_the_first_demo_built():
    clean = make("-n", "clean").stdout
    assert "tools/lab/lab down" in clean and "rm -rf" not in clean, clean
    dist = make("-n", "distclean").stdout
    assert "tools/lab/lab down" in dist
    assert "rm -rf .venv build atom_workerctl.egg-info" in dist, dist
    assert "rm -rf /var/lib/atom-lab/golden-*" in dist, dist


def test_the_debootstrap_mirror_defaults_to_debians_and_can_be_set(monkeypatch):
    monkeypatch.delenv(golden.MIRROR_ENV, raising=False)
    assert golden._mirror() == "http://deb.debian.org/debian"
    monkeypatch.setenv(golden.MIRROR_ENV, "http://mirror.example.org/debian")
    assert golden._mirror() == "http://mirror.example.org/debian"
    for bad in ("mirror.example.org/debian", "ftp://x/debian", "http://a b"):
        monkeypatch.setenv(golden.MIRROR_ENV, bad)
        with pytest.raises(LabError, match="ATOM_LAB_MIRROR=.*not an http://, https:// or file:// URL"):
            golden._mirror()


def test_apt_packages_names_what_the_makefile_and_the_lab_run():
    listed = {ln.split("#")[0].strip() for ln in (REPO / "apt-packages.txt").read_text().splitlines()} - {""}
    # The commands `make demo` and `make test` need on a minimal Debian 12, by the package that brings each.
    needed = {"make", "git", "python3", "python3-venv", "debootstrap", "systemd-container", "openssh-client",
              "iproute2", "util-linux", "python3-dev", "gcc", "libsystemd-dev", "pkg-config"}
    assert needed <= listed, needed - listed
    assert os.path.exists("/usr/bin/python3")  # the Makefile's PYTHON
