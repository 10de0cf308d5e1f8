#!/usr/bin/python3
"""Wait until every job server lists this host's AtoM workers (one module round trip, not a script's five)."""

DOCUMENTATION = r"""
---
module: atom_workers_registered
short_description: Wait until gearmand lists every AtoM worker of this host
description:
  - Reads the host's model (the atom_worker role's sites.json) and asks each job server of each site for its
    C(workers), from the host itself (the address gearmand lists this host's workers at is the socket's own),
    until every server lists at least as many worker connections with the sites' functions as the sites have
    instances, or the timeout (one deadline for the whole wait) runs out.
  - The gearmand client is atom-workerctl's own (module_utils/atom_gearman.py is a link to
    tools/atom_workerctl/gearman.py), so there is one implementation of the admin protocol, its deadlines and caps.
  - Reads only; changes nothing. Fails only when the model cannot be used; a wait that ran out returns
    C(registered=false) for the caller to say what to look at.
options:
  state_file:
    description: The host's model written by the atom_worker role.
    type: path
    default: /etc/atom-worker/sites.json
  timeout:
    description: Seconds the whole wait may take (> 0).
    type: float
    default: 60
  interval:
    description: Seconds between two rounds of questions (> 0).
    type: float
    default: 0.5
author: atom-worker toolkit
"""

RETURN = r"""
registered:
  description: Whether every job server listed all of this host's workers before the timeout.
  type: bool
  returned: success
servers:
  description: Per job server, the address it sees this host at, the registered and expected counts, or an error.
  type: dict
  returned: success
"""

import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.atom.workers.plugins.module_utils.atom_gearman import main as gearman_check


def main():
    module = AnsibleModule(
        argument_spec={
            "state_file": {"type": "path", "default": "/etc/atom-worker/sites.json"},
            "timeout": {"type": "float", "default": 60.0},
            "interval": {"type": "float", "default": 0.5},
        },
        supports_check_mode=True,
    )
    p = module.params
    for name in ("timeout", "interval"):
        if not (math.isfinite(p[name]) and p[name] > 0):
            module.fail_json(msg=f"{name} must be a number of seconds > 0 (got {p[name]})")
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = gearman_check(["wait", "--state-file", p["state_file"], "--timeout", repr(p["timeout"]),
                            "--interval", repr(p["interval"])])
    if rc not in (0, 1) or not out.getvalue().strip():
        module.fail_json(msg=(err.getvalue() or out.getvalue()).strip() or f"the registration check exited {rc}")
    report = json.loads(out.getvalue())
    module.exit_json(changed=False, registered=report["registered"], servers=report["servers"])


if __name__ == "__main__":
    main()
