"""circus's templates render byte for byte alike through the role (ansible.builtin.template) and the CLI (plain
Jinja2), as every template of templates/ must (templates/README.md). Local: Ansible on localhost, no host."""

from circus_harness import make_units
from manager_tests import RENDER_SITES, ansible_renders_like_plain_jinja


def test_ansible_and_plain_jinja_render_the_same_text(tmp_path):
    units = make_units(tmp_path, [], php="/usr/bin/php", sites=RENDER_SITES, restart_sec=30,
                       start_limit_interval_sec="24h", start_limit_burst=3, hardening=False,
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
    ansible_renders_like_plain_jinja(tmp_path, cases)
    # The control: the texts compared are the rendered watchers (6 instances, one of them not started at boot).
    text = (tmp_path / "0.out").read_text()
    assert text.count("[watcher:") == 6 and "autostart = false" in text, text
