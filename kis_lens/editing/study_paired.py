"""Two editors of a lifelong study compared order by order: who collapses later, and the metrics' differences."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from kis_lens.editing.study_runs import NOT_JUDGED, collapse_step, edits_made, run_key
from kis_lens.editing.verdicts import clustered_bootstrap

MIN_PAIRED_ORDERS = 2

LOWER_IS_BETTER: frozenset[str] = frozenset({"perplexity", "unedited_nll_drift"})

RULE_PAIRED = (  # {a} and {b}: the two editors compared (paired_rule fills them in)
    "runs of {a} and {b} with the same seed and layer edit the same facts in the same sequence (an order). An order "
    "favours {a} where {a} collapses at a later edit than {b}, or {a} does not collapse within its run while {b} "
    "collapses within it, or neither collapses and {a}'s efficacy on all edits so far is higher at the last edit "
    "count both measured. '{a} holds longer in every order' only where every paired order favours {a}; otherwise "
    "'mixed: k of n orders' (k orders favour {a}); fewer than {minimum} paired orders: not judged"
)


def _metric_at(run: Mapping[str, Any], metric: str) -> dict[int, float]:
    """Return {n_edits: value} of one step metric, leaving out steps where it was not measured."""
    found = {}
    for step in run.get("steps") or []:
        value = step.get(metric)
        if value is not None and math.isfinite(float(value)):
            found[int(step["n_edits"])] = float(value)
    return found


# Per-edit outcomes a run's pairs hold at each probe (rewrite success of every earlier edit u < n_edits - 1), as the
# step metric they give: the oldest quarter's retention exactly (u < max(1, n // 4)), and efficacy without the newest.
PAIRED_EDIT_METRICS: dict[str, Callable[[int, int], bool]] = {
    "retention_oldest_quarter": lambda u, n: u < max(1, n // 4),
    "efficacy_on_earlier_edits": lambda u, n: True,
}


def _successes(run: Mapping[str, Any]) -> dict[int, dict[int, bool]]:
    """Return {n_edits: {edit_index: whether edit u's rewrite succeeds at that probe}} from a run's pairs."""
    pairs = run.get("pairs") or {}
    found: dict[int, dict[int, bool]] = {}
    for n, u, success in zip(*(pairs.get(name) or [] for name in ("n_edits", "edit_index", "success_now"))):
        found.setdefault(int(n), {})[int(u)] = bool(success)
    return found


def _paired_edit_intervals(
    orders: Sequence[tuple[int, Mapping[str, Any], Mapping[str, Any]]], n_boot: int, seed: int
) -> dict[str, list[dict[str, Any]]]:
    """Return per metric and edit count the mean over paired orders' edits of A's success minus B's on the same edit,
    with an interval from a bootstrap over (order, edit): the two runs of an order edit the same facts."""
    successes = [(order, _successes(a), _successes(b)) for order, a, b in orders]
    counts = sorted(set.intersection(*(set(a) & set(b) for _, a, b in successes)))
    found: dict[str, list[dict[str, Any]]] = {name: [] for name in PAIRED_EDIT_METRICS}
    for name, counted in PAIRED_EDIT_METRICS.items():
        for n in counts:
            cluster, difference = [], []
            for order, a, b in successes:
                for u, success in a[n].items():
                    if counted(u, n) and u in b[n]:
                        cluster.append(f"{order}/{u}")  # an edit of one order
                        difference.append(float(success) - float(b[n][u]))
            if not difference:
                continue
            columns = {"cluster": cluster, "difference": difference}
            interval = clustered_bootstrap(columns, _mean_difference, "cluster", n_boot, seed)
            found[name].append({"n_edits": n, "n_orders": len(successes), **interval})
    return found


def _mean_difference(columns: Mapping[str, np.ndarray]) -> float | None:
    return float(np.mean(columns["difference"])) if len(columns["difference"]) else None


def _collapse_outcome(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """Return how A's collapse compares with B's in one order: later, earlier, same step, neither, undecided."""
    step_a, step_b, edits_a, edits_b = collapse_step(a), collapse_step(b), edits_made(a), edits_made(b)
    if step_a is not None and step_b is not None:
        return "later" if step_a > step_b else "earlier" if step_a < step_b else "same step"
    if step_a is None and step_b is None:
        return "neither collapsed"
    if step_a is None:  # A held through edits_a: later than B only where B collapsed within them
        return "later" if step_b <= edits_a else "undecided"
    return "earlier" if step_a <= edits_b else "undecided"


def paired_comparison(
    runs: Sequence[Mapping[str, Any]],
    editor_a: str = "alphaedit",
    editor_b: str = "rome",
    metrics: Sequence[str] = ("efficacy", "retention_oldest_quarter", "perplexity"),
    n_boot: int = 1000,
    bootstrap_seed: int = 0,
) -> dict[str, Any]:
    """Return per layer the order-by-order differences A − B of each metric, their collapse steps and the verdict."""
    by_key = {run_key(run): run for run in runs}
    layers = sorted(
        {at for editor, _, at in by_key if editor == editor_a} & {at for editor, _, at in by_key if editor == editor_b}
    )
    result: dict[str, Any] = {
        "editor_a": editor_a,
        "editor_b": editor_b,
        "metrics": list(metrics),
        "rule": paired_rule(editor_a, editor_b),
        "layers": [],
    }
    for layer in layers:
        seeds_a = {seed for editor, seed, at in by_key if editor == editor_a and at == layer}
        seeds_b = {seed for editor, seed, at in by_key if editor == editor_b and at == layer}
        seeds = sorted(seeds_a & seeds_b)
        orders, by_metric = [], {metric: {} for metric in metrics}
        for seed in seeds:
            a, b = by_key[(editor_a, seed, layer)], by_key[(editor_b, seed, layer)]
            outcome = _collapse_outcome(a, b)
            eff_a, eff_b = _metric_at(a, "efficacy"), _metric_at(b, "efficacy")
            common = max(set(eff_a) & set(eff_b) - {0}, default=None)
            efficacy = (None, None) if common is None else (eff_a[common], eff_b[common])
            ahead = common is not None and efficacy[0] > efficacy[1]
            orders.append(
                {
                    "seed": seed,
                    "edits_a": edits_made(a),
                    "edits_b": edits_made(b),
                    "collapse_a": collapse_step(a),
                    "collapse_b": collapse_step(b),
                    "collapse_outcome": outcome,
                    "last_common_n_edits": common,
                    "efficacy_a": efficacy[0],
                    "efficacy_b": efficacy[1],
                    "favours_a": outcome == "later" or (outcome == "neither collapsed" and ahead),
                }
            )
            for metric in metrics:
                values_a, values_b = _metric_at(a, metric), _metric_at(b, metric)
                for n in sorted(set(values_a) & set(values_b)):
                    by_metric[metric].setdefault(n, []).append((seed, values_a[n] - values_b[n]))
        n, k = len(orders), sum(order["favours_a"] for order in orders)
        if n < MIN_PAIRED_ORDERS:
            verdict = NOT_JUDGED
        elif k == n:
            verdict = f"{editor_a} holds longer in every order"
        else:
            verdict = f"mixed: {k} of {n} orders"
        result["layers"].append(
            {
                "layer": layer,
                "n_orders": n,
                "orders": orders,
                "a_collapses_later": sum(order["collapse_outcome"] == "later" for order in orders),
                "orders_favouring_a": k,
                "by_metric": {metric: _difference_rows(metric, by_metric[metric]) for metric in metrics},
                "by_edit": _paired_edit_intervals(
                    [(order, by_key[(editor_a, order, layer)], by_key[(editor_b, order, layer)]) for order in seeds],
                    n_boot,
                    bootstrap_seed,
                )
                if seeds
                else {},
                "unpaired": sorted(
                    [f"{editor_a} seed {seed}" for seed in seeds_a - seeds_b]
                    + [f"{editor_b} seed {seed}" for seed in seeds_b - seeds_a]
                ),
                "verdict": verdict,
            }
        )
    return result


def paired_rule(editor_a: str, editor_b: str) -> str:
    """Return RULE_PAIRED with the two editors named."""
    return RULE_PAIRED.format(a=editor_a, b=editor_b, minimum=MIN_PAIRED_ORDERS)


def _difference_rows(metric: str, found: Mapping[int, list[tuple[int, float]]]) -> list[dict[str, Any]]:
    """Return one row per edit count: the per-order differences A − B, their mean, min, max and k orders A is ahead."""
    lower = metric in LOWER_IS_BETTER
    rows = []
    for n, items in sorted(found.items()):
        differences = [difference for _, difference in items]
        rows.append(
            {
                "n_edits": n,
                "n_orders": len(items),
                "differences": [{"seed": seed, "difference": difference} for seed, difference in items],
                "mean": float(np.mean(differences)),
                "min": min(differences),
                "max": max(differences),
                "a_better": sum((d < 0) if lower else (d > 0) for d in differences),
            }
        )
    return rows
