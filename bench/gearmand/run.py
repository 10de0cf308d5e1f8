"""What a crash-proof queue costs: background submits per second to gearmand, in each durable queue.

Run inside the lab network from the repository (writes bench/gearmand/results.md and results.json):
    tools/lab/lab exec -- .venv/bin/python bench/gearmand/run.py

One lab host, `bg-gm` (gearmand on 127.0.0.1), converged by `site.yml` in each mode:
  crash           the role's default: each job is written to the sqlite queue when it is queued
  clean-shutdown  `--store-queue-on-shutdown`: the queue is written only when gearmand stops cleanly
  mysql           `gearman_job_server_queue_type: mysql`: each job is written to a MariaDB table on the same
                  host (Debian's mariadb-server, its defaults) when it is queued
The modes alternate (ROUNDS of each); in each round a client on the host itself submits background jobs
over one connection, one at a time (SUBMIT_JOB_BG, wait for JOB_CREATED, as AtoM's doBackground does), for
SECONDS (at most MAX_JOBS), with no worker. Before each round gearmand is stopped and its queue (file or
table) emptied, so every round starts from an empty queue.
"""
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from labhosts import LabHosts, in_lab_network  # noqa: E402

GM = "bg-gm"
INVENTORY = {"all": {"children": {"gearman_job_servers": {"hosts": {GM: None}}}}}
MODES = ["crash", "clean-shutdown", "mysql"]
MYSQL_PASSWORD = "bench-lab-only"
MYSQL = {"gearman_job_server_queue_type": "mysql", "gearman_job_server_mysql_password": MYSQL_PASSWORD}
ROUNDS, SECONDS, MAX_JOBS = 3, 3.0, 200_000
OUT = Path(__file__).resolve().parent

# Runs on the job server: the gearman binary protocol, no client library in the way.
CLIENT = r'''
import json, socket, struct, sys, time
seconds, max_jobs, tag = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
s = socket.create_connection(("127.0.0.1", 4730))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def read(n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk: raise SystemExit("gearmand closed the connection")
        buf += chunk
    return buf
n, start = 0, time.monotonic()
while n < max_jobs and time.monotonic() - start < seconds:
    data = b"bench-submit\0" + f"{tag}-{n}".encode() + b"\0" + b'{"id": "%d"}' % n
    s.sendall(b"\0REQ" + struct.pack(">II", 18, len(data)) + data)   # SUBMIT_JOB_BG
    magic, kind, size = struct.unpack(">4sII", read(12)); read(size)
    if kind != 8: raise SystemExit(f"expected JOB_CREATED, got packet type {kind}")
    n += 1
print(json.dumps({"jobs": n, "seconds": time.monotonic() - start}))
'''


def converge(hosts, mode):
    extra = MYSQL if mode == "mysql" else {"gearman_job_server_queue_durability": mode}
    result = hosts.playbook("site.yml", extra_vars=extra)
    assert result.returncode == 0, result
    params = hosts.run(GM, "cat /etc/default/gearman-job-server").stdout
    assert ("--store-queue-on-shutdown" in params) == (mode == "clean-shutdown"), mode
    assert ("--queue-type=MySQL" in params) == (mode == "mysql"), mode


def install_mariadb(hosts):
    """Debian's mariadb-server (from the lab's served packages), the queue's database and user."""
    hosts.run(GM, "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mariadb-server",
              timeout=600)
    hosts.run(GM, "mariadb -e \"CREATE DATABASE IF NOT EXISTS gearman; CREATE USER IF NOT EXISTS "
                  f"'gearman'@'localhost' IDENTIFIED BY '{MYSQL_PASSWORD}'; "
                  "GRANT ALL ON gearman.* TO 'gearman'@'localhost';\"")


def one_round(hosts, mode, n):
    # An empty queue for each round: stop (clean-shutdown writes the queue here), remove it, start.
    hosts.run(GM, "systemctl stop gearman-job-server; rm -f /var/lib/gearman/queue.sqlite3*; "
                  "mariadb -e 'DROP TABLE IF EXISTS gearman.gearman_queue' 2>/dev/null; "
                  "systemctl reset-failed gearman-job-server; systemctl start gearman-job-server", timeout=300)
    hosts.run(GM, "for i in $(seq 100); do gearadmin -h 127.0.0.1 --status >/dev/null 2>&1 && exit 0; "
                  "sleep 0.1; done; exit 1")
    out = hosts.run(GM, f"python3 /root/submit.py {SECONDS} {MAX_JOBS} {mode}{n}", timeout=120).stdout
    run = json.loads(out)
    queued = hosts.run(GM, "gearadmin -h 127.0.0.1 --status").stdout
    assert f"bench-submit\t{run['jobs']}\t" in queued, queued  # every submit is really queued
    return {**run, "rate": run["jobs"] / run["seconds"]}


def main() -> int:
    if not in_lab_network():
        print("run inside the lab network: tools/lab/lab exec -- .venv/bin/python bench/gearmand/run.py",
              file=sys.stderr)
        return 2
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "bench-gearmand"
    work.mkdir(parents=True, exist_ok=True)
    hosts = LabHosts(INVENTORY, work)
    hosts.down()
    hosts.up()
    runs = {mode: [] for mode in MODES}
    try:
        hosts.run(GM, f"cat > /root/submit.py <<'EOF'\n{CLIENT}EOF")
        install_mariadb(hosts)
        for n in range(ROUNDS):
            for mode in MODES:
                converge(hosts, mode)
                runs[mode].append(one_round(hosts, mode, n))
                print(mode, json.dumps(runs[mode][-1]), flush=True)
    finally:
        if not os.environ.get("ATOM_KEEP_LAB"):
            hosts.down()
    write(runs)
    return 0


def write(runs):
    rate = {mode: statistics.median(r["rate"] for r in runs[mode]) for mode in MODES}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# gearmand queue benchmark: what durability costs",
        "",
        (f"Recorded {now} by `bench/gearmand/run.py` on {platform.node()} ({os.cpu_count()} cores of {cpu}; "
         f"kernel {platform.release()}; load average {os.getloadavg()[0]:.1f} at the end; the lab is shared "
         "with other work). One lab host, gearmand 1.1.20 with the libsqlite3 queue on the host's disk (an "
         "overlay on this machine's file system) or its MySQL queue in MariaDB 10.11 on the same host (Debian's "
         f"defaults: InnoDB, a log flush at each commit); {ROUNDS} rounds of each mode, alternating, each "
         f"{SECONDS:g} s of background submits from one client on the host, one at a time, from an empty queue."),
        "",
        "| queue (`_queue_type` / `_queue_durability`) | background submits/s (median) | runs | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for mode in MODES:
        each = ", ".join(f"{r['rate']:.0f}" for r in runs[mode])
        name = "`mysql`" if mode == "mysql" else f"`libsqlite3` / `{mode}`"
        lines.append(f"| {name} | {rate[mode]:.0f} | {each} | {rate[mode] / rate['clean-shutdown']:.2f} |")
    lines += ["", "Raw figures are in `results.json`.", ""]
    (OUT / "results.md").write_text("\n".join(lines))
    (OUT / "results.json").write_text(json.dumps({"recorded": now, "host": platform.node(), "rounds": ROUNDS,
                                                  "seconds": SECONDS, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
