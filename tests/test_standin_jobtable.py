"""The stand-in with AtoM's job table: a real MariaDB, a real gearmand, real stand-in workers.

What AtoM does (docs/facts.md, "AtoM's job table") and the stand-in must copy: the web app inserts the row
(in progress) before it submits the job with the row's id; the worker marks it completed or error (with
completed_at and an error note); moves and imports wait for older moves and imports in progress.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mariadb import MariaDB, write_site_database
from standin import Gearmand, Worker, events, function_prefix, make_root, submit, wait_until, write_control

pytestmark = pytest.mark.timeout(120)

IN_PROGRESS, COMPLETED, ERROR, ERROR_NOTE = 183, 184, 185, 197


@pytest.fixture(scope="module")
def db() -> Iterator[MariaDB]:
    with MariaDB() as m:
        yield m


@pytest.fixture
def root(tmp_path: Path, gearmand: Gearmand, db: MariaDB) -> Iterator[Path]:
    r = make_root(tmp_path / "atom", servers=[gearmand.server])
    write_site_database(r, db)
    yield r
    db.query("DELETE FROM object")  # jobs, notes and users go with their objects (ON DELETE CASCADE)


def start(workers: list[Worker], root: Path, *options: str) -> Worker:
    w = Worker(root, *options)
    workers.append(w)
    w.wait_for_message("Running worker...")
    return w


def row(db: MariaDB, job_id) -> tuple:
    rows = db.query("SELECT j.name, j.status_id, j.completed_at, u.username, o.class_name FROM job j "
                    "JOIN object o ON o.id = j.id LEFT JOIN user u ON u.id = j.user_id WHERE j.id = %s", int(job_id))
    assert len(rows) == 1, f"job row {job_id}: {rows}"
    return rows[0]


def notes(db: MariaDB, job_id) -> list[tuple]:
    return db.query("SELECT n.type_id, i.content FROM note n JOIN note_i18n i ON i.id = n.id "
                    "WHERE n.object_id = %s ORDER BY n.id", int(job_id))


def ended(root: Path, job_id) -> dict | None:
    hits = events(root, "job", id=int(job_id))
    return hits[0] if hits else None


def test_submit_inserts_the_row_in_progress_and_the_worker_completes_it(root, db, workers):
    worker = start(workers, root, "--abilities=arFindingAidJob")
    (job_id,) = submit(root, "arFindingAidJob", payload={"sleep": 1.5}, user="archivist")
    # While the job runs, the row says in progress ("Running" on AtoM's Manage > Jobs page).
    worker.wait_for_message(f'Parameters: {{"sleep":1.5,"id":{job_id},"name":"arFindingAidJob"}}')
    name, status, completed_at, user, cls = row(db, job_id)
    assert (name, status, completed_at, user, cls) == ("arFindingAidJob", IN_PROGRESS, None, "archivist", "QubitJob")
    wait_until(lambda: ended(root, job_id), 10)
    name, status, completed_at, user, _ = row(db, job_id)
    assert status == COMPLETED and completed_at is not None
    assert notes(db, job_id) == []
    # arJobLogger: the console has the bare messages, the row's output the same lines with the job's id.
    output = db.query("SELECT output FROM job WHERE id = %s", int(job_id))[0][0].splitlines()
    assert [line.split("] ", 2)[2] for line in output] == [
        f'Job {job_id} "arFindingAidJob": Job started.',
        f'Job {job_id} "arFindingAidJob": Parameters: {{"sleep":1.5,"id":{job_id},"name":"arFindingAidJob"}}',
        f'Job {job_id} "arFindingAidJob": Job finished.']
    assert all(line.startswith("[info] [") for line in output)
    assert [m for m in worker.messages() if m.startswith("Job ")] == ["Job started.", "Job finished."]


def test_an_error_marks_the_row_with_a_note_and_the_job_still_ends(root, db, gearmand, workers):
    worker = start(workers, root, "--abilities=arFindingAidJob")
    (job_id,) = submit(root, "arFindingAidJob", payload={"fail": "disk full"})
    wait_until(lambda: ended(root, job_id), 10)
    _, status, completed_at, _, _ = row(db, job_id)
    assert status == ERROR and completed_at is not None
    assert notes(db, job_id) == [(ERROR_NOTE, "Exception: disk full")]
    assert ended(root, job_id)["status"] == "error"
    # arBaseJob catches the error: gearmand sees the job end (nothing queued again), the worker goes on.
    assert gearmand.status().get(f"{function_prefix(root)}arFindingAidJob", (0, 0, 0))[:2] == (0, 0)
    assert worker.returncode is None


def test_a_job_whose_row_is_gone_fails_and_writes_nothing(root, db, workers):
    worker = start(workers, root, "--abilities=arFindingAidJob")
    before = db.query("SELECT COUNT(*) FROM object")[0][0]
    submit(root, "arFindingAidJob", payload={"id": 999999})
    worker.wait_for_message("Job failed: Called a Gearman worker with an invalid QubitJob id.")
    assert db.query("SELECT COUNT(*) FROM object")[0][0] == before


def test_a_move_waits_behind_an_older_move_in_progress_then_gives_up(root, db, workers):
    write_control(root, sensitive_wait=0.3, sensitive_retries=3)
    worker = start(workers, root, "--abilities=arObjectMoveJob")
    # A row left in progress by a move nobody runs (its worker was killed and gearmand lost the job).
    stale = _insert_in_progress(db, "arObjectMoveJob", age_s=60)
    (second,) = submit(root, "arObjectMoveJob")
    wait_until(lambda: ended(root, second), 20)
    retries = [m for m in worker.messages() if m.startswith("Another sensitive job is being executed")]
    assert len(retries) == 3
    assert row(db, second)[1] == ERROR
    gave_up = ("Maximum retries reached (3). Please, try to launch the job again when other sensitive jobs are "
               "finished or contact an administrator")
    assert notes(db, second) == [(ERROR_NOTE, gave_up)]
    # Positive control: with the stale row no longer in progress, the next move runs at once.
    db.query("UPDATE job SET status_id = %s WHERE id = %s", ERROR, stale)
    (third,) = submit(root, "arObjectMoveJob")
    wait_until(lambda: ended(root, third), 10)
    assert row(db, third)[1] == COMPLETED
    assert len([m for m in worker.messages() if m.startswith("Another sensitive job")]) == 3  # none more


def test_moves_and_imports_run_one_at_a_time_oldest_first(root, db, workers):
    write_control(root, sensitive_wait=0.2, sensitive_retries=50)
    first_worker = start(workers, root, "--abilities=arObjectMoveJob,arFileImportJob")
    second_worker = start(workers, root, "--abilities=arObjectMoveJob,arFileImportJob")
    (move,) = submit(root, "arObjectMoveJob", payload={"sleep": 2})
    wait_until(lambda: events(root, "job-start", id=int(move)), 10)
    moving = events(root, "job-start", id=int(move))[0]["time"]
    (imp,) = submit(root, "arFileImportJob")
    wait_until(lambda: ended(root, imp) and ended(root, move), 20)
    # The import ran only once the move's row was completed, so it ended after the move's 2 s of work. Not
    # "the move's end event before the import's": the move completes its row, then records its end; the
    # import, polling, may run and end in between (a CI run saw exactly that under load).
    assert ended(root, imp)["time"] >= moving + 2.0, (moving, ended(root, imp))
    assert row(db, move)[1] == COMPLETED and row(db, imp)[1] == COMPLETED
    output = db.query("SELECT output FROM job WHERE id = %s", int(imp))[0][0]
    assert f'Job {imp} "arFileImportJob": Another sensitive job is being executed' in output, output
    assert any(m.startswith("Another sensitive job") for w in (first_worker, second_worker) for m in w.messages())


def _insert_in_progress(db: MariaDB, cls: str, age_s: int) -> int:
    conn = db.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO object (class_name, created_at, updated_at) VALUES "
                        "('QubitJob', NOW() - INTERVAL %s SECOND, NOW() - INTERVAL %s SECOND)", (age_s, age_s))
            job_id = cur.lastrowid
            cur.execute("INSERT INTO job (id, name, status_id) VALUES (%s, %s, %s)", (job_id, cls, IN_PROGRESS))
        return job_id
    finally:
        conn.close()
