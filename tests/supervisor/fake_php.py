#!/usr/bin/python3
"""Stands in for `php` in the rendered supervisord programs: `fake_php.py ARGS... --types=MODE`.

Appends one JSON line per start to ./starts-$SUPERVISOR_PROCESS_NAME.jsonl (cwd is the program's
`directory`): time, pid, argv, cwd, USER. Then, by the pool's --types=:
  crash    exit 1 at once          clean    exit 0 after 0.3 s
  recycle  exit 111 after 0.2 s    sleep    sleep (default signal dispositions: dies by any signal)
"""

import json
import os
import sys
import time

args = sys.argv[1:]
mode = next((arg.split("=", 1)[1] for arg in args if arg.startswith("--types=")), "sleep")
name = os.environ.get("SUPERVISOR_PROCESS_NAME", "unknown")
record = {"t": time.time(), "pid": os.getpid(), "argv": args, "cwd": os.getcwd(), "user": os.environ.get("USER")}
with open(f"starts-{name}.jsonl", "a", encoding="utf-8") as handle:
    handle.write(json.dumps(record) + "\n")
sys.stdout.write(f"fake php {name}: {mode}\n")
sys.stdout.flush()
if mode == "crash":
    sys.exit(1)
if mode == "clean":
    time.sleep(0.3)
    sys.exit(0)
if mode == "recycle":
    time.sleep(0.2)
    sys.exit(111)
time.sleep(3600)
