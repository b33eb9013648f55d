"""Numbers and verdicts across many lifelong-editing runs (``kis lifelong``): a study of editors × edit orders × layers.

One run edits one fact after another in the order its seed fixes, so two editors with the same seed edit the same
facts in the same sequence: an *order*. A study is every finished run under one folder (layer_<L>/ subfolders
included) that shares all settings but the editor, the seed, the layer and the number of edits. Everything here is
read from the runs' JSON files (their summaries are taken as written, never recomputed) or computed from their
steps, edits and pairs; every verdict follows a rule stated in a RULE_* constant. Nothing is drawn or rendered:
each function returns plain JSON-able dicts and lists for a renderer or a test to read.

>>> found = study("results/smollm2-135m/lifelong", n_boot=1000)
>>> found["collapse_by_editor"][0]["verdict"]
'collapses in every order'
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from kis_lens.editing.lifelong import judged_pairs
from kis_lens.editing.registry import EDITOR_NAMES
from kis_lens.editing.verdicts import PREDICTORS, auroc, clustered_bootstrap, spearman
from kis_lens.errors import KisError
from kis_lens.io import load_json_object
from kis_lens.layout import LIFELONG_FILE_PREFIX, is_lifelong_result

# Settings a study varies on purpose; every other part of the runs' identities must agree.
VARYING_CONFIG_FIELDS: tuple[str, ...] = ("seed", "layer", "n_edits")
# Identity parts that follow the varying settings: the editor itself; the covariance files of the layers the run's
# editors write (compared layer by layer where two runs share a layer); the context templates, drawn with the seed
# (compared between runs of the same seed).
FOLLOWING_IDENTITY_PARTS: tuple[str, ...] = ("editor", "covariance", "templates")
NO_EDIT_EDITORS: tuple[str, ...] = ("none",)  # moves no weight: nothing to collapse or forget
NOT_JUDGED = "not judged"
NO_WEIGHT_MOVED = "no weight moved: not judged"
MIN_PAIRED_ORDERS = 2
MIN_PREDICTOR_RUNS = 4
LOWER_IS_BETTER: frozenset[str] = frozenset({"perplexity", "unedited_nll_drift"})

RULE_COLLAPSE = (
    "per editor and layer, over its edit orders: 'collapses in every order' when every run's summary records a "
    "collapse step, 'collapses in k of n orders' when some do, 'no collapse within N edits in any order' when none "
    "does (N the fewest edits any of its runs made); the `none` editor moves no weight and is not judged. The median "
    "collapse step counts a run without collapse as censored at its edit count: where a censored run decides it, "
    "only a lower bound is given (median_above)"
)
RULE_FORGETTING = (
    "per run, over the judged pairs (an earlier edit whose subject is never edited again) whose earlier edit "
    "succeeded right after it was made: lost = its rewrite no longer succeeds at the probe. 'P beats the count' only "
    "where the AUROC of P for lost minus the AUROC of later_count, on the same resample of a bootstrap clustered by "
    "edit, has its interval above 0; 'not judged' where no edit was lost or none was kept"
)
RULE_PREDICTORS = (
    "over every step before collapse (0 < n_edits < collapse step) of every run that collapsed, pooled: a predictor "
    "tracks the edits left before collapse better than the edit count only where its |Spearman| with them minus "
    "n_edits' |Spearman|, on the same resample of a bootstrap clustered by run, has its interval above 0; with fewer "
    f"than {MIN_PREDICTOR_RUNS} collapsed runs nothing is judged"
)
RULE_PAIRED = (  # {a} and {b}: the two editors compared (paired_rule fills them in)
    "runs of {a} and {b} with the same seed and layer edit the same facts in the same sequence (an order). An order "
    "favours {a} where {a} collapses at a later edit than {b}, or {a} does not collapse within its run while {b} "
    "collapses within it, or neither collapses and {a}'s efficacy on all edits so far is higher at the last edit "
    "count both measured. '{a} holds longer in every order' only where every paired order favours {a}; otherwise "
    "'mixed: k of n orders' (k orders favour {a}); fewer than {minimum} paired orders: not judged"
)
OUTPUT_CORRELATION_NOTE = (
    "listed, not judged: an algebraic identity for p-ROME (rank-one along C⁻¹k) and close to one for ROME/MEMIT"
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
    "all rise with the edits; the numbers are listed, not judged"
)


# ---------------------------------------------------------------------------------------------------------- reading
def _settings(run: Mapping[str, Any]) -> dict[str, Any]:
    return run.get("settings") or {}


def _summary(run: Mapping[str, Any]) -> dict[str, Any]:
    return run.get("summary") or {}


def _name(run: Mapping[str, Any]) -> str:
    """Return how a run is named in a message: its file, else its stem, else its key."""
    return str(run.get("_source") or _settings(run).get("run_stem") or run.get("editor") or "a run")


def run_key(run: Mapping[str, Any]) -> tuple[str, int, int]:
    """Return what names a run in a study: (editor, seed, layer)."""
    identity = _settings(run).get("identity")
    config = _settings(run).get("config") or {}
    editor = (identity or {}).get("editor") if isinstance(identity, Mapping) else None
    editor = editor or run.get("editor")
    if editor is None or config.get("seed") is None or config.get("layer") is None:
        raise KisError(
            f"{_name(run)} lacks its editor, settings.config.seed or settings.config.layer: pass the dict of a "
            "`kis lifelong` results JSON (lifelong_<editor>_seed<S>_n<N>_layer<L>_<hash>.json)"
        )
    return str(editor), int(config["seed"]), int(config["layer"])


def _editor_rank(editor: str) -> tuple[int, str]:
    return (EDITOR_NAMES.index(editor) if editor in EDITOR_NAMES else len(EDITOR_NAMES)), editor


def _sort_key(run: Mapping[str, Any]) -> tuple[Any, ...]:
    editor, seed, layer = run_key(run)
    return _editor_rank(editor), layer, seed


def _read_run(path: Path) -> dict[str, Any]:
    return load_json_object(path, "rerun `kis lifelong` for that run or delete the file")


def _shown(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _identity_fields(run: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (fields every run must share, fields compared only between runs that have them) of a run's identity."""
    identity = _settings(run).get("identity")
    if not isinstance(identity, Mapping):
        raise KisError(f"{_name(run)} has no settings.identity (an older kis wrote it): rerun it with `kis lifelong`")
    shared: dict[str, Any] = {}
    for part, value in identity.items():
        if part in FOLLOWING_IDENTITY_PARTS:
            continue
        if part == "config" and isinstance(value, Mapping):
            shared.update({f"config.{k}": v for k, v in value.items() if k not in VARYING_CONFIG_FIELDS})
        else:
            shared[part] = value
    _, seed, _ = run_key(run)
    optional = {f"covariance.{layer}": entry for layer, entry in (identity.get("covariance") or {}).items()}
    if "templates" in identity:
        optional[f"templates (seed {seed})"] = identity["templates"]
    return shared, optional


def _setting_conflicts(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Return one line per identity field on which the runs disagree, naming each value and a run that has it."""
    seen: dict[str, dict[str, str]] = {}  # field → shown value → first run with it
    every: list[tuple[dict[str, Any], dict[str, Any]]] = [_identity_fields(run) for run in runs]
    required = sorted({field for shared, _ in every for field in shared})
    absent = object()
    for run, (shared, optional) in zip(runs, every):
        values = {field: shared.get(field, absent) for field in required} | optional
        for field, value in values.items():
            shown = "(absent)" if value is absent else _shown(value)
            seen.setdefault(field, {}).setdefault(shown, _name(run))
    return [
        f"{field}: " + ", ".join(f"{value} in {source}" for value, source in values.items())
        for field, values in sorted(seen.items())
        if len(values) > 1
    ]


def check_study(runs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return the runs sorted by (editor, layer, seed); KisError on two runs with one key or on mixed settings."""
    runs = [dict(run) for run in runs]
    if not runs:
        raise KisError("a study needs at least one finished `kis lifelong` run: pass its folder or its runs")
    owners: dict[tuple[str, int, int], str] = {}
    for run in runs:
        key = run_key(run)
        if key in owners:
            editor, seed, layer = key
            raise KisError(
                f"two runs of {editor} with seed {seed} at layer {layer}: {owners[key]} and {_name(run)}; a study "
                "holds one run per editor, seed and layer: move or delete one of them"
            )
        owners[key] = _name(run)
    conflicts = _setting_conflicts(runs)
    if conflicts:
        raise KisError(
            "the runs mix settings other than editor, seed, layer and n_edits: "
            + "; ".join(conflicts)
            + ". A study compares runs that differ only in those: move the others to another folder"
        )
    return sorted(runs, key=_sort_key)


def load_study(folder: str | Path) -> list[dict[str, Any]]:
    """Return every finished lifelong run under folder (recursively), each with "_source"; legacy files skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KisError(f"{folder} is not a folder: pass the lifelong/ folder of a model (or one layer_<L>/ in it)")
    runs, legacy = [], []
    for path in sorted(folder.rglob(f"{LIFELONG_FILE_PREFIX}*.json")):
        if not is_lifelong_result(path):  # a *.partial.json checkpoint of a run in progress
            continue
        run = _read_run(path)
        source = path.relative_to(folder).as_posix()
        if not isinstance(_settings(run).get("identity"), Mapping):
            legacy.append(source)
            continue
        run["_source"] = source
        runs.append(run)
    if legacy:
        warnings.warn(
            f"{folder}: left out {len(legacy)} legacy run(s) without a run identity ({', '.join(legacy[:3])}"
            f"{', …' if len(legacy) > 3 else ''}): an older kis wrote them; rerun them with `kis lifelong`",
            stacklevel=2,
        )
    if not runs:
        raise KisError(
            f"no finished lifelong runs (lifelong_<editor>_seed<S>_….json) under {folder}: run `kis lifelong` first "
            "(a run in progress has only <stem>.partial.json)"
        )
    return check_study(runs)


# -------------------------------------------------------------------------------------------------------- collapse
def _edits_made(run: Mapping[str, Any]) -> int:
    edits, steps = run.get("edits") or [], run.get("steps") or []
    return len(edits) if edits else int(steps[-1]["n_edits"]) if steps else 0


def _collapse_step(run: Mapping[str, Any]) -> int | None:
    step = (_summary(run).get("collapse") or {}).get("step")
    return None if step is None else int(step)


def _moved(run: Mapping[str, Any]) -> bool:
    return run_key(run)[0] not in NO_EDIT_EDITORS


def _identification(run: Mapping[str, Any]) -> dict[str, Any]:
    editor, seed, layer = run_key(run)
    return {"editor": editor, "seed": seed, "layer": layer}


def collapse_rows(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return one row per run: its edits, collapse step, every collapse-sensitivity entry, first disabling edit."""
    rows = []
    for run in runs:
        summary = _summary(run)
        disabling = [int(item["n_edits"]) for item in summary.get("disabling_edits") or []]
        wall = summary.get("wall_seconds")
        rows.append(
            {
                **_identification(run),
                "source": _name(run),
                "edits_made": _edits_made(run),
                "collapse_step": _collapse_step(run),
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
    for (editor, layer), members in sorted(groups.items(), key=lambda item: (_editor_rank(item[0][0]), item[0][1])):
        members = sorted(members, key=lambda run: run_key(run)[1])
        orders = [
            {"seed": run_key(run)[1], "collapse_step": _collapse_step(run), "edits_made": _edits_made(run)}
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
        if k == n:
            verdict = "collapses in every order"
        elif k:
            verdict = f"collapses in {k} of {n} orders"
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


def rho_alarm_rows(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return the ρ-alarm AUROCs of every run whose edits record ρ (the ROME family), as its summary holds them."""
    rows = []
    for run in runs:
        alarm = _summary(run).get("rho_alarm") or {}
        if "low_rho" not in alarm:  # the other editors' alarm holds only a note: ρ is not defined for them
            continue
        rows.append(
            {
                **_identification(run),
                "n_edits": alarm.get("n_edits"),
                "n_disabling": alarm.get("n_disabling"),
                "low_rho": alarm.get("low_rho"),
                "residual_norm": alarm.get("residual_norm"),
                "previous_probe_perplexity": alarm.get("previous_probe_perplexity"),
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------------ prediction
def _judged(run: Mapping[str, Any]) -> dict[str, list[Any]]:
    pairs = run.get("pairs") or {}
    return judged_pairs(pairs) if pairs else {}


def prediction_rows(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return per run the P-prediction verdict and controls its summary holds, and the output correlation (listed)."""
    rows = []
    for run in runs:
        summary = _summary(run)
        verdict = summary.get("prediction_verdict") or {}
        rows.append(
            {
                **_identification(run),
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


def _forgetting_columns(run: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Return the judged pairs whose earlier edit succeeded right after it was made, with a "lost" column."""
    pairs, edits = _judged(run), run.get("edits") or []
    if not pairs:
        return {}
    missing = [name for name in ("edit_index", "success_now", *PREDICTORS) if name not in pairs]
    if missing:
        raise KisError(
            f"{_name(run)}'s pairs lack {', '.join(missing)}: an older kis wrote it; rerun it with `kis lifelong`"
        )
    keep = []
    for row, index in enumerate(pairs["edit_index"]):
        if not 0 <= int(index) < len(edits):
            raise KisError(f"{_name(run)} has a pair of edit {index} but only {len(edits)} edits: rerun the run")
        if edits[int(index)].get("newest_efficacy") is True:
            keep.append(row)
    columns = {name: [pairs[name][row] for row in keep] for name in ("edit_index", *PREDICTORS)}
    columns["lost"] = [not bool(pairs["success_now"][row]) for row in keep]
    return columns


def _lost_areas(columns: Mapping[str, Sequence[Any]], n_boot: int, seed: int) -> dict[str, Any]:
    """Return the clustered AUROC of each predictor for a lost edit, P minus the count's, and the verdict."""

    def area(name: str) -> Callable[[dict[str, np.ndarray]], float | None]:
        return lambda c: auroc(c[name], c["lost"])

    def difference(c: dict[str, np.ndarray]) -> float | None:
        ours, count = auroc(c["predicted"], c["lost"]), auroc(c["later_count"], c["lost"])
        return None if ours is None or count is None else ours - count

    boot = lambda statistic: clustered_bootstrap(columns, statistic, "edit_index", n_boot, seed)  # noqa: E731
    gap = boot(difference)
    beats = gap["low"] is not None and gap["low"] > 0
    reason = (
        f"AUROC of P minus that of later_count {_fmt(gap['value'])}, CI [{_fmt(gap['low'])}, {_fmt(gap['high'])}]"
        + (" lies above 0" if beats else " does not lie above 0")
    )
    return {
        "auroc": {name: boot(area(name)) for name in PREDICTORS},
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
        row: dict[str, Any] = {**_identification(run)}
        if not _moved(run):
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


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


# ------------------------------------------------------------------------------------------ predictors of collapse
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
    steps, edits, collapse = run.get("steps") or [], run.get("edits") or [], _collapse_step(run)
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
    collapsed = [run for run in runs if _moved(run) and _collapse_step(run) is not None]
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
    boot = lambda statistic: clustered_bootstrap(columns, statistic, "run", n_boot, seed)  # noqa: E731

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
                **_identification(run),
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
        "runs": [{**_identification(run), "collapse_step": _collapse_step(run)} for run in collapsed],
        "n_runs": n_runs,
        "n_steps": len(rows),
        "too_few": too_few,
        "note": TOO_FEW_RUNS_NOTE.format(n=n_runs, minimum=MIN_PREDICTOR_RUNS) if too_few else None,
        "predictors": predictors,
    }


# ------------------------------------------------------------------------------------------------ paired editors
def _metric_at(run: Mapping[str, Any], metric: str) -> dict[int, float]:
    """Return {n_edits: value} of one step metric, leaving out steps where it was not measured."""
    found = {}
    for step in run.get("steps") or []:
        value = step.get(metric)
        if value is not None and math.isfinite(float(value)):
            found[int(step["n_edits"])] = float(value)
    return found


def _collapse_outcome(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """Return how A's collapse compares with B's in one order: later, earlier, same step, neither, undecided."""
    step_a, step_b, edits_a, edits_b = _collapse_step(a), _collapse_step(b), _edits_made(a), _edits_made(b)
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
) -> dict[str, Any]:
    """Return per layer the order-by-order differences A − B of each metric, their collapse steps and the verdict."""
    by_key = {run_key(run): run for run in runs}
    layers = sorted({layer for editor, _, layer in by_key if editor in (editor_a, editor_b)})
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
                    "edits_a": _edits_made(a),
                    "edits_b": _edits_made(b),
                    "collapse_a": _collapse_step(a),
                    "collapse_b": _collapse_step(b),
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


# ----------------------------------------------------------------------------------------------------------- study
def study(
    folder_or_runs: str | Path | Iterable[Mapping[str, Any]], n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Return every number and verdict of a study: a folder of lifelong runs, or the runs themselves."""
    if isinstance(folder_or_runs, (str, Path)):
        runs = load_study(folder_or_runs)
    else:
        runs = check_study(folder_or_runs)
    return {
        "runs": [{**_identification(run), "source": _name(run)} for run in runs],
        "rules": {
            "collapse": RULE_COLLAPSE,
            "forgetting": RULE_FORGETTING,
            "predictors": RULE_PREDICTORS,
            "paired": paired_rule("alphaedit", "rome"),
        },
        "collapse_rows": collapse_rows(runs),
        "collapse_by_editor": collapse_by_editor(runs),
        "rho_alarm_rows": rho_alarm_rows(runs),
        "prediction_rows": prediction_rows(runs),
        "forgetting_rows": forgetting_rows(runs, n_boot, seed),
        "collapse_predictors": collapse_predictors(runs, n_boot, seed),
        "paired_comparison": paired_comparison(runs),
    }
