"""testinfra checks of the circus scenario (molecule verify): the workers as circus watchers, for real. What the
supervisor scenario checks alike is in tests/manager_tests.py (pytest.ini puts tests/ on the path)."""

import hashlib
import json

import pytest
from manager_tests import assert_no_worker_is_a_systemd_unit, assert_runs_as_the_unit, job_round_trip

VENV = "/opt/atom-worker-circus"
CIRCUSCTL = f"{VENV}/bin/circusctl --endpoint ipc:///run/atom-worker/circus.sock --timeout 30"
POLICY = "/usr/local/lib/atom-worker/atom-worker-policy"
STATE = "/run/atom-worker/circus-policy.json"
WATCHERS = ["atom-worker@1", "atom-worker@2"]


def circusctl(host, *args):
    return json.loads(host.check_output(f"{CIRCUSCTL} --json " + " ".join(args)))


def logs(host):
    """What to print when a check fails: circusd's journal and the policy's log."""
    return host.run(
        f"{CIRCUSCTL} status; journalctl -u atom-worker-circus -n 30 --no-pager; "
        "tail -n 20 /var/log/atom-worker/atom-worker-policy.log; tail -n 20 /var/log/atom-worker/atom-worker@1.log"
    ).stdout


def test_circusd_runs_as_a_service_and_starts_at_boot(host):
    service = host.service("atom-worker-circus")
    assert service.is_running and service.is_enabled
    unit = host.file("/etc/systemd/system/atom-worker-circus.service").content_string
    assert f"ExecStart={VENV}/bin/circusd /etc/atom-worker/circus.ini" in unit and "KillMode=mixed" in unit


def test_circus_is_the_pinned_version_in_its_venv(host):
    out = host.check_output(f"{VENV}/bin/python -c 'import circus, zmq, tornado, psutil; "
                            "print(circus.__version__, zmq.__version__, tornado.version, psutil.__version__)'")
    assert out.split() == ["0.19.0", "26.4.0", "6.6.1", "7.2.2"]


def test_one_watcher_per_instance_running_the_unit_command(host):
    statuses = circusctl(host, "status")["statuses"]
    assert statuses == dict.fromkeys(WATCHERS, "active"), logs(host)
    for name in WATCHERS:
        [pid] = circusctl(host, "list", name)["pids"]
        assert_runs_as_the_unit(host, pid)


def test_no_worker_is_a_systemd_unit(host):
    assert_no_worker_is_a_systemd_unit(host, "atom-worker@*")


@pytest.mark.parametrize(("path", "mode"), [
    ("/etc/atom-worker/circus.ini", 0o644),
    ("/etc/systemd/system/atom-worker-circus.service", 0o644),
    ("/usr/local/lib/atom-worker/atom-worker-policy", 0o755),
    ("/usr/local/lib/atom-worker/atom_worker_circus.py", 0o644),
    ("/usr/local/lib/atom-worker/atom-worker-recycle", 0o755),
    ("/var/log/atom-worker", 0o750),
])
def test_files_owners_and_modes(host, path, mode):
    f = host.file(path)
    assert f.exists and (f.user, f.group, f.mode) == ("root", "root", mode)


def test_the_hooks_are_loaded_and_count_the_starts(host):
    # circusd found atom_worker_circus through the .pth file: its state file names circusd's pid.
    state = json.loads(host.file(STATE).content_string)
    circusd = host.check_output("systemctl show -p MainPID --value atom-worker-circus").strip()
    assert str(state["listener"]["pid"]) == circusd, state.get("listener")
    for name in WATCHERS:
        entry = state["processes"][f"atom-workers:{name}"]
        assert not entry["failed"] and 1 <= len(entry["starts"]) <= 3, entry
    options = circusctl(host, "options", WATCHERS[0])["options"]
    assert options["respawn"] is False and options["singleton"] is True and options["numprocesses"] == 1


def test_sites_json_says_circus(host):
    state = json.loads(host.file("/etc/atom-worker/sites.json").content_string)
    assert state["manager"] == "circus"
    assert state["circus"] == {"endpoint": "ipc:///run/atom-worker/circus.sock",
                               "config": "/etc/atom-worker/circus.ini", "state_file": STATE,
                               "log_dir": "/var/log/atom-worker", "service": "atom-worker-circus.service", "venv": VENV}
    site = state["sites"][0]
    assert site["prefix"] == hashlib.md5(site["realpath"].encode()).hexdigest()
    assert site["pools"][0]["units"] == ["atom-worker@1.service", "atom-worker@2.service"]


def test_a_job_round_trip(host):
    job_round_trip(host, logs)
