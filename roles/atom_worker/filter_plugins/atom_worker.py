"""Filters of the atom_worker role: the host's model of AtoM sites, pools and units.

Plain Python (stdlib only). The role feeds its variables in, gets back one normalised model, asserts
the model in tasks/preflight.yml, renders templates/ from it and writes /etc/atom-worker/sites.json.
The filters never raise on bad input: they keep what they cannot normalise so that the preflight
asserts can name the variable and what is allowed.
"""

import hashlib
import ipaddress
import re

UMBRELLA_TARGET = "atom-workers.target"
DEFAULT_SITE = "default"
DEFAULT_POOL = "default"
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")
ANY_ADDRESSES = ("", "0.0.0.0", "::", "*")


def _int(value):
    """An int when the value is one (or a string of one), else the value unchanged."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return value
    return value


def _names(value):
    """A list of names from a list or a comma-separated string; anything else is kept as it is."""
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        return [str(part).strip() for part in value]
    return value


def unit_prefix(site, pool):
    """`atom-worker` for the default pool of the default site, else `atom-worker-<site>-<pool>`."""
    if site == DEFAULT_SITE and pool == DEFAULT_POOL:
        return "atom-worker"
    return f"atom-worker-{site}-{pool}"


def site_target(site):
    """The target grouping a site's units: the umbrella target for the default site."""
    if site == DEFAULT_SITE:
        return UMBRELLA_TARGET
    return f"atom-workers-{site}.target"


def is_loopback(address):
    address = str(address).strip().strip("[]")
    if address.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _host_port(address, port):
    address = str(address)
    if ":" in address and not address.startswith("["):
        address = f"[{address}]"  # IPv6 literal
    return f"{address}:{port}"


def atom_worker_gearman_servers(hostvars, group_hosts, inventory_hostname):
    """`host:port` of every job server in the group, as this worker host must reach it.

    A job server on this very host that listens on loopback or on every address is reached at
    127.0.0.1 (not `localhost`: gearmand may miss ::1). Another host listening on every address is
    reached at its inventory address (`ansible_host`, else its name). Loopback on another host is
    kept as it is and refused by the preflight.
    """
    servers = []
    for host in group_hosts or []:
        hv = hostvars[host]
        listen = str(
            hv.get("gearman_job_server_listen_address", "127.0.0.1") or ""
        ).strip()
        port = hv.get("gearman_job_server_port", 4730)
        if host == inventory_hostname and (
            listen in ANY_ADDRESSES or is_loopback(listen)
        ):
            address = "127.0.0.1"
        elif listen in ANY_ADDRESSES:
            address = hv.get("ansible_host", host)
        else:
            address = listen
        servers.append(_host_port(address, port))
    return servers


def atom_worker_prefix(realpath, workers_key):
    """AtoM's function-name prefix: md5(realpath(root) . workers_key)."""
    data = ("{}{}".format(realpath, workers_key or "")).encode("utf-8")
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _pool(raw, index, site, cfg, var):
    raw = raw if isinstance(raw, dict) else {"name": raw}
    name = raw.get("name", DEFAULT_POOL if index == 0 else None)
    is_default = name == DEFAULT_POOL
    instances_default = cfg.get("instances", 1) if is_default else 1
    pool = {
        "name": name,
        "var": var,
        "instances": _int(raw.get("instances", instances_default)),
        "types": _names(raw.get("types", cfg.get("types", []) if is_default else [])),
        "abilities": _names(
            raw.get("abilities", cfg.get("abilities", []) if is_default else [])
        ),
        "max_job_count": _int(
            raw.get("max_job_count", cfg.get("max_job_count", 0) if is_default else 0)
        ),
        "max_mem_usage": _int(
            raw.get("max_mem_usage", cfg.get("max_mem_usage", 0) if is_default else 0)
        ),
        "unknown_keys": sorted(
            set(raw)
            - {
                "name",
                "instances",
                "types",
                "abilities",
                "max_job_count",
                "max_mem_usage",
            }
        ),
    }
    pool["recycle"] = bool(
        (isinstance(pool["max_job_count"], int) and pool["max_job_count"] > 0)
        or (isinstance(pool["max_mem_usage"], int) and pool["max_mem_usage"] > 0)
    )
    valid_name = isinstance(name, str) and isinstance(site["name"], str)
    prefix = unit_prefix(site["name"], name) if valid_name else None
    instances = pool["instances"] if isinstance(pool["instances"], int) else 0
    pool.update(
        {
            "site": site["name"],
            "pool": name,
            "unit_prefix": prefix,
            "unit_template": f"{prefix}@.service" if prefix else None,
            "units": [f"{prefix}@{n}.service" for n in range(1, instances + 1)]
            if prefix
            else [],
            "unit_glob": f"{prefix}@*.service" if prefix else None,
            "root": site["root"],
            "user": site["user"],
            "group": site["group"],
            "target": site["target"],
        }
    )
    return pool


def atom_worker_model(cfg):
    """Normalise the role's variables (given as one dict, keys without the `atom_worker_` prefix).

    Returns {"sites": [...], "pools": [...], "targets": [...]}; every pool carries what its unit
    template needs (see templates/README.md, context `unit`).
    """
    raw_sites = cfg.get("sites") or []
    if not raw_sites:
        raw_sites = [
            {
                "name": DEFAULT_SITE,
                "root": cfg.get("root"),
                "workers_key": cfg.get("workers_key", ""),
                "pools": [{"name": DEFAULT_POOL}] + list(cfg.get("pools") or []),
                "_var": "atom_worker_root",
                "_pools_var": "atom_worker_pools",
            }
        ]
    sites, pools = [], []
    for s_index, given in enumerate(raw_sites):
        raw = given if isinstance(given, dict) else {"name": given}
        var = raw.get("_var", f"atom_worker_sites[{s_index}]")
        name = raw.get("name")
        root = raw.get("root", cfg.get("root"))
        site = {
            "name": name,
            "var": var,
            "root": str(root).rstrip("/") or "/" if isinstance(root, str) else root,
            "workers_key": ""
            if raw.get("workers_key") is None
            else raw.get("workers_key", ""),
            "user": raw.get("user", cfg.get("user", "www-data")),
            "group": raw.get("group", cfg.get("group", "www-data")),
            "gearman_servers": list(
                raw.get("gearman_servers") or cfg.get("gearman_servers") or []
            ),
            "target": site_target(name) if isinstance(name, str) else None,
            "unknown_keys": sorted(
                set(raw)
                - {
                    "name",
                    "root",
                    "workers_key",
                    "user",
                    "group",
                    "gearman_servers",
                    "pools",
                    "_var",
                    "_pools_var",
                }
            ),
        }
        raw_pools = raw.get("pools") or [{"name": DEFAULT_POOL}]
        pools_var = raw.get("_pools_var")
        site_pools = []
        for p_index, raw_pool in enumerate(raw_pools):
            if pools_var:
                # Simple mode: the default pool comes from atom_worker_instances & co, the others
                # from atom_worker_pools (shifted by one).
                p_var = (
                    "atom_worker_instances"
                    if p_index == 0
                    else f"{pools_var}[{p_index - 1}]"
                )
            else:
                p_var = f"{var}.pools[{p_index}]"
            pool = _pool(raw_pool, p_index, site, cfg, p_var)
            site_pools.append(pool)
        site["pools"] = [p["name"] for p in site_pools]
        sites.append(site)
        pools.extend(site_pools)
    targets = [
        {
            "name": UMBRELLA_TARGET,
            "description": "AtoM workers (every site on this host)",
            "part_of": "",
            "wanted_by": "multi-user.target",
        }
    ]
    for site in sites:
        if site["target"] and site["target"] != UMBRELLA_TARGET:
            targets.append(
                {
                    "name": site["target"],
                    "description": "AtoM workers of site {}".format(site["name"]),
                    "part_of": UMBRELLA_TARGET,
                    "wanted_by": UMBRELLA_TARGET,
                }
            )
    return {"sites": sites, "pools": pools, "targets": targets}


def atom_worker_stat_is(st, kind, mode=None, owner=None, group=None, target=None):
    """Whether an atom_host_probe `stat` entry is a `kind` (dir, file, link) with these attributes (None:
    any): the roles skip a step whose path is already as wanted."""
    if not st or st.get("type") != kind:
        return False
    wanted = {"mode": mode, "owner": owner, "group": group, "target": target}
    return all(value is None or st.get(key) == value for key, value in wanted.items())


def atom_worker_files_differ(files, probe):
    """The dests among atom_files specs that atom_files would change on the host the probe read.

    files: atom_files' specs (dest, content, mode 0644, owner and group root by default, as that module);
    probe: an atom_host_probe result that has each dest in both `stat` and `sha256`. A dest the probe did not
    read counts as differing: a missing read must never pass for "as wanted".
    """
    out = []
    for spec in files:
        dest = spec["dest"]
        st = (probe.get("stat") or {}).get(dest) or {}
        digest = (probe.get("sha256") or {}).get(dest)
        same = (
            st.get("type") == "file"
            and st.get("mode") == "{:04o}".format(int(str(spec.get("mode", "0644")), 8))
            and st.get("owner") == spec.get("owner", "root")
            and st.get("group") == spec.get("group", "root")
            and digest == hashlib.sha256(str(spec["content"]).encode("utf-8")).hexdigest()
        )
        if not same:
            out.append(dest)
    return out


def atom_worker_yaml_edits_due(edits, texts):
    """The paths among atom_worker_yaml_keys edits ({path, keys, create}) that the module would change.

    texts: path to its current text (atom_host_probe `read`; null when missing). The module's own edit
    function decides, so "nothing to do" here is exactly "unchanged" there. A missing file, or one the edit
    refuses, is due: the module then creates it or says why it cannot.
    """
    from ansible_collections.atom.workers.plugins.modules.atom_worker_yaml_keys import YamlEditError, edit

    due = []
    for item in edits:
        text = texts.get(item["path"])
        if text is None:
            due.append(item["path"])
            continue
        # The module reads the file in text mode (universal newlines): a CRLF file it would leave alone must
        # not look due here.
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        try:
            after, _ = edit(text, item["keys"])
        except YamlEditError:
            due.append(item["path"])
            continue
        if after != text:
            due.append(item["path"])
    return due


def atom_worker_leftovers(on_host, pools, targets):
    """What a converge removes: instances above the wanted counts, targets and unit files of removed pools.

    on_host: an atom_host_probe result with `units_loaded` (worker instances systemd knows) and `glob` (the
    enabled links and unit files in the unit folder); pools: the model's pools (unit_template, units);
    targets: the model's targets. Returns {instances, targets, files}, names only.
    """
    wanted_units = [u for pool in pools for u in pool["units"]]
    wanted_files = [pool["unit_template"] for pool in pools] + [t["name"] for t in targets]
    found = {}
    for entries in (on_host.get("glob") or {}).values():
        for entry in entries:
            found[entry["path"]] = entry["type"]
    links = [path.rsplit("/", 1)[-1] for path, kind in found.items() if kind == "link"]
    files = [path.rsplit("/", 1)[-1] for path, kind in found.items() if kind == "file"]
    instances = []
    for name in list((on_host.get("units_loaded") or {}).keys()) + [
            n for n in links if re.match(r"^atom-worker.*@.+\.service$", n)]:
        if name not in wanted_units and name not in instances:
            instances.append(name)
    extra_targets = []
    for name in files:
        if re.match(r"^atom-workers.*\.target$", name) and name not in [t["name"] for t in targets] \
                and name not in extra_targets:
            extra_targets.append(name)
    extra_files = []
    for name in files:
        if name not in wanted_files and name not in extra_files:
            extra_files.append(name)
    return {"instances": instances, "targets": extra_targets, "files": extra_files}


def atom_worker_moved_sites(realpaths, previous_state):
    """Sites whose root resolves elsewhere than the last run recorded in sites.json (a release symlink moved).

    realpaths: site name to the real path of its root now (None where it does not resolve); previous_state:
    the parsed sites.json of the last run ({} on the first run, when nothing moved).
    """
    sites = (previous_state or {}).get("sites", [])
    recorded = {s.get("name"): s.get("realpath") for s in sites if isinstance(s, dict)}
    moved = []
    for name, now in realpaths.items():
        if now and recorded.get(name) and recorded[name] != now:
            moved.append(name)
    return moved


def atom_worker_units(pools, common):
    """Each pool merged with the settings all units share (restart policy, hardening, ...)."""
    out = []
    homes = common.get("homes") or {}
    for pool in pools:
        unit = {k: v for k, v in common.items() if k != "homes"}
        unit.update(pool)
        # supervisord sets no HOME for `user=` (systemd does for User=): the programs get it from passwd.
        if homes.get(pool.get("user")):
            unit["home"] = homes[pool["user"]]
        rw = [
            d if str(d).startswith("/") else "{}/{}".format(pool["root"], d)
            for d in common.get("read_write_dirs", [])
        ]
        unit["read_write_paths"] = [f"-{p}" for p in rw]
        home = str(pool["root"]).startswith(("/home/", "/root/", "/run/user/"))
        unit["protect_home"] = "read-only" if home else "yes"
        out.append(unit)
    return out


def atom_worker_state(model, realpaths, units, meta):
    """The document written to /etc/atom-worker/sites.json (schema: roles/atom_worker/README.md)."""
    by_site = {}
    for unit in units:
        by_site.setdefault(unit["site"], []).append(
            {
                "name": unit["name"],
                "unit_template": unit["unit_template"],
                "units": list(unit["units"]),
                "instances": unit["instances"],
                "types": list(unit["types"]),
                "abilities": list(unit["abilities"]),
                "max_job_count": unit["max_job_count"],
                "max_mem_usage": unit["max_mem_usage"],
                "recycling": bool(unit["recycle"]),
            }
        )
    sites = []
    for site in model["sites"]:
        realpath = realpaths.get(site["name"]) or site["root"]
        sites.append(
            {
                "name": site["name"],
                "root": site["root"],
                "realpath": realpath,
                "workers_key": site["workers_key"],
                "prefix": atom_worker_prefix(realpath, site["workers_key"]),
                "gearman_servers": list(site["gearman_servers"]),
                "target": site["target"],
                "user": site["user"],
                "group": site["group"],
                "pools": by_site.get(site["name"], []),
            }
        )
    state = {
        "schema": meta.get("schema", 1),
        "manager": meta.get("manager", "systemd"),
        "target": UMBRELLA_TARGET,
        "unit_dir": meta.get("unit_dir", "/etc/systemd/system"),
        "recycle_helper": meta.get("recycle_helper"),
        "sites": sites,
    }
    if state["manager"] == "supervisor":
        # Where atom-workerctl finds supervisord, the programs and the listener (README: schema).
        state["supervisor"] = dict(meta.get("supervisor") or {})
    elif state["manager"] == "circus":
        # Where atom-workerctl finds circusd, its configuration, the policy's state and the logs (README: schema).
        state["circus"] = dict(meta.get("circus") or {})
    return state


def supervisor_group(target):
    """The supervisord group of a site: its systemd target without `.target`."""
    return target[: -len(".target")] if target.endswith(".target") else target


def atom_worker_supervisor_processes(units):
    """One entry per worker process of the pools: `group:name` as supervisorctl names it, with its pool.

    atom-worker@N.service is atom-workers:atom-worker@N; atom-worker-<site>-<pool>@N.service is
    atom-workers-<site>:atom-worker-<site>-<pool>@N (templates/supervisor/atom-worker.conf.j2).
    """
    out = []
    for unit in units:
        instances = unit["instances"] if isinstance(unit["instances"], int) else 0
        group = supervisor_group(unit["target"])
        for n in range(1, instances + 1):
            out.append(
                {
                    "namespec": f"{group}:{unit['unit_prefix']}@{n}",
                    "name": f"{unit['unit_prefix']}@{n}",
                    "group": group,
                    "unit": f"{unit['unit_prefix']}@{n}.service",
                    "site": unit["site"],
                    "pool": unit["pool"],
                    "recycle": bool(unit.get("recycle")),
                }
            )
    return out


def _ini_sections(text):
    """{section: {key: value}} of a circus INI text ({} for none or a text that does not parse)."""
    import configparser

    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys as written (circus reads them case-sensitively)
    try:
        parser.read_string(text or "")
    except configparser.Error:
        return None
    return {name: dict(parser.items(name)) for name in parser.sections()}


def atom_worker_circus_changes(old_text, new_text):
    """What `circusctl reloadconfig` does when the configuration goes from `old_text` (the file on the host,
    None when there is none) to `new_text`, as circus decides it (arbiter.reload_from_config): watchers whose
    [watcher:NAME] or [env:NAME] section is new or differs are (re)started, those gone are stopped, the others
    are left alone; any other change ([circus], or an old file that does not parse) restarts every watcher.

    Returns {"started": [names], "stopped": [names], "all": bool, "changed": bool}.
    """
    old, new = _ini_sections(old_text), _ini_sections(new_text) or {}

    def watchers(sections):
        out = {}
        for name, items in sections.items():
            kind, _, watcher = name.partition(":")
            if kind in ("watcher", "env") and watcher:
                out.setdefault(watcher, {})[kind] = items
        return out

    def others(sections):
        return {name: items for name, items in sections.items() if name.partition(":")[0] not in ("watcher", "env")}

    new_w = watchers(new)
    if old is None:
        return {"started": sorted(new_w), "stopped": [], "all": True, "changed": old_text != new_text}
    old_w = watchers(old)
    everything = others(old) != others(new)
    started = sorted(n for n in new_w if everything or old_w.get(n) != new_w[n])
    stopped = sorted(n for n in old_w if n not in new_w)
    return {"started": started, "stopped": stopped, "all": everything, "changed": old_text != new_text}


def _control_character(text):
    """The first control character of a text (a newline, a tab, NUL, DEL, a Unicode line break), or None."""
    for char in text:
        if ord(char) < 32 or 127 <= ord(char) < 160 or char in "\u2028\u2029":
            return char
    return None


def atom_worker_control_characters(values):
    """One line for each text in `values` ({variable name: value}, walked through lists and mappings, keys
    included) that holds a control character. Every such value ends up in a unit file, a supervisord INI or
    AtoM's YAML, where a newline starts a line of the attacker's choosing (`abilities: ["X\nUser=root"]`)."""
    problems = []

    def walk(path, value):
        if isinstance(value, str):
            char = _control_character(value)
            if char is not None:
                shown = value if len(value) <= 60 else value[:57] + "..."
                problems.append(f"{path}={shown!r} holds a control character ({char!r}): refused, a unit file, "
                                "supervisord INI or AtoM YAML would get it verbatim")
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{path} key", key)
                walk(f"{path}.{key}", item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(f"{path}[{index}]", item)

    for name in sorted(values):
        walk(name, values[name])
    return problems


# What a value may hold where it lands (atom_worker_bad_values): one word for systemd, supervisord and a shell.
# No blank (it splits ReadWritePaths= and ExecStart=), no `%` (a systemd specifier), no `\\` (an escape), no
# quote; and no leading `-` where a command would read an option.
_PATH = re.compile(r"/[A-Za-z0-9._+@,:=~/-]*")
_RELPATH = re.compile(r"[A-Za-z0-9._+@,:=~/][A-Za-z0-9._+@,:=~/-]*")
_ACCOUNT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?")
_JOB_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_UNIT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9:_.@-]*")
RESTART_VALUES = ("no", "on-success", "on-failure", "on-abnormal", "on-watchdog", "on-abort", "always")
# Signals AtoM's worker exits 0 on (the role's argument spec allows the same ones).
KILL_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
_PATH_VARS = ("php", "recycle_helper", "unit_dir", "state_file", "supervisorctl", "supervisor_conf_dir",
              "supervisor_log_dir", "supervisor_policy_command", "supervisor_policy_state_file", "notify_sendmail",
              "notify_command", "circus_venv", "circus_config", "circus_log_dir", "circus_lib_dir",
              "circus_state_file", "circus_wheels_cache")
NOTIFY_CHANNELS = ("log", "mail", "webhook")
# A plain mail address (no display name, no list): it goes into a To:/From: header of the notice as it is.
_ADDRESS = re.compile(r"[A-Za-z0-9._+=-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*")
_WANT = {
    _PATH: "an absolute path of letters, digits and ._+@,:=~/-",
    _RELPATH: "a path of letters, digits and ._+@,:=~/- (relative to the AtoM root, or absolute)",
    _ACCOUNT: "a user or group name (letters, digits, _ . -)",
    _JOB_NAME: "a worker type or job class name (letters, digits, _ . -)",
    _UNIT_NAME: "a systemd unit name",
}


def atom_worker_bad_values(values, model):
    """One line for each value that cannot be what it claims, naming the variable.

    values: the role's variables ({name: value}); model: atom_worker_model's result (sites and pools carry
    the variable they came from in `var`). Values of the wrong type are left to the asserts that name them.
    """
    problems = []

    def check(name, value, pattern):
        if isinstance(value, str) and not pattern.fullmatch(value):
            problems.append(f"{name}={value!r}: must be {_WANT[pattern]}")

    def choice(name, allowed):
        value = values.get(name)
        if name in values and value not in allowed:
            problems.append(f"{name}={value!r}: must be one of {', '.join(allowed)}")

    for key in _PATH_VARS:
        check(f"atom_worker_{key}", values.get(f"atom_worker_{key}"), _PATH)
    if values.get("atom_worker_circus_wheels_dir"):  # "" = from the package index
        check("atom_worker_circus_wheels_dir", values["atom_worker_circus_wheels_dir"], _PATH)
    for key in ("user", "group"):
        check(f"atom_worker_{key}", values.get(f"atom_worker_{key}"), _ACCOUNT)
    choice("atom_worker_restart", RESTART_VALUES)
    choice("atom_worker_kill_signal", KILL_SIGNALS)
    for key, pattern in (("read_write_dirs", _RELPATH), ("after_services", _UNIT_NAME),
                         ("after_services_candidates", _UNIT_NAME)):
        items = values.get(f"atom_worker_{key}")
        for index, item in enumerate(items if isinstance(items, list) else []):
            check(f"atom_worker_{key}[{index}]", item, pattern)
    problems += _notify_problems(values)
    for site in (model or {}).get("sites", []):
        check(site["var"] if site["var"] == "atom_worker_root" else f"{site['var']}.root", site.get("root"), _PATH)
        for key in ("user", "group"):
            if site.get(key) != values.get(f"atom_worker_{key}"):  # a site's own (the role's is checked above)
                check(f"{site['var']}.{key}", site.get(key), _ACCOUNT)
    for pool in (model or {}).get("pools", []):
        for key in ("types", "abilities"):
            items = pool.get(key)
            # The default pool of the simple case takes them from atom_worker_types / atom_worker_abilities.
            var = f"atom_worker_{key}" if pool["var"] == "atom_worker_instances" else f"{pool['var']}.{key}"
            for index, item in enumerate(items if isinstance(items, list) else []):
                check(f"{var}[{index}]", item, _JOB_NAME)
    return problems


def _notify_problems(values):
    """The notice's settings: known channels, and what each chosen channel needs (mail: recipients; webhook:
    an http(s) URL). The URL is never shown: it may hold a token."""
    from urllib.parse import urlsplit

    problems = []
    channels = values.get("atom_worker_notify", [])
    if not isinstance(channels, list):
        return [f"atom_worker_notify={channels!r}: must be a list of {', '.join(NOTIFY_CHANNELS)} ([] for none)"]
    for channel in channels:
        if channel not in NOTIFY_CHANNELS:
            problems.append(f"atom_worker_notify has {channel!r}: the channels are {', '.join(NOTIFY_CHANNELS)}")
    if len(set(map(str, channels))) != len(channels):
        problems.append("atom_worker_notify lists a channel twice")
    to = values.get("atom_worker_notify_mail_to", [])
    to = [to] if isinstance(to, str) else to
    if not isinstance(to, list):
        problems.append("atom_worker_notify_mail_to: must be a list of mail addresses")
        to = []
    for index, address in enumerate(to):
        if not (isinstance(address, str) and _ADDRESS.fullmatch(address)):
            problems.append(f"atom_worker_notify_mail_to[{index}]={address!r}: must be a plain mail address "
                            "(user@host)")
    if "mail" in channels and not to:
        problems.append("atom_worker_notify has mail: atom_worker_notify_mail_to must name at least one address")
    sender = values.get("atom_worker_notify_mail_from", "")
    if sender and not (isinstance(sender, str) and _ADDRESS.fullmatch(sender)):
        problems.append(f"atom_worker_notify_mail_from={sender!r}: must be a plain mail address (user@host), "
                        "or empty for the MTA's default")
    url = values.get("atom_worker_notify_webhook_url", "")
    parts = urlsplit(url) if isinstance(url, str) else None
    if (url or "webhook" in channels) and not (
            parts and parts.scheme in ("http", "https") and parts.hostname and not re.search(r"\s", url)):
        problems.append("atom_worker_notify_webhook_url: must be an http:// or https:// URL"
                        + (" (atom_worker_notify has webhook)" if "webhook" in channels else "")
                        + " (the value is not shown: it may hold a token)")
    timeout = _int(values.get("atom_worker_notify_webhook_timeout", 10))
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 1 <= timeout <= 300:
        problems.append(f"atom_worker_notify_webhook_timeout={timeout!r}: must be whole seconds from 1 to 300")
    return problems


def atom_worker_passwd_homes(lines):
    """{user: home} from `getent passwd USER` lines (name:x:uid:gid:gecos:home:shell)."""
    homes = {}
    for line in lines or []:
        fields = str(line).strip().split(":")
        if len(fields) >= 7 and fields[5]:
            homes[fields[0]] = fields[5]
    return homes


class FilterModule:
    def filters(self):
        return {
            "atom_worker_moved_sites": atom_worker_moved_sites,
            "atom_worker_files_differ": atom_worker_files_differ,
            "atom_worker_yaml_edits_due": atom_worker_yaml_edits_due,
            "atom_worker_leftovers": atom_worker_leftovers,
            "atom_worker_stat_is": atom_worker_stat_is,
            "atom_worker_model": atom_worker_model,
            "atom_worker_units": atom_worker_units,
            "atom_worker_state": atom_worker_state,
            "atom_worker_passwd_homes": atom_worker_passwd_homes,
            "atom_worker_control_characters": atom_worker_control_characters,
            "atom_worker_bad_values": atom_worker_bad_values,
            "atom_worker_supervisor_processes": atom_worker_supervisor_processes,
            "atom_worker_supervisor_group": supervisor_group,
            "atom_worker_circus_changes": atom_worker_circus_changes,
            "atom_worker_gearman_servers": atom_worker_gearman_servers,
            "atom_worker_prefix": atom_worker_prefix,
            "atom_worker_is_loopback": is_loopback,
        }
