"""The systemd backend over D-Bus, no `systemctl` subprocess.

Reading (units, exec_start): dbuswire, our own small D-Bus client, which writes a whole batch of calls
before reading their answers: a host's every instance costs two round trips (the Manager's
ListUnitsByPatterns and ListUnitsByNames, then Properties.Get of each property of each loaded unit, all
in flight at once), where one call at a time cost ~7 round trips per instance; and it needs no import of
pystemd (~14 ms of start-up). Acting (ResetFailedUnit, StartUnit, RestartUnit, StopUnit, EnableUnitFiles,
DisableUnitFiles, Reload): pystemd's `pystemd.dbuslib.DBus()`, opened on the first such call. We call the
methods `pystemd.systemd1.Manager`/`Unit` would, but skip their introspection step (an lxml parse of each
object's XML, and importing lxml: about 20 ms), because start-up time is most of what `status` costs.
"""

from __future__ import annotations

import contextlib
import sys
import time

from . import dbuswire
from .backend import Backend, UnitState
from .errors import ManagerError, NoSuchError

DEST = b"org.freedesktop.systemd1"
PATH = b"/org/freedesktop/systemd1"
MANAGER = b"org.freedesktop.systemd1.Manager"
UNIT = b"org.freedesktop.systemd1.Unit"
SERVICE = b"org.freedesktop.systemd1.Service"
UINT64_MAX = 2**64 - 1
# The same names for dbuswire (str).
WIRE_DEST = DEST.decode()
WIRE_PATH = PATH.decode()
WIRE_MANAGER = MANAGER.decode()
PROPERTIES = "org.freedesktop.DBus.Properties"

# What units() reads of each loaded unit: (UnitState field, interface, property).
_PROPS = (("result", SERVICE, b"Result"), ("n_restarts", SERVICE, b"NRestarts"),
          ("since_usec", UNIT, b"StateChangeTimestamp"), ("main_pid", SERVICE, b"MainPID"),
          ("memory", SERVICE, b"MemoryCurrent"), ("unit_file_state", UNIT, b"UnitFileState"),
          ("need_reload", UNIT, b"NeedDaemonReload"))
# ... of a unit that is not active: how its main process ended.
_EXIT_PROPS = (("exit_code", SERVICE, b"ExecMainCode"), ("exit_status", SERVICE, b"ExecMainStatus"))
# ... of one unit per template: the restart policy, the same for all its instances.
_POLICY_PROPS = (("prevent", SERVICE, b"RestartPreventExitStatus"), ("burst", UNIT, b"StartLimitBurst"),
                 ("interval", UNIT, b"StartLimitIntervalUSec"), ("restart", SERVICE, b"Restart"),
                 ("restart_usec", SERVICE, b"RestartUSec"))


def _prop(path, iface: bytes, prop: bytes) -> tuple:
    """A Properties.Get call for dbuswire."""
    return (_text(path), PROPERTIES, "Get", "ss", [iface.decode(), prop.decode()])


def _dbuslib():
    """Import pystemd.dbuslib without running pystemd/__init__.py (which imports lxml and every wrapper)."""
    if "pystemd" not in sys.modules:
        import importlib.util

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
        # Reading: our own connection (dbuswire), many calls in flight at once. Acting: pystemd, opened on
        # the first call that changes something (or the `bus` given).
        self._bus = bus
        self.dbuslib = self.dbusexc = None
        self._paths: dict[str, str] = {}
        try:
            self.wire = dbuswire.Connection()
        except dbuswire.DBusError as exc:
            raise ManagerError(f"cannot reach systemd over D-Bus ({_why_wire(exc)})",
                               hint="is this host running systemd, with dbus installed?") from None

    @property
    def bus(self):
        if self._bus is None:
            self.dbuslib, self.dbusexc = _dbuslib()
            bus = self.dbuslib.DBus()
            try:
                bus.open()
            except self.dbusexc.DBusBaseError as exc:
                raise ManagerError(f"cannot reach systemd over D-Bus ({_why(exc)})",
                                   hint="is this host running systemd, with dbus installed?") from None
            self._bus = bus
        elif self.dbusexc is None:
            self.dbuslib, self.dbusexc = _dbuslib()
        return self._bus

    # -- D-Bus plumbing ------------------------------------------------------------------------------------
    def _call(self, method: bytes, signature: bytes, args: list, what: str):
        bus = self.bus
        try:
            return bus.call_method(DEST, PATH, MANAGER, method,
                                   self.dbuslib.apply_signature(signature, args) if signature else []).body
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

    def _read_all(self, calls: list[tuple], what: list[str]) -> list:
        """Many reads in one batch (dbuswire): each call (path, interface, member, signature, args) -> its
        reply's body; the first error reply raises, as the same call alone would."""
        batch = [(WIRE_DEST, *c) for c in calls]
        try:
            try:
                replies = self.wire.batch(batch)
            except dbuswire.DBusError as exc:
                if exc.name != dbuswire.DISCONNECTED:
                    raise
                # systemd closed the connection (daemon-reexec closes its private socket's): reads are
                # safe to repeat, so once more on a new connection. (The old one stays, closed, until a new
                # one is made: a later read tries again, and says DISCONNECTED again if it cannot.)
                self.wire.close()
                wire = dbuswire.Connection()
                self.wire = wire
                replies = wire.batch(batch)
        except dbuswire.DBusError as exc:
            raise _wire_error(exc, what[0] if what else "read units") from None
        for reply, w in zip(replies, what, strict=True):
            if isinstance(reply, dbuswire.DBusError):
                raise _wire_error(reply, w)
        return replies

    def _get(self, path, iface: bytes, prop: bytes, what: str):
        return self._read_all([_prop(path, iface, prop)], [what])[0][0]

    def _path(self, unit: str):
        path = self._paths.get(unit)
        if path is None:
            # LoadUnit returns the object of a unit that is not loaded yet (an instance never started).
            path = self._read_all([(WIRE_PATH, WIRE_MANAGER, "LoadUnit", "s", [unit])], [f"load {unit}"])[0][0]
            self._paths[unit] = path
        return path

    # -- reading -------------------------------------------------------------------------------------------
    def list_loaded(self, glob: str) -> list[tuple]:
        rows = self._read_all([(WIRE_PATH, WIRE_MANAGER, "ListUnitsByPatterns", "asas", [[], [glob]])],
                              ["list units"])[0][0]
        for row in rows:
            self._paths[row[0]] = row[6]
        return rows

    def units(self, names: list[str], glob: str) -> dict[str, UnitState]:
        """Two round trips whatever the number of units: the listing (ListUnitsByPatterns for the glob,
        ListUnitsByNames for the named units, which loads those not loaded yet, as LoadUnit does), then
        every property of every loaded unit in one batch."""
        names = list(dict.fromkeys(names))
        calls, what = [], []
        if glob:
            calls.append((WIRE_PATH, WIRE_MANAGER, "ListUnitsByPatterns", "asas", [[], [glob]]))
            what.append("list units")
        if names:
            calls.append((WIRE_PATH, WIRE_MANAGER, "ListUnitsByNames", "as", [names]))
            what.append(f"load {' '.join(names)}" if len(names) <= 3 else f"load {len(names)} units")
        rows: dict[str, tuple] = {}
        listed: list[str] = []
        replies = self._read_all(calls, what) if calls else []
        for n, reply in enumerate(replies):
            by_name = names and n == len(replies) - 1  # ListUnitsByNames' answer comes last
            found = reply[0]
            for k, row in enumerate(found):
                self._paths[row[0]] = row[6]
                if by_name:
                    # A row per name asked, in order, but under the unit's real name: an alias's row is
                    # the alias's (not read again as a unit of its own), and nothing here is a stray.
                    key = names[k] if len(found) == len(names) else row[0]
                    rows.setdefault(key, row)
                elif row[0] not in rows:
                    rows[row[0]] = row
                    listed.append(row[0])
        named = set(names)
        order = names + sorted(u for u in listed if u not in named)
        out: dict[str, UnitState] = {}
        calls, what, plan = [], [], []
        templates: dict[str, str] = {}
        for unit in order:
            row = rows.get(unit)
            if row is None:  # not in the listing's answer (not expected from systemd): read it the slow way
                row = self._row(unit)
            _name, _desc, load, active, sub, _following, path, job_id = row[:8]
            state = UnitState(unit, load_state=load, active_state=active, sub_state=sub)
            out[unit] = state
            if load != "loaded":
                continue
            state.job = "queued" if job_id else ""
            props = _PROPS if active == "active" else _PROPS + _EXIT_PROPS
            template = unit.split("@", 1)[0]
            if template not in templates:
                # The restart policy is the template's: read it once per template, for all its instances.
                templates[template] = unit
                props = props + _POLICY_PROPS
            plan.append((state, len(calls), props))
            calls += [_prop(path, iface, prop) for _attr, iface, prop in props]
            what += [unit] * len(props)
        replies = self._read_all(calls, what) if calls else []
        policies: dict[str, tuple] = {}
        for state, at, props in plan:
            values = {attr: replies[at + k][0] for k, (attr, _i, _p) in enumerate(props)}
            state.result = values["result"]
            state.n_restarts = values["n_restarts"]
            state.since_usec = values["since_usec"]
            state.main_pid = values["main_pid"]
            memory = values["memory"]
            state.memory_bytes = None if memory == UINT64_MAX else memory
            state.unit_file_state = values["unit_file_state"]
            state.need_reload = bool(values["need_reload"])
            if "exit_code" in values:
                state.exit_code = {1: "exited", 2: "killed", 3: "dumped"}.get(values["exit_code"], "")
                state.exit_status = values["exit_status"]
            if "burst" in values:
                prevent = values["prevent"]
                policies[state.unit.split("@", 1)[0]] = (
                    values["burst"], values["interval"], values["restart"], values["restart_usec"],
                    tuple(prevent[0]) if prevent else ())
        for state, _at, _props in plan:
            (state.start_limit_burst, state.start_limit_interval_usec, state.restart, state.restart_usec,
             state.restart_prevent) = policies[state.unit.split("@", 1)[0]]
        return out

    def _row(self, unit: str) -> tuple:
        """A listing row for one unit from its own properties (LoadUnit, then four Gets)."""
        path = self._path(unit)
        load, active, sub, job = (r[0] for r in self._read_all(
            [_prop(path, UNIT, p) for p in (b"LoadState", b"ActiveState", b"SubState", b"Job")], [unit] * 4))
        return (unit, "", load, active, sub, "", path, job[0])

    def exec_start(self, unit: str) -> list[tuple[str, list[str]]]:
        """(path, argv) of each ExecStart= line of a loaded unit (doctor checks that its programs exist)."""
        try:
            lines = self._get(self._path(unit), SERVICE, b"ExecStart", unit)
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
        self.wire.close()
        if self._bus is not None:
            with contextlib.suppress(Exception):
                self._bus.close()


def _why(exc) -> str:
    message = getattr(exc, "err_message", "") or str(exc)
    message = _text(message).strip()
    errno = getattr(exc, "errno", None)
    if errno == -2 and "open a bus" in message:
        return "no system bus socket (/run/dbus/system_bus_socket)"
    if errno == -13:
        return "permission denied"
    return message.rstrip(".")


def _why_wire(exc) -> str:
    if exc.name == "org.freedesktop.DBus.Error.AccessDenied":
        return "permission denied"
    if exc.message.startswith("no such socket: ") and exc.message.endswith(dbuswire.system_bus_path()):
        return f"no system bus socket ({dbuswire.system_bus_path()})"
    return exc.message.rstrip(".")


def _wire_error(exc, what: str):
    """A dbuswire error as the ManagerError / NoSuchError the pystemd path raises for the same reply."""
    name = exc.name
    if name in ("org.freedesktop.DBus.Error.AccessDenied",
                "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"):
        return ManagerError(f"{what}: permission denied by systemd", hint="run as root (or allow it with polkit)")
    if name == "org.freedesktop.systemd1.NoSuchUnit":
        return NoSuchError(f"{what}: {_why_wire(exc)}")
    if name in (dbuswire.DISCONNECTED, "org.freedesktop.DBus.Error.NoReply",
                "org.freedesktop.DBus.Error.Timeout", "org.freedesktop.DBus.Error.TimedOut"):
        return ManagerError(f"{what}: systemd did not answer over D-Bus ({_why_wire(exc)})")
    return ManagerError(f"{what}: {_why_wire(exc)}")
