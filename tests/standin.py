"""Helpers for tests that drive the AtoM stand-in (tests/fixtures/atom).

Import from any test: ``from standin import ...`` (tests/ is on sys.path when
pytest runs with rootdir-based imports) or ``from tests.standin import ...``.
Everything here is stdlib only, so lab tests can copy it onto hosts too.

The stand-in's record (``<root>/log/standin-record.jsonl``) is one JSON object
a line; see tests/fixtures/atom/README.md for the events.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Self

from polling import wait_until

STANDIN_SRC = Path(__file__).resolve().parent / "fixtures" / "atom"
RECORD = "log/standin-record.jsonl"
CONTROL = "standin/control.json"

# Exactly how AtoM's docs start the worker.
PHP_WORKER = ["php", "-d", "memory_limit=-1", "-d", "error_reporting=E_ALL", "symfony", "jobs:worker"]

# Job classes the stand-in knows (docs/facts.md, "AtoM's worker").
KNOWN_CLASSES = (
    "arFindingAidJob",
    "arInheritRightsJob",
    "arUpdateEsActorRelationsJob",
    "arCalculateDescendantDatesJob",
    "arObjectMoveJob",
    "arInformationObjectCsvExportJob",
    "qtSwordPluginWorker",
    "arUpdatePublicationStatusJob",
    "arFileImportJob",
    "arInformationObjectXmlExportJob",
    "arXmlExportSingleFileJob",
    "arGenerateReportJob",
    "arActorCsvExportJob",
    "arActorXmlExportJob",
    "arRepositoryCsvExportJob",
    "arUpdateEsIoDocumentsJob",
    "arPhysicalObjectCsvHoldingsReportJob",
    "arValidateCsvJob",
)

NO_WORKER = "No Gearman worker available that can handle the job {}."
NO_SERVERS = "Couldn't connect to any available servers"

Server = tuple[str, int]


# --- the AtoM root ---------------------------------------------------------


def make_root(
    dest: os.PathLike[str] | str,
    servers: Iterable[Server] = (("127.0.0.1", 4730),),
    workers_key: str = "",
) -> Path:
    """Copy the stand-in to ``dest`` (which must not exist) and configure it."""
    dest = Path(dest)
    shutil.copytree(
        STANDIN_SRC,
        dest,
        ignore=lambda d, names: [
            n
            for n in names
            if Path(d).name in ("cache", "log", "downloads", "uploads")
            and n != ".gitkeep"
            or (Path(d).name == "standin" and n == "control.json")
        ],
    )
    set_servers(dest, servers)
    set_workers_key(dest, workers_key)
    return dest


def set_servers(root: os.PathLike[str] | str, servers: Iterable[Server]) -> None:
    """Rewrite the ``servers:`` map of config/gearman.yml (run clear_cache after)."""
    path = Path(root) / "config" / "gearman.yml"
    lines = path.read_text().splitlines()
    start = lines.index("  servers:")
    end = start + 1
    while end < len(lines) and lines[end].startswith("    "):
        end += 1
    entries = [f"    server{i}: {host}:{port}" for i, (host, port) in enumerate(servers)]
    if not entries:
        raise ValueError("at least one server")
    entries[0] = entries[0].replace("server0:", "default:", 1)
    path.write_text("\n".join(lines[: start + 1] + entries + lines[end:]) + "\n")


def set_workers_key(root: os.PathLike[str] | str, key: str) -> None:
    """Set ``workers_key`` in config/app.yml (run clear_cache after, as in AtoM)."""
    path = Path(root) / "config" / "app.yml"
    quoted = "'" + key.replace("'", "''") + "'"
    text = path.read_text()
    lines = [f"  workers_key: {quoted}" if line.startswith("  workers_key:") else line for line in text.splitlines()]
    path.write_text("\n".join(lines) + "\n")


def function_prefix(root: os.PathLike[str] | str, workers_key: str = "") -> str:
    """``md5(realpath(root) . workers_key) . '-'``, QubitJob::getJobPrefix()."""
    real = os.path.realpath(root)
    return hashlib.md5((real + workers_key).encode()).hexdigest() + "-"


def function_name(root: os.PathLike[str] | str, cls: str, workers_key: str = "") -> str:
    return function_prefix(root, workers_key) + cls


def write_control(root: os.PathLike[str] | str, **knobs: Any) -> None:
    """Write standin/control.json, read by each worker at start."""
    path = Path(root) / CONTROL
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(knobs))


def clear_control(root: os.PathLike[str] | str) -> None:
    (Path(root) / CONTROL).unlink(missing_ok=True)


def symfony(
    root: os.PathLike[str] | str, *args: str, timeout: float = 30, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run ``php symfony ARGS`` in ``root``."""
    return subprocess.run(
        ["php", "symfony", *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


def clear_cache(root: os.PathLike[str] | str) -> None:
    """``php symfony cc``: needed after changing config/*.yml, as in AtoM."""
    symfony(root, "cc", check=True)


# --- workers -----------------------------------------------------------------


def worker_argv(*options: str) -> list[str]:
    """The worker command line with extra options (``--types=general`` ...)."""
    return [*PHP_WORKER, *options]


LOG_LINE = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}) > (.*)$")


class Worker:
    """A worker process started in ``root``; stdout and stderr go to a file.

    ``messages()`` are its log lines without the ``Y-m-d H:i:s > `` prefix.
    """

    def __init__(
        self,
        root: os.PathLike[str] | str,
        *options: str,
        output: os.PathLike[str] | str | None = None,
    ) -> None:
        self.root = Path(root)
        self.argv = worker_argv(*options)
        self.output_path = Path(output) if output else (self.root / "log" / f"worker-{time.time_ns()}.out")
        with open(self.output_path, "w") as out:
            self.proc = subprocess.Popen(self.argv, cwd=self.root, stdout=out, stderr=subprocess.STDOUT, text=True)
        self.pid = self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float = 10) -> int:
        return self.proc.wait(timeout)

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        """Signal the worker and wait for it; kill it if it hangs."""
        self.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout)

    def output(self) -> str:
        return self.output_path.read_text()

    def messages(self) -> list[str]:
        """Log lines (stdout) without their date prefix."""
        return [m.group(2) for m in map(LOG_LINE.match, self.output().splitlines()) if m]

    def wait_for_message(self, text: str, timeout: float = 10) -> str:
        """Wait until a log line contains ``text``; return that line."""

        def found() -> str | None:
            hits = [m for m in self.messages() if text in m]
            if not hits and self.proc.poll() is not None:
                raise AssertionError(
                    f"worker exited ({self.proc.returncode}) before logging {text!r}:\n" + self.output()
                )
            return hits[0] if hits else None

        return wait_until(found, timeout)


def start_worker(root: os.PathLike[str] | str, *options: str) -> Worker:
    """Start ``php ... symfony jobs:worker OPTIONS`` in ``root``."""
    return Worker(root, *options)


# --- the record --------------------------------------------------------------


def read_record(root: os.PathLike[str] | str) -> list[dict[str, Any]]:
    """Every event recorded so far, oldest first."""
    path = Path(root) / RECORD
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        if line.strip():
            events.append(json.loads(line))
    return events


def events(root: os.PathLike[str] | str, kind: str, **match: Any) -> list[dict[str, Any]]:
    """Recorded events of one kind (``start``, ``job``, ``exit`` ...) matching ``match``."""
    return [e for e in read_record(root) if e.get("event") == kind and all(e.get(k) == v for k, v in match.items())]


def job_counts(root: os.PathLike[str] | str, status: str | None = "completed") -> Counter[str]:
    """How often each job id ended with ``status`` (None: any ending)."""
    return Counter(
        str(e["id"])
        for e in read_record(root)
        if e.get("event") == "job" and (status is None or e.get("status") == status)
    )


def completed_ids(root: os.PathLike[str] | str) -> set[str]:
    return set(job_counts(root))


# --- submitting, as AtoM's web app does ---------------------------------------


class SubmitError(Exception):
    """standin:submit failed; ``message`` is its error text (e.g. NO_WORKER)."""

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.message = message
        self.returncode = returncode


def submit(
    root: os.PathLike[str] | str,
    cls: str,
    count: int = 1,
    payload: dict[str, Any] | None = None,
    user: str | None = None,
) -> list[str]:
    """Submit ``count`` background jobs of ``cls``; return their ids (the job rows' ids when the site has a
    database; ``user`` then names the signed-in user the rows belong to).

    Raises SubmitError when the stand-in refuses (no worker available, no server).
    """
    args = ["standin:submit", f"--class={cls}", f"--count={count}", *([f"--user={user}"] if user else [])]
    if payload is not None:
        args.append("--payload=" + json.dumps(payload))
    proc = symfony(root, *args)
    if proc.returncode != 0:
        raise SubmitError(" ".join(proc.stderr.split()), proc.returncode)
    return proc.stdout.split()


# --- gearmand ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def admin(host: str, port: int, command: str, timeout: float = 5) -> list[str]:
    """A gearmand admin text command that answers with lines ending in ``.``
    (``status``, ``workers``); returns the lines without the final ``.``."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(command.encode() + b"\n")
        buf = b""
        while not (buf == b".\n" or buf.endswith(b"\n.\n")):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    lines = buf.decode().splitlines()
    return lines[:-1] if lines and lines[-1] == "." else lines


def gearman_status(host: str, port: int) -> dict[str, tuple[int, int, int]]:
    """``status``: function -> (queued total, running, available workers)."""
    out = {}
    for line in admin(host, port, "status"):
        cols = line.split("\t")
        if len(cols) == 4:
            out[cols[0]] = (int(cols[1]), int(cols[2]), int(cols[3]))
    return out


class Gearmand:
    """A throw-away gearmand on a loopback port (builtin queue, no log file).

    Use as a context manager, or call start()/stop(). Runs as the current user;
    as root it needs no --user.
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", extra: Sequence[str] = ()) -> None:
        self.host = host
        self.port = port or free_port()
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp = ""

    @property
    def server(self) -> Server:
        return (self.host, self.port)

    def start(self, timeout: float = 10) -> Self:
        self._tmp = tempfile.mkdtemp(prefix="standin-gearmand-")
        self.proc = subprocess.Popen(
            [
                "gearmand",
                f"--port={self.port}",
                f"--listen={self.host}",
                "--queue-type=builtin",
                "--log-file=none",
                f"--pid-file={self._tmp}/gearmand.pid",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"gearmand exited with {self.proc.returncode}: {err}")
            try:
                return admin(self.host, self.port, "status", timeout=1) is not None
            except OSError:
                return False

        wait_until(ready, timeout)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def status(self) -> dict[str, tuple[int, int, int]]:
        return gearman_status(self.host, self.port)

    def available(self, function: str) -> int:
        return self.status().get(function, (0, 0, 0))[2]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
