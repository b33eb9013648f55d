"""kis_lens.docs.lifelong and lifelong_verdicts: the verdicts drawn from a set of lifelong runs and its generated
lifelong.md, on synthetic run files and legacy ones of an older kis (tests/lifelong_fixtures.py)."""

from __future__ import annotations

import os
from typing import Any

import pytest
from lifelong_fixtures import (
    LAYER,
    MODEL,
    SCHEDULE,
    file_name,
    legacy_results,
    loaded,
    make_result,
    standard_results,
    write_results,
)

from kis_lens.docs import lifelong as lifelong_doc
from kis_lens.docs import lifelong_verdicts as verdicts
from kis_lens.docs.verdict import Verdict
from kis_lens.editing import lifelong_files as files
from kis_lens.editing import lifelong_report as report
from kis_lens.errors import KisError


def by_rule(results: dict[str, dict[str, Any]], rule: str) -> list[dict[str, Any]]:
    return [v.to_dict() for v in verdicts.lifelong_verdicts(results) if v.details.get("rule") == rule]


def verdict(results: dict[str, dict[str, Any]], index: int) -> dict[str, Any]:
    return verdicts.lifelong_verdicts(results)[index].to_dict()


def test_the_banner_names_the_runs_that_replace_the_legacy_ones():
    from kis_lens.editing.lifelong_config import DEFAULT_EDITORS

    assert lifelong_doc.REPLACING_EDITORS == DEFAULT_EDITORS


def test_legacy_verdicts_name_the_variant_and_are_superseded(tmp_path):
    results = files.load_lifelong_results(write_results(tmp_path, legacy_results()))
    found = verdicts.lifelong_verdicts(results)
    assert all(v.details["superseded"] and v.verdict.endswith(", superseded") for v in found)
    assert all(v.evidence.startswith("Superseded") for v in found)
    (collapse,) = by_rule(results, "collapse")
    assert collapse["claim"] == "Sequential p-ROME edits collapse the model"
    assert collapse["verdict"] == "reproduced, superseded" and "p-ROME collapsed after 6 edits" in collapse["evidence"]
    (holds,) = by_rule(results, "holds")
    assert holds["claim"] == "AlphaEdit-legacy holds longer than p-ROME" and holds["verdict"].startswith("reproduced")
    (prediction,) = by_rule(results, "prediction")
    assert "correlations of p-ROME and EMMET-like fit λ=1" in prediction["evidence"]
    assert "identity for rank-one edits along C⁻¹k, not judged" in prediction["evidence"]  # p-ROME's output ρ
    text = lifelong_doc.render_lifelong_markdown(
        results, command="kis lifelong --editor rome --output_dir /home/someone/runs"
    )
    head = text.split("## Setting")[0]
    assert head.startswith(f"# Lifelong editing on {MODEL}, layer {LAYER} (superseded)\n\n> **Superseded.**")
    assert "p-ROME" in head and "(10 steps, 3 prompts)" in head and "λ = 1 (what is now called `emmet`" in head
    assert "relative null-space threshold 0.01 and L2 = 1 on one layer" in head
    assert "`kis lifelong --editors rome,r-rome,p-rome,memit,alphaedit,none` replace them" in head
    assert "| | p-ROME | AlphaEdit-legacy | EMMET-like fit λ=1 | no edit |" in text
    assert "| Sequential p-ROME edits collapse the model | **reproduced, superseded** |" in text
    assert "Sequential ROME" not in text and "| ROME |" not in text and "MEMIT |" not in text
    assert "/home/someone" not in text and "--output_dir .../runs" in text
    (section,) = report.lifelong_sections(results)
    assert "lifelong_rome.json" in section.intro and "superseded" in section.intro
    assert "superseded" not in lifelong_doc.render_lifelong_markdown(standard_results()).split("## Setting")[0]


# ------------------------------------------------------------------------------------------------------- markdown


def test_markdown_numbers_come_from_the_results():
    results = standard_results()
    text = lifelong_doc.render_lifelong_markdown(results, command="kis lifelong --model_name smollm2-135m --layer 5")
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
    assert "- **Command**: not recorded" in lifelong_doc.render_lifelong_markdown(results)


def test_markdown_reports_differing_settings_per_editor():
    results = standard_results()
    results["memit"]["settings"]["device"] = "cuda"
    results["memit"]["settings"]["threads"] = 16
    text = lifelong_doc.render_lifelong_markdown(results)
    assert "ROME (original) cpu, MEMIT cuda, AlphaEdit cpu" in text and "MEMIT 16" in text


def test_markdown_figures_linked_when_given():
    text = lifelong_doc.render_lifelong_markdown(
        standard_results(), {"lifelong_metrics": "figures/lifelong_metrics.html"}
    )
    assert "[lifelong_metrics (interactive HTML)](figures/lifelong_metrics.html)" in text
    assert "## Figures" not in lifelong_doc.render_lifelong_markdown(standard_results())


def test_markdown_needs_results():
    with pytest.raises(KisError, match="kis lifelong"):
        lifelong_doc.render_lifelong_markdown({})


# ------------------------------------------------------------------------------------------------------- verdicts


def test_verdicts_are_verdicts_recording_their_rule_and_editors():
    """Each is a Verdict; its dict (claim, verdict, evidence, rule, editors, superseded) reads back as it."""
    found = verdicts.lifelong_verdicts(standard_results())
    assert all(isinstance(v, Verdict) for v in found)
    assert [v.details["rule"] for v in found] == ["collapse", "holds", "prediction", "p2"]
    assert list(found[0].to_dict()) == ["claim", "verdict", "evidence", "rule", "editors", "superseded"]
    assert [Verdict.from_dict(v.to_dict()) for v in found] == found


def test_rome_collapses_reproduced():
    result = verdict(standard_results(), 0)
    assert result["verdict"] == "reproduced" and result["superseded"] is False
    assert "ROME (original) collapsed after 6 edits" in result["evidence"]
    assert "retention < 0.5 or perplexity > 2× step 0" in result["evidence"]
    text = lifelong_doc.render_lifelong_markdown(standard_results())
    assert "| Sequential ROME (original) edits collapse the model | **reproduced** |" in text


def test_rome_collapses_not_reproduced():
    results = standard_results()
    results["rome"] = make_result("rome", collapse=None)
    result = verdict(results, 0)
    assert result["verdict"] == "not reproduced"
    assert "did not collapse within 9 edits" in result["evidence"]
    text = lifelong_doc.render_lifelong_markdown(results)
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
    assert verdicts.judge_collapse(results).details["editors"] == [
        "rome"
    ]  # default: the first variant in registry order


def test_rome_missing_not_measured():
    results = standard_results()
    del results["rome"]
    assert verdict(results, 0)["verdict"] == "not measured"
    assert "no ROME variant (rome, r-rome or p-rome) run" in verdict(results, 0)["evidence"]
    assert verdict(results, 1)["verdict"] == "not measured"
    assert verdicts.judge_collapse(results, "r-rome").claim == "Sequential r-ROME edits collapse the model"
    del results["alphaedit"]
    results["rome"] = make_result("rome")
    assert "no AlphaEdit (alphaedit or alphaedit-legacy) run" in verdict(results, 1)["evidence"]


def test_legacy_marks_flip_a_verdict_to_superseded():
    results = loaded(standard_results())
    assert [v.verdict for v in verdicts.lifelong_verdicts(results)][:2] == ["reproduced", "reproduced"]
    results["none"]["_legacy"] = True  # the collapse verdict reads none's perplexity; the AlphaEdit one does not
    collapse, holds = verdicts.lifelong_verdicts(results)[:2]
    assert collapse.verdict == "reproduced, superseded" and holds.verdict == "reproduced"


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
    result = verdicts.judge_prediction(results).to_dict()
    assert result["verdict"] == "not reproduced" and "0 of 1 correlations of p-ROME" in result["evidence"]
    assert "identity for rank-one edits along C⁻¹k, not judged" in result["evidence"]
    results["emmet"] = make_result("emmet")  # unprojected too: judged
    result = verdicts.judge_prediction(results).to_dict()
    assert (
        result["verdict"] == "partly" and "2 of 3 correlations of p-ROME and EMMET-like batch fit" in result["evidence"]
    )


def test_prediction_ignores_alphaedit_in_the_verdict():
    results = {name: standard_results()[name] for name in ("alphaedit", "none")}
    assert verdict(results, 2)["verdict"] == "not measured"
    assert "Pearson r = 0.301" in verdict(results, 2)["evidence"]


# ------------------------------------------------------------------------------------------------------ the doc


def test_write_lifelong_doc_atomic_and_links(tmp_path):
    folder = write_results(tmp_path / "results" / "lifelong" / MODEL / "layer_5", standard_results())
    doc = tmp_path / "docs" / "lifelong.md"
    assert lifelong_doc.write_lifelong_doc(folder, doc, command="kis lifelong --layer 5") == doc
    text = doc.read_text(encoding="utf-8")
    assert "`kis lifelong --layer 5`" in text and "after 6 edits" in text
    link = f"../results/lifelong/{MODEL}/layer_5/lifelong_metrics.html"
    assert f"({link})" in text and (doc.parent / link).exists()
    assert sorted(path.name for path in folder.iterdir()) == sorted(
        [file_name(result) for result in standard_results().values()]
        + ["lifelong_interference.html", "lifelong_metrics.html", "plotly.min.js"]
    )
    assert [path.name for path in doc.parent.iterdir()] == ["lifelong.md"]  # no temp file left


def test_write_lifelong_doc_rewrites_stale_figures(tmp_path):
    folder = write_results(tmp_path / "layer_5", standard_results())
    figure = folder / "lifelong_metrics.html"
    figure.write_text("old", encoding="utf-8")
    os.utime(figure, (1, 1))  # older than the results
    lifelong_doc.write_lifelong_doc(folder, tmp_path / "lifelong.md")
    assert figure.read_text(encoding="utf-8") != "old"
    fresh = figure.stat().st_mtime_ns
    lifelong_doc.write_lifelong_doc(folder, tmp_path / "lifelong.md")
    assert figure.stat().st_mtime_ns == fresh  # up to date: not rewritten


def test_write_lifelong_doc_empty_folder(tmp_path):
    with pytest.raises(KisError, match="kis lifelong"):
        lifelong_doc.write_lifelong_doc(tmp_path, tmp_path / "lifelong.md")
    assert list(tmp_path.iterdir()) == []
