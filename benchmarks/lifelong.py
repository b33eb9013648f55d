"""Copy a `kis lifelong` run's results into benchmarks/results/lifelong/ and regenerate docs/lifelong.md from them.

    .venv/bin/python benchmarks/lifelong.py --from results/smollm2-135m/lifelong/layer_4
    .venv/bin/python benchmarks/lifelong.py           # re-render docs/lifelong.md from the committed JSONs
    .venv/bin/python benchmarks/lifelong.py --check   # write nothing; exit 1 when docs/lifelong.md differs

The full run behind docs/lifelong.md (every editor over all 436 CounterFact facts on SmolLM2-135M) is the command
each JSON records in settings.command; tests/test_docs_numbers.py fails when the doc is not this script's output.
"""

from __future__ import annotations

import argparse
import json
import os
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
    from kis_lens.editing.metrics import correlations
    from kis_lens.editing.sequential import INTERFERENCE_UNITS

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


def render() -> str:
    """Return docs/lifelong.md as the committed results make it (figure links relative to docs/)."""
    from kis_lens.editing.sequential_plots import lifelong_figure_names, load_lifelong_results, render_lifelong_markdown

    results = load_lifelong_results(ROOT / RESULTS)
    links = {name: os.path.relpath(RESULTS / f"{name}.html", DOC.parent) for name in lifelong_figure_names(results)}
    return render_lifelong_markdown(results, links, source=RESULTS)


def main(argv: list[str] | None = None) -> int:
    """Copy (with --from), write the figures and the doc; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", help="a lifelong run folder holding lifelong_<editor>.json")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the doc differs")
    args = parser.parse_args(argv)
    from kis_lens.editing.sequential_plots import load_lifelong_results, write_lifelong_figures
    from kis_lens.io import atomic_write, save_json

    if args.check:
        same = (ROOT / DOC).is_file() and (ROOT / DOC).read_text(encoding="utf-8") == render()
        print("docs/lifelong.md is up to date" if same else "docs/lifelong.md differs: run benchmarks/lifelong.py")
        return 0 if same else 1
    if args.source:
        (ROOT / RESULTS).mkdir(parents=True, exist_ok=True)
        raw = {
            path.name: json.loads(path.read_text(encoding="utf-8"))
            for path in Path(args.source).glob("lifelong_*.json")
        }
        unedited = raw.get("lifelong_none.json", {}).get("settings", {}).get("model")
        for name, result in sorted(raw.items()):
            if unedited is not None and "interference_units" not in result["settings"]:
                # runs before that fix read the fingerprint after editing W_out; `none` read the unedited model's
                result["settings"]["model"] = unedited
            save_json(ROOT / RESULTS / name, absolute_interference(result))
    write_lifelong_figures(load_lifelong_results(ROOT / RESULTS), ROOT / RESULTS)
    text = render()
    atomic_write(ROOT / DOC, lambda temp: temp.write_text(text, encoding="utf-8"))
    print(f"wrote {DOC} and the figures in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
