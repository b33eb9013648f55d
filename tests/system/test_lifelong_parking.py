"""The lifelong queue's parked checkpoints: a run in progress resumes on a fresh checkout, or starts afresh if its C
differs. Checked against kis's own checkpoint reader (kis_lens.editing.runs.load_checkpoint), not the parker's."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kis_lens.editing.runs import load_checkpoint, save_checkpoint

PARKING = Path(__file__).resolve().parents[2] / "benchmarks" / "lifelong_parking.py"
STEM = "lifelong_rome_seed0_n436_layer8_0123abcd"
METADATA = {"layer": "8", "count": "106424", "texts": "962", "model_name": '"smollm2-135m"', "d_mlp": "4"}


@pytest.fixture(scope="module")
def parking():
    spec = importlib.util.spec_from_file_location("lifelong_parking", PARKING)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_covariance(path: Path, total: torch.Tensor, reverse_keys: bool = False) -> None:
    """Write C as safetensors by hand, with the metadata keys in a chosen order (safetensors' own order is random)."""
    keys = sorted(METADATA, reverse=reverse_keys)
    data = total.to(torch.float64).contiguous().numpy().tobytes()
    header = {
        "__metadata__": {key: METADATA[key] for key in keys},
        "sum": {"dtype": "F64", "shape": list(total.shape), "data_offsets": [0, len(data)]},
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def identity(c_file: Path) -> dict:
    return {"editor": "rome", "covariance": {"8": {"file": c_file.name, "sha256": sha256(c_file)}}}


@pytest.fixture
def session(tmp_path):
    """One session's results/: a C for layer 8 and a checkpoint made under it, at 30 edits."""
    runs, stats, parked = tmp_path / "results" / "runs", tmp_path / "results" / "stats", tmp_path / "parked"
    total = torch.arange(16, dtype=torch.float64).reshape(4, 4) / 7
    c_file = stats / "layer_8_mom2.safetensors"
    write_covariance(c_file, total)
    weights = {"weight": torch.randn(3, 4)}
    save_checkpoint(runs / "layer_8", STEM, identity(c_file), weights, {"edits": list(range(30))})
    return runs, stats, parked, c_file, total, weights


def never_finished(stem: str, layer_folder: str) -> bool:
    return False


def test_a_parked_run_resumes_on_a_fresh_checkout_with_c_recomputed(parking, session, tmp_path):
    runs, stats, parked, c_file, total, weights = session
    wanted_identity = identity(c_file)
    assert parking.park(runs, stats, parked, never_finished) == [STEM]
    fresh_runs, fresh_stats = tmp_path / "fresh" / "runs", tmp_path / "fresh" / "stats"

    def recompute(layer: int) -> None:  # the same tensor, written with another header order: another file hash
        write_covariance(fresh_stats / f"layer_{layer}_mom2.safetensors", total, reverse_keys=True)

    restored = parking.unpark(fresh_runs, fresh_stats, parked, lambda *_: True, never_finished, recompute)
    assert restored == [STEM]
    recomputed = fresh_stats / "layer_8_mom2.safetensors"
    assert sha256(recomputed) == sha256(c_file)  # byte for byte the first session's C
    loaded = load_checkpoint(fresh_runs / "layer_8", STEM, wanted_identity)  # kis's reader accepts it
    assert loaded is not None
    tensors, state = loaded
    assert torch.equal(tensors["weight"], weights["weight"])
    assert state["edits"] == list(range(30))


def test_a_run_whose_recomputed_c_differs_is_not_resumed(parking, session, tmp_path):
    runs, stats, parked, c_file, total, _ = session
    parking.park(runs, stats, parked, never_finished)
    fresh_runs, fresh_stats = tmp_path / "fresh" / "runs", tmp_path / "fresh" / "stats"
    other = total.clone()
    other[1, 2] += 1e-12  # float noise from another CPU is another C all the same

    def recompute(layer: int) -> None:
        write_covariance(fresh_stats / f"layer_{layer}_mom2.safetensors", other, reverse_keys=True)

    restored = parking.unpark(fresh_runs, fresh_stats, parked, lambda *_: True, never_finished, recompute)
    assert restored == []
    assert not (fresh_runs / "layer_8").exists()
    before = (fresh_stats / "layer_8_mom2.safetensors").read_bytes()
    assert before[8:].find(b'"count"') > before[8:].find(b'"texts"')  # left as computed (reversed keys)
    assert not list(fresh_stats.glob("*.tmp"))


def test_unpark_keeps_a_checkpoint_with_as_many_edits_and_skips_finished_or_unwanted_runs(parking, session, tmp_path):
    runs, stats, parked, c_file, _, _ = session
    parking.park(runs, stats, parked, never_finished)
    fail = lambda layer: pytest.fail("C exists: nothing to compute")  # noqa: E731
    assert parking.unpark(runs, stats, parked, lambda *_: True, never_finished, fail) == []  # same 30 edits here
    assert parking.unpark(tmp_path / "x", stats, parked, lambda *_: False, never_finished, fail) == []
    assert parking.unpark(tmp_path / "x", stats, parked, lambda *_: True, lambda *_: True, fail) == []
    assert parking.unpark(tmp_path / "x", stats, parked, lambda *_: True, never_finished, fail) == [STEM]


def test_park_drops_the_checkpoint_of_a_run_that_finished(parking, session):
    runs, stats, parked, *_ = session
    parking.park(runs, stats, parked, never_finished)
    assert (parked / "layer_8" / f"{STEM}.partial.json").is_file()
    assert (parked / "covariance" / "layer_8_mom2.safetensors.header").is_file()
    assert parking.park(runs, stats, parked, lambda stem, folder: stem == STEM) == []
    assert not list((parked / "layer_8").iterdir())
    assert not list((parked / "covariance").iterdir()), "the C header of a layer no parked run needs is dropped"


def test_park_keeps_the_c_header_a_parked_run_still_needs(parking, session):
    runs, stats, parked, c_file, _, weights = session
    other = STEM.replace("rome_", "memit_")
    save_checkpoint(runs / "layer_8", other, identity(c_file), weights, {"edits": list(range(10))})
    parking.park(runs, stats, parked, never_finished)
    assert parking.park(runs, stats, parked, lambda stem, folder: stem == STEM) == [other]
    assert sorted(path.name for path in (parked / "covariance").iterdir()) == [
        "layer_8_mom2.safetensors.header",
        "layer_8_mom2.safetensors.sha256",
    ]


def test_a_checkpoint_caught_mid_save_is_copied_again(parking, session, tmp_path, monkeypatch):
    runs, stats, parked, c_file, _, _ = session
    source, target = runs / "layer_8", tmp_path / "copy"
    newer = {"weight": torch.ones(3, 4)}
    original, copies = parking._copy_atomic, []

    def copy_while_the_run_saves(src: Path, dst: Path) -> None:
        original(src, dst)
        copies.append(src.name)
        if len(copies) == 1:  # the run saves between the tensors copy and the JSON copy
            save_checkpoint(source, STEM, identity(c_file), newer, {"edits": list(range(31))})

    monkeypatch.setattr(parking, "_copy_atomic", copy_while_the_run_saves)
    assert parking.copy_checkpoint(source, target, STEM, pause=0) is True
    assert len(copies) == 4  # the mismatched pair was copied again
    tensors, state = load_checkpoint(target, STEM, identity(c_file))
    assert torch.equal(tensors["weight"], newer["weight"]) and len(state["edits"]) == 31


def test_a_pair_that_never_matches_is_reported(parking, session, tmp_path):
    runs, *_ = session
    tensors = runs / "layer_8" / f"{STEM}.partial.safetensors"
    save_file({"weight": torch.zeros(3, 4)}, str(tensors), metadata={"save_id": "another-save"})
    assert parking.copy_checkpoint(runs / "layer_8", tmp_path / "copy", STEM, attempts=2, pause=0) is False
