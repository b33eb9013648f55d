"""Faults: SIGKILL at random points, two writers at once, a full disk, a dying torchrun rank, and numerical faults.

The kill loop runs in one driver subprocess (this file run as a script) that loads the tiny model once and
forks a child per attempt, so 20+ kill-and-resume trials fit in well under a minute.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from kis_lens import covariance, storage
from kis_lens.cache_job import cache_second_moments
from kis_lens.config import CacheOptions
from kis_lens.corpus import EMBEDDED_CORPUS, open_corpus
from kis_lens.covariance import estimate_second_moments
from kis_lens.errors import KisError
from kis_lens.hooks import capture_mlp_inputs, mlp_in_hook_name
from kis_lens.io import LOCK_NAME, folder_lock
from kis_lens.layout import stats_dir
from kis_lens.matrices import IllConditionedWarning, Whitener, estimate_condition_number
from kis_lens.models import load_model
from kis_lens.stats import SecondMoment
from kis_lens.storage import load_second_moment

ROOT = Path(__file__).resolve().parents[2]
KILL_TRIALS = 24  # each SIGKILLed once or twice; at least 20 kills must land mid-job
LAYERS = [0, 1]


def _request(output: Path, **changes) -> CacheOptions:
    settings = dict(
        corpus=EMBEDDED_CORPUS,
        output_dir=output,
        max_tokens=None,
        sample_size=30,
        batch_token=256,
        stats_dtype="float64",
        checkpoint_every=800,
        progress=False,
    )
    return CacheOptions(**{**settings, **changes})


def _cache_files(output: Path) -> dict[int, Path]:
    folder = stats_dir(output, "tiny-gpt2", EMBEDDED_CORPUS)
    return {layer: folder / f"layer_{layer}_mom2.safetensors" for layer in LAYERS}


def _run_in_child(model, request: CacheOptions) -> int:
    """Fork a child that runs the cache job and exits 0 on success; return its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            cache_second_moments(model, LAYERS, request)
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    return pid


def kill_loop_driver(output: Path, trials: int, seed: int) -> None:
    """Run one uninterrupted job, then `trials` jobs each SIGKILLed at 1-2 random moments and rerun to the end."""
    torch.set_num_threads(1)  # forked children must not inherit a live OpenMP pool
    model = load_model("tiny-gpt2", device="cpu")
    started = time.perf_counter()
    pid = _run_in_child(model, _request(output / "straight"))
    assert os.waitpid(pid, 0)[1] == 0, "the uninterrupted job failed"
    duration = time.perf_counter() - started
    rng = random.Random(seed)
    log = []
    for trial in range(trials):
        request = _request(output / f"trial_{trial}")
        kills = []
        for _ in range(rng.choice([1, 2])):
            pid = _run_in_child(model, request)
            # within the first 60% of an uninterrupted job's time: a busy machine makes later jobs run faster or
            # slower than the first, and a kill after the end tests nothing
            delay = rng.uniform(0.0, 0.6 * duration)
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)  # the child may have finished already: then it is reaped as done
            status = os.waitpid(pid, 0)[1]
            kills.append({"at_s": round(delay, 3), "killed": os.WIFSIGNALED(status)})
        pid = _run_in_child(model, request)
        status = os.waitpid(pid, 0)[1]
        log.append({"trial": trial, "kills": kills, "final_status": status})
    (output / "log.json").write_text(json.dumps({"duration_s": duration, "trials": log}))


@pytest.mark.slow
def test_sigkill_at_random_points_always_resumes_to_the_identical_result(tmp_path):
    driver = subprocess.run(
        [sys.executable, __file__, "kill-loop", str(tmp_path), str(KILL_TRIALS), "8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert driver.returncode == 0, driver.stderr[-3000:]
    log = json.loads((tmp_path / "log.json").read_text())
    assert len(log["trials"]) == KILL_TRIALS
    assert all(trial["final_status"] == 0 for trial in log["trials"]), driver.stderr[-3000:]
    killed = sum(kill["killed"] for trial in log["trials"] for kill in trial["kills"])
    assert killed >= 20  # kills that landed mid-job, not after it ended
    straight = {layer: load_second_moment(path) for layer, path in _cache_files(tmp_path / "straight").items()}
    for trial in range(KILL_TRIALS):
        output = tmp_path / f"trial_{trial}"
        for layer, path in _cache_files(output).items():
            moment, metadata = load_second_moment(path)
            assert moment.count == straight[layer][0].count and metadata["texts_read"] == 30 and metadata["exhausted"]
            assert torch.equal(moment.sum, straight[layer][0].sum), f"trial {trial}, layer {layer} differs"
        leftovers = [p for p in output.rglob("*") if p.is_file() and (p.name.endswith(".tmp") or p.name == LOCK_NAME)]
        assert not leftovers, f"trial {trial} left {leftovers}"
        assert not list(output.rglob("checkpoints/*.safetensors")), f"trial {trial} left a checkpoint"


@pytest.fixture(scope="module")
def tiny_cli_model():
    return load_model("tiny-gpt2", device="cpu")


@pytest.mark.slow
def test_second_writer_fails_clearly_and_nothing_is_corrupted(tmp_path, tiny_cli_model):
    folder = stats_dir(tmp_path, "tiny-gpt2", EMBEDDED_CORPUS)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from kis_lens.io import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)",
            str(folder),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(KisError, match="being written by another kis process .* another --output_dir"):
            cache_second_moments(tiny_cli_model, [0], _request(tmp_path, sample_size=4))
        assert not list(folder.glob("layer_*")), "the refused job wrote nothing"
    finally:
        holder.kill()
        holder.wait()
    # The holder died without unlocking: the kernel released its lock, so the next job runs and cleans up.
    report = cache_second_moments(tiny_cli_model, [0], _request(tmp_path, sample_size=4))
    assert load_second_moment(report.paths[0])[0].count == report.tokens > 0
    assert not (folder / LOCK_NAME).exists()


@pytest.mark.slow
def test_a_waiting_writer_gets_the_lock_after_the_first(tmp_path):
    folder = tmp_path / "shared"
    released_file = tmp_path / "released_at"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from kis_lens.io import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(1.0)\n"
            "    Path(sys.argv[2]).write_text(repr(time.time()))  # the last thing before the lock is released",
            str(folder),
            str(released_file),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.time()
        with folder_lock(folder, timeout=30):
            acquired = time.time()
    finally:
        holder.wait(timeout=30)
    assert holder.returncode == 0
    released = float(released_file.read_text())
    assert released <= acquired, f"got the lock {released - acquired:.3f} s before the holder released it"
    assert acquired - started >= 0.5, f"did not wait for the holder: acquired after {acquired - started:.3f} s"


@pytest.mark.slow
def test_disk_full_during_a_write_leaves_the_old_cache_intact(tmp_path, tiny_cli_model, monkeypatch):
    first = cache_second_moments(tiny_cli_model, [1], _request(tmp_path, sample_size=6))
    path = first.paths[1]
    before = path.read_bytes()

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x00" * 1000)  # a partial file, then the device is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(storage, "save_file", full_disk)
    with pytest.raises(KisError, match="disk is full.*previous layers_1-1_.*.safetensors is untouched"):
        cache_second_moments(tiny_cli_model, [1], _request(tmp_path, sample_size=12))  # the first checkpoint fails
    assert path.read_bytes() == before
    with pytest.raises(KisError, match="disk is full.*previous layer_1_mom2.safetensors is untouched"):
        cache_second_moments(
            tiny_cli_model, [1], _request(tmp_path, sample_size=12, checkpoint_every=None)
        )  # the cache itself
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name == LOCK_NAME]
    monkeypatch.undo()
    extended = cache_second_moments(tiny_cli_model, [1], _request(tmp_path, sample_size=12))
    assert extended.extended == [1] and load_second_moment(path)[1]["texts_read"] == 12


@pytest.mark.slow
def test_dying_torchrun_rank_stops_the_job_and_the_rerun_resumes(tmp_path, tiny_cli_model):
    pytest.importorskip("torch.distributed.run")
    script = tmp_path / "dying_rank.py"
    script.write_text(
        "import os, signal, sys\n"
        "import kis_lens.cache_pass as cache_pass\n"
        "original = cache_pass.accumulate_batches\n"
        "def dying(*args, **kwargs):\n"
        "    for number, batch in enumerate(original(*args, **kwargs)):\n"
        "        if os.environ.get('RANK') == '1' and number == 6 and os.environ.get('KIS_DIE') == '1':\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "        yield batch\n"
        "cache_pass.accumulate_batches = dying\n"
        "from kis_lens.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29533",
        str(script),
        "cache-cov",
        "--model_name",
        "tiny-gpt2",
        "--device",
        "cpu",
        "--output_dir",
        str(tmp_path / "ddp"),
        "--sample_size",
        "24",
        "--batch_token",
        "256",
        "--stats_dtype",
        "float64",
        "--checkpoint_every",
        "300",
        "--no_progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    died = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240, env={**env, "KIS_DIE": "1"})
    assert died.returncode != 0
    caches = stats_dir(tmp_path / "ddp", "tiny-gpt2", EMBEDDED_CORPUS)
    assert not list(caches.glob("layer_*_mom2.safetensors")), "no final cache from a job that lost a rank"
    assert list(caches.glob("checkpoints/*rank1of2.safetensors")), "the dead rank's progress is kept"
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout
    single = cache_second_moments(tiny_cli_model, LAYERS, _request(tmp_path / "one", sample_size=24))
    for layer in LAYERS:
        shared, meta = load_second_moment(caches / f"layer_{layer}_mom2.safetensors")
        alone, _ = load_second_moment(single.paths[layer])
        assert shared.count == alone.count and meta["texts_read"] == 24
        assert float((shared.sum - alone.sum).abs().max() / alone.sum.abs().max()) < 1e-6


# Numerical guards


def _reference_sum(model, texts: list[str], layer: int) -> np.ndarray:
    """Σ k kᵀ in float64 numpy from each text's activations (upcast from the model's dtype), one text at a time."""
    total = np.zeros((model.cfg.d_mlp, model.cfg.d_mlp))
    for text in texts:
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"][: model.cfg.n_ctx]
        rows = capture_mlp_inputs(model, torch.tensor([ids]), [layer])[layer][0]
        assert rows.dtype == torch.bfloat16
        rows = rows.double().numpy()
        total += rows.T @ rows
    return total


@pytest.mark.slow
def test_bfloat16_activations_are_upcast_before_accumulation():
    model = load_model("tiny-gpt2", device="cpu", dtype="bfloat16")
    texts = list(open_corpus(EMBEDDED_CORPUS).texts(stop=6))
    moment = estimate_second_moments(model, texts, [1], prepend_bos=False, progress=False)[1]
    expected = _reference_sum(model, texts, 1)
    # bf16 products would keep 8 bits (~4e-3); float32 products of the same bf16 numbers agree to ~1e-6.
    assert np.abs(moment.sum.numpy() - expected).max() / np.abs(expected).max() < 1e-5


def test_float16_rows_whose_squares_overflow_float16_accumulate_exactly():
    rows = torch.full((4, 3), 300.0, dtype=torch.float16)  # 300² = 90,000 > float16's 65,504
    assert not torch.isfinite(rows.T @ rows).all()
    moment = SecondMoment(3)
    moment.update(rows)
    np.testing.assert_array_equal(moment.sum.numpy(), np.full((3, 3), 4 * 300.0**2))


class _Poisoned:
    """Wrap a model so the layer-1 MLP activation of chosen texts (known by their first 4 tokens) becomes NaN or inf."""

    def __init__(self, model, poison_prefixes: set[tuple[int, ...]], value: float) -> None:
        self.model, self.poison, self.value = model, poison_prefixes, value

    def __enter__(self):
        def hook(activation, hook):
            for row, prefix in enumerate(self._tokens[:, :4].tolist()):
                if tuple(prefix) in self.poison:
                    activation[row, 2] = self.value
            return activation

        original_forward = self.model.forward

        def forward(tokens, *args, **kwargs):
            self._tokens = tokens
            return original_forward(tokens, *args, **kwargs)

        self.model.forward = forward
        self.handle = self.model.hooks(fwd_hooks=[(mlp_in_hook_name(1), hook)])
        self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        self.handle.__exit__(*exc)
        del self.model.forward


@pytest.mark.slow
@pytest.mark.parametrize("group_tokens", [2048, 60])
def test_nan_in_a_batch_stops_the_job_naming_the_text_or_is_skipped_and_counted(
    tmp_path, tiny_cli_model, monkeypatch, group_tokens
):
    # 2048: whole 256-token batches; 60: each batch split into row groups, so rows are renumbered per forward.
    monkeypatch.setattr(covariance, "CPU_FORWARD_TOKENS", group_tokens)
    texts = list(open_corpus(EMBEDDED_CORPUS).texts(stop=12))
    prefixes = [tuple(tiny_cli_model.tokenizer(text, add_special_tokens=False)["input_ids"][:4]) for text in texts]
    bad = 7
    assert prefixes.count(prefixes[bad]) == 1
    with _Poisoned(tiny_cli_model, {prefixes[bad]}, float("nan")):
        with pytest.raises(KisError, match=r"layer-1 MLP activations of corpus text\(s\) \[7\].*--skip_nonfinite"):
            cache_second_moments(tiny_cli_model, LAYERS, _request(tmp_path / "stop", sample_size=12))
        assert not list((tmp_path / "stop").rglob("layer_*_mom2.safetensors"))
        report = cache_second_moments(
            tiny_cli_model, LAYERS, _request(tmp_path / "skip", sample_size=12, skip_nonfinite=True)
        )
    assert report.skipped_texts == [bad] and "1 texts with NaN/inf left out" in report.summary()
    clean = [text for index, text in enumerate(texts) if index != bad]
    expected = estimate_second_moments(
        tiny_cli_model, clean, LAYERS, batch_token=256, prepend_bos=False, progress=False
    )
    for layer in LAYERS:  # the skipped text is out of every layer, not only the one that overflowed
        moment, metadata = load_second_moment(report.paths[layer])
        assert moment.count == expected[layer].count and metadata["nonfinite_skipped_texts"] == [bad]
        assert float((moment.sum - expected[layer].sum).abs().max() / expected[layer].sum.abs().max()) < 1e-6


@pytest.mark.slow
def test_inf_from_an_in_memory_text_list_names_its_index(tiny_cli_model):
    texts = list(open_corpus(EMBEDDED_CORPUS).texts(stop=5))
    prefix = tuple(tiny_cli_model.tokenizer(texts[3], add_special_tokens=False)["input_ids"][:4])
    with _Poisoned(tiny_cli_model, {prefix}, float("inf")), pytest.raises(KisError, match=r"text\(s\) \[3\]"):
        estimate_second_moments(tiny_cli_model, texts, [0, 1], progress=False)


def test_condition_number_is_reported_and_warned_about_with_the_ridge_named():
    generator = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(40, 40, generator=generator, dtype=torch.float64))
    for spread, warns in ((1e4, False), (1e12, True)):
        eigenvalues = torch.logspace(0, float(np.log10(spread)), 40, dtype=torch.float64)
        covariance = (basis * eigenvalues) @ basis.T
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            whitener = Whitener.from_covariance(covariance)
        assert whitener.condition == pytest.approx(np.linalg.cond(covariance.numpy()), rel=1e-3)
        messages = [str(w.message) for w in caught if issubclass(w.category, IllConditionedWarning)]
        assert bool(messages) == warns
        if warns:
            assert "--ridge" in messages[0] and "ill-conditioned" in messages[0]
    ridged = Whitener.from_covariance(
        covariance, ridge=1e-3
    )  # the named fix: ridge·mean(diag C) added to every eigenvalue
    shift = 1e-3 * eigenvalues.mean().item()
    assert ridged.condition == pytest.approx((1e12 + shift) / (1 + shift), rel=1e-6) and ridged.condition < 1e5


@pytest.mark.slow
def test_condition_estimate_for_large_covariances_matches_numpy():
    generator = torch.Generator().manual_seed(2)
    basis, _ = torch.linalg.qr(torch.randn(600, 600, generator=generator, dtype=torch.float64))
    covariance = (basis * torch.logspace(-3, 5, 600, dtype=torch.float64)) @ basis.T
    estimate = estimate_condition_number(torch.linalg.cholesky(covariance))
    exact = np.linalg.cond(covariance.numpy())
    assert 0.8 * exact <= estimate <= exact * (1 + 1e-6)  # a lower bound, close to the truth
    assert Whitener.from_covariance(covariance).condition == pytest.approx(estimate)


if __name__ == "__main__":
    if sys.argv[1] == "kill-loop":
        kill_loop_driver(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
