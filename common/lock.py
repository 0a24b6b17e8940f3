"""One writer per output: an exclusive POSIX lock (lockf) on `<out>.lock`, next to the output.

The OS releases the lock when its holder dies, so a SIGKILLed writer never leaves a stale lock. It is a POSIX
record lock rather than a flock because forked children (DataLoader workers) do not inherit it: a worker that
outlives its trainer by a moment must not keep the next run out. The lock file itself
stays (removing it on release would let two later writers lock two different files). It holds the holder's pid,
which the refused writer is told. Object stores (`s3://...`) have no locks: remote outputs are not locked.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from pathlib import Path
from typing import Iterator

log = logging.getLogger("kd-lock")


class OutputLocked(RuntimeError):
    """Another process is writing the same output."""


def lock_path(out: str) -> Path:
    return Path(str(out).rstrip("/") + ".lock")


@contextlib.contextmanager
def output_lock(out: str, option: str = "--out") -> Iterator[None]:
    """Hold an exclusive lock on `out` for the block; refuse at once if another live process holds it."""
    if "://" in str(out):
        log.debug("%s %s is remote: not locked (object stores have no locks)", option, out)
        yield
        return
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise OutputLocked(f"{option} {out} is being written by another process (pid {holder}, lock {path}): "
                               f"wait for it to end, stop it, or choose another {option}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
