"""Verdicts on the paper's claims drawn from one set of lifelong runs: collapse, AlphaEdit holding, P predicting.

Each is a kis_lens.docs.verdict.Verdict computed by code from the run files (kis_lens.editing.lifelong_files); its
details record the rule, the editors it is drawn from and whether a legacy run supersedes it. The rules are stated
in docs/lifelong.md beside the verdicts (kis_lens.docs.lifelong). A study's verdicts across edit orders are
kis_lens.editing.lifelong_study's.

>>> [verdict.to_dict() for verdict in lifelong_verdicts(load_lifelong_results(folder))]
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

from kis_lens.docs.verdict import NOT_MEASURED, NOT_REPRODUCED, REPRODUCED, Verdict
from kis_lens.editing.lifelong_files import (
    collapse_step,
    editor_label,
    editor_labels,
    final_n_edits,
    format_r,
    last_value,
    number_text,
    run_correlation,
)

# Verdict rules, stated in the document next to the verdicts.
ROME_VARIANTS: tuple[str, ...] = ("rome", "r-rome", "p-rome")  # each is judged by name, never as "ROME"
ALPHAEDIT_VARIANTS: tuple[str, ...] = ("alphaedit", "alphaedit-legacy")
# Projected updates (or none): their correlations are listed, not judged; every other editor's update is not
# projected, which is what the prediction from P assumes.
NOT_PREDICTED: tuple[str, ...] = (*ALPHAEDIT_VARIANTS, "none")
# Rank one along C⁻¹k with the plain key k: k_u ΔW_i = P[i,u] r_i exactly, so its output correlation is an identity.
IDENTITY_EDITORS: tuple[str, ...] = ("p-rome",)
PREDICTION_SPEARMAN = 0.5  # Spearman ρ of predicted vs measured at or above this counts as "P predicts"
# Lifelong verdicts say "partly" where reproduction's say "partly reproduced"; the docs print them as they are.
PARTLY, MEASURED, SUPERSEDED = "partly", "measured", "superseded"
ANY_ROME = "ROME variant (rome, r-rome or p-rome)"
ANY_ALPHAEDIT = "AlphaEdit (alphaedit or alphaedit-legacy)"


def collapse_text(result: Mapping[str, Any]) -> str:
    """Return when a run collapsed, as the docs print it: "after n edits", else "none within n edits"."""
    step = collapse_step(result)
    return f"none within {final_n_edits(result):,} edits" if step is None else f"after {step:,} edits"


def value_at(result: Mapping[str, Any], metric: str, at_most: int | None = None) -> str:
    """Return the metric's last value (at n_edits ≤ at_most) with '(at n)' when it is not the run's last step."""
    found = last_value(result, metric, at_most)
    if found is None:
        return "—"
    n, value = found
    end = final_n_edits(result) if at_most is None else at_most
    return number_text(value) if n == end else f"{number_text(value)} (at {n:,})"


def _superseded(verdict: Verdict, results: Mapping[str, Mapping[str, Any]], editors: Sequence[str]) -> Verdict:
    """Return the verdict marked superseded when any run it is drawn from was loaded from a legacy file."""
    legacy = [editor for editor in editors if editor in results and results[editor].get("_legacy")]
    verdict = replace(verdict, details={**verdict.details, "superseded": bool(legacy)})
    if not legacy:
        return verdict
    evidence = f"Superseded (drawn from legacy runs of an older kis). {verdict.evidence}"
    return replace(verdict, verdict=f"{verdict.verdict}, {SUPERSEDED}", evidence=evidence)


def _first(results: Mapping[str, Any], names: Sequence[str]) -> str | None:
    """Return the first of names that ran among the results, else None."""
    return next((name for name in names if name in results), None)


def _missing(results: Mapping[str, Any], wanted: Sequence[tuple[str | None, str]]) -> str:
    """Return "no … run among these results." naming each wanted editor absent (its fallback text when None)."""
    absent = [fallback if name is None else f"{name} ({editor_label(name)})" for name, fallback in wanted]
    absent = [text for (name, _), text in zip(wanted, absent) if name is None or name not in results]
    return f"no {' or '.join(absent)} run among these results."


def judge_collapse(results: Mapping[str, Mapping[str, Any]], editor: str | None = None) -> Verdict:
    """Return the verdict on "<ROME variant> collapses": reproduced when that run's collapse step is not null.

    editor is one of ROME_VARIANTS (default: the first present); the claim names it, so that p-ROME's or r-ROME's
    collapse is never read as the original ROME's."""
    editor = editor or _first(results, ROME_VARIANTS)
    rule = {"rule": "collapse", "editors": [editor] if editor else []}
    if editor is None or editor not in results:
        name = "ROME" if editor is None else editor_label(editor)
        evidence = _missing(results, [(editor, ANY_ROME)])
        return Verdict(f"Sequential {name} edits collapse the model", NOT_MEASURED, evidence)
    run, label = results[editor], editor_label(editor, results[editor])
    claim = f"Sequential {label} edits collapse the model"
    collapse = (run.get("summary") or {}).get("collapse") or {}
    step = collapse.get("step")
    end = f"final efficacy {value_at(run, 'efficacy')}, perplexity {value_at(run, 'perplexity')}"
    if "none" in results:
        end += f" (no edit: {value_at(results['none'], 'perplexity')})"
    if step is None:
        word = NOT_REPRODUCED
        evidence = (
            f"{label} did not collapse within {final_n_edits(run):,} edits (criterion: "
            f"{collapse.get('criterion', '?')}); {end}."
        )
    else:
        at_collapse = last_value(run, "efficacy", step)
        efficacy = (
            "" if at_collapse is None else f"; efficacy {number_text(at_collapse[1])} at {at_collapse[0]:,} edits"
        )
        word = REPRODUCED
        evidence = (
            f"{label} collapsed after {step:,} edits (criterion: {collapse.get('criterion', '?')}){efficacy}; {end}."
        )
    return _superseded(Verdict(claim, word, evidence, rule), results, [editor, "none"])


def judge_alphaedit_holds(
    results: Mapping[str, Mapping[str, Any]], rome: str | None = None, alphaedit: str | None = None
) -> Verdict:
    """Return the verdict on "AlphaEdit holds longer than <ROME variant>", from both collapse steps (null = not
    within the run). rome and alphaedit default to the first of ROME_VARIANTS and ALPHAEDIT_VARIANTS present."""
    rome, alphaedit = rome or _first(results, ROME_VARIANTS), alphaedit or _first(results, ALPHAEDIT_VARIANTS)
    r_name = "ROME" if rome is None else editor_label(rome, results.get(rome))
    a_name = "AlphaEdit" if alphaedit is None else editor_label(alphaedit, results.get(alphaedit))
    claim = f"{a_name} holds longer than {r_name}"
    rule = {"rule": "holds", "editors": [name for name in (rome, alphaedit) if name]}
    if rome not in results or alphaedit not in results:
        evidence = _missing(results, [(rome, ANY_ROME), (alphaedit, ANY_ALPHAEDIT)])
        return Verdict(claim, NOT_MEASURED, evidence, rule)
    r_run, a_run = results[rome], results[alphaedit]
    r_step, a_step = collapse_step(r_run), collapse_step(a_run)
    common = min(final_n_edits(r_run), final_n_edits(a_run))
    compared = (
        f"at {common:,} edits efficacy {value_at(a_run, 'efficacy', common)} ({a_name}) vs "
        f"{value_at(r_run, 'efficacy', common)} ({r_name}), score {value_at(a_run, 'score', common)} vs "
        f"{value_at(r_run, 'score', common)}"
    )
    steps = f"{r_name} collapsed {collapse_text(r_run)}, {a_name} {collapse_text(a_run)}"
    if r_step is not None and a_step is None and final_n_edits(a_run) <= r_step:
        verdict = NOT_MEASURED
        steps += f"; {a_name}'s run ({final_n_edits(a_run):,} edits) ends before {r_name}'s collapse"
    elif r_step is not None and (a_step is None or a_step > r_step):
        verdict = REPRODUCED
    elif r_step is None and a_step is None:
        a_eff, r_eff = last_value(a_run, "efficacy", common), last_value(r_run, "efficacy", common)
        ahead = a_eff is not None and r_eff is not None and a_eff[1] > r_eff[1]
        verdict = PARTLY if ahead else NOT_REPRODUCED
        steps += "; neither collapsed, so only their efficacy can be compared"
    else:  # AlphaEdit collapsed, and the ROME variant later or not at all
        verdict = NOT_REPRODUCED
    return _superseded(Verdict(claim, verdict, f"{steps}; {compared}.", rule), results, [rome, alphaedit])


def prediction_editors(results: Mapping[str, Any]) -> list[str]:
    """Return the editors whose correlations the P verdict judges: every one whose update is not projected."""
    return [editor for editor in results if editor not in NOT_PREDICTED]


def judge_prediction(results: Mapping[str, Mapping[str, Any]]) -> Verdict:
    """Return the verdict on "P predicts the drift": Spearman ρ ≥ PREDICTION_SPEARMAN for every unprojected editor's
    correlations (an IDENTITY_EDITORS output correlation is listed, not judged; so are AlphaEdit's)."""
    claim = "P predicts the interference on earlier edits"
    parts, checks, labels = [], [], editor_labels(results)
    judged = prediction_editors(results)
    for editor, result in results.items():
        if editor == "none":
            continue
        numbers = []
        for name, short in (("predicted_vs_output", "MLP output"), ("predicted_vs_logprob", "log p")):
            corr = run_correlation(result, name)
            numbers.append(
                f"{short}: Pearson r = {format_r(corr.get('pearson'))}, Spearman ρ = "
                f"{format_r(corr.get('spearman'))}, n = {number_text(corr.get('n'))}"
            )
            if editor in IDENTITY_EDITORS and name == "predicted_vs_output":
                numbers[-1] += " (an identity for rank-one edits along C⁻¹k, not judged)"
            elif editor in judged and corr.get("spearman") is not None:
                checks.append(corr["spearman"] >= PREDICTION_SPEARMAN)
        parts.append(f"{labels[editor]} ({'; '.join(numbers)})")
    if not checks:
        verdict = NOT_MEASURED
    elif all(checks):
        verdict = REPRODUCED
    elif any(checks):
        verdict = PARTLY
    else:
        verdict = NOT_REPRODUCED
    names = " and ".join(labels[editor] for editor in judged) or "no unprojected editor"
    rule = f"{sum(checks)} of {len(checks)} correlations of {names} have Spearman ρ ≥ {PREDICTION_SPEARMAN:g}"
    evidence = f"{rule}. " + "; ".join(parts) + ("." if parts else "")
    judged_verdict = Verdict(claim, verdict, evidence, {"rule": "prediction", "editors": judged})
    return _superseded(judged_verdict, results, [editor for editor in results if editor != "none"])


def accumulated_p2_text(results: Mapping[str, Mapping[str, Any]]) -> Verdict:
    """Return ΣP² accumulated at each editor's collapse (or at its last step when it did not collapse)."""
    parts, labels = [], editor_labels(results)
    edited = [editor for editor in results if editor != "none"]
    for editor in edited:
        result = results[editor]
        collapse = (result.get("summary") or {}).get("collapse") or {}
        if collapse.get("step") is not None:
            parts.append(
                f"{labels[editor]}: ΣP² = {number_text(collapse.get('accumulated_p2_at_collapse'))} at its collapse "
                f"after {collapse['step']:,} edits"
            )
        else:
            parts.append(
                f"{labels[editor]}: no collapse within {final_n_edits(result):,} edits, ΣP² = "
                f"{value_at(result, 'accumulated_p2')} at the end"
            )
    evidence = (
        "; ".join(parts)
        + ". Within one edit order ΣP² only grows with the number of edits, so one run cannot tell whether it "
        "predicts the collapse better than the count of edits does: that needs runs over several orders (--seed)."
        if parts
        else "no edited run among these results."
    )
    claim = "Accumulated superposition ΣP² at collapse"
    verdict = Verdict(claim, MEASURED if parts else NOT_MEASURED, evidence, {"rule": "p2", "editors": edited})
    return _superseded(verdict, results, edited)


def lifelong_verdicts(results: Mapping[str, Mapping[str, Any]]) -> list[Verdict]:
    """Return the claim-by-claim verdicts (claim, verdict, evidence; details: rule, editors, superseded).

    One collapse verdict and one AlphaEdit verdict per ROME variant present (one "not measured" each when none
    is), then the P prediction and ΣP²."""
    variants = [editor for editor in ROME_VARIANTS if editor in results] or [None]
    return [
        *(judge_collapse(results, editor) for editor in variants),
        *(judge_alphaedit_holds(results, editor) for editor in variants),
        judge_prediction(results),
        accumulated_p2_text(results),
    ]
