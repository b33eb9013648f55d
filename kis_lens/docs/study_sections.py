"""The sections of a lifelong study's docs/lifelong.md: one function per table group, from study() numbers.

P's sections (its prediction and the lost edits, over whole runs and before the collapse) are
kis_lens.docs.study_prediction_sections'. kis_lens.docs.lifelong_study assembles them with the header, the runs,
the figures and the compute log; the rules printed beside each verdict are those of kis_lens.editing.lifelong_study.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from kis_lens.docs.verdict import markdown_cell
from kis_lens.editing.lifelong_files import editor_label


def cell(value: Any, digits: int = 3) -> str:
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


def interval_cell(interval: Mapping[str, Any] | None) -> str:
    """Return 'value [low, high]' of a bootstrap interval, '—' when it was not computed."""
    if not interval or interval.get("value") is None:
        return "—"
    if interval.get("low") is None and interval.get("high") is None:
        return cell(interval["value"])  # a value listed without an interval
    return f"{cell(interval['value'])} [{cell(interval.get('low'))}, {cell(interval.get('high'))}]"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Return a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(markdown_cell(cell) for cell in row) + " |" for row in rows]
    return lines


def _criterion_order(name: str) -> tuple[int, float, str]:
    """Sort the sensitivity criteria: perplexity ratios ascending, then the retention criteria."""
    found = re.search(r"perplexity > ([0-9.]+)", name)
    return (0, float(found.group(1)), name) if found else (1, 0.0, name)


def figure_line(name: str, path: str) -> str:
    """Return a figure's Markdown: the image where it is one, a link to its interactive HTML where it is not."""
    return f"[{name} (interactive)]({path})" if path.endswith(".html") else f"![{name}]({path})"


def editor_cell(row: Mapping[str, Any]) -> str:
    """Return how the doc names a row's editor: its label and its registry name."""
    return f"{editor_label(row['editor'])} (`{row['editor']}`)"


def _matched(controls: Sequence[str]) -> str:
    """Return ' (by name, …)' for the controls that flag the disabling edits as well as low ρ."""
    names = {"residual_norm": "‖v* − Wk‖", "previous_probe_perplexity": "previous ppl"}
    return f" (by {', '.join(names.get(name, name) for name in controls)})" if controls else ""


def trace_section(traces: Sequence[Mapping[str, Any]], figures: Mapping[str, str], layers: Sequence[int]) -> list[str]:
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
                cell(max(effects) if effects else None),
                cell(effects[layers[0]] if effects and layers and layers[0] < len(effects) else None),
            )
        )
    lines += table(
        ("window", "facts", "peak layer", "peak among the first half", "peak indirect effect", f"at layer {layers[0]}"),
        rows,
    )
    lines += [
        "",
        "The indirect effect of restoring the MLP output at the subject's last token (with the subject embeddings "
        "noised, 3× their std, 10 samples) averaged over known facts. A window of w restores the MLP outputs of w "
        "consecutive layers around each layer: ROME's trace uses 10, and window 1 restores the layer alone. The edits "
        "are made at the early peak of the widest window, and a second layer is run as a check (edit layers in this "
        f"study: {', '.join(str(layer) for layer in layers)}).",
        "",
    ]
    for name, path in figures.items():
        if name.startswith("causal_trace"):
            lines += [figure_line(name, path), ""]
    return lines


def collapse_section(numbers: Mapping[str, Any]) -> list[str]:
    """Return the collapse verdicts per editor and the sensitivity table per run."""
    rules = numbers["rules"]
    lines: list[str] = []
    lines += ["## Collapse", "", f"Rule: {rules['collapse']}.", ""]
    lines += table(
        ("editor", "layer", "orders", "collapsed", "median collapse step", "range", "verdict"),
        [
            (
                editor_cell(row),
                row["layer"],
                row["n_orders"],
                row["n_collapsed"],
                cell(row["median"])
                if row["median"] is not None
                else (f"> {cell(row['median_above'])}" if row.get("median_above") is not None else "—"),
                f"{cell(row['min'])}–{cell(row['max'])}" if row["min"] is not None else "—",
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
    lines += table(
        ("editor", "order", "layer", "edits", "collapse", *criteria, "first disabling edit", "hours"),
        [
            (
                editor_cell(row),
                row["seed"],
                row["layer"],
                row["edits_made"],
                cell(row["collapse_step"]),
                *[cell((row.get("collapse_sensitivity") or {}).get(name)) for name in criteria],
                cell(row["first_disabling_edit"]),
                cell(row["wall_hours"], 2),
            )
            for row in numbers["collapse_rows"]
        ],
    )
    return lines


def rho_section(numbers: Mapping[str, Any]) -> list[str]:
    """Return the ρ alarm per run: AUROCs, the gaps to each control and the verdict."""
    rules = numbers["rules"]
    lines: list[str] = []
    lines += ["", "## ρ as an alarm for disabling edits", ""]
    lines += [
        "ρ = (C⁻¹k̄)ᵀk / (C⁻¹k̄)ᵀk̄ is a P entry between a fact's template-averaged and plain keys, known before the "
        "edit is applied. A disabling edit: ‖ΔW‖ above 10× the running median, then held-out perplexity ×1.5. "
        "AUROC of each score for the disabling edits (— where a run has none). " + f"Rule: {rules['rho_alarm']}.",
        "",
    ]
    lines += table(
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
                editor_cell(row),
                row["seed"],
                row["layer"],
                row["n_edits"],
                row["n_disabling"],
                cell(row["low_rho"]),
                cell(row["residual_norm"]),
                cell(row["previous_probe_perplexity"]),
                interval_cell(row["gaps"].get("residual_norm")),
                interval_cell(row["gaps"].get("previous_probe_perplexity")),
                f"**{row['verdict']}**" + _matched(row["matched_by"]),
            )
            for row in numbers["rho_alarm_rows"]
        ],
    )
    return lines


def predictors_section(numbers: Mapping[str, Any]) -> list[str]:
    """Return which step-level number tracks the edits left before collapse."""
    rules = numbers["rules"]
    lines: list[str] = []
    predictors = numbers["collapse_predictors"]
    lines += ["", "## What predicts the collapse step", "", f"Rule: {rules['predictors']}.", ""]
    if predictors.get("too_few"):
        lines += [f"**{predictors.get('note')}**", ""]
    lines += table(
        ("predictor", "Spearman with edits left", "abs ρ minus the count's", "beats the count", "CV at the last step"),
        [
            (
                name,
                interval_cell(entry.get("spearman")),
                interval_cell(entry.get("abs_spearman_minus_n_edits")),
                cell(entry.get("beats_n_edits")),
                cell(entry.get("variation_at_last_step")),
            )
            for name, entry in (predictors.get("predictors") or {}).items()
        ],
    )
    return lines


def paired_section(numbers: Mapping[str, Any]) -> list[str]:
    """Return AlphaEdit against ROME order by order, and edit by edit with intervals."""
    lines: list[str] = []
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
                cell(o.get("collapse_a")),
                cell(o.get("collapse_b")),
                o.get("collapse_outcome"),
                cell(o.get("favours_a")),
            )
            for o in layer.get("orders") or []
        ]
        if outcome_rows:
            lines += table(
                ("order", "AlphaEdit collapses at", "ROME collapses at", "outcome", "favours AlphaEdit"), outcome_rows
            )
            lines += [""]
        difference_rows = []
        for metric, entries in (layer.get("by_metric") or {}).items():
            for entry in [e for e in entries if e.get("n_edits")][-3:]:  # the last counts both measured
                difference_rows.append(
                    (
                        metric,
                        cell(entry.get("n_edits")),
                        cell(entry.get("mean")),
                        f"{cell(entry.get('min'))} … {cell(entry.get('max'))}",
                        f"{entry.get('a_better')} of {entry.get('n_orders')}",
                    )
                )
        if difference_rows:
            lines += table(
                ("metric", "edits", "mean AlphaEdit − ROME", "range over orders", "AlphaEdit better in"),
                difference_rows,
            )
            lines += [""]
        edit_rows = [
            (metric, cell(entry["n_edits"]), entry["n_orders"], cell(entry["n_clusters"]), interval_cell(entry))
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
            lines += table(("metric", "edits", "orders", "edits compared", "AlphaEdit − ROME"), edit_rows)
            lines += [""]
    return lines


# The sections' GitHub anchors (their headings, lower-cased, punctuation dropped, spaces as hyphens).
ANCHORS = {
    "collapse": "#collapse",
    "prediction": "#does-p-predict-the-interference-against-every-control",
    "forgetting": "#which-earlier-edits-are-lost-p-against-the-count",
    "before": "#before-the-collapse-the-same-verdicts-on-the-earlier-probes",
    "rho": "#ρ-as-an-alarm-for-disabling-edits",
    "paired": "#alphaedit-against-rome-order-by-order",
    "predictors": "#what-predicts-the-collapse-step",
}


def glance_section(numbers: Mapping[str, Any]) -> list[str]:
    """Return every verdict of the study in one table, each row linking the section that states its rule."""

    def claim(text: str, section: str) -> str:
        return f"[{text}]({ANCHORS[section]})"

    rows: list[tuple[str, str, Any, str]] = []
    for row in numbers["collapse_by_editor"]:
        if row["editor"] != "none":
            rows.append((claim("collapse", "collapse"), editor_cell(row), row["layer"], row["verdict"]))
    for text, section, key in (
        ("P predicts the NLL rise beyond the later-edit count", "prediction", "prediction_across_orders"),
        ("P finds the lost edits beyond the count", "forgetting", "forgetting_across_orders"),
    ):
        rows += [(claim(text, section), editor_cell(row), row["layer"], row["verdict"]) for row in numbers[key]]
    early = numbers["before_collapse"]
    for text, key in (
        ("P predicts the NLL rise beyond the count, before the collapse", "prediction_across_orders"),
        ("P finds the lost edits beyond the count, before the collapse", "forgetting_across_orders"),
    ):
        rows += [(claim(text, "before"), editor_cell(row), row["layer"], row["verdict"]) for row in early[key]]
    for row in numbers["rho_alarm_rows"]:
        who, verdict = f"{editor_cell(row)}, order {row['seed']}", row["verdict"] + _matched(row["matched_by"])
        rows.append((claim("low ρ flags the disabling edits", "rho"), who, row["layer"], verdict))
    for layer in numbers["paired_comparison"].get("layers") or []:
        who = f"AlphaEdit vs ROME, {layer['n_orders']} paired order(s)"
        rows.append((claim("AlphaEdit holds longer than ROME", "paired"), who, layer["layer"], layer["verdict"]))
    predictors = numbers["collapse_predictors"]
    beating = [name for name, entry in (predictors.get("predictors") or {}).items() if entry.get("beats_n_edits")]
    if predictors.get("too_few"):
        found = f"not judged: {predictors.get('n_runs')} collapsed run(s)"
    else:
        found = ", ".join(beating) + " beat(s) the count" if beating else "none beats the count"
    rows.append((claim("a number predicts the collapse step", "predictors"), "all", "—", found))
    lines = ["## At a glance", "", "Every verdict below, each beside its rule in the section it links.", ""]
    return lines + table(("claim", "editor", "layer", "verdict"), [(c, e, la, f"**{v}**") for c, e, la, v in rows])
