"""Atomic file writes: a reader never sees a half-written file, and a failed write leaves the old one."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from filelock import FileLock, Timeout

from kis_lens.errors import KisError

# Name pattern of atomic_path's temp files: a killed writer leaves one behind, the next job removes it.
TEMP_GLOB = ".*.tmp"
LOCK_NAME = ".kis.lock"
LOCK_ATTEMPTS = 5  # tries when the lock file vanishes under us (its holder just finished)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is fsynced and renamed over ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise KisError(f"cannot write to {path.parent}: {error.strerror}; choose a writable --output_dir") from None
    os.close(handle)
    temp = Path(temp_name)
    os.chmod(temp, 0o666 & ~_current_umask())  # mkstemp makes 0600; results should read like any written file
    try:
        yield temp
        with open(temp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temp, path)
    except OSError as error:
        full = " (the disk is full: free some space)" if error.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise KisError(
            f"could not write {path}: {error.strerror or error}{full}; any previous {path.name} is untouched, "
            "rerun the same command once this is fixed"
        ) from error
    finally:
        temp.unlink(missing_ok=True)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call write(temp_path), then move the finished file to path; return path."""
    with atomic_path(path) as temp:
        write(temp)
    return Path(path)


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    """Write one array as .npy atomically and return its path."""

    def write(temp: Path) -> None:
        with open(temp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)

    return atomic_write(path, write)


def save_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically and return its path."""
    return atomic_write(
        path, lambda temp: temp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    )


def check_writable(folder: str | Path, option: str = "--output_dir") -> Path:
    """Return folder after checking, without creating anything, that it is or can become a writable directory."""
    folder = Path(folder)
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise KisError(f"cannot write to {folder}: {existing} is a file, not a folder; choose another {option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KisError(
            f"cannot write to {folder}: {existing} is not writable; choose a writable {option} or fix its permissions"
        )
    return folder


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temp files a killed writer left in folder (call only while holding its lock); return them."""
    stale = sorted(Path(folder).glob(TEMP_GLOB)) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def folder_lock(
    folder: str | Path, timeout: float = 0.0, lock_name: str = LOCK_NAME, busy: str | None = None
) -> Iterator[Path]:
    """Hold an exclusive lock on folder (created if needed) for one writer; KisError if another holds it past timeout.

    lock_name picks the lock file, so one folder can hold several independent locks (one per lifelong run);
    busy is the error message when another process holds it. Folders this creates and leaves empty are removed
    again, and so is the lock file, so a job that fails on bad input leaves the output tree as it found it.
    """
    folder = Path(folder)
    missing = [parent for parent in (folder, *folder.parents) if not parent.exists()]
    lock_path = folder / lock_name
    lock = FileLock(str(lock_path), timeout=timeout, thread_local=False)
    for _ in range(LOCK_ATTEMPTS):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise KisError(f"cannot write to {folder}: {error.strerror}; choose a writable --output_dir") from None
        try:
            lock.acquire()
        except FileNotFoundError:  # the previous holder removed the empty folder it had made: make it again
            continue
        except Timeout:
            _remove_empty(missing)
            raise KisError(
                busy
                or f"{folder} is being written by another kis process (it holds {lock_path}): wait for that job to "
                "finish, or give this one another --output_dir"
            ) from None
        if lock_path.exists():
            break
        # We locked the inode a finishing holder had just unlinked; a newcomer would lock a fresh file. Retry.
        lock.release()
    else:
        _remove_empty(missing)
        raise KisError(f"could not lock {lock_path}: it kept disappearing; rerun the command")
    try:
        yield folder
    finally:
        # Unlinked while still held: a process waiting on this inode sees it gone and locks the new file.
        lock_path.unlink(missing_ok=True)
        lock.release()
        _remove_empty(missing)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return
