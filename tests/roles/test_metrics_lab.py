"""The metrics timer of roles/atom_workerctl on real systemd, read by a real node_exporter and a real Prometheus.

A job server, two worker hosts converged with site.yml (the CLI installed by the role) and a monitoring host
that no play converges. Debian's prometheus-node-exporter and prometheus come from the lab's local apt
repository (tools/lab/packages-served.txt), installed by the tests as an operator would.

- Without node_exporter's textfile folder, `atom_workerctl_metrics: auto` installs nothing and changes nothing.
- With it, the timer writes atom-worker.prom again and again, node_exporter serves its series, exactly one
  host (the first of the play) exports gearmand's per-function view, and a second converge changes and
  restarts nothing. The units are the templates as plain Jinja2 renders them; a bad variable fails the run
  before anything changes.
- A worker SIGKILLed until systemd gives up reads atom_worker_instance_start_limit_hit 1 (0 before, 0 for
  its sibling, and 0 again after `atom-workerctl reset`).
- Prometheus scrapes both node_exporters and evaluates monitoring/atom-worker.rules.yml: AtomWorkerGaveUp
  fires for a crash-looped worker, AtomWorkerNoWorkerForQueuedJobs for jobs queued with every worker
  stopped; before each fault the rule was evaluated on data showing the healthy state and did not fire.
- `atom_workerctl_metrics: false` and `atom_workerctl_state: absent` remove the timer, the units and the file.

Run inside the lab network: tools/lab/lab exec -- .venv/bin/pytest tests/roles/test_metrics_lab.py
The tests share the hosts and run in file order.
"""

import datetime
import hashlib
import json
import re
import shlex
import urllib.parse
import urllib.request

import jinja2
import pytest
import yaml
from gsubmit import GSUBMIT
from labhosts import ATOM_ROOT, build_project_wheel, repo_path
from polling import wait_until
from prom_text import samples, value

pytestmark = pytest.mark.timeout(900)

P = "mt-"
GM, W1, W2, MON = f"{P}gm", f"{P}w1", f"{P}w2", f"{P}mon"
WORKERS = [W1, W2]
INVENTORY = {
    "all": {
        "children": {
            "gearman_job_servers": {"hosts": {GM: {"gearman_job_server_listen_address": "{{ ansible_host }}"}}},
            "atom_workers": {"hosts": {W1: None, W2: None}},
            "atom_standin": {"children": {"atom_workers": None}},
            # Prometheus' host: in no group site.yml converges.
            "monitoring": {"hosts": {MON: None}},
        }
    }
}
# Every converge of this module: the CLI installed (site.yml's role tests leave it out), two instances per
# host (one is the control of the other), RestartSec=1 so a crash loop reaches the start limit in seconds,
# and a reading every 2 s instead of 15 so waits stay short.
VARS = {"atom_workerctl_enabled": True, "atom_worker_instances": 2, "atom_worker_restart_sec": 1,
        "atom_workerctl_metrics_interval": 2}
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
PROM_FILE = f"{TEXTFILE_DIR}/atom-worker.prom"
# Kept beside it by the command: the job table's counts between two reads of the table.
JOBS_CACHE = f"{TEXTFILE_DIR}/.atom-worker-jobs.json"
UNITS = ["/etc/systemd/system/atom-worker-metrics.service", "/etc/systemd/system/atom-worker-metrics.timer"]
# A step of the atom_workerctl role's tasks/apply.yml: in a converge's output only when a host included them.
METRICS_STEP = "TASK [atom_workerctl : Install the metrics service and timer]"
FUNCTION = hashlib.md5(ATOM_ROOT.encode()).hexdigest() + "-arFindingAidJob"
# The rules' `for:` durations (minutes) shortened for the lab: what is proved here is that a real fault
# makes Prometheus fire the real expression over the real series, through pending to firing. The real
# durations are proved by promtool's unit tests of the rules (monitoring/, tests/test_monitoring.py).
SHORT_FOR = "2s"
RULES = repo_path("monitoring", "atom-worker.rules.yml")
# From the host itself, as Prometheus' scrape would read it (the lab hosts have python3, no curl).
SCRAPE = ("import sys, urllib.request; "
          "sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:9100/metrics', timeout=30).read().decode())")


@pytest.fixture(scope="module")
def lab(make_lab, tmp_path_factory):
    lab = make_lab(INVENTORY)
    # A wheel of this module's own: `make wheel` run meanwhile (the CLI being worked on) rewrites build/wheel,
    # and the role would then rightly reinstall it in the middle of a changed=0 check.
    wheel = build_project_wheel(tmp_path_factory.mktemp("mt-wheel"))
    lab.vars = {**VARS, "atom_workerctl_wheel": str(wheel), "atom_workerctl_version": wheel.name.split("-")[1]}
    converge(lab)
    return lab


def converge(lab, check=True, **extra):
    return lab.converge({**lab.vars, **extra}, check=check)


def exists(lab, host, path):
    return lab.run(host, f"test -e {shlex.quote(path)}", check=False).returncode == 0


def served(lab, host):
    """node_exporter's /metrics on `host`."""
    return lab.run(host, f"python3 -c {shlex.quote(SCRAPE)}").stdout


def prom_file(lab, host):
    return lab.run(host, f"cat {PROM_FILE}").stdout


def timer_journal(lab, host):
    return lab.run(host, "systemctl status --no-pager atom-worker-metrics.timer atom-worker-metrics.service; "
                         "journalctl --no-pager -n 30 -u atom-worker-metrics.service", check=False).stdout


def crash_loop(lab, host, unit):
    """SIGKILL the instance each time it runs until systemd gives up: 3 starts in 24 h (the role's start
    limit), restarted after RestartSec=1 (VARS). Returns the number of kills."""
    killed = []

    def gave_up():
        # Restart=on-failure: after a kill the unit waits in `activating` (auto-restart); it is `failed` only
        # once systemd refused the restart. (systemd 252 then keeps Result=signal, not start-limit-hit.)
        state = lab.show(host, unit, "ActiveState", "MainPID")
        if state["ActiveState"] == "failed":
            return True
        if state["ActiveState"] == "active" and state["MainPID"] not in ("0", *killed):
            lab.run(host, f"systemctl kill -s KILL {unit}")
            killed.append(state["MainPID"])
        return False

    wait_until(gave_up, timeout=120, interval=0.2, what=f"{host} {unit} to hit its start limit",
               details=lambda: lab.journal(host, unit)[-2000:])
    assert "Start request repeated too quickly" in lab.journal(host, unit)
    return len(killed)


def start_limit_hit(text, worker):
    return value(text, "atom_worker_instance_start_limit_hit", worker=worker)


# ---- the role --------------------------------------------------------------------------------------------
def test_auto_without_the_textfile_folder_installs_and_changes_nothing(lab):
    for host in WORKERS:
        # The role ran (the command is installed and runs) ...
        assert lab.run(host, "atom-workerctl --version").stdout.strip()
        # ... and, with no node_exporter, left no trace of the metrics timer.
        assert not exists(lab, host, TEXTFILE_DIR)
        assert [path for path in UNITS if exists(lab, host, path)] == []
        # (list-unit-files exits 1 when nothing matches.)
        listed = lab.run(host, "systemctl list-unit-files --no-legend 'atom-worker-metrics*'", check=False)
        assert listed.stdout.strip() == "", listed.stdout
    again = converge(lab)
    assert again.changed() == 0, again
    # (The positive control is the next test: the same converge turns the timer on once the folder exists.)


def test_node_exporter_folder_turns_the_timer_on(lab):
    for host in WORKERS:
        lab.run(host, "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
                      "prometheus-node-exporter >/dev/null", timeout=300)
        assert exists(lab, host, TEXTFILE_DIR)
    result = converge(lab)
    assert result.changed() > 0, result
    assert METRICS_STEP in result.stdout, result  # the role included its steps: the folder appeared
    for host in WORKERS:
        timer = lab.show(host, "atom-worker-metrics.timer", "ActiveState", "UnitFileState")
        assert (timer["ActiveState"], timer["UnitFileState"]) == ("active", "enabled"), timer
        # One TimersMonotonic= line per trigger: the interval is VARS' 2 s.
        timers = lab.run(host, "systemctl show -p TimersMonotonic atom-worker-metrics.timer").stdout
        assert "{ OnUnitActiveUSec=2s ;" in timers, timers
        service = lab.show(host, "atom-worker-metrics.service", "Type", "User", "Nice", "ProtectSystem")
        assert service == {"Type": "oneshot", "User": "", "Nice": "10", "ProtectSystem": "strict"}, service
        first = wait_until(lambda h=host: exists(lab, h, PROM_FILE) and prom_file(lab, h), timeout=60,
                           what=f"{host}: the timer's first reading", details=lambda h=host: timer_journal(lab, h))
        assert lab.run(host, f"stat -c '%a %U' {PROM_FILE}").stdout.split() == ["644", "root"]
        # The timer runs again and again: a later reading replaces the first.
        stamp = value(first, "atom_worker_scrape_timestamp_seconds")
        assert stamp
        wait_until(lambda h=host, s=stamp: value(prom_file(lab, h), "atom_worker_scrape_timestamp_seconds") > s,
                   timeout=60, what=f"{host}: a second reading", details=lambda h=host: timer_journal(lab, h))
        # node_exporter reads the file (no parse error) and serves its series.
        text = served(lab, host)
        assert value(text, "node_textfile_scrape_error") == 0, text[-3000:]
        assert value(text, "node_textfile_mtime_seconds", file=PROM_FILE) is not None
        for worker in ("atom-worker@1", "atom-worker@2"):
            assert value(text, "atom_worker_instance_active", site="default", pool="default", worker=worker) == 1
            assert value(text, "atom_worker_instance_registered", worker=worker) == 1
        assert value(text, "atom_worker_gearmand_up", site="default") == 1


def test_units_are_the_templates_rendered_by_plain_jinja(lab):
    """templates/ holds plain Jinja2 (templates/README.md): the role's units are what plain Jinja2 renders
    from the same context, so a reader of the template reads the unit."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(repo_path("templates"))), trim_blocks=True,
                             keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    for host, functions in ((W1, "yes"), (W2, "no")):
        context = {"command": "/opt/atom-workerctl/bin/atom-workerctl", "output": PROM_FILE, "dir": TEXTFILE_DIR,
                   "functions": functions, "interval": 2, "timeout": 120}
        for path in UNITS:
            name = path.rsplit("/", 1)[1] + ".j2"
            # "Ansible managed": ansible-core's ansible_managed (ansible.cfg sets none), given to the role's lookups.
            plain = env.get_template(name).render(metrics=context, ansible_managed="Ansible managed")
            assert lab.run(host, f"cat {path}").stdout == plain, (host, path)


def test_service_is_sandboxed(lab):
    """The reading runs as root (it reads the workers' /proc and asks systemd), so its sandbox matters: the
    README's figure. (It works inside it: the previous test read its files.)"""
    out = lab.run(W1, "systemd-analyze security atom-worker-metrics.service --no-pager | tail -1").stdout
    score = float(out.split("exposure level for atom-worker-metrics.service:")[1].split()[0])
    assert score <= 3.0, out


def test_functions_view_comes_from_exactly_one_host(lab):
    """auto: the first host of the play (sorted) that has the site exports its gearmand per-function series, the
    other does not (tests/roles/test_metrics_functions.py: sites on different hosts);
    both export their instances (so the other's file is a real reading, not an empty one)."""
    exporting = {}
    for host in WORKERS:
        text = served(lab, host)
        names = {name for name, _, _ in samples(text)}
        assert "atom_worker_instance_active" in names
        exporting[host] = {"atom_worker_function_jobs_queued", "atom_worker_function_workers_available"} <= names
        flag = "yes" if host == sorted(WORKERS)[0] else "no"
        assert f"--functions {flag}" in lab.run(host, f"cat {UNITS[0]}").stdout
    assert exporting == {W1: True, W2: False}, exporting
    # The view is gearmand's: both hosts' two workers serve the function.
    assert value(served(lab, W1), "atom_worker_function_workers_available", function=FUNCTION) == 4


def test_second_converge_changes_and_restarts_nothing(lab):
    def snapshot(host):
        return (lab.run(host, f"stat -c '%n %i %Y' {' '.join(UNITS)}").stdout,
                lab.show(host, "atom-worker-metrics.timer", "ActiveEnterTimestampMonotonic"),
                lab.show(host, "prometheus-node-exporter.service", "MainPID"),
                lab.hosts.main_pids(host))
    before = {host: snapshot(host) for host in WORKERS}
    result = converge(lab)
    assert result.changed() == 0, result
    assert {host: snapshot(host) for host in WORKERS} == before
    # Nothing out of place: no host included the role's steps (the control: the converge that turned the
    # timer on did, above).
    assert METRICS_STEP not in result.stdout, result


@pytest.mark.parametrize("extra, needle", [
    ({"atom_workerctl_metrics": "maybe"}, "got: maybe"),
    # The role's own checks (after the argument spec's): the one that failed is named.
    ({"atom_workerctl_metrics_interval": 0}, "assertion: atom_workerctl_metrics_interval | int >= 1"),
    ({"atom_workerctl_metrics_interval": 300}, "assertion: atom_workerctl_metrics_interval | int <= 240"),
    ({"atom_workerctl_metrics_dir": "/var/lib/node%iexporter"},
     "assertion: atom_workerctl_metrics_dir is match(_atom_workerctl_unit_path)"),
], ids=["metrics-maybe", "interval-0", "interval-300", "dir-with-a-specifier"])
def test_bad_values_fail_before_any_change(lab, extra, needle):
    def snapshot(host):
        return (lab.run(host, f"md5sum {' '.join(UNITS)}").stdout,
                lab.show(host, "atom-worker-metrics.timer", "ActiveEnterTimestampMonotonic", "UnitFileState"))
    before = {host: snapshot(host) for host in WORKERS}
    result = converge(lab, check=False, **extra)
    assert result.returncode != 0, result
    assert needle in result.stdout, result
    assert result.changed() == 0, result
    assert {host: snapshot(host) for host in WORKERS} == before
    # (The control: the same converge without the bad value changes nothing and succeeds, above.)


def test_start_limit_hit_series_follows_a_crash_loop(lab):
    # Before: node_exporter serves 0 for both instances (present, so a 1 later is a change, not a new series).
    text = served(lab, W2)
    assert (start_limit_hit(text, "atom-worker@1"), start_limit_hit(text, "atom-worker@2")) == (0, 0)
    assert crash_loop(lab, W2, "atom-worker@1.service") >= 1
    wait_until(lambda: start_limit_hit(served(lab, W2), "atom-worker@1") == 1, timeout=60,
               what="atom_worker_instance_start_limit_hit 1 served", details=lambda: timer_journal(lab, W2))
    text = served(lab, W2)
    assert value(text, "atom_worker_instance_failed", worker="atom-worker@1") == 1
    # The control: its sibling, which nothing killed, still reads 0 and active.
    assert start_limit_hit(text, "atom-worker@2") == 0
    assert value(text, "atom_worker_instance_active", worker="atom-worker@2") == 1
    # The operator's fix brings the series back to 0.
    lab.run(W2, "atom-workerctl reset atom-worker@1", timeout=180)
    wait_until(lambda: start_limit_hit(served(lab, W2), "atom-worker@1") == 0, timeout=60,
               what="atom_worker_instance_start_limit_hit 0 after the reset")


# ---- a real Prometheus -----------------------------------------------------------------------------------
class Prometheus:
    """Prometheus' HTTP API, from this test process (in the lab network)."""

    def __init__(self, url):
        self.url = url

    def api(self, path, **params):
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}" + (f"?{query}" if query else ""), timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr):
        """[(labels, evaluation time, value)] of an instant query."""
        result = self.api("query", query=expr)["result"]
        return [(r["metric"], float(r["value"][0]), float(r["value"][1])) for r in result]

    def alerts(self, name, **labels):
        return [a for a in self.api("alerts")["alerts"]
                if a["labels"].get("alertname") == name and all(a["labels"].get(k) == v for k, v in labels.items())]

    def rule(self, name):
        rules = [r for g in self.api("rules", type="alert")["groups"] for r in g["rules"] if r["name"] == name]
        assert len(rules) == 1, f"{len(rules)} alerting rules named {name}"
        return rules[0]

    def settled(self, expr, expected, rule):
        """Wait until Prometheus answers `expr` (one series) with `expected`, then until `rule` has been
        evaluated after that answer: the rule's state then stems from data showing that state. Returns it."""
        def answered():
            result = self.query(expr)
            return result[0][1] if len(result) == 1 and result[0][2] == expected else None
        seen_at = wait_until(answered, timeout=90, interval=0.5, what=f"Prometheus to answer {expr} with {expected}",
                             details=lambda: repr(self.query(expr)))

        def evaluated():
            state = self.rule(rule)
            return state if unix_time(state["lastEvaluation"]) > seen_at else None
        return wait_until(evaluated, timeout=60, interval=0.5, what=f"{rule} evaluated after {seen_at}")

    def wait_firing(self, name, **labels):
        return wait_until(lambda: [a for a in self.alerts(name, **labels) if a["state"] == "firing"], timeout=120,
                          interval=0.5, what=f"{name} {labels} firing",
                          details=lambda: json.dumps(self.api("alerts"), indent=1)[-3000:])


def unix_time(rfc3339):
    """Prometheus' time stamps (nanoseconds, Z) as Unix seconds."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", rfc3339)
    assert m, rfc3339
    zone = "+00:00" if m[3] == "Z" else m[3]
    return datetime.datetime.fromisoformat(m[1] + zone).timestamp() + float("0." + (m[2] or "0"))


def shortened_rules():
    """The repository's rules with every `for:` shortened (SHORT_FOR) and each group evaluated every second."""
    rules = yaml.safe_load(RULES.read_text())
    shortened = 0
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = SHORT_FOR
                shortened += 1
    assert shortened, "no rule with `for:`: nothing shortened (has the rules file changed shape?)"
    return yaml.safe_dump(rules, sort_keys=False, width=1000)


@pytest.fixture(scope="module")
def prometheus(lab):
    """Debian's Prometheus on MON, scraping both workers' node_exporters every second (only the textfile
    collector: a full node_exporter scrape can outlast a one-second timeout on a loaded machine, and the
    series under test are the textfile's) and evaluating the rules every second."""
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": ["/etc/prometheus/atom-worker.rules.yml"],
        "scrape_configs": [{"job_name": "node", "params": {"collect[]": ["textfile"]},
                            "static_configs": [{"targets": [f"{host}:9100" for host in WORKERS]}]}],
    }
    lab.run(MON, "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null",
            timeout=300)
    lab.run(MON, f"cat > /etc/prometheus/atom-worker.rules.yml <<'EOF'\n{shortened_rules()}EOF\n"
                 f"cat > /etc/prometheus/prometheus.yml <<'EOF'\n{yaml.safe_dump(config, sort_keys=False)}EOF\n"
                 "promtool check config /etc/prometheus/prometheus.yml && systemctl restart prometheus")
    prom = Prometheus(f"http://{lab.address(MON)}:9090")

    def scraping():
        try:
            targets = prom.api("targets")["activeTargets"]
        except OSError:  # not listening yet after the restart
            return False
        return sorted(t["labels"]["instance"] for t in targets if t["health"] == "up") == [f"{h}:9100" for h in WORKERS]

    wait_until(scraping, timeout=120, interval=0.5, what="Prometheus scraping both node_exporters",
               details=lambda: lab.run(MON, "journalctl --no-pager -n 30 -u prometheus", check=False).stdout)
    return prom


def test_prometheus_fires_gave_up_for_a_crash_looping_worker(lab, prometheus):
    worker, unit, instance = "atom-worker@2", "atom-worker@2.service", f"{W1}:9100"
    series = f'atom_worker_instance_start_limit_hit{{instance="{instance}",worker="{worker}"}}'
    # The control: the rule, evaluated on a scrape that shows this worker not given up, is healthy and quiet.
    rule = prometheus.settled(series, 0, "AtomWorkerGaveUp")
    assert (rule["health"], rule["state"], rule["alerts"]) == ("ok", "inactive", []), rule
    assert crash_loop(lab, W1, unit) >= 1
    alert = prometheus.wait_firing("AtomWorkerGaveUp", instance=instance, worker=worker)
    assert len(alert) == 1 and alert[0]["labels"]["site"] == "default" and alert[0]["labels"]["severity"] == "critical"
    # Only that worker: its sibling and the other host's workers are not alerted.
    assert [a["labels"]["worker"] for a in prometheus.alerts("AtomWorkerGaveUp")] == [worker]
    lab.run(W1, f"atom-workerctl reset {worker}", timeout=180)
    prometheus.settled(series, 0, "AtomWorkerGaveUp")
    assert prometheus.alerts("AtomWorkerGaveUp") == []


def test_prometheus_fires_no_worker_for_queued_jobs(lab, prometheus):
    labels = {"function": FUNCTION, "job_class": "arFindingAidJob"}
    available = f'max(atom_worker_function_workers_available{{function="{FUNCTION}"}})'
    queued = f'max(atom_worker_function_jobs_queued{{function="{FUNCTION}"}})'
    try:
        for host in WORKERS:
            lab.run(host, "systemctl stop atom-workers.target")
        # The control: no worker, but nothing queued either: evaluated on that, the rule does not fire.
        prometheus.settled(available, 0, "AtomWorkerNoWorkerForQueuedJobs")
        rule = prometheus.settled(queued, 0, "AtomWorkerNoWorkerForQueuedJobs")
        assert rule["health"] == "ok", rule
        assert prometheus.alerts("AtomWorkerNoWorkerForQueuedJobs", **labels) == []
        # The fault: jobs queued (straight to gearmand, as AtoM's web app submits them) with no worker.
        lab.run(W1, f"cat > /root/gsubmit.py <<'EOF'\n{GSUBMIT}EOF\n"
                    f"python3 /root/gsubmit.py {lab.address(GM)} 4730 {FUNCTION} metrics- 5")
        alert = prometheus.wait_firing("AtomWorkerNoWorkerForQueuedJobs", **labels)
        assert len(alert) == 1 and float(alert[0]["value"]) == 5, alert
    finally:
        for host in WORKERS:
            lab.run(host, "systemctl start atom-workers.target")
    # Workers back: the queue drains and the alert resolves.
    prometheus.settled(queued, 0, "AtomWorkerNoWorkerForQueuedJobs")
    assert prometheus.alerts("AtomWorkerNoWorkerForQueuedJobs", **labels) == []


# ---- turning it off ---------------------------------------------------------------------------------------
def metrics_traces(lab, host):
    """What the timer leaves on a host: unit files, the .prom file, the timer loaded or enabled."""
    traces = [path for path in [*UNITS, PROM_FILE, JOBS_CACHE] if exists(lab, host, path)]
    timer = lab.show(host, "atom-worker-metrics.timer", "LoadState", "ActiveState")
    if timer != {"LoadState": "not-found", "ActiveState": "inactive"}:
        traces.append(f"timer {timer}")
    if lab.run(host, "ls /etc/systemd/system/timers.target.wants/", check=False).stdout.count("atom-worker-metrics"):
        traces.append("timers.target.wants link")
    return traces


def test_metrics_false_removes_the_timer_units_and_file(lab):
    for host in WORKERS:  # the control: the timer, its units and its file are there now
        traces = metrics_traces(lab, host)
        assert {*UNITS, PROM_FILE} <= set(traces) and "timers.target.wants link" in traces, traces
    result = converge(lab, atom_workerctl_metrics=False)
    assert result.changed() > 0, result
    for host in WORKERS:
        assert metrics_traces(lab, host) == [], host
        # node_exporter itself is left alone and still serves, without atom-worker's series.
        text = served(lab, host)
        assert value(text, "node_textfile_scrape_error") == 0
        assert not [name for name, _, _ in samples(text) if name.startswith("atom_worker_")]
    again = converge(lab, atom_workerctl_metrics=False)
    assert again.changed() == 0, again


def test_state_absent_removes_the_timer_too(lab):
    result = converge(lab)  # auto again: the folder is there, so the timer comes back
    assert result.changed() > 0, result
    for host in WORKERS:
        wait_until(lambda h=host: exists(lab, h, PROM_FILE), timeout=60, what=f"{host}: the timer's reading")
    result = converge(lab, atom_workerctl_state="absent")
    assert result.changed() > 0, result
    for host in WORKERS:
        assert metrics_traces(lab, host) == [], host
        assert lab.run(host, "command -v atom-workerctl", check=False).returncode != 0
