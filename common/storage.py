"""Where bytes live: local paths, fsspec URLs (`s3://`, `gs://`, `https://`, ...) and webdataset's `pipe:CMD`.

Every shard and store location goes through here, so that the corpus reader, the index and the cache see one
interface: stat (size and a cheap version tag), sequential reads (indexing, the build's block reads) and ranged
reads (random rows in training and verify). Credentials and endpoints come from the usual environment of each
backend (for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL / AWS_PROFILE ...).

`pipe:` shards have no random access: the first process that needs one copies the command's output once into
the local cache directory (`$KD_CACHE_DIR`, default ~/.cache/clip-kd) and reads that copy, as webdataset's
`wids` does for remote shards.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import posixpath
import shlex
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import fsspec


# The S3 client stack logs where it found credentials and endpoints at INFO on every process start; our commands
# log at INFO, so keep those libraries' own loggers to warnings (-v still shows ours).
for _library in ("botocore", "aiobotocore", "s3fs"):
    logging.getLogger(_library).setLevel(logging.WARNING)


class StorageError(OSError):
    """A location that cannot be listed or read, naming the URL and what to do."""


def cache_dir() -> Path:
    """Local directory for derived files (corpus index sidecars, copies of `pipe:` shards)."""
    return Path(os.environ.get("KD_CACHE_DIR") or Path.home() / ".cache" / "clip-kd")


def is_pipe(url: str) -> bool:
    return url.startswith("pipe:")


def is_remote(url: str) -> bool:
    """A URL read through fsspec (not a local path, not file://, not pipe:)."""
    return "://" in url and not url.startswith("file://") and not is_pipe(url)


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def basename(url: str) -> str:
    """The file name a location ends in (a `pipe:` command's last argument's)."""
    if is_pipe(url):
        url = shlex.split(url[len("pipe:"):])[-1]
    return posixpath.basename(url.rstrip("/").split("?")[0])


def join(url: str, name: str) -> str:
    return posixpath.join(url, name) if is_remote(url) else str(Path(local_path(url)) / name)


def filesystem(url: str):
    """(fsspec filesystem, path inside it); a clear error when the backend for the protocol is not installed."""
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        protocol = url.split("://")[0]
        raise StorageError(f"{url}: reading {protocol}:// needs a package that is not installed ({e}); "
                           f"install it (s3fs for s3://, gcsfs for gs://, aiohttp for https://)") from e


def describe_failure(url: str, error: Exception) -> StorageError:
    """One line for a failed remote access: what failed, and the usual causes."""
    text = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    hint = "check the URL, the credentials in the environment and the endpoint"
    if "credential" in text.lower():
        hint = "set credentials in the environment (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
    elif isinstance(error, FileNotFoundError) or "NoSuchKey" in text or "Not Found" in text:
        hint = "the object does not exist: check the URL"
    return StorageError(f"{url}: cannot read ({text}); {hint}")


@dataclass(frozen=True)
class Stat:
    """What identifies a file's content cheaply: byte size, and a version tag (mtime locally, ETag on S3)."""
    size: int
    version: str


def _remote_version(info: dict) -> str:
    for key in ("ETag", "etag", "md5Hash", "generation", "LastModified", "mtime", "updated"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return ""


def stat_many(urls: list[str]) -> list[Stat]:
    """Stat of every location: os.stat locally, one listing per remote directory (not one request per shard)."""
    out: dict[str, Stat] = {}
    by_parent: dict[str, list[str]] = {}
    for url in urls:
        if is_pipe(url):  # the command's output is only known once run: its local copy stands for it
            out[url] = Stat(pipe_copy(url).stat().st_size, "pipe")
        elif url.startswith(("http://", "https://")):  # no listings on the web: one HEAD request per shard
            fs, path = filesystem(url)
            try:
                info = fs.info(path)
            except FileNotFoundError as e:
                raise StorageError(f"shard {url} does not exist (HTTP 404): check the --data spec") from e
            except Exception as e:  # noqa: BLE001
                raise describe_failure(url, e) from e
            if info.get("size") is None:
                raise StorageError(f"shard {url}: the server gives no Content-Length; ranged reads need one")
            out[url] = Stat(int(info["size"]), _remote_version(info))
        elif is_remote(url):
            by_parent.setdefault(posixpath.dirname(url), []).append(url)
        else:
            try:
                st = os.stat(local_path(url))
            except FileNotFoundError as e:
                raise StorageError(f"shard {url} does not exist: check the --data spec") from e
            except OSError as e:
                raise StorageError(f"shard {url} cannot be read: {e.strerror}") from e
            out[url] = Stat(st.st_size, str(st.st_mtime_ns))
    for parent, members in by_parent.items():
        fs, path = filesystem(parent)
        try:
            listing = {posixpath.basename(info["name"].rstrip("/")): info
                       for info in fs.ls(path, detail=True, refresh=True)}
        except Exception as e:  # noqa: BLE001 - every backend raises its own types
            raise describe_failure(parent, e) from e
        for url in members:
            info = listing.get(posixpath.basename(url))
            if info is None or info.get("type") == "directory":
                raise StorageError(f"shard {url} does not exist (not in the listing of {parent})")
            out[url] = Stat(int(info["size"]), _remote_version(info))
    return [out[url] for url in urls]


def list_tars(url: str) -> list[str] | None:
    """The *.tar files in a directory location, or None when the location is not a directory."""
    if is_pipe(url) or (url.startswith(("http://", "https://")) and not url.endswith("/")):
        return None  # a web URL names a file; only a trailing slash asks for the server's listing
    if not is_remote(url):
        path = Path(local_path(url))
        return [str(p) for p in path.glob("*.tar")] if path.is_dir() else None
    fs, path = filesystem(url)
    try:
        if not fs.isdir(path):
            return None
        protocol = url.split("://")[0]
        return [f"{protocol}://{name}" for name in fs.glob(posixpath.join(path, "*.tar"))]
    except Exception as e:  # noqa: BLE001
        raise describe_failure(url, e) from e


def exists(url: str) -> bool:
    if is_pipe(url):
        return True
    if not is_remote(url):
        return os.path.exists(local_path(url))
    fs, path = filesystem(url)
    try:
        return fs.exists(path)
    except Exception as e:  # noqa: BLE001
        raise describe_failure(url, e) from e


# ------------------------------------------------------------------ pipe: shards

_pipe_lock = threading.Lock()


def pipe_copy_path(url: str) -> Path:
    return cache_dir() / "pipe" / (hashlib.sha256(url.encode()).hexdigest()[:24] + ".tar")


def pipe_copy(url: str) -> Path:
    """The local copy of a `pipe:` shard, made once (atomically) from the command's standard output."""
    path = pipe_copy_path(url)
    with _pipe_lock:
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as out:
            result = subprocess.run(url[len("pipe:"):], shell=True, stdout=out, stderr=subprocess.PIPE)
        if result.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"shard {url}: the command exited {result.returncode}: "
                               f"{result.stderr.decode(errors='replace').strip()[-300:]}")
        os.replace(tmp, path)
        return path


# ------------------------------------------------------------------ reads

def open_sequential(url: str, block_size: int = 8 << 20):
    """A readable, seekable binary file for reading front to back (remote: large read-ahead blocks, so forward
    seeks inside a block cost nothing and the file streams in big ranged requests)."""
    if is_pipe(url):
        return open(pipe_copy(url), "rb")
    if not is_remote(url):
        return open(local_path(url), "rb")
    fs, path = filesystem(url)
    try:
        return fs.open(path, "rb", block_size=block_size, cache_type="readahead")
    except Exception as e:  # noqa: BLE001
        raise describe_failure(url, e) from e


class RangeReader:
    """Byte ranges of files, many at a time: os.pread on kept-open descriptors locally, concurrent ranged GETs
    remotely (fsspec's cat_ranges). One per process (DataLoader workers each make their own after the fork)."""

    def __init__(self, max_open: int = 64):
        self.max_open = max_open
        self.fds: dict[str, int] = {}
        self.pid = os.getpid()

    def _fd(self, path: str) -> int:
        if self.pid != os.getpid():  # forked: descriptors are shared with the parent; open our own
            self.fds, self.pid = {}, os.getpid()
        fd = self.fds.pop(path, None)
        if fd is None:
            if len(self.fds) >= self.max_open:
                os.close(self.fds.pop(next(iter(self.fds))))
            fd = os.open(path, os.O_RDONLY)
        self.fds[path] = fd  # most recently used last
        return fd

    def read(self, url: str, starts: list[int], ends: list[int]) -> list[bytes]:
        """bytes [start, end) for each pair; short reads (a file cut short) come back short."""
        if is_remote(url):
            fs, path = filesystem(url)
            try:
                return fs.cat_ranges([path] * len(starts), starts, ends)
            except Exception as e:  # noqa: BLE001
                raise describe_failure(url, e) from e
        path = str(pipe_copy(url)) if is_pipe(url) else local_path(url)
        fd = self._fd(path)
        return [os.pread(fd, end - start, start) for start, end in zip(starts, ends)]



def remove_tree(url: str) -> None:
    """Delete a directory tree (a store) wherever it is; nothing when it does not exist."""
    if is_remote(url):
        fs, path = filesystem(url)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    else:
        shutil.rmtree(local_path(url), ignore_errors=True)


def as_disk_full(error: BaseException, path: str | Path) -> BaseException:
    """torch.save reports a failed write (a full disk) as a RuntimeError from its zip writer
    ('enforce fail at inline_container.cc', 'file write failed'), safetensors as a SafetensorError naming the OS
    error: an ENOSPC OSError naming `path` instead."""
    if not isinstance(error, OSError) and re.search(r"inline_container|write failed|No space left on device|"
                                                    r"StorageFull", str(error)):
        return OSError(errno.ENOSPC, "No space left on device", str(path))
    return error


def atomic_write(path: Path, write) -> None:
    """`write(tmp_path)`, then rename onto `path`: `path` is never half-written, and a failed write leaves no
    temporary file (a full disk is reported as one, naming `path`)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        full = as_disk_full(e, path)
        if full is e:
            raise
        raise full from e
    os.replace(tmp, path)
