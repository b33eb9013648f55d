"""Settings of the jobs: blocks of settings, each declared once, that the job configs are composed of.

A block is a frozen dataclass of the settings one concern needs: ``ModelOptions`` (model, device, dtype, output
folder, progress; every block builds on it), ``LayerOptions``, ``FactOptions`` (the facts and their sample's seed),
``CorpusOptions`` (the corpus C is estimated on and whether BOS precedes its texts: what the covariance job reads)
and ``CacheOptions`` (how the cache job stores and checkpoints it). A job config inherits the blocks it honours in
full (``RunConfig``, ``CacheCovConfig``), takes single settings of another block with ``borrow`` and restates a
default with ``with_defaults``, so every setting is declared once and scripts still construct configs with flat
keywords; ``block_of`` projects a config onto a block. A config holds only the settings its job honours: one it
cannot run is left out (and so gets no flag), never inherited and then refused.
Each field carries its CLI help (and choices) as metadata: ``kis_lens.flags`` builds the flags from the fields and
parses them back. ``__post_init__`` refuses settings no job can run, with a ``KisError`` naming the problem and the fix.
"""

from __future__ import annotations

import functools
import math
import numbers
import typing
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

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


@dataclass(frozen=True)
class ValueAlias:
    """A flag of the original scripts that sets a setting through a table of its own values."""

    name: str  # the flag without dashes, e.g. "ds_name"
    values: Mapping[str, Any]  # flag value -> setting value (None: the setting is left as it is)
    help: str
    bare: str | None = None  # the value a bare flag stands for (e.g. --download = --download 1)
    refusal: str | None = None  # why a value outside the table is refused (None: the table's values are listed)


def setting(
    default: Any,
    help: str,
    *,
    choices: Sequence[str] | None = None,
    none: str | None = None,
    cli_none: Any = None,
    aliases: Sequence[str] = (),
    value_aliases: Sequence[ValueAlias] = (),
    infinite: str | None = None,
    parse: Callable[[str], Any] | None = None,
) -> Any:
    """Return a dataclass field with its CLI help as metadata.

    choices: the values the CLI accepts; none: what a None default means, shown in --help;
    cli_none: the CLI value that stands for None (e.g. 0 for "no token limit", or a word such as "all" that an int
        flag then accepts besides numbers: kis_lens.cli reads it, nothing else);
    aliases: other names of the same flag (the original scripts' spellings, e.g. "fact_token");
    value_aliases: the original scripts' flags that set this setting through a table of their values;
    infinite: what inf means for a float setting that accepts it (every other float setting must be finite);
    parse: turns the flag's text into the value (e.g. parse_bytes for "24GB"), raising KisError on bad text.
    """
    metadata: dict[str, Any] = {"help": help}
    if aliases:
        metadata["aliases"] = tuple(aliases)
    if value_aliases:
        metadata["value_aliases"] = tuple(value_aliases)
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if none is not None:
        metadata["none"] = none
    if cli_none is not None:
        metadata["cli_none"] = cli_none
    if infinite is not None:
        metadata["infinite"] = infinite
    if parse is not None:
        metadata["parse"] = parse
    return field(default=default, metadata=metadata)


def at_least(name: str, value: int | None, minimum: int, none_means: str | None = None) -> None:
    """Raise KisError unless value is an int >= minimum (or None where none_means says what None does)."""
    if value is None and none_means is not None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fix = f" (or None for {none_means})" if none_means is not None else ""
        raise KisError(f"{name} must be at least {minimum}{fix}, not {value!r}: pass --{name} {minimum} or more")


@functools.cache
def _float_fields(config_class: type) -> tuple[tuple[Field, bool], ...]:
    """Return (field, whether None is allowed) of each float or float | None field of a config dataclass."""
    hints = typing.get_type_hints(config_class)
    found = []
    for item in fields(config_class):
        args = typing.get_args(hints[item.name]) or (hints[item.name],)
        if [arg for arg in args if arg is not type(None)] == [float]:
            found.append((item, type(None) in args))
    return tuple(found)


def check_finite_settings(config: Any) -> None:
    """Raise KisError for a float setting of config that is NaN, inf (unless its field accepts inf) or no number.

    Every float field is checked, so a new setting is covered without a line of its own; None passes where the
    annotation allows it, and a field declared with ``setting(..., infinite=...)`` takes inf.
    """
    for item, optional in _float_fields(type(config)):
        value = getattr(config, item.name)
        if value is None and optional:
            continue
        number = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
        if number and (math.isfinite(value) or "infinite" in item.metadata):
            continue
        if item.default is None or item.default is MISSING:
            fix = f"leave --{item.name} out for {item.metadata.get('none', 'its default')}, or give a number"
        else:
            fix = f"e.g. --{item.name} {item.default} (its default)"
        kind = "a number" if "infinite" in item.metadata else "a finite number"
        raise KisError(f"--{item.name} must be {kind}, not {value!r}: {fix}")


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


_BLOCKS_DEFAULT: Any = object()  # an Override that changes only the help keeps the block's default


@dataclass(frozen=True)
class Override:
    """A restated setting's new default (unless only its help changes) and its help for this job (None: the block's).

    section: the --help section it is listed in for this job (None: its block's HELP_GROUP), for a setting borrowed
    from a block whose section would mislead there (BOS of a job that reads no corpus).
    """

    default: Any = _BLOCKS_DEFAULT
    help: str | None = None
    none: str | None = None
    section: str | None = None


Block = TypeVar("Block")


def _restate(cls: type, source: Field, change: Any) -> None:
    """Give cls its own copy of a block's field, with another default and help, before @dataclass reads cls."""
    override = change if isinstance(change, Override) else Override(change)
    metadata = dict(source.metadata)
    changes = (("help", override.help), ("none", override.none), ("section", override.section))
    metadata.update({key: value for key, value in changes if value})
    own = dict(cls.__dict__.get("__annotations__", {}))
    # An inherited field keeps its place in the field order; a borrowed one comes before the class's own fields.
    cls.__annotations__ = {source.name: source.type, **own}
    default = source.default if override.default is _BLOCKS_DEFAULT else override.default
    setattr(cls, source.name, field(default=default, metadata=metadata))
    cls.__restated__ = (*cls.__dict__.get("__restated__", ()), source.name)


def with_defaults(**defaults: Any) -> Callable[[type], type]:
    """Class decorator (below @dataclass): restate inherited settings with this job's defaults (or Override)."""

    def decorate(cls: type) -> type:
        for name, change in defaults.items():
            owners = [base for base in cls.__mro__[1:] if name in getattr(base, "__dataclass_fields__", {})]
            if not owners:
                raise TypeError(f"{cls.__name__} inherits no setting {name!r} to give another default")
            _restate(cls, owners[0].__dataclass_fields__[name], change)
        return cls

    return decorate


def borrow(block: type, *names: str, **defaults: Any) -> Callable[[type], type]:
    """Class decorator (below @dataclass): take single settings of a block the job does not honour in full.

    names keep the block's default; keyword names take this job's default (a value, or an Override).
    """

    def decorate(cls: type) -> type:
        for name in reversed((*names, *defaults)):  # each goes first: reversed, they keep the order given
            if name not in block.__dataclass_fields__:
                raise TypeError(f"{block.__name__} has no setting {name!r} for {cls.__name__} to borrow")
            _restate(cls, block.__dataclass_fields__[name], defaults.get(name, Override()))
        cls.__borrowed__ = {**cls.__dict__.get("__borrowed__", {}), **dict.fromkeys((*names, *defaults), block)}
        return cls

    return decorate


def field_kind(hint: Any) -> tuple[type, bool]:
    """Return (base type, whether None is allowed) of a field annotation such as ``int | None``."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        (hint,) = [arg for arg in args if arg is not type(None)]
    return typing.get_origin(hint) or hint, optional


def field_kinds(config_class: type) -> dict[str, tuple[type, bool]]:
    """Return {setting: (base type, whether None is allowed)} of every field of a config class."""
    hints = typing.get_type_hints(config_class)
    return {item.name: field_kind(hints[item.name]) for item in fields(config_class)}


def help_groups(config_class: type) -> dict[str, str | None]:
    """Return every setting's --help section: its block's HELP_GROUP (a borrowed one's too, unless its Override names
    a section); None for a job's own."""
    return {
        item.name: item.metadata.get("section") or _help_group(config_class, item.name) for item in fields(config_class)
    }


def _help_group(config_class: type, name: str) -> str | None:
    for cls in config_class.__mro__:
        if name in vars(cls).get("__borrowed__", {}):
            return _help_group(vars(cls)["__borrowed__"][name], name)
    for cls in reversed(config_class.__mro__):  # the block that first declares it, before a job that restates it
        if name in vars(cls).get("__annotations__", {}) and "HELP_GROUP" in vars(cls):
            return vars(cls)["HELP_GROUP"]
    return None


def block_of(config: Any, block: type[Block]) -> Block:
    """Return the block's settings as config has them; settings config lacks keep the block's defaults."""
    return block(**{item.name: getattr(config, item.name) for item in fields(block) if hasattr(config, item.name)})


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
        # Before any subclass's own checks, which may build objects (ValueSearch) that would blame a NaN on
        # the wrong name; a subclass that says more about a NaN (RunConfig's ridge) checks it before this.
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
