"""Drive the paper's reproduction on one real model: load, classify, caches, statistics, judge, figures, write.

Each step calls its own module: classify.py splits the shipped facts into known/unknown, quarters.py caches C on
the offline Wikipedia in four disjoint quarters (¼, ½ and all of the tokens give the convergence curve; the two
disjoint halves measure the estimation noise of P), runner.py computes all four matrices, uncertainty.py the
intervals and tests, docs/reproduction.py the verdicts and docs/reproduction.md, reproduction_plots.py the figures.

>>> from kis_lens.reproduce import ReproduceConfig, reproduce
>>> report = reproduce(ReproduceConfig(model_name="smollm2-135m", max_tokens=80_000))
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from kis_lens.analysis import SuperposedPair, orthogonality_comparison, summarize_matrix, top_pairs
from kis_lens.blocks import Override, at_least, borrow, setting
from kis_lens.classify import ClassifyConfig, ensure_split
from kis_lens.config import CorpusOptions, FactOptions, ModelOptions, RunConfig
from kis_lens.corpus import EMBEDDED_WIKIPEDIA_CREDIT
from kis_lens.docs.reproduction import (
    BUDGET_FRACTIONS,
    RELATED_P,
    Reproduction,
    judge,
    model_size_rows,
    reproduction_markdown,
)
from kis_lens.errors import KisError
from kis_lens.facts import Fact, load_facts, sample_facts
from kis_lens.hooks import layer_range
from kis_lens.io import atomic_write, save_json
from kis_lens.keys import compute_keys
from kis_lens.layout import reproduction_paths
from kis_lens.matrices import MATRIX_NAMES, Whitener, all_matrices
from kis_lens.models import HookedModel, load_model, model_info, random_init_twin
from kis_lens.quarters import QUARTERS, merged, quarter_second_moments
from kis_lens.reproduction_plots import write_figures
from kis_lens.results import RunResult, save_result
from kis_lens.runner import layer_matrices, run_settings
from kis_lens.stats import SecondMoment
from kis_lens.uncertainty import (
    DEFAULT_PERMUTATIONS,
    DEFAULT_RESAMPLES,
    bootstrap_statistics,
    intervals_to_dict,
    p_difference,
    relation_permutation_test,
)

# ¼ (q1), ½ (q1+q2) and all of the budget give the convergence curve of P (kis_lens.quarters holds the quarters).
FRACTIONS: dict[str, tuple[str, ...]] = dict(zip(BUDGET_FRACTIONS, (QUARTERS[:1], QUARTERS[:2], QUARTERS)))


@dataclass(frozen=True)
@borrow(
    FactOptions,
    "facts",
    seed=Override(help="random seed of the known-fact sample, the bootstrap, the permutations and the null weights"),
    record_size=Override(help="known facts sampled"),
)
@borrow(CorpusOptions, max_tokens=Override(None, none="the whole corpus, ~1.2 M tokens"), batch_token=Override())
@borrow(ClassifyConfig, "top_k")
class ReproduceConfig(ModelOptions):
    """Settings of a reproduction run: the model options, the facts and classify-facts' top_k, the token budget,
    then the run's own. No prepend_bos: reproduce follows the model's own BOS convention."""

    docs_dir: str | None = setting(
        None,
        "a repository root whose docs/ and benchmarks/results/ receive the document, figures and numbers "
        "(. in a kis_lens clone regenerates the committed ones)",
        none="{output_dir}/reproduction/{model}",
    )
    doc_path: str | None = setting(None, "the Markdown document written", none="reproduction.md under docs_dir")
    figures_dir: str | None = setting(None, "where the HTML figures go", none="figures under docs_dir")
    numbers_path: str | None = setting(
        None, "the JSON of every number", none="reproduction_{model}.json under docs_dir"
    )
    n_top_pairs: int = setting(10, "most superposed pairs listed per layer")
    bootstrap_resamples: int = setting(DEFAULT_RESAMPLES, "bootstrap resamples of the facts for every interval")
    permutations: int = setting(DEFAULT_PERMUTATIONS, "relation-label permutations of the relatedness test")
    null_model: bool = setting(True, "also measure the same architecture with random weights (the null model)")

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least("top_k", self.top_k, 1)
        at_least("record_size", self.record_size, 1)
        at_least("max_tokens", self.max_tokens, 1, none_means="the whole corpus")
        at_least("batch_token", self.batch_token, 1, none_means="n_ctx")
        at_least("n_top_pairs", self.n_top_pairs, 0)
        at_least("bootstrap_resamples", self.bootstrap_resamples, 10)
        at_least("permutations", self.permutations, 10)


def layer_statistics(
    matrices: Mapping[str, Float[Tensor, "fact fact"]], resamples: int, seed: int
) -> dict[str, dict[str, dict[str, float]]]:
    """Return bootstrap intervals over facts of P's off-diagonal statistics and of both cosines' mean |cos| and cos²."""
    cosine = ("mean_abs", "mean_square")
    return {
        "p": intervals_to_dict(bootstrap_statistics(matrices["p_matrix"], resamples=resamples, seed=seed)),
        "whitening": intervals_to_dict(bootstrap_statistics(matrices["whitening_cos"], cosine, resamples, seed)),
        "activation": intervals_to_dict(bootstrap_statistics(matrices["activation_cos"], cosine, resamples, seed)),
    }


@contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    """Record the seconds the block takes under step, in the order the steps run (the document lists them so)."""
    clock = time.perf_counter()
    yield
    timings[step] = time.perf_counter() - clock


def _known_facts(config: ReproduceConfig, model: HookedModel) -> tuple[list[Fact], dict[str, Any]]:
    """Return a seeded sample of the facts the model knows, and how many it knows of how many (the document's line)."""
    all_facts = load_facts(config.facts)
    split, split_file = ensure_split(
        model, config.facts, config.output_dir, top_k=config.top_k, progress=config.progress
    )
    known = split.select(all_facts, "known")
    if len(known) < 3:
        name = model_info(model).name
        raise KisError(f"{name} knows {len(known)} of {len(all_facts)} facts: too few for a matrix; try --top_k 5")
    facts = sample_facts(known, min(config.record_size, len(known)), seed=config.seed)
    counts = {"n_known": len(split.known), "n_facts": split.n_facts, "top_k": split.top_k}
    return facts, {**counts, "split_path": str(split_file), "n_used": len(facts)}


@dataclass(frozen=True)
class _Matrices:
    """The run's matrices from C of all tokens, and the partial estimates that measure C's convergence and noise."""

    result: RunResult
    conditions: dict[str, float]  # str(layer) -> cond(C)
    partial: dict[str, dict[str, Float[Tensor, "layer fact fact"]]]  # "1/4", "1/2" -> p_matrix, whitening_cos
    p_second_half: Float[Tensor, "layer fact fact"]


def _matrices(
    config: ReproduceConfig,
    model: HookedModel,
    facts: list[Fact],
    layers: list[int],
    quarters: dict[str, dict[int, SecondMoment]],
    timings: dict[str, float],
) -> _Matrices:
    """Return every matrix of every layer with C from all tokens (saved as a run), from ¼ and ½, and from q3+q4."""
    with _timed(timings, "keys"):
        keys = compute_keys(model, facts, layers)
    with _timed(timings, "matrices"):
        covariances = {
            fraction: {layer: merged(*(quarters[q][layer] for q in parts)).compute() for layer in layers}
            for fraction, parts in FRACTIONS.items()
        }
        second_half = {layer: merged(quarters["q3"][layer], quarters["q4"][layer]).compute() for layer in layers}
        matrices, conditions = layer_matrices(keys, MATRIX_NAMES, covariances["all"])
        partial = {
            fraction: layer_matrices(keys, ("p_matrix", "whitening_cos"), covariances[fraction])[0]
            for fraction in FRACTIONS
            if fraction != "all"
        }
        p_second_half = layer_matrices(keys, ("p_matrix",), second_half)[0]["p_matrix"]
    run_config = RunConfig(
        model_name=model_info(model).name,
        facts=config.facts,
        record_size=len(facts),
        knowledge_type="known",
        seed=config.seed,
        device=config.device,
        dtype=config.dtype,
        output_dir=config.output_dir,
        max_tokens=config.max_tokens,
        progress=config.progress,
    )
    held = {layer: {"tokens": sum(quarters[q][layer].count for q in QUARTERS)} for layer in layers}
    result = RunResult(matrices, layers, facts, run_settings(run_config, model, keys, held, conditions))
    save_result(result, run_config)
    return _Matrices(result, conditions, partial, p_second_half)


def _convergence_point(p: Float[Tensor, "fact fact"], whitening: Float[Tensor, "fact fact"]) -> dict[str, float]:
    """Return std and excess kurtosis of off-diagonal P and the whitened mean |cos| at one token budget."""
    summary = summarize_matrix(p)
    return {
        "p_std": summary.std,
        "p_kurtosis": summary.kurtosis,
        "whitening_mean_abs": summarize_matrix(whitening).mean_abs,
    }


def _layer_rows(config: ReproduceConfig, measured: _Matrices) -> list[dict[str, Any]]:
    """Return each layer's numbers: intervals, largest |P|, convergence over budgets, the halves' noise, relatedness."""
    result, partial = measured.result, measured.partial
    facts = result.facts
    # Facts that open with the same subject share its key exactly (causal attention): P = 1 by construction.
    same_subject = torch.tensor([[a.subject == b.subject for b in facts] for a in facts])
    orthogonality = {row.layer: row for row in orthogonality_comparison(result)}
    rows = []
    for index, layer in enumerate(result.layers):
        matrices = {name: values[index] for name, values in result.matrices.items()}
        p, whitening = matrices["p_matrix"], matrices["whitening_cos"]
        convergence = {
            fraction: {
                "p_vs_all": p_difference(partial[fraction]["p_matrix"][index], p),
                **_convergence_point(partial[fraction]["p_matrix"][index], partial[fraction]["whitening_cos"][index]),
            }
            for fraction in partial
        }
        convergence["all"] = _convergence_point(p, whitening)
        rows.append(
            {
                "layer": layer,
                "condition": measured.conditions[str(layer)],
                "statistics": layer_statistics(matrices, config.bootstrap_resamples, config.seed),
                "p_max_abs": float(p.double().abs().masked_fill(torch.eye(len(facts), dtype=torch.bool), 0).max()),
                "p_max_abs_distinct_subjects": float(p.double().abs().masked_fill(same_subject, 0).max()),
                "random_mean_abs_cos": orthogonality[layer].random_mean_abs,
                "halves": p_difference(partial["1/2"]["p_matrix"][index], measured.p_second_half[index]),
                "convergence": convergence,
                "relation": relation_permutation_test(p, facts, RELATED_P, config.permutations, config.seed).to_dict(),
            }
        )
    return rows


def _null_model(config: ReproduceConfig, model: HookedModel, facts: list[Fact], layers: list[int]) -> dict[str, Any]:
    """Return the random-weight twin's per-layer statistics (same tokenizer, facts, corpus budget)."""
    twin = random_init_twin(model, seed=config.seed)
    quarters, _ = quarter_second_moments(config, twin, layers)
    keys = compute_keys(twin, facts, layers)
    rows = []
    for layer in layers:
        whitener = Whitener.from_covariance(merged(*(quarters[q][layer] for q in QUARTERS)).compute(), label="null C")
        matrices = all_matrices(keys.at_layer(layer).double(), whitener)
        statistics = layer_statistics(matrices, config.bootstrap_resamples, config.seed)
        rows.append({"layer": layer, "condition": whitener.condition, "statistics": statistics})
    info = model_info(twin)
    return {"name": info.name, "fingerprint": info.fingerprint, "d_mlp": info.d_mlp, "layers": rows}


def _pair_record(pair: SuperposedPair) -> dict[str, Any]:
    """Return a top pair as the numbers file and the document show it."""
    return {
        "i": pair.row,
        "j": pair.column,
        "value": pair.value,
        "fact_i": f"{pair.row_fact.text} {pair.row_fact.target_true}",
        "fact_j": f"{pair.column_fact.text} {pair.column_fact.target_true}",
        "same_subject": pair.row_fact.subject == pair.column_fact.subject,
        "relation_i": pair.row_fact.relation_id,
        "relation_j": pair.column_fact.relation_id,
    }


def reproduce(config: ReproduceConfig = ReproduceConfig(), model: HookedModel | None = None) -> Reproduction:
    """Run the whole reproduction, write the document, figures and numbers; return the numbers."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with _timed(timings, "load_model"):
        model = load_model(model if model is not None else config.model_name, device=config.device, dtype=config.dtype)
        info, layers = model_info(model), layer_range(model)
    with _timed(timings, "classify_facts (or read the saved split)"):
        facts, known = _known_facts(config, model)
    quarters, timings["covariance (four quarters)"] = quarter_second_moments(config, model, layers)
    measured = _matrices(config, model, facts, layers, quarters, timings)

    tokens = {quarter: next(iter(moments.values())).count for quarter, moments in quarters.items()}
    covariance = {
        "tokens_quarters": tokens,
        "tokens_half1": tokens["q1"] + tokens["q2"],
        "tokens_half2": tokens["q3"] + tokens["q4"],
        "tokens_total": sum(tokens.values()),
        "max_tokens": config.max_tokens,
        "corpus": EMBEDDED_WIKIPEDIA_CREDIT,
    }
    report = Reproduction(model=asdict(info), settings=asdict(config), known=known, covariance=covariance)
    with _timed(timings, "statistics (bootstrap, permutations)"):
        report.layers = _layer_rows(config, measured)
    if config.null_model:
        with _timed(timings, "null model (random-init twin: C, keys, statistics)"):
            report.null_model = _null_model(config, model, facts, layers)
    for layer in sorted({layers[0], layers[len(layers) // 2], layers[-1]}):
        pairs = top_pairs(measured.result.layer("p_matrix", layer), facts, k=config.n_top_pairs)
        report.top_pairs[layer] = [_pair_record(pair) for pair in pairs]
    doc, figures, numbers = reproduction_paths(
        config.output_dir, info.name, config.docs_dir, config.doc_path, config.figures_dir, config.numbers_path
    )
    # Where they went: the doc's links and the CLI's summary read these.
    report.settings |= {"doc_path": str(doc), "figures_dir": str(figures), "numbers_path": str(numbers)}
    report.model_sizes = model_size_rows(report, numbers.parent)

    report.verdicts = judge(report)
    report.figures = write_figures(measured.result, report, figures)
    timings["total"] = time.perf_counter() - started
    report.seconds = {key: round(value, 1) for key, value in timings.items()}
    save_json(numbers, report.to_dict())
    text = reproduction_markdown(report)
    atomic_write(doc, lambda temp: temp.write_text(text, encoding="utf-8"))
    return report
