"""Regenerate every number the docs quote from the benchmark JSONs, so that no number is edited by hand.

    .venv/bin/python benchmarks/render.py           # rewrite benchmarks/results/*.md and README's benchmarks block
    .venv/bin/python benchmarks/render.py --check   # write nothing; exit 1 and name what differs

Reads benchmarks/results/*.json:
- matrices_*.json (benchmarks/matrices.py)  -> matrices_*.md beside it and one README row each;
- covariance.json (benchmarks/covariance.py) -> covariance.md beside it, three README rows and the paragraph after them;
- reproduction_*.json (`kis reproduce`; its Markdown is docs/reproduction.md) -> one README row each.
- lifelong/lifelong_*.json (`kis lifelong`; docs/lifelong.md is benchmarks/lifelong.py's) -> one README row per run.
The README rows sit in the "Measured here" section between `<!-- benchmarks:begin -->` and
`<!-- benchmarks:end -->`; tests/test_docs_numbers.py fails when that block or a .md differs from this output.
Standard library only: it runs without torch, and the benchmarks import their Markdown from here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

BENCHMARKS = Path(__file__).resolve().parent
RESULTS_DIR = BENCHMARKS / "results"
README = BENCHMARKS.parent / "README.md"
BEGIN = "<!-- benchmarks:begin -->"
END = "<!-- benchmarks:end -->"

# How the README names the benchmark models; any other model is named as in its JSON.
DISPLAY_NAMES = {"smollm2-135m": "SmolLM2", "gpt2-small-random": "GPT-2-small-sized", "gemma3-270m": "Gemma 3 270M"}


def display(model: str) -> str:
    """Return the README's short name for a model."""
    return DISPLAY_NAMES.get(model, model)


def short_float(value: float, digits: int = 0) -> str:
    """Return value in scientific notation without the exponent's zero padding: 5.8e-07 -> 6e-7 (digits=0)."""
    mantissa, exponent = f"{value:.{digits}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def scaling_exponent(sizes: Sequence[float], seconds: Sequence[float]) -> float:
    """Return the least-squares slope of log(time) against log(N)."""
    x = [math.log(size) for size in sizes]
    y = [math.log(second) for second in seconds]
    mean_x, mean_y = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y)) / sum((a - mean_x) ** 2 for a in x)


# ---------------------------------------------------------------------------------------------------------------
# P matrix: original per-pair algorithm vs kis_lens (benchmarks/matrices.py)
# ---------------------------------------------------------------------------------------------------------------


def counted(row: dict[str, Any]) -> bool:
    """Return whether a row was written by the reference that runs and counts the original's N² + 2N forwards.

    Rows without `forwards_per_layer` come from the earlier reference, which ran two forwards per entry (2N² per
    layer); they are still rendered, flagged, so that the committed numbers stay reproducible until a rerun.
    """
    return "forwards_per_layer" in row


def forwards_timed(row: dict[str, Any]) -> int:
    """Return the original's forwards that ran inside the timed loop of a row."""
    return row["forwards_run"] if counted(row) else 2 * row["original_pairs_run"]


def entries_timed(row: dict[str, Any]) -> int:
    """Return the P entries that the timed loop of a row filled."""
    return row["entries_run"] if counted(row) else row["original_pairs_run"]


def timed_seconds(row: dict[str, Any]) -> float:
    """Return the wall seconds the timed loop of a row took (for old rows: undone from the N² extrapolation)."""
    if counted(row):
        return row["original_timed_s"]
    return row["original_one_layer_s"] * row["original_pairs_run"] / row["n_facts"] ** 2


def pooled_per_forward(rows: Sequence[dict[str, Any]]) -> float:
    """Return the original's seconds per forward pooled over every timed forward (the inverse's time left out)."""
    spent = sum(timed_seconds(row) - row.get("inverse_s", 0.0) for row in rows)
    return spent / sum(forwards_timed(row) for row in rows)


def original_estimate(row: dict[str, Any], per_forward: float, n_layers: int) -> float:
    """Return the original's seconds over all layers at N² + 2N forwards per layer and the pooled cost per forward."""
    n = row["n_facts"]
    return (row.get("inverse_s", 0.0) + per_forward * (n * n + 2 * n)) * n_layers


def quoted_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the rows the README quotes: the smallest, middle and largest N."""
    picked = {0: rows[0], 1: rows[len(rows) // 2], 2: rows[-1]}
    seen, quoted = set(), []
    for row in picked.values():
        if row["n_facts"] not in seen:
            seen.add(row["n_facts"])
            quoted.append(row)
    return quoted


def matrices_markdown(report: dict[str, Any]) -> str:
    """Return a matrices_*.json report as a Markdown table with a short reading guide."""
    rows = report["rows"]
    legacy = not all(counted(row) for row in rows)
    lines = [
        f"# P matrix: original per-pair algorithm vs kis_lens "
        f"({report['model']}, {report['device']}, {report['dtype']})",
        "",
    ]
    if legacy:
        lines += [
            "**Run of the earlier reference.** These numbers were measured with a reference that ran two forwards per "
            "P entry (2N² per layer); the original `Compute_PMatrix.py` runs N² + 2N (one forward for C⁻¹k_i and one "
            "for k_i per row, one for k_j per entry). The 'original' columns and speed-ups below therefore overstate "
            "the original's time by 2N/(N + 2) ("
            + ", ".join(f"{2 * n / (n + 2):.1f}× at N = {n}" for n in sorted({rows[0]["n_facts"], rows[-1]["n_facts"]}))
            + "); the pooled line re-estimates it at N² + 2N forwards. Rerun `benchmarks/matrices.py` (command at its "
            "top) to replace them.",
            "",
        ]
    lines += [
        f"Same model, facts (first N of `{report['facts']}`) and covariance ({report['covariance']['tokens']} tokens "
        f"of {report['covariance']['corpus']}); {report['n_layers']} layers, d_mlp {report['d_mlp']}, "
        f"{report['torch_threads']} torch threads on {report['device_name']}.",
    ]
    if legacy:
        lines.append(
            f"The original is timed on layer {report['reference_layer']} and multiplied by {report['n_layers']} "
            "for all "
            "layers (its forwards cost the same at every layer). Rows marked * ran only the first entries of the "
            f"original (within {report['budget_s']} s) and extrapolate its time as N² × measured time per entry. "
            f"kis_lens times are the median of {report.get('kis_lens_repeats', 1)} run(s) and include keys for all N "
            "facts, one Cholesky per layer and P; neither side includes model loading or the covariance estimate."
        )
    else:
        lines.append(
            "The original (`Compute_PMatrix.py`) runs as written: per layer one explicit inverse of C, computed once "
            "and cached; per row i one unbatched full forward for C⁻¹k_i and one for k_i; per entry (i, j) one for "
            "k_j. "
            "That is N² + 2N forwards per layer, counted in the run (a row whose count differs stops the benchmark). "
            f"It is timed on layer {report['reference_layer']} and multiplied by {report['n_layers']} for all layers "
            "(its forwards cost the same at every layer). Rows marked * ran only the first entries in the original's "
            f"row-major order (within {report['budget_s']} s) and extrapolate its time as the inverse's time + "
            "(N² + 2N) × measured time per forward; their forward count comes from the same loop run in full with the "
            f"model's forward stubbed out. kis_lens times are the median of {report.get('kis_lens_repeats', 1)} run(s) "
            "and include keys for all N facts, one Cholesky per layer and P; neither side includes model loading or "
            "the covariance estimate."
        )
    lines += [
        "",
        "| N | kis_lens, all layers (s) | original, all layers (s) | speed-up, all layers | kis_lens, one layer (s) "
        "| original, one layer (s) | speed-up, one layer | original forwards per layer | forwards timed | max abs ΔP |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        n = row["n_facts"]
        star = "*" if row["original_extrapolated"] else ""
        per_layer = (
            f"{row['forwards_per_layer']:,} (counted)" if counted(row) else f"{2 * n * n:,} (2N², earlier reference)"
        )
        lines.append(
            f"| {n} | {row['kis_all_layers_s']:.3f} | {row['original_all_layers_s']:.1f}{star} | "
            f"{row['speedup_all_layers']:,.0f}× | {row['kis_one_layer_s']:.3f} | "
            f"{row['original_one_layer_s']:.1f}{star} | "
            f"{row['speedup_one_layer']:,.0f}× | {per_layer} | {forwards_timed(row):,} | {row['max_abs_diff']:.1e} |"
        )
    per_forward = pooled_per_forward(rows)
    lines += [
        "",
        f"Pooled over every forward timed ({sum(forwards_timed(row) for row in rows):,} forwards), the original costs "
        f"{per_forward:.3f} s per forward (one unbatched full forward and its dot products). With that one cost for "
        f"every N, the original's N² + 2N forwards per layer over all {report['n_layers']} layers would take: "
        + ", ".join(
            f"N={row['n_facts']}: {original_estimate(row, per_forward, report['n_layers']):,.0f} s "
            f"({original_estimate(row, per_forward, report['n_layers']) / row['kis_all_layers_s']:,.0f}× kis_lens)"
            for row in rows
        )
        + ".",
    ]
    if len(rows) > 1:
        sizes = [row["n_facts"] for row in rows]
        kis = scaling_exponent(sizes, [row["kis_all_layers_s"] for row in rows])
        original = scaling_exponent(sizes, [row["original_one_layer_s"] for row in rows])
        work = "2N² forwards per layer in the earlier reference" if legacy else "N² + 2N forwards per layer"
        lines += [
            "",
            f"Scaling with N (log-log slope of wall time): original {original:.2f} ({work}; rows marked * are "
            f"extrapolated, quadratic by construction), kis_lens {kis:.2f} (N forwards in batches for all layers at "
            "once, plus one N×N Gram matrix per layer).",
        ]
    return "\n".join(lines) + "\n"


def matrices_readme_row(report: dict[str, Any]) -> str:
    """Return the README row for one matrices_*.json."""
    rows = report["rows"]
    quoted = quoted_rows(rows)
    what = (
        f"P from kis_lens vs the original per-pair algorithm (`benchmarks/matrices.py`, {display(report['model'])}, "
        f"{report['n_layers']} layers; the original's N² + 2N forwards per layer)"
    )
    same = f"same P to {short_float(max(row['max_abs_diff'] for row in rows))}"
    if all(counted(row) for row in rows):
        last = rows[-1]
        speedups = ", ".join(f"{row['speedup_all_layers']:,.0f}× (N = {row['n_facts']})" for row in quoted[:-1])
        tail = f"{quoted[-1]['speedup_all_layers']:,.0f}× (N = {quoted[-1]['n_facts']}"
        if last["original_extrapolated"]:
            per_forward = (last["original_timed_s"] - last["inverse_s"]) / last["forwards_run"]
            tail += f"; original extrapolated from {last['forwards_run']:,} timed forwards at {per_forward:.2f} s each"
        tail += "; forwards counted)"
        number = f"{same}; speed-up {', '.join(filter(None, [speedups, tail]))}"
    else:
        per_forward = pooled_per_forward(rows)
        estimates = ", ".join(
            f"{original_estimate(row, per_forward, report['n_layers']) / row['kis_all_layers_s']:,.0f}× "
            f"(N = {row['n_facts']})"
            for row in quoted
        )
        reported = " / ".join(f"{row['speedup_all_layers']:,.0f}×" for row in quoted)
        number = (
            f"{same}; speed-up ≈ {estimates}: the original's N² + 2N forwards at {per_forward:.2f} s each, "
            "pooled from a "
            f"run of the earlier reference (2N² forwards per layer; it reported {reported}); rerun pending"
        )
    return f"| {what} | {number} |"


# ---------------------------------------------------------------------------------------------------------------
# Covariance caching throughput (benchmarks/covariance.py)
# ---------------------------------------------------------------------------------------------------------------


def covariance_best_of(report: dict[str, Any]) -> str:
    """Return the sentence on repeats: (a), (b), (c) best of 2 since (c) was; earlier JSONs ran (c) once."""
    if all("best_of" in result for result in report["results"]):
        repeats = {result["best_of"] for result in report["results"]}
        return f"(a), (b) and (c) each keep the fastest of {'/'.join(map(str, sorted(repeats)))} alternating runs."
    return "(a) and (b) each keep the faster of 2 alternating runs; (c) ran once."


def covariance_markdown(report: dict[str, Any]) -> str:
    """Return covariance.json as Markdown."""
    environment, results = report["environment"], report["results"]
    lines = [
        "# Covariance caching throughput",
        "",
        f"{environment['device'].upper()}, torch {environment['torch']}, {environment['threads']} threads "
        "(a shared, busy 2-core machine: ratios matter, not absolute tok/s).",
        f"(c) is extrapolated linearly from layers sampled at 0, n/2 and n-1. {covariance_best_of(report)}",
        "",
        "| model | batch_token | tokens | a: bare forward tok/s | b: kis all layers tok/s | c: layer-at-a-time tok/s "
        "| b/a (≥0.8) | ideal b/a | b/c (≥ n_layers/4) | accumulators |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t = r["tok_s"]
        lines.append(
            f"| {r['model']} | {r['batch_token']} | {r['tokens']} | {t['a_bare_forward']:.0f} "
            f"| {t['b_kis_all_layers']:.0f} "
            f"| {t['c_layer_at_a_time']:.0f} | {r['ratio_b_over_a']:.2f} | {r['ideal_b_over_a']:.2f} "
            f"| {r['ratio_b_over_c']:.1f} (target {r['target_b_over_c']:.1f}) "
            f"| {r['accumulator_bytes_all_layers'] / 1e9:.2f} GB |"
        )
    for r in results:
        gain = r.get("default_batch_row_groups")
        if gain:
            lines += [
                "",
                f"{r['model']} at the default batch_token ({gain['batch_token']}, {gain['tokens']} tokens): "
                "whole-batch "
                f"forwards {gain['tok_s']['whole_batches']:.0f} tok/s, row groups of {gain['group_tokens']} tokens "
                f"{gain['tok_s']['row_groups']:.0f} tok/s ({gain['speedup']:.2f}×).",
            ]
    return "\n".join(lines) + "\n"


def by_model(results: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Return the results grouped by model, in file order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault(result["model"], []).append(result)
    return groups


def covariance_readme_lines(report: dict[str, Any]) -> list[str]:
    """Return the README rows for covariance.json and the paragraph on the arithmetic ceiling."""
    groups = by_model(report["results"])
    batch_tokens = " / ".join(dict.fromkeys(str(r["batch_token"]) for r in report["results"]))

    def joined(rs: Sequence[dict[str, Any]], key: str, form: str) -> str:
        return " / ".join(format(r[key], form) for r in rs)

    one_pass = ", ".join(
        f"{joined(rs, 'ratio_b_over_c', '.1f').replace(' / ', '× / ')}× ({display(model)}, {rs[0]['n_layers']} layers; "
        f"target {rs[0]['target_b_over_c']:g})"
        for model, rs in groups.items()
    )
    bare = ", ".join(
        f"{joined(rs, 'ratio_b_over_a', '.2f')} ({display(model)}; {'arithmetic ' if index == 0 else ''}"
        f"ceiling {joined(rs, 'ideal_b_over_a', '.2f')})"
        for index, (model, rs) in enumerate(groups.items())
    )
    lines = [
        "| covariance, all layers in one pass vs layer at a time "
        f"(`benchmarks/covariance.py`, batch_token {batch_tokens}) "
        f"| {one_pass} |",
        f"| covariance vs a bare forward to the last MLP (b/a; target 0.8) | {bare} |",
    ]
    for r in report["results"]:
        gain = r.get("default_batch_row_groups")
        if gain:
            lines.append(
                f"| covariance at {display(r['model'])}'s default batch_token ({gain['batch_token']:,}): whole-batch "
                f"forwards vs CPU row groups of {gain['group_tokens']:,} | {gain['tok_s']['whole_batches']:.0f} → "
                f"{gain['tok_s']['row_groups']:.0f} tok/s ({gain['speedup']:.2f}×) |"
            )
    shares = [r["ratio_b_over_a"] / r["ideal_b_over_a"] for r in report["results"]]
    paragraph = (
        "On this CPU the statistics cannot be free. One triangle of XᵀX per layer costs d_mlp²/2 multiply-adds\n"
        "per token: for GPT-2 small (d_mlp = 4·d_model) that is two thirds of the forward's own arithmetic, for\n"
        'SmolLM2 a third. The benchmark\'s "ceiling" is b/a if the statistics cost nothing but those products at the\n'
        f"rate they reach alone; kis_lens runs at {100 * min(shares):.0f}–{100 * max(shares):.0f}% of it (the float64 "
        "totals and the rest cost the\n"
        "difference). The 0.8 target is above that ceiling for exact float32 products on this machine. The same\n"
        "torch code runs on a GPU, where the products are relatively cheaper; no GPU was available to measure it."
    )
    return lines + ["", paragraph]


# ---------------------------------------------------------------------------------------------------------------
# kis reproduce (its JSON is copied into benchmarks/results; its Markdown is docs/reproduction.md)
# ---------------------------------------------------------------------------------------------------------------


def reproduction_readme_row(report: dict[str, Any]) -> str:
    """Return the README row for one reproduction_*.json."""
    covariance, settings = report["covariance"], report["settings"]
    errors = [layer["halves"]["relative_rms"] for layer in report["layers"]]
    null = f"; null model {report['null_model']['name']}" if report.get("null_model") else ""
    return (
        f"| `kis reproduce --max_tokens {settings['max_tokens']}` ({report['model']['name']}, C on four "
        f"{covariance['tokens_total'] / 4000:.0f}k-token quarters{null}) | {report['seconds']['total']:,.0f} s; "
        f"P from two disjoint halves of the tokens differs by {100 * min(errors):.1f}–{100 * max(errors):.1f}% RMS |"
    )


# ---------------------------------------------------------------------------------------------------------------
# Commands as a user runs them (benchmarks/command_timings.py)
# ---------------------------------------------------------------------------------------------------------------


def commands_readme_rows(report: dict[str, Any]) -> list[str]:
    """Return the README rows of commands.json: `kis all` fresh, and again with every C cached."""
    rows = []
    if "kis_all_fresh" in report:
        rows.append(
            "| `kis all` (default: smollm2-135m, 30 layers, 128 known facts, C from 100k tokens), fresh output folder "
            f"| {report['kis_all_fresh']['wall_s']:,.0f} s wall |"
        )
    if "kis_all_cached" in report:
        cached = report["kis_all_cached"]
        walls = cached["wall_s"]
        steps = "; ".join(f"{step} {seconds:.1f} s" for step, seconds in cached["breakdown_s"].items())
        rows.append(
            f"| `kis all` (the default job) again, every C cached | {min(walls):.1f}–{max(walls):.1f} s wall; "
            f"profiled run {cached['profiled_wall_s']:.1f} s: {steps} |"
        )
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------------------------------------------


# The lifelong rows read benchmarks/results/lifelong/ as kis_lens.editing.lifelong_plots does, without importing it
# (this script runs without torch; tests/test_docs_numbers.py checks both agree): one row per finished run, in the
# registry's order; a legacy file of an older kis (no identity in its settings) is named by what it really ran and
# marked superseded.
LIFELONG_ORDER = ("rome", "r-rome", "p-rome", "memit", "alphaedit", "alphaedit-legacy", "emmet", "none")
LIFELONG_LEGACY = {"rome": "p-rome", "memit": "emmet", "alphaedit": "alphaedit-legacy", "none": "none"}


def lifelong_run(result: dict[str, Any], path: Path) -> tuple[str, str, bool]:
    """Return (editor, label, legacy) of one lifelong result file."""
    settings = result["settings"]
    if isinstance(settings.get("identity"), dict):
        editor = settings["identity"]["editor"]
        return editor, (settings.get("editor") or {}).get("label") or editor, False
    old = result.get("editor") or path.stem.removeprefix("lifelong_")
    editor, config = LIFELONG_LEGACY.get(old, old), settings.get("config") or {}
    labels = {
        "p-rome": "p-ROME",
        "emmet": f"EMMET-like fit λ={config.get('covariance_weight', 1.0):g}",
        "alphaedit-legacy": "AlphaEdit-legacy",
        "none": "no edit",
    }
    return editor, labels.get(editor, editor), True


def lanes_beside(folder: Path) -> dict[str, int]:
    """Return how many lanes ran beside each job of the study's compute log (folder/compute.jsonl), by job name."""
    log = folder / "compute.jsonl"
    entries = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()] if log.is_file() else []
    return {entry["job"]: int(entry.get("lanes_beside") or 0) for entry in entries if entry.get("returncode") == 0}


def lifelong_readme_rows(folder: Path) -> list[str]:
    """Return one README row per finished `kis lifelong` run committed in folder (docs/lifelong.md has the rest)."""
    beside = lanes_beside(folder)
    runs = []
    for path in sorted([*folder.glob("lifelong_*.json"), *folder.glob("layer_*/lifelong_*.json")]):
        if ".partial." in path.name:
            continue  # a checkpoint of a run in progress, not a result
        report = load(path)
        editor, label, legacy = lifelong_run(report, path)
        order = LIFELONG_ORDER.index(editor) if editor in LIFELONG_ORDER else len(LIFELONG_ORDER)
        runs.append((order, editor, path.name, report, label, legacy))
    rows = []
    for _, editor, name, report, label, legacy in sorted(runs, key=lambda run: run[:3]):
        summary, settings = report["summary"], report["settings"]
        final, collapse = summary["final"], summary["collapse"]
        model, layer = display(settings["model"]["name"]), settings["config"]["layer"]
        if legacy:
            old = report.get("editor") or name.removeprefix("lifelong_").removesuffix(".json")
            where = f"{label}: legacy `kis lifelong --editor {old}` of an older kis, superseded (docs/lifelong.md)"
        else:
            where = f"{label}: `kis lifelong --editors {editor}`, seed {settings['config']['seed']} (docs/lifelong.md)"
        where += f", {model}, layer {layer}"
        mark = "**superseded** run: " if legacy else ""
        if editor == "none":
            text = (
                f"{mark}unedited baseline: efficacy {final['efficacy']:.2f}, score {final['score']:.2f}, "
                f"held-out perplexity {final['perplexity']:.1f}"
            )
        else:
            collapsed = "no collapse" if collapse["step"] is None else f"collapse after {collapse['step']} edits"
            lanes = beside.get(f"{editor}-seed{settings['config']['seed']}-layer{layer}", 0)
            concurrent = f", concurrent ({lanes} other lane{'s' if lanes > 1 else ''} beside)" if lanes else ""
            # Whether P predicts the drift is judged against its controls in docs/lifelong.md, not quoted bare here.
            text = (
                f"{mark}{final['n_edits']} sequential edits: {collapsed}; final efficacy {final['efficacy']:.2f}, "
                f"perplexity {final['perplexity']:,.1f}; {summary['wall_seconds'] / 60:.0f} min on "
                f"{settings['threads']} thread(s){concurrent}, {summary['seconds_per_edit']:.1f} s per edit"
            )
        rows.append(f"| {where} | {text} |")
    return rows


def load(path: Path) -> dict[str, Any]:
    """Return one JSON file."""
    return json.loads(path.read_text(encoding="utf-8"))


def markdown_files(results_dir: Path = RESULTS_DIR) -> dict[Path, str]:
    """Return {path of the .md beside each benchmark JSON: its rendered text}."""
    files = {
        path.with_suffix(".md"): matrices_markdown(load(path)) for path in sorted(results_dir.glob("matrices_*.json"))
    }
    covariance = results_dir / "covariance.json"
    if covariance.exists():
        files[covariance.with_suffix(".md")] = covariance_markdown(load(covariance))
    return files


def value_search_readme_rows(report: dict[str, Any], forward: dict[str, Any] | None) -> list[str]:
    """Return the README rows of value_search.json (and shifted_forward.json): the fast search and each editor."""
    where = f"{display(report['model'])}, layer {report['layer']}, {report['threads']} threads"
    stop, full = report["with_stopping_rule_summary"], report["all_20_steps_summary"]
    stopped = sum(row["steps_fast"] < 20 for row in report["with_stopping_rule"])
    rows = []
    if forward is not None:
        rows.append(
            f"| one value-search step, exact fast forward vs the hooked full forward (`benchmarks/shifted_forward.py`, "
            f"{where}, {forward['batch']['rows']} prompts) | {forward['fast_step_ms']:,.0f} vs "
            f"{forward['full_step_ms']:,.0f} ms ({forward['speedup']:.1f}×); logits agree to "
            f"{forward['max_relative_logits_difference']:.0e}, gradients to "
            f"{forward['max_relative_gradient_difference']:.0e} |"
        )
    rows.append(
        f"| ROME's compute_v ({report['templates']} templates, 20 steps), fast vs full (`benchmarks/value_search.py`, "
        f"{where}, {len(report['all_20_steps'])} facts) | all 20 steps: {full['median_fast_seconds']:.1f} vs "
        f"{full['median_full_seconds']:.1f} s median ({full['median_speedup']:.1f}×); with ROME's stopping rule: "
        f"{stop['median_fast_seconds']:.1f} vs {stop['median_full_seconds']:.1f} s (it stopped {stopped} of "
        f"{len(report['with_stopping_rule'])} searches before step 20); δ agrees to "
        f"{max(full['max_delta_relative_difference'], stop['max_delta_relative_difference']):.0e} |"
    )
    editors = report.get("editors") or {}
    if editors:
        costs = ", ".join(
            f"{name} {cost['seconds_per_edit']:.1f} s" + (f" (batch of {cost['facts']})" if cost["facts"] > 1 else "")
            for name, cost in editors.items()
        )
        rows.append(
            f"| one edit of each editor, value search included (`benchmarks/value_search.py`, {where}) | {costs} |"
        )
    return rows


def readme_block(results_dir: Path = RESULTS_DIR) -> str:
    """Return the README text between the benchmark markers (the marker lines excluded), ending in a newline."""
    lines = [
        "<!-- Generated by benchmarks/render.py from benchmarks/results/*.json: rerun it, never edit these lines. -->",
        "| what (from `benchmarks/results/*.json`) | number |",
        "|---|---|",
    ]
    commands = results_dir / "commands.json"
    if commands.exists():
        lines += commands_readme_rows(load(commands))
    lines += [reproduction_readme_row(load(path)) for path in sorted(results_dir.glob("reproduction_*.json"))]
    lines += [matrices_readme_row(load(path)) for path in sorted(results_dir.glob("matrices_*.json"))]
    lines += lifelong_readme_rows(results_dir / "lifelong")
    value_search = results_dir / "value_search.json"
    if value_search.exists():
        forward = results_dir / "shifted_forward.json"
        lines += value_search_readme_rows(load(value_search), load(forward) if forward.exists() else None)
    covariance = results_dir / "covariance.json"
    if covariance.exists():
        lines += covariance_readme_lines(load(covariance))
    return "\n".join(lines) + "\n"


def split_readme(text: str) -> tuple[str, str, str]:
    """Return (text up to and including the begin marker's line, the block, text from the end marker's line on)."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"README must hold exactly one {BEGIN} followed by one {END}")
    head, rest = text.split(BEGIN, 1)
    block, tail = rest.split(END, 1)
    if not block.startswith("\n"):
        raise ValueError(f"{BEGIN} must end its line")
    return head + BEGIN + "\n", block[1:], END + tail


def rendered_readme(text: str, results_dir: Path = RESULTS_DIR) -> str:
    """Return the README text with its benchmarks block regenerated."""
    head, _, tail = split_readme(text)
    return head + readme_block(results_dir) + tail


def write_text(path: Path, text: str) -> None:
    """Replace path's text atomically (a temporary file in the same folder, then a rename)."""
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite (or with --check, compare) the .md files and the README block."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file differs")
    parser.add_argument("--results_dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    wanted = markdown_files(args.results_dir)
    wanted[args.readme] = rendered_readme(args.readme.read_text(encoding="utf-8"), args.results_dir)
    stale = [path for path, text in wanted.items() if not path.exists() or path.read_text(encoding="utf-8") != text]
    for path in stale:
        if args.check:
            print(f"differs from benchmarks/render.py's output: {path}")
        else:
            write_text(path, wanted[path])
            print(f"written: {path}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
