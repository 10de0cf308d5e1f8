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
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import privatefolder
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
        given = self.given_options()
        # After the user's and the inventory's options: ssh keeps the first value of each option, so their
        # own ControlMaster/ControlPath/ControlPersist (or `-o ControlMaster=no`) win over these.
        argv += given + connection_reuse_args(self, given)
        # `--` before the destination: nothing after it is read as an ssh option, whatever the inventory says.
        return [*argv, "--", self.address, self.remote_command(remote)]

    def given_options(self) -> list[str]:
        """The user's ($ATOM_WORKERCTL_SSH_ARGS) and the inventory's ssh options, in the order ssh gets them.
        The master socket's name is hashed from them: ssh_argv and shared_connection must see the same."""
        return env_ssh_args() + self.ssh_args

    def remote_command(self, remote: list[str]) -> str:
        return shlex.join((["sudo", "-n"] if self.become else []) + remote)

    def shared_connection(self) -> str | None:
        """The socket of our own master for this host, when a session asked for over it is the one ssh would
        ask for (sshmux.py): only with the plain `ssh` and options that change nothing in a session."""
        given = self.given_options()
        if SSH != "ssh" or not _session_neutral(given):
            return None
        return control_path(self, given)

    def as_dict(self) -> dict:
        return {"address": self.address, "user": self.user, "port": self.port}


def bad_name(text: str) -> str | None:
    """Why a host name, address or user cannot go to ssh, or None. ssh would read a leading `-` as an option
    (`-oProxyCommand=...` runs a command here); blanks and control characters are never part of a name."""
    if not text:
        return "is empty"
    if text.startswith("-"):
        return "starts with '-' (ssh would read it as an option)"
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in text):
        return "holds a blank or a control character"
    return None


def port_number(value) -> int | None:
    """A TCP port from an inventory value or `-H host:port`, else None."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or not 0 < int(text) < 65536:
        return None
    return int(text)


def env_ssh_args() -> list[str]:
    """$ATOM_WORKERCTL_SSH_ARGS as words (cmd_fleet reads it once before any host, so a bad value stops there)."""
    try:
        return shlex.split(os.environ.get("ATOM_WORKERCTL_SSH_ARGS", ""))
    except ValueError as exc:  # an unclosed quote
        raise WorkerctlError(f"$ATOM_WORKERCTL_SSH_ARGS: {exc}", EXIT_USAGE) from None


# A session asked for over the master (sshmux.py) asks for X11 and agent forwarding and gives our
# environment, and the master grants and passes on what its own options allow (ForwardX11, ForwardAgent,
# SendEnv, SetEnv: the same options ssh's client would have read). What it never asks for is what ssh's client
# adds from other options: a tty (-t), no command (-N), a subsystem (-s), port forwards of its own (-L, -R,
# -D, -W), control commands (-O), another master (-M, -S, any Control* option). With any option not known to
# be neutral, ssh is started as before. Options as ssh reads them: flags may be grouped (-4C), an argument
# may be attached (-p22).
_NEUTRAL_FLAGS = set("46AaCkqnTvXxY")
_NEUTRAL_WITH_ARGUMENT = set("ilpFJcmbBE")
_NEUTRAL_OPTIONS = {
    "addressfamily", "batchmode", "bindaddress", "bindinterface", "casignaturealgorithms", "certificatefile",
    "checkhostip", "ciphers", "compression", "connectionattempts", "connecttimeout", "forwardagent",
    "forwardx11", "forwardx11trusted", "globalknownhostsfile", "gssapiauthentication", "hashknownhosts",
    "hostbasedauthentication", "hostkeyalgorithms", "hostkeyalias", "hostname", "identitiesonly",
    "identityagent", "identityfile", "ipqos", "kbdinteractiveauthentication", "kexalgorithms", "loglevel",
    "macs", "numberofpasswordprompts", "passwordauthentication", "port", "preferredauthentications",
    "proxycommand", "proxyjump", "pubkeyacceptedalgorithms", "pubkeyacceptedkeytypes", "pubkeyauthentication",
    "rekeylimit", "sendenv", "serveralivecountmax", "serveraliveinterval", "setenv", "stricthostkeychecking",
    "tcpkeepalive", "updatehostkeys", "user", "userknownhostsfile", "verifyhostkeydns",
}


def _session_neutral(words: list[str]) -> bool:
    """Whether these ssh options leave a session as the master alone would open it (see above)."""
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("-") or word == "-":
            return False  # ssh would read it as the destination
        for j, flag in enumerate(word[1:], 1):
            if flag in _NEUTRAL_FLAGS:
                continue
            if flag not in _NEUTRAL_WITH_ARGUMENT and flag != "o":
                return False
            value = word[j + 1:]
            if not value:
                i += 1
                value = words[i] if i < len(words) else ""
            if flag == "o" and (value.replace("=", " ").split() or [""])[0].lower() not in _NEUTRAL_OPTIONS:
                return False
            break
        i += 1
    return True


# ssh's socket path limit (sun_path, 108 bytes with its NUL) less the 17 characters of the temporary name
# ssh binds first (".XXXXXXXXXXXXXXXX") before renaming it to the ControlPath.
_SOCKET_PATH_MAX = 107 - 17
_NAME_LENGTH = 24  # hex digits of a socket's name: 96 bits, and room for a home folder's long path
# What ssh reads in a ControlPath without quoting or expanding it (no blank, quote, `%`, `$` or `~`).
_PLAIN_PATH = re.compile(r"[A-Za-z0-9_./@+,:=-]+")


@functools.cache
def control_dir() -> str | None:
    """The folder of this user's ssh master sockets, made private if new; None when it cannot be trusted.

    A master socket lets whoever can open it run commands on the host as the user it logged in as, without
    a key, and an ssh client trusts whatever answers on it: the folder and every folder above it that could
    swap it must be ours alone. $XDG_RUNTIME_DIR only when it is ours and 0700 (root under `sudo -E` keeps
    the invoking user's, and that user could rename a folder made in it and put their own in its place);
    else ~/.cache of the home the password database gives our user (not $HOME, for the same reason).
    """
    import pwd

    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isabs(runtime) and privatefolder.is_ours(runtime):
        base = runtime
    else:
        try:
            home = pwd.getpwuid(os.geteuid()).pw_dir
        except KeyError:
            return None
        base = os.path.join(home, ".cache")
        if not (os.path.isabs(home) and privatefolder.is_ours(home, 0o022)
                and privatefolder.made_ours(base, 0o022)):
            return None
    folder = os.path.join(base, "atom-workerctl-ssh")
    if not _PLAIN_PATH.fullmatch(folder) or len(os.fsencode(folder)) + 1 + _NAME_LENGTH > _SOCKET_PATH_MAX:
        return None  # ssh would misread it, or a socket's name would not fit: ssh connects each time
    return folder if privatefolder.made_ours(folder) else None


def connection_reuse_args(target: Target, options: list[str]) -> list[str]:
    """ssh options that keep one connection to the target open for 60 s and let later commands ride on it.

    As Ansible does (ControlPersist=60s): the key exchange and login are most of a host's cost in a fleet
    command, and an operator runs several in a row (status, then reset, then status). The socket's name is
    a hash of everything that picks where ssh goes (this machine, the address, user, port, key and every ssh
    option given), not ssh's `%C` (local host, address, port and user only): two sites' hosts at the same
    private address behind different jump hosts must never share a connection. Nothing when no private
    folder is at hand: ssh then connects each time.
    """
    path = control_path(target, options)
    if path is None:
        return []
    return ["-o", "ControlMaster=auto", "-o", f"ControlPath={path}", "-o", "ControlPersist=60s"]


def control_path(target: Target, options: list[str]) -> str | None:
    """Our master socket's path for the target and these ssh options (connection_reuse_args says why)."""
    folder = control_dir()
    if folder is None:
        return None
    import hashlib
    import socket

    ident = json.dumps([socket.gethostname(), target.address, target.user, target.port, target.key, options])
    return f"{folder}/{hashlib.sha256(ident.encode()).hexdigest()[:_NAME_LENGTH]}"


def parse_host_option(text: str) -> Target:
    """`-H [user@]host[:port]`."""
    user, _, rest = text.rpartition("@")
    host, port = rest, None
    if rest.count(":") == 1:  # host:port (an IPv6 address has several colons: no port then)
        host, _, p = rest.partition(":")
        port = port_number(p)
        if port is None:
            raise WorkerctlError(f"-H {text!r}: the port must be a number from 1 to 65535", EXIT_USAGE)
    parts = (("host", host), ("user", user))
    for what, value in parts:
        if value.startswith("-"):  # said first: whatever else is wrong, this is what makes it hostile
            raise WorkerctlError(f"-H {text!r}: the {what} {bad_name(value)}", EXIT_USAGE)
    if not host or any(c.isspace() for c in text):
        raise WorkerctlError(f"-H {text!r}: expected [user@]host[:port]", EXIT_USAGE)
    for what, value in parts:
        why = bad_name(value) if value else None
        if why:
            raise WorkerctlError(f"-H {text!r}: the {what} {why}", EXIT_USAGE)
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
    """A host's connection from its inventory variables (taken literally: no Jinja2 templating here).

    A name, address, user or port that cannot be one refuses the whole command (WorkerctlError, exit 2):
    it is the inventory that is wrong, and no host is asked anything."""
    if not isinstance(hv, dict):
        raise WorkerctlError(f"inventory host {name!r}: its variables are not a mapping", EXIT_USAGE)
    address = hv.get("ansible_host") or hv.get("ansible_ssh_host") or name
    user = hv.get("ansible_user") or hv.get("ansible_ssh_user")
    for what, value in (("host name", name), ("ansible_host", address), ("ansible_user", user)):
        why = bad_name(str(value)) if value is not None and not _templated(value) else None
        if why:
            raise WorkerctlError(f"inventory host {name!r}: {what} {str(value)!r} {why}", EXIT_USAGE)
    port = hv.get("ansible_port") or hv.get("ansible_ssh_port")
    if port and not _templated(port) and port_number(port) is None:
        raise WorkerctlError(f"inventory host {name!r}: ansible_port {str(port)!r} is not a port number "
                             "(1 to 65535)", EXIT_USAGE)
    bad = [k for k in ("ansible_host", "ansible_user", "ansible_port", "ansible_ssh_private_key_file",
                       "ansible_ssh_common_args", "ansible_ssh_extra_args") if _templated(hv.get(k))]
    if bad:
        return Target(name, error=f"{', '.join(bad)} is a Jinja2 template; fleet commands read the inventory "
                                  "without templating (set a literal value)")
    args = []
    for key in ("ansible_ssh_common_args", "ansible_ssh_extra_args"):
        if hv.get(key):
            try:
                args += shlex.split(str(hv[key]))
            except ValueError as exc:  # an unclosed quote
                raise WorkerctlError(f"inventory host {name!r}: {key}: {exc}", EXIT_USAGE) from None
    become = bool(hv.get("ansible_become")) and str(hv.get("ansible_become")).lower() not in ("false", "no", "0")
    return Target(name, str(address), str(user) if user else None, port_number(port) if port else None,
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
        data = _inventory_json(proc.stdout, path)
        names = _listed_group(data, group)
        if names is None:
            raise WorkerctlError(f"inventory {path}: no group {group!r}", EXIT_USAGE)
        hostvars = (data.get("_meta") or {}).get("hostvars") or {}
        # --export leaves group variables in their groups: apply them (parents first, host last).
        return [target_from_vars(n, _export_vars(data, n, hostvars.get(n) or {})) for n in names]
    return _from_yaml(path, limit, group)


def _inventory_json(text: str, path: str) -> dict:
    """`ansible-inventory --list --export`'s JSON, checked for the shape the code below walks: groups with
    lists of host and child names and a mapping of vars, and `_meta.hostvars` mapping hosts to mappings.
    Anything else (a plugin printing a warning on stdout, a broken wrapper) is one clear error."""
    def refuse(why: str) -> WorkerctlError:
        return WorkerctlError(f"ansible-inventory -i {path} printed {why}; expected its JSON inventory")

    try:
        data = json.loads(text)
    except ValueError:
        first = (text.strip().splitlines() or [""])[0]
        raise refuse(f"something that is not JSON ({first[:60]!r})") from None
    if not isinstance(data, dict):
        raise refuse(f"a JSON {type(data).__name__}, not an object")
    for group, entry in data.items():
        if group == "_meta":
            hostvars = entry.get("hostvars", {}) if isinstance(entry, dict) else None
            if not isinstance(hostvars, dict) or not all(isinstance(v, dict) for v in hostvars.values()):
                raise refuse("a _meta.hostvars that is not a mapping of hosts to mappings")
            continue
        if not isinstance(entry, dict):
            raise refuse(f"group {group!r} as a {type(entry).__name__}")
        for key in ("hosts", "children"):
            names = entry.get(key, [])
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise refuse(f"group {group!r} with {key} that are not a list of names")
        if not isinstance(entry.get("vars", {}), dict):
            raise refuse(f"group {group!r} with vars that are not a mapping")
    return data


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
            walk_once(child)

    seen: set[str] = set()

    def walk_once(g: str) -> None:
        if g not in seen:  # a printed inventory whose children loop must not recurse for ever
            seen.add(g)
            walk(g)

    walk_once(group)
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
    connect_timeout = min(timeout, 10) if timeout else 10
    proc = _through_open_connection(target, remote, connect_timeout)
    if proc is None:
        try:
            proc = subprocess.Popen(target.ssh_argv(remote, connect_timeout), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                                    start_new_session=True)
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
    for t, stream in zip(readers, (proc.stdout, proc.stderr), strict=True):
        if not t.is_alive():  # one still reading keeps its file (closing it under the thread would raise there)
            stream.close()
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
        res.error = getattr(proc, "error", None) or last or "ssh failed (exit 255)"
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
        if res.data is not None and not isinstance(res.data, dict):
            res.data = None  # the merging code reads a host's answer as an object, and so does the schema
            res.error = f"unexpected output from {REMOTE} (JSON, but not an object): {text[:120]}"
    if rc not in (0, 3) and res.data is None and not res.error:
        msg = last.removeprefix(f"{REMOTE}: ").removeprefix("atom-workerctl: ")
        res.error = msg or f"exit {rc}"
    return res


def _through_open_connection(target: Target, remote: list[str], timeout: float):
    """The command started through our open master for the host (sshmux.Session), or None: no master, or it
    refused before anything ran; ssh is started then."""
    path = target.shared_connection()
    if path is None:
        return None
    from . import sshmux

    try:
        return sshmux.Session(path, target.remote_command(remote), timeout)
    except sshmux.Refused:
        return None


def _kill(proc) -> None:
    """ssh alone first: its process group may hold the ProxyCommand/ProxyJump process of a shared connection
    (the master it forked lives on in a session of its own, its proxy does not), which other commands still
    use; ssh ends its own proxy when it is not shared. The whole group only if ssh is still there after 2 s."""
    import signal

    if not isinstance(proc, subprocess.Popen):  # a session through the master: leaving it ends it
        proc.close()
        return
    for sig, kill in ((signal.SIGTERM, os.kill), (signal.SIGKILL, os.killpg)):
        try:
            kill(proc.pid, sig)
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
