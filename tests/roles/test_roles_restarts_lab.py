"""The roles' restarts on real systemd: configuration changes, scaling, recycling, the crash loop and a
spent start budget, on a job server and a worker host with the AtoM stand-in.

A module of its own (not part of test_roles_lab.py) so that two test workers can run it beside the other
role tests: each module boots its own hosts. Run inside the lab network:
tools/lab/lab exec -- .venv/bin/pytest tests/roles/test_roles_restarts_lab.py
The tests share the hosts and run in file order; each one leaves the hosts converged to the defaults.
"""

import contextlib
import hashlib
import json

import pytest
from gearman_sampler import parse_status
from labhosts import ATOM_ROOT, build_project_wheel

pytestmark = pytest.mark.timeout(900)

GM, W1 = "rs-gm", "rs-w1"
INVENTORY = {
    "all": {
        "children": {
            "gearman_job_servers": {
                "hosts": {
                    GM: {"gearman_job_server_listen_address": "{{ ansible_host }}"}
                }
            },
            "atom_workers": {"hosts": {W1: None}},
            "atom_standin": {"children": {"atom_workers": None}},
        }
    }
}


@pytest.fixture(scope="module")
def lab(make_lab):
    lab = make_lab(INVENTORY)
    lab.converge()
    return lab


def test_config_change_clears_cache_once_then_restarts_once(lab):
    lab.converge({"atom_worker_instances": 2})
    mark = len(lab.record(W1))
    pids = {
        u: lab.show(W1, u, "MainPID")["MainPID"]
        for u in ("atom-worker@1.service", "atom-worker@2.service")
    }
    lab.converge({"atom_worker_instances": 2, "atom_worker_workers_key": "site-a"})
    new = lab.record(W1)[mark:]
    kinds = [e["event"] for e in new if e["event"] in ("cc", "start")]
    assert kinds == ["cc", "start", "start"], new
    for unit, pid in pids.items():
        assert lab.show(W1, unit, "MainPID")["MainPID"] != pid
    assert (
        "workers_key: 'site-a'" in lab.run(W1, f"cat {ATOM_ROOT}/config/app.yml").stdout
    )
    key_prefix = hashlib.md5(f"{ATOM_ROOT}site-a".encode()).hexdigest()
    assert key_prefix in lab.run(W1, "cat /etc/atom-worker/sites.json").stdout
    again = lab.converge(
        {"atom_worker_instances": 2, "atom_worker_workers_key": "site-a"}
    )
    assert again.changed() == 0, again
    assert [
        e for e in lab.record(W1)[mark + len(new) :] if e["event"] in ("cc", "start")
    ] == []
    lab.converge()


@pytest.fixture(scope="module")
def workerctl(lab, tmp_path_factory):
    """atom-workerctl of this checkout on W1 (the module's converges leave it out: atom_workerctl_enabled is
    false in the lab tests' playbook runs, which then skip the role and leave this install as it is)."""
    wheel = build_project_wheel(tmp_path_factory.mktemp("rs-wheel"))
    result = lab.hosts.playbook("tests/cli/install.yml", "--limit", W1, extra_vars={"workerctl_wheel": str(wheel)})
    assert result.returncode == 0, result
    return lab


def pending_findings(lab):
    """(exit code, the apply_pending findings) of `atom-workerctl doctor --json` on W1, as an operator runs it."""
    proc = lab.run(W1, "atom-workerctl doctor --json", check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    data = json.loads(proc.stdout)
    return proc.returncode, [f for f in data["findings"] if f["code"] == "apply_pending"]


def test_what_a_failed_apply_owed_is_done_by_the_next_converge(lab, workerctl):
    """A converge that rewrote the configuration but failed before its handlers were done (here the cache
    clear: a cache file the site's user cannot remove, as after a `php symfony cc` run as root) leaves the
    workers on the old key, where AtoM's jobs find no worker. The next converge has no file left to write:
    it still clears the cache and restarts them (what the first apply noted it owed before its handlers), and
    the one after changes nothing. In between, `atom-workerctl doctor` names the unfinished converge and what
    it owes (the note), and its printed fix, site.yml again, makes that finding go."""
    key = {"atom_worker_workers_key": "site-c"}
    new_function = hashlib.md5(f"{ATOM_ROOT}site-c".encode()).hexdigest() + "-arFindingAidJob"
    pending = "/etc/atom-worker/apply-pending.json"
    pids = lab.hosts.main_pids(W1)
    assert pids and all(pid != "0" for pid in pids.values()), pids
    stuck = f"{ATOM_ROOT}/cache/qubit/stuck"
    try:
        lab.run(W1, f"mkdir -p {stuck} && touch {stuck}/file")  # root's: the site's user cannot remove it
        failed = lab.converge(key, check=False)
        assert failed.returncode != 0 and "Unable to remove" in failed.stdout, failed
        assert "workers_key: 'site-c'" in lab.run(W1, f"cat {ATOM_ROOT}/config/app.yml").stdout
        assert lab.hosts.main_pids(W1) == pids  # not restarted: the workers run with the old key
        assert available(lab, new_function) == 0
        assert lab.run(W1, f"test -s {pending}", check=False).returncode == 0
        code, found = pending_findings(lab)
        assert code == 3 and len(found) == 1, found
        owes = found[0]["summary"]
        assert owes.startswith("an earlier converge stopped before it applied everything; it still owes: "
                               "clear the cache of site default (if the role clears caches); restart "), owes
        assert all(unit.removesuffix(".service") in owes for unit in pids), owes
        assert found[0]["severity"] == "fault" and found[0]["subject"] == pending, found
        assert found[0]["fix"][0].startswith("by hand: run site.yml again"), found
        lab.run(W1, f"rm -r {stuck}")
        mark = len(lab.record(W1))
        lab.converge(key)  # the printed fix, once the cause is gone
        events = [e["event"] for e in lab.record(W1)[mark:] if e["event"] in ("cc", "start")]
        assert events == ["cc"] + ["start"] * len(pids), events
        assert all(lab.hosts.main_pids(W1)[unit] != pid for unit, pid in pids.items())
        lab.wait_for(lambda: available(lab, new_function) == len(pids), what="the new key's workers registered")
        assert lab.run(W1, f"test -e {pending}", check=False).returncode != 0
        assert pending_findings(lab)[1] == []
        again = lab.converge(key)
        assert again.changed() == 0, again
    finally:  # the next tests start from a converged host, whatever failed here
        lab.run(W1, f"rm -rf {stuck}")
        lab.converge()


def test_a_configuration_written_by_tag_alone_is_applied_by_the_next_converge(lab):
    """`--tags atom_worker_config` writes app.yml but never reaches the manager's steps, so it restarts nothing
    (Ansible does not pass tags into a dynamic include): the sites it changed are noted, and the next full
    converge restarts their workers on the new key."""
    key = {"atom_worker_workers_key": "site-d"}
    new_function = hashlib.md5(f"{ATOM_ROOT}site-d".encode()).hexdigest() + "-arFindingAidJob"
    pids = lab.hosts.main_pids(W1)
    try:
        lab.converge(key, "--tags", "atom_worker_config")
        assert "workers_key: 'site-d'" in lab.run(W1, f"cat {ATOM_ROOT}/config/app.yml").stdout
        assert lab.hosts.main_pids(W1) == pids and available(lab, new_function) == 0
        lab.converge(key)
        assert all(lab.hosts.main_pids(W1)[unit] != pid for unit, pid in pids.items())
        lab.wait_for(lambda: available(lab, new_function) == len(pids), what="the new key's workers registered")
        again = lab.converge(key)
        assert again.changed() == 0, again
    finally:
        lab.converge()


def test_a_second_unfinished_apply_keeps_what_the_first_owed(lab):
    """config.yml writes its note of the sites it changed before the manager's steps note the rest, and the note
    replaces the file: it must keep what a note left by an earlier unfinished apply still owes. The first
    converge changes a unit setting and the key and fails in its cache clear (its note: the site, the pool's
    restart, a daemon-reload); the second changes the key again, never reaches the manager's steps (`--tags
    atom_worker_config`) and fails too (its cache clear, a handler run at the end of the play). The note then still
    holds the first one's keys beside the site, and the next full converge applies it all and removes it."""
    pending = "/etc/atom-worker/apply-pending.json"
    first_vars = {"atom_worker_workers_key": "site-e", "atom_worker_restart_sec": 7}
    second_vars = {"atom_worker_workers_key": "site-f", "atom_worker_restart_sec": 7}
    new_function = hashlib.md5(f"{ATOM_ROOT}site-f".encode()).hexdigest() + "-arFindingAidJob"
    pids = lab.hosts.main_pids(W1)
    stuck = f"{ATOM_ROOT}/cache/qubit/stuck"
    try:
        lab.run(W1, f"mkdir -p {stuck} && touch {stuck}/file")  # root's: the site's user cannot remove it
        failed = lab.converge(first_vars, check=False)
        assert failed.returncode != 0 and "Unable to remove" in failed.stdout, failed
        first = json.loads(lab.run(W1, f"cat {pending}").stdout)
        # The positive control: the manager's note, with what config.yml's own note lacks.
        assert first["config_sites"] == ["default"] and first["manager"] == "systemd", first
        assert first["daemon_reload"] is True and "atom-worker@*.service" in first["restart_globs"], first
        failed = lab.converge(second_vars, "--tags", "atom_worker_config", check=False)
        assert failed.returncode != 0 and "Unable to remove" in failed.stdout, failed
        assert "workers_key: 'site-f'" in lab.run(W1, f"cat {ATOM_ROOT}/config/app.yml").stdout
        second = json.loads(lab.run(W1, f"cat {pending}").stdout)
        assert second["config_sites"] == ["default"] and second["manager"] == "systemd", second
        assert second["daemon_reload"] is True and second["restart_globs"] == first["restart_globs"], second
        assert lab.hosts.main_pids(W1) == pids  # nothing restarted yet
        lab.run(W1, f"rm -r {stuck}")
        mark = len(lab.record(W1))
        lab.converge(second_vars)
        events = [e["event"] for e in lab.record(W1)[mark:] if e["event"] in ("cc", "start")]
        assert events == ["cc"] + ["start"] * len(pids), events
        assert all(lab.hosts.main_pids(W1)[unit] != pid for unit, pid in pids.items())
        for unit in pids:
            assert lab.show(W1, unit, "RestartUSec", "NeedDaemonReload") == {
                "RestartUSec": "7s", "NeedDaemonReload": "no"}, unit
        lab.wait_for(lambda: available(lab, new_function) == len(pids), what="the new key's workers registered")
        assert lab.run(W1, f"test -e {pending}", check=False).returncode != 0
        again = lab.converge(second_vars)
        assert again.changed() == 0, again
    finally:
        lab.run(W1, f"rm -rf {stuck}")
        lab.converge()


def test_scale_4_2_3_leaves_exactly_those_instances(lab):
    for n in (4, 2, 3):
        lab.converge({"atom_worker_instances": n})
        wanted = [f"atom-worker@{i}.service" for i in range(1, n + 1)]
        assert lab.units(W1, "atom-worker@*") == wanted
        assert lab.units(W1, "atom-worker@*", state="active") == wanted
        assert lab.wanted(W1) == wanted
    lab.converge()
    assert lab.units(W1, "atom-worker@*") == ["atom-worker@1.service"]


def test_recycling_worker_processes_10_jobs_without_failing(lab):
    pools = [
        {"name": "recycle", "instances": 1, "types": ["general"], "max_job_count": 1}
    ]
    lab.converge({"atom_worker_instances": 0, "atom_worker_pools": pools})
    unit = "atom-worker-default-recycle@1.service"
    started = lab.show(W1, unit, "ExecMainStartTimestampMonotonic", "ActiveState")
    assert started["ActiveState"] == "active"
    mark = len(lab.record(W1))
    ids = lab.submit(W1, "arFindingAidJob", 10)
    lab.wait_for(
        lambda: (
            set(ids)
            <= {
                e["id"]
                for e in lab.events(W1, "job", mark)
                if e["status"] == "completed"
            }
        ),
        timeout=60,
        what="10 jobs through a recycling worker",
    )
    exits = [e for e in lab.events(W1, "exit", mark) if e["code"] == 111]
    assert len(exits) >= 9
    after = lab.show(
        W1,
        unit,
        "ExecMainStartTimestampMonotonic",
        "ActiveState",
        "NRestarts",
        "Result",
    )
    assert after["ActiveState"] == "active"
    assert after["NRestarts"] == "0"
    assert after["Result"] == "success"
    assert (
        after["ExecMainStartTimestampMonotonic"]
        == started["ExecMainStartTimestampMonotonic"]
    )
    lab.converge()
    assert lab.units(W1, "atom-worker-*") == []
    assert (
        lab.run(
            W1,
            "ls /etc/systemd/system/atom-worker-default-recycle@.service",
            check=False,
        ).returncode
        != 0
    )


@contextlib.contextmanager
def crash_looped(lab, unit):
    """`unit` on W1 crash-loops until systemd gives up: RestartSec=1 (converged), the stand-in crashing at
    every start, then a deliberate restart (reset-failed first, as the roles and the CLI do). Yields the
    stand-in record's length before the restart; the stand-in starts normally again on exit (the unit
    stays failed)."""
    lab.converge({"atom_worker_restart_sec": 1})
    lab.control(W1, crash_at_start=1)
    mark = len(lab.record(W1))
    try:
        lab.run(W1, f"systemctl reset-failed {unit}; systemctl restart {unit}")
        lab.wait_for(
            lambda: lab.show(W1, unit, "ActiveState")["ActiveState"] == "failed",
            timeout=60,
            what="the crash-looping worker to fail",
        )
        yield mark
    finally:
        lab.control(W1)


def test_crash_loop_fails_after_exactly_3_starts(lab):
    unit = "atom-worker@1.service"
    with crash_looped(lab, unit) as mark:
        # systemd gave up after StartLimitBurst=3 starts, and starts no more.
        lab.run(W1, "sleep 3")
        starts = lab.events(W1, "start", mark)
        assert len(starts) == 3, starts
        assert lab.show(W1, unit, "ActiveState")["ActiveState"] == "failed"
        assert "Start request repeated too quickly" in lab.journal(W1, unit)
    # A converge is a deliberate start too: it resets the failed state and the worker runs again.
    lab.converge()
    assert lab.show(W1, unit, "ActiveState")["ActiveState"] == "active"


def available(lab, function):
    """gearmand's count of available workers for `function` (0 when it does not list it)."""
    status = parse_status(lab.run(GM, f"gearadmin -h {lab.address(GM)} --status").stdout.splitlines())
    return status.get(function, (0, 0, 0))[2]


def test_config_change_brings_back_a_worker_whose_start_budget_is_spent(lab):
    unit = "atom-worker@1.service"
    with crash_looped(lab, unit):
        pass
    # The budget is spent: systemd refuses a plain start now (the crash cause is gone, the limit stays).
    assert lab.run(W1, f"systemctl start {unit}", check=False).returncode != 0
    assert lab.show(W1, unit, "ActiveState")["ActiveState"] == "failed"
    # A configuration change through the role: its handler must bring the worker back, registered
    # under the new prefix.
    lab.converge({"atom_worker_restart_sec": 1, "atom_worker_workers_key": "spent"})
    after = lab.show(W1, unit, "ActiveState", "NRestarts")
    assert after == {"ActiveState": "active", "NRestarts": "0"}, lab.journal(W1, unit)
    function = hashlib.md5(f"{ATOM_ROOT}spent".encode()).hexdigest() + "-arFindingAidJob"
    lab.wait_for(lambda: available(lab, function) >= 1, timeout=60, what=f"{function} served again")
    lab.converge()
