"""docs/lifelong.md of one set of lifelong runs: settings, the per-editor table and the verdicts, all read from runs.

Every number comes from the run files (kis_lens.editing.lifelong_files) and every verdict from
kis_lens.docs.lifelong_verdicts; a doc drawn from legacy runs of an older kis opens with a "Superseded" banner. A
study's doc (editors × edit orders × layers) is kis_lens.docs.lifelong_study's.

>>> write_lifelong_doc("results/lifelong/smollm2-135m/layer_4", "docs/lifelong.md")
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from kis_lens.docs.lifelong_verdicts import PREDICTION_SPEARMAN, collapse_text, lifelong_verdicts, value_at
from kis_lens.docs.verdict import markdown_cell, verdict_table
from kis_lens.editing.lifelong_files import (
    any_legacy,
    editor_label,
    editor_labels,
    final_n_edits,
    last_value,
    load_lifelong_results,
    model_name,
    number_text,
    run_config,
    run_names,
    run_settings,
    shared_text,
    value_search_text,
)
from kis_lens.editing.lifelong_plots import lifelong_figure_names, write_lifelong_figures
from kis_lens.errors import KisError
from kis_lens.io import atomic_write

# The runs that replace the legacy ones: kis_lens.editing.lifelong_config.DEFAULT_EDITORS (not below this module in the
# pipeline, so not imported; tests/test_docs_lifelong.py checks the two agree).
REPLACING_EDITORS: tuple[str, ...] = ("rome", "r-rome", "p-rome", "memit", "alphaedit", "none")


def _n_planned(result: Mapping[str, Any]) -> int | str:
    """Return how many facts the run was set to edit: its recorded edit order, else the configured n_edits."""
    facts = run_settings(result).get("facts")
    return len(facts) if isinstance(facts, list) else run_config(result).get("n_edits", "—")


def _seconds(value: Any) -> str:
    """Return a duration as the document prints it: 3 significant digits and "s", '—' when not recorded."""
    return "—" if value is None else f"{value:.3g} s"


def _ratio_to_none(results: Mapping[str, Mapping[str, Any]], editor: str, metric: str) -> str:
    """Return an editor's last value of metric divided by the unedited model's, '—' without both."""
    if "none" not in results or editor == "none":
        return "—"
    mine, reference = last_value(results[editor], metric), last_value(results["none"], metric)
    if mine is None or reference is None or reference[1] == 0:
        return "—"
    return f"{mine[1] / reference[1]:.4g}"


def _editor_table(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Return the Markdown table of the runs, one column per editor, one row per setting or last measurement."""
    editors, labels = list(results), editor_labels(results)
    rows: list[tuple[str, Callable[[str, Mapping[str, Any]], str]]] = [
        ("run", lambda e, r: f"`{run_names({e: r})[0]}`"),
        ("edits made", lambda e, r: number_text(len(r.get("edits") or []))),
        ("value search (prompts × steps)", lambda e, r: value_search_text(r)),
        ("last measurement at (edits)", lambda e, r: number_text(final_n_edits(r))),
        ("collapse", lambda e, r: collapse_text(r)),
        ("collapse criterion", lambda e, r: ((r.get("summary") or {}).get("collapse") or {}).get("criterion") or "—"),
        ("efficacy (all edits so far)", lambda e, r: value_at(r, "efficacy")),
        ("argmax efficacy (teacher-forced)", lambda e, r: value_at(r, "argmax_efficacy")),
        ("paraphrase", lambda e, r: value_at(r, "paraphrase")),
        ("neighborhood", lambda e, r: value_at(r, "neighborhood")),
        ("score", lambda e, r: value_at(r, "score")),
        ("fluency", lambda e, r: value_at(r, "fluency")),
        ("fluency ÷ no edit's", lambda e, r: _ratio_to_none(results, e, "fluency")),
        ("held-out perplexity", lambda e, r: value_at(r, "perplexity")),
        ("perplexity ÷ no edit's", lambda e, r: _ratio_to_none(results, e, "perplexity")),
        ("unedited facts mean abs ΔNLL(true)", lambda e, r: value_at(r, "unedited_nll_drift")),
        ("‖W_t − W_0‖_F", lambda e, r: value_at(r, "weight_change_norm")),
        ("σ_max(W_t)", lambda e, r: value_at(r, "sigma_max")),
        ("cond(W_t)", lambda e, r: value_at(r, "condition_number")),
        ("accumulated ΣP²", lambda e, r: value_at(r, "accumulated_p2")),
        ("wall time", lambda e, r: _seconds((r.get("summary") or {}).get("wall_seconds"))),
        ("per edit", lambda e, r: _seconds((r.get("summary") or {}).get("seconds_per_edit"))),
        ("per probe", lambda e, r: _seconds((r.get("summary") or {}).get("seconds_per_probe"))),
        ("per full evaluation", lambda e, r: _seconds((r.get("summary") or {}).get("seconds_per_eval"))),
    ]
    lines = [
        "| | " + " | ".join(markdown_cell(labels[editor]) for editor in editors) + " |",
        "|---|" + "---:|" * len(editors),
    ]
    for name, read in rows:
        lines.append(f"| {name} | " + " | ".join(markdown_cell(read(e, results[e])) for e in editors) + " |")
    return lines


# An absolute path at the start of a value or after a space, '=' or quote: a machine's path, never put in a doc.
_ABSOLUTE_PATH = re.compile(r"""(?<![^\s='"(])(?:/|~/|[A-Za-z]:\\)[^\s'"`|)]*""")


def _without_machine_paths(value: Any) -> Any:
    """Return value with every absolute path in its strings cut to .../<last part> (recursively through dicts/lists)."""
    if isinstance(value, str):
        return _ABSOLUTE_PATH.sub(lambda match: ".../" + re.split(r"[/\\]", match.group(0).rstrip("/\\"))[-1], value)
    if isinstance(value, Mapping):
        return {key: _without_machine_paths(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_machine_paths(item) for item in value]
    return value


def _settings_shown(result: Mapping[str, Any]) -> dict[str, Any]:
    """Return a run's settings with the edit order shortened to its length and first case ids, and no machine paths."""
    shown = dict(run_settings(result))
    facts = shown.get("facts")
    if isinstance(facts, list) and len(facts) > 10:
        shown["facts"] = f"{len(facts)} case ids in edit order, first {facts[:10]}"
    if isinstance(shown.get("identity"), Mapping):  # repeats config, hashes, templates and version shown beside it
        shown["identity"] = f"{len(shown['identity'])} fields, hashed into the run's stem"
    return _without_machine_paths(shown)


def legacy_banner(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Return the "Superseded" banner of a document drawn from legacy files (none when no result is legacy).

    Its numbers (value steps, prompts, λ, threshold, L2) are read from the legacy runs' own settings."""
    legacy = {editor: result for editor, result in results.items() if result.get("_legacy")}
    if not legacy:
        return []

    def read(editor: str, key: str) -> str:
        return number_text(run_config(legacy[editor]).get(key)) if editor in legacy else "?"

    some = next(iter(legacy.values()))
    prompts = len(run_settings(some).get("prefixes") or []) + 1
    parts = [
        "> **Superseded.** These runs were made by an older kis and their verdicts do not stand for ROME, MEMIT or "
        "AlphaEdit. Its `rome` was p-ROME (the plain key k for both the direction and the scale, not the original "
        "ROME's template-averaged key for the direction) with a cut value search "
        f"({number_text(run_config(some).get('value_steps'))} steps, {prompts} prompts) and a KL term at the wrong "
        "token; "
        f"its `memit` was a one-layer exact fit with λ = {read('emmet', 'covariance_weight')} (what is now called "
        f"`emmet`, shown as {editor_label('emmet', legacy['emmet']) if 'emmet' in legacy else 'EMMET-like fit'}), "
        "not MEMIT on several layers; its `alphaedit` used a relative null-space threshold "
        f"{read('alphaedit-legacy', 'null_threshold')} and L2 = {read('alphaedit-legacy', 'null_l2')} on one layer "
        f"(shown as {editor_label('alphaedit-legacy')}), not the original's absolute threshold 2e-2 and L2 = 10 on "
        "MEMIT's layers. "
        "Every table and verdict below names the editors by what they really ran, and every verdict is marked "
        f"superseded. The runs of `kis lifelong --editors {','.join(REPLACING_EDITORS)}` replace them.",
    ]
    return [*parts, ""]


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
    config = lambda key: shared_text(results, lambda result: run_config(result).get(key, "—"))  # noqa: E731
    setting = lambda key: shared_text(results, lambda result: run_settings(result).get(key, "—"))  # noqa: E731
    if command is None:
        recorded = {
            str(run_settings(result).get("command"))
            for result in results.values()
            if run_settings(result).get("command")
        }
        command = " && ".join(sorted(recorded)) or None
    command = None if command is None else _without_machine_paths(command)
    model = shared_text(results, model_name)
    labels = editor_labels(results)
    where = f"`{source}`" if source is not None else "the `lifelong_<editor>_….json` files of `kis lifelong`"
    superseded = " (superseded)" if any_legacy(results) else ""
    lines = [
        f"# Lifelong editing on {model}, layer {config('layer')}{superseded}",
        "",
        *legacy_banner(results),
        f"Generated from {where} by kis_lens.docs.lifelong; do not edit by hand.",
        "",
        "Each editor edits the MLP output weight W_out for real "
        + ("(in these legacy runs: of one layer)" if superseded else "(MEMIT and AlphaEdit: of several layers)")
        + ", one CounterFact fact or batch after another, and the model is measured along the way (a probe: "
        "efficacy, perplexity and the weight statistics; a full evaluation: every metric). Efficacy is ROME's "
        "rewrite success on all edits made so far, so it is also the retention of earlier edits. `no edit` is the "
        "unedited model measured on the same schedule.",
        "",
        "## Setting",
        "",
        f"- **Runs shown**: {', '.join(f'`{name}`' for name in run_names(results))}"
        + (" (legacy files of an older kis, superseded)" if superseded else ""),
        f"- **Model**: `{model}`, layer {config('layer')}",
        f"- **Edits**: {shared_text(results, _n_planned)} CounterFact facts from `{config('facts')}` in an order "
        f"drawn with seed {config('seed')}; batch size {config('batch_size')} for the batching editors",
        f"- **Watched**: {config('n_unedited')} never-edited facts from `{config('unedited_facts')}`; held-out "
        f"perplexity on {config('heldout_texts')} texts of {config('heldout_tokens')} tokens; C from "
        f"`{config('corpus')}` ({config('max_tokens')} tokens)",
        f"- **Cadence**: a probe every {config('probe_every')} edits, a full evaluation every {config('eval_every')}",
        f"- **Editors**: {', '.join(labels[editor] for editor in results)}",
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
        *verdict_table(lifelong_verdicts(results), claim_header="claim"),
    ]
    lines += [
        "",
        "Verdict rules: each ROME variant present (original ROME, r-ROME, p-ROME) is judged by its own name; it "
        "collapses when its run records a collapse step (the criterion above). AlphaEdit holds longer than a ROME "
        "variant when it collapses later or not at all within a run that goes past that variant's collapse; when "
        "neither collapses it is `partly` if AlphaEdit's efficacy at the last common number of edits is higher. "
        f"P predicts the interference when the Spearman ρ of predicted vs measured is at least {PREDICTION_SPEARMAN:g} "
        "for every correlation of the editors whose updates are not projected (all but AlphaEdit and no edit), which "
        "is what the prediction from P assumes; `partly` when some are. p-ROME's output correlation is an identity "
        "(k_u(W_t − W_u) = Σ_{i>u} P[i,u] r_i for rank-one edits along C⁻¹k with the plain key k) and is not judged; "
        "AlphaEdit's correlations are listed, not judged. A verdict drawn from a legacy run of an older kis is marked "
        "superseded.",
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


def write_lifelong_doc(
    folder: str | Path, doc_path: str | Path, command: str | None = None, stems: Sequence[str] | None = None
) -> Path:
    """Write the figures (when missing or older than the results) and the Markdown doc atomically; return its path.

    The runs are load_lifelong_results(folder, stems): the given stems, else the newest set."""
    folder, doc_path = Path(folder), Path(doc_path)
    results = load_lifelong_results(folder, stems)
    newest = max((folder / result["_source"]).stat().st_mtime for result in results.values())
    figures = {name: folder / f"{name}.html" for name in lifelong_figure_names(results)}
    if any(not path.exists() or path.stat().st_mtime < newest for path in figures.values()):
        figures = write_lifelong_figures(results, folder)
    links = {name: os.path.relpath(Path(path).resolve(), doc_path.resolve().parent) for name, path in figures.items()}
    text = render_lifelong_markdown(results, links, command, source=folder)
    return atomic_write(doc_path, lambda temp: temp.write_text(text, encoding="utf-8"))
