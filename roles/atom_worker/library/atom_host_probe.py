#!/usr/bin/python3
"""Everything a role reads from a host before it decides, in one round trip (read-only)."""

DOCUMENTATION = r"""
---
module: atom_host_probe
short_description: Read paths, users, groups and systemd units of a host in one call
description:
  - A converge that changes nothing is made of reads. Each read as a task of its own costs a round trip
    to every host; this module answers all of a role's reads at once and changes nothing.
  - Every option is a list; an empty or omitted one is not probed.
  - On a host where systemd is not PID 1 (no C(/run/systemd/system)), the unit options give empty results
    and C(systemd) is false, rather than failing: a preflight may run on such a host (in check mode, say)
    and leave the verdict to its own checks.
options:
  stat:
    description: Paths to describe (exists, type, mode, owner, group, link target). Links are not followed.
    type: list
    elements: str
    default: []
  realpath:
    description: Paths to resolve with every link followed; a path that does not exist gives null.
    type: list
    elements: str
    default: []
  sha256:
    description: Files to hash; a missing or unreadable file gives null.
    type: list
    elements: str
    default: []
  read:
    description: Text files to read (UTF-8, undecodable bytes replaced); a missing or unreadable file gives null.
    type: list
    elements: str
    default: []
  users:
    description: User names to look up; each gives its passwd line (name:x:uid:gid:gecos:home:shell) or null.
    type: list
    elements: str
    default: []
  groups:
    description: Group names to look up; each gives its gid or null.
    type: list
    elements: str
    default: []
  resolve:
    description: Host names or addresses to resolve as C(getent ahosts) does (the host's NSS); each gives its
      addresses, or null when it does not resolve.
    type: list
    elements: str
    default: []
  glob:
    description: Shell patterns; each gives the sorted paths it matches, with their type (file, link, dir).
    type: list
    elements: str
    default: []
  packages:
    description:
      - Debian package names; each gives its installed version, or null when it is not installed (or the
        name is not one dpkg knows, such as a virtual package or a name with a version: the caller then lets
        apt decide).
    type: list
    elements: str
    default: []
  unit_files:
    description: Unit names or patterns for C(systemctl list-unit-files); gives the installed unit files.
    type: list
    elements: str
    default: []
  units_loaded:
    description: Unit patterns for C(systemctl list-units --all); gives the loaded units and their states.
    type: list
    elements: str
    default: []
  units:
    description: Units whose state C(systemctl show) gives (ActiveState, SubState, UnitFileState, LoadState).
    type: list
    elements: str
    default: []
  commands:
    description:
      - Read-only commands to run, each an argument list (no shell); each gives its exit status and output.
        A command that cannot be started gives rc 127. The caller vouches that they change nothing.
    type: list
    elements: list
    default: []
author: atom-worker toolkit
"""

EXAMPLES = r"""
- name: Read what the role needs to know
  atom.workers.atom_host_probe:
    realpath: [/usr/share/nginx/atom]
    read: [/usr/share/nginx/atom/config/gearman.yml]
    users: [www-data]
    units: [atom-worker@1.service]
  register: probe
"""

RETURN = r"""
stat:
  description: Path to {exists, type (file, dir, link, other), mode (octal string), uid, gid, owner, group, target}.
  type: dict
  returned: always
realpath:
  description: Path to its resolved path, or null.
  type: dict
  returned: always
sha256:
  description: Path to the hex sha256 of its content, or null.
  type: dict
  returned: always
read:
  description: Path to its text, or null.
  type: dict
  returned: always
users:
  description: Name to passwd line, or null.
  type: dict
  returned: always
groups:
  description: Name to gid, or null.
  type: dict
  returned: always
resolve:
  description: Name to its addresses (sorted, unique), or null.
  type: dict
  returned: always
glob:
  description: Pattern to a list of {path, type}.
  type: dict
  returned: always
packages:
  description: Package name to its installed version, or null.
  type: dict
  returned: always
packages_missing:
  description: The package names asked for that are not installed, in the order asked (apt then decides).
  type: list
  returned: always
unit_files:
  description: Installed unit file names (with their state) among the patterns given.
  type: dict
  returned: always
units_loaded:
  description: Loaded unit name to {load, active, sub}.
  type: dict
  returned: always
units:
  description: Unit name to {ActiveState, SubState, UnitFileState, LoadState}.
  type: dict
  returned: always
commands:
  description: One {rc, stdout, stderr} per command, in the order asked.
  type: list
  returned: always
systemd:
  description: Whether systemd runs as PID 1 here (the unit options were answered).
  type: bool
  returned: always
"""

import glob
import grp
import hashlib
import os
import pwd
import socket
import stat

from ansible.module_utils.basic import AnsibleModule

SHOW_PROPERTIES = ("Id", "LoadState", "ActiveState", "SubState", "UnitFileState")


def describe(path):
    try:
        st = os.lstat(path)
    except OSError:
        return {"exists": False}
    kind = ("link" if stat.S_ISLNK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode)
            else "file" if stat.S_ISREG(st.st_mode) else "other")
    out = {"exists": True, "type": kind, "mode": f"{stat.S_IMODE(st.st_mode):04o}", "uid": st.st_uid,
           "gid": st.st_gid, "owner": _name(pwd.getpwuid, st.st_uid), "group": _name(grp.getgrgid, st.st_gid)}
    if kind == "link":
        out["target"] = os.readlink(path)
    return out


def _name(lookup, ident):
    try:
        return lookup(ident)[0]
    except KeyError:
        return None


def resolve(path):
    try:
        return os.path.realpath(path, strict=True)
    except OSError:
        return None


def read_text(path):
    try:
        with open(path, "rb") as handle:
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return None


def sha256_of(path):
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def passwd_line(name):
    try:
        p = pwd.getpwnam(name)
    except KeyError:
        return None
    return ":".join(str(x) for x in (p.pw_name, "x", p.pw_uid, p.pw_gid, p.pw_gecos, p.pw_dir, p.pw_shell))


def gid_of(name):
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def addresses(name):
    try:
        infos = socket.getaddrinfo(name, None)
    except (OSError, UnicodeError):
        return None
    return sorted({info[4][0] for info in infos})


def matches(pattern):
    out = []
    for path in sorted(glob.glob(pattern)):
        kind = "link" if os.path.islink(path) else "dir" if os.path.isdir(path) else "file"
        out.append({"path": path, "type": kind})
    return out


def installed_packages(module, names):
    # Exit 1 when some name is unknown to dpkg: those stay null.
    rc, out, err = module.run_command(
        ["dpkg-query", "--show", "--showformat=${Package}\t${db:Status-Abbrev}\t${Version}\n", "--", *names])
    if rc not in (0, 1):
        module.fail_json(msg=f"dpkg-query failed (exit {rc}): {(err or out).strip()}")
    found = {}
    for line in out.splitlines():
        fields = line.split("\t")
        # "ii " is installed; "rc " (removed, config files left) and the others are not.
        if len(fields) == 3 and fields[1].startswith("ii"):
            found[fields[0]] = fields[2]
    return {name: found.get(name) for name in names}


def systemctl(module, args, ok=(0,)):
    # --plain --no-legend: one unit per line, no bullets or headers; exit 1 of list-unit-files means "none".
    rc, out, err = module.run_command(["systemctl", *args], environ_update={"SYSTEMD_COLORS": "0"})
    if rc not in ok:
        module.fail_json(msg=f"systemctl {args[0]} failed (exit {rc}): {(err or out).strip()}")
    return out.splitlines()


def unit_files(module, patterns):
    lines = systemctl(module, ["list-unit-files", "--no-legend", "--plain", "--no-pager", "--", *patterns], ok=(0, 1))
    return {f[0]: f[1] for f in (line.split() for line in lines) if len(f) >= 2}


def units_loaded(module, patterns):
    lines = systemctl(module, ["list-units", "--all", "--plain", "--no-legend", "--no-pager", "--", *patterns])
    return {f[0]: {"load": f[1], "active": f[2], "sub": f[3]} for f in (line.split() for line in lines) if len(f) >= 4}


def unit_states(module, units):
    args = ["show", "--no-pager"] + ["--property=" + p for p in SHOW_PROPERTIES] + ["--", *units]
    out, current = {}, {}
    # One block of Key=Value lines per unit, separated by a blank line, in the order asked.
    for line in systemctl(module, args) + [""]:
        if not line:
            if current:
                out[current.get("Id")] = current
            current = {}
            continue
        key, _, value = line.partition("=")
        current[key] = value
    # An instance of a template that systemd never loaded still answers under its own name.
    return {unit: out.get(unit, {"LoadState": "not-found"}) for unit in units}


def run(module, argv):
    argv = [str(arg) for arg in argv]
    if not argv:
        return {"rc": 127, "stdout": "", "stderr": "(empty): command not found"}
    # Not found, or found but not startable (its #! interpreter is gone, as in a venv after a Python upgrade):
    # rc 127 as a shell says it, where run_command would fail the whole probe.
    try:
        rc, out, err = module.run_command(argv, environ_update={"LC_ALL": "C"}, handle_exceptions=False)
    except OSError as exc:
        return {"rc": 127, "stdout": "", "stderr": f"{argv[0]}: {exc.strerror or exc}"}
    return {"rc": rc, "stdout": out, "stderr": err}


def main():
    lists = ("stat", "realpath", "sha256", "read", "users", "groups", "resolve", "glob",
             "packages", "unit_files", "units_loaded", "units")
    spec = {name: {"type": "list", "elements": "str", "default": []} for name in lists}
    spec["commands"] = {"type": "list", "elements": "list", "default": []}
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    p = module.params
    # sd_booted(): systemd as PID 1 creates this folder. Elsewhere systemctl cannot answer.
    booted = os.path.isdir("/run/systemd/system")
    result = {
        "changed": False,
        "stat": {path: describe(path) for path in p["stat"]},
        "realpath": {path: resolve(path) for path in p["realpath"]},
        "sha256": {path: sha256_of(path) for path in p["sha256"]},
        "read": {path: read_text(path) for path in p["read"]},
        "users": {name: passwd_line(name) for name in p["users"]},
        "groups": {name: gid_of(name) for name in p["groups"]},
        "resolve": {name: addresses(name) for name in p["resolve"]},
        "glob": {pattern: matches(pattern) for pattern in p["glob"]},
        "packages": installed_packages(module, p["packages"]) if p["packages"] else {},
        "unit_files": unit_files(module, p["unit_files"]) if p["unit_files"] and booted else {},
        "units_loaded": units_loaded(module, p["units_loaded"]) if p["units_loaded"] and booted else {},
        "units": unit_states(module, p["units"]) if p["units"] and booted else {},
        "commands": [run(module, argv) for argv in p["commands"]],
        "systemd": booted,
    }
    result["packages_missing"] = [name for name, version in result["packages"].items() if version is None]
    module.exit_json(**result)


if __name__ == "__main__":
    main()
