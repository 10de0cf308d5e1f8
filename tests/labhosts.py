"""Test helpers for lab hosts: boot them, run commands inside them, run playbooks against them.

Tests run inside the lab network (`make test` wraps pytest in `tools/lab/lab exec`), so Ansible and ssh
reach the hosts by name. Hosts are booted per test module with names that start with the module's prefix,
so modules never touch each other's hosts.
"""
import contextlib
import fcntl
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
LAB = REPO / "tools" / "lab" / "lab"
VENV_BIN = REPO / ".venv" / "bin"
# Where lab hosts get the AtoM stand-in (playbooks/lab/site.yml installs it at the role's default AtoM root).
ATOM_ROOT = "/usr/share/nginx/atom"
RECAP = re.compile(r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)"
                   r"\s+failed=(?P<failed>\d+)\s+skipped=(?P<skipped>\d+)\s+rescued=(?P<rescued>\d+)")
# A task's line per host: `ok: [h]`, `changed: [h] => ...`, `ok: [h -> localhost]`, `fatal: [h]: FAILED!`,
# `included: /path/file.yml for h1, h2`.
TASK_LINE = re.compile(r"^(?P<status>ok|changed|skipping|fatal|included): "
                       r"(?:\[(?P<host>[^\]]+)\]|\S+ for (?P<hosts>.+)$)")


def in_lab_network() -> bool:
    return bool(os.environ.get("ATOM_LAB_ROOT_PID"))


def still_in_lab_network() -> bool:
    """This process's network namespace is the lab's current one (not one a full `lab down` dropped)."""
    return os.stat("/run/netns/atomlab").st_ino == os.stat("/proc/self/ns/net").st_ino


def lab(*args: str, check=True, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(LAB), *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"lab {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


class PlaybookResult:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.recap = {m["host"]: {k: int(v) for k, v in m.groupdict().items() if k != "host"}
                      for m in map(RECAP.match, proc.stdout.splitlines()) if m}

    def changed(self) -> int:
        """Tasks changed over all hosts. No recap line (Ansible stopped before any play, or its output
        format changed) is an error, not 0: "nothing changed" must come from a recap that says so."""
        if not self.recap:
            raise AssertionError(f"no PLAY RECAP line in the playbook's output: {self!r}")
        return sum(host["changed"] for host in self.recap.values())

    def task(self, name: str) -> dict[str, str]:
        """Host -> what the task named `name` did there (ok, changed, skipping, failed, included), from the
        output's TASK blocks (`name` without the role's prefix); {} when no task of that name ran at all."""
        out: dict[str, str] = {}
        current = None
        for line in self.stdout.splitlines():
            if line.startswith("TASK ["):
                title = line[len("TASK ["):line.rfind("]")]
                current = title.split(" : ", 1)[-1] == name
                continue
            if not current:
                continue
            m = TASK_LINE.match(line)
            if m:
                for host in (m["host"] or m["hosts"]).split(", "):
                    out[host.split(" -> ")[0]] = m["status"]
        return out

    def __repr__(self):
        return f"PlaybookResult(rc={self.returncode}, recap={self.recap})\n{self.stdout[-3000:]}\n{self.stderr[-2000:]}"


class LabHosts:
    """A set of booted lab hosts described by an Ansible YAML inventory."""

    def __init__(self, inventory: dict, workdir: Path):
        self.source = workdir / "inventory-source.yml"
        self.inventory = workdir / "inventory.yml"
        self.source.write_text(yaml.safe_dump(inventory, sort_keys=False))
        self.names = sorted(_host_names(inventory["all"]))
        self.runs = 0

    def up(self) -> "LabHosts":
        # Not a skip: a lab test that cannot reach its hosts has failed, and says how to run it.
        assert in_lab_network(), "lab tests run inside the lab network: tools/lab/lab exec -- pytest ..."
        lab("up", "--inventory", str(self.source), "--out", str(self.inventory))
        assert still_in_lab_network(), "the lab network was re-created under this run: its hosts are out of reach"
        return self

    def down(self) -> None:
        lab("down", *self.names, check=False)

    def run(self, host: str, command: str, check=True, timeout=120) -> subprocess.CompletedProcess:
        """Run a shell command inside `host` (as root, via nsenter: no ssh involved)."""
        proc = subprocess.run([str(LAB), "run", host, "--", "sh", "-c", command],
                              capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{host}: `{command}` exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def addresses(self) -> dict[str, str]:
        """Every host's lab address: its ansible_host in the inventory `lab up` wrote (no command on a host)."""
        return _addresses(yaml.safe_load(self.inventory.read_text())["all"])

    def address(self, host: str) -> str:
        return self.addresses()[host]

    def poweroff(self, host: str) -> None:
        lab("poweroff", host)

    def powercut(self, host: str) -> None:
        """Every process of the host SIGKILLed at once, no shutdown; `boot` starts it again."""
        lab("powercut", host)

    def boot(self, host: str) -> None:
        lab("boot", host)

    def main_pids(self, host: str, units: str = "atom-worker*@*") -> dict[str, str]:
        """unit -> MainPID ("0" when not running) of the loaded units matching `units`."""
        out = self.run(host, f"systemctl show -p Id -p MainPID {shlex.quote(units)}").stdout
        # One block per unit, blocks separated by a blank line; systemctl prints MainPID= before Id=.
        pids = {}
        for block in out.strip().split("\n\n"):
            props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
            if "Id" in props and "MainPID" in props:
                pids[props["Id"]] = props["MainPID"]
        return pids

    def standin_control(self, host: str, root: str = ATOM_ROOT, **knobs) -> None:
        """Set the AtoM stand-in's fault knobs on `host` (tests/fixtures/atom/README.md); none clears them."""
        if knobs:
            self.run(host, f"echo {shlex.quote(json.dumps(knobs))} > {root}/standin/control.json")
        else:
            self.run(host, f"rm -f {root}/standin/control.json")

    def playbook(self, playbook: str, *extra: str, extra_vars: dict | None = None, timeout=900,
                 with_cli=False) -> PlaybookResult:
        """Run a playbook; site.yml's atom-workerctl install is off unless asked (it builds pystemd each time)."""
        args = [str(VENV_BIN / "ansible-playbook"), "-i", str(self.inventory), str(REPO / playbook), *extra]
        extra_vars = {"atom_workerctl_enabled": with_cli, **(extra_vars or {})}
        args += ["-e", yaml.safe_dump(extra_vars, default_flow_style=True).strip()]
        env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_FORCE_COLOR": "0",
               "ANSIBLE_NOCOLOR": "1"}
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env, check=False)
        # The whole output beside the inventory (a failed assertion shows only its end).
        self.runs += 1
        (self.inventory.parent / f"playbook-{self.runs:02d}.log").write_text(
            f"$ {' '.join(args)}\n{proc.stdout}\n--- stderr\n{proc.stderr}")
        return PlaybookResult(proc)


@contextlib.contextmanager
def booted_per_module(tmp_path_factory, wrap, prefix: str = "lab"):
    """A module fixture's body: `make(inventory)` boots those hosts and returns `wrap(hosts)`; every host
    booted is removed at the end (kept with ATOM_KEEP_LAB=1, to look at them)."""
    booted = []

    def make(inventory: dict):
        hosts = LabHosts(inventory, Path(tmp_path_factory.mktemp(prefix)))
        hosts.down()
        hosts.up()
        booted.append(hosts)
        return wrap(hosts)

    try:
        yield make
    finally:
        if not os.environ.get("ATOM_KEEP_LAB"):
            for hosts in booted:
                hosts.down()


def build_project_wheel(dest: Path) -> Path:
    """This repository's atom-workerctl as a wheel in `dest`. One build at a time across test workers:
    setuptools writes build/ and the egg-info inside the source tree."""
    dest.mkdir(parents=True, exist_ok=True)
    (REPO / "build").mkdir(exist_ok=True)
    with open(REPO / "build" / ".wheel-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run([str(VENV_BIN / "pip"), "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest),
                        str(REPO)], check=True, capture_output=True, timeout=300)
    return next(dest.glob("atom_workerctl-*.whl"))


def repo_path(*parts: str) -> Path:
    return REPO.joinpath(*parts)


def _addresses(group: dict | None) -> dict[str, str]:
    """Host name to ansible_host, for every host a generated inventory lists with one (children too)."""
    group = group or {}
    out = {name: hvars["ansible_host"] for name, hvars in (group.get("hosts") or {}).items()
           if hvars and "ansible_host" in hvars}
    for child in (group.get("children") or {}).values():
        out = _addresses(child) | out
    return out


def _host_names(group: dict | None) -> set[str]:
    group = group or {}
    names = set((group.get("hosts") or {}).keys())
    for child in (group.get("children") or {}).values():
        names |= _host_names(child)
    return names
