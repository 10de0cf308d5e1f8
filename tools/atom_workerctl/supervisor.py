"""The supervisord backend: XML-RPC over supervisord's unix socket, plus the atom-worker-policy state file.

supervisord runs the workers as `[program:<pool prefix>]` with numprocs processes named like the systemd
instances (`atom-worker@1.service` <-> process `atom-workers:atom-worker@1`, the group being the site's
target without `.target`), and never restarts them itself: the `atom-worker-policy` event listener
applies Restart=/RestartSec=/StartLimit* and keeps its decisions in a JSON state file
(roles/atom_worker/files/README-supervisor.md). This backend reads both and fills UnitState with systemd's
meanings, so every command and the `--json` schema stay the same:

| supervisord + state file                               | active_state / sub_state   | result              |
| RUNNING                                                | active / running           | success             |
| STARTING, BACKOFF                                      | activating / start, auto-restart |               |
| STOPPING                                               | deactivating / stop-sigterm |                    |
| entry `failed` (the listener refused a restart)        | failed / failed            | start-limit-hit     |
| EXITED/FATAL with a restart due (`next_restart`)       | activating / auto-restart  | the exit's result   |
| EXITED/FATAL after an unclean exit, no restart due     | failed / failed            | the exit's result   |
| EXITED after a clean exit, STOPPED                     | inactive / dead            | success             |

The start limit is known exactly (the entry's `failed`), never guessed. Actions: start/restart reset the
entry first (under the state file's flock, as `atom-worker-policy reset` does), so deliberate restarts
never spend the start limit; stop also cancels a scheduled restart (a stop must not be undone by the
listener RestartSec later). supervisord has no per-process enable: every configured process has
`autostart=true` ("enabled"); `enable` of an instance beyond the program's numprocs raises numprocs in the
rendered configuration, applied by `reload` (supervisorctl update, for our groups only: it restarts the
site's whole group, after resetting its budget). `disable` changes nothing (documented in README).

Imports: only the standard library; xmlrpc.client is loaded when the backend is opened.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import socket
import time
import xmlrpc.client

from . import atomicfile
from .backend import Backend, UnitState
from .errors import ManagerError, NoSuchError
from .policystate import (
    DEFAULT_POLICY,
    PolicyState,
    apply_policy,
    exit_fields,
    last_exit,
    limit_reason,
    policy_of,
    rss_tree,
)

DEFAULTS = {
    "server_url": "unix:///run/supervisor.sock",
    "conf_file": "/etc/supervisor/conf.d/atom-worker.conf",
    "policy_conf_file": "/etc/supervisor/conf.d/atom-worker-policy.conf",
    "log_dir": "/var/log/atom-worker",
    "policy_command": "/usr/local/lib/atom-worker/atom-worker-policy",
    "policy_state_file": "/run/atom-worker/supervisor-policy.json",
}
POLICY_GROUP = "atom-worker-policy"
POLICY_PROCESS = "atom-worker-policy:atom-worker-policy"
CALL_TIMEOUT = 10.0
# stopProcess(wait=True) returns when the process is gone: up to stopwaitsecs (TimeoutStopSec, 90 s).
STOP_TIMEOUT = 150.0
# supervisor's XML-RPC faults (supervisor/xmlrpc.py Faults)
BAD_NAME, NO_FILE, NOT_EXECUTABLE, ALREADY_STARTED, NOT_RUNNING, SHUTDOWN_STATE = 10, 20, 21, 60, 70, 6
STATE_MAP = {
    "RUNNING": ("active", "running"),
    "STARTING": ("activating", "start"),
    "BACKOFF": ("activating", "auto-restart"),
    "STOPPING": ("deactivating", "stop-sigterm"),
    "STOPPED": ("inactive", "dead"),
    "EXITED": ("inactive", "dead"),
    "FATAL": ("failed", "failed"),
    "UNKNOWN": ("failed", "failed"),
}


def settings_of(host) -> dict:
    """sites.json's `supervisor` object over the defaults (the role writes it on supervisord hosts)."""
    raw = (host.raw.get("supervisor") if host is not None else None) or {}
    if not isinstance(raw, dict):
        from .errors import ConfigError

        raise ConfigError(f"{host.path}: `supervisor` must be an object")
    out = dict(DEFAULTS)
    out.update({k: v for k, v in raw.items() if isinstance(v, str) and v})
    return out


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path_ = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path_)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str, timeout: float):
        super().__init__()
        self.path_ = path
        self.timeout = timeout

    def make_connection(self, host):
        return _UnixConnection(self.path_, self.timeout)


class _HttpTransport(xmlrpc.client.Transport):
    def __init__(self, timeout: float):
        super().__init__()
        self.timeout = timeout

    def make_connection(self, host):
        conn = super().make_connection(host)
        conn.timeout = self.timeout
        return conn


class SupervisorBackend(Backend):
    name = "supervisor"

    def __init__(self, host=None, settings: dict | None = None):
        self.host = host
        self.settings = settings or settings_of(host)
        self.url = self.settings["server_url"]
        self.state_file = self.settings["policy_state_file"]
        self.policy = PolicyState(self.state_file)
        self._infos: dict[str, dict] = {}    # process name (atom-worker@1) -> getProcessInfo
        self._changed: set[str] | None = None
        self.reread_error: str | None = None
        self.changed_groups: list[str] = []
        state = self._call("supervisor.getState", what="ask supervisord its state")
        if state.get("statename") != "RUNNING":
            raise ManagerError(f"supervisord at {self.url} is {state.get('statename', '?')}, not RUNNING")

    # -- XML-RPC plumbing ----------------------------------------------------------------------------------
    def _proxy(self, timeout: float):
        if self.url.startswith("unix://"):
            return xmlrpc.client.ServerProxy("http://localhost/RPC2",
                                             transport=_UnixTransport(self.url[len("unix://"):], timeout))
        if self.url.startswith(("http://", "https://")):
            return xmlrpc.client.ServerProxy(self.url.rstrip("/") + "/RPC2", transport=_HttpTransport(timeout))
        from .errors import ConfigError

        raise ConfigError(f"supervisor.server_url {self.url!r} is neither unix:///path nor http://host:port")

    def _call(self, method: str, *args, what: str = "", timeout: float = CALL_TIMEOUT):
        what = what or method
        try:
            with self._proxy(timeout) as proxy:
                func = proxy
                for part in method.split("."):
                    func = getattr(func, part)
                return func(*args)
        except xmlrpc.client.Fault as exc:
            if exc.faultCode == BAD_NAME:
                raise NoSuchError(f"{what}: supervisord has no such process ({exc.faultString})") from None
            if exc.faultCode == SHUTDOWN_STATE:
                raise ManagerError(f"{what}: supervisord is shutting down") from None
            raise ManagerError(f"{what}: supervisord says {exc.faultString}") from None
        except xmlrpc.client.ProtocolError as exc:
            if exc.errcode == 401:
                raise ManagerError(f"{what}: supervisord at {self.url} wants a username and password "
                                   "(not supported: use its unix socket)") from None
            raise ManagerError(f"{what}: supervisord answered HTTP {exc.errcode} {exc.errmsg}") from None
        except TimeoutError:
            raise ManagerError(f"{what}: supervisord at {self.url} did not answer within {timeout:g}s") from None
        except OSError as exc:
            raise ManagerError(f"{what}: {self._why(exc)}") from None
        except (xmlrpc.client.ResponseError, http.client.HTTPException, ValueError) as exc:
            raise ManagerError(f"{what}: not an XML-RPC answer from {self.url} ({exc})") from None

    def _why(self, exc: OSError) -> str:
        path = self.url[len("unix://"):] if self.url.startswith("unix://") else self.url
        code = exc.errno
        if code == errno.ENOENT:
            return f"cannot reach supervisord: no socket {path} (is supervisord running? service supervisor start)"
        if code in (errno.EACCES, errno.EPERM):
            return f"cannot reach supervisord: permission denied on {path} (run as root)"
        if code == errno.ECONNREFUSED:
            return f"cannot reach supervisord: nothing listens on {path} (supervisord is not running)"
        return f"cannot reach supervisord at {path}: {exc.strerror or exc}"

    # -- the policy listener's state file (policystate.py, shared with the circus backend) ------------------
    def read_state(self) -> dict:
        return self.policy.read()

    def _reset_entries(self, namespecs: list[str], cancel: bool = False) -> None:
        self.policy.reset(namespecs, cancel=cancel)

    # -- reading -------------------------------------------------------------------------------------------
    def _groups(self) -> set[str]:
        """Our groups: each site's target without `.target` (whatever else supervisord runs is not ours)."""
        groups = {"atom-workers"}
        if self.host is not None:
            for site in self.host.sites:
                if site.target:
                    groups.add(site.target.removesuffix(".target"))
        return groups

    def _ours(self, info: dict) -> bool:
        return info.get("group") in self._groups() or (
            str(info.get("group", "")).startswith("atom-workers") and "@" in str(info.get("name", "")))

    def all_infos(self) -> dict[str, dict]:
        infos = self._call("supervisor.getAllProcessInfo", what="list processes")
        self._infos = {i["name"]: i for i in infos if self._ours(i)}
        self._listener = next((i for i in infos if f"{i['group']}:{i['name']}" == POLICY_PROCESS), None)
        return self._infos

    def listener_info(self) -> dict | None:
        if not hasattr(self, "_listener"):
            self.all_infos()
        return self._listener

    def changed(self) -> set[str]:
        """Groups whose configuration on disk differs from what supervisord runs (reloadConfig: the call of
        `supervisorctl reread`, which parses and compares but starts, stops or changes no process)."""
        if self._changed is None:
            try:
                result = self._call("supervisor.reloadConfig", what="compare the configuration on disk")
                added, changed, removed = result[0]
                self._changed = set(added) | set(changed) | set(removed)
                self.changed_groups = sorted(self._changed & (self._groups() | {POLICY_GROUP}))
                self.reread_error = None
            except ManagerError as exc:
                self._changed = set()
                self.reread_error = str(exc)
        return self._changed

    def policy_defaults(self, state: dict) -> dict:
        policy = dict(DEFAULT_POLICY)
        top = state.get("policy")
        if isinstance(top, dict):
            policy.update(top)
            return policy
        policy.update(_policy_from_conf(self.settings["policy_conf_file"]))
        return policy

    def units(self, names: list[str], glob: str) -> dict[str, UnitState]:
        import fnmatch

        infos = self.all_infos()
        state = self.read_state()
        defaults = self.policy_defaults(state)
        changed = self.changed() if glob else (self._changed or set())
        listed = sorted(f"{n}.service" for n in infos if glob and fnmatch.fnmatchcase(f"{n}.service", glob))
        out: dict[str, UnitState] = {}
        now = time.time()
        for unit in dict.fromkeys(list(names) + listed):
            info = infos.get(unit.removesuffix(".service"))
            if info is None:
                out[unit] = UnitState(unit)  # not-found, inactive/dead: beyond numprocs or no such program
                continue
            ns = f"{info['group']}:{info['name']}"
            entry = state["processes"].get(ns)
            out[unit] = self._state(unit, info, entry if isinstance(entry, dict) else None, defaults,
                                    info["group"] in changed, now)
        return out

    def _state(self, unit: str, info: dict, entry: dict | None, defaults: dict, changed: bool,
               now: float) -> UnitState:
        statename = info.get("statename", "UNKNOWN")
        active, sub = STATE_MAP.get(statename, ("failed", "failed"))
        s = UnitState(unit, load_state="loaded", active_state=active, sub_state=sub,
                      unit_file_state="enabled", need_reload=changed)
        s.main_pid = int(info.get("pid") or 0)
        interval = apply_policy(s, policy_of(defaults, entry))
        burst = s.start_limit_burst
        last = last_exit(entry)
        result = "success"
        if last is not None and last.get("result"):
            result = str(last["result"])
        elif statename == "FATAL" or statename == "EXITED" and info.get("exitstatus"):
            result = "exit-code"
        entry_result = str((entry or {}).get("result") or "success")
        s.n_restarts = int((entry or {}).get("n_restarts") or 0)
        s.limit_hit = bool(entry and entry.get("failed"))
        running = statename in ("RUNNING", "STARTING", "STOPPING")
        if s.limit_hit and not running:
            s.active_state, s.sub_state, s.result = "failed", "failed", "start-limit-hit"
            s.limit_reason = limit_reason(entry, burst, interval, self.state_file)
        elif statename in ("EXITED", "FATAL", "BACKOFF") and entry and entry.get("next_restart"):
            s.active_state, s.sub_state, s.result = "activating", "auto-restart", result
        elif statename in ("EXITED", "FATAL"):
            # Failed after an unclean exit that no restart follows; a reset (entry result back to success,
            # as systemd's reset-failed) makes it inactive.
            unclean = result != "success" and (entry is None or entry_result != "success")
            s.active_state, s.sub_state = ("failed", "failed") if unclean else ("inactive", "dead")
            s.result = result if unclean else "success"
        if s.limit_hit and running:
            s.limit_hit = False  # started anyway (the window was over); the listener clears it
        # Since: the start of a running process, else when it stopped or failed.
        if running:
            since = info.get("start") or 0
        elif s.limit_hit:
            since = (entry or {}).get("failed_at") or info.get("stop") or 0
        else:
            since = info.get("stop") or (last or {}).get("at") or 0
        s.since_usec = int(float(since) * 1_000_000)
        if s.active_state != "active":
            fields = exit_fields(last) if last is not None else None
            if fields is not None:
                s.exit_code, s.exit_status = fields
            elif last is None and statename == "EXITED":
                s.exit_code, s.exit_status = "exited", int(info.get("exitstatus") or 0)
        if s.main_pid:
            s.memory_bytes = rss_tree(s.main_pid)
        s.namespec = f"{info['group']}:{info['name']}"
        return s

    # -- acting --------------------------------------------------------------------------------------------
    def _namespec(self, unit: str) -> str:
        name = unit.removesuffix(".service")
        info = self._infos.get(name)
        if info is None:
            info = self.all_infos().get(name)
        if info is None:
            raise NoSuchError(f"{name}: supervisord has no such process (beyond its program's numprocs? "
                              "`atom-workerctl scale N` raises it)")
        return f"{info['group']}:{info['name']}"

    def reset_failed(self, unit: str) -> None:
        with contextlib.suppress(NoSuchError):
            self._reset_entries([self._namespec(unit)])

    def start(self, unit: str) -> None:
        ns = self._namespec(unit)
        self._reset_entries([ns])
        self._call_tolerating("ALREADY_STARTED", "supervisor.startProcess", ns, False, what=f"start {ns}")

    def restart(self, unit: str) -> None:
        ns = self._namespec(unit)
        self._reset_entries([ns], cancel=True)
        # Not running: restart is start.
        self._call_tolerating("NOT_RUNNING", "supervisor.stopProcess", ns, True, what=f"stop {ns}",
                              timeout=STOP_TIMEOUT)
        self._reset_entries([ns])  # a start the listener refused meanwhile must not count
        self._call_tolerating("ALREADY_STARTED", "supervisor.startProcess", ns, False, what=f"start {ns}")

    def _call_tolerating(self, fault: str, method: str, *params, **kw) -> None:
        """An XML-RPC call whose `fault` (the state asked for is already there) is success."""
        try:
            self._call(method, *params, **kw)
        except ManagerError as exc:
            if fault not in str(exc):
                raise

    def stop(self, unit: str) -> None:
        ns = self._namespec(unit)
        # A stop must not be undone RestartSec later by the listener (systemd's StopUnit cancels a pending
        # auto-restart too).
        self.policy.cancel([ns])
        try:
            self._call("supervisor.stopProcess", ns, False, what=f"stop {ns}")
        except ManagerError as exc:
            if "NOT_RUNNING" not in str(exc):
                raise

    def enable(self, units: list[str]) -> list[str]:
        """Instances within their program's numprocs are enabled already (autostart=true); for one beyond
        it, raise numprocs in the rendered configuration (applied by reload())."""
        infos = self.all_infos()
        want: dict[str, int] = {}
        for unit in units:
            name = unit.removesuffix(".service")
            if name in infos:
                continue
            program, _, n = name.rpartition("@")
            if n.isdigit():
                want[program] = max(want.get(program, 0), int(n))
        changes = []
        for program, n in sorted(want.items()):
            old = set_numprocs(self.settings["conf_file"], program, n)
            changes.append(f"numprocs {program} {old} -> {n} in {self.settings['conf_file']}")
        return changes

    def disable(self, units: list[str]) -> list[str]:
        """supervisord cannot disable one process of a program: the stopped ones stay configured (they would
        start again with supervisord; status and doctor then list them as strays). See README."""
        return []

    def reload(self) -> None:
        """supervisorctl update for our groups only: reread, then remove/add each changed group (supervisord
        restarts all of a changed group's processes), after resetting their restart budget."""
        result = self._call("supervisor.reloadConfig", what="reread the configuration")
        added, modified, removed = (set(x) for x in result[0])
        ours = self._groups() | {POLICY_GROUP}
        infos = self._call("supervisor.getAllProcessInfo", what="list processes")
        for group in sorted((modified | removed) & ours):
            self._reset_entries([f"{i['group']}:{i['name']}" for i in infos if i["group"] == group], cancel=True)
            with contextlib.suppress(ManagerError):
                self._call("supervisor.stopProcessGroup", group, True, what=f"stop group {group}",
                           timeout=STOP_TIMEOUT)
            self._call("supervisor.removeProcessGroup", group, what=f"remove group {group}")
        for group in sorted((added | modified) & ours):
            self._call("supervisor.addProcessGroup", group, what=f"add group {group}")
        self.changed_groups = sorted((added | modified | removed) & ours)
        self._changed = None
        self._infos = {}

    def close(self) -> None:
        pass


def set_numprocs(path: str, program: str, n: int) -> int:
    """Rewrite `numprocs=` of [program:PROGRAM] in the rendered configuration (atomically); the old value."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines(keepends=True)
    except OSError as exc:
        raise ManagerError(f"cannot read {path}: {exc.strerror or exc}") from None
    section, old = None, None
    for i, line in enumerate(lines):
        text = line.strip()
        if text.startswith("[") and text.endswith("]"):
            section = text[1:-1].strip()
        elif section == f"program:{program}" and text.replace(" ", "").startswith("numprocs="):
            old = int(text.split("=", 1)[1].strip())
            lines[i] = f"numprocs={n}\n"
    if old is None:
        raise ManagerError(f"{path}: no [program:{program}] with numprocs= (run site.yml to write it)")
    try:
        atomicfile.replace(path, "".join(lines))
    except PermissionError:
        raise ManagerError(f"cannot write {path}: permission denied (run as root)") from None
    return old


def _policy_from_conf(path: str) -> dict:
    """The listener's --restart/--restart-sec/--start-limit-* from its [eventlistener] command line."""
    out: dict = {}
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError:
        return out
    words = next((line.split("=", 1)[1].split() for line in text.splitlines() if line.startswith("command=")), [])
    keys = {"--restart": "restart", "--restart-sec": "restart_sec",
            "--start-limit-interval-sec": "start_limit_interval_sec", "--start-limit-burst": "start_limit_burst"}
    for flag, value in zip(words, words[1:], strict=False):
        if flag in keys:
            key = keys[flag]
            if key == "restart":
                out[key] = value
            elif key == "start_limit_burst" and value.isdigit():
                out[key] = int(value)
            else:
                seconds = _parse_span(value)
                if seconds is not None:
                    out[key] = seconds
    return out


def _parse_span(text: str) -> float | None:
    import re

    if text in ("infinity", "inf"):
        return "infinity"  # type: ignore[return-value]
    units = {"": 1, "s": 1, "sec": 1, "ms": 0.001, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400,
             "w": 604800}
    total, pos = 0.0, 0
    for m in re.finditer(r"([0-9.]+)([a-z]*)", text):
        if m.start() != pos or m.group(2) not in units:
            return None
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    return total if pos == len(text) and text else None

