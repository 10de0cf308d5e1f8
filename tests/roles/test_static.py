"""Role checks that need no lab host: specs vs defaults, plain-Jinja2 templates, the model, the YAML editor."""

import hashlib
import importlib.util
import json
import subprocess
import sys

import jinja2
import pytest
import yaml
from labhosts import repo_path

ROLES = ["atom_worker", "gearman_job_server"]
VENV = repo_path(".venv", "bin")


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


filters = _load(
    repo_path("roles", "atom_worker", "filter_plugins", "atom_worker.py"),
    "atom_worker_filters",
)
sys.path.insert(0, str(repo_path(".venv", "lib")))
yaml_keys = _load(
    repo_path("roles", "atom_worker", "library", "atom_worker_yaml_keys.py"),
    "atom_worker_yaml_keys",
)


def plain_env():
    """How the CLI renders templates/: plain Jinja2 with Ansible's template defaults."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(repo_path("templates"))),
        trim_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )


@pytest.mark.parametrize("role", ROLES)
def test_defaults_and_spec_have_the_same_keys(role):
    defaults = yaml.safe_load(
        repo_path("roles", role, "defaults", "main.yml").read_text()
    )
    spec = yaml.safe_load(
        repo_path("roles", role, "meta", "argument_specs.yml").read_text()
    )
    options = spec["argument_specs"]["main"]["options"]
    assert set(defaults) == set(options)
    for name, option in options.items():
        assert option.get("description"), f"{name} has no description"
        assert option.get("type"), f"{name} has no type"
        assert option.get("default") == defaults[name], (
            f"{name}: spec default differs from defaults/main.yml"
        )


@pytest.mark.parametrize("role", ROLES)
def test_every_public_variable_is_prefixed(role):
    defaults = yaml.safe_load(
        repo_path("roles", role, "defaults", "main.yml").read_text()
    )
    assert all(name.startswith(role + "_") for name in defaults)


def default_units(**overrides):
    cfg = {
        "sites": [],
        "root": "/usr/share/nginx/atom",
        "workers_key": "",
        "instances": 2,
        "types": [],
        "abilities": [],
        "max_job_count": 0,
        "max_mem_usage": 0,
        "pools": [],
        "user": "www-data",
        "group": "www-data",
        "gearman_servers": ["127.0.0.1:4730"],
    }
    cfg.update(overrides)
    model = filters.atom_worker_model(cfg)
    common = {
        "php": "/usr/bin/php",
        "restart": "on-failure",
        "restart_sec": 30,
        "start_limit_interval_sec": "24h",
        "start_limit_burst": 3,
        "kill_signal": "SIGTERM",
        "timeout_stop_sec": 90,
        "after": [],
        "wants": [],
        "hardening": True,
        "read_write_dirs": ["cache", "log", "downloads", "uploads"],
        "recycle_helper": "/usr/local/lib/atom-worker/atom-worker-recycle",
    }
    return model, filters.atom_worker_units(model["pools"], common)


def unit_lines(text):
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_default_unit_is_the_documented_one():
    _, units = default_units()
    text = plain_env().get_template("atom-worker@.service.j2").render(unit=units[0])
    lines = unit_lines(text)
    assert (
        'ExecStart=/usr/bin/php -d memory_limit=-1 -d error_reporting="E_ALL" symfony jobs:worker'
        in lines
    )
    for line in [
        "Restart=on-failure",
        "RestartSec=30",
        "StartLimitIntervalSec=24h",
        "StartLimitBurst=3",
        "User=www-data",
        "Group=www-data",
        "WorkingDirectory=/usr/share/nginx/atom",
        "KillSignal=SIGTERM",
        "Type=simple",
        "PartOf=atom-workers.target",
        "WantedBy=atom-workers.target",
    ]:
        assert line in lines
    unit_section = text.split("[Service]")[0]
    assert (
        "StartLimitBurst=3" in unit_section
        and "StartLimitIntervalSec=24h" in unit_section
    )
    assert "KillMode" not in text


def test_notices_on_add_on_failure_and_off_leave_the_unit_as_it_was():
    _, units = default_units()
    env = plain_env()
    off = env.get_template("atom-worker@.service.j2").render(unit=units[0])
    on = env.get_template("atom-worker@.service.j2").render(unit={**units[0], "notify": True})
    unit_section = on.split("[Service]")[0]
    assert "OnFailure=atom-notify@%N.service" in unit_lines(unit_section)
    assert "OnFailure" not in off
    assert [line for line in unit_lines(on) if not line.startswith("OnFailure=")] == unit_lines(off)
    notice = env.get_template("atom-notify@.service.j2").render(notify={"command": "/usr/local/bin/atom-workerctl"})
    (exec_start,) = [line for line in unit_lines(notice) if line.startswith("ExecStart=")]
    assert exec_start.endswith(" sh /usr/local/bin/atom-workerctl %i")
    assert "Type=oneshot" in unit_lines(notice) and "[Install]" not in unit_lines(notice)


def test_recycling_pool_runs_php_under_the_helper():
    _, units = default_units(
        instances=0,
        pools=[
            {"name": "serial", "types": ["move", "file_import"], "max_job_count": 1}
        ],
    )
    serial = next(u for u in units if u["name"] == "serial")
    assert serial["unit_template"] == "atom-worker-default-serial@.service"
    assert serial["units"] == ["atom-worker-default-serial@1.service"]
    text = plain_env().get_template("atom-worker@.service.j2").render(unit=serial)
    assert (
        "ExecStart=/usr/local/lib/atom-worker/atom-worker-recycle -- /usr/bin/php -d memory_limit=-1 "
        '-d error_reporting="E_ALL" symfony jobs:worker --types=move,file_import --max-job-count=1'
    ) in text
    assert "KillMode=mixed" in text


def test_sites_get_their_own_targets_and_prefixes():
    model, units = default_units(
        sites=[
            {"name": "default", "root": "/srv/a"},
            {
                "name": "b",
                "root": "/srv/b",
                "workers_key": "k",
                "pools": [{"name": "default", "instances": 3}],
            },
        ]
    )
    assert [t["name"] for t in model["targets"]] == [
        "atom-workers.target",
        "atom-workers-b.target",
    ]
    assert {u["unit_template"]: u["target"] for u in units} == {
        "atom-worker@.service": "atom-workers.target",
        "atom-worker-b-default@.service": "atom-workers-b.target",
    }
    state = filters.atom_worker_state(
        model, {"default": "/srv/a", "b": "/srv/b"}, units, {"manager": "systemd"}
    )
    assert state["sites"][1]["prefix"] == filters.atom_worker_prefix("/srv/b", "k")
    assert state["sites"][1]["prefix"] == hashlib.md5(b"/srv/bk").hexdigest()
    doc = plain_env().get_template("sites.json.j2").render(state=state)
    assert json.loads(doc) == state


def test_ansible_and_plain_jinja_render_the_same_text(tmp_path):
    """The roles (ansible.builtin.template) and the CLI (plain Jinja2) produce identical files."""
    _, units = default_units(
        pools=[{"name": "serial", "types": ["move"], "max_job_count": 5}]
    )
    gearmand = {
        "listen_address": "10.0.0.5",
        "port": 4730,
        "threads": 4,
        "job_retries": 0,
        "verbosity": "WARNING",
        "log_file": "/var/log/gearman-job-server/gearmand.log",
        "queue_type": "libsqlite3",
        "sqlite_db": "/var/lib/gearman/queue.sqlite3",
        "extra_args": ["--keepalive"],
        "queue_durability": "clean-shutdown",
        "keepalive": True,
        "keepalive_idle": 30,
        "keepalive_interval": 10,
        "keepalive_count": 3,
        "hardening": True,
        "read_write_paths": ["/var/lib/gearman", "/var/log/gearman-job-server"],
        "firewall": True,
        "firewall_unit": "atom-gearman-firewall.service",
        "firewall_table": "atom_gearman",
        "firewall_file": "/etc/atom-gearman/allowlist.nft",
        "allowed_v4": ["10.0.0.7", "10.0.1.0/24"],
        "allowed_v6": ["fd00::7"],
    }
    mysql_queue = {**gearmand, "queue_type": "mysql", "mysql_local": True,
                   "mysql_options_file": "/etc/atom-gearman/gearmand-mysql.conf"}
    notify = {"schema": 1, "channels": ["log", "webhook"], "command": "/usr/local/bin/atom-workerctl",
              "mail": {"to": ["ops@example.org"], "from": "", "sendmail": "/usr/sbin/sendmail"},
              "webhook": {"url": "https://hooks.example.org/x?token=t", "timeout": 10}}
    cases = [("atom-worker@.service.j2", {"unit": u}) for u in units] + [
        ("atom-worker@.service.j2", {"unit": {**units[0], "notify": True}}),
        ("atom-notify@.service.j2", {"notify": notify}),
        ("notify.json.j2", {"notify": notify}),
        (
            "atom-workers.target.j2",
            {
                "target": {
                    "name": "atom-workers-b.target",
                    "description": "d",
                    "part_of": "atom-workers.target",
                    "wanted_by": "atom-workers.target",
                }
            },
        ),
        ("atom-worker-recycle.j2", {}),
        ("gearman-job-server.default.j2", {"gearmand": gearmand}),
        ("gearman-job-server.override.conf.j2", {"gearmand": gearmand}),
        ("atom-gearman.nft.j2", {"gearmand": gearmand}),
        ("atom-gearman-firewall.service.j2", {"gearmand": gearmand}),
        ("gearman-job-server.default.j2", {"gearmand": mysql_queue}),
        ("gearman-job-server.override.conf.j2", {"gearmand": mysql_queue}),
        ("gearmand-mysql.conf.j2", {"mysql": {"host": "localhost", "port": 3306, "db": "gearman",
                                              "table": "gearman_queue", "user": "gearman", "password": "p#w'd"}}),
    ]
    playbook = [
        {
            "hosts": "localhost",
            "gather_facts": False,
            "connection": "local",
            "tasks": [],
            "vars": {"ansible_python_interpreter": "{{ ansible_playbook_python }}"},
        }
    ]
    for n, (template, context) in enumerate(cases):
        playbook[0]["tasks"].append(
            {
                "name": f"render {n}",
                "ansible.builtin.template": {
                    "src": str(repo_path("templates", template)),
                    "dest": str(tmp_path / f"{n}.out"),
                },
                "vars": {
                    **context,
                    "ansible_managed": "Managed by the atom-worker toolkit",
                },
            }
        )
    (tmp_path / "render.yml").write_text(yaml.safe_dump(playbook))
    proc = subprocess.run(
        [
            str(VENV / "ansible-playbook"),
            "-i",
            "localhost,",
            str(tmp_path / "render.yml"),
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env = plain_env()
    for n, (template, context) in enumerate(cases):
        plain = env.get_template(template).render(
            **context, ansible_managed="Managed by the atom-worker toolkit"
        )
        assert (tmp_path / f"{n}.out").read_text() == plain, template


GEARMAN_YML = """# gearman config: comments stay
all:
  servers:
    default: 127.0.0.1:4730   # the local one

  # worker types
  worker_types:
    general:
      - arFindingAidJob
"""

APP_YML = """all:
  upload_limit: -1   # keep me
  workers_key: ''  # ours
  read_only: false
"""


def test_yaml_editor_changes_only_its_keys():
    out, changed = yaml_keys.edit(
        GEARMAN_YML,
        {"all.servers": {"default": "10.0.0.5:4730", "server2": "10.0.0.6:4730"}},
    )
    assert changed == ["all.servers"]
    assert out == GEARMAN_YML.replace(
        "    default: 127.0.0.1:4730   # the local one\n",
        "    default: 10.0.0.5:4730\n    server2: 10.0.0.6:4730\n",
    )
    assert yaml.safe_load(out)["all"]["worker_types"] == {
        "general": ["arFindingAidJob"]
    }
    again, changed = yaml_keys.edit(
        out, {"all.servers": {"default": "10.0.0.5:4730", "server2": "10.0.0.6:4730"}}
    )
    assert again == out and changed == []


def test_yaml_editor_sets_and_adds_scalars():
    out, _ = yaml_keys.edit(APP_YML, {"all.workers_key": "site'b"})
    assert out == APP_YML.replace(
        "workers_key: ''  # ours", "workers_key: 'site''b'  # ours"
    )
    assert yaml.safe_load(out)["all"]["workers_key"] == "site'b"
    out, _ = yaml_keys.edit(
        "all:\n  upload_limit: -1\n# trailing comment\n", {"all.workers_key": "k"}
    )
    assert out == "all:\n  upload_limit: -1\n  workers_key: 'k'\n# trailing comment\n"
    out, _ = yaml_keys.edit("", {"all.workers_key": ""})
    assert yaml.safe_load(out) == {"all": {"workers_key": ""}}


@pytest.mark.parametrize("context", [{}, {"recycle_exit_code": 99}])
def test_the_rendered_recycle_helper_is_lint_clean(tmp_path, context):
    """templates/atom-worker-recycle.j2 is a Python program once rendered (the hosts run it): ruff, with the
    project's configuration, checks what the hosts get, since the template itself is not Python."""
    rendered = tmp_path / "atom_worker_recycle.py"
    rendered.write_text(plain_env().get_template("atom-worker-recycle.j2").render(**context))
    lint = [str(VENV / "ruff"), "check", "--config", str(repo_path("ruff.toml")), "--no-cache", str(rendered)]
    proc = subprocess.run(lint, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Control: the same check finds a fault put into the rendered text.
    rendered.write_text(rendered.read_text() + "\nimport os\n")
    assert subprocess.run(lint, capture_output=True, text=True, check=False).returncode == 1


def test_the_repository_never_points_outside_itself():
    """No file refers to the notes beside the repository: what the code relies on is in docs/facts.md."""
    outside = "../" + "shared"  # spelled in two parts, or this file would be its own finding
    proc = subprocess.run(["git", "-C", str(repo_path()), "grep", "-n", "-I", "-e", outside,
                           "-e", "ARCHITECTURE" + ".md"], capture_output=True, text=True, check=False)
    assert proc.returncode == 1 and not proc.stdout, proc.stdout  # git grep: 1 = no match
    # Control: the same search finds a text that is in the repository.
    found = subprocess.run(["git", "-C", str(repo_path()), "grep", "-l", "-e", "docs/facts" + ".md"],
                           capture_output=True, text=True, check=False)
    assert found.returncode == 0 and found.stdout.strip(), found.stderr
