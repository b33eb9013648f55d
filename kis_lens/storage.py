"""Covariance caches on disk: safetensors (never pickle) with metadata that says what they were made from.

A cache holds ``mom2`` = E[k kᵀ] (float32 by default, float64 on request) and its token count, so
caches merge and extend as sums (mom2 · count). Checkpoints of a running job hold the exact float64
sums of every layer and the corpus position, so a killed job continues to the identical result.
ROME/MEMIT/AlphaEdit ``layer_stats`` ``.npz`` files (``mom2.mom2``, ``mom2.count``) import and export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kis_lens import __version__
from kis_lens.errors import KisError
from kis_lens.io import atomic_write
from kis_lens.stats import SecondMoment

# Metadata keys that must agree between a cache and the request for it to be reused.
MATCH_KEYS: tuple[str, ...] = ("model_name", "model_fingerprint", "layer", "hook", "d_mlp", "corpus", "prepend_bos", "max_length")
STATS_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


def path_component(name: str, what: str) -> str:
    """Return name if it is one safe folder name (no separator, not "." or ".."), else raise KisError."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise KisError(f"{what} {name!r} cannot name a folder inside the output directory: use a plain name")
    return name


def stats_dir(output_dir: str | Path, model: str, corpus: str) -> Path:
    """Return the folder of a model's caches for a corpus: {output_dir}/stats/{model}/{corpus}_stats."""
    return Path(output_dir) / "stats" / path_component(model, "model name") / f"{path_component(corpus, 'corpus name')}_stats"


def stats_path(output_dir: str | Path, model: str, corpus: str, layer: int) -> Path:
    """Return where a layer's cache lives: {output_dir}/stats/{model}/{corpus}_stats/layer_{L}_mom2.safetensors."""
    return stats_dir(output_dir, model, corpus) / f"layer_{layer}_mom2.safetensors"


def _encode_metadata(metadata: dict[str, Any]) -> dict[str, str]:
    return {key: json.dumps(value) for key, value in metadata.items()}


def save_second_moment(path: str | Path, moment: SecondMoment, metadata: dict[str, Any], dtype: str = "float32") -> Path:
    """Write E[k kᵀ] in dtype with its count and metadata, atomically; return the path."""
    if dtype not in STATS_DTYPES:
        raise KisError(f"unknown stats dtype {dtype!r}: use one of {', '.join(STATS_DTYPES)}")
    meta = _encode_metadata({**metadata, "count": moment.count, "stats_dtype": dtype, "kis_lens_version": __version__})
    tensors = {"mom2": moment.compute(STATS_DTYPES[dtype]).detach().cpu().contiguous()}
    return atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=meta))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Return a cache's parsed metadata; KisError when the file is missing, truncated or corrupt."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise KisError(f"no covariance cache at {path}: run `kis cache-cov` first")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise KisError(f"covariance cache {path} is corrupt or truncated ({error}); delete it and rerun `kis cache-cov`") from None
    try:
        return {key: json.loads(value) for key, value in raw.items()}
    except ValueError as error:
        raise KisError(
            f"covariance cache {path} has metadata that does not parse ({error}), so what it was made from is unknown; "
            "delete it and rerun `kis cache-cov`"
        ) from None


def check_metadata(path: str | Path, metadata: dict[str, Any], expect: dict[str, Any] | None) -> None:
    """Raise KisError naming the first identifying key where a cache's metadata disagrees with expect."""
    for key, wanted in (expect or {}).items():
        if key in metadata and metadata[key] != wanted:
            raise KisError(
                f"covariance cache {path} was made for {key}={metadata[key]!r}, not {wanted!r}; "
                "point --output_dir elsewhere or delete the cache to recompute it"
            )


def load_second_moment(path: str | Path, expect: dict[str, Any] | None = None) -> tuple[SecondMoment, dict[str, Any]]:
    """Return the saved accumulator and metadata; refuse a cache whose metadata disagrees with expect."""
    metadata = read_metadata(path)
    check_metadata(path, metadata, expect)
    try:
        tensors = load_file(str(path))
        count = int(metadata["count"])
        # Caches written before mom2 held the raw float64 sum.
        total = tensors["sum"] if "sum" in tensors else tensors["mom2"].double() * count
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise KisError(f"covariance cache {path} is corrupt or truncated ({error}); delete it and rerun `kis cache-cov`") from None
    if total.ndim != 2 or total.shape[0] != total.shape[1] or ("d_mlp" in metadata and total.shape[0] != metadata["d_mlp"]):
        raise KisError(f"covariance cache {path} holds a {tuple(total.shape)} matrix, not a square d_mlp×d_mlp one; delete it and rerun `kis cache-cov`")
    if not torch.isfinite(total).all():
        raise KisError(
            f"covariance cache {path} contains NaN or inf (an overflow while it was estimated); delete it and rerun "
            "`kis cache-cov`, with --dtype float32 if the model ran in float16"
        )
    if count < 1:
        raise KisError(f"covariance cache {path} records {count} tokens; delete it and rerun `kis cache-cov`")
    return SecondMoment.from_state(total, count), metadata


def save_checkpoint(path: str | Path, moments: dict[int, SecondMoment], state: dict[str, Any]) -> Path:
    """Write every layer's exact float64 sums and the job state (corpus position, counts) atomically."""
    tensors = {f"upper_{layer}": moment.upper.detach().cpu().contiguous() for layer, moment in moments.items()}
    meta = _encode_metadata({**state, "counts": {str(layer): m.count for layer, m in moments.items()}})
    return atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=meta))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[int, SecondMoment], dict[str, Any]]:
    """Return the layers' accumulators and the job state from a checkpoint."""
    state = read_metadata(path)
    try:
        tensors = load_file(str(path), device=str(device))
        counts = state.pop("counts")
        moments = {
            int(layer): SecondMoment.from_state(tensors[f"upper_{layer}"], count) for layer, count in counts.items()
        }
    except (SafetensorError, OSError, KeyError, ValueError, AttributeError) as error:
        raise KisError(f"checkpoint {path} is corrupt ({error}); delete it to start the job afresh") from None
    if not all(torch.isfinite(moment.upper).all() for moment in moments.values()):
        raise KisError(f"checkpoint {path} contains NaN or inf; delete it to start the job afresh")
    return moments, state


def export_npz(cache: str | Path, target: str | Path) -> Path:
    """Write a cache as a ROME/MEMIT layer_stats .npz (mom2.mom2 float32, mom2.count); return its path."""
    moment, _ = load_second_moment(cache)

    def write(temp: Path) -> None:
        with open(temp, "wb") as handle:
            np.savez(handle, **{"mom2.mom2": moment.compute(torch.float32).numpy(), "mom2.count": np.array(moment.count)})

    return atomic_write(target, write)


def import_npz(source: str | Path) -> SecondMoment:
    """Return the accumulator of a ROME/MEMIT/AlphaEdit layer_stats .npz (read without pickle)."""
    source = Path(source)
    if not source.is_file():
        raise KisError(f"no file at {source}: give a layer_stats .npz from ROME/MEMIT/AlphaEdit")
    try:
        with np.load(source, allow_pickle=False) as data:
            if "mom2.mom2" not in data or "mom2.count" not in data:
                raise KisError(f"{source} has arrays {sorted(data.files)} but not 'mom2.mom2' and 'mom2.count': is it a layer_stats file?")
            mean = torch.from_numpy(np.asarray(data["mom2.mom2"], dtype=np.float64))
            count = int(np.asarray(data["mom2.count"]).reshape(-1)[0])
    except (OSError, ValueError) as error:
        raise KisError(f"cannot read {source} as .npz without pickle ({error})") from None
    if mean.ndim != 2 or mean.shape[0] != mean.shape[1] or count < 1:
        raise KisError(f"{source} holds no square mom2 with a positive count")
    return SecondMoment.from_state(mean * count, count)


# Metadata that must agree for caches to merge (the corpus may differ: shards of one corpus, or several).
MERGE_KEYS: tuple[str, ...] = ("model_name", "model_fingerprint", "layer", "hook", "d_mlp", "prepend_bos", "max_length")


def _cache_files(inputs: list[str | Path]) -> dict[str, list[Path]]:
    """Return {cache file name: [paths]} from cache files and folders of caches."""
    grouped: dict[str, list[Path]] = {}
    for item in map(Path, inputs):
        files = sorted(item.glob("layer_*_mom2.safetensors")) if item.is_dir() else [item]
        if not files or not all(file.is_file() for file in files):
            raise KisError(f"{item} is neither a cache file nor a folder of layer_*_mom2.safetensors caches")
        for file in files:
            grouped.setdefault(file.name, []).append(file)
    return grouped


def merge_caches(inputs: list[str | Path], output_dir: str | Path, dtype: str = "float32") -> list[Path]:
    """Merge caches of the same layers (sums and counts add) into output_dir; return the written paths."""
    written = []
    for name, files in sorted(_cache_files(inputs).items()):
        if len(files) < 2:
            raise KisError(f"only one input has {name}: every input must hold the same layers to merge")
        merged, first = load_second_moment(files[0])
        corpora, texts = [first.get("corpus")], int(first.get("texts", 0))
        for file in files[1:]:
            moment, metadata = load_second_moment(file, expect={key: first[key] for key in MERGE_KEYS if key in first})
            merged.merge(moment)
            corpora.append(metadata.get("corpus"))
            texts += int(metadata.get("texts", 0))
        metadata = {key: first[key] for key in (*MERGE_KEYS, "model_dtype") if key in first}
        distinct = sorted({str(corpus) for corpus in corpora})
        metadata.update(corpus=distinct[0] if len(distinct) == 1 else "+".join(distinct), texts=texts, merged_from=[str(f) for f in files])
        written.append(save_second_moment(Path(output_dir) / name, merged, metadata, dtype=dtype))
    return written


def import_layer_stats(npz: str | Path, model_name: str, layer: int, output_dir: str | Path, corpus: str = "wikipedia") -> Path:
    """Write a ROME/MEMIT layer_stats .npz as a kis cache of that model and layer; return its path."""
    from kis_lens.corpus import corpus_cache_name
    from kis_lens.hooks import mlp_in_hook_name
    from kis_lens.models import model_slug

    moment = import_npz(npz)
    slug = model_slug(model_name)
    metadata = {
        "model_name": slug,
        "layer": int(layer),
        "hook": mlp_in_hook_name(layer),
        "d_mlp": moment.dim,
        "corpus": corpus,
        "imported_from": str(Path(npz).resolve()),
    }
    return save_second_moment(stats_path(output_dir, slug, corpus_cache_name(corpus), layer), moment, metadata, dtype="float64")
