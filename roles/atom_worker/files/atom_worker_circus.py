"""atom_worker_circus: systemd's restart policy for AtoM workers run by circus (circusd's hooks).

circusd imports this module (installed beside `atom-worker-policy` in /usr/local/lib/atom-worker, found
through a .pth file in the circus venv naming that folder; tests set PYTHONPATH instead) and calls its hooks.
Each worker instance is ONE singleton watcher with `respawn = false`: circus never restarts a worker itself;
these hooks give it atom-worker@.service's policy with the same decisions, made by the same engine as
supervisord's event listener (the sibling file `atom-worker-policy`, loaded here: one engine, two adapters),
kept in a state file of the same schema (README-supervisor.md "The state file"; README-circus.md).

A watcher of templates/circus/atom-worker.ini.j2 names them:

    hooks.before_start = atom_worker_circus.before_start, true   every start counts; refused beyond the limit
    hooks.after_spawn  = atom_worker_circus.after_spawn, true    the run's process (for exits without a reap)
    hooks.after_reap   = atom_worker_circus.after_reap, true     an exit: classified, restarted after RestartSec
    hooks.before_stop  = atom_worker_circus.before_stop, true    why the watcher stops: a deliberate stop or not
    hooks.after_stop   = atom_worker_circus.after_stop, true     a spawn error or an exit circus did not reap
    stdout_stream.class = atom_worker_circus.SharedFileStream   stdout and stderr in one file, rotated once
    stderr_stream.class = atom_worker_circus.SharedFileStream

and these free-form watcher options (`circusctl options NAME` shows them):

    atom_group                     the site's group (namespec GROUP:WATCHER, as under supervisord)
    atom_restart, atom_restart_sec, atom_start_limit_interval_sec, atom_start_limit_burst   the policy
    atom_recycle_exit_code         111: restarted at once, never counted
    atom_state_file                /run/atom-worker/circus-policy.json
    atom_notify_command            atom-workerctl (`COMMAND notify WATCHER` once per give-up); empty: none
    atom_policy_log                the policy log file (default <the watcher's log dir>/atom-worker-policy.log)
    atom_pool                      the pool's unit prefix (for atom-workerctl scale)

The hooks run on circusd's only thread, inside its event loop: nothing here blocks. The state file's flock
(on a root-only 0600 lock file) is taken without waiting, held for a read-modify-write of a small JSON file;
when another process holds it the work is tried again on the loop moments later (before_start, which must
answer at once, tries for up to START_LOCK_WAIT, then allows the start uncounted). Notices run in a process
of their own. A hook never
takes circusd down: every error is logged (with its traceback) and the hook returns True. For before_start
that means an internal error ALLOWS the start: circus itself never restarts a worker (respawn = false), so a
broken policy cannot cause a restart loop, while refusing would keep every worker of the host down (boot,
deploys, `atom-workerctl start`) over a bug, a full /run or an unreadable state file. What is lost while the
error lasts is the start limit of manual and boot starts; the log says so on every start.

Deliberate stops and restarts (circusctl stop/restart, reloadconfig, circusd stopping) are never failures
and never restarted; `circusctl kill NAME` (a signal, then SIGKILL) and `circusctl signal` are exits as any
other, classified by how the process ended, as `systemctl kill` is.

Run as a program (`python3 atom_worker_circus.py --notice LOG COMMAND notify NAME`) it is the notice runner:
circusd starts it in the background, it runs the command (output to LOG), kills it after NOTIFY_TIMEOUT,
logs how it ended. Nothing else uses that.
"""

import contextlib
import functools
import importlib.machinery
import importlib.util
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ENGINE_PATH = os.path.join(HERE, "atom-worker-policy")
ENGINE_MODULE = "atom_worker_policy"

DEFAULT_GROUP = "atom-workers"
DEFAULT_STATE_FILE = "/run/atom-worker/circus-policy.json"
POLICY_LOG_NAME = "atom-worker-policy.log"
TICK_MS = 250  # the due-restart timer's period; exact due times get a call_later of their own
BUSY_RETRY = 0.05  # seconds: a due restart found circusd busy with a command looks again this soon
LOCK_RETRY = 0.02  # seconds: work that found the state file's lock held is tried again this soon, on the loop
START_LOCK_WAIT = 1.0  # seconds before_start (which must answer now) tries the lock before allowing the start
POLICY_OPTIONS = ("restart", "restart_sec", "start_limit_interval_sec", "start_limit_burst")
RUNTIME_ATTR = "_atom_worker_policy"  # the Runtime of an arbiter, kept on it (survives a module reload)
# circus's serialised commands (util.synchronized names) that stop watchers on purpose.
DELIBERATE_COMMANDS = frozenset({
    "watcher_stop", "watcher_restart", "watcher_reload", "watcher_decr", "arbiter_stop", "arbiter_restart",
    "arbiter_reload", "arbiter_reload_config", "arbiter_rm_watcher", "arbiter_stop_watchers",
})


def _load_engine():
    """The engine, atom-worker-policy beside this file (one module per process: a reload of this module,
    which circus does on `circusctl set NAME hooks...`, keeps the engine and its log sinks)."""
    engine = sys.modules.get(ENGINE_MODULE)
    if engine is not None and getattr(engine, "__file__", None) == ENGINE_PATH:
        return engine
    loader = importlib.machinery.SourceFileLoader(ENGINE_MODULE, ENGINE_PATH)
    spec = importlib.util.spec_from_loader(ENGINE_MODULE, loader)
    engine = importlib.util.module_from_spec(spec)
    engine.__file__ = ENGINE_PATH
    loader.exec_module(engine)
    sys.modules[ENGINE_MODULE] = engine
    return engine


P = _load_engine()
log = P.log


# --------------------------------------------------------------------------------------------------
# The policy log: {log_dir}/atom-worker-policy.log, as the supervisord listener's stderr log. Every policy line
# goes to circusd's stderr (the engine's log: the journal of atom-worker-circus.service) and here.


def parse_size(value):
    """Bytes from 1048576, "1048576", "50MB", "1KB", "1GB" (supervisord's notation; circus wants bytes)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip().upper()
    for suffix, factor in (("KB", 1024), ("MB", 1024 ** 2), ("GB", 1024 ** 3), ("B", 1)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)].strip()) * factor)
    return int(text)


def rotate(path, backups):
    """path -> path.1 -> path.2 ... (the oldest beyond `backups` removed), as circus's FileStream does."""
    if backups > 0:
        for i in range(backups - 1, 0, -1):
            if os.path.exists(f"{path}.{i}"):
                os.replace(f"{path}.{i}", f"{path}.{i + 1}")
        if os.path.exists(path):
            os.replace(path, f"{path}.1")
    elif os.path.exists(path):
        os.unlink(path)


class PolicyLog:
    """Appends each line to the files the watchers name (normally one), rotated at max_bytes."""

    def __init__(self):
        self.files = {}  # path -> (max_bytes, backups)

    def add(self, path, max_bytes, backups):
        self.files[path] = (max_bytes, backups)

    def __call__(self, line):
        data = line.encode("utf-8", "replace")
        for path, (max_bytes, backups) in list(self.files.items()):
            try:
                if max_bytes > 0:
                    try:
                        size = os.stat(path).st_size
                    except FileNotFoundError:
                        size = 0
                    if size and size + len(data) >= max_bytes:
                        rotate(path, backups)
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
            except OSError:
                pass  # the line is on circusd's stderr still


POLICY_LOG = globals().get("POLICY_LOG")  # kept across a reload of this module
if POLICY_LOG is None:
    POLICY_LOG = PolicyLog()
if POLICY_LOG not in P.LOG_SINKS:
    P.LOG_SINKS.append(POLICY_LOG)


def log_error(what):
    """A hook's internal error: one line and the traceback, to circusd's stderr and the policy log."""
    log(f"internal error {what}:")
    for line in traceback.format_exc().rstrip().splitlines():
        log("  " + line)


# --------------------------------------------------------------------------------------------------
# One file for a watcher's stdout and stderr (supervisord's redirect_stderr): circus has no such option, and two
# FileStreams on one file would each rotate it. stdout_stream.class and stderr_stream.class both name this
# class with the same filename: the second instantiation returns the first object.

try:
    from circus.stream import FileStream
except ImportError:  # the notice runner or a test without circus: no streams needed
    FileStream = object

_STREAMS = globals().get("_STREAMS")  # abspath -> stream, kept across a reload (`circusctl set` of a stream)
if _STREAMS is None:
    _STREAMS = {}


class SharedFileStream(FileStream):
    """circus's FileStream (rotation at max_bytes to .1 ... .backup_count), one object per file name, writing
    the bytes as the worker wrote them: no time stamp prefix (atom-workerctl reads these files as it reads
    supervisord's), no decoding. max_bytes takes supervisord's notation too ("50MB")."""

    def __new__(cls, filename=None, **kwargs):
        if not filename:
            raise ValueError("SharedFileStream needs a filename")
        key = os.path.abspath(filename)
        stream = _STREAMS.get(key)
        if stream is None or type(stream) is not cls:
            stream = super().__new__(cls)
            stream._shared_ready = False
            _STREAMS[key] = stream
        return stream

    def __init__(self, filename=None, max_bytes=0, backup_count=0, time_format=None, **kwargs):
        if time_format:
            raise ValueError("SharedFileStream writes no time stamps (time_format): atom-workerctl reads the "
                             "worker's lines as written")
        if not self._shared_ready:
            super().__init__(filename=os.path.abspath(filename), max_bytes=0, backup_count=0)
            self._shared_ready = True
        self._max_bytes = parse_size(max_bytes)  # the last configuration wins (reloadconfig)
        self._backup_count = int(backup_count)

    def _open(self):
        return open(self._filename, "ab")

    def write_data(self, data):
        raw = data["data"]
        if not isinstance(raw, bytes):
            raw = str(raw).encode("utf-8", "replace")
        if self._file is None or self._file.closed:
            self._file = self._open()
        self._file.write(raw)
        self._file.flush()


# --------------------------------------------------------------------------------------------------
# A watcher's settings, from its free-form options.


class Config:
    """What the policy needs to know of one watcher (read at each hook: `circusctl set` changes apply).
    Bad settings fall back to the defaults; `problems` says which (report() logs them)."""

    def __init__(self, watcher):
        opts = watcher._options
        self.problems = []
        self.name = watcher.name
        self.group = str(opts.get("atom_group") or DEFAULT_GROUP)
        self.namespec = f"{self.group}:{self.name}"
        self.state_file = state_file_of(watcher)
        self.notify_command = str(opts.get("atom_notify_command") or "").strip() or None
        self.fix = f"atom-workerctl reset {self.name}"
        try:
            self.recycle_exit_code = int(opts.get("atom_recycle_exit_code", P.RECYCLE_EXIT_CODE))
        except (TypeError, ValueError):
            self.problems.append(f"atom_recycle_exit_code={opts.get('atom_recycle_exit_code')!r} is not an "
                                 f"exit code; using {P.RECYCLE_EXIT_CODE}")
            self.recycle_exit_code = P.RECYCLE_EXIT_CODE
        self.policy = dict(P.DEFAULT_POLICY)
        raw = {key: opts[f"atom_{key}"] for key in POLICY_OPTIONS if f"atom_{key}" in opts}
        try:
            self.policy.update(P.check_settings(raw, f"watcher {self.name}"))
        except P.PolicyError as exc:
            self.problems.append(f"{exc}; using the defaults ({P.describe_policy(self.policy)})")
        stream = getattr(watcher, "stdout_stream_conf", None) or {}
        self.policy_log = opts.get("atom_policy_log") or (
            os.path.join(os.path.dirname(stream["filename"]), POLICY_LOG_NAME) if stream.get("filename") else None)
        try:
            self.log_max_bytes = parse_size(stream.get("max_bytes", 0))
            self.log_backups = int(stream.get("backup_count", 0))
        except (TypeError, ValueError):
            self.log_max_bytes, self.log_backups = 0, 0

    def report(self):
        for problem in self.problems:
            log(f"{self.namespec}: bad setting: {problem}")


def state_file_of(watcher):
    return str(watcher._options.get("atom_state_file") or DEFAULT_STATE_FILE)


def exit_of(exit_code):
    """circus's exit_code (-N: killed by signal N; None: unknown) as the engine's (status, signal name)."""
    if exit_code is None:
        return None, None
    if exit_code < 0:
        try:
            return -1, signal.Signals(-exit_code).name
        except ValueError:
            return -1, f"SIG{-exit_code}"
    return exit_code, None


def spawn_error(watcher):
    """Why circus could not spawn the command, in supervisord's words where they fit (circus only logs it)."""
    try:
        argv0 = shlex.split(watcher.cmd)[0]
    except (ValueError, IndexError):
        return f"cannot parse the command {watcher.cmd!r}"
    found = shutil.which(argv0) if "/" not in argv0 else (argv0 if os.path.exists(argv0) else None)
    if found is None:
        return f"can't find command {argv0!r}"
    if not os.access(found, os.X_OK):
        return f"command at {found!r} is not executable"
    return "could not spawn it (circusd's log says why)"


# --------------------------------------------------------------------------------------------------
# The runtime: what this circusd's hooks know beyond the state file.


class Run:
    """One watcher's current run, as the hooks saw it."""

    def __init__(self):
        self.phase = "stopped"   # "starting" (before_start allowed it), "running" (after_spawn), "stopped"
        self.process = None      # circus's Process of the run (after_spawn)
        self.exited = False      # after_reap saw its exit
        self.stop_kind = None    # before_stop: "deliberate", "exited" (it ended on its own), "spawn-failed"


class Runtime:
    """The hooks' state in one circusd (kept on the arbiter): runs, the due-restart timer, the listener block."""

    def __init__(self, arbiter):
        from tornado import ioloop

        self.arbiter = arbiter
        self.loop = ioloop.IOLoop.current()
        self.started = time.time()
        self.runs = {}
        self.announced = set()  # state files whose "hooks loaded" line was logged
        self.due_cache = {}     # state file -> (stat signature, [(next_restart, namespec)])
        self.retry_pending = False  # a look BUSY_RETRY later is scheduled (never more than one)
        self.timer = ioloop.PeriodicCallback(self.tick, TICK_MS)
        self.timer.start()

    def run(self, name):
        return self.runs.setdefault(name, Run())

    @contextlib.contextmanager
    def update(self, cfg_or_path):
        """The state file under its lock, never waiting for it (P.LockBusy when another process holds it: the
        caller tries again on the loop, later()); the listener block written when it is not this circusd's."""
        path = cfg_or_path if isinstance(cfg_or_path, str) else cfg_or_path.state_file
        with P.StateStore(path).update(blocking=False) as state:
            self.ensure_listener(state, path, None if isinstance(cfg_or_path, str) else cfg_or_path)
            yield state

    def later(self, what, fn, *args):
        """fn(*args) now; while the state file's lock is busy, again LOCK_RETRY later on circusd's loop (never
        blocking its only thread). Errors are logged."""
        try:
            fn(*args)
        except P.LockBusy:
            self.loop.call_later(LOCK_RETRY, self.later, what, fn, *args)
        except Exception:
            log_error(what)

    # -- the listener block: proof that this circusd runs the hooks -----------------------------------
    def announce(self, cfg):
        if cfg.policy_log:
            POLICY_LOG.add(cfg.policy_log, cfg.log_max_bytes, cfg.log_backups)

    def ensure_listener(self, state, path, cfg):
        """Under the lock: (re)write the listener block whenever it is not this circusd's (first hook, or the
        state file was removed or set aside as corrupt), forgetting entries of watchers circusd no longer has."""
        listener = state.get("listener")
        if isinstance(listener, dict) and listener.get("pid") == os.getpid():
            return
        arbiter = self.arbiter
        names = {w.name for w in arbiter.watchers}
        if path not in self.announced:
            notify = cfg.notify_command if cfg is not None else None
            log(f"circus hooks loaded in circusd (pid {os.getpid()}): state {path}; endpoint "
                f"{getattr(arbiter, 'endpoint', '?')}; engine {P.__file__}; notices "
                f"{'by `' + notify + ' notify`' if notify else 'off'}")
            self.announced.add(path)
        else:
            log(f"state {path}: the listener block was missing or not this circusd's: written again")
        state["listener"] = {"pid": os.getpid(), "started": round(self.started, 3), "manager": "circus",
                             "endpoint": getattr(arbiter, "endpoint", None), "adapter": os.path.abspath(__file__),
                             "engine": P.__file__}
        if cfg is not None:
            state["policy"] = P.public_policy(cfg.policy)
        for namespec in sorted(state["processes"]):
            entry = state["processes"][namespec]
            if isinstance(entry, dict) and entry.get("name") not in names:
                log(f"{namespec}: no longer a watcher of circusd; forgetting its state")
                del state["processes"][namespec]

    # -- exits ------------------------------------------------------------------------------------------
    def record_exit(self, watcher, cfg, exit_code, what="exited"):
        """An exit the process made on its own: the engine decides; schedule what it asks for."""
        now = time.time()
        status, signame = exit_of(exit_code)
        expected = exit_code == 0
        cause, result, how = P.classify_exit(status, signame, False, expected, cfg.recycle_exit_code)
        if what != "exited":
            how = f"{how}; {what}"
        with self.update(cfg) as state:
            entry = P.get_entry(state, cfg.group, cfg.name, cfg.policy)
            last_exit = {"at": round(now, 3), "exit_status": status, "signal": signame, "expected": expected,
                         "result": result}
            verdict = P.exit_decision(entry, cfg.namespec, cfg.policy, now, last_exit, cause, how)
            if verdict == "recycle":
                # circus cannot start it from inside its reap: the timer does, as soon as the watcher is stopped.
                entry["next_restart"] = P.ms_ceil(now)
            due = entry["next_restart"]
        if due:
            self.wake(due)

    def wake(self, due):
        self.loop.call_later(max(0.0, due - time.time()) + 0.001, self.tick)

    # -- due restarts, on circusd's loop -----------------------------------------------------------------
    def tick(self):
        try:
            self._tick()
        except Exception:
            log_error("running the due restarts")

    def retry_soon(self):
        if not self.retry_pending:
            self.retry_pending = True
            self.loop.call_later(BUSY_RETRY, self._retry)

    def _retry(self):
        self.retry_pending = False
        self.tick()

    def _tick(self):
        arbiter = self.arbiter
        if arbiter._stopping:
            self.timer.stop()  # this arbiter is going away (a circusd restart makes a new one)
            return
        now = time.time()
        for path in sorted({state_file_of(w) for w in arbiter.watchers if "before_start" in w.hooks}):
            for _, namespec in self.due(path, now):
                if arbiter._restarting or arbiter._exclusive_running_command is not None:
                    # circusd runs a command (the start below would fail with "already running"): soon again
                    self.retry_soon()
                    return
                if self.restart_due(path, namespec, now):
                    return  # a start holds circusd's command lock until it is done: one per tick

    def due(self, path, now):
        """[(next_restart, namespec)] due in the state file at PATH (parsed again only when it changed)."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return []
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self.due_cache.get(path)
        if cached is None or cached[0] != signature:
            try:
                cached = (signature, P.due_entries(P.StateStore(path).read(), float("inf")))
            except P.PolicyError as exc:
                log(f"due restarts: {exc}")  # once per version of the file; the next write sets it aside
                cached = (signature, [])
            self.due_cache[path] = cached
        return [item for item in cached[1] if item[0] <= now]

    def restart_due(self, path, namespec, now):
        """One due restart: returns True when a start was asked of circus."""
        group, _, name = namespec.partition(":")
        try:
            watcher = self.arbiter.get_watcher(name)
        except KeyError:
            watcher = None
        cfg = Config(watcher) if watcher is not None else None
        if cfg is not None and (cfg.group != group or cfg.state_file != path):
            watcher = cfg = None  # another watcher of that name: not this entry's
        if watcher is None:
            restartable, what = False, "gone (no such watcher)"
        elif watcher.is_stopped():
            restartable, what = True, "stopped"
        elif watcher.is_active():
            restartable, what = False, "active (started meanwhile)"
        else:
            return False  # starting or stopping: look again at the next tick
        policy = cfg.policy if cfg else P.DEFAULT_POLICY
        fix = cfg.fix if cfg else None
        try:
            with self.update(cfg if cfg is not None else path) as state:
                verdict = P.due_decision(state, group, name, policy, time.time(), restartable, what, fix)
        except P.LockBusy:
            self.retry_soon()  # the lock is busy: look again soon
            return True
        if verdict == "gave-up":
            self.notify(cfg, namespec)
        if verdict not in ("start", "recycle"):
            return False
        self.start(watcher, cfg, verdict)
        return True

    def start(self, watcher, cfg, verdict):
        from circus.exc import ConflictError

        try:
            future = watcher.start()  # the serialised path of `circusctl start`: before_start counts it
        except ConflictError as exc:
            log(f"{cfg.namespec}: the restart must wait: {exc}")

            def undo():
                with self.update(cfg) as state:  # as it was: due again now
                    entry = P.get_entry(state, cfg.group, cfg.name, cfg.policy)
                    if verdict == "start":
                        entry["n_restarts"] = max(0, entry["n_restarts"] - 1)
                        entry["pending_start"] = None
                    entry["next_restart"] = P.ms_ceil(time.time())
                self.retry_soon()

            self.later(f"putting back the restart of {cfg.namespec}", undo)
            return

        def done(fut):
            try:
                fut.result()
            except Exception as exc:
                log(f"{cfg.namespec}: the restart failed: {type(exc).__name__}: {exc}")

        future.add_done_callback(done)

    # -- notices -----------------------------------------------------------------------------------------
    def notify(self, cfg, namespec):
        """`COMMAND notify WATCHER` once per give-up, in the background (the notice runner: this file)."""
        command = cfg.notify_command if cfg else None
        if not command:
            return
        argv = P.notice_argv(command, namespec)
        if argv is None:
            return
        runner = [sys.executable, os.path.abspath(__file__), "--notice", cfg.policy_log or "", *argv]
        try:
            subprocess.Popen(runner, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=None,
                             close_fds=True, start_new_session=True)
        except OSError as exc:
            log(f"{namespec}: gave up, and the notice command could not run: {exc}")
            return
        log(f"{namespec}: gave up: `{' '.join(argv)}` sends the notice")


def runtime(arbiter):
    rt = getattr(arbiter, RUNTIME_ATTR, None)
    if rt is None:
        rt = Runtime(arbiter)
        setattr(arbiter, RUNTIME_ATTR, rt)
    return rt


# --------------------------------------------------------------------------------------------------
# The hooks. circus calls hook(watcher, arbiter, hook_name, **kwargs); each returns True whatever happens.


def hook(fn):
    @functools.wraps(fn)
    def wrapper(watcher, arbiter, hook_name, **kwargs):
        try:
            return fn(watcher, arbiter, **kwargs)
        except Exception:
            log_error(f"in hook {hook_name} of {getattr(watcher, 'name', '?')}")
            if hook_name == "before_start":
                log(f"{getattr(watcher, 'name', '?')}: start ALLOWED without the restart policy (its start limit "
                    "is not enforced while this error lasts)")
            return True
    return wrapper


@hook
def before_start(watcher, arbiter, **_):
    """Every start counts (boot, circusctl start/restart, reloadconfig, the policy's restarts), except the one
    after a recycle; beyond StartLimitBurst in the window (or while failed) the start is refused: False keeps
    the watcher stopped and nothing is spawned (systemd's start-limit-hit)."""
    rt = runtime(arbiter)
    cfg = Config(watcher)
    cfg.report()
    rt.announce(cfg)
    run = rt.run(watcher.name)
    # before_start must answer now: the lock is tried (never waited for) up to START_LOCK_WAIT; only root can
    # hold it (0600), for a read-modify-write of a small file.
    deadline = time.monotonic() + START_LOCK_WAIT
    while True:
        try:
            with rt.update(cfg) as state:
                verdict = P.start_decision(P.get_entry(state, cfg.group, cfg.name, cfg.policy), cfg.namespec,
                                           cfg.policy, time.time(), cfg.fix)
            break
        except P.LockBusy:
            if time.monotonic() >= deadline:
                log(f"{cfg.namespec}: start ALLOWED without the restart policy: {cfg.state_file}.lock was held "
                    f"by another process for {START_LOCK_WAIT:g}s (this start is not counted)")
                verdict = "uncounted"
                break
            time.sleep(0.01)
    if verdict == "gave-up":
        rt.notify(cfg, cfg.namespec)
    if verdict in ("failed", "gave-up"):
        return False
    run.phase, run.process, run.exited, run.stop_kind = "starting", None, False, None
    return True


@hook
def after_spawn(watcher, arbiter, pid=None, **_):
    run = runtime(arbiter).run(watcher.name)
    run.phase = "running"
    run.process = watcher.processes.get(pid)
    return True


@hook
def after_reap(watcher, arbiter, process_pid=None, exit_code=None, **_):
    """An exit circus reaped. While the watcher stops (stop, restart, reloadconfig, circusd stopping) it is the
    end of a deliberate stop: never a failure, never restarted. Otherwise the engine classifies it."""
    rt = runtime(arbiter)
    cfg = Config(watcher)
    cfg.report()
    rt.announce(cfg)
    run = rt.run(watcher.name)
    run.exited = True
    if watcher.is_stopping() or watcher.is_stopped() or arbiter._stopping or arbiter._restarting:
        status, signame = exit_of(exit_code)
        how = P.classify_exit(status, signame, False, exit_code == 0, cfg.recycle_exit_code)[2]
        log(f"{cfg.namespec}: stopped ({how}, pid {process_pid}): a deliberate stop, not restarted")
        return True
    rt.later(f"recording the exit of {cfg.namespec}", rt.record_exit, watcher, cfg, exit_code)
    return True


@hook
def before_stop(watcher, arbiter, **_):
    """Why the watcher stops: a deliberate stop (a stop command runs, or its process is alive), a start that
    spawned nothing, or the end of a process that is gone (circus stops a watcher whose last process is gone,
    respawn = false; normally after after_reap, which recorded the exit)."""
    run = runtime(arbiter).run(watcher.name)
    natural = (arbiter._exclusive_running_command not in DELIBERATE_COMMANDS and not watcher.get_active_processes()
               and not arbiter._stopping and not arbiter._restarting)
    if run.phase == "starting" and not run.exited and not arbiter._stopping:
        run.stop_kind = "spawn-failed"  # _start gave up: nothing could be spawned
    elif natural:
        run.stop_kind = "exited"        # circus stops a watcher whose last process is gone (respawn = false)
    else:
        run.stop_kind = "deliberate"
    return True


@hook
def after_stop(watcher, arbiter, **_):
    """The watcher is stopped. A start that spawned nothing is systemd's exit-code (203/EXEC), restarted after
    RestartSec; a run that ended without a reap (`circusctl kill`, which reaps it itself, or a process gone
    between circus's waitpid and its status check) is an exit as any other."""
    rt = runtime(arbiter)
    run = rt.run(watcher.name)
    kind, exited, process = run.stop_kind, run.exited, run.process
    run.phase, run.process, run.exited, run.stop_kind = "stopped", None, False, None
    if kind == "spawn-failed":
        cfg = Config(watcher)
        now = time.time()
        error = spawn_error(watcher)

        def record():
            with rt.update(cfg) as state:
                entry = P.get_entry(state, cfg.group, cfg.name, cfg.policy)
                verdict = P.spawn_error_decision(entry, cfg.namespec, cfg.policy, now, error)
                due = entry["next_restart"]
            if verdict == "restart" and due:
                rt.wake(due)

        rt.later(f"recording the spawn error of {cfg.namespec}", record)
    elif kind == "exited" and not exited:
        exit_code = process.returncode() if process is not None else None
        cfg = Config(watcher)
        rt.later(f"recording the exit of {cfg.namespec}", rt.record_exit, watcher, cfg, exit_code,
                 "ended without a reap by circus")
    return True


# --------------------------------------------------------------------------------------------------
# The notice runner (a process of its own: circusd must not wait for it, nor reap it).


def notice_main(argv):
    """--notice LOG COMMAND notify NAME: run the command (its output appended to LOG, or to our stderr), at most
    NOTIFY_TIMEOUT seconds, and log how it ended."""
    if len(argv) < 3 or argv[0] != "--notice":
        print(f"usage: {os.path.basename(__file__)} --notice LOG COMMAND notify NAME", file=sys.stderr)
        return 2
    log_path, command = argv[1], argv[2:]
    name = command[-1]
    if log_path:
        POLICY_LOG.add(log_path, 0, 0)
    out = None
    try:
        if log_path:
            out = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out if out is not None else 2,
                                stderr=out if out is not None else 2, close_fds=True, start_new_session=True)
    except OSError as exc:
        log(f"{name}: the notice command could not run: {exc}")
        return 1
    finally:
        if out is not None:
            os.close(out)
    try:
        code = proc.wait(timeout=P.NOTIFY_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: sendmail and the like go too
        proc.wait()
        log(f"{name}: the notice command did not end within {P.fmt_span(P.NOTIFY_TIMEOUT)}: killed")
        return 1
    if code != 0:
        log(f"{name}: the notice command exited {code}")
    return 0


if __name__ == "__main__":
    sys.exit(notice_main(sys.argv[1:]))
