"""Atomic file writes: a reader never sees a half-written file, and a failed write leaves the old one."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from filelock import FileLock, Timeout
from safetensors import SafetensorError

from kis_lens.errors import KisError

# Name pattern of atomic_path's temp files: a killed writer leaves one behind, the next job removes it.
TEMP_GLOB = ".*.tmp"
LOCK_NAME = ".kis.lock"
LOCK_ATTEMPTS = 5  # tries when the lock file vanishes under us (its holder just finished)
# errno values of a full disk or an exhausted quota, and what torch, safetensors and the OS say about one.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_WORDS = ("no space left", "os error 28", "disk quota exceeded", "os error 122")
# torch.save's failed writes are RuntimeErrors from its zip writer, which name no errno (a full disk can even read
# "unexpected pos 576 vs 534"); safetensors' are SafetensorErrors that quote the OS error.
TORCH_WRITER_WORDS = ("pytorchstreamwriter", "inline_container.cc", "file write failed")
SAFETENSORS_IO_WORDS = ("i/o error", "ioerror", "os error")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is fsynced and renamed over ``path``.

    The finished file gets the mode a plain open() would give it under the current umask (mkstemp makes 0600, and
    safetensors replaces the temp with a 0600 file of its own). A failed write, a full disk included, raises
    KisError naming the file and the fix, and leaves neither a half-written file nor the temp behind.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        if error.errno in NO_SPACE_ERRNOS:
            raise KisError(_no_space(path, str(error.strerror))) from None
        raise KisError(f"cannot write to {path.parent}: {error.strerror}; choose a writable --output_dir") from None
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        # After the write, not before: a writer may have replaced the temp file by one of its own.
        os.chmod(temp, 0o666 & ~current_umask())
        with open(temp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temp, path)
    except (OSError, SafetensorError, RuntimeError) as error:
        message = write_failure_message(path, error)
        if message is None:  # a RuntimeError or SafetensorError that is no I/O failure: a bug, shown as one
            raise
        raise KisError(message) from error
    finally:
        temp.unlink(missing_ok=True)


def _no_space(path: Path, detail: str) -> str:
    return (
        f"no space left writing {path} ({detail}: the disk is full): free space or choose another --output_dir; "
        f"any previous {path.name} is untouched, rerun the same command once this is fixed"
    )


def is_file_failure(error: BaseException) -> bool:
    """Return whether error is a failed read or write of a file (OSError, or torch's/safetensors' I/O errors)."""
    if isinstance(error, (OSError, SafetensorError)):  # safetensors raises it only for files it cannot parse or write
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        word in text for word in (*NO_SPACE_WORDS, *TORCH_WRITER_WORDS, "pytorchstreamreader")
    )


def write_failure_message(path: str | Path, error: BaseException) -> str | None:
    """Return the user's message for a failed write of path (the disk full, or another I/O error), else None."""
    path = Path(path)
    text = str(error).lower()
    if isinstance(error, OSError):
        if error.errno in NO_SPACE_ERRNOS:
            return _no_space(path, str(error.strerror or error))
        return (
            f"could not write {path}: {error.strerror or error}; any previous {path.name} is untouched, "
            "rerun the same command once this is fixed"
        )
    if isinstance(error, SafetensorError) and not any(word in text for word in SAFETENSORS_IO_WORDS):
        return None
    if isinstance(error, RuntimeError) and not any(word in text for word in (*NO_SPACE_WORDS, *TORCH_WRITER_WORDS)):
        return None
    if any(word in text for word in NO_SPACE_WORDS) or _nearly_full(path.parent):
        return _no_space(path, str(error))
    return (
        f"could not write {path} ({error}); if the disk is full, free space or choose another --output_dir; "
        f"any previous {path.name} is untouched"
    )


def _nearly_full(folder: Path) -> bool:
    """Return whether folder's file system has under 1 MiB free (why a writer that names no errno failed)."""
    try:
        return shutil.disk_usage(folder).free < 2**20
    except OSError:
        return False


def current_umask() -> int:
    """Return the process umask without changing it (from /proc where it can be read: thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere: set and restore, which other threads creating files at this instant could see.
    mask = os.umask(0o077)
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


def load_json_object(path: str | Path, fix: str) -> dict[str, Any]:
    """Return a JSON file's object; KisError naming the file and the fix when it is unreadable, corrupt or no object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KisError(f"cannot read {path} ({type(error).__name__}: {error}): {fix}") from None
    if not isinstance(data, dict):
        raise KisError(f"{path} holds {type(data).__name__}, not the JSON object kis_lens wrote: {fix}")
    return data


def save_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically and return its path."""
    return atomic_write(
        path, lambda temp: temp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    )


def check_writable(folder: str | Path, option: str = "--output_dir", target: str | Path | None = None) -> Path:
    """Return folder after checking that it is or can become a writable directory; KisError naming option if not.

    Checked on the nearest folder that exists: the permission bits (os.access), then a real unnamed temp file made
    and dropped there, which also catches what the bits do not show (a read-only mount, ACLs, root on NFS).
    Nothing is left behind and no folder is created. target: the file to be written there, named in the message.
    """
    folder = Path(folder)
    shown = f"write {target}" if target is not None else f"write to {folder}"
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise KisError(f"cannot {shown}: {existing} is a file, not a folder; choose another {option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KisError(f"cannot {shown}: {existing} is not writable; choose a writable {option} or fix its permissions")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise KisError(
            f"cannot {shown}: a test file in {existing} could not be made ({error.strerror or error}); "
            f"choose a writable {option} or fix its permissions"
        ) from None
    return folder


def check_writable_file(path: str | Path, option: str) -> Path:
    """Return path after checking that the file can be written there (see check_writable); KisError if not."""
    path = Path(path)
    if path.is_dir():
        raise KisError(f"cannot write {path}: it is a folder; give {option} a file name")
    check_writable(path.parent, option, target=path)
    return path


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
