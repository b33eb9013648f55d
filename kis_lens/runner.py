"""The jobs behind the CLI, callable from a script: cache covariances, compute keys and the four matrices.

>>> from kis_lens.runner import RunConfig, run_matrices
>>> result = run_matrices(RunConfig(model_name="tiny-gpt2", knowledge_type="all", record_size=16, max_tokens=2000))
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file

from kis_lens import __version__
from kis_lens.corpus import EMBEDDED_CORPUS
from kis_lens.covariance import CacheReport, CovarianceRequest, cache_identity, cache_second_moments
from kis_lens.errors import KisError
from kis_lens.facts import DEFAULT_FACTS, DEFAULT_RECORD_SIZE, Fact, load_facts, sample_facts
from kis_lens.hooks import layer_range
from kis_lens.io import atomic_write, check_writable, save_npy
from kis_lens.keys import compute_keys
from kis_lens.matrices import MATRIX_NAMES, Whitener, activation_cos, all_matrices, q_matrix
from kis_lens.models import DEFAULT_MODEL, load_model, model_fingerprint, model_info, tokenizer_adds_bos
from kis_lens.storage import load_second_moment

# The original scripts' directory name for each matrix.
LEGACY_DIRS: dict[str, str] = {
    "p_matrix": "p_matrix",
    "q_matrix": "q_matrix",
    "whitening_cos": "whitening_cos_matrix",
    "activation_cos": "activation_cos_matrix",
}
KNOWLEDGE_TYPES: tuple[str, ...] = ("known", "unknown", "all")


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
    dtype: str = "float32"
    output_dir: str = "results"
    corpus: str = EMBEDDED_CORPUS
    sample_size: int | None = None
    max_tokens: int | None = 100_000
    batch_token: int | None = None
    ridge: float = 0.0
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-ready dict."""
        return asdict(self)


def select_facts(config: RunConfig, model: Any | None = None) -> list[Fact]:
    """Return the run's seeded sample of facts of the requested knowledge type (known/unknown: per-model split)."""
    if config.knowledge_type not in KNOWLEDGE_TYPES:
        raise KisError(f"unknown knowledge_type {config.knowledge_type!r}: use one of {', '.join(KNOWLEDGE_TYPES)}")
    facts = load_facts(config.facts)
    if config.knowledge_type != "all":
        from kis_lens.classify import ensure_split

        if model is None:
            model = load_model(config.model_name, device=config.device, dtype=config.dtype)
        split, path = ensure_split(
            model, config.facts, config.output_dir, prepend_bos=_resolve_prepend_bos(config, model), progress=config.progress
        )
        facts = split.select(facts, config.knowledge_type)
        if not facts:
            raise KisError(
                f"{split.model_name} has no {config.knowledge_type} facts among the {split.n_facts} of "
                f"{config.facts} (top-{split.top_k}, split in {path}): use --knowledge_type all or another facts file"
            )
    # How many facts a model knows is not the user's choice: use what there is. For "all", sample_facts
    # refuses a record_size beyond the file, as it always did.
    if config.knowledge_type != "all" and config.record_size > len(facts):
        warnings.warn(
            f"only {len(facts)} {config.knowledge_type} facts available for --record_size {config.record_size}: "
            f"using all {len(facts)}",
            stacklevel=2,
        )
        return sample_facts(facts, len(facts), seed=config.seed)
    return sample_facts(facts, config.record_size, seed=config.seed)


def _resolve_prepend_bos(config: RunConfig, model: Any) -> bool:
    return tokenizer_adds_bos(model) if config.prepend_bos is None else config.prepend_bos


def covariance_metadata(config: RunConfig, model: Any, layer: int) -> dict[str, Any]:
    """Return the metadata that identifies a layer's covariance cache."""
    return cache_identity(model, layer, config.corpus, _resolve_prepend_bos(config, model))


def covariance_request(config: RunConfig, **options: Any) -> CovarianceRequest:
    """Return the covariance job a config describes; options set CovarianceRequest's cache-only fields."""
    return CovarianceRequest(
        corpus=config.corpus,
        output_dir=config.output_dir,
        sample_size=config.sample_size,
        max_tokens=config.max_tokens,
        batch_token=config.batch_token,
        prepend_bos=config.prepend_bos,
        model_dtype=config.dtype,
        progress=config.progress,
        **options,
    )


def ensure_covariances(config: RunConfig, model: Any, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Return {layer: C}, reading matching caches and estimating the missing layers in one pass."""
    # float64 caches: C read back later is bit-identical to the C of the run that estimated it.
    report = cache_second_moments(model, layers, covariance_request(config, stats_dtype="float64"))
    covariances: dict[int, torch.Tensor] = {}
    for layer, path in report.paths.items():
        moment, _ = load_second_moment(path, expect=covariance_metadata(config, model, layer))
        covariances[layer] = moment.compute(torch.float64)
    return covariances


@dataclass
class RunResult:
    """The matrices of every layer for one run, with its facts and settings."""

    matrices: dict[str, torch.Tensor]  # name -> [layer, fact, fact]
    layers: list[int]
    facts: list[Fact]
    settings: dict[str, Any]
    path: Path | None = None

    def layer(self, name: str, layer: int) -> torch.Tensor:
        """Return one matrix of one layer, [fact, fact]."""
        return self.matrices[name][self.layers.index(layer)]


def run_dir(config: RunConfig, model_slug: str, n_facts: int) -> Path:
    """Return the folder of a run's consolidated results."""
    tag = f"{config.knowledge_type}_sample_size_{n_facts}"
    return Path(config.output_dir) / "runs" / model_slug / tag / config.token_position


def legacy_npy_path(output_dir: str | Path, name: str, model_slug: str, knowledge_type: str, n_facts: int, layer: int, position: str) -> Path:
    """Return the original scripts' per-layer .npy path for a matrix."""
    folder = Path(output_dir) / LEGACY_DIRS[name] / model_slug / f"{knowledge_type}_sample_size_{n_facts}"
    return folder / f"layer_{layer}_{position}_{LEGACY_DIRS[name]}.npy"


def save_result(result: RunResult, config: RunConfig) -> Path:
    """Write the per-layer .npy files (original layout) and one consolidated safetensors; return its path."""
    slug = result.settings["model"]["name"]
    n_facts = len(result.facts)
    for name, stacked in result.matrices.items():
        for index, layer in enumerate(result.layers):
            path = legacy_npy_path(config.output_dir, name, slug, config.knowledge_type, n_facts, layer, config.token_position)
            save_npy(path, stacked[index].float().cpu().numpy())
    folder = run_dir(config, slug, n_facts)
    tensors = {name: stacked.float().cpu().contiguous() for name, stacked in result.matrices.items()}
    metadata = {
        "layers": json.dumps(result.layers),
        "facts": json.dumps([fact.to_dict() for fact in result.facts]),
        "settings": json.dumps(result.settings),
    }
    path = atomic_write(folder / "results.safetensors", lambda temp: save_file(tensors, str(temp), metadata=metadata))
    result.path = path
    return path


def load_result(path: str | Path) -> RunResult:
    """Return a run's results from its results.safetensors (or the folder holding it)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / "results.safetensors"
    if not path.is_file():
        raise KisError(f"no results at {path}: run `kis all` first or give the run folder")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    facts = [Fact(**record) for record in json.loads(metadata["facts"])]
    return RunResult(load_file(str(path)), json.loads(metadata["layers"]), facts, json.loads(metadata["settings"]), path)


def run_matrices(
    config: RunConfig = RunConfig(),
    names: Sequence[str] = MATRIX_NAMES,
    model: Any | None = None,
) -> RunResult:
    """Compute keys once and the requested matrices for every layer of the config; save and return them."""
    unknown = [name for name in names if name not in MATRIX_NAMES]
    if unknown:
        raise KisError(f"unknown matrix {unknown}: choose from {', '.join(MATRIX_NAMES)}")
    model = load_model(model if model is not None else config.model_name, device=config.device, dtype=config.dtype)
    layers = layer_range(model, config.start_layer, config.end_layer)  # checked before anything is written
    check_writable(config.output_dir)
    facts = select_facts(config, model)
    keys = compute_keys(model, facts, layers, config.token_position, _resolve_prepend_bos(config, model))
    needs_covariance = any(name in ("p_matrix", "whitening_cos") for name in names)
    covariances = ensure_covariances(config, model, layers) if needs_covariance else {}
    stacked: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    conditions: dict[str, float] = {}
    for layer in layers:
        layer_keys = keys.at_layer(layer).double()
        if needs_covariance:
            whitener = Whitener.from_covariance(covariances[layer], ridge=config.ridge, label=f"layer {layer}'s covariance C")
            conditions[str(layer)] = whitener.condition
            matrices = all_matrices(layer_keys, whitener)
        else:
            matrices = {"q_matrix": q_matrix(layer_keys), "activation_cos": activation_cos(layer_keys)}
        for name in names:
            stacked[name].append(matrices[name])
    settings = {
        "config": config.to_dict(),
        "model": asdict(model_info(model)),
        "model_fingerprint": model_fingerprint(model),
        "keys": keys.settings(),
        "kis_lens_version": __version__,
    }
    if conditions:
        settings["covariance_condition_numbers"] = conditions  # of C + ridge, per layer
    result = RunResult({name: torch.stack(values) for name, values in stacked.items()}, layers, facts, settings)
    save_result(result, config)
    return result


def cache_covariance_job(config: RunConfig = RunConfig(), model: Any | None = None, **options: Any) -> CacheReport:
    """Estimate, extend or reuse the covariance cache of every layer of the config; return the job's report."""
    model = load_model(model if model is not None else config.model_name, device=config.device, dtype=config.dtype)
    layers = layer_range(model, config.start_layer, config.end_layer)
    return cache_second_moments(model, layers, covariance_request(config, **options))


def cache_covariance(config: RunConfig = RunConfig(), model: Any | None = None, **options: Any) -> dict[int, Path]:
    """Estimate (or reuse) the covariance of every layer of the config; return {layer: cache path}."""
    return cache_covariance_job(config, model, **options).paths
