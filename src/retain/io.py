"""Atomic file and folder writes (a reader, or a run resumed after a crash, sees the old one or the new) and
exclusive locks on open files that work on POSIX and Windows."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

if os.name == "nt":
    import msvcrt
else:
    import fcntl

# Windows locks byte ranges, and a locked range cannot be read by another process; the lock sits on one
# byte far past anything written, so a refused process can still read who holds the file.
_WINDOWS_LOCK_OFFSET = 1 << 30


def current_umask() -> int:
    """The process's umask (reading it means setting it: it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path`.

    A reader (or a resumed run after a crash) sees the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    # os.open with mode 0o666 honours the umask, unlike tempfile's private 0o600 files.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # persist the rename itself; directories cannot be opened on Windows
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically: temporary file in the same directory, fsync, rename."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically; NaN or infinity is an error (not valid JSON)."""
    write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_directory(target: str, prefix: str = ".tmp-") -> Iterator[str]:
    """A temporary folder beside `target` to fill in the block; when the block succeeds it replaces
    `target` whole, when it fails it is removed and `target` is left as it was. The folder follows the
    umask (mkdtemp alone makes it 0700)."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def try_lock(handle: IO) -> bool:
    """Take an exclusive lock on the open file `handle` without waiting; False if another process holds it.

    The lock is the process's own (flock on POSIX, msvcrt.locking on Windows): it goes when the file is
    closed or the process dies, so a killed run never leaves a stale lock behind."""
    if os.name == "nt":
        position = handle.tell()
        try:
            handle.seek(_WINDOWS_LOCK_OFFSET)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
        finally:
            handle.seek(position)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def lock(handle: IO, poll_seconds: float = 0.5) -> None:
    """Wait for an exclusive lock on the open file `handle` (see `try_lock`)."""
    if os.name != "nt":
        fcntl.flock(handle, fcntl.LOCK_EX)
        return
    while not try_lock(handle):
        time.sleep(poll_seconds)


def unlock(handle: IO) -> None:
    """Release a lock taken with `try_lock` or `lock`."""
    if os.name == "nt":
        position = handle.tell()
        handle.seek(_WINDOWS_LOCK_OFFSET)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        handle.seek(position)
    else:
        fcntl.flock(handle, fcntl.LOCK_UN)
