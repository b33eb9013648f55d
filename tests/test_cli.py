"""The `kis` CLI end to end on tiny models in a temp dir: documented files, cache reuse, clear errors."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from kis_lens.cli import main
from kis_lens.runner import load_result

MATRIX_DIRS = ("p_matrix", "q_matrix", "whitening_cos_matrix", "activation_cos_matrix")
CORPUS_ARGS = ["--max_tokens", "1500", "--no_progress", "--device", "cpu"]
TINY_RUN = ["--knowledge_type", "all", "--record_size", "8", *CORPUS_ARGS]


def test_all_writes_the_documented_files(tmp_path, capsys):
    assert main(["all", "--model_name", "tiny-gpt2", "--output_dir", str(tmp_path), *TINY_RUN]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "tiny-gpt2" / "all_sample_size_8" / "subject_last" / "results.safetensors"
    assert str(run) in out
    result = load_result(run)
    assert result.layers == [0, 1] and len(result.facts) == 8
    assert result.settings["config"]["model_name"] == "tiny-gpt2"
    for name, folder in zip(("p_matrix", "q_matrix", "whitening_cos", "activation_cos"), MATRIX_DIRS):
        for layer in (0, 1):
            npy = tmp_path / folder / "tiny-gpt2" / "all_sample_size_8" / f"layer_{layer}_subject_last_{folder}.npy"
            np.testing.assert_allclose(np.load(npy, allow_pickle=False), result.layer(name, layer).numpy(), rtol=1e-6)
    for layer in (0, 1):
        assert (tmp_path / "stats" / "tiny-gpt2" / "wikipedia-offline_stats" / f"layer_{layer}_mom2.safetensors").is_file()
    assert not list(tmp_path.rglob("*.tmp"))


def test_single_matrix_commands_and_cache_reuse(tmp_path):
    args = ["--model-name", "tiny-llama", "--output-dir", str(tmp_path), "--start_layer", "1", "--end_layer", "1", *TINY_RUN]
    assert main(["cache-cov", *args[: -len(TINY_RUN)], *CORPUS_ARGS]) == 0
    cache = tmp_path / "stats" / "tiny-llama" / "wikipedia-offline_stats" / "layer_1_mom2.safetensors"
    stamp = cache.stat().st_mtime_ns
    assert main(["p-matrix", *args]) == 0
    assert cache.stat().st_mtime_ns == stamp  # reused, not recomputed
    assert main(["q-matrix", *args]) == 0
    folder = tmp_path / "p_matrix" / "tiny-llama" / "all_sample_size_8"
    p = np.load(folder / "layer_1_subject_last_p_matrix.npy")
    np.testing.assert_allclose(np.diag(p), 1.0, rtol=1e-6)
    assert not (tmp_path / "p_matrix" / "tiny-llama" / "all_sample_size_8" / "layer_0_subject_last_p_matrix.npy").exists()


def test_cache_from_another_model_is_refused(tmp_path, capsys):
    common = ["--output_dir", str(tmp_path), "--end_layer", "0", *CORPUS_ARGS]
    assert main(["cache-cov", "--model_name", "tiny-gpt2", *common]) == 0
    source = tmp_path / "stats" / "tiny-gpt2" / "wikipedia-offline_stats" / "layer_0_mom2.safetensors"
    target = tmp_path / "stats" / "tiny-llama" / "wikipedia-offline_stats" / "layer_0_mom2.safetensors"
    target.parent.mkdir(parents=True)
    shutil.copy(source, target)
    assert main(["p-matrix", "--model_name", "tiny-llama", *common, "--knowledge_type", "all", "--record_size", "4"]) == 2
    assert "was made for model_name='tiny-gpt2', not 'tiny-llama'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["all", "--model_name", "gpt3-small"], "unknown model 'gpt3-small'"),
        (["all", "--model_name", "tiny-gpt2", "--end_layer", "5"], "out of range: this model has layers 0..1"),
        (["all", "--model_name", "tiny-gpt2", "--knowledge_type", "all", "--record_size", "1000"], "larger than the 436 facts"),
        (["all", "--model_name", "tiny-gpt2", "--facts", "/nonexistent.json"], "not found"),
    ],
)
def test_bad_input_exits_2_without_traceback(tmp_path, args, message):
    completed = subprocess.run(
        [sys.executable, "-m", "kis_lens.cli", *args, "--output_dir", str(tmp_path), "--no_progress"],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 2
    assert message in completed.stderr and "Traceback" not in completed.stderr
    assert not list(tmp_path.rglob("*"))  # nothing written
