"""The original scripts' files and fact choice, unchanged: their exact .npy paths, model folders and first-N facts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kis_lens.blocks import block_of
from kis_lens.cli import build_parser, main
from kis_lens.cli_stats import cache_cov_config
from kis_lens.config import CacheCovConfig, CacheOptions, RunConfig
from kis_lens.errors import KisError
from kis_lens.facts import load_facts
from kis_lens.layout import LEGACY_DIRS, original_npy_path
from kis_lens.results import RunResult, load_result, original_model_folder, save_result
from kis_lens.runner import select_facts

MATRICES = ("p_matrix", "q_matrix", "whitening_cos", "activation_cos")
TINY = ["--model_name", "tiny-gpt2", "--record_size", "6", "--max_tokens", "2000", "--no_progress", "--device", "cpu"]


def original_files(root: Path, model_folder: str, tag: str, layers: tuple[int, ...]) -> set[Path]:
    """Return the original scripts' paths of the four matrices for some layers, spelled out."""
    files = set()
    for layer in layers:
        files |= {
            root / "p_matrix" / model_folder / tag / f"layer_{layer}_subject_last_p_matrix.npy",
            root / "q_matrix" / model_folder / tag / f"layer_{layer}_subject_last_q_matrix.npy",
            root / "whitening_cos_matrix" / model_folder / tag / f"layer_{layer}_subject_last_cos_matrix.npy",
            root / "activation_cos_matrix" / model_folder / tag / f"layer_{layer}_subject_last_cos_matrix.npy",
        }
    return files


@pytest.mark.slow
def test_default_layout_writes_the_original_paths(tmp_path):
    out = tmp_path / "tmp"
    assert main(["all", *TINY, "--knowledge_type", "all", "--output_dir", str(out)]) == 0
    expected = {
        out / "p_matrix/tiny-gpt2/all_sample_size_6/layer_0_subject_last_p_matrix.npy",
        out / "p_matrix/tiny-gpt2/all_sample_size_6/layer_1_subject_last_p_matrix.npy",
        out / "q_matrix/tiny-gpt2/all_sample_size_6/layer_0_subject_last_q_matrix.npy",
        out / "q_matrix/tiny-gpt2/all_sample_size_6/layer_1_subject_last_q_matrix.npy",
        out / "whitening_cos_matrix/tiny-gpt2/all_sample_size_6/layer_0_subject_last_cos_matrix.npy",
        out / "whitening_cos_matrix/tiny-gpt2/all_sample_size_6/layer_1_subject_last_cos_matrix.npy",
        out / "activation_cos_matrix/tiny-gpt2/all_sample_size_6/layer_0_subject_last_cos_matrix.npy",
        out / "activation_cos_matrix/tiny-gpt2/all_sample_size_6/layer_1_subject_last_cos_matrix.npy",
    }
    assert set(out.rglob("*.npy")) == expected == original_files(out, "tiny-gpt2", "all_sample_size_6", (0, 1))
    result = load_result(out / "runs/tiny-gpt2/all_sample_size_6/subject_last")
    for name in MATRICES:
        for layer in (0, 1):
            path = original_npy_path(out, name, original_model_folder("tiny-gpt2"), "all", 6, layer)
            np.testing.assert_allclose(np.load(path), result.layer(name, layer).numpy(), rtol=1e-6)
    assert result.settings["config"]["layout"] == "kis" and result.settings["config"]["fact_order"] == "sample"


@pytest.mark.slow
def test_original_layout_mix_first_facts_and_stats_dir(tmp_path):
    data, stats = tmp_path / "data", tmp_path / "cov"
    args = ["all", *TINY, "--knowledge_type", "mix", "--output_dir", str(data), "--layout", "original"]
    args += ["--fact_token", "last", "--fact_order", "first", "--stats_dir", str(stats)]
    assert main(args) == 0
    # The original names every file subject_last, whatever --fact_token was; mix keeps its own folder name.
    assert set(data.rglob("*.npy")) == original_files(data, "tiny-gpt2", "mix_sample_size_6", (0, 1))
    for layer in (0, 1):
        assert (stats / "tiny-gpt2" / "wikipedia-offline_stats" / f"layer_{layer}_mom2.safetensors").is_file()
    assert not (data / "stats").exists()
    result = load_result(data / "runs/tiny-gpt2/mix_sample_size_6/last")  # kis's own results keep the real position
    config = result.settings["config"]
    assert (config["knowledge_type"], config["fact_order"], config["layout"]) == ("mix", "first", "original")
    assert (config["token_position"], config["stats_dir"]) == ("last", str(stats))
    assert [fact.case_id for fact in result.facts] == [fact.case_id for fact in load_facts()[:6]]
    assert all(Path(held["path"]).is_relative_to(stats) for held in result.settings["covariance"].values())


@pytest.mark.parametrize(
    "given, folder",
    [
        ("EleutherAI/pythia-1b", "EleutherAI/pythia-1b"),  # the original's name: nests two folders
        ("pythia-1b", "EleutherAI/pythia-1b"),  # kis alias -> the original's spelling
        ("gpt2-small", "gpt2-small"),  # the original's alias stays
        ("gpt2", "gpt2-small"),
        ("llama2-7b", "meta-llama/Llama-2-7b-hf"),
        ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf"),
        ("llama3.1-8b", "meta-llama/Meta-Llama-3.1-8B"),  # renamed on the hub since
        ("Qwen/Qwen2-0.5B", "Qwen/Qwen2-0.5B"),  # another hub name nests as given
        ("tiny-gpt2", "tiny-gpt2"),
        ("smollm2-135m", "smollm2-135m"),
    ],
)
def test_original_model_folder(given, folder):
    assert original_model_folder(given) == folder


def test_original_model_folder_of_a_local_directory(tmp_path):
    local = tmp_path / "models" / "my-model"
    local.mkdir(parents=True)
    assert original_model_folder(str(local)) == "my-model"


def test_original_paths_of_a_hub_model():
    root = Path("data")
    assert {
        original_npy_path(root, name, original_model_folder("EleutherAI/pythia-1b"), "known", 128, layer)
        for name in MATRICES
        for layer in (3, 15)
    } == {
        Path("data/p_matrix/EleutherAI/pythia-1b/known_sample_size_128/layer_3_subject_last_p_matrix.npy"),
        Path("data/q_matrix/EleutherAI/pythia-1b/known_sample_size_128/layer_3_subject_last_q_matrix.npy"),
        Path(
            "data/whitening_cos_matrix/EleutherAI/pythia-1b/known_sample_size_128/layer_3_subject_last_cos_matrix.npy"
        ),
        Path(
            "data/activation_cos_matrix/EleutherAI/pythia-1b/known_sample_size_128/layer_3_subject_last_cos_matrix.npy"
        ),
        Path("data/p_matrix/EleutherAI/pythia-1b/known_sample_size_128/layer_15_subject_last_p_matrix.npy"),
        Path("data/q_matrix/EleutherAI/pythia-1b/known_sample_size_128/layer_15_subject_last_q_matrix.npy"),
        Path(
            "data/whitening_cos_matrix/EleutherAI/pythia-1b/known_sample_size_128/layer_15_subject_last_cos_matrix.npy"
        ),
        Path(
            "data/activation_cos_matrix/EleutherAI/pythia-1b/known_sample_size_128/layer_15_subject_last_cos_matrix.npy"
        ),
    }


@pytest.mark.parametrize("layout", ["kis", "original"])
def test_save_result_of_a_hub_model_in_each_layout(tmp_path, layout):
    facts = load_facts()[:3]
    result = RunResult({name: torch.rand(1, 3, 3) for name in MATRICES}, [5], facts, {"model": {"name": "pythia-1b"}})
    config = RunConfig(
        model_name="EleutherAI/pythia-1b",
        knowledge_type="known",
        token_position="last",
        layout=layout,
        output_dir=str(tmp_path),
    )
    path = save_result(result, config)
    assert path == tmp_path / "runs/pythia-1b/known_sample_size_3/last/results.safetensors"  # kis's own: unchanged
    if layout == "original":
        expected = original_files(tmp_path, "EleutherAI/pythia-1b", "known_sample_size_3", (5,))
    else:
        expected = {
            tmp_path / "p_matrix/pythia-1b/known_sample_size_3/layer_5_last_p_matrix.npy",
            tmp_path / "q_matrix/pythia-1b/known_sample_size_3/layer_5_last_q_matrix.npy",
            tmp_path / "whitening_cos_matrix/pythia-1b/known_sample_size_3/layer_5_last_cos_matrix.npy",
            tmp_path / "activation_cos_matrix/pythia-1b/known_sample_size_3/layer_5_last_cos_matrix.npy",
        }
    assert set(tmp_path.rglob("*.npy")) == expected
    for name in MATRICES:
        (npy,) = [path for path in expected if path.relative_to(tmp_path).parts[0] == LEGACY_DIRS[name]]
        np.testing.assert_allclose(np.load(npy), result.matrices[name][0].numpy())


@pytest.mark.parametrize("facts", ["counterfact-known", "known-1000"])
def test_first_fact_order_takes_the_files_first_facts_in_order(facts):
    chosen = select_facts(RunConfig(facts=facts, knowledge_type="all", fact_order="first", record_size=7))
    assert chosen == load_facts(facts)[:7]
    sampled = select_facts(RunConfig(facts=facts, knowledge_type="all", record_size=7))
    assert sampled != chosen  # kis's default stays the seeded sample


def test_first_fact_order_of_a_jsonl_file(tmp_path):
    path = tmp_path / "facts.jsonl"
    records = [
        f'{{"known_id": {index}, "subject": "S{index}", "template": "{{}} lives in", "attribute": "T{index}"}}'
        for index in (9, 2, 7, 4)
    ]
    path.write_text("\n".join(records))
    chosen = select_facts(RunConfig(facts=str(path), knowledge_type="mix", fact_order="first", record_size=3))
    assert [fact.subject for fact in chosen] == ["S9", "S2", "S7"]
    with pytest.raises(KisError, match="record_size 5 is larger than the 4 facts available"):
        select_facts(RunConfig(facts=str(path), knowledge_type="all", fact_order="first", record_size=5))


def test_mix_is_every_fact_like_all():
    for order in ("sample", "first"):
        mix = select_facts(RunConfig(knowledge_type="mix", fact_order=order, record_size=20))
        assert mix == select_facts(RunConfig(knowledge_type="all", fact_order=order, record_size=20))


# --- Cache_Cov.py's command line, pasted after `kis cache-cov`: parsed only (no model, no Wikipedia stream). ---

PASTED_CACHE_COV = "--model_name gpt2-small --dataset wikipedia --to_collect mom2 --sample_size all --batch_tokens any"


def cache_cov(tokens: list[str]) -> CacheCovConfig:
    """Return the CacheCovConfig `kis cache-cov` builds from these flags."""
    return cache_cov_config(build_parser().parse_args(["cache-cov", *tokens]))


def test_pasted_cache_cov_command_parses_to_the_same_job():
    config = cache_cov([*PASTED_CACHE_COV.split(), "--precision", "float32"])
    # --sample_size all: every text and, with no --max_tokens, every token of them (the whole corpus, as there).
    assert config == CacheCovConfig(
        model_name="gpt2-small", dtype="float32", corpus="wikipedia", sample_size=None, max_tokens=None
    )
    assert config.batch_token is None  # any: kis's default, n_ctx
    assert block_of(config, CacheOptions) == CacheOptions(
        model_name="gpt2-small", dtype="float32", corpus="wikipedia", sample_size=None, max_tokens=None
    )
    spelled = cache_cov(
        ["--model-name=gpt2-small", "--dataset=wikipedia", "--to-collect=mom2", "--sample-size=all"]
        + ["--batch_tokens=any", "--precision=float32"]
    )
    assert spelled == config


def test_cache_cov_numbers_stay_numbers():
    config = cache_cov(["--dataset", "wikipedia", "--sample_size", "5000", "--batch_tokens", "2048"])
    assert (config.corpus, config.sample_size, config.batch_token, config.max_tokens) == ("wikipedia", 5000, 2048, None)
    budget = cache_cov(["--sample_size", "all", "--max_tokens", "300000"])
    assert (budget.sample_size, budget.max_tokens) == (None, 300_000)  # a given --max_tokens stays
    assert cache_cov(["--batch_token", "any"]).batch_token is None  # kis's own spelling takes the word too
    assert cache_cov([]) == CacheCovConfig()  # nothing given: kis's defaults, the 100,000-token budget included


def test_the_corpus_flag_wins_over_dataset():
    for tokens in (["--corpus", "my.txt", "--dataset", "wikipedia"], ["--dataset", "wikipedia", "--corpus", "my.txt"]):
        assert cache_cov(tokens).corpus == "my.txt"
    assert cache_cov(["--dataset", "wikipedia", "--download", "0"]).corpus == "wikipedia"


@pytest.mark.parametrize(
    "tokens, message",
    [
        (
            ["--dataset", "wikitext"],
            "--dataset 'wikitext' is not accepted: use wikipedia (= --corpus wikipedia), or give --corpus directly",
        ),
        (["--to_collect", "mean"], "--to_collect 'mean' is not accepted: kis collects only mom2 (the uncentered"),
        (["--to_collect", "mom2,mean"], "kis collects only mom2 (the uncentered second moment)"),
    ],
)
def test_bad_cache_cov_value_is_a_clear_error(tokens, message, capsys):
    assert main(["cache-cov", *PASTED_CACHE_COV.split()[:2], *tokens]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kis: error: ") and message in err and "Traceback" not in err, err
    with pytest.raises(KisError, match="is not accepted"):
        build_parser().parse_args(["cache-cov", *tokens])


@pytest.mark.parametrize(
    "tokens, message",
    [
        (["--sample_size", "some"], "argument --sample_size/--sample-size: invalid value 'some': give a number or all"),
        (["--batch_tokens", "many"], "invalid value 'many': give a number or any"),
    ],
)
def test_bad_number_word_exits_2(tokens, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["cache-cov", *tokens])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cache_cov_help_lists_the_original_flags(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        main(["cache-cov", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for flag in ("--dataset {wikipedia}", "--to_collect {mom2}", "--batch_tokens", "--precision", "--download"):
        assert flag in help_text, flag
    assert "--sample_size SAMPLE_SIZE" in help_text and "(default all = every text)" in help_text
    assert "(default any = n_ctx)" in help_text
    assert "kis collects" in help_text and "= --corpus wikipedia" in help_text
