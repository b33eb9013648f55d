"""Covariance caches on disk: safetensors (never pickle) with metadata that says what they were made from.

A cache holds ``mom2`` = E[k kᵀ] (float64 unless float32 is asked for) and its token count, so
caches merge and extend as sums (mom2 · count). Checkpoints of a running job hold the exact float64
sums of every layer and the corpus position, so a killed job continues to the identical result.
ROME/MEMIT/AlphaEdit ``layer_stats`` ``.npz`` files (``mom2.mom2`` = Σ k kᵀ, ``mom2.count``, ``mom2.constructor``,
``sample_size``) import and export.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from kis_lens._version import __version__
from kis_lens.errors import KisError
from kis_lens.hooks import mlp_in_hook_name
from kis_lens.io import atomic_write
from kis_lens.layout import stats_files, stats_path
from kis_lens.models import ModelInfo
from kis_lens.stats import SecondMoment

STATS_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_STATS_DTYPE = "float64"


@dataclass(frozen=True)
class CacheKey:
    """What a covariance cache is of: the one identity that caches, checkpoints, runs and imports record and compare."""

    model_name: str
    model_fingerprint: str | None  # None only in an imported cache, until its first use records it
    layer: int
    hook: str
    d_mlp: int
    corpus: str
    corpus_identity: str | None  # None only in an imported cache: its texts are whatever it was made from
    prepend_bos: bool
    max_length: int | None  # tokens a text is truncated to (n_ctx); None only in an imported cache
    stats_dtype: str = DEFAULT_STATS_DTYPE

    @classmethod
    def for_model(
        cls,
        info: ModelInfo,
        layer: int,
        corpus: str,
        corpus_identity: str,
        prepend_bos: bool,
        stats_dtype: str = DEFAULT_STATS_DTYPE,
    ) -> CacheKey:
        """Return the key of a layer's cache for a resolved model, corpus and tokenization."""
        if stats_dtype not in STATS_DTYPES:
            raise KisError(f"unknown stats dtype {stats_dtype!r}: use one of {', '.join(STATS_DTYPES)}")
        return cls(
            info.name,
            info.fingerprint,
            layer,
            mlp_in_hook_name(layer),
            info.d_mlp,
            corpus,
            corpus_identity,
            prepend_bos,
            info.n_ctx,
            stats_dtype,
        )

    def to_metadata(self) -> dict[str, Any]:
        """Return the key as cache metadata entries."""
        return asdict(self)

    def mismatch(self, metadata: dict[str, Any]) -> str | None:
        """Return "field=found, not wanted" for the first field where a cache's metadata differs, else None.

        A field absent from the metadata differs, except the three an imported cache cannot know (the
        fingerprint, recorded on first use; the corpus identity; max_length when the import did not give it).
        """
        imported = "imported_from" in metadata
        for name, wanted in self.to_metadata().items():
            found = metadata.get(name, _ABSENT)
            if imported and name in ("model_fingerprint", "corpus_identity", "max_length") and found in (None, _ABSENT):
                continue
            if found is _ABSENT:
                return f"no {name} recorded (it predates this version of kis_lens, or was not written by it)"
            if found != wanted:
                return f"{name}={found!r}, not {wanted!r}"
        return None

    def check(self, path: str | Path, metadata: dict[str, Any]) -> None:
        """Raise KisError naming the first field where the cache at path is not this key's."""
        problem = self.mismatch(metadata)
        if problem is not None:
            raise KisError(
                f"covariance cache {path} was made for {problem}; "
                "point --output_dir elsewhere or delete the cache to recompute it"
            )


_ABSENT = object()


def _encode_metadata(metadata: dict[str, Any]) -> dict[str, str]:
    return {key: json.dumps(value) for key, value in metadata.items()}


def save_second_moment(
    path: str | Path, moment: SecondMoment, metadata: dict[str, Any], dtype: str = DEFAULT_STATS_DTYPE
) -> Path:
    """Write the statistic with its count and metadata, atomically; return the path.

    float64 stores ``sum`` = Σ k kᵀ exactly (C = sum / count is then bit-identical to the run's, and a later
    run extends the sum exactly); float32, only on request, stores ``mom2`` = C rounded to float32.
    """
    if dtype not in STATS_DTYPES:
        raise KisError(f"unknown stats dtype {dtype!r}: use one of {', '.join(STATS_DTYPES)}")
    meta = _encode_metadata({**metadata, "count": moment.count, "stats_dtype": dtype, "kis_lens_version": __version__})
    if dtype == "float64":
        tensors = {"sum": moment.sum.detach().cpu().contiguous()}
    else:
        tensors = {"mom2": moment.compute(STATS_DTYPES[dtype]).detach().cpu().contiguous()}
    return atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=meta))


def rewrite_metadata(path: str | Path, updates: dict[str, Any]) -> Path:
    """Rewrite a cache with some metadata entries replaced (tensors unchanged), atomically; return the path."""
    metadata = {**read_metadata(path), **updates}
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    return atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=_encode_metadata(metadata)))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Return a cache's parsed metadata; KisError when the file is missing, truncated or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise KisError(f"no covariance cache at {path}: run `kis cache-cov` first")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise KisError(
            f"covariance cache {path} is corrupt or truncated ({error}); delete it and rerun `kis cache-cov`"
        ) from None
    try:
        return {key: json.loads(value) for key, value in raw.items()}
    except ValueError as error:
        raise KisError(
            f"covariance cache {path} has metadata that does not parse ({error}), so what it was made from is unknown; "
            "delete it and rerun `kis cache-cov`"
        ) from None


def check_metadata(path: str | Path, metadata: dict[str, Any], expect: dict[str, Any] | None) -> None:
    """Raise KisError naming the first key of expect that the cache's metadata lacks or holds differently."""
    for key, wanted in (expect or {}).items():
        if metadata.get(key, _ABSENT) != wanted:
            found = "nothing" if key not in metadata else repr(metadata[key])
            raise KisError(
                f"covariance cache {path} was made for {key}={found}, not {wanted!r}; "
                "point --output_dir elsewhere or delete the cache to recompute it"
            )


def load_second_moment(
    path: str | Path, expect: CacheKey | dict[str, Any] | None = None
) -> tuple[SecondMoment, dict[str, Any]]:
    """Return the saved accumulator and metadata; refuse one that is not expect's (a CacheKey or metadata entries)."""
    metadata = read_metadata(path)
    if isinstance(expect, CacheKey):
        expect.check(path, metadata)
    else:
        check_metadata(path, metadata, expect)
    try:
        tensors = load_file(str(path))
        count = int(metadata["count"])
        # float64 caches hold the exact sum; float32 ones the rounded mean.
        total = tensors["sum"] if "sum" in tensors else tensors["mom2"].double() * count
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise KisError(
            f"covariance cache {path} is corrupt or truncated ({error}); delete it and rerun `kis cache-cov`"
        ) from None
    if (
        total.ndim != 2
        or total.shape[0] != total.shape[1]
        or ("d_mlp" in metadata and total.shape[0] != metadata["d_mlp"])
    ):
        raise KisError(
            f"covariance cache {path} holds a {tuple(total.shape)} matrix, not a square d_mlp×d_mlp one; "
            "delete it and rerun `kis cache-cov`"
        )
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
    tensors = {
        f"upper_{layer}": moment.state_dict()["upper"].detach().cpu().contiguous() for layer, moment in moments.items()
    }
    meta = _encode_metadata({**state, "counts": {str(layer): m.count for layer, m in moments.items()}})
    return atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=meta))


# The job state a checkpoint must hold for kis_lens.cache_job to resume from it (its _Progress), with their types.
CHECKPOINT_STATE: dict[str, tuple[type, ...]] = {
    "window_start": (int,),
    "batches_done": (int,),
    "tokens": (int,),
    "texts": (int,),
    "done": (bool,),
}


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[dict[int, SecondMoment], dict[str, Any]]:
    """Return the layers' accumulators and the job state from a checkpoint.

    A checkpoint that cannot be read, or lacks a layer's sums or the corpus position, stops the job with a KisError
    naming it and the fix (delete it, then rerun): it is not set aside and restarted here, because the caller chose
    to resume this pass before reading it, and a silent restart would throw away the tokens already counted.
    """
    path = Path(path)
    fix = (
        "delete it and rerun the same `kis cache-cov` command: that pass starts afresh, the finished layer caches "
        "are kept"
    )
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            raw = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        state = {key: json.loads(value) for key, value in raw.items()}
        counts = state.pop("counts")
        for key, kinds in CHECKPOINT_STATE.items():
            if key not in state:
                raise KeyError(key)
            if not isinstance(state[key], kinds) or (bool not in kinds and isinstance(state[key], bool)):
                raise ValueError(f"{key} is {state[key]!r}")
        moments = {
            int(layer): SecondMoment.from_state(tensors[f"upper_{layer}"], int(count))
            for layer, count in counts.items()
        }
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, AttributeError) as error:
        # KeyError: a missing entry (counts, a layer's upper_<L>, a progress field); ValueError: also a tensor
        # whose shape is no layer's sums. Not RuntimeError: that is the device (out of memory), not the file.
        why = f"no {error}" if isinstance(error, KeyError) else str(error)
        raise KisError(f"checkpoint {path} is corrupt ({why}); {fix}") from None
    if not all(torch.isfinite(moment.state_dict()["upper"]).all() for moment in moments.values()):
        raise KisError(f"checkpoint {path} contains NaN or inf; {fix}")
    return moments, state


# What ROME's util/runningstats.py SecondMoment.state_dict() records as its class; layer_stats .npz files hold it.
ROME_CONSTRUCTOR = "util.runningstats.SecondMoment()"
ROME_PRECISIONS: dict[str, type[np.floating]] = {"float32": np.float32, "float64": np.float64}


def export_npz(
    cache: str | Path, target: str | Path, precision: str = "float32", sample_size: int | None = None
) -> Path:
    """Write a cache as ROME's layer_stats .npz (mom2.mom2 = Σ k kᵀ, count, constructor, sample_size); return its path.

    sample_size (what ROME's loader matches against mom2_n_samples) defaults to the cache's ``sample_size``
    metadata, else its ``texts``; precision is ROME's: the sum is stored as float32 unless float64 is asked for.
    """
    if precision not in ROME_PRECISIONS:
        raise KisError(f"unknown precision {precision!r}: use one of {', '.join(ROME_PRECISIONS)} (ROME's precision)")
    moment, metadata = load_second_moment(cache)
    if sample_size is None:
        recorded = metadata.get("sample_size") or metadata.get("texts")
        sample_size = int(recorded) if recorded else None
    if sample_size is None or sample_size < 1:
        raise KisError(
            f"covariance cache {cache} records no number of texts, and ROME refuses a layer_stats file without "
            "sample_size: pass --sample_size N, the mom2_n_samples ROME will ask for"
        )
    arrays = {
        "mom2.mom2": moment.sum.cpu().numpy().astype(ROME_PRECISIONS[precision]),  # ROME keeps the running sum
        "mom2.count": np.array(moment.count, dtype=np.int64),
        "mom2.constructor": np.array(ROME_CONSTRUCTOR),  # a 0-d unicode array: readable with allow_pickle=False
        "sample_size": np.array(sample_size, dtype=np.int64),
    }

    def write(temp: Path) -> None:
        with open(temp, "wb") as handle:
            np.savez(handle, **arrays)

    return atomic_write(target, write)


def import_npz(source: str | Path) -> tuple[SecondMoment, int | None]:
    """Return a layer_stats .npz's accumulator (mom2.mom2 is Σ k kᵀ, so C = sum / count) and sample_size (or None).

    The file is read without pickle.
    """
    source = Path(source)
    if not source.is_file():
        raise KisError(f"no file at {source}: give a layer_stats .npz from ROME/MEMIT/AlphaEdit")
    try:
        with np.load(source, allow_pickle=False) as data:
            if "mom2.mom2" not in data or "mom2.count" not in data:
                raise KisError(
                    f"{source} has arrays {sorted(data.files)} but not 'mom2.mom2' and 'mom2.count': "
                    "is it a layer_stats file?"
                )
            if "mom2.constructor" in data and "SecondMoment" not in str(data["mom2.constructor"]):
                raise KisError(
                    f"{source} holds a {data['mom2.constructor']} statistic, not a SecondMoment: "
                    "give the layer_stats file of mom2 (E[k kᵀ])"
                )
            total = torch.from_numpy(np.asarray(data["mom2.mom2"], dtype=np.float64))
            count = int(np.asarray(data["mom2.count"]).reshape(-1)[0])
            sample_size = int(np.asarray(data["sample_size"]).reshape(-1)[0]) if "sample_size" in data else None
    except (OSError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as error:  # BadZipFile: a truncated .npz
        raise KisError(f"cannot read {source} as .npz without pickle ({error})") from None
    if total.ndim != 2 or total.shape[0] != total.shape[1] or count < 1:
        raise KisError(f"{source} holds no square mom2 with a positive count")
    if not torch.isfinite(total).all():
        raise KisError(
            f"{source} has NaN or inf in mom2.mom2 (an overflow while ROME summed it): recompute it, in float64"
        )
    return SecondMoment.from_state(total, count), sample_size


# Metadata that must agree for caches to merge (the corpus may differ: shards of one corpus, or several).
MERGE_KEYS: tuple[str, ...] = ("model_name", "model_fingerprint", "layer", "hook", "d_mlp", "prepend_bos", "max_length")


def _cache_files(inputs: list[str | Path]) -> dict[str, list[Path]]:
    """Return {cache file name: [paths]} from cache files and folders of caches; KisError if a file is given twice."""
    grouped: dict[str, list[Path]] = {}
    given_by: dict[Path, Path] = {}  # each cache file (resolved) -> the input that named it
    for item in map(Path, inputs):
        files = stats_files(item) if item.is_dir() else [item]
        if not files or not all(file.is_file() for file in files):
            raise KisError(f"{item} is neither a cache file nor a folder of layer_*_mom2.safetensors caches")
        for file in files:
            if file.resolve() in given_by:  # merging a cache with itself would count its tokens twice
                raise KisError(
                    f"{file} is given twice (through {given_by[file.resolve()]} and {item}), so its tokens would count "
                    "twice: list each cache or folder once"
                )
            given_by[file.resolve()] = item
            grouped.setdefault(file.name, []).append(file)
    return grouped


def merge_caches(inputs: list[str | Path], output_dir: str | Path, dtype: str = "float64") -> list[Path]:
    """Merge same-layer caches (sums and counts add) into output_dir, C stored in dtype; return the written paths."""
    if dtype not in STATS_DTYPES:
        raise KisError(f"unknown stats dtype {dtype!r}: use one of {', '.join(STATS_DTYPES)}")
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
        metadata.update(
            corpus=distinct[0] if len(distinct) == 1 else "+".join(distinct),
            texts=texts,
            merged_from=[str(f) for f in files],
        )
        written.append(save_second_moment(Path(output_dir) / name, merged, metadata, dtype=dtype))
    return written


def import_layer_stats(
    npz: str | Path,
    model_name: str,
    layer: int,
    output_dir: str | Path,
    corpus: str = "wikipedia",
    prepend_bos: bool | None = None,
    max_length: int | None = None,
) -> Path:
    """Write a ROME/MEMIT layer_stats .npz as a kis cache of a model's layer (C = sum/count, float64); return its path.

    The file records neither the model's weights nor the BOS convention, so prepend_bos is required and
    ``model_fingerprint`` is stored as null, to be recorded when the cache is first used with a loaded model.
    """
    from kis_lens.corpus import corpus_cache_name
    from kis_lens.hooks import mlp_in_hook_name
    from kis_lens.models import model_slug

    moment, sample_size = import_npz(npz)
    if prepend_bos is None:
        raise KisError(
            f"{npz} does not record the BOS convention the cache was made with: pass --prepend_bos true or "
            "--prepend_bos false (ROME and MEMIT tokenize with the HF tokenizer's defaults: false for GPT-2/GPT-J, "
            "true for Llama-style tokenizers that add BOS), so kis uses the cache only for runs that match"
        )
    if layer < 0:
        raise KisError(f"--layer must be 0 or more, not {layer}")
    if max_length is not None and max_length < 1:
        raise KisError(
            f"--max_length must be at least 1, not {max_length}: "
            "give the truncation length the cache was made with, or leave it out"
        )
    slug = model_slug(model_name)
    metadata: dict[str, Any] = {
        "model_name": slug,
        "model_fingerprint": None,  # unknown until the cache is first used with the loaded model
        "layer": int(layer),
        "hook": mlp_in_hook_name(layer),
        "d_mlp": moment.dim,
        "corpus": corpus,
        "prepend_bos": bool(prepend_bos),
        "imported_from": str(Path(npz).resolve()),
    }
    if max_length is not None:
        metadata["max_length"] = int(max_length)
    if sample_size is not None:
        metadata["texts"] = sample_size
    return save_second_moment(
        stats_path(output_dir, slug, corpus_cache_name(corpus), layer), moment, metadata, dtype="float64"
    )
