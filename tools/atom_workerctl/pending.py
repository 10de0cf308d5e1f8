"""doctor: the note of what an unfinished converge still owes (`apply-pending.json` beside sites.json).

The atom_worker role (systemd and supervisord managers) writes it into the folder of its state file, the
sites.json this command reads, before its handlers run, and removes it once they are done
(roles/atom_worker/tasks/owed_note.yml, owed_done.yml; vars/main.yml `_atom_worker_pending_file`). A note left
behind means a converge stopped before it applied everything: the files on the host are as wanted, but the
workers may still run the configuration from before it. The next converge applies what the note names and
removes it. Keys (all optional): `config_sites` (sites whose gearman.yml/app.yml changed: cache to clear,
workers to restart), `restart_globs` and `daemon_reload` (systemd), `restart`, `programs_changed` and
`listener_changed` (supervisord), `manager`. A note is read as the role reads it (vars/main.yml `_atom_worker_owed`):
only one whose `manager` is this host's owes that manager's keys; any other (another manager's, or one without a
`manager`) owes its `config_sites` alone. circus writes no note but takes up and removes one left behind.
"""

from __future__ import annotations

import fnmatch
import json
import os
import stat

from . import model
from .render import ago, iso

# The file's name; its folder is that of the sites.json read (`--config`), as the role puts it beside its state
# file (`atom_worker_state_file | dirname`).
NAME = "apply-pending.json"
CODE = "apply_pending"
MAX_BYTES = 1 << 20
LISTS = ("config_sites", "restart_globs", "restart")
FLAGS = ("daemon_reload", "programs_changed", "listener_changed")
SHOWN = 6  # instances named in the summary; more are counted
# The role's notes are flat (lists of names, true or false); deeper than this is not one of them, and Python's
# json (C parser and encoder alike) raises RecursionError, not ValueError, near the interpreter's recursion limit.
MAX_DEPTH = 32
RUN_AGAIN = ("run site.yml again (it applies what the unfinished converge owes and removes the note; if it stops "
             "again, first fix what its failed task names)")


def path_of(host: model.Host) -> str:
    """The note beside the sites.json read."""
    return os.path.join(os.path.dirname(os.path.abspath(host.path)), NAME)


def read(path: str) -> tuple[dict | None, float | None, str | None]:
    """(note, mtime, error): (None, None, None) when there is no note; else the note with its mtime, or the
    reason it cannot be used (one line) with the mtime when known."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, None, None
    except OSError as exc:
        return None, None, f"cannot be read: {exc.strerror or exc}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, st.st_mtime, "not a regular file"
        data = os.read(fd, MAX_BYTES + 1)
    except OSError as exc:
        return None, None, f"cannot be read: {exc.strerror or exc}"
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        return None, st.st_mtime, f"larger than {MAX_BYTES >> 20} MiB"
    try:
        note = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        return None, st.st_mtime, "not UTF-8 text"
    except ValueError as exc:
        return None, st.st_mtime, f"not JSON ({exc})"
    except RecursionError:
        return None, st.st_mtime, f"not a note of the role (nested more than {MAX_DEPTH} levels deep)"
    if _depth(note) > MAX_DEPTH:
        return None, st.st_mtime, f"not a note of the role (nested more than {MAX_DEPTH} levels deep)"
    if not isinstance(note, dict):
        return None, st.st_mtime, f"not a JSON object (a JSON {type(note).__name__})"
    for key in LISTS:
        value = note.get(key, [])
        # None entries are skipped (a pool without a unit glob), anything else must be a name.
        if not isinstance(value, list) or not all(v is None or isinstance(v, str) for v in value):
            return None, st.st_mtime, f"`{key}` is not a list of names"
    for key in FLAGS:
        if not isinstance(note.get(key, False), bool):
            return None, st.st_mtime, f"`{key}` is not true or false"
    # null names no manager (the role's `manager | default('')` is not its own manager either).
    if note.get("manager") is not None and not isinstance(note["manager"], str):
        return None, st.st_mtime, "`manager` is not a name"
    return note, st.st_mtime, None


def _depth(value) -> int:
    """How deep lists and objects nest in `value`, without recursion (a scalar is 0, `[]` 1, `[[]]` 2)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if level <= MAX_DEPTH:  # past it the answer is known
                stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _names(units: list[str]) -> str:
    shown = ", ".join(units[:SHOWN])
    return shown + (f" and {len(units) - SHOWN} more" if len(units) > SHOWN else "")


def owed(note: dict, host: model.Host) -> tuple[list[str], list[str]]:
    """What the note owes, in words (in the order the role applies it), and notes on how it was read.

    As the role reads it: a note whose `manager` is not this host's (another manager's, or none at all) owes its
    `config_sites` only. Instances are named when sites.json lists them; a unit glob that matches none of them or
    a supervisord program it does not list may be gone from the configuration the next converge applies (the
    role restarts only programs still configured), so those are named as owed only if still configured."""
    remarks = []
    manager = note.get("manager") or ""
    mine = manager == host.manager
    if not mine:
        # The role takes up only the sites of a note another manager left (its units are not this one's).
        noted = f"noted under manager {manager}" if manager else "noted without a manager"
        remarks.append(f"{noted}, but {host.path} says {host.manager}: the next converge takes up only the "
                       "sites' cache clears and restarts")
    sites = [s for s in dict.fromkeys(note.get("config_sites") or []) if s]
    known = {s.name: s for s in host.sites}
    unknown = [s for s in sites if s not in known]
    if unknown:
        remarks.append(f"{'site' if len(unknown) == 1 else 'sites'} {', '.join(unknown)} not in {host.path}: "
                       "owed only if still configured (the role clears and restarts the sites it is given)")
    expected = [model.short(u) for u in host.expected_units()]
    restart: set[str] = set()
    maybe: list[str] = []
    for name in sites:
        if name in known:
            restart.update(model.short(u) for p in known[name].pools for u in p.units)
    if mine:
        for glob in note.get("restart_globs") or []:
            if not glob:
                continue
            hits = {u for u in expected if fnmatch.fnmatchcase(u + ".service", glob)}
            restart |= hits
            if not hits:
                maybe.append(model.short(glob))
        for namespec in note.get("restart") or []:
            if not namespec:
                continue
            name = namespec.rsplit(":", 1)[-1]
            if name in expected:
                restart.add(name)
            else:
                # supervisor.yml restarts only the noted programs it still configures.
                maybe.append(name)
    words = []
    if sites:
        # sites.json does not say whether the role clears caches (atom_worker_clear_cache).
        words.append((f"clear the cache of site {sites[0]}" if len(sites) == 1 else
                      f"clear the caches of sites {', '.join(sites)}") + " (if the role clears caches)")
    if mine and note.get("daemon_reload"):
        words.append("daemon-reload")
    if mine and note.get("programs_changed"):
        words.append("apply the supervisord configuration (supervisorctl update)")
    if mine and note.get("listener_changed"):
        words.append("restart the restart-policy listener")
    units = [u for u in expected if u in restart]
    if units:
        words.append(f"restart {_names(units)}")
    maybe = list(dict.fromkeys(m for m in maybe if m not in restart))
    if maybe:
        words.append(f"restart {_names(maybe)} if still configured")
    return words, remarks


def findings(host: model.Host, Finding, fault: str, human: str, now: float | None = None) -> list:
    """A finding when the note exists: what the unfinished converge owes, or why the note cannot be read."""
    path = path_of(host)
    note, mtime, error = read(path)
    if note is None and error is None:
        return []
    when = (f"written {iso(mtime * 1e6)}, {ago(int(mtime * 1e6), now)}" if mtime is not None
            else "written at an unknown time")
    meaning = ("the atom_worker role writes it before its handlers run and removes it once they are done (a "
               "converge running right now has one too): until then the workers may run the configuration "
               "from before that converge")
    if error is not None:
        error = " ".join(error.split())  # one line, whatever the parser said
        if error.startswith("cannot be read") and os.geteuid() != 0:
            fixes = [f"{human}run atom-workerctl doctor as root (the note is root's)"]
        else:
            fixes = [f"mv {path} {path}.unreadable   # aside, to look at later (the role may fail to read it too)",
                     (f"{human}run site.yml again (it writes every file as wanted; what the unfinished converge "
                      "owed is unknown, so the lines below clear every site's cache and restart every worker)")]
            fixes += [f"cd {s.root} && runuser -u {s.user} -- php symfony cc" for s in host.sites]
            fixes.append("atom-workerctl restart --rolling")
        return [Finding(CODE, fault, path,
                        f"an earlier converge stopped before it applied everything, and its note of what it owes "
                        f"is unusable: {error} ({when})",
                        [f"{path}: {error} ({when})", meaning], fixes)]
    words, remarks = owed(note, host)
    what = "; ".join(words) if words else "nothing the note names"
    return [Finding(CODE, fault, path,
                    f"an earlier converge stopped before it applied everything; it still owes: {what} "
                    f"(note {when})",
                    [f"{path} ({when}): {json.dumps(note, sort_keys=True)}", meaning, *remarks],
                    [f"{human}{RUN_AGAIN}"])]
