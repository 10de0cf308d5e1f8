"""What the supervisord and the circus tests share (tests/supervisor, tests/circus, molecule/supervisor,
molecule/circus): both managers run the same workers under the same restart policy (one engine,
atom-worker-policy, one state-file schema) and atom-workerctl must answer alike on both, so one piece of code
builds their units, reads their policy state, checks their CLI and their lab hosts. What differs (the managers'
own commands, configuration and naming) stays in circus_harness.py and supervisor_harness.py.

    the checkout      REPO, TEMPLATES, POLICY; policy_module, filters (the engine and the role's filters, loaded
                      from their files); plain_env() (how the CLI renders templates/)
    the local policy  RESTART_SEC, INTERVAL, BURST; make_units(root, pools, php, ...); CRASH, SLEEP, CLEAN, RECYCLE;
                      ns(pool, n); entry_of, wait_failed, wait_starts
    a private manager PrivateManager (state(), entry(), policy_lines(), wait(), kill_tree()); private_manager()
                      (the per-test fixture's body)
    the CLI modules   ENV, write_sites_json, standin_site, WorkerctlLab, BASELINE, codes, fix_as_printed,
                      SystemdShapedBackend, systemd_status_json, shape
    the templates     RENDER_SITES, ansible_renders_like_plain_jinja(tmp_path, cases), unit_exec_start(unit)
    the lab hosts     lab_exec_start(pool), assert_lab_worker_runs_as_the_unit(lab, pid, command),
                      assert_burst_starts_apart(record, since, entry, restart_sec)
    molecule verify   UNIT_COMMAND, assert_runs_as_the_unit(host, pid), assert_no_worker_is_a_systemd_unit(host,
                      glob), job_round_trip(host, logs)
"""

import contextlib
import importlib.machinery
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jinja2
from atom_workerctl import cmd_status, model, snapshot
from atom_workerctl.backend import UnitState
from labhosts import ATOM_ROOT
from polling import wait_until
from standin import make_root

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "templates"
POLICY = REPO / "roles" / "atom_worker" / "files" / "atom-worker-policy"
ENV = {**os.environ, "PYTHONPATH": str(REPO / "tools"), "NO_COLOR": "1"}  # atom-workerctl from this checkout


def load_source(name, path):
    """A Python file as a module, whatever its name (atom-worker-policy has no .py)."""
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


policy_module = load_source("atom_worker_policy", POLICY)
filters = load_source("atom_worker_filters", REPO / "roles" / "atom_worker" / "filter_plugins" / "atom_worker.py")


def plain_env():
    """How the CLI renders templates/: plain Jinja2 with Ansible's template defaults."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), trim_blocks=True,
                              keep_trailing_newline=True, undefined=jinja2.StrictUndefined)


# -- the short policy of the local tests (the defaults are 30 s, 24h, 3) ------------------------------------------
RESTART_SEC = 1
INTERVAL = 60
BURST = 3


def make_units(root, pools, php, recycle_helper="/nonexistent", sites=None, **common):
    """The role's units for one site `default` at ROOT with POOLS (the default pool has no instance), merged with
    the settings every unit shares (the short test policy unless given). Each harness names its fake worker as
    the default PHP."""
    cfg = {
        "sites": sites
        or [{"name": "default", "root": str(root), "pools": [{"name": "default", "instances": 0}, *pools]}],
        "user": "root",
        "group": "root",
        "gearman_servers": ["127.0.0.1:4730"],
    }
    model_ = filters.atom_worker_model(cfg)
    settings = {
        "php": php, "restart": "on-failure", "restart_sec": RESTART_SEC, "start_limit_interval_sec": INTERVAL,
        "start_limit_burst": BURST, "kill_signal": "SIGTERM", "timeout_stop_sec": 5, "after": [], "wants": [],
        "hardening": True, "read_write_dirs": [], "recycle_helper": recycle_helper,
    }
    settings.update(common)
    return filters.atom_worker_units(model_["pools"], settings)


# One-instance pools of the fake workers' modes (fake_php.py and fake_worker.py take the same --types=).
CRASH = {"name": "crash", "instances": 1, "types": ["crash"]}
SLEEP = {"name": "sleep", "instances": 1, "types": ["sleep"]}
CLEAN = {"name": "clean", "instances": 1, "types": ["clean"]}
RECYCLE = {"name": "recycle", "instances": 1, "types": ["recycle"]}


def ns(pool, n=1):
    """The policy's namespec of instance n of a pool of site default (group = the site's target without .target)."""
    return f"atom-workers:atom-worker-default-{pool}@{n}"


def entry_of(manager, namespec):
    """The policy's entry of NAMESPEC, {} before its first start."""
    return manager.entry(namespec) or {}


def wait_failed(manager, namespec, timeout=30):
    manager.wait(lambda: entry_of(manager, namespec).get("failed"), timeout, f"{namespec} to be failed")
    return manager.entry(namespec)


def wait_starts(manager, namespec, count, timeout=20):
    manager.wait(lambda: len(entry_of(manager, namespec).get("starts", [])) == count, timeout,
                 f"{namespec} to have {count} counted starts")


# -- a private manager per test ---------------------------------------------------------------------------------------
class PrivateManager:
    """What a private supervisord and a private circusd have alike: the policy engine's state file and log (one
    schema: README-supervisor.md), polling with the manager's diagnostics, and the end. A subclass sets
    state_file, policy_log and proc, and has diagnostics() and stop()."""

    def state(self):
        if not self.state_file.exists():
            return {"processes": {}}
        return json.loads(self.state_file.read_text())

    def entry(self, namespec):
        return self.state()["processes"].get(namespec)

    def policy_lines(self, needle=""):
        """Lines of <log_dir>/atom-worker-policy.log that hold NEEDLE."""
        if not self.policy_log.exists():
            return []
        return [line for line in self.policy_log.read_text(errors="replace").splitlines() if needle in line]

    def wait(self, predicate, timeout, what):
        """Poll PREDICATE (a safety net against hangs, not a timing assertion)."""
        return wait_until(predicate, timeout, 0.05, what, details=self.diagnostics)

    def descendants(self):
        """Every process below the manager (workers in their own sessions or process groups, the policy's notice
        runners and their commands)."""
        children = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        found, todo = [], [self.proc.pid]
        while todo:
            for child in children.get(todo.pop(), []):
                found.append(child)
                todo.append(child)
        return found

    def kill_tree(self):
        """Freeze the manager, kill it, then kill every process (and process group) below it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGSTOP)  # no more spawns while we look
        below = self.descendants()
        self.proc.kill()
        self.proc.wait(10)
        for pid in below:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def private_manager(request, make, prefix):
    """The body of a per-test manager fixture (`yield from` it): MAKE(sockdir) with its sockets in a short
    temporary folder (socket paths have a length limit); at teardown, when the test failed, what the manager saw,
    then it and every process it started killed."""
    sockdir = Path(tempfile.mkdtemp(prefix=prefix))
    manager = make(sockdir)
    failures = request.session.testsfailed
    yield manager
    if request.session.testsfailed > failures:  # this test failed: show what the manager saw
        sys.stderr.write(manager.diagnostics() + "\n")
    manager.stop()
    shutil.rmtree(sockdir, ignore_errors=True)


# -- atom-workerctl against a private manager (test_*_cli.py) -------------------------------------------------------
def write_sites_json(path, sites, units, root, manager, settings):
    """The sites.json the role writes (roles/atom_worker/tasks/state.yml) with MANAGER's block SETTINGS (where
    atom-workerctl finds the manager): what atom-workerctl reads (`--config PATH`)."""
    model_ = filters.atom_worker_model(
        {"sites": sites, "user": "root", "group": "root", "gearman_servers": sites[0]["gearman_servers"]})
    state = filters.atom_worker_state(model_, {"default": os.path.realpath(root)}, units,
                                      {"manager": manager, manager: settings})
    Path(path).write_text(json.dumps(state, indent=2))
    return state


def standin_site(base, gearmand):
    """The CLI modules' host below BASE: the AtoM stand-in (real PHP worker) on GEARMAND as site default with one
    pool of 2 instances that takes the `general` jobs only (hence doctor's BASELINE), and the role's recycle
    helper. Returns (root, sites, units)."""
    root = make_root(base / "standin", servers=[gearmand.server])
    helper = base / "atom-worker-recycle"
    helper.write_text(plain_env().get_template("atom-worker-recycle.j2").render())
    helper.chmod(0o755)
    server = f"{gearmand.server[0]}:{gearmand.server[1]}"
    sites = [{"name": "default", "root": str(root), "gearman_servers": [server],
              "pools": [{"name": "default", "instances": 2, "types": ["general"]}]}]
    units = make_units(root, [], php=shutil.which("php"), sites=sites, recycle_helper=str(helper))
    return root, sites, units


class WorkerctlLab:
    """atom-workerctl against a module's sites.json, and the shell its printed fix lines run in: a root shell on a
    managed host, where `atom-workerctl` reads /etc/atom-worker/sites.json (here $ATOM_WORKERCTL_CONFIG) and each
    of WRAPPERS ({name: command}, e.g. the manager's own client) is on PATH."""

    timeout = 60  # seconds for one command: below the module's test timeout

    def __init__(self, manager, config, wrappers=None):
        self.config = config
        bin_dir = manager.base / "bin"
        bin_dir.mkdir(exist_ok=True)
        for name, command in {"atom-workerctl": f"{shlex.quote(sys.executable)} -m atom_workerctl",
                              **(wrappers or {})}.items():
            (bin_dir / name).write_text(f'#!/bin/sh\nexec {command} "$@"\n')
            (bin_dir / name).chmod(0o755)
        self.shell_env = {**ENV, "ATOM_WORKERCTL_CONFIG": str(config), "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def sh(self, command):
        """A printed fix line, run as printed by a shell (its `# comment` included)."""
        return subprocess.run(["sh", "-c", command], capture_output=True, text=True, env=self.shell_env,
                              timeout=self.timeout, check=False)

    def cli(self, *args, config=None, timeout=None, user=None, python=(sys.executable,), env=None):
        cmd = [*python, "-m", "atom_workerctl", "--config", str(config or self.config), *args]
        if user is not None:
            cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, env=env or ENV, timeout=timeout or self.timeout,
                              check=False)

    def status(self, *args):
        result = self.cli("status", "--json", *args)
        return result.returncode, json.loads(result.stdout)

    def units(self, *args):
        _, data = self.status(*args)
        return {u["unit"]: u for s in data["sites"] for p in s["pools"] for u in p["units"]}

    def registered(self, *units):
        states = self.units()
        return all(states[u]["active_state"] == "active" and states[u]["gearman"]["registered"] is True
                   for u in units)

    def settle_after_fixes(self):
        """What the printed fixes set going and doctor must not see half done (fix_as_printed): nothing here."""


def codes(out):
    """The finding codes in doctor's human output, in order."""
    return re.findall(r"^(?:FAULT|WARNING) \[(\w+)\]", out, re.M)


# The CLI modules' one pool takes the `general` jobs only (standin_site): doctor warns that no pool takes the others
# (exit 0, no fault). "Healthy" there is exit 0 with that warning alone.
BASELINE = ["no_pool_for_job"]


def fix_as_printed(lab, expect, human=None):
    """doctor names `expect` (its first finding is expect[0]); every fix line printed for the findings beyond the
    module's BASELINE, run as printed (`by hand:` lines by `human(line)`), then doctor exits 0 with the BASELINE
    only. As tests/cli/test_doctor_fixes_lab.py does on systemd hosts, for the findings only supervisord and
    circus hosts have."""
    doctor = lab.cli("doctor")
    found = codes(doctor.stdout)
    assert doctor.returncode == 3 and found[:1] == expect[:1] and set(expect) <= set(found), doctor.stdout
    fixes, code = [], None
    for line in doctor.stdout.splitlines():
        code = (codes(line) or [code])[0]
        fix = re.match(r"^  fix: {6}(?P<fix>.+)$", line)
        if fix and code not in BASELINE:
            fixes.append(fix["fix"])
    assert fixes, doctor.stdout
    for fix in fixes:
        if fix.startswith("by hand: "):
            assert human is not None, f"a step for a person was printed and the test has none: {fix}"
            human(fix)
            continue
        proc = lab.sh(fix)
        assert proc.returncode == 0, f"printed fix failed: {fix}\n{proc.stdout}\n{proc.stderr}"
    lab.settle_after_fixes()
    doctor = lab.cli("doctor")
    assert doctor.returncode == 0 and codes(doctor.stdout) == BASELINE, f"after the fixes:\n{doctor.stdout}"
    return fixes


class SystemdShapedBackend:
    """A systemd-shaped backend (no systemd here): the reference for the --json schema."""

    name = "systemd"

    def units(self, names, glob):
        return {u: UnitState(u, load_state="loaded", active_state="active", sub_state="running",
                             unit_file_state="enabled", main_pid=0) for u in names}

    def pids(self, state):
        return []


def systemd_status_json(config):
    """`status --json` as a systemd host with the sites.json CONFIG answers it: the schema every manager keeps."""
    host = model.load(str(config))
    return cmd_status.snapshot_json(snapshot.take(host, SystemdShapedBackend(), timeout=2), host.expected_units(), 0)


def shape(value):
    """The keys of every object, recursively (lists: the shape of their first element)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value and isinstance(value[0], (dict, list)) else []
    return None


# -- templates ------------------------------------------------------------------------------------------------------
# What the templates' checks render: two sites, pools with every kind of setting (types, abilities, recycling).
RENDER_SITES = [
    {"name": "default", "root": "/usr/share/nginx/atom", "pools": [
        {"name": "default", "instances": 2},
        {"name": "serial", "instances": 1, "types": ["move", "file_import"], "max_job_count": 5},
    ]},
    {"name": "b", "root": "/srv/b", "pools": [{"name": "default", "instances": 0},
                                              {"name": "big", "instances": 3, "abilities": ["arFindingAidJob"]}]},
]


def ansible_renders_like_plain_jinja(tmp_path, cases):
    """Each (template, context) of CASES rendered by the role's way (ansible.builtin.template, Ansible on
    localhost) and by the CLI's (plain_env()) is the same text, byte for byte (templates/README.md). The role's
    renderings stay in tmp_path/<n>.out for the caller's controls."""
    import yaml  # Ansible's own dependency: only this check needs it

    tasks = [{"name": f"render {n}",
              "ansible.builtin.template": {"src": str(TEMPLATES / template), "dest": str(tmp_path / f"{n}.out")},
              "vars": {**context, "ansible_managed": "Managed by the atom-worker toolkit"}}
             for n, (template, context) in enumerate(cases)]
    playbook = [{"hosts": "localhost", "gather_facts": False, "connection": "local", "tasks": tasks,
                 "vars": {"ansible_python_interpreter": "{{ ansible_playbook_python }}"}}]
    (tmp_path / "render.yml").write_text(yaml.safe_dump(playbook))
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "ansible-playbook"), "-i", "localhost,",
                           str(tmp_path / "render.yml")], check=False, capture_output=True, text=True,
                          cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for n, (template, context) in enumerate(cases):
        managed = tasks[n]["vars"]["ansible_managed"]
        plain = plain_env().get_template(template).render(**context, ansible_managed=managed)
        assert (tmp_path / f"{n}.out").read_text() == plain, template


def unit_exec_start(unit):
    """ExecStart= of the systemd unit rendered for UNIT (templates/atom-worker@.service.j2): the command every
    manager must run."""
    text = plain_env().get_template("atom-worker@.service.j2").render(unit=unit)
    return next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ExecStart="))


# -- lab hosts (test_*_lab.py) --------------------------------------------------------------------------------------
def lab_exec_start(pool):
    """ExecStart= of the systemd unit the role renders on a lab host for POOL (site default at ATOM_ROOT)."""
    units = make_units(ATOM_ROOT, [], php="/usr/bin/php",
                       sites=[{"name": "default", "root": ATOM_ROOT, "pools": [pool]}],
                       recycle_helper="/usr/local/lib/atom-worker/atom-worker-recycle")
    return unit_exec_start(units[0])


def assert_burst_starts_apart(record, since, entry, restart_sec):
    """A crash loop on a lab host (the docs' StartLimitBurst=3), from the stand-in's RECORD after SINCE and the
    policy's ENTRY: exactly 3 starts, each at least RESTART_SEC after the previous one's exit and start."""
    record = [ev for ev in record if ev["time"] > since]
    starts = sorted(ev["time"] for ev in record if ev["event"] == "start")
    exits = sorted(ev["time"] for ev in record if ev["event"] == "exit" and ev["reason"] == "crash_at_start")
    assert len(starts) == 3 and len(exits) == 3, record
    gaps = [start - exit_ for exit_, start in zip(exits, starts[1:], strict=False)]
    assert all(gap >= restart_sec for gap in gaps), gaps
    assert len(entry["starts"]) == 3
    assert all(b - a >= restart_sec for a, b in zip(entry["starts"], entry["starts"][1:], strict=False)), \
        entry["starts"]


def assert_lab_worker_runs_as_the_unit(lab, pid, command):
    """Worker process PID on a lab host (lab.run: a shell command there) runs as the systemd unit would: as
    www-data with its environment, COMMAND, in the AtoM root."""
    assert lab.run(f"ps -o user= -p {pid}").stdout.strip() == "www-data"
    assert lab.run(f"tr '\\0' '\\n' < /proc/{pid}/cmdline").stdout.splitlines() == command
    assert lab.run(f"readlink /proc/{pid}/cwd").stdout.strip() == ATOM_ROOT
    environ = lab.run(f"tr '\\0' '\\n' < /proc/{pid}/environ").stdout.splitlines()
    assert {"USER=www-data", "LOGNAME=www-data", "HOME=/var/www"} <= set(environ)


# -- molecule verify (testinfra's host) -----------------------------------------------------------------------------
# The command of the systemd unit for the scenarios' default pool: what every manager runs.
UNIT_COMMAND = ["/usr/bin/php", "-d", "memory_limit=-1", "-d", "error_reporting=E_ALL", "symfony", "jobs:worker"]


def assert_runs_as_the_unit(host, pid):
    """Worker process PID runs as the systemd unit would: as www-data, its command, in the AtoM root."""
    assert host.check_output(f"ps -o user= -p {pid}").strip() == "www-data"
    assert host.file(f"/proc/{pid}/cmdline").content_string.split("\0")[:-1] == UNIT_COMMAND
    assert host.check_output(f"readlink /proc/{pid}/cwd") == ATOM_ROOT


def assert_no_worker_is_a_systemd_unit(host, worker_units):
    """No systemd unit of a worker (WORKER_UNITS, a glob: circus's own atom-worker-circus.service is one of
    systemd's) nor of a site exists: the manager runs the workers, not systemd."""
    units = f"'{worker_units}' 'atom-workers*'"
    out = host.check_output(f"systemctl list-units --all --plain --no-legend --no-pager {units}")
    assert out.strip() == ""
    assert not host.file("/etc/systemd/system/atom-worker@.service").exists
    assert not host.file("/etc/systemd/system/atom-workers.target").exists


def job_round_trip(host, logs):
    """One job submitted through the stand-in on HOST is completed by a worker within 30 s; else the failure
    shows logs(host) (the manager's view)."""
    job_id = host.check_output(
        f"cd {ATOM_ROOT} && runuser -u www-data -- php symfony standin:submit --class=arFindingAidJob --count=1"
    ).strip()
    for _ in range(60):
        record = host.file(f"{ATOM_ROOT}/log/standin-record.jsonl").content_string
        events = [json.loads(line) for line in record.splitlines() if f'"{job_id}"' in line]
        if any(e.get("event") == "job" and e.get("status") == "completed" for e in events):
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not complete:\n{logs(host)}")
