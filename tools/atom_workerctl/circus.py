"""The circus backend: circusd's control socket through circus's own client library, plus the restart
policy's state file.

circusd runs one singleton watcher per instance, named like the systemd instance without `.service`
(`atom-worker@1.service` <-> watcher `atom-worker@1`), all in one file (sites.json `circus.config`,
/etc/atom-worker/circus.ini: [watcher:NAME] and [env:NAME] per instance). circus itself never restarts a
worker (respawn = false): the atom-worker-policy engine in circusd's hooks (atom_worker_circus) applies
Restart=/RestartSec=/StartLimit* and keeps its decisions in a JSON state file of the same schema as under
supervisord (policystate.py), keyed `GROUP:NAME` (GROUP: the site's target without `.target`). This
backend reads circusd's `status` and `stats` (one round trip) and the state file, and fills UnitState with
systemd's meanings, so every command and the `--json` schema stay the same:

| circus watcher + state file                            | active_state / sub_state   | result              |
| active                                                 | active / running           | success             |
| starting                                               | activating / start         |                     |
| stopping                                               | deactivating / stop-sigterm |                    |
| stopped, entry `failed` (the policy refused a start)   | failed / failed            | start-limit-hit     |
| stopped with a restart due (`next_restart`)            | activating / auto-restart  | the exit's result   |
| stopped after an unclean exit, no restart due          | failed / failed            | the exit's result   |
| stopped after a clean exit or a stop                   | inactive / dead            | success             |

Actions (each one circus command on one watcher, never a glob): start/restart reset the entry first (under
the state file's flock, as `atom-worker-policy reset` does), then `start`/`restart` with waiting=true: a
deliberate (re)start never spends the start limit. stop cancels a scheduled restart first. A `start` is only
sent to a stopped watcher (circus hangs on a start of an active watcher whose process is gone, upstream
#802). circusd serialises its commands: one arriving while another runs is refused with errno 5 ("arbiter
is already running ... command"); every call retries that with backoff up to its deadline, and a call that
waits for a stop gets the watcher's graceful_timeout plus a margin. enable/disable are the watcher's
`autostart` in the configuration file (a section copied from a sibling instance when the file has none),
applied by reload() (`reloadconfig`: added, removed and changed watchers only; the others keep running).

Imports: circus.client (zmq, tornado, psutil: ~90 ms) only when circusd is first asked something; on hosts
whose CLI runs in a Python without circus, circus's venv (sites.json `circus.venv`) lends its
site-packages.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import re
import socket
import sys
import time

from . import atomicfile
from .backend import Backend, UnitState
from .errors import ConfigError, ManagerError, NoSuchError, WorkerctlError
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
    "endpoint": "ipc:///run/atom-worker/circus.sock",
    "config": "/etc/atom-worker/circus.ini",
    "state_file": "/run/atom-worker/circus-policy.json",
    "log_dir": "/var/log/atom-worker",
    "service": "atom-worker-circus",
    "venv": "/opt/atom-worker-circus",
    # The copy of circus.ini circusd was started with (the unit's ExecStartPre makes it): its [circus] section is
    # what circusd runs (reloadconfig never applies a changed one). "": beside the state file.
    "running_config": "",
}
RUNNING_COPY = "circus.running.ini"
WATCHER_GLOB = "atom-worker*@*"
CALL_TIMEOUT = 10.0
# A call that waits for workers to stop: their graceful_timeout (TimeoutStopSec) plus this.
STOP_MARGIN = 30.0
DEFAULT_GRACEFUL = 90.0
# circus's errnos (circus/commands/errors.py): MESSAGE_ERROR for an unknown watcher, COMMAND_ERROR for a
# command refused because another runs (ConflictError) and for a command that failed.
MESSAGE_ERROR, COMMAND_ERROR = 3, 5
STATE_MAP = {
    "active": ("active", "running"),
    "starting": ("activating", "start"),
    "stopping": ("deactivating", "stop-sigterm"),
    "stopped": ("inactive", "dead"),
}
# [circus] settings circusd tells (`globaloptions`), compared with the file's to see a changed [circus].
ARBITER_KEYS = ("endpoint", "pubsub_endpoint", "check_delay", "multicast_endpoint", "stats_endpoint")


def settings_of(host) -> dict:
    """sites.json's `circus` object over the defaults (the role writes it on circus hosts). `service` may be
    "": circusd is started by other means (a container's entrypoint)."""
    raw = (host.raw.get("circus") if host is not None else None) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{host.path}: `circus` must be an object")
    out = dict(DEFAULTS)
    out.update({k: v for k, v in raw.items() if isinstance(v, str) and (v or k == "service")})
    if not out["running_config"]:
        out["running_config"] = os.path.join(os.path.dirname(out["state_file"]) or ".", RUNNING_COPY)
    return out


def start_hint(settings: dict) -> str:
    """How circusd is started on this host (for the one-line errors)."""
    if settings.get("service"):
        return f"systemctl start {settings['service']}"
    return f"start it: {settings['venv']}/bin/circusd {settings['config']}"


# A restart of circusd starts every watcher, and the policy counts each start (as systemd counts a `systemctl
# restart`): a worker whose budget that used up stays down, and `reset` gives it back and starts it.
AFTER_RESTART = "atom-workerctl reset   # starts any worker the restart left down (it counted as a start)"


def restart_fix(settings: dict, why: str) -> str:
    """doctor's fix line that restarts circusd: a command when systemd runs it, else a step for a person."""
    if settings.get("service"):
        return f"systemctl restart {settings['service']}   # {why}"
    return f"by hand: stop circusd and start it again ({settings['venv']}/bin/circusd {settings['config']}): {why}"


def _import_client(venv: str):
    """circus.client.CircusClient and circus.exc.CallError: from this Python, else from circus's venv (its
    site-packages appended to sys.path: the CLI's own packages keep precedence)."""
    try:
        from circus.client import CircusClient
        from circus.exc import CallError

        return CircusClient, CallError
    except ImportError as exc:
        first = exc
    import glob
    import site

    mine = os.path.join(venv, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages")
    found = [mine] if os.path.isdir(mine) else sorted(glob.glob(os.path.join(glob.escape(venv), "lib", "python3*",
                                                                            "site-packages")))
    fix = f"run site.yml (it installs circus into {venv}), or set circus.venv in sites.json"
    if not found:
        raise ManagerError(f"cannot import circus's client library: this Python has none ({first}) and {venv} has "
                           f"no lib/python3*/site-packages ({fix})")
    for path in found:
        if path not in sys.path:
            site.addsitedir(path)
    try:
        from circus.client import CircusClient
        from circus.exc import CallError
    except ImportError as exc:
        raise ManagerError(f"cannot import circus's client library from {found[0]}: {exc} (a venv of another "
                           f"Python than {sys.executable}? {fix})") from None
    return CircusClient, CallError


class CircusBackend(Backend):
    name = "circus"

    def __init__(self, host=None, settings: dict | None = None):
        self.host = host
        self.settings = settings or settings_of(host)
        self.endpoint = self.settings["endpoint"]
        self.state_file = self.settings["state_file"]
        self.config_file = self.settings["config"]
        self.policy = PolicyState(self.state_file)
        self._client = None
        self._call_error: type[Exception] = Exception
        self._statuses: dict[str, str] | None = None
        self._options: dict[str, dict] = {}
        self._changes: dict | None = None
        self._disk: dict | None = None
        # Watchers whose autostart enable()/disable() changed: circusd re-creates them at reloadconfig, and
        # `options` does not tell autostart, so changes() cannot see it.
        self._flipped: dict[str, bool] = {}
        self.changed_watchers: list[str] = []
        self.arbiter_changed = False
        self.reload_note = ""
        self._probe()

    # -- the control socket --------------------------------------------------------------------------------
    def _probe(self) -> None:
        """Is anything listening at the endpoint? zmq would queue a message to a socket nobody serves and wait
        for the whole timeout: ask the kernel first (no zmq import), for a precise one-line error."""
        hint = start_hint(self.settings)
        if self.endpoint.startswith("ipc://"):
            path = self.endpoint[len("ipc://"):]
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            where = path
        elif self.endpoint.startswith("tcp://"):
            host, _, port = self.endpoint[len("tcp://"):].rpartition(":")
            if not port.isdigit():
                raise ConfigError(f"circus.endpoint {self.endpoint!r} is neither ipc:///path nor tcp://host:port")
            family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            path = (host.strip("[]") if host != "*" else "127.0.0.1", int(port))
            where = self.endpoint
        else:
            raise ConfigError(f"circus.endpoint {self.endpoint!r} is neither ipc:///path nor tcp://host:port")
        sock.settimeout(3.0)
        try:
            sock.connect(path)
        except OSError as exc:
            code = exc.errno
            if code == errno.ENOENT:
                why = f"no socket {where} (is circusd running? {hint})"
            elif code in (errno.EACCES, errno.EPERM):
                why = f"permission denied on {where} (run as root)"
            elif code == errno.ECONNREFUSED:
                why = f"nothing listens on {where} (circusd is not running: {hint})"
            elif isinstance(exc, TimeoutError):
                why = f"{where} did not accept a connection within 3s"
            else:
                why = f"{where}: {exc.strerror or exc}"
            raise ManagerError(f"cannot reach circusd: {why}") from None
        finally:
            sock.close()

    def _connect(self):
        if self._client is None:
            client_class, self._call_error = _import_client(self.settings["venv"])
            self._client = client_class(endpoint=self.endpoint, timeout=CALL_TIMEOUT)
        return self._client

    def _call(self, command: str, what: str = "", timeout: float = CALL_TIMEOUT, **props) -> dict:
        """One command; retried while circusd runs another (errno 5) until `timeout` from now."""
        what = what or command
        client = self._connect()
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            client.timeout = max(deadline - time.monotonic(), 1.0) * 1000
            try:
                res = client.send_message(command, **props)
            except self._call_error as exc:
                if "Timed out" in str(exc):
                    raise ManagerError(f"{what}: circusd at {self.endpoint} did not answer within {timeout:g}s") \
                        from None
                raise ManagerError(f"{what}: {exc}") from None
            if res.get("status") == "ok":
                return res
            reason = str(res.get("reason") or "no reason given")
            busy = res.get("errno") == COMMAND_ERROR and ("is already running" in reason or "is restarting" in reason)
            left = deadline - time.monotonic()
            if busy and left > 0:
                time.sleep(min(delay, left))  # and once more at the deadline
                delay = min(delay * 2, 1.0)
                continue
            if busy:
                raise ManagerError(f"{what}: circusd was busy for {timeout:g}s ({reason})")
            if res.get("errno") == MESSAGE_ERROR and "not found" in reason:
                raise NoSuchError(f"{what}: circusd has no watcher {props.get('name', '')} ({reason})")
            raise ManagerError(f"{what}: circusd says {reason.splitlines()[0] if reason else reason}")

    def _call_many(self, calls: list[tuple[str, dict]], what: str, timeout: float = CALL_TIMEOUT,
                   missing_ok: bool = False) -> list[dict | None]:
        """Several read commands in one round trip: all sent, then the answers matched by id (circus's
        CircusClient.call sends one and waits for it). Reads are never refused with errno 5. missing_ok: None
        for a watcher that is gone (removed by a reloadconfig meanwhile)."""
        import uuid

        client = self._connect()
        ids = []
        for command, props in calls:
            cid = uuid.uuid4().hex
            ids.append(cid)
            try:
                client.socket.send(json.dumps({"command": command, "properties": props, "id": cid}).encode())
            except Exception as exc:
                raise ManagerError(f"{what}: {exc}") from None
        answers: dict[str, dict] = {}
        deadline = time.monotonic() + timeout
        while len(answers) < len(ids):
            left = deadline - time.monotonic()
            if left <= 0 or not client.poller.poll(left * 1000):
                raise ManagerError(f"{what}: circusd at {self.endpoint} did not answer within {timeout:g}s")
            try:
                res = json.loads(client.socket.recv())
            except ValueError as exc:
                raise ManagerError(f"{what}: not an answer from circusd ({exc})") from None
            if isinstance(res, dict) and res.get("id") in ids:
                answers[res["id"]] = res
        out = []
        for (_, props), cid in zip(calls, ids, strict=True):
            res = answers[cid]
            if res.get("status") != "ok":
                reason = str(res.get("reason") or "no reason given")
                if res.get("errno") == MESSAGE_ERROR and "not found" in reason:
                    if missing_ok:
                        out.append(None)
                        continue
                    raise NoSuchError(f"{what}: circusd has no watcher {props.get('name', '')}")
                raise ManagerError(f"{what}: circusd says {reason.splitlines()[0]}")
            out.append(res)
        return out

    # -- reading -------------------------------------------------------------------------------------------
    def _group(self, name: str) -> str:
        """The policy's group of a watcher: its site's target without `.target` (the template's atom_group)."""
        if self.host is not None:
            pool = self.host.pool_of(f"{name}.service")
            if pool is not None:
                return pool.site.target.removesuffix(".target") if pool.site.target else "atom-workers"
        try:
            return str(self.options(name).get("atom_group") or "atom-workers")
        except WorkerctlError:
            return "atom-workers"

    def statuses(self) -> dict[str, str]:
        """Every watcher of ours -> active, starting, stopping, stopped."""
        res = self._call("status", what="ask circusd its watchers")
        self._statuses = {n: s for n, s in res.get("statuses", {}).items() if fnmatch.fnmatchcase(n, WATCHER_GLOB)}
        return self._statuses

    def options(self, name: str) -> dict:
        if name not in self._options:
            self._options[name] = self._call("options", what=f"read {name}'s options", name=name)["options"]
        return self._options[name]

    def _graceful(self, names: list[str]) -> float:
        """The longest graceful_timeout (TimeoutStopSec) of these watchers."""
        longest = 0.0
        for name in names:
            try:
                longest = max(longest, float(self.options(name).get("graceful_timeout") or 0))
            except (WorkerctlError, ValueError, TypeError):
                longest = max(longest, DEFAULT_GRACEFUL)
        return longest or DEFAULT_GRACEFUL

    def daemon_pid(self) -> int | None:
        """circusd's own pid (dstats)."""
        info = self._call("dstats", what="ask circusd its own process").get("info")
        return int(info["pid"]) if isinstance(info, dict) and info.get("pid") else None

    def read_state(self) -> dict:
        return self.policy.read()

    def policy_defaults(self, state: dict) -> dict:
        policy = dict(DEFAULT_POLICY)
        top = state.get("policy")
        if isinstance(top, dict):
            policy.update(top)
        return policy

    def units(self, names: list[str], glob: str) -> dict[str, UnitState]:
        statuses = self.statuses()
        listed = sorted(f"{n}.service" for n in statuses if glob and fnmatch.fnmatchcase(f"{n}.service", glob))
        wanted = list(dict.fromkeys(list(names) + listed))
        # Each running watcher's process (`list`, pipelined: circus's `stats` asks psutil a dozen things per
        # process, ~4 ms each).
        running = [u.removesuffix(".service") for u in wanted if statuses.get(u.removesuffix(".service"), "stopped")
                   != "stopped"]
        answers = self._call_many([("list", {"name": n}) for n in running], "list the workers' processes",
                                  missing_ok=True) if running else []
        pids = {n: (a or {}).get("pids") or [] for n, a in zip(running, answers, strict=True)}
        state = self.read_state()
        defaults = self.policy_defaults(state)
        changed = self.changes()["stale"] if glob else (self._changes or {}).get("stale", set())
        disk = self.disk_config()
        out: dict[str, UnitState] = {}
        for unit in wanted:
            name = unit.removesuffix(".service")
            status = statuses.get(name)
            if status is None:
                out[unit] = UnitState(unit)  # not-found, inactive/dead: not in circusd's configuration
                continue
            ns = f"{self._group(name)}:{name}"
            entry = state["processes"].get(ns)
            out[unit] = self._state(unit, status, pids.get(name) or [], entry if isinstance(entry, dict) else None,
                                    defaults, name in changed, ns)
            if disk and disk["watchers"].get(name, {}).get("autostart") is False:
                out[unit].unit_file_state = "disabled"  # autostart = false: circusd does not start it
        return out

    def _state(self, unit: str, status: str, pids: list[int], entry: dict | None, defaults: dict, changed: bool,
               ns: str) -> UnitState:
        active, sub = STATE_MAP.get(status, ("failed", "failed"))
        s = UnitState(unit, load_state="loaded", active_state=active, sub_state=sub, unit_file_state="enabled",
                      need_reload=changed, namespec=ns)  # enabled: circusd starts it (autostart)
        s.main_pid = int(pids[0]) if pids else 0
        interval = apply_policy(s, policy_of(defaults, entry))
        last = last_exit(entry)
        result = str(last["result"]) if last is not None and last.get("result") else "success"
        entry_result = str((entry or {}).get("result") or "success")
        s.n_restarts = int((entry or {}).get("n_restarts") or 0)
        s.limit_hit = bool(entry and entry.get("failed"))
        running = status != "stopped"
        if s.limit_hit and not running:
            s.active_state, s.sub_state, s.result = "failed", "failed", "start-limit-hit"
            s.limit_reason = limit_reason(entry, s.start_limit_burst, interval, self.state_file)
        elif not running and entry and entry.get("next_restart"):
            s.active_state, s.sub_state, s.result = "activating", "auto-restart", result
        elif not running:
            # Failed after an unclean exit that no restart follows; a reset (entry result back to success, as
            # systemd's reset-failed) makes it inactive.
            unclean = result != "success" and entry_result != "success"
            s.active_state, s.sub_state = ("failed", "failed") if unclean else ("inactive", "dead")
            s.result = result if unclean else "success"
        if s.limit_hit and running:
            s.limit_hit = False  # started anyway (the window was over); the policy clears it
        # Since: the start of the running process, else when it failed or last ended.
        if running and s.main_pid:
            since = _started_at(s.main_pid) or 0
        elif s.limit_hit:
            since = (entry or {}).get("failed_at") or (last or {}).get("at") or 0
        else:
            since = (last or {}).get("at") or 0
        s.since_usec = int(float(since) * 1_000_000)
        if s.active_state != "active" and last is not None:
            fields = exit_fields(last)
            if fields is not None:
                s.exit_code, s.exit_status = fields
        if s.main_pid:
            s.memory_bytes = rss_tree(s.main_pid)
        return s

    # -- configuration on disk vs what circusd runs -----------------------------------------------------------
    def changes(self) -> dict:
        """What `reloadconfig` would do: {"added", "removed", "changed": watcher names of ours, "stale": the
        changed and removed ones (need_daemon_reload), "arbiter": [circus] differs, "error": why the file could
        not be compared, or None}. circusd has no dry run: the file as circus's own parser reads it (disk_config())
        and each watcher's section compared with what circusd reports of it
        (`options`: command, arguments, env, user, directory, stop signal and timeout, streams, the policy's
        atom_* options; not its hooks nor autostart) and [circus] with `globaloptions`."""
        if self._changes is not None:
            return self._changes
        out = {"added": set(), "removed": set(), "changed": set(), "stale": set(), "arbiter": False, "error": None}
        self._changes = out
        try:
            cfg = self.disk_config(strict=True)
        except ManagerError as exc:
            out["error"] = str(exc)
            return out
        on_disk = cfg["watchers"]
        running = self._statuses if self._statuses is not None else self.statuses()
        out["added"] = set(on_disk) - set(running)
        out["removed"] = set(running) - set(on_disk)
        common = sorted(set(on_disk) & set(running))
        calls = [("options", {"name": n}) for n in common] + [("globaloptions", {}), ("dstats", {})]
        answers = self._call_many(calls, "compare circusd's watchers with its configuration", missing_ok=True)
        for name, res in zip(common, answers, strict=False):
            if res is None:
                continue  # removed meanwhile
            self._options[name] = res["options"]
            if _watcher_differs(on_disk[name], res["options"]):
                out["changed"].add(name)
        loaded = answers[-2].get("options") or {}
        arbiter = cfg["arbiter"]
        out["arbiter"] = any(k in loaded and k in arbiter and _norm(arbiter[k]) != _norm(loaded[k])
                             for k in ARBITER_KEYS)
        # Every other [circus] setting: compared with the copy circusd was started with, when that copy is
        # this circusd's (made within moments before it started).
        info = answers[-1].get("info")
        pid = int(info["pid"]) if isinstance(info, dict) and info.get("pid") else None
        running_arbiter = self.running_arbiter(pid)
        if running_arbiter is not None and _norm(running_arbiter) != _norm(arbiter):
            out["arbiter"] = True
        out["stale"] = out["changed"] | out["removed"] | (set(running) if out["arbiter"] else set())
        self.changed_watchers = sorted(out["added"] | out["removed"] | out["changed"])
        self.arbiter_changed = out["arbiter"]
        return out

    def disk_config(self, strict: bool = False) -> dict | None:
        """circus.ini as circusd parses it (circus.config.get_config): {"watchers": {name: settings} of ours,
        "arbiter": the [circus] settings globaloptions tells}. Kept in the configuration cache (configcache.py,
        root only) under the file's identity: parsing costs ~15 ms. None (strict: ManagerError) when the
        file cannot be read or parsed."""
        from . import configcache

        path = self.config_file
        if self._disk is not None:
            return self._disk
        files = configcache.identity([path])
        key = ("circus-config-2", path)
        kept = configcache.get(key, files) if files is not None and files[0] is not None else None
        if kept is None:
            try:
                if not os.path.exists(path):
                    raise ManagerError(f"{path} does not exist (run site.yml: it writes circusd's configuration)")
                self._connect()  # circus's own modules, from circus's venv when this Python has none
                from circus.config import get_config

                cfg = get_config(path)
                kept = {"watchers": {w["name"]: w for w in cfg.get("watchers", [])
                                     if fnmatch.fnmatchcase(w["name"], WATCHER_GLOB)},
                        "arbiter": _arbiter_config(cfg)}
            except ManagerError:
                if strict:
                    raise
                return None
            except Exception as exc:  # circus's parser raises what configparser and its own checks raise
                if strict:
                    raise ManagerError(f"cannot parse {path}: {type(exc).__name__}: {str(exc).strip()}") from None
                return None
            if files is not None and files[0] is not None:
                configcache.put(key, files, kept)
        self._disk = kept
        return kept

    def running_arbiter(self, pid: int | None) -> dict | None:
        """The [circus] settings circusd was started with: the whole section (as circus's arbiter compares it at
        reloadconfig) of the copy its unit's ExecStartPre made. None when there is no such copy, or when it is
        not this circusd's (made more than a minute before it started, or after: started by other means)."""
        path = self.settings.get("running_config") or ""
        if not path or not pid:
            return None
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            return None
        started = _started_at(pid)
        if started is None or not (started - 60 <= mtime <= started + 2):
            return None
        try:
            self._connect()
            from circus.config import get_config

            return _arbiter_config(get_config(path))
        except Exception:  # a copy that does not parse says nothing
            return None

    # -- acting --------------------------------------------------------------------------------------------
    def _watcher(self, unit: str) -> str:
        name = unit.removesuffix(".service")
        statuses = self._statuses if self._statuses is not None and name in self._statuses else self.statuses()
        if name not in statuses:
            raise NoSuchError(f"{name}: circusd has no such watcher (beyond its pool's size? `atom-workerctl scale N` "
                              "adds it)")
        return name

    def _settle(self, name: str, timeout: float) -> str:
        """The watcher's status once it is stopped, or active with its process: circus notices a process that
        ended only at its next check (check_delay), and a start of an active watcher whose process is gone
        hangs circusd (#802)."""
        deadline = time.monotonic() + timeout
        while True:
            # (`status name=W` answers in the field that says ok or error: its answer cannot be told from an error)
            status = self.statuses().get(name, "stopped")
            if status == "stopped":
                return status
            if status == "active":
                pids = self._call("list", what=f"list {name}'s processes", name=name).get("pids") or []
                if pids and all(_alive(p) for p in pids):
                    return status
            if time.monotonic() > deadline:
                return status
            time.sleep(0.1)

    def reset_failed(self, unit: str) -> None:
        name = unit.removesuffix(".service")
        self.policy.reset([f"{self._group(name)}:{name}"])

    def start(self, unit: str) -> None:
        name = self._watcher(unit)
        ns = f"{self._group(name)}:{name}"
        self.policy.reset([ns])
        timeout = self._graceful([name]) + STOP_MARGIN
        if self._settle(name, timeout) != "stopped":
            return  # running (or starting/stopping: its own command decides)
        asked = time.time()
        res = self._call("start", what=f"start {name}", timeout=timeout, name=name, match="simple", waiting=True)
        self._check_started(name, res, asked)

    def restart(self, unit: str) -> None:
        name = self._watcher(unit)
        ns = f"{self._group(name)}:{name}"
        self.policy.reset([ns], cancel=True)
        timeout = 2 * self._graceful([name]) + STOP_MARGIN
        asked = time.time()
        res = self._call("restart", what=f"restart {name}", timeout=timeout, name=name, match="simple",
                         waiting=True)
        self._check_started(name, res, asked)

    def _check_started(self, name: str, res: dict, asked: float = 0.0) -> None:
        info = res.get("info")
        if isinstance(info, dict) and not info.get("started") and not info.get("kept"):
            # Nothing started: a spawn error (the command cannot run) or the policy refusing the start; the
            # state file tells which.
            ns = f"{self._group(name)}:{name}"
            try:
                entry = self.read_state()["processes"].get(ns)
            except ManagerError:
                entry = None
            entry = entry if isinstance(entry, dict) else {}
            last = last_exit(entry) or {}
            spawn = last.get("spawn_error") if float(last.get("at") or 0) >= asked - 1 else None
            hint = f"see `atom-workerctl logs -n 20 {name}`"
            if entry.get("failed"):
                why = f"the restart policy refused the start ({entry.get('result') or 'failed'})"
            elif spawn:
                why = f"it could not be spawned: {spawn}"
            else:
                why = "nothing was spawned (a spawn error or the restart policy)"
            raise ManagerError(f"circusd did not start {name}: {why} ({hint})")

    def stop(self, unit: str) -> None:
        name = unit.removesuffix(".service")
        # A stop must not be undone RestartSec later by the policy (systemd's StopUnit cancels a pending
        # auto-restart too).
        ns = f"{self._group(name)}:{name}"
        self.policy.cancel([ns])
        # waiting=True, then cancel again: an exit between the first cancel and the stop may have scheduled a
        # restart that would start the stopped watcher later.
        with contextlib.suppress(NoSuchError):  # not in circusd: nothing runs
            self._call("stop", what=f"stop {name}", timeout=self._graceful([name]) + STOP_MARGIN, name=name,
                       match="simple", waiting=True)
        self.policy.cancel([ns])

    def enable(self, units: list[str]) -> list[str]:
        """Watchers in circus.ini with autostart = true; a missing one copied from a sibling instance of its pool
        (applied by reload())."""
        text = _read(self.config_file)
        running = self._statuses if self._statuses is not None else self.statuses()
        changes = []
        for unit in units:
            name = unit.removesuffix(".service")
            sections = _sections(text)
            if f"watcher:{name}" not in sections:
                text = _add_instance(text, name, self.config_file)
                changes.append(f"{name} added to {self.config_file}")
            elif _autostart(text, name) is False:
                text = _set_autostart(text, name, True)
                self._flipped[name] = True
                changes.append(f"{name} autostart = true in {self.config_file}")
            elif name not in running:
                changes.append(f"{name} loaded from {self.config_file}")
        if changes:
            _write(self.config_file, text)
            self._disk = None
        return changes

    def disable(self, units: list[str]) -> list[str]:
        """autostart = false for these watchers in circus.ini: reload() stops them, and circusd does not start
        them again (the section stays: `scale` can bring it back, the next site.yml run drops it)."""
        text = _read(self.config_file)
        changes = []
        for unit in units:
            name = unit.removesuffix(".service")
            if f"watcher:{name}" in _sections(text) and _autostart(text, name) is not False:
                text = _set_autostart(text, name, False)
                self._flipped[name] = False
                changes.append(f"{name} autostart = false in {self.config_file}")
        if changes:
            _write(self.config_file, text)
            self._disk = None
        return changes

    def reload(self) -> None:
        """circusctl reloadconfig: added watchers start, removed ones stop, changed ones are stopped and started
        with their new settings (after their restart budget is reset), the others are not touched."""
        self._changes = None
        self._disk = None
        self._options = {}
        self._statuses = None
        changes = self.changes()
        if changes["error"]:
            raise ManagerError(changes["error"])
        running = self._statuses or {}
        flipped = {n for n in self._flipped if n in running}
        changes["changed"] |= flipped
        if changes["arbiter"]:
            self._restart_daemon(changes, running)
            return
        everything = set()
        again = changes["added"] | changes["changed"] | everything
        self.policy.reset([f"{self._group(n)}:{n}" for n in sorted(again)], cancel=True)
        stopping = sorted(changes["removed"] | changes["changed"] | everything)
        timeout = STOP_MARGIN + sum(self._graceful([n]) for n in stopping if running.get(n) != "stopped")
        # waiting=true: the answer comes when circusd is done (without it, at once)
        self._call("reloadconfig", what=f"reload {self.config_file}", timeout=timeout, waiting=True)
        self.changed_watchers = sorted(changes["added"] | changes["removed"] | changes["changed"])
        self.arbiter_changed = changes["arbiter"]
        self._flipped = {}
        self.reload_note = ""
        self._changes = None
        self._disk = None
        self._options = {}
        self._statuses = None

    def _restart_daemon(self, changes: dict, running: dict) -> None:
        """[circus] changed: reloadconfig would stop and start every watcher WITHOUT applying it (and every later
        reloadconfig again); only a new circusd applies it. Every watcher's budget is reset (and a pending
        restart cancelled) first: the new circusd starts each one, deliberately."""
        service = self.settings.get("service")
        if not service:
            raise ManagerError(f"the [circus] section of {self.config_file} changed: only a restart of circusd applies "
                               f"it (reloadconfig would restart every worker without applying it): "
                               f"{restart_fix(self.settings, 'every worker restarts')}, then `atom-workerctl reset`")
        import subprocess

        names = sorted(set(running) | changes["added"])
        self.policy.reset([f"{self._group(n)}:{n}" for n in names], cancel=True)
        old_pid = None
        with contextlib.suppress(WorkerctlError):
            old_pid = self.daemon_pid()
        timeout = STOP_MARGIN + self._graceful(sorted(running)) + 60
        try:
            proc = subprocess.run(["systemctl", "restart", service], capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ManagerError(f"systemctl restart {service}: {exc}") from None
        if proc.returncode != 0:
            why = (proc.stderr or proc.stdout).strip().splitlines()
            raise ManagerError(f"systemctl restart {service} failed: {why[0] if why else f'exit {proc.returncode}'}")
        # The new circusd: answering (with another pid), its watchers started.
        self.close()
        self._statuses = None
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._probe()
                pid = self.daemon_pid()
                statuses = self.statuses()
                if pid != old_pid and all(s in ("active", "stopped") for s in statuses.values()):
                    break
            except WorkerctlError:
                self.close()
            if time.monotonic() > deadline:
                raise ManagerError(f"systemctl restart {service}: circusd did not answer with its watchers started "
                                   f"within {timeout:g}s")
            time.sleep(0.2)
        self.changed_watchers = sorted(changes["added"] | changes["removed"] | changes["changed"])
        self.arbiter_changed = True
        self._flipped = {}
        self.reload_note = (f"[circus] changed in {self.config_file}: circusd was restarted (systemctl restart "
                            f"{service}) to apply it, not reloaded (reloadconfig would restart every worker without "
                            "applying it): every worker restarted, restart budgets reset first")
        self._changes = None
        self._disk = None
        self._options = {}
        self._statuses = None

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):  # closing a socket at exit
                self._client.stop()
            self._client = None


# -- comparing a watcher's section with circusd's options ---------------------------------------------------------
def _arbiter_config(cfg: dict) -> dict:
    """The [circus] settings of a parsed configuration, as circus's Arbiter.get_arbiter_config keeps them."""
    return {k: v for k, v in cfg.items() if k not in ("watchers", "plugins", "sockets")}


def _norm(value):
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(k): _norm(v) for k, v in value.items()}
    return value


def _watcher_differs(cfg: dict, options: dict) -> bool:
    """Whether circusd runs the watcher with other settings than its section on disk (as parsed by circus)."""
    want = dict(cfg)
    stream = {k: v for k, v in (want.pop("stdout_stream", None) or {}).items() if k != "class"}
    want["stdout_stream_conf"] = stream
    stream = {k: v for k, v in (want.pop("stderr_stream", None) or {}).items() if k != "class"}
    want["stderr_stream_conf"] = stream
    for key in ("uid", "gid"):  # as written (`root`), or a number after a `circusctl set`
        if want.get(key) is not None and key in options and str(want[key]) != str(options[key]):
            try:
                from circus.util import to_gid, to_uid

                convert = to_uid if key == "uid" else to_gid
                if convert(want[key]) == convert(options[key]):
                    want[key] = options[key]
            except Exception:  # an unknown user: compared as written
                continue
    if want.get("working_dir") is None:
        want.pop("working_dir", None)
    for key, value in want.items():
        if key in ("name", "hooks", "autostart", "rlimits", "copy_path"):
            continue
        if key in options:
            if _norm(value) != _norm(options[key]):
                return True
        elif key.startswith("atom_"):
            return True
    return any(key.startswith("atom_") and key not in want for key in options)


def _alive(pid: int) -> bool:
    """A process that runs (not gone, not a zombie waiting for circusd to reap it)."""
    try:
        with open(f"/proc/{int(pid)}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, ValueError, IndexError):
        return False


def _started_at(pid: int) -> float | None:
    """When a process started (epoch seconds), from /proc: its start time in clock ticks after boot."""
    try:
        with open(f"/proc/{int(pid)}/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


# -- editing circus.ini (scale) ----------------------------------------------------------------------------------
_HEADER = re.compile(r"^\s*\[([^\]]+)\]\s*$")


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        raise ManagerError(f"cannot read {path}: {exc.strerror or exc}") from None


def _write(path: str, text: str) -> None:
    """Replace the file atomically, keeping its mode."""
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = 0o644
    try:
        atomicfile.replace(path, text, mode)
    except OSError as exc:
        if isinstance(exc, PermissionError):
            raise ManagerError(f"cannot write {path}: permission denied (run as root)") from None
        raise ManagerError(f"cannot write {path}: {exc.strerror or exc}") from None


def _sections(text: str) -> dict[str, tuple[int, int]]:
    """Section name -> (index of its header line, index after its last line), lines as splitlines(True)."""
    lines = text.splitlines(keepends=True)
    out: dict[str, tuple[int, int]] = {}
    current, start = None, 0
    for i, line in enumerate(lines):
        m = _HEADER.match(line)
        if m:
            if current is not None:
                out[current] = (start, i)
            current, start = m.group(1).strip(), i
    if current is not None:
        out[current] = (start, len(lines))
    return out


def _body(lines: list[str], span: tuple[int, int]) -> list[str]:
    """A section's lines without the comments and blank lines that trail it (they belong to the next one)."""
    start, end = span
    while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith((";", "#"))):
        end -= 1
    return lines[start:end]


def _autostart(text: str, name: str) -> bool | None:
    lines = text.splitlines(keepends=True)
    span = _sections(text).get(f"watcher:{name}")
    if span is None:
        return None
    for line in lines[span[0] + 1:span[1]]:
        key, sep, value = line.partition("=")
        if sep and key.strip() == "autostart":
            return value.strip().lower() in ("1", "true", "yes", "on")
    return True  # circus's default


def _set_autostart(text: str, name: str, on: bool) -> str:
    lines = text.splitlines(keepends=True)
    start, end = _sections(text)[f"watcher:{name}"]
    value = f"autostart = {'true' if on else 'false'}\n"
    for i in range(start + 1, end):
        key, sep, _ = lines[i].partition("=")
        if sep and key.strip() == "autostart":
            lines[i] = value
            return "".join(lines)
    lines.insert(start + 1, value)
    return "".join(lines)


def _add_instance(text: str, name: str, path: str) -> str:
    """[watcher:X@N] and [env:X@N] copied from the pool's instance nearest to N below it (else the lowest),
    every X@k in them made X@N, with autostart = true; inserted after the pool's last section."""
    prefix, _, n = name.rpartition("@")
    sections = _sections(text)
    siblings = sorted(int(s.rpartition("@")[2]) for s in sections
                      if s.startswith(f"watcher:{prefix}@") and s.rpartition("@")[2].isdigit())
    if not siblings or not n.isdigit():
        raise ManagerError(f"{path} has no watcher of pool {prefix} to copy for {name} (run site.yml with the pool's "
                           "instances set: it writes them)")
    below = [k for k in siblings if k < int(n)]
    k = below[-1] if below else siblings[0]
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    same = re.compile(re.escape(f"{prefix}@{k}") + r"(?!\d)")
    copied: list[str] = []
    for section in (f"watcher:{prefix}@{k}", f"env:{prefix}@{k}"):
        if section in sections:
            copied += ["\n"] + [same.sub(f"{prefix}@{n}", line) for line in _body(lines, sections[section])]
    block = "".join(copied)
    # After the pool's last section, without the comments trailing it (they introduce the next section).
    last = max((span for sec, span in sections.items()
                if sec.partition(":")[0] in ("watcher", "env") and sec.partition(":")[2].rpartition("@")[0] == prefix),
               key=lambda span: span[0])
    at = last[0] + len(_body(lines, last))
    new = "".join(lines[:at]) + block + "".join(lines[at:])
    return _set_autostart(new, name, True)


# -- doctor ------------------------------------------------------------------------------------------------------
def policy_findings(backend) -> list:
    """circus hosts: doctor's findings about circusd itself (cmd_doctor's Finding objects).

    - restart_policy_down: the policy's hooks have not reported in this circusd (the state file's `listener`
      block names another pid, or none): crashed workers may stay down, no start limit is kept.
    - unit_changed_not_reloaded: circus.ini differs from what circusd runs (watchers added, removed or
      changed), or its [circus] section changed (only a restart of circusd applies that).
    circusd not answering at all is every command's one-line error (no instance can be read without it).
    """
    from .cmd_doctor import FAULT, HUMAN, Finding

    findings = []
    settings = backend.settings
    try:
        pid = backend.daemon_pid()
        statuses = backend.statuses()
    except ManagerError as exc:
        return [Finding("restart_policy_down", FAULT, "circusd", "circusd does not answer: workers are not managed",
                        [str(exc)], [start_hint(settings) if settings.get("service") else
                                     f"{HUMAN}{start_hint(settings)}"])]
    try:
        state = backend.read_state()
    except ManagerError as exc:
        state, unreadable = {}, str(exc)
    else:
        unreadable = None
    listener = state.get("listener") if isinstance(state.get("listener"), dict) else {}
    # The hooks report (the listener block) at the first start or exit they see in a circusd: with every
    # watcher stopped since circusd started, there is nothing to tell yet.
    started = any(s != "stopped" for s in statuses.values())
    if unreadable or (listener.get("pid") != pid and started):
        evidence = [f"circusd pid {pid} (circusctl dstats)"]
        if unreadable:
            evidence.append(unreadable)
        elif not listener:
            evidence.append(f"{backend.state_file}: no `listener` block (the hooks never ran in any circusd)"
                            if os.path.exists(backend.state_file) else f"{backend.state_file} does not exist")
        else:
            evidence.append(f"{backend.state_file}: the hooks last reported from pid {listener.get('pid')}"
                            + (f" at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(listener['started']))}"
                               if isinstance(listener.get("started"), (int, float)) else ""))
        log = os.path.join(settings["log_dir"], "atom-worker-policy.log")
        fixes = [f"tail -n 20 {log}   # what the policy said last"] if os.path.exists(log) else []
        fixes += [restart_fix(settings, "loads the hooks again; every worker restarts"), AFTER_RESTART]
        findings.append(Finding(
            "restart_policy_down", FAULT, "circusd",
            "the restart policy's hooks are not loaded in circusd: crashed workers stay down, no start limit is kept",
            evidence, fixes))
    changes = backend.changes()
    if changes["error"]:
        findings.append(Finding(
            "unit_changed_not_reloaded", FAULT, settings["config"],
            f"circusd's configuration {settings['config']} cannot be compared with what circusd runs",
            [changes["error"]], [f"{HUMAN}fix {settings['config']}, or run site.yml again (it writes it)",
                                 "atom-workerctl daemon-reload"]))
    elif changes["arbiter"]:
        findings.append(Finding(
            "unit_changed_not_reloaded", FAULT, "[circus]",
            f"the [circus] section of {settings['config']} changed: only a restart of circusd applies it",
            [(f"the [circus] settings circusd runs (circusctl globaloptions; {settings['running_config']}, the copy "
              "it was started with) differ from the file")],
            ([("atom-workerctl daemon-reload   # restarts circusd (not reloadconfig, which would restart every "
               "worker without applying [circus]), restart budgets reset first")] if settings.get("service") else
             [restart_fix(settings, "applies [circus]; every worker restarts"), AFTER_RESTART])))
    elif changes["added"] or changes["removed"] or changes["changed"]:
        names = sorted(changes["added"] | changes["removed"] | changes["changed"])
        how = {**dict.fromkeys(changes["changed"], "changed in"), **dict.fromkeys(changes["added"], "added to"),
               **dict.fromkeys(changes["removed"], "removed from")}
        evidence = [f"{n}: {how[n]} {settings['config']}, not loaded" for n in names]
        findings.append(Finding(
            "unit_changed_not_reloaded", FAULT, ", ".join(names),
            "circusd's configuration changed on disk but circusd still runs the old one",
            evidence,
            [("atom-workerctl daemon-reload   # circus reloadconfig: starts, stops or restarts these watchers only, "
              "restart budgets reset first")]))
    return findings
