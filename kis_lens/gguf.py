"""Packaged GGUF models: de-quantised once into a verified safetensors folder in the user cache, read from it after.

A converted folder (``user_cache_dir()/converted/<name>-<sha16>/``) is an HF ``save_pretrained`` folder plus
``kis_manifest.json``, written last: the GGUF's sha256 and each file's size and sha256. Every load checks the
folder against its manifest, and a folder that fails (edited weights, another model saved over it, a file
missing or added, no manifest) is converted again and swapped in atomically, with a warning that says why.
Caching is optional: a cache that cannot be written is a warning, and the model is used from memory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from kis_lens._version import __version__
from kis_lens.errors import KisError

MANIFEST = "kis_manifest.json"
MANIFEST_FORMAT = 1
# A temp folder older than this is a dead conversion even if its pid has been reused by a live process.
STALE_TEMP_SECONDS = 3600
# ".<name>-<sha16>.<pid>.tmp" (a conversion being written) and ".<name>-<sha16>.<pid>.old" (a folder being replaced).
_TEMP_NAME = re.compile(r"^\.(?P<folder>.+)\.(?P<pid>\d+)\.(?:tmp|old)$")
_PACKAGE_DIR = str(Path(__file__).resolve().parent)


def user_cache_dir() -> Path:
    """Return kis_lens's per-user cache folder ($KIS_LENS_CACHE, else ~/.cache/kis_lens)."""
    return Path(os.environ.get("KIS_LENS_CACHE", Path.home() / ".cache" / "kis_lens"))


def file_sha256(path: str | Path) -> str:
    """Return the hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _converted_dir(name: str, gguf_sha256: str) -> Path:
    return user_cache_dir() / "converted" / f"{name}-{gguf_sha256[:16]}"


def converted_gguf_dir(name: str, gguf: Path) -> Path:
    """Return the folder that holds a GGUF's de-quantised weights and tokenizer, keyed by the GGUF's hash."""
    return _converted_dir(name, file_sha256(gguf))


def packaged_gguf_path(name: str, package: str, hint: str) -> Path:
    """Return the .gguf file that a Python package carries (assembled from part packages when it is split)."""
    spec = importlib.util.find_spec(package)  # finds the folder without importing the package's code
    if spec is None or not spec.submodule_search_locations:
        raise KisError(f"model {name!r} needs the package that carries its weights: run `{hint}`")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files and (folder / "__init__.py").is_file() and "def assemble" in (folder / "__init__.py").read_text():
        try:
            assembled = importlib.import_module(package).assemble(user_cache_dir() / "gguf" / f"{name}.gguf")
        except (FileNotFoundError, ModuleNotFoundError, ValueError, FileExistsError) as error:
            raise KisError(
                f"could not assemble the {name} GGUF from its part packages ({error}); reinstall with `{hint}`"
            ) from None
        files = [Path(assembled)]
    if not files:
        raise KisError(f"no .gguf file found in {folder}; reinstall it with `{hint}`")
    return files[0]


def _read_gguf(gguf: Path, architecture: str | None) -> tuple[Any, Any]:
    """Return (tokenizer, float32 HF model) de-quantised from the GGUF itself (slow: ~17 s for SmolLM2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # GGUF weights dequantise to float32; eager attention matches what the bridge hooks.
    hf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    )
    if architecture is not None:
        hf_model.config.architectures = [architecture]
    # The weights are plain float32 now; without this transformers refuses to save "a gguf-quantized model".
    hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    return tokenizer, hf_model


# ---------------------------------------------------------------------------------------------------------
# The manifest: what a converted folder must hold, byte for byte
# ---------------------------------------------------------------------------------------------------------


def _folder_files(folder: Path) -> list[str]:
    """Return every file under a folder (the manifest aside) as sorted POSIX relative names."""
    return sorted(
        path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file() and path.name != MANIFEST
    )


def write_manifest(folder: Path, gguf_sha256: str) -> None:
    """Write kis_manifest.json: the GGUF's sha256, the kis_lens version, and each file's size and sha256."""
    files = {
        name: {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
        for name in _folder_files(folder)
    }
    manifest = {"format": MANIFEST_FORMAT, "kis_lens": __version__, "gguf_sha256": gguf_sha256, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def converted_problem(folder: Path, gguf_sha256: str) -> str | None:
    """Return why a converted folder cannot be trusted ("config.json missing"), or None when it matches its manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no manifest: written by an older kis_lens, or not by kis_lens"
    except (OSError, ValueError) as error:
        return f"{MANIFEST} unreadable ({error})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(_is_entry(name, entry) for name, entry in files.items()):
        return f"{MANIFEST} malformed"
    if manifest.get("gguf_sha256") != gguf_sha256:
        return f"{MANIFEST} describes another GGUF (sha256 {str(manifest.get('gguf_sha256'))[:16]}…)"
    try:
        # Cheap checks first, so a missing or truncated file is reported without hashing ~0.5 GB.
        for name, entry in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} missing"
            if path.stat().st_size != entry["size"]:
                return f"{name} size differs from the manifest ({path.stat().st_size} bytes, not {entry['size']})"
        extra = sorted(set(_folder_files(folder)) - set(files))
        if extra:
            return f"{extra[0]} is not in the manifest (a file added after conversion)"
        for name, entry in files.items():
            if file_sha256(folder / name) != entry["sha256"]:
                return f"{name} sha256 differs from the manifest"
    except OSError as error:
        return f"cannot read {folder} ({error.strerror or error})"
    return None


def _is_entry(name: Any, entry: Any) -> bool:
    safe = isinstance(name, str) and not Path(name).is_absolute() and ".." not in Path(name).parts
    return (
        safe and isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
    )


# ---------------------------------------------------------------------------------------------------------
# Writing the cache: temp sibling, manifest last, atomic rename; dead conversions cleaned up
# ---------------------------------------------------------------------------------------------------------


def _warn(message: str) -> None:
    """Warn at the first frame outside kis_lens (the user's load_model call), however deep the call came from."""
    frame, level = sys._getframe(0), 1
    while frame is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE_DIR) or frame.f_code.co_filename == contextlib.__file__
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) sends CTRL_C_EVENT on Windows: rely on the age rule alone
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _tree_size(path: Path) -> int:
    if not path.is_dir():
        return path.stat().st_size
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def _remove(path: Path) -> None:
    """Remove a file or folder tree, warning (not raising) when that fails: it is only disk space."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError as error:
        _warn(f"could not remove {path} ({error.strerror or error}): delete it by hand to free the space")


def remove_stale_temps(parent: Path) -> int:
    """Remove temp folders of killed conversions (pid gone, or older than an hour) in parent; return bytes freed."""
    freed, removed = 0, []
    for path in sorted(parent.glob(".*")):
        match = _TEMP_NAME.match(path.name)
        if match is None or int(match["pid"]) == os.getpid():
            continue
        try:
            age = time.time() - path.lstat().st_mtime
            if _pid_alive(int(match["pid"])) and age < STALE_TEMP_SECONDS:
                continue  # another process is converting right now
            size = _tree_size(path)
        except OSError:
            continue  # gone already: its owner finished or another process cleaned it up
        _remove(path)
        if not path.exists():
            freed, removed = freed + size, [*removed, path.name]
    if removed:
        _warn(
            f"removed {len(removed)} temp folder(s) left in {parent} by killed conversions "
            f"({', '.join(removed)}): freed {freed / 1e6:.1f} MB"
        )
    return freed


def _cache_error_causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _cache_write_warning(parent: Path, error: BaseException) -> str:
    """Return the warning for a cache that could not be written: the problem, then the fix."""
    causes = list(_cache_error_causes(error))
    codes = {cause.errno for cause in causes if isinstance(cause, OSError)}
    text = " ".join(str(cause) for cause in causes)
    what = f"{type(error).__name__}: {error.strerror if isinstance(error, OSError) and error.strerror else error}"
    if codes & {errno.ENOSPC, errno.EDQUOT} or any(s in text for s in ("No space left", "StorageFull", "quota")):
        fix = f"free space in {parent} or set KIS_LENS_CACHE to a folder with room"
    elif codes & {errno.EACCES, errno.EPERM, errno.EROFS} or any(isinstance(c, PermissionError) for c in causes):
        fix = f"make {parent} writable or set KIS_LENS_CACHE to a writable folder"
    else:
        fix = f"free space in {parent} if it is full, or set KIS_LENS_CACHE to another folder"
    return (
        f"cannot cache the converted weights in {parent} ({what}): the model is used from memory and the GGUF "
        f"is read again next time (~20 s); {fix}"
    )


def save_converted(folder: Path, tokenizer: Any, hf_model: Any, gguf_sha256: str) -> bool:
    """Write the converted model, tokenizer and manifest so the folder appears whole; warn and return False if not."""
    from safetensors import SafetensorError

    temp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    old = folder.parent / f".{folder.name}.{os.getpid()}.old"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder.parent)
        _remove(temp)
        hf_model.save_pretrained(temp, safe_serialization=True)
        tokenizer.save_pretrained(temp)
        write_manifest(temp, gguf_sha256)  # last: a folder with a manifest was written to the end
        _swap_in(temp, folder, old, gguf_sha256)
        return True
    # Caching is optional, and torch's and safetensors' writers report a full disk as RuntimeError or
    # SafetensorError, not OSError: every write error becomes this one warning, and the load goes on.
    except (OSError, RuntimeError, SafetensorError) as error:
        _warn(_cache_write_warning(folder.parent, error))
        return False
    finally:
        for leftover in (temp, old):
            if leftover.exists() or leftover.is_symlink():
                _remove(leftover)


def _swap_in(temp: Path, folder: Path, old: Path, gguf_sha256: str) -> None:
    """Rename the finished temp folder to folder, moving a folder that failed verification out of the way first."""
    try:
        os.replace(temp, folder)
        return
    except OSError:
        if not (folder.exists() or folder.is_symlink()):
            raise
    # A folder is there: the one that failed verification, or one another process has just finished.
    if converted_problem(folder, gguf_sha256) is None:
        return  # the other process won the race; its folder is as good as ours
    os.replace(folder, old)
    os.replace(temp, folder)


@contextlib.contextmanager
def _saved_tokenizer_dir(folder: Path | None, tokenizer: Any) -> Iterator[Path]:
    """Yield the converted folder, or a temporary folder holding the tokenizer alone when it could not be cached.

    The folder must outlive the bridge's boot, which reloads the tokenizer from it.
    """
    if folder is not None:
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="kis_lens-tokenizer-") as temp:
        tokenizer.save_pretrained(temp)
        yield Path(temp)


@contextlib.contextmanager
def converted_model(name: str, gguf: Path, architecture: str | None = None) -> Iterator[tuple[Any, Any]]:
    """Yield (float32 HF model, tokenizer) of a GGUF: from its verified converted folder, else converted anew.

    The tokenizer is always loaded from a folder, never the GGUF's own, and that folder exists until the block
    ends: the bridge reloads the tokenizer from its ``name_or_path`` with add_bos_token=True (so
    ``model.tokenizer("a")`` starts with BOS, as for every hub, local-folder and tiny model). A GGUF tokenizer's
    ``name_or_path`` is the package folder, which holds no tokenizer files: that reload would fail, the bridge
    would keep the GGUF tokenizer as it is, and the converting load would tokenize differently from later ones.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_sha256 = file_sha256(gguf)
    folder = _converted_dir(name, gguf_sha256)
    if folder.exists() or folder.is_symlink():
        problem = converted_problem(folder, gguf_sha256)
        if problem is None:
            hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
            yield hf_model, AutoTokenizer.from_pretrained(folder)
            return
        _warn(f"not using the converted {name} in {folder}: {problem}; converting the GGUF again (~20 s)")
    gguf_tokenizer, hf_model = _read_gguf(gguf, architecture)
    cached = save_converted(folder, gguf_tokenizer, hf_model, gguf_sha256)
    with _saved_tokenizer_dir(folder if cached else None, gguf_tokenizer) as tokenizer_dir:
        yield hf_model, AutoTokenizer.from_pretrained(tokenizer_dir)
