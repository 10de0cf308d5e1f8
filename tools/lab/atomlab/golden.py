"""The golden rootfs: Debian bookworm with systemd, built once with debootstrap and cached.

Every lab host boots as an overlay on it. The cache key is a hash of the recipe (this file and the package
lists), so changing the recipe rebuilds the image and nothing else does.
"""
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

from . import paths
from .run import LabError, progress, run

SUITE = "bookworm"
# The Debian mirror debootstrap and the image's first apt-get use. Not part of the recipe hash: any mirror
# serves the same packages, so a mirror change alone rebuilds nothing.
MIRROR_ENV = "ATOM_LAB_MIRROR"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
RECIPE_FILES = ("packages-base.txt", "packages-served.txt", "pip-served.txt")
DEBOOTSTRAP_PHASES = re.compile(
    r"I: (Retrieving Release|Resolving dependencies|Extracting|Installing core|Unpacking the base|"
    r"Configuring the base|Base system installed)"
)


def _package_list(name: str) -> list[str]:
    lines = (paths.LAB_DIR / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def recipe_hash() -> str:
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for name in RECIPE_FILES:
        digest.update((paths.LAB_DIR / name).read_bytes())
    return digest.hexdigest()[:12]


def golden_path() -> Path:
    return paths.STATE / f"golden-{recipe_hash()}"


def ensure_golden() -> Path:
    """Return the cached image for the current recipe, building it first if needed."""
    target = golden_path()
    if (target / ".complete").exists():
        return target
    mirror = _mirror()  # a bad value stops here, before anything is written
    paths.STATE.mkdir(parents=True, exist_ok=True)
    work = target.with_name(target.name + ".tmp")
    if work.exists():
        _umount_below(work)
        shutil.rmtree(work)
    progress(f"building the golden image {target.name} (debootstrap, a few minutes the first time)")
    _debootstrap(work, mirror)
    _chroot_setup(work)
    (work / ".complete").write_text(recipe_hash() + "\n")
    work.rename(target)
    _remove_stale_images(keep=target)
    progress("golden image ready")
    return target


def _mirror() -> str:
    mirror = os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR
    if not re.fullmatch(r"(https?|file)://\S+", mirror):
        raise LabError(f"{MIRROR_ENV}={mirror!r}: not an http://, https:// or file:// URL of a Debian mirror")
    return mirror


def _debootstrap(root: Path, mirror: str) -> None:
    include = ",".join(_package_list("packages-base.txt"))
    cmd = ["debootstrap", "--variant=minbase", f"--include={include}", SUITE, str(root), mirror]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = []
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-5:]
        if DEBOOTSTRAP_PHASES.search(line):
            progress("debootstrap: " + line.strip()[3:])
    if proc.wait() != 0:
        raise LabError("debootstrap failed: " + " | ".join(tail))


def _chroot(root: Path, *args: str, capture=False):
    env_cmd = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND=noninteractive", "LANG=C.UTF-8"]
    return run(["chroot", str(root), *env_cmd, *args], capture=capture, quiet=not capture)


def _chroot_setup(root: Path) -> None:
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    run(["mount", "-t", "proc", "proc", str(root / "proc")])
    try:
        _serve_packages(root)
    finally:
        run(["umount", str(root / "proc")], check=False)
    _serve_python_packages(root)
    _host_identity(root)
    _quiet_units(root)
    _dpkg_without_fsync(root)


def _serve_packages(root: Path) -> None:
    """Download (not install) the roles' packages and make them a local, offline apt repository."""
    served = _package_list("packages-served.txt")
    progress(f"downloading {len(served)} packages the roles install into the image's local apt repository")
    _chroot(root, "apt-get", "update", "-qq")
    _chroot(root, "apt-get", "install", "-y", "-qq", "--download-only", *served)
    repo = root / "opt/lab-apt"
    repo.mkdir(parents=True)
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        shutil.move(str(deb), repo / deb.name)
    index = _chroot(root, "sh", "-c", "cd /opt/lab-apt && apt-ftparchive packages .", capture=True).stdout
    (repo / "Packages").write_text(index)
    (root / "etc/apt/sources.list").write_text("deb [trusted=yes] file:/opt/lab-apt ./\n")
    for stale in (root / "var/lib/apt/lists").glob("*_*"):
        stale.unlink()
    _chroot(root, "apt-get", "update", "-qq")


def _serve_python_packages(root: Path) -> None:
    progress("downloading Python packages for the hosts into /opt/lab-pip")
    target = root / "opt/lab-pip"
    target.mkdir(parents=True)
    run(["python3", "-m", "pip", "download", "-q", "-d", str(target),
         "-r", str(paths.LAB_DIR / "pip-served.txt")], quiet=True)


def _host_identity(root: Path) -> None:
    """Each host gets its own machine-id and hostname at boot; the image carries neither."""
    (root / "etc/hostname").unlink(missing_ok=True)
    (root / "etc/machine-id").write_text("")
    dbus_id = root / "var/lib/dbus/machine-id"
    dbus_id.unlink(missing_ok=True)
    dbus_id.parent.mkdir(parents=True, exist_ok=True)
    dbus_id.symlink_to("/etc/machine-id")
    (root / "root/.ssh").mkdir(mode=0o700, exist_ok=True)


def _quiet_units(root: Path) -> None:
    """Timers that would reach for the network, which lab hosts do not have."""
    for unit in ("apt-daily.timer", "apt-daily-upgrade.timer"):
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")


def _dpkg_without_fsync(root: Path) -> None:
    """Lab hosts are thrown away, never power-cut mid-install: dpkg need not fsync every file it unpacks.
    The roles' package installs take about 15% less time (tools/lab/README.md)."""
    (root / "etc/dpkg/dpkg.cfg.d/atom-lab-unsafe-io").write_text(
        "# atom-lab: disposable test hosts, no fsync per unpacked file\nforce-unsafe-io\n")


def _umount_below(root: Path) -> None:
    for line in reversed(Path("/proc/mounts").read_text().splitlines()):
        mountpoint = line.split()[1]
        if mountpoint.startswith(str(root) + "/"):
            run(["umount", "-l", mountpoint], check=False)


def _remove_stale_images(keep: Path) -> None:
    """Drop images of older recipes, unless a host still boots from one (its `lower` file names it)."""
    in_use = {p.read_text().strip() for p in paths.HOSTS_DIR.glob("*/lower")}
    for other in paths.STATE.glob("golden-*"):
        if other != keep and str(other) not in in_use:
            shutil.rmtree(other, ignore_errors=True)
