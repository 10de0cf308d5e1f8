"""A root-only cache of AtoM's parsed configuration, keyed by the identity of the files it came from.

Reading a site's config/*.yml means importing PyYAML and evaluating every scalar as sfYaml does: about
15 ms of the ~90 ms `status` costs, on every run (the metrics timer runs it every 15 s), for files that
change a few times a year. So the merged result of each read is kept in /run (gone at reboot), keyed by
each candidate file's (device, inode, size, mtime, ctime), or by its absence.

Why that key is enough: the kernel sets a file's ctime on every change of its content or metadata, and no
user can set it back (utime sets mtime and atime only); a file replaced by another has another inode or a
newer ctime. So any change to a file, its replacement, its removal or a new file where none was all miss
the cache. The key is taken before the files are read: a change while they are read leaves an entry under
the old key, which the next run misses. File times have the kernel's tick as their grain (a few ms), so two
changes within one tick of the same size could share a key: a file changed less than SETTLE_NS ago is read
but not kept (git's "racily clean" index entries have the same cure).

Only root reads or writes it: the files it reads are the AtoM user's, the cache must not be. The folder
must be root's own and closed to others; anything unusual (not root, another owner, a link, an unreadable
or foreign file) means no cache, never an error: the configuration is then read as without it.
"""

from __future__ import annotations

import marshal
import os
import stat
import time

from . import atomicfile, privatefolder

CACHE_DIR = "/run/atom-workerctl"
CACHE_FILE = "site-config.cache"
FORMAT = 1
MAX_ENTRIES = 64
MAX_BYTES = 4 << 20
SETTLE_NS = 2_000_000_000


def identity(paths: list[str]) -> tuple | None:
    """Each path's (dev, ino, size, mtime_ns, ctime_ns), or None where it does not exist.

    None for the whole: a path that is a link, not a regular file, or cannot be looked at (the reader
    then says what is wrong with it; no cache for that)."""
    out = []
    for path in paths:
        try:
            info = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            out.append(None)
            continue
        except OSError:
            return None
        if not stat.S_ISREG(info.st_mode):
            return None
        out.append((info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns))
    return tuple(out)


def _folder() -> str | None:
    """The cache folder when it is safe to use (made if missing), else None."""
    if os.geteuid() != 0:
        return None
    return CACHE_DIR if privatefolder.made_ours(CACHE_DIR) else None


def _load(folder: str) -> dict:
    try:
        fd = os.open(os.path.join(folder, CACHE_FILE), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != 0 or info.st_size > MAX_BYTES:
            return {}
        with os.fdopen(fd, "rb") as fh:
            fd = -1
            data = marshal.loads(fh.read(MAX_BYTES + 1))
    except (OSError, EOFError, ValueError, TypeError):
        return {}
    finally:
        if fd >= 0:
            os.close(fd)
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def get(key: tuple, files: tuple):
    """The value kept for KEY when it was made from files of this identity, else None."""
    folder = _folder()
    if folder is None:
        return None
    entry = _load(folder).get(key)
    if isinstance(entry, tuple) and len(entry) == 2 and entry[0] == files:
        return entry[1]
    return None


def put(key: tuple, files: tuple, value) -> None:
    """Keep VALUE (made from files of this identity) for KEY; the oldest entries go beyond MAX_ENTRIES."""
    newest = max((f[4] for f in files if f is not None), default=0)
    if newest > time.time_ns() - SETTLE_NS:
        return  # changed within the last moments: another change in the same tick would keep this key
    folder = _folder()
    if folder is None:
        return
    entries = _load(folder)
    entries.pop(key, None)
    entries[key] = (files, value)
    while len(entries) > MAX_ENTRIES:
        entries.pop(next(iter(entries)))
    try:
        data = marshal.dumps({"format": FORMAT, "entries": entries})
        atomicfile.replace(os.path.join(folder, CACHE_FILE), data, 0o600)
    except (OSError, ValueError):  # ValueError: a value marshal cannot keep; the run goes on without caching it
        pass
