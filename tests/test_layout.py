"""kis_lens.layout: every path convention spelled out, so a change to where results live is a decision, not a slip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kis_lens import layout
from kis_lens.errors import KisError


def test_every_path_spelled_out():
    out = Path("out")
    assert layout.stats_path(out, "gpt2", "wikipedia", 3) == out / "stats/gpt2/wikipedia_stats/layer_3_mom2.safetensors"
    assert layout.stats_dir(out, "gpt2", "wikipedia", root="cov") == Path("cov/gpt2/wikipedia_stats")
    assert layout.checkpoints_dir(layout.stats_dir(out, "gpt2", "c")) == out / "stats/gpt2/c_stats/checkpoints"
    assert layout.stats_path(out, "gpt2", layout.part_cache_name("c", "q1", 40, 95), 0) == (
        out / "stats/gpt2/c_q1_texts40-95_stats/layer_0_mom2.safetensors"
    )
    run = layout.run_dir(out, "gpt2", "known", 128, "subject_last")
    assert run == out / "runs/gpt2/known_sample_size_128/subject_last"
    assert layout.report_path(run / layout.RESULTS_FILE) == run / "report.html"
    assert layout.summary_csv_path(run / "report.html") == run / "layer_summary.csv"
    assert layout.run_of_results_file(run / layout.RESULTS_FILE) == (
        out,
        "gpt2",
        "known_sample_size_128",
        "subject_last",
    )
    assert layout.run_of_results_file(Path("elsewhere/results.safetensors")) is None
    assert layout.original_npy_path(out, "whitening_cos", "EleutherAI/pythia-1b", "mix", 6, 2) == (
        out / "whitening_cos_matrix/EleutherAI/pythia-1b/mix_sample_size_6/layer_2_subject_last_cos_matrix.npy"
    )
    assert layout.legacy_npy_path(out, "p_matrix", "gpt2", "all", 6, 0, "last") == (
        out / "p_matrix/gpt2/all_sample_size_6/layer_0_last_p_matrix.npy"
    )
    assert layout.split_path(out, "gpt2", "data/known-1000.json") == out / "knowledge/gpt2/known-1000_split.json"
    assert layout.trace_path(out, "gpt2", "mlp", 10) == out / "trace/gpt2/causal_trace_mlp_w10.json"
    assert layout.trace_dir(out, "gpt2") == out / "trace/gpt2"  # what `kis study` reads by default
    assert layout.legacy_trace_dir(out, "gpt2") == out / "gpt2/trace"  # where an older kis wrote them
    assert layout.edit_sim_dir(out, "gpt2", 4, 20) == out / "edit_sim/gpt2/layer_4_n20"
    assert layout.lifelong_dir(out, "gpt2", 4) == out / "lifelong/gpt2/layer_4"
    assert layout.lifelong_study_dir(out, "gpt2") == out / "lifelong/gpt2"  # every layer's runs: a study
    assert layout.legacy_lifelong_dir(out, "gpt2", 4) == out / "gpt2/lifelong/layer_4"
    assert layout.reproduction_paths("out", "gpt2") == (
        Path("out/reproduction/gpt2/reproduction.md"),
        Path("out/reproduction/gpt2/figures"),
        Path("out/reproduction/gpt2/reproduction_gpt2.json"),
    )
    assert layout.reproduction_paths("out", "gpt2", docs_dir=".") == (
        Path("docs/reproduction.md"),
        Path("docs/figures/reproduction"),
        Path("benchmarks/results/reproduction_gpt2.json"),
    )
    assert layout.reproduction_paths("out", "gpt2", ".", numbers_path="n.json")[2] == Path("n.json")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b"])
def test_a_name_that_is_no_folder_is_refused(name):
    with pytest.raises(KisError, match="cannot name a folder"):
        layout.stats_dir("out", name, "wikipedia")


def test_finders_see_only_finished_results(tmp_path):
    (layout.stats_dir(tmp_path, "m", "c") / "layer_1_mom2.safetensors").parent.mkdir(parents=True)
    for layer in (1, 0):
        layout.stats_path(tmp_path, "m", "c", layer).touch()
    assert [p.name for p in layout.stats_files(layout.stats_dir(tmp_path, "m", "c"))] == [
        "layer_0_mom2.safetensors",
        "layer_1_mom2.safetensors",
    ]
    for layer in (2, 10):
        folder = layout.edit_sim_dir(tmp_path, "m", layer, 5)
        folder.mkdir(parents=True)
        (folder / layout.EDIT_SIM_FILE).touch()
    assert [p.parent.name for p in layout.find_edit_sims(tmp_path, "m")] == ["layer_10_n5", "layer_2_n5"]
    for layer, name in ((10, "lifelong_rome_ab.json"), (2, "lifelong_rome_cd.json"), (3, "lifelong_x.partial.json")):
        layout.lifelong_dir(tmp_path, "m", layer).mkdir(parents=True)
        (layout.lifelong_dir(tmp_path, "m", layer) / name).touch()
    assert [p.name for p in layout.find_lifelong_folders(tmp_path, "m")] == ["layer_2", "layer_10"]  # by layer
    assert layout.lifelong_result_files(layout.lifelong_dir(tmp_path, "m", 3)) == []  # a checkpoint only


def test_results_of_the_older_model_first_layout_are_read_in_place_and_moved_before_a_write(tmp_path, capsys):
    """Lifelong runs and traces an older kis wrote at <model>/lifelong/ and <model>/trace/ are found where they are;
    a job about to write moves the one folder it writes into (a checkpoint with it) in one rename, saying so, and
    leaves a folder the new layout already holds where it is."""
    for layer in (2, 5):
        old = layout.legacy_lifelong_dir(tmp_path, "m", layer)
        old.mkdir(parents=True)
        (old / f"lifelong_rome_l{layer}.json").touch()
    (layout.legacy_lifelong_dir(tmp_path, "m", 2) / "lifelong_x.partial.json").touch()
    layout.lifelong_dir(tmp_path, "m", 5).mkdir(parents=True)
    (layout.lifelong_dir(tmp_path, "m", 5) / "lifelong_memit_new.json").touch()
    found = layout.find_lifelong_folders(tmp_path, "m")
    assert found == [
        layout.legacy_lifelong_dir(tmp_path, "m", 2),
        layout.lifelong_dir(tmp_path, "m", 5),  # the kind-first folder of a layer first
        layout.legacy_lifelong_dir(tmp_path, "m", 5),
    ]
    assert capsys.readouterr().out == ""  # reading moves nothing

    folder = layout.writable_lifelong_dir(tmp_path, "m", 2)
    assert folder == layout.lifelong_dir(tmp_path, "m", 2)
    assert sorted(p.name for p in folder.iterdir()) == ["lifelong_rome_l2.json", "lifelong_x.partial.json"]
    assert not layout.legacy_lifelong_dir(tmp_path, "m", 2).exists()
    assert capsys.readouterr().out.count("moved") == 1
    assert layout.writable_lifelong_dir(tmp_path, "m", 5) == layout.lifelong_dir(tmp_path, "m", 5)
    assert "kept" in capsys.readouterr().out  # both layouts hold layer 5: nothing merged, both still read
    assert (layout.legacy_lifelong_dir(tmp_path, "m", 5) / "lifelong_rome_l5.json").is_file()
    assert len(layout.find_lifelong_folders(tmp_path, "m")) == 3
    assert layout.writable_lifelong_dir(tmp_path, "m", 7) == layout.lifelong_dir(tmp_path, "m", 7)  # nothing older
    assert capsys.readouterr().out == ""

    old_trace = layout.legacy_trace_dir(tmp_path, "t") / "causal_trace_mlp_w10.json"
    old_trace.parent.mkdir(parents=True)
    old_trace.touch()
    path = layout.writable_trace_path(tmp_path, "t", "mlp", 5)
    assert path == layout.trace_path(tmp_path, "t", "mlp", 5) and (path.parent / old_trace.name).is_file()
    assert not (tmp_path / "t").exists()  # the emptied model-first folder goes too
    assert capsys.readouterr().out.count("moved") == 1


def test_find_results_of_an_output_dir(tmp_path):
    with pytest.raises(KisError, match="run `kis all` first"):
        layout.find_results(tmp_path)
    first = layout.run_dir(tmp_path, "m", "all", 6, "last") / layout.RESULTS_FILE
    first.parent.mkdir(parents=True)
    first.touch()
    assert layout.find_results(tmp_path) == first == layout.find_results(first.parent) == layout.find_results(first)
    second = layout.run_dir(tmp_path, "m", "known", 6, "last") / layout.RESULTS_FILE
    second.parent.mkdir(parents=True)
    second.touch()
    with pytest.raises(KisError, match="holds 2 runs"):
        layout.find_results(tmp_path)


def test_belongs_to_run_is_the_model_and_the_fields_asked_for():
    run = {"model": {"name": "m"}, "config": {"facts": "f.json", "corpus": "c"}}
    simulation = {"model": {"name": "m"}, "config": {"facts": "f.json", "corpus": "c"}}
    assert layout.belongs_to_run(simulation, run, layout.EDIT_SIM_RUN_FIELDS)
    other_corpus = {"model": {"name": "m"}, "config": {"facts": "f.json", "corpus": "d"}}
    assert layout.belongs_to_run(other_corpus, run) and not layout.belongs_to_run(
        other_corpus, run, layout.EDIT_SIM_RUN_FIELDS
    )
    assert not layout.belongs_to_run({"model": {"name": "m"}, "config": {}}, run, layout.EDIT_SIM_RUN_FIELDS)
    assert not layout.belongs_to_run({"model": {"name": "other"}}, run)


def test_latest_results_is_the_newest_run_and_none_is_an_error_naming_the_fix(tmp_path):
    with pytest.raises(KisError, match="run `kis all` first"):
        layout.latest_results(tmp_path)
    older = layout.run_dir(tmp_path, "m", "all", 8, "subject_last") / "results.safetensors"
    newer = layout.run_dir(tmp_path, "m", "known", 4, "subject_last") / "results.safetensors"
    for path, seconds in ((older, 2_000_000_000), (newer, 2_000_000_100)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (seconds, seconds))
    assert layout.latest_results(tmp_path) == newer
    os.utime(older, (2_000_000_200, 2_000_000_200))
    assert layout.latest_results(tmp_path) == older


def test_study_folders_prefer_this_kis_layout_and_fall_back_to_an_older_ones(tmp_path):
    assert layout.study_folders(tmp_path, "m") == (tmp_path / "lifelong/m", tmp_path / "trace/m")  # neither exists
    (tmp_path / "m/lifelong").mkdir(parents=True)
    (tmp_path / "m/trace").mkdir(parents=True)
    assert layout.study_folders(tmp_path, "m") == (tmp_path / "m/lifelong", tmp_path / "m/trace")
    (tmp_path / "lifelong/m").mkdir(parents=True)
    (tmp_path / "trace/m").mkdir(parents=True)
    assert layout.study_folders(tmp_path, "m") == (tmp_path / "lifelong/m", tmp_path / "trace/m")
