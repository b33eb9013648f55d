"""Covariance caches on disk: safetensors (never pickle) with metadata that says what they were made from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kis_lens import __version__
from kis_lens.errors import KisError
from kis_lens.io import atomic_write
from kis_lens.stats import SecondMoment

# Metadata keys that must agree between a cache and the request for it to be reused.
MATCH_KEYS: tuple[str, ...] = ("model_name", "layer", "hook", "d_mlp")


def stats_path(output_dir: str | Path, model: str, corpus: str, layer: int) -> Path:
    """Return where a layer's cache lives: {output_dir}/stats/{model}/{corpus}_stats/layer_{L}_mom2.safetensors."""
    return Path(output_dir) / "stats" / model / f"{corpus}_stats" / f"layer_{layer}_mom2.safetensors"


def save_second_moment(path: str | Path, moment: SecondMoment, metadata: dict[str, Any]) -> Path:
    """Write the sum and count with metadata, atomically; return the path."""
    meta = {key: json.dumps(value) for key, value in metadata.items()}
    meta["count"] = json.dumps(moment.count)
    meta["kis_lens_version"] = json.dumps(__version__)
    tensors = {"sum": moment.sum.detach().cpu().contiguous()}
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
        return {key: json.loads(value) for key, value in raw.items()}
    except (SafetensorError, OSError, ValueError) as error:
        raise KisError(f"covariance cache {path} is corrupt or truncated ({error}); delete it and rerun `kis cache-cov`") from None


def load_second_moment(path: str | Path, expect: dict[str, Any] | None = None) -> tuple[SecondMoment, dict[str, Any]]:
    """Return the saved accumulator and metadata; refuse a cache whose metadata disagrees with expect."""
    metadata = read_metadata(path)
    for key, wanted in (expect or {}).items():
        if key in metadata and metadata[key] != wanted:
            raise KisError(
                f"covariance cache {path} was made for {key}={metadata[key]!r}, not {wanted!r}; "
                "point --output_dir elsewhere or delete the cache to recompute it"
            )
    try:
        total = load_file(str(path))["sum"]
    except (SafetensorError, OSError, KeyError) as error:
        raise KisError(f"covariance cache {path} is corrupt or truncated ({error}); delete it and rerun `kis cache-cov`") from None
    if total.ndim != 2 or total.shape[0] != total.shape[1] or not torch.isfinite(total).all():
        raise KisError(f"covariance cache {path} holds no valid square matrix; delete it and rerun `kis cache-cov`")
    return SecondMoment.from_state(total, int(metadata["count"])), metadata
