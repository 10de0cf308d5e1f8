"""Every doctor finding, made for real on a lab host, fixed by running what doctor printed, then healthy.

For each finding code of tools/atom_workerctl/README.md's doctor table (but the supervisord-only ones, made by
tests/supervisor/test_supervisor_cli.py): make the fault on a host converged by
site.yml (gearmand, the AtoM stand-in and two workers, the CLI installed from this checkout), run `atom-workerctl
doctor`, parse its `fix:` lines from the human output and run each exactly as printed (`# comments` are part
of the shell line); a line starting with `by hand:` is a person's step, which the test applies itself. Then
doctor must exit 0 and print "healthy". Each test starts from, and leaves, a healthy host (the first test is
the positive control).

Run inside the lab network: tools/lab/lab exec -- .venv/bin/pytest tests/cli/test_doctor_fixes_lab.py
RestartSec is 10 s here (a role variable): long enough to catch an instance in `activating (auto-restart)`,
short enough for a crash loop to reach the start limit (3 starts in 24 h, the docs' policy) in half a minute.
"""

import hashlib
import json
import re
import shlex
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from labhosts import booted_per_module, build_project_wheel  # noqa: E402
from polling import wait_until  # noqa: E402

pytestmark = pytest.mark.timeout(900)

HOST = "dfx-host"
ROOT = "/usr/share/nginx/atom"
GEARMAN_YML = f"{ROOT}/config/gearman.yml"
INVENTORY = {"all": {"children": {
    "gearman_job_servers": {"hosts": {HOST: None}},
    # The stand-in keeps AtoM's job table in a local MariaDB; gearmand drops a job whose worker died (one
    # attempt, as against poison jobs), so a killed move's row stays "Running" with nothing to run it.
    "atom_workers": {"hosts": {HOST: {"atom_worker_instances": 2, "atom_worker_restart_sec": 10,
                                      "atom_standin_database": True, "gearman_job_server_job_retries": 1}}},
}}}
W1, W2 = "atom-worker@1", "atom-worker@2"
HUMAN = "by hand: "
FIX = re.compile(r"^  fix: {6}(?P<fix>.+)$")
# AtoM's worker retries a lost job server every 5 s (the stand-in does as net_gearman does): after gearmand
# comes back, its workers are registered again within about that, without any restart.
RECONNECT = 30


class Host:
    def __init__(self, hosts):
        self.hosts = hosts

    def sh(self, command, check=True, timeout=300):
        return self.hosts.run(HOST, command, check=check, timeout=timeout)

    def doctor(self):
        """`atom-workerctl doctor` as an operator runs it: (exit code, output, fix lines in order)."""
        proc = self.sh("atom-workerctl doctor", check=False)
        assert "Traceback" not in proc.stderr, proc.stderr
        fixes = [m["fix"] for m in map(FIX.match, proc.stdout.splitlines()) if m]
        return proc.returncode, proc.stdout, fixes

    def doctor_json(self):
        proc = self.sh("atom-workerctl doctor --json", check=False)
        return json.loads(proc.stdout)

    def show(self, unit, *props):
        out = self.sh(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def healthy(self):
        code, out, _ = self.doctor()
        return code == 0 and out.startswith("healthy")

    def wait_healthy(self, timeout=RECONNECT, what="doctor healthy"):
        wait_until(self.healthy, timeout=timeout, interval=1, what=what, details=lambda: self.doctor()[1])


def codes(out):
    return re.findall(r"^(?:FAULT|WARNING) \[(\w+)\]", out, re.M)


def apply_fixes(host, fixes, human=None):
    """Run each printed fix line as printed; `by hand:` lines go to `human(line)` (required if any)."""
    ran = []
    for fix in fixes:
        if fix.startswith(HUMAN):
            assert human is not None, f"a step for a person was printed and the test has none: {fix}"
            human(fix)
            ran.append(("human", fix, 0))
            continue
        assert not fix.startswith("on "), f"a fix for another host on a one-host lab: {fix}"
        proc = host.sh(fix, check=False)
        assert proc.returncode == 0, f"printed fix failed: {fix}\n{proc.stdout}\n{proc.stderr}"
        ran.append(("shell", fix, proc.returncode))
    return ran


def fix_as_printed(host, expect, human=None, settle=0):
    """doctor names `expect` (its first fault is expect[0]); its printed fixes, run as printed, make it healthy.
    `settle`: seconds the workers may take to reconnect by themselves (AtoM's 5 s retry), 0 for none."""
    code, out, fixes = host.doctor()
    found = codes(out)
    assert code == (3 if any(f"FAULT [{c}]" in out for c in found) else 0), out
    assert found and found[0] == expect[0] and set(expect) <= set(found), out
    assert fixes, out
    apply_fixes(host, fixes, human)
    if settle:
        host.wait_healthy(settle, what=f"doctor healthy after the fixes for {expect}")
    code, out, _ = host.doctor()
    assert code == 0 and out.startswith("healthy"), f"after running the printed fixes for {expect}:\n{out}"
    return out


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    wheel = build_project_wheel(Path(tmp_path_factory.mktemp("dfx-wheel")))

    def wrap(hosts):
        result = hosts.playbook("playbooks/lab/site.yml")
        assert result.returncode == 0, result
        result = hosts.playbook("tests/cli/install.yml", extra_vars={"workerctl_wheel": str(wheel)})
        assert result.returncode == 0, result
        return Host(hosts)

    with booted_per_module(tmp_path_factory, wrap, prefix="dfx") as make:
        yield make(INVENTORY)


@pytest.fixture(autouse=True)
def starts_healthy(request):
    if "host" not in request.fixturenames:
        yield
        return
    host = request.getfixturevalue("host")
    host.wait_healthy(what="a healthy host before the test")
    yield
    host.hosts.standin_control(HOST)


def test_healthy_to_begin_with(host):
    code, out, fixes = host.doctor()
    assert code == 0 and out.startswith("healthy: 2 instances active and registered") and not fixes


def test_connected_but_nothing_registered(host):
    """Workers that reconnected and registered nothing are a fault, never "healthy"; restart fixes it."""
    # Positive control: AtoM's behaviour. gearmand restarts; the workers reconnect and register again by
    # themselves, and doctor is healthy with the same worker processes.
    pids = host.hosts.main_pids(HOST)
    host.sh("systemctl restart gearman-job-server")
    host.wait_healthy(what="workers registered again by themselves after gearmand's restart")
    assert host.hosts.main_pids(HOST) == pids
    # The fault: workers without the re-registration (the knob), gearmand restarted.
    host.hosts.standin_control(HOST, reregister=False)
    host.sh(f"systemctl restart {W1} {W2}")
    host.wait_healthy(what="the workers with the knob registered at start")
    host.sh("systemctl restart gearman-job-server")

    def bare_connections():
        # systemd reports gearmand started before it listens: a refused connection here means "not yet".
        out = host.sh("gearadmin --workers", check=False).stdout
        return len(re.findall(r"^\d+ \S+ pid_\d+_\w+ :\s*$", out, re.M)) == 2 and out
    wait_until(bare_connections, timeout=RECONNECT, interval=1, what="two connections with no function")
    data = host.doctor_json()
    finding = next(f for f in data["findings"] if f["code"] == "not_registered")
    assert data["exit_code"] == 3 and not data["healthy"]
    assert finding["subject"] == "site default at 127.0.0.1:4730"
    assert any("0 connections from this host" in e and "for 2 active instances" in e for e in finding["evidence"])
    assert any("2 connections from this host with no function at all" in e for e in finding["evidence"])
    status = json.loads(host.sh("atom-workerctl status --json", check=False).stdout)
    assert status["summary"]["registered"] == 0, status["summary"]
    # The knob is read at start: clear it so the restarted workers behave as AtoM's again.
    host.hosts.standin_control(HOST)
    fix_as_printed(host, ["not_registered"])


def test_worker_cannot_read_its_configuration(host):
    host.sh(f"chmod 0600 {GEARMAN_YML} && cd {ROOT} && php symfony cc >/dev/null && systemctl restart {W2}")
    wait_until(lambda: host.show(W2, "ActiveState")["ActiveState"] != "active", timeout=30, interval=0.5,
               what=f"{W2} failing to read {GEARMAN_YML}")
    out = fix_as_printed(host, ["worker_cannot_read"])
    assert host.sh(f"stat -c %a {GEARMAN_YML}").stdout.strip() == "604"   # o+r, nothing more
    host.sh(f"chmod 0644 {GEARMAN_YML}")  # back to the role's mode
    assert "healthy" in out


def test_worker_cannot_enter_the_atom_root(host):
    """The AtoM root itself (config/'s parent) 0700 root-owned: the fix gives the others only what is missing."""
    host.sh(f"chmod 0700 {ROOT} && cd {ROOT} && php symfony cc >/dev/null")
    host.sh(f"systemctl restart {W2}", check=False)
    wait_until(lambda: host.show(W2, "ActiveState")["ActiveState"] != "active", timeout=30, interval=0.5,
               what=f"{W2} failing to enter {ROOT}")
    code, out, fixes = host.doctor()
    assert f"{ROOT}: mode 0700 root:root; www-data cannot read it, enter it" in out, out
    assert fixes[0] == f"chmod o+rx {ROOT}", out
    fix_as_printed(host, ["worker_cannot_read"])
    host.sh(f"chmod 0755 {ROOT}")  # back to the role's mode


def test_cache_not_writable(host):
    host.sh(f"chown -R root:root {ROOT}/cache && cd {ROOT} && php symfony cc >/dev/null && systemctl restart {W2}")
    wait_until(lambda: host.show(W2, "ActiveState")["ActiveState"] != "active", timeout=30, interval=0.5,
               what=f"{W2} failing to write its cache")
    code, out, fixes = host.doctor()
    assert "cannot write in it" in out and f"chown -R www-data:www-data {ROOT}/cache" in " ".join(fixes), out
    fix_as_printed(host, ["worker_cannot_read"])


def test_executable_missing(host):
    """/usr/bin/php is gone (it is the alternatives link of Debian's php8.2-cli): 203/EXEC at every start."""
    host.sh("rm /usr/bin/php")
    host.sh(f"systemctl restart {W2}", check=False)
    wait_until(lambda: host.show(W2, "ExecMainStatus")["ExecMainStatus"] == "203", timeout=30, interval=0.5,
               what=f"{W2} failing with 203/EXEC")
    code, out, fixes = host.doctor()
    assert "[executable_missing] /usr/bin/php is missing" in out, out
    assert fixes[0] == "update-alternatives --auto php", out
    fix_as_printed(host, ["executable_missing"])


def test_executable_missing_reinstalls_its_package(host):
    """/usr/bin/php8.2, the end of the /usr/bin/php link, is gone: reinstalling php8.2-cli puts it back."""
    host.sh("rm /usr/bin/php8.2")
    host.sh(f"systemctl restart {W2}", check=False)
    wait_until(lambda: host.show(W2, "ExecMainStatus")["ExecMainStatus"] == "203", timeout=30, interval=0.5,
               what=f"{W2} failing with 203/EXEC")
    code, out, fixes = host.doctor()
    assert "/usr/bin/php -> /usr/bin/php8.2, which is gone" in out, out
    assert fixes[0] == "apt-get install -y --reinstall php8.2-cli", out
    fix_as_printed(host, ["executable_missing"])


def test_local_gearmand_stopped(host):
    host.sh("systemctl stop gearman-job-server")
    code, out, fixes = host.doctor()
    assert "connection refused" in out and "gearman-job-server.service: inactive (dead)" in out, out
    fix_as_printed(host, ["gearmand_unreachable"], settle=RECONNECT)


def test_local_gearmand_fails_on_a_corrupt_queue_file(host):
    db = host.sh("grep -o -- '--libsqlite3-db=[^ ]*' /etc/default/gearman-job-server").stdout.strip().split("=", 1)[1]
    host.sh(f"systemctl stop gearman-job-server && head -c 4096 /dev/urandom > {db} && "
            "systemctl start gearman-job-server", check=False)
    wait_until(lambda: host.show("gearman-job-server", "ActiveState")["ActiveState"] == "failed", timeout=120,
               interval=1, what="gearmand failed on its corrupt queue file")
    code, out, fixes = host.doctor()
    assert f"queue file {db} is not an SQLite database" in out and fixes[0].startswith(f"mv {db} {db}.corrupt"), out
    fix_as_printed(host, ["gearmand_unreachable"], settle=RECONNECT)
    host.sh(f"rm -f {db}.corrupt")


def test_config_unreadable(host):
    host.sh(f"cp {GEARMAN_YML} /root/gearman.yml.good && echo 'all: [' >> {GEARMAN_YML}")
    fix_as_printed(host, ["config_unreadable"],
                   human=lambda fix: host.sh(f"cp /root/gearman.yml.good {GEARMAN_YML}"))


def test_servers_differ(host):
    host.sh(f"cp {GEARMAN_YML} /root/gearman.yml.good && sed -i 's/default: 127.0.0.1:4730/default: localhost:4730/' "
            f"{GEARMAN_YML}")
    fix_as_printed(host, ["servers_differ"], human=lambda fix: host.sh(f"cp /root/gearman.yml.good {GEARMAN_YML}"))


def test_prefix_mismatch(host):
    cc = f"cd {ROOT} && runuser -u www-data -- php symfony cc >/dev/null"
    host.sh(f"sed -i \"s/^  workers_key: .*/  workers_key: other/\" {ROOT}/config/app.yml && {cc}")
    try:
        fix_as_printed(host, ["prefix_mismatch", "no_worker_for_job"], settle=RECONNECT)
    finally:
        host.sh(f"sed -i \"s/^  workers_key: .*/  workers_key: ''/\" {ROOT}/config/app.yml && {cc} && "
                "atom-workerctl restart --rolling")


def test_apply_pending(host):
    """A converge that stopped before its handlers were done: app.yml edited by hand, then site.yml writes it
    back but its cache clear fails (a cache file root left behind), so the workers are not restarted on what it
    wrote and the role's note of what it owes stays. doctor names it; the person's step, site.yml again once
    what stopped it is gone, clears the cache, restarts the workers and removes the note."""
    stuck = f"{ROOT}/cache/qubit/stuck"
    host.sh(f"sed -i \"s/^  workers_key: .*/  workers_key: other/\" {ROOT}/config/app.yml")
    host.sh(f"mkdir -p {stuck} && touch {stuck}/file")  # root's: the site's user cannot remove it
    try:
        failed = host.hosts.playbook("playbooks/lab/site.yml")
        assert failed.returncode != 0 and "Unable to remove" in failed.stdout, failed

        def run_site_yml(fix):
            assert "site.yml again" in fix
            host.sh(f"rm -r {stuck}")  # what the failed task named
            result = host.hosts.playbook("playbooks/lab/site.yml")
            assert result.returncode == 0, result
        out = fix_as_printed(host, ["apply_pending"], human=run_site_yml, settle=RECONNECT)
        assert "apply-pending.json" not in out
    finally:
        host.sh(f"rm -rf {stuck}")


def test_apply_pending_with_an_unusable_note(host):
    """The note cut short (a disk full, a run killed while writing it): doctor cannot say what the unfinished
    converge owed, so its fixes move the note aside, have site.yml run again (by hand), clear every site's cache
    and restart every worker, rolling. Run as printed, they end healthy, the note kept aside to look at."""
    note, cut = "/etc/atom-worker/apply-pending.json", '{"config_sites": ["def'
    host.sh(f"printf %s {shlex.quote(cut)} > {note}")
    try:
        code, out, fixes = host.doctor()
        assert code == 3 and "its note of what it owes is unusable: not JSON" in out, out
        assert fixes[0].startswith(f"mv {note} {note}.unreadable   # "), fixes
        assert fixes[-2:] == [f"cd {ROOT} && runuser -u www-data -- php symfony cc",
                              "atom-workerctl restart --rolling"], fixes

        def run_site_yml(fix):
            assert "site.yml again" in fix
            assert host.sh(f"test -e {note}", check=False).returncode != 0  # aside first, as printed
            result = host.hosts.playbook("playbooks/lab/site.yml")
            assert result.returncode == 0, result
        pids = host.hosts.main_pids(HOST)
        out = fix_as_printed(host, ["apply_pending"], human=run_site_yml, settle=RECONNECT)
        assert "apply-pending.json" not in out
        assert all(host.hosts.main_pids(HOST)[unit] != pid for unit, pid in pids.items())  # restarted, as printed
        assert host.sh(f"cat {note}.unreadable").stdout == cut
    finally:
        host.sh(f"rm -f {note} {note}.unreadable")


def test_unit_changed_not_reloaded(host):
    host.sh("echo '# changed on disk' >> /etc/systemd/system/atom-worker@.service")
    try:
        fix_as_printed(host, ["unit_changed_not_reloaded"])
    finally:
        host.sh("sed -i '/# changed on disk/d' /etc/systemd/system/atom-worker@.service && systemctl daemon-reload")


def test_start_limit_hit(host):
    """Deliberate restarts without reset-failed (what atom-workerctl never does) use up the limit."""
    for _ in range(4):
        host.sh(f"systemctl restart {W2}", check=False)
    assert host.show(W2, "Result")["Result"] == "start-limit-hit"
    fix_as_printed(host, ["start_limit_hit"])
    assert host.show(W2, "NRestarts")["NRestarts"] == "0"


def test_crash_loop_waiting_to_restart_gets_its_whole_budget_back(host):
    """Caught in `activating (auto-restart)` with NRestarts=1; repaired; `reset` as printed: NRestarts 0."""
    host.hosts.standin_control(HOST, crash_at_start=3)
    host.sh(f"atom-workerctl restart {W2} --no-wait")

    def waiting_again():
        p = host.show(W2, "ActiveState", "SubState", "NRestarts")
        return p["SubState"] == "auto-restart" and p["NRestarts"] == "1" and p
    wait_until(waiting_again, timeout=60, interval=0.3, what=f"{W2} waiting to restart after its 2nd crash")
    code, out, fixes = host.doctor()
    assert codes(out)[0] == "crash_loop" and f"atom-workerctl reset {W2}" in " ".join(fixes), out
    host.hosts.standin_control(HOST)  # the repair
    fix_as_printed(host, ["crash_loop"])
    props = host.show(W2, "ActiveState", "NRestarts")
    assert props == {"ActiveState": "active", "NRestarts": "0"}, props
    # It stays healthy: no pending restart was left behind to spend a start later.
    time.sleep(12)
    assert host.show(W2, "NRestarts")["NRestarts"] == "0" and host.healthy()


def test_crash_loop_of_a_running_instance(host):
    """A worker that crashed once and runs again (NRestarts=1): reset gives the budget back, no restart."""
    pid = host.hosts.main_pids(HOST)[f"{W2}.service"]
    host.sh(f"kill -9 {pid}")
    wait_until(lambda: host.show(W2, "ActiveState", "NRestarts") == {"ActiveState": "active", "NRestarts": "1"},
               timeout=60, interval=0.5, what=f"{W2} restarted by systemd")
    wait_until(lambda: codes(host.doctor()[1]) == ["crash_loop"], timeout=RECONNECT, interval=1,
               what="crash_loop the only finding once the new process registered")
    running = host.hosts.main_pids(HOST)[f"{W2}.service"]
    fix_as_printed(host, ["crash_loop"])
    assert host.hosts.main_pids(HOST)[f"{W2}.service"] == running        # not restarted
    assert host.show(W2, "NRestarts")["NRestarts"] == "0"


def test_instance_down_and_not_enabled(host):
    host.sh(f"systemctl disable --now {W2}")
    fix_as_printed(host, ["instance_down", "not_enabled"])


def test_no_worker_for_job(host):
    host.sh(f"systemctl stop {W1} {W2}")
    proc = host.sh(f"cd {ROOT} && runuser -u www-data -- php symfony standin:submit --class=arFindingAidJob",
                   check=False)
    assert proc.returncode == 1 and "No Gearman worker available" in proc.stdout + proc.stderr
    fix_as_printed(host, ["instance_down", "no_worker_for_job"])


def test_stray_instance(host):
    host.sh("systemctl start atom-worker@3")
    fix_as_printed(host, ["stray_instance"])
    assert host.show("atom-worker@3", "ActiveState")["ActiveState"] == "inactive"


def test_unit_missing(host):
    """The unit file is gone: site.yml (a person runs it) installs it again and starts the instance."""
    host.sh(f"systemctl stop {W2} && mv /etc/systemd/system/atom-worker@.service /root/ && systemctl daemon-reload")

    def run_site_yml(fix):
        assert "site.yml" in fix
        host.sh("rm -f /root/atom-worker@.service")
        result = host.hosts.playbook("playbooks/lab/site.yml")
        assert result.returncode == 0, result
    fix_as_printed(host, ["unit_missing"], human=run_site_yml, settle=RECONNECT)


def test_no_pool_for_job(host):
    """Pools that leave job types to nobody: site.yml with `atom_worker_types: [general]` (only arFindingAidJob);
    every other class of gearman.yml has no worker anywhere. The person's step: site.yml with every type."""
    result = host.hosts.playbook("playbooks/lab/site.yml", extra_vars={"atom_worker_types": ["general"]})
    assert result.returncode == 0, result

    def only_general():
        status = host.sh("gearadmin --status").stdout
        return "-arFindingAidJob\t" in status and not re.search(r"-arObjectMoveJob\t\d+\t\d+\t[1-9]", status)
    wait_until(only_general, timeout=RECONNECT, interval=1, what="the workers registered arFindingAidJob only",
               details=lambda: host.sh("gearadmin --status").stdout)

    def run_site_yml(fix):
        assert "site.yml" in fix
        result = host.hosts.playbook("playbooks/lab/site.yml")
        assert result.returncode == 0, result
    fix_as_printed(host, ["no_pool_for_job"], human=run_site_yml, settle=RECONNECT)


def sql(host, query):
    """One query on the site's database as root (MariaDB's socket authentication); rows of tab-separated text."""
    out = host.sh(f"mariadb --batch --skip-column-names atom -e {shlex.quote(query)}").stdout
    return [line.split("\t") for line in out.splitlines()]


def test_a_lost_move_is_a_stale_job(host):
    """Issue 15's drill on systemd: a move whose worker is SIGKILLed is dropped by gearmand, its row stays in
    progress and a second move waits behind it; doctor names the row with the fix, which (with the crash
    loop's reset) makes the host healthy, the second move completes and no other row changed."""
    host.hosts.standin_control(HOST, sensitive_wait=1, sensitive_retries=120)
    host.sh(f"systemctl restart {W1} {W2}")  # the knobs are read at start
    host.wait_healthy(what="both workers registered again")

    def submit(payload):
        out = host.sh(f"cd {ROOT} && runuser -u www-data -- php symfony standin:submit --class=arObjectMoveJob "
                      f"--user=archivist --payload={shlex.quote(json.dumps(payload))}").stdout
        return int(out.split()[0])

    def started_by(job_id):
        for line in host.sh(f"cat {ROOT}/log/standin-record.jsonl").stdout.splitlines():
            event = json.loads(line)
            if event.get("event") == "job-start" and event.get("id") == job_id:
                return event["pid"]
        return None

    # Some history the fix must leave alone: a completed job and one that ended in error (with its note).
    for payload in ({}, {"fail": "disk full"}):
        host.sh(f"cd {ROOT} && runuser -u www-data -- php symfony standin:submit --class=arFindingAidJob "
                f"--payload={shlex.quote(json.dumps(payload))}")
    wait_until(lambda: sql(host, "SELECT COUNT(*) FROM job WHERE status_id IN (184, 185)") == [["2"]],
               timeout=30, interval=0.5, what="two finding aids done")
    first = submit({"sleep": 600})
    pid = wait_until(lambda: started_by(first), timeout=30, interval=0.5, what=f"job {first} started")
    # Positive control: while its worker runs it, the row is not stale.
    assert host.sh("atom-workerctl jobs --stale", check=False).returncode == 0
    host.sh(f"kill -KILL {pid}")
    # The site's own function: gearmand still lists the functions of prefixes used before (another test
    # changes workers_key and back), with the same class name.
    move = hashlib.md5(ROOT.encode()).hexdigest() + "-arObjectMoveJob"
    wait_until(lambda: re.search(rf"^{move}\t0\t0\t", host.sh("gearadmin --status").stdout, re.M),
               timeout=30, interval=0.5, what="gearmand dropped the lost move",
               details=lambda: host.sh("gearadmin --status; grep -o -- '--job-retries=[0-9]*' "
                                       "/etc/default/gearman-job-server; tail -n 5 /var/log/gearman-job-server/"
                                       "gearmand.log", check=False).stdout)
    second = submit({})
    wait_until(lambda: "Another sensitive job" in "".join(c for r in sql(host, f"SELECT output FROM job WHERE id = "
                                                                     f"{second}") for c in r),
               timeout=60, interval=1, what=f"job {second} waiting behind job {first}")
    wait_until(lambda: int(sql(host, f"SELECT TIMESTAMPDIFF(SECOND, created_at, NOW()) FROM object "
                                     f"WHERE id = {first}")[0][0]) > 10, timeout=20, interval=1,
               what="the lost row older than the grace time")
    stale = host.sh("atom-workerctl jobs --stale --json", check=False)
    assert stale.returncode == 3, stale.stdout + stale.stderr
    (row,) = [j for site in json.loads(stale.stdout)["sites"] for j in site["jobs"]]
    assert row["id"] == first and row["now"]["blocking"] == [second], row
    assert any(f"(PID {pid}) started it" in e for e in row["now"]["evidence"]), row

    def other_rows():
        """Every row of the job, object and note tables but the two moves'."""
        return [sql(host, f"SELECT * FROM {table} WHERE {key} NOT IN ({first}, {second}) ORDER BY id")
                for table, key in (("job", "id"), ("object", "id"), ("note", "object_id"))]
    before = other_rows()
    assert len(before[0]) >= 2 and before[2], "no other rows: the check below would prove nothing"
    out = fix_as_printed(host, ["crash_loop", "stale_job"], settle=RECONNECT)
    assert "healthy" in out
    assert sql(host, f"SELECT status_id FROM job WHERE id = {first}") == [["185"]]
    # The second move runs on its worker's next look at the table (every sensitive_wait = 1 s, as AtoM's
    # retry does): after the fix, not at once. (Asserted at once, it failed once in a clean-clone run, the
    # row still in progress right after doctor said healthy.)
    wait_until(lambda: sql(host, f"SELECT status_id FROM job WHERE id = {second}") == [["184"]], timeout=30,
               interval=0.5, what=f"job {second} completed once job {first} no longer blocks it",
               details=lambda: sql(host, f"SELECT status_id, output FROM job WHERE id = {second}"))
    assert other_rows() == before


def test_the_database_down(host):
    """AtoM's job table cannot be read: a warning (the workers do not need it to run), whose fix starts the
    local MariaDB."""
    host.sh("systemctl stop mariadb")
    code, out, fixes = host.doctor()
    assert code == 0 and "WARNING [jobs_unreadable]" in out and "Can't connect" in out, out
    assert fixes[0].startswith("systemctl start mariadb"), fixes
    fix_as_printed(host, ["jobs_unreadable"])


def test_every_finding_code_of_the_readme_is_made_here():
    """Every code of the table is made here, but those marked "supervisord and circus hosts only", which
    tests/supervisor/test_supervisor_cli.py and tests/circus/test_circus_cli.py make the same way (fix_as_printed)
    against a private supervisord and a private circusd."""
    readme = (TESTS.parent / "tools" / "atom_workerctl" / "README.md").read_text()
    table = readme.split("## doctor's findings", 1)[1].split("\n## ", 1)[0]
    cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    documented = set(re.findall(r"`([a-z_]+)`", " ".join(cells)))
    supervisord_only = set(re.findall(r"`([a-z_]+)`", " ".join(c for c in cells
                                                                if "supervisord and circus hosts only" in c)))

    def made(module, fixture):
        return {code for group in re.findall(rf"fix_as_printed\({fixture}, \[([^\]]*)\]", module.read_text())
                for code in re.findall(r'"(\w+)"', group)}
    here = made(Path(__file__), "host")
    assert documented and documented - supervisord_only <= here, sorted(documented - supervisord_only - here)
    for module in (TESTS / "supervisor" / "test_supervisor_cli.py", TESTS / "circus" / "test_circus_cli.py"):
        there = made(module, "lab")
        assert supervisord_only <= there, (module.name, sorted(supervisord_only - there))
