"""Background jobs submitted straight to gearmand, as AtoM's web app submits them, but without asking for
available workers first (the stand-in's web app refuses then): tests queue jobs while workers are away."""

import subprocess
import sys

# SUBMIT_JOB_BG of the binary protocol. A script text, so that it runs on lab hosts as well as here.
# Usage on a host: python3 /root/gsubmit.py HOST PORT FUNCTION ID_PREFIX COUNT [PAYLOAD_JSON]
# Prints the ids (ID_PREFIX0..), one a line. Stdlib only: lab hosts have python3 and nothing else.
GSUBMIT = r'''
import json, socket, struct, sys
host, port, function, prefix, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
extra = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
s = socket.create_connection((host, port), timeout=10)
def read(n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            sys.exit("gearmand closed the connection")
        buf += chunk
    return buf
for i in range(count):
    job_id = f"{prefix}{i}"
    data = b"\0".join([function.encode(), job_id.encode(),
                       json.dumps({**extra, "id": job_id, "name": "drill"}).encode()])
    s.sendall(b"\0REQ" + struct.pack(">II", 18, len(data)) + data)   # SUBMIT_JOB_BG
    magic, kind, size = struct.unpack(">4sII", read(12))
    read(size)
    if kind != 8:                                                       # JOB_CREATED
        sys.exit(f"gearmand answered packet type {kind} to job {job_id}")
    print(job_id)
'''


def submit_here(host: str, port: int, function: str, prefix: str, count: int) -> list[str]:
    """Submit from this machine; the job ids."""
    out = subprocess.run([sys.executable, "-c", GSUBMIT, host, str(port), function, prefix, str(count)],
                         capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.split()
