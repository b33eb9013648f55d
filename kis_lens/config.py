"""Settings of the jobs: frozen dataclasses that the CLI fills, scripts construct and results record.

Every job config inherits ``ModelOptions`` (model, device, dtype, BOS, output folder, seed, progress), so
those defaults live here once. Each field carries its CLI help (and choices) as metadata:
``kis_lens.cli.add_config_flags`` builds the flags from the fields and ``config_from_args`` parses them
back, so a default is written in exactly one place. ``__post_init__`` refuses settings no job can run,
with a ``KisError`` naming the problem and the fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from kis_lens.corpus import EMBEDDED_CORPUS
from kis_lens.errors import KisError
from kis_lens.facts import DEFAULT_FACTS, DEFAULT_RECORD_SIZE
from kis_lens.keys import TOKEN_POSITIONS
from kis_lens.models import DEFAULT_MODEL, DTYPES

KNOWLEDGE_TYPES: tuple[str, ...] = ("known", "unknown", "all")
DEFAULT_MAX_TOKENS = 100_000


def setting(
    default: Any,
    help: str,
    *,
    choices: Sequence[str] | None = None,
    none: str | None = None,
    cli_none: Any = None,
) -> Any:
    """Return a dataclass field with its CLI help as metadata.

    choices: the values the CLI accepts; none: what a None default means, shown in --help;
    cli_none: the CLI value that stands for None (e.g. 0 for "no token limit").
    """
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if none is not None:
        metadata["none"] = none
    if cli_none is not None:
        metadata["cli_none"] = cli_none
    return field(default=default, metadata=metadata)


def at_least(name: str, value: int | None, minimum: int, none_means: str | None = None) -> None:
    """Raise KisError unless value is an int >= minimum (or None where none_means says what None does)."""
    if value is None and none_means is not None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fix = f" (or None for {none_means})" if none_means is not None else ""
        raise KisError(f"{name} must be at least {minimum}{fix}, not {value!r}: pass --{name} {minimum} or more")


@dataclass(frozen=True)
class ModelOptions:
    """The settings every job shares: which model, where it runs, in what dtype, and where results go."""

    model_name: str = setting(DEFAULT_MODEL, "alias, hub name or local dir")
    device: str | None = setting(None, "cpu or cuda", none="cuda when available")
    # None: float32 when loading by name; a model object passed in keeps its own dtype.
    dtype: str | None = setting(None, "model dtype; statistics stay float32/64", choices=sorted(DTYPES), none="float32")
    prepend_bos: bool | None = setting(
        None, "BOS before each text (auto: what the model's HF tokenizer does)", none="auto"
    )
    output_dir: str = setting("results", "where caches and results go")
    seed: int = setting(0, "fact sampling seed")
    progress: bool = setting(True, "progress bars")

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise KisError(f"model_name must be a model name, alias or local directory, not {self.model_name!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise KisError(f"unknown dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.prepend_bos not in (None, True, False):
            raise KisError(f"prepend_bos must be True, False or None (auto), not {self.prepend_bos!r}")

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class RunConfig(ModelOptions):
    """Every setting of a run; the CLI fills it, scripts construct it, results record it."""

    start_layer: int | None = setting(None, "first layer", none="0")
    end_layer: int | None = setting(None, "last layer, inclusive", none="the last")
    facts: str = setting(DEFAULT_FACTS, "counterfact-known, known-1000 or a JSON/JSONL path")
    record_size: int = setting(DEFAULT_RECORD_SIZE, "number of facts sampled")
    knowledge_type: str = setting("known", "which facts", choices=KNOWLEDGE_TYPES)
    token_position: str = setting("subject_last", "where keys are read", choices=TOKEN_POSITIONS)
    corpus: str = setting(EMBEDDED_CORPUS, f"{EMBEDDED_CORPUS} or a .txt/.jsonl file")
    sample_size: int | None = setting(None, "number of corpus texts", none="all")
    max_tokens: int | None = setting(DEFAULT_MAX_TOKENS, "corpus token budget", none="no limit", cli_none=0)
    batch_token: int | None = setting(None, "tokens per forward batch, padding included", none="n_ctx")
    ridge: float = setting(0.0, "add ridge·mean(diag C)·I to C before solving")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.knowledge_type not in KNOWLEDGE_TYPES:
            raise KisError(f"unknown knowledge_type {self.knowledge_type!r}: use one of {', '.join(KNOWLEDGE_TYPES)}")
        if self.token_position not in TOKEN_POSITIONS:
            raise KisError(f"unknown token_position {self.token_position!r}: use one of {', '.join(TOKEN_POSITIONS)}")
        at_least("record_size", self.record_size, 1)
        at_least("sample_size", self.sample_size, 1, none_means="every text")
        at_least("max_tokens", self.max_tokens, 1, none_means="no limit")
        at_least("batch_token", self.batch_token, 1, none_means="n_ctx")
        if not self.ridge >= 0:  # also refuses NaN
            raise KisError(f"ridge must be zero or positive, not {self.ridge}: e.g. --ridge 1e-6")
