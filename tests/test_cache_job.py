"""The cache-cov job: padding-free stats, kill/resume, extension, metadata, groups, torchrun (interop: test_interop)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kis_lens import covariance
from kis_lens.cache_job import cache_second_moments, layer_groups
from kis_lens.config import CacheOptions
from kis_lens.corpus import EMBEDDED_CORPUS, embedded_sample_texts, open_corpus
from kis_lens.covariance import estimate_second_moments, forward_row_groups
from kis_lens.errors import KisError
from kis_lens.hooks import capture_mlp_inputs
from kis_lens.layout import stats_dir
from kis_lens.models import load_model
from kis_lens.storage import import_layer_stats, load_second_moment
from kis_lens.tokens import encode, token_batches

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_cli_model():
    """The model `--model_name tiny-gpt2` loads in a subprocess (same seed, same weights)."""
    return load_model("tiny-gpt2", device="cpu")


def _reference_sum(model, texts: list[str]) -> np.ndarray:
    """Σ k kᵀ in float64 numpy, one unpadded forward per text (no batching, no padding at all)."""
    total = np.zeros((model.cfg.d_mlp, model.cfg.d_mlp))
    for text in texts:
        ids = encode(model.tokenizer, text, prepend_bos=False, max_length=model.cfg.n_ctx)
        if not ids:
            continue
        rows = capture_mlp_inputs(model, torch.tensor([ids]), [1])[1][0].double().numpy()
        total += rows.T @ rows
    return total


@pytest.mark.slow
@pytest.mark.parametrize("group_tokens", [2048, 100, 1])
def test_padding_never_enters_the_statistics(tiny_gpt2, monkeypatch, group_tokens):
    # 2048 runs each 600-token batch whole; 100 and 1 split it into row groups (1: one text per forward).
    monkeypatch.setattr(covariance, "CPU_FORWARD_TOKENS", group_tokens)
    texts = embedded_sample_texts(10, min_chars=50) + ["", "Short."]
    moment = estimate_second_moments(tiny_gpt2, texts, [1], batch_token=600, prepend_bos=False, progress=False)[1]
    expected = _reference_sum(tiny_gpt2, texts)
    assert np.abs(moment.sum.numpy() - expected).max() / np.abs(expected).max() < 1e-6


@pytest.mark.parametrize("group_tokens", [1, 40, 100, 256, None])
def test_row_groups_keep_every_real_token_and_trim_padding(tiny_gpt2, group_tokens):
    texts = [text[: 30 + 17 * index] for index, text in enumerate(embedded_sample_texts(12, min_chars=300))]
    batch = next(token_batches(tiny_gpt2.tokenizer, texts, 128, 1024, False))
    lengths = batch.attention_mask.sum(dim=1).tolist()
    assert lengths == sorted(lengths, reverse=True) and len(lengths) > 2
    groups = forward_row_groups(batch, group_tokens)
    rows = torch.cat([torch.arange(first, first + tokens.shape[0]) for first, tokens, _ in groups])
    assert rows.tolist() == list(range(len(lengths)))  # every row once, in order
    for first, tokens, mask in groups:
        assert tokens.shape == mask.shape and tokens.shape[1] == lengths[first]  # trimmed to the group's longest row
        assert tokens.shape[0] == 1 or group_tokens is None or tokens.numel() <= group_tokens
        for offset in range(tokens.shape[0]):
            real = lengths[first + offset]
            assert torch.equal(tokens[offset, :real], batch.tokens[first + offset, :real])
            assert mask[offset].sum() == real


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max difference relative to the largest entry: batches grouped differently round float32 products differently."""
    return float((got - want).abs().max() / want.abs().max())


def _cli(output: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kis_lens.cli",
        "cache-cov",
        "--model_name",
        "tiny-gpt2",
        "--device",
        "cpu",
        "--output_dir",
        str(output),
        "--sample_size",
        "80",
        "--batch_token",
        "256",
        "--checkpoint_every",
        "1500",
        "--stats_dtype",
        "float64",
        "--no_progress",
        *extra,
    ]


def _request(output: Path, **changes) -> CacheOptions:
    settings = dict(
        corpus=EMBEDDED_CORPUS,
        output_dir=output,
        max_tokens=None,
        sample_size=80,
        batch_token=256,
        stats_dtype="float64",
        progress=False,
    )
    return CacheOptions(**{**settings, **changes})


@pytest.mark.slow
def test_killed_job_resumes_to_the_identical_result(tmp_path, tiny_cli_model):
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(_cli(killed), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    checkpoints = stats_dir(killed, "tiny-gpt2", EMBEDDED_CORPUS) / "checkpoints"
    deadline = time.monotonic() + 120
    while not (checkpoints.is_dir() and any(checkpoints.glob("*.safetensors"))):
        assert process.poll() is None, "the job ended before its first checkpoint: " + process.stdout.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    caches = stats_dir(killed, "tiny-gpt2", EMBEDDED_CORPUS)
    assert not list(caches.glob("layer_*_mom2.safetensors")), "killed before the end: no final cache yet"

    rerun = subprocess.run(_cli(killed), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming layers 0..1" in rerun.stdout and "caches in" in rerun.stdout
    assert not list(checkpoints.glob("*.safetensors")), "a finished job removes its checkpoint"

    straight = cache_second_moments(tiny_cli_model, [0, 1], _request(tmp_path / "straight"))
    for layer in (0, 1):
        resumed, meta = load_second_moment(caches / f"layer_{layer}_mom2.safetensors")
        uninterrupted, _ = load_second_moment(straight.paths[layer])
        assert resumed.count == uninterrupted.count and meta["texts_read"] == 80
        assert torch.equal(resumed.sum, uninterrupted.sum)  # bitwise


@pytest.mark.slow
def test_raising_sample_size_extends_the_cache(tmp_path, tiny_cli_model):
    small = cache_second_moments(tiny_cli_model, [1], _request(tmp_path, sample_size=10))
    extended = cache_second_moments(tiny_cli_model, [1], _request(tmp_path, sample_size=20))
    assert extended.extended == [1] and extended.computed_tokens < extended.tokens
    fresh = cache_second_moments(tiny_cli_model, [1], _request(tmp_path / "fresh", sample_size=20))
    got, meta = load_second_moment(extended.paths[1])
    want, _ = load_second_moment(fresh.paths[1])
    assert got.count == want.count and meta["texts"] == 20
    assert _relative(got.sum, want.sum) < 1e-6
    assert small.tokens < extended.tokens


@pytest.mark.slow
def test_mismatched_cache_is_refused(tmp_path, tiny_cli_model):
    cache_second_moments(tiny_cli_model, [0], _request(tmp_path, sample_size=5))
    with pytest.raises(KisError, match="prepend_bos=False, not True"):
        cache_second_moments(tiny_cli_model, [0], _request(tmp_path, sample_size=5, prepend_bos=True))
    other = load_model("tiny-llama", device="cpu")
    other_dir = stats_dir(tmp_path, "tiny-llama", EMBEDDED_CORPUS)
    other_dir.mkdir(parents=True)
    (stats_dir(tmp_path, "tiny-gpt2", EMBEDDED_CORPUS) / "layer_0_mom2.safetensors").rename(
        other_dir / "layer_0_mom2.safetensors"
    )
    with pytest.raises(KisError, match="model_name='tiny-gpt2', not 'tiny-llama'"):
        cache_second_moments(other, [0], _request(tmp_path, sample_size=5))


@pytest.mark.slow
def test_memory_budget_splits_layers_into_passes(tmp_path, tiny_cli_model, capsys):
    per_layer = 256 * 256 * 12
    assert layer_groups([0, 1, 2], 256, 2 * per_layer + 1) == [[0, 1], [2]]
    with pytest.raises(KisError, match="raise --max_memory"):
        layer_groups([0], 256, per_layer - 1)
    grouped = cache_second_moments(
        tiny_cli_model, [0, 1], _request(tmp_path / "g", sample_size=12, max_memory=per_layer)
    )
    assert grouped.groups == [[0], [1]] and "pass 2 over the corpus covers layers 1..1" in capsys.readouterr().out
    together = cache_second_moments(tiny_cli_model, [0, 1], _request(tmp_path / "t", sample_size=12))
    for layer in (0, 1):
        assert torch.equal(
            load_second_moment(grouped.paths[layer])[0].sum, load_second_moment(together.paths[layer])[0].sum
        )


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path, tiny_cli_model):
    pytest.importorskip("torch.distributed.run")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29517",
        "-m",
        "kis_lens.cli",
        "cache-cov",
        "--model_name",
        "tiny-gpt2",
        "--device",
        "cpu",
        "--output_dir",
        str(tmp_path / "ddp"),
        "--sample_size",
        "16",
        "--batch_token",
        "256",
        "--stats_dtype",
        "float64",
        "--no_progress",
    ]
    run = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert run.returncode == 0, run.stderr[-3000:]
    single = cache_second_moments(tiny_cli_model, [0, 1], _request(tmp_path / "one", sample_size=16))
    for layer in (0, 1):
        shared, meta = load_second_moment(
            stats_dir(tmp_path / "ddp", "tiny-gpt2", EMBEDDED_CORPUS) / f"layer_{layer}_mom2.safetensors"
        )
        alone, _ = load_second_moment(single.paths[layer])
        assert shared.count == alone.count and meta["texts_read"] == 16
        assert _relative(shared.sum, alone.sum) < 1e-6


@pytest.mark.slow
def test_a_larger_token_budget_extends_the_cache_to_the_uninterrupted_result(tmp_path, tiny_cli_model):
    """--max_tokens 1500 then 6000 continues the first cache's own stream: bit for bit one run with 6000."""
    small = cache_second_moments(
        tiny_cli_model, [0, 1], _request(tmp_path / "grown", sample_size=None, max_tokens=1500)
    )
    assert 1500 <= small.tokens < 6000
    grown = cache_second_moments(
        tiny_cli_model, [0, 1], _request(tmp_path / "grown", sample_size=None, max_tokens=6000)
    )
    assert grown.extended == [0, 1] and not grown.reused
    assert grown.computed_tokens == grown.tokens - small.tokens  # only the new tokens were run
    straight = cache_second_moments(
        tiny_cli_model, [0, 1], _request(tmp_path / "straight", sample_size=None, max_tokens=6000)
    )
    for layer in (0, 1):
        got, meta = load_second_moment(grown.paths[layer])
        want, want_meta = load_second_moment(straight.paths[layer])
        assert got.count == want.count >= 6000 and meta["texts"] == want_meta["texts"]
        assert torch.equal(got.sum, want.sum)  # bitwise
        assert grown.layers[layer].tokens == got.count


@pytest.mark.slow
def test_a_cache_holding_more_than_asked_is_reused_and_says_so(tmp_path, tiny_cli_model):
    """A smaller budget reuses the larger cache without touching it, and the report says what C really holds."""
    big = cache_second_moments(tiny_cli_model, [1], _request(tmp_path, sample_size=None, max_tokens=3000))
    before = big.paths[1].read_bytes()
    again = cache_second_moments(tiny_cli_model, [1], _request(tmp_path, sample_size=None, max_tokens=1000))
    assert again.reused == [1] and again.computed_tokens == 0 and again.tokens == big.tokens
    assert f"holds {big.tokens:,} tokens, more than the 1,000 asked" in again.summary()
    assert big.paths[1].read_bytes() == before


@pytest.mark.slow
def test_caches_are_float64_sums_by_default(tmp_path, tiny_cli_model):
    """C is stored as the exact float64 sum unless float32 is asked for, and C read back is the run's C bit for bit."""
    from safetensors import safe_open

    request = CacheOptions(corpus=EMBEDDED_CORPUS, output_dir=tmp_path, sample_size=8, max_tokens=None, progress=False)
    report = cache_second_moments(tiny_cli_model, [1], request)
    with safe_open(str(report.paths[1]), framework="pt") as handle:
        assert list(handle.keys()) == ["sum"] and handle.get_tensor("sum").dtype == torch.float64
    moment, meta = load_second_moment(report.paths[1])
    assert meta["stats_dtype"] == "float64"
    texts = list(open_corpus(EMBEDDED_CORPUS).texts(stop=8))
    in_memory = estimate_second_moments(tiny_cli_model, texts, [1], prepend_bos=False, progress=False)[1]
    assert torch.equal(moment.compute(), in_memory.compute()) and moment.compute().dtype == torch.float64


@pytest.mark.slow
def test_the_progress_bar_counts_tokens_against_a_budget(tmp_path, tiny_cli_model, monkeypatch):
    """With --max_tokens the bar's total is the budget in tokens; without one it counts the sample's texts."""
    from kis_lens import cache_pass

    bars = []

    class Recorder:
        def __init__(self, **kwargs):
            bars.append(kwargs)
            self.n = kwargs.get("initial", 0)

        def update(self, step):
            self.n += step

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            bars[-1]["final"] = self.n

    monkeypatch.setattr(cache_pass, "tqdm", Recorder)
    cache_second_moments(
        tiny_cli_model, [1], _request(tmp_path / "budget", sample_size=None, max_tokens=2000, progress=True)
    )
    assert bars[-1]["unit"] == "tok" and bars[-1]["total"] == 2000 and bars[-1]["final"] == 2000
    cache_second_moments(tiny_cli_model, [1], _request(tmp_path / "texts", sample_size=12, progress=True))
    assert bars[-1]["unit"] == "text" and bars[-1]["total"] == 12 and bars[-1]["final"] == 12


def test_an_imported_cache_is_tied_to_the_first_model_that_uses_it(tmp_path, tiny_cli_model):
    """An imported cache has no fingerprint: its first use records the model's, and another model is then refused."""
    rows = np.random.default_rng(0).standard_normal((500, 256))
    np.savez(
        tmp_path / "rome.npz",
        **{
            "mom2.mom2": (rows.T @ rows).astype(np.float32),
            "mom2.count": np.array(500),
            "mom2.constructor": np.array("util.runningstats.SecondMoment()"),
            "sample_size": np.array(7),
        },
    )
    path = import_layer_stats(
        tmp_path / "rome.npz", "tiny-gpt2", 1, tmp_path, corpus=EMBEDDED_CORPUS, prepend_bos=False, max_length=256
    )
    report = cache_second_moments(tiny_cli_model, [1], _request(tmp_path, sample_size=None, max_tokens=100))
    assert report.reused == [1] and "now recorded" in report.summary()
    _, meta = load_second_moment(path)
    from kis_lens.fingerprint import model_fingerprint
    from kis_lens.models import refresh_model_info

    assert meta["model_fingerprint"] == model_fingerprint(tiny_cli_model)
    other = load_model("tiny-gpt2", device="cpu")
    from kis_lens.w_out import output_weight

    output_weight(other, 0).write(output_weight(other, 0).read() * 2)  # same name, other weights
    refresh_model_info(other, "W_out of layer 0 doubled: another model under the same name")
    with pytest.raises(KisError, match="model_fingerprint="):
        cache_second_moments(other, [1], _request(tmp_path, sample_size=None, max_tokens=100))


@pytest.mark.slow
def test_a_run_records_what_its_c_holds_not_what_was_asked(tmp_path, tiny_cli_model):
    """After a 3,000-token cache, a run asking for 1,000 records the 3,000+ tokens its C really averages, per layer."""
    from kis_lens.config import RunConfig
    from kis_lens.runner import run_matrices

    config = dict(model_name="tiny-gpt2", knowledge_type="all", record_size=6, output_dir=str(tmp_path), progress=False)
    first = run_matrices(RunConfig(**config, max_tokens=3000), model=tiny_cli_model)
    second = run_matrices(RunConfig(**config, max_tokens=1000), model=tiny_cli_model)
    for layer in (0, 1):
        _, meta = load_second_moment(
            stats_dir(tmp_path, "tiny-gpt2", EMBEDDED_CORPUS) / f"layer_{layer}_mom2.safetensors"
        )
        held = second.settings["covariance"][str(layer)]
        assert held["tokens"] == meta["count"] >= 3000 and held["texts"] == meta["texts"]
        assert first.settings["covariance"][str(layer)]["tokens"] == held["tokens"]
    assert second.settings["config"]["max_tokens"] == 1000


@pytest.mark.slow
def test_a_cache_keyed_on_the_legacy_fingerprint_is_re_keyed_not_recomputed(tiny_cli_model, tmp_path):
    """A cache written by an older kis (keyed on the sampled W_out fingerprint) is read, re-keyed to the full-weight
    fingerprint with a line in the summary, and its statistics are kept bit for bit; one whose legacy fingerprint
    is another model's is refused."""
    from kis_lens.fingerprint import legacy_fingerprint, model_fingerprint
    from kis_lens.storage import read_metadata, rewrite_metadata

    first = cache_second_moments(tiny_cli_model, [1], _request(tmp_path))
    path = first.layers[1].path
    before = load_second_moment(path)[0].sum.clone()
    rewrite_metadata(path, {"model_fingerprint": legacy_fingerprint(tiny_cli_model)})
    again = cache_second_moments(tiny_cli_model, [1], _request(tmp_path))
    assert again.reused == [1] and again.computed_tokens == 0
    assert any("re-keyed" in note for note in again.notes) and "re-keyed" in again.summary()
    assert read_metadata(path)["model_fingerprint"] == model_fingerprint(tiny_cli_model)
    assert torch.equal(load_second_moment(path)[0].sum, before)
    rewrite_metadata(path, {"model_fingerprint": "0123456789abcdef"})  # a legacy key of some other model
    with pytest.raises(KisError, match="model_fingerprint"):
        cache_second_moments(tiny_cli_model, [1], _request(tmp_path))
