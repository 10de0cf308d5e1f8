"""monitoring/'s alert rules: promtool accepts them, their unit tests pass, and those tests can fail.

Runs on this machine (no lab hosts) with Debian's promtool from `make promtool`.
"""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from atom_workerctl.cmd_metrics import METRICS
from promtool import promtool_path

MONITORING = Path(__file__).resolve().parents[1] / "monitoring"
RULES = MONITORING / "atom-worker.rules.yml"
RULE_TESTS = MONITORING / "atom-worker.rules.test.yml"
# The series `atom-workerctl metrics` writes: the rules may use no other.
CONTRACT_METRICS = frozenset(METRICS)


def promtool(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([promtool_path(), *args], check=False, capture_output=True, text=True, timeout=120)


def unit_tests_with(tmp_path: Path, edit: Path, old: str, new: str) -> subprocess.CompletedProcess:
    """Run the unit tests on copies of both files, `old` replaced by `new` in the copy of `edit`."""
    for f in (RULES, RULE_TESTS):
        shutil.copy(f, tmp_path)
    copy = tmp_path / edit.name
    text = copy.read_text()
    assert old in text, f"{old!r} is no longer in {edit.name}: update this test's edit"
    copy.write_text(text.replace(old, new))
    return promtool("test", "rules", tmp_path / RULE_TESTS.name)


def metric_names(text: str) -> set[str]:
    return set(re.findall(r"atom_worker_[a-z_]+", text))


def test_promtool_checks_the_rules():
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout


def test_promtool_check_rejects_a_broken_expression(tmp_path):
    """The control for the check above: promtool check rules does read the expressions."""
    broken = tmp_path / RULES.name
    broken.write_text(RULES.read_text().replace("atom_worker_gearmand_up == 0", "atom_worker_gearmand_up == ("))
    result = promtool("check", "rules", broken)
    assert result.returncode != 0 and "AtomWorkerGearmandUnreachable" in result.stdout + result.stderr


def test_unit_tests_pass():
    result = promtool("test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_unit_tests_fail_on_a_wrong_expectation(tmp_path):
    """The harness can fail: GaveUp expected a minute before its start limit is hit."""
    result = unit_tests_with(tmp_path, RULE_TESTS, "- eval_time: 2m\n        alertname: AtomWorkerGaveUp",
                             "- eval_time: 1m\n        alertname: AtomWorkerGaveUp")
    assert result.returncode != 0
    assert "alertname: AtomWorkerGaveUp, time: 1m" in result.stdout + result.stderr


# A plausible mistake in a rule, and the alert whose controls must then fail the unit tests: each shows that
# a control is there and tests what its comment says.
RULE_MISTAKES = [
    pytest.param("atom_worker_instance_start_limit_hit == 1", "atom_worker_instance_start_limit_hit >= 0",
                 "AtomWorkerGaveUp", id="gave-up-for-every-instance"),
    pytest.param("max by (site,", "max by (instance, site,",
                 "AtomWorkerNoWorkerForQueuedJobs", id="no-worker-per-exporter"),
    pytest.param("(deriv(atom_worker_function_jobs_queued[5m])) > 0",
                 "(deriv(atom_worker_function_jobs_queued[5m])) >= 0",
                 "AtomWorkerQueueGrowing", id="steady-queue-counts-as-growing"),
    pytest.param("(min_over_time(atom_worker_function_jobs_queued[5m])) > 0",
                 "(min_over_time(atom_worker_function_jobs_queued[5m])) >= 0",
                 "AtomWorkerQueueGrowing", id="queue-may-have-been-empty"),
    pytest.param("atom_worker_instance_expected == 1", "atom_worker_instance_expected >= 0",
                 "AtomWorkerInstanceDown", id="instance-down-when-not-expected"),
    pytest.param("\n          unless atom_worker_instance_start_limit_hit == 1", "",
                 "AtomWorkerInstanceDown", id="instance-down-when-gave-up"),
    pytest.param("unless max_over_time(atom_worker_scrape_timestamp_seconds[5m])",
                 "unless atom_worker_scrape_timestamp_seconds", "AtomWorkerMetricsMissing",
                 id="metrics-missing-on-one-failed-scrape"),
    pytest.param("max by (site) (atom_worker_jobs_stale)", "max by (instance, site) (atom_worker_jobs_stale)",
                 "AtomWorkerStaleJobs", id="stale-jobs-per-host"),
    pytest.param("(atom_worker_jobs_stale) > 0\n        for: 10m", "(atom_worker_jobs_stale) > 0\n        for: 4m",
                 "AtomWorkerStaleJobs", id="stale-jobs-without-time-for-the-fix"),
    pytest.param("max by (site) (atom_worker_jobs_database_up)",
                 "max by (instance, site) (atom_worker_jobs_database_up)",
                 "AtomWorkerJobTableUnreadable", id="job-table-unreadable-per-host"),
    pytest.param("max by (site) (atom_worker_jobs_database_up)", "min by (site) (atom_worker_jobs_database_up)",
                 "AtomWorkerJobTableUnreadable", id="job-table-unreadable-from-one-host"),
]


@pytest.mark.parametrize("old,new,alert", RULE_MISTAKES)
def test_unit_tests_catch_a_rule_mistake(tmp_path, old, new, alert):
    result = unit_tests_with(tmp_path, RULES, old, new)
    assert result.returncode != 0, f"the unit tests still pass with {new!r} instead of {old!r}"
    assert f"alertname: {alert}," in result.stdout + result.stderr


def test_every_alert_has_labels_annotations_a_firing_case_and_a_control():
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    checks = [c for t in yaml.safe_load(RULE_TESTS.read_text())["tests"] for c in t["alert_rule_test"]]
    assert [r["alert"] for r in rules] == [
        "AtomWorkerGaveUp", "AtomWorkerNoWorkerForQueuedJobs", "AtomWorkerQueueGrowing",
        "AtomWorkerGearmandUnreachable", "AtomWorkerInstanceDown", "AtomWorkerMetricsMissing",
        "AtomWorkerStaleJobs", "AtomWorkerJobTableUnreadable"]
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]
        assert "$labels" in rule["annotations"]["description"], rule["alert"]
        mine = [c["exp_alerts"] for c in checks if c["alertname"] == rule["alert"]]
        assert any(mine) and [] in mine, f"{rule['alert']} needs an eval where it fires and one where it does not"


def test_rules_and_their_tests_use_only_the_contracts_metrics():
    for f in (RULES, RULE_TESTS):
        used = metric_names(f.read_text())
        assert used, f"no atom_worker_ series found in {f.name}: the pattern is wrong"
        assert used <= CONTRACT_METRICS, f"{f.name} uses series the contract does not list: {used - CONTRACT_METRICS}"
    # The control: a name the contract does not list is found and reported.
    assert metric_names('atom_worker_instance_up{worker="atom-worker@1"} == 0') - CONTRACT_METRICS == {
        "atom_worker_instance_up"}


def test_a_missing_promtool_names_the_make_target(monkeypatch, tmp_path):
    import promtool as helper
    assert helper.promtool_path().is_file()  # the control: the one `make promtool` unpacked is found
    monkeypatch.setattr(helper, "PROMTOOL", tmp_path / "promtool")
    with pytest.raises(FileNotFoundError, match="run `make promtool`"):
        helper.promtool_path()
