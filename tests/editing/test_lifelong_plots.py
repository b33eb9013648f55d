"""kis_lens.editing.lifelong_plots and lifelong_report: the figures of a set of lifelong runs and the report section
that shows them, on synthetic run files (tests/lifelong_fixtures.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lifelong_fixtures import (
    LAYER,
    MODEL,
    legacy_results,
    make_result,
    standard_results,
    write_results,
)
from plotly.offline import get_plotlyjs

from kis_lens import layout
from kis_lens.editing import lifelong_files as files
from kis_lens.editing import lifelong_plots as plots
from kis_lens.editing import lifelong_report as report
from kis_lens.editing.registry import EDITORS as REGISTRY
from kis_lens.editing.results import results_of_run, run_report_sections
from kis_lens.report import ReportSection
from kis_lens.results import RunResult

# -------------------------------------------------------------------------------------------------------- figures


def traces_of(figure, **meta) -> list:
    return [trace for trace in figure.data if trace.meta and all(trace.meta.get(k) == v for k, v in meta.items())]


def test_metrics_figure_one_trace_per_editor_and_metric_nulls_skipped():
    results = standard_results()
    figure = plots.metrics_figure(results)
    for editor in results:
        for metric, _, _ in plots.METRICS:
            (trace,) = traces_of(figure, editor=editor, metric=metric)
            expected = [
                (step["n_edits"], step[metric]) for step in results[editor]["steps"] if step[metric] is not None
            ]
            assert list(zip(trace.x, trace.y)) == expected
        legend = [trace for trace in traces_of(figure, editor=editor) if trace.showlegend is not False]
        assert [trace.meta["metric"] for trace in legend] in (["score"], ["score", "collapse"])
    # probes have no score: only the eval steps (0, 4, 8) are drawn; efficacy has no value at 0 edits
    assert list(traces_of(figure, editor="rome", metric="score")[0].x) == [0, 4, 8]
    assert list(traces_of(figure, editor="rome", metric="efficacy")[0].x) == [2, 4, 6, 8, 9]
    assert figure.layout.yaxis7.type == "log" and figure.layout.yaxis9.type == "log"  # perplexity, cond(W_t)


def test_figures_name_the_runs_they_show(tmp_path):
    results = files.load_lifelong_results(write_results(tmp_path, standard_results()))
    for figure in plots.lifelong_figures(results).values():
        title = figure.layout.title.text
        assert f"{MODEL}, layer {LAYER}<br><sup>runs: " in title
        assert all(result["_source"] in title for result in results.values())
        assert "superseded" not in title
    direct = plots.metrics_figure(standard_results())  # not loaded from files: the recorded stems
    assert standard_results()["rome"]["settings"]["run_stem"] in direct.layout.title.text
    legacy = files.load_lifelong_results(write_results(tmp_path / "legacy", legacy_results()))
    title = plots.interference_figure(legacy).layout.title.text
    assert "legacy runs of an older kis, superseded: lifelong_rome.json" in title
    assert {trace.name for trace in plots.metrics_figure(legacy).data if trace.showlegend is not False} >= {
        "p-ROME",
        "EMMET-like fit λ=1",
        "AlphaEdit-legacy",
    }


def test_collapse_markers_only_for_collapsed_editors():
    figure = plots.metrics_figure(standard_results())
    by_name: dict[str, list] = {}
    for shape in figure.layout.shapes:
        by_name.setdefault(shape.name, []).append(shape)
    assert set(by_name) == {"collapse rome", "collapse memit"}
    assert len(by_name["collapse rome"]) == len(plots.METRICS)  # a dotted line on every panel
    assert {shape.x0 for shape in by_name["collapse rome"]} == {6}
    assert {shape.line.color for shape in by_name["collapse memit"]} == {REGISTRY["memit"].colour}
    markers = traces_of(figure, metric="collapse")
    assert sorted((trace.meta["editor"], trace.x[0]) for trace in markers) == [("memit", 8), ("rome", 6)]
    assert "6 edits" in traces_of(figure, editor="rome", metric="collapse")[0].name


def test_interference_figure_pairs_correlations_and_subsample():
    results = standard_results()
    results["memit"] = make_result("memit", n_pairs=plots.MAX_SCATTER_POINTS + 321)
    figure = plots.interference_figure(results)
    assert traces_of(figure, editor="none") == []
    (output,) = traces_of(figure, editor="rome", measured="measured_output")
    (logprob,) = traces_of(figure, editor="rome", measured="measured_logprob")
    pairs = results["rome"]["pairs"]
    assert list(output.x) == pairs["predicted"] and list(output.y) == pairs["measured_output"]
    assert list(logprob.y) == pairs["measured_logprob"]
    assert "Pearson r = 0.812" in output.name and "Spearman ρ = 0.746" in output.name
    assert "Pearson r = 0.612" in logprob.name and "Spearman ρ = 0.646" in logprob.name
    (big,) = traces_of(figure, editor="memit", measured="measured_output")
    assert len(big.x) == plots.MAX_SCATTER_POINTS and "5,000 of 5,321 shown" in big.name
    memit = results["memit"]["pairs"]
    index = [memit["predicted"].index(x) for x in big.x]
    assert index == sorted(index) and list(big.y) == [memit["measured_output"][i] for i in index]
    again = traces_of(plots.interference_figure(results), editor="memit", measured="measured_output")[0]
    assert list(again.x) == list(big.x)  # seeded
    (predicted,) = traces_of(figure, editor="alphaedit", metric="predicted_interference")
    assert list(predicted.x) == [2, 4, 6, 8, 9]
    assert len(traces_of(figure, metric="measured_interference")) == 3


def test_write_figures_atomic(tmp_path):
    paths = plots.write_lifelong_figures(standard_results(), tmp_path)
    assert paths == {name: tmp_path / f"{name}.html" for name in plots.FIGURE_NAMES}
    text = paths["lifelong_metrics"].read_text(encoding="utf-8")
    assert "cdn.plot.ly" not in text and '<script charset="utf-8" src="plotly.min.js">' in text  # offline
    assert (paths["lifelong_metrics"].parent / "plotly.min.js").read_text(encoding="utf-8") == get_plotlyjs()
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "lifelong_interference.html",
        "lifelong_metrics.html",
        "plotly.min.js",
    ]
    only_none = plots.write_lifelong_figures({"none": make_result("none")}, tmp_path / "none")
    assert list(only_none) == ["lifelong_metrics"]


# --------------------------------------------------------------------------------------------------------- report


def test_report_section_table():
    (section,) = report.lifelong_sections(standard_results(), source="somewhere")
    assert isinstance(section, ReportSection) and len(section.figures) == 2
    assert f"{MODEL}, layer {LAYER}" in section.title and "somewhere" in section.intro
    assert f"Shown: runs: {standard_results()['rome']['settings']['run_stem']}" in section.intro
    rows = report.summary_rows(standard_results())
    assert [row["editor"] for row in rows] == ["ROME (original)", "MEMIT", "AlphaEdit", "no edit"]
    assert rows[0]["collapse step"] == 6 and rows[2]["collapse step"] is None
    assert rows[0]["score"] == pytest.approx(0.7 - 0.04 * 4 * 2.0)  # last eval step (8 edits), not the final probe
    assert rows[0]["Spearman, output"] == 0.7456 and rows[0]["pairs, output"] == 12
    assert "0.7456" in section.html


def run_result(output_dir: Path, model: str = MODEL, **config: Any) -> RunResult:
    settings = {"model": {"name": model}, "config": {"output_dir": str(output_dir), **config}}
    return RunResult(settings=settings, facts=[], layers=[0], matrices={})


def test_report_finds_the_runs_lifelong_folders(tmp_path):
    write_results(layout.lifelong_dir(tmp_path, MODEL, 12), {"rome": make_result("rome", collapse=6)})
    write_results(layout.lifelong_dir(tmp_path, MODEL, 3), standard_results())
    other = make_result("memit")
    other["settings"]["model"]["name"] = "gpt2"
    write_results(layout.lifelong_dir(tmp_path, MODEL, 7), {"memit": other})  # wrong model: not this run's
    assert [folder.name for folder in layout.find_lifelong_folders(tmp_path, MODEL)] == [
        "layer_3",
        "layer_7",
        "layer_12",
    ]
    write_results(layout.lifelong_dir(tmp_path, MODEL, 12), {"memit": make_result("memit", seed=9)}, mtime=1)
    found = results_of_run(run_result(tmp_path).settings).lifelong
    assert [(folder.name, list(results)) for folder, results in found] == [
        ("layer_3", ["rome", "memit", "alphaedit", "none"]),
        ("layer_12", ["rome"]),  # the newest set of the folder first, then every other: none is left out
        ("layer_12", ["memit"]),
    ]
    sections = run_report_sections(run_result(tmp_path))
    assert len(sections) == 3 and str(layout.lifelong_dir(tmp_path, MODEL, 3)) in sections[0].intro
    assert run_report_sections(run_result(tmp_path, model="gpt2-small")) == []
    assert run_report_sections(run_result(tmp_path / "empty")) == []


def test_belongs_to_run_is_the_model():
    mine = {"model": {"name": MODEL}, "config": {"facts": "counterfact-known"}}
    assert layout.belongs_to_run(mine, {"model": {"name": MODEL}, "config": {"facts": "other.json"}})
    assert not layout.belongs_to_run(mine, {"model": {"name": "gpt2"}, "config": {}})
    assert not layout.belongs_to_run({"config": {}}, {"model": {"name": MODEL}})
