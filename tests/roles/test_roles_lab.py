"""The roles on real systemd: a job server, a worker host with the AtoM stand-in, and an outsider.

Run inside the lab network: tools/lab/lab exec -- .venv/bin/pytest tests/roles
The tests share the hosts and run in file order; each one leaves the hosts converged to the defaults
(plus what it says).
"""

import hashlib

import pytest
from labhosts import ATOM_ROOT

pytestmark = pytest.mark.timeout(900)

GM, W1, OUT = "r-gm", "r-w1", "r-out"
INVENTORY = {
    "all": {
        "children": {
            "gearman_job_servers": {
                "hosts": {
                    GM: {"gearman_job_server_listen_address": "{{ ansible_host }}"}
                }
            },
            "atom_workers": {"hosts": {W1: None}},
            "atom_standin": {"children": {"atom_workers": None}},
            "outsiders": {"hosts": {OUT: None}},
        }
    }
}
PREFIX = hashlib.md5(ATOM_ROOT.encode()).hexdigest()


@pytest.fixture(scope="module")
def lab(make_lab):
    lab = make_lab(INVENTORY)
    lab.converge()
    return lab


def can_connect(lab, host, address, port=4730):
    code = (
        f"import socket; s=socket.socket(); s.settimeout(3); "
        f"print(s.connect_ex(('{address}', {port})))"
    )
    return lab.run(host, f'python3 -c "{code}"').stdout.strip() == "0"


def snapshot(lab, host):
    """Checksums of everything the roles write on a host, and the workers' PIDs."""
    return lab.run(
        host,
        "md5sum /etc/systemd/system/atom-worker* /etc/systemd/system/atom-workers* "
        "/etc/atom-worker/sites.json /etc/default/gearman-job-server "
        f"{ATOM_ROOT}/config/*.yml 2>/dev/null; "
        "systemctl show -p MainPID 'atom-worker*@*' 2>/dev/null; true",
    ).stdout


def test_converged_worker_runs_registered_and_processes_a_job(lab):
    unit = lab.show(
        W1,
        "atom-worker@1.service",
        "ActiveState",
        "User",
        "Restart",
        "RestartUSec",
        "StartLimitBurst",
        "StartLimitIntervalUSec",
        "After",
        "Wants",
        "NRestarts",
    )
    assert unit["ActiveState"] == "active"
    assert unit["User"] == "www-data"
    assert unit["Restart"] == "on-failure"
    assert unit["RestartUSec"] == "30s"
    assert unit["StartLimitBurst"] == "3"
    assert unit["StartLimitIntervalUSec"] == "1d"
    assert "network-online.target" in unit["After"].split()
    ids = lab.submit(W1, "arFindingAidJob", 1)
    lab.wait_for(
        lambda: (
            ids[0]
            in {e["id"] for e in lab.events(W1, "job") if e["status"] == "completed"}
        ),
        timeout=30,
        what="the job to complete",
    )
    status = lab.run(GM, f"gearadmin -h {lab.address(GM)} --status").stdout
    assert f"{PREFIX}-arFindingAidJob" in status


APPLY = "Install, configure, run and record the workers (only what drifted)"
WAIT = "Wait until gearmand lists every worker of the host"


def test_second_run_changes_nothing(lab):
    result = lab.converge()
    assert result.changed() == 0, result
    # Nothing drifted: the worker role's steps were not even loaded (the speed of a no-change converge);
    # the repair test below is the control that the same task is included when something did drift.
    assert result.task(APPLY) == {W1: "skipping"}, result
    # ...and every worker was registered when the probe asked: no registration wait either (the control,
    # test_a_worker_not_yet_registered_is_waited_for, makes the same run wait).
    assert result.task(WAIT) == {W1: "skipping"}, result


def test_a_worker_not_yet_registered_is_waited_for(lab):
    """Nothing drifted, but a worker restarted a moment ago has not registered yet: the probe's check says so
    and site.yml waits for it (a converge ends with every worker registered, drift or not)."""
    lab.control(W1, start_delay=20)
    try:
        lab.run(W1, "systemctl restart atom-worker@1.service")
        result = lab.converge()
    finally:
        lab.control(W1)
    assert result.changed() == 0, result
    assert result.task(APPLY) == {W1: "skipping"}, result
    assert result.task(WAIT) == {W1: "included"}, result
    assert result.task("Assert every worker of this host is registered with gearmand") == {W1: "ok"}, result


def test_a_converge_repairs_a_host_it_would_otherwise_skip(lab):
    """The roles read each host once and then skip apt, folders, files and service starts that are already
    as wanted. Each skip must still see a damaged host: a package removed, a unit file's mode, a folder's
    mode, an edited helper, the workers' target disabled, the (one) instance stopped, a stopped gearmand.
    (The control: the run before this one changed nothing on the same hosts.)"""
    helper = "/usr/local/lib/atom-worker/atom-worker-recycle"
    pristine = lab.run(W1, f"md5sum {helper}").stdout
    lab.run(W1, "apt-get remove -y -q php-gearman >/dev/null")
    lab.run(W1, f"chmod 0600 /etc/systemd/system/atom-worker@.service && chmod 0700 /etc/atom-worker "
                f"&& echo '# edited' >> {helper}")
    lab.run(W1, "systemctl disable -q atom-workers.target && systemctl stop atom-worker@1.service")
    # An instance above the wanted count, and AtoM's workers_key edited by hand.
    lab.run(W1, "systemctl enable -q --now atom-worker@5.service")
    app_yml = f"{ATOM_ROOT}/config/app.yml"
    key_line = lab.run(W1, f"grep -n '^  workers_key:' {app_yml}").stdout
    lab.run(W1, f"sed -i 's/^  workers_key:.*/  workers_key: edited/' {app_yml}")
    lab.run(GM, "systemctl stop gearman-job-server.service")
    assert lab.run(W1, "dpkg-query -W -f '${db:Status-Status}' php-gearman", check=False).stdout != "installed"

    result = lab.converge()
    assert result.changed() > 0, result
    assert result.task(APPLY) == {W1: "included"}, result
    assert lab.run(W1, f"grep -n '^  workers_key:' {app_yml}").stdout == key_line
    assert lab.run(W1, "systemctl is-enabled atom-worker@5.service", check=False).stdout.strip() != "enabled"
    assert lab.run(W1, "dpkg-query -W -f '${db:Status-Status}' php-gearman").stdout == "installed"
    modes = lab.run(W1, "stat -c '%a %U' /etc/systemd/system/atom-worker@.service /etc/atom-worker").stdout.split("\n")
    assert modes[:2] == ["644 root", "755 root"], modes
    assert lab.run(W1, f"md5sum {helper}").stdout == pristine
    assert lab.run(W1, "systemctl is-enabled atom-workers.target atom-worker@1.service").stdout.split() == [
        "enabled", "enabled"]
    assert lab.units(W1, state="active") == ["atom-worker@1.service"]
    assert lab.show(GM, "gearman-job-server.service", "ActiveState")["ActiveState"] == "active"
    # site.yml waited until gearmand listed both workers again; the repaired host runs a job.
    ids = lab.submit(W1, "arFindingAidJob", 1)
    lab.wait_for(lambda: ids[0] in {e["id"] for e in lab.events(W1, "job") if e["status"] == "completed"},
                 timeout=60, what="the job to complete")
    again = lab.converge()
    assert again.changed() == 0, again


def test_skipping_one_step_by_tag_still_repairs_the_others(lab):
    """The decision and the include always run; the steps keep their own tags. --skip-tags of one step (the
    packages) must not skip the others: an edited workers_key and a masked leftover instance are repaired.
    (The control that --skip-tags reaches a step at all: the skipped install task is absent from the run.)"""
    app_yml = f"{ATOM_ROOT}/config/app.yml"
    key_line = lab.run(W1, f"grep -n '^  workers_key:' {app_yml}").stdout
    lab.run(W1, f"sed -i 's/^  workers_key:.*/  workers_key: edited/' {app_yml}")
    lab.run(W1, "systemctl mask -q atom-worker@7.service")
    result = lab.converge(None, "--skip-tags", "atom_worker_install")
    assert result.task(APPLY) == {W1: "included"}, result
    assert result.task("Install PHP and its Gearman extension") == {}, result
    assert lab.run(W1, f"grep -n '^  workers_key:' {app_yml}").stdout == key_line
    assert lab.run(W1, "systemctl is-enabled atom-worker@7.service", check=False).stdout.strip() != "masked"
    again = lab.converge()
    assert again.changed() == 0 and again.task(APPLY) == {W1: "skipping"}, again


def test_security_exposure_is_at_most_3(lab):
    out = lab.run(
        W1, "systemd-analyze security atom-worker@1.service --no-pager | tail -1"
    ).stdout
    score = float(out.split("exposure level for atom-worker@1.service:")[1].split()[0])
    assert score <= 3.0, out


def test_allowlist_admits_workers_and_refuses_others(lab):
    address = lab.address(GM)
    rules = lab.run(GM, "nft list table inet atom_gearman").stdout
    assert "tcp dport != 4730 accept" in rules
    assert can_connect(lab, W1, address)
    # The control: the outsider reaches the job server's address on another port (a listener there), so
    # its refusal on 4730 is the allowlist's.
    lab.run(GM, f"timeout 60 python3 -c \"import socket,time; s=socket.create_server(('{address}', 4799)); "
                "time.sleep(60)\" >/dev/null 2>&1 &")
    lab.wait_for(lambda: ":4799" in lab.run(GM, "ss -Hltn sport = :4799").stdout, timeout=30, what="listener on 4799")
    assert can_connect(lab, OUT, address, 4799)
    assert not can_connect(lab, OUT, address)
    # gearmand listens on the inventory address only
    assert f"{address}:4730" in lab.run(GM, "ss -Hltn sport = :4730").stdout


@pytest.mark.parametrize(
    "extra_vars, needle",
    [
        ({"atom_worker_instances": -1}, "atom_worker_instances"),
        ({"gearman_job_server_port": "abc"}, "gearman_job_server_port"),
        ({"atom_worker_manager": "runit"}, "atom_worker_manager"),
        (
            {"atom_worker_pools": [{"name": "serial", "instances": 1}]},
            "atom_worker_pools[0]",
        ),
        ({"atom_worker_manager": "circus", "atom_worker_circus_endpoint": "tcp://127.0.0.1:5555"},
         "got tcp://127.0.0.1:5555"),
        ({"atom_worker_manager": "circus", "atom_worker_circus_service": "atom-worker@9"},
         "(got atom-worker@9)"),
    ],
    ids=["instances-1", "port-abc", "unknown-manager", "pool-without-types", "circus-tcp-endpoint",
         "circus-service-instance"],
)
def test_bad_values_fail_before_any_change(lab, extra_vars, needle):
    before = {h: snapshot(lab, h) for h in (GM, W1)}
    result = lab.converge(extra_vars, check=False)
    assert result.returncode != 0
    assert needle in result.stdout, result
    assert result.changed() == 0, result
    assert {h: snapshot(lab, h) for h in (GM, W1)} == before


def test_queued_jobs_survive_a_gearmand_restart(lab):
    address = lab.address(GM)
    lab.run(W1, "systemctl stop atom-workers.target")
    assert lab.units(W1, "atom-worker@*", state="active") == []
    mark = len(lab.record(W1))
    function = f"{PREFIX}-arFindingAidJob"
    # Queued straight to gearmand (AtoM's web app would refuse with no worker available).
    php = (
        f"<?php $c = new GearmanClient(); $c->addServer('{address}', 4730);\n"
        f"for ($i = 0; $i < 100; $i++) {{\n"
        f"  $c->doBackground('{function}', json_encode(['id' => 'q'.$i, 'name' => 'q']));\n"
        "  if ($c->returnCode() != GEARMAN_SUCCESS) { exit(1); } }\n"
    )
    lab.run(W1, f"cat > /tmp/queue100.php <<'EOF'\n{php}EOF\nphp /tmp/queue100.php")
    assert (
        f"{function}\t100\t0\t0"
        in lab.run(GM, f"gearadmin -h {address} --status").stdout
    )
    lab.run(GM, "systemctl restart gearman-job-server.service")
    assert (
        f"{function}\t100\t0\t0"
        in lab.run(GM, f"gearadmin -h {address} --status").stdout
    )
    lab.run(
        W1,
        "systemctl reset-failed 'atom-worker@*'; systemctl start atom-workers.target",
    )
    expected = {f"q{i}" for i in range(100)}
    lab.wait_for(
        lambda: (
            expected
            <= {
                e["id"]
                for e in lab.events(W1, "job", mark)
                if e["status"] == "completed"
            }
        ),
        timeout=120,
        what="the 100 queued jobs",
    )
    done = [e["id"] for e in lab.events(W1, "job", mark) if e["id"] in expected]
    assert len(done) == 100  # each exactly once
