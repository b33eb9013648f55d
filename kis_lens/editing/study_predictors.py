"""Which step-level number of a lifelong study tracks the edits left before collapse better than the edit count."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from kis_lens.editing.study_runs import collapse_step, identification, moved_weights
from kis_lens.editing.verdicts import clustered_bootstrap, spearman

MIN_PREDICTOR_RUNS = 4

RULE_PREDICTORS = (
    "over every step before collapse (0 < n_edits < collapse step) of every run that collapsed, pooled: a predictor "
    "tracks the edits left before collapse better than the edit count only where its |Spearman| with them minus "
    "n_edits' |Spearman|, on the same resample of a bootstrap clustered by run, has its interval above 0; with fewer "
    f"than {MIN_PREDICTOR_RUNS} collapsed runs nothing is judged"
)

PREDICTOR_COLUMNS: tuple[str, ...] = (
    "accumulated_p2",
    "n_edits",
    "weight_change_norm",
    "condition_number",
    "cumulative_update_norm",
    "previous_perplexity",
)

TOO_FEW_RUNS_NOTE = (
    "only {n} run(s) collapsed (< {minimum}): the steps of so few runs cannot separate the predictors, whose values "
    "all rise with the edits; the numbers are listed, not judged, and without intervals (a bootstrap over so few "
    "runs resamples the same one or two)"
)


def cumulative_update_norm(edits: Sequence[Mapping[str, Any]], n_edits: int) -> float:
    """Return Σ‖ΔW‖_F over the updates whose edits all lie within the first n_edits edits, each update once."""
    last_edit: dict[Any, int] = {}
    norms: dict[Any, float] = {}
    for index, edit in enumerate(edits):
        update = edit.get("update", index)  # a batch's edits share one update and repeat its norm
        last_edit[update] = index
        norms.setdefault(update, float(edit.get("update_delta_norm") or 0.0))
    return float(sum(norms[update] for update, index in last_edit.items() if index < n_edits))


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _steps_before_collapse(run: Mapping[str, Any], run_id: int) -> list[dict[str, float]]:
    """Return one row per step with 0 < n_edits < the run's collapse step: the target and every predictor."""
    steps, edits, collapse = run.get("steps") or [], run.get("edits") or [], collapse_step(run)
    rows = []
    for index, step in enumerate(steps):
        n = int(step["n_edits"])
        if index == 0 or not 0 < n < collapse:
            continue
        rows.append(
            {
                "run": run_id,
                "target": float(collapse - n),
                "accumulated_p2": _number(step.get("accumulated_p2")),
                "n_edits": float(n),
                "weight_change_norm": _number(step.get("weight_change_norm")),
                "condition_number": _number(step.get("condition_number")),
                "cumulative_update_norm": cumulative_update_norm(edits, n),
                "previous_perplexity": _number(steps[index - 1].get("perplexity")),
            }
        )
    return rows


def _joint_spearman(c: Mapping[str, np.ndarray], name: str, other: str) -> tuple[float | None, float | None]:
    """Return the Spearman of two predictors with the target on the rows where both are finite."""
    keep = np.isfinite(c[name]) & np.isfinite(c[other]) & np.isfinite(c["target"])
    return spearman(c[name][keep], c["target"][keep]), spearman(c[other][keep], c["target"][keep])


def _unedited_value(run: Mapping[str, Any], name: str) -> float:
    """Return a predictor's value for the unedited model (steps[0]); the counts and sums start at 0."""
    unedited = (run.get("steps") or [{}])[0]
    source = {"previous_perplexity": "perplexity", "n_edits": None, "cumulative_update_norm": None}.get(name, name)
    return 0.0 if source is None else _number(unedited.get(source))


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None  # JSON has no NaN: a number not recorded is None


def _variation(values: Sequence[float | None]) -> float | None:
    """Return the coefficient of variation (sample std / |mean|), None for < 2 finite values or a zero mean."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if len(finite) < 2 or finite.mean() == 0:
        return None
    return float(finite.std(ddof=1) / abs(finite.mean()))


def collapse_predictors(runs: Sequence[Mapping[str, Any]], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Return how well each step-level number tracks the edits left before collapse, against the edit count."""
    collapsed = [run for run in runs if moved_weights(run) and collapse_step(run) is not None]
    rows: list[dict[str, float]] = []
    last_rows: list[tuple[Mapping[str, Any], dict[str, float]]] = []
    for run_id, run in enumerate(collapsed):
        before = _steps_before_collapse(run, run_id)
        rows += before
        if before:
            last_rows.append((run, before[-1]))
    columns = {name: np.asarray([row[name] for row in rows], dtype=np.float64) for name in ("run", "target")}
    columns |= {name: np.asarray([row[name] for row in rows], dtype=np.float64) for name in PREDICTOR_COLUMNS}
    n_runs = len({row["run"] for row in rows})
    too_few = n_runs < MIN_PREDICTOR_RUNS

    def boot(statistic: Callable[[dict[str, np.ndarray]], float | None]) -> dict[str, Any]:
        found = clustered_bootstrap(columns, statistic, "run", n_boot, seed)
        return {**found, "low": None, "high": None} if too_few else found

    def correlation(name: str) -> Callable[[dict[str, np.ndarray]], float | None]:
        return lambda c: spearman(c[name], c["target"])

    def against_count(name: str) -> Callable[[dict[str, np.ndarray]], float | None]:
        def statistic(c: dict[str, np.ndarray]) -> float | None:
            ours, count = _joint_spearman(c, name, "n_edits")
            return None if ours is None or count is None else abs(ours) - abs(count)

        return statistic

    predictors = {}
    for name in PREDICTOR_COLUMNS:
        difference = None if name == "n_edits" else boot(against_count(name))
        low = None if difference is None else difference["low"]
        at_last = [
            {
                **identification(run),
                "n_edits": int(row["n_edits"]),
                "value": _finite_or_none(row[name]),
                "rise": _finite_or_none(row[name] - _unedited_value(run, name)),
            }
            for run, row in last_rows
        ]
        predictors[name] = {
            "spearman": boot(correlation(name)),
            "abs_spearman_minus_n_edits": difference,
            "beats_n_edits": None if too_few or difference is None else bool(low is not None and low > 0),
            "at_last_step_before_collapse": at_last,
            "variation_at_last_step": _variation([item["value"] for item in at_last]),
            # κ and perplexity start well above 0, which shrinks their variation: that of the rise is comparable
            "variation_of_rise_at_last_step": _variation([item["rise"] for item in at_last]),
        }
    return {
        "target": "edits left before collapse (collapse step − n_edits)",
        "runs": [{**identification(run), "collapse_step": collapse_step(run)} for run in collapsed],
        "n_runs": n_runs,
        "n_steps": len(rows),
        "too_few": too_few,
        "note": TOO_FEW_RUNS_NOTE.format(n=n_runs, minimum=MIN_PREDICTOR_RUNS) if too_few else None,
        "predictors": predictors,
    }
