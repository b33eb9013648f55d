"""Copy `kis lifelong` runs into benchmarks/results/lifelong/ and regenerate docs/lifelong.md from them.

    .venv/bin/python benchmarks/lifelong.py --study results/smollm2-135m/lifelong   # every finished run: a study
    .venv/bin/python benchmarks/lifelong.py --from results/.../layer_4 [--stems S1,S2,...]   # one set of runs
    .venv/bin/python benchmarks/lifelong.py           # re-render docs/lifelong.md from the committed JSONs
    .venv/bin/python benchmarks/lifelong.py --check   # write nothing; exit 1 when docs/lifelong.md differs

--study copies every finished run of a campaign (layer_<L>/ folders; partial checkpoints never), with the causal
traces and the queue's compute log, and writes the study (kis_lens.docs.lifelong_study): verdicts across edit
orders, with an "Interim" banner while an editor has fewer than 3 orders. --from copies one set of runs (the given
stems, else the newest set sharing one identity) and replaces the committed set, so the doc never depends on file
dates. Each JSON records its command in settings.command; tests/system/test_docs_numbers.py fails when the doc is
not this script's output. After a study gains runs, re-execute tutorial 05 (`python tutorials/execute.py 05`),
whose last cell prints the committed study's verdicts: tests/system/test_tutorials.py counts its runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path("benchmarks") / "results" / "lifelong"  # relative: the doc names it, whatever the checkout's path
DOC = Path("docs") / "lifelong.md"


def absolute_interference(result: dict[str, Any]) -> dict[str, Any]:
    """Return a result with its interference in layer-output units (runs before that change divided by ‖r_u‖).

    The division by ‖r_u‖ = ‖v*_u − (k_u W + b)‖ exploded for the two edits whose target the model already
    produced (‖r_u‖ ≈ 1e-5); each edit's ‖r_u‖ is in its `edits` entry, so the product is the absolute norm."""
    from kis_lens.editing.lifelong_result import INTERFERENCE_UNITS
    from kis_lens.editing.metrics import correlations

    settings = result["settings"]
    if settings.get("interference_units") == INTERFERENCE_UNITS or not result["edits"]:
        return result
    scale = {edit["case_id"]: edit["residual_norm"] for edit in result["edits"]}
    pairs = result["pairs"]
    for key in ("predicted", "measured_output"):
        pairs[key] = [value * scale[case] for value, case in zip(pairs[key], pairs["case_id"])]
    for step in result["steps"]:
        rows = [i for i, n in enumerate(pairs["n_edits"]) if n == step["n_edits"]]
        if rows:
            step["predicted_interference"] = sum(pairs["predicted"][i] for i in rows) / len(rows)
            step["measured_interference"] = sum(pairs["measured_output"][i] for i in rows) / len(rows)
    summary = result["summary"]
    summary["final"] = result["steps"][-1]
    summary["correlations"] = {
        "predicted_vs_output": correlations(pairs["predicted"], pairs["measured_output"]),
        "predicted_vs_logprob": correlations(pairs["predicted"], pairs["measured_logprob"]),
    }
    settings["interference_units"] = INTERFERENCE_UNITS
    settings["converted"] = (
        "by benchmarks/lifelong.py: interference × ‖r_u‖ (the run divided by ‖r_u‖); the model record of the `none` "
        "run (the run read its fingerprint after editing W_out)"
    )
    return result


def committed_results() -> dict[str, dict[str, Any]]:
    """Return the committed set of runs by editor; SystemExit when the folder holds runs of several settings."""
    from kis_lens.editing.lifelong_files import lifelong_run_groups, load_lifelong_results

    groups = lifelong_run_groups(ROOT / RESULTS)
    if len(groups) > 1:
        raise SystemExit(
            f"{RESULTS} holds runs of {len(groups)} different settings ({groups}): keep one set (rerun "
            "benchmarks/lifelong.py --from with the runs to show; it replaces the committed set)"
        )
    return load_lifelong_results(ROOT / RESULTS, stems=groups[0] if groups else None)


FIGURES = Path("docs") / "figures" / "lifelong"


def is_study() -> bool:
    """Return whether the committed set is a study (runs of the current kis in layer_<L>/ folders)."""
    return any((ROOT / RESULTS).glob("layer_*/lifelong_*.json"))


def _study_inputs() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Return the committed study's runs, causal traces and compute log."""
    from kis_lens.docs.lifelong_study import load_traces
    from kis_lens.editing.lifelong_study import load_study

    runs = load_study(ROOT / RESULTS)
    traces = load_traces(ROOT / RESULTS / "trace")
    log = ROOT / RESULTS / "compute.jsonl"
    compute = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    return runs, traces, compute


def _study_figure_links(traces: list[dict[str, Any]]) -> dict[str, str]:
    """Return each figure's PNG link relative to docs/ (the traces' PNGs, then the study's own)."""
    from kis_lens.docs.lifelong_study import STUDY_FIGURES

    names = [f"causal_trace_mlp_w{(t.get('settings') or {}).get('window')}" for t in traces] + list(STUDY_FIGURES)
    return {name: os.path.relpath(FIGURES / f"{name}.png", DOC.parent) for name in names}


def render_study() -> str:
    """Return docs/lifelong.md of the committed study."""
    from kis_lens.docs.lifelong_study import render_study_markdown

    runs, traces, compute = _study_inputs()
    return render_study_markdown(runs, traces, _study_figure_links(traces), compute, source=str(RESULTS))


def copy_study(source: Path, traces: Path, log: Path | None) -> None:
    """Add every finished run under source to the committed set, with the causal traces and the queue log's
    successful lines.

    A merge, not a replacement: a session on a fresh checkout has in results/ only the runs it finished itself. A
    source run replaces the committed run of its editor, seed and layer; the others stay."""
    from kis_lens.editing.lifelong_study import load_study
    from kis_lens.editing.study_runs import run_key
    from kis_lens.io import atomic_write, save_json

    runs = load_study(source)  # finished runs only
    target = ROOT / RESULTS
    committed = {run_key(run): run["_source"] for run in load_study(target)} if is_study() else {}
    for old in target.glob("*.html"):  # figures of the single-run doc this study replaced
        old.unlink()
    for run in runs:
        relative = Path(run.pop("_source"))
        replaced = committed.get(run_key(run))
        if replaced is not None and replaced != relative.as_posix():
            (target / replaced).unlink()
        save_json(target / relative, json.loads((Path(source) / relative).read_text(encoding="utf-8")))
    (target / "trace").mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(traces).glob("causal_trace_*.json")):
        save_json(target / "trace" / path.name, json.loads(path.read_text(encoding="utf-8")))
        if path.with_suffix(".png").is_file():
            (ROOT / FIGURES).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path.with_suffix(".png"), ROOT / FIGURES / path.with_suffix(".png").name)
    if log is not None and log.is_file():
        kept = target / "compute.jsonl"
        lines = kept.read_text(encoding="utf-8").splitlines() if kept.is_file() else []
        seen = {(entry["job"], entry["started"]) for entry in map(json.loads, lines)}
        for line in log.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if entry.get("returncode") == 0 and (entry["job"], entry["started"]) not in seen:
                seen.add((entry["job"], entry["started"]))
                lines.append(line)
        atomic_write(kept, lambda temp: temp.write_text("\n".join(lines) + "\n", encoding="utf-8"))


def write_study_figures() -> None:
    """Write the study's figures as PNG (embedded in the doc) and HTML, into docs/figures/lifelong."""
    from kis_lens.docs.lifelong_study import write_study_figures as write_figures

    runs, _, _ = _study_inputs()
    write_figures(runs, ROOT / FIGURES)


def render() -> str:
    """Return docs/lifelong.md as the committed results make it (figure links relative to docs/)."""
    from kis_lens.docs.lifelong import render_lifelong_markdown
    from kis_lens.editing.lifelong_plots import lifelong_figure_names

    if is_study():
        return render_study()
    results = committed_results()
    links = {name: os.path.relpath(RESULTS / f"{name}.html", DOC.parent) for name in lifelong_figure_names(results)}
    return render_lifelong_markdown(results, links, source=RESULTS)


def main(argv: list[str] | None = None) -> int:
    """Copy (with --from), write the figures and the doc; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", help="a lifelong run folder (layer_<L>) of `kis lifelong`")
    parser.add_argument("--stems", help="comma-separated run stems to copy (default: the newest set of runs)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the doc differs")
    parser.add_argument("--study", type=Path, help="a folder of `kis lifelong` runs (layer_<L>/ inside): a study")
    parser.add_argument("--traces", type=Path, default=Path("results/smollm2-135m/trace"), help="kis trace outputs")
    parser.add_argument("--log", type=Path, default=Path("results/lifelong_runs.jsonl"), help="the queue's log")
    args = parser.parse_args(argv)
    from kis_lens.editing.lifelong_files import load_lifelong_results
    from kis_lens.editing.lifelong_plots import write_lifelong_figures
    from kis_lens.io import atomic_write, save_json
    from kis_lens.layout import lifelong_result_files

    if args.check:
        same = (ROOT / DOC).is_file() and (ROOT / DOC).read_text(encoding="utf-8") == render()
        print("docs/lifelong.md is up to date" if same else "docs/lifelong.md differs: run benchmarks/lifelong.py")
        return 0 if same else 1
    if args.study:
        copy_study(args.study, args.traces, args.log)
    if args.study or (is_study() and not args.source):
        write_study_figures()
        text = render_study()
        atomic_write(ROOT / DOC, lambda temp: temp.write_text(text, encoding="utf-8"))
        print(f"wrote {DOC} and the figures in {FIGURES}")
        return 0
    if args.source:
        stems = args.stems.split(",") if args.stems else None
        chosen = load_lifelong_results(args.source, stems=stems)  # validates: one run per editor, no partials
        raw = {
            result["_source"]: json.loads((Path(args.source) / result["_source"]).read_text(encoding="utf-8"))
            for result in chosen.values()
        }
        unedited = next((r["settings"].get("model") for r in raw.values() if r.get("editor") == "none"), None)
        (ROOT / RESULTS).mkdir(parents=True, exist_ok=True)
        for old in lifelong_result_files(ROOT / RESULTS):
            if old.name not in raw:
                old.unlink()  # the copied set replaces the committed one (git keeps the history)
        for name, result in sorted(raw.items()):
            if unedited is not None and "interference_units" not in result["settings"]:
                # runs before that fix read the fingerprint after editing W_out; `none` read the unedited model's
                result["settings"]["model"] = unedited
            save_json(ROOT / RESULTS / name, absolute_interference(result))
    write_lifelong_figures(committed_results(), ROOT / RESULTS)
    text = render()
    atomic_write(ROOT / DOC, lambda temp: temp.write_text(text, encoding="utf-8"))
    print(f"wrote {DOC} and the figures in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
