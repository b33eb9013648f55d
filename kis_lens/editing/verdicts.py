"""Verdicts on the lifelong-editing prediction: rank statistics with intervals from a bootstrap clustered by edit."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from jaxtyping import Float

from kis_lens.errors import KisError

PREDICTORS = ("predicted", "later_count", "later_residual_norm", "predicted_shuffled")
CONTROLS = PREDICTORS[1:]
CONTROL_NAMES = {
    "later_count": "later_count (the number of later edits)",
    "later_residual_norm": "later_residual_norm (the size of the later residuals)",
    "predicted_shuffled": "predicted_shuffled (the shuffled null: P's columns permuted across facts)",
}
RULE = (
    "reproduced only where P's Spearman with the target beats every control (later_count, later_residual_norm, "
    "predicted_shuffled) with the clustered CI of the difference above 0, and the partial Spearman of P with the "
    "target given later_count has a clustered CI above 0"
)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Return the ranks of a 1-D sample, ties given their average rank (as scipy.stats.rankdata does)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    average = (starts + ends + 1) / 2.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(average, ends - starts)
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Return the Pearson correlation, or None for fewer than 3 points or a constant sample."""
    if len(a) < 3:
        return None
    tolerance = 1e-9 * np.sqrt(len(a))
    a, b = a - a.mean(), b - b.mean()
    norm_a, norm_b = np.sqrt(a @ a), np.sqrt(b @ b)
    if norm_a <= tolerance * max(1.0, np.abs(a).max()) or norm_b <= tolerance * max(1.0, np.abs(b).max()):
        return None
    return float(np.clip((a @ b) / (norm_a * norm_b), -1.0, 1.0))


def _finite(*columns: Sequence[float]) -> list[np.ndarray]:
    """Return the columns as float arrays, keeping only rows finite in all of them; lengths must agree."""
    arrays = [np.asarray(column, dtype=np.float64).ravel() for column in columns]
    if len({len(a) for a in arrays}) > 1:
        lengths = ", ".join(str(len(a)) for a in arrays)
        raise KisError(f"samples have different lengths ({lengths}); pass one value per pair in each")
    keep = np.logical_and.reduce([np.isfinite(a) for a in arrays])
    return [a[keep] for a in arrays]


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Return Spearman's rank correlation (ties averaged, non-finite rows dropped), or None when undefined."""
    a, b = _finite(x, y)
    return _pearson(_ranks(a), _ranks(b)) if len(a) >= 3 else None


def partial_spearman(x: Sequence[float], y: Sequence[float], control: Sequence[float]) -> float | None:
    """Return the Spearman correlation of x and y given control: Pearson of rank residuals on rank(control)."""
    a, b, c = _finite(x, y, control)
    if len(a) < 4:
        return None
    design = np.column_stack([np.ones(len(c)), _ranks(c)])
    residual = lambda v: v - design @ np.linalg.lstsq(design, v, rcond=None)[0]  # noqa: E731
    return _pearson(residual(_ranks(a)), residual(_ranks(b)))


def _columns(pairs: Mapping[str, Sequence], required: Sequence[str]) -> dict[str, np.ndarray]:
    """Return every column of pairs as an array, checking the required ones exist and all lengths agree."""
    missing = [name for name in required if name not in pairs]
    if missing:
        raise KisError(
            f"pairs lack the column(s) {', '.join(missing)}; pass the 'pairs' dict of a `kis lifelong` results JSON "
            f"(it has {', '.join(sorted(pairs)) or 'no columns'})"
        )
    columns = {name: np.asarray(values) for name, values in pairs.items()}
    reference = required[0] if required else next(iter(columns), None)
    if reference is None:
        return columns
    expected = len(columns[reference])
    for name, values in columns.items():
        if values.ndim != 1 or len(values) != expected:
            raise KisError(
                f"pairs column {name!r} has {len(values)} rows but {reference!r} has {expected}; every column of "
                "pairs needs one value per (probe, earlier edit) row: rewrite the file with `kis lifelong`"
            )
    return columns


def _check_n_boot(n_boot: int) -> None:
    if n_boot < 1:
        raise KisError(f"n_boot {n_boot} must be at least 1; pass e.g. 1000")


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise KisError(f"level {level} is not a coverage; pass a number between 0 and 1 such as 0.95")


def _drawn_clusters(n_clusters: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield, per resample, the clusters drawn with replacement: the draws of every clustered bootstrap here."""
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield rng.integers(0, n_clusters, size=n_clusters) if n_clusters else np.zeros(0, dtype=np.int64)


def _interval(
    value: float | None, draws: Sequence[float], skipped: int, level: float, n_clusters: int, n_pairs: int
) -> dict:
    """Return a statistic's value with the percentile interval of its finite resampled draws."""
    tail = (1.0 - level) / 2.0
    low, high = (float(q) for q in np.quantile(draws, [tail, 1.0 - tail])) if len(draws) else (None, None)
    return {
        "value": None if value is None else float(value),
        "low": low,
        "high": high,
        "level": level,
        "n_clusters": n_clusters,
        "n_pairs": n_pairs,
        "n_boot": len(draws) + skipped,
        "n_skipped": skipped,
    }


def clustered_bootstrap(
    pairs: Mapping[str, Sequence],
    statistic: Callable[[dict[str, np.ndarray]], float | None],
    cluster: str = "edit_index",
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Return the statistic with a percentile interval from resampling whole clusters (edits) with replacement."""
    _check_level(level)
    _check_n_boot(n_boot)
    columns = _columns(pairs, [cluster])
    labels, members = np.unique(columns[cluster], return_inverse=True)
    order = np.argsort(members, kind="mergesort")
    groups = np.split(order, np.cumsum(np.bincount(members, minlength=len(labels)))[:-1]) if len(labels) else []
    draws, skipped = [], 0
    for chosen in _drawn_clusters(len(groups), n_boot, seed):
        rows = np.concatenate([groups[i] for i in chosen]) if len(chosen) else np.zeros(0, dtype=np.int64)
        result = statistic({name: values[rows] for name, values in columns.items()})
        if result is None or not np.isfinite(result):
            skipped += 1
        else:
            draws.append(float(result))
    return _interval(statistic(columns), draws, skipped, level, len(labels), len(columns[cluster]))


def auroc_draws(
    scores: Sequence[float], positive: Sequence[bool], weights: Float[np.ndarray, "draw row"]
) -> Float[np.ndarray, " draw"]:
    """Return, per row of weights (how often each sample is in a resample), the AUROC of that resample (NaN for one
    class): the same value auroc gives on the resample written out, in one pass over the sorted scores."""
    values, labels = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    keep = np.isfinite(values)
    order = np.argsort(values[keep], kind="mergesort")
    values, labels, weights = values[keep][order], labels[keep][order], np.asarray(weights)[:, keep][:, order]
    if not len(values):
        return np.full(len(weights), np.nan)
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])  # groups of tied scores
    pos = np.add.reduceat(weights * labels, starts, axis=1)
    neg = np.add.reduceat(weights * ~labels, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negatives scored strictly lower than each group
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        area = (pos * (below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
    area[(n_pos == 0) | (n_neg == 0)] = np.nan
    return area


def clustered_auroc_bootstrap(
    pairs: Mapping[str, Sequence],
    scores: Sequence[str],
    outcome: str,
    cluster: str = "edit_index",
    n_boot: int = 1000,
    seed: int = 0,
    chunk: int = 200,
) -> dict[str, Float[np.ndarray, " draw"]]:
    """Return each score column's AUROC for the outcome on every resample of clustered_bootstrap's draws (same
    seed, same resamples; NaN for a resample with one class), computed from cluster weights instead of copies."""
    _check_n_boot(n_boot)
    columns = _columns(pairs, [cluster, outcome, *scores])
    labels, members = np.unique(columns[cluster], return_inverse=True)
    counts = np.stack(
        [np.bincount(chosen, minlength=len(labels)) for chosen in _drawn_clusters(len(labels), n_boot, seed)]
    )
    found: dict[str, list[np.ndarray]] = {name: [] for name in scores}
    for start in range(0, n_boot, chunk):  # a chunk of draws × rows of weights at a time bounds the memory
        weights = counts[start : start + chunk][:, members].astype(np.float64)
        for name in scores:
            found[name].append(auroc_draws(columns[name], columns[outcome], weights))
    return {name: np.concatenate(parts) for name, parts in found.items()}


def draws_interval(
    value: float | None, draws: Float[np.ndarray, " draw"], n_clusters: int, n_pairs: int, level: float = 0.95
) -> dict:
    """Return a value with the percentile interval of its resampled draws (NaN draws skipped, as clustered_bootstrap
    skips a resample whose statistic is undefined)."""
    _check_level(level)
    finite = draws[np.isfinite(draws)]
    return _interval(value, finite, int(len(draws) - len(finite)), level, n_clusters, n_pairs)


def prediction_controls(
    pairs: Mapping[str, Sequence], target: str = "measured_logprob", n_boot: int = 1000, seed: int = 0
) -> dict:
    """Return Spearman of each predictor with the target, P minus each control and the partial given the count."""
    columns = _columns(pairs, ["edit_index", target, *PREDICTORS])
    boot = lambda statistic: clustered_bootstrap(columns, statistic, "edit_index", n_boot, seed)  # noqa: E731

    def correlation(name: str) -> Callable[[dict[str, np.ndarray]], float | None]:
        """Return the statistic: Spearman of one predictor with the target."""
        return lambda c: spearman(c[name], c[target])

    def difference(control: str) -> Callable[[dict[str, np.ndarray]], float | None]:
        """Return the statistic: Spearman of P minus that of a control, on the same resample."""

        def statistic(c: dict[str, np.ndarray]) -> float | None:
            ours, theirs = spearman(c["predicted"], c[target]), spearman(c[control], c[target])
            return None if ours is None or theirs is None else ours - theirs

        return statistic

    return {
        "target": target,
        "n_boot": n_boot,
        "seed": seed,
        "spearman": {name: boot(correlation(name)) for name in PREDICTORS},
        "difference": {control: boot(difference(control)) for control in CONTROLS},
        "partial_given_count": boot(lambda c: partial_spearman(c["predicted"], c[target], c["later_count"])),
    }


def judge_prediction_with_controls(controls: dict) -> dict:
    """Return {"verdict", "rule", "reasons"}: reproduced only where P beats every control and the partial is > 0."""
    reasons = []
    for control in CONTROLS:
        interval = controls.get("difference", {}).get(control)
        if interval is None:
            reasons.append(f"no comparison with {CONTROL_NAMES[control]} was computed")
        elif interval["low"] is None or not interval["low"] > 0:
            reasons.append(
                f"P does not beat {CONTROL_NAMES[control]}: Spearman difference {_fmt(interval['value'])}, "
                f"CI [{_fmt(interval['low'])}, {_fmt(interval['high'])}] does not lie above 0"
            )
    partial = controls.get("partial_given_count")
    if partial is None:
        reasons.append("no partial Spearman given later_count was computed")
    elif partial["low"] is None or not partial["low"] > 0:
        reasons.append(
            f"the partial Spearman of P with the target given later_count is {_fmt(partial['value'])}, "
            f"CI [{_fmt(partial['low'])}, {_fmt(partial['high'])}] does not lie above 0"
        )
    return {"verdict": "not reproduced" if reasons else "reproduced", "rule": RULE, "reasons": reasons}


def _fmt(value: float | None) -> str:
    """Return a number with three decimals, or 'undefined'."""
    return "undefined" if value is None else f"{value:.3f}"


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Return the AUROC of scores for a boolean outcome (Mann-Whitney, ties counted half), or None for one class."""
    values = np.asarray(scores, dtype=np.float64)
    outcome = np.asarray(positive)
    if outcome.ndim != 1 or len(outcome) != len(values):
        raise KisError(f"{len(outcome)} outcomes for {len(values)} scores: pass one boolean per score")
    if outcome.dtype != np.bool_ and not np.isin(outcome, [0, 1]).all():
        raise KisError("outcomes must be booleans (True for the positive class)")
    keep = np.isfinite(values)
    values, labels = values[keep], outcome[keep].astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum = _ranks(values)[labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def forgetting_auroc(pairs: Mapping[str, Sequence], score: str = "predicted", *, lost: Sequence[bool]) -> float | None:
    """Return the AUROC of a score for a boolean outcome per pair (Mann-Whitney, ties counted half), or None."""
    columns = _columns(pairs, [score])
    outcome = np.asarray(lost)
    if outcome.ndim != 1 or len(outcome) != len(columns[score]):
        raise KisError(
            f"lost has {len(outcome)} values but pairs column {score!r} has {len(columns[score])}; "
            "pass one boolean per pair row"
        )
    if outcome.dtype != np.bool_ and not np.isin(outcome, [0, 1]).all():
        raise KisError("lost must hold booleans (True where the edit was lost); pass one per pair row")
    return auroc(columns[score], outcome)


SENSITIVITY_PERPLEXITY_RATIOS: tuple[float, ...] = (1.5, 2.0, 5.0, 10.0)


def collapse_sensitivity(
    steps: Sequence[Mapping[str, Any]],
    perplexity_ratios: Sequence[float] = SENSITIVITY_PERPLEXITY_RATIOS,
    retention_threshold: float = 0.5,
) -> dict[str, int | None]:
    """Return the first n_edits at which each collapse criterion holds (None: never within the run).

    Criteria: held-out perplexity above each ratio × the unedited model's (steps[0]); efficacy on all edits so far
    below retention_threshold; retention on the oldest quarter of edits below it."""
    if not steps:
        raise KisError("no measurement steps: the run recorded nothing to judge")
    baseline = steps[0].get("perplexity")
    found: dict[str, int | None] = {}

    def first(holds: Callable[[Mapping[str, Any]], bool]) -> int | None:
        return next((int(step["n_edits"]) for step in steps[1:] if holds(step)), None)

    for ratio in perplexity_ratios:
        found[f"perplexity > {ratio:g}× unedited"] = first(
            lambda step, ratio=ratio: baseline is not None and (step.get("perplexity") or 0) > ratio * baseline
        )
    for name, label in (
        ("efficacy", "efficacy on all edits"),
        ("retention_oldest_quarter", "oldest-quarter retention"),
    ):
        found[f"{label} < {retention_threshold:g}"] = first(
            lambda step, name=name: step.get(name) is not None and step[name] < retention_threshold
        )
    return found


def rho_alarm(
    edits: Sequence[Mapping[str, Any]], disabling: Sequence[Mapping[str, Any]], steps: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Return the AUROC of low ρ for the disabling edits, against ‖v* − Wk‖ and the previous probe's perplexity.

    ρ = (C⁻¹k̄)ᵀk / (C⁻¹k̄)ᵀk̄ is known before an edit is applied; an AUROC is None without both classes."""
    if not edits or any(edit.get("rho") is None for edit in edits):
        return {
            "n_edits": len(edits),
            "n_disabling": len(disabling),
            "note": "ρ is recorded for ROME-family edits only",
        }
    columns = rho_alarm_columns(edits, disabling, steps)
    return {
        "n_edits": len(edits),
        "n_disabling": int(sum(columns["disabling"])),
        **{name: auroc(columns[name], columns["disabling"]) for name in RHO_ALARM_SCORES},
    }


RHO_ALARM_SCORES: tuple[str, ...] = ("low_rho", "residual_norm", "previous_probe_perplexity")


def rho_alarm_columns(
    edits: Sequence[Mapping[str, Any]], disabling: Sequence[Mapping[str, Any]], steps: Sequence[Mapping[str, Any]]
) -> dict[str, list[Any]]:
    """Return per edit (ROME family: each records ρ) whether it is disabling, and each alarm score (high: alarm)."""
    flagged = {int(item["n_edits"]) for item in disabling}
    probes = [(int(step["n_edits"]), step.get("perplexity")) for step in steps]

    def previous_perplexity(n: int) -> float:
        earlier = [value for at, value in probes if at < n and value is not None]
        return float(earlier[-1]) if earlier else float("nan")

    return {
        "edit_index": list(range(len(edits))),
        "disabling": [index + 1 in flagged for index in range(len(edits))],
        "low_rho": [-float(edit["rho"]) for edit in edits],
        "residual_norm": [float(edit.get("residual_norm") or 0.0) for edit in edits],
        "previous_probe_perplexity": [previous_perplexity(index + 1) for index in range(len(edits))],
    }
