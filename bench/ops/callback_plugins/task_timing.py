"""Per-task wall time of a playbook run, for the benchmarks (ansible-core ships no profile_tasks).

Enable with ANSIBLE_CALLBACK_PLUGINS=bench/ops/callback_plugins ANSIBLE_CALLBACKS_ENABLED=task_timing and
ATOM_TASK_TIMING=FILE: each task's start-to-end time (all hosts of the batch together) and its role are
written to FILE as JSON lines when the play ends, next to the normal output.
"""

import json
import os
import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: task_timing
type: aggregate
short_description: per-task wall times as JSON lines (bench/ops)
description: Writes each task's wall time to the file named by ATOM_TASK_TIMING.
requirements: [enable in configuration]
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "task_timing"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self._path = os.environ.get("ATOM_TASK_TIMING")
        self._current = None
        self._rows = []

    def _close(self):
        if self._current:
            name, role, action, start = self._current
            self._rows.append({"task": name, "role": role, "action": action, "seconds": time.monotonic() - start})
            self._current = None

    def _open(self, task):
        self._close()
        role = task._role.get_name() if task._role else ""
        self._current = (task.get_name(), role, task.action, time.monotonic())

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._open(task)

    def v2_playbook_on_handler_task_start(self, task):
        self._open(task)

    def v2_playbook_on_stats(self, stats):
        self._close()
        if self._path:
            with open(self._path, "a") as out:
                for row in self._rows:
                    out.write(json.dumps(row) + "\n")
