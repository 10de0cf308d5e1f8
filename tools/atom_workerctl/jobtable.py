"""AtoM's job table (MySQL/MariaDB through PyMySQL): read the jobs, mark one failed, export, clear.

The rows are AtoM's own (data/sql/lib.model.schema.sql): every `job` row is an `object` row with the same
id (`created_at` is when the web app submitted it); `status_id` 183 in progress ("Running" on Manage >
Jobs), 184 completed, 185 error; an error's message is a `note` (`type_id` 197) with its text in
`note_i18n`. Nothing here changes a row it was not asked to change: `fail` updates only the given rows that
are still in progress, `clear` deletes only finished rows (and their notes) older than a time.
Times are the database's own (DATETIME, its time zone); ages are computed by the database.
"""

from __future__ import annotations

from .errors import WorkerctlError
from .phpconfig import Database

IN_PROGRESS, COMPLETED, ERROR = 183, 184, 185
ERROR_NOTE = 197
STATUS_NAMES = {IN_PROGRESS: "running", COMPLETED: "completed", ERROR: "error"}
STATUS_IDS = {v: k for k, v in STATUS_NAMES.items()}
# arBaseJob::$avoidParallelExecutionJobs: they run one at a time, oldest first; a stale row blocks the rest.
SENSITIVE = ("arObjectMoveJob", "arFileImportJob")
TIMEOUT = 10


class DatabaseError(WorkerctlError):
    """The site's database refused or is unreachable (the message never holds the password)."""


class Job:
    __slots__ = ("id", "name", "status_id", "created_at", "completed_at", "user", "age_s", "notes", "output")

    def __init__(self, row: tuple):
        self.id, self.name, self.status_id, self.created_at, self.completed_at, self.user, self.age_s = row[:7]
        self.output: str = (row[7] if len(row) > 7 else None) or ""
        self.notes: list[str] = []

    def output_lines(self) -> list[str]:
        """The lines the job logged (arJobLogger: `[level] [Y-m-d H:i:s] Job <id> "<Class>": message`)."""
        return [line for line in self.output.splitlines() if line.strip()]

    @property
    def status(self) -> str:
        return STATUS_NAMES.get(self.status_id, f"status {self.status_id}")

    @property
    def running(self) -> bool:
        return self.status_id == IN_PROGRESS

    def as_dict(self, output: bool = False) -> dict:
        return {"id": self.id, "class": self.name, "user": self.user, "status": self.status,
                "status_id": self.status_id, "started": stamp(self.created_at),
                "completed": stamp(self.completed_at), "age_s": self.age_s, "notes": self.notes,
                **({"output": self.output} if output else {})}

    @classmethod
    def from_dict(cls, d: dict) -> Job:
        """A row another host read (its `jobs --json`), for the fleet's judgement."""
        job = cls((d["id"], d.get("class"), d["status_id"], _datetime(d.get("started")),
                   _datetime(d.get("completed")), d.get("user"), d.get("age_s"), d.get("output")))
        job.notes = list(d.get("notes") or [])
        return job


def stamp(value) -> str | None:
    """A DATETIME as the database shows it, None when unset."""
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else None


def _datetime(text: str | None):
    from datetime import datetime

    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S") if text else None


def connect(db: Database):
    """A connection, or one readable line saying why not."""
    try:
        import pymysql
    except ImportError:
        raise DatabaseError("reading AtoM's jobs needs PyMySQL (Debian: apt-get install python3-pymysql)") from None
    kw = {"unix_socket": db.unix_socket} if db.unix_socket else {"host": db.host, "port": db.port}
    try:
        return pymysql.connect(user=db.username, password=db.password, database=db.dbname, charset="utf8mb4",
                               connect_timeout=TIMEOUT, read_timeout=60, write_timeout=60, autocommit=False, **kw)
    except pymysql.MySQLError as exc:
        raise DatabaseError(f"{db.describe()}: {_reason(exc)}") from None
    except (OSError, ValueError, OverflowError) as exc:
        raise DatabaseError(f"{db.describe()}: {exc}") from None


def _reason(exc) -> str:
    args = getattr(exc, "args", ())
    text = str(args[1]) if len(args) > 1 else str(exc)
    return text.replace("\n", " ").strip() or type(exc).__name__


class JobTable:
    def __init__(self, db: Database):
        self.db = db
        self.conn = connect(db)

    def close(self) -> None:
        import contextlib

        with contextlib.suppress(Exception):  # closing a connection that already broke
            self.conn.close()

    def _run(self, sql: str, args=()) -> list[tuple]:
        import pymysql

        try:
            with self.conn.cursor() as cur:
                cur.execute(sql, args)
                return list(cur.fetchall())
        except pymysql.MySQLError as exc:
            raise DatabaseError(f"{self.db.describe()}: {_reason(exc)}") from None

    def jobs(self, statuses: list[int] | None = None, since: str | None = None, before: str | None = None,
             ids: list[int] | None = None, oldest_first: bool = False, notes: bool = False,
             output: bool = False, limit: int | None = None) -> list[Job]:
        """Rows newest first (by object.created_at, then id; `limit` of them); `since`/`before` are
        'YYYY-MM-DD HH:MM:SS'; `notes` and `output` fetch those too."""
        where, args = [], []
        if statuses:
            where.append(f"j.status_id IN ({', '.join(['%s'] * len(statuses))})")
            args += statuses
        if since:
            where.append("o.created_at >= %s")
            args.append(since)
        if before:
            where.append("COALESCE(j.completed_at, o.created_at) < %s")
            args.append(before)
        if ids:
            where.append(f"j.id IN ({', '.join(['%s'] * len(ids))})")
            args += ids
        order = "ASC" if oldest_first else "DESC"
        rows = self._run(
            "SELECT j.id, j.name, j.status_id, o.created_at, j.completed_at, u.username, "
            "TIMESTAMPDIFF(SECOND, o.created_at, NOW())" + (", j.output" if output else "")
            + " FROM job j JOIN object o ON o.id = j.id "
            "LEFT JOIN user u ON u.id = j.user_id"
            + (" WHERE " + " AND ".join(where) if where else "")
            + f" ORDER BY o.created_at {order}, j.id {order}" + (" LIMIT %s" if limit else ""),
            [*args, limit] if limit else args)
        jobs = [Job(r) for r in rows]
        if notes and jobs:
            by_id = {j.id: j for j in jobs}
            for object_id, content in self._run(
                    "SELECT n.object_id, i.content FROM note n JOIN note_i18n i ON i.id = n.id "
                    f"WHERE n.object_id IN ({', '.join(['%s'] * len(by_id))}) ORDER BY n.id", list(by_id)):
                by_id[object_id].notes.append(content or "")
        return jobs

    def fail(self, job_ids: list[int], note: str) -> list[int]:
        """Mark these rows error with completed_at now and `note` as an error note, as AtoM's own error
        path does (QubitJob::setStatusError); only rows still in progress change. Returns the ids changed."""
        import pymysql

        changed = []
        try:
            with self.conn.cursor() as cur:
                for job_id in job_ids:
                    if not cur.execute("UPDATE job SET status_id = %s, completed_at = NOW() "
                                       "WHERE id = %s AND status_id = %s", (ERROR, job_id, IN_PROGRESS)):
                        continue
                    cur.execute("UPDATE object SET updated_at = NOW() WHERE id = %s", (job_id,))
                    cur.execute("INSERT INTO note (object_id, type_id, source_culture) VALUES (%s, %s, 'en')",
                                (job_id, ERROR_NOTE))
                    cur.execute("INSERT INTO note_i18n (content, id, culture) VALUES (%s, %s, 'en')",
                                (note, cur.lastrowid))
                    changed.append(job_id)
            self.conn.commit()
        except pymysql.MySQLError as exc:
            self.conn.rollback()
            raise DatabaseError(f"{self.db.describe()}: {_reason(exc)} (nothing was changed)") from None
        return changed

    def clear(self, job_ids: list[int]) -> int:
        """Delete these finished rows and their notes (never a row in progress), in one transaction."""
        import pymysql

        if not job_ids:
            return 0
        marks = ", ".join(["%s"] * len(job_ids))
        try:
            with self.conn.cursor() as cur:
                cur.execute(f"SELECT id FROM job WHERE id IN ({marks}) AND status_id IN (%s, %s) FOR UPDATE",
                            (*job_ids, COMPLETED, ERROR))
                finished = [r[0] for r in cur.fetchall()]
                if finished:
                    fm = ", ".join(["%s"] * len(finished))
                    cur.execute(f"DELETE i FROM note_i18n i JOIN note n ON n.id = i.id WHERE n.object_id IN ({fm})",
                                finished)
                    cur.execute(f"DELETE FROM note WHERE object_id IN ({fm})", finished)
                    cur.execute(f"DELETE FROM job WHERE id IN ({fm})", finished)
                    cur.execute(f"DELETE FROM object WHERE id IN ({fm}) AND class_name = 'QubitJob'", finished)
            self.conn.commit()
        except pymysql.MySQLError as exc:
            self.conn.rollback()
            raise DatabaseError(f"{self.db.describe()}: {_reason(exc)} (nothing was deleted)") from None
        return len(finished)
