"""Faults in files and settings (issue 21): corrupt results and checkpoints, a full disk, NaN settings, unwritable
output folders and file modes each end as one `kis: error:` line with the fix and exit 2, never a traceback.

Kill, lock and disk-full-cache faults of the covariance job live in test_faults.py.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kis_lens import cache_pass, models, report, storage
from kis_lens.cli import main
from kis_lens.config import RunConfig
from kis_lens.editing import lifelong
from kis_lens.editing.runs import checkpoint_paths, load_checkpoint, save_checkpoint
from kis_lens.errors import KisError
from kis_lens.facts import Fact
from kis_lens.io import TEMP_GLOB, atomic_write, save_json, save_npy
from kis_lens.results import RunResult, save_result
from kis_lens.stats import SecondMoment

STEM = "rome_seed0_n4_layer0_0123abcd"
# What safetensors 0.8 and torch 2.x raise when the disk fills (measured on a 64 KiB tmpfs; torch's zip writer also
# says "unexpected pos 576 vs 534" there, naming no errno at all).
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"
TORCH_FULL = "[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file data/0: file write failed"


def _error_line(capsys) -> str:
    """Return stderr after checking it is one `kis: error:` message and no traceback."""
    err = capsys.readouterr().err
    assert err.startswith("kis: error: "), err
    assert "Traceback" not in err
    return err


def _saved_result(output_dir: Path) -> Path:
    """Write a small run's results.safetensors under output_dir the way `kis all` does; return its path."""
    facts = [Fact(str(i), f"Subject{i}", "{} plays the", f"Instrument{i}") for i in range(4)]
    matrices = {"p_matrix": torch.rand(2, 4, 4), "q_matrix": torch.rand(2, 4, 4)}
    result = RunResult(matrices, [0, 1], facts, {"model": {"name": "synthetic", "d_mlp": 8}, "config": {}})
    return save_result(result, RunConfig(output_dir=str(output_dir)))


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any command loads a model: the refusals below must come before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(lifelong, "load_model", refuse)


# --- corrupt results --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "garbage", "no-metadata", "wrong-shapes"])
def test_report_on_a_corrupt_results_file_names_it_and_the_rerun(tmp_path, capsys, damage):
    path = _saved_result(tmp_path / "out")
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not safetensors" * 8)
    else:
        metadata = None
        if damage == "wrong-shapes":  # metadata of 4 facts over 2 layers, matrices of 3 facts
            facts = [{"case_id": str(i), "subject": "S", "prompt": "{} is", "target_true": "T"} for i in range(4)]
            metadata = {"layers": "[0, 1]", "settings": "{}", "facts": json.dumps(facts)}
        save_file({"p_matrix": torch.zeros(2, 3, 3)}, str(path), metadata=metadata)
    assert main(["report", "--results", str(path.parent)]) == 2
    err = _error_line(capsys)
    assert f"results file {path} is corrupt or truncated" in err
    assert f"rerun `kis all --output_dir {tmp_path / 'out'}`" in err
    assert not (path.parent / "report.html").exists()


# --- corrupt checkpoints --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["json", "safetensors"])
def test_a_garbage_lifelong_checkpoint_names_the_file_delete_and_no_resume(tmp_path, which):
    identity = {"editor": "rome", "seed": 0}
    tensors_path, state_path = save_checkpoint(tmp_path, STEM, identity, {"w": torch.ones(2, 2)}, {"done": 2})
    damaged = state_path if which == "json" else tensors_path
    damaged.write_bytes(b"\x00\xffgarbage{")
    with pytest.raises(KisError) as caught:
        load_checkpoint(tmp_path, STEM, identity)
    message = str(caught.value)
    assert f"checkpoint {damaged} is unreadable" in message
    assert "delete it to start afresh, or rerun with --no_resume" in message


LIFELONG = [
    "lifelong",
    "--editors",
    "none",
    "--model_name",
    "tiny-gpt2",
    "--layer",
    "0",
    "--n_edits",
    "2",
    "--eval_every",
    "2",
    "--probe_every",
    "1",
    "--value_steps",
    "1",
    "--value_prompts",
    "1",
    "--n_unedited",
    "2",
    "--max_tokens",
    "1000",
    "--heldout_texts",
    "1",
    "--heldout_tokens",
    "16",
    "--fluency_prompts",
    "0",
    "--edit_perplexity_texts",
    "0",
    "--bootstrap",
    "10",
    "--no_progress",
]


@pytest.mark.slow
def test_kis_lifelong_on_a_corrupt_checkpoint_stops_with_the_fix_and_no_resume_runs(tmp_path, capsys):
    argv = [*LIFELONG, "--output_dir", str(tmp_path)]
    assert main(argv) == 0
    (finished,) = tmp_path.rglob("lifelong_none_*.json")
    stem = finished.name.removesuffix(".json")
    finished.unlink()  # as if the run had been killed after a checkpoint
    tensors_path, state_path = checkpoint_paths(finished.parent, stem)
    tensors_path.write_bytes(b"\x00" * 24)
    state_path.write_text("{half a checkpoint", encoding="utf-8")
    capsys.readouterr()
    assert main(argv) == 2
    err = _error_line(capsys)
    assert f"checkpoint {state_path} is unreadable" in err and "--no_resume" in err
    assert main([*argv, "--no_resume"]) == 0  # the fix the message gives works
    assert finished.is_file() and not state_path.exists() and not tensors_path.exists()


def _interrupted_cache_checkpoint(tmp_path: Path, monkeypatch, argv: list[str]) -> Path:
    """Run `kis cache-cov` until its first checkpoint is written, then stop it there; return the checkpoint."""
    saved = storage.save_checkpoint

    def save_then_stop(*args, **kwargs):
        saved(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_pass, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    monkeypatch.setattr(cache_pass, "save_checkpoint", saved)
    (checkpoint,) = tmp_path.rglob("checkpoints/*.safetensors")
    return checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["garbage", "truncated", "no-corpus-position"])
def test_kis_cache_cov_on_a_corrupt_checkpoint_names_it_and_the_fix(tmp_path, monkeypatch, capsys, damage):
    argv = [
        "cache-cov",
        "--model_name",
        "tiny-gpt2",
        "--end_layer",
        "0",
        "--sample_size",
        "30",
        "--batch_token",
        "256",
        "--checkpoint_every",
        "500",
        "--no_progress",
        "--output_dir",
        str(tmp_path),
    ]
    checkpoint = _interrupted_cache_checkpoint(tmp_path, monkeypatch, argv)
    data = checkpoint.read_bytes()
    if damage == "garbage":
        checkpoint.write_bytes(b"garbage" * 4)
    elif damage == "truncated":
        checkpoint.write_bytes(data[: len(data) // 2])
    else:  # a readable file whose state lacks where in the corpus to go on
        moments, state = storage.load_checkpoint(checkpoint)
        state.pop("window_start")
        storage.save_checkpoint(checkpoint, moments, state)
    capsys.readouterr()
    assert main(argv) == 2
    err = _error_line(capsys)
    assert f"checkpoint {checkpoint} is corrupt" in err
    assert "delete it and rerun the same `kis cache-cov` command" in err
    checkpoint.unlink()  # the fix
    assert main(argv) == 0


def test_a_covariance_checkpoint_without_its_progress_is_refused(tmp_path):
    path = tmp_path / "layers_0-0_abc.safetensors"
    moment = SecondMoment(3)
    moment.update(torch.eye(3, dtype=torch.float32))
    storage.save_checkpoint(path, {0: moment}, {"batches_done": 1, "tokens": 3, "texts": 1, "done": False})
    with pytest.raises(KisError, match=rf"checkpoint {path} is corrupt \(no 'window_start'\); delete it"):
        storage.load_checkpoint(path)


def _report_command_doing(action):
    """Return a stand-in for report_from_results (its signature: the parser reads its defaults) that runs action."""

    def report_from_results(
        results, output=None, top_k=10, threshold=0.5, *, sections=(), thin=False, self_contained=False
    ):
        return action()

    return report_from_results


# --- a full disk -----------------------------------------------------------------------------------------------------


def _npz(tmp_path: Path) -> Path:
    path = tmp_path / "layer_stats.npz"
    np.savez(path, **{"mom2.mom2": np.eye(8) * 5.0, "mom2.count": np.array(5), "sample_size": np.array(2)})
    return path


def _half_written_then(error: BaseException):
    """Return a save_file stand-in that writes part of the file, then fails as a full disk does."""

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)
        raise error

    return save_file


@pytest.mark.parametrize(
    "error",
    [SafetensorError(SAFETENSORS_FULL), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))],
    ids=["SafetensorError", "OSError-ENOSPC"],
)
def test_a_full_disk_under_safetensors_is_a_clear_error_and_leaves_no_file(tmp_path, monkeypatch, capsys, error):
    monkeypatch.setattr(storage, "save_file", _half_written_then(error))
    out = tmp_path / "out"
    argv = ["import-stats", str(_npz(tmp_path)), "--model_name", "tiny-gpt2", "--layer", "0", "--prepend_bos", "false"]
    assert main([*argv, "--output_dir", str(out)]) == 2
    err = _error_line(capsys)
    assert "no space left writing" in err and "layer_0_mom2.safetensors" in err
    assert "free space or choose another --output_dir" in err
    assert [path for path in out.rglob("*") if path.is_file()] == []  # no half-written cache, no temp file


def test_a_full_disk_under_torch_save_is_a_clear_error_and_leaves_no_file(tmp_path, monkeypatch, capsys):
    target = tmp_path / "out" / "state.pt"

    def full_disk(obj, filename, *args, **kwargs):
        Path(filename).write_bytes(b"PK\x03\x04 half a zip")
        raise RuntimeError(TORCH_FULL)

    monkeypatch.setattr(torch, "save", full_disk)
    # The report command stands in for any command whose writer goes through kis_lens.io.
    write = _report_command_doing(lambda: atomic_write(target, lambda temp: torch.save({}, temp)))
    monkeypatch.setattr(report, "report_from_results", write)
    assert main(["report", "--results", str(tmp_path)]) == 2
    err = _error_line(capsys)
    # torch names no cause, so the message names the likely one with its fix
    assert f"could not write {target}" in err
    assert "if the disk is full, free space or choose another --output_dir" in err
    assert not target.exists() and not list(target.parent.glob(TEMP_GLOB))


def test_file_errors_that_escape_become_exit_2_and_bugs_keep_their_traceback(tmp_path, monkeypatch, capsys):
    def fails_with(error: BaseException):
        def command():
            raise error

        return _report_command_doing(command)

    monkeypatch.setattr(report, "report_from_results", fails_with(RuntimeError(f"{TORCH_FULL}: No space left")))
    assert main(["report", "--results", str(tmp_path)]) == 2
    assert "no space left" in _error_line(capsys)
    gone = tmp_path / "gone.safetensors"
    monkeypatch.setattr(report, "report_from_results", fails_with(FileNotFoundError(2, "No such file", str(gone))))
    assert main(["report", "--results", str(tmp_path)]) == 2
    assert str(gone) in _error_line(capsys)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 16)
    monkeypatch.setattr(report, "report_from_results", _report_command_doing(lambda: load_file(str(garbage))))
    assert main(["report", "--results", str(tmp_path)]) == 2
    err = _error_line(capsys)
    assert f"cannot read or write {garbage} (SafetensorError" in err and "delete it and rerun" in err
    monkeypatch.setattr(report, "report_from_results", fails_with(RuntimeError("mat1 and mat2 shapes differ")))
    with pytest.raises(RuntimeError, match="shapes differ"):  # a bug, not a file: shown as one
        main(["report", "--results", str(tmp_path)])
    monkeypatch.setattr(report, "report_from_results", fails_with(SafetensorError(SAFETENSORS_FULL)))
    with pytest.raises(SafetensorError):  # --debug keeps the traceback
        main(["report", "--results", str(tmp_path), "--debug"])


# --- settings that cannot work ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("flag", ["value_kl_factor", "covariance_weight", "value_lr", "value_weight_decay"])
def test_lifelong_refuses_a_non_finite_setting_before_loading_a_model(tmp_path, capsys, no_model, flag, value):
    # --flag=value: argparse reads a bare -inf as an option
    assert main(["lifelong", "--model_name", "tiny-gpt2", f"--{flag}={value}", "--output_dir", str(tmp_path)]) == 2
    err = _error_line(capsys)
    assert f"--{flag} must be a finite number, not {float(value)!r}" in err
    assert f"e.g. --{flag} " in err or f"leave --{flag} out" in err  # the fix
    assert not any(tmp_path.iterdir())


def test_reproduce_refuses_a_doc_path_that_can_never_be_written(tmp_path, capsys, no_model):
    blocker = tmp_path / "afile"
    blocker.write_text("a file, not a folder")
    doc = blocker / "doc.md"
    argv = ["reproduce", "--model_name", "tiny-gpt2", "--output_dir", str(tmp_path / "out"), "--doc_path", str(doc)]
    assert main(argv) == 2
    err = _error_line(capsys)
    assert f"cannot write {doc}: {blocker} is a file, not a folder; choose another --doc_path" in err
    assert not (tmp_path / "out").exists()


def test_reproduce_refuses_a_read_only_doc_folder(tmp_path, capsys, monkeypatch, no_model):
    docs = tmp_path / "docs"
    docs.mkdir()
    real_access = os.access
    # Root writes through permission bits, so the read-only folder is simulated where kis asks.
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != docs and real_access(path, mode, **kw))
    argv = ["reproduce", "--model_name", "tiny-gpt2", "--output_dir", str(tmp_path / "out")]
    assert main([*argv, "--doc_path", str(docs / "sub" / "doc.md")]) == 2
    assert f"{docs} is not writable; choose a writable --doc_path" in _error_line(capsys)
    monkeypatch.setattr(os, "access", real_access)
    # Bits that say yes while the file system says no (a read-only mount): the test file catches it.
    real_temporary = tempfile.TemporaryFile

    def read_only_mount(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == docs:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real_temporary(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only_mount)
    assert main([*argv, "--doc_path", str(docs / "doc.md")]) == 2
    err = _error_line(capsys)
    assert f"a test file in {docs} could not be made (Read-only file system)" in err and "--doc_path" in err


# --- modes -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        written = [
            _saved_result(tmp_path / "out"),  # safetensors, which writes a 0600 file of its own
            save_json(tmp_path / "x.json", {"a": 1}),
            save_npy(tmp_path / "x.npy", np.zeros(3)),
        ]
    finally:
        os.umask(previous)
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
