"""Helpers for tests, tutorials and benchmarks: the tiny offline models (kis_lens.tiny) and real text samples."""

from __future__ import annotations

from kis_lens.corpus import embedded_wikipedia_texts
from kis_lens.tiny import TINY_TOKENIZER_DIR, tiny_config_kwargs, tiny_hooked_transformer, tiny_model, tiny_tokenizer

__all__ = [
    "TINY_TOKENIZER_DIR",
    "embedded_sample_texts",
    "tiny_config_kwargs",
    "tiny_hooked_transformer",
    "tiny_model",
    "tiny_tokenizer",
]


def embedded_sample_texts(n: int = 64, min_chars: int = 200) -> list[str]:
    """Return n real Wikipedia lead sections from the embedded corpus (deterministic order)."""
    texts = [t for t in embedded_wikipedia_texts() if len(t) >= min_chars]
    return texts[:n]
