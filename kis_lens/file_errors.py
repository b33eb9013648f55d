"""What `kis: error:` says when a file read or write failed outside kis's own checks (no KisError at the source).

The message names the file (from the error, else from the failing frames' locals), whether the disk is full, and
what to do next; any other error is not a file failure and keeps its traceback.
"""

from __future__ import annotations

import os

from kis_lens.io import NO_SPACE_ERRNOS, NO_SPACE_WORDS, is_file_failure

# Names under which the frames of a failed read or write hold the file's path (innermost frame first).
_PATH_NAMES = ("filename", "path", "temp", "target", "file", "source")


def _path_in_traceback(error: BaseException) -> str | None:
    """Return the file path a failed read or write was working on, read from its innermost frames' locals."""
    frames = []
    trace = error.__traceback__
    while trace is not None:
        frames.append(trace.tb_frame)
        trace = trace.tb_next
    for frame in reversed(frames):
        for name in _PATH_NAMES:
            value = frame.f_locals.get(name)
            if isinstance(value, (str, os.PathLike)) and str(value):
                return str(value)
    return None


def file_failure_message(error: BaseException) -> str | None:
    """Return the `kis: error:` text of a file read or write that failed outside kis's checks; None for other errors."""
    if not is_file_failure(error):
        return None
    path = getattr(error, "filename", None) or _path_in_traceback(error)
    where = str(path) if path else "a file"
    text = str(error).lower()
    if getattr(error, "errno", None) in NO_SPACE_ERRNOS or any(word in text for word in NO_SPACE_WORDS):
        return f"no space left writing {where} ({error}): free space or choose another --output_dir, then rerun"
    if isinstance(error, OSError):
        return (
            f"cannot read or write {where}: {error.strerror or error}; check that it exists and that its folder is "
            "writable, then rerun (--debug shows where it failed)"
        )
    return (
        f"cannot read or write {where} ({type(error).__name__}: {error}); if it is corrupt or truncated, delete it "
        "and rerun the command that wrote it (--debug shows where it failed)"
    )
