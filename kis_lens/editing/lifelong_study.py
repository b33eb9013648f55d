"""Numbers and verdicts across many lifelong-editing runs (``kis lifelong``): a study of editors × edit orders × layers.

One run edits one fact after another in the order its seed fixes, so two editors with the same seed edit the same
facts in the same sequence: an *order*. A study is every finished run under one folder (layer_<L>/ subfolders
included) that shares all settings but the editor, the seed, the layer and the number of edits. Everything here is
read from the runs' JSON files (their summaries are taken as written, never recomputed) or computed from their
steps, edits and pairs; every verdict follows a rule stated in a RULE_* constant. Nothing is drawn or rendered:
each function returns plain JSON-able dicts and lists for a renderer or a test to read. This module reads a study
and gathers its tables: study_runs (keys, the settings check), study_collapse, study_prediction (P and forgetting,
over whole runs and before their collapse), study_predictors (of collapse) and study_paired (two editors order by
order).

>>> found = study("results/lifelong/smollm2-135m", n_boot=1000)
>>> found["collapse_by_editor"][0]["verdict"]
'collapses in every order'
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

from kis_lens.editing.study_collapse import (
    RULE_COLLAPSE,
    RULE_RHO_ALARM,
    collapse_by_editor,
    collapse_rows,
    rho_alarm_rows,
)
from kis_lens.editing.study_paired import paired_comparison, paired_rule
from kis_lens.editing.study_prediction import (
    RULE_ACROSS_ORDERS,
    RULE_BEFORE_COLLAPSE,
    RULE_FORGETTING,
    forgetting_across_orders,
    forgetting_before_collapse_rows,
    forgetting_rows,
    prediction_across_orders,
    prediction_before_collapse_rows,
    prediction_rows,
)
from kis_lens.editing.study_predictors import RULE_PREDICTORS, collapse_predictors
from kis_lens.editing.study_runs import check_study, identification, run_name, run_settings
from kis_lens.errors import KisError
from kis_lens.io import load_json_object
from kis_lens.layout import LIFELONG_FILE_PREFIX, is_lifelong_result


def _read_run(path: Path) -> dict[str, Any]:
    return load_json_object(path, "rerun `kis lifelong` for that run or delete the file")


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
        if not isinstance(run_settings(run).get("identity"), Mapping):
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


def study(
    folder_or_runs: str | Path | Iterable[Mapping[str, Any]], n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Return every number and verdict of a study: a folder of lifelong runs, or the runs themselves."""
    if isinstance(folder_or_runs, (str, Path)):
        runs = load_study(folder_or_runs)
    else:
        runs = check_study(folder_or_runs)
    predictions, forgetting = prediction_rows(runs), forgetting_rows(runs, n_boot, seed)
    early_predictions = prediction_before_collapse_rows(runs, n_boot, seed)
    early_forgetting = forgetting_before_collapse_rows(runs, n_boot, seed)
    return {
        "runs": [{**identification(run), "source": run_name(run)} for run in runs],
        "rules": {
            "collapse": RULE_COLLAPSE,
            "rho_alarm": RULE_RHO_ALARM,
            "forgetting": RULE_FORGETTING,
            "across_orders": RULE_ACROSS_ORDERS,
            "before_collapse": RULE_BEFORE_COLLAPSE,
            "predictors": RULE_PREDICTORS,
            "paired": paired_rule("alphaedit", "rome"),
        },
        "collapse_rows": collapse_rows(runs),
        "collapse_by_editor": collapse_by_editor(runs),
        "rho_alarm_rows": rho_alarm_rows(runs, n_boot, seed),
        "prediction_rows": predictions,
        "prediction_across_orders": prediction_across_orders(predictions),
        "forgetting_rows": forgetting,
        "forgetting_across_orders": forgetting_across_orders(forgetting),
        "before_collapse": {
            "prediction_rows": early_predictions,
            "prediction_across_orders": prediction_across_orders(early_predictions),
            "forgetting_rows": early_forgetting,
            "forgetting_across_orders": forgetting_across_orders(early_forgetting),
        },
        "collapse_predictors": collapse_predictors(runs, n_boot, seed),
        "paired_comparison": paired_comparison(runs, n_boot=n_boot, bootstrap_seed=seed),
    }
