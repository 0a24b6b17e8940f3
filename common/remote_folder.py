"""A run folder on object storage (`kd-train --out s3://bucket/runs/x`), for clusters without a shared disk.

The run trains into a local staging copy, `$KD_CACHE_DIR/runs/<name>-<hash of the URL>`: `pull` replaces it by the
remote folder's files when the run starts (so that `--resume` reads them there), and `push` uploads the files that
changed since, after every save (open_clip_train's `--remote-sync` does the same), `resume.pt` last, so that a push
cut short leaves the remote `resume.pt` of the previous save, from which a resume redoes the steps since.

Object stores have no POSIX locks: one writer per folder is kept by a lease, the object `<url>.lock` created with
a conditional write (it fails when the object exists, S3's `If-None-Match: *`) and rewritten with a fresh
heartbeat every HEARTBEAT_S seconds while the run lives. A lease whose heartbeat is older than LEASE_TTL_S (its
holder was killed, or lost its node) is taken over; the holder removes it when the command ends.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

from common.lock import OutputLocked
from common.storage import basename, cache_dir, describe_failure, filesystem, is_remote

HEARTBEAT_S = 30.0
LEASE_TTL_S = 300.0  # ten missed heartbeats: the holder is gone
LAST_PUSHED = "resume.pt"  # what a resume starts from: uploaded after everything it refers to


def staging_dir(url: str) -> Path:
    """The local copy of the remote folder `url`, one per URL on this node."""
    url = url.rstrip("/")
    return cache_dir() / "runs" / f"{basename(url)}-{hashlib.sha256(url.encode()).hexdigest()[:16]}"


class RemoteFolder:
    """The remote folder `url` and its local staging copy."""

    def __init__(self, url: str, option: str = "--out"):
        if not is_remote(url):
            raise ValueError(f"{option} {url}: not an object-store URL")
        self.url, self.option = url.rstrip("/"), option
        self.fs, self.path = filesystem(self.url)
        self.local = staging_dir(self.url)
        self.pushed: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) as last pushed or pulled

    def _call(self, what, *args, **kwargs):
        try:
            return what(*args, **kwargs)
        except (FileExistsError, FileNotFoundError):
            raise
        except Exception as e:  # noqa: BLE001 - every backend raises its own types
            raise describe_failure(self.url, e) from e

    def remote_files(self) -> list[str]:
        """The folder's files, relative to it."""
        prefix = self.path.rstrip("/") + "/"
        return [name[len(prefix):] for name in self._call(self.fs.find, self.path) if name.startswith(prefix)]

    def local_files(self) -> dict[str, tuple[int, int]]:
        return {p.relative_to(self.local).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
                for p in self.local.rglob("*") if p.is_file()}

    def download(self, name: str) -> None:
        """One file of the folder into the staging copy (written aside and renamed: readers see it whole)."""
        target = self.local / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.download")
        self._call(self.fs.get_file, f"{self.path}/{name}", str(tmp))
        os.replace(tmp, target)

    def pull(self) -> None:
        """Make the staging copy equal the remote folder (empty when the folder does not exist)."""
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)
        for name in self.remote_files():
            self.download(name)
        self.pushed = self.local_files()

    def push(self) -> None:
        """Upload what changed in the staging copy since the last push or pull (`resume.pt` last), then delete
        remotely what was deleted locally."""
        current = self.local_files()
        changed = sorted((name for name, stat in current.items() if self.pushed.get(name) != stat),
                         key=lambda name: name == LAST_PUSHED)
        for name in changed:
            self._call(self.fs.put_file, str(self.local / name), f"{self.path}/{name}")
        gone = [f"{self.path}/{name}" for name in self.pushed if name not in current]
        if gone:
            self._call(self.fs.rm, gone)
        self.pushed = current

    # ---------------------------------------------------------------- the lease
    @property
    def lease_path(self) -> str:
        return self.path.rstrip("/") + ".lock"

    def _write_lease(self, holder: dict, mode: str) -> None:
        self._call(self.fs.pipe_file, self.lease_path, json.dumps(holder | {"heartbeat": time.time()}).encode(),
                   mode=mode)

    def _take_lease(self, holder: dict) -> None:
        try:
            self._write_lease(holder, "create")
            return
        except FileExistsError:
            pass
        try:
            current = json.loads(self._call(self.fs.cat_file, self.lease_path))
        except FileNotFoundError:  # its holder just released it
            current = {"heartbeat": 0.0}
        age = time.time() - float(current.get("heartbeat", 0.0))
        if age < LEASE_TTL_S:
            raise OutputLocked(f"{self.option} {self.url} is being written by another process (pid "
                               f"{current.get('pid', 'unknown')} on {current.get('host', 'unknown')}, lease "
                               f"{self.url}.lock renewed {age:.0f} s ago): wait for it to end, stop it, or choose "
                               f"another {self.option} (a lease not renewed for {LEASE_TTL_S:.0f} s is taken over)")
        with contextlib.suppress(FileNotFoundError):
            self._call(self.fs.rm_file, self.lease_path)  # stale: its holder died
        try:
            self._write_lease(holder, "create")
        except FileExistsError:  # another process took the stale lease first
            raise OutputLocked(f"{self.option} {self.url} was just taken by another process (lease "
                               f"{self.url}.lock): choose another {self.option}") from None

    @contextlib.contextmanager
    def lease(self) -> Iterator[None]:
        """Hold the folder's lease for the block, renewed in a background thread; refuse a live holder's."""
        holder = {"host": socket.gethostname(), "pid": os.getpid()}
        self._take_lease(holder)
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(HEARTBEAT_S):
                with contextlib.suppress(OSError):  # a missed heartbeat is retried at the next
                    self._write_lease(holder, "overwrite")

        thread = threading.Thread(target=renew, name="kd-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            with contextlib.suppress(OSError):
                self._call(self.fs.rm_file, self.lease_path)
