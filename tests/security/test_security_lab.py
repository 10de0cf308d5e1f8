"""Security checks on converged lab hosts: the hardening figures the role READMEs promise, who runs what,
where gearmand listens and who can reach it, and file modes.

Run inside the lab network: tools/lab/lab exec -- .venv/bin/pytest tests/security
Hosts (`s-`): s-gm (gearmand on its lab address: the allowlist is on), s-w1 (a worker host: allowed),
s-out (in no group of site.yml: outside the allowlist). One converge for the module.
"""

import os
import re

import pytest
from labhosts import ATOM_ROOT, REPO, LabHosts
from polling import wait_until

pytestmark = pytest.mark.timeout(600)

GM, W1, OUT = "s-gm", "s-w1", "s-out"
PLAYBOOK = "playbooks/lab/site.yml"   # the lab's: the AtoM stand-in, then site.yml
INVENTORY = {"all": {"children": {
    "gearman_job_servers": {"hosts": {GM: {"gearman_job_server_listen_address": "{{ ansible_host }}"}}},
    "atom_workers": {"hosts": {W1: {"atom_worker_instances": 2}}},
    "outsiders": {"hosts": {OUT: None}},
}}}
# Everything the roles write (templates, copies, directories; symlinks aside), per host.
WRITTEN = {
    W1: ["/etc/systemd/system/atom-worker@.service", "/etc/systemd/system/atom-workers.target", "/etc/atom-worker",
         "/usr/local/lib/atom-worker", f"{ATOM_ROOT}/config/gearman.yml", f"{ATOM_ROOT}/config/app.yml"],
    GM: ["/etc/default/gearman-job-server", "/etc/systemd/system/gearman-job-server.service.d", "/etc/atom-gearman",
         "/etc/systemd/system/atom-gearman-firewall.service", "/var/lib/gearman", "/var/log/gearman-job-server"],
}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    hosts = LabHosts(INVENTORY, tmp_path_factory.mktemp("security"))
    hosts.down()
    hosts.up()
    try:
        result = hosts.playbook(PLAYBOOK)
        assert result.returncode == 0, result
        yield hosts
    finally:
        if not os.environ.get("ATOM_KEEP_LAB"):
            hosts.down()


def readme_figure(role, unit):
    """The exposure the role's README states for `systemd-analyze security UNIT`."""
    text = (REPO / "roles" / role / "README.md").read_text()
    match = re.search(rf"systemd-analyze security {re.escape(unit)}`\*?\*?(?::| =) (\d+\.\d)", text)
    assert match, f"roles/{role}/README.md states no figure for {unit}"
    return match.group(1)


def exposure(hosts, host, unit):
    out = hosts.run(host, f"systemd-analyze security {unit} --no-pager").stdout
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d)", out)
    assert match, out[-2000:]
    return match.group(1)


@pytest.mark.parametrize("host, role, unit", [(W1, "atom_worker", "atom-worker@1.service"),
                                              (GM, "gearman_job_server", "gearman-job-server.service")],
                         ids=["atom-worker@1", "gearmand"])
def test_exposure_is_the_readme_figure(hosts, host, role, unit):
    assert exposure(hosts, host, unit) == readme_figure(role, unit)


def test_no_worker_and_not_gearmand_runs_as_root(hosts):
    rows = [line.split(None, 2) for line in
            hosts.run(W1, "ps -e -o user=,unit=,comm=").stdout.splitlines() if "atom-worker" in line]
    workers = [r for r in rows if r[1].startswith("atom-worker@")]
    assert len({r[1] for r in workers}) == 2, rows          # both instances seen
    assert {r[0] for r in workers} == {"www-data"}, rows
    for unit in ("atom-worker@1.service", "atom-worker@2.service"):
        assert "User=www-data" in hosts.run(W1, f"systemctl show -p User {unit}").stdout
    gearmand = hosts.run(GM, "ps -C gearmand -o user=").stdout.split()
    assert gearmand and "root" not in gearmand, gearmand


def test_gearmand_listens_only_on_the_configured_address(hosts):
    out = hosts.run(GM, "ss -Hltnp").stdout
    sockets = sorted(line.split()[3] for line in out.splitlines() if '"gearmand"' in line)
    assert sockets == [f"{hosts.address(GM)}:4730"], out


PROBE = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], 4730), timeout=3)
    s.settimeout(3)
    s.sendall(b"status\\n")
    buf = b""
    while not (buf == b".\\n" or buf.endswith(b"\\n.\\n")):
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    print("answered" if buf.endswith(b".\\n") else "closed")
except OSError as e:
    print("unreachable", e)
"""


def answers(hosts, host, server):
    """True when gearmand answers its admin `status` from `host`; False when the port is unreachable."""
    hosts.run(host, f"cat > /root/probe.py <<'EOF'\n{PROBE}EOF")
    out = hosts.run(host, f"python3 /root/probe.py {server}").stdout.strip()
    assert out.startswith(("answered", "unreachable")), out
    return out == "answered"


def connects(hosts, host, server, port):
    """A TCP connection from `host` to server:port is accepted."""
    code = f"import socket; s=socket.socket(); s.settimeout(3); print(s.connect_ex(({server!r}, {port})))"
    return hosts.run(host, f'python3 -c "{code}"').stdout.strip() == "0"


def test_port_4730_unreachable_outside_the_allowlist_and_open_inside(hosts):
    server, outsider = hosts.address(GM), hosts.address(OUT)
    assert answers(hosts, W1, server)
    # Controls first: the outsider reaches the job server host (a listener on another port of the same
    # address), so a refusal on 4730 below is the allowlist's doing, not a broken path.
    hosts.run(GM, f"timeout 120 python3 -c \"import socket,time; s=socket.create_server(({server!r}, 4799)); "
                  f"time.sleep(120)\" >/dev/null 2>&1 &")
    wait_until(lambda: ":4799" in hosts.run(GM, "ss -Hltn sport = :4799").stdout, timeout=30, what="listener on 4799")
    assert connects(hosts, OUT, server, 4799)
    assert not answers(hosts, OUT, server)
    # Listed, the same outsider gets gearmand's answer; unlisted again, it is refused again.
    extra = {"gearman_job_server_allowed_addresses": [outsider]}
    result = hosts.playbook(PLAYBOOK, extra_vars=extra)
    assert result.returncode == 0, result
    assert answers(hosts, OUT, server)
    result = hosts.playbook(PLAYBOOK)
    assert result.returncode == 0, result
    assert not answers(hosts, OUT, server) and answers(hosts, W1, server)


def test_no_file_the_roles_write_is_world_writable(hosts):
    for host, paths in WRITTEN.items():
        listed = hosts.run(host, "find " + " ".join(paths) + " ! -type l -printf '%m %p\\n'").stdout.splitlines()
        assert len(listed) >= len(paths), listed       # every path exists (find fails on a missing one too)
        writable = [line for line in listed if int(line.split()[0], 8) & 0o002]
        assert writable == [], writable
