"""circus's templates render byte for byte alike through the role (ansible.builtin.template) and the CLI (plain
Jinja2), as every template of templates/ must (templates/README.md). Local: Ansible on localhost, no host."""

import subprocess

import yaml
from circus_harness import REPO, TEMPLATES, make_units, plain_env


def test_ansible_and_plain_jinja_render_the_same_text(tmp_path):
    sites = [
        {"name": "default", "root": "/usr/share/nginx/atom", "pools": [
            {"name": "default", "instances": 2},
            {"name": "serial", "instances": 1, "types": ["move", "file_import"], "max_job_count": 5},
        ]},
        {"name": "b", "root": "/srv/b", "pools": [{"name": "default", "instances": 0},
                                                  {"name": "big", "instances": 3, "abilities": ["arFindingAidJob"]}]},
    ]
    units = make_units(tmp_path, [], php="/usr/bin/php", sites=sites, restart_sec=30, start_limit_interval_sec="24h",
                       start_limit_burst=3, hardening=False,
                       recycle_helper="/usr/local/lib/atom-worker/atom-worker-recycle")
    units[-1] = dict(units[-1], restart_sec=10, home="/var/www", environment={"LANG": "C.UTF-8"}, enabled=False)
    circus = {"log_dir": "/var/log/atom-worker", "notify_command": "/usr/local/bin/atom-workerctl",
              "state_file": "/run/atom-worker/circus-policy.json"}
    service = {"venv": "/opt/atom-worker-circus", "config": "/etc/atom-worker/circus.ini",
               "endpoint": "ipc:///run/atom-worker/circus.sock", "timeout_stop_sec": 120,
               "after": ["gearman-job-server.service", "mariadb.service"], "directories": ["/run/atom-worker"]}
    cases = [("circus/atom-worker.ini.j2", {"units": units, "circus": circus}),
             ("circus/atom-worker.ini.j2", {"units": []}),
             ("atom-worker-circus.service.j2", {"circus": service})]
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
    # The control: the texts compared are the rendered watchers (6 instances, one of them not started at boot).
    text = (tmp_path / "0.out").read_text()
    assert text.count("[watcher:") == 6 and "autostart = false" in text, text
