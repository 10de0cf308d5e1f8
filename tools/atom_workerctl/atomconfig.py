"""What an AtoM site's own configuration says: job servers, worker types, workers_key, the job prefix.

AtoM (Symfony 1.x) merges `config/NAME.yml` and `apps/qubit/config/NAME.yml`, then the sections
`default`, `all` and the environment's own, later winning (array_replace_recursive). The worker runs in
environment `worker` here, as the stand-in does. Function names are
`md5(realpath(root) . workers_key) . '-' . JobClass`.
"""

from __future__ import annotations

import errno
import os
import stat

from . import configcache
from .errors import ConfigError
from .gearman import split_server as parse_server  # the one parser of 'host:port' (AtoM's gearman.yml)

# The code that turns config/*.yml into what read_config returns (keyed into the configuration cache).
PARSER_FILES = [os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{m}.py")
                for m in ("atomconfig", "sfyaml", "phpvalues")]
WORKER_ENV = "worker"
APP = "qubit"
# AtoM's configuration files are a few KiB; anything near this is not one.
MAX_CONFIG_BYTES = 1 << 20


def job_prefix(realpath: str, workers_key: str) -> str:
    """md5(realpath(root) . workers_key), without the trailing '-'."""
    try:
        from _md5 import md5  # CPython's own md5: hashlib would load OpenSSL first (~3 ms of every start-up)
    except ImportError:
        from hashlib import md5
    return md5((realpath + workers_key).encode()).hexdigest()


def read_text(path: str) -> str | None:
    """A configuration file's text, None when it does not exist.

    The CLI runs as root and these files are writable by the AtoM user, so: a symbolic link is refused
    (O_NOFOLLOW), a FIFO or device cannot block or flood us (O_NONBLOCK, regular files only), and the size
    is capped.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise ConfigError(f"cannot read {path}: permission denied", hint="run as root") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{path} is a symbolic link: refused, the file itself must be there") from None
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path} is not a regular file: refused")
        data = fh.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_CONFIG_BYTES >> 20} MiB: refused")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read {path}: not UTF-8 (byte {exc.start})") from None


def _replace_recursive(base: dict, other: dict) -> dict:
    out = dict(base)
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _replace_recursive(out[key], value)
        elif isinstance(value, list) and isinstance(out.get(key), (list, dict)):
            # array_replace_recursive on lists replaces by index
            current = out[key] if isinstance(out[key], list) else list(out[key].values())
            merged = list(current)
            for i, item in enumerate(value):
                if i < len(merged):
                    merged[i] = item
                else:
                    merged.append(item)
            out[key] = merged
        else:
            out[key] = value
    return out


def read_config(root: str, name: str, env: str = WORKER_ENV) -> tuple[dict, list[str]]:
    """The merged configuration NAME for env, and the files it came from.

    Kept in the configuration cache (configcache.py) under the files' identity, taken before they are read:
    a run whose files did not change reads neither them nor PyYAML."""
    paths = [os.path.join(root, rel, f"{name}.yml") for rel in ("config", f"apps/{APP}/config")]
    # The parser's own files are part of the key: an upgraded atom-workerctl never reads an older parse.
    files = configcache.identity(paths + PARSER_FILES)
    key = ("config", root, name, env)
    if files is not None:
        kept = configcache.get(key, files)
        if kept is not None:
            return kept
    config = _parse_config(paths, name, env)
    if files is not None:
        configcache.put(key, files, config)
    return config


def _parse_config(paths: list[str], name: str, env: str) -> tuple[dict, list[str]]:
    from .sfyaml import SfYamlError, loads  # PyYAML only when a site's configuration is read

    merged: dict = {}
    files = []
    for path in paths:
        text = read_text(path)
        if text is None:
            continue
        files.append(path)
        try:
            data = loads(text)
        except SfYamlError as exc:
            raise ConfigError(f"malformed YAML in {path}: {exc}") from None
        if data is None:
            continue
        if not isinstance(data, dict):
            raise ConfigError(f"malformed {path}: the top level is not a mapping")
        merged = _replace_recursive(merged, data)
    if not files:
        raise ConfigError(f"{paths[0]} does not exist",
                          hint="is the site's root right in sites.json?")
    config: dict = {}
    for section in ("default", "all", env):
        value = merged.get(section)
        if isinstance(value, dict):
            config = _replace_recursive(config, value)
    return config, files


def format_server(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class SiteConfig:
    """The parts of a site's AtoM configuration the CLI needs, read fresh from disk."""

    __slots__ = ("root", "realpath", "workers_key", "prefix", "servers", "server_keys", "worker_types",
                 "files", "cache_stale")

    def __init__(self, root: str):
        self.root = root
        self.realpath = os.path.realpath(root)
        gearman, gfiles = read_config(root, "gearman")
        app, afiles = read_config(root, "app")
        self.files = gfiles + afiles
        from .phpvalues import php_string

        key = app.get("workers_key")
        if isinstance(key, (dict, list)):
            raise ConfigError(f"{afiles[-1]}: workers_key is a {'mapping' if isinstance(key, dict) else 'list'}, "
                              "not a string")
        self.workers_key = php_string(key)
        self.prefix = job_prefix(self.realpath, self.workers_key)
        raw = gearman.get("servers")
        if isinstance(raw, str):
            entries = [(str(i), s) for i, s in enumerate(raw.split(","))]
        elif isinstance(raw, dict):
            entries = [(str(k), php_string(v)) for k, v in raw.items()]
        elif isinstance(raw, list):
            entries = [(str(i), php_string(v)) for i, v in enumerate(raw)]
        else:
            raise ConfigError(f"no servers in {gfiles[0]} (all: servers: {{default: host:port}})")
        self.servers: list[str] = []
        self.server_keys: dict[str, str] = {}
        for key, entry in entries:
            if not entry.strip():
                continue
            try:
                host, port = parse_server(entry)
            except ValueError:
                raise ConfigError(f"{gfiles[0]}: servers.{key}: {entry!r} is not host:port") from None
            name = format_server(host, port)
            self.servers.append(name)
            self.server_keys[name] = key
        if not self.servers:
            raise ConfigError(f"no servers in {gfiles[0]}")
        types = gearman.get("worker_types")
        self.worker_types: dict[str, list[str]] = {}
        if isinstance(types, dict):
            for name, classes in types.items():
                if isinstance(classes, list):
                    self.worker_types[name] = [php_string(c) for c in classes if php_string(c)]
                elif classes is not None:
                    self.worker_types[name] = [php_string(classes)]
        self.cache_stale = _cache_stale(root, self.files)

    def abilities(self, types: list[str], abilities: list[str]) -> list[str]:
        """The classes a worker with --types/--abilities registers (arGearman::getAbilities)."""
        if abilities:
            chosen = abilities
        elif types:
            chosen = []
            for t in types:
                chosen += self.worker_types.get(t, [])
        else:
            chosen = [c for classes in self.worker_types.values() for c in classes]
        seen: list[str] = []
        for c in chosen:
            if c not in seen:
                seen.append(c)
        return seen

    def all_classes(self) -> list[str]:
        return self.abilities([], [])


def _cache_stale(root: str, files: list[str]) -> bool:
    """True when Symfony's config cache is older than a YAML file (AtoM then still uses the cache)."""
    base = os.path.join(root, "cache", APP, WORKER_ENV, "config")
    try:
        cached = [os.stat(os.path.join(base, f"config_{name}.yml.php")).st_mtime for name in ("app", "gearman")
                  if os.path.exists(os.path.join(base, f"config_{name}.yml.php"))]
        if not cached:
            return False
        newest_yaml = max(os.stat(f).st_mtime for f in files)
    except OSError:
        return False
    return min(cached) < newest_yaml
