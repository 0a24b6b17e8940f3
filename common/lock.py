"""One writer per output: an exclusive POSIX lock (lockf) on `<out>.lock`, next to the output, held while writing.

The OS releases the lock when its holder dies, so a SIGKILLed writer never keeps the next one out. It is a POSIX
record lock rather than a flock because forked children (DataLoader workers) do not inherit it: a worker that
outlives its trainer by a moment must not keep the next run out. The file holds the holder's pid, which a refused
writer is told. Object stores (`s3://...`) have no locks: remote outputs are not locked.

No lock file stays behind a command that ends or is refused: the holder unlinks it before releasing the lock, and
an acquirer, once lockf succeeds, checks that the path still names the file it locked (it may have opened the file
just before the previous holder unlinked it) and starts over otherwise, so two writers never hold locks on two
different files of one path. A SIGKILLed holder leaves its file: the next writer locks it, and removes it at its end.
The folders made for the lock file are removed again when the command leaves them empty (a refused command).
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


def make_parents(directory: Path) -> list[Path]:
    """Create `directory` and its missing parents; the ones created, deepest first."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
    return missing


def locked_fd(path: Path, out: str, option: str) -> int:
    """An open descriptor of `path` holding its exclusive lock, or OutputLocked naming the live holder."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # another command's refusal removed the folder just made: make it again
            make_parents(path.parent)
            continue
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise OutputLocked(f"{option} {out} is being written by another process (pid {holder}, lock {path}): "
                               f"wait for it to end, stop it, or choose another {option}") from None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        os.close(fd)  # the previous holder unlinked the file we locked: lock the path's current file


@contextlib.contextmanager
def output_lock(out: str, option: str = "--out") -> Iterator[None]:
    """Hold an exclusive lock on `out` for the block; refuse at once if another live process holds it."""
    if "://" in str(out):
        log.debug("%s %s is remote: not locked (object stores have no locks)", option, out)
        yield
        return
    path = lock_path(out)
    made = make_parents(path.parent)
    try:
        fd = locked_fd(path, out, option)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            path.unlink(missing_ok=True)  # before the release: a writer that opened it meanwhile then starts over
            os.close(fd)  # releases the lock
    finally:
        for folder in made:  # left only where the command wrote nothing (a refusal)
            try:
                folder.rmdir()
            except OSError:
                break
