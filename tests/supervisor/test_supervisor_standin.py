"""End to end on a real supervisord with the AtoM stand-in: the real PHP worker (tests/fixtures/atom)
started by the rendered programs, a real gearmand, the listener's policy.

Needs php-cli, php-gearman and gearman-job-server besides supervisor.
"""

import shutil
import subprocess

import pytest
import supervisor_harness
from manager_tests import BURST, plain_env
from standin import Gearmand, function_name, job_counts, make_root, submit
from supervisor_harness import make_units

pytestmark = pytest.mark.timeout(90)
# The fixture, from the harness (tests/ has several test folders: no shared conftest module).
supervisord = supervisor_harness.supervisord


@pytest.fixture(scope="module", autouse=True)
def _tools():
    missing = [tool for tool in ("php", "gearmand") if not shutil.which(tool)]
    if not missing:
        modules = subprocess.run(["php", "-m"], check=False, capture_output=True, text=True).stdout.split()
        missing = [module for module in ("gearman", "pcntl") if module not in modules]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: apt-get install -y php-cli php-gearman gearman-job-server")


def test_standin_workers_recycle_stop_crash_loop_and_recover(supervisord, tmp_path):
    gearmand = Gearmand().start()
    try:
        root = make_root(tmp_path / "standin", servers=[gearmand.server])
        helper = tmp_path / "atom-worker-recycle"
        helper.write_text(plain_env().get_template("atom-worker-recycle.j2").render())
        helper.chmod(0o755)
        sites = [{"name": "default", "root": str(root), "pools": [
            {"name": "default", "instances": 1, "types": ["general"]},
            {"name": "serial", "instances": 1, "types": ["move"], "max_job_count": 1},
        ]}]
        units = make_units(root, [], php=shutil.which("php"), sites=sites, recycle_helper=str(helper))
        general, serial = "atom-workers:atom-worker@1", "atom-workers:atom-worker-default-serial@1"
        sv = supervisord.start(units, wait_running=[general, serial])
        finding_aid, move = function_name(root, "arFindingAidJob"), function_name(root, "arObjectMoveJob")
        sv.wait(lambda: gearmand.available(finding_aid) and gearmand.available(move), 20, "registration")
        sv.wait(lambda: sv.entry(general) and sv.entry(serial), 15, "the listener to count both starts")

        # Recycling: --max-job-count=1 exits 111 after each job; the helper re-runs php inside one start.
        serial_pid = sv.info(serial)["pid"]
        ids = submit(root, "arObjectMoveJob", count=4)
        sv.wait(lambda: all(job_counts(root)[i] == 1 for i in ids), 30, "the move jobs")
        assert sv.info(serial)["pid"] == serial_pid and sv.statename(serial) == "RUNNING"
        entry = sv.entry(serial)
        assert len(entry["starts"]) == 1 and entry["n_recycles"] == 0 and not entry["failed"]

        # A stop is SIGTERM: AtoM's worker exits 0; supervisord says STOPPED; nothing restarts it.
        sv.ctl("stop", general, check=True)
        assert sv.statename(general) == "STOPPED"
        assert "Job worker termination requested." in (sv.log_dir / "atom-worker@1.log").read_text()

        # gearmand down: the worker exits 1 at start, a crash loop that stops after the burst.
        gearmand.stop()
        assert sv.policy("reset", "--start", general).returncode == 0
        sv.wait(lambda: (sv.entry(general) or {}).get("failed"), 30, "the crash loop to be stopped")
        assert len(sv.entry(general)["starts"]) == BURST
        assert sv.statename(general) == "EXITED"
        log = (sv.log_dir / "atom-worker@1.log").read_text()
        assert log.count("Couldn't connect to any available servers") == BURST

        # gearmand back: reset, start, registered again.
        gearmand = Gearmand(port=gearmand.port).start()
        reset = sv.policy("reset", "--start", general)
        assert reset.returncode == 0, reset
        sv.wait(lambda: gearmand.available(finding_aid), 20, "the worker to register again")
        assert sv.statename(general) == "RUNNING" and not sv.entry(general)["failed"]
    finally:
        gearmand.stop()
