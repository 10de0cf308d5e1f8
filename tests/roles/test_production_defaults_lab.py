"""Safe defaults for production runs, on a real lab host (issue 12, section 3).

- ansible.cfg keeps ssh host-key checking on: an inventory without the lab's relaxations cannot reach a
  lab host whose key it does not know, and reaches it once the key is in its known_hosts (ssh-keyscan).
- site.yml holds only what production runs; the lab's playbook adds the AtoM stand-in and imports it.
- roles/atom_workerctl with its defaults: the wheel from the control host, pinned by version and sha256,
  Debian's python3-pystemd, python3-yaml and python3-pymysql in a venv that sees them, no compiler or -dev
  package, a second run changes nothing, a wrong pin fails before anything changes, and
  `atom_workerctl_state: absent` removes what the role installed.

Run inside the lab network: tools/lab/lab exec -- .venv/bin/pytest tests/roles/test_production_defaults_lab.py
"""

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from labhosts import REPO, VENV_BIN, booted_per_module, build_project_wheel, repo_path

pytestmark = pytest.mark.timeout(900)

HOST = "pd-w1"
INVENTORY = {"all": {"children": {"atom_workers": {"hosts": {HOST: None}}}}}
INSTALL = "tests/cli/install.yml"
VENV, LINK = "/opt/atom-workerctl", "/usr/local/bin/atom-workerctl"
COMPLETION, WHEEL_DIR = "/etc/bash_completion.d/atom-workerctl", "/var/cache/atom-workerctl"
BUILD_TOOLS = ("gcc", "cpp", "python3-dev", "libpython3-dev", "libsystemd-dev", "pkg-config", "python3-pip")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with booted_per_module(tmp_path_factory, lambda hosts: hosts, prefix="pd") as make:
        yield make(INVENTORY)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    return build_project_wheel(tmp_path_factory.mktemp("pd-wheel"))


# The role's include of its steps (tasks/main.yml) and one of those steps (tasks/present.yml).
APPLY = ("TASK [atom_workerctl : Install, repair or remove atom-workerctl and its metrics timer "
         "(only what the read found out of place)]")
STEP = "TASK [atom_workerctl : Put the command on PATH]"


def applied(result) -> bool:
    """Whether the run included the role's steps on the host: the include's header, then `included:` rather
    than `skipping:` (Ansible's default output). A run that never reached the include is an error."""
    match = re.search(re.escape(APPLY) + r"\s*\*+\s*\n(included|skipping): ", result.stdout)
    assert match, result
    return match.group(1) == "included"


def install(hosts, wheel, **extra_vars):
    return hosts.playbook(INSTALL, extra_vars={"workerctl_wheel": str(wheel), **extra_vars})


def exists(hosts, path) -> bool:
    return hosts.run(HOST, f"test -e {shlex.quote(path)} || test -L {shlex.quote(path)}", check=False).returncode == 0


def installed(hosts, package) -> bool:
    """dpkg's view: the package is installed on the host."""
    out = hosts.run(HOST, f"dpkg-query -W -f '${{db:Status-Status}}' {package} 2>/dev/null", check=False).stdout
    return out.strip() == "installed"


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def installed_files(hosts) -> str:
    """Checksums of the copied wheel, its requirement and the installed package."""
    return hosts.run(HOST, f"md5sum {WHEEL_DIR}/* {VENV}/lib/python3*/site-packages/atom_workerctl/*.py").stdout


def lab_connection(hosts) -> dict:
    """The address and key `lab up` wrote for the host (without its ssh relaxations)."""
    inventory = yaml.safe_load(hosts.inventory.read_text())["all"]
    return {"ansible_host": hosts.address(HOST), "ansible_user": "root",
            "ansible_ssh_private_key_file": inventory["vars"]["ansible_ssh_private_key_file"]}


def ping(inventory_path) -> subprocess.CompletedProcess:
    return ansible([str(VENV_BIN / "ansible"), HOST, "-i", str(inventory_path), "-m", "ansible.builtin.ping"])


def ansible(argv) -> subprocess.CompletedProcess:
    # The repository's ansible.cfg, and ssh control sockets of this call only (a master another test left
    # open to the same address would skip the host-key check altogether). A short folder of its own: a unix
    # socket path may not exceed 107 bytes, and pytest's tmp_path under a test worker (popen-gw0/...) did.
    control_dir = tempfile.mkdtemp(prefix="cp-", dir="/tmp")
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control_dir),
           "ANSIBLE_NOCOLOR": "1"}
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=REPO, env=env, check=False)
    finally:
        for socket_path in Path(control_dir).iterdir():  # no ssh master left behind (ControlPersist keeps one)
            subprocess.run(["ssh", "-S", str(socket_path), "-O", "exit", "lab"], capture_output=True, check=False,
                           timeout=30)
        shutil.rmtree(control_dir, ignore_errors=True)


def test_ansible_cfg_checks_host_keys(hosts, tmp_path):
    # A user's inventory: address, user, key, nothing about host keys. Its known_hosts is a file of this
    # test (root's own ~/.ssh/known_hosts on this shared machine is out of the test's hands): empty first.
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    ssh_files = f"-o UserKnownHostsFile={known_hosts} -o GlobalKnownHostsFile=/dev/null"
    inventory = tmp_path / "user.yml"
    inventory.write_text(yaml.safe_dump({"all": {"hosts": {HOST: {
        **lab_connection(hosts), "ansible_ssh_common_args": ssh_files}}}}))
    unknown = ping(inventory)
    assert unknown.returncode != 0, unknown.stdout
    assert "Host key verification failed" in unknown.stdout + unknown.stderr, unknown.stdout + unknown.stderr
    assert known_hosts.read_text() == "", "ssh must not have added the key by itself"

    # The README's production command: `ansible-playbook -i inventory/examples/fleet.yml site.yml`, its job
    # server at this host's address (--tags never: only the plays' fact gathering connects; no role task runs).
    fleet = yaml.safe_load(repo_path("inventory", "examples", "fleet.yml").read_text())
    jobs1 = fleet["all"]["children"]["gearman_job_servers"]["hosts"]["jobs1"]
    jobs1.update({**lab_connection(hosts), "ansible_ssh_common_args": ssh_files})
    (tmp_path / "fleet.yml").write_text(yaml.safe_dump(fleet))
    site = [str(VENV_BIN / "ansible-playbook"), "-i", str(tmp_path / "fleet.yml"), "site.yml", "--limit", "jobs1",
            "--tags", "never"]
    refused = ansible(site)
    assert refused.returncode != 0, refused.stdout
    assert "Host key verification failed" in refused.stdout + refused.stderr, refused.stdout + refused.stderr
    assert re.search(r"^jobs1\s+: ok=0 .* unreachable=1 ", refused.stdout, re.M), refused.stdout
    assert known_hosts.read_text() == ""

    # Positive control: the same inventories, the host's key in known_hosts.
    address = lab_connection(hosts)["ansible_host"]
    scan = subprocess.run(["ssh-keyscan", "-t", "ed25519", address], capture_output=True, text=True, timeout=30,
                          check=True)
    assert address in scan.stdout
    known_hosts.write_text(scan.stdout)
    known = ping(inventory)
    assert known.returncode == 0 and "ping: pong" in known.stdout, known.stdout + known.stderr
    accepted = ansible(site)
    assert accepted.returncode == 0 and "unreachable=0" in accepted.stdout, accepted.stdout + accepted.stderr


def test_site_yml_holds_no_lab_plays():
    """The lab's stand-in is the lab playbook's; site.yml (what production runs) never names it."""
    site = repo_path("site.yml").read_text()
    lab = repo_path("playbooks", "lab", "site.yml").read_text()
    for marker in ("atom_standin", "atom_lab"):
        assert marker not in site, marker
        assert marker in lab, marker  # the same probe finds it where it belongs
    imports = [play.get("ansible.builtin.import_playbook") for play in yaml.safe_load(lab)]
    assert imports[-1] == "../../site.yml"


def test_install_uses_debian_pystemd_and_no_build_tools(hosts, wheel):
    first = install(hosts, wheel)
    assert first.returncode == 0 and first.changed() > 0, first
    again = install(hosts, wheel)
    assert again.returncode == 0 and again.changed() == 0, again
    # Nothing out of place: the role read the host, ran the command in that read, and included no step
    # (the control: the first run included them).
    assert applied(first) and STEP in first.stdout
    assert not applied(again) and STEP not in again.stdout, again

    for package in ("python3-pystemd", "python3-yaml", "python3-pymysql", "python3-venv"):
        assert installed(hosts, package), package  # also the positive control of the probe below
    assert [p for p in BUILD_TOOLS if installed(hosts, p)] == []

    # The CLI's venv imports Debian's pystemd (0.11.0) and PyYAML; pip put neither into the venv.
    probe = ("import importlib.metadata as m, pystemd.dbuslib, yaml; "
             "print(m.version('pystemd'), pystemd.dbuslib.__file__, yaml.__file__)")
    version, dbuslib, yaml_file = hosts.run(HOST, f'{VENV}/bin/python -c "{probe}"').stdout.split()
    assert version == "0.11.0"
    assert dbuslib.startswith("/usr/lib/python3/dist-packages/pystemd/")
    # `jobs` reads AtoM's job table with Debian's PyMySQL, not one pip put into the venv.
    pymysql_file = hosts.run(HOST, f'{VENV}/bin/python -c "import pymysql; print(pymysql.__file__)"').stdout.strip()
    assert pymysql_file.startswith("/usr/lib/python3/dist-packages/pymysql/"), pymysql_file
    assert yaml_file.startswith("/usr/lib/python3/dist-packages/")
    requirement = hosts.run(HOST, f"cat {WHEEL_DIR}/requirements.txt").stdout
    assert requirement.strip() == f"atom-workerctl=={wheel.name.split('-')[1]} --hash=sha256:{sha256(wheel)}"
    assert hosts.run(HOST, "atom-workerctl --version").stdout.strip().endswith(wheel.name.split("-")[1])
    assert "atom-workerctl" in hosts.run(HOST, f"cat {COMPLETION}").stdout


def test_a_wheel_that_is_not_the_pinned_one_changes_nothing(hosts, wheel):
    before = installed_files(hosts)
    wrong = install(hosts, wheel, atom_workerctl_wheel_sha256="0" * 64)
    assert wrong.returncode != 0
    assert "not the pinned atom_workerctl_wheel_sha256" in wrong.stdout, wrong
    assert wrong.changed() == 0, wrong
    assert installed_files(hosts) == before
    # Positive control: the right pin passes (and, installed already, changes nothing).
    right = install(hosts, wheel, atom_workerctl_wheel_sha256=sha256(wheel))
    assert right.returncode == 0 and right.changed() == 0, right


def test_a_converge_repairs_an_install_it_would_otherwise_skip(hosts, wheel):
    """The role reads what is installed once and skips apt, the copy, pip, the link and the completion
    when they are as wanted. Each skip must still see damage: a package removed, the wheel's copy altered,
    the package uninstalled from the venv, the link gone, the completion's mode. (The control: the
    converges of the tests above changed nothing once installed.)"""
    hosts.run(HOST, "apt-get remove -y -q python3-yaml >/dev/null")
    hosts.run(HOST, f"printf x >> {WHEEL_DIR}/{wheel.name} && {VENV}/bin/pip uninstall -y -q atom-workerctl "
                    f"&& rm {LINK} && chmod 0600 {COMPLETION}")
    assert not installed(hosts, "python3-yaml") and not exists(hosts, LINK)

    repaired = install(hosts, wheel)
    assert repaired.returncode == 0 and repaired.changed() > 0, repaired
    assert applied(repaired), repaired
    assert installed(hosts, "python3-yaml")
    assert hosts.run(HOST, f"sha256sum {WHEEL_DIR}/{wheel.name}").stdout.split()[0] == sha256(wheel)
    assert hosts.run(HOST, "atom-workerctl --version").stdout.strip().endswith(wheel.name.split("-")[1])
    assert hosts.run(HOST, f"stat -c %a {COMPLETION}").stdout.strip() == "644"
    again = install(hosts, wheel)
    assert again.returncode == 0 and again.changed() == 0, again
    assert not applied(again), again


def test_each_part_out_of_place_is_seen_and_repaired_alone(hosts, wheel):
    """One part damaged at a time (each alone makes the role include its steps, which repair it): the link,
    the completion script's text, a wheel of the same version rebuilt (another hash), the command broken
    (the probe's run of it fails), the wheel's folder mode, a venv made by another Python."""
    fresh = hosts.run(HOST, f"cat {COMPLETION}").stdout
    damage = {
        "link gone": (f"rm {LINK}", f"test -L {LINK}"),
        "completion edited": (f"echo '# edited' >> {COMPLETION}", f"! grep -q '# edited' {COMPLETION}"),
        "completion gone": (f"rm {COMPLETION}", f"test -f {COMPLETION}"),
        # The copy on the host stands for a rebuilt wheel: its hash is no longer the controller's file's.
        "wheel rebuilt": (f"printf x >> {WHEEL_DIR}/{wheel.name}",
                          f"test $(sha256sum < {WHEEL_DIR}/{wheel.name} | cut -d' ' -f1) = {sha256(wheel)}"),
        "command broken": (f"mv {VENV}/lib/python3.11/site-packages/atom_workerctl /root/awc-moved",
                           f"rm -rf /root/awc-moved && {VENV}/bin/atom-workerctl --version"),
        "wheel folder mode": (f"chmod 0700 {WHEEL_DIR}", f"test $(stat -c %a {WHEEL_DIR}) = 755"),
        # A Debian release upgrade, as the venv sees it: made by another Python (3.10 here), whose folder holds
        # the CLI and pip, while its python is now /usr/bin/python3's: neither the command nor the venv's pip
        # runs, so a reinstall with that pip cannot repair it; the venv is made afresh.
        "venv of another Python": (
            (f"sed -i 's/^version = .*/version = 3.10.4/' {VENV}/pyvenv.cfg "
             f"&& mv {VENV}/lib/python3.11 {VENV}/lib/python3.10"),
            (f"{VENV}/bin/atom-workerctl --version && {VENV}/bin/pip --version && test ! -e {VENV}/lib/python3.10 "
             f"&& grep -q '^version = 3.11' {VENV}/pyvenv.cfg")),
    }
    for what, (break_it, is_repaired) in damage.items():
        hosts.run(HOST, break_it)
        assert hosts.run(HOST, is_repaired, check=False).returncode != 0, what  # the damage is real
        repaired = install(hosts, wheel)
        assert repaired.returncode == 0 and repaired.changed() > 0, (what, repaired)
        assert applied(repaired), (what, repaired)
        assert hosts.run(HOST, is_repaired, check=False).returncode == 0, (what, repaired)
        assert hosts.run(HOST, f"cat {COMPLETION}").stdout == fresh, what
        again = install(hosts, wheel)
        assert again.returncode == 0 and again.changed() == 0 and not applied(again), (what, again)


def test_state_absent_uninstalls(hosts, wheel):
    paths = (VENV, LINK, COMPLETION, WHEEL_DIR)
    assert [p for p in paths if not exists(hosts, p)] == []  # the probe sees them while installed
    removed = install(hosts, wheel, atom_workerctl_state="absent")
    assert removed.returncode == 0 and removed.changed() > 0, removed
    assert [p for p in paths if exists(hosts, p)] == []
    assert hosts.run(HOST, "command -v atom-workerctl", check=False).returncode != 0
    assert installed(hosts, "python3-pystemd")  # Debian's packages stay
    assert applied(removed), removed
    again = install(hosts, wheel, atom_workerctl_state="absent")
    assert again.returncode == 0 and again.changed() == 0, again
    assert not applied(again), again  # nothing left to remove: nothing included
    # And back: present installs it again.
    back = install(hosts, wheel)
    assert back.returncode == 0 and hosts.run(HOST, "atom-workerctl --version").returncode == 0, back
