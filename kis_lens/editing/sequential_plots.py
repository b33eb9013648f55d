"""Figures, report sections and the generated docs/lifelong.md of the real lifelong-editing run (``kis lifelong``).

kis_lens.editing.sequential writes one ``lifelong_<editor>.json`` per editor into
``<output_dir>/<model>/lifelong/layer_<L>/`` (kis_lens.editing.results.lifelong_dir); this module only reads them.
Every number in the figures, the report tables and the Markdown comes from those files, and every verdict is
computed here by code.

>>> results = load_lifelong_results("results/smollm2-135m/lifelong/layer_5")
>>> write_lifelong_doc("results/smollm2-135m/lifelong/layer_5", "docs/lifelong.md")
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from kis_lens.editing.results import (  # noqa: F401 (lifelong_dir: re-exported beside the readers)
    LIFELONG_FILE_PREFIX,
    find_lifelong_folders,
    lifelong_dir,
    lifelong_file,
)
from kis_lens.errors import KisError
from kis_lens.io import atomic_write
from kis_lens.plots import write_html_figures
from kis_lens.report import ReportSection, html_table
from kis_lens.results import RunResult

EDITORS: tuple[str, ...] = ("rome", "memit", "alphaedit", "none")
EDITOR_LABELS: dict[str, str] = {
    "rome": "ROME",
    "memit": "MEMIT",
    "alphaedit": "AlphaEdit",
    "none": "no edit (reference)",
}
# The edit simulation's colours (kis_lens.editing.plots.CONDITION_COLORS, same level: not importable here).
EDITOR_COLORS: dict[str, str] = {"rome": "#d62728", "memit": "#ff7f0e", "alphaedit": "#1f77b4", "none": "#7f7f7f"}
FIGURE_NAMES: tuple[str, ...] = ("lifelong_metrics", "lifelong_interference")
# (step key, panel title, log y) of the metrics figure, row by row, two panels a row.
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("score", "score (harmonic mean of efficacy, paraphrase, neighborhood)", False),
    ("efficacy", "efficacy: rewrite success on all edits so far", False),
    ("paraphrase", "paraphrase success", False),
    ("neighborhood", "neighborhood success", False),
    ("generation_efficacy", "generation efficacy (greedy continuation = new target)", False),
    ("fluency", "fluency (n-gram entropy)", False),
    ("perplexity", "held-out perplexity", True),
    ("weight_change_norm", "‖W_t − W_0‖_F", False),
    ("condition_number", "condition number of W_t", True),
    ("unedited_nll_drift", "unedited facts: mean |ΔNLL(true)|", False),
)
UNIT_METRICS = ("score", "efficacy", "paraphrase", "neighborhood", "generation_efficacy")
MAX_SCATTER_POINTS = 5_000  # pairs drawn per editor in the interference scatter (seeded subsample)
SCATTER_SEED = 0
# Verdict rules, stated in the document next to the verdicts.
PREDICTION_EDITORS: tuple[str, ...] = ("rome", "memit")  # unprojected updates: what the P prediction models
PREDICTION_SPEARMAN = 0.5  # Spearman ρ of predicted vs measured at or above this counts as "P predicts"
REPRODUCED, NOT_REPRODUCED, PARTLY, NOT_MEASURED = "reproduced", "not reproduced", "partly", "not measured"


def editor_label(editor: str) -> str:
    """Return an editor's display name (its key for editors this module does not know)."""
    return EDITOR_LABELS.get(editor, editor)


def _editor_order(editors: Sequence[str]) -> list[str]:
    known = [editor for editor in EDITORS if editor in editors]
    return known + sorted(editor for editor in editors if editor not in EDITORS)


def load_lifelong_results(folder: str | Path) -> dict[str, dict[str, Any]]:
    """Return every lifelong_<editor>.json in folder keyed by editor: rome, memit, alphaedit, none, then others."""
    folder = Path(folder)
    paths = {
        path.stem.removeprefix(LIFELONG_FILE_PREFIX): path for path in folder.glob(f"{LIFELONG_FILE_PREFIX}*.json")
    }
    if not paths:
        raise KisError(
            f"no lifelong results (lifelong_<editor>.json) in {folder}: run `kis lifelong` for this model and layer "
            "first, or pass the layer_<L> folder it wrote"
        )
    results = {}
    for editor in _editor_order(list(paths)):
        try:
            results[editor] = json.loads(paths[editor].read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise KisError(f"cannot read {paths[editor]}: {error}; rerun `kis lifelong` for that editor") from None
    return results


# ------------------------------------------------------------------------------------------------ reading results


def _steps(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(result.get("steps") or [])


def metric_points(result: Mapping[str, Any], metric: str) -> tuple[list[int], list[float]]:
    """Return (n_edits, values) of one step metric, skipping the steps where it is null (probes, step 0)."""
    points = [(step["n_edits"], step[metric]) for step in _steps(result) if step.get(metric) is not None]
    return [n for n, _ in points], [value for _, value in points]


def last_value(result: Mapping[str, Any], metric: str, at_most: int | None = None) -> tuple[int, float] | None:
    """Return (n_edits, value) of the last non-null value of a step metric (at n_edits ≤ at_most), or None."""
    for step in reversed(_steps(result)):
        if step.get(metric) is not None and (at_most is None or step["n_edits"] <= at_most):
            return step["n_edits"], step[metric]
    return None


def final_n_edits(result: Mapping[str, Any]) -> int:
    """Return the number of edits at the run's last measurement (0 for a run without steps)."""
    steps = _steps(result)
    return int(steps[-1]["n_edits"]) if steps else 0


def collapse_step(result: Mapping[str, Any]) -> int | None:
    """Return the number of edits at which the run collapsed, or None when it did not within the run."""
    return ((result.get("summary") or {}).get("collapse") or {}).get("step")


def _n_planned(result: Mapping[str, Any]) -> int | str:
    """Return how many facts the run was set to edit: its recorded edit order, else the configured n_edits."""
    facts = _settings(result).get("facts")
    return len(facts) if isinstance(facts, list) else _config(result).get("n_edits", "—")


def _settings(result: Mapping[str, Any]) -> dict[str, Any]:
    return result.get("settings") or {}


def _config(result: Mapping[str, Any]) -> dict[str, Any]:
    return _settings(result).get("config") or {}


def _model_name(result: Mapping[str, Any]) -> str:
    return str((_settings(result).get("model") or {}).get("name") or _config(result).get("model_name") or "model")


def _correlation(result: Mapping[str, Any], name: str) -> dict[str, Any]:
    return ((result.get("summary") or {}).get("correlations") or {}).get(name) or {}


# ------------------------------------------------------------------------------------------------------- figures


def _shared_text(results: Mapping[str, Mapping[str, Any]], read: Callable[[Mapping[str, Any]], Any]) -> str:
    """Return one value when every editor has it, else 'editor value' for each."""
    values = {editor: read(result) for editor, result in results.items()}
    if len({json.dumps(value, sort_keys=True, default=str) for value in values.values()}) <= 1:
        return str(next(iter(values.values()), ""))
    return ", ".join(f"{editor_label(editor)} {value}" for editor, value in values.items())


def _title(results: Mapping[str, Mapping[str, Any]], what: str) -> str:
    model = _shared_text(results, _model_name)
    layer = _shared_text(results, lambda result: _config(result).get("layer", "?"))
    return f"{what}: {model}, layer {layer}"


def metrics_figure(results: Mapping[str, Mapping[str, Any]]) -> go.Figure:
    """Return every step metric against the number of edits, one line per editor, collapse steps dotted."""
    rows = (len(METRICS) + 1) // 2
    figure = make_subplots(rows=rows, cols=2, subplot_titles=[title for _, title, _ in METRICS], vertical_spacing=0.06)
    panels = [(index // 2 + 1, index % 2 + 1) for index in range(len(METRICS))]
    for editor, result in results.items():
        label, color = editor_label(editor), EDITOR_COLORS.get(editor)
        for (metric, _, _), (row, col) in zip(METRICS, panels):
            x, y = metric_points(result, metric)
            figure.add_trace(
                go.Scatter(
                    x=x,
                    y=y,
                    mode="lines+markers",
                    name=label,
                    legendgroup=editor,
                    showlegend=metric == METRICS[0][0],
                    line={"color": color},
                    marker={"size": 4},
                    meta={"editor": editor, "metric": metric},
                ),
                row=row,
                col=col,
            )
        step = collapse_step(result)
        if step is None:
            continue
        for row, col in panels:
            figure.add_vline(
                x=step,
                line={"color": color, "dash": "dot", "width": 1.5},
                name=f"collapse {editor}",
                row=row,
                col=col,
            )
        figure.add_trace(
            go.Scatter(
                x=[step],
                y=[1.0],
                mode="markers",
                name=f"{label} collapses at {step} edits",
                legendgroup=editor,
                marker={"color": color, "symbol": "x", "size": 10},
                meta={"editor": editor, "metric": "collapse"},
            ),
            row=panels[1][0],
            col=panels[1][1],
        )
    for (metric, _, log), (row, col) in zip(METRICS, panels):
        figure.update_xaxes(title_text="number of edits", row=row, col=col)
        if log:
            figure.update_yaxes(type="log", row=row, col=col)
        elif metric in UNIT_METRICS:
            figure.update_yaxes(range=[-0.05, 1.05], row=row, col=col)
    figure.update_layout(
        title=_title(results, "Lifelong editing, one edit after another"),
        height=300 * rows,
        legend={"orientation": "h", "y": -0.05},
    )
    return figure


def _format_r(value: float | None) -> str:
    """Return a correlation as the docs and figures print it: 3 decimals, '—' when undefined."""
    return "—" if value is None else f"{value:.3f}"


def _subsample(n: int, limit: int = MAX_SCATTER_POINTS, seed: int = SCATTER_SEED) -> np.ndarray:
    """Return sorted indices of at most limit of n points (all of them when n ≤ limit), seeded."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def interference_figure(results: Mapping[str, Mapping[str, Any]]) -> go.Figure:
    """Return predicted (from P) vs measured interference per edited pair and both averages against the edits."""
    figure = make_subplots(
        rows=2,
        cols=2,
        specs=[[{}, {}], [{"colspan": 2}, None]],
        subplot_titles=(
            "MLP output of earlier edits: predicted vs measured",
            "log p(new) of earlier edits: predicted vs measured",
            "mean interference on earlier edits: predicted (solid) and measured (dashed)",
        ),
        vertical_spacing=0.14,
    )
    for editor, result in results.items():
        if editor == "none":
            continue
        label, color = editor_label(editor), EDITOR_COLORS.get(editor)
        pairs = result.get("pairs") or {}
        predicted = np.asarray(pairs.get("predicted") or [], dtype=np.float64)
        keep = _subsample(len(predicted))
        shown = "" if len(keep) == len(predicted) else f", {len(keep):,} of {len(predicted):,} shown"
        for col, (key, correlation) in enumerate(
            (("measured_output", "predicted_vs_output"), ("measured_logprob", "predicted_vs_logprob")), start=1
        ):
            numbers = _correlation(result, correlation)
            measured = np.asarray(pairs.get(key) or [], dtype=np.float64)
            figure.add_trace(
                go.Scatter(
                    x=predicted[keep].tolist(),
                    y=measured[keep].tolist() if len(measured) == len(predicted) else [],
                    mode="markers",
                    name=f"{label}: Pearson r = {_format_r(numbers.get('pearson'))}, Spearman ρ = "
                    f"{_format_r(numbers.get('spearman'))} (n = {numbers.get('n', len(predicted)):,}{shown})",
                    legendgroup=editor,
                    marker={"size": 4, "opacity": 0.4, "color": color},
                    meta={"editor": editor, "measured": key},
                ),
                row=1,
                col=col,
            )
            figure.update_xaxes(title_text="predicted ‖Σ_{i>u} P[i,u] r_i‖", row=1, col=col)
        for key, dash, show in (("predicted_interference", None, True), ("measured_interference", "dash", False)):
            x, y = metric_points(result, key)
            figure.add_trace(
                go.Scatter(
                    x=x,
                    y=y,
                    mode="lines+markers",
                    name=f"{label} ({key.split('_')[0]})",
                    legendgroup=editor,
                    showlegend=show,
                    line={"color": color, "dash": dash},
                    marker={"size": 4},
                    meta={"editor": editor, "metric": key},
                ),
                row=2,
                col=1,
            )
    figure.update_yaxes(title_text="measured ‖k_u (W_t − W_u)‖", row=1, col=1)
    figure.update_yaxes(title_text="measured |Δ log p(new)|", row=1, col=2)
    figure.update_xaxes(title_text="number of edits", row=2, col=1)
    figure.update_yaxes(title_text="mean over earlier edits", row=2, col=1)
    figure.update_layout(
        title=_title(results, "Interference predicted from P vs measured"),
        height=900,
        legend={"orientation": "h", "y": -0.1},
    )
    return figure


def lifelong_figures(results: Mapping[str, Mapping[str, Any]]) -> dict[str, go.Figure]:
    """Return {name: figure}: "lifelong_metrics", and "lifelong_interference" when an editor other than none ran."""
    makers = {"lifelong_metrics": metrics_figure, "lifelong_interference": interference_figure}
    return {name: makers[name](results) for name in lifelong_figure_names(results)}


def lifelong_figure_names(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Return the names of the figures made for these results (the interference one needs an edited run)."""
    return [name for name in FIGURE_NAMES if name != "lifelong_interference" or any(e != "none" for e in results)]


def write_lifelong_figures(results: Mapping[str, Mapping[str, Any]], folder: str | Path) -> dict[str, Path]:
    """Write each figure as standalone HTML (Plotly from its CDN) atomically into folder; return {name: path}."""
    return write_html_figures(lifelong_figures(results), folder)


# ------------------------------------------------------------------------------------------------ report section


def summary_rows(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return one row per editor of the report table: collapse, final metrics, correlations and timing."""
    rows = []
    for editor, result in results.items():
        summary = result.get("summary") or {}
        row: dict[str, Any] = {"editor": editor_label(editor), "edits": final_n_edits(result)}
        row["collapse step"] = collapse_step(result)
        for metric in ("score", "efficacy", "paraphrase", "neighborhood", "perplexity"):
            found = last_value(result, metric)
            row[metric] = None if found is None else found[1]
        for name, short in (("predicted_vs_output", "output"), ("predicted_vs_logprob", "log p")):
            numbers = _correlation(result, name)
            row[f"Pearson, {short}"] = numbers.get("pearson")
            row[f"Spearman, {short}"] = numbers.get("spearman")
            row[f"pairs, {short}"] = numbers.get("n")
        row["wall s"] = summary.get("wall_seconds")
        row["s per edit"] = summary.get("seconds_per_edit")
        rows.append(row)
    return rows


def lifelong_sections(
    results: Mapping[str, Mapping[str, Any]], source: str | Path | None = None
) -> list[ReportSection]:
    """Return the report section of one lifelong folder: both figures and the per-editor summary table."""
    where = f"From {source}: " if source is not None else ""
    return [
        ReportSection(
            _title(results, "Lifelong editing (kis lifelong)"),
            figures=list(lifelong_figures(results).values()),
            intro=f"{where}real edits of one layer's W_out, one CounterFact fact after another, per editor. Final "
            "values are each metric's last measurement (paraphrase, neighborhood and score only at full evaluations); "
            "correlations are of the interference predicted from P vs measured on earlier edits.",
            html=html_table(summary_rows(results)),
        )
    ]


def belongs_to_run(lifelong_settings: Mapping[str, Any], run_settings: Mapping[str, Any]) -> bool:
    """Return whether lifelong results ran on a run's model (they edit their own facts, with their own C)."""
    model = (lifelong_settings.get("model") or {}).get("name")
    return model is not None and model == (run_settings.get("model") or {}).get("name")


def lifelong_of_run(run_settings: Mapping[str, Any]) -> list[tuple[Path, dict[str, dict[str, Any]]]]:
    """Return (folder, results by editor) of every lifelong folder under a run's output dir that belongs to it."""
    model = (run_settings.get("model") or {}).get("name")
    if not model:
        return []
    output_dir = (run_settings.get("config") or {}).get("output_dir", "")
    found = []
    for folder in find_lifelong_folders(output_dir, model):
        results = {
            editor: result
            for editor, result in load_lifelong_results(folder).items()
            if belongs_to_run(_settings(result), run_settings)
        }
        if results:
            found.append((folder, results))
    return found


def lifelong_report_sections(result: RunResult) -> list[ReportSection]:
    """Return a report section per lifelong folder under the run's output dir with the run's model (`kis report`)."""
    sections = []
    for folder, results in lifelong_of_run(result.settings):
        sections.extend(lifelong_sections(results, source=folder))
    return sections


# ------------------------------------------------------------------------------------------------------ Markdown


def _number(value: Any) -> str:
    """Return a number as the document prints it: 4 significant digits, ints whole, '—' for null."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _seconds(value: Any) -> str:
    return "—" if value is None else f"{value:.3g} s"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _never(result: Mapping[str, Any]) -> str:
    return f"none within {final_n_edits(result):,} edits"


def _collapse_text(result: Mapping[str, Any]) -> str:
    step = collapse_step(result)
    return _never(result) if step is None else f"after {step:,} edits"


def _at(result: Mapping[str, Any], metric: str, at_most: int | None = None) -> str:
    """Return the metric's last value (at n_edits ≤ at_most) with '(at n)' when it is not the run's last step."""
    found = last_value(result, metric, at_most)
    if found is None:
        return "—"
    n, value = found
    end = final_n_edits(result) if at_most is None else at_most
    return _number(value) if n == end else f"{_number(value)} (at {n:,})"


def _ratio_to_none(results: Mapping[str, Mapping[str, Any]], editor: str, metric: str) -> str:
    if "none" not in results or editor == "none":
        return "—"
    mine, reference = last_value(results[editor], metric), last_value(results["none"], metric)
    if mine is None or reference is None or reference[1] == 0:
        return "—"
    return f"{mine[1] / reference[1]:.4g}"


def judge_collapse(results: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Return the verdict on "ROME collapses": reproduced when rome's collapse step is not null."""
    claim = "Sequential ROME edits collapse the model"
    if "rome" not in results:
        return {"claim": claim, "verdict": NOT_MEASURED, "evidence": "no lifelong_rome.json in this folder."}
    rome = results["rome"]
    collapse = (rome.get("summary") or {}).get("collapse") or {}
    step = collapse.get("step")
    end = f"final efficacy {_at(rome, 'efficacy')}, perplexity {_at(rome, 'perplexity')}"
    if "none" in results:
        end += f" (no edit: {_at(results['none'], 'perplexity')})"
    if step is None:
        return {
            "claim": claim,
            "verdict": NOT_REPRODUCED,
            "evidence": f"ROME did not collapse within {final_n_edits(rome):,} edits (criterion: "
            f"{collapse.get('criterion', '?')}); {end}.",
        }
    at_collapse = last_value(rome, "efficacy", step)
    efficacy = "" if at_collapse is None else f"; efficacy {_number(at_collapse[1])} at {at_collapse[0]:,} edits"
    return {
        "claim": claim,
        "verdict": REPRODUCED,
        "evidence": f"ROME collapsed after {step:,} edits (criterion: {collapse.get('criterion', '?')}){efficacy}; "
        f"{end}.",
    }


def judge_alphaedit_holds(results: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Return the verdict on "AlphaEdit holds longer than ROME", from both collapse steps (null = not within run)."""
    claim = "AlphaEdit holds longer than ROME"
    missing = [name for name in ("rome", "alphaedit") if name not in results]
    if missing:
        return {
            "claim": claim,
            "verdict": NOT_MEASURED,
            "evidence": f"no {' or '.join(f'lifelong_{name}.json' for name in missing)} in this folder.",
        }
    rome, alpha = results["rome"], results["alphaedit"]
    r_step, a_step = collapse_step(rome), collapse_step(alpha)
    common = min(final_n_edits(rome), final_n_edits(alpha))
    compared = (
        f"at {common:,} edits efficacy {_at(alpha, 'efficacy', common)} (AlphaEdit) vs {_at(rome, 'efficacy', common)} "
        f"(ROME), score {_at(alpha, 'score', common)} vs {_at(rome, 'score', common)}"
    )
    steps = f"ROME collapsed {_collapse_text(rome)}, AlphaEdit {_collapse_text(alpha)}"
    if r_step is not None and a_step is None and final_n_edits(alpha) <= r_step:
        verdict = NOT_MEASURED
        steps += f"; AlphaEdit's run ({final_n_edits(alpha):,} edits) ends before ROME's collapse"
    elif r_step is not None and (a_step is None or a_step > r_step):
        verdict = REPRODUCED
    elif r_step is None and a_step is None:
        a_eff, r_eff = last_value(alpha, "efficacy", common), last_value(rome, "efficacy", common)
        ahead = a_eff is not None and r_eff is not None and a_eff[1] > r_eff[1]
        verdict = PARTLY if ahead else NOT_REPRODUCED
        steps += "; neither collapsed, so only their efficacy can be compared"
    else:  # AlphaEdit collapsed, and ROME later or not at all
        verdict = NOT_REPRODUCED
    return {"claim": claim, "verdict": verdict, "evidence": f"{steps}; {compared}."}


def judge_prediction(results: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Return the verdict on "P predicts the drift": Spearman ρ ≥ PREDICTION_SPEARMAN for ROME's and MEMIT's pairs."""
    claim = "P predicts the interference on earlier edits"
    parts, checks = [], []
    for editor, result in results.items():
        if editor == "none":
            continue
        numbers = []
        for name, short in (("predicted_vs_output", "MLP output"), ("predicted_vs_logprob", "log p")):
            corr = _correlation(result, name)
            numbers.append(
                f"{short}: Pearson r = {_format_r(corr.get('pearson'))}, Spearman ρ = "
                f"{_format_r(corr.get('spearman'))}, n = {_number(corr.get('n'))}"
            )
            if editor == "rome" and name == "predicted_vs_output":
                numbers[-1] += " (an identity for rank-one edits with C, not judged)"
            elif editor in PREDICTION_EDITORS and corr.get("spearman") is not None:
                checks.append(corr["spearman"] >= PREDICTION_SPEARMAN)
        parts.append(f"{editor_label(editor)} ({'; '.join(numbers)})")
    if not checks:
        verdict = NOT_MEASURED
    elif all(checks):
        verdict = REPRODUCED
    elif any(checks):
        verdict = PARTLY
    else:
        verdict = NOT_REPRODUCED
    rule = (
        f"{sum(checks)} of {len(checks)} correlations of {' and '.join(map(editor_label, PREDICTION_EDITORS))} "
        f"have Spearman ρ ≥ {PREDICTION_SPEARMAN:g}"
    )
    return {"claim": claim, "verdict": verdict, "evidence": f"{rule}. " + "; ".join(parts) + "."}


def accumulated_p2_text(results: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Return ΣP² accumulated at each editor's collapse (or at its last step when it did not collapse)."""
    parts = []
    for editor, result in results.items():
        if editor == "none":
            continue
        collapse = (result.get("summary") or {}).get("collapse") or {}
        if collapse.get("step") is not None:
            parts.append(
                f"{editor_label(editor)}: ΣP² = {_number(collapse.get('accumulated_p2_at_collapse'))} at its collapse "
                f"after {collapse['step']:,} edits"
            )
        else:
            parts.append(
                f"{editor_label(editor)}: no collapse within {final_n_edits(result):,} edits, ΣP² = "
                f"{_at(result, 'accumulated_p2')} at the end"
            )
    return {
        "claim": "Accumulated superposition ΣP² at collapse",
        "verdict": "measured" if parts else NOT_MEASURED,
        "evidence": "; ".join(parts)
        + ". Within one edit order ΣP² only grows with the number of edits, so one run cannot tell whether it "
        "predicts the collapse better than the count of edits does: that needs runs over several orders (--seed)."
        if parts
        else "no edited run in this folder.",
    }


def lifelong_verdicts(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, str]]:
    """Return the claim-by-claim verdicts (claim, verdict, evidence) computed from the results."""
    return [
        judge_collapse(results),
        judge_alphaedit_holds(results),
        judge_prediction(results),
        accumulated_p2_text(results),
    ]


def _editor_table(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    editors = list(results)
    rows: list[tuple[str, Callable[[str, Mapping[str, Any]], str]]] = [
        ("edits made", lambda e, r: _number(len(r.get("edits") or []))),
        ("last measurement at (edits)", lambda e, r: _number(final_n_edits(r))),
        ("collapse", lambda e, r: _collapse_text(r)),
        ("collapse criterion", lambda e, r: ((r.get("summary") or {}).get("collapse") or {}).get("criterion") or "—"),
        ("efficacy (all edits so far)", lambda e, r: _at(r, "efficacy")),
        ("generation efficacy", lambda e, r: _at(r, "generation_efficacy")),
        ("paraphrase", lambda e, r: _at(r, "paraphrase")),
        ("neighborhood", lambda e, r: _at(r, "neighborhood")),
        ("score", lambda e, r: _at(r, "score")),
        ("fluency", lambda e, r: _at(r, "fluency")),
        ("fluency ÷ no edit's", lambda e, r: _ratio_to_none(results, e, "fluency")),
        ("held-out perplexity", lambda e, r: _at(r, "perplexity")),
        ("perplexity ÷ no edit's", lambda e, r: _ratio_to_none(results, e, "perplexity")),
        ("unedited facts mean abs ΔNLL(true)", lambda e, r: _at(r, "unedited_nll_drift")),
        ("‖W_t − W_0‖_F", lambda e, r: _at(r, "weight_change_norm")),
        ("σ_max(W_t)", lambda e, r: _at(r, "sigma_max")),
        ("cond(W_t)", lambda e, r: _at(r, "condition_number")),
        ("accumulated ΣP²", lambda e, r: _at(r, "accumulated_p2")),
        ("wall time", lambda e, r: _seconds((r.get("summary") or {}).get("wall_seconds"))),
        ("per edit", lambda e, r: _seconds((r.get("summary") or {}).get("seconds_per_edit"))),
        ("per probe", lambda e, r: _seconds((r.get("summary") or {}).get("seconds_per_probe"))),
        ("per full evaluation", lambda e, r: _seconds((r.get("summary") or {}).get("seconds_per_eval"))),
    ]
    lines = [
        "| | " + " | ".join(editor_label(editor) for editor in editors) + " |",
        "|---|" + "---:|" * len(editors),
    ]
    for name, read in rows:
        lines.append(f"| {name} | " + " | ".join(_cell(read(e, results[e])) for e in editors) + " |")
    return lines


def _settings_shown(result: Mapping[str, Any]) -> dict[str, Any]:
    """Return a run's settings with the edit order shortened to its length and first case ids."""
    shown = dict(_settings(result))
    facts = shown.get("facts")
    if isinstance(facts, list) and len(facts) > 10:
        shown["facts"] = f"{len(facts)} case ids in edit order, first {facts[:10]}"
    return shown


def render_lifelong_markdown(
    results: Mapping[str, Mapping[str, Any]],
    figure_paths: Mapping[str, str] | None = None,
    command: str | None = None,
    *,
    source: str | Path | None = None,
) -> str:
    """Return the text of docs/lifelong.md: settings, the per-editor table and the verdicts, all read from results."""
    if not results:
        raise KisError("no lifelong results to write a document from: run `kis lifelong` first")
    config = lambda key: _shared_text(results, lambda result: _config(result).get(key, "—"))  # noqa: E731
    setting = lambda key: _shared_text(results, lambda result: _settings(result).get(key, "—"))  # noqa: E731
    if command is None:
        recorded = {
            str(_settings(result).get("command")) for result in results.values() if _settings(result).get("command")
        }
        command = " && ".join(sorted(recorded)) or None
    model = _shared_text(results, _model_name)
    where = f"`{source}`" if source is not None else "the `lifelong_<editor>.json` files of `kis lifelong`"
    lines = [
        f"# Lifelong editing on {model}, layer {config('layer')}",
        "",
        f"Generated from {where} by kis_lens.editing.sequential_plots; do not edit by hand.",
        "",
        "Each editor edits the MLP output weight W_out of one layer for real, one CounterFact fact after another, "
        "and the model is measured along the way (a probe: efficacy, perplexity and the weight statistics; a full "
        "evaluation: every metric). Efficacy is ROME's rewrite success on all edits made so far, so it is also the "
        "retention of earlier edits. `no edit` is the unedited model measured on the same schedule.",
        "",
        "## Setting",
        "",
        f"- **Model**: `{model}`, layer {config('layer')}",
        f"- **Edits**: {_shared_text(results, _n_planned)} CounterFact facts from `{config('facts')}` in an order "
        f"drawn with seed {config('seed')}; MEMIT batch size {config('batch_size')}",
        f"- **Watched**: {config('n_unedited')} never-edited facts from `{config('unedited_facts')}`; held-out "
        f"perplexity on {config('heldout_texts')} texts of {config('heldout_tokens')} tokens; C from "
        f"`{config('corpus')}` ({config('max_tokens')} tokens)",
        f"- **Cadence**: a probe every {config('probe_every')} edits, a full evaluation every {config('eval_every')}",
        f"- **Editors**: {', '.join(editor_label(editor) for editor in results)}",
        f"- **Device**: {setting('device')}, {setting('threads')} threads; kis_lens {setting('kis_lens_version')}",
        "- **Command**: " + (f"`{command}`" if command else "not recorded in the results"),
        "",
        "## Per editor",
        "",
        "Each metric's last measured value; `(at n)` marks a metric last measured before the final step (paraphrase, "
        "neighborhood, score and fluency are measured at full evaluations only). Ratios divide by the unedited "
        "model's value.",
        "",
        *_editor_table(results),
        "",
        "## Verdicts, claim by claim",
        "",
        "| claim | verdict | evidence |",
        "|---|---|---|",
    ]
    lines += [f"| {v['claim']} | **{v['verdict']}** | {_cell(v['evidence'])} |" for v in lifelong_verdicts(results)]
    lines += [
        "",
        "Verdict rules: ROME collapses when its run records a collapse step (the criterion above). AlphaEdit holds "
        "longer when it collapses later than ROME or not at all within a run that goes past ROME's collapse; when "
        "neither collapses it is `partly` if AlphaEdit's efficacy at the last common number of edits is higher. "
        f"P predicts the interference when the Spearman ρ of predicted vs measured is at least {PREDICTION_SPEARMAN:g} "
        f"for every correlation of {' and '.join(map(editor_label, PREDICTION_EDITORS))} (their updates are not "
        "projected, which is what the prediction from P assumes); `partly` when some are. ROME's output correlation "
        "is an identity (k_u(W_t − W_u) = Σ_{i>u} P[i,u] r_i for rank-one edits with C) and is not judged; "
        "AlphaEdit's correlations are listed, not judged.",
    ]
    if figure_paths:
        lines += ["", "## Figures", ""]
        for name, path in figure_paths.items():
            lines += [f"- [{name} (interactive HTML)]({path})"]
    lines += [
        "",
        "<details><summary>all settings</summary>",
        "",
        "```json",
        json.dumps({editor: _settings_shown(result) for editor, result in results.items()}, indent=2, default=str),
        "```",
        "",
        "</details>",
    ]
    return "\n".join(lines) + "\n"


def write_lifelong_doc(folder: str | Path, doc_path: str | Path, command: str | None = None) -> Path:
    """Write the figures (when missing or older than the results) and the Markdown doc atomically; return its path."""
    folder, doc_path = Path(folder), Path(doc_path)
    results = load_lifelong_results(folder)
    newest = max(lifelong_file(folder, editor).stat().st_mtime for editor in results)
    figures = {name: folder / f"{name}.html" for name in lifelong_figure_names(results)}
    if any(not path.exists() or path.stat().st_mtime < newest for path in figures.values()):
        figures = write_lifelong_figures(results, folder)
    links = {name: os.path.relpath(Path(path).resolve(), doc_path.resolve().parent) for name, path in figures.items()}
    text = render_lifelong_markdown(results, links, command, source=folder)
    return atomic_write(doc_path, lambda temp: temp.write_text(text, encoding="utf-8"))
