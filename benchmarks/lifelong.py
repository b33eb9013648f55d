"""Copy a `kis lifelong` run's results into benchmarks/results/lifelong/ and regenerate docs/lifelong.md from them.

    .venv/bin/python benchmarks/lifelong.py --from results/smollm2-135m/lifelong/layer_4
    .venv/bin/python benchmarks/lifelong.py           # re-render docs/lifelong.md from the committed JSONs
    .venv/bin/python benchmarks/lifelong.py --check   # write nothing; exit 1 when docs/lifelong.md differs

The full run behind docs/lifelong.md (every editor over all 436 CounterFact facts on SmolLM2-135M) is the command
each JSON records in settings.command; tests/test_docs_numbers.py fails when the doc is not this script's output.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path("benchmarks") / "results" / "lifelong"  # relative: the doc names it, whatever the checkout's path
DOC = Path("docs") / "lifelong.md"


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
    from kis_lens.io import atomic_write

    if args.check:
        same = (ROOT / DOC).is_file() and (ROOT / DOC).read_text(encoding="utf-8") == render()
        print("docs/lifelong.md is up to date" if same else "docs/lifelong.md differs: run benchmarks/lifelong.py")
        return 0 if same else 1
    if args.source:
        (ROOT / RESULTS).mkdir(parents=True, exist_ok=True)
        for path in sorted(Path(args.source).glob("lifelong_*.json")):
            shutil.copyfile(path, ROOT / RESULTS / path.name)
    write_lifelong_figures(load_lifelong_results(ROOT / RESULTS), ROOT / RESULTS)
    text = render()
    atomic_write(ROOT / DOC, lambda temp: temp.write_text(text, encoding="utf-8"))
    print(f"wrote {DOC} and the figures in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
