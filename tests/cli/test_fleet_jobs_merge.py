"""The fleet form of `jobs` (fleet_jobs.py) on hosts' answers as `jobs --json` writes them: grouping by
database, one judgement with every host's workers, rows read in progress by every host only, --since with
--stale. The lab test (tests/fleet/test_fleet_jobs_lab.py) runs the same end to end on real hosts."""

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from atom_workerctl import fleet_jobs, fleet_ssh  # noqa: E402

SERVER = "10.0.0.1:4730"
PREFIX = "abc"


def row(job_id, started, cls="arFindingAidJob", age=600):
    return {"id": job_id, "class": cls, "user": "u", "status": "running", "status_id": 183, "started": started,
            "completed": None, "age_s": age, "notes": [], "output": ""}


def answer(host_rows, takens, running=1, local=False, address="10.0.0.5"):
    """One host's `sites` item: its rows in progress and evidence (gearmand runs `running` finding aids)."""
    return {"sites": ["default"], "database": "database atom at ...", "jobs": [],
            "database_identity": {"local": local, "address": None if local else address, "port": 3306,
                                  "dbname": "atom"},
            "in_progress": host_rows,
            "evidence": {"taken_at": time.time(), "logs_error": None,
                         "gearman": {SERVER: {"error": None, "functions": {
                             f"{PREFIX}-arFindingAidJob": [running, running, 2]}}},
                         "sites": [{"name": "default", "prefix": PREFIX, "servers": [SERVER], "takens": takens}]}}


def taken(instance, job_id, alive=True):
    return {"instance": instance, "pid": 100, "started": "2026-01-01 10:00:00", "usec": 1, "job_id": job_id,
            "tied_by": "Parameters", "waiting": False, "alive": alive}


def group(answers):
    g = fleet_jobs.FleetGroup("database atom", "atom-workerctl -i inv")
    for host, item in answers:
        g.add(host, item)
    return g


def test_a_row_run_by_another_host_is_running_there_and_a_lost_one_is_stale():
    rows = [row(1, "2026-01-01 09:00:00"), row(2, "2026-01-01 09:30:00")]
    # w1 runs job 1; w2's process that took job 2 is gone. gearmand runs one finding aid.
    g = group([("w1", answer(rows, [taken("atom-worker@1", 1)])),
               ("w2", answer(rows, [taken("atom-worker@2", 2, alive=False)]))])
    g.judge(stale_only=True)
    assert g.verdicts[1].state == "running" and "w1:atom-worker@1" in g.verdicts[1].summary
    assert g.verdicts[2].state == "stale"
    assert any("w2:atom-worker@2 (PID 100)" in e for e in g.verdicts[2].evidence)
    # The control: w2's answer alone leaves job 2 uncertain (gearmand's running job is tied to no row).
    alone = group([("w2", answer(rows, [taken("atom-worker@2", 2, alive=False)]))])
    alone.judge(stale_only=True)
    assert alone.verdicts[2].state == "uncertain"


def test_a_row_one_host_read_finished_is_not_judged():
    rows = [row(1, "2026-01-01 09:00:00"), row(2, "2026-01-01 09:30:00")]
    g = group([("w1", answer(rows, [], running=0)), ("w2", answer(rows[:1], [], running=0))])
    g.judge(stale_only=True)
    assert sorted(g.verdicts) == [1] and g.verdicts[1].state == "stale"


def test_stale_since_keeps_the_fleet_verdicts_and_the_time():
    rows = [row(1, "2026-01-01 09:00:00"), row(2, "2026-01-01 09:30:00")]
    g = group([("w1", answer(rows, [], running=0))])
    g.judge(stale_only=True, since="2026-01-01 09:15:00")
    assert [j.id for j in g.jobs] == [2] and {v.state for v in g.verdicts.values()} == {"stale"}


def test_one_database_named_by_socket_on_its_host_and_by_address_elsewhere():
    db_host = fleet_ssh.Target("db1", address="10.0.0.5")
    other = fleet_ssh.Target("w2", address="10.0.0.6")
    local = fleet_jobs.database_key({"local": True, "address": None, "port": 3306, "dbname": "atom"}, db_host)
    remote = fleet_jobs.database_key({"local": False, "address": "10.0.0.5", "port": 3306, "dbname": "atom"},
                                     other)
    elsewhere = fleet_jobs.database_key({"local": True, "address": None, "port": 3306, "dbname": "atom"}, other)
    assert local == remote != elsewhere


def test_a_job_server_one_host_reached_counts():
    unreachable = answer([row(1, "2026-01-01 09:00:00")], [], running=0)
    unreachable["evidence"]["gearman"][SERVER] = {"error": "connection refused", "functions": {}}
    reached = answer([row(1, "2026-01-01 09:00:00")], [], running=0)
    ev = fleet_jobs.merged_evidence([("w1", unreachable["evidence"]), ("w2", reached["evidence"])])
    assert ev.gearman[SERVER].reachable
    only_unreachable = fleet_jobs.merged_evidence([("w1", unreachable["evidence"])])
    assert not only_unreachable.gearman[SERVER].reachable


def test_fleet_status_does_not_hold_an_unasked_gearmand_against_a_host():
    """status --no-gearman over a fleet: each host says its job server was "not queried"; that is no reason for
    the host to stand out (it made fleet status exit 3 on healthy hosts). A job server the host could not reach
    still is (the control)."""
    from atom_workerctl import cmd_fleet, cmd_status

    def host(error):
        r = fleet_ssh.HostResult(fleet_ssh.Target("w1", address="10.0.0.5"))
        r.reached, r.code = True, 0
        r.data = {"summary": {"active": 2, "not_active": 0},
                  "sites": [{"gearman": [{"server": SERVER, "reachable": False, "error": error, "local_ip": None}]}]}
        return {"w1": r}

    unasked = cmd_fleet.merge_status(host(cmd_status.NOT_QUERIED), {})["per_host"]["w1"]
    assert not unasked["stands_out"], unasked
    refused = cmd_fleet.merge_status(host("connection refused"), {})["per_host"]["w1"]
    assert refused["stands_out"] and any("connection refused" in n for n in refused["notes"]), refused
