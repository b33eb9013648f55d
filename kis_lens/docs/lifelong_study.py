"""docs/lifelong.md of a study: each editor's collapse over several edit orders, and the paper's claims about it.

Everything is read from the runs (kis_lens.editing.lifelong_study) and the causal traces: the rules are the
study module's constants, printed beside the verdicts they produce, once every verdict has its controls. The doc
of one set of runs is kis_lens.docs.lifelong's.

>>> text = render_study_markdown(load_study("benchmarks/results/lifelong"), traces, figures)
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, Sequence

from kis_lens.docs.verdict import markdown_cell
from kis_lens.editing.lifelong_files import editor_label
from kis_lens.editing.lifelong_study import study
from kis_lens.editing.verdicts import RULE as PREDICTION_RULE
from kis_lens.errors import KisError

PLANNED_ORDERS = 3  # edit orders per editor the issue asks for (the doc says when a study has fewer)


def _f(value: Any, digits: int = 3) -> str:
    """Return a number for a table: fixed digits, integers as they are, '—' when missing."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e9 and digits == 3:
            return f"{int(value):,}"  # an edit count that went through a median
        return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)


def _ci(interval: Mapping[str, Any] | None) -> str:
    """Return 'value [low, high]' of a bootstrap interval, '—' when it was not computed."""
    if not interval or interval.get("value") is None:
        return "—"
    if interval.get("low") is None and interval.get("high") is None:
        return _f(interval["value"])  # a value listed without an interval
    return f"{_f(interval['value'])} [{_f(interval.get('low'))}, {_f(interval.get('high'))}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Return a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(markdown_cell(cell) for cell in row) + " |" for row in rows]
    return lines


def _criterion_order(name: str) -> tuple[int, float, str]:
    """Sort the sensitivity criteria: perplexity ratios ascending, then the retention criteria."""
    found = re.search(r"perplexity > ([0-9.]+)", name)
    return (0, float(found.group(1)), name) if found else (1, 0.0, name)


def _who(row: Mapping[str, Any]) -> str:
    """Return how the doc names a row's editor: its label and its registry name."""
    return f"{editor_label(row['editor'])} (`{row['editor']}`)"


def _across_orders(rows: Sequence[Mapping[str, Any]], rule: str) -> list[str]:
    """Return the lines of a per-editor summary over edit orders of one per-run verdict."""
    lines = ["", f"Across orders. Rule: {rule}.", ""]
    if not rows:
        return [*lines, "No run was judged.", ""]
    return lines + _table(
        ("editor", "layer", "orders judged", "seeds", "P − count: median", "range", "across orders"),
        [
            (
                _who(row),
                row["layer"],
                row["n_orders"],
                ", ".join(map(str, row["seeds"])),
                _f(row["gap_median"]),
                f"{_f(row['gap_min'])} … {_f(row['gap_max'])}",
                f"**{row['verdict']}**",
            )
            for row in rows
        ],
    )


def _matched(controls: Sequence[str]) -> str:
    """Return ' (by name, …)' for the controls that flag the disabling edits as well as low ρ."""
    names = {"residual_norm": "‖v* − Wk‖", "previous_probe_perplexity": "previous ppl"}
    return f" (by {', '.join(names.get(name, name) for name in controls)})" if controls else ""


def _trace_section(traces: Sequence[Mapping[str, Any]], figures: Mapping[str, str], layers: Sequence[int]) -> list[str]:
    """Return the causal-trace section: each trace's peak layers, its figure, and the edit layers it justifies."""
    lines = ["## The edit layer: ROME's causal trace", ""]
    if not traces:
        return [*lines, "No causal trace is in this study yet (`kis trace --n_facts 100`).", ""]
    rows = []
    for trace in traces:
        settings = trace.get("settings") or {}
        effects = trace.get("mean_indirect_effect") or []
        rows.append(
            (
                settings.get("window"),
                len(trace.get("facts") or []),
                trace.get("peak_layer"),
                trace.get("peak_layer_early"),
                _f(max(effects) if effects else None),
                _f(effects[layers[0]] if effects and layers and layers[0] < len(effects) else None),
            )
        )
    lines += _table(
        ("window", "facts", "peak layer", "peak among the first half", "peak indirect effect", f"at layer {layers[0]}"),
        rows,
    )
    lines += [
        "",
        "The indirect effect of restoring the MLP output at the subject's last token (with the subject embeddings "
        "noised, 3× their std, 10 samples) averaged over known facts. The edits are made at the early peak, and a "
        f"second layer is run as a check (edit layers in this study: {', '.join(str(layer) for layer in layers)}).",
        "",
    ]
    for name, path in figures.items():
        if name.startswith("causal_trace"):
            lines += [f"![{name}]({path})", ""]
    return lines


def render_study_markdown(
    runs: Sequence[Mapping[str, Any]],
    traces: Sequence[Mapping[str, Any]] = (),
    figures: Mapping[str, str] | None = None,
    compute: Sequence[Mapping[str, Any]] = (),
    *,
    source: str = "benchmarks/results/lifelong",
    n_boot: int = 1000,
) -> str:
    """Return docs/lifelong.md for a study: collapse per editor and order, its sensitivity, the ρ alarm, the
    controlled P-prediction verdicts, forgetting, the predictors of the collapse step and AlphaEdit vs ROME."""
    if not runs:
        raise KisError("no lifelong runs to write a document from: run `kis lifelong` (benchmarks/lifelong_runs.py)")
    figures = dict(figures or {})
    numbers = study(list(runs), n_boot=n_boot)
    rules = numbers["rules"]
    config = (runs[0].get("settings") or {}).get("config") or {}
    model = ((runs[0].get("settings") or {}).get("model") or {}).get("name", config.get("model_name"))
    layers = sorted({int(row["layer"]) for row in numbers["runs"]})
    orders: dict[str, set[int]] = {}
    for row in numbers["runs"]:
        orders.setdefault(row["editor"], set()).add(int(row["seed"]))
    short = [editor for editor, seeds in orders.items() if editor != "none" and len(seeds) < PLANNED_ORDERS]
    lines = [
        f"# Lifelong editing on {model}: {len(runs)} runs, {len(orders)} editors",
        "",
        f"Generated from `{source}` by `benchmarks/lifelong.py` (kis_lens.docs.lifelong_study); do not edit by hand.",
        "",
    ]
    if short:
        lines += [
            f"> **Interim.** Fewer than {PLANNED_ORDERS} edit orders so far for: "
            + ", ".join(f"`{e}` ({len(orders[e])})" for e in short)
            + ". Verdicts across orders are given for what has run; the runs still queued are in "
            "`benchmarks/lifelong_runs.py`.",
            "",
        ]
    lines += [
        "Each editor writes the MLP output weights for real, one CounterFact fact (or MEMIT/AlphaEdit batch) after "
        "another; an edit order is a seed, so runs with the same seed edit the same facts in the same sequence. "
        "A probe (every "
        f"{config.get('probe_every')} edits) measures efficacy on all edits so far, retention of the oldest quarter, "
        "held-out perplexity and the weight statistics; a full evaluation (every "
        f"{config.get('eval_every')}) adds paraphrase, neighborhood and fluency. Argmax efficacy is teacher-forced "
        "(every target token the argmax; no text is generated). Fluency is the n-gram entropy of greedy text "
        f"({config.get('fluency_tokens')} tokens after the first generation prompt of {config.get('fluency_prompts')} "
        "records): not ROME's sampled protocol, not comparable with published values.",
        "",
        "## Runs",
        "",
    ]
    lines += _table(
        ("editor", "order (seed)", "layer", "edits", "file"),
        [(_who(row), row["seed"], row["layer"], _edits(runs, row), f"`{row['source']}`") for row in numbers["runs"]],
    )
    lines += ["", *_trace_section(traces, figures, layers)]
    lines += ["## Collapse", "", f"Rule: {rules['collapse']}.", ""]
    lines += _table(
        ("editor", "layer", "orders", "collapsed", "median collapse step", "range", "verdict"),
        [
            (
                _who(row),
                row["layer"],
                row["n_orders"],
                row["n_collapsed"],
                _f(row["median"])
                if row["median"] is not None
                else (f"> {_f(row['median_above'])}" if row.get("median_above") is not None else "—"),
                f"{_f(row['min'])}–{_f(row['max'])}" if row["min"] is not None else "—",
                f"**{row['verdict']}**",
            )
            for row in numbers["collapse_by_editor"]
        ],
    )
    first = numbers["collapse_rows"][0] if numbers["collapse_rows"] else {}
    criteria = sorted((first.get("collapse_sensitivity") or {}).keys(), key=_criterion_order)
    lines += [
        "",
        "Sensitivity: the first probe at which each criterion holds (— never within the run). The stated criterion "
        f"is `{(numbers['collapse_rows'] or [{}])[0].get('collapse_criterion', '—')}`.",
        "",
    ]
    lines += _table(
        ("editor", "order", "layer", "edits", "collapse", *criteria, "first disabling edit", "hours"),
        [
            (
                _who(row),
                row["seed"],
                row["layer"],
                row["edits_made"],
                _f(row["collapse_step"]),
                *[_f((row.get("collapse_sensitivity") or {}).get(name)) for name in criteria],
                _f(row["first_disabling_edit"]),
                _f(row["wall_hours"], 2),
            )
            for row in numbers["collapse_rows"]
        ],
    )
    lines += ["", "## ρ as an alarm for disabling edits", ""]
    lines += [
        "ρ = (C⁻¹k̄)ᵀk / (C⁻¹k̄)ᵀk̄ is a P entry between a fact's template-averaged and plain keys, known before the "
        "edit is applied. A disabling edit: ‖ΔW‖ above 10× the running median, then held-out perplexity ×1.5. "
        "AUROC of each score for the disabling edits (— where a run has none). " + f"Rule: {rules['rho_alarm']}.",
        "",
    ]
    lines += _table(
        (
            "editor",
            "order",
            "layer",
            "edits",
            "disabling",
            "AUROC low ρ",
            "AUROC ‖v* − Wk‖",
            "AUROC previous ppl",
            "low ρ − ‖v* − Wk‖ either way",
            "low ρ − previous ppl either way",
            "verdict",
        ),
        [
            (
                _who(row),
                row["seed"],
                row["layer"],
                row["n_edits"],
                row["n_disabling"],
                _f(row["low_rho"]),
                _f(row["residual_norm"]),
                _f(row["previous_probe_perplexity"]),
                _ci(row["gaps"].get("residual_norm")),
                _ci(row["gaps"].get("previous_probe_perplexity")),
                f"**{row['verdict']}**" + _matched(row["matched_by"]),
            )
            for row in numbers["rho_alarm_rows"]
        ],
    )
    lines += ["", "## Does P predict the interference? Against every control", ""]
    rule = PREDICTION_RULE
    lines += [
        "For each earlier edit u at each probe, the target is the rise in u's NLL of its new target since its edit. "
        "Spearman of each predictor with it, with 95% intervals from a bootstrap clustered by edit (n = the edits "
        "judged, not the pairs); pairs whose subject is edited again later are left out. " + f"Rule: {rule}.",
        "",
    ]
    prediction = []
    for row in numbers["prediction_rows"]:
        controls = row.get("prediction_controls") or {}
        spearman, difference = controls.get("spearman") or {}, controls.get("difference") or {}
        prediction.append(
            (
                _who(row),
                row["seed"],
                row["layer"],
                _f(row.get("n_edits_judged")),
                _ci(spearman.get("predicted")),
                _ci(spearman.get("later_count")),
                _ci(spearman.get("later_residual_norm")),
                _ci(spearman.get("predicted_shuffled")),
                _ci(difference.get("later_count")),
                _ci(controls.get("partial_given_count")),
                f"**{row['verdict']}**",
            )
        )
    lines += _table(
        (
            "editor",
            "order",
            "layer",
            "edits judged",
            "P",
            "later-edit count",
            "√Σ‖r‖² later",
            "shuffled P",
            "P − count",
            "partial given the count",
            "verdict",
        ),
        prediction,
    )
    lines += [
        "",
        "Listed, never judged (algebraic identities or close to them): P's prediction against the measured change of "
        "the layer output at k_u — "
        + "; ".join(
            f"{row['editor']} order {row['seed']}: {_f((row.get('output_correlation') or {}).get('spearman'))}"
            for row in numbers["prediction_rows"]
            if row.get("output_correlation")
        )
        + ".",
    ]
    lines += _across_orders(numbers["prediction_across_orders"], rules["across_orders"])
    lines += [
        "",
        "## Which earlier edits are lost: P against the count",
        "",
        f"Rule: {rules['forgetting']}.",
        "",
    ]
    lines += _table(
        (
            "editor",
            "order",
            "layer",
            "lost / kept",
            "AUROC P",
            "AUROC count",
            "AUROC shuffled P",
            "P − count",
            "verdict",
        ),
        [
            (
                _who(row),
                row["seed"],
                row["layer"],
                f"{_f(row.get('n_lost'))} / {_f(row.get('n_kept'))}",
                _ci((row.get("auroc") or {}).get("predicted")),
                _ci((row.get("auroc") or {}).get("later_count")),
                _ci((row.get("auroc") or {}).get("predicted_shuffled")),
                _ci(row.get("difference")),
                f"**{row['verdict']}**",
            )
            for row in numbers["forgetting_rows"]
        ],
    )
    lines += _across_orders(numbers["forgetting_across_orders"], rules["across_orders"])
    predictors = numbers["collapse_predictors"]
    lines += ["", "## What predicts the collapse step", "", f"Rule: {rules['predictors']}.", ""]
    if predictors.get("too_few"):
        lines += [f"**{predictors.get('note')}**", ""]
    lines += _table(
        ("predictor", "Spearman with edits left", "abs ρ minus the count's", "beats the count", "CV at the last step"),
        [
            (
                name,
                _ci(entry.get("spearman")),
                _ci(entry.get("abs_spearman_minus_n_edits")),
                _f(entry.get("beats_n_edits")),
                _f(entry.get("variation_at_last_step")),
            )
            for name, entry in (predictors.get("predictors") or {}).items()
        ],
    )
    paired = numbers["paired_comparison"]
    lines += ["", "## AlphaEdit against ROME, order by order", "", f"Rule: {paired.get('rule')}.", ""]
    for layer in paired.get("layers") or []:
        lines += [
            f"Layer {layer.get('layer')}, {layer.get('n_orders')} paired order(s): **{layer.get('verdict')}**.",
            "",
        ]
        outcome_rows = [
            (
                o.get("seed"),
                _f(o.get("collapse_a")),
                _f(o.get("collapse_b")),
                o.get("collapse_outcome"),
                _f(o.get("favours_a")),
            )
            for o in layer.get("orders") or []
        ]
        if outcome_rows:
            lines += _table(
                ("order", "AlphaEdit collapses at", "ROME collapses at", "outcome", "favours AlphaEdit"), outcome_rows
            )
            lines += [""]
        difference_rows = []
        for metric, entries in (layer.get("by_metric") or {}).items():
            for entry in [e for e in entries if e.get("n_edits")][-3:]:  # the last counts both measured
                difference_rows.append(
                    (
                        metric,
                        _f(entry.get("n_edits")),
                        _f(entry.get("mean")),
                        f"{_f(entry.get('min'))} … {_f(entry.get('max'))}",
                        f"{entry.get('a_better')} of {entry.get('n_orders')}",
                    )
                )
        if difference_rows:
            lines += _table(
                ("metric", "edits", "mean AlphaEdit − ROME", "range over orders", "AlphaEdit better in"),
                difference_rows,
            )
            lines += [""]
        edit_rows = [
            (metric, _f(entry["n_edits"]), entry["n_orders"], _f(entry["n_clusters"]), _ci(entry))
            for metric, entries in layer["by_edit"].items()
            for entry in entries[-3:]
        ]
        if edit_rows:
            lines += [
                "Edit by edit: the two runs of an order edit the same facts, so each earlier edit's rewrite success "
                "under AlphaEdit minus under ROME at the same probe, averaged over the paired orders' edits, with a "
                "95% interval from a bootstrap over (order, edit). Retention is the oldest quarter's exactly; "
                "efficacy counts the edits before the newest (AlphaEdit: before its newest batch).",
                "",
            ]
            lines += _table(("metric", "edits", "orders", "edits compared", "AlphaEdit − ROME"), edit_rows)
            lines += [""]
    lines += ["## Figures", ""]
    for name, path in figures.items():
        if not name.startswith("causal_trace"):
            lines += [f"![{name}]({path})", ""]
    if compute:
        lines += [
            "## Compute",
            "",
            "Each run as `benchmarks/lifelong_runs.py` ran it: one thread, with the other lane "
            "running beside it (timings labelled concurrent). Wall hours are those of the job's last start: a run "
            "stopped and resumed from its checkpoint counts only the part after the restart here, while the last "
            "column of the sensitivity table is the run's own compute over all its starts.",
            "",
        ]
        lines += _table(
            ("job", "command", "wall hours (last start)", "lanes beside", "commit"),
            [
                (
                    e["job"],
                    f"`{e['command']}`",
                    _f(e["wall_seconds"] / 3600, 2),
                    e.get("lanes_beside"),
                    str(e.get("commit", ""))[:10],
                )
                for e in compute
            ],
        )
        lines += [""]
    lines += [
        "<details><summary>the settings all runs share</summary>",
        "",
        "```json",
        json.dumps(
            {k: v for k, v in config.items() if k not in ("seed", "editors", "output_dir")},
            indent=2,
            sort_keys=True,
            default=str,
        ),
        "```",
        "",
        "</details>",
    ]
    return "\n".join(lines) + "\n"


def _edits(runs: Sequence[Mapping[str, Any]], row: Mapping[str, Any]) -> str:
    """Return the edits made by the run a study row names."""
    for run in runs:
        config = (run.get("settings") or {}).get("config") or {}
        if (run["editor"], config.get("seed"), config.get("layer")) == (row["editor"], row["seed"], row["layer"]):
            return _f(len(run.get("edits") or []))
    return "—"
