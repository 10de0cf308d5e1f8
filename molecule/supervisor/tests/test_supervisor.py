"""testinfra checks of the supervisor scenario (molecule verify): the workers under supervisord, for real. What
the circus scenario checks alike is in tests/manager_tests.py (pytest.ini puts tests/ on the path)."""

import hashlib
import json

import pytest
from manager_tests import assert_no_worker_is_a_systemd_unit, assert_runs_as_the_unit, job_round_trip

WORKERS = ["atom-workers:atom-worker@1", "atom-workers:atom-worker@2"]
LISTENER = "atom-worker-policy"


def status(host):
    """{"group:name": (state, pid or None)} from supervisorctl."""
    out = host.run("supervisorctl -s unix:///run/supervisor.sock status").stdout
    procs = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            pid = int(parts[3].rstrip(",")) if len(parts) >= 4 and parts[2] == "pid" else None
            procs[parts[0]] = (parts[1], pid)
    return procs


def logs(host):
    """What to print when a check fails: supervisord's view and the listener's log."""
    return host.run(
        "supervisorctl -s unix:///run/supervisor.sock status; tail -n 20 /var/log/atom-worker/atom-worker-policy.log; "
        "tail -n 20 /var/log/atom-worker/atom-worker@1.log"
    ).stdout


def test_supervisord_runs_and_starts_at_boot(host):
    service = host.service("supervisor")
    assert service.is_running and service.is_enabled


def test_the_workers_and_the_listener_run_under_supervisord(host):
    procs = status(host)
    assert {name for name, (state, _) in procs.items() if state == "RUNNING"} == {*WORKERS, LISTENER}, logs(host)
    for name in WORKERS:
        pid = procs[name][1]
        assert_runs_as_the_unit(host, pid)


def test_no_worker_is_a_systemd_unit(host):
    assert_no_worker_is_a_systemd_unit(host, "atom-worker*")


@pytest.mark.parametrize(("path", "mode"), [
    ("/etc/supervisor/conf.d/atom-worker.conf", 0o644),
    ("/etc/supervisor/conf.d/atom-worker-policy.conf", 0o644),
    ("/usr/local/lib/atom-worker/atom-worker-policy", 0o755),
    ("/usr/local/lib/atom-worker/atom-worker-recycle", 0o755),
    ("/var/log/atom-worker", 0o750),
])
def test_files_owners_and_modes(host, path, mode):
    f = host.file(path)
    assert f.exists and (f.user, f.group, f.mode) == ("root", "root", mode)


def test_the_policy_of_the_systemd_unit_is_in_force(host):
    conf = host.file("/etc/supervisor/conf.d/atom-worker-policy.conf").content_string
    assert "--restart on-failure --restart-sec 30 --start-limit-interval-sec 24h --start-limit-burst 3" in conf
    state = json.loads(host.check_output("/usr/local/lib/atom-worker/atom-worker-policy status --json"))
    assert state["policy"] == {"restart": "on-failure", "restart_sec": 30.0, "start_limit_interval_sec": 86400.0,
                               "start_limit_burst": 3}
    for name in WORKERS:
        entry = state["processes"][name]
        assert not entry["failed"] and 1 <= len(entry["starts"]) <= 3, entry


def test_sites_json_says_supervisor(host):
    state = json.loads(host.file("/etc/atom-worker/sites.json").content_string)
    assert state["manager"] == "supervisor"
    assert state["supervisor"]["server_url"] == "unix:///run/supervisor.sock"
    assert state["supervisor"]["conf_file"] == "/etc/supervisor/conf.d/atom-worker.conf"
    site = state["sites"][0]
    assert site["prefix"] == hashlib.md5(site["realpath"].encode()).hexdigest()
    assert site["pools"][0]["units"] == ["atom-worker@1.service", "atom-worker@2.service"]


def test_a_job_round_trip(host):
    job_round_trip(host, logs)
