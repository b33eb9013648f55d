"""kis_lens.editing.sequential_plots: loading, figures, report section and the generated lifelong.md, on synthetic
results dicts shaped exactly like kis_lens.editing.sequential writes them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from kis_lens.editing import sequential_plots as sp
from kis_lens.editing.plots import CONDITION_COLORS
from kis_lens.errors import KisError
from kis_lens.report import ReportSection
from kis_lens.results import RunResult

MODEL = "smollm2-135m"
LAYER = 5
# (n_edits, kind): step 0, probes every 2 edits, full evaluations every 4, 8 edits in all; the last step is a probe.
SCHEDULE = [(0, "eval"), (2, "probe"), (4, "eval"), (6, "probe"), (8, "eval"), (9, "probe")]
EVAL_ONLY = ("paraphrase", "paraphrase_magnitude", "neighborhood", "neighborhood_magnitude", "score", "fluency")


def make_result(
    editor: str,
    collapse: int | None = None,
    n_pairs: int = 12,
    pearson: float | None = 0.8123,
    spearman: float | None = 0.7456,
    scale: float = 1.0,
    schedule: list[tuple[int, str]] = SCHEDULE,
) -> dict[str, Any]:
    """Return one editor's lifelong_<editor>.json dict per the schema; values depend on the editor via scale."""
    steps = []
    for index, (n, kind) in enumerate(schedule):
        step = {
            "n_edits": n,
            "kind": kind,
            "efficacy": None if n == 0 else round(1.0 - 0.05 * index * scale, 4),
            "efficacy_magnitude": None if n == 0 else 0.5 - 0.01 * index,
            "generation_efficacy": None if n == 0 else 0.9 - 0.02 * index * scale,
            "paraphrase": 0.6 - 0.03 * index * scale,
            "paraphrase_magnitude": 0.2,
            "neighborhood": 0.95 - 0.01 * index * scale,
            "neighborhood_magnitude": 0.1,
            "score": 0.7 - 0.04 * index * scale,
            "fluency": 6.1 - 0.1 * index * scale,
            "perplexity": 20.0 + 3.0 * index * scale,
            "unedited_nll_drift": 0.01 * index * scale,
            "weight_change_norm": 0.5 * index * scale,
            "sigma_max": 30.0 + index,
            "condition_number": 100.0 * (1 + index * scale),
            "predicted_interference": None if n == 0 else 0.1 * index,
            "measured_interference": None if n == 0 else 0.12 * index,
            "accumulated_p2": 0.3 * n * (n - 1),
            "seconds": 1.5 * index,
        }
        if kind == "probe":
            step.update(dict.fromkeys(EVAL_ONLY))
        steps.append(step)
    n_edits = schedule[-1][0]
    edited = editor != "none"
    pairs = {
        "n_edits": [2 + i % 7 for i in range(n_pairs)] if edited else [],
        "case_id": [100 + i for i in range(n_pairs)] if edited else [],
        "predicted": [0.01 * i for i in range(n_pairs)] if edited else [],
        "measured_output": [0.011 * i + 0.001 for i in range(n_pairs)] if edited else [],
        "measured_logprob": [0.02 * (n_pairs - i) for i in range(n_pairs)] if edited else [],
    }
    p2 = None if collapse is None else 0.3 * collapse * (collapse - 1)
    return {
        "editor": editor,
        "steps": steps,
        "edits": [
            {
                "case_id": 1000 + i,
                "value_steps": 20,
                "value_nll": 0.05,
                "residual_norm": 3.0,
                "newest_efficacy": True,
                "seconds": 0.4,
            }
            for i in range(n_edits if edited else 0)
        ],
        "pairs": pairs,
        "summary": {
            "collapse": {
                "step": collapse,
                "criterion": "retention < 0.5 or perplexity > 2× step 0",
                "retention_threshold": 0.5,
                "perplexity_ratio": 2.0,
                "accumulated_p2_at_collapse": p2,
            },
            "correlations": {
                "predicted_vs_output": {"pearson": pearson, "spearman": spearman, "n": len(pairs["predicted"])},
                "predicted_vs_logprob": {
                    "pearson": None if pearson is None else pearson - 0.2,
                    "spearman": None if spearman is None else spearman - 0.1,
                    "n": len(pairs["predicted"]),
                },
            },
            "final": steps[-1],
            "wall_seconds": 12.5 * scale,
            "seconds_per_edit": 0.4 if edited else None,
            "seconds_per_probe": 0.25,
            "seconds_per_eval": 2.0,
        },
        "settings": {
            "config": {
                "model_name": MODEL,
                "layer": LAYER,
                "n_edits": n_edits,
                "eval_every": 4,
                "probe_every": 2,
                "batch_size": 1,
                "seed": 7,
                "output_dir": "unused",
                "facts": "counterfact-known",
                "unedited_facts": "known-1000",
                "n_unedited": 64,
                "corpus": "wikipedia-vital",
                "max_tokens": 100000,
                "heldout_texts": 16,
                "heldout_tokens": 128,
            },
            "model": {"name": MODEL, "n_layers": 30},
            "facts": [1000 + i for i in range(n_edits)],
            "kis_lens_version": "9.9.9",
            "device": "cpu",
            "threads": 2,
        },
    }


def standard_results() -> dict[str, dict[str, Any]]:
    """rome collapses at 6, memit at 8, alphaedit never, plus the unedited reference."""
    return {
        "rome": make_result("rome", collapse=6, scale=2.0),
        "memit": make_result("memit", collapse=8, scale=1.5),
        "alphaedit": make_result("alphaedit", collapse=None, scale=0.5, pearson=0.3012, spearman=0.2011),
        "none": make_result("none", collapse=None, scale=0.0, pearson=None, spearman=None),
    }


def write_results(folder: Path, results: dict[str, dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for editor, result in results.items():
        sp.lifelong_file(folder, editor).write_text(json.dumps(result), encoding="utf-8")
    return folder


def verdict(results: dict[str, dict[str, Any]], index: int) -> dict[str, str]:
    return sp.lifelong_verdicts(results)[index]


# -------------------------------------------------------------------------------------------------------- loading


def test_colours_are_the_edit_simulations():
    for editor in ("rome", "memit", "alphaedit"):
        assert sp.EDITOR_COLORS[editor] == CONDITION_COLORS[editor]
    assert set(sp.EDITOR_LABELS) == set(sp.EDITOR_COLORS) == {"rome", "memit", "alphaedit", "none"}


def test_load_orders_editors_and_paths(tmp_path):
    results = standard_results()
    results["zeta"] = make_result("zeta")
    results["extra"] = make_result("extra")
    folder = write_results(tmp_path / "layer_5", {name: results[name] for name in ("none", "zeta", "memit", "extra")})
    write_results(folder, {"alphaedit": results["alphaedit"], "rome": results["rome"]})
    loaded = sp.load_lifelong_results(folder)
    assert list(loaded) == ["rome", "memit", "alphaedit", "none", "extra", "zeta"]
    assert loaded["memit"] == results["memit"]
    assert sp.lifelong_file(folder, "rome") == folder / "lifelong_rome.json"
    assert sp.lifelong_dir("out", MODEL, 5) == Path("out") / MODEL / "lifelong" / "layer_5"


def test_load_empty_folder_names_folder_and_command(tmp_path):
    (tmp_path / "other.json").write_text("{}", encoding="utf-8")
    with pytest.raises(KisError, match=r"kis lifelong") as error:
        sp.load_lifelong_results(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_load_broken_file_is_a_kis_error(tmp_path):
    (tmp_path / "lifelong_rome.json").write_text('{"steps": [', encoding="utf-8")
    with pytest.raises(KisError, match="lifelong_rome.json"):
        sp.load_lifelong_results(tmp_path)


# -------------------------------------------------------------------------------------------------------- figures


def traces_of(figure, **meta) -> list:
    return [trace for trace in figure.data if trace.meta and all(trace.meta.get(k) == v for k, v in meta.items())]


def test_metrics_figure_one_trace_per_editor_and_metric_nulls_skipped():
    results = standard_results()
    figure = sp.metrics_figure(results)
    for editor in results:
        for metric, _, _ in sp.METRICS:
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


def test_collapse_markers_only_for_collapsed_editors():
    figure = sp.metrics_figure(standard_results())
    by_name: dict[str, list] = {}
    for shape in figure.layout.shapes:
        by_name.setdefault(shape.name, []).append(shape)
    assert set(by_name) == {"collapse rome", "collapse memit"}
    assert len(by_name["collapse rome"]) == len(sp.METRICS)  # a dotted line on every panel
    assert {shape.x0 for shape in by_name["collapse rome"]} == {6}
    assert {shape.line.color for shape in by_name["collapse memit"]} == {sp.EDITOR_COLORS["memit"]}
    markers = traces_of(figure, metric="collapse")
    assert sorted((trace.meta["editor"], trace.x[0]) for trace in markers) == [("memit", 8), ("rome", 6)]
    assert "6 edits" in traces_of(figure, editor="rome", metric="collapse")[0].name


def test_interference_figure_pairs_correlations_and_subsample():
    results = standard_results()
    results["memit"] = make_result("memit", n_pairs=sp.MAX_SCATTER_POINTS + 321)
    figure = sp.interference_figure(results)
    assert traces_of(figure, editor="none") == []
    (output,) = traces_of(figure, editor="rome", measured="measured_output")
    (logprob,) = traces_of(figure, editor="rome", measured="measured_logprob")
    pairs = results["rome"]["pairs"]
    assert list(output.x) == pairs["predicted"] and list(output.y) == pairs["measured_output"]
    assert list(logprob.y) == pairs["measured_logprob"]
    assert "Pearson r = 0.812" in output.name and "Spearman ρ = 0.746" in output.name
    assert "Pearson r = 0.612" in logprob.name and "Spearman ρ = 0.646" in logprob.name
    (big,) = traces_of(figure, editor="memit", measured="measured_output")
    assert len(big.x) == sp.MAX_SCATTER_POINTS and "5,000 of 5,321 shown" in big.name
    memit = results["memit"]["pairs"]
    index = [memit["predicted"].index(x) for x in big.x]
    assert index == sorted(index) and list(big.y) == [memit["measured_output"][i] for i in index]
    again = traces_of(sp.interference_figure(results), editor="memit", measured="measured_output")[0]
    assert list(again.x) == list(big.x)  # seeded
    (predicted,) = traces_of(figure, editor="alphaedit", metric="predicted_interference")
    assert list(predicted.x) == [2, 4, 6, 8, 9]
    assert len(traces_of(figure, metric="measured_interference")) == 3


def test_write_figures_atomic(tmp_path):
    paths = sp.write_lifelong_figures(standard_results(), tmp_path)
    assert paths == {name: tmp_path / f"{name}.html" for name in sp.FIGURE_NAMES}
    assert "cdn.plot.ly" in paths["lifelong_metrics"].read_text(encoding="utf-8")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["lifelong_interference.html", "lifelong_metrics.html"]
    only_none = sp.write_lifelong_figures({"none": make_result("none")}, tmp_path / "none")
    assert list(only_none) == ["lifelong_metrics"]


# --------------------------------------------------------------------------------------------------------- report


def test_report_section_table():
    (section,) = sp.lifelong_sections(standard_results(), source="somewhere")
    assert isinstance(section, ReportSection) and len(section.figures) == 2
    assert f"{MODEL}, layer {LAYER}" in section.title and "somewhere" in section.intro
    rows = sp.summary_rows(standard_results())
    assert [row["editor"] for row in rows] == ["ROME", "MEMIT", "AlphaEdit", "no edit (reference)"]
    assert rows[0]["collapse step"] == 6 and rows[2]["collapse step"] is None
    assert rows[0]["score"] == pytest.approx(0.7 - 0.04 * 4 * 2.0)  # last eval step (8 edits), not the final probe
    assert rows[0]["Spearman, output"] == 0.7456 and rows[0]["pairs, output"] == 12
    assert "0.7456" in section.html


def run_result(output_dir: Path, model: str = MODEL, **config: Any) -> RunResult:
    settings = {"model": {"name": model}, "config": {"output_dir": str(output_dir), **config}}
    return RunResult(settings=settings, facts=[], layers=[0], matrices={})


def test_report_finds_the_runs_lifelong_folders(tmp_path):
    write_results(sp.lifelong_dir(tmp_path, MODEL, 12), {"rome": make_result("rome", collapse=6)})
    write_results(sp.lifelong_dir(tmp_path, MODEL, 3), standard_results())
    other = make_result("memit")
    other["settings"]["model"]["name"] = "gpt2"
    write_results(sp.lifelong_dir(tmp_path, MODEL, 7), {"memit": other})  # wrong model: not this run's
    assert [folder.name for folder in sp.find_lifelong_folders(tmp_path, MODEL)] == ["layer_3", "layer_7", "layer_12"]
    found = sp.lifelong_of_run(run_result(tmp_path).settings)
    assert [(folder.name, list(results)) for folder, results in found] == [
        ("layer_3", ["rome", "memit", "alphaedit", "none"]),
        ("layer_12", ["rome"]),
    ]
    sections = sp.lifelong_report_sections(run_result(tmp_path))
    assert len(sections) == 2 and str(sp.lifelong_dir(tmp_path, MODEL, 3)) in sections[0].intro
    assert sp.lifelong_report_sections(run_result(tmp_path, model="gpt2-small")) == []
    assert sp.lifelong_report_sections(run_result(tmp_path / "empty")) == []


def test_belongs_to_run_is_the_model():
    mine = {"model": {"name": MODEL}, "config": {"facts": "counterfact-known"}}
    assert sp.belongs_to_run(mine, {"model": {"name": MODEL}, "config": {"facts": "other.json"}})
    assert not sp.belongs_to_run(mine, {"model": {"name": "gpt2"}, "config": {}})
    assert not sp.belongs_to_run({"config": {}}, {"model": {"name": MODEL}})


# ------------------------------------------------------------------------------------------------------- markdown


def test_markdown_numbers_come_from_the_results():
    results = standard_results()
    text = sp.render_lifelong_markdown(results, command="kis lifelong --model_name smollm2-135m --layer 5")
    assert text.startswith(f"# Lifelong editing on {MODEL}, layer {LAYER}\n")
    assert "`kis lifelong --model_name smollm2-135m --layer 5`" in text
    assert "9 CounterFact facts from `counterfact-known` in an order drawn with seed 7" in text
    assert "64 never-edited facts from `known-1000`" in text and "16 texts of 128 tokens" in text
    assert "a probe every 2 edits, a full evaluation every 4" in text
    assert "cpu, 2 threads; kis_lens 9.9.9" in text
    assert "ROME, MEMIT, AlphaEdit, no edit (reference)" in text
    assert "| collapse | after 6 edits | after 8 edits | none within 9 edits | none within 9 edits |" in text
    # the final step (9 edits) is a probe: score is read from the last evaluation and marked with its step
    rome_score = 0.7 - 0.04 * 4 * 2.0
    assert f"| score | {rome_score:.4g} (at 8) |" in text
    assert f"| held-out perplexity | {20.0 + 3.0 * 5 * 2.0:.4g} |" in text
    assert f"| perplexity ÷ no edit's | {(20.0 + 30.0) / 20.0:.4g} |" in text
    assert "| per edit | 0.4 s | 0.4 s | 0.4 s | — |" in text
    assert "Pearson r = 0.812, Spearman ρ = 0.746, n = 12" in text
    assert "Pearson r = 0.301" in text  # AlphaEdit's correlations are listed too
    assert f"ΣP² = {0.3 * 6 * 5:.4g} at its collapse after 6 edits" in text
    assert f"AlphaEdit: no collapse within 9 edits, ΣP² = {0.3 * 9 * 8:.4g} at the end" in text
    assert "- **Command**: not recorded" in sp.render_lifelong_markdown(results)


def test_markdown_reports_differing_settings_per_editor():
    results = standard_results()
    results["memit"]["settings"]["device"] = "cuda"
    results["memit"]["settings"]["threads"] = 16
    text = sp.render_lifelong_markdown(results)
    assert "ROME cpu, MEMIT cuda, AlphaEdit cpu" in text and "MEMIT 16" in text


def test_markdown_figures_linked_when_given():
    text = sp.render_lifelong_markdown(standard_results(), {"lifelong_metrics": "figures/lifelong_metrics.html"})
    assert "[lifelong_metrics (interactive HTML)](figures/lifelong_metrics.html)" in text
    assert "## Figures" not in sp.render_lifelong_markdown(standard_results())


def test_markdown_needs_results():
    with pytest.raises(KisError, match="kis lifelong"):
        sp.render_lifelong_markdown({})


# ------------------------------------------------------------------------------------------------------- verdicts


def test_rome_collapses_reproduced():
    result = verdict(standard_results(), 0)
    assert result["verdict"] == "reproduced"
    assert "ROME collapsed after 6 edits" in result["evidence"]
    assert "retention < 0.5 or perplexity > 2× step 0" in result["evidence"]
    text = sp.render_lifelong_markdown(standard_results())
    assert "| Sequential ROME edits collapse the model | **reproduced** |" in text


def test_rome_collapses_not_reproduced():
    results = standard_results()
    results["rome"] = make_result("rome", collapse=None)
    result = verdict(results, 0)
    assert result["verdict"] == "not reproduced"
    assert "did not collapse within 9 edits" in result["evidence"]
    assert "| Sequential ROME edits collapse the model | **not reproduced** |" in sp.render_lifelong_markdown(results)


def test_rome_missing_not_measured():
    results = standard_results()
    del results["rome"]
    assert verdict(results, 0)["verdict"] == "not measured"
    assert verdict(results, 1)["verdict"] == "not measured"


def test_alphaedit_holds_when_it_never_collapses():
    result = verdict(standard_results(), 1)
    assert result["verdict"] == "reproduced"
    assert "ROME collapsed after 6 edits, AlphaEdit none within 9 edits" in result["evidence"]
    # compared at the last common number of edits (9): efficacy 1 − 0.05·5·scale
    assert f"efficacy {1 - 0.05 * 5 * 0.5:.4g} (AlphaEdit) vs {1 - 0.05 * 5 * 2.0:.4g} (ROME)" in result["evidence"]


def test_alphaedit_holds_when_it_collapses_later():
    results = standard_results()
    results["alphaedit"] = make_result("alphaedit", collapse=8)
    assert verdict(results, 1)["verdict"] == "reproduced"


@pytest.mark.parametrize("alpha_step", [4, 6])
def test_alphaedit_collapsing_first_or_together_is_not_reproduced(alpha_step):
    results = standard_results()
    results["alphaedit"] = make_result("alphaedit", collapse=alpha_step)
    result = verdict(results, 1)
    assert result["verdict"] == "not reproduced"
    assert f"AlphaEdit after {alpha_step} edits" in result["evidence"]


def test_alphaedit_collapsing_while_rome_does_not_is_not_reproduced():
    results = standard_results()
    results["rome"] = make_result("rome", collapse=None, scale=2.0)
    results["alphaedit"] = make_result("alphaedit", collapse=8)
    assert verdict(results, 1)["verdict"] == "not reproduced"


def test_neither_collapses_compares_efficacy():
    results = standard_results()
    results["rome"] = make_result("rome", collapse=None, scale=2.0)
    ahead = verdict(results, 1)
    assert ahead["verdict"] == "partly" and "neither collapsed" in ahead["evidence"]
    results["alphaedit"] = make_result("alphaedit", collapse=None, scale=3.0)  # loses efficacy faster than ROME
    assert verdict(results, 1)["verdict"] == "not reproduced"


def test_alphaedit_run_shorter_than_romes_collapse_is_not_measured():
    results = standard_results()
    results["alphaedit"] = make_result("alphaedit", schedule=SCHEDULE[:3])  # stops at 4 edits, ROME collapses at 6
    result = verdict(results, 1)
    assert result["verdict"] == "not measured" and "ends before ROME's collapse" in result["evidence"]
    assert "at 4 edits efficacy" in result["evidence"]


def test_prediction_verdicts():
    results = standard_results()
    assert verdict(results, 2)["verdict"] == "reproduced"  # ROME log p 0.646, MEMIT 0.746 and 0.646 ≥ 0.5
    assert "3 of 3 correlations" in verdict(results, 2)["evidence"]
    assert "identity for rank-one edits with C, not judged" in verdict(results, 2)["evidence"]
    results["memit"] = make_result("memit", spearman=0.3)  # output 0.3, log p 0.2: both below
    partly = verdict(results, 2)
    assert partly["verdict"] == "partly" and "1 of 3 correlations" in partly["evidence"]
    results["rome"] = make_result("rome", spearman=0.55)  # ROME's output ρ 0.55 is an identity: only log p 0.45 counts
    assert verdict(results, 2)["verdict"] == "not reproduced"
    results["rome"] = make_result("rome", spearman=0.4)
    assert verdict(results, 2)["verdict"] == "not reproduced"
    for editor in ("rome", "memit"):
        results[editor] = make_result(editor, pearson=None, spearman=None)
    assert verdict(results, 2)["verdict"] == "not measured"


def test_prediction_ignores_alphaedit_in_the_verdict():
    results = {name: standard_results()[name] for name in ("alphaedit", "none")}
    assert verdict(results, 2)["verdict"] == "not measured"
    assert "Pearson r = 0.301" in verdict(results, 2)["evidence"]


# ------------------------------------------------------------------------------------------------------ the doc


def test_write_lifelong_doc_atomic_and_links(tmp_path):
    folder = write_results(tmp_path / "results" / MODEL / "lifelong" / "layer_5", standard_results())
    doc = tmp_path / "docs" / "lifelong.md"
    assert sp.write_lifelong_doc(folder, doc, command="kis lifelong --layer 5") == doc
    text = doc.read_text(encoding="utf-8")
    assert "`kis lifelong --layer 5`" in text and "after 6 edits" in text
    link = f"../results/{MODEL}/lifelong/layer_5/lifelong_metrics.html"
    assert f"({link})" in text and (doc.parent / link).exists()
    assert sorted(path.name for path in folder.iterdir()) == sorted(
        [f"lifelong_{e}.json" for e in ("rome", "memit", "alphaedit", "none")]
        + ["lifelong_interference.html", "lifelong_metrics.html"]
    )
    assert [path.name for path in doc.parent.iterdir()] == ["lifelong.md"]  # no temp file left


def test_write_lifelong_doc_rewrites_stale_figures(tmp_path):
    folder = write_results(tmp_path / "layer_5", standard_results())
    figure = folder / "lifelong_metrics.html"
    figure.write_text("old", encoding="utf-8")
    os.utime(figure, (1, 1))  # older than the results
    sp.write_lifelong_doc(folder, tmp_path / "lifelong.md")
    assert figure.read_text(encoding="utf-8") != "old"
    fresh = figure.stat().st_mtime_ns
    sp.write_lifelong_doc(folder, tmp_path / "lifelong.md")
    assert figure.stat().st_mtime_ns == fresh  # up to date: not rewritten


def test_write_lifelong_doc_empty_folder(tmp_path):
    with pytest.raises(KisError, match="kis lifelong"):
        sp.write_lifelong_doc(tmp_path, tmp_path / "lifelong.md")
    assert list(tmp_path.iterdir()) == []
