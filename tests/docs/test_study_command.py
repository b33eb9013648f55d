"""`kis study` (kis_lens.docs.lifelong_study.write_study): a folder of finished lifelong runs becomes study.md,
study.json and the study's figures, with the verdicts study() computes; bad input fails before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from study_fixtures import make_run, nll_pairs, paired_run, write_run

from kis_lens.cli import main
from kis_lens.docs.study_sections import figure_line
from kis_lens.editing.lifelong_study import load_study, study

ROOT = Path(__file__).resolve().parents[2]
COMMITTED_TRACE = ROOT / "benchmarks" / "results" / "lifelong" / "trace" / "causal_trace_mlp_w10.json"


def _runs() -> list[dict]:
    """Return three ROME orders that collapse (with pairs) and two AlphaEdit orders."""
    rome = [make_run("rome", seed, 4, collapse=30, pairs=nll_pairs(30, seed=seed)) for seed in range(3)]
    return rome + [paired_run("alphaedit", seed, None) for seed in range(2)]


def test_kis_study_writes_the_doc_the_numbers_and_the_figures_of_the_runs_under_output_dir(tmp_path, capsys):
    runs = _runs()
    folder = tmp_path / "lifelong" / "m"
    for run in runs:
        write_run(folder, run)
    (folder / "layer_4" / "lifelong_rome_seed9_n40_layer4_0000abcd.partial.json").write_text("{}", encoding="utf-8")
    traces = tmp_path / "trace" / "m"
    traces.mkdir(parents=True)
    shutil.copyfile(COMMITTED_TRACE, traces / COMMITTED_TRACE.name)
    (traces / COMMITTED_TRACE.with_suffix(".png").name).write_bytes(b"\x89PNG")

    assert main(["study", "--output_dir", str(tmp_path), "--model_name", "m", "--bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("done in ") and f"5 runs under {folder}" in printed
    assert "rome  layer 4  collapse, 3 order(s): collapses in every order" in printed

    numbers = json.loads((folder / "study.json").read_text(encoding="utf-8"))
    expected = json.loads(json.dumps(study(load_study(folder), n_boot=50)))  # the checkpoint is no run
    assert len(expected["runs"]) == len(runs)
    assert numbers == expected
    text = (folder / "study.md").read_text(encoding="utf-8")
    assert text.startswith("# Lifelong editing on ") and "by `kis study`" in text
    assert "benchmarks/" not in text  # a user's study names no queue of this repository
    for row in expected["collapse_by_editor"] + expected["before_collapse"]["prediction_across_orders"]:
        assert f"**{row['verdict']}**" in text
    assert "![causal_trace_mlp_w10](../../trace/m/causal_trace_mlp_w10.png)" in text
    for name in ("lifelong_study", "lifelong_update_norms"):
        assert (folder / "study_figures" / f"{name}.html").is_file()
        assert f"({'study_figures/' + name}." in text


def test_kis_study_finds_the_runs_and_traces_an_older_kis_wrote_model_first(tmp_path, capsys):
    for run in _runs():
        write_run(tmp_path / "m" / "lifelong", run)  # <output_dir>/<model>/lifelong/layer_4: an older kis's layout
    (tmp_path / "m" / "trace").mkdir()
    shutil.copyfile(COMMITTED_TRACE, tmp_path / "m" / "trace" / COMMITTED_TRACE.name)
    assert main(["study", "--output_dir", str(tmp_path), "--model_name", "m", "--bootstrap", "20"]) == 0
    assert f"5 runs under {tmp_path / 'm' / 'lifelong'}" in capsys.readouterr().out
    text = (tmp_path / "m" / "lifelong" / "study.md").read_text(encoding="utf-8")
    assert "| 10 | 100 | 4 | 4 | 0.087 | 0.087 |" in text  # the committed window-10 trace's row


def test_kis_study_refuses_a_folder_without_runs_and_a_bad_bootstrap_writing_nothing(tmp_path, capsys):
    assert main(["study", "--runs", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["study", "--runs", str(tmp_path)]) == 2
    assert "no finished lifelong runs" in capsys.readouterr().err
    write_run(tmp_path, paired_run("rome", 0, 20))
    assert main(["study", "--runs", str(tmp_path), "--bootstrap", "0"]) == 2
    assert "n_boot 0 must be at least 1" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["layer_4"]  # no figure, no half a study


@pytest.mark.parametrize(
    ("path", "line"),
    [("figures/a.png", "![a](figures/a.png)"), ("figures/a.html", "[a (interactive)](figures/a.html)")],
)
def test_a_figure_is_an_image_or_a_link_to_its_interactive_page(path, line):
    assert figure_line("a", path) == line
