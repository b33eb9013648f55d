"""Run identities, per-run file names, per-run locks and pickle-free checkpoints for long editing runs.

A run's results depend on more than its config strings: the facts file, the covariance C (hashed by content, which
safetensors' random header order leaves alone), the model and the kis_lens version. ``run_identity`` canonicalises
all of that, ``run_stem`` names a run's files by it (so runs with another seed or facts file never overwrite each
other), ``run_lock`` keeps two processes off one run, and the checkpoint functions store tensors as safetensors and
state as JSON: loading one never executes code, and a checkpoint made under another identity is never resumed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from kis_lens.errors import KisError
from kis_lens.gguf import file_sha256
from kis_lens.io import atomic_write, folder_lock, save_json

CHECKPOINT_FORMAT = 1
TENSORS_SUFFIX = ".partial.safetensors"
STATE_SUFFIX = ".partial.json"
LEGACY_SUFFIX = ".partial.pt"
HASH_LENGTH = 8  # hex digits of identity_hash in a stem: 32 bits, ample for the runs of one output folder
READABLE_LENGTH = 120  # a stem's readable part is cut here so file names stay under common 255-byte limits
STEM_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


# The keys under which a run's identity holds each C's hash: its content (this kis), or its file bytes (an older kis,
# whose hashes differ between equal Cs because safetensors writes its header in a random order).
COVARIANCE_HASHES: tuple[str, ...] = ("content_sha256", "sha256")


def content_sha256(path: str | Path) -> str:
    """Return the hex SHA-256 of a file's bytes (for identities: a changed facts file is another run)."""
    try:
        return file_sha256(path)
    except OSError as error:
        raise KisError(
            f"cannot read {path} to hash it: {error.strerror or error}; check that the file exists"
        ) from None


def safetensors_content_sha256(path: str | Path) -> str:
    """Return the hex SHA-256 of a safetensors file's metadata and tensors (names, dtypes, shapes, bytes), not order."""
    # safetensors writes its header's keys in a random order (a Rust HashMap): one content written twice gets two file
    # hashes. Hashed instead, self-delimiting: the metadata as compact sorted-key JSON, then per tensor in name order
    # the JSON [name, dtype, shape, byte count] and its raw bytes, read in chunks (a C may be gigabytes).
    try:
        with open(path, "rb") as handle:
            header, start = _safetensors_header(handle, Path(path).stat().st_size)
            digest = hashlib.sha256(_canonical_text(header.pop("__metadata__", None) or {}).encode("utf-8"))
            for name in sorted(header):
                begin, end = header[name]["data_offsets"]
                digest.update(
                    _canonical_text([name, header[name]["dtype"], header[name]["shape"], end - begin]).encode("utf-8")
                )
                handle.seek(start + begin)
                left = end - begin
                while left:
                    chunk = handle.read(min(1 << 22, left))
                    if not chunk:
                        raise ValueError(f"the bytes of {name!r} run past the end of the file")
                    digest.update(chunk)
                    left -= len(chunk)
    except OSError as error:
        raise KisError(
            f"cannot read {path} to hash it: {error.strerror or error}; check that the file exists"
        ) from None
    except (ValueError, KeyError, TypeError) as error:
        raise KisError(
            f"{path} is not a readable safetensors file ({error}): delete it and rerun the command that wrote it (a "
            "covariance cache: `kis cache-cov`, or `kis lifelong`, which computes a missing C)"
        ) from None
    return digest.hexdigest()


def run_identity(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Return a canonical JSON-able copy of settings (sorted keys, lists for tuples); KisError on non-JSON values."""
    if not isinstance(settings, Mapping):
        raise KisError(f"a run identity must be a mapping of field names to values, not {type(settings).__name__}")
    return _canonical(settings, "identity")


def identity_hash(identity: Mapping[str, Any]) -> str:
    """Return the hex SHA-256 of identity's canonical JSON (hashlib: the same in every process)."""
    return hashlib.sha256(_canonical_text(run_identity(identity)).encode("utf-8")).hexdigest()


def run_stem(editor: str, identity: Mapping[str, Any], readable: Mapping[str, Any]) -> str:
    """Return a file stem like "rome_seed0_n436_layer4_3fa9c2d1": readable settings plus the identity's hash."""
    name = _safe(str(editor))
    if not name:
        raise KisError(f"run_stem needs an editor name with ASCII letters or digits, got {editor!r}")
    parts = [name] + [_safe(f"{key}{value}") for key, value in readable.items()]
    text = "_".join(part for part in parts if part)[:READABLE_LENGTH].strip("._-")
    # The readable part may repeat across runs (it names only some settings); the hash makes the stem unique.
    return f"{text}_{identity_hash(identity)[:HASH_LENGTH]}"


@contextlib.contextmanager
def run_lock(folder: str | Path, stem: str) -> Iterator[Path]:
    """Hold an exclusive non-blocking lock on one run stem in folder; KisError if another process holds it."""
    _check_stem(stem)
    lock_name = f".{stem}.lock"  # hidden like kis_lens.io's .kis.lock; one per stem so other runs go on
    busy = (
        f"run {stem} in {folder} is being written by another process (lock {Path(folder) / lock_name}): "
        "wait for it or use another --output_dir"
    )
    with folder_lock(folder, 0.0, lock_name, busy):
        yield Path(folder) / lock_name


def checkpoint_paths(folder: str | Path, stem: str) -> tuple[Path, Path]:
    """Return (tensors path, state path) of the checkpoint of one run stem."""
    _check_stem(stem)
    return Path(folder) / f"{stem}{TENSORS_SUFFIX}", Path(folder) / f"{stem}{STATE_SUFFIX}"


def save_checkpoint(
    folder: str | Path, stem: str, identity: Mapping[str, Any], tensors: Mapping[str, Tensor], state: Mapping[str, Any]
) -> tuple[Path, Path]:
    """Write <stem>.partial.safetensors then <stem>.partial.json, each atomically; return both paths."""
    tensors_path, state_path = checkpoint_paths(folder, stem)
    identity = run_identity(identity)
    digest = identity_hash(identity)
    state = _canonical(state, "state")
    # One token per save, in both files: a crash between the two renames leaves new tensors beside the old JSON
    # (same identity), and only this token tells that pair apart from a consistent one.
    save_id = secrets.token_hex(16)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "identity": identity,
        "identity_hash": digest,
        "save_id": save_id,
        "state": state,
    }
    plain = _plain_tensors(tensors)
    metadata = {"identity_hash": digest, "save_id": save_id, "format": str(CHECKPOINT_FORMAT)}
    # Tensors first, JSON last: a JSON on disk always has its tensors file.
    atomic_write(tensors_path, lambda temp: save_file(plain, str(temp), metadata=metadata))
    save_json(state_path, payload)
    return tensors_path, state_path


def load_checkpoint(
    folder: str | Path, stem: str, identity: Mapping[str, Any]
) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """Return (tensors, state) of the checkpoint made under identity; None if absent or made under another.

    A checkpoint that cannot be read (truncated, garbage, edited, its tensors missing or another run's) raises
    KisError naming the file and both ways on: delete it, or rerun with --no_resume (which starts afresh and replaces
    it at the first save). It is not set aside automatically: it may hold hours of edits, and a damaged copy is worth
    a look before it goes, whereas an interrupted save (detected by its save_id) is safe to restart from scratch.
    """
    tensors_path, state_path = checkpoint_paths(folder, stem)
    if not state_path.is_file():
        return None
    wanted = run_identity(identity)
    digest = identity_hash(wanted)
    payload = _read_state(state_path)
    if payload["identity_hash"] != digest:
        # Decided from the JSON alone, before the tensors file is opened.
        changed = _differing_fields(payload["identity"], wanted)
        warnings.warn(
            f"{state_path}: checkpoint was made with other {', '.join(changed) or 'settings'}: starting afresh",
            stacklevel=2,
        )
        return None
    tensors, save_id = _read_tensors(tensors_path, state_path, digest)
    if save_id != payload["save_id"]:
        warnings.warn(
            f"{state_path}: checkpoint is incomplete (a save was interrupted between its two files): starting afresh",
            stacklevel=2,
        )
        return None
    return tensors, payload["state"]


def remove_checkpoint(folder: str | Path, stem: str) -> None:
    """Delete the checkpoint of one run stem, if any (JSON first, so no JSON is ever left without its tensors)."""
    tensors_path, state_path = checkpoint_paths(folder, stem)
    state_path.unlink(missing_ok=True)
    tensors_path.unlink(missing_ok=True)


def stale_checkpoints(folder: str | Path, stem: str, identity: Mapping[str, Any]) -> list[tuple[Path, list[str]]]:
    """Return (checkpoint JSON, differing identity fields) of checkpoints that share stem's readable part only.

    A run whose facts, C, model or version changed gets a new stem, so its old checkpoint is never resumed; this
    names such checkpoints so the caller can say why it starts afresh. Unreadable ones are listed with ["unreadable"].
    """
    _check_stem(stem)
    readable = stem.rsplit("_", 1)[0]
    wanted = run_identity(identity)
    found = []
    for state_path in sorted(Path(folder).glob(f"{readable}_*{STATE_SUFFIX}")):
        other = state_path.name.removesuffix(STATE_SUFFIX)
        if other == stem or other.rsplit("_", 1)[0] != readable:
            continue
        try:
            found.append((state_path, _differing_fields(_read_state(state_path)["identity"], wanted)))
        except KisError:
            found.append((state_path, ["unreadable"]))
    return found


def find_pickle_checkpoints(folder: str | Path) -> list[Path]:
    """Return the legacy pickle checkpoints (*.partial.pt) in folder; they are listed by name, never opened."""
    folder = Path(folder)
    return sorted(folder.glob(f"*{LEGACY_SUFFIX}")) if folder.is_dir() else []


def _canonical(value: Any, where: str) -> Any:
    # bool before int: bool is an int subclass and must stay true/false in the JSON.
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        # JSON writes repr(float), which reads back to the same double; inf/nan are kept as Python's json writes
        # them (Infinity, NaN) because a limit may be inf and a collapsed model's perplexity is.
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise KisError(f"{where} has the key {key!r} ({type(key).__name__}): JSON keys must be strings")
            out[key] = _canonical(item, f"{where}.{key}")
        return dict(sorted(out.items()))
    if isinstance(value, (list, tuple)):
        return [_canonical(item, f"{where}[{index}]") for index, item in enumerate(value)]
    raise KisError(
        f"{where} is a {type(value).__name__}, which JSON cannot store: convert it to a string, number, list or dict "
        "before passing it"
    )


def _canonical_text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)


def _safetensors_header(handle: Any, size: int) -> tuple[dict[str, Any], int]:
    """Return a safetensors file's header and where its data starts; ValueError on a malformed header."""
    prefix = handle.read(8)  # the header's length: 8 bytes, little-endian
    length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if not 0 < length <= size - 8:
        raise ValueError("its header length is missing or runs past the end of the file")
    header = json.loads(handle.read(length))
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__") or {}, dict):
        raise ValueError("its header is not a JSON object with an object of metadata")
    for name, entry in header.items():
        if name != "__metadata__" and not _tensor_entry(entry):
            raise ValueError(f"its header entry {name!r} lacks a dtype, shape or valid data_offsets")
    return header, 8 + length


def _tensor_entry(entry: Any) -> bool:
    """Return whether a safetensors header entry has a dtype, a shape and ordered non-negative data offsets."""
    if not isinstance(entry, dict):
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    return (
        isinstance(entry.get("dtype"), str)
        and isinstance(shape, list)
        and all(isinstance(n, int) and n >= 0 for n in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(n, int) for n in offsets)
        and 0 <= offsets[0] <= offsets[1]
    )


def _safe(text: str) -> str:
    # ".." is refused in stems (it reads as a parent folder), so runs of dots become one.
    return re.sub(r"\.{2,}", ".", _UNSAFE.sub("-", text)).strip("-.")


def _check_stem(stem: str) -> None:
    # A stem is joined to a folder: no separators or leading dot, so it cannot escape the folder or hide.
    if not isinstance(stem, str) or not STEM_PATTERN.fullmatch(stem) or ".." in stem:
        raise KisError(f"run stem {stem!r} may only use letters, digits, '_', '.', '-': build it with run_stem")


def _plain_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    plain = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, Tensor):
            raise KisError(f"checkpoint tensors must map names to torch tensors; {name!r} is {type(tensor).__name__}")
        # safetensors wants CPU, contiguous tensors that share no storage: a private copy is all three; dtype is kept.
        plain[name] = tensor.detach().to("cpu", copy=True).contiguous()
    return plain


def _unreadable(path: Path, why: str) -> KisError:
    return KisError(f"checkpoint {path} is unreadable ({why}): delete it to start afresh, or rerun with --no_resume")


def _read_state(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _unreadable(path, f"{type(error).__name__}: {error}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise _unreadable(path, f"not a format-{CHECKPOINT_FORMAT} kis checkpoint")
    stored, digest, state = payload.get("identity"), payload.get("identity_hash"), payload.get("state")
    if not (isinstance(stored, dict) and isinstance(state, dict) and isinstance(digest, str)):
        raise _unreadable(path, "its identity, identity_hash or state is missing")
    if not isinstance(payload.get("save_id"), str):
        raise _unreadable(path, "its save_id is missing")
    # An edited or damaged file: its identity no longer hashes to the recorded value.
    if identity_hash(stored) != digest:
        raise _unreadable(path, "its identity does not match its identity_hash")
    return payload


def _read_tensors(path: Path, state_path: Path, digest: str) -> tuple[dict[str, Tensor], str | None]:
    if not path.is_file():
        raise _unreadable(state_path, f"its tensors file {path.name} is missing")
    try:
        # safetensors parses a JSON header and raw bytes: a crafted file cannot run code, only fail to parse.
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("identity_hash") != digest:
                raise _unreadable(path, "its tensors belong to another run")
            return {name: handle.get_tensor(name) for name in handle.keys()}, metadata.get("save_id")
    except KisError:
        raise
    except Exception as error:  # SafetensorError, OSError, ...: any parse failure means the same to the user
        raise _unreadable(path, f"{type(error).__name__}: {error}") from None


def _differing_fields(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    fields = sorted(set(stored) | set(wanted))
    return [
        field
        for field in fields
        if field not in stored
        or field not in wanted
        or _canonical_text(stored[field]) != _canonical_text(wanted[field])
    ]


__all__ = [
    "COVARIANCE_HASHES",
    "content_sha256",
    "safetensors_content_sha256",
    "run_identity",
    "identity_hash",
    "run_stem",
    "run_lock",
    "checkpoint_paths",
    "save_checkpoint",
    "load_checkpoint",
    "remove_checkpoint",
    "find_pickle_checkpoints",
    "stale_checkpoints",
]
