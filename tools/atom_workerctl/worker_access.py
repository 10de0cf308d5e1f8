"""doctor: what the worker user can reach, and whether the programs the units run exist.

Access is computed from each path's mode, owner and group against the worker user's uid and groups (the
unit's `User=`/`Group=` plus the user's supplementary groups, as systemd sets them), the way the kernel
decides: the owner's bits for the owner, else the group's bits for a member of the file's group, else the
others' bits. ACLs and mandatory access control are not read. A worker needs: search (x) on every directory
down to the AtoM root, read and search on the root and `config/`, read on `symfony` and on the
`config/*.yml` files AtoM reads (and their `apps/qubit/config/` overrides), and write on `cache/`, where it
compiles its configuration (a worker with a fresh cache never reads the YAML files: it fails at the next
cache clear instead).
"""

from __future__ import annotations

import os
import shlex

from . import model

# The programs our units run and the Debian package that provides each. `dpkg -S` cannot name the package
# of a file that is gone, so this is a table; a program not in it is left to a person.
PACKAGES = {
    "/usr/bin/php": "php-cli",
    "/usr/bin/php8.2": "php8.2-cli",
    "/usr/bin/python3": "python3",
    "/usr/bin/env": "coreutils",
    "/bin/sh": "dash",
    "/usr/bin/sh": "dash",
}
BITS = {"r": 4, "w": 2, "x": 1}


def _user(site: model.Site):
    import grp
    import pwd

    try:
        pw = pwd.getpwnam(site.user)
    except KeyError:
        return None
    try:
        gid = grp.getgrnam(site.group).gr_gid
    except KeyError:
        gid = pw.pw_gid
    return pw.pw_uid, gid, set(os.getgrouplist(site.user, gid)) | {gid}


def _lacks(st: os.stat_result, uid: int, groups: set[int], need: str) -> str:
    """The letters of `need` the user does not have on a file of this stat."""
    if uid == 0:
        return ""
    if st.st_uid == uid:
        bits = (st.st_mode >> 6) & 7
    elif st.st_gid in groups:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    return "".join(c for c in need if not bits & BITS[c])


def _fix(path: str, st: os.stat_result, uid: int, groups: set[int], lacking: str, site: model.Site) -> str:
    q = shlex.quote(path)
    if st.st_uid == uid:
        return f"chmod u+{lacking} {q}"
    if "w" in lacking:  # a place the worker writes: it should own it, as the role installs it
        return f"chown -R {site.user}:{site.group} {q} && chmod u+rwx {q}"
    if st.st_gid in groups:
        return f"chmod g+{lacking} {q}"
    return f"chmod o+{lacking} {q}"


def _needs(site: model.Site) -> list[tuple[str, str]]:
    """(path, access) the worker needs, parents first."""
    out: list[tuple[str, str]] = []
    real = os.path.realpath(site.root)
    for top in dict.fromkeys([os.path.dirname(site.root.rstrip("/")), os.path.dirname(real)]):
        parts = top.split("/")
        out += [("/".join(parts[:n]) or "/", "x") for n in range(1, len(parts) + 1)]
    out += [(real, "rx"), (f"{real}/symfony", "r"), (f"{real}/config", "rx"), (f"{real}/cache", "wx")]
    for name in ("gearman", "app"):
        out.append((f"{real}/config/{name}.yml", "r"))
        override = f"{real}/apps/qubit/config/{name}.yml"
        if os.path.exists(override):
            out += [(f"{real}/apps", "x"), (f"{real}/apps/qubit", "x"), (f"{real}/apps/qubit/config", "rx"),
                    (override, "r")]
    return list(dict.fromkeys(out))


def findings(snap, Finding, fault: str, human: str) -> list:
    out = []
    for sv in snap.sites:
        site = sv.site
        who = _user(site)
        if who is None:
            continue  # the unit fails with 217/USER; instance_down shows systemd's line
        uid, _, groups = who
        evidence, fixes = [], []
        for path, need in _needs(site):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue  # a missing file is the configuration's finding, not an access one
            except OSError:
                continue  # doctor cannot look (not root): nothing to say
            lacking = _lacks(st, uid, groups, need)
            if not lacking:
                continue
            import grp
            import pwd

            try:
                owner = pwd.getpwuid(st.st_uid).pw_name
            except KeyError:
                owner = str(st.st_uid)
            try:
                group = grp.getgrgid(st.st_gid).gr_name
            except KeyError:
                group = str(st.st_gid)
            evidence.append(f"{path}: mode {st.st_mode & 0o7777:04o} {owner}:{group}; {site.user} cannot "
                            + ", ".join({"r": "read it", "w": "write in it", "x": "enter it"}[c] for c in lacking))
            fixes.append(_fix(path, st, uid, groups, lacking, site))
        if evidence:
            out.append(Finding(
                "worker_cannot_read", fault, f"site {site.name}",
                f"the worker user {site.user} cannot reach what AtoM needs under {site.root}: workers fail at start "
                "(\"Unable to read file\", \"Failed to make cache directory\")",
                evidence, list(dict.fromkeys(fixes)) + [(f"atom-workerctl reset --site {site.name}   # the instances "
                                                        "that failed, with their whole start budget")]))
    return out


def _programs(exec_start: list[tuple[str, list[str]]]) -> list[str]:
    """The executables an ExecStart runs: its path, and the program after `--` (our recycle helper's
    command line)."""
    out = []
    for path, argv in exec_start:
        out.append(path)
        if "--" in argv and argv.index("--") + 1 < len(argv):
            out.append(argv[argv.index("--") + 1])
    return out


def _installed(package: str) -> bool:
    import subprocess

    try:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", package], capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.stdout.startswith("ii")


def _alternatives(name: str) -> list[str]:
    """The alternatives registered for link group NAME (`update-alternatives --list`), [] if none."""
    import subprocess

    try:
        proc = subprocess.run(["update-alternatives", "--list", name], capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return proc.stdout.split() if proc.returncode == 0 else []


def _package_fix(package: str, path: str, what: str = "is gone") -> tuple[list[str], list[str]]:
    """Install PACKAGE, or reinstall it when it is installed (dpkg puts its files back, modes included)."""
    if not _installed(package):
        return [f"apt-get install -y {package}"], [f"package {package} (provides {path}) is not installed"]
    return [f"apt-get install -y --reinstall {package}"], [f"package {package} is installed but {path} {what}"]


def _repair(program: str, human: str) -> tuple[list[str], list[str]]:
    """(fix lines, evidence) that put PROGRAM back: the fix is for the file that is gone, which is the program
    itself or the end of its symlink chain (/usr/bin/php is an alternatives link to /usr/bin/php8.2)."""
    if os.path.lexists(program):
        gone = os.path.realpath(program)
        what = "is not executable" if os.path.exists(gone) else "is gone"
        evidence = [f"{program} -> {gone}, which {what}"] if gone != program else []
        # A dangling link: the package of its end (the link's own package may not own that file).
        package = PACKAGES.get(gone) if gone != program else PACKAGES.get(program)
        if package is None:
            return [f"{human}install again the package that provides {gone} (`dpkg -S {gone}` names it)"], evidence
        fixes, more = _package_fix(package, gone, what)
        return fixes, evidence + more
    # The program itself is gone. An alternatives link whose alternative is there: restore the link (installing
    # a package whose files are all there would not bring it back).
    name = os.path.basename(program)
    alternatives = _alternatives(name)
    usable = [a for a in alternatives if os.access(a, os.X_OK)]
    if usable:
        said = f"{program} is the alternatives link {name}; its alternative {usable[0]} is there"
        return [f"update-alternatives --auto {name}"], [said]
    package = next((PACKAGES[a] for a in alternatives if a in PACKAGES), None) or PACKAGES.get(program)
    if package is None:
        return [(f"{human}install the package that provides {program} (`apt-file search {program}` names it; "
                 "dpkg -S cannot, the file is gone)")], []
    return _package_fix(package, program)


def executable_findings(snap, backend, journal_lines: dict, Finding, fault: str, human: str) -> list:
    """Instances that do not run because a program of their ExecStart is gone (systemd: 203/EXEC,
    "Failed to locate executable ...")."""
    missing: dict[str, list[str]] = {}
    sites: dict[str, list[str]] = {}
    for unit, inst in snap.instances.items():
        s = inst.state
        if not inst.expected or s.load_state != "loaded" or (s.active and not s.n_restarts):
            continue
        for program in _programs(backend.exec_start(unit)):
            if program.startswith("/") and not os.access(program, os.X_OK):
                missing.setdefault(program, []).append(unit)
                if inst.pool is not None:
                    sites.setdefault(program, []).append(inst.pool.site.name)
    out = []
    for program, units in missing.items():
        evidence = [f"{', '.join(model.short(u) for u in units)}: ExecStart runs {program}, which "
                    + ("does not exist" if not os.path.lexists(program) else "is not executable")]
        for unit in units[:1]:
            s = snap.instances[unit].state
            if s.exit_status == 203:
                evidence.append(f"{model.short(unit)}: last exit status 203/EXEC (systemd could not execute it)")
            said = [e.message for e in journal_lines.get(unit, [])
                    if e.source == "systemd" and "executable" in e.message.lower()]
            if said:
                evidence.append(f"journal (systemd): {said[-1]}")
        fixes, more = _repair(program, human)
        evidence += more
        for site in dict.fromkeys(sites.get(program, [])):
            fixes.append(f"atom-workerctl reset --site {site}   # the instances that failed, whole start budget")
        out.append(Finding("executable_missing", fault, program,
                           f"{program} is missing: the workers that run it cannot start", evidence, fixes))
    return out
