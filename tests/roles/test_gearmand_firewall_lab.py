"""gearmand's queue survives a crash, and its allowlist fails closed: real gearmand and nftables on lab hosts.

Run inside the lab network: tools/lab/lab exec -- .venv/bin/pytest tests/roles/test_gearmand_firewall_lab.py
Hosts (`rf-`): rf-gm (gearmand on its lab address: the allowlist is on), rf-w1 (in `atom_workers`: allowed,
nothing else is installed on it), rf-out (in no group of site.yml: outside the allowlist). Every converge is
`site.yml --limit rf-gm`; the tests run in file order and each leaves rf-gm converged to the defaults.
"""

import ipaddress
import re

import pytest

pytestmark = pytest.mark.timeout(900)

GM, W1, OUT = "rf-gm", "rf-w1", "rf-out"
INVENTORY = {
    "all": {
        "children": {
            "gearman_job_servers": {"hosts": {GM: {"gearman_job_server_listen_address": "{{ ansible_host }}"}}},
            "atom_workers": {"hosts": {W1: None}},
            "outsiders": {"hosts": {OUT: None}},
        }
    }
}
FIREWALL_UNIT = "atom-gearman-firewall.service"
ALLOWLIST = "/etc/atom-gearman/allowlist.nft"
PROBE_FUNCTION = "rf-durability-probe"  # no worker serves it: its jobs stay queued
# Runs on a lab host until stopped: one TCP connect to ADDRESS:4730 every 20 ms, its errno per line (0 = connected).
SAMPLER = """import socket, sys, time
out = open(sys.argv[2], "w", buffering=1)
while True:
    s = socket.socket(); s.settimeout(1)
    out.write(f"{s.connect_ex((sys.argv[1], 4730))}\\n"); s.close(); time.sleep(0.02)
"""


@pytest.fixture(scope="module")
def lab(make_lab):
    lab = make_lab(INVENTORY)
    converge(lab)
    return lab


def converge(lab, extra_vars=None):
    result = lab.converge(extra_vars, "--limit", GM)
    assert result.returncode == 0, result
    return result


def connects(lab, host, port=4730):
    """True when a TCP connection from `host` to the job server's address and `port` is accepted."""
    code = f"import socket; s=socket.socket(); s.settimeout(3); print(s.connect_ex(('{lab.address(GM)}', {port})))"
    return lab.run(host, f'python3 -c "{code}"').stdout.strip() == "0"


def table_loaded(lab):
    return lab.run(GM, "nft list chain inet atom_gearman input", check=False).returncode == 0


def assert_fails_closed(lab):
    """The table is loaded: the allowed host gets in, the outsider gets a reset on 4730 (yet reaches sshd)."""
    assert table_loaded(lab)
    assert connects(lab, W1)
    assert connects(lab, OUT, 22)  # positive control: the outsider reaches the job server itself
    assert not connects(lab, OUT)


def gearmand_pid(lab):
    return lab.show(GM, "gearman-job-server.service", "MainPID")["MainPID"]


# The role reads the job server in one probe and includes tasks/apply.yml only when something drifted.
APPLY_TASK = ("TASK [gearman_job_server : Change what is not as wanted "
              "(install, allowlist, configuration, allowlist removal)]")
APPLIED = re.compile(rf"^included: \S+/roles/gearman_job_server/tasks/apply\.yml for {GM}$", re.M)


def applied(result):
    """The converge included the role's tasks/apply.yml on the job server (the include was not skipped)."""
    return APPLIED.search(result.stdout) is not None


def allowlist_reloads(lab):
    """How many times systemd reloaded the allowlist unit ("Reloading ..." in its journal)."""
    return int(lab.run(GM, f"journalctl -q -o cat -u {FIREWALL_UNIT} | grep -c '^Reloading' || true").stdout)


def restarts(lab):
    """gearmand's main PID, when the allowlist unit last started and how often it was reloaded."""
    return gearmand_pid(lab), lab.show(GM, FIREWALL_UNIT, "ActiveEnterTimestampMonotonic"), allowlist_reloads(lab)


# -- probe, then change only what drifted ---------------------------------------------------------------------
def test_a_converge_with_nothing_to_do_skips_the_change_step(lab):
    before = restarts(lab)
    result = converge(lab)
    assert result.changed() == 0, result
    # The include was reached and skipped, not absent (a renamed task would make the check below vacuous).
    assert APPLY_TASK in result.stdout, result
    assert not applied(result), result
    assert "RUNNING HANDLER" not in result.stdout, result
    assert restarts(lab) == before


@pytest.mark.parametrize("damage", ["edited-default-file", "flushed-table", "stopped-nftables"])
def test_a_drifted_job_server_includes_the_change_step_and_is_repaired(lab, damage):
    """The positive control of the test above: the same converge on a damaged job server includes
    tasks/apply.yml and repairs it, and the next converge includes it no more."""
    default = lab.run(GM, "cat /etc/default/gearman-job-server").stdout
    pid, reloads = gearmand_pid(lab), allowlist_reloads(lab)
    if damage == "edited-default-file":
        lab.run(GM, "echo '# edited' >> /etc/default/gearman-job-server")
    elif damage == "flushed-table":
        lab.run(GM, "nft flush table inet atom_gearman")  # the chain stays, its rules are gone
        assert connects(lab, OUT)  # the damage is real: the port is open to the outsider
    else:
        # Stops the allowlist unit (PartOf=) and gearmand (Requires=) with it; the run's start of nftables
        # flushes the ruleset, then the allowlist unit's start loads the table before gearmand starts.
        lab.run(GM, "systemctl stop nftables.service")
        assert lab.show(GM, "gearman-job-server.service", "ActiveState")["ActiveState"] != "active"
    result = converge(lab)
    assert applied(result), result
    assert result.changed() >= 1, result
    assert lab.run(GM, "cat /etc/default/gearman-job-server").stdout == default
    if damage in ("edited-default-file", "stopped-nftables"):
        assert gearmand_pid(lab) != pid  # restarted on the repaired configuration, or started again
    else:
        assert "Load the allowlist again" in result.stdout
        assert allowlist_reloads(lab) > reloads  # what the test above counts does move
        assert gearmand_pid(lab) == pid
    assert_fails_closed(lab)
    again = converge(lab)
    assert again.changed() == 0 and not applied(again), again


def start_sampler(lab, host, name):
    lab.run(host, f"cat > /root/sampler.py <<'EOF'\n{SAMPLER}EOF\nrm -f /root/{name}.txt")
    lab.run(host, f"systemd-run --unit={name} python3 /root/sampler.py {lab.address(GM)} /root/{name}.txt")

    def wrote():
        return lab.run(host, f"cat /root/{name}.txt", check=False).stdout.strip()

    lab.wait_for(wrote, timeout=30, what=f"the sampler on {host} to write")


def stop_sampler(lab, host, name):
    lab.run(host, f"systemctl stop {name}; systemctl reset-failed {name} 2>/dev/null; true")
    return [int(x) for x in lab.run(host, f"cat /root/{name}.txt").stdout.split()]


# -- the queue survives a crash ------------------------------------------------------------------------------
def queue_probe_jobs(lab, count=20):
    address = lab.address(GM)
    lab.run(GM, f"for i in $(seq {count}); do gearman -h {address} -b -f {PROBE_FUNCTION} j$i || exit 1; done")
    return queued(lab)


def queued(lab):
    """gearmand's admin `status`: jobs queued for the probe function (0 when the function is unknown)."""
    out = lab.run(GM, f"gearadmin -h {lab.address(GM)} --status").stdout
    match = re.search(rf"^{PROBE_FUNCTION}\t(\d+)\t", out, re.M)
    return int(match[1]) if match else 0


def kill_gearmand(lab):
    """SIGKILL, no shutdown: Debian's unit (Restart=always) starts a new gearmand, which must answer."""
    before = gearmand_pid(lab)
    lab.run(GM, "systemctl kill -s KILL gearman-job-server.service")
    lab.wait_for(lambda: gearmand_pid(lab) not in ("0", before), timeout=30, what="a new gearmand")
    lab.wait_for(lambda: lab.run(GM, f"gearadmin -h {lab.address(GM)} --status", check=False).returncode == 0,
                 timeout=30, what="the new gearmand to answer")


def drain_probe_jobs(lab, count):
    """A worker takes `count` probe jobs: each payload comes back once (the jobs were really there)."""
    out = lab.run(GM, f"timeout 30 gearman -h {lab.address(GM)} -w -f {PROBE_FUNCTION} -c {count}").stdout
    return sorted(re.findall(r"j\d+", out))


def test_default_queue_keeps_every_job_through_a_sigkill(lab):
    assert "--store-queue-on-shutdown" not in lab.run(GM, "cat /etc/default/gearman-job-server").stdout
    assert queue_probe_jobs(lab) == 20
    kill_gearmand(lab)
    assert queued(lab) == 20
    assert drain_probe_jobs(lab, 20) == sorted(f"j{i}" for i in range(1, 21))
    assert queued(lab) == 0


def test_clean_shutdown_mode_loses_them_the_control(lab):
    """The same probe fails when the queue is written only at a clean shutdown: the test above can fail."""
    try:
        converge(lab, {"gearman_job_server_queue_durability": "clean-shutdown"})
        assert "--store-queue-on-shutdown" in lab.run(GM, "cat /etc/default/gearman-job-server").stdout
        assert queue_probe_jobs(lab) == 20
        kill_gearmand(lab)
        assert queued(lab) == 0
    finally:
        converge(lab)


def test_bad_durability_value_is_refused_before_any_change(lab):
    before = lab.run(GM, "md5sum /etc/default/gearman-job-server").stdout
    result = lab.converge({"gearman_job_server_queue_durability": "sometimes"}, "--limit", GM, check=False)
    assert result.returncode != 0
    assert "gearman_job_server_queue_durability" in result.stdout, result
    assert result.changed() == 0, result
    assert lab.run(GM, "md5sum /etc/default/gearman-job-server").stdout == before


# -- the allowlist fails closed ------------------------------------------------------------------------------
@pytest.mark.parametrize("action", ["restart", "reload"])
def test_allowlist_survives_nftables_restart_and_reload(lab, action):
    assert_fails_closed(lab)
    pid = gearmand_pid(lab)
    if action == "restart":
        start_sampler(lab, OUT, "rf-sample-out")
        try:
            lab.run(GM, "systemctl restart nftables.service")
        finally:
            samples = stop_sampler(lab, OUT, "rf-sample-out")
        # gearmand stops before the ruleset is flushed and starts after the table is back (PartOf= on the
        # allowlist unit, Requires= on gearmand): the outsider never got in while the sampler ran.
        assert samples and 0 not in samples, samples
        assert gearmand_pid(lab) != pid
    else:
        # A reload loads the table again right after nftables' own (ReloadPropagatedFrom=) and leaves gearmand
        # running. Not sampled: between the two loads there is a window of tens of ms (role README).
        lab.run(GM, "systemctl reload nftables.service")
        assert gearmand_pid(lab) == pid
    assert_fails_closed(lab)
    assert converge(lab).changed() == 0


def test_converge_loads_a_table_that_was_flushed(lab):
    lab.run(GM, "nft flush ruleset")
    assert connects(lab, OUT)  # the probe does see an open port: the checks above can fail
    result = converge(lab)
    assert result.changed() == 1, result  # the reload of the allowlist, nothing else
    assert "Load the allowlist again" in result.stdout
    assert applied(result), result
    assert_fails_closed(lab)


def test_gearmand_does_not_start_when_its_allowlist_cannot_load(lab):
    lab.run(GM, f"cp {ALLOWLIST} /root/allowlist.good")
    try:
        lab.run(GM, f"systemctl stop {FIREWALL_UNIT}")
        # Requires=: stopping the allowlist stopped gearmand with it
        assert lab.show(GM, "gearman-job-server.service", "ActiveState")["ActiveState"] == "inactive"
        lab.run(GM, f"echo 'table inet atom_gearman {{ bogus }}' > {ALLOWLIST}")
        start = lab.run(GM, "systemctl start gearman-job-server.service", check=False)
        assert start.returncode != 0
        assert "dependency" in start.stderr.lower(), start.stderr
        assert lab.show(GM, FIREWALL_UNIT, "ActiveState")["ActiveState"] == "failed"
        assert lab.show(GM, "gearman-job-server.service", "ActiveState")["ActiveState"] != "active"
        assert lab.run(GM, "ss -Hltn sport = :4730").stdout.strip() == ""
        assert not connects(lab, W1)
    finally:
        lab.run(GM, f"cp /root/allowlist.good {ALLOWLIST}")
    # positive control: the same start with a loadable allowlist brings gearmand up
    lab.run(GM, f"systemctl reset-failed {FIREWALL_UNIT}; systemctl start gearman-job-server.service")
    assert_fails_closed(lab)
    assert converge(lab).changed() == 0


def test_an_allowlist_with_a_network_and_a_host_inside_it_converges(lab):
    network = str(ipaddress.ip_interface(f"{lab.address(GM)}/24").network)  # holds rf-w1 and rf-out
    extra = {"gearman_job_server_allowed_addresses": [network]}
    try:
        converge(lab, extra)
        assert network in lab.run(GM, "nft list set inet atom_gearman allowed_v4").stdout
        assert connects(lab, OUT)  # the outsider is inside the listed network now
        assert converge(lab, extra).changed() == 0
    finally:
        converge(lab)
    assert_fails_closed(lab)


def test_switching_the_allowlist_off_never_exposes_the_old_address(lab):
    assert_fails_closed(lab)
    start_sampler(lab, OUT, "rf-sample-out")
    start_sampler(lab, W1, "rf-sample-w1")
    try:
        result = converge(lab, {"gearman_job_server_listen_address": "127.0.0.1"})
    finally:
        outsider, allowed = stop_sampler(lab, OUT, "rf-sample-out"), stop_sampler(lab, W1, "rf-sample-w1")
    try:
        # Positive control: the allowed host's sampler reached gearmand on the old address while the
        # converge ran, then lost it; the outsider's, running all along, never got in.
        assert allowed and allowed[0] == 0 and allowed[-1] != 0, allowed
        assert outsider and 0 not in outsider, outsider
        # and the order that guarantees it: gearmand restarted on loopback, then the table removed
        tasks = re.findall(r"^(?:RUNNING HANDLER|TASK) \[gearman_job_server : ([^\]]+)\]", result.stdout, re.M)
        removal = "Stop and disable the allowlist unit (its stop deletes the table)"
        assert tasks.index("Restart gearmand") < tasks.index(removal), tasks
        assert not table_loaded(lab)
        listening = lab.run(GM, "ss -Hltn sport = :4730").stdout.split()
        assert "127.0.0.1:4730" in listening and f"{lab.address(GM)}:4730" not in listening
        assert lab.run(GM, f"systemctl cat {FIREWALL_UNIT}", check=False).returncode != 0
        assert "Requires=" not in lab.run(GM, "systemctl cat gearman-job-server.service").stdout
    finally:
        converge(lab)
    assert_fails_closed(lab)
    assert converge(lab).changed() == 0

