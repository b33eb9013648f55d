"""Tell whether a fingerprint recorded in a cache, split or run is a model's: its own, or the older sampled kind.

A model's fingerprint is hashed once, into its ModelInfo (kis_lens.models). Results written before that full-weight
fingerprint recorded a hash of 4,096 sampled W_out entries instead; ``fingerprint_matches`` recognises both, so
callers can re-key such results rather than recompute them.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from kis_lens.models import FINGERPRINT_VERSION, HookedModel, model_info
from kis_lens.w_out import output_weight

LEGACY_FINGERPRINT_SAMPLES = 4096


def legacy_fingerprint(model: HookedModel, n_samples: int = LEGACY_FINGERPRINT_SAMPLES) -> str:
    """Return the fingerprint of kis_lens before 0.x: a hash of the sizes and 4,096 sampled W_out entries.

    Kept only to recognise caches and runs keyed on it, which are re-keyed to the full-weight fingerprint."""
    cfg = model.cfg
    n_layers, d_mlp, d_model, d_vocab = int(cfg.n_layers), int(cfg.d_mlp), int(cfg.d_model), int(cfg.d_vocab)
    per_layer = d_mlp * d_model
    step = max(1, n_layers * per_layer // n_samples)
    flat_indices = torch.arange(0, n_layers * per_layer, step)[:n_samples]
    pieces = []
    for layer in range(n_layers):
        inside = (
            flat_indices[(flat_indices >= layer * per_layer) & (flat_indices < (layer + 1) * per_layer)]
            - layer * per_layer
        )
        if len(inside):
            weight = output_weight(model, layer).view()
            pieces.append(weight[inside // d_model, inside % d_model].cpu())
    sample = torch.cat(pieces).float().half().numpy().tobytes()
    digest = hashlib.sha256()
    digest.update(f"{n_layers}/{d_model}/{d_mlp}/{d_vocab}".encode())
    digest.update(sample)
    return digest.hexdigest()[:16]


def is_legacy_fingerprint(fingerprint: Any) -> bool:
    """Return whether a recorded fingerprint is the older sampled kind (16 hex digits, no version prefix)."""
    return isinstance(fingerprint, str) and len(fingerprint) == 16 and not fingerprint.startswith(FINGERPRINT_VERSION)


def model_fingerprint(model: HookedModel) -> str:
    """Return the recorded hash of the model's sizes and every byte of its weights as loaded (see model_info)."""
    return model_info(model).fingerprint


def fingerprint_matches(recorded: Any, model: HookedModel) -> bool:
    """Return whether a recorded fingerprint is this model's: the full one, or the legacy sampled one (re-key it)."""
    if recorded == model_fingerprint(model):
        return True
    return is_legacy_fingerprint(recorded) and recorded == legacy_fingerprint(model)
