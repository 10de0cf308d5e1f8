"""A folder only we can change: where the CLI keeps what others must not swap or read (the configuration
cache in /run, the fleet's ssh master sockets)."""

from __future__ import annotations

import contextlib
import os
import stat


def is_ours(path: str, closed: int = 0o077) -> bool:
    """`path` is a real folder (not a link) owned by our effective user, with none of the `closed` mode bits."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & closed


def made_ours(path: str, closed: int = 0o077) -> bool:
    """`path` made (0700) when missing, then is_ours: a folder someone else made first is never taken."""
    with contextlib.suppress(OSError):  # there already, or not ours to make: is_ours says which
        os.mkdir(path, 0o700)
    return is_ours(path, closed)
