"""Hostile input against a converged lab host: refused before any task changes anything, and the playbooks'
gearmand check (shipped through its symlink to the CLI's client) ends on time against a peer that trickles.

Run inside the lab network: tools/lab/lab exec -- .venv/bin/pytest tests/drills/test_hostile_input_lab.py
One host, `hx-solo`: gearmand and 2 workers. The local tests of the same inputs are in
tests/cli/test_hostile_input.py; this module proves "nothing changed" on real systemd units.
"""

import json

import pytest
from labhosts import ATOM_ROOT, REPO
from polling import wait_until

pytestmark = pytest.mark.timeout(900)

H = "hx-solo"
UNIT = "/etc/systemd/system/atom-worker@.service"
INVENTORY = {"all": {"children": {
    "gearman_job_servers": {"hosts": {H: None}},
    "atom_workers": {"hosts": {H: {"atom_worker_instances": 2}}},
}}}

# Answers each connection with a byte every 0.2 s and never a whole line: only a deadline ends a read.
TRICKLE = r'''
import socket, threading, time
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", 4799))
server.listen()
def serve(conn):
    try:
        conn.recv(100)
        while True:
            conn.sendall(b"5")
            time.sleep(0.2)
    except OSError:
        conn.close()
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
'''

# The playbooks' wait, alone (as site.yml, scale.yml, reset.yml and rolling-restart.yml include it).
WAIT_PLAY = """- hosts: atom_workers
  gather_facts: false
  tasks:
    - name: The playbooks' registration wait
      ansible.builtin.include_tasks: {repo}/playbooks/tasks/wait-registered.yml
"""


@pytest.fixture(scope="module")
def drill(make_drill):
    drill = make_drill(INVENTORY)
    drill.converge()
    return drill


def snapshot(drill):
    """Checksums of what the role writes and of AtoM's config, and every worker's systemd state."""
    return drill.run(H, (
        f"md5sum /etc/systemd/system/atom-worker* /etc/atom-worker/sites.json {ATOM_ROOT}/config/*.yml; "
        "systemctl show -p Id -p ActiveState -p MainPID -p NRestarts 'atom-worker@*'")).stdout


HOSTILE = [
    ("ability-with-a-unit-line", {"atom_worker_abilities": ["X\nUser=root"]},
     "atom_worker_abilities[0]='X\\nUser=root' holds a control character"),
    ("php-with-an-option", {"atom_worker_php": "/usr/bin/php -d auto_prepend_file=/tmp/x"},
     "atom_worker_php='/usr/bin/php -d auto_prepend_file=/tmp/x': must be an absolute path"),
    ("workers-key-with-a-yaml-line", {"atom_worker_workers_key": "k\nall: {}"},
     "atom_worker_workers_key='k\\nall: {}' holds a control character"),
]


@pytest.mark.parametrize("extra_vars, expected", [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_values_are_refused_and_change_nothing(drill, extra_vars, expected):
    before = snapshot(drill)
    result = drill.converge(extra_vars=extra_vars, check=False)
    assert result.returncode != 0, result
    assert [ln for ln in result.stdout.splitlines() if expected in ln], result
    assert result.changed() == 0, result
    assert snapshot(drill) == before
    assert drill.run(H, f"grep -c '^User=' {UNIT}").stdout.strip() == "1"


def test_a_sound_change_of_the_same_values_is_applied(drill):
    """The control of the refusals above: the same probe sees a change when one is allowed through."""
    before = snapshot(drill)
    result = drill.converge(extra_vars={"atom_worker_abilities": ["arFindingAidJob"]})
    assert result.changed() > 0, result
    assert snapshot(drill) != before
    assert "--abilities=arFindingAidJob" in drill.run(H, f"grep '^ExecStart=' {UNIT}").stdout
    drill.converge()  # back to the inventory's workers
    assert "--abilities" not in drill.run(H, f"grep '^ExecStart=' {UNIT}").stdout


def wait_playbook(drill, tmp_path, state_file, timeout):
    play = tmp_path / "wait.yml"
    play.write_text(WAIT_PLAY.format(repo=REPO))
    return drill.hosts.playbook(str(play), extra_vars={"atom_worker_state_file": state_file,
                                                       "atom_worker_wait_timeout": timeout})


def test_the_playbooks_wait_runs_its_shipped_client_and_sees_the_workers(drill, tmp_path):
    """Control of the next test: the same wait, against the host's real gearmand, says registered."""
    result = wait_playbook(drill, tmp_path, "/etc/atom-worker/sites.json", 30)
    assert result.returncode == 0, result
    assert '"registered": 2' in result.stdout and '"expected": 2' in result.stdout, result


def test_the_playbooks_wait_ends_at_its_timeout_against_a_trickling_peer(drill, tmp_path):
    drill.run(H, f"cat > /root/trickle.py <<'EOF'\n{TRICKLE}EOF")
    drill.run(H, "systemctl stop hx-trickle 2>/dev/null; systemd-run --unit hx-trickle python3 /root/trickle.py")
    state = json.loads(drill.run(H, "cat /etc/atom-worker/sites.json").stdout)
    for site in state["sites"]:
        site["gearman_servers"] = ["127.0.0.1:4799"]
    drill.run(H, f"cat > /root/trickle-sites.json <<'EOF'\n{json.dumps(state)}\nEOF")
    listening = "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 4799), 1).close()'"
    try:
        wait_until(lambda: drill.run(H, listening, check=False).returncode == 0, 30, 0.2, "the trickling peer")
        result = wait_playbook(drill, tmp_path, "/root/trickle-sites.json", 3)
    finally:
        drill.run(H, "systemctl stop hx-trickle", check=False)
    assert result.returncode != 0, result
    assert "not every worker is registered with gearmand after 3 s" in result.stdout, result
    assert "no complete answer to `workers` before the 3 s wait ended" in result.stdout, result
