#!/usr/bin/python3
"""A stand-in for the host's `sendmail` in the notice tests: each message it is given is one JSON line
(argv and the message as read on stdin) in `<this script>.jsonl`. When `<this script>.fail` exists it
refuses instead, as an MTA whose queue is unusable: a line on stderr and exit 75 (EX_TEMPFAIL).
Standard library only: copied to lab hosts as it is.
"""

import json
import os
import sys

me = os.path.abspath(sys.argv[0])
message = sys.stdin.buffer.read().decode("utf-8", "replace")
if os.path.exists(me + ".fail"):
    sys.stderr.write("sendmail stand-in: cannot queue the message (told to fail)\n")
    sys.exit(75)
with open(me + ".jsonl", "a", encoding="utf-8") as fh:
    fh.write(json.dumps({"argv": sys.argv[1:], "message": message}) + "\n")
