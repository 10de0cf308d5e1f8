"""`atom-workerctl notify INSTANCE`: a notice when a worker gives up, without Prometheus.

Who runs it: on systemd hosts the worker units' `OnFailure=atom-notify@%N.service` (templates/
atom-notify@.service.j2), on supervisord hosts the atom-worker-policy listener at the moment it gives up on
a process (`--notify-command`). Both can also start it when nothing gave up: systemd enters `failed`, and so
runs OnFailure=, also when a deliberate `systemctl stop` ends with an unclean exit (a worker killed by its
stop signal before it handles it, or at TimeoutStopSec), and anyone may run it by hand. So this command
decides for itself, from the instance's state as every other command reads it
(backend.UnitState.start_limit()), and sends nothing (saying why on stderr) unless the instance gave up: its
start limit is used up and the last job systemd ran on it was not a stop. A unit that is active or
activating again sends nothing either. (A stop while a crashed worker waits for its restart leaves it
inactive on systemd 252, and a recycle never reaches systemd: neither runs OnFailure= at all.)

Once per give-up: the give-up is keyed by the time the instance entered its failed state (systemd's
StateChangeTimestamp, the listener's failed_at); a marker in the state directory (/run/atom-worker/notified,
a tmpfs: a reboot forgets it, as systemd forgets the failed state) makes a second run for the same failure
send nothing. A new give-up after `atom-workerctl reset` has a new time, so it gets its own notice.

What is sent, per /etc/atom-worker/notify.json (beside sites.json; written by the atom_worker role, mode
0600: a webhook URL can hold a token): the host, the instance, its site and pool, the state, the last lines
of its journal (supervisord: its log file and the listener's lines about it) and the command that brings
it back (`atom-workerctl reset INSTANCE`), on each channel chosen:
  log      one line at priority crit (LOG_DAEMON) to the syslog socket /dev/log: journald on a systemd host,
           so `journalctl -p crit` shows it
  mail     a text mail through the host's sendmail (`sendmail -t -oi`: the MTA's own queue and retries)
  webhook  an HTTP(S) POST of a small JSON object (README: "Notices")
A channel that fails is one line on stderr; the others are still tried, and the exit code is 1.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time

from . import atomicfile, cmd_logs, journal, model
from .errors import EXIT_ERROR, EXIT_OK, ConfigError, WorkerctlError
from .render import iso

CONFIG_NAME = "notify.json"
SCHEMA = 1
CHANNELS = ("log", "mail", "webhook")
DEFAULTS = {
    "channels": [],
    "mail": {"to": [], "from": "", "sendmail": "/usr/sbin/sendmail"},
    "webhook": {"url": "", "timeout": 10},
    "state_dir": "/run/atom-worker/notified",
    "syslog_socket": "/dev/log",
    "journal_lines": 20,
}
# LOG_DAEMON (3) * 8 + LOG_CRIT (2): what `logger -p daemon.crit` sends.
SYSLOG_PRIORITY = 3 * 8 + 2
SENDMAIL_TIMEOUT = 60.0
# The listener stops a start it refused and runs this command right after: wait for the stop to end.
SETTLE_TIMEOUT = 30.0
# journald and supervisord write what they are sent a little later: wait that long at most for the lines
# about the failure itself (the notice is sent anyway, with what the log holds by then).
LOG_CATCH_UP = 5.0
POLL = 0.2


class SendError(Exception):
    """One channel could not deliver: one line for stderr."""


# -- configuration ------------------------------------------------------------------------------------------
def config_path(host: model.Host, given: str | None) -> str:
    """notify.json beside the sites.json read (the role writes both into one folder)."""
    return given or os.path.join(os.path.dirname(os.path.abspath(host.path)), CONFIG_NAME)


def load_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: no notices are configured on this host",
                          hint="set atom_worker_notify and run site.yml") from None
    except PermissionError:
        raise ConfigError(f"cannot read {path}: permission denied (run as root)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"malformed JSON in {path}: {exc}") from None
    return check_config(raw, path)


def check_config(raw, path: str = "notify.json") -> dict:
    """The settings over DEFAULTS; a value of the wrong kind is one ConfigError naming its key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level is not an object")
    cfg = json.loads(json.dumps(DEFAULTS))
    for key in ("mail", "webhook"):
        part = raw.get(key, {})
        if not isinstance(part, dict):
            raise ConfigError(f"{path}: {key} must be an object")
        cfg[key].update(part)
    for key in ("channels", "state_dir", "syslog_socket", "journal_lines"):
        if key in raw:
            cfg[key] = raw[key]
    channels = cfg["channels"]
    if not isinstance(channels, list) or any(c not in CHANNELS for c in channels):
        raise ConfigError(f"{path}: channels must be a list of {', '.join(CHANNELS)} (got {channels!r})")
    mail, hook = cfg["mail"], cfg["webhook"]
    to = mail["to"]
    if not isinstance(to, list) or not all(isinstance(a, str) and "@" in a for a in to):
        raise ConfigError(f"{path}: mail.to must be a list of addresses")
    if "mail" in channels and not to:
        raise ConfigError(f"{path}: channel mail needs mail.to")
    if not isinstance(mail["from"], str) or not isinstance(mail["sendmail"], str) \
            or not mail["sendmail"].startswith("/"):
        raise ConfigError(f"{path}: mail.from must be a text and mail.sendmail an absolute path")
    url = hook["url"]
    if not isinstance(url, str) or (url and not url.startswith(("http://", "https://"))) \
            or ("webhook" in channels and not url):
        # Never the URL itself in a message: it may hold a token.
        raise ConfigError(f"{path}: webhook.url must be an http:// or https:// URL")
    timeout = hook["timeout"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 300:
        raise ConfigError(f"{path}: webhook.timeout must be seconds above 0, at most 300 (got {timeout!r})")
    for key in ("state_dir", "syslog_socket"):
        if not isinstance(cfg[key], str) or not cfg[key].startswith("/"):
            raise ConfigError(f"{path}: {key} must be an absolute path")
    lines = cfg["journal_lines"]
    if isinstance(lines, bool) or not isinstance(lines, int) or not 1 <= lines <= 1000:
        raise ConfigError(f"{path}: journal_lines must be a number from 1 to 1000")
    return cfg


# -- is this a give-up? -------------------------------------------------------------------------------------
def judge(state, entries=None) -> tuple[bool, str]:
    """(gave up, why). `entries`: the instance's last log entries, for the one case the state cannot tell
    apart (systemd: failed after a deliberate stop that ended uncleanly)."""
    if state.load_state == "not-found":
        return False, "the process manager does not know it (not loaded)"
    if state.active_state in ("active", "activating", "reloading", "deactivating"):
        sub = f" ({state.sub_state})" if state.sub_state else ""
        return False, f"it is {state.active_state}{sub} again"
    hit, reason = state.start_limit()
    if not hit:
        return False, (f"it is {state.active_state} with Result={state.result}: stopped, or ended in a way its "
                       f"Restart={state.restart} does not restart, so its start limit is not what keeps it down")
    if journal.stopped_on_purpose(entries):
        return False, (f"it was stopped on purpose (systemd's last job on it was a stop; Result={state.result} "
                       "is how that stop ended)")
    return True, reason


def settled_state(backend, unit: str):
    """The instance's state once a stop under way has ended (bounded)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    state = backend.units([unit], "")[unit]
    while state.active_state == "deactivating" and time.monotonic() < deadline:
        time.sleep(POLL)
        state = backend.units([unit], "")[unit]
    return state


def read_log(host: model.Host, backend, unit: str, state, lines: int) -> tuple[list, str | None]:
    """The instance's last log lines once they reach its failure (bounded wait), and a read error or None.

    journald stamps a line when it receives it, after the state change it reports; the listener's log has
    whole seconds, so there its failure's second is enough."""
    floor = state.since_usec
    if host.manager != "systemd":
        floor -= floor % 1_000_000
    deadline = time.monotonic() + LOG_CATCH_UP
    while True:
        try:
            entries = cmd_logs.read_entries(host, backend, [unit], lines=lines)
        except WorkerctlError as exc:
            return [], str(exc)
        if not floor or any(e.usec >= floor for e in entries) or time.monotonic() >= deadline:
            return entries, None
        time.sleep(POLL)


# -- once per give-up ---------------------------------------------------------------------------------------
def _marker(state_dir: str, unit: str) -> tuple[str, int]:
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(state_dir, unit + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except PermissionError:
        raise WorkerctlError(f"cannot write {state_dir}: permission denied (run as root)") from None
    except OSError as exc:
        raise WorkerctlError(f"cannot write {state_dir}: {exc.strerror or exc}") from None
    fcntl.flock(fd, fcntl.LOCK_EX)
    return os.path.join(state_dir, unit), fd


def claim(state_dir: str, unit: str, key: str) -> bool:
    """True when this give-up (key) of the unit has no notice yet; it is then marked as sent."""
    path, fd = _marker(state_dir, unit)
    try:
        try:
            with open(path, encoding="utf-8") as fh:
                if fh.read().strip() == key:
                    return False
        except FileNotFoundError:
            pass
        atomicfile.replace(path, key + "\n")
        return True
    finally:
        os.close(fd)


def release(state_dir: str, unit: str, key: str) -> None:
    """Nothing could be delivered: forget the claim, so that running the notice again may send it."""
    path, fd = _marker(state_dir, unit)
    try:
        with open(path, encoding="utf-8") as fh:
            if fh.read().strip() == key:
                os.unlink(path)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


# -- the notice ---------------------------------------------------------------------------------------------
def build(host_name: str, host: model.Host, unit: str, state, reason: str, entries,
          log_error: str | None = None) -> dict:
    """The notice: what every channel sends (the webhook's JSON body as it is)."""
    instance = model.short(unit)
    pool = host.pool_of(unit)
    return {
        "schema": SCHEMA,
        "event": "gave-up",
        "host": host_name,
        "instance": instance,
        "unit": unit,
        "site": pool.site.name if pool else None,
        "pool": pool.name if pool else None,
        "manager": host.manager,
        "active_state": state.active_state,
        "result": state.result,
        "n_restarts": state.n_restarts,
        "start_limit_burst": state.start_limit_burst,
        "since": iso(state.since_usec),
        "reason": reason,
        "journal": [e.human() for e in entries],
        "journal_error": log_error,
        "fix": f"atom-workerctl reset {instance}",
    }


def subject(notice: dict) -> str:
    return f"AtoM worker {notice['instance']} on {notice['host']} gave up (start limit hit)"


def one_line(notice: dict) -> str:
    return (f"AtoM worker {notice['instance']} on {notice['host']} gave up: {notice['active_state']}, "
            f"Result={notice['result']}, {notice['n_restarts']} automatic restarts "
            f"(StartLimitBurst={notice['start_limit_burst']}); once the cause is fixed, bring it back with: "
            f"{notice['fix']}")


def text(notice: dict) -> str:
    where = f" (site {notice['site']}, pool {notice['pool']})" if notice["site"] else " (no pool of sites.json)"
    lines = [
        f"AtoM worker {notice['instance']} on {notice['host']} gave up: it stays down until it is reset.",
        "",
        f"  host:      {notice['host']}",
        f"  instance:  {notice['instance']}{where}",
        (f"  state:     {notice['active_state']} since {notice['since'] or '?'}, Result={notice['result']}, "
         f"{notice['n_restarts']} automatic restarts (StartLimitBurst={notice['start_limit_burst']})"),
        f"  why:       {notice['reason']}",
        "",
    ]
    if notice["journal"]:
        lines.append(f"Its last {len(notice['journal'])} log lines:")
        lines += [f"  {line}" for line in notice["journal"]]
    else:
        lines.append(f"Its log could not be read: {notice['journal_error'] or 'no lines'}")
    lines += [
        "",
        f"Once the cause is fixed (the lines above should name it), bring it back, as root on {notice['host']}:",
        "",
        f"  {notice['fix']}",
        "",
        "More: atom-workerctl doctor; atom-workerctl logs -n 100 " + notice["instance"],
        "-- ",
        "atom-workerctl notify: one notice per give-up (atom_worker_notify in the inventory chooses where).",
    ]
    return "\n".join(lines) + "\n"


# -- channels -----------------------------------------------------------------------------------------------
def send_log(notice: dict, cfg: dict) -> None:
    """One datagram in syslog's format to the syslog socket (journald's /dev/log on systemd hosts)."""
    line = one_line(notice).replace("\n", " ")
    data = f"<{SYSLOG_PRIORITY}>atom-workerctl[{os.getpid()}]: {line}".encode()
    path = cfg["syslog_socket"]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(data, path)
    except (FileNotFoundError, ConnectionRefusedError):
        raise SendError(f"log: no syslog socket at {path} (journald or a syslog daemon listens there)") from None
    except OSError as exc:
        raise SendError(f"log: cannot write to {path}: {exc.strerror or exc}") from None


def mail_message(notice: dict, cfg: dict) -> bytes:
    from email.message import EmailMessage
    from email.utils import formatdate, make_msgid

    msg = EmailMessage()
    msg["Subject"] = subject(notice)
    msg["To"] = ", ".join(cfg["mail"]["to"])
    if cfg["mail"]["from"]:
        msg["From"] = cfg["mail"]["from"]  # else the MTA's default (root@host)
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid("atom-workerctl")
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies
    msg.set_content(text(notice))
    return msg.as_bytes()


def send_mail(notice: dict, cfg: dict) -> None:
    sendmail = cfg["mail"]["sendmail"]
    try:
        proc = subprocess.run([sendmail, "-t", "-oi"], input=mail_message(notice, cfg), capture_output=True,
                              timeout=SENDMAIL_TIMEOUT, check=False)
    except FileNotFoundError:
        raise SendError(f"mail: {sendmail} not found (install an MTA, e.g. apt-get install postfix or "
                        "dma, or set atom_worker_notify_sendmail)") from None
    except PermissionError:
        raise SendError(f"mail: {sendmail} is not executable") from None
    except subprocess.TimeoutExpired:
        raise SendError(f"mail: {sendmail} did not finish within {SENDMAIL_TIMEOUT:g} s") from None
    if proc.returncode != 0:
        said = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise SendError(f"mail: {sendmail} exited {proc.returncode}" + (f": {said[-1]}" if said else ""))


def safe_url(url: str) -> str:
    """scheme://host[:port] only: the path, query or user part of a webhook URL may hold its token."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}" + (f":{parts.port}" if parts.port else "")


def send_webhook(notice: dict, cfg: dict) -> None:
    import http.client
    import urllib.error
    import urllib.request

    from . import __version__

    url, timeout = cfg["webhook"]["url"], cfg["webhook"]["timeout"]
    body = json.dumps(notice, sort_keys=True).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": f"atom-workerctl/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            answer.read(65536)
    except urllib.error.HTTPError as exc:
        raise SendError(f"webhook: {safe_url(url)} answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            raise SendError(f"webhook: {safe_url(url)} did not answer within {timeout:g} s") from None
        raise SendError(f"webhook: cannot reach {safe_url(url)}: {getattr(reason, 'strerror', None) or reason}") \
            from None
    except TimeoutError:
        raise SendError(f"webhook: {safe_url(url)} did not answer within {timeout:g} s") from None
    except http.client.HTTPException as exc:  # not OSError: BadStatusLine, IncompleteRead, LineTooLong...
        raise SendError(f"webhook: {safe_url(url)} answered something that is not HTTP "
                        f"({type(exc).__name__})") from None
    except (OSError, ValueError) as exc:
        raise SendError(f"webhook: {safe_url(url)}: {exc}") from None


SENDERS = {"log": send_log, "mail": send_mail, "webhook": send_webhook}


def deliver(notice: dict, cfg: dict, err=None) -> tuple[list[str], list[str]]:
    """Every chosen channel, each whatever the others did: (sent, failures)."""
    err = err or sys.stderr
    sent, failures = [], []
    for channel in cfg["channels"]:
        try:
            SENDERS[channel](notice, cfg)
            sent.append(channel)
        except SendError as exc:
            failures.append(str(exc))
            err.write(f"atom-workerctl notify: cannot send: {exc}\n")
        except Exception as exc:
            # Anything else a channel meets (a header the mail library refuses...): one line, without the
            # webhook's URL (it may hold a token), and the other channels are still tried.
            first = (str(exc).splitlines() or [""])[0][:200]
            url = (cfg.get("webhook") or {}).get("url")
            why = f"{channel}: {type(exc).__name__}: {first.replace(url, safe_url(url)) if url else first}"
            failures.append(why)
            err.write(f"atom-workerctl notify: cannot send: {why}\n")
    return sent, failures


# -- the command --------------------------------------------------------------------------------------------
def run(args, host: model.Host, backend) -> int:
    err = sys.stderr
    sel = model.select(host, args.instances)
    if len(sel.units) != 1:
        raise WorkerctlError("notify takes one instance (the one that gave up), not a glob", exit_code=2)
    unit = sel.units[0]
    instance = model.short(unit)
    cfg = load_config(config_path(host, args.notify_config))
    if not cfg["channels"] and not args.dry_run:
        err.write(f"atom-workerctl notify: {instance}: notices are off on this host (atom_worker_notify: [])\n")
        return EXIT_OK
    state = settled_state(backend, unit)
    gave_up, why = judge(state)
    entries, log_error = [], None
    if gave_up:
        entries, log_error = read_log(host, backend, unit, state, cfg["journal_lines"])
        gave_up, why = judge(state, entries)
    if not gave_up:
        err.write(f"atom-workerctl notify: {instance} did not give up: {why}; no notice sent\n")
        return EXIT_OK
    notice = build(socket.gethostname(), host, unit, state, why, entries, log_error)
    if args.dry_run:
        sys.stdout.write(f"Subject: {subject(notice)}\n\n{text(notice)}")
        return EXIT_OK
    key = str(state.since_usec)
    if not claim(cfg["state_dir"], unit, key):
        err.write(f"atom-workerctl notify: {instance}: this give-up (failed since {notice['since']}) had its notice "
                  "already; nothing sent\n")
        return EXIT_OK
    sent, failures = [], []
    try:
        sent, failures = deliver(notice, cfg, err)
    finally:
        if not sent:  # nothing went out: the next run for this give-up tries again
            release(cfg["state_dir"], unit, key)
    if sent:
        err.write(f"atom-workerctl notify: {instance} gave up: notice sent by {', '.join(sent)}\n")
    return EXIT_ERROR if failures else EXIT_OK
