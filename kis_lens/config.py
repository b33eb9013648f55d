"""Settings of the jobs: blocks of settings, each declared once, that the job configs are composed of.

A block is a frozen dataclass of the settings one concern needs: ``ModelOptions`` (model, device, dtype, output
folder, progress; every block builds on it), ``LayerOptions``, ``FactOptions`` (the facts and their sample's seed),
``CorpusOptions`` (the corpus C is estimated on and whether BOS precedes its texts: what the covariance job reads)
and ``CacheOptions`` (how the cache job stores and checkpoints it). A job config inherits the blocks it honours in
full (``RunConfig``, ``CacheCovConfig``), takes single settings of another block with ``borrow``, restates a default
with ``with_defaults`` and may nest a block whole as one field (the editing jobs' ``value_search``), so every setting
is declared once; ``block_of`` projects a config onto a block. A config holds only the settings its job honours: one
it cannot run is left out (and so gets no flag), never inherited and then refused. That machinery is
kis_lens.blocks'. Each field carries its CLI help (and choices) as metadata:
``kis_lens.flags`` builds the flags from the fields and parses them back. ``__post_init__`` refuses settings no job
can run, with a ``KisError`` naming the problem and the fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from kis_lens.blocks import ValueAlias, at_least, check_finite_settings, setting
from kis_lens.corpus import CORPUS_ORDERS, DEFAULT_SHUFFLE_BUFFER, EMBEDDED_CORPUS, WIKIPEDIA_CONFIG
from kis_lens.errors import KisError
from kis_lens.facts import DEFAULT_FACTS, DEFAULT_RECORD_SIZE
from kis_lens.io import check_writable, check_writable_file
from kis_lens.keys import TOKEN_POSITIONS
from kis_lens.models import DEFAULT_MODEL, DTYPES
from kis_lens.storage import DEFAULT_STATS_DTYPE, STATS_DTYPES

# "mix" is the original scripts' name for known and unknown together: the same facts as "all", named "mix".
KNOWLEDGE_TYPES: tuple[str, ...] = ("known", "unknown", "all", "mix")
FACT_ORDERS: tuple[str, ...] = ("sample", "first")
LAYOUTS: tuple[str, ...] = ("kis", "original")
DEFAULT_OUTPUT_DIR = "results"  # where every job writes unless --output_dir says otherwise, and where kis report looks
# Settings and command options that name where a job writes, and whether each is a folder or a file: their
# folders are checked for writability before any compute (check_outputs). A new output setting adds its name.
# stats_dir is not one: a folder of finished caches may be read-only, and the cache job checks it before computing.
OUTPUT_OPTIONS: dict[str, str] = {
    "output_dir": "folder",
    "docs_dir": "folder",
    "figures_dir": "folder",
    "doc_path": "file",
    "numbers_path": "file",
    "output": "file",
}


def check_outputs(values: Mapping[str, Any]) -> None:
    """Raise KisError, before any compute, for an output folder or file (OUTPUT_OPTIONS) that cannot be written.

    values maps option names to paths (a config's fields or a command's parsed options); None and absent
    options are skipped. A folder must exist or be creatable, and be writable (kis_lens.io.check_writable).
    """
    for name, kind in OUTPUT_OPTIONS.items():
        value = values.get(name)
        if value is None or value == "":
            continue
        if kind == "folder":
            check_writable(Path(value), f"--{name}")
        else:
            check_writable_file(Path(value), f"--{name}")


def parse_bytes(text: str | int | None) -> int | None:
    """Return a byte count from "30GB", "512MiB", "2e9" or an int (None stays None)."""
    if text is None or isinstance(text, int):
        return text
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
    units.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
    stripped = text.strip().lower().replace(" ", "")
    number = stripped.rstrip("abgikmt")
    unit = stripped[len(number) :]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise KisError(f"cannot read {text!r} as a memory size: write e.g. 30GB, 512MiB or 2e9") from None
    if value <= 0:
        raise KisError(f"memory size {text!r} must be positive")
    return int(value)


@dataclass(frozen=True)
class ModelOptions:
    """The settings every job shares: which model, where it runs, in what dtype, and where results go."""

    HELP_GROUP = "model and output"  # the --help section of its flags (kis_lens.flags)

    model_name: str = setting(DEFAULT_MODEL, "alias, hub name or local dir")
    device: str | None = setting(None, "cpu or cuda", none="cuda when available")
    # None: float32 when loading by name; a model object passed in keeps its own dtype.
    # --precision: Cache_Cov.py's flag (float64/float32/float16); there it cast the activations before the
    # sums, here it is the model's dtype: kis always adds float32 activations into float64 totals.
    dtype: str | None = setting(
        None,
        "model dtype; statistics stay float32/64",
        choices=sorted(DTYPES),
        none="float32",
        aliases=("precision",),
    )
    output_dir: str = setting(DEFAULT_OUTPUT_DIR, "where caches and results go")
    progress: bool = setting(True, "progress bars")

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise KisError(f"model_name must be a model name, alias or local directory, not {self.model_name!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise KisError(f"unknown dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        # CorpusOptions declares prepend_bos; the jobs that tokenize prompts but read no corpus borrow it.
        if getattr(self, "prepend_bos", None) not in (None, True, False):
            raise KisError(f"prepend_bos must be True, False or None (auto), not {self.prepend_bos!r}")
        # Before any subclass's own checks (a nested block, such as ValueSearch, checked its own on construction);
        # a subclass that says more about a NaN (RunConfig's ridge) checks it before this.
        check_finite_settings(self)

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class LayerOptions(ModelOptions):
    """Which layers a job covers."""

    HELP_GROUP = "layers"  # the --help section of its flags (kis_lens.flags)

    start_layer: int | None = setting(None, "first layer", none="0")
    end_layer: int | None = setting(None, "last layer, inclusive", none="the last")


@dataclass(frozen=True)
class FactOptions(ModelOptions):
    """Which facts a job reads keys of, and where in the prompt."""

    HELP_GROUP = "facts"  # the --help section of its flags (kis_lens.flags)

    facts: str = setting(
        DEFAULT_FACTS,
        "counterfact-known, counterfact-extended (1,599), known-1000 or a JSON/JSONL path",
        value_aliases=(
            ValueAlias(
                "ds_name",
                {"counterfact": DEFAULT_FACTS},
                f"the original's dataset: counterfact = --facts {DEFAULT_FACTS} (its 436 known facts)",
            ),
        ),
    )
    record_size: int = setting(DEFAULT_RECORD_SIZE, "number of facts sampled")
    knowledge_type: str = setting(
        "known",
        "which facts; mix = known and unknown together, the same facts as all, named mix_sample_size_N "
        "as in the original",
        choices=KNOWLEDGE_TYPES,
    )
    fact_order: str = setting(
        "sample",
        "which record_size facts: sample = a seeded sample, first = the file's first ones in order (the original's)",
        choices=FACT_ORDERS,
    )
    seed: int = setting(0, "random seed of the fact sample")
    token_position: str = setting(
        "subject_last",
        "where keys are read",
        choices=TOKEN_POSITIONS,
        aliases=("fact_token",),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.knowledge_type not in KNOWLEDGE_TYPES:
            raise KisError(f"unknown knowledge_type {self.knowledge_type!r}: use one of {', '.join(KNOWLEDGE_TYPES)}")
        if self.token_position not in TOKEN_POSITIONS:
            raise KisError(f"unknown token_position {self.token_position!r}: use one of {', '.join(TOKEN_POSITIONS)}")
        if self.fact_order not in FACT_ORDERS:
            raise KisError(f"unknown fact_order {self.fact_order!r}: use one of {', '.join(FACT_ORDERS)}")
        at_least("record_size", self.record_size, 1)


@dataclass(frozen=True)
class CorpusOptions(ModelOptions):
    """The corpus C = E[k kᵀ] is estimated on, its sample and token budget, batching and where its caches live."""

    HELP_GROUP = "corpus (for C)"  # the --help section of its flags (kis_lens.flags)

    corpus: str = setting(
        EMBEDDED_CORPUS,
        f"corpus for C: {EMBEDDED_CORPUS} or a .txt/.jsonl file",
        value_aliases=(
            ValueAlias(
                "download",
                {"0": None, "1": "wikipedia"},
                "the original Cache_Cov.py's --download 0|1: 1 (or a bare --download) streams --corpus wikipedia "
                "from the hub when no --corpus is given; 0 changes nothing",
                bare="1",
            ),
            ValueAlias(
                "dataset",
                {"wikipedia": "wikipedia"},
                "the original Cache_Cov.py's --dataset, whose only value was wikipedia: = --corpus wikipedia "
                "(--corpus wins when both are given)",
            ),
        ),
    )
    sample_size: int | None = setting(
        None, "number of corpus texts (all: every text, the original's word)", none="every text", cli_none="all"
    )
    corpus_order: str = setting(
        "first",
        "which corpus texts: first = the first sample_size in the corpus' order; shuffle = a seeded shuffle "
        "(exact for local corpora, buffered for --corpus wikipedia)",
        choices=CORPUS_ORDERS,
    )
    corpus_seed: int = setting(0, "seed of --corpus_order shuffle")
    corpus_buffer: int = setting(DEFAULT_SHUFFLE_BUFFER, "shuffle buffer (texts) of a streamed corpus")
    wikipedia_snapshot: str = setting(WIKIPEDIA_CONFIG, "wikimedia/wikipedia config that --corpus wikipedia streams")
    max_tokens: int | None = setting(100_000, "corpus tokens for C", none="no limit", cli_none=0)
    batch_token: int | None = setting(
        None,
        "tokens per forward batch, padding included (any: the original's word for the default)",
        none="n_ctx",
        cli_none="any",
        aliases=("batch_tokens",),
    )
    # Part of a cache's identity: the covariance job's request (CacheOptions) carries it with the corpus.
    prepend_bos: bool | None = setting(
        None, "BOS before each text (auto: what the model's HF tokenizer does)", none="auto"
    )
    stats_dir: str | None = setting(
        None,
        "folder of the covariance caches (the original's --stats_dir; its .npz caches: kis import-stats)",
        none="{output_dir}/stats",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stats_dir is not None and (not isinstance(self.stats_dir, (str, Path)) or not str(self.stats_dir)):
            raise KisError(f"stats_dir must be a folder path, not {self.stats_dir!r}: e.g. --stats_dir data/stats")
        at_least("sample_size", self.sample_size, 1, none_means="every text")
        at_least("max_tokens", self.max_tokens, 1, none_means="no limit")
        at_least("batch_token", self.batch_token, 1, none_means="n_ctx")
        if self.corpus_order not in CORPUS_ORDERS:
            raise KisError(f"unknown corpus_order {self.corpus_order!r}: use one of {', '.join(CORPUS_ORDERS)}")
        at_least("corpus_seed", self.corpus_seed, 0)
        at_least("corpus_buffer", self.corpus_buffer, 1)


@dataclass(frozen=True)
class CacheOptions(CorpusOptions):
    """The covariance job's request: the corpus block, then how the caches are stored, checkpointed and bounded."""

    HELP_GROUP = "covariance cache"  # the --help section of its flags (kis_lens.flags)

    stats_dtype: str = setting(
        DEFAULT_STATS_DTYPE,
        "dtype of the stored statistic (float64 stores the exact sum; float32 rounds C)",
        choices=sorted(STATS_DTYPES),
        value_aliases=(
            ValueAlias(
                "to_collect",
                {"mom2": None},
                "the original Cache_Cov.py's statistics to collect: mom2, the only one kis collects",
                refusal="kis collects only mom2 (the uncentered second moment)",
            ),
        ),
    )
    checkpoint_every: int | None = setting(
        5_000_000, "tokens between resumable checkpoints", none="no checkpoints", cli_none=0
    )  # 0 and None both mean never
    max_memory: int | None = setting(
        None,
        "memory for the accumulators, e.g. 24GB: more layers than fit → several passes",
        none="no bound",
        parse=parse_bytes,
    )
    sort_window: int = setting(1024, "texts sorted by length together, so batches pad little")
    skip_nonfinite: bool = setting(
        False, "leave out and count texts whose activations hold NaN/inf (default: stop and name the text)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        # The stats dtype is checked by the cache's key (kis_lens.storage), before anything is written.
        at_least("checkpoint_every", self.checkpoint_every, 0, none_means="no checkpoints")
        at_least("max_memory", self.max_memory, 1, none_means="no bound")
        at_least("sort_window", self.sort_window, 1)


@dataclass(frozen=True)
class RunConfig(CorpusOptions, FactOptions, LayerOptions):
    """Every setting of a matrices run (``kis all``): the model, layer, fact and corpus blocks, then its own."""

    layout: str = setting(
        "kis",
        "per-layer .npy paths: kis = model short name, real position in the name; original = the original "
        "scripts' exact paths (model folder as they named it, e.g. EleutherAI/pythia-1b; file says subject_last)",
        choices=LAYOUTS,
    )
    ridge: float = setting(0.0, "add ridge·mean(diag C)·I to C before solving")

    def __post_init__(self) -> None:
        if not self.ridge >= 0:  # also refuses NaN; before the generic finite check, whose message says less
            raise KisError(f"ridge must be zero or positive, not {self.ridge}: e.g. --ridge 1e-6")
        super().__post_init__()
        if self.layout not in LAYOUTS:
            raise KisError(f"unknown layout {self.layout!r}: use one of {', '.join(LAYOUTS)}")


@dataclass(frozen=True)
class CacheCovConfig(CacheOptions, LayerOptions):
    """Every setting of ``kis cache-cov``: the layers, and the covariance job's request."""
