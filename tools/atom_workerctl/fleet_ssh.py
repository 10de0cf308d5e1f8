"""Reaching worker hosts from the control host: which hosts (an Ansible inventory or `-H`), and running
each host's own `atom-workerctl ... --json` over ssh, with a per-host timeout.

Why ssh + the host's CLI and not pystemd's DBusRemote: the host's CLI already knows its sites.json,
its gearman.yml and /proc (registration needs the worker's TCP connections, which D-Bus cannot give),
and it is one ssh round trip per host and command instead of dozens of D-Bus calls over a
systemd-stdio-bridge. Measured in bench/fleet/results.md.

Imported only when a fleet option is given (start-up of the single-host path stays small).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from .errors import EXIT_USAGE, WorkerctlError

DEFAULT_GROUP = "atom_workers"
REMOTE = os.environ.get("ATOM_WORKERCTL_REMOTE", "atom-workerctl")  # the command on the worker hosts
SSH = os.environ.get("ATOM_WORKERCTL_SSH", "ssh")


class Target:
    """One worker host and how to reach it (Ansible's connection variables, or `-H [user@]host[:port]`)."""

    __slots__ = ("name", "address", "user", "port", "key", "ssh_args", "become", "error")

    def __init__(self, name: str, address: str | None = None, user: str | None = None, port: int | None = None,
                 key: str | None = None, ssh_args: list[str] | None = None, become: bool = False,
                 error: str | None = None):
        self.name, self.address, self.user, self.port, self.key = name, address or name, user, port, key
        self.ssh_args, self.become, self.error = ssh_args or [], become, error

    def ssh_argv(self, remote: list[str], connect_timeout: float) -> list[str]:
        argv = [SSH, "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(connect_timeout))}",
                "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=2"]
        if self.port:
            argv += ["-p", str(self.port)]
        if self.key:
            argv += ["-i", self.key]
        if self.user:
            argv += ["-l", self.user]
        argv += shlex.split(os.environ.get("ATOM_WORKERCTL_SSH_ARGS", "")) + self.ssh_args
        command = (["sudo", "-n"] if self.become else []) + remote
        return [*argv, self.address, "--", shlex.join(command)]

    def as_dict(self) -> dict:
        return {"address": self.address, "user": self.user, "port": self.port}


def parse_host_option(text: str) -> Target:
    """`-H [user@]host[:port]`."""
    user, _, rest = text.rpartition("@")
    host, port = rest, None
    if rest.count(":") == 1:  # host:port (an IPv6 address has several colons: no port then)
        host, _, p = rest.partition(":")
        if not p.isdigit():
            raise WorkerctlError(f"-H {text}: the port must be a number", EXIT_USAGE)
        port = int(p)
    if not host or any(c.isspace() for c in text):
        raise WorkerctlError(f"-H {text!r}: expected [user@]host[:port]", EXIT_USAGE)
    return Target(host, host, user or None, port)


# -- inventories ---------------------------------------------------------------------------------------------
def _ansible_inventory() -> str | None:
    found = shutil.which("ansible-inventory")
    if found:
        return found
    beside = Path(sys.executable).parent / "ansible-inventory"  # the same venv as this command
    return str(beside) if beside.exists() else None


def _templated(value) -> bool:
    return isinstance(value, str) and "{{" in value


def target_from_vars(name: str, hv: dict) -> Target:
    """A host's connection from its inventory variables (taken literally: no Jinja2 templating here)."""
    bad = [k for k in ("ansible_host", "ansible_user", "ansible_port", "ansible_ssh_private_key_file",
                       "ansible_ssh_common_args", "ansible_ssh_extra_args") if _templated(hv.get(k))]
    if bad:
        return Target(name, error=f"{', '.join(bad)} is a Jinja2 template; fleet commands read the inventory "
                                  "without templating (set a literal value)")
    port = hv.get("ansible_port") or hv.get("ansible_ssh_port")
    args = []
    for key in ("ansible_ssh_common_args", "ansible_ssh_extra_args"):
        if hv.get(key):
            args += shlex.split(str(hv[key]))
    become = bool(hv.get("ansible_become")) and str(hv.get("ansible_become")).lower() not in ("false", "no", "0")
    user = hv.get("ansible_user") or hv.get("ansible_ssh_user")
    return Target(name, str(hv.get("ansible_host") or hv.get("ansible_ssh_host") or name),
                  str(user) if user else None, int(port) if port else None,
                  str(hv["ansible_ssh_private_key_file"]) if hv.get("ansible_ssh_private_key_file") else None,
                  args, become and user not in (None, "root"))


def from_inventory(path: str, limit: str | None, group: str) -> list[Target]:
    """The hosts of `group` in an inventory, through `ansible-inventory --list` (Ansible's own reading:
    INI, YAML, group_vars/, host_vars/, plugins) or, without Ansible, this module's YAML reader."""
    if not os.path.exists(path):
        raise WorkerctlError(f"inventory {path}: no such file", EXIT_USAGE)
    tool = _ansible_inventory()
    if tool:
        argv = [tool, "-i", path, "--list", "--export"]
        if limit:
            argv += ["--limit", limit]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            raise WorkerctlError(f"ansible-inventory -i {path}: {err[-1] if err else 'exit ' + str(proc.returncode)}")
        data = json.loads(proc.stdout)
        names = _listed_group(data, group)
        if names is None:
            raise WorkerctlError(f"inventory {path}: no group {group!r}", EXIT_USAGE)
        hostvars = (data.get("_meta") or {}).get("hostvars") or {}
        # --export leaves group variables in their groups: apply them (parents first, host last).
        return [target_from_vars(n, _export_vars(data, n, hostvars.get(n) or {})) for n in names]
    return _from_yaml(path, limit, group)


def _listed_group(data: dict, group: str) -> list[str] | None:
    if group not in data and group != "all":
        return None
    names: list[str] = []

    def walk(g: str) -> None:
        entry = data.get(g) or {}
        for h in entry.get("hosts") or []:
            if h not in names:
                names.append(h)
        for child in entry.get("children") or []:
            walk(child)

    walk(group)
    return names


def _export_vars(data: dict, host: str, own: dict) -> dict:
    """Variables of a host from `--list --export`: every group containing it, from `all` down, then its own."""
    parents: dict[str, list[str]] = {}
    for g, entry in data.items():
        if g == "_meta" or not isinstance(entry, dict):
            continue
        for child in entry.get("children") or []:
            parents.setdefault(child, []).append(g)

    def depth(g: str, seen=()) -> int:
        ps = [p for p in parents.get(g, []) if p not in seen]
        return 0 if not ps else 1 + max(depth(p, (*seen, g)) for p in ps)

    holding = set()
    for g, entry in data.items():
        if isinstance(entry, dict) and host in (entry.get("hosts") or []):
            holding.add(g)
    frontier = list(holding)
    while frontier:
        g = frontier.pop()
        for p in parents.get(g, []):
            if p not in holding:
                holding.add(p)
                frontier.append(p)
    holding.add("all")
    merged: dict = {}
    for g in sorted(holding, key=lambda g: (depth(g), g)):
        merged.update((data.get(g) or {}).get("vars") or {})
    merged.update(own)
    return merged


def _from_yaml(path: str, limit: str | None, group: str) -> list[Target]:
    """Without Ansible: a YAML inventory file (all/children/hosts/vars). group_vars/ and host_vars/
    directories, INI files and inventory plugins need ansible-inventory."""
    import yaml  # an Ansible inventory is YAML as Ansible reads it (PyYAML's safe loader), not AtoM's sfYaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (yaml.YAMLError, RecursionError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        what = getattr(exc, "problem", None) or "nested too deep"
        raise WorkerctlError(f"inventory {path}{where}: {what} (install Ansible to read it with ansible-inventory)"
                             ) from None
    except OSError as exc:
        raise WorkerctlError(f"inventory {path}: {exc.strerror}") from None
    if not isinstance(data, dict) or not isinstance(data.get("all"), dict | None):
        raise WorkerctlError(f"inventory {path}: expected a YAML inventory with a top-level 'all' group "
                             "(other formats need ansible-inventory)")
    groups: dict[str, set[str]] = {}
    hostvars: dict[str, dict] = {}

    def walk(name: str, g: dict | None, inherited: dict) -> set[str]:
        g = g or {}
        merged = {**inherited, **(g.get("vars") or {})}
        members = set()
        for h, hv in (g.get("hosts") or {}).items():
            hostvars[h] = {**merged, **hostvars.get(h, {}), **(hv or {})}
            members.add(h)
        for child, cg in (g.get("children") or {}).items():
            members |= walk(child, cg, merged)
        groups[name] = groups.get(name, set()) | members
        return members

    walk("all", data.get("all"), {})
    if group not in groups:
        raise WorkerctlError(f"inventory {path}: no group {group!r}", EXIT_USAGE)
    order = list(hostvars)
    chosen = groups[group]
    if limit:
        chosen = chosen & _limit(limit, groups, order)
    return [target_from_vars(h, hostvars[h]) for h in order if h in chosen]


def _limit(pattern: str, groups: dict[str, set[str]], hosts: list[str]) -> set[str]:
    """Ansible's --limit, the common part: names, groups and globs joined by `,` or `:`, `!` excludes,
    `&` intersects."""
    result: set[str] = set()
    intersect, exclude = [], []
    for part in pattern.replace(":", ",").split(","):
        term = part.strip()
        if not term:
            continue
        kind = term[0] if term[0] in "!&" else ""
        word = term.lstrip("!&")
        matched = set(groups.get(word, set())) | {h for h in hosts if fnmatch.fnmatchcase(h, word)}
        for g, members in groups.items():
            if g != word and fnmatch.fnmatchcase(g, word) and any(c in word for c in "*?["):
                matched |= members
        if kind == "!":
            exclude.append(matched)
        elif kind == "&":
            intersect.append(matched)
        else:
            result |= matched
    for m in intersect:
        result &= m
    for m in exclude:
        result -= m
    return result


# -- running the host's command ------------------------------------------------------------------------------
class HostResult:
    """What one host's command did: reached or not, its exit code, its JSON, its stderr lines."""

    __slots__ = ("target", "reached", "code", "data", "error", "stderr", "seconds", "stdout")

    def __init__(self, target: Target):
        self.target = target
        self.reached = False
        self.code: int | None = None
        self.data = None
        self.error: str | None = None
        self.stderr: list[str] = []
        self.stdout = ""
        self.seconds = 0.0

    def as_dict(self) -> dict:
        return {**self.target.as_dict(), "reached": self.reached, "exit_code": self.code,
                "seconds": round(self.seconds, 3), "error": self.error}


def _noise(line: str) -> bool:
    return line.startswith("Warning: Permanently added") or not line.strip()


def run(target: Target, remote: list[str], timeout: float, on_stderr=None, on_stdout_line=None,
        stop: threading.Event | None = None) -> HostResult:
    """Run the host's command over ssh; never raises for the host's failures (they are the result).

    `on_stderr(line)` is called for each stderr line as it arrives (progress of long actions);
    `on_stdout_line(line)` streams stdout (logs -f) instead of keeping it.
    """
    res = HostResult(target)
    started = time.monotonic()
    if target.error:
        res.error = target.error
        return res
    argv = target.ssh_argv(remote, min(timeout, 10) if timeout else 10)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace", start_new_session=True)
    except FileNotFoundError:
        res.error = f"{SSH}: command not found"
        return res
    out_chunks: list[str] = []

    def read_out() -> None:
        for line in proc.stdout:
            if on_stdout_line:
                on_stdout_line(line)
            else:
                out_chunks.append(line)

    def read_err() -> None:
        for raw in proc.stderr:
            line = raw.rstrip("\n")
            if _noise(line):
                continue
            res.stderr.append(line)
            if on_stderr:
                on_stderr(line)

    readers = [threading.Thread(target=read_out, daemon=True), threading.Thread(target=read_err, daemon=True)]
    for t in readers:
        t.start()
    timed_out = False
    deadline = started + timeout if timeout else None
    while True:
        try:
            proc.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            if stop is not None and stop.is_set():
                break
            if deadline and time.monotonic() > deadline:
                timed_out = True
                break
    if proc.poll() is None:
        _kill(proc)
    for t in readers:
        t.join(2)
    res.seconds = time.monotonic() - started
    res.stdout = "".join(out_chunks)
    rc = proc.returncode
    if timed_out:
        res.error = f"no answer within {timeout:g} s (--host-timeout)"
        return res
    if stop is not None and stop.is_set():
        res.reached, res.code = True, 0
        return res
    last = res.stderr[-1] if res.stderr else ""
    if rc == 255:
        res.error = last or "ssh failed (exit 255)"
        return res
    if rc == 127 and ("not found" in last or not last):
        res.error = f"{REMOTE} not found on the host (the atom_workerctl role installs it)"
        return res
    res.reached, res.code = True, rc
    text = res.stdout.strip()
    if text and not on_stdout_line:
        try:
            res.data = json.loads(text)
        except ValueError:
            res.data = None
            if rc == 0:
                res.error = f"unexpected output from {REMOTE} (not JSON): {text.splitlines()[0][:120]}"
    if rc not in (0, 3) and res.data is None and not res.error:
        msg = last.removeprefix(f"{REMOTE}: ").removeprefix("atom-workerctl: ")
        res.error = msg or f"exit {rc}"
    return res


def _kill(proc: subprocess.Popen) -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=2)
            return
        except subprocess.TimeoutExpired:
            continue


def run_many(targets: list[Target], remote: list[str], timeout: float, parallel: int, on_done=None,
             on_stderr=None) -> dict[str, HostResult]:
    """The same command on every host, at most `parallel` at a time; results in the targets' order."""
    from concurrent.futures import ThreadPoolExecutor

    results: dict[str, HostResult] = {}
    lock = threading.Lock()

    def one(t: Target) -> None:
        cb = (lambda line, name=t.name: on_stderr(name, line)) if on_stderr else None
        r = run(t, remote, timeout, on_stderr=cb)
        with lock:
            results[t.name] = r
            if on_done:
                on_done(r)

    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(targets) or 1))) as pool:
        for f in [pool.submit(one, t) for t in targets]:
            f.result()
    return {t.name: results[t.name] for t in targets}
