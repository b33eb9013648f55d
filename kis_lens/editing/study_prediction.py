"""Whether P predicts what a lifelong study's runs forget: each run's P-prediction verdict, AUROCs for lost edits."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from kis_lens.editing.lifelong_result import MIN_PREDICTION_EDITS, controlled_prediction, judged_pairs
from kis_lens.editing.study_runs import (
    MIN_ORDERS,
    NOT_JUDGED,
    collapse_step,
    editor_rank,
    identification,
    moved_weights,
    run_key,
    run_name,
    run_summary,
)
from kis_lens.editing.verdicts import PREDICTORS, auroc, clustered_auroc_bootstrap, draws_interval
from kis_lens.errors import KisError

RULE_FORGETTING = (
    "per run, over the judged pairs (an earlier edit whose subject is never edited again) whose earlier edit "
    "succeeded right after it was made: lost = its rewrite no longer succeeds at the probe. 'P beats the count' only "
    "where the AUROC of P for lost minus the AUROC of later_count, on the same resample of a bootstrap clustered by "
    "edit, has its interval above 0; 'not judged' where no edit was lost or none was kept"
)


RULE_ACROSS_ORDERS = (
    "per editor and layer, over its orders whose run was judged: 'in every order' only where the run's verdict holds "
    f"in each of at least {MIN_ORDERS} orders; 'in k of n orders' where it holds in some, or in every one of fewer "
    f"than {MIN_ORDERS}; 'in no order' where it holds in none. P minus the count is given as its median and range "
    "over those orders"
)

RULE_BEFORE_COLLAPSE = (
    "per run that collapsed: both verdicts above, by their own rules and bootstrap, on the pairs of the probes before "
    "its collapse step only (n_edits < the step), where a collapsed model's forgetting of everything cannot carry "
    f"them; not judged where fewer than {MIN_PREDICTION_EDITS} earlier edits are judged there. A run that never "
    "collapsed is judged on all its probes above"
)

OUTPUT_CORRELATION_NOTE = (
    "listed, not judged: an algebraic identity for p-ROME (rank-one along C⁻¹k) and close to one for ROME/MEMIT"
)


def _judged(run: Mapping[str, Any]) -> dict[str, list[Any]]:
    pairs = run.get("pairs") or {}
    return judged_pairs(pairs) if pairs else {}


def prediction_rows(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return per run the P-prediction verdict and controls its summary holds, and the output correlation (listed)."""
    rows = []
    for run in runs:
        summary = run_summary(run)
        verdict = summary.get("prediction_verdict") or {}
        rows.append(
            {
                **identification(run),
                "verdict": verdict.get("verdict", NOT_JUDGED),
                "reasons": list(verdict.get("reasons") or []),
                "prediction_controls": summary.get("prediction_controls"),
                "n_edits_judged": len(set(_judged(run).get("edit_index") or [])),
                "repeated_subjects": summary.get("repeated_subjects"),
                "output_correlation": (summary.get("correlations") or {}).get("predicted_vs_output"),
                "output_correlation_note": OUTPUT_CORRELATION_NOTE,
            }
        )
    return rows


def _prediction_gap(row: Mapping[str, Any]) -> float | None:
    """Return a prediction row's Spearman of P minus that of the later-edit count (None where not measured)."""
    gap = ((row.get("prediction_controls") or {}).get("difference") or {}).get("later_count") or {}
    return gap.get("value")


def _forgetting_gap(row: Mapping[str, Any]) -> float | None:
    """Return a forgetting row's AUROC of P minus that of the later-edit count (None where not measured)."""
    return (row.get("difference") or {}).get("value")


def across_orders(
    rows: Sequence[Mapping[str, Any]], holds: str, gap: Callable[[Mapping[str, Any]], float | None]
) -> list[dict[str, Any]]:
    """Return per editor and layer in how many judged orders a per-run verdict `holds`, and P − count over them."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for row in rows:
        if row["verdict"] != NOT_JUDGED:
            groups.setdefault((row["editor"], row["layer"]), []).append(row)
    summary = []
    for (editor, layer), members in sorted(groups.items(), key=lambda item: (editor_rank(item[0][0]), item[0][1])):
        n, k = len(members), sum(row["verdict"] == holds for row in members)
        gaps = [value for value in map(gap, members) if value is not None]
        if k == n and n >= MIN_ORDERS:
            verdict = f"{holds} in every order"
        elif k:
            verdict = f"{holds} in {k} of {n} order{'s' if n > 1 else ''}"
        else:
            verdict = f"{holds} in no order"
        summary.append(
            {
                "editor": editor,
                "layer": layer,
                "seeds": sorted(int(row["seed"]) for row in members),
                "n_orders": n,
                "n_holding": k,
                "gap_median": float(np.median(gaps)) if gaps else None,
                "gap_min": min(gaps) if gaps else None,
                "gap_max": max(gaps) if gaps else None,
                "verdict": verdict,
            }
        )
    return summary


def prediction_across_orders(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return per editor and layer in how many orders P's prediction is reproduced (rows of prediction_rows)."""
    return across_orders(rows, "reproduced", _prediction_gap)


def forgetting_across_orders(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return per editor and layer in how many orders P beats the count for lost edits (rows of forgetting_rows)."""
    return across_orders(rows, "P beats the count", _forgetting_gap)


def _forgetting_columns(run: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Return the judged pairs whose earlier edit succeeded right after it was made, with a "lost" column."""
    pairs, edits = _judged(run), run.get("edits") or []
    if not pairs:
        return {}
    missing = [name for name in ("edit_index", "success_now", *PREDICTORS) if name not in pairs]
    if missing:
        raise KisError(
            f"{run_name(run)}'s pairs lack {', '.join(missing)}: an older kis wrote it; rerun it with `kis lifelong`"
        )
    keep = []
    for row, index in enumerate(pairs["edit_index"]):
        if not 0 <= int(index) < len(edits):
            raise KisError(f"{run_name(run)} has a pair of edit {index} but only {len(edits)} edits: rerun the run")
        if edits[int(index)].get("newest_efficacy") is True:
            keep.append(row)
    columns = {name: [pairs[name][row] for row in keep] for name in ("edit_index", *PREDICTORS)}
    columns["lost"] = [not bool(pairs["success_now"][row]) for row in keep]
    return columns


def _lost_areas(columns: Mapping[str, Sequence[Any]], n_boot: int, seed: int) -> dict[str, Any]:
    """Return the clustered AUROC of each predictor for a lost edit, P minus the count's, and the verdict."""
    draws = clustered_auroc_bootstrap(columns, PREDICTORS, "lost", "edit_index", n_boot, seed)
    values = {name: auroc(columns[name], columns["lost"]) for name in PREDICTORS}
    clusters, rows = len(set(columns["edit_index"])), len(columns["lost"])
    ours, count = values["predicted"], values["later_count"]
    gap = draws_interval(
        None if ours is None or count is None else ours - count,
        draws["predicted"] - draws["later_count"],  # on the same resample
        clusters,
        rows,
    )
    beats = gap["low"] is not None and gap["low"] > 0
    reason = (
        f"AUROC of P minus that of later_count {_fmt(gap['value'])}, CI [{_fmt(gap['low'])}, {_fmt(gap['high'])}]"
        + (" lies above 0" if beats else " does not lie above 0")
    )
    return {
        "auroc": {name: draws_interval(values[name], draws[name], clusters, rows) for name in PREDICTORS},
        "difference": gap,
        "verdict": "P beats the count" if beats else "P does not beat the count",
        "reasons": [reason],
    }


def forgetting_rows(runs: Sequence[Mapping[str, Any]], n_boot: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """Return per run the AUROC of P and each control for a lost edit, and whether P beats the count (stated rule)."""
    rows = []
    for run in runs:
        if not run.get("pairs"):
            continue
        row: dict[str, Any] = {**identification(run)}
        if not moved_weights(run):
            rows.append(
                {**row, "auroc": None, "difference": None, "verdict": NOT_JUDGED, "reasons": ["no weight moved"]}
            )
            continue
        columns = _forgetting_columns(run)
        lost = columns["lost"]
        row |= {
            "n_pairs": len(lost),
            "n_edits": len(set(columns["edit_index"])),
            "n_lost": sum(lost),
            "n_kept": len(lost) - sum(lost),
        }
        if row["n_lost"] and row["n_kept"]:
            rows.append({**row, **_lost_areas(columns, n_boot, seed)})
        else:
            reason = "no edit that first succeeded was lost" if not row["n_lost"] else "every such edit was lost"
            rows.append({**row, "auroc": None, "difference": None, "verdict": NOT_JUDGED, "reasons": [reason]})
    return rows


def before_collapse(run: Mapping[str, Any]) -> dict[str, Any] | None:
    """Return the run with only the pairs of its probes before its collapse step (None where it did not collapse)."""
    step = collapse_step(run)
    if step is None or not moved_weights(run):
        return None
    pairs = run.get("pairs") or {}
    if pairs and "n_edits" not in pairs:
        raise KisError(f"{run_name(run)}'s pairs lack n_edits: an older kis wrote it; rerun it with `kis lifelong`")
    keep = [row for row, n_edits in enumerate(pairs.get("n_edits") or []) if int(n_edits) < step]
    return {**run, "pairs": {name: [column[row] for row in keep] for name, column in pairs.items()}}


def prediction_before_collapse_rows(
    runs: Sequence[Mapping[str, Any]], n_boot: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
    """Return per collapsed run P's controlled prediction of the NLL rise over its probes before the collapse."""
    rows = []
    for run in runs:
        early = before_collapse(run)
        if early is None:
            continue
        pairs = _judged(early)
        controls, judged = controlled_prediction(pairs, n_boot, seed, "earlier edits judged before the collapse")
        rows.append(
            {
                **identification(run),
                "collapse_step": collapse_step(run),
                "n_edits_judged": len(set(pairs.get("edit_index") or [])),
                "prediction_controls": controls,
                "verdict": judged["verdict"],
                "reasons": judged["reasons"],
            }
        )
    return rows


def forgetting_before_collapse_rows(
    runs: Sequence[Mapping[str, Any]], n_boot: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
    """Return per collapsed run the lost-edit AUROCs of P and the count over its probes before the collapse."""
    early = [found for found in map(before_collapse, runs) if found is not None]
    steps = {run_key(run): collapse_step(run) for run in early}
    rows = []
    for row in forgetting_rows(early, n_boot, seed):
        row["collapse_step"] = steps[row["editor"], row["seed"], row["layer"]]
        if row["verdict"] != NOT_JUDGED and row["n_edits"] < MIN_PREDICTION_EDITS:
            reason = f"{row['n_edits']} earlier edits judged before the collapse (< {MIN_PREDICTION_EDITS})"
            row |= {"auroc": None, "difference": None, "verdict": NOT_JUDGED, "reasons": [reason]}
        rows.append(row)
    return rows


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"
