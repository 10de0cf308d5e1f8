"""The notice when a worker gives up, on a real supervisord: the atom-worker-policy listener runs its notice
command (`--notify-command`, atom-workerctl) once each time it gives up on a process, in the background, and
never for a clean exit, a deliberate stop or recycling; end to end, the real `atom-workerctl notify` on the
AtoM stand-in and a real gearmand sends one notice per give-up to a local webhook receiver, a sendmail
stand-in and a syslog socket, and the fix it prints brings the worker back.

The policy here is RestartSec=1, StartLimitIntervalSec=60, StartLimitBurst=3 (supervisor_harness). Waits
poll with a deadline that only guards against hangs.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import supervisor_harness
from manager_tests import BURST, CLEAN, CRASH, RECYCLE, SLEEP, ns
from notify_receiver import Receiver
from standin import Gearmand, clear_control, make_root, write_control
from supervisor_harness import make_units, write_sites_json

pytestmark = pytest.mark.timeout(120)
supervisord = supervisor_harness.supervisord
REPO = Path(__file__).resolve().parents[2]

CRASH2 = {"name": "crashtoo", "instances": 1, "types": ["crash"]}


def recorder(tmp_path, state_file, hang=False):
    """A stand-in notice command: one JSON line per run (its argv, its pid, and the policy state's entry of
    the process as the command found it), then, with `hang`, it sleeps as a dead mail server would."""
    record = tmp_path / "notices.jsonl"
    script = tmp_path / "bin" / "atom-workerctl"
    script.parent.mkdir(exist_ok=True)
    script.write_text(f"""#!/usr/bin/python3
import json, sys, time
state = json.load(open({str(state_file)!r}))
entry = next((e for ns, e in state["processes"].items() if ns.endswith(":" + sys.argv[2])), None)
with open({str(record)!r}, "a") as fh:
    fh.write(json.dumps({{"argv": sys.argv[1:], "pid": __import__("os").getpid(), "entry": entry}}) + "\\n")
if {hang!r}:
    time.sleep(3600)
""")
    script.chmod(0o755)

    def notices():
        return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []

    return script, notices


def test_the_listener_notifies_once_per_give_up_and_never_for_clean_exits_stops_or_recycling(supervisord, tmp_path):
    script, notices = recorder(tmp_path, supervisord.state_file)
    sv = supervisord.start(make_units(supervisord.root, [CRASH, CLEAN, SLEEP, RECYCLE]),
                           supervisor={"notify_command": str(script)}, wait_running=[ns("sleep")])
    # What is not a give-up: a clean exit (not restarted), a deliberate stop, recycling (never counted).
    sv.wait(lambda: (sv.entry(ns("clean")) or {}).get("last_exit"), 15, "the clean exit")
    sv.ctl("stop", ns("sleep"), check=True)
    sv.wait(lambda: (sv.entry(ns("recycle")) or {}).get("n_recycles", 0) >= 2 * BURST, 20, "recycles past the burst")
    # What is: the crash loop stopped by the start limit.
    sv.wait(notices, 20, "the notice command to run")
    sv.wait(lambda: sv.policy_lines("gave up: `"), 5, "the listener's line about it")
    first = sv.entry(ns("crash"))
    assert [n["argv"] for n in notices()] == [["notify", "atom-worker-default-crash@1"]]
    # Run after the failed state was written: the command reads the give-up as it is.
    assert notices()[0]["entry"]["failed"] is True
    assert notices()[0]["entry"]["failed_at"] == first["failed_at"]
    assert sv.entry(ns("clean"))["failed"] is False and sv.entry(ns("recycle"))["failed"] is False
    assert sv.statename(ns("sleep")) == "STOPPED"

    # One notice per give-up: reset, crash loop, a second give-up, a second notice.
    assert sv.policy("reset", "--start", ns("crash")).returncode == 0
    sv.wait(lambda: len(notices()) == 2, 20, "the second give-up's notice")
    second = notices()[1]
    assert second["argv"] == ["notify", "atom-worker-default-crash@1"]
    assert second["entry"]["failed_at"] > first["failed_at"]
    assert len(sv.policy_lines("gave up: `")) == 2


def test_a_notice_command_that_hangs_never_holds_up_the_listener(supervisord, tmp_path):
    script, notices = recorder(tmp_path, supervisord.state_file, hang=True)
    sv = supervisord.start(make_units(supervisord.root, [CRASH, CRASH2]), supervisor={"notify_command": str(script)})
    try:
        # Both give up and both notices run, although the first command never ends: the listener waits for
        # neither.
        sv.wait(lambda: len(notices()) == 2, 30, "both notices")
        assert sorted(n["argv"][1] for n in notices()) == ["atom-worker-default-crash@1",
                                                           "atom-worker-default-crashtoo@1"]
        for notice in notices():
            os.kill(notice["pid"], 0)  # still running
        assert sv.statename("atom-worker-policy:atom-worker-policy") == "RUNNING"
        # And it still does its job: a reset process is started and given up again.
        assert sv.policy("reset", "--start", ns("crash")).returncode == 0
        sv.wait(lambda: len(notices()) == 3, 20, "the next give-up's notice")
    finally:
        for notice in notices():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(notice["pid"], signal.SIGKILL)  # its own session (the listener starts it so)


def test_without_the_notice_command_the_listener_says_so(supervisord):
    sv = supervisord.start(make_units(supervisord.root, [CRASH]),
                           supervisor={"notify_command": "/nonexistent/atom-workerctl"})
    sv.wait(lambda: sv.policy_lines("no notice could be sent"), 20, "the listener's line")
    (line,) = sv.policy_lines("no notice could be sent")
    assert "atom-worker-default-crash@1: gave up" in line and "/nonexistent/atom-workerctl is missing" in line
    assert sv.entry(ns("crash"))["failed"] is True


# -- end to end: the stand-in, gearmand, the real `atom-workerctl notify` and its printed fix ----------------------
def cli_wrapper(path, config):
    """`atom-workerctl` as installed: this checkout's CLI on a sites.json of this test."""
    path.write_text(f"#!/bin/sh\nPYTHONPATH={REPO / 'tools'} NO_COLOR=1 exec {sys.executable} -m atom_workerctl "
                    f"--config {config} \"$@\"\n")
    path.chmod(0o755)
    return path


def test_the_real_notice_end_to_end_and_its_fix(tmp_path):
    for tool in ("php", "gearmand", supervisor_harness.SUPERVISORD):
        assert shutil.which(tool), f"missing {tool}: apt-get install supervisor php-cli php-gearman gearman-job-server"
    sockdir = Path(tempfile.mkdtemp(prefix="sv-"))
    gearmand = Gearmand().start()
    sv = supervisor_harness.Supervisord(tmp_path, sockdir)
    receiver = Receiver()
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog.bind(str(tmp_path / "log.sock"))
    syslog.settimeout(30)
    try:
        root = make_root(tmp_path / "standin", servers=[gearmand.server])
        server = f"{gearmand.server[0]}:{gearmand.server[1]}"
        sites = [{"name": "default", "root": str(root), "gearman_servers": [server],
                  "pools": [{"name": "default", "instances": 1}]}]
        units = make_units(root, [], php=shutil.which("php"), sites=sites)
        config = tmp_path / "etc" / "sites.json"
        config.parent.mkdir()
        write_sites_json(config, sv, sites, units, root)
        sendmail = tmp_path / "bin" / "sendmail"
        sendmail.parent.mkdir()
        shutil.copy(REPO / "tests" / "fake_sendmail.py", sendmail)
        (config.parent / "notify.json").write_text(json.dumps({
            "schema": 1, "channels": ["log", "mail", "webhook"],
            "mail": {"to": ["ops@example.org"], "from": "", "sendmail": str(sendmail)},
            "webhook": {"url": receiver.url + "/hook/s3cret", "timeout": 10},
            "state_dir": str(tmp_path / "notified"), "syslog_socket": str(tmp_path / "log.sock")}))
        cli = cli_wrapper(tmp_path / "bin" / "atom-workerctl", config)

        def mails():
            path = Path(f"{sendmail}.jsonl")
            return path.read_text().splitlines() if path.exists() else []

        def sent():
            return sv.policy_lines("notice sent by log, mail, webhook")

        write_control(root, crash_at_start=1)
        sv.start(units, supervisor={"notify_command": str(cli)})
        sv.wait(sent, 60, "the notice")
        assert len(receiver.posts) == 1 and len(mails()) == 1
        notice = json.loads(receiver.posts[0]["body"])
        assert (notice["host"], notice["instance"], notice["manager"]) == (socket.gethostname(), "atom-worker@1",
                                                                           "supervisor")
        assert notice["result"] == "start-limit-hit" and notice["n_restarts"] == BURST - 1
        assert notice["fix"] == "atom-workerctl reset atom-worker@1"
        assert any("start-limit-hit" in line for line in notice["journal"]), notice["journal"]
        assert "atom-workerctl reset atom-worker@1" in json.loads(mails()[0])["message"]
        assert syslog.recv(65536).startswith(b"<26>atom-workerctl[")

        # The printed fix, once the cause is gone, brings the worker back, registered with gearmand.
        clear_control(root)
        fix = subprocess.run([str(cli), *notice["fix"].split()[1:]], capture_output=True, text=True, timeout=90,
                             check=False)
        assert fix.returncode == 0, fix.stdout + fix.stderr
        status = json.loads(subprocess.run([str(cli), "status", "--json"], capture_output=True, text=True,
                                           timeout=30, check=True).stdout)
        (unit,) = [u for s in status["sites"] for p in s["pools"] for u in p["units"]]
        assert (unit["active_state"], unit["gearman"]["registered"]) == ("active", True)
        assert len(receiver.posts) == 1  # a reset is no give-up

        # A second give-up after the reset: a second notice, and only one.
        write_control(root, crash_at_start=1)
        restart = subprocess.run([str(cli), "restart", "atom-worker@1", "--no-wait"], capture_output=True,
                                 text=True, timeout=60, check=False)
        assert restart.returncode == 0, restart.stdout + restart.stderr
        sv.wait(lambda: len(sent()) == 2, 60, "the second notice")
        assert len(receiver.posts) == 2 and len(mails()) == 2
        assert json.loads(receiver.posts[1]["body"])["since"] >= notice["since"]
    finally:
        sv.stop()
        gearmand.stop()
        receiver.close()
        syslog.close()
        shutil.rmtree(sockdir, ignore_errors=True)
