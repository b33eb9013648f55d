"""Checkpoints of the lifelong queue that outlast a session: parked in the repository, put back on a fresh checkout.

results/ is not committed, and a session may start on a fresh checkout of main. `park` copies each checkpoint in
progress (kis's <stem>.partial.safetensors and <stem>.partial.json) into a committed folder, with the header of the
covariance C the run was made with; `unpark` puts them back before a lane runs its jobs.

C itself (19 MB a layer) is not committed but recomputed: its file hash is part of the run's identity, and safetensors
writes the header's metadata keys in a random order, so a recomputed C hashes differently even when its tensor is
bit for bit the same. Writing the recomputed tensor behind the parked header gives the parked file byte for byte
whenever the tensor is equal. Where it is not (another CPU, another library), the hashes differ, the file is left as
computed and the run starts afresh, as it should: resuming would mix two Cs in one run.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Callable

from kis_lens.gguf import file_sha256

CHECKPOINT_SUFFIXES = (".partial.safetensors", ".partial.json")  # kis writes the tensors first, the JSON last
HEADER_SUFFIX = ".header"
SHA256_SUFFIX = ".sha256"


def covariance_name(layer: int | str) -> str:
    """Return the file name of a layer's C in kis's stats folder."""
    return f"layer_{layer}_mom2.safetensors"


def safetensors_header(path: Path) -> bytes:
    """Return a safetensors file's header as stored: its 8-byte little-endian length, then its JSON."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        return prefix + handle.read(struct.unpack("<Q", prefix)[0])


def save_token(path: Path) -> str | None:
    """Return the save token of one checkpoint file: kis writes the same one into both files of a save."""
    if path.name.endswith(".json"):
        return json.loads(path.read_text(encoding="utf-8")).get("save_id")
    return json.loads(safetensors_header(path)[8:]).get("__metadata__", {}).get("save_id")


def checkpoint_edits(state: Path) -> int:
    """Return how many edits a checkpoint's JSON holds."""
    return len(json.loads(state.read_text(encoding="utf-8"))["state"]["edits"])


def _copy_atomic(source: Path, target: Path) -> None:
    """Copy a file through a temp file and a rename, so no reader sees half of it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, temp)
    temp.replace(target)


def copy_checkpoint(source: Path, target: Path, stem: str, attempts: int = 10, pause: float = 3.0) -> bool:
    """Copy one checkpoint, tensors then JSON, until both copies carry one save token; False if none was caught.

    The run may save between the two copies (it saves every few edits); a mismatched pair would be refused on resume,
    so it is copied again."""
    tensors, state = (stem + suffix for suffix in CHECKPOINT_SUFFIXES)
    for _ in range(attempts):
        _copy_atomic(source / tensors, target / tensors)
        _copy_atomic(source / state, target / state)
        if save_token(target / tensors) == save_token(target / state):
            return True
        time.sleep(pause)
    return False


def remove_checkpoint(folder: Path, stem: str) -> None:
    """Delete one checkpoint's files, JSON first: a JSON is never left without its tensors."""
    for suffix in CHECKPOINT_SUFFIXES[::-1]:
        (folder / (stem + suffix)).unlink(missing_ok=True)


def park(runs: Path, covariance: Path, parked: Path, finished: Callable[[str, str], bool]) -> list[str]:
    """Copy every unfinished checkpoint under runs/layer_*/ and its layer's C header into parked; drop parked
    checkpoints whose run has finished. Return the stems parked.

    finished(stem, layer folder) says whether a run's result is written."""
    stems = []
    for state in sorted(runs.glob("layer_*/*" + CHECKPOINT_SUFFIXES[1])):
        stem, layer_folder = state.name.removesuffix(CHECKPOINT_SUFFIXES[1]), state.parent.name
        if finished(stem, layer_folder):
            continue
        if not copy_checkpoint(state.parent, parked / layer_folder, stem):
            raise RuntimeError(f"{stem}: the run saved during every copy of its checkpoint; park again")
        c_file = covariance / covariance_name(layer_folder.removeprefix("layer_"))
        (parked / "covariance").mkdir(parents=True, exist_ok=True)
        (parked / "covariance" / (c_file.name + HEADER_SUFFIX)).write_bytes(safetensors_header(c_file))
        (parked / "covariance" / (c_file.name + SHA256_SUFFIX)).write_text(file_sha256(c_file) + "\n")
        stems.append(stem)
    for state in sorted(parked.glob("layer_*/*" + CHECKPOINT_SUFFIXES[1])):
        stem = state.name.removesuffix(CHECKPOINT_SUFFIXES[1])
        if finished(stem, state.parent.name):
            remove_checkpoint(state.parent, stem)
    for layer_folder in sorted(parked.glob("layer_*")):  # a C header no parked run needs would outlive its runs
        if not any(layer_folder.glob("*" + CHECKPOINT_SUFFIXES[1])):
            c_name = covariance_name(layer_folder.name.removeprefix("layer_"))
            for suffix in (HEADER_SUFFIX, SHA256_SUFFIX):
                (parked / "covariance" / (c_name + suffix)).unlink(missing_ok=True)
    return stems


def restore_covariance(parked: Path, c_file: Path) -> bool:
    """Put c_file's tensor data behind the parked header of its name; True if that gives the parked file hash.

    A differing hash means another C: the file is left as it was."""
    wanted = (parked / "covariance" / (c_file.name + SHA256_SUFFIX)).read_text().strip()
    if file_sha256(c_file) == wanted:
        return True
    header = (parked / "covariance" / (c_file.name + HEADER_SUFFIX)).read_bytes()
    temp = c_file.with_name(f"{c_file.name}.{os.getpid()}.tmp")
    with open(c_file, "rb") as source, open(temp, "wb") as target:
        target.write(header)
        source.seek(len(safetensors_header(c_file)))
        shutil.copyfileobj(source, target)
    if file_sha256(temp) != wanted:
        temp.unlink()
        return False
    temp.replace(c_file)
    return True


def unpark(
    runs: Path,
    covariance: Path,
    parked: Path,
    wanted: Callable[[str, str], bool],
    finished: Callable[[str, str], bool],
    compute_covariance: Callable[[int], None],
) -> list[str]:
    """Put back the parked checkpoints that wanted(stem, layer folder) selects, unless results/ holds as many edits
    or the run has finished; C is computed first where absent. Return the stems restored."""
    restored = []
    for state in sorted(parked.glob("layer_*/*" + CHECKPOINT_SUFFIXES[1])):
        stem, layer_folder = state.name.removesuffix(CHECKPOINT_SUFFIXES[1]), state.parent.name
        here = runs / layer_folder / state.name
        if not wanted(stem, layer_folder) or finished(stem, layer_folder):
            continue
        if here.is_file() and checkpoint_edits(here) >= checkpoint_edits(state):
            continue
        layer = layer_folder.removeprefix("layer_")
        c_file = covariance / covariance_name(layer)
        if not c_file.is_file():
            compute_covariance(int(layer))
        if not restore_covariance(parked, c_file):
            print(f"{stem}: C of layer {layer} recomputed here differs from the checkpoint's; the run starts afresh")
            continue
        if not copy_checkpoint(state.parent, here.parent, stem):
            raise RuntimeError(f"{stem}: the parked checkpoint's two files carry different save tokens")
        restored.append(stem)
    return restored
