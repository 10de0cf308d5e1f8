"""templates/supervisor/: the same variables as the systemd units, the same command, and a config that
a real supervisord runs (process names, groups, directory, user, logs, the listener's settings)."""

import configparser
import shlex
import subprocess

import pytest
import supervisor_harness
from manager_tests import (
    POLICY,
    RENDER_SITES,
    REPO,
    ansible_renders_like_plain_jinja,
    plain_env,
    policy_module,
    unit_exec_start,
)
from supervisor_harness import FAKE_PHP, make_units

pytestmark = pytest.mark.timeout(60)
# The fixture, from the harness (tests/ has several test folders: no shared conftest module).
supervisord = supervisor_harness.supervisord


def parse_ini(text):
    parser = configparser.RawConfigParser(comment_prefixes=("#", ";"), inline_comment_prefixes=None,
                                          strict=True, interpolation=None)
    parser.read_string(text)
    return parser


def render(units, supervisor=None):
    env = plain_env()
    workers = env.get_template("supervisor/atom-worker.conf.j2").render(units=units, supervisor=supervisor or {})
    listener = env.get_template("supervisor/atom-worker-policy.conf.j2").render(units=units,
                                                                                supervisor=supervisor or {})
    return workers, listener


POOLS = [
    pytest.param({"name": "default", "instances": 2}, id="all-types"),
    pytest.param({"name": "serial", "instances": 1, "types": ["move", "file_import"]}, id="types"),
    pytest.param({"name": "find", "instances": 3, "abilities": ["arFindingAidJob", "arObjectMoveJob"],
                  "types": ["general"]}, id="abilities"),
    pytest.param({"name": "recycled", "instances": 2, "max_job_count": 100, "max_mem_usage": 262144},
                 id="recycling"),
]


@pytest.mark.parametrize("pool", POOLS)
def test_the_command_is_the_systemd_execstart(tmp_path, pool):
    pools = [pool] if pool["name"] != "default" else []
    sites = [{"name": "default", "root": "/usr/share/nginx/atom",
              "pools": [pool] if pool["name"] == "default" else [{"name": "default", "instances": 0}, *pools]}]
    units = make_units(tmp_path, [], php="/usr/bin/php", sites=sites,
                       recycle_helper="/usr/local/lib/atom-worker/atom-worker-recycle", restart_sec=30,
                       start_limit_interval_sec="24h", timeout_stop_sec=90)
    unit = next(u for u in units if u["instances"])
    ini = parse_ini(render(units)[0])
    program = ini[f"program:{unit['unit_prefix']}"]
    assert program["command"].replace("%%", "%") == unit_exec_start(unit)
    assert program["numprocs"] == str(unit["instances"])
    assert program["process_name"] == "%(program_name)s@%(process_num)d"
    assert program["user"] == "root" and program["directory"] == "/usr/share/nginx/atom"
    assert program["autorestart"] == "false" and program["startsecs"] == "0"
    assert program["startretries"] == "0" and program["exitcodes"] == "0"
    assert program["stopsignal"] == "TERM" and program["stopwaitsecs"] == "90"
    assert program["killasgroup"] == "true"
    # KillMode=mixed behind the recycle helper, control-group otherwise.
    assert program["stopasgroup"] == ("false" if unit["recycle"] else "true")
    if unit["recycle"]:
        assert program["command"].startswith("/usr/local/lib/atom-worker/atom-worker-recycle -- /usr/bin/php ")
    assert ini["group:atom-workers"]["programs"] == unit["unit_prefix"]


def test_a_real_supervisord_runs_the_rendered_sites_and_pools(supervisord, tmp_path):
    root2 = tmp_path / "atom2"
    root2.mkdir()
    sites = [
        {"name": "default", "root": str(supervisord.root), "pools": [
            {"name": "default", "instances": 2, "types": ["sleep"]},
            {"name": "serial", "instances": 1, "types": ["sleep"]},
        ]},
        {"name": "site2", "root": str(root2), "workers_key": "k2", "pools": [
            {"name": "default", "instances": 0},
            {"name": "big", "instances": 2, "abilities": ["arFindingAidJob"]},
        ]},
    ]
    units = make_units(supervisord.root, [], sites=sites)
    expected = {
        "atom-workers:atom-worker@1", "atom-workers:atom-worker@2", "atom-workers:atom-worker-default-serial@1",
        "atom-workers-site2:atom-worker-site2-big@1", "atom-workers-site2:atom-worker-site2-big@2",
    }
    sv = supervisord.start(units, wait_running=sorted(expected))
    names = {f"{i['group']}:{i['name']}" for i in sv.rpc.call("supervisor.getAllProcessInfo")}
    assert names == expected | {"atom-worker-policy:atom-worker-policy"}

    record = sv.wait(lambda: sv.records("atom-workers:atom-worker@1"), 10, "the first worker's record")[0]
    default_unit = next(u for u in units if u["unit_prefix"] == "atom-worker")
    assert record["argv"] == shlex.split(unit_exec_start(default_unit))[1:]
    assert record["argv"][:6] == ["-d", "memory_limit=-1", "-d", "error_reporting=E_ALL", "symfony", "jobs:worker"]
    assert record["cwd"] == str(supervisord.root) and record["user"] == "root"
    site2 = root2 / "starts-atom-worker-site2-big@2.jsonl"
    sv.wait(lambda: site2.exists() and site2.read_text().strip(), 10, "site2's worker's record")
    assert '"--abilities=arFindingAidJob"' in site2.read_text()
    log = sv.log_dir / "atom-worker@1.log"
    sv.wait(lambda: log.exists() and "fake php" in log.read_text(), 10, "the worker's output in its log")

    # The listener manages every worker of both site groups (one counted start each), nothing else.
    sv.wait(lambda: set(sv.state()["processes"]) == expected, 15, "the listener to see every worker")
    assert all(len(e["starts"]) == 1 for e in sv.state()["processes"].values())

    # A site's group restarts on its own, as its systemd target does.
    pids = {ns: sv.info(ns)["pid"] for ns in expected}
    sv.ctl("restart", "atom-workers-site2:*", check=True)
    for ns in expected:
        assert (sv.info(ns)["pid"] != pids[ns]) == ns.startswith("atom-workers-site2:")


def test_the_listener_command_carries_the_same_policy_variables(tmp_path):
    sites = [
        {"name": "default", "root": "/srv/a", "pools": [{"name": "default", "instances": 1}]},
        {"name": "other", "root": "/srv/b", "pools": [{"name": "default", "instances": 2}]},
    ]
    units = make_units(tmp_path, [], php=str(FAKE_PHP), sites=sites, restart_sec=30,
                       start_limit_interval_sec="1d 12h", start_limit_burst=3)
    units[-1] = dict(units[-1], restart_sec=5, start_limit_burst=0)  # a pool with its own policy
    _, listener = render(units, {"policy_command": "/usr/local/lib/atom-worker/atom-worker-policy",
                                 "policy_state_file": "/run/atom-worker/supervisor-policy.json"})
    section = parse_ini(listener)["eventlistener:atom-worker-policy"]
    assert section["events"] == "PROCESS_STATE,TICK_5"
    assert section["autorestart"] == "true" and int(section["buffer_size"]) >= 100
    argv = shlex.split(section["command"].replace("%%", "%"))
    assert argv[:2] == ["/usr/local/lib/atom-worker/atom-worker-policy", "listen"]

    args = policy_module.build_parser().parse_args(argv[1:])
    settings = policy_module.load_settings(args)
    assert settings.state_file == "/run/atom-worker/supervisor-policy.json"
    assert settings.policy == {"restart": "on-failure", "restart_sec": 30.0,
                               "start_limit_interval_sec": 129600.0, "start_limit_burst": 3}
    assert settings.match == ["atom-workers:*", "atom-workers-other:*"]
    assert settings.manages("atom-workers-other", "atom-worker-other-default@2")
    assert not settings.manages("atom-worker-policy", "atom-worker-policy")
    other = settings.policy_for("atom-workers-other", "atom-worker-other-default@1")
    assert other["restart_sec"] == 5.0 and other["start_limit_burst"] == 0
    assert not policy_module.limit_enabled(other)
    assert settings.policy_for("atom-workers", "atom-worker@1")["restart_sec"] == 30.0


def test_an_empty_host_renders_a_valid_listener_with_the_documented_defaults(tmp_path):
    workers, listener = render([])
    assert "[program:" not in workers
    section = parse_ini(listener)["eventlistener:atom-worker-policy"]
    argv = shlex.split(section["command"])
    settings = policy_module.load_settings(policy_module.build_parser().parse_args(argv[1:]))
    assert settings.policy == policy_module.DEFAULT_POLICY
    assert settings.match == list(policy_module.DEFAULT_MATCH)


@pytest.mark.parametrize(("text", "seconds"), [
    ("30", 30.0), (30, 30.0), ("30s", 30.0), ("24h", 86400.0), ("1d 12h", 129600.0), ("1d12h", 129600.0),
    ("5min 20s", 320.0), ("100ms", 0.1), ("0", 0.0), ("infinity", float("inf")), ("2w", 1209600.0),
])
def test_systemd_time_spans(text, seconds):
    assert policy_module.parse_timespan(text) == seconds


@pytest.mark.parametrize("bad", ["", "abc", "5 parsecs", "-1", True, "1h -5m"])
def test_bad_time_spans_are_refused(bad):
    with pytest.raises(policy_module.PolicyError):
        policy_module.parse_timespan(bad)


@pytest.mark.parametrize(("key", "value"), [
    ("restart", "sometimes"), ("start_limit_burst", "-1"), ("start_limit_burst", "x"),
    ("restart_sec", "infinity"), ("restart_secs", "3"),
])
def test_bad_policy_settings_are_refused(key, value):
    with pytest.raises(policy_module.PolicyError):
        policy_module.check_setting(key, value, "test")


def test_a_bad_listener_setting_fails_with_one_line():
    result = subprocess.run([str(POLICY), "listen", "--restart", "sometimes"], capture_output=True, text=True,
                            timeout=30, stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Restart='sometimes'" in result.stderr


def test_restart_modes_follow_systemd():
    on = policy_module.RESTART_ON
    assert on["on-failure"] == {"exit-code", "signal"}
    assert on["always"] == {"success", "exit-code", "signal"}
    assert on["no"] == set() and on["on-success"] == {"success"} and on["on-abnormal"] == {"signal"}
    clean = policy_module.CLEAN_SIGNALS
    assert clean == {"SIGHUP", "SIGINT", "SIGTERM", "SIGPIPE"}


def test_ansible_and_plain_jinja_render_the_same_text(tmp_path):
    """The role (ansible.builtin.template) and the CLI (plain Jinja2) produce identical files."""
    pytest.importorskip("yaml")
    playbook_bin = REPO / ".venv" / "bin" / "ansible-playbook"
    if not playbook_bin.exists():
        pytest.skip("no ansible-playbook in .venv")
    units = make_units(tmp_path, [], php="/usr/bin/php", sites=RENDER_SITES, restart_sec=30,
                       start_limit_interval_sec="24h", recycle_helper="/usr/local/lib/atom-worker/atom-worker-recycle")
    units[-1] = dict(units[-1], restart_sec=10, home="/var/www", environment={"LANG": "C.UTF-8"})
    supervisor = {"log_dir": "/var/log/atom-worker", "policy_command": "/usr/local/lib/atom-worker/atom-worker-policy"}
    templates = ("supervisor/atom-worker.conf.j2", "supervisor/atom-worker-policy.conf.j2")
    contexts = ({"units": units, "supervisor": supervisor}, {"units": []})
    cases = [(template, context) for template in templates for context in contexts]
    ansible_renders_like_plain_jinja(tmp_path, cases)
