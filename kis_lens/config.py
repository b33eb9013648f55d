"""Settings of a run: one frozen dataclass that the CLI fills, scripts construct and results record."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kis_lens.corpus import EMBEDDED_CORPUS
from kis_lens.facts import DEFAULT_FACTS, DEFAULT_RECORD_SIZE
from kis_lens.models import DEFAULT_MODEL

KNOWLEDGE_TYPES: tuple[str, ...] = ("known", "unknown", "all")
DEFAULT_MAX_TOKENS = 100_000


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run; the CLI fills it, scripts construct it, results record it."""

    model_name: str = DEFAULT_MODEL
    start_layer: int | None = None
    end_layer: int | None = None
    facts: str = DEFAULT_FACTS
    record_size: int = DEFAULT_RECORD_SIZE
    knowledge_type: str = "known"
    token_position: str = "subject_last"
    prepend_bos: bool | None = None
    seed: int = 0
    device: str | None = None
    dtype: str | None = None  # None: float32 when loading by name; a model passed in keeps its own
    output_dir: str = "results"
    corpus: str = EMBEDDED_CORPUS
    sample_size: int | None = None
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    batch_token: int | None = None
    ridge: float = 0.0
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-ready dict."""
        return asdict(self)
