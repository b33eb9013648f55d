"""Bad input through the `kis` CLI: one clear KisError (problem + fix), exit 2, no traceback, nothing on disk changed.

Every case runs `kis_lens.cli.main` in-process on the tiny random GPT-2 and compares the output folder's
file tree (paths, bytes, mtimes) before and after; one subprocess check covers the real exit path and --debug.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kis_lens.cli import main
from kis_lens.errors import KisError

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["--no_progress", "--device", "cpu"]
TINY = ["--model_name", "tiny-gpt2", *QUIET]
FACT_RUN = ["--knowledge_type", "all", "--record_size", "4", "--max_tokens", "1500"]
CACHE = Path("stats") / "tiny-gpt2" / "wikipedia-offline_stats"
GOOD_FACT = {"known_id": 1, "subject": "Paris", "template": "{} is the capital of", "attribute": "France"}
BAD_INPUTS_TRIED: list[str] = []  # every case below appends its id: the count goes in the closing note


def tree(root: Path) -> dict[str, tuple]:
    """Return every file and folder under root with its bytes' hash and mtime (folders: existence only)."""
    snapshot: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_dir():
            snapshot[key] = ("dir",)
        else:
            snapshot[key] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return snapshot


def expect_clear_error(capsys, root: Path, args: list[str], *fragments: str) -> str:
    """Run the CLI; assert exit 2, one `kis: error:` line holding the fragments, no traceback, tree unchanged."""
    before = tree(root)
    code = main(args)
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    assert "Traceback" not in captured.err and captured.err.startswith("kis: error: ")
    assert captured.err.count("kis: error:") == 1
    for fragment in fragments:
        assert fragment in captured.err, captured.err
    assert tree(root) == before, "a failed command wrote or changed files"
    BAD_INPUTS_TRIED.append(" ".join(args[:1]) + ": " + fragments[0])
    return captured.err


def write_facts(path: Path, records: list | str) -> Path:
    """Write records as a JSON list (or raw text) and return the path."""
    path.write_text(records if isinstance(records, str) else json.dumps(records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory) -> Path:
    """An output folder holding a real layer-0 cache of tiny-gpt2 (from `kis cache-cov`)."""
    root = tmp_path_factory.mktemp("cached")
    assert main(["cache-cov", *TINY, "--output_dir", str(root), "--end_layer", "0", "--max_tokens", "1500"]) == 0
    assert (root / CACHE / "layer_0_mom2.safetensors").is_file()
    return root


@pytest.fixture
def output(tmp_path, cached_run) -> Path:
    """A fresh copy of the cached output folder to damage."""
    target = tmp_path / "out"
    shutil.copytree(cached_run, target)
    return target


def rewrite_cache(path: Path, change_tensor=None, **metadata) -> None:
    """Rewrite a cache in place with some metadata values (JSON-encoded) or its tensor changed."""
    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    meta.update({key: json.dumps(value) for key, value in metadata.items()})
    if change_tensor is not None:
        tensors = {key: change_tensor(value) for key, value in tensors.items()}
    save_file(tensors, str(path), metadata=meta)


FACTS_CASES = {
    "subject not in its prompt": (
        [{**GOOD_FACT, "prompt": "Berlin is the capital of"}],
        ["is not in its prompt", "fix the subject or the prompt"],
    ),
    "empty subject": ([{**GOOD_FACT, "subject": "  "}], ["the subject is empty", "non-empty subject"]),
    "prompt without {}": (
        [{**GOOD_FACT, "template": "Paris is the capital of"}],
        ["has no '{}'", "replace 'Paris' with '{}'"],
    ),
    "subject not a string": ([{**GOOD_FACT, "subject": 5}], ["subject must be a string"]),
    "record not an object": ([GOOD_FACT, 7], ["record 1", "expected a JSON object"]),
    "counterfact record without target": (
        [{"case_id": 3, "requested_rewrite": {"prompt": "{} is in", "subject": "Rome"}}],
        ["missing field 'target_true'"],
    ),
    "unknown record format": ([{"text": "hello"}], ["not a CounterFact record"]),
    "empty list": ([], ["holds no facts"]),
    "empty file": ("  \n", ["is empty", "JSON list or JSONL"]),
    "malformed JSON": ('[\n  {"subject": "Paris",\n  "template" "{} is"}\n]', ["not valid JSON at line 3"]),
}


@pytest.mark.parametrize("case", list(FACTS_CASES))
def test_bad_facts_file(tmp_path, capsys, case):
    records, fragments = FACTS_CASES[case]
    facts = write_facts(tmp_path / "facts.json", records)
    expect_clear_error(
        capsys,
        tmp_path,
        ["all", *TINY, "--output_dir", str(tmp_path / "out"), "--facts", str(facts), *FACT_RUN],
        *fragments,
    )


def test_bad_jsonl_names_the_line(tmp_path, capsys):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps(GOOD_FACT) + "\n\n{not json}\n", encoding="utf-8")
    expect_clear_error(
        capsys,
        tmp_path,
        ["all", *TINY, "--output_dir", str(tmp_path), "--facts", str(facts), *FACT_RUN],
        "facts.jsonl line 3: not valid JSON",
    )
    facts.write_bytes(b'{"subject": "Caf\xe9"}\n')
    expect_clear_error(
        capsys,
        tmp_path,
        ["all", *TINY, "--output_dir", str(tmp_path), "--facts", str(facts), *FACT_RUN],
        "is not UTF-8",
    )


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--model_name", "tiny-gtp2"], ["unknown model 'tiny-gtp2'", "Did you mean 'tiny-gpt2'"]),
        (["--end_layer", "7"], ["out of range: this model has layers 0..1"]),
        (["--start_layer", "1", "--end_layer", "0"], ["start_layer 1 is after end_layer 0"]),
        (
            ["--record_size", "1000"],
            ["record_size 1000 is larger than the 436 facts available", "--record_size 436 or fewer"],
        ),
        (["--record_size", "0"], ["record_size must be at least 1"]),
        (["--facts", "missing.json"], ["facts file missing.json not found"]),
        (["--corpus", "no-such-corpus"], ["corpus 'no-such-corpus' is not"]),
        (["--batch_token", "64"], ["--batch_token 64 is smaller than one sequence", "--batch_token 256 or more"]),
    ],
    ids=[
        "unknown-model",
        "layer-out-of-range",
        "start-after-end",
        "record-size",
        "record-size-0",
        "facts-missing",
        "corpus-missing",
        "batch-token",
    ],
)
def test_bad_run_options(tmp_path, capsys, args, fragments):
    command = ["all", "--model_name", "tiny-gpt2", *QUIET, "--output_dir", str(tmp_path), *FACT_RUN]
    expect_clear_error(capsys, tmp_path, [*command, *args], *fragments)


def test_empty_corpus_and_texts_empty_after_tokenization(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    out = tmp_path / "out"
    expect_clear_error(
        capsys, tmp_path, ["cache-cov", *TINY, "--output_dir", str(out), "--corpus", str(empty)], "is empty"
    )
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": ""}\n{"text": ""}\n', encoding="utf-8")
    expect_clear_error(
        capsys, tmp_path, ["cache-cov", *TINY, "--output_dir", str(out), "--corpus", str(blank)], "gave no tokens"
    )
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9\n")
    expect_clear_error(
        capsys, tmp_path, ["cache-cov", *TINY, "--output_dir", str(out), "--corpus", str(latin)], "is not UTF-8"
    )
    assert not out.exists()


def test_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for command in (["all", *FACT_RUN], ["cache-cov", "--max_tokens", "1500"]):
        expect_clear_error(
            capsys, tmp_path, [*command, *TINY, "--output_dir", str(blocker / "out")], "is a file, not a folder"
        )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission bits")
def test_read_only_output_dir(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    expect_clear_error(
        capsys, tmp_path, ["all", *TINY, *FACT_RUN, "--output_dir", str(locked / "out")], "is not writable"
    )


def zero_row_and_column(matrix: torch.Tensor, index: int = 5) -> torch.Tensor:
    """Return the matrix with one row and column zeroed: exactly singular."""
    matrix = matrix.clone()
    matrix[index, :] = 0
    matrix[:, index] = 0
    return matrix


def test_singular_covariance_names_the_ridge(output, capsys):
    rewrite_cache(output / CACHE / "layer_0_mom2.safetensors", change_tensor=zero_row_and_column)
    run = ["p-matrix", *TINY, "--output_dir", str(output), "--end_layer", "0", *FACT_RUN]
    expect_clear_error(
        capsys, output, run, "layer 0's covariance C is singular or not positive definite", "--ridge 1e-6"
    )
    assert main([*run, "--ridge", "1e-3"]) == 0  # the named fix works


@pytest.mark.parametrize(
    "damage, fragments",
    [
        (
            lambda path: rewrite_cache(path, change_tensor=lambda t: t.index_fill(0, torch.tensor([3]), float("nan"))),
            ["contains NaN or inf"],
        ),
        (
            lambda path: rewrite_cache(path, change_tensor=lambda t: torch.full_like(t, float("inf"))),
            ["contains NaN or inf"],
        ),
        (
            lambda path: rewrite_cache(path, change_tensor=lambda t: -torch.eye(t.shape[0], dtype=t.dtype)),
            ["not positive definite", "--ridge"],
        ),
        (
            lambda path: rewrite_cache(path, model_name="gpt2-small"),
            ["was made for model_name='gpt2-small', not 'tiny-gpt2'"],
        ),
        (lambda path: rewrite_cache(path, hook="blocks.0.mlp.hook_pre"), ["was made for hook='blocks.0.mlp.hook_pre'"]),
        (lambda path: rewrite_cache(path, d_mlp=128), ["was made for d_mlp=128, not 256"]),
        (lambda path: rewrite_cache(path, model_fingerprint="0123456789abcdef"), ["was made for model_fingerprint="]),
        (
            lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
            ["corrupt or truncated", "delete it"],
        ),
        (lambda path: path.write_bytes(b"\x00" * 64), ["corrupt or truncated"]),
        (lambda path: path.write_bytes(b""), ["corrupt or truncated"]),
    ],
    ids=[
        "nan",
        "inf",
        "not-positive-definite",
        "other-model",
        "other-hook",
        "other-d_mlp",
        "other-weights",
        "truncated",
        "garbage",
        "empty-file",
    ],
)
@pytest.mark.slow
def test_damaged_or_foreign_cache(output, capsys, damage, fragments):
    damage(output / CACHE / "layer_0_mom2.safetensors")
    run = ["p-matrix", *TINY, "--output_dir", str(output), "--end_layer", "0", *FACT_RUN]
    expect_clear_error(capsys, output, run, *fragments)


def test_cache_of_another_layer(output, capsys):
    shutil.copy(output / CACHE / "layer_0_mom2.safetensors", output / CACHE / "layer_1_mom2.safetensors")
    run = ["p-matrix", *TINY, "--output_dir", str(output), "--start_layer", "1", "--end_layer", "1", *FACT_RUN]
    expect_clear_error(capsys, output, run, "was made for layer=0, not 1")


def test_cache_metadata_that_does_not_parse(output, capsys):
    path = output / CACHE / "layer_0_mom2.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        meta, tensors = dict(handle.metadata()), {name: handle.get_tensor(name) for name in handle.keys()}
    save_file(tensors, str(path), metadata={**meta, "layer": "{not json"})
    run = ["p-matrix", *TINY, "--output_dir", str(output), "--end_layer", "0", *FACT_RUN]
    expect_clear_error(capsys, output, run, "metadata that does not parse", "delete it")
    expect_clear_error(capsys, output, ["export-stats", str(path), "--output", str(output / "x.npz")], "does not parse")


def test_stats_commands_bad_input(output, tmp_path, capsys):
    cache = output / CACHE / "layer_0_mom2.safetensors"
    expect_clear_error(
        capsys,
        tmp_path,
        ["merge-stats", str(cache.parent), "--output_dir", str(tmp_path / "m")],
        "only one input has layer_0_mom2",
    )
    expect_clear_error(
        capsys,
        tmp_path,
        ["merge-stats", str(tmp_path / "nothing"), str(cache), "--output_dir", str(tmp_path / "m")],
        "is neither a cache file",
    )
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **{"mom2.mom2": np.array([{"evil": 1}], dtype=object), "mom2.count": np.array(3)})
    expect_clear_error(
        capsys,
        tmp_path,
        [
            "import-stats",
            str(pickled),
            "--model_name",
            "tiny-gpt2",
            "--layer",
            "0",
            "--output_dir",
            str(tmp_path / "i"),
        ],
        "without pickle",
    )
    expect_clear_error(
        capsys,
        tmp_path,
        ["cache-cov", *TINY, "--output_dir", str(tmp_path / "c"), "--max_memory", "lots"],
        "cannot read 'lots' as a memory size",
    )
    expect_clear_error(
        capsys,
        tmp_path,
        ["cache-cov", *TINY, "--output_dir", str(tmp_path / "c"), "--sample_size", "0"],
        "sample_size must be at least 1",
    )


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path):
    assert pytest.raises(KisError, main, ["all", *TINY, "--output_dir", str(tmp_path), "--end_layer", "9", "--debug"])
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "kis_lens.cli",
            "all",
            *TINY,
            "--output_dir",
            str(tmp_path),
            "--end_layer",
            "9",
            "--debug",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert completed.returncode != 0
    assert (
        "Traceback" in completed.stderr
        and "KisError: layer(s) [2, 3, 4, 5, 6, 7, 8, 9] out of range" in completed.stderr
    )
    assert not list(tmp_path.rglob("*"))
