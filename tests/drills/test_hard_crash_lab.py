"""Hard-crash drills: gearmand SIGKILLed, the job server's power cut, a worker host's power cut mid-job.
Nothing shuts down cleanly here, and still no job may be lost.

Run inside the lab network: tools/lab/lab exec -- .venv/bin/pytest tests/drills/test_hard_crash_lab.py
One converge for the module, every variable at the roles' defaults. Hosts:
  dc-gm          gearmand on its lab address (allowlist on); the jobs are submitted on it
  dc-w1, dc-w2   2 workers each, same AtoM site (the same functions): either host can take any job
Counting jobs: every id submitted must be in a worker host's record (either host) as completed at least once.
A power cut unplugs the host from the lab's bridge before `lab powercut` kills its processes, so nothing
it sends as it dies reaches anyone (conftest.Drill.powercut).
"""

import pytest
from polling import wait_until

pytestmark = pytest.mark.timeout(900)

GM, W1, W2 = "dc-gm", "dc-w1", "dc-w2"
WORKER_HOSTS = (W1, W2)
UNITS = ["atom-worker@1.service", "atom-worker@2.service"]
GEARMAND = "gearman-job-server.service"
INVENTORY = {"all": {"children": {
    "gearman_job_servers": {"hosts": {GM: {"gearman_job_server_listen_address": "{{ ansible_host }}"}}},
    "atom_workers": {"hosts": {W1: {"atom_worker_instances": 2}, W2: {"atom_worker_instances": 2}}},
}}}


@pytest.fixture(scope="module")
def drill(make_drill):
    drill = make_drill(INVENTORY)
    drill.converge()
    drill.install_submitter(GM)
    yield drill


def server(drill):
    return f"{drill.address[GM]}:4730"


def status(drill):
    """(queued total, running, available workers) of arFindingAidJob on dc-gm; zeros when gearmand has none."""
    return drill.gearman_status(GM, drill.address[GM]).get(drill.function(), (0, 0, 0))


def workers_pids(drill):
    return {host: drill.hosts.main_pids(host) for host in WORKER_HOSTS}


def wait_registered(drill, what):
    """gearmand lists both worker hosts' 2 workers, each with its functions."""
    def registered():
        seen = drill.gearman_workers(GM, drill.address[GM])
        return all(seen.get(drill.address[h], 0) >= len(UNITS) for h in WORKER_HOSTS)

    wait_until(registered, 120, 0.5, what, details=lambda: str(drill.gearman_workers(GM, drill.address[GM])))


def test_gearmand_sigkill_with_200_queued_jobs_loses_none(drill):
    # Workers away while the jobs are queued, so all 200 are in the queue when gearmand dies.
    for host in WORKER_HOSTS:
        drill.run(host, "systemctl stop atom-workers.target")
    marks = drill.marks(*WORKER_HOSTS)
    ids = drill.submit(GM, server(drill), drill.function(), "sigkill", 200)
    assert status(drill)[0] == 200
    before = drill.show(GM, GEARMAND, "MainPID", "NRestarts")
    drill.run(GM, f"systemctl kill -s KILL {GEARMAND}")

    # Debian's unit (Restart=always) starts it again: a new process, one automatic restart.
    def back():
        now = drill.show(GM, GEARMAND, "ActiveState", "MainPID", "NRestarts")
        return now if now["ActiveState"] == "active" and now["MainPID"] not in ("0", before["MainPID"]) else None

    after = wait_until(back, 60, 0.2, "gearmand started again after the SIGKILL")
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1, (before, after)
    assert "status=9/KILL" in drill.journal(GM, GEARMAND)
    wait_until(lambda: drill.run(GM, f"gearadmin -h {drill.address[GM]} --getpid", check=False).returncode == 0,
               30, 0.2, "the new gearmand to answer")
    # It read every job back from its queue on disk (a queue written only at a clean stop has none: 0).
    assert status(drill)[0] == 200, status(drill)
    for host in WORKER_HOSTS:
        drill.run(host, "systemctl start atom-workers.target")
    drill.wait_all_completed(marks, ids, timeout=240, what="the 200 jobs queued when gearmand was killed")


def test_job_server_power_cut_with_jobs_queued_and_running_loses_none(drill):
    wait_registered(drill, "the 4 workers registered before the cut")
    pids = workers_pids(drill)
    marks = drill.marks(*WORKER_HOSTS)
    # One 8 s job for each of the 4 workers, then 20 more queued behind them.
    running = drill.submit(GM, server(drill), drill.function(), "cut-running", 4, sleep=8)

    def all_started():
        started = {e["id"] for h, m in marks.items() for e in drill.record(h)[m:] if e["event"] == "job-start"}
        return set(running) <= started

    wait_until(all_started, 60, 0.2, "the 4 slow jobs running on the workers")
    queued = drill.submit(GM, server(drill), drill.function(), "cut-queued", 20)
    assert status(drill)[:2] == (24, 4)
    drill.powercut(GM)
    drill.boot(GM)
    # Nothing restarted on the worker hosts: their workers find the job server again by themselves.
    drill.wait_all_completed(marks, running + queued, timeout=300, what="the jobs queued or running at the cut")
    wait_registered(drill, "the 4 workers registered with the rebooted gearmand")
    assert workers_pids(drill) == pids
    for host in WORKER_HOSTS:
        assert all(drill.show(host, u, "NRestarts")["NRestarts"] == "0" for u in UNITS)


def test_worker_host_power_cut_mid_job_the_other_host_completes_it(drill):
    wait_registered(drill, "the 4 workers registered before the cut")
    marks = drill.marks(*WORKER_HOSTS)
    [job] = drill.submit(GM, server(drill), drill.function(), "host-cut", 1, sleep=15)

    def started_on():
        return [h for h, m in marks.items() for e in drill.record(h)[m:] if e["event"] == "job-start"
                and e["id"] == job]

    [cut] = wait_until(started_on, 60, 0.2, "the 15 s job to start")
    [other] = [h for h in WORKER_HOSTS if h != cut]
    drill.powercut(cut)
    # gearmand heard nothing: it still lists the dead host's 2 workers (a cut that closed their connections
    # would have told it, and proven nothing about a real power cut)...
    assert drill.gearman_workers(GM, drill.address[GM]).get(drill.address[cut]) == len(UNITS)
    # ...so it must find out by itself that the connection is dead (TCP keepalive, the role's default), and
    # hand the job to a worker on the other host.
    drill.wait_all_completed({other: marks[other]}, [job], timeout=300, what=f"{cut}'s job to complete on {other}")
    drill.boot(cut)
    # The cut host's record (read once it is back): it started the job and never finished it.
    assert sorted(started_on()) == sorted([cut, other])
    assert job not in drill.completed(cut, marks[cut])
    # Its workers are back: running since the boot, each connected to gearmand. (gearmand's own list may
    # still hold a dead connection of the old boot for a while, so it is asked on the host itself.)
    for unit in UNITS:
        assert drill.show(cut, unit, "ActiveState", "NRestarts") == {"ActiveState": "active", "NRestarts": "0"}
    wait_until(lambda: len(drill.run(cut, f"ss -Htn state established dst {drill.address[GM]}:4730").stdout
                           .splitlines()) == len(UNITS), 60, 0.5, f"{cut}'s 2 workers connected to gearmand")
    wait_registered(drill, f"{cut}'s workers registered after the boot")
