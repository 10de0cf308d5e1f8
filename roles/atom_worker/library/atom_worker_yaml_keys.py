#!/usr/bin/python3
"""Set a few keys of a block-style YAML file (AtoM's config/*.yml), leaving every other line alone."""

DOCUMENTATION = r"""
---
module: atom_worker_yaml_keys
short_description: Set keys in a block-style YAML file, preserving everything else
description:
  - Edits only the keys it is given, by their path (for example C(all.servers)), in a block-style
    YAML file such as AtoM's C(config/gearman.yml) or C(config/app.yml).
  - Every other line, comments and blank lines included, stays byte for byte. The lines under a key
    that this module sets (its old value) are replaced whole.
  - A missing key is added at the end of its parent's block; a missing parent is added too.
options:
  path:
    description: The YAML file.
    type: path
    required: true
  keys:
    description:
      - Dotted key path to value. A string, number or boolean becomes a scalar; a dict becomes a
        block mapping of scalars; a list becomes a block sequence of scalars.
    type: dict
    required: true
  create:
    description: Create the file (mode 0644, owner of its directory) when it does not exist.
    type: bool
    default: false
author: atom-worker toolkit
"""

EXAMPLES = r"""
- name: Point AtoM at two job servers
  atom_worker_yaml_keys:
    path: /usr/share/nginx/atom/config/gearman.yml
    keys:
      all.servers:
        default: 10.0.0.5:4730
        server2: 10.0.0.6:4730
"""

RETURN = r"""
changed_keys:
  description: The key paths whose text changed.
  type: list
  returned: always
"""

import os
import re
import tempfile

from ansible.module_utils.basic import AnsibleModule

KEY_RE = re.compile(
    r"^(?P<indent> *)(?P<key>[^\s#:'\"][^:#]*?|'[^']*'|\"[^\"]*\")\s*:(?:\s+(?P<rest>.*))?$"
)
TRAILING_COMMENT = re.compile(
    r"""^(?:'(?:[^']|'')*'|"(?:[^"\\]|\\.)*"|[^#'"][^#]*?|)(?P<comment>\s+#.*)?$"""
)
PLAIN_SAFE = re.compile(r"(?:[A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:.]+\]):[0-9]+")


class YamlEditError(Exception):
    pass


def _indent(line):
    return len(line) - len(line.lstrip(" "))


def _is_content(line):
    stripped = line.strip()
    return (
        bool(stripped)
        and not stripped.startswith("#")
        and stripped not in ("---", "...")
    )


def _key_of(line):
    match = KEY_RE.match(line.rstrip("\n"))
    if not match:
        return None, None, None
    key = match.group("key").strip()
    if key[:1] in "'\"":
        key = key[1:-1]
    return len(match.group("indent")), key, match.group("rest")


def _block_end(lines, start, indent):
    """Index after the last line that belongs to the block of the key at `start` (indent `indent`)."""
    end = start + 1
    i = start + 1
    while i < len(lines):
        line = lines[i]
        if _is_content(line):
            if _indent(line) <= indent:
                break
            end = i + 1
        elif line.strip().startswith("#") and _indent(line) > indent:
            end = i + 1
        i += 1
    return end


def _find_child(lines, start, end, indent, key):
    """Index of `key:` among the direct children (lines start..end) of a block at `indent`."""
    child_indent = None
    for i in range(start, end):
        line = lines[i]
        if not _is_content(line):
            continue
        line_indent = _indent(line)
        if line_indent <= indent:
            break
        if child_indent is None:
            child_indent = line_indent
        if line_indent != child_indent:
            continue
        _, found, _ = _key_of(line)
        if found == key:
            return i, child_indent
    return None, child_indent


def scalar(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = "" if value is None else str(value)
    if PLAIN_SAFE.fullmatch(text):
        return text
    return "'{}'".format(text.replace("'", "''"))


def render(key, value, indent, step):
    pad = " " * indent
    if isinstance(value, dict):
        out = [f"{pad}{key}:\n"]
        out += [
            "{}{}{}: {}\n".format(pad, " " * step, k, scalar(v))
            for k, v in value.items()
        ]
        return out
    if isinstance(value, list):
        out = [f"{pad}{key}:\n"]
        out += ["{}{}- {}\n".format(pad, " " * step, scalar(v)) for v in value]
        return out
    return [f"{pad}{key}: {scalar(value)}\n"]


def set_key(lines, path, value):
    """Set the dotted `path` to `value` in `lines` (a list of lines with newlines), in place."""
    parts = path.split(".")
    start, end, indent, step = 0, len(lines), -1, 2
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        index, child_indent = _find_child(lines, start, end, indent, part)
        if child_indent is None:
            child_indent = indent + step if indent >= 0 else 0
        if indent >= 0:
            step = max(child_indent - indent, 1)
        if index is None:
            # Append the key at the end of the parent's block (after its last content line).
            insert_at = end
            while insert_at > start and not _is_content(lines[insert_at - 1]):
                insert_at -= 1
            if insert_at > 0 and not lines[insert_at - 1].endswith("\n"):
                lines[insert_at - 1] += "\n"
            if last:
                lines[insert_at:insert_at] = render(part, value, child_indent, step)
                return
            lines[insert_at:insert_at] = ["{}{}:\n".format(" " * child_indent, part)]
            start, end, indent = insert_at + 1, insert_at + 1, child_indent
            continue
        block_end = _block_end(lines, index, child_indent)
        _, _, rest = _key_of(lines[index])
        if last:
            comment = ""
            if rest and not isinstance(value, (dict, list)):
                match = TRAILING_COMMENT.match(rest)
                if match and match.group("comment"):
                    comment = match.group("comment")
            new = render(part, value, child_indent, step)
            if comment:
                new[0] = new[0].rstrip("\n") + comment + "\n"
            lines[index:block_end] = new
            return
        if rest and not rest.lstrip().startswith("#"):
            raise YamlEditError(
                f"{path}: key {part!r} has an inline value; only block style is supported"
            )
        start, end, indent = index + 1, block_end, child_indent


def edit(text, keys):
    lines = text.splitlines(True)
    changed = []
    for path, value in keys.items():
        before = "".join(lines)
        set_key(lines, path, value)
        if "".join(lines) != before:
            changed.append(path)
    return "".join(lines), changed


def main():
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "keys": {"type": "dict", "required": True},
            "create": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
    )
    path = module.params["path"]
    exists = os.path.exists(path)
    if not exists and not module.params["create"]:
        module.fail_json(msg=f"{path} does not exist")
    before = ""
    if exists:
        with open(path, encoding="utf-8") as handle:
            before = handle.read()
    try:
        after, changed_keys = edit(before, module.params["keys"])
    except YamlEditError as exc:
        module.fail_json(msg=str(exc))
    changed = after != before
    result = {
        "changed": changed,
        "changed_keys": changed_keys,
        "diff": {
            "before": before,
            "after": after,
            "before_header": path,
            "after_header": path,
        },
    }
    if changed and not module.check_mode:
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".atom-worker-")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(after)
        if not exists:
            dir_stat = os.stat(directory)
            os.chmod(tmp, 0o644)
            os.chown(tmp, dir_stat.st_uid, dir_stat.st_gid)
        module.atomic_move(tmp, path)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
