"""The numbers the docs quote are benchmarks/render.py's output for the committed JSONs, never typed by hand."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@pytest.fixture(scope="module")
def render():
    spec = importlib.util.spec_from_file_location("kis_benchmarks_render", ROOT / "benchmarks" / "render.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_readme_benchmarks_block_is_renders_output(render):
    _, block, _ = render.split_readme((ROOT / "README.md").read_text(encoding="utf-8"))
    assert block == render.readme_block(RESULTS), "README's benchmarks block was edited: run benchmarks/render.py"


def test_readme_quotes_every_benchmark_json(render):
    block = render.readme_block(RESULTS)
    assert "N² + 2N forwards per layer" in block  # the original's work, as Compute_PMatrix.py does it
    assert block.count("`benchmarks/matrices.py`") == len(list(RESULTS.glob("matrices_*.json")))
    assert "`benchmarks/covariance.py`" in block and "`kis reproduce" in block


@pytest.mark.parametrize("name", sorted(path.name for path in RESULTS.glob("*.md")))
def test_markdown_beside_each_json_is_renders_output(render, name):
    wanted = render.markdown_files(RESULTS)
    assert (RESULTS / name) in wanted, f"{name} has no JSON that render.py reads"
    assert (RESULTS / name).read_text(encoding="utf-8") == wanted[RESULTS / name], f"{name} was edited: run render.py"


def test_check_flags_a_hand_edited_number(render, tmp_path, capsys):
    readme = tmp_path / "README.md"
    text = render.rendered_readme((ROOT / "README.md").read_text(encoding="utf-8"), RESULTS)
    readme.write_text(text, encoding="utf-8")
    results = tmp_path / "results"
    results.mkdir()
    for path in RESULTS.glob("*.json"):
        (results / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    assert render.main(["--results_dir", str(results), "--readme", str(readme)]) == 0  # writes the .md files
    assert render.main(["--check", "--results_dir", str(results), "--readme", str(readme)]) == 0
    seconds = json.loads(next(RESULTS.glob("reproduction_*.json")).read_text(encoding="utf-8"))["seconds"]["total"]
    quoted = f"{seconds:,.0f} s"
    assert quoted in text
    readme.write_text(text.replace(quoted, "1,000 s"), encoding="utf-8")
    assert render.main(["--check", "--results_dir", str(results), "--readme", str(readme)]) == 1
    assert "README.md" in capsys.readouterr().out


def test_new_matrices_rows_render_the_counted_forwards(render):
    report = json.loads(next(RESULTS.glob("matrices_*.json")).read_text(encoding="utf-8"))
    report["rows"] = [
        dict(
            n_facts=n,
            kis_all_layers_s=1.0,
            kis_one_layer_s=0.1,
            original_one_layer_s=t,
            original_all_layers_s=30 * t,
            original_extrapolated=extrapolated,
            original_timed_s=timed,
            forwards_per_layer=n * n + 2 * n,
            inversions_per_layer=1,
            inverse_products_per_layer=n,
            forwards_run=run,
            entries_run=entries,
            inverse_s=0.5,
            max_abs_diff=4e-7,
            speedup_all_layers=30 * t,
            speedup_one_layer=10 * t,
        )
        for n, t, extrapolated, timed, run, entries in [(2, 1.3, False, 1.3, 8, 4), (8, 10.5, True, 5.5, 50, 40)]
    ]
    text = render.matrices_markdown(report)
    assert "| 2 | 1.000 | 39.0 | 39× |" in text and "| 80 (counted) | 50 |" in text and "earlier reference" not in text
    row = render.matrices_readme_row(report)
    assert "N² + 2N" in row and "315× (N = 8; original extrapolated from 50 timed forwards at 0.10 s each" in row


def test_lifelong_doc_is_generated_from_the_committed_results():
    """docs/lifelong.md is benchmarks/lifelong.py's rendering of benchmarks/results/lifelong/*.json."""
    spec = importlib.util.spec_from_file_location("kis_benchmarks_lifelong", ROOT / "benchmarks" / "lifelong.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    doc = ROOT / "docs" / "lifelong.md"
    assert doc.read_text(encoding="utf-8") == module.render(), "docs/lifelong.md was edited: run benchmarks/lifelong.py"
