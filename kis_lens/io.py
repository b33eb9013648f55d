"""Atomic file writes: a reader never sees a half-written file, and a failed write leaves the old one."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from kis_lens.errors import KisError


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
    try:
        yield temp
        with open(temp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


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
    return atomic_write(path, lambda temp: temp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8"))
