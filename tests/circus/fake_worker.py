#!/usr/bin/python3
"""Stands in for `php` in the rendered circus watchers: `fake_worker.py ARGS... --types=MODE`.

The instance is $ATOM_WORKER_INSTANCE (the watcher's name, set by the template's [env:NAME]); cwd is the
watcher's working_dir (the harness's AtoM root). At each start it reads its mode from ./mode-<instance> when
that file exists (a test switches a worker's behaviour there), else from --types=, and appends JSON lines to
./runs-<instance>.jsonl: {"event": "start", "t", "pid", "argv", "cwd", "user", "mode"} once it is set up and
{"event": "exit", "t", "pid", "code"} just before an exit of its own. Modes:
  crash    exit 1 at once            clean    exit 0 after 0.3 s
  recycle  exit 111 after 0.2 s      sleep    sleep (default signal dispositions: dies by any signal)
  exit:CODE[:SECONDS]                exit CODE after SECONDS (default 0)
  trap:CODE                          sleep; on SIGTERM exit CODE (a worker whose shutdown fails)
It prints one line to stdout and one to stderr (the shared log file holds both).
"""

import json
import os
import signal
import sys
import time

args = sys.argv[1:]
name = os.environ.get("ATOM_WORKER_INSTANCE", "unknown")
mode = next((arg.split("=", 1)[1] for arg in args if arg.startswith("--types=")), "sleep")
try:
    with open(f"mode-{name}", encoding="utf-8") as handle:
        mode = handle.read().strip() or mode
except FileNotFoundError:
    pass


def record(**fields):
    with open(f"runs-{name}.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"t": time.time(), "pid": os.getpid(), **fields}) + "\n")


def leave(code, after=0.0):
    time.sleep(after)
    record(event="exit", code=code)
    sys.exit(code)


if mode.startswith("trap:"):  # before the start record: a test that saw the record may stop it
    signal.signal(signal.SIGTERM, lambda signum, frame: leave(int(mode.split(":")[1])))
record(event="start", argv=args, cwd=os.getcwd(), user=os.environ.get("USER"), mode=mode)
sys.stdout.write(f"fake worker {name}: {mode} (stdout)\n")
sys.stdout.flush()
sys.stderr.write(f"fake worker {name}: {mode} (stderr)\n")
sys.stderr.flush()
if mode == "crash":
    leave(1)
if mode == "clean":
    leave(0, 0.3)
if mode == "recycle":
    leave(111, 0.2)
if mode.startswith("exit:"):
    parts = mode.split(":")
    leave(int(parts[1]), float(parts[2]) if len(parts) > 2 else 0.0)
while True:
    time.sleep(3600)
