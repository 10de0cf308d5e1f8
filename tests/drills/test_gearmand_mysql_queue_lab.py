"""gearmand's queue in MariaDB (`gearman_job_server_queue_type: mysql`), on one lab host: Debian's gearmand
and mariadb-server, converged by site.yml. The password reaches gearmand in a file only root and gearman
read, never on its command line; 200 background jobs queued, gearmand SIGKILLed, none lost. The control:
the same kill with the in-memory queue (builtin) loses them all, so "none lost" is the queue's doing.

Run inside the lab network: tools/lab/lab exec -- .venv/bin/pytest tests/drills/test_gearmand_mysql_queue_lab.py
"""

import shlex

import pytest
from polling import wait_until

pytestmark = pytest.mark.timeout(900)

HOST = "gmq-host"
GEARMAND = "gearman-job-server.service"
PASSWORD = "queue-lab-only#1"   # lab only; a real one comes from a vault
OPTIONS = "/etc/atom-gearman/gearmand-mysql.conf"
INVENTORY = {"all": {"children": {
    "gearman_job_servers": {"hosts": {HOST: None}},
    "atom_workers": {"hosts": {HOST: {"atom_worker_instances": 2}}},
}}}
MYSQL = {"gearman_job_server_queue_type": "mysql", "gearman_job_server_mysql_password": PASSWORD}


@pytest.fixture(scope="module")
def drill(make_drill):
    drill = make_drill(INVENTORY)
    # MariaDB from the lab's offline apt repository; then what a database administrator does once: the
    # queue's database and user (gearmand makes the table).
    drill.run(HOST, "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mariadb-server "
                    ">/dev/null", timeout=600)
    drill.run(HOST, "mariadb -e " + shlex.quote(
        "CREATE DATABASE gearman; CREATE USER 'gearman'@'localhost' IDENTIFIED BY '" + PASSWORD + "'; "
        "GRANT ALL ON gearman.* TO 'gearman'@'localhost';"))
    drill.converge(extra_vars=MYSQL)
    drill.install_submitter(HOST)
    yield drill


def queued(drill):
    return drill.gearman_status(HOST).get(drill.function(), (0, 0, 0))[0]


def rows(drill):
    out = drill.run(HOST, "mariadb --batch --skip-column-names gearman -e 'SELECT COUNT(*) FROM gearman_queue'")
    return int(out.stdout.strip())


def kill_and_wait(drill):
    before = drill.show(HOST, GEARMAND, "MainPID")["MainPID"]
    drill.run(HOST, f"systemctl kill -s KILL {GEARMAND}")

    def back():
        now = drill.show(HOST, GEARMAND, "ActiveState", "MainPID")
        return now["ActiveState"] == "active" and now["MainPID"] not in ("0", before)

    wait_until(back, 60, 0.2, "gearmand started again after the SIGKILL")
    wait_until(lambda: drill.run(HOST, "gearadmin --getpid", check=False).returncode == 0, 30, 0.2,
               "the new gearmand to answer")


def test_the_password_is_in_a_private_file_not_on_gearmands_command_line(drill):
    assert drill.run(HOST, f"stat -c '%a %U %G' {OPTIONS}").stdout.split() == ["640", "root", "gearman"]
    assert f"--mysql-password={PASSWORD}" in drill.run(HOST, f"cat {OPTIONS}").stdout
    cmdline = drill.run(HOST, "tr '\\0' ' ' < /proc/$(systemctl show -p MainPID --value gearman-job-server)/cmdline")
    assert "--queue-type=MySQL" in cmdline.stdout and f"--config-file={OPTIONS}" in cmdline.stdout, cmdline.stdout
    assert PASSWORD not in cmdline.stdout
    assert PASSWORD not in drill.run(HOST, "cat /etc/default/gearman-job-server").stdout
    # It starts after the local database server, which it reads its queue from at start.
    after = drill.show(HOST, GEARMAND, "After")["After"]
    assert "mariadb.service" in after.split(), after
    # A second converge changes nothing.
    result = drill.converge(extra_vars=MYSQL)
    assert result.changed() == 0, result


def test_gearmand_sigkill_with_200_queued_jobs_in_mariadb_loses_none(drill):
    drill.run(HOST, "systemctl stop atom-workers.target")
    marks = drill.marks(HOST)
    ids = drill.submit(HOST, "127.0.0.1:4730", drill.function(), "mysql-kill", 200)
    assert queued(drill) == 200 and rows(drill) == 200
    kill_and_wait(drill)
    assert "status=9/KILL" in drill.journal(HOST, GEARMAND)
    assert queued(drill) == 200, "gearmand read its queue back from MariaDB"
    drill.run(HOST, "systemctl start atom-workers.target")
    counts = drill.wait_all_completed(marks, ids, timeout=240, what="the 200 jobs queued when gearmand was killed")
    assert set(counts) == set(ids)
    wait_until(lambda: rows(drill) == 0, 30, 0.5, "every done job deleted from the queue table")


def test_control_the_memory_queue_loses_them_all(drill):
    drill.converge(extra_vars={"gearman_job_server_queue_type": "builtin"})
    drill.run(HOST, "systemctl stop atom-workers.target")
    drill.submit(HOST, "127.0.0.1:4730", drill.function(), "builtin-kill", 20)
    assert queued(drill) == 20
    kill_and_wait(drill)
    assert queued(drill) == 0
    # Another queue now: the MySQL queue's password is gone from the host.
    assert drill.run(HOST, f"test -e {OPTIONS}", check=False).returncode == 1
    drill.run(HOST, "systemctl start atom-workers.target")
    drill.converge(extra_vars=MYSQL)   # back to MariaDB
