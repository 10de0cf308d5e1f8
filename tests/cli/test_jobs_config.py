"""How `atom-workerctl jobs` finds a site's database, locally: config/config.php as PHP itself writes it
(var_export, so the reader is checked against the real format), never executed, the password never printed;
and the CLI's one-line errors. A throw-away MariaDB answers the positive controls.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "tests"))

import standin  # noqa: E402
from atom_workerctl import cmd_jobs, phpconfig  # noqa: E402
from atom_workerctl.errors import ConfigError  # noqa: E402
from mariadb import PASSWORD, MariaDB, write_site_database  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(REPO / "tools"), "NO_COLOR": "1"}
pytestmark = pytest.mark.timeout(90)


def php_export(value) -> str:
    """config.php as AtoM's installer writes it: PHP's own var_export."""
    code = ('$c = json_decode(stream_get_contents(STDIN), true);'
            'echo "<?php\\n// auto-generated\\n\\nreturn ", var_export($c, true), ";\\n";')
    return subprocess.run(["php", "-r", code], input=json.dumps(value), capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.parametrize("password", ["plain", "it's \\ tricky\" $x {y} \n new line", "", "ünïcödé"])
def test_reads_what_php_var_export_writes(tmp_path, password):
    value = {"all": {"propel": {"class": "sfPropelDatabase", "param": {
        "encoding": "utf8mb4", "persistent": True, "pooling": True, "dsn": "mysql:dbname=atom;port=3307",
        "username": "atom", "password": password}}}, "dev": {"propel": {"param": {"classname": "DebugPDO",
                                                                                    "debug": {"n": 0.1, "l": [1, 2]}}}}}
    assert phpconfig.parse(php_export(value)) == as_php(value)
    root = standin.make_root(tmp_path / "atom")
    (root / "config" / "config.php").write_text(php_export(value))
    db = phpconfig.site_database(str(root))
    assert (db.dbname, db.username, db.password) == ("atom", "atom", password)
    # No host in the dsn is PDO's localhost: the Unix socket, as PHP's mysqlnd uses it on Debian.
    assert (db.unix_socket, db.host) == (phpconfig.DEFAULT_SOCKET, None)
    assert password == "" or password not in db.describe()


def as_php(value):
    """A PHP array is one kind: lists are arrays with keys 0, 1, ..."""
    if isinstance(value, list):
        return {i: as_php(v) for i, v in enumerate(value)}
    if isinstance(value, dict):
        return {k: as_php(v) for k, v in value.items()}
    return value


def test_host_port_and_socket_in_the_dsn():
    text = php_export({"all": {"propel": {"param": {"dsn": "mysql:dbname=a;host=db1;port=3307",
                                                    "username": "u", "password": "p"}}}})
    config = phpconfig.parse(text)
    assert config["all"]["propel"]["param"]["dsn"].endswith("port=3307")
    assert phpconfig.parse_dsn("mysql:dbname=a;unix_socket=/x/s.sock", "f")["unix_socket"] == "/x/s.sock"


@pytest.mark.parametrize("dsn, where", [
    ("mysql:dbname=a;unix_socket=/x/s.sock", ("/x/s.sock", None, None)),
    ("mysql:dbname=a;host=LocalHost;unix_socket=/x/s.sock", ("/x/s.sock", None, None)),  # case as mysqlnd
    # mysqlnd uses a socket only for localhost: with another host, TCP, and the socket is ignored.
    ("mysql:dbname=a;host=10.0.0.5;unix_socket=/x/s.sock", (None, "10.0.0.5", 3306)),
    ("mysql:dbname=a;host=127.0.0.1;port=3307", (None, "127.0.0.1", 3307)),
])
def test_socket_only_for_localhost_as_mysqlnd(tmp_path, dsn, where):
    root = standin.make_root(tmp_path / "atom")
    (root / "config" / "config.php").write_text(php_export(
        {"all": {"propel": {"param": {"dsn": dsn, "username": "u", "password": "p"}}}}))
    db = phpconfig.site_database(str(root))
    assert (db.unix_socket, db.host, db.port) == where


@pytest.mark.parametrize("text, words", [
    ("<?php\nsystem('touch /tmp/pwned'); return array();\n", "expected return"),
    ("<?php\nreturn array('all' => getenv('X'));\n", "unexpected"),
    ("<?php\nreturn array('a' => 'b')\n", "expected ;"),
    ("<?php\nreturn array('a' => 'b'); echo 1;\n", "after the returned array"),
    ("<?php\nreturn \"$x\";\n", "a character outside the array's syntax"),
    ("return array();", "does not start with <?php"),
])
def test_php_code_is_refused_never_run(tmp_path, text, words):
    marker = tmp_path / "pwned"
    with pytest.raises(ConfigError) as err:
        phpconfig.parse(text.replace("/tmp/pwned", str(marker)))
    assert words in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("text", [
    "<?php\nreturn array('all' => array('propel' => array('param' => array('password' => \"pa$SECRET\"))));\n",
    "<?php\nreturn array('all' => array('password' 'SECRET'));\n",
    "<?php\nreturn array('password' => 'a' . \"\\0\" . 'SECRET');\n",
    "<?php\nreturn array('all' => array('propel' => 'SECRET'));\n",
])
def test_a_malformed_config_php_never_shows_its_values(tmp_path, text):
    """Errors name the line and the kind of token, never a value: it may be the password."""
    root = standin.make_root(tmp_path / "atom")
    (root / "config" / "config.php").write_text(text)
    with pytest.raises(ConfigError) as err:
        phpconfig.site_database(str(root))
    assert "SECRET" not in str(err.value), err.value


def test_a_closing_tag_and_php_escapes_are_read_as_php_reads_them():
    value = phpconfig.parse("<?php\nreturn array('a' => \"x\\dy\\\\z\\$\", 'b' => 'q?>r');\n?>\n")
    assert value == {"a": "x\\dy\\z$", "b": "q?>r"}


def test_a_dsn_that_is_not_mysql_is_one_line(tmp_path):
    root = standin.make_root(tmp_path / "atom")
    (root / "config" / "config.php").write_text(php_export(
        {"all": {"propel": {"param": {"dsn": "pgsql:dbname=a", "username": "u", "password": "p"}}}}))
    with pytest.raises(ConfigError, match="not a MySQL one"):
        phpconfig.site_database(str(root))


def test_csv_quoting_is_phps_fputcsv():
    # fputcsv encloses a field holding a space, a comma, a quote, a backslash or a line break.
    assert cmd_jobs.csv_line(["2026-05-01 10:00 AM", "N/A", "arFindingAidJob", 'say "hi"', "a,b", "x\\y"]) == \
        '"2026-05-01 10:00 AM",N/A,arFindingAidJob,"say ""hi""","a,b","x\\y"\n'
    code = 'fputcsv(STDOUT, ["2026-05-01 10:00 AM", "N/A", "arFindingAidJob", "say \\"hi\\"", "a,b", "plain"]);'
    php = subprocess.run(["php", "-r", code], capture_output=True, text=True, check=True).stdout
    assert cmd_jobs.csv_line(["2026-05-01 10:00 AM", "N/A", "arFindingAidJob", 'say "hi"', "a,b", "plain"]) == php


# -- the CLI against a real database ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def db():
    with MariaDB() as m:
        yield m


def site(tmp_path, root):
    config = tmp_path / "sites.json"
    config.write_text(json.dumps({"schema": 1, "manager": "systemd", "sites": [
        {"name": "default", "root": str(root), "gearman_servers": ["127.0.0.1:4730"],
         "pools": [{"name": "default", "unit_template": "atom-worker@.service", "units": []}]}]}))
    return config


def cli(config, *args):
    return subprocess.run([sys.executable, "-m", "atom_workerctl", "--config", str(config), *args],
                          capture_output=True, text=True, env=ENV, timeout=60, check=False)


def test_export_reads_the_database_and_a_wrong_password_is_one_line_without_it(tmp_path, db):
    root = standin.make_root(tmp_path / "atom")
    write_site_database(root, db)
    config = site(tmp_path, root)
    good = cli(config, "jobs", "export")
    assert good.returncode == 0, good.stderr
    assert good.stdout == "startDate,endDate,jobName,jobStatus,jobInfo,jobUser\n"
    text = (root / "config" / "config.php").read_text()
    (root / "config" / "config.php").write_text(text.replace("s3cret", "wrong"))
    bad = cli(config, "jobs", "export")
    assert bad.returncode == 1 and bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "Access denied" in lines[0] and "Traceback" not in bad.stderr, bad.stderr
    assert "wrong" not in bad.stderr and PASSWORD not in bad.stderr


@pytest.mark.parametrize("args, code, words", [
    (["jobs", "--status", "stuck"], 2, "unknown status 'stuck'"),
    (["jobs", "clear", "--before", "30 days ago", "--status", "running", "--yes"], 2, "finished jobs only"),
    (["jobs", "clear"], 2, "--before"),
    (["jobs", "fail"], 2, "ID"),
    (["jobs", "fail", "x1"], 2, "invalid int"),
    (["jobs", "--site", "nope"], 4, "no such site"),
    (["jobs", "export", "--since", "the day before"], 2, "cannot parse the time"),
])
def test_bad_jobs_input_is_one_line(tmp_path, db, args, code, words):
    root = standin.make_root(tmp_path / "atom")
    write_site_database(root, db)
    result = cli(site(tmp_path, root), *args)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == code and len(lines) == 1 and words in lines[0], result.stderr


def test_a_site_without_config_php_is_named(tmp_path):
    root = standin.make_root(tmp_path / "atom")
    result = cli(site(tmp_path, root), "jobs", "export")
    assert result.returncode == 1 and "config/config.php does not exist" in result.stderr


# -- the verdict on rows in progress (job_evidence), on made-up evidence -------------------------------------
def _row(job_id, cls, started, age=600, created="2026-05-01 10:00:00"):
    import datetime

    from atom_workerctl.jobtable import Job

    output = f'[info] [{started}] Job {job_id} "{cls}": Job started.\n' if started else ""
    return Job((job_id, cls, 183, datetime.datetime.fromisoformat(created), None, None, age, output))


def _view(server, functions, error=None):
    from atom_workerctl.gearman import FunctionStatus, ServerView

    v = ServerView(server)
    v.error = error
    v.functions = {f: FunctionStatus(f, total, running, 1) for f, (total, running) in functions.items()}
    return v


def _entries(*lines):
    from atom_workerctl.journal import Entry

    return [Entry(1_000_000 * (i + 1), unit, None, 6, "worker", msg) for i, (unit, msg) in enumerate(lines)]


MOVE = "arObjectMoveJob"
U1, U2 = "atom-worker@1.service", "atom-worker@2.service"


def _verdicts(rows, functions, takens_lines, alive, error=None):
    from atom_workerctl import job_evidence

    takens = job_evidence.scan(_entries(*takens_lines), alive)
    gearman = {"g:4730": _view("g:4730", {f"p-{c}": n for c, n in functions.items()}, error)}
    return job_evidence.judge(rows, "p", ["g:4730"], gearman, takens, 0)


# Worker 1 (PID 11) took row 1 and was killed; worker 2 (PID 22) waits with row 2, tied by its start's time.
LINES = [(U1, "PID 11"), (U1, "2026-05-01 10:00:00 > Job started."),
         (U1, 'Parameters: {"id":1,"name":"arObjectMoveJob"}'), (U1, "PID 12"),
         (U2, "PID 22"), (U2, "2026-05-01 10:00:30 > Job started."),
         (U2, "2026-05-01 10:00:30 > Another sensitive job is being executed, will retry in 10 seconds")]
ALIVE = {U1: {12}, U2: {22}}


def test_a_lost_move_with_everything_accounted_for_is_stale():
    rows = [_row(1, MOVE, "2026-05-01 10:00:00"), _row(2, MOVE, "2026-05-01 10:00:31", created="2026-05-01 10:00:29")]
    v = _verdicts(rows, {MOVE: (1, 1)}, LINES, ALIVE)
    assert v[2].state == "waiting" and "atom-worker@2 (PID 22)" in v[2].summary
    assert v[1].state == "stale" and [j.id for j in v[1].blocking] == [2]
    assert any("atom-worker@1 (PID 11) started it" in e and "gone" in e for e in v[1].evidence), v[1].evidence


@pytest.mark.parametrize("functions, error, words", [
    ({MOVE: (2, 1)}, None, "wait at gearmand"),                       # a move waiting: it may be row 1
    ({MOVE: (2, 2)}, None, "not tied to a row (another host's"),       # a move running somewhere else
    ({MOVE: (1, 1)}, "timed out", "did not answer"),                    # a job server silent
])
def test_a_row_that_may_still_run_is_never_stale(functions, error, words):
    rows = [_row(1, MOVE, "2026-05-01 10:00:00"), _row(2, MOVE, "2026-05-01 10:00:31", created="2026-05-01 10:00:29")]
    v = _verdicts(rows, functions, LINES, ALIVE, error)
    assert v[1].state == "uncertain" and words in v[1].summary, v[1].summary


def test_a_young_row_and_a_row_running_here_are_not_stale():
    young = _verdicts([_row(1, MOVE, None, age=3)], {MOVE: (0, 0)}, [], {})
    assert (young[1].state, young[1].summary) == ("uncertain", "just submitted")
    old = _verdicts([_row(1, MOVE, None)], {MOVE: (0, 0)}, [], {})
    assert old[1].state == "stale" and "its own log is empty" in " ".join(old[1].evidence)
    running = _verdicts([_row(1, MOVE, "2026-05-01 10:00:00")], {MOVE: (1, 1)}, LINES[:3], {U1: {11}})
    assert running[1].state == "running" and "tied by its Parameters line" in running[1].evidence[0]


def test_without_the_workers_logs_no_row_is_stale():
    from atom_workerctl import job_evidence

    rows = [_row(1, MOVE, "2026-05-01 10:00:00")]
    gearman = {"g:4730": _view("g:4730", {f"p-{MOVE}": (0, 0)})}
    assert job_evidence.judge(rows, "p", ["g:4730"], gearman, [], 0)[1].state == "stale"  # the control
    v = job_evidence.judge(rows, "p", ["g:4730"], gearman, [], 0, logs_error="journalctl not found")
    assert v[1].state == "uncertain" and "logs could not be read" in v[1].summary


def test_sites_sharing_a_database_keep_the_most_cautious_verdict():
    """Each site judges the rows with its own prefix and workers: a row another site's worker runs is stale
    for the first site only; it must stay running."""
    rows = [_row(1, MOVE, "2026-05-01 10:00:00")]
    first = _verdicts(rows, {MOVE: (0, 0)}, [], {})                          # site 1: nothing of it
    second = _verdicts(rows, {MOVE: (1, 1)}, LINES[:3], {U1: {11}})          # site 2: its worker runs it
    assert first[1].state == "stale" and second[1].state == "running"
    merged: dict = {}
    cmd_jobs.merge(merged, first)
    cmd_jobs.merge(merged, second)
    assert merged[1].state == "running"
    merged = {}
    cmd_jobs.merge(merged, second)
    cmd_jobs.merge(merged, first)
    assert merged[1].state == "running"
