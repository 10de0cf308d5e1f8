"""doctor and the note of what an unfinished converge owes (`apply-pending.json` beside sites.json), on this
machine: the host's model and the note in a temporary folder, systemd faked as in test_cli_local.py.

The note is the atom_worker role's (roles/atom_worker/tasks/owed_note.yml); the lab tests that make a converge
fail for real and run doctor on the host are tests/roles/test_roles_restarts_lab.py,
tests/supervisor/test_supervisor_lab.py and tests/cli/test_doctor_fixes_lab.py.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "tests"))

import standin  # noqa: E402
from atom_workerctl import cmd_doctor, model, pending, snapshot  # noqa: E402
from atom_workerctl.backend import UnitState  # noqa: E402

CLI = [sys.executable, "-m", "atom_workerctl"]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "tools"), "NO_COLOR": "1"}
UNITS = ["atom-worker@1.service", "atom-worker@2.service", "atom-worker-default-serial@1.service"]
SYSTEMD_NOTE = {"config_sites": ["default"], "restart_globs": ["atom-worker@*.service"], "daemon_reload": True,
                "manager": "systemd"}


def write_host(tmp_path, manager="systemd"):
    """sites.json of one site (pools default ×2 and serial ×1) with the stand-in as its root, as the role
    writes it; the note goes beside it. gearmand is not asked in these tests."""
    port = standin.free_port()
    root = standin.make_root(tmp_path / "atom", servers=[("127.0.0.1", port)])
    pools = [{"name": "default", "unit_template": "atom-worker@.service", "instances": 2, "units": UNITS[:2],
              "types": [], "abilities": []},
             {"name": "serial", "unit_template": "atom-worker-default-serial@.service", "instances": 1,
              "units": UNITS[2:], "types": ["move"], "abilities": []}]
    data = {"schema": 1, "manager": manager, "target": "atom-workers.target", "sites": [{
        "name": "default", "root": str(root), "realpath": os.path.realpath(root), "workers_key": "",
        "gearman_servers": [f"127.0.0.1:{port}"], "target": "atom-workers.target", "user": "root", "group": "root",
        "pools": pools}]}
    folder = tmp_path / "etc-atom-worker"
    folder.mkdir()
    (folder / "sites.json").write_text(json.dumps(data))
    return model.load(str(folder / "sites.json"))


def note_path(host):
    return Path(host.path).parent / "apply-pending.json"


def write_note(host, note, mtime=None):
    path = note_path(host)
    path.write_text(note if isinstance(note, str) else json.dumps(note, indent=2))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


class FakeBackend:
    name = "fake"

    def __init__(self, host):
        self.states = {u: UnitState(u, load_state="loaded", active_state="active", sub_state="running",
                                    unit_file_state="enabled", main_pid=os.getpid()) for u in host.expected_units()}

    def units(self, names, glob):
        return {n: self.states[n] for n in names}

    def pids(self, state):
        return []


def doctor_findings(host):
    """doctor's findings without gearmand (not asked: only the host's own findings remain)."""
    return cmd_doctor.diagnose(snapshot.take(host, FakeBackend(host), gearman=False))


def pending_of(findings):
    return [f for f in findings if f.code == "apply_pending"]


# -- present / absent: the positive and negative pair ----------------------------------------------------------
def test_a_note_left_behind_is_a_fault_naming_what_it_owes(tmp_path):
    host = write_host(tmp_path)
    written = time.time() - 600
    path = write_note(host, SYSTEMD_NOTE, mtime=written)
    findings = doctor_findings(host)
    [f] = pending_of(findings)
    assert findings[0] is f  # the cause first: workers on an old configuration explain the symptoms
    assert f.severity == "fault" and f.subject == str(path)
    assert "\n" not in f.summary
    assert f.summary.startswith("an earlier converge stopped before it applied everything; it still owes: "
                                "clear the cache of site default (if the role clears caches); daemon-reload; "
                                "restart atom-worker@1, atom-worker@2, atom-worker-default-serial@1 (note written "), \
        f.summary  # the site's workers, every pool: its configuration changed
    assert time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(written)) in f.summary
    assert "10min ago" in f.summary
    assert json.dumps(SYSTEMD_NOTE, sort_keys=True) in f.evidence[0]
    assert f.fix == [("by hand: run site.yml again (it applies what the unfinished converge owes and removes the "
                      "note; if it stops again, first fix what its failed task names)")]


def test_no_note_no_finding(tmp_path):
    host = write_host(tmp_path)
    assert doctor_findings(host) == []
    write_note(host, SYSTEMD_NOTE)
    assert pending_of(doctor_findings(host))
    note_path(host).unlink()  # what the role does once its handlers are done
    assert not pending_of(doctor_findings(host))


def test_the_note_is_read_beside_the_sites_json_read(tmp_path):
    """--config elsewhere: the note of that folder, not /etc/atom-worker's."""
    host = write_host(tmp_path)
    assert pending.path_of(host) == str(tmp_path / "etc-atom-worker" / "apply-pending.json")


def test_the_name_is_the_roles():
    """One file, two writers of its name: the role's `_atom_worker_pending_file` is this name beside its state
    file."""
    text = (REPO / "roles" / "atom_worker" / "vars" / "main.yml").read_text()
    line = re.search(r"^_atom_worker_pending_file: (.+)$", text, re.M).group(1)
    assert line == '"{{ atom_worker_state_file | dirname }}/' + pending.NAME + '"', line


# -- what each manager's note owes, in words --------------------------------------------------------------------
@pytest.mark.parametrize("note, words", [
    # config.yml's early note (or --tags atom_worker_config): the site's workers are owed a restart too.
    ({"config_sites": ["default"], "manager": "systemd"},
     ("clear the cache of site default (if the role clears caches); restart atom-worker@1, atom-worker@2, "
      "atom-worker-default-serial@1")),
    ({"config_sites": [], "restart_globs": ["atom-worker-default-serial@*.service"], "daemon_reload": False,
      "manager": "systemd"}, "restart atom-worker-default-serial@1"),
    ({"daemon_reload": True, "manager": "systemd"}, "daemon-reload"),
    # A pool sites.json does not list (removed since, or added by the converge that stopped): try-restart of a
    # glob restarts only what is loaded.
    ({"restart_globs": ["atom-worker-gone-x@*.service"], "manager": "systemd"},
     "restart atom-worker-gone-x@* if still configured"),
    ({"config_sites": ["default", "archive"], "manager": "systemd"},
     ("clear the caches of sites default, archive (if the role clears caches); restart atom-worker@1, atom-worker@2, "
      "atom-worker-default-serial@1")),
    ({"manager": "systemd"}, "nothing the note names"),
    ({}, "nothing the note names"),
])
def test_what_a_systemd_note_owes(tmp_path, note, words):
    host = write_host(tmp_path)
    write_note(host, note)
    [f] = pending.findings(host, cmd_doctor.Finding, "fault", "by hand: ")
    assert f"it still owes: {words} (note written " in f.summary, f.summary


def test_what_a_supervisord_note_owes(tmp_path):
    host = write_host(tmp_path, manager="supervisor")
    write_note(host, {"config_sites": [], "restart": ["atom-workers:atom-worker@2", "atom-workers:atom-worker@1"],
                      "programs_changed": True, "listener_changed": True, "manager": "supervisor"})
    [f] = pending.findings(host, cmd_doctor.Finding, "fault", "by hand: ")
    assert ("it still owes: apply the supervisord configuration (supervisorctl update); restart the restart-policy "
            "listener; restart atom-worker@1, atom-worker@2 (note written ") in f.summary, f.summary


def test_supervisord_programs_sites_json_does_not_list_are_owed_if_still_configured(tmp_path):
    """supervisor.yml restarts only the noted programs its configuration still has: a program sites.json does
    not list is not named as a plain restart."""
    host = write_host(tmp_path, manager="supervisor")
    write_note(host, {"restart": ["atom-workers:atom-worker@1", "atom-workers-gone:atom-worker-gone-x@1"],
                      "manager": "supervisor"})
    [f] = pending.findings(host, cmd_doctor.Finding, "fault", "by hand: ")
    assert ("it still owes: restart atom-worker@1; restart atom-worker-gone-x@1 if still configured "
            "(note written ") in f.summary, f.summary


def test_the_cache_clear_is_owed_only_if_the_role_clears_caches(tmp_path):
    """sites.json does not carry atom_worker_clear_cache: the words must not promise a cache clear."""
    host = write_host(tmp_path)
    assert "clear_cache" not in json.dumps(host.raw)
    write_note(host, {"config_sites": ["default"], "manager": "systemd"})
    [f] = pending.findings(host, cmd_doctor.Finding, "fault", "by hand: ")
    assert "it still owes: clear the cache of site default (if the role clears caches); restart " in f.summary, \
        f.summary


def test_a_site_sites_json_does_not_list_is_said_to_be_owed_if_still_configured(tmp_path):
    """The role clears and restarts only the sites it is given then; sites.json may be older than the note."""
    host = write_host(tmp_path)
    write_note(host, {"config_sites": ["default"], "manager": "systemd"})
    [f] = pending.findings(host, cmd_doctor.Finding, "fault", "by hand: ")
    assert not any("not in" in e for e in f.evidence), f.evidence  # the control: a site sites.json lists
    write_note(host, {"config_sites": ["default", "archive"], "manager": "systemd"})
    [f] = pending.findings(host, cmd_doctor.Finding, "fault", "by hand: ")
    assert any(e.startswith(f"site archive not in {host.path}: owed only if still configured") for e in f.evidence), \
        f.evidence


def test_a_note_of_another_manager_owes_its_sites_only(tmp_path):
    """As the role reads it (vars/main.yml _atom_worker_owed): another manager's units are not this host's."""
    host = write_host(tmp_path)
    write_note(host, {"config_sites": ["default"], "restart": ["atom-workers:atom-worker@9"],
                      "programs_changed": True, "manager": "supervisor"})
    [f] = pending.findings(host, cmd_doctor.Finding, "fault", "by hand: ")
    assert ("it still owes: clear the cache of site default (if the role clears caches); restart atom-worker@1, "
            "atom-worker@2, atom-worker-default-serial@1 (note written ") in f.summary, f.summary
    assert any("noted under manager supervisor" in e for e in f.evidence), f.evidence


def test_a_note_without_a_manager_owes_its_sites_only(tmp_path):
    """The role takes a note without `manager` for another manager's (`manager | default('')` is not this
    host's): its restart_globs and daemon_reload are not taken up, only its sites. The control: the same note
    with this host's manager owes them."""
    host = write_host(tmp_path)
    note = {"config_sites": [], "restart_globs": ["atom-worker-default-serial@*.service"], "daemon_reload": True}
    write_note(host, {**note, "manager": "systemd"})
    [f] = pending.findings(host, cmd_doctor.Finding, "fault", "by hand: ")
    assert "it still owes: daemon-reload; restart atom-worker-default-serial@1 (note written " in f.summary, f.summary
    write_note(host, note)
    [f] = pending.findings(host, cmd_doctor.Finding, "fault", "by hand: ")
    assert "it still owes: nothing the note names (note written " in f.summary, f.summary
    assert any("noted without a manager" in e and "takes up only the sites'" in e for e in f.evidence), f.evidence
    write_note(host, {**note, "manager": None})  # JSON null: `manager | default('')` is not this host's either
    [f] = pending.findings(host, cmd_doctor.Finding, "fault", "by hand: ")
    assert "it still owes: nothing the note names (note written " in f.summary, f.summary
    write_note(host, {**note, "config_sites": ["default"]})
    [f] = pending.findings(host, cmd_doctor.Finding, "fault", "by hand: ")
    assert ("it still owes: clear the cache of site default (if the role clears caches); restart atom-worker@1, "
            "atom-worker@2, atom-worker-default-serial@1 (note written ") in f.summary, f.summary


def test_many_instances_are_counted_not_all_named(tmp_path):
    host = write_host(tmp_path)
    host.sites[0].pools[0].units = [f"atom-worker@{i}.service" for i in range(1, 11)]
    write_note(host, {"config_sites": ["default"], "manager": "systemd"})
    [f] = pending.findings(host, cmd_doctor.Finding, "fault", "by hand: ")
    assert ("restart atom-worker@1, atom-worker@2, atom-worker@3, atom-worker@4, atom-worker@5, atom-worker@6 "
            "and 5 more (note") in f.summary, f.summary


# -- a note that cannot be used: one line, never a traceback ------------------------------------------------------
@pytest.mark.parametrize("content, reason", [
    ("{", "not JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    ("", "not JSON (Expecting value: line 1 column 1 (char 0))"),
    ('["default"]', "not a JSON object (a JSON list)"),
    ('{"config_sites": "default"}', "`config_sites` is not a list of names"),
    ('{"restart_globs": [1]}', "`restart_globs` is not a list of names"),
    ('{"daemon_reload": "yes"}', "`daemon_reload` is not true or false"),
    ('{"manager": 3}', "`manager` is not a name"),
    (b"\xff\xfe{", "not UTF-8 text"),
    (None, "not a regular file"),
    # json raises RecursionError (not ValueError) for this, a note well under the size limit.
    ("[" * 200_000, "not a note of the role (nested more than 32 levels deep)"),
    ('{"config_sites": ["default"], "x": ' + "[" * 900 + "]" * 900 + "}",
     "not a note of the role (nested more than 32 levels deep)"),
    ('{"x": ' + "[" * 33 + "]" * 33 + "}", "not a note of the role (nested more than 32 levels deep)"),
])
def test_a_malformed_note_is_one_line(tmp_path, content, reason):
    host = write_host(tmp_path)
    path = note_path(host)
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    findings = doctor_findings(host)
    [f] = pending_of(findings)
    assert findings[0] is f and f.severity == "fault"
    assert "\n" not in f.summary and all("\n" not in e for e in f.evidence)
    assert f.summary.startswith("an earlier converge stopped before it applied everything, and its note of what "
                                f"it owes is unusable: {reason} (written "), f.summary
    assert f.fix[0] == f"mv {path} {path}.unreadable   # aside, to look at later (the role may fail to read it too)"
    assert f.fix[1].startswith("by hand: run site.yml again")
    assert f.fix[2] == f"cd {host.sites[0].root} && runuser -u root -- php symfony cc"
    assert f.fix[-1] == "atom-workerctl restart --rolling"


def test_a_note_nested_up_to_the_limit_is_read(tmp_path):
    """The control of the nesting cases above: 32 levels (the object and 31 lists) is a note."""
    host = write_host(tmp_path)
    write_note(host, '{"config_sites": ["default"], "x": ' + "[" * 31 + "]" * 31 + ', "manager": "systemd"}')
    [f] = pending.findings(host, cmd_doctor.Finding, "fault", "by hand: ")
    assert "it still owes: clear the cache of site default" in f.summary, f.summary


def test_a_huge_note_is_not_read_whole(tmp_path):
    host = write_host(tmp_path)
    note_path(host).write_text('{"x": "' + "a" * (pending.MAX_BYTES + 10) + '"}')
    [f] = pending.findings(host, cmd_doctor.Finding, "fault", "by hand: ")
    assert "unusable: larger than 1 MiB" in f.summary


# -- doctor --json, its exit code, and fleet doctor ---------------------------------------------------------------
def run_doctor(host, monkeypatch, capsys, as_json):
    from atom_workerctl import cmd_jobs

    monkeypatch.setattr(cmd_jobs, "stale_findings", lambda *a, **k: [])  # no AtoM database here
    real = snapshot.take
    monkeypatch.setattr(cmd_doctor, "take", lambda h, b, timeout: real(h, b, gearman=False))  # no gearmand here
    args = argparse.Namespace(gearman_timeout=0.5, json=as_json)
    code = cmd_doctor.run(args, host, FakeBackend(host))
    return code, capsys.readouterr().out


def test_doctor_json_and_text_carry_it_and_exit_3(tmp_path, monkeypatch, capsys):
    """gearmand is not asked, so the note is the only fault: the exit code is its own."""
    host = write_host(tmp_path)
    code, out = run_doctor(host, monkeypatch, capsys, as_json=True)
    assert code == 0, out  # the control: no note, healthy
    assert json.loads(out)["healthy"] is True
    write_note(host, SYSTEMD_NOTE)
    code, out = run_doctor(host, monkeypatch, capsys, as_json=True)
    data = json.loads(out)
    assert code == 3 and data["exit_code"] == 3 and data["healthy"] is False
    [f] = data["findings"]
    assert f["code"] == "apply_pending" and f["severity"] == "fault" and "it still owes: " in f["summary"]
    assert f["fix"][0].startswith("by hand: run site.yml again")
    code, out = run_doctor(host, monkeypatch, capsys, as_json=False)
    assert code == 3
    assert "FAULT [apply_pending] an earlier converge stopped before it applied everything; it still owes: " in out
    assert "  fix:      by hand: run site.yml again" in out


class FakeSupervisor(FakeBackend):
    """supervisord whose restart policy listener is not configured: doctor adds restart_policy_down of its own."""
    name = "supervisor"
    changed_groups: set = set()
    settings = {"log_dir": "/nonexistent"}

    def listener_info(self):
        return None


class FakeCircus(FakeBackend):
    """circusd that does not answer: doctor adds restart_policy_down of its own."""
    name = "circus"
    settings = {"service": "atom-worker-circus.service"}

    def daemon_pid(self):
        from atom_workerctl.errors import ManagerError

        raise ManagerError("circusd does not answer (a stand-in)")


@pytest.mark.parametrize("manager, backend", [("supervisor", FakeSupervisor), ("circus", FakeCircus)])
def test_the_note_comes_first_under_every_manager(tmp_path, monkeypatch, capsys, manager, backend):
    """Under supervisord and circus doctor puts the manager's own findings ahead of the host's; the note of an
    unfinished converge stays first all the same (its update or restarts may be what is missing)."""
    from atom_workerctl import cmd_jobs

    host = write_host(tmp_path, manager=manager)
    monkeypatch.setattr(cmd_jobs, "stale_findings", lambda *a, **k: [])
    real = snapshot.take
    monkeypatch.setattr(cmd_doctor, "take", lambda h, b, timeout: real(h, b, gearman=False))
    args = argparse.Namespace(gearman_timeout=0.5, json=True)
    code = cmd_doctor.run(args, host, backend(host))
    codes = [f["code"] for f in json.loads(capsys.readouterr().out)["findings"]]
    assert code == 3 and codes == ["restart_policy_down"], codes  # the control: the manager's finding alone
    write_note(host, {"config_sites": ["default"], "manager": manager})
    code = cmd_doctor.run(args, host, backend(host))
    codes = [f["code"] for f in json.loads(capsys.readouterr().out)["findings"]]
    assert code == 3 and codes == ["apply_pending", "restart_policy_down"], codes


FLEET_SSH = r'''#!/usr/bin/env python3
# Stands in for ssh to a worker host: its doctor answers with the finding the test wrote; its jobs, no database.
import json, os, sys
command = sys.argv[-1]
if " jobs " in f" {command} ":
    print(json.dumps({"schema": 1, "command": "jobs", "sites": []}))
    sys.exit(0)
findings = json.load(open(os.environ["FAKE_FINDINGS"]))
print(json.dumps({"schema": 1, "command": "doctor", "host": "w1", "healthy": not findings,
                  "exit_code": 3 if findings else 0, "findings": findings,
                  "summary": {"instances": 2, "active": 2, "not_active": 0}, "sites": []}))
sys.exit(3 if findings else 0)
'''


def test_fleet_doctor_passes_the_finding_through(tmp_path):
    host = write_host(tmp_path)
    write_note(host, SYSTEMD_NOTE)
    findings = [f.as_dict() for f in pending.findings(host, cmd_doctor.Finding, "fault", "by hand: ")]
    ssh = tmp_path / "fake-ssh"
    ssh.write_text(FLEET_SSH)
    ssh.chmod(0o755)
    (tmp_path / "findings.json").write_text(json.dumps(findings))
    env = {**ENV, "ATOM_WORKERCTL_SSH": str(ssh), "FAKE_FINDINGS": str(tmp_path / "findings.json")}
    proc = subprocess.run([*CLI, "-H", "w1", "doctor", "--json"], capture_output=True, text=True, env=env,
                          timeout=60, check=False)
    assert proc.returncode == 3, proc.stderr
    data = json.loads(proc.stdout)
    assert data["healthy"] is False and data["hosts"]["w1"]["findings"] == findings
    proc = subprocess.run([*CLI, "-H", "w1", "doctor"], capture_output=True, text=True, env=env, timeout=60,
                          check=False)
    assert proc.returncode == 3, proc.stderr
    assert f"FAULT apply_pending {note_path(host)}: {findings[0]['summary']}" in proc.stdout, proc.stdout
    assert f"    fix: {findings[0]['fix'][0]}" in proc.stdout
    (tmp_path / "findings.json").write_text("[]")  # the control: the note gone, the host healthy
    proc = subprocess.run([*CLI, "-H", "w1", "doctor"], capture_output=True, text=True, env=env, timeout=60,
                          check=False)
    assert proc.returncode == 0 and "w1: healthy" in proc.stdout, proc.stdout
