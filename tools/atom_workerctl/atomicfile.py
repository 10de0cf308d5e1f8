"""Replacing a file whole: a temporary file in the same folder, then a rename over the old one, so a reader
(the role, node_exporter, another atom-workerctl) sees the old file or the new one, never a part of either.
Errors are OSError as the system gives them: each caller says what it was writing, in its own words."""

from __future__ import annotations

import contextlib
import os


def replace(path: str, data: str | bytes, mode: int = 0o644, *, fsync: bool = False,
            prefix: str | None = None) -> None:
    """Write DATA as PATH's new content with MODE. fsync: on disk before the rename (a reading that must
    survive a power cut). prefix: the temporary file's name begins so (default `.NAME.`), for callers that
    clean up what a killed writer left."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    directory = os.path.dirname(os.path.abspath(path))
    import tempfile  # here, not at the top: every command imports this module, few write (~2 ms of start-up)

    fd, tmp = tempfile.mkstemp(prefix=prefix or f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
