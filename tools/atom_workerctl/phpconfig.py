"""A site's database settings, read from `config/config.php` as AtoM reads them.

AtoM's installer (`arInstall::configureDatabase`) writes that file as `<?php ... return <var_export of an
array>;`, and Propel takes `all: propel: param: {dsn, username, password}` from it. The CLI runs as root and
the file may be writable by the web server's user, so it is never executed: this module reads the array
literal only (`array (...)` or `[...]`, quoted strings, numbers, true/false/null) and refuses anything else
with one line. The password is kept for the connection and never printed.
"""

from __future__ import annotations

import os
import re

from .atomconfig import read_text
from .errors import ConfigError

CONFIG_PHP = "config/config.php"
# Debian's PHP (mysqlnd) and MariaDB agree on this socket: PDO's "localhost" means it.
DEFAULT_SOCKET = "/run/mysqld/mysqld.sock"

_TOKEN = re.compile(r"""
    (?P<space>\s+|//[^\n]*|\#[^\n]*|/\*.*?\*/)
  | (?P<sq>'(?:[^'\\]|\\.)*')
  | (?P<dq>"(?:[^"\\$]|\\.)*")
  | (?P<num>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<word>[A-Za-z_]+)
  | (?P<arrow>=>)
  | (?P<punct>[()\[\],;])
  | (?P<close>\?>)
""", re.VERBOSE | re.DOTALL)
# What a token is called in an error: never its text, which may be the password.
_KIND = {"sq": "a string", "dq": "a string", "num": "a number", "word": "a name", "arrow": "'=>'",
         "punct": "punctuation", "close": "'?>'", "end": "the end of the file"}


class _Parser:
    def __init__(self, text: str, path: str):
        self.path = path
        self.tokens: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m:
                self._fail("a character outside the array's syntax", text.count("\n", 0, pos) + 1)
            if m.lastgroup != "space":
                self.tokens.append((m.lastgroup, m.group(), text.count("\n", 0, pos) + 1))
            pos = m.end()
        self.i = 0

    def _fail(self, what: str, line: int):
        raise ConfigError(f"cannot read {self.path} line {line}: {what} (only the array AtoM's installer "
                          "writes is read, never run)")

    def peek(self) -> tuple[str, str, int]:
        return self.tokens[self.i] if self.i < len(self.tokens) else ("end", "end of file", 0)

    def found(self) -> str:
        kind, text, _ = self.peek()
        return repr(text) if kind in ("punct", "arrow", "close") or text.lower() in ("return", "array") \
            else _KIND.get(kind, kind)

    def take(self, kind: str, value: str | None = None) -> str:
        k, v, line = self.peek()
        if k != kind or (value is not None and v.lower() != value):
            self._fail(f"expected {value or kind}, found {self.found()}", line)
        self.i += 1
        return v

    def value(self):
        kind, text, line = self.peek()
        if kind == "word" and text.lower() == "array":
            self.i += 1
            self.take("punct", "(")
            return self._items(")")
        if kind == "punct" and text == "[":
            self.i += 1
            return self._items("]")
        self.i += 1
        if kind == "sq":
            return re.sub(r"\\([\\'])", r"\1", text[1:-1])
        if kind == "dq":
            # PHP's escapes in double quotes; an unknown one keeps its backslash, as PHP does.
            return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"',
                                                "$": "$", "0": "\0"}.get(m.group(1), m.group(0)), text[1:-1])
        if kind == "num":
            return float(text) if any(c in text for c in ".eE") else int(text)
        if kind == "word" and text.lower() in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[text.lower()]
        self._fail(f"unexpected {_KIND.get(kind, kind)}", line)
        return None

    def _items(self, close: str) -> dict | list:
        out: dict = {}
        auto = 0
        while self.peek()[1] != close:
            first = self.value()
            if self.peek()[0] == "arrow":
                self.i += 1
                if not isinstance(first, (str, int)):
                    self._fail("an array key must be a string or a number", self.peek()[2])
                key, val = first, self.value()
            else:
                key, val = auto, first
            out[key] = val
            if isinstance(key, int):
                auto = max(auto, key + 1)
            if self.peek()[1] == ",":
                self.i += 1
            elif self.peek()[1] != close:
                self._fail(f"expected ',' or {close!r}, found {self.found()}", self.peek()[2])
        self.i += 1
        return out


def parse(text: str, path: str = CONFIG_PHP) -> dict:
    """The array a config.php returns."""
    body = text.lstrip("\ufeff")
    if not body.startswith("<?php"):
        raise ConfigError(f"cannot read {path}: it does not start with <?php")
    parser = _Parser(body[len("<?php"):], path)
    parser.take("word", "return")
    value = parser.value()
    parser.take("punct", ";")
    if parser.peek()[0] == "close":
        parser.i += 1
    if parser.peek()[0] != "end":
        parser._fail(f"{parser.found()} after the returned array", parser.peek()[2])
    if not isinstance(value, dict):
        raise ConfigError(f"cannot read {path}: it returns no array")
    return value


class Database:
    """Where a site's database is and how to log in (never printed: `describe()` leaves the password out)."""

    __slots__ = ("dbname", "host", "port", "unix_socket", "username", "password", "source")

    def __init__(self, dbname: str, host: str | None, port: int | None, unix_socket: str | None,
                 username: str, password: str, source: str):
        self.dbname, self.host, self.port, self.unix_socket = dbname, host, port, unix_socket
        self.username, self.password, self.source = username, password, source

    @property
    def key(self) -> tuple:
        """Sites with the same key share one database (and one job table)."""
        return (self.unix_socket, self.host, self.port, self.dbname)

    def describe(self) -> str:
        where = f"socket {self.unix_socket}" if self.unix_socket else f"{self.host}:{self.port}"
        return f"database {self.dbname} at {where} as {self.username} ({self.source})"


def parse_dsn(dsn: str, source: str) -> dict[str, str]:
    driver, sep, rest = dsn.partition(":")
    if not sep or driver.strip().lower() != "mysql":
        raise ConfigError(f"{source}: the dsn is not a MySQL one (mysql:dbname=...;host=...)")
    out = {}
    for part in rest.split(";"):
        if not part.strip():
            continue
        name, eq, value = part.partition("=")
        if not eq:
            raise ConfigError(f"{source}: the dsn's part {part.strip()!r} is not name=value")
        out[name.strip().lower()] = value.strip()
    return out


def site_database(root: str) -> Database:
    """The database of the AtoM site at root (`all: propel: param` of config/config.php)."""
    path = os.path.join(root, CONFIG_PHP)
    text = read_text(path)
    if text is None:
        raise ConfigError(f"{path} does not exist: this site has no database configured",
                          hint="AtoM's installer writes it; is the site's root right in sites.json?")
    config = parse(text, path)
    param: object = config
    for key in ("all", "propel", "param"):
        param = param.get(key) if isinstance(param, dict) else None
    if not isinstance(param, dict) or not isinstance(param.get("dsn"), str):
        raise ConfigError(f"{path}: no all.propel.param.dsn")
    dsn = parse_dsn(param["dsn"], path)
    if not dsn.get("dbname"):
        raise ConfigError(f"{path}: the dsn names no dbname")
    host = dsn.get("host") or "localhost"
    try:
        port = int(dsn.get("port") or 3306)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ConfigError(f"{path}: the dsn's port {dsn.get('port')!r} is not a port number")
    # As PHP's mysqlnd: the socket (the dsn's, else the default) only for localhost; with another host, TCP
    # and a unix_socket in the dsn is ignored.
    sock = (dsn.get("unix_socket") or DEFAULT_SOCKET) if host.lower() == "localhost" else None
    user = param.get("username")
    password = param.get("password")
    return Database(dsn["dbname"], None if sock else host, None if sock else port, sock,
                    "" if user is None else str(user), "" if password is None else str(password), path)
