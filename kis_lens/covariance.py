"""Estimate every requested layer's MLP-input second moment C = E[k kᵀ] from one forward pass per batch.

``estimate_second_moments`` is the in-memory estimator; ``accumulate_batches`` its loop, which the
resumable disk job in ``kis_lens.cache_job`` (``kis cache-cov``) drives too.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Literal, Sequence

import torch
from tqdm.auto import tqdm

from kis_lens.errors import KisError
from kis_lens.hooks import run_mlp_hooks, validate_layers
from kis_lens.models import HookedModel, model_device, resolve_prepend_bos
from kis_lens.stats import NonFiniteBatch, SecondMoment
from kis_lens.tokens import TokenBatch, token_batches

# Batches pack (and checkpoint) by --batch_token, n_ctx by default, but on a CPU a forward over 8,192 tokens
# pushes its activations out of cache and the elementwise ops turn memory-bound. So a CPU runs each batch as
# row groups of this many tokens: SmolLM2's covariance at its default batch_token went from 359 to 478 tok/s
# (benchmarks/covariance.py; 1,024–4,096 were within noise of each other).
CPU_FORWARD_TOKENS = 2048


TextIndex = Callable[[TokenBatch, int], int]


def stream_index(batch: TokenBatch, row: int) -> int:
    """Return the index, in the stream given to token_batches, of a batch row's text."""
    return batch.window_start + batch.text_offsets[row]


def check_batch_token(batch_token: int | None, n_ctx: int) -> int:
    """Return the tokens per forward batch (n_ctx when None); KisError when one sequence would not fit."""
    if batch_token is None:
        return n_ctx
    if batch_token < n_ctx:
        raise KisError(
            f"--batch_token {batch_token} is smaller than one sequence (the model's context, n_ctx={n_ctx} tokens): "
            f"longer texts would be cut to {batch_token} tokens and C would describe only their beginnings; "
            f"use --batch_token {n_ctx} or more (short texts share a batch)"
        )
    return batch_token


def _nonfinite_rows(activation: torch.Tensor, keep: torch.Tensor) -> list[int]:
    """Return the batch rows with a NaN or inf at one of their real (unpadded) tokens."""
    bad = ~torch.isfinite(activation).all(dim=-1) & keep
    return bad.any(dim=-1).nonzero().flatten().tolist()


def _probe_nonfinite(
    model: HookedModel, tokens: torch.Tensor, mask: torch.Tensor, layers: list[int], keep: torch.Tensor
) -> list[int]:
    """Return the rows with a NaN or inf at any requested layer (one extra forward, nothing accumulated)."""
    bad: set[int] = set()
    run_mlp_hooks(model, tokens, layers, lambda _, activation: bad.update(_nonfinite_rows(activation, keep)), mask)
    return sorted(bad)


def forward_row_groups(batch: TokenBatch, group_tokens: int | None) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Return [(first row, tokens, mask)]: the batch's rows in consecutive groups of ≤ group_tokens padded tokens.

    Rows come longest first, so each group is trimmed to its first row's length: less padding, same real tokens.
    A row longer than group_tokens forms its own group. None keeps the batch whole.
    """
    if group_tokens is None:
        return [(0, batch.tokens, batch.attention_mask)]
    lengths = batch.attention_mask.sum(dim=1).tolist()
    groups, first = [], 0
    while first < len(lengths):
        width = max(int(lengths[first]), 1)
        stop = first + max(1, group_tokens // width)
        groups.append((first, batch.tokens[first:stop, :width], batch.attention_mask[first:stop, :width]))
        first = stop
    return groups


def accumulate_batches(
    model: HookedModel,
    batches: Iterable[TokenBatch],
    moments: dict[int, SecondMoment],
    text_index: TextIndex = stream_index,
    skip_nonfinite: bool = False,
    skipped: list[int] | None = None,
    group_tokens: int | Literal["auto"] | None = "auto",
) -> Iterator[TokenBatch]:
    """Run each batch through the model once, add every layer's real-token rows, and yield the batch when done.

    A NaN or inf in a text's activations stops the job with a KisError naming the text (text_index gives
    its number in the corpus). With skip_nonfinite each batch is first probed by an extra forward and
    such texts are left out of every layer and appended to skipped. group_tokens splits each batch's
    forward into row groups of that many tokens ("auto": CPU_FORWARD_TOKENS on a CPU, whole batches elsewhere).
    """
    layers = sorted(moments)
    device = model_device(model)
    if group_tokens == "auto":
        group_tokens = CPU_FORWARD_TOKENS if device.type == "cpu" else None

    def add_rows(batch: TokenBatch, first: int, tokens: torch.Tensor, mask: torch.Tensor) -> None:
        keep = mask.to(device).bool()
        if skip_nonfinite:
            bad = _probe_nonfinite(model, tokens, mask, layers, keep)
            keep[bad] = False
            if skipped is not None:
                skipped.extend(text_index(batch, first + row) for row in bad)
        if not keep.any():
            return
        unpadded = bool(keep.all())

        def accumulate(layer: int, activation: torch.Tensor) -> None:
            # Padding positions never enter the statistics; rows without padding need no copy.
            rows = activation.reshape(-1, activation.shape[-1]) if unpadded else activation[keep]
            try:
                moments[layer].update(rows)  # upcasts fp16/bf16 rows to float32 before any product
            except NonFiniteBatch:
                # Finite activations whose float32 products overflow name every text of the group.
                suspects = _nonfinite_rows(activation, keep) or keep.any(dim=-1).nonzero().flatten().tolist()
                texts = sorted(text_index(batch, first + row) for row in suspects)
                raise KisError(
                    f"NaN or inf in the layer-{layer} MLP activations of corpus text(s) {texts[:10]} "
                    f"(numbered from 0): the model overflowed on them (or their float32 products did). Run it in "
                    "float32 or bfloat16 (--dtype), or pass --skip_nonfinite to leave such texts out and count them"
                ) from None

        run_mlp_hooks(model, tokens, layers, accumulate, attention_mask=mask)

    for batch in batches:
        if batch.n_tokens:
            for first, tokens, mask in forward_row_groups(batch, group_tokens):
                add_rows(batch, first, tokens, mask)
        yield batch


def estimate_second_moments(
    model: HookedModel,
    texts: Iterable[str],
    layers: Sequence[int],
    batch_token: int | None = None,
    max_tokens: int | None = None,
    prepend_bos: bool | None = None,
    accumulate_on: str | torch.device | None = None,
    progress: bool = True,
    skip_nonfinite: bool = False,
    skipped: list[int] | None = None,
) -> dict[int, SecondMoment]:
    """Return {layer: SecondMoment} over the texts' real (unpadded) tokens, all layers from the same forward."""
    layers = validate_layers(model, layers)
    n_ctx = int(model.cfg.n_ctx)
    batch_token = check_batch_token(batch_token, n_ctx)
    prepend_bos = resolve_prepend_bos(model, prepend_bos)
    device = accumulate_on or model_device(model)
    moments = {layer: SecondMoment(int(model.cfg.d_mlp), device=device) for layer in layers}
    bar = tqdm(total=max_tokens, unit="tok", desc="second moments", disable=not progress, dynamic_ncols=True)
    seen_tokens = 0
    batches = token_batches(model.tokenizer, texts, n_ctx, batch_token, prepend_bos)
    for batch in accumulate_batches(model, batches, moments, skip_nonfinite=skip_nonfinite, skipped=skipped):
        seen_tokens += batch.n_tokens
        bar.update(batch.n_tokens)
        if max_tokens is not None and seen_tokens >= max_tokens:
            break
    bar.close()
    if seen_tokens == 0:
        raise KisError("the corpus gave no tokens: it is empty, or every text was empty after tokenization")
    return moments
