"""The jobs behind the CLI, callable from a script: cache covariances, compute keys and the four matrices.

>>> from kis_lens.config import RunConfig
>>> from kis_lens.runner import run_matrices
>>> result = run_matrices(RunConfig(model_name="tiny-gpt2", knowledge_type="all", record_size=16, max_tokens=2000))
"""

from __future__ import annotations

import warnings
from dataclasses import asdict
from typing import Any, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kis_lens._version import __version__
from kis_lens.blocks import block_of
from kis_lens.cache_job import CacheReport, cache_second_moments
from kis_lens.config import KNOWLEDGE_TYPES, CacheCovConfig, CacheOptions, CorpusOptions, ModelOptions, RunConfig
from kis_lens.errors import KisError
from kis_lens.facts import Fact, load_facts, sample_facts
from kis_lens.hooks import layer_range
from kis_lens.io import check_writable
from kis_lens.keys import Keys, compute_keys
from kis_lens.matrices import MATRIX_NAMES, Whitener, activation_cos, all_matrices, q_matrix
from kis_lens.models import HookedModel, load_model, model_info, resolve_prepend_bos
from kis_lens.results import RunResult, save_result
from kis_lens.storage import CacheKey, load_second_moment


def select_facts(config: RunConfig, model: HookedModel | None = None) -> list[Fact]:
    """Return the run's facts of the requested knowledge type (known/unknown: per-model split; all/mix: every fact).

    fact_order "sample" draws a seeded sample; "first" takes the first record_size facts in file order (the
    original scripts' choice).
    """
    if config.knowledge_type not in KNOWLEDGE_TYPES:
        raise KisError(f"unknown knowledge_type {config.knowledge_type!r}: use one of {', '.join(KNOWLEDGE_TYPES)}")
    facts = load_facts(config.facts)
    every_fact = config.knowledge_type in ("all", "mix")  # mix: the original's name for known and unknown together
    if not every_fact:
        from kis_lens.classify import ensure_split

        if model is None:
            model = load_model(config.model_name, device=config.device, dtype=config.dtype)
        split, path = ensure_split(
            model,
            config.facts,
            config.output_dir,
            prepend_bos=resolve_prepend_bos(model, config.prepend_bos),
            progress=config.progress,
        )
        facts = split.select(facts, config.knowledge_type)
        if len(facts) < 2:  # one fact has no pair: every matrix would be its diagonal alone
            raise KisError(
                f"{split.model_name} has {len(facts) or 'no'} {config.knowledge_type} fact{'s' * (len(facts) != 1)} "
                f"among the {split.n_facts} of {config.facts} (top-{split.top_k}, split in {path}), too few for a "
                "pair (a random-weight model such as tiny-gpt2 knows almost none): use --knowledge_type all or "
                "another facts file"
            )
    # How many facts a model knows is not the user's choice: use what there is. For all/mix, sample_facts
    # refuses a record_size beyond the file, as it always did.
    record_size = config.record_size
    if not every_fact and record_size > len(facts):
        warnings.warn(
            f"only {len(facts)} {config.knowledge_type} facts available for --record_size {record_size}: "
            f"using all {len(facts)}",
            stacklevel=2,
        )
        record_size = len(facts)
    if config.fact_order == "first":
        if record_size > len(facts):
            raise KisError(
                f"record_size {record_size} is larger than the {len(facts)} facts available: "
                f"use --record_size {len(facts)} or fewer, or a larger facts file"
            )
        return list(facts[:record_size])
    return sample_facts(facts, record_size, seed=config.seed)


def covariance_key(config: ModelOptions, model: HookedModel, layer: int) -> CacheKey:
    """Return the identity of the covariance cache a config uses for a layer (its corpus settings, else defaults)."""
    from kis_lens.corpus import open_corpus

    options = block_of(config, CorpusOptions)
    corpus = open_corpus(
        options.corpus,
        order=options.corpus_order,
        seed=options.corpus_seed,
        buffer=options.corpus_buffer,
        snapshot=options.wikipedia_snapshot,
    )
    return CacheKey.for_model(
        model_info(model), layer, options.corpus, corpus.identity, resolve_prepend_bos(model, options.prepend_bos)
    )


def ensure_covariances(
    config: ModelOptions, model: HookedModel, layers: Sequence[int]
) -> tuple[dict[int, Float[Tensor, "d_mlp d_mlp"]], CacheReport]:
    """Return ({layer: float64 C}, the cache job's report of what each C holds), estimating or extending as needed.

    The cache job reads the corpus settings config has (an editing job's corpus and max_tokens, say); the ones it
    lacks keep CacheOptions' defaults.
    """
    report = cache_second_moments(model, layers, block_of(config, CacheOptions))
    covariances: dict[int, torch.Tensor] = {}
    for layer, path in report.paths.items():
        moment, _ = load_second_moment(path)
        covariances[layer] = moment.compute(torch.float64)
    return covariances, report


def layer_matrices(
    keys: Keys,
    names: Sequence[str],
    covariances: Mapping[int, Float[Tensor, "d_mlp d_mlp"]] | None = None,
    ridge: float = 0.0,
) -> tuple[dict[str, Float[Tensor, "layer fact fact"]], dict[str, float]]:
    """Return ({matrix name: [layer, fact, fact]}, {layer: cond(C + ridge)}) for every layer of the keys.

    P and the whitening cosine need each layer's C; Q and the activation cosine need none.
    """
    stacked: dict[str, list[Tensor]] = {name: [] for name in names}
    conditions: dict[str, float] = {}
    for layer in keys.layers:
        layer_keys = keys.at_layer(layer).double()
        if covariances:
            whitener = Whitener.from_covariance(covariances[layer], ridge=ridge, label=f"layer {layer}'s covariance C")
            conditions[str(layer)] = whitener.condition
            matrices = all_matrices(layer_keys, whitener)
        else:
            matrices = {"q_matrix": q_matrix(layer_keys), "activation_cos": activation_cos(layer_keys)}
        for name in names:
            stacked[name].append(matrices[name].cpu())
    return {name: torch.stack(values) for name, values in stacked.items()}, conditions


def run_settings(
    config: RunConfig,
    model: HookedModel,
    keys: Keys,
    covariance: Mapping[int, Mapping[str, Any]],
    conditions: Mapping[str, float],
) -> dict[str, Any]:
    """Return a run's provenance: config, model record, keys, version, and each C's tokens, texts and condition."""
    info = model_info(model)
    settings: dict[str, Any] = {
        "config": config.to_dict(),
        "model": asdict(info),
        "model_fingerprint": info.fingerprint,
        "keys": keys.settings(),
        "kis_lens_version": __version__,
    }
    if covariance:
        # What each C really averages, which may be more than max_tokens asked for (a larger cache reused).
        settings["covariance"] = {str(layer): dict(held) for layer, held in covariance.items()}
    if conditions:
        settings["covariance_condition_numbers"] = dict(conditions)  # of C + ridge, per layer
    return settings


def run_matrices(
    config: RunConfig = RunConfig(),
    names: Sequence[str] = MATRIX_NAMES,
    model: HookedModel | None = None,
) -> RunResult:
    """Compute keys once and the requested matrices for every layer of the config; save and return them."""
    unknown = [name for name in names if name not in MATRIX_NAMES]
    if unknown:
        raise KisError(f"unknown matrix {unknown}: choose from {', '.join(MATRIX_NAMES)}")
    model = load_model(model if model is not None else config.model_name, device=config.device, dtype=config.dtype)
    layers = layer_range(model, config.start_layer, config.end_layer)  # checked before anything is written
    check_writable(config.output_dir)
    facts = select_facts(config, model)
    keys = compute_keys(model, facts, layers, config.token_position, resolve_prepend_bos(model, config.prepend_bos))
    covariances: dict[int, Tensor] = {}
    held: dict[int, dict[str, Any]] = {}
    if any(name in ("p_matrix", "whitening_cos") for name in names):
        covariances, report = ensure_covariances(config, model, layers)
        held = {
            layer: {"tokens": cache.tokens, "texts": cache.texts, "path": str(cache.path)}
            for layer, cache in report.layers.items()
        }
    matrices, conditions = layer_matrices(keys, names, covariances, config.ridge)
    result = RunResult(matrices, layers, facts, run_settings(config, model, keys, held, conditions))
    save_result(result, config)
    return result


def cache_covariance_job(config: CacheCovConfig = CacheCovConfig(), model: HookedModel | None = None) -> CacheReport:
    """Estimate, extend or reuse the covariance cache of every layer of the config; return the job's report."""
    model = load_model(model if model is not None else config.model_name, device=config.device, dtype=config.dtype)
    layers = layer_range(model, config.start_layer, config.end_layer)
    return cache_second_moments(model, layers, block_of(config, CacheOptions))
