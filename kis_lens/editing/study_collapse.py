"""When the runs of a lifelong study collapse: per-run rows, per-editor verdicts, censored medians, ρ alarms."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from kis_lens.editing.study_runs import (
    MIN_ORDERS,
    NO_EDIT_EDITORS,
    NO_WEIGHT_MOVED,
    NOT_JUDGED,
    collapse_step,
    editor_rank,
    edits_made,
    identification,
    run_key,
    run_name,
    run_summary,
)
from kis_lens.editing.verdicts import auroc, clustered_auroc_bootstrap, draws_interval, rho_alarm_columns

RULE_COLLAPSE = (
    "per editor and layer, over its edit orders: 'collapses in every order' when every run's summary records a "
    f"collapse step and there are at least {MIN_ORDERS} orders, 'collapses in k of n orders' when some do (or all of "
    f"fewer than {MIN_ORDERS}), 'no collapse within N edits in any order' when none "
    "does (N the fewest edits any of its runs made); the `none` editor moves no weight and is not judged. The median "
    "collapse step counts a run without collapse as censored at its edit count: where a censored run decides it, "
    "only a lower bound is given (median_above)"
)

RHO_CONTROLS: tuple[str, ...] = ("residual_norm", "previous_probe_perplexity")  # alarms that need no P

RULE_RHO_ALARM = (
    "per run with disabling edits: 'low ρ singles them out' only where, for each control, the AUROC of low ρ minus "
    "the control's read either way, max(A, 1 − A) (a score lower for the disabling edits flags them as well), on the "
    "same resample of a bootstrap over edits, has its interval above 0; 'a control flags them as well' names the "
    "controls where it does not; 'low ρ does not flag them' where low ρ's AUROC is 0.5 or below"
)


def _rho_gaps(columns: Mapping[str, Sequence[Any]], n_boot: int, seed: int) -> dict[str, dict[str, Any]]:
    """Return per control the AUROC of low ρ minus the control's read either way, with its bootstrap interval."""
    scores = ("low_rho", *RHO_CONTROLS)
    draws = clustered_auroc_bootstrap(columns, scores, "disabling", "edit_index", n_boot, seed)
    values = {name: auroc(columns[name], columns["disabling"]) for name in scores}
    clusters, rows = len(set(columns["edit_index"])), len(columns["disabling"])
    gaps = {}
    for name in RHO_CONTROLS:
        rho, other = values["low_rho"], values[name]
        value = None if rho is None or other is None else rho - max(other, 1.0 - other)
        on_each_resample = draws["low_rho"] - np.maximum(draws[name], 1.0 - draws[name])  # NaN: one class
        gaps[name] = draws_interval(value, on_each_resample, clusters, rows)
    return gaps


def rho_alarm_verdict(low_rho: float | None, gaps: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Return whether low ρ flags a run's disabling edits better than every control read either way (the rule)."""
    if low_rho is None:
        return {"verdict": NOT_JUDGED, "matched_by": []}
    if low_rho <= 0.5:
        return {"verdict": "low ρ does not flag them", "matched_by": []}
    matched = [name for name, gap in gaps.items() if gap.get("low") is None or gap["low"] <= 0]
    return {"verdict": "a control flags them as well" if matched else "low ρ singles them out", "matched_by": matched}


def collapse_rows(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return one row per run: its edits, collapse step, every collapse-sensitivity entry, first disabling edit."""
    rows = []
    for run in runs:
        summary = run_summary(run)
        disabling = [int(item["n_edits"]) for item in summary.get("disabling_edits") or []]
        wall = summary.get("wall_seconds")
        rows.append(
            {
                **identification(run),
                "source": run_name(run),
                "edits_made": edits_made(run),
                "collapse_step": collapse_step(run),
                "collapse_criterion": (summary.get("collapse") or {}).get("criterion"),
                "collapse_sensitivity": summary.get("collapse_sensitivity"),  # None: the run moved no weight
                "first_disabling_edit": min(disabling) if disabling else None,
                "wall_hours": None if wall is None else float(wall) / 3600.0,
            }
        )
    return rows


def censored_median(observations: Sequence[tuple[int, bool]]) -> dict[str, float | None]:
    """Return the median of (collapse step or edit count, collapsed) observations: exact, or a lower bound.

    A run without collapse is censored: it collapses (if ever) after its edit count. The plain median of the
    observed numbers is a lower bound of the true one; it is exact only where no censored run ranks at or below
    the middle (censored runs rank after collapses at the same count)."""
    if not observations:
        return {"median": None, "median_above": None}
    ordered = sorted(observations, key=lambda item: (item[0], not item[1]))
    n = len(ordered)
    middle = [n // 2] if n % 2 else [n // 2 - 1, n // 2]
    value = float(np.mean([ordered[index][0] for index in middle]))
    if all(collapsed for _, collapsed in ordered[: middle[-1] + 1]):
        return {"median": value, "median_above": None}
    return {"median": None, "median_above": value}


def collapse_by_editor(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return per editor and layer: orders, how many collapsed, the censored median, min, max and the verdict."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for run in runs:
        editor, _, layer = run_key(run)
        groups.setdefault((editor, layer), []).append(run)
    rows = []
    for (editor, layer), members in sorted(groups.items(), key=lambda item: (editor_rank(item[0][0]), item[0][1])):
        members = sorted(members, key=lambda run: run_key(run)[1])
        orders = [
            {"seed": run_key(run)[1], "collapse_step": collapse_step(run), "edits_made": edits_made(run)}
            for run in members
        ]
        steps = [order["collapse_step"] for order in orders if order["collapse_step"] is not None]
        n, k = len(orders), len(steps)
        row: dict[str, Any] = {"editor": editor, "layer": layer, "n_orders": n, "n_collapsed": k, "orders": orders}
        if editor in NO_EDIT_EDITORS:
            rows.append(
                {**row, "median": None, "median_above": None, "min": None, "max": None, "verdict": NO_WEIGHT_MOVED}
            )
            continue
        observed = [
            (order["collapse_step"], True) if order["collapse_step"] is not None else (order["edits_made"], False)
            for order in orders
        ]
        if k == n and n >= MIN_ORDERS:
            verdict = "collapses in every order"
        elif k:
            verdict = f"collapses in {k} of {n} order{'s' if n > 1 else ''}"
        else:
            verdict = f"no collapse within {min(order['edits_made'] for order in orders)} edits in any order"
        rows.append(
            {
                **row,
                **censored_median(observed),
                "min": min(steps) if steps else None,
                "max": max(steps) if steps else None,
                "verdict": verdict,
            }
        )
    return rows


def rho_alarm_rows(runs: Sequence[Mapping[str, Any]], n_boot: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """Return the ρ-alarm AUROCs of every run whose edits record ρ (the ROME family), as its summary holds them,
    and whether low ρ beats each control (the rule; bootstrapped from the run's edits)."""
    rows = []
    for run in runs:
        alarm = run_summary(run).get("rho_alarm") or {}
        if "low_rho" not in alarm:  # the other editors' alarm holds only a note: ρ is not defined for them
            continue
        gaps = {}
        if alarm.get("low_rho") is not None:  # both classes present: there are disabling edits to flag
            disabling = run_summary(run).get("disabling_edits") or []
            gaps = _rho_gaps(rho_alarm_columns(run.get("edits") or [], disabling, run["steps"]), n_boot, seed)
        rows.append(
            {
                **identification(run),
                "n_edits": alarm.get("n_edits"),
                "n_disabling": alarm.get("n_disabling"),
                "low_rho": alarm.get("low_rho"),
                "residual_norm": alarm.get("residual_norm"),
                "previous_probe_perplexity": alarm.get("previous_probe_perplexity"),
                "gaps": gaps,
                **rho_alarm_verdict(alarm.get("low_rho"), gaps),
            }
        )
    return rows
