"""docs/lifelong.md of a study: each editor's collapse over several edit orders, and the paper's claims about it.

Everything is read from the runs (kis_lens.editing.lifelong_study) and the causal traces: the rules are the
study module's constants, printed beside the verdicts they produce, once every verdict has its controls. The doc
of one set of runs is kis_lens.docs.lifelong's.

>>> text = render_study_markdown(load_study("benchmarks/results/lifelong"), traces, figures)
>>> written = write_study("results/lifelong/smollm2-135m", traces="results/trace/smollm2-135m")  # `kis study`
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from kis_lens.docs.study_prediction_sections import before_collapse_section, prediction_sections
from kis_lens.docs.study_sections import (
    cell,
    collapse_section,
    editor_cell,
    figure_line,
    glance_section,
    paired_section,
    predictors_section,
    rho_section,
    table,
    trace_section,
)
from kis_lens.editing.lifelong_plots import study_figure, update_norm_figure
from kis_lens.editing.lifelong_study import load_study, study
from kis_lens.editing.study_runs import MIN_ORDERS, covariance_hash_notes
from kis_lens.errors import KisError
from kis_lens.figure_files import write_figure_files
from kis_lens.io import atomic_write, load_json_object, save_json
from kis_lens.layout import STUDY_FIGURES_FOLDER, STUDY_FILE


def render_study_markdown(
    runs: Sequence[Mapping[str, Any]],
    traces: Sequence[Mapping[str, Any]] = (),
    figures: Mapping[str, str] | None = None,
    compute: Sequence[Mapping[str, Any]] = (),
    *,
    source: str = "benchmarks/results/lifelong",
    n_boot: int = 1000,
    generator: str = "`benchmarks/lifelong.py` (kis_lens.docs.lifelong_study)",
    queue: str | None = "`benchmarks/lifelong_runs.py`",
    numbers: Mapping[str, Any] | None = None,
) -> str:
    """Return docs/lifelong.md for a study: collapse per editor and order, its sensitivity, the ρ alarm, the
    controlled P-prediction verdicts, forgetting, the predictors of the collapse step and AlphaEdit vs ROME.

    numbers: study(runs) computed already (write_study keeps them); queue: where the runs still to come are listed."""
    if not runs:
        raise KisError("no lifelong runs to write a document from: run `kis lifelong` (benchmarks/lifelong_runs.py)")
    figures = dict(figures or {})
    numbers = numbers if numbers is not None else study(list(runs), n_boot=n_boot)
    config = (runs[0].get("settings") or {}).get("config") or {}
    model = ((runs[0].get("settings") or {}).get("model") or {}).get("name", config.get("model_name"))
    layers = sorted({int(row["layer"]) for row in numbers["runs"]})
    # the collapse table has a row per editor and layer with its number of orders
    short = [row for row in numbers["collapse_by_editor"] if row["editor"] != "none" and row["n_orders"] < MIN_ORDERS]
    lines = [
        f"# Lifelong editing on {model}: {len(runs)} runs, {len({row['editor'] for row in numbers['runs']})} editors",
        "",
        f"Generated from `{source}` by {generator}; do not edit by hand.",
        "",
    ]
    if short:
        where = (lambda layer: f" at layer {layer}") if len(layers) > 1 else (lambda layer: "")
        lines += [
            f"> **Fewer than {MIN_ORDERS} edit orders** for: "
            + ", ".join(f"`{row['editor']}`{where(row['layer'])} ({row['n_orders']})" for row in short)
            + f". A verdict across orders there counts the orders that ran; 'in every order' needs {MIN_ORDERS}"
            + (f". The queued runs are in {queue}." if queue else "."),
            "",
        ]
    lines += [
        "Each editor writes the MLP output weights for real, one CounterFact fact (or MEMIT/AlphaEdit batch) after "
        "another; an edit order is a seed, so runs with the same seed edit the same facts in the same sequence. "
        "A probe (every "
        f"{config.get('probe_every')} edits) measures efficacy on all edits so far, retention of the oldest quarter, "
        "held-out perplexity and the weight statistics; a full evaluation (every "
        f"{config.get('eval_every')}) adds paraphrase, neighborhood and fluency. Argmax efficacy is teacher-forced "
        "(every target token the argmax; no text is generated). Fluency is the n-gram entropy of greedy text "
        f"({config.get('fluency_tokens')} tokens after the first generation prompt of {config.get('fluency_prompts')} "
        "records): not ROME's sampled protocol, not comparable with published values.",
        "",
    ]
    lines += [*glance_section(numbers), "", "## Runs", ""]
    lines += table(
        ("editor", "order (seed)", "layer", "edits", "file"),
        [
            (editor_cell(row), row["seed"], row["layer"], _edits(runs, row), f"`{row['source']}`")
            for row in numbers["runs"]
        ],
    )
    # Only where runs record other hashes of one C (none do in the committed runs, whose doc stays as it was).
    for note in covariance_hash_notes(runs):
        lines += ["", note]
    lines += ["", *trace_section(traces, figures, layers)]
    lines += collapse_section(numbers)
    lines += rho_section(numbers)
    lines += prediction_sections(numbers)
    lines += before_collapse_section(numbers)
    lines += predictors_section(numbers)
    lines += paired_section(numbers)
    lines += ["## Figures", ""]
    for name, path in figures.items():
        if not name.startswith("causal_trace"):
            lines += [figure_line(name, path), ""]
    if compute:
        lines += [
            "## Compute",
            "",
            "Each run as `benchmarks/lifelong_runs.py` ran it: one thread, with other lanes running beside it "
            "(timings labelled concurrent). 'Lanes beside' is the larger of the counts of other lanes the queue saw "
            "running at the job's start and at its end, so it undercounts lanes that overlapped only part of the "
            "job. Wall hours are those of the job's last start: a run stopped and resumed from its checkpoint "
            "counts only the part after the restart here, while the last column of the sensitivity table is the "
            "run's own compute over all its starts.",
            "",
        ]
        lines += table(
            ("job", "command", "wall hours (last start)", "lanes beside", "commit"),
            [
                (
                    e["job"],
                    f"`{e['command']}`",
                    cell(e["wall_seconds"] / 3600, 2),
                    e.get("lanes_beside"),
                    str(e.get("commit", ""))[:10],
                )
                for e in compute
            ],
        )
        lines += [""]
    lines += [
        "<details><summary>the settings all runs share</summary>",
        "",
        "```json",
        json.dumps(
            {k: v for k, v in config.items() if k not in ("seed", "editors", "output_dir")},
            indent=2,
            sort_keys=True,
            default=str,
        ),
        "```",
        "",
        "</details>",
    ]
    return "\n".join(lines) + "\n"


def _edits(runs: Sequence[Mapping[str, Any]], row: Mapping[str, Any]) -> str:
    """Return the edits made by the run a study row names."""
    for run in runs:
        config = (run.get("settings") or {}).get("config") or {}
        if (run["editor"], config.get("seed"), config.get("layer")) == (row["editor"], row["seed"], row["layer"]):
            return cell(len(run.get("edits") or []))
    return "—"


def _trace_figure(path: Path, folder: Path) -> tuple[str, str] | None:
    """Return a trace's figure name and its link from folder: its PNG, else its HTML (None where neither exists)."""
    for figure in (path.with_suffix(".png"), path.with_suffix(".html")):
        if figure.is_file():
            return path.stem, Path(os.path.relpath(figure, folder)).as_posix()
    return None


def trace_files(folder: str | Path | None) -> list[Path]:
    """Return the `kis trace` results in folder (none where it is not given or not there)."""
    return sorted(Path(folder).glob("causal_trace_*.json")) if folder and Path(folder).is_dir() else []


def load_traces(folder: str | Path | None) -> list[dict[str, Any]]:
    """Return the `kis trace` results in folder, each as written."""
    return [load_json_object(path, "rerun `kis trace` or remove the file") for path in trace_files(folder)]


STUDY_FIGURES = ("lifelong_study", "lifelong_update_norms")


def write_study_figures(runs: Sequence[Mapping[str, Any]], folder: str | Path) -> dict[str, dict[str, str | None]]:
    """Write the study's figures into folder (HTML, and PNG where Plotly can export it); return each one's files."""
    figures = (study_figure(runs), update_norm_figure(runs))
    return {
        name: write_figure_files(figure, Path(folder) / f"{name}.html") for name, figure in zip(STUDY_FIGURES, figures)
    }


def write_study(folder: str | Path, traces: str | Path | None = None, n_boot: int = 1000) -> dict[str, Any]:
    """Write <folder>/study.md, study.json (every number and verdict) and the study's figures, from every finished
    lifelong run under folder and the causal traces in traces; return {"markdown", "numbers", "figures", "study"}."""
    folder = Path(folder)
    runs = load_study(folder)  # refuses a missing folder, one without finished runs and runs of mixed settings
    trace_results = load_traces(traces)
    links = dict(filter(None, (_trace_figure(path, folder) for path in trace_files(traces))))
    numbers = study(runs, n_boot=n_boot)  # before anything is written: a bad n_boot leaves no figure behind
    figures = folder / STUDY_FIGURES_FOLDER
    for name, written in write_study_figures(runs, figures).items():
        links[name] = Path(os.path.relpath(written["png"] or written["html"], folder)).as_posix()
    text = render_study_markdown(
        runs,
        trace_results,
        links,
        source=str(folder),
        n_boot=n_boot,
        generator="`kis study`",
        queue=None,
        numbers=numbers,
    )
    markdown = atomic_write(folder / f"{STUDY_FILE}.md", lambda temp: temp.write_text(text, encoding="utf-8"))
    return {
        "markdown": markdown,
        "numbers": save_json(folder / f"{STUDY_FILE}.json", numbers),
        "figures": figures,
        "study": numbers,
    }
