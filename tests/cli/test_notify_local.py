"""`atom-workerctl notify` on this machine, no lab host: whether a state is a give-up, the notice's text and
JSON, once per give-up, and each channel against a local receiver (an HTTP server in a thread, a sendmail
stand-in that records what it is given, a syslog socket bound in tmp). The same command on real systemd and
real channels: tests/roles/test_notify_lab.py; under a real supervisord listener:
tests/supervisor/test_supervisor_notify.py.
"""

import argparse
import email
import email.policy
import json
import os
import shutil
import socket
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "tests"))

from atom_workerctl import cmd_notify, journal, model  # noqa: E402
from atom_workerctl.backend import UnitState  # noqa: E402
from atom_workerctl.errors import ConfigError, NoSuchError  # noqa: E402
from atom_workerctl.journal import Entry  # noqa: E402
from notify_receiver import Receiver  # noqa: E402

UNIT = "atom-worker@1.service"
STAMP = 1_796_400_000_000_000  # when the unit entered its state (usec)


def crash_looped(**over):
    """systemd 252 after a crash loop: failed, the first failure's Result, NRestarts == StartLimitBurst."""
    fields = {"load_state": "loaded", "active_state": "failed", "sub_state": "failed", "result": "exit-code",
              "n_restarts": 3, "start_limit_burst": 3, "start_limit_interval_usec": 86_400_000_000,
              "restart": "on-failure", "exit_code": "exited", "exit_status": 1, "since_usec": STAMP}
    fields.update(over)
    return UnitState(UNIT, **fields)


def systemd_line(message, message_id, usec=STAMP):
    return Entry(usec, UNIT, 1, 6, "systemd", message, message_id)


GIVE_UP_LINES = [
    Entry(STAMP - 9, UNIT, 42, 6, "worker", "Couldn't connect to any available servers"),
    systemd_line("atom-worker@1.service: Start request repeated too quickly.", None, STAMP - 5),
    systemd_line("Failed to start atom-worker@1.service.", journal.UNIT_FAILED),
    systemd_line("atom-worker@1.service: Triggering OnFailure= dependencies.", None),
]
STOP_LINES = [
    systemd_line("Stopping atom-worker@1.service...", journal.UNIT_STOPPING, STAMP - 5),
    systemd_line("atom-worker@1.service: Failed with result 'signal'.", "d9b373ed55a64feb8242e02dbe79a49c"),
    systemd_line("Stopped atom-worker@1.service.", journal.UNIT_STOPPED),
]


# -- is it a give-up? ------------------------------------------------------------------------------------------
def test_a_crash_loop_stopped_by_the_start_limit_is_a_give_up():
    gave_up, why = cmd_notify.judge(crash_looped(), GIVE_UP_LINES)
    assert gave_up, why
    assert "start limiter refused" in why
    # systemd's own word for it (a healthy unit restarted too often) is one too.
    assert cmd_notify.judge(crash_looped(result="start-limit-hit", n_restarts=0), GIVE_UP_LINES)[0]


def test_a_failed_stop_is_not_a_give_up_and_the_same_state_after_a_refused_start_is():
    # `systemctl stop` of a worker waiting for its restart after a crash: failed, Result=signal, and
    # OnFailure= runs; only the journal's last job line tells it from a give-up with the same state.
    state = crash_looped(result="signal", exit_code="killed", exit_status=9, n_restarts=1)
    gave_up, why = cmd_notify.judge(state, STOP_LINES)
    assert not gave_up and "stopped on purpose" in why
    # Control: the very same state whose last job line is a refused start is a give-up.
    assert cmd_notify.judge(state, GIVE_UP_LINES)[0]


@pytest.mark.parametrize("over", [
    {"active_state": "active", "sub_state": "running", "result": "success"},
    {"active_state": "activating", "sub_state": "auto-restart"},
    {"active_state": "inactive", "sub_state": "dead", "result": "success"},  # stopped cleanly
    {"restart": "no"},  # a failure its Restart= never restarts: not the start limit
    {"load_state": "not-found"},
])
def test_states_that_are_not_a_give_up(over):
    gave_up, why = cmd_notify.judge(crash_looped(**over), GIVE_UP_LINES)
    assert not gave_up and why
    assert cmd_notify.judge(crash_looped(), GIVE_UP_LINES)[0]  # control


def test_supervisord_says_it_exactly():
    # The policy listener's `failed` entry (limit_hit) is the start limit itself, never guessed.
    state = crash_looped(limit_hit=True, limit_reason="the restart policy refused a restart", result="start-limit-hit")
    assert cmd_notify.judge(state, [])[0]
    assert not cmd_notify.judge(crash_looped(limit_hit=False, result="exit-code"), [])[0]


# -- the notice ---------------------------------------------------------------------------------------------------
@pytest.fixture()
def host(tmp_path):
    path = tmp_path / "sites.json"
    path.write_text(json.dumps({"schema": 1, "manager": "supervisor", "supervisor": {"log_dir": str(tmp_path / "log")},
                                "sites": [{"name": "default", "root": "/srv/atom", "gearman_servers": [],
                                           "pools": [{"name": "default", "unit_template": "atom-worker@.service",
                                                      "units": [UNIT, "atom-worker@2.service"]}]}]}))
    return model.load(str(path))


def notice_of(host, entries=GIVE_UP_LINES):
    return cmd_notify.build("w1.example.org", host, UNIT, crash_looped(), "the start limiter refused", entries)


def test_the_notice_names_host_instance_journal_and_fix(host):
    notice = notice_of(host)
    assert notice["host"] == "w1.example.org" and notice["instance"] == "atom-worker@1"
    assert (notice["site"], notice["pool"], notice["unit"]) == ("default", "default", UNIT)
    assert (notice["result"], notice["n_restarts"], notice["start_limit_burst"]) == ("exit-code", 3, 3)
    assert notice["fix"] == "atom-workerctl reset atom-worker@1"
    assert len(notice["journal"]) == len(GIVE_UP_LINES)
    assert "Start request repeated too quickly" in notice["journal"][1]
    body = cmd_notify.text(notice)
    for part in ("w1.example.org", "atom-worker@1", "Couldn't connect to any available servers",
                 "\n  atom-workerctl reset atom-worker@1\n", "site default, pool default"):
        assert part in body
    line = cmd_notify.one_line(notice)
    assert "\n" not in line and "atom-worker@1" in line and "atom-workerctl reset atom-worker@1" in line


def test_a_log_that_cannot_be_read_is_said_in_the_notice(host):
    notice = cmd_notify.build("w1", host, UNIT, crash_looped(), "why", [], "journalctl not found")
    assert "could not be read: journalctl not found" in cmd_notify.text(notice)


def test_once_per_give_up(tmp_path):
    state_dir = str(tmp_path / "notified")
    assert cmd_notify.claim(state_dir, UNIT, "100")
    assert not cmd_notify.claim(state_dir, UNIT, "100")  # the same failure again
    assert cmd_notify.claim(state_dir, "atom-worker@2.service", "100")  # another instance
    assert cmd_notify.claim(state_dir, UNIT, "200")  # the next give-up
    cmd_notify.release(state_dir, UNIT, "200")  # nothing was delivered: may be tried again
    assert cmd_notify.claim(state_dir, UNIT, "200")
    assert oct(os.stat(state_dir).st_mode & 0o777) == "0o700"


# -- settings -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, says", [
    ({"channels": ["sms"]}, "channels must be a list of log, mail, webhook"),
    ({"channels": ["mail"]}, "channel mail needs mail.to"),
    ({"channels": ["webhook"]}, "webhook.url must be an http:// or https:// URL"),
    ({"channels": ["webhook"], "webhook": {"url": "ftp://h/secret-token"}}, "webhook.url must be"),
    ({"webhook": {"url": "https://h/x", "timeout": 0}}, "webhook.timeout must be"),
    ({"mail": {"sendmail": "sendmail"}}, "mail.sendmail an absolute path"),
    ([], "the top level is not an object"),
])
def test_bad_settings_are_one_line_without_the_url(raw, says):
    with pytest.raises(ConfigError) as caught:
        cmd_notify.check_config(raw)
    message = str(caught.value)
    assert says in message and "\n" not in message and "secret-token" not in message


def test_settings_keep_the_defaults_for_what_they_leave_out():
    cfg = cmd_notify.check_config({"channels": ["log"]})
    assert cfg["mail"]["sendmail"] == "/usr/sbin/sendmail" and cfg["webhook"]["timeout"] == 10
    assert cfg["state_dir"] == "/run/atom-worker/notified" and cfg["syslog_socket"] == "/dev/log"


# -- channels -------------------------------------------------------------------------------------------------------
@pytest.fixture()
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture()
def sendmail(tmp_path):
    path = tmp_path / "bin" / "sendmail"
    path.parent.mkdir()
    shutil.copy(REPO / "tests" / "fake_sendmail.py", path)
    return path


def sent_mails(sendmail):
    record = Path(f"{sendmail}.jsonl")
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


@pytest.fixture()
def syslog(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "log.sock"))
    sock.settimeout(10)
    yield sock
    sock.close()


def config(tmp_path, receiver=None, sendmail=None, channels=("log", "mail", "webhook")):
    return cmd_notify.check_config({
        "channels": list(channels),
        "mail": {"to": ["ops@example.org", "dev@example.org"], "from": "atom@w1.example.org",
                 "sendmail": str(sendmail or "/nonexistent/sendmail")},
        "webhook": {"url": (receiver.url if receiver else "http://127.0.0.1:9") + "/hook?token=secret-token",
                    "timeout": 5},
        "state_dir": str(tmp_path / "notified"),
        "syslog_socket": str(tmp_path / "log.sock"),
    })


def test_webhook_posts_the_notice_as_json(host, tmp_path, receiver):
    notice = notice_of(host)
    cmd_notify.send_webhook(notice, config(tmp_path, receiver))
    (post,) = receiver.posts
    assert post["path"] == "/hook?token=secret-token" and post["content_type"] == "application/json"
    body = json.loads(post["body"])
    assert body == json.loads(json.dumps(notice))
    assert {"host", "instance", "unit", "site", "pool", "result", "n_restarts", "journal", "fix"} <= set(body)


def test_webhook_failures_are_one_line_without_the_token(host, tmp_path, receiver):
    receiver.answer(500)
    with pytest.raises(cmd_notify.SendError) as caught:
        cmd_notify.send_webhook(notice_of(host), config(tmp_path, receiver))
    assert str(caught.value) == f"webhook: {receiver.url} answered HTTP 500 Internal Server Error"
    assert len(receiver.posts) == 1  # control: the receiver did get it, and said no
    # Nothing listens (a port closed a moment ago).
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    cfg = config(tmp_path)
    cfg["webhook"]["url"] = f"http://127.0.0.1:{port}/hook?token=secret-token"
    with pytest.raises(cmd_notify.SendError) as caught:
        cmd_notify.send_webhook(notice_of(host), cfg)
    assert f"cannot reach http://127.0.0.1:{port}" in str(caught.value)
    assert "secret-token" not in str(caught.value)


def test_a_webhook_that_never_answers_is_given_up_after_its_timeout(host, tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts the connection (the kernel does), never answers
    try:
        cfg = config(tmp_path)
        cfg["webhook"].update(url=f"http://127.0.0.1:{silent.getsockname()[1]}/h", timeout=0.5)
        with pytest.raises(cmd_notify.SendError) as caught:
            cmd_notify.send_webhook(notice_of(host), cfg)
        assert "did not answer within 0.5 s" in str(caught.value)
    finally:
        silent.close()


def test_mail_goes_through_sendmail_t(host, tmp_path, sendmail):
    notice = notice_of(host)
    cmd_notify.send_mail(notice, config(tmp_path, sendmail=sendmail))
    (mail,) = sent_mails(sendmail)
    assert mail["argv"] == ["-t", "-oi"]
    msg = email.message_from_string(mail["message"], policy=email.policy.default)
    assert msg["To"] == "ops@example.org, dev@example.org" and msg["From"] == "atom@w1.example.org"
    assert msg["Subject"] == "AtoM worker atom-worker@1 on w1.example.org gave up (start limit hit)"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg.get_content() == cmd_notify.text(notice)


def test_mail_failures_are_one_line(host, tmp_path, sendmail):
    Path(f"{sendmail}.fail").touch()
    with pytest.raises(cmd_notify.SendError) as caught:
        cmd_notify.send_mail(notice_of(host), config(tmp_path, sendmail=sendmail))
    said = "sendmail stand-in: cannot queue the message (told to fail)"
    assert str(caught.value) == f"mail: {sendmail} exited 75: {said}"
    with pytest.raises(cmd_notify.SendError) as caught:
        cmd_notify.send_mail(notice_of(host), config(tmp_path))
    assert "/nonexistent/sendmail not found" in str(caught.value)


def test_log_is_one_crit_line_of_the_daemon_facility(host, tmp_path, syslog):
    notice = notice_of(host)
    cmd_notify.send_log(notice, config(tmp_path))
    data = syslog.recv(65536).decode()
    assert data == f"<26>atom-workerctl[{os.getpid()}]: {cmd_notify.one_line(notice)}"
    with pytest.raises(cmd_notify.SendError) as caught:
        cmd_notify.send_log(notice, {**config(tmp_path), "syslog_socket": str(tmp_path / "none.sock")})
    assert "no syslog socket at" in str(caught.value)


# -- the command: once per give-up, every channel tried ----------------------------------------------------------
class FakeBackend:
    """The state a backend reports (supervisord-shaped: the log files are the instance's journal)."""

    name = "supervisor"

    def __init__(self, log_dir, state):
        self.settings = {"log_dir": str(log_dir)}
        self.state = state

    def units(self, names, glob):
        return {u: self.state if u == UNIT else UnitState(u) for u in names}


def args_for(instance="atom-worker@1", dry_run=False, notify_config=None):
    return argparse.Namespace(instances=[instance], dry_run=dry_run, notify_config=notify_config)


@pytest.fixture()
def command(host, tmp_path, receiver, sendmail, syslog, capsys):
    """run() against a supervisord-shaped backend whose instance gave up, with every channel local."""
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    (log_dir / "atom-worker@1.log").write_text("2026-12-04 10:00:00 > Couldn't connect to any available servers\n")
    (tmp_path / "notify.json").write_text(json.dumps(config(tmp_path, receiver, sendmail)))
    state = crash_looped(limit_hit=True, limit_reason="the restart policy refused a restart",
                         result="start-limit-hit", since_usec=1_796_378_400_500_000)
    backend = FakeBackend(log_dir, state)
    seen = []

    def errors():
        """Everything the command wrote to stderr so far."""
        seen.append(capsys.readouterr().err)
        return "".join(seen)

    return argparse.Namespace(run=lambda **kw: cmd_notify.run(args_for(**kw), host, backend), backend=backend,
                              errors=errors, receiver=receiver, sendmail=sendmail, syslog=syslog)


def test_run_sends_once_per_give_up_on_every_channel(command):
    assert command.run() == 0
    assert len(command.receiver.posts) == 1 and len(sent_mails(command.sendmail)) == 1
    assert command.syslog.recv(65536).startswith(b"<26>atom-workerctl[")
    body = json.loads(command.receiver.posts[0]["body"])
    assert body["journal"] == ["2026-12-04 10:00:00 atom-worker@1: Couldn't connect to any available servers"]
    assert "notice sent by log, mail, webhook" in command.errors()
    # The same give-up again (OnFailure= run twice, or by hand): nothing more.
    assert command.run() == 0
    assert len(command.receiver.posts) == 1 and len(sent_mails(command.sendmail)) == 1
    assert "had its notice already; nothing sent" in command.errors()
    # The next give-up (a reset, then the limit hit again: a new failed_at) has a notice of its own.
    command.backend.state.since_usec += 60_000_000
    with open(command.backend.settings["log_dir"] + "/atom-worker@1.log", "a") as log:
        log.write("2026-12-04 10:01:00 > Couldn't connect to any available servers\n")
    assert command.run() == 0
    assert len(command.receiver.posts) == 2 and len(sent_mails(command.sendmail)) == 2


def test_run_sends_nothing_for_an_instance_that_did_not_give_up(command):
    command.backend.state = crash_looped(active_state="inactive", sub_state="dead", result="success",
                                         limit_hit=False)
    assert command.run() == 0
    assert "atom-worker@1 did not give up" in command.errors()
    assert command.receiver.posts == [] and sent_mails(command.sendmail) == []
    # Control: the same receivers get the notice once the instance has given up.
    command.backend.state = crash_looped(limit_hit=True, result="start-limit-hit")
    assert command.run() == 0
    assert len(command.receiver.posts) == 1 and len(sent_mails(command.sendmail)) == 1


def test_a_failing_channel_fails_the_command_and_the_others_are_still_sent(command):
    command.receiver.answer(503)
    assert command.run() == 1
    assert len(sent_mails(command.sendmail)) == 1 and command.syslog.recv(65536)
    lines = command.errors().splitlines()
    said = f"atom-workerctl notify: cannot send: webhook: {command.receiver.url} answered HTTP 503 Service Unavailable"
    assert said in lines
    assert "notice sent by log, mail" in lines[-1]


def test_nothing_delivered_leaves_the_give_up_to_be_notified_again(command):
    command.receiver.answer(503)
    Path(f"{command.sendmail}.fail").touch()
    command.syslog.close()  # nobody listens on the syslog socket any more
    assert command.run() == 1
    Path(f"{command.sendmail}.fail").unlink()
    command.receiver.answer(200)
    assert command.run() == 1  # the log channel still fails; the others now deliver
    assert len(command.receiver.posts) == 2 and len(sent_mails(command.sendmail)) == 1


def test_dry_run_prints_the_notice_and_sends_nothing(command, capsys):
    assert command.run(dry_run=True) == 0
    assert "atom-workerctl reset atom-worker@1" in capsys.readouterr().out
    assert command.receiver.posts == [] and sent_mails(command.sendmail) == []
    assert command.run() == 0  # control: not marked as sent by the dry run
    assert len(command.receiver.posts) == 1


def test_one_instance_only(command, host):
    with pytest.raises(NoSuchError):
        command.run(instance="atom-worker-nope@1")
    with pytest.raises(Exception, match="one instance"):
        command.run(instance="atom-worker@*")


def test_an_answer_that_is_not_http_is_one_line_and_the_others_are_still_sent(command, tmp_path):
    # A peer that answers garbage (not an HTTP status line): http.client raises BadStatusLine, which is
    # neither an OSError nor a URLError.
    garbage = socket.socket()
    garbage.bind(("127.0.0.1", 0))
    garbage.listen(1)

    def answer():
        conn, _ = garbage.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"garbage\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{garbage.getsockname()[1]}/hook?token=secret-token"
    cfg = json.loads((tmp_path / "notify.json").read_text())
    cfg["webhook"]["url"] = url
    (tmp_path / "notify.json").write_text(json.dumps(cfg))
    try:
        assert command.run() == 1
    finally:
        thread.join(5)
        garbage.close()
    lines = command.errors().splitlines()
    assert any("cannot send: webhook:" in ln and "not HTTP (BadStatusLine)" in ln for ln in lines), lines
    assert "secret-token" not in "".join(lines)
    assert len(sent_mails(command.sendmail)) == 1 and command.syslog.recv(65536)  # the others: sent
    assert "notice sent by log, mail" in lines[-1]
