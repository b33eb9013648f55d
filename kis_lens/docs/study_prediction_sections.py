"""The sections of a study doc on P: does it predict the NLL rise and the lost edits, over whole runs and before
the collapse, each per run and across edit orders (the table helpers are kis_lens.docs.study_sections')."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from kis_lens.docs.study_sections import cell, editor_cell, interval_cell, table
from kis_lens.editing.verdicts import RULE as PREDICTION_RULE

_SHOWN = {  # the predictors whose Spearman a table shows: every control over whole runs, P and the count before
    False: ("predicted", "later_count", "later_residual_norm", "predicted_shuffled"),
    True: ("predicted", "later_count"),
}
_SHOWN_AUROC = {False: ("predicted", "later_count", "predicted_shuffled"), True: ("predicted", "later_count")}
_AUROC_NAMES = {"predicted": "AUROC P", "later_count": "AUROC count", "predicted_shuffled": "AUROC shuffled P"}
_NAMES = {
    "predicted": "P",
    "later_count": "later-edit count",
    "later_residual_norm": "√Σ‖r‖² later",
    "predicted_shuffled": "shuffled P",
}


def _across_orders(rows: Sequence[Mapping[str, Any]], rule: str) -> list[str]:
    """Return the lines of a per-editor summary over edit orders of one per-run verdict."""
    lines = ["", f"Across orders. Rule: {rule}.", ""]
    if not rows:
        return [*lines, "No run was judged.", ""]
    return lines + table(
        ("editor", "layer", "orders judged", "seeds", "P − count: median", "range", "across orders"),
        [
            (
                editor_cell(row),
                row["layer"],
                row["n_orders"],
                ", ".join(map(str, row["seeds"])),
                cell(row["gap_median"]),
                f"{cell(row['gap_min'])} … {cell(row['gap_max'])}",
                f"**{row['verdict']}**",
            )
            for row in rows
        ],
    )


def _run_cells(row: Mapping[str, Any], before_collapse: bool) -> tuple[Any, ...]:
    """Return a per-run row's first cells: editor, order, layer (and its collapse step before the collapse)."""
    found = (editor_cell(row), row["seed"], row["layer"])
    return (*found, row["collapse_step"]) if before_collapse else found


def _prediction_table(rows: Sequence[Mapping[str, Any]], before_collapse: bool = False) -> list[str]:
    """Return the table of P's Spearman with the NLL rise against each control, per run."""
    found = []
    for row in rows:
        controls = row.get("prediction_controls") or {}
        spearman, difference = controls.get("spearman") or {}, controls.get("difference") or {}
        found.append(
            (
                *_run_cells(row, before_collapse),
                cell(row.get("n_edits_judged")),
                *(interval_cell(spearman.get(name)) for name in _SHOWN[before_collapse]),
                interval_cell(difference.get("later_count")),
                interval_cell(controls.get("partial_given_count")),
                f"**{row['verdict']}**",
            )
        )
    header = ("editor", "order", "layer", *(("collapse step",) if before_collapse else ()), "edits judged")
    header += tuple(_NAMES[name] for name in _SHOWN[before_collapse])
    return table((*header, "P − count", "partial given the count", "verdict"), found)


def _forgetting_table(rows: Sequence[Mapping[str, Any]], before_collapse: bool = False) -> list[str]:
    """Return the table of the lost-edit AUROCs of P and the count, per run."""
    shown = _SHOWN_AUROC[before_collapse]
    header = ("editor", "order", "layer", *(("collapse step",) if before_collapse else ()), "lost / kept")
    header += tuple(_AUROC_NAMES[name] for name in shown)
    return table(
        (*header, "P − count", "verdict"),
        [
            (
                *_run_cells(row, before_collapse),
                f"{cell(row.get('n_lost'))} / {cell(row.get('n_kept'))}",
                *(interval_cell((row.get("auroc") or {}).get(name)) for name in shown),
                interval_cell(row.get("difference")),
                f"**{row['verdict']}**",
            )
            for row in rows
        ],
    )


def prediction_sections(numbers: Mapping[str, Any]) -> list[str]:
    """Return P's prediction of the NLL rise and of the lost edits, per order and across orders."""
    rules = numbers["rules"]
    lines = ["", "## Does P predict the interference? Against every control", ""]
    lines += [
        "For each earlier edit u at each probe, the target is the rise in u's NLL of its new target since its edit. "
        "Spearman of each predictor with it, with 95% intervals from a bootstrap clustered by edit (n = the edits "
        f"judged, not the pairs); pairs whose subject is edited again later are left out. Rule: {PREDICTION_RULE}.",
        "",
    ]
    lines += _prediction_table(numbers["prediction_rows"])
    several_layers = len({row["layer"] for row in numbers["prediction_rows"]}) > 1

    def where(row: Mapping[str, Any]) -> str:
        return f" layer {row['layer']}" if several_layers else ""

    lines += [
        "",
        "Listed, never judged (algebraic identities or close to them): P's prediction against the measured change of "
        "the layer output at k_u — "
        + "; ".join(
            f"{row['editor']} order {row['seed']}{where(row)}: "
            f"{cell((row.get('output_correlation') or {}).get('spearman'))}"
            for row in numbers["prediction_rows"]
            if row.get("output_correlation")
        )
        + ".",
    ]
    lines += _across_orders(numbers["prediction_across_orders"], rules["across_orders"])
    lines += ["", "## Which earlier edits are lost: P against the count", "", f"Rule: {rules['forgetting']}.", ""]
    lines += _forgetting_table(numbers["forgetting_rows"])
    return lines + _across_orders(numbers["forgetting_across_orders"], rules["across_orders"])


def before_collapse_section(numbers: Mapping[str, Any]) -> list[str]:
    """Return both P verdicts again on the probes before each collapsed run's collapse, and across orders."""
    early, rules = numbers["before_collapse"], numbers["rules"]
    lines = ["", "## Before the collapse: the same verdicts on the earlier probes", ""]
    lines += [f"Rule: {rules['before_collapse']}.", ""]
    if not early["prediction_rows"]:
        return [*lines, "No run collapsed: every verdict above is already one before a collapse.", ""]
    lines += ["P against the rise in each earlier edit's NLL:", ""]
    lines += _prediction_table(early["prediction_rows"], before_collapse=True)
    lines += _across_orders(early["prediction_across_orders"], rules["across_orders"])
    lines += ["", "P against the count for the lost edits:", ""]
    lines += _forgetting_table(early["forgetting_rows"], before_collapse=True)
    return lines + _across_orders(early["forgetting_across_orders"], rules["across_orders"])
