"""Write an edit into a layer's MLP output weight W_out, and take it out again.

Every editor of kis_lens.editing.editors returns a float64 delta ΔW [d_mlp, d_model]; nothing touches the model
until ``apply_delta`` / ``applied_delta``. W_out's accessor (``OutputWeight``, ``output_weight``) lives in
kis_lens.w_out.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from jaxtyping import Float
from torch import Tensor

from kis_lens.errors import KisError
from kis_lens.models import HookedModel
from kis_lens.w_out import output_weight


def apply_delta(
    model: HookedModel, layer: int, delta: Float[Tensor, "d_mlp d_model"]
) -> Float[Tensor, "d_mlp d_model"]:
    """Add ΔW to the layer's W_out in place (summed in float64); return the original weight for restoring."""
    handle = output_weight(model, layer)
    original = handle.read()
    if tuple(delta.shape) != tuple(original.shape):
        raise KisError(f"delta has shape {tuple(delta.shape)}, expected [d_mlp, d_model] = {tuple(original.shape)}")
    handle.write(original + delta.to(device=original.device, dtype=torch.float64))
    return original


@contextlib.contextmanager
def applied_delta(model: HookedModel, layer: int, delta: Float[Tensor, "d_mlp d_model"]) -> Iterator[HookedModel]:
    """Context manager yielding the model with W_out += ΔW in the block, restoring the exact original bits on exit."""
    handle = output_weight(model, layer)
    saved = handle.weight.detach().clone()  # the stored bits, not a float64 round trip
    try:
        apply_delta(model, layer, delta)
        yield model
    finally:
        with torch.no_grad():
            handle.weight.copy_(saved)
