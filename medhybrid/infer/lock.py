"""One writer per output folder: ``medhybrid infer`` holds an exclusive lock on ``OUT/.medhybrid.lock`` for
the whole run, so a second run on the same ``--out`` is refused with a clear error instead of the two
deleting each other's partial study folders. The lock is an OS file lock (``fcntl.flock``): the kernel
releases it when the process ends, however it ends (a SIGKILL leaves no stale lock behind)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from medhybrid.errors import InferenceError

LOCK_FILE = ".medhybrid.lock"


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the output folder's lock (creating the folder) for the duration.

    Raises:
        InferenceError: another process holds it.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "another process"
            raise InferenceError(
                f"another medhybrid infer (pid {holder}) is writing to this folder",
                path=out,
                fix="wait for it to finish, or give this run another --out",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
