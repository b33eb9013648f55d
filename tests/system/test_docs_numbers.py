"""The numbers the docs quote are benchmarks/render.py's output for the committed JSONs, never typed by hand."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
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


@pytest.mark.slow  # renders the whole study (~18 s)
def test_lifelong_doc_is_generated_from_the_committed_results():
    """docs/lifelong.md is benchmarks/lifelong.py's rendering of benchmarks/results/lifelong/*.json."""
    spec = importlib.util.spec_from_file_location("kis_benchmarks_lifelong", ROOT / "benchmarks" / "lifelong.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    doc = ROOT / "docs" / "lifelong.md"
    assert doc.read_text(encoding="utf-8") == module.render(), "docs/lifelong.md was edited: run benchmarks/lifelong.py"


def lifelong_rows(block: str) -> list[str]:
    return [line for line in block.splitlines() if "(docs/lifelong.md)" in line]


def test_readme_names_the_lifelong_runs_as_lifelong_files_does(render):
    """render.py reads the lifelong JSONs without kis_lens (no torch): its names must be lifelong_files'."""
    from kis_lens.editing import lifelong_files as sp
    from kis_lens.editing.registry import EDITORS

    assert render.LIFELONG_LEGACY == sp.LEGACY_EDITORS
    assert set(EDITORS) <= set(render.LIFELONG_ORDER)
    assert sorted(render.LIFELONG_ORDER, key=sp._order_key) == list(render.LIFELONG_ORDER)
    folder = RESULTS / "lifelong"
    if any(folder.glob("layer_*/lifelong_*.json")):  # a study: several orders and layers
        from kis_lens.editing.lifelong_study import load_study

        runs = [(run["settings"]["identity"]["editor"], {**run, "_legacy": False}) for run in load_study(folder)]
    else:
        runs = list(sp.load_lifelong_results(folder).items())
    assert runs, "no committed lifelong results"
    for editor, result in runs:
        path = folder / result["_source"]
        named = render.lifelong_run(render.load(path), path)
        assert named == (editor, sp.editor_label(editor, result), result["_legacy"])
    rows = lifelong_rows(render.readme_block(RESULTS))
    labels = [row.split(":")[0].removeprefix("| ") for row in rows]
    assert sorted(labels) == sorted(sp.editor_label(editor, result) for editor, result in runs)


def test_legacy_lifelong_runs_are_marked_superseded_in_readme_and_doc():
    """The committed runs are an older kis's (its "rome" was p-ROME): nothing may quote them as ROME/MEMIT/AlphaEdit."""
    from kis_lens.editing import lifelong_files as sp

    if any((RESULTS / "lifelong").glob("layer_*/lifelong_*.json")):
        pytest.skip("the committed lifelong runs are a study of the current editors")
    results = sp.load_lifelong_results(RESULTS / "lifelong")
    if not sp.any_legacy(results):
        pytest.skip("the committed lifelong runs are no longer legacy")
    block = (ROOT / "README.md").read_text(encoding="utf-8").partition("<!-- benchmarks:begin -->")[2]
    rows = lifelong_rows(block)
    assert len(rows) == len(results) and all("superseded" in row for row in rows)
    assert not any(row.startswith("| `kis lifelong --editor") for row in rows)
    doc = (ROOT / "docs" / "lifelong.md").read_text(encoding="utf-8")
    title, banner = doc.split("\n\n")[:2]
    assert title.endswith("(superseded)") and banner.startswith("> **Superseded.**")
    assert "p-ROME" in banner and "`emmet`" in banner and "AlphaEdit-legacy" in banner
    assert "kis lifelong --editors rome,r-rome,p-rome,memit,alphaedit,none" in banner
    verdicts = [line for line in doc.split("## Verdicts")[1].splitlines() if line.startswith("| ") and "**" in line]
    assert verdicts and all(", superseded**" in line for line in verdicts)
    assert "Sequential ROME edits" not in doc and "| ROME |" not in doc and "| MEMIT |" not in doc
    assert "/work/" not in doc and "/home/" not in doc  # no machine paths


def test_readme_lifelong_rows_skip_checkpoints(render, tmp_path):
    folder = tmp_path / "lifelong"
    folder.mkdir()
    for path in (RESULTS / "lifelong").glob("layer_4/lifelong_none_seed0_*.json"):
        (folder / "layer_4").mkdir()
        (folder / "layer_4" / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "layer_4" / "lifelong_rome_seed0_n4_layer4_0123abcd.partial.json").write_text("{}", encoding="utf-8")
    rows = render.lifelong_readme_rows(folder)
    assert len(rows) == 1 and rows[0].startswith("| no edit: `kis lifelong --editors none`, seed 0")


def test_readme_lifelong_rows_label_a_run_timed_beside_another_lane(render, tmp_path):
    """A run's minutes are labelled concurrent where the study's compute log says another lane ran beside it."""
    folder = tmp_path / "lifelong"
    (source,) = (RESULTS / "lifelong").glob("layer_4/lifelong_rome_seed0_*.json")
    (folder / "layer_4").mkdir(parents=True)
    (folder / "layer_4" / source.name).write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    (alone,) = render.lifelong_readme_rows(folder)
    assert "concurrent" not in alone and " min on 1 thread(s), " in alone
    entry = {"job": "rome-seed0-layer4", "lanes_beside": 1, "returncode": 0, "wall_seconds": 1.0}
    failed = {**entry, "job": "rome-seed1-layer4", "returncode": 1}
    (folder / "compute.jsonl").write_text(json.dumps(entry) + "\n" + json.dumps(failed) + "\n", encoding="utf-8")
    (beside,) = render.lifelong_readme_rows(folder)
    assert " min on 1 thread(s), concurrent (1 other lane beside), " in beside


WALL_TIME = "- Wall time: "


def _without_wall_time(lines: list[str]) -> tuple[list[str], list[str]]:
    """Return the lines but the wall-time one, and that line's steps sorted (the numbers file sorts its keys)."""
    wall = next(line for line in lines if line.startswith(WALL_TIME)).removeprefix(WALL_TIME)
    rest = [line for line in lines if not line.startswith(WALL_TIME)]
    return rest, sorted(wall.partition(". The covariance")[0].split(", "))


def test_reproduction_doc_and_verdicts_are_rendered_from_the_committed_numbers():
    """docs/reproduction.md and its verdicts are docs.reproduction's reading of the JSON the document names.

    Only the wall-time line may list its steps in another order: the document lists them as they ran.
    """
    from kis_lens.docs.reproduction import Reproduction, judge, reproduction_markdown

    doc = (ROOT / "docs" / "reproduction.md").read_text(encoding="utf-8")
    path = ROOT / re.search(r"from `(benchmarks/results/reproduction_[^`]+\.json)`", doc).group(1)
    record = json.loads(path.read_text(encoding="utf-8"))
    report = Reproduction.from_dict(record)
    assert [verdict.to_dict() for verdict in judge(report)] == record["verdicts"]
    assert json.dumps(report.to_dict(), indent=2, sort_keys=True) == path.read_text(encoding="utf-8")
    assert _without_wall_time(doc.splitlines()) == _without_wall_time(reproduction_markdown(report).splitlines()), (
        "docs/reproduction.md was edited, or the JSON it names was: rerun `kis reproduce`"
    )
