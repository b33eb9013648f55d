"""Token ids from texts: encode with or without BOS, pad to a batch, pack a text stream by a token budget.

Used by the covariance estimator (corpus texts) and by everything that runs fact prompts (keys, classify,
editing); it knows nothing about where texts come from.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from jaxtyping import Int
from torch import Tensor

from kis_lens.errors import KisError


def with_bos(tokenizer: Any, ids: list[int], prepend_bos: bool) -> list[int]:
    """Return ids with the tokenizer's BOS in front when prepend_bos; KisError when it has no BOS token."""
    if not prepend_bos:
        return ids
    if tokenizer.bos_token_id is None:
        raise KisError("prepend_bos is set but the tokenizer has no BOS token: use prepend_bos=False")
    return [tokenizer.bos_token_id, *ids]


def encode(tokenizer: Any, text: str, prepend_bos: bool, max_length: int | None = None) -> list[int]:
    """Return token ids of a text, with BOS prepended or not as asked, truncated to max_length."""
    ids = with_bos(tokenizer, list(tokenizer(text, add_special_tokens=False)["input_ids"]), prepend_bos)
    return ids[:max_length] if max_length else ids


def pad_batch(sequences: list[list[int]], pad_id: int) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Return right-padded tokens and the attention mask (1 for real tokens) for id lists."""
    width = max(len(seq) for seq in sequences)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return tokens, mask


def pad_token_id(tokenizer: Any) -> int:
    """Return the id used for padding (pad, else EOS, else 0): masked out, so its value never matters."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


@dataclass
class TokenBatch:
    """Right-padded token ids, their attention mask, and where they sit in the text stream (for resuming)."""

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    window_start: int = 0  # index (in the stream given) of the first text of this batch's sort window
    index_in_window: int = 0
    window_end: int = 0  # index after the window's last text
    last_in_window: bool = True
    text_offsets: tuple[int, ...] = ()  # each row's text, counted from window_start (empty texts included)

    @property
    def n_tokens(self) -> int:
        """Number of real (unpadded) tokens."""
        return int(self.attention_mask.sum())

    @property
    def n_texts(self) -> int:
        """Number of texts in the batch."""
        return int(self.tokens.shape[0])

    def resume_position(self) -> tuple[int, int]:
        """Return (window_start, batches done in it) to pass to token_batches to continue after this batch."""
        if self.last_in_window:
            return self.window_end, 0
        return self.window_start, self.index_in_window + 1


def _pack_window(window: list[list[int]], batch_token: int) -> list[list[int]]:
    """Return the window's sequence indices packed into batches of ≤ batch_token padded tokens, longest first."""
    # Sorting by length keeps padding near zero while the order stays deterministic (stable sort).
    ordered = sorted(range(len(window)), key=lambda index: len(window[index]), reverse=True)
    batches: list[list[int]] = []
    batch: list[int] = []
    for index in ordered:
        if batch and len(window[batch[0]]) * (len(batch) + 1) > batch_token:
            batches.append(batch)
            batch = []
        batch.append(index)
    if batch:
        batches.append(batch)
    return batches


def token_batches(
    tokenizer: Any,
    texts: Iterable[str],
    max_length: int,
    batch_token: int,
    prepend_bos: bool,
    sort_window: int = 1024,
    start: tuple[int, int] = (0, 0),
) -> Iterator[TokenBatch]:
    """Yield padded batches of at most batch_token tokens (padding included), length-sorted within windows.

    ``texts`` must already begin at text ``start[0]``; the first ``start[1]`` batches of that window are
    skipped, so a run restarted from a batch's ``resume_position()`` continues with the very same batches.
    """
    if batch_token < 1 or max_length < 1:
        raise KisError(f"batch_token ({batch_token}) and max_length ({max_length}) must be positive")
    if sort_window < 1:
        raise KisError(f"sort_window ({sort_window}) must be positive")
    max_length = min(max_length, batch_token)
    pad_id = pad_token_id(tokenizer)
    window_start, skip = start
    iterator = iter(texts)
    while True:
        chunk = list(itertools.islice(iterator, sort_window))
        if not chunk:
            return
        encoded = [
            _truncate(tokenizer, ids, prepend_bos, max_length) for ids in _encode_many(tokenizer, chunk, max_length)
        ]
        # A text that is empty after tokenization adds nothing.
        offsets = [offset for offset, ids in enumerate(encoded) if len(ids) > int(prepend_bos)]
        window = [encoded[offset] for offset in offsets]
        window_end = window_start + len(chunk)
        packed = _pack_window(window, batch_token)
        for index, batch in enumerate(packed):
            if index < skip:
                continue
            tokens, mask = pad_batch([window[row] for row in batch], pad_id)
            rows = tuple(offsets[row] for row in batch)
            yield TokenBatch(tokens, mask, window_start, index, window_end, index == len(packed) - 1, rows)
        if not packed and skip == 0:
            # A window of only empty texts still moves the position, so resuming never rereads it.
            yield TokenBatch(
                torch.zeros(0, 0, dtype=torch.long),
                torch.zeros(0, 0, dtype=torch.long),
                window_start,
                0,
                window_end,
                True,
            )
        window_start, skip = window_end, 0


def _encode_many(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    """Return token ids of many texts at once (fast tokenizers batch this), no special tokens, truncated."""
    encoded = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length)
    return [list(ids) for ids in encoded["input_ids"]]


def _truncate(tokenizer: Any, ids: list[int], prepend_bos: bool, max_length: int) -> list[int]:
    """Return ids with BOS as asked, cut to max_length."""
    return with_bos(tokenizer, ids, prepend_bos)[:max_length]
