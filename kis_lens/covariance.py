"""Estimate every requested layer's MLP-input second moment C = E[k kᵀ] from one forward pass per batch."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from kis_lens.corpus import token_batches
from kis_lens.errors import KisError
from kis_lens.hooks import run_mlp_hooks, validate_layers
from kis_lens.models import model_device, tokenizer_adds_bos
from kis_lens.stats import SecondMoment


def estimate_second_moments(
    model: Any,
    texts: Iterable[str],
    layers: Sequence[int],
    batch_token: int | None = None,
    max_tokens: int | None = None,
    prepend_bos: bool | None = None,
    accumulate_on: str | torch.device | None = None,
    progress: bool = True,
) -> dict[int, SecondMoment]:
    """Return {layer: SecondMoment} over the texts' real (unpadded) tokens, all layers from the same forward."""
    layers = validate_layers(model, layers)
    n_ctx = int(model.cfg.n_ctx)
    batch_token = batch_token or n_ctx
    prepend_bos = tokenizer_adds_bos(model) if prepend_bos is None else prepend_bos
    device = accumulate_on or model_device(model)
    d_mlp = int(model.cfg.d_mlp)
    moments = {layer: SecondMoment(d_mlp, device=device) for layer in layers}
    bar = tqdm(total=max_tokens, unit="tok", desc="second moments", disable=not progress, dynamic_ncols=True)
    seen_tokens = 0
    for batch in token_batches(model.tokenizer, texts, n_ctx, batch_token, prepend_bos):
        keep = batch.attention_mask.bool().to(model_device(model))

        def accumulate(layer: int, activation: torch.Tensor) -> None:
            moments[layer].update(activation[keep])

        run_mlp_hooks(model, batch.tokens, layers, accumulate, attention_mask=batch.attention_mask)
        seen_tokens += batch.n_tokens
        bar.update(batch.n_tokens)
        if max_tokens is not None and seen_tokens >= max_tokens:
            break
    bar.close()
    if seen_tokens == 0:
        raise KisError("the corpus gave no tokens: it is empty, or every text was empty after tokenization")
    return moments
