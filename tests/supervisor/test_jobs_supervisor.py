"""`atom-workerctl jobs` and doctor's stale-job finding, locally, for real: AtoM's job table in a throw-away
MariaDB, the stand-in's workers under a private supervisord (policy listener), a real gearmand that drops a
job after one failed attempt (`--job-retries=1`, as a job server that lost it would).

The drill of issue 15: a move whose worker is SIGKILLed is lost by gearmand, its row stays in progress, a
second move waits behind it. `jobs --stale` names the first with its evidence, doctor reports it, the fix
doctor prints is run as printed, the second move completes, and no other row changed.
"""

import csv
import hashlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import prom_text
import pytest
import supervisor_harness
from manager_tests import plain_env
from mariadb import MariaDB, write_site_database
from standin import Gearmand, events, function_prefix, make_root, submit, wait_until, write_control
from supervisor_harness import make_units, write_sites_json

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "tools"), "NO_COLOR": "1"}
NS1, NS2 = "atom-workers:atom-worker@1", "atom-workers:atom-worker@2"
IN_PROGRESS, COMPLETED, ERROR = 183, 184, 185

pytestmark = pytest.mark.timeout(120)


class Lab:
    def __init__(self, sv, gearmand, db, root, config):
        self.sv, self.gearmand, self.db, self.root, self.config = sv, gearmand, db, root, config

    def cli(self, *args, stdin=None):
        cmd = [sys.executable, "-m", "atom_workerctl", "--config", str(self.config), *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=60, check=False,
                              stdin=stdin if stdin is not None else subprocess.DEVNULL)

    def jobs_metrics(self, *args) -> tuple:
        """`metrics`' job series of the site: (database up, rows in progress, stale rows)."""
        result = self.cli("metrics", "--functions", "no", *args)
        assert result.returncode == 0, result.stderr
        text = result.stdout
        if "--output" in args:
            assert text == ""
            text = Path(args[args.index("--output") + 1]).read_text()
        return tuple(prom_text.value(text, f"atom_worker_jobs_{name}", site="default")
                     for name in ("database_up", "in_progress", "stale"))

    def status(self, job_id) -> int:
        return self.db.query("SELECT status_id FROM job WHERE id = %s", int(job_id))[0][0]

    def checksum(self, *leave_out) -> str:
        """Every row of job, object, note and note_i18n except those of the rows left out."""
        rows = []
        leave_out = leave_out or (0,)  # no row has id 0 (`NOT IN (NULL)` would match nothing at all)
        marks = ",".join(["%s"] * len(leave_out))
        for table, key in (("job", "id"), ("object", "id"), ("note", "object_id")):
            rows += self.db.query(f"SELECT * FROM {table} WHERE {key} NOT IN ({marks}) ORDER BY id", *leave_out)
        rows += self.db.query("SELECT i.* FROM note_i18n i JOIN note n ON n.id = i.id "
                              f"WHERE n.object_id NOT IN ({marks}) ORDER BY i.id", *leave_out)
        return hashlib.sha256(repr(rows).encode()).hexdigest()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    for tool in ("php", "gearmand", "mariadbd", supervisor_harness.SUPERVISORD):
        assert shutil.which(tool), f"missing {tool}: make deps (apt-packages.txt)"
    base = tmp_path_factory.mktemp("jobs")
    sockdir = Path(tempfile.mkdtemp(prefix="sv-"))
    gearmand = Gearmand(extra=["--job-retries=1"]).start()
    db = MariaDB().start()
    sv = supervisor_harness.Supervisord(base, sockdir)
    try:
        root = make_root(base / "standin", servers=[gearmand.server])
        write_site_database(root, db)
        write_control(root, sensitive_wait=1, sensitive_retries=90)
        helper = base / "atom-worker-recycle"
        helper.write_text(plain_env().get_template("atom-worker-recycle.j2").render())
        helper.chmod(0o755)
        server = f"{gearmand.server[0]}:{gearmand.server[1]}"
        sites = [{"name": "default", "root": str(root), "gearman_servers": [server],
                  "pools": [{"name": "default", "instances": 2, "types": ["general", "move"]}]}]
        units = make_units(root, [], php=shutil.which("php"), sites=sites, recycle_helper=str(helper))
        config = base / "sites.json"
        write_sites_json(config, sv, sites, units, root)
        sv.start(units, wait_running=[NS1, NS2])
        lab = Lab(sv, gearmand, db, root, config)
        function = f"{function_prefix(lab.root)}arObjectMoveJob"
        sv.wait(lambda: gearmand.available(function) == 2, 30, "both workers registered")
        yield lab
    finally:
        sv.stop()
        gearmand.stop()
        db.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


def _history(lab) -> list[int]:
    """Finished rows of another day (a completed one with no note, an error with its note), for the
    checksum to mean something and for export and clear."""
    ids = []
    conn = lab.db.connect()
    with conn.cursor() as cur:
        for days, status, note in ((120, COMPLETED, None), (100, ERROR, "Exception: disk full"), (2, COMPLETED, None)):
            cur.execute("INSERT INTO object (class_name, created_at, updated_at) VALUES ('QubitJob', "
                        "NOW() - INTERVAL %s DAY, NOW() - INTERVAL %s DAY)", (days, days))
            job_id = cur.lastrowid
            cur.execute("INSERT INTO job (id, name, status_id, completed_at) VALUES (%s, 'arFindingAidJob', %s, "
                        "NOW() - INTERVAL %s DAY + INTERVAL 1 MINUTE)", (job_id, status, days))
            if note:
                cur.execute("INSERT INTO note (object_id, type_id, source_culture) VALUES (%s, 197, 'en')", (job_id,))
                cur.execute("INSERT INTO note_i18n (content, id, culture) VALUES (%s, %s, 'en')",
                            (note, cur.lastrowid))
            ids.append(job_id)
    conn.close()
    return ids


def _worker_pid(lab, job_id) -> int:
    """The PHP worker process that started the job (the stand-in's record)."""
    return wait_until(lambda: next((e["pid"] for e in events(lab.root, "job-start", id=int(job_id))), None), 20)


def test_a_lost_move_is_found_stale_reported_failed_alone_and_the_next_move_completes(lab):
    old_completed, old_error, recent = _history(lab)

    # A move runs: it is running, not stale (the positive control of every "stale" below).
    (first,) = submit(lab.root, "arObjectMoveJob", payload={"sleep": 600}, user="archivist")
    pid = _worker_pid(lab, first)
    listing = lab.cli("jobs", "--json")
    assert listing.returncode == 0, listing.stderr
    row = {j["id"]: j for s in json.loads(listing.stdout)["sites"] for j in s["jobs"]}[int(first)]
    assert row["status"] == "running" and row["user"] == "archivist"
    assert row["now"]["state"] == "running", row
    assert f"(PID {pid})" in row["now"]["summary"]
    stale = lab.cli("jobs", "--stale")
    assert stale.returncode == 0, stale.stdout + stale.stderr
    assert "no stale job" in stale.stdout
    assert lab.jobs_metrics() == (1, 1, 0)
    refused = lab.cli("jobs", "fail", str(first))
    assert refused.returncode == 1 and "not stale (running" in refused.stderr, refused.stderr
    assert lab.status(first) == IN_PROGRESS

    # Its worker is killed: gearmand gives up on the job (--job-retries=1), the row stays in progress.
    os.kill(pid, signal.SIGKILL)
    function = f"{function_prefix(lab.root)}arObjectMoveJob"
    wait_until(lambda: lab.gearmand.status().get(function, (0, 0, 0))[:2] == (0, 0), 20)
    wait_until(lambda: lab.gearmand.available(function) == 2, 30)  # supervisord started it again
    assert lab.status(first) == IN_PROGRESS

    # A second move waits behind it, as AtoM's do.
    (second,) = submit(lab.root, "arObjectMoveJob")
    wait_until(lambda: "Another sensitive job" in _output(lab, second), 20)
    assert any(line.endswith("> Another sensitive job is being executed, will retry in 1 seconds")
               for line in _worker_logs(lab))

    # A row younger than the grace time is never called stale (the web app commits it just before it
    # submits the job); the lost one is, once it is older.
    if _age(lab, first) < 8:
        young = json.loads(lab.cli("jobs", "--json").stdout)
        verdict = {j["id"]: j for s in young["sites"] for j in s["jobs"]}[int(first)]["now"]
        assert (verdict["state"], verdict["summary"]) == ("uncertain", "just submitted"), verdict
    wait_until(lambda: _age(lab, first) > 10, 20)
    stale = lab.cli("jobs", "--stale", "--json")
    assert stale.returncode == 3, stale.stdout + stale.stderr
    found = {j["id"]: j for s in json.loads(stale.stdout)["sites"] for j in s["jobs"]}
    assert set(found) == {int(first)}
    verdict = found[int(first)]["now"]
    assert verdict["state"] == "stale" and verdict["blocking"] == [int(second)]
    assert any(f"(PID {pid}) started it" in e and "gone" in e for e in verdict["evidence"]), verdict
    assert any("0 waiting, 1 running" in e for e in verdict["evidence"]), verdict
    human = lab.cli("jobs", "--stale")
    assert f"STALE job {first} arObjectMoveJob" in human.stdout and f"{second} arObjectMoveJob" in human.stdout
    listing = json.loads(lab.cli("jobs", "--json").stdout)
    second_now = {j["id"]: j for s in listing["sites"] for j in s["jobs"]}[int(second)]["now"]
    assert second_now["state"] == "waiting", second_now
    assert lab.jobs_metrics() == (1, 2, 1)  # the one stale row; the one waiting behind it is not
    prom = Path(tempfile.mkdtemp(prefix="metrics-")) / "atom-worker.prom"
    assert lab.jobs_metrics("--output", str(prom), "--jobs-every", "3600") == (1, 2, 1)  # read, and kept

    # doctor reports it, with the fixing command; the fix is run exactly as printed.
    doctor = lab.cli("doctor", "--json")
    assert doctor.returncode == 3, doctor.stdout + doctor.stderr
    findings = [f for f in json.loads(doctor.stdout)["findings"] if f["code"] == "stale_job"]
    assert len(findings) == 1 and str(first) in findings[0]["subject"], findings
    (fix,) = findings[0]["fix"]
    before = lab.checksum(first, second)
    argv = shlex.split(fix)
    assert argv[0] == "atom-workerctl"
    done = lab.cli(*argv[1:])
    assert done.returncode == 0, done.stderr
    assert lab.checksum(first, second) == before
    assert lab.status(first) == ERROR
    note = lab.db.query("SELECT i.content FROM note n JOIN note_i18n i ON i.id = n.id WHERE n.object_id = %s",
                        int(first))
    assert len(note) == 1 and "atom-workerctl" in note[0][0]
    wait_until(lambda: lab.status(second) == COMPLETED, 30)
    assert lab.cli("jobs", "--stale").returncode == 0
    assert not [f for f in json.loads(lab.cli("doctor", "--json").stdout)["findings"] if f["code"] == "stale_job"]
    assert lab.jobs_metrics() == (1, 0, 0)
    # Written to a file, the job table is read at most every --jobs-every seconds (default 300; an hour here,
    # so that a slow machine cannot make this test read it again): the runs between reuse the counts kept
    # beside the file, so this one still says what the table said then.
    assert lab.jobs_metrics("--output", str(prom), "--jobs-every", "3600") == (1, 2, 1)
    assert lab.jobs_metrics("--output", str(prom), "--jobs-every", "0") == (1, 0, 0)
    shutil.rmtree(prom.parent)

    # The history, as AtoM's own CSV export has it.
    exported = lab.cli("jobs", "export")
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.splitlines()[0] == "startDate,endDate,jobName,jobStatus,jobInfo,jobUser"
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert len(rows) == 5
    by_info = {r["jobInfo"]: r for r in rows}
    assert by_info["Exception: disk full"]["jobStatus"] == "Error"
    assert by_info["Exception: disk full"]["jobUser"] == "None"
    moved = [r for r in rows if r["jobName"] == "arObjectMoveJob"]
    assert {r["jobStatus"] for r in moved} == {"Error", "Completed"} and moved[0]["jobUser"] == "archivist"

    # The newest rows first, as many as asked; by status.
    newest = [j["id"] for s in json.loads(lab.cli("jobs", "-n", "2", "--json").stdout)["sites"] for j in s["jobs"]]
    assert newest == [int(second), int(first)]
    errors = [j["id"] for s in json.loads(lab.cli("jobs", "--status", "error", "--json").stdout)["sites"]
              for j in s["jobs"]]
    assert errors == [int(first), old_error]

    # clear: finished rows before the time only, never without --yes off a terminal.
    refused = lab.cli("jobs", "clear", "--before", "30 days ago")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert lab.db.query("SELECT COUNT(*) FROM job")[0][0] == 5
    keep = lab.checksum(old_completed, old_error)
    cleared = lab.cli("jobs", "clear", "--before", "30 days ago", "--yes")
    assert cleared.returncode == 0, cleared.stderr
    assert "2 finished job(s)" in cleared.stderr and "deleted 2 job(s)" in cleared.stderr
    remaining = {r[0] for r in lab.db.query("SELECT id FROM job")}
    assert remaining == {recent, int(first), int(second)}
    assert lab.db.query("SELECT COUNT(*) FROM note WHERE object_id IN (%s, %s)", old_completed, old_error) == [(0,)]
    assert lab.checksum() == keep

    # A job table that cannot be read is a series too (database_up 0; every reading above was 1), and
    # metrics still succeeds.
    config_php = lab.root / "config" / "config.php"
    good = config_php.read_text()
    config_php.write_text(good.replace("s3cret", "wrong"))
    try:
        assert lab.jobs_metrics() == (0, None, None)
    finally:
        config_php.write_text(good)


def _output(lab, job_id) -> str:
    return lab.db.query("SELECT output FROM job WHERE id = %s", int(job_id))[0][0] or ""


def _age(lab, job_id) -> int:
    return lab.db.query("SELECT TIMESTAMPDIFF(SECOND, created_at, NOW()) FROM object WHERE id = %s", int(job_id))[0][0]


def _worker_logs(lab) -> list[str]:
    out = []
    for path in lab.sv.log_dir.glob("atom-worker@*.log*"):
        out += path.read_text(errors="replace").splitlines()
    return out
