#!/usr/bin/python3
"""Several whole files (content, mode, owner, group) put in place in one call."""

DOCUMENTATION = r"""
---
module: atom_files
short_description: Write several files, each only when its content or attributes differ
description:
  - C(ansible.builtin.template) and C(ansible.builtin.copy) cost two round trips per file even when
    nothing changes (a stat, then the attributes). This module takes the rendered contents of all of a
    role's files at once and changes only what differs; a converge that changes nothing makes one round trip.
  - A file whose content differs is replaced atomically (a temporary file in its folder, then a rename).
  - Parent folders must exist.
options:
  files:
    description: The files.
    type: list
    elements: dict
    required: true
    suboptions:
      dest:
        description: Absolute path.
        type: str
        required: true
      content:
        description: The whole text of the file.
        type: str
        required: true
      mode:
        description: Octal mode, such as C(0644).
        type: str
        default: "0644"
      owner:
        description: User name.
        type: str
        default: root
      group:
        description: Group name.
        type: str
        default: root
author: atom-worker toolkit
"""

EXAMPLES = r"""
- name: Install the units
  atom.workers.atom_files:
    files:
      - dest: /etc/systemd/system/atom-worker@.service
        content: "{{ lookup('ansible.builtin.template', 'atom-worker@.service.j2') }}"
  register: written
"""

RETURN = r"""
changed_files:
  description: The destinations whose content or attributes changed (or would, in check mode).
  type: list
  returned: always
"""

import grp
import os
import pwd
import tempfile

from ansible.module_utils.basic import AnsibleModule


def current(dest):
    try:
        st = os.lstat(dest)
        with open(dest, "rb") as handle:
            return handle.read(), st
    except OSError:
        return None, None


def put(module, spec):
    """Brings one file to its spec; returns whether anything differed."""
    dest, data = spec["dest"], spec["content"].encode("utf-8")
    mode = int(spec["mode"], 8)
    try:
        uid, gid = pwd.getpwnam(spec["owner"]).pw_uid, grp.getgrnam(spec["group"]).gr_gid
    except KeyError as err:
        module.fail_json(msg=f"{dest}: no such user or group: {err}")
    old, st = current(dest)
    same_content = old == data
    same_attrs = st is not None and (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (mode, uid, gid)
    if same_content and same_attrs:
        return False
    if module.check_mode:
        return True
    if same_content:
        os.chown(dest, uid, gid)
        os.chmod(dest, mode)
        return True
    folder = os.path.dirname(dest)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".atom-files-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chown(tmp, uid, gid)
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except OSError as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        module.fail_json(msg=f"{dest}: {err}")
    return True


def main():
    module = AnsibleModule(
        argument_spec={
            "files": {
                "type": "list",
                "elements": "dict",
                "required": True,
                "options": {
                    "dest": {"type": "str", "required": True},
                    "content": {"type": "str", "required": True},
                    "mode": {"type": "str", "default": "0644"},
                    "owner": {"type": "str", "default": "root"},
                    "group": {"type": "str", "default": "root"},
                },
            }
        },
        supports_check_mode=True,
    )
    changed = [spec["dest"] for spec in module.params["files"] if put(module, spec)]
    module.exit_json(changed=bool(changed), changed_files=changed)


if __name__ == "__main__":
    main()
