"""The notice when a worker gives up (issue 16 §3), on real systemd: the role's OnFailure= unit runs
`atom-workerctl notify`, which sends one notice per give-up by mail (a sendmail stand-in on the worker host
that records what it is given), by webhook (a small HTTP server on another lab host) and as a log line at
priority crit; never for a deliberate stop or recycling.

- A crash loop stopped by the start limit: exactly one POST and one mail, naming the host, the instance,
  its journal lines and `atom-workerctl reset INSTANCE`, and one crit line in the journal. The same failure
  notified again sends nothing. The printed fix, run as printed once the cause is gone, brings the worker
  back active and registered.
- A clean `systemctl stop`, a stop while a crashed worker waits for its restart, a stop that ends uncleanly
  (the unit ends `failed` and OnFailure= does run the notice, which must see a deliberate stop) and a pool
  recycling its worker send nothing; then a give-up right after, to the same receivers, sends exactly one
  (the positive control, and a second give-up of the same instance after its reset: a second notice).
- Without atom-workerctl on the host, the notice's unit logs one crit line saying no notice could be sent.
- Bad notice settings fail the converge with one line before anything changes; a second converge changes
  nothing; notices off leave the worker unit without OnFailure= and the listener without its command.
- On a supervisord host the restart-policy listener sends the notice once when it gives up, and the printed
  fix brings the worker back.

Run inside the lab network, after `make wheel` (the role installs the CLI from build/wheel):
tools/lab/lab exec -- .venv/bin/pytest tests/roles/test_notify_lab.py
The tests share the hosts and run in file order.
"""

import email
import email.policy
import json
import shlex

import prom_text
import pytest
from labhosts import REPO

pytestmark = pytest.mark.timeout(900)

P = "nt-"
GM, W1, SV = f"{P}gm", f"{P}w1", f"{P}sv"
INVENTORY = {
    "all": {
        "children": {
            "gearman_job_servers": {"hosts": {GM: {"gearman_job_server_listen_address": "{{ ansible_host }}"}}},
            # SV runs its workers under supervisord: the policy listener runs the notice there. A workers_key of
            # its own: its workers never take W1's jobs (the recycling test counts them on W1).
            "atom_workers": {"hosts": {W1: None, SV: {"atom_worker_manager": "supervisor",
                                                      "atom_worker_workers_key": "sv"}}},
            "atom_standin": {"children": {"atom_workers": None}},
        }
    }
}
SENDMAIL = "/var/tmp/fake-sendmail/sendmail"  # records each mail in SENDMAIL.jsonl (tests/fake_sendmail.py)
RECEIVER = "/var/tmp/notify_receiver.py"
POSTS = "/var/tmp/notify-posts.jsonl"
PORT = 8099
U1, U2 = "atom-worker@1.service", "atom-worker@2.service"
LISTENER_CONF = "/etc/supervisor/conf.d/atom-worker-policy.conf"


def notice_unit(unit):
    return f"atom-notify@{unit.removesuffix('.service')}.service"


def put(lab, host, path, text, mode="0644"):
    """Write a file on a lab host (a here-document: `lab run` has no stdin)."""
    assert "\nEOF\n" not in text
    lab.run(host, f"mkdir -p {shlex.quote(path.rsplit('/', 1)[0])} && cat > {path} <<'EOF'\n{text}\nEOF\n"
                  f"chmod {mode} {path}")


@pytest.fixture(scope="module")
def lab(make_lab):
    lab = make_lab(INVENTORY)
    # Every converge of this module: the CLI installed (the role tests leave it out), two instances (one
    # the control of the other), RestartSec=2 so that a crash loop reaches the start limit in seconds, and
    # every channel, to receivers in the lab.
    lab.vars = {
        "atom_workerctl_enabled": True,
        "atom_worker_instances": 2,
        "atom_worker_restart_sec": 2,
        "atom_worker_notify": ["log", "mail", "webhook"],
        "atom_worker_notify_mail_to": ["ops@example.org"],
        "atom_worker_notify_mail_from": "atom@nt-w1.example.org",
        "atom_worker_notify_sendmail": SENDMAIL,
        "atom_worker_notify_webhook_url": f"http://{lab.address(GM)}:{PORT}/hook?token=s3cret",
        "atom_worker_notify_webhook_timeout": 5,
    }
    put(lab, GM, RECEIVER, (REPO / "tests" / "notify_receiver.py").read_text())
    lab.run(GM, f"systemd-run --unit=nt-receiver python3 {RECEIVER} {PORT} {POSTS}")
    for host in (W1, SV):
        put(lab, host, SENDMAIL, (REPO / "tests" / "fake_sendmail.py").read_text(), mode="0755")
    lab.converge(lab.vars)
    return lab


# -- what the receivers got ---------------------------------------------------------------------------------------
def posts(lab, host=W1):
    """The POSTs the receiver got about `host`'s workers."""
    out = lab.run(GM, f"cat {POSTS} 2>/dev/null || true").stdout
    return [p for p in map(json.loads, out.splitlines()) if json.loads(p["body"])["host"] == host]


def mails(lab, host=W1):
    out = lab.run(host, f"cat {SENDMAIL}.jsonl 2>/dev/null || true").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def crit_lines(lab, host=W1):
    """The journal's lines at priority crit or worse from atom-workerctl, as journald stored them."""
    out = lab.run(host, "journalctl -p crit -o json --no-pager SYSLOG_IDENTIFIER=atom-workerctl").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def counts(lab, host=W1):
    return len(posts(lab, host)), len(mails(lab, host)), len(crit_lines(lab, host))


def invocation(lab, unit):
    return lab.show(W1, unit, "InvocationID")["InvocationID"]


def wait_notice_run(lab, unit, before):
    """The notice's unit of `unit` ran once more since the invocation `before`, and is done."""
    lab.wait_for(lambda: (invocation(lab, notice_unit(unit)) != before
                          and lab.show(W1, notice_unit(unit), "ActiveState")["ActiveState"] in ("inactive", "failed")),
                 timeout=60, what=f"{notice_unit(unit)} to run")
    return lab.run(W1, f"journalctl --no-pager -o cat -u {notice_unit(unit)}").stdout


def give_up(lab, unit):
    """`unit` crash-loops until systemd gives up (the stand-in crashing at every start, after a deliberate
    restart: reset-failed first, as the roles and the CLI do); returns the notice unit's journal once it ran.
    The stand-in starts normally again afterwards (the unit stays failed)."""
    before = invocation(lab, notice_unit(unit))
    lab.control(W1, crash_at_start=1)
    try:
        lab.run(W1, f"systemctl reset-failed {unit}; systemctl restart {unit}")
        lab.wait_for(lambda: lab.show(W1, unit, "ActiveState")["ActiveState"] == "failed", timeout=60,
                     what=f"{unit} to give up")
        return wait_notice_run(lab, unit, before)
    finally:
        lab.control(W1)


def registered(lab, instance, host=W1):
    data = json.loads(lab.run(host, f"atom-workerctl status --json {instance}", check=False).stdout)
    (unit,) = [u for s in data["sites"] for p in s["pools"] for u in p["units"]]
    return unit["active_state"] == "active" and unit["gearman"]["registered"] is True


# -- the tests ------------------------------------------------------------------------------------------------------
def gave_up_per_status_and_metrics(lab, instance):
    """(status --json's start_limit.hit, metrics' atom_worker_instance_start_limit_hit) of an instance."""
    status = json.loads(lab.run(W1, f"atom-workerctl status --json {instance}", check=False).stdout)
    (unit,) = [u for s in status["sites"] for p in s["pools"] for u in p["units"]]
    metrics = lab.run(W1, "atom-workerctl metrics --jobs no").stdout
    return unit["start_limit"]["hit"], prom_text.value(metrics, "atom_worker_instance_start_limit_hit",
                                                        worker=instance)


def test_a_give_up_sends_one_notice_per_channel_and_its_fix_brings_the_worker_back(lab):
    assert counts(lab) == (0, 0, 0)
    journal = give_up(lab, U1)
    assert "notice sent by log, mail, webhook" in journal, journal

    (post,) = posts(lab)
    assert post["path"] == "/hook?token=s3cret" and post["content_type"] == "application/json"
    notice = json.loads(post["body"])
    assert (notice["host"], notice["instance"], notice["unit"]) == (W1, "atom-worker@1", U1)
    assert (notice["site"], notice["pool"], notice["manager"]) == ("default", "default", "systemd")
    assert (notice["active_state"], notice["n_restarts"], notice["start_limit_burst"]) == ("failed", 3, 3)
    assert any("Start request repeated too quickly" in line for line in notice["journal"]), notice["journal"]
    assert notice["fix"] == "atom-workerctl reset atom-worker@1"

    (mail,) = mails(lab)
    assert mail["argv"] == ["-t", "-oi"]
    message = email.message_from_string(mail["message"], policy=email.policy.default)
    assert (message["To"], message["From"]) == ("ops@example.org", "atom@nt-w1.example.org")
    assert message["Subject"] == f"AtoM worker atom-worker@1 on {W1} gave up (start limit hit)"
    body = message.get_content()
    for part in (f"host:      {W1}", "instance:  atom-worker@1", "Start request repeated too quickly",
                 "\n  atom-workerctl reset atom-worker@1\n"):
        assert part in body, body

    (crit,) = crit_lines(lab)
    assert crit["PRIORITY"] == "2" and crit["SYSLOG_FACILITY"] == "3"
    assert f"AtoM worker atom-worker@1 on {W1} gave up" in crit["MESSAGE"]
    assert "atom-workerctl reset atom-worker@1" in crit["MESSAGE"]
    # The sibling, the control, is untouched.
    assert lab.show(W1, U2, "ActiveState")["ActiveState"] == "active"
    # status and metrics call it a give-up too (the control of the deliberate stop below).
    assert gave_up_per_status_and_metrics(lab, "atom-worker@1") == (True, 1.0)

    # The same failure notified again (OnFailure= run a second time, or by hand): nothing more.
    again = lab.run(W1, f"systemctl start {notice_unit(U1)}; journalctl --no-pager -o cat -u {notice_unit(U1)}")
    assert "had its notice already; nothing sent" in again.stdout, again.stdout
    assert counts(lab) == (1, 1, 1)

    # The printed fix, run as printed once the cause is gone (the stand-in no longer crashes).
    fix = lab.run(W1, notice["fix"], check=False, timeout=180)
    assert fix.returncode == 0, fix.stdout + fix.stderr
    assert registered(lab, "atom-worker@1")
    assert counts(lab) == (1, 1, 1)  # a reset is no give-up


def test_deliberate_stops_and_recycling_send_nothing_but_the_next_give_up_does(lab):
    first = json.loads(posts(lab)[0]["body"])
    before = counts(lab)

    # A clean stop: the worker exits 0 on SIGTERM, nothing fails.
    lab.run(W1, f"systemctl stop {U2}")
    assert lab.show(W1, U2, "ActiveState")["ActiveState"] == "inactive"

    # A stop while a crashed worker waits for its restart: systemd 252 leaves it inactive, OnFailure= does
    # not run at all.
    lab.run(W1, f"systemctl reset-failed {U2}; systemctl start {U2}")
    ran = invocation(lab, notice_unit(U2))
    # (One shell on the host: the RestartSec=2 wait is the window, a round trip per step could miss it.)
    lab.run(W1, f"systemctl kill -s KILL --kill-whom=main {U2} && timeout 20 sh -c 'until [ "
                f"\"$(systemctl show -p SubState --value {U2})\" = auto-restart ]; do sleep 0.05; done' && "
                f"systemctl stop {U2}")
    assert lab.show(W1, U2, "ActiveState", "Result") == {"ActiveState": "inactive", "Result": "signal"}
    assert invocation(lab, notice_unit(U2)) == ran

    # A stop that ends uncleanly: systemd leaves the unit failed and runs OnFailure=, and only the
    # journal's last job line (a stop) tells it from a give-up (start_limit() alone would call it one).
    # The stop signal's default action kills the worker while it boots (the stand-in's start_delay: AtoM
    # sets its signal handlers once it runs), as a worker dying badly on stop would: SIGQUIT, one of the
    # role's allowed KillSignal= values, for this instance alone (a runtime drop-in).
    dropin = f"/run/systemd/system/{U2}.d/nt-kill.conf"
    put(lab, W1, dropin, "[Service]\nKillSignal=SIGQUIT")
    lab.run(W1, "systemctl daemon-reload")
    ran = invocation(lab, notice_unit(U2))
    lab.control(W1, start_delay=30)
    try:
        lab.run(W1, f"systemctl reset-failed {U2}; systemctl start {U2}")
        lab.wait_for(lambda: lab.show(W1, U2, "MainPID")["MainPID"] != "0", timeout=30, what=f"{U2} to run")
        lab.run(W1, f"systemctl stop {U2}")
    finally:
        lab.control(W1)
        lab.run(W1, f"rm -rf /run/systemd/system/{U2}.d && systemctl daemon-reload")
    journal = wait_notice_run(lab, U2, ran)
    assert "atom-worker@2 did not give up: it was stopped on purpose" in journal, journal
    assert lab.show(W1, U2, "ActiveState", "Result") == {"ActiveState": "failed", "Result": "signal"}
    # Nor do status and metrics (AtomWorkerGaveUp would page someone with the wrong fix).
    assert gave_up_per_status_and_metrics(lab, "atom-worker@2") == (False, 0.0)

    # Recycling: a pool whose worker exits 111 after every job (the role stops atom-worker@1..2 meanwhile:
    # deliberate stops too).
    recycle = "atom-worker-default-recycle@1.service"
    lab.converge({**lab.vars, "atom_worker_instances": 0,
                  "atom_worker_pools": [{"name": "recycle", "instances": 1, "types": ["general"], "max_job_count": 1}]},
                 "--limit", W1)
    mark = len(lab.record(W1))
    ids = lab.submit(W1, "arFindingAidJob", 4)
    lab.wait_for(lambda: set(ids) <= {e["id"] for e in lab.events(W1, "job", mark) if e["status"] == "completed"},
                 timeout=60, what="4 jobs through the recycling worker")
    assert len([e for e in lab.events(W1, "exit", mark) if e["code"] == 111]) >= 3
    assert lab.show(W1, recycle, "ActiveState", "NRestarts") == {"ActiveState": "active", "NRestarts": "0"}
    assert invocation(lab, notice_unit(recycle)) == ""  # its notice never even ran
    lab.converge(lab.vars)
    assert counts(lab) == before

    # The positive control: the same receivers get a give-up right after, once. It is also atom-worker@1's
    # second give-up since its reset: a notice of its own.
    journal = give_up(lab, U1)
    assert journal.count("notice sent by log, mail, webhook") == 2, journal
    assert counts(lab) == (before[0] + 1, before[1] + 1, before[2] + 1)
    second = json.loads(posts(lab)[-1]["body"])
    assert second["instance"] == "atom-worker@1" and second["since"] > first["since"]
    fix = lab.run(W1, second["fix"], check=False, timeout=180)
    assert fix.returncode == 0, fix.stdout + fix.stderr


def test_without_atom_workerctl_the_notice_unit_says_no_notice_was_sent(lab):
    cli = lab.run(W1, "command -v atom-workerctl").stdout.strip()
    lab.run(W1, f"mv {cli} {cli}.away")
    try:
        failed = lab.run(W1, f"systemctl start {notice_unit(U1)}", check=False)
        assert failed.returncode != 0
        out = lab.run(W1, f"journalctl -p crit -o json --no-pager _SYSTEMD_UNIT={notice_unit(U1)}").stdout
        # (The unit's earlier crit lines are the notices it sent by the log channel.)
        (line,) = [entry for entry in map(json.loads, out.splitlines()) if "no notice" in entry["MESSAGE"]]
        assert line["PRIORITY"] == "2"
        assert f"AtoM worker atom-worker@1 failed on {W1} and no notice could be sent: {cli} is missing" \
               in line["MESSAGE"]
    finally:
        lab.run(W1, f"mv {cli}.away {cli}")


@pytest.mark.parametrize("bad, says", [
    ({"atom_worker_notify": ["log", "mail"], "atom_worker_notify_mail_to": []},
     "atom_worker_notify has mail: atom_worker_notify_mail_to must name at least one address"),
    ({"atom_worker_notify": ["webhook"], "atom_worker_notify_webhook_url": "ftp://hooks.example.org/t0ken"},
     "atom_worker_notify_webhook_url: must be an http:// or https:// URL"),
    ({"atom_worker_notify": ["log", "sms"]},
     "value of atom_worker_notify must be one or more of: log, mail, webhook. Got no match for: sms"),
    ({"atom_worker_notify_mail_to": ["ops@example.org", "Ops <ops@example.org>"]},
     "atom_worker_notify_mail_to[1]='Ops <ops@example.org>': must be a plain mail address"),
])
def test_bad_notice_settings_fail_before_anything_changes(lab, bad, says):
    unit_file = lab.run(W1, "sha256sum /etc/systemd/system/atom-worker@.service /etc/atom-worker/notify.json").stdout
    result = lab.converge({**lab.vars, **bad}, check=False)
    assert result.returncode != 0, result
    assert says in result.stdout, result
    # The webhook URL may hold a token: never in the output (the module's URL has one, and the bad one too).
    assert "t0ken" not in result.stdout + result.stderr and "s3cret" not in result.stdout + result.stderr
    assert result.recap[W1]["changed"] == 0 and result.recap[W1]["failed"] == 1, result
    assert lab.run(W1, "sha256sum /etc/systemd/system/atom-worker@.service /etc/atom-worker/notify.json").stdout \
        == unit_file


def test_a_second_converge_changes_nothing_and_notices_off_drop_on_failure(lab):
    again = lab.converge(lab.vars)
    assert again.changed() == 0, again
    assert "s3cret" not in again.stdout + again.stderr
    assert lab.run(W1, "stat -c '%a %U %G' /etc/atom-worker/notify.json").stdout.split() == ["600", "root", "root"]
    settings = json.loads(lab.run(W1, "cat /etc/atom-worker/notify.json").stdout)
    assert settings["channels"] == ["log", "mail", "webhook"] and settings["webhook"]["timeout"] == 5
    assert "OnFailure=atom-notify@%N.service" in lab.run(W1, "cat /etc/systemd/system/atom-worker@.service").stdout

    off = lab.converge({**lab.vars, "atom_worker_notify": []})
    assert "OnFailure" not in lab.run(W1, "cat /etc/systemd/system/atom-worker@.service").stdout, off
    assert lab.show(W1, U1, "OnFailure")["OnFailure"] == ""
    assert json.loads(lab.run(W1, "cat /etc/atom-worker/notify.json").stdout)["channels"] == []
    assert "--notify-command" not in lab.run(SV, f"cat {LISTENER_CONF}").stdout
    lab.converge(lab.vars)
    assert lab.show(W1, U1, "OnFailure")["OnFailure"] == notice_unit(U1)
    assert "--notify-command /usr/local/bin/atom-workerctl" in lab.run(SV, f"cat {LISTENER_CONF}").stdout


def test_a_give_up_under_supervisord_sends_its_notice_once_and_its_fix_works(lab):
    assert counts(lab, SV) == (0, 0, 0)
    lab.control(SV, crash_at_start=1)
    try:
        # A deliberate restart (the CLI resets the budget first), then the crash loop to the limit.
        lab.run(SV, "atom-workerctl restart atom-worker@1 --no-wait")
        lab.wait_for(lambda: counts(lab, SV) == (1, 1, 1), timeout=90, what="the notice from the listener")
    finally:
        lab.control(SV)
    notice = json.loads(posts(lab, SV)[0]["body"])
    assert (notice["instance"], notice["manager"], notice["result"]) == ("atom-worker@1", "supervisor",
                                                                         "start-limit-hit")
    assert any("start-limit-hit" in line for line in notice["journal"]), notice["journal"]
    assert notice["fix"] == "atom-workerctl reset atom-worker@1"
    assert crit_lines(lab, SV)[0]["PRIORITY"] == "2"
    fix = lab.run(SV, notice["fix"], check=False, timeout=180)
    assert fix.returncode == 0, fix.stdout + fix.stderr
    assert registered(lab, "atom-worker@1", SV)
    # Exactly one: the listener's log says the command ran once and sent once.
    log = lab.run(SV, "cat /var/log/atom-worker/atom-worker-policy.log").stdout
    assert log.count("atom-worker@1: gave up: `") == 1 and log.count("notice sent by log, mail, webhook") == 1
    assert counts(lab, SV) == (1, 1, 1)
