"""The atom_worker role's preflight checks: every bad value named in one line, before anything changes.

A check per task costs a converge ~40 ms each on the control host even when it passes (and there were two
dozen): tasks/preflight.yml asks these two filters instead and fails once per line they return.

- atom_worker_preflight_errors: the role's variables and the model built from them (before the probe);
- atom_worker_probe_errors: what the host's probe found (the other process managers' files, the AtoM roots,
  users and groups, config/*.yml parsed, the pools' types).

Each line is the message of the check it replaces, word for word; a value is shown as Jinja shows it (str()).
Tests mirror Jinja's where it matters: `integer` excludes booleans, `sequence` is anything with a length and
items, `| int` falls back to 0, `match` anchors at the start only.
"""

import re

import yaml

try:  # the collection's other filter file, as Ansible loads it
    from ansible_collections.atom.workers.plugins.filter.atom_worker import (
        atom_worker_bad_values,
        atom_worker_control_characters,
    )
except ImportError:  # loaded by path (the local tests): the file beside this one
    from atom_worker import atom_worker_bad_values, atom_worker_control_characters

MANAGERS = ("systemd", "supervisor", "circus")
MANAGER_PROGRAM = {"systemd": "systemd", "supervisor": "supervisord", "circus": "circus"}
_IPC = r"^ipc:///[A-Za-z0-9._+@,:=~/-]+$"
_PIN = r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!_-]+$"
_SERVER = r"^([A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]+\Z"
_TIMESPAN = r"^([0-9]+ *(us|ms|s|sec|m|min|h|hr|d|w|)\s*)+$"


def _matches(value, pattern):
    return isinstance(value, str) and re.match(pattern, value) is not None


def _integer(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _sequence(value):
    try:
        len(value)
        value.__getitem__  # noqa: B018 (Jinja's `sequence` test: a length and items)
    except (TypeError, AttributeError):
        return False
    return True


def _list(value):
    return _sequence(value) and not isinstance(value, str)


def _int(value):
    """Jinja's `| int`: 0 for what is not a number."""
    try:
        return int(value, 10) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        try:
            return int(float(value))
        except (TypeError, ValueError):
            return 0


def _unknown(item):
    return ", ".join(str(k) for k in item.get("unknown_keys") or []) or "none"


def _manager_errors(v, service_mgr):
    out = []
    manager = v.get("atom_worker_manager")
    if manager not in MANAGERS:
        out.append(f"atom_worker_manager={manager} is not a process manager this role knows; allowed: systemd, "
                   "supervisor, circus.")
    circus_service = v.get("atom_worker_circus_service")
    needs_systemd = manager == "systemd" or (
        manager == "circus" and _sequence(circus_service) and len(circus_service) > 0)
    if needs_systemd and (service_mgr or "systemd") != "systemd":
        out.append(
            f"atom_worker_manager={manager}"
            + (f" with atom_worker_circus_service={circus_service}" if manager == "circus" else "")
            + f" needs systemd as PID 1; this host runs {service_mgr or '?'}"
            + (' (set atom_worker_circus_service: "" and start circusd yourself)' if manager == "circus" else "")
            + ".")
    if manager == "supervisor":
        ok = (isinstance(v.get("atom_worker_supervisor_server_url"), str)
              and _matches(v["atom_worker_supervisor_server_url"], r"^(unix://(/[^ ]+)|https?://[^ ]+)$")
              and all(_matches(v.get(f"atom_worker_supervisor_{k}"), "^/")
                      for k in ("conf_dir", "log_dir", "policy_command", "policy_state_file"))
              and _matches(str(v.get("atom_worker_supervisor_log_backups")), r"^[0-9]+$")
              and _matches(str(v.get("atom_worker_supervisor_log_max_bytes")), r"^[0-9]+(KB|MB|GB)?$")
              and isinstance(v.get("atom_worker_supervisor_service"), str))
        if not ok:
            out.append(
                "atom_worker_supervisor_server_url must be unix:///absolute/path or http(s)://host:port (got "
                f"{v.get('atom_worker_supervisor_server_url')}); the conf dir, log dir, policy command and state file "
                "absolute paths; atom_worker_supervisor_log_backups an integer >= 0 and "
                "atom_worker_supervisor_log_max_bytes a size such as 50MB (got "
                f"{v.get('atom_worker_supervisor_log_backups')}, {v.get('atom_worker_supervisor_log_max_bytes')}).")
    if manager == "circus":
        out += _circus_errors(v)
    return out


def _circus_errors(v):
    out = []
    endpoint, pubsub = v.get("atom_worker_circus_endpoint"), v.get("atom_worker_circus_pubsub_endpoint")
    service, requirements = v.get("atom_worker_circus_service"), v.get("atom_worker_circus_requirements")
    ok = (_matches(endpoint, _IPC) and _matches(pubsub, _IPC) and endpoint != pubsub
          and _matches(service, r"^([A-Za-z0-9_.-]+)?$")
          and _matches(str(v.get("atom_worker_circus_log_max_bytes")), r"^[0-9]+(KB|MB|GB)?$")
          and _matches(str(v.get("atom_worker_circus_log_backups")), r"^[0-9]+$")
          and _list(requirements)
          and all(_matches(r, _PIN) for r in requirements)
          and [re.sub("==.*$", "", r).lower() for r in requirements].count("circus") == 1)
    if not ok:
        out.append(
            "atom_worker_circus_endpoint and atom_worker_circus_pubsub_endpoint must be two different "
            f"ipc:///absolute/path endpoints (got {endpoint}, {pubsub}: circus has no authentication and its "
            "control socket runs anything as root, so never tcp://, not even on 127.0.0.1: any local user could "
            "connect); atom_worker_circus_service a plain service name (no '@': not an instance of a template such "
            f"as the workers' own) or \"\" (got {service}); atom_worker_circus_log_max_bytes a size such as 50MB and "
            "atom_worker_circus_log_backups an integer >= 0 (got "
            f"{v.get('atom_worker_circus_log_max_bytes')}, {v.get('atom_worker_circus_log_backups')}); "
            "atom_worker_circus_requirements a list of NAME==VERSION pins with circus among them "
            f"(got {requirements}).")
    lengths = [len(re.sub("^ipc://", "", str(e))) for e in (endpoint, pubsub)]
    if max(lengths) > 107:
        out.append(
            "atom_worker_circus_endpoint and atom_worker_circus_pubsub_endpoint: a unix socket's path is at most "
            f"107 bytes (got {lengths[0]} and {lengths[1]}); use a shorter folder.")
    return out


def _model_errors(model, pattern):
    out = []
    sites, pools = model.get("sites", []), model.get("pools", [])
    for s in sites:
        if not (_matches(s["name"], pattern) and [x["name"] for x in sites].count(s["name"]) == 1):
            out.append(f"{s['var']}.name={s['name']}: a site name must match {pattern} (lower-case letters, digits, "
                       "underscores; no hyphen) and be unique on the host.")
    for s in sites:
        if not (_matches(s["root"], "^/") and isinstance(s["workers_key"], str) and not s.get("unknown_keys")):
            out.append(f"{s['var']}: root must be an absolute path (got {s['root']}), workers_key a string "
                       f"(got {s['workers_key']}); unknown keys: {_unknown(s)}.")
    for p in pools:
        same = [x for x in pools if x["site"] == p["site"] and x["name"] == p["name"]]
        ok = (_matches(p["name"], pattern) and len(same) == 1
              and _integer(p["instances"]) and p["instances"] >= 0
              and _integer(p["max_job_count"]) and p["max_job_count"] >= 0
              and _integer(p["max_mem_usage"]) and p["max_mem_usage"] >= 0
              and _list(p["types"]) and _list(p["abilities"]) and not p.get("unknown_keys"))
        if not ok:
            out.append(
                f"{p['var']} (site {p['site']}, pool {p['name']}): the name must match {pattern} and be unique in its "
                f"site; instances must be an integer >= 0 (got {p['instances']}); max_job_count and max_mem_usage "
                f"integers >= 0 (got {p['max_job_count']}, {p['max_mem_usage']}); types and abilities lists; unknown "
                f"keys: {_unknown(p)}.")
    return out


def _extra_pool_errors(model):
    out = []
    for p in model.get("pools", []):
        says = p["name"] == "default" or any(_sequence(x) and len(x) > 0 for x in (p["types"], p["abilities"]))
        if not says:
            out.append(f"{p['var']} (site {p['site']}, pool {p['name']}) has no types: a pool other than `default` "
                       "needs non-empty `types` (keys of worker_types in config/gearman.yml) or `abilities` (job "
                       "classes).")
    return out


def _restart_errors(v):
    restart_sec, burst = v.get("atom_worker_restart_sec"), v.get("atom_worker_start_limit_burst")
    stop, interval = v.get("atom_worker_timeout_stop_sec"), v.get("atom_worker_start_limit_interval_sec")
    ok = (_int(restart_sec) >= 0 and _matches(str(restart_sec), r"^[0-9]+$") and _matches(str(burst), r"^[0-9]+$")
          and _matches(str(stop), r"^[1-9][0-9]*$") and _matches(str(interval), _TIMESPAN))
    if ok:
        return []
    return [(f"atom_worker_restart_sec (got {restart_sec}) and atom_worker_start_limit_burst (got {burst}) must be "
             f"integers >= 0, atom_worker_timeout_stop_sec >= 1 (got {stop}), atom_worker_start_limit_interval_sec "
             f"a systemd time span such as 24h (got {interval}).")]


def _server_errors(v, model, listen, host):
    out, seen = [], []
    group = v.get("atom_worker_gearman_group")
    for site in model.get("sites", []):
        for server in site.get("gearman_servers") or []:
            if server in seen:
                continue
            seen.append(server)
            port = _int(re.sub("^.*:", "", server)) if isinstance(server, str) else 0
            if not (_matches(server, _SERVER) and 1 <= port <= 65535):
                out.append(f"Job server {server} (atom_worker_gearman_servers, a site's gearman_servers, or the "
                           f"{group} group) must be host:port with a port from 1 to 65535.")
    if not v.get("atom_worker_gearman_servers"):
        for other, listens_on in listen.items():
            address = "127.0.0.1" if listens_on is None else listens_on
            if _matches(address, r"^(127\.|::1$|localhost$)") and other != host:
                out.append(f"{other} (group {group}) listens on {address}, which this worker host ({host}) cannot "
                           f"reach: set gearman_job_server_listen_address for {other}, or atom_worker_gearman_servers.")
    return out


def atom_worker_preflight_errors(values, model, context):
    """Every line the variables and their model fail, in the order the role used to check them.

    values: the role's variables ({name: value}); model: atom_worker_model's result; context: service_mgr
    (the host's fact, or None), name_pattern, host (inventory_hostname) and listen (each job server of
    atom_worker_gearman_group to its gearman_job_server_listen_address, null when unset).
    """
    # A control character is refused before anything else reads the value: the other checks would name the
    # same value again (a newline also breaks a time span), and one bad value gets one line.
    control = atom_worker_control_characters(values)
    if control:
        return control
    return (_manager_errors(values, context.get("service_mgr"))
            + _model_errors(model, context["name_pattern"])
            + atom_worker_bad_values(values, model)
            + _extra_pool_errors(model)
            + _restart_errors(values)
            + _server_errors(values, model, context.get("listen") or {}, context.get("host")))


def _yaml_problem(text):
    """None for a YAML mapping; else why not, in words (the parser's first line, or 'not a mapping')."""
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None if isinstance(parsed, dict) else "not a mapping"


def atom_worker_probe_errors(manager, model, probe, context):
    """Every line the host fails as the probe found it: another process manager's workers, an AtoM root that
    is not one, a missing user or group, a config/*.yml that is not YAML, a pool type its site does not know.

    manager: atom_worker_manager; context: state_file, circus_config, circus_unit (the circus service's unit
    name, or '' when circusd is the operator's) and the `files` each manager's workers are known by
    ({manager: path}).
    """
    out = []
    files = context["files"]
    how = {
        "systemd": "the atom-worker*@.service units and atom-workers*.target (then systemctl daemon-reload)",
        "supervisor": "atom-worker.conf and atom-worker-policy.conf (then supervisorctl update)",
        "circus": f"{context.get('circus_config')} (stop {context.get('circus_unit') or 'circusd'} first, "
                  "then disable it)",
    }
    for other in files:
        if other != manager and probe["stat"][files[other]].get("exists"):
            out.append(f"atom_worker_manager={manager}, but {files[other]} exists: this host's workers run under "
                       f"{MANAGER_PROGRAM[other]}. Stop them and remove {how[other]} first.")
    for s in model.get("sites", []):
        if probe["realpath"].get(s["root"]) is None or not probe["stat"][s["root"] + "/symfony"].get("exists"):
            out.append(f"{s['var']}: {s['root']} is not an AtoM root here (no {s['root']}/symfony); install AtoM "
                       "first.")
    for kind, word in (("users", "passwd"), ("groups", "group")):
        for name, found in probe[kind].items():
            if found is None:
                out.append(f"{word} {name} does not exist on this host (atom_worker_user / atom_worker_group, or a "
                           "site's user/group): the workers run as AtoM's web user.")
    parsed = {}
    for path, text in probe["read"].items():
        if text is None or path == context["state_file"]:
            continue
        problem = _yaml_problem(text)
        if problem is None:
            parsed[path] = yaml.safe_load(text)
        else:
            out.append(f"{path} is not valid YAML ({problem}): fix it first; the role sets only all.servers "
                       "(gearman.yml) and all.workers_key (app.yml) and keeps the rest as written.")
    for p in model.get("pools", []):
        path = f"{p['root']}/config/gearman.yml"
        if path not in parsed:
            continue
        known = list(((parsed[path].get("all") or {}) if isinstance(parsed[path].get("all") or {}, dict) else {})
                     .get("worker_types") or {})
        for kind in p["types"] if known and _list(p["types"]) else []:
            if kind not in known:
                out.append(f"{p['var']} (site {p['site']}, pool {p['name']}): type {kind} is not a key of "
                           f"worker_types in {p['root']}/config/gearman.yml; allowed: {', '.join(map(str, known))}.")
    return out


class FilterModule:
    def filters(self):
        return {
            "atom_worker_preflight_errors": atom_worker_preflight_errors,
            "atom_worker_probe_errors": atom_worker_probe_errors,
        }
