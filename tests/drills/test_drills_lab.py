"""Drills: real faults on lab hosts, and proof from the stand-in's record that no job was lost.

Run inside the lab network: tools/lab/lab exec -- .venv/bin/pytest tests/drills
One converge for the module. Hosts:
  d-gm    gearmand on its lab address (allowlist on), for d-w1 and d-w2
  d-w1    2 workers of type `general` (arFindingAidJob) + pool `recycle` (1 worker, generate_csv_report,
          --max-job-count=2); RestartSec=2 so that crashes come back in seconds; atom-workerctl (installed in
          the background during the outage drill: it builds pystemd)
  d-w2    2 workers with workers_key `w2` (functions of their own: only d-w2 can take its jobs)
  d-solo  gearmand, MariaDB and 2 workers on one host, for the clean-shutdown drill
The job server outage (one minute, d-gm cut off from d-w2) runs while the drills on d-w1 and d-solo and
the bad-input runs against d-gm/d-w2 go on: the tests run in file order, the outage spans several, and a
timer lifts it after exactly one minute.
Counting jobs: every id submitted must be in the worker host's record as completed at least once.
"""

import json
import os
import re
import shlex
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from labhosts import ATOM_ROOT, REPO, VENV_BIN
from polling import wait_until

pytestmark = pytest.mark.timeout(900)

GM, W1, W2, SOLO = "d-gm", "d-w1", "d-w2", "d-solo"
RECYCLE_UNIT = "atom-worker-default-recycle@1.service"
INVENTORY = {"all": {"children": {
    "gearman_job_servers": {"children": {
        "main_gearman": {"hosts": {GM: {"gearman_job_server_listen_address": "{{ ansible_host }}"}}},
        "solo_gearman": {"hosts": {SOLO: None}},
    }},
    "atom_workers": {"hosts": {
        W1: {"atom_worker_gearman_group": "main_gearman", "atom_worker_instances": 2,
             "atom_worker_types": ["general"], "atom_worker_restart_sec": 2,
             "atom_worker_pools": [{"name": "recycle", "instances": 1, "types": ["generate_csv_report"],
                                    "max_job_count": 2}]},
        W2: {"atom_worker_gearman_group": "main_gearman", "atom_worker_instances": 2,
             "atom_worker_workers_key": "w2"},
        SOLO: {"atom_worker_gearman_group": "solo_gearman", "atom_worker_instances": 2},
    }},
}}}
OUTAGE_SECONDS = 60
# Shared between the tests of the module (they run in file order).
STATE = {}


@pytest.fixture(scope="module")
def drill(make_drill):
    drill = make_drill(INVENTORY)
    # A real MariaDB on d-solo, from the lab's offline apt repository, before the converge: the role detects
    # it (systemctl list-unit-files) and orders the workers after it.
    drill.run(SOLO, "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mariadb-server "
                    ">/dev/null", timeout=600)
    drill.converge()
    for host in (GM, SOLO):
        drill.install_submitter(host)
    pool = ThreadPoolExecutor(max_workers=2)
    # The CLI only where a drill needs it (it builds pystemd on the host): in the background meanwhile.
    STATE["cli"] = pool.submit(install_cli, drill)
    STATE["pool"] = pool
    yield drill
    pool.shutdown(wait=True, cancel_futures=True)


def install_cli(drill):
    wheel = next((REPO / "build" / "wheel").glob("atom_workerctl-*.whl"))
    return drill.hosts.playbook("tests/cli/install.yml", "--limit", W1, extra_vars={"workerctl_wheel": str(wheel)})


def gm_server(drill):
    """d-gm's gearmand, where it listens (its lab address; loopback is allowed but not bound)."""
    return f"{drill.address[GM]}:4730"


def ctl(drill, host, *args):
    return drill.run(host, "atom-workerctl " + " ".join(shlex.quote(a) for a in args), check=False, timeout=180)


def main_pids(drill, host, units):
    return {u: drill.show(host, u, "MainPID")["MainPID"] for u in units}


# --- the job server unreachable from a worker host for a minute (part 1: the cut) -----------------------


def test_job_server_unreachable_from_a_worker_host_begins(drill):
    w2, gm = drill.address[W2], drill.address[GM]
    units = ["atom-worker@1.service", "atom-worker@2.service"]
    STATE["w2_pids"] = main_pids(drill, W2, units)
    STATE["w2_mark"] = len(drill.record(W2))
    # Every packet between d-gm and d-w2 dropped, both ways, in a table of the drill's own (the role's
    # allowlist table is left alone): a network partition, not a refusal.
    rules = (f"table inet atom_drill {{\n chain in {{ type filter hook input priority -10; ip saddr {w2} drop; }}\n"
             f" chain out {{ type filter hook output priority -10; ip daddr {w2} drop; }}\n}}")
    drill.run(GM, f"nft -f - <<'EOF'\n{rules}\nEOF")
    STATE["outage_start"] = time.monotonic()

    def end_outage():
        STATE["outage_end"] = time.monotonic()
        STATE["outage_lifted"] = drill.run(GM, "nft delete table inet atom_drill", check=False)

    # The network comes back after exactly one minute, whatever the tests in between are doing.
    STATE["outage_timer"] = threading.Timer(OUTAGE_SECONDS, end_outage)
    STATE["outage_timer"].daemon = True
    STATE["outage_timer"].start()
    probe = f"import socket; s=socket.socket(); s.settimeout(3); print(s.connect_ex(('{gm}', 4730)))"
    assert drill.run(W2, f'python3 -c "{probe}"').stdout.strip() != "0"
    # Jobs that only d-w2's workers can take (their workers_key), queued while it is cut off.
    STATE["w2_ids"] = drill.submit(GM, gm_server(drill), drill.function("arFindingAidJob", "w2"), "outage", 30)
    # The bad-input runs touch only d-gm and d-w2 (read-only when they work): they overlap the minute.
    STATE["bad"] = STATE["pool"].submit(run_bad_inputs, drill)


# --- a worker killed with SIGKILL in the middle of a job -------------------------------------------------


def test_sigkill_mid_job_is_requeued_and_completes(drill):
    units = ["atom-worker@1.service", "atom-worker@2.service"]
    unit_of = {pid: unit for unit, pid in main_pids(drill, W1, units).items()}
    restarts = {u: int(drill.show(W1, u, "NRestarts")["NRestarts"]) for u in units}
    mark = len(drill.record(W1))
    # A 15 s job: long enough to be killed in the middle even on a busy machine.
    [job] = drill.submit(GM, gm_server(drill), drill.function("arFindingAidJob"), "kill", 1, sleep=15)
    started = wait_until(lambda: [e for e in drill.record(W1)[mark:] if e["event"] == "job-start" and e["id"] == job],
                         60, 0.2, "the job to start")
    pid = str(started[0]["pid"])
    drill.run(W1, f"kill -KILL {pid}")
    unit = unit_of[pid]
    counts = drill.wait_all_completed(W1, [job], mark, 120, "the killed worker's job")
    assert counts[job] >= 1
    ends = [e for e in drill.record(W1)[mark:] if e["event"] == "job" and e["id"] == job]
    assert pid not in {str(e["pid"]) for e in ends}, ends       # the killed process never finished it
    starts = [str(e["pid"]) for e in drill.record(W1)[mark:] if e["event"] == "job-start" and e["id"] == job]
    assert starts[0] == pid and len(starts) >= 2, starts        # gearmand handed it out again
    # systemd brought the killed instance back (Restart=on-failure), a new process
    def back():
        props = drill.show(W1, unit, "ActiveState", "MainPID")
        return props["ActiveState"] == "active" and props["MainPID"] not in ("0", pid)

    wait_until(back, 60, 0.5, "the killed instance back")
    assert int(drill.show(W1, unit, "NRestarts")["NRestarts"]) == restarts[unit] + 1


# --- recycling under load ----------------------------------------------------------------------------------


def test_recycling_under_load_never_fails_the_unit(drill):
    props = ("ActiveState", "NRestarts", "Result", "ExecMainStartTimestampMonotonic", "MainPID")
    before = drill.show(W1, RECYCLE_UNIT, *props)
    assert before["ActiveState"] == "active"
    assert "--max-job-count=2" in drill.show(W1, RECYCLE_UNIT, "ExecStart")["ExecStart"]
    since = int(time.time()) - 1
    mark = len(drill.record(W1))
    ids = drill.submit(GM, gm_server(drill), drill.function("arGenerateReportJob"), "recycle", 50)
    drill.wait_all_completed(W1, ids, mark, 180, "50 jobs through the recycling worker")
    exits = [e for e in drill.record(W1)[mark:] if e["event"] == "exit"]
    assert [e["code"] for e in exits] == [111] * 25, exits        # php recycled after every 2nd job, nothing else
    after = drill.show(W1, RECYCLE_UNIT, *props)
    assert after == before, (before, after)       # the same systemd start (and helper process) throughout
    assert after["NRestarts"] == "0" and after["Result"] == "success"
    journal = drill.journal(W1, RECYCLE_UNIT, since)
    assert "Failed with result" not in journal and "Scheduled restart" not in journal, journal


# --- a whole host shut down cleanly and booted (power cuts: test_hard_crash_lab.py) --------------------------


def test_clean_shutdown_and_boot_workers_after_gearmand_and_mariadb(drill):
    units = ["atom-worker@1.service", "atom-worker@2.service"]
    for unit in units:
        props = drill.show(SOLO, unit, "After", "Wants")
        for dependency in ("gearman-job-server.service", "mariadb.service"):
            assert dependency in props["After"].split() and dependency in props["Wants"].split(), props
    # Jobs queued while the workers are away, then a clean shutdown (systemd stops every unit).
    drill.run(SOLO, "systemctl stop atom-workers.target")
    mark = len(drill.record(SOLO))
    ids = drill.submit(SOLO, "127.0.0.1:4730", drill.function("arFindingAidJob"), "power", 20)
    assert drill.gearman_status(SOLO)[drill.function("arFindingAidJob")][0] == 20
    drill.hosts.poweroff(SOLO)
    drill.hosts.boot(SOLO)
    wait_until(lambda: drill.run(SOLO, "systemctl is-system-running", check=False).stdout.strip()
               in ("running", "degraded"), 120, 0.5, "d-solo to boot")
    ready = {}
    for service in ("gearman-job-server.service", "mariadb.service"):
        props = drill.show(SOLO, service, "ActiveState", "ActiveEnterTimestampMonotonic")
        assert props["ActiveState"] == "active", service
        ready[service] = int(props["ActiveEnterTimestampMonotonic"])
    journal = drill.run(SOLO, "journalctl -b --no-pager -o cat -u 'atom-worker@*'").stdout
    for unit in units:
        props = drill.show(SOLO, unit, "ActiveState", "NRestarts", "ExecMainStartTimestampMonotonic", "Result")
        assert props["ActiveState"] == "active" and props["NRestarts"] == "0", (props, journal)
        assert all(int(props["ExecMainStartTimestampMonotonic"]) >= t for t in ready.values()), (props, ready)
    assert "Failed with result" not in journal and "Couldn't connect" not in journal, journal
    assert journal.count("Running worker") == 2, journal     # one start per instance in this boot
    drill.wait_all_completed(SOLO, ids, mark, 120, "the jobs queued before the shutdown")


# --- a crash loop -------------------------------------------------------------------------------------------


def test_crash_loop_stops_at_the_start_limit_and_reset_restores_the_budget(drill):
    installed = STATE["cli"].result(timeout=600)
    assert installed.returncode == 0, installed
    unit, instance = "atom-worker@1.service", "atom-worker@1"
    limit = drill.show(W1, unit, "StartLimitBurst", "RestartUSec")
    burst, restart_sec = int(limit["StartLimitBurst"]), int(limit["RestartUSec"].rstrip("s"))

    def starts(mark):
        return [e for e in drill.record(W1)[mark:] if e["event"] == "start"]

    def wait_failed():
        wait_until(lambda: drill.show(W1, unit, "ActiveState")["ActiveState"] == "failed", 120, 0.5,
                   "the crash-looping instance to fail")

    drill.control(W1, crash_at_start=1)
    try:
        mark = len(drill.record(W1))
        assert ctl(drill, W1, "restart", instance, "--no-wait").returncode == 0
        wait_failed()
        assert len(starts(mark)) == burst, starts(mark)
        # No further start: systemd has no job queued for it, and none comes over several RestartSec.
        time.sleep(3 * restart_sec + 1)
        assert drill.show(W1, unit, "ActiveState")["ActiveState"] == "failed"
        assert unit not in drill.run(W1, "systemctl list-jobs --no-legend").stdout
        assert len(starts(mark)) == burst, starts(mark)
        assert "Start request repeated too quickly" in drill.journal(W1, unit)
    finally:
        drill.control(W1)
    proc = ctl(drill, W1, "reset", instance)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{instance}: active and registered" in proc.stdout, proc.stdout
    status = json.loads(ctl(drill, W1, "status", "--json", instance).stdout)
    [mine] = [u for s in status["sites"] for p in s["pools"] for u in p["units"] if u["unit"] == unit]
    assert mine["start_limit"]["hit"] is False and mine["n_restarts"] == 0, mine
    # The budget is whole again: after the reset's own start, systemd allows burst - 1 crash restarts more
    # (a crash, not a deliberate restart, so nothing resets the counter meanwhile).
    drill.control(W1, crash_at_start=1)
    try:
        mark = len(drill.record(W1))
        drill.run(W1, f"kill -KILL {drill.show(W1, unit, 'MainPID')['MainPID']}")
        wait_failed()
        assert len(starts(mark)) == burst - 1, starts(mark)
    finally:
        drill.control(W1)
    proc = ctl(drill, W1, "reset", instance)
    assert proc.returncode == 0 and f"{instance}: active and registered" in proc.stdout, proc.stdout + proc.stderr


# --- the job server unreachable (part 2: back) ---------------------------------------------------------------


def test_job_server_back_workers_recover_by_themselves_and_drain(drill):
    # The outage lasted one minute (a timer lifted it while the drills above ran). Nothing is restarted or
    # reconfigured: the workers' own connections (kept or re-made) must drain the queue.
    STATE["outage_timer"].join(timeout=OUTAGE_SECONDS + 120)
    lifted = STATE["outage_lifted"]
    assert lifted.returncode == 0, lifted.stderr
    assert STATE["outage_end"] - STATE["outage_start"] >= OUTAGE_SECONDS
    drill.wait_all_completed(W2, STATE["w2_ids"], STATE["w2_mark"], 240, "the jobs queued during the outage")
    units = list(STATE["w2_pids"])
    assert main_pids(drill, W2, units) == STATE["w2_pids"]                    # no restart: the same processes
    assert all(drill.show(W2, u, "NRestarts")["NRestarts"] == "0" for u in units)
    wait_until(lambda: drill.gearman_workers(GM, drill.address[GM]).get(drill.address[W2], 0) >= 2, 60, 0.5,
               "gearmand to list d-w2's two workers")


# --- bad input -------------------------------------------------------------------------------------------------

# (case id, kind, change, expected line). Kinds: inventory (host vars changed in a copy of the inventory;
# None: a file that is not YAML), var (-e), config (a file on d-w2 replaced for the run).
BAD = [
    ("inventory-not-yaml", "inventory", None, "No inventory was parsed"),
    ("inventory-listen-name", "inventory", {GM: {"gearman_job_server_listen_address": "jobs.example.org"}},
     "gearman_job_server_listen_address=jobs.example.org: give an IP address"),
    ("inventory-loopback-elsewhere", "inventory", {W2: {"atom_worker_gearman_group": "solo_gearman"}},
     f"which this worker host ({W2}) cannot reach"),
    ("var-unknown-type", "var", {"atom_worker_pools": [{"name": "x", "instances": 1, "types": ["nope"]}]},
     "type nope is not a key of worker_types"),
    ("var-allowed-address", "var", {"gearman_job_server_allowed_addresses": ["10.0.0.300"]},
     "gearman_job_server_allowed_addresses: 10.0.0.300 is not an IP address or network (CIDR)."),
    ("var-negative-port", "var", {"gearman_job_server_port": -1},
     "gearman_job_server_port must be an integer from 1 to 65535 (got -1)"),
    ("config-gearman-yml-not-yaml", "config", ("config/gearman.yml", "all:\n  servers: [unclosed\n"),
     f"{ATOM_ROOT}/config/gearman.yml is not valid YAML"),
]


def snapshot(drill, host):
    """Checksums of what the roles write on a host, the AtoM config, and every worker's and gearmand's state."""
    return drill.run(host, (
        "md5sum /etc/systemd/system/atom-worker* /etc/systemd/system/atom-workers* /etc/atom-worker/sites.json "
        "/etc/default/gearman-job-server /etc/atom-gearman/* /etc/systemd/system/gearman-job-server.service.d/* "
        f"{ATOM_ROOT}/config/*.yml 2>/dev/null; nft list table inet atom_gearman 2>/dev/null | md5sum; "
        "systemctl show -p Id -p ActiveState -p MainPID -p NRestarts 'atom-worker*@*' gearman-job-server 2>/dev/null;"
        " true")).stdout


def playbook(drill, inventory, extra_vars=None):
    args = [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), str(REPO / "site.yml"), "--limit", f"{GM},{W2}",
            "-e", yaml.safe_dump({"atom_workerctl_enabled": False, **(extra_vars or {})},
                                 default_flow_style=True).strip()]
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=REPO, env=env, check=False)


def run_bad_inputs(drill):
    """Each bad input against d-gm and d-w2: exit code, output, state before and after. The inventory and
    variable cases run 3 at a time (each must change nothing, so they cannot disturb each other); the config
    file cases, which replace a file on d-w2 for their run, after them, one at a time."""
    source = yaml.safe_load(drill.hosts.inventory.read_text())

    def one(case, kind, change):
        inventory, extra_vars, restore = drill.hosts.inventory, None, None
        if kind == "inventory":
            inventory = drill.hosts.inventory.with_name(f"bad-{case}.yml")
            if change is None:
                inventory.write_text("all:\n  children:\n    atom_workers:\n      hosts: [d-w2\n")
            else:
                copy = json.loads(json.dumps(source))

                def walk(group):
                    for name, hvars in ((group or {}).get("hosts") or {}).items():
                        if name in change:
                            hvars.update(change[name])
                    for child in ((group or {}).get("children") or {}).values():
                        walk(child)

                walk(copy["all"])
                inventory.write_text(yaml.safe_dump(copy))
        elif kind == "var":
            extra_vars = change
        else:
            path, text = change
            saved = drill.run(W2, f"cat {ATOM_ROOT}/{path}").stdout
            drill.run(W2, f"cat > {ATOM_ROOT}/{path} <<'EOF'\n{text}EOF")
            restore = (path, saved)
        before = {h: snapshot(drill, h) for h in (GM, W2)}
        proc = playbook(drill, inventory, extra_vars)
        after = {h: snapshot(drill, h) for h in (GM, W2)}
        if restore:
            drill.run(W2, f"cat > {ATOM_ROOT}/{restore[0]} <<'EOF'\n{restore[1]}EOF")
        return {"rc": proc.returncode, "out": proc.stdout + proc.stderr, "before": before, "after": after}

    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {case: pool.submit(one, case, kind, change) for case, kind, change, _ in BAD if kind != "config"}
        results = {case: future.result() for case, future in futures.items()}
    for case, kind, change, _ in BAD:
        if kind == "config":
            results[case] = one(case, kind, change)
    return results


@pytest.mark.parametrize("case, expected", [(c[0], c[3]) for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_fails_with_one_line_and_changes_nothing(drill, case, expected):
    result = STATE["bad"].result(timeout=900)[case]
    assert result["rc"] != 0, result["out"][-3000:]
    lines = [line for line in result["out"].splitlines() if expected in line]
    assert lines, result["out"][-3000:]
    changed = [int(n) for n in re.findall(r"changed=(\d+)", result["out"])]
    assert sum(changed) == 0, result["out"][-3000:]
    assert result["after"] == result["before"]


CLI_BAD = [
    ("scale-negative", ["scale", "-1"], 2, "atom-workerctl: error:"),
    ("reset-unknown-instance", ["reset", "atom-worker-nope@1"], 4, "no such instance"),
    ("scale-unknown-pool", ["scale", "2", "--pool", "nope"], 4, "no such pool"),
    ("status-unknown-option", ["status", "--bogus"], 2, "unrecognized arguments: --bogus"),
    ("config-not-json", ["--config", "/root/bad.json", "status"], 1, "malformed JSON in /root/bad.json"),
]


@pytest.mark.parametrize("args, code, expected", [c[1:] for c in CLI_BAD], ids=[c[0] for c in CLI_BAD])
def test_bad_cli_arguments_fail_with_one_line_and_change_nothing(drill, args, code, expected):
    drill.run(W1, "echo '{' > /root/bad.json")
    before = snapshot(drill, W1)
    proc = ctl(drill, W1, *args)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert expected in proc.stderr.splitlines()[-1] and "Traceback" not in proc.stderr, proc.stderr
    assert snapshot(drill, W1) == before


# --- gearmand restarted with 200 background jobs queued ---------------------------------------------------------


def test_gearmand_restart_with_200_queued_jobs_loses_none(drill):
    units = ["atom-worker@1.service", "atom-worker@2.service"]
    pids = main_pids(drill, W1, units)
    function = drill.function("arFindingAidJob")
    mark = len(drill.record(W1))
    # The workers keep running: 200 jobs of 0.2 s for 2 workers, so most are still queued at the restart.
    ids = drill.submit(GM, gm_server(drill), function, "restart", 200, sleep=0.2)
    queued = drill.gearman_status(GM, drill.address[GM])[function][0]
    drill.run(GM, "systemctl restart gearman-job-server.service")
    assert queued >= 100, queued
    counts = drill.wait_all_completed(W1, ids, mark, 240, "the 200 jobs queued across the restart")
    assert set(ids) <= set(counts)
    # The workers reconnected by themselves: the same processes, no systemd restart.
    assert main_pids(drill, W1, units) == pids
