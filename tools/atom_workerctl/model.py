"""The host's model of its AtoM worker fleet: /etc/atom-worker/sites.json, written by the atom_worker role.

Schema 1 (roles/atom_worker/README.md): {schema, manager, target, unit_dir, recycle_helper, sites: [{name,
root, realpath, workers_key, prefix, gearman_servers, target, user, group, pools: [{name, unit_template,
units, instances, types, abilities, max_job_count, max_mem_usage, recycling}]}]}. Fields may be added
within a schema version, so unknown keys are ignored; a missing required key or a wrong type is a
ConfigError naming the JSON path. `atom-workerctl scale` rewrites `units`/`instances` of one pool and
records it in the pool's `scaled` field; the role's next run writes the file back from the inventory.
"""

from __future__ import annotations

import fnmatch
import json
import os

from . import atomicfile
from .errors import ConfigError, NoSuchError

DEFAULT_CONFIG = "/etc/atom-worker/sites.json"
SUPPORTED_SCHEMAS = (1,)
UNIT_GLOB = "atom-worker*@*.service"


class Pool:
    __slots__ = ("site", "name", "unit_template", "units", "types", "abilities", "recycling", "scaled", "raw")

    def __init__(self, site: Site, raw: dict, where: str):
        self.site = site
        self.raw = raw
        self.name = _str(raw, "name", where)
        self.unit_template = _str(raw, "unit_template", where)
        if not self.unit_template.endswith("@.service"):
            raise ConfigError(f"{where}.unit_template: {self.unit_template!r} is not a template unit (NAME@.service)")
        units = raw.get("units")
        if units is None:  # the earlier draft of the schema: only a count
            units = [instance_unit(self.unit_template, str(i)) for i in range(1, _int(raw, "instances", where) + 1)]
        if not isinstance(units, list) or not all(isinstance(u, str) for u in units):
            raise ConfigError(f"{where}.units: a list of unit names expected")
        self.units: list[str] = units
        self.types = _strlist(raw, "types", where)
        self.abilities = _strlist(raw, "abilities", where)
        self.recycling = bool(raw.get("recycling", False))
        self.scaled = raw.get("scaled")

    @property
    def prefix(self) -> str:
        """`atom-worker` or `atom-worker-SITE-POOL`: the template's name without `@.service`."""
        return self.unit_template[: -len("@.service")]

    def owns(self, unit: str) -> bool:
        return unit.startswith(self.prefix + "@") and unit.endswith(".service")

    def label(self) -> str:
        return self.name if self.site.name == "default" else f"{self.site.name}/{self.name}"


class Site:
    __slots__ = ("name", "root", "realpath", "workers_key", "prefix", "gearman_servers", "target", "user",
                 "group", "pools", "raw")

    def __init__(self, raw: dict, where: str):
        self.raw = raw
        self.name = _str(raw, "name", where)
        self.root = _str(raw, "root", where)
        self.realpath = raw.get("realpath") or self.root
        self.workers_key = raw.get("workers_key") or ""
        self.prefix = raw.get("prefix") or ""
        self.gearman_servers = _strlist(raw, "gearman_servers", where)
        self.target = raw.get("target") or ""
        self.user = raw.get("user") or "www-data"
        self.group = raw.get("group") or self.user
        pools = raw.get("pools")
        if not isinstance(pools, list):
            raise ConfigError(f"{where}.pools: a list expected")
        self.pools = [Pool(self, p if isinstance(p, dict) else _bad(f"{where}.pools[{i}]"), f"{where}.pools[{i}]")
                      for i, p in enumerate(pools)]


class Host:
    """Every site, pool and expected unit of this host."""

    def __init__(self, raw: dict, path: str):
        self.path = path
        self.raw = raw
        schema = raw.get("schema", 1)
        if schema not in SUPPORTED_SCHEMAS:
            raise ConfigError(f"{path}: schema {schema!r} is not supported by this atom-workerctl "
                              f"(it reads schema {', '.join(map(str, SUPPORTED_SCHEMAS))})",
                              hint="upgrade atom-workerctl")
        self.schema = schema
        self.manager = raw.get("manager") or "systemd"
        self.target = raw.get("target") or "atom-workers.target"
        sites = raw.get("sites")
        if not isinstance(sites, list):
            raise ConfigError(f"{path}: `sites` must be a list")
        self.sites = [Site(s if isinstance(s, dict) else _bad(f"sites[{i}]"), f"sites[{i}]")
                      for i, s in enumerate(sites)]

    def pools(self) -> list[Pool]:
        return [p for s in self.sites for p in s.pools]

    def expected_units(self) -> list[str]:
        return [u for p in self.pools() for u in p.units]

    def pool_of(self, unit: str) -> Pool | None:
        for pool in self.pools():
            if pool.owns(unit):
                return pool
        return None

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise NoSuchError(f"no such site: {name} (this host has: {', '.join(s.name for s in self.sites) or 'none'})")

    def pool(self, name: str, site: str | None = None) -> Pool:
        candidates = [p for p in self.pools() if p.name == name and (site is None or p.site.name == site)]
        if not candidates:
            known = ", ".join(p.label() for p in self.pools()) or "none"
            raise NoSuchError(f"no such pool: {name}{' in site ' + site if site else ''} (this host has: {known})")
        if len(candidates) > 1:
            raise NoSuchError(f"pool {name} exists in several sites ({', '.join(p.site.name for p in candidates)}): "
                              "name one with --site", exit_code=2)
        return candidates[0]


def instance_unit(template: str, instance: str) -> str:
    return template.replace("@.service", f"@{instance}.service")


def instance_number(unit: str) -> int | None:
    tail = unit.rsplit("@", 1)[-1].removesuffix(".service")
    return int(tail) if tail.isdigit() else None


def short(unit: str) -> str:
    return unit.removesuffix(".service")


_loaded: dict[str, Host] = {}


def current() -> Host | None:
    """The model load() read last (the supervisord backend's settings come from it)."""
    return _loaded.get("last")


def load(path: str | None = None) -> Host:
    path = path or os.environ.get("ATOM_WORKERCTL_CONFIG") or DEFAULT_CONFIG
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: no AtoM workers were installed on this host by the atom_worker "
                          "role", hint="run site.yml, or point --config at the file") from None
    except PermissionError:
        raise ConfigError(f"cannot read {path}: permission denied") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"malformed JSON in {path}: line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"malformed {path}: the top level is not an object")
    host = _loaded["last"] = Host(raw, path)
    return host


def save(host: Host) -> None:
    """Write the model back atomically (keys sorted, two-space indent, as the role writes it)."""
    text = json.dumps(host.raw, indent=2, sort_keys=True) + "\n"
    try:
        atomicfile.replace(host.path, text)
    except PermissionError:
        raise ConfigError(f"cannot write {host.path}: permission denied", hint="run as root") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {host.path}: {exc}") from None


class Selection:
    """The units a command acts on, each with its pool (None for a stray instance no pool expects)."""

    def __init__(self, units: list[str], explicit: bool):
        self.units = units
        self.explicit = explicit


def select(host: Host, names: list[str], site: str | None = None, pool: str | None = None,
           loaded: list[str] = ()) -> Selection:
    """Resolve INSTANCE arguments: unit names with or without `.service`, globs, or N for `atom-worker@N`.

    Without names: every expected unit (of --site/--pool when given). `loaded` adds instances that
    systemd has loaded although no pool expects them (strays) to what globs can match.
    """
    pools = host.pools()
    if site is not None:
        host.site(site)
        pools = [p for p in pools if p.site.name == site]
    if pool is not None:
        pools = [host.pool(pool, site)]
    in_scope = [u for p in pools for u in p.units]
    if not names:
        return Selection(in_scope, explicit=False)
    known = list(dict.fromkeys(in_scope + [u for u in loaded if any(p.owns(u) for p in pools)
                                           or (site is None and pool is None)]))
    chosen: list[str] = []
    for given in names:
        name = f"{pools[0].prefix if pool else 'atom-worker'}@{given}" if given.isdigit() else given
        unit = name if name.endswith(".service") else name + ".service"
        if any(c in unit for c in "*?["):
            matches = [u for u in known if fnmatch.fnmatchcase(u, unit)]
            if not matches:
                raise NoSuchError(f"no instance matches {name}")
            chosen += matches
            continue
        if not fnmatch.fnmatchcase(unit, UNIT_GLOB) or "@" not in unit or unit.endswith("@.service"):
            raise NoSuchError(f"no such instance: {name} (instances are named like atom-worker@1)")
        if unit not in known:
            owner = next((p for p in pools if p.owns(unit)), None)
            if owner is None:
                raise NoSuchError(f"no such instance: {short(unit)} (no pool of this host runs "
                                  f"{unit.split('@')[0]}@.service; known: {_known(known)})")
            # An instance of a known pool beyond its size: allowed for explicit actions.
        chosen.append(unit)
    return Selection(list(dict.fromkeys(chosen)), explicit=True)


def _known(units: list[str]) -> str:
    names = [short(u) for u in units]
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "none"


def _bad(where: str):
    raise ConfigError(f"{where}: an object expected")


def _str(raw: dict, key: str, where: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key}: a non-empty string expected, found {value!r}")
    return value


def _int(raw: dict, key: str, where: str) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{where}.{key}: a number >= 0 expected, found {value!r}")
    return value


def _strlist(raw: dict, key: str, where: str) -> list[str]:
    value = raw.get(key, [])
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}.{key}: a list of strings expected, found {value!r}")
    return value
