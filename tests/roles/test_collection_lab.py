"""The repository as the Ansible collection atom.workers: `ansible-galaxy collection build`, the artifact
installed into a temporary collections path, lab hosts converged by a playbook that names the roles only by
their fully qualified names (the AtoM stand-in is the lab's own test role).

Run inside the lab network: tools/lab/lab exec -- .venv/bin/pytest tests/roles/test_collection_lab.py
"""

import json
import os
import subprocess
import tarfile

import pytest
import yaml
from labhosts import REPO, VENV_BIN, PlaybookResult

pytestmark = pytest.mark.timeout(900)

GM, W1 = "col-gm", "col-w1"  # col-gm: gearmand and an AtoM web node; col-w1: workers
# The web node names the same workers_key as the workers (README: "Inventories and fleets").
SITE = {"atom_worker_workers_key": "col"}
INVENTORY = {"all": {"children": {
    "gearman_job_servers": {"hosts": {GM: {"gearman_job_server_listen_address": "{{ ansible_host }}"}}},
    "atom_web": {"hosts": {GM: None}, "vars": SITE},
    "atom_workers": {"hosts": {W1: None}, "vars": {**SITE, "atom_worker_instances": 2}},
    "atom_standin": {"children": {"atom_web": None, "atom_workers": None}},
}}}
PLAYBOOK = [
    {"name": "The AtoM stand-in (the lab's test role, from tests/fixtures/roles)", "hosts": "atom_standin",
     "roles": ["atom_standin"]},
    {"name": "Job servers", "hosts": "gearman_job_servers", "roles": ["atom.workers.gearman_job_server"]},
    {"name": "Web nodes", "hosts": "atom_web", "tasks": [
        {"name": "The web entry point", "ansible.builtin.include_role": {"name": "atom.workers.atom_worker",
                                                                         "tasks_from": "web"}}]},
    {"name": "Workers", "hosts": "atom_workers", "roles": ["atom.workers.atom_worker"]},
]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("col-build")
    subprocess.run([str(VENV_BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(out), str(REPO)],
                   check=True, capture_output=True, text=True, timeout=300)
    return next(out.glob("atom-workers-*.tar.gz"))


@pytest.fixture(scope="module")
def collections(tmp_path_factory, artifact):
    path = tmp_path_factory.mktemp("col-installed")
    # --force: run from the checkout, ansible-galaxy reads its ansible.cfg, finds the in-place atom.workers on
    # the collections path and would install nothing ("already installed").
    subprocess.run([str(VENV_BIN / "ansible-galaxy"), "collection", "install", "--offline", "--force", "-p",
                    str(path), str(artifact)], check=True, capture_output=True, text=True, timeout=300)
    assert (path / "ansible_collections" / "atom" / "workers" / "MANIFEST.json").is_file()
    return path


@pytest.fixture(scope="module")
def lab(make_lab):
    return make_lab(INVENTORY)


def converge(lab, collections, *extra) -> PlaybookResult:
    """The playbook from a folder of its own: roles only from the installed collection (and the stand-in's).
    Nothing else is configured: the atom_worker role calls its filters by their full names
    (atom.workers.atom_worker_model & co), which Ansible resolves inside a collection."""
    workdir = lab.hosts.inventory.parent
    playbook = workdir / "collection-site.yml"
    playbook.write_text(yaml.safe_dump(PLAYBOOK, sort_keys=False))
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_COLLECTIONS_PATH": str(collections),
           "ANSIBLE_ROLES_PATH": str(REPO / "tests/fixtures/roles"), "ANSIBLE_NOCOLOR": "1"}
    args = [str(VENV_BIN / "ansible-playbook"), "-i", str(lab.hosts.inventory), str(playbook), *extra]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=workdir, env=env, check=False)
    lab.hosts.runs += 1
    (workdir / f"playbook-{lab.hosts.runs:02d}.log").write_text(f"$ {' '.join(args)}\n{proc.stdout}\n{proc.stderr}")
    return PlaybookResult(proc)


def test_the_artifact_holds_the_collection_and_nothing_of_the_checkout(artifact):
    with tarfile.open(artifact) as tar:
        names = set(tar.getnames())
        manifest = json.load(tar.extractfile("MANIFEST.json"))["collection_info"]
    assert (manifest["namespace"], manifest["name"]) == ("atom", "workers")
    assert manifest["license"] == ["AGPL-3.0-or-later"]
    for wanted in ("roles/atom_worker/meta/argument_specs.yml", "roles/gearman_job_server/tasks/main.yml",
                   "templates/atom-worker@.service.j2", "plugins/filter/atom_worker.py",
                   "plugins/modules/atom_worker_yaml_keys.py", "plugins/modules/atom_host_probe.py",
                   "plugins/modules/atom_files.py", "meta/runtime.yml", "playbooks/reset.yml", "LICENSE"):
        assert wanted in names, wanted
    for unwanted in (".venv", "build", "tests", "tools/lab", "bench", "molecule", ".git", "collections"):
        assert not any(n == unwanted or n.startswith(unwanted + "/") for n in names), unwanted


def test_without_the_collection_its_roles_are_not_found(lab, tmp_path):
    """The control for the converge below: its roles come from the installed artifact and nowhere else."""
    result = converge(lab, tmp_path)
    assert result.returncode != 0, result
    assert "atom.workers" in result.stdout + result.stderr and "was not found" in result.stdout + result.stderr


def test_converges_by_fully_qualified_names_and_a_web_job_completes(lab, collections):
    result = converge(lab, collections)
    assert result.returncode == 0, result
    assert "TASK [atom.workers.atom_worker : " in result.stdout
    assert "TASK [atom.workers.gearman_job_server : " in result.stdout
    assert "Validating arguments against arg spec 'web'" in result.stdout  # the web entry point's own spec
    assert lab.show(GM, "gearman-job-server.service", "ActiveState")["ActiveState"] == "active"
    assert lab.units(W1, state="active") == ["atom-worker@1.service", "atom-worker@2.service"]
    # The web node submits as AtoM's web app does: it reaches a worker only with the workers' servers and prefix.
    ids = lab.submit(GM, "arFindingAidJob", 1)
    lab.wait_for(lambda: ids[0] in {e["id"] for e in lab.events(W1, "job") if e["status"] == "completed"},
                 timeout=60, what="the web node's job completed by a worker")


def test_a_second_run_changes_nothing(lab, collections):
    result = converge(lab, collections)
    assert result.returncode == 0, result
    assert result.changed() == 0, result


def test_the_web_entry_point_refuses_a_bad_variable(lab, collections):
    before = lab.run(GM, "md5sum /usr/share/nginx/atom/config/*.yml").stdout
    result = converge(lab, collections, "--limit", GM, "-e", "atom_worker_clear_cache=maybe")
    assert result.returncode != 0, result
    assert "arg spec 'web'" in result.stdout and "atom_worker_clear_cache" in result.stdout, result
    assert lab.run(GM, "md5sum /usr/share/nginx/atom/config/*.yml").stdout == before
