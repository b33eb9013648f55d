"""kis_lens.editing.lifelong_plots: loading, figures, report section and the generated lifelong.md, on synthetic
results dicts shaped exactly like kis_lens.editing.lifelong writes them (one <stem>.json per run), and on legacy
lifelong_<editor>.json files of an older kis."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest

from kis_lens import layout
from kis_lens.editing import lifelong_plots as sp
from kis_lens.editing.registry import EDITORS as REGISTRY
from kis_lens.editing.results import results_of_run, run_report_sections
from kis_lens.editing.runs import run_stem
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
    seed: int = 7,
    legacy: bool = False,
) -> dict[str, Any]:
    """Return one run's <stem>.json dict per the schema; values depend on the editor via scale.

    legacy: as an older kis wrote it (lifelong_<editor>.json, no identity, run stem or editor settings)."""
    steps = []
    for index, (n, kind) in enumerate(schedule):
        step = {
            "n_edits": n,
            "kind": kind,
            "efficacy": None if n == 0 else round(1.0 - 0.05 * index * scale, 4),
            "efficacy_magnitude": None if n == 0 else 0.5 - 0.01 * index,
            "argmax_efficacy": None if n == 0 else 0.9 - 0.02 * index * scale,
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
    result = {
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
                "seed": seed,
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
    if not legacy:
        settings = result["settings"]
        config = {key: value for key, value in settings["config"].items() if key != "output_dir"}
        identity = {"editor": editor, "config": config, "facts_sha256": "f" * 64, "kis_lens_version": "9.9.9"}
        settings["identity"] = identity
        settings["run_stem"] = "lifelong_" + run_stem(editor, identity, {"seed": seed, "n": n_edits, "layer": LAYER})
        settings["editor"] = {"name": editor, "label": REGISTRY[editor].label if editor in REGISTRY else editor}
    return result


def file_name(result: dict[str, Any]) -> str:
    """Return the name the run's file has: <stem>.json, or lifelong_<editor>.json for a legacy one."""
    return f"{result['settings'].get('run_stem') or 'lifelong_' + result['editor']}.json"


def standard_results() -> dict[str, dict[str, Any]]:
    """rome collapses at 6, memit at 8, alphaedit never, plus the unedited reference."""
    return {
        "rome": make_result("rome", collapse=6, scale=2.0),
        "memit": make_result("memit", collapse=8, scale=1.5),
        "alphaedit": make_result("alphaedit", collapse=None, scale=0.5, pearson=0.3012, spearman=0.2011),
        "none": make_result("none", collapse=None, scale=0.0, pearson=None, spearman=None),
    }


def write_results(folder: Path, results: dict[str, dict[str, Any]], mtime: int | None = None) -> Path:
    """Write each result as its run's file (with the given modification time, seconds, when one is given)."""
    folder.mkdir(parents=True, exist_ok=True)
    for result in results.values():
        path = folder / file_name(result)
        path.write_text(json.dumps(result), encoding="utf-8")
        if mtime is not None:
            os.utime(path, (mtime, mtime))
    return folder


def loaded(results: dict[str, dict[str, Any]], legacy: bool = False) -> dict[str, dict[str, Any]]:
    """Return results as load_lifelong_results marks them (_source, _legacy)."""
    return {e: {**r, "_source": file_name(r), "_legacy": legacy} for e, r in results.items()}


def by_rule(results: dict[str, dict[str, Any]], rule: str) -> list[dict[str, Any]]:
    return [v for v in sp.lifelong_verdicts(results) if v["rule"] == rule]


def verdict(results: dict[str, dict[str, Any]], index: int) -> dict[str, str]:
    return sp.lifelong_verdicts(results)[index]


# -------------------------------------------------------------------------------------------------------- loading


def test_labels_colours_and_order_come_from_the_registry():
    for name, editor in REGISTRY.items():
        assert sp.editor_label(name) == editor.label and sp.editor_colour(name) == editor.colour
    assert sp.editor_label("alphaedit-legacy") == "AlphaEdit-legacy"
    assert sp.editor_colour("alphaedit-legacy") not in {editor.colour for editor in REGISTRY.values()}
    assert sp.editor_label("zeta") == "zeta" and sp.editor_colour("zeta") == sp.FALLBACK_COLOUR
    assert not any(hasattr(sp, name) for name in ("EDITORS", "EDITOR_LABELS", "EDITOR_COLORS"))
    names = ["zeta", "none", "emmet", "alphaedit-legacy", "alphaedit", "p-rome", "memit", "rome", "r-rome", "extra"]
    assert sp._editor_order(names) == [
        *("rome", "r-rome", "p-rome", "memit", "alphaedit", "alphaedit-legacy", "emmet", "none"),
        *("extra", "zeta"),
    ]


def test_load_orders_editors_and_names_the_files(tmp_path):
    results = standard_results()
    results["zeta"] = make_result("zeta")
    results["extra"] = make_result("extra")
    folder = write_results(tmp_path / "layer_5", {name: results[name] for name in ("none", "zeta", "memit", "extra")})
    write_results(folder, {"alphaedit": results["alphaedit"], "rome": results["rome"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one set of settings: nothing left out, no warning
        found = sp.load_lifelong_results(folder)
    assert list(found) == ["rome", "memit", "alphaedit", "none", "extra", "zeta"]
    assert found["memit"] == {**results["memit"], "_source": file_name(results["memit"]), "_legacy": False}
    assert found["rome"]["_source"].startswith("lifelong_rome_seed7_n9_layer5_")
    assert sp.run_names(found)[0] == found["rome"]["_source"]
    assert layout.lifelong_file(folder, "rome") == folder / "lifelong_rome.json"
    assert layout.lifelong_dir("out", MODEL, 5) == Path("out") / MODEL / "lifelong" / "layer_5"


def test_load_empty_folder_names_folder_and_command(tmp_path):
    (tmp_path / "other.json").write_text("{}", encoding="utf-8")
    with pytest.raises(KisError, match=r"kis lifelong") as error:
        sp.load_lifelong_results(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_load_broken_file_is_a_kis_error(tmp_path):
    (tmp_path / "lifelong_rome.json").write_text('{"steps": [', encoding="utf-8")
    with pytest.raises(KisError, match="lifelong_rome.json"):
        sp.load_lifelong_results(tmp_path)


def two_seeds(folder: Path) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Write seed 7's runs (older) and seed 8's (newer, rome collapsing later) into one folder; return both."""
    old = standard_results()
    new = {name: make_result(name, collapse=r["summary"]["collapse"]["step"], seed=8) for name, r in old.items()}
    new["rome"] = make_result("rome", collapse=8, seed=8)
    write_results(folder, old, mtime=1_000_000)
    write_results(folder, new, mtime=2_000_000)
    return old, new


def test_two_seeds_in_one_folder_are_both_kept_and_picked_by_stem(tmp_path):
    old, new = two_seeds(tmp_path)
    assert len(list(tmp_path.glob("lifelong_*.json"))) == 8  # no run overwrote another
    groups = sp.lifelong_run_groups(tmp_path)
    assert [sorted(group) for group in groups] == [
        sorted(r["settings"]["run_stem"] for r in new.values()),  # the newest first
        sorted(r["settings"]["run_stem"] for r in old.values()),
    ]
    for results in (old, new):
        stems = [result["settings"]["run_stem"] for result in results.values()]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # stems given: nothing is left out
            picked = sp.load_lifelong_results(tmp_path, stems=stems)
        assert list(picked) == ["rome", "memit", "alphaedit", "none"]
        assert picked == loaded(results)
    only = sp.load_lifelong_results(tmp_path, stems=[old["memit"]["settings"]["run_stem"] + ".json"])
    assert list(only) == ["memit"] and only["memit"]["settings"]["config"]["seed"] == 7


def test_without_stems_the_newest_set_is_shown_with_a_warning(tmp_path):
    old, new = two_seeds(tmp_path)
    with pytest.warns(UserWarning, match=r"left out 4 run\(s\) with other settings \(1 other set") as record:
        shown = sp.load_lifelong_results(tmp_path)
    assert "stems=" in str(record[0].message) and old["rome"]["settings"]["run_stem"] in str(record[0].message)
    assert shown == loaded(new)
    assert collapse_text(shown) == "after 8 edits"
    os.utime(tmp_path / file_name(old["none"]), (3_000_000, 3_000_000))  # seed 7's set is now the newest written
    with pytest.warns(UserWarning, match="left out 4"):
        assert sp.load_lifelong_results(tmp_path) == loaded(old)


def collapse_text(results: dict[str, dict[str, Any]]) -> str:
    return sp._collapse_text(results["rome"])


def test_two_runs_of_one_editor_is_an_error_naming_both(tmp_path):
    old, new = two_seeds(tmp_path)
    stems = [old["rome"]["settings"]["run_stem"], new["rome"]["settings"]["run_stem"]]
    with pytest.raises(KisError, match="two runs of rome") as error:
        sp.load_lifelong_results(tmp_path, stems=stems)
    assert all(f"{stem}.json" in str(error.value) for stem in stems)
    with pytest.raises(KisError, match="no finished run lifelong_rome_missing.json"):
        sp.load_lifelong_results(tmp_path, stems=["lifelong_rome_missing"])
    with pytest.raises(KisError, match="non-empty list"):
        sp.load_lifelong_results(tmp_path, stems=stems[0])


def test_partial_checkpoints_are_never_results(tmp_path):
    in_progress = make_result("rome", seed=9)["settings"]["run_stem"]
    (tmp_path / f"{in_progress}.partial.json").write_text('{"format": 1}', encoding="utf-8")
    (tmp_path / f"{in_progress}.partial.safetensors").write_bytes(b"\0" * 8)
    with pytest.raises(KisError, match="partial"):  # only a checkpoint: no results yet
        sp.load_lifelong_results(tmp_path)
    assert layout.find_lifelong_folders(tmp_path.parent, tmp_path.name) == []
    write_results(tmp_path, standard_results())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checkpoint is no other set of settings
        assert sp.load_lifelong_results(tmp_path) == loaded(standard_results())
    stems = sorted(r["settings"]["run_stem"] for r in standard_results().values())
    assert [sorted(group) for group in sp.lifelong_run_groups(tmp_path)] == [stems]
    with pytest.raises(KisError, match="in progress"):
        sp.load_lifelong_results(tmp_path, stems=[f"{in_progress}.partial"])


def legacy_results() -> dict[str, dict[str, Any]]:
    """The committed legacy set's shape: "rome" (really p-ROME) collapsing at 6, "memit", "alphaedit", "none"."""
    results = {
        "rome": make_result("rome", collapse=6, scale=2.0, legacy=True, spearman=0.9),
        "memit": make_result("memit", collapse=8, scale=1.5, legacy=True),
        "alphaedit": make_result("alphaedit", scale=0.5, pearson=0.3012, spearman=0.2011, legacy=True),
        "none": make_result("none", scale=0.0, pearson=None, spearman=None, legacy=True),
    }
    for result in results.values():
        result["settings"]["config"].update(covariance_weight=1.0, null_threshold=0.01, null_l2=1.0, value_steps=10)
        result["settings"]["config"]["editors"] = [result["editor"]]
        result["settings"]["prefixes"] = ["a. ", "b. "]
    return results


def test_legacy_files_are_keyed_by_what_they_ran(tmp_path):
    write_results(tmp_path, legacy_results())
    found = sp.load_lifelong_results(tmp_path)  # their configs differ only in `editors`: one set
    assert list(found) == ["p-rome", "alphaedit-legacy", "emmet", "none"]
    assert all(result["_legacy"] for result in found.values()) and sp.any_legacy(found)
    assert found["p-rome"]["_source"] == "lifelong_rome.json" and found["emmet"]["_source"] == "lifelong_memit.json"
    assert [sp.editor_label(e, r) for e, r in found.items()] == [
        "p-ROME",
        "AlphaEdit-legacy",
        "EMMET-like fit λ=1",
        "no edit",
    ]
    write_results(tmp_path, standard_results(), mtime=1)  # a new set beside them, written earlier
    with pytest.warns(UserWarning, match="left out 4"):
        assert list(sp.load_lifelong_results(tmp_path)) == ["p-rome", "alphaedit-legacy", "emmet", "none"]
    assert len(sp.lifelong_run_groups(tmp_path)) == 2  # a legacy set never mixes with a new one


def test_the_banner_names_the_runs_that_replace_the_legacy_ones():
    from kis_lens.editing.lifelong import DEFAULT_EDITORS

    assert sp.REPLACING_EDITORS == DEFAULT_EDITORS


def test_legacy_verdicts_name_the_variant_and_are_superseded(tmp_path):
    results = sp.load_lifelong_results(write_results(tmp_path, legacy_results()))
    verdicts = sp.lifelong_verdicts(results)
    assert all(v["superseded"] and v["verdict"].endswith(", superseded") for v in verdicts)
    assert all(v["evidence"].startswith("Superseded") for v in verdicts)
    (collapse,) = by_rule(results, "collapse")
    assert collapse["claim"] == "Sequential p-ROME edits collapse the model"
    assert collapse["verdict"] == "reproduced, superseded" and "p-ROME collapsed after 6 edits" in collapse["evidence"]
    (holds,) = by_rule(results, "holds")
    assert holds["claim"] == "AlphaEdit-legacy holds longer than p-ROME" and holds["verdict"].startswith("reproduced")
    (prediction,) = by_rule(results, "prediction")
    assert "correlations of p-ROME and EMMET-like fit λ=1" in prediction["evidence"]
    assert "identity for rank-one edits along C⁻¹k, not judged" in prediction["evidence"]  # p-ROME's output ρ
    text = sp.render_lifelong_markdown(results, command="kis lifelong --editor rome --output_dir /home/someone/runs")
    head = text.split("## Setting")[0]
    assert head.startswith(f"# Lifelong editing on {MODEL}, layer {LAYER} (superseded)\n\n> **Superseded.**")
    assert "p-ROME" in head and "(10 steps, 3 prompts)" in head and "λ = 1 (what is now called `emmet`" in head
    assert "relative null-space threshold 0.01 and L2 = 1 on one layer" in head
    assert "`kis lifelong --editors rome,r-rome,p-rome,memit,alphaedit,none` replace them" in head
    assert "| | p-ROME | AlphaEdit-legacy | EMMET-like fit λ=1 | no edit |" in text
    assert "| Sequential p-ROME edits collapse the model | **reproduced, superseded** |" in text
    assert "Sequential ROME" not in text and "| ROME |" not in text and "MEMIT |" not in text
    assert "/home/someone" not in text and "--output_dir .../runs" in text
    (section,) = sp.lifelong_sections(results)
    assert "lifelong_rome.json" in section.intro and "superseded" in section.intro
    assert "superseded" not in sp.render_lifelong_markdown(standard_results()).split("## Setting")[0]


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


def test_figures_name_the_runs_they_show(tmp_path):
    results = sp.load_lifelong_results(write_results(tmp_path, standard_results()))
    for figure in sp.lifelong_figures(results).values():
        title = figure.layout.title.text
        assert f"{MODEL}, layer {LAYER}<br><sup>runs: " in title
        assert all(result["_source"] in title for result in results.values())
        assert "superseded" not in title
    direct = sp.metrics_figure(standard_results())  # not loaded from files: the recorded stems
    assert standard_results()["rome"]["settings"]["run_stem"] in direct.layout.title.text
    legacy = sp.load_lifelong_results(write_results(tmp_path / "legacy", legacy_results()))
    title = sp.interference_figure(legacy).layout.title.text
    assert "legacy runs of an older kis, superseded: lifelong_rome.json" in title
    assert {trace.name for trace in sp.metrics_figure(legacy).data if trace.showlegend is not False} >= {
        "p-ROME",
        "EMMET-like fit λ=1",
        "AlphaEdit-legacy",
    }


def test_collapse_markers_only_for_collapsed_editors():
    figure = sp.metrics_figure(standard_results())
    by_name: dict[str, list] = {}
    for shape in figure.layout.shapes:
        by_name.setdefault(shape.name, []).append(shape)
    assert set(by_name) == {"collapse rome", "collapse memit"}
    assert len(by_name["collapse rome"]) == len(sp.METRICS)  # a dotted line on every panel
    assert {shape.x0 for shape in by_name["collapse rome"]} == {6}
    assert {shape.line.color for shape in by_name["collapse memit"]} == {REGISTRY["memit"].colour}
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
    assert f"Shown: runs: {standard_results()['rome']['settings']['run_stem']}" in section.intro
    rows = sp.summary_rows(standard_results())
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
    assert "- **Editors**: ROME (original), MEMIT, AlphaEdit, no edit\n" in text
    assert f"- **Runs shown**: `{standard_results()['rome']['settings']['run_stem']}`" in text
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
    assert "ROME (original) cpu, MEMIT cuda, AlphaEdit cpu" in text and "MEMIT 16" in text


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
    assert result["verdict"] == "reproduced" and result["superseded"] is False
    assert "ROME (original) collapsed after 6 edits" in result["evidence"]
    assert "retention < 0.5 or perplexity > 2× step 0" in result["evidence"]
    text = sp.render_lifelong_markdown(standard_results())
    assert "| Sequential ROME (original) edits collapse the model | **reproduced** |" in text


def test_rome_collapses_not_reproduced():
    results = standard_results()
    results["rome"] = make_result("rome", collapse=None)
    result = verdict(results, 0)
    assert result["verdict"] == "not reproduced"
    assert "did not collapse within 9 edits" in result["evidence"]
    text = sp.render_lifelong_markdown(results)
    assert "| Sequential ROME (original) edits collapse the model | **not reproduced** |" in text


def test_each_rome_variant_gets_its_own_named_verdict():
    results = standard_results()
    results["rome"] = make_result("rome", collapse=None)
    results["p-rome"] = make_result("p-rome", collapse=4)
    results["r-rome"] = make_result("r-rome", collapse=None)
    collapse = {v["editors"][0]: v for v in by_rule(results, "collapse")}
    assert list(collapse) == ["rome", "r-rome", "p-rome"]
    assert collapse["rome"]["claim"] == "Sequential ROME (original) edits collapse the model"
    assert collapse["rome"]["verdict"] == "not reproduced"  # p-ROME's collapse is never the original's
    assert collapse["p-rome"]["claim"] == "Sequential p-ROME edits collapse the model"
    assert (
        collapse["p-rome"]["verdict"] == "reproduced" and "p-ROME collapsed after 4" in collapse["p-rome"]["evidence"]
    )
    assert collapse["r-rome"]["claim"] == "Sequential r-ROME edits collapse the model"
    holds = {v["editors"][0]: v for v in by_rule(results, "holds")}
    assert (
        holds["p-rome"]["claim"] == "AlphaEdit holds longer than p-ROME" and holds["p-rome"]["verdict"] == "reproduced"
    )
    assert holds["rome"]["verdict"] == "partly"  # neither collapsed; AlphaEdit's efficacy is higher
    assert sp.judge_collapse(results)["editors"] == ["rome"]  # default: the first variant in registry order


def test_rome_missing_not_measured():
    results = standard_results()
    del results["rome"]
    assert verdict(results, 0)["verdict"] == "not measured"
    assert "no ROME variant (rome, r-rome or p-rome) run" in verdict(results, 0)["evidence"]
    assert verdict(results, 1)["verdict"] == "not measured"
    assert sp.judge_collapse(results, "r-rome")["claim"] == "Sequential r-ROME edits collapse the model"
    del results["alphaedit"]
    results["rome"] = make_result("rome")
    assert "no AlphaEdit (alphaedit or alphaedit-legacy) run" in verdict(results, 1)["evidence"]


def test_legacy_marks_flip_a_verdict_to_superseded():
    results = loaded(standard_results())
    assert [v["verdict"] for v in sp.lifelong_verdicts(results)][:2] == ["reproduced", "reproduced"]
    results["none"]["_legacy"] = True  # the collapse verdict reads none's perplexity; the AlphaEdit one does not
    collapse, holds = sp.lifelong_verdicts(results)[:2]
    assert collapse["verdict"] == "reproduced, superseded" and holds["verdict"] == "reproduced"


def test_alphaedit_holds_when_it_never_collapses():
    result = verdict(standard_results(), 1)
    assert result["verdict"] == "reproduced"
    assert "ROME (original) collapsed after 6 edits, AlphaEdit none within 9 edits" in result["evidence"]
    # compared at the last common number of edits (9): efficacy 1 − 0.05·5·scale
    assert f"{1 - 0.05 * 5 * 0.5:.4g} (AlphaEdit) vs {1 - 0.05 * 5 * 2.0:.4g} (ROME (original))" in result["evidence"]


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
    assert result["verdict"] == "not measured" and "ends before ROME (original)'s collapse" in result["evidence"]
    assert "at 4 edits efficacy" in result["evidence"]


def test_prediction_verdicts():
    results = standard_results()
    assert verdict(results, 2)["verdict"] == "reproduced"  # ROME and MEMIT: output 0.746, log p 0.646 ≥ 0.5
    assert "4 of 4 correlations of ROME (original) and MEMIT" in verdict(results, 2)["evidence"]
    assert "identity" not in verdict(results, 2)["evidence"]  # the original ROME's direction is not C⁻¹k
    results["memit"] = make_result("memit", spearman=0.3)  # output 0.3, log p 0.2: both below
    partly = verdict(results, 2)
    assert partly["verdict"] == "partly" and "2 of 4 correlations" in partly["evidence"]
    results["rome"] = make_result("rome", spearman=0.4)
    assert verdict(results, 2)["verdict"] == "not reproduced"
    for editor in ("rome", "memit"):
        results[editor] = make_result(editor, pearson=None, spearman=None)
    assert verdict(results, 2)["verdict"] == "not measured"


def test_prediction_does_not_judge_p_romes_identity():
    results = {name: standard_results()[name] for name in ("alphaedit", "none")}
    results["p-rome"] = make_result("p-rome", spearman=0.55)  # output ρ 0.55 is an identity: only log p 0.45 counts
    result = sp.judge_prediction(results)
    assert result["verdict"] == "not reproduced" and "0 of 1 correlations of p-ROME" in result["evidence"]
    assert "identity for rank-one edits along C⁻¹k, not judged" in result["evidence"]
    results["emmet"] = make_result("emmet")  # unprojected too: judged
    result = sp.judge_prediction(results)
    assert (
        result["verdict"] == "partly" and "2 of 3 correlations of p-ROME and EMMET-like batch fit" in result["evidence"]
    )


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
        [file_name(result) for result in standard_results().values()]
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


def test_a_cut_value_search_is_named_in_every_table():
    """A run with fewer prompts or steps than the originals' value search says "(cut)"; a full one does not."""
    full = {"settings": {"editor": {"name": "rome", "value_prompts_used": 21, "rome_search": {"steps": 20}}}}
    cut = {"settings": {"editor": {"name": "rome", "value_prompts_used": 7, "rome_search": {"steps": 20}}}}
    memit = {
        "settings": {
            "editor": {"name": "memit", "memit_search": {"steps": 20}},
            "templates": {"memit": [["{}"], ["a. {}", "b. {}", "c. {}", "d. {}", "e. {}"]]},
        }
    }
    legacy = {"settings": {"config": {"n_prefixes": 2, "value_steps": 10}}}
    assert sp.value_search_text(full) == "21 prompts × 20 steps"
    assert sp.value_search_text(cut) == "7 prompts × 20 steps (cut)"
    assert sp.value_search_text(memit) == "6 prompts × 20 steps"
    assert sp.value_search_text(legacy) == "3 prompts × 10 steps (cut)"
    assert sp.summary_rows({"rome": cut})[0]["value search"] == "7 prompts × 20 steps (cut)"
