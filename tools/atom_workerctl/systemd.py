"""The systemd backend: pystemd over D-Bus, one shared connection, no `systemctl` subprocess.

We call org.freedesktop.systemd1.Manager's methods (ListUnitsByPatterns, LoadUnit, ResetFailedUnit,
StartUnit, RestartUnit, StopUnit, EnableUnitFiles, DisableUnitFiles, Reload) and read unit properties
with org.freedesktop.DBus.Properties.Get, through one `pystemd.dbuslib.DBus()` connection. These are
the calls `pystemd.systemd1.Manager`/`Unit` make; we skip their introspection step (an lxml parse of
each object's XML, and importing lxml: about 20 ms), because start-up time is most of what `status`
costs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import time

from .backend import Backend, UnitState
from .errors import ManagerError, NoSuchError

DEST = b"org.freedesktop.systemd1"
PATH = b"/org/freedesktop/systemd1"
MANAGER = b"org.freedesktop.systemd1.Manager"
UNIT = b"org.freedesktop.systemd1.Unit"
SERVICE = b"org.freedesktop.systemd1.Service"
UINT64_MAX = 2**64 - 1


def _dbuslib():
    """Import pystemd.dbuslib without running pystemd/__init__.py (which imports lxml and every wrapper)."""
    if "pystemd" not in sys.modules:
        try:
            spec = importlib.util.find_spec("pystemd")
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ManagerError("pystemd is not installed: atom-workerctl's systemd backend needs it",
                               hint="apt-get install python3-pystemd (or: pip install 'pystemd>=0.11')")
        package = importlib.util.module_from_spec(spec)  # a bare package: __path__ only, no __init__ run
        sys.modules["pystemd"] = package
    try:
        from pystemd import dbusexc, dbuslib
    except ImportError as exc:
        raise ManagerError(f"pystemd cannot be loaded: {exc}") from None
    return dbuslib, dbusexc


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class SystemdBackend(Backend):
    name = "systemd"

    def __init__(self, bus=None):
        self.dbuslib, self.dbusexc = _dbuslib()
        self.bus = bus
        self._paths: dict[str, bytes] = {}
        if self.bus is None:
            bus = self.dbuslib.DBus()
            try:
                bus.open()
            except self.dbusexc.DBusBaseError as exc:
                raise ManagerError(f"cannot reach systemd over D-Bus ({_why(exc)})",
                                   hint="is this host running systemd, with dbus installed?") from None
            self.bus = bus

    # -- D-Bus plumbing ------------------------------------------------------------------------------------
    def _call(self, method: bytes, signature: bytes, args: list, what: str):
        try:
            return self.bus.call_method(DEST, PATH, MANAGER, method,
                                        self.dbuslib.apply_signature(signature, args) if signature else []).body
        except self.dbusexc.DBusBaseError as exc:
            raise self._error(exc, what) from None

    def _get(self, path: bytes, iface: bytes, prop: bytes, sig: bytes, what: str):
        try:
            return self.bus.get_property(DEST, path, iface, prop, sig)
        except self.dbusexc.DBusBaseError as exc:
            raise self._error(exc, what) from None

    def _error(self, exc, what: str):
        e = self.dbusexc
        if isinstance(exc, (e.DBusAccessDeniedError, e.DBusInteractiveAuthorizationRequiredError)) or \
                getattr(exc, "errno", 0) in (-1, -13) and "denied" in str(exc).lower():
            return ManagerError(f"{what}: permission denied by systemd", hint="run as root (or allow it with polkit)")
        if isinstance(exc, e.DBusNoSuchUnitError):
            return NoSuchError(f"{what}: {_why(exc)}")
        if isinstance(exc, (e.DBusDisconnectedError, e.DBusNoReplyError, e.DBusTimeoutError, e.DBusTimedOutError)):
            return ManagerError(f"{what}: systemd did not answer over D-Bus ({_why(exc)})")
        return ManagerError(f"{what}: {_why(exc)}")

    def _path(self, unit: str) -> bytes:
        path = self._paths.get(unit)
        if path is None:
            # LoadUnit returns the object of a unit that is not loaded yet (an instance never started).
            path = self._call(b"LoadUnit", b"s", [unit.encode()], f"load {unit}")
            self._paths[unit] = path
        return path

    # -- reading -------------------------------------------------------------------------------------------
    def list_loaded(self, glob: str) -> list[tuple]:
        rows = self._call(b"ListUnitsByPatterns", b"asas", [[], [glob.encode()]], "list units")
        for row in rows:
            self._paths[_text(row[0])] = row[6]
        return rows

    def units(self, names: list[str], glob: str) -> dict[str, UnitState]:
        listed = {}
        if glob:
            for row in self.list_loaded(glob):
                listed[_text(row[0])] = (_text(row[2]), _text(row[3]), _text(row[4]), row[6], row[7] != 0)
        out: dict[str, UnitState] = {}
        per_template: dict[str, tuple] = {}
        for unit in list(dict.fromkeys(list(names) + sorted(listed))):
            out[unit] = self._read(unit, listed.get(unit), per_template)
        return out

    def _read(self, unit: str, row, per_template: dict) -> UnitState:
        get = self._get
        if row is None:
            path = self._path(unit)
            load = _text(get(path, UNIT, b"LoadState", b"s", unit))
            active = _text(get(path, UNIT, b"ActiveState", b"s", unit))
            sub = _text(get(path, UNIT, b"SubState", b"s", unit))
            job_id = get(path, UNIT, b"Job", b"(uo)", unit)[0]
        else:
            load, active, sub, path, has_job = row
            job_id = 1 if has_job else 0
        state = UnitState(unit, load_state=load, active_state=active, sub_state=sub)
        if load != "loaded":
            return state
        state.job = "queued" if job_id else ""
        state.result = _text(get(path, SERVICE, b"Result", b"s", unit))
        state.n_restarts = get(path, SERVICE, b"NRestarts", b"u", unit)
        state.since_usec = get(path, UNIT, b"StateChangeTimestamp", b"t", unit)
        state.main_pid = get(path, SERVICE, b"MainPID", b"u", unit)
        memory = get(path, SERVICE, b"MemoryCurrent", b"t", unit)
        state.memory_bytes = None if memory == UINT64_MAX else memory
        state.unit_file_state = _text(get(path, UNIT, b"UnitFileState", b"s", unit))
        state.need_reload = bool(get(path, UNIT, b"NeedDaemonReload", b"b", unit))
        if active != "active":
            state.exit_code = {1: "exited", 2: "killed", 3: "dumped"}.get(
                get(path, SERVICE, b"ExecMainCode", b"i", unit), "")
            state.exit_status = get(path, SERVICE, b"ExecMainStatus", b"i", unit)
        # The restart policy is the template's: read it once per template and reuse it for its instances.
        template = unit.split("@", 1)[0]
        policy = per_template.get(template)
        if policy is None:
            prevent = get(path, SERVICE, b"RestartPreventExitStatus", b"(aiai)", unit)
            policy = (get(path, UNIT, b"StartLimitBurst", b"u", unit),
                      get(path, UNIT, b"StartLimitIntervalUSec", b"t", unit),
                      _text(get(path, SERVICE, b"Restart", b"s", unit)),
                      get(path, SERVICE, b"RestartUSec", b"t", unit),
                      tuple(prevent[0]) if prevent else ())
            per_template[template] = policy
        (state.start_limit_burst, state.start_limit_interval_usec, state.restart, state.restart_usec,
         state.restart_prevent) = policy
        return state

    def exec_start(self, unit: str) -> list[tuple[str, list[str]]]:
        """(path, argv) of each ExecStart= line of a loaded unit (doctor checks that its programs exist)."""
        try:
            lines = self._get(self._path(unit), SERVICE, b"ExecStart", b"a(sasbttttuii)", unit)
        except (ManagerError, NoSuchError):
            return []
        return [(_text(line[0]), [_text(a) for a in line[1]]) for line in lines]

    # -- acting --------------------------------------------------------------------------------------------
    def reset_failed(self, unit: str) -> None:
        with contextlib.suppress(NoSuchError):  # not loaded: nothing to reset
            self._call(b"ResetFailedUnit", b"s", [unit.encode()], f"reset-failed {unit}")

    def start(self, unit: str) -> None:
        self.reset_failed(unit)
        self._call(b"StartUnit", b"ss", [unit.encode(), b"replace"], f"start {unit}")

    def restart(self, unit: str) -> None:
        self.reset_failed(unit)
        self._call(b"RestartUnit", b"ss", [unit.encode(), b"replace"], f"restart {unit}")

    def stop(self, unit: str) -> None:
        self._call(b"StopUnit", b"ss", [unit.encode(), b"replace"], f"stop {unit}")

    def enable(self, units: list[str]) -> list[str]:
        if not units:
            return []
        _, changes = self._call(b"EnableUnitFiles", b"asbb", [[u.encode() for u in units], False, False],
                                f"enable {' '.join(units)}")
        return [f"{_text(kind)} {_text(dest)}" for kind, dest, _src in changes]

    def disable(self, units: list[str]) -> list[str]:
        if not units:
            return []
        changes = self._call(b"DisableUnitFiles", b"asb", [[u.encode() for u in units], False],
                             f"disable {' '.join(units)}")
        return [f"{_text(kind)} {_text(dest)}" for kind, dest, _src in changes]

    def reload(self) -> None:
        self._call(b"Reload", b"", [], "daemon-reload")
        self._paths.clear()
        # Reload returns before systemd has finished reloading; the next call waits for it, but make
        # sure it is done before the caller looks at units again.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                self.bus.get_property(DEST, PATH, MANAGER, b"Version", b"s")
                return
            except self.dbusexc.DBusBaseError:
                time.sleep(0.1)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.bus.close()


def _why(exc) -> str:
    message = getattr(exc, "err_message", "") or str(exc)
    message = _text(message).strip()
    errno = getattr(exc, "errno", None)
    if errno == -2 and "open a bus" in message:
        return "no system bus socket (/run/dbus/system_bus_socket)"
    if errno == -13:
        return "permission denied"
    return message.rstrip(".")
