"""The report section of one set of lifelong runs (``kis report``): its figures and a per-editor summary table.

>>> (section,) = lifelong_sections(load_lifelong_results(folder), source=folder)  # kis_lens.editing.results uses it
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from kis_lens.editing.lifelong_files import (
    any_legacy,
    collapse_step,
    editor_labels,
    final_n_edits,
    last_value,
    run_correlation,
    runs_text,
    runs_title,
    value_search_text,
)
from kis_lens.editing.lifelong_plots import lifelong_figures
from kis_lens.report import ReportSection, html_table


def summary_rows(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return one row per editor of the report table: collapse, final metrics, correlations and timing."""
    rows, labels = [], editor_labels(results)
    for editor, result in results.items():
        summary = result.get("summary") or {}
        row: dict[str, Any] = {"editor": labels[editor], "edits": final_n_edits(result)}
        row["collapse step"] = collapse_step(result)
        for metric in ("score", "efficacy", "paraphrase", "neighborhood", "perplexity"):
            found = last_value(result, metric)
            row[metric] = None if found is None else found[1]
        for name, short in (("predicted_vs_output", "output"), ("predicted_vs_logprob", "log p")):
            numbers = run_correlation(result, name)
            row[f"Pearson, {short}"] = numbers.get("pearson")
            row[f"Spearman, {short}"] = numbers.get("spearman")
            row[f"pairs, {short}"] = numbers.get("n")
        row["value search"] = value_search_text(result)
        row["wall s"] = summary.get("wall_seconds")
        row["s per edit"] = summary.get("seconds_per_edit")
        rows.append(row)
    return rows


def lifelong_sections(
    results: Mapping[str, Mapping[str, Any]], source: str | Path | None = None
) -> list[ReportSection]:
    """Return the report section of one set of lifelong runs: both figures and the per-editor summary table."""
    where = f"From {source}: " if source is not None else ""
    superseded = (
        " Legacy runs of an older kis: their editors are named by what they really ran, and they are superseded."
        if any_legacy(results)
        else ""
    )
    return [
        ReportSection(
            runs_title(results, "Lifelong editing (kis lifelong)"),
            figures=list(lifelong_figures(results).values()),
            intro=f"{where}real edits of W_out, one CounterFact fact (or batch) after another, per editor. Final "
            "values are each metric's last measurement (paraphrase, neighborhood and score only at full evaluations); "
            "correlations are of the interference predicted from P vs measured on earlier edits. "
            f"Shown: {runs_text(results)}.{superseded}",
            html=html_table(summary_rows(results)),
        )
    ]
