"""Run identities, stems, per-run locks and pickle-free checkpoints (kis_lens.editing.runs)."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from kis_lens.editing import runs
from kis_lens.editing.runs import (
    content_sha256,
    find_pickle_checkpoints,
    identity_hash,
    load_checkpoint,
    remove_checkpoint,
    run_identity,
    run_lock,
    run_stem,
    safetensors_content_sha256,
    save_checkpoint,
)
from kis_lens.errors import KisError
from kis_lens.io import TEMP_GLOB

STEM = "rome_seed0_n8_layer1_0123abcd"


def settings(**changes):
    """A lifelong run's settings as the caller builds them; keyword changes replace top-level fields."""
    base = {
        "editor": "rome",
        "config": {"seed": 0, "n_edits": 8, "layer": 1, "value_lr": 0.5, "facts": "facts.json"},
        "model_fingerprint": "tiny-gpt2:abc123",
        "facts_sha256": "f" * 64,
        "covariance": {"identity": {"layer": 1, "corpus": "wiki"}, "tokens": 100000},
        "kis_lens_version": "0.5.0",
    }
    base.update(changes)
    return base


def example_tensors():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 7, dtype=torch.float64, generator=generator)
    return {
        "weight": weight,
        "weight_t": weight.T,  # non-contiguous and sharing weight's storage: safetensors refuses both unless copied
        "keys": torch.randn(3, 4, dtype=torch.float32, generator=generator),
        "order": torch.tensor([3, 1, 2], dtype=torch.int64),
    }


def example_state():
    return {
        "done": 4,
        "seconds": 1.25,
        "update_of": [0, 1, 2, 3],
        "steps": [{"n_edits": 0, "efficacy": None, "perplexity": 12.5}, {"n_edits": 4, "perplexity": float("inf")}],
    }


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.contiguous().numpy().tobytes() == b.numpy().tobytes()


class TouchOnUnpickle:
    """Unpickling this creates `marker`: a stand-in for a checkpoint crafted to run code when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


# --- round trip ---------------------------------------------------------------------------------------------------


def test_round_trip_is_bitwise_and_keeps_dtypes(tmp_path):
    tensors, state = example_tensors(), example_state()
    save_checkpoint(tmp_path, STEM, settings(), tensors, state)
    loaded = load_checkpoint(tmp_path, STEM, settings())
    assert loaded is not None
    got, got_state = loaded
    assert set(got) == set(tensors)
    for name, tensor in tensors.items():
        assert same_bits(tensor, got[name]), name
    assert got["weight"].dtype == torch.float64 and got["keys"].dtype == torch.float32
    assert got_state == state


def test_checkpoint_files_are_safetensors_and_json_named_by_stem(tmp_path):
    tensors_path, state_path = save_checkpoint(tmp_path, STEM, settings(), example_tensors(), example_state())
    assert (tensors_path.name, state_path.name) == (f"{STEM}.partial.safetensors", f"{STEM}.partial.json")
    payload = json.loads(state_path.read_text())
    assert payload["format"] == 1 and payload["identity_hash"] == identity_hash(settings())
    assert payload["identity"] == run_identity(settings())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([tensors_path.name, state_path.name])


def test_tensors_on_save_are_copied_not_aliased(tmp_path):
    tensors = example_tensors()
    before = tensors["weight"].clone()
    save_checkpoint(tmp_path, STEM, settings(), tensors, example_state())
    got, _ = load_checkpoint(tmp_path, STEM, settings())
    got["weight"] += 1
    assert torch.equal(tensors["weight"], before)


# --- resume only the same identity --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"facts_sha256": "e" * 64}, "facts_sha256"),
        ({"covariance": {"identity": {"layer": 1, "corpus": "wiki"}, "tokens": 200000}}, "covariance"),
        ({"kis_lens_version": "0.5.1"}, "kis_lens_version"),
        ({"config": {"seed": 0, "n_edits": 8, "layer": 1, "value_lr": 0.25, "facts": "facts.json"}}, "config"),
        ({"model_fingerprint": "tiny-gpt2:def456"}, "model_fingerprint"),
    ],
)
def test_checkpoint_of_another_identity_is_not_resumed(tmp_path, changes, field):
    save_checkpoint(tmp_path, STEM, settings(), example_tensors(), example_state())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_checkpoint(tmp_path, STEM, settings(**changes)) is None
    (message,) = [str(warning.message) for warning in caught]
    assert message.endswith(f"checkpoint was made with other {field}: starting afresh")  # that field and no other


def test_mismatch_is_decided_before_the_tensors_are_opened(tmp_path):
    tensors_path, _ = save_checkpoint(tmp_path, STEM, settings(), example_tensors(), example_state())
    tensors_path.write_bytes(b"garbage")  # would raise if it were read
    with pytest.warns(UserWarning, match="facts_sha256"):
        assert load_checkpoint(tmp_path, STEM, settings(facts_sha256="0" * 64)) is None


def test_same_identity_in_another_key_order_with_tuples_resumes(tmp_path):
    save_checkpoint(tmp_path, STEM, settings(), example_tensors(), example_state())
    reordered = dict(reversed(list(settings().items())))
    reordered["config"] = dict(reversed(list(reordered["config"].items())))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_checkpoint(tmp_path, STEM, reordered) is not None


def test_no_checkpoint_loads_as_none(tmp_path):
    assert load_checkpoint(tmp_path, STEM, settings()) is None
    assert load_checkpoint(tmp_path / "missing", STEM, settings()) is None


# --- identity -----------------------------------------------------------------------------------------------------


def test_identity_ignores_key_order_and_tuple_versus_list():
    a = {"b": 1, "a": {"y": (1, 2, (3, 4)), "x": 0.1}}
    b = {"a": {"x": 0.1, "y": [1, 2, [3, 4]]}, "b": 1}
    assert run_identity(a) == run_identity(b) == {"a": {"x": 0.1, "y": [1, 2, [3, 4]]}, "b": 1}
    assert list(run_identity(a)) == ["a", "b"] and list(run_identity(a)["a"]) == ["x", "y"]
    assert identity_hash(a) == identity_hash(b)
    json.dumps(run_identity(a))  # JSON-able


@pytest.mark.parametrize(
    "changes",
    [
        {"editor": "memit"},
        {"config": {"seed": 1, "n_edits": 8, "layer": 1, "value_lr": 0.5, "facts": "facts.json"}},
        {"config": {"seed": 0, "n_edits": 8, "layer": 1, "value_lr": 0.5 + 2**-52, "facts": "facts.json"}},
        {"config": {"seed": 0, "n_edits": 8, "layer": 1, "value_lr": 0.5, "facts": "facts.json", "extra": None}},
        {"covariance": {"identity": {"layer": 1, "corpus": "wiki"}, "tokens": 100001}},
        {"covariance": {"identity": {"layer": 2, "corpus": "wiki"}, "tokens": 100000}},
        {"facts_sha256": "f" * 63 + "e"},
        {"kis_lens_version": "0.5.0+dirty"},
        {"model_fingerprint": None},
    ],
)
def test_identity_hash_changes_with_any_value(changes):
    assert identity_hash(settings(**changes)) != identity_hash(settings())


def test_identity_keeps_floats_exact_and_types_apart():
    assert identity_hash({"x": 0.1 + 0.2}) != identity_hash({"x": 0.3})
    assert identity_hash({"x": 1}) != identity_hash({"x": 1.0}) != identity_hash({"x": True})
    assert run_identity({"x": 0.1 + 0.2})["x"] == 0.1 + 0.2
    assert json.loads(json.dumps(run_identity({"x": float("inf")}))) == {"x": float("inf")}


@pytest.mark.parametrize(
    "bad",
    [
        {"path": Path("facts.json")},
        {"array": np.zeros(2)},
        {"set": {1, 2}},
        {"nested": {1: "int key"}},
        {"t": object()},
    ],
)
def test_identity_refuses_values_json_cannot_hold(bad):
    with pytest.raises(KisError, match="JSON"):
        run_identity(bad)


# --- stems --------------------------------------------------------------------------------------------------------


def test_run_stem_is_readable_and_unique_per_identity():
    stem0 = run_stem("rome", settings(), {"seed": 0, "n": 436, "layer": 4})
    assert re.fullmatch(r"rome_seed0_n436_layer4_[0-9a-f]{8}", stem0)
    assert stem0.endswith(identity_hash(settings())[:8])
    other_seed = settings(config={**settings()["config"], "seed": 1})
    assert run_stem("rome", other_seed, {"seed": 0, "n": 436, "layer": 4}) != stem0  # same readable part


@pytest.mark.parametrize("editor", ["rome", "alpha edit/../x", ".hidden"])
def test_run_stem_uses_only_safe_characters(editor):
    stem = run_stem(editor, settings(), {"facts": "../data/my facts.json", "lr": 0.5, "ok": None})
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", stem) and "/" not in stem and ".." not in stem


@pytest.mark.parametrize("editor", ["///", "é", ""])
def test_run_stem_refuses_an_editor_without_letters(editor):
    with pytest.raises(KisError, match="editor"):
        run_stem(editor, settings(), {"seed": 0})


@pytest.mark.slow
def test_run_stem_is_the_same_in_other_processes():
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); from test_runs import settings; "
        "from kis_lens.editing.runs import run_stem; print(run_stem('rome', settings(), {'seed': 0}))"
    )
    here = run_stem("rome", settings(), {"seed": 0})
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code, str(Path(__file__).parent)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip() == here


def test_identity_hash_is_sha256_of_sorted_compact_json():
    expected = hashlib.sha256(b'{"a":[1,2],"b":{"c":0.1}}').hexdigest()
    assert identity_hash({"b": {"c": 0.1}, "a": (1, 2)}) == expected


# --- never unpickle -----------------------------------------------------------------------------------------------


def _live_pickle(tmp_path: Path, marker: Path) -> bytes:
    """A pickle whose loading touches marker; checked live on a sibling marker so the test cannot pass vacuously."""
    probe = tmp_path / "probe_marker"
    pickle.loads(pickle.dumps(TouchOnUnpickle(probe)))
    assert probe.exists()
    return pickle.dumps({"identity": settings(), "state": TouchOnUnpickle(marker)})


def test_legacy_pickle_checkpoint_is_listed_but_never_loaded(tmp_path):
    marker = tmp_path / "pwned"
    out = tmp_path / "out"
    out.mkdir()
    legacy = out / f"{STEM}.partial.pt"
    legacy.write_bytes(_live_pickle(tmp_path, marker))
    torch.save({"state": TouchOnUnpickle(marker)}, out / "memit_other.partial.pt")
    assert load_checkpoint(out, STEM, settings()) is None
    save_checkpoint(out, STEM, settings(), example_tensors(), example_state())
    assert load_checkpoint(out, STEM, settings()) is not None
    assert find_pickle_checkpoints(out) == [out / "memit_other.partial.pt", legacy]
    remove_checkpoint(out, STEM)
    assert not marker.exists()
    assert legacy.exists()  # listed for the caller to warn about, not deleted behind the user's back


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_disguised_as_safetensors_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned"
    out = tmp_path / "out"
    tensors_path, _ = save_checkpoint(out, STEM, settings(), example_tensors(), example_state())
    if writer == "pickle":
        tensors_path.write_bytes(_live_pickle(tmp_path, marker))
    else:
        torch.save({"weight": TouchOnUnpickle(marker)}, tensors_path)
    with pytest.raises(KisError, match=r"is unreadable .*: delete it to start afresh"):
        load_checkpoint(out, STEM, settings())
    assert not marker.exists()


def test_find_pickle_checkpoints_of_a_missing_folder_is_empty(tmp_path):
    assert find_pickle_checkpoints(tmp_path / "missing") == []


# --- damaged files ------------------------------------------------------------------------------------------------


def _damage_json(text: str) -> str:
    return text[: len(text) // 2]


def _binary(text: str) -> bytes:
    return b"\xff\xfe\x00garbage"


def _tamper_identity(text: str) -> str:
    payload = json.loads(text)
    payload["identity"]["facts_sha256"] = "0" * 64  # identity_hash left as it was
    return json.dumps(payload)


def _drop(key: str):
    def drop(text: str) -> str:
        payload = json.loads(text)
        del payload[key]
        return json.dumps(payload)

    return drop


@pytest.mark.parametrize(
    "damage",
    [
        _damage_json,
        lambda text: "[1, 2]",
        _binary,
        _tamper_identity,
        _drop("state"),
        _drop("save_id"),
        _drop("format"),
    ],
    ids=["truncated", "not-an-object", "binary", "tampered-identity", "no-state", "no-save-id", "no-format"],
)
def test_damaged_json_is_a_kis_error_saying_delete_it(tmp_path, damage):
    _, state_path = save_checkpoint(tmp_path, STEM, settings(), example_tensors(), example_state())
    damaged = damage(state_path.read_text())
    state_path.write_bytes(damaged if isinstance(damaged, bytes) else damaged.encode())
    with pytest.raises(KisError, match=rf"checkpoint {re.escape(str(state_path))} is unreadable .*delete it"):
        load_checkpoint(tmp_path, STEM, settings())


@pytest.mark.parametrize("keep", [0, 7, 8, 100, -1])
def test_truncated_safetensors_is_a_kis_error_saying_delete_it(tmp_path, keep):
    tensors_path, _ = save_checkpoint(tmp_path, STEM, settings(), example_tensors(), example_state())
    data = tensors_path.read_bytes()
    tensors_path.write_bytes(data[:keep])
    with pytest.raises(KisError, match=r"is unreadable .*: delete it to start afresh"):
        load_checkpoint(tmp_path, STEM, settings())


def test_missing_or_foreign_tensors_are_a_kis_error(tmp_path):
    tensors_path, _ = save_checkpoint(tmp_path, STEM, settings(), example_tensors(), example_state())
    other = tmp_path / "other"
    other_tensors, _ = save_checkpoint(other, STEM, settings(facts_sha256="0" * 64), example_tensors(), {})
    os.replace(other_tensors, tensors_path)
    with pytest.raises(KisError, match="another run.*delete it"):
        load_checkpoint(tmp_path, STEM, settings())
    tensors_path.unlink()
    with pytest.raises(KisError, match="missing.*delete it"):
        load_checkpoint(tmp_path, STEM, settings())


# --- atomicity ----------------------------------------------------------------------------------------------------


def _failing_save_file(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"half a safetensors file")
    raise OSError(28, "No space left on device")


def test_failed_tensor_write_leaves_no_json_and_no_temp_files(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "save_file", _failing_save_file)
    with pytest.raises(KisError, match="disk is full"):
        save_checkpoint(tmp_path, STEM, settings(), example_tensors(), example_state())
    assert not (tmp_path / f"{STEM}.partial.json").exists()
    assert list(tmp_path.glob(TEMP_GLOB)) == [] and list(tmp_path.iterdir()) == []
    assert load_checkpoint(tmp_path, STEM, settings()) is None


def test_failed_tensor_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, STEM, settings(), example_tensors(), example_state())
    monkeypatch.setattr(runs, "save_file", _failing_save_file)
    changed = {name: tensor + 1 for name, tensor in example_tensors().items()}
    with pytest.raises(KisError):
        save_checkpoint(tmp_path, STEM, settings(), changed, {"done": 99})
    tensors, state = load_checkpoint(tmp_path, STEM, settings())
    assert state == example_state() and same_bits(tensors["weight"], example_tensors()["weight"])
    assert list(tmp_path.glob(TEMP_GLOB)) == []


def test_save_interrupted_between_the_two_files_is_not_resumed(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, STEM, settings(), example_tensors(), example_state())

    def crash(path, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "save_json", crash)
    changed = {name: tensor + 1 for name, tensor in example_tensors().items()}
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, STEM, settings(), changed, {"done": 99})
    # New tensors beside the old state: resuming them together would mix two points of the run.
    with pytest.warns(UserWarning, match="interrupted"):
        assert load_checkpoint(tmp_path, STEM, settings()) is None


def test_remove_checkpoint_removes_both_files(tmp_path):
    save_checkpoint(tmp_path, STEM, settings(), example_tensors(), example_state())
    save_checkpoint(tmp_path, "memit_x", settings(), example_tensors(), example_state())
    remove_checkpoint(tmp_path, STEM)
    remove_checkpoint(tmp_path, STEM)  # twice is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memit_x.partial.json", "memit_x.partial.safetensors"]


@pytest.mark.parametrize("stem", ["../escape", "a/b", ".hidden", "", "x..y"])
def test_unsafe_stems_are_refused(tmp_path, stem):
    with pytest.raises(KisError, match="run_stem"):
        save_checkpoint(tmp_path, stem, settings(), example_tensors(), example_state())
    with pytest.raises(KisError, match="run_stem"):
        load_checkpoint(tmp_path, stem, settings())


def test_state_that_json_cannot_hold_is_refused_before_writing(tmp_path):
    with pytest.raises(KisError, match=r"state\.pairs is a ndarray"):
        save_checkpoint(tmp_path, STEM, settings(), example_tensors(), {"pairs": np.zeros(3)})
    with pytest.raises(KisError, match="torch tensors"):
        save_checkpoint(tmp_path, STEM, settings(), {"weight": np.zeros(3)}, {})
    assert list(tmp_path.iterdir()) == []


# --- content hash -------------------------------------------------------------------------------------------------


def test_content_sha256_hashes_the_bytes(tmp_path):
    path = tmp_path / "facts.json"
    path.write_bytes(b'[{"subject": "x"}]')
    assert content_sha256(path) == content_sha256(str(path)) == hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_bytes(b'[{"subject": "y"}]')
    assert content_sha256(path) != hashlib.sha256(b'[{"subject": "x"}]').hexdigest()
    with pytest.raises(KisError, match="cannot read"):
        content_sha256(tmp_path / "missing.json")


# The tensors and metadata of a small C-like file: two dtypes, a 2-D and a 1-D tensor, metadata as kis writes it.
CONTENT_TENSORS = {
    "sum": torch.arange(12, dtype=torch.float64).reshape(3, 4) / 7,
    "count": torch.tensor([3.5, -1.0], dtype=torch.float32),
}
CONTENT_METADATA = {"model_name": '"tiny"', "layer": "4", "count": "106424", "texts": "962"}
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32"}


def _write_by_hand(path: Path, tensors: dict, metadata: dict) -> None:
    """Write a safetensors file with its header keys, and its data, in the reverse of sorted order: the format is an
    8-byte little-endian header length, the header JSON, then the raw little-endian bytes at the given offsets."""
    header, data = {}, b""
    for name in sorted(tensors, reverse=True):
        raw = tensors[name].numpy().tobytes()
        shape = list(tensors[name].shape)
        header[name] = {"shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        header[name]["dtype"] = SAFETENSORS_DTYPES[tensors[name].dtype]
        data += raw
    header["__metadata__"] = dict(sorted(metadata.items(), reverse=True))
    text = json.dumps(header).encode("utf-8")
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def _reference_content_hash(tensors: dict, metadata: dict) -> str:
    """The canonical form written out independently: sorted compact metadata JSON, then per tensor in name order the
    compact JSON [name, dtype, shape, byte count] and its raw bytes."""
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    for name in sorted(tensors):
        raw = tensors[name].numpy().tobytes()
        dtype, shape = SAFETENSORS_DTYPES[tensors[name].dtype], list(tensors[name].shape)
        digest.update(json.dumps([name, dtype, shape, len(raw)], separators=(",", ":")).encode("utf-8"))
        digest.update(raw)
    return digest.hexdigest()


def test_the_content_hash_does_not_depend_on_the_header_order(tmp_path):
    """One content written by safetensors and by hand in another order: two file hashes, one content hash."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    library, by_hand = tmp_path / "library.safetensors", tmp_path / "by_hand.safetensors"
    save_file(CONTENT_TENSORS, str(library), metadata=CONTENT_METADATA)
    _write_by_hand(by_hand, CONTENT_TENSORS, CONTENT_METADATA)
    with safe_open(str(by_hand), framework="pt") as handle:  # the hand-written file is a valid safetensors file
        assert handle.metadata() == CONTENT_METADATA
        assert all(torch.equal(handle.get_tensor(name), CONTENT_TENSORS[name]) for name in CONTENT_TENSORS)
    assert content_sha256(library) != content_sha256(by_hand)
    expected = _reference_content_hash(CONTENT_TENSORS, CONTENT_METADATA)
    assert safetensors_content_sha256(library) == safetensors_content_sha256(str(by_hand)) == expected


def test_the_content_hash_changes_with_one_element_or_one_metadata_value(tmp_path):
    path = tmp_path / "c.safetensors"
    _write_by_hand(path, CONTENT_TENSORS, CONTENT_METADATA)
    unchanged = safetensors_content_sha256(path)
    changed = {**CONTENT_TENSORS, "sum": CONTENT_TENSORS["sum"].clone()}
    changed["sum"][2, 3] = torch.nextafter(changed["sum"][2, 3], torch.tensor(10.0, dtype=torch.float64))
    _write_by_hand(path, changed, CONTENT_METADATA)
    assert safetensors_content_sha256(path) == _reference_content_hash(changed, CONTENT_METADATA) != unchanged
    _write_by_hand(path, CONTENT_TENSORS, {**CONTENT_METADATA, "texts": "963"})
    other = safetensors_content_sha256(path)
    assert other == _reference_content_hash(CONTENT_TENSORS, {**CONTENT_METADATA, "texts": "963"}) != unchanged
    renamed = {"mom2" if name == "sum" else name: tensor for name, tensor in CONTENT_TENSORS.items()}
    _write_by_hand(path, renamed, CONTENT_METADATA)
    assert safetensors_content_sha256(path) not in (unchanged, other)


def test_an_unreadable_safetensors_file_is_named_with_the_fix(tmp_path):
    with pytest.raises(KisError, match="cannot read .*missing.safetensors.*check that the file exists"):
        safetensors_content_sha256(tmp_path / "missing.safetensors")
    whole = tmp_path / "whole.safetensors"
    _write_by_hand(whole, CONTENT_TENSORS, CONTENT_METADATA)
    damaged = {
        "garbage": b"not a safetensors file at all",
        "short": b"\x05\x00",
        "truncated": whole.read_bytes()[:-5],  # the last tensor's bytes run past the end
        "bad_entry": (11).to_bytes(8, "little") + b'{"a": [1]}\n',
    }
    for name, content in damaged.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(KisError, match=f"{name}.safetensors is not a readable safetensors file.*delete it"):
            safetensors_content_sha256(path)


# --- locks --------------------------------------------------------------------------------------------------------

HOLDER = """
import sys
from kis_lens.editing.runs import run_lock
with run_lock(sys.argv[1], sys.argv[2]):
    print("locked", flush=True)
    sys.stdin.readline()
"""


@pytest.mark.slow
def test_run_lock_excludes_another_process_for_the_same_stem_only(tmp_path):
    folder = tmp_path / "new" / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), STEM], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(KisError, match=r"is being written by another process \(lock .*\): wait for it or use"):
            with run_lock(folder, STEM):
                pass
        with run_lock(folder, "memit_seed0_0123abcd") as lock_path:  # another run in the same folder goes on
            assert lock_path.exists()
        assert (folder / f".{STEM}.lock").exists()  # the holder's lock survived the failed attempt
    finally:
        holder.communicate("done\n", timeout=60)
    assert holder.returncode == 0
    with run_lock(folder, STEM):  # free again once the holder is done
        pass
    assert not (tmp_path / "new").exists()  # folders it made and left empty are removed with the lock file


def test_run_lock_leaves_a_folder_with_results_and_no_lock_file(tmp_path):
    with run_lock(tmp_path, STEM) as lock_path:
        save_checkpoint(tmp_path, STEM, settings(), example_tensors(), example_state())
    assert not lock_path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{STEM}.partial.json", f"{STEM}.partial.safetensors"]


def test_stale_checkpoints_name_the_runs_a_changed_input_leaves_behind(tmp_path):
    """A checkpoint with the same readable stem but another identity is listed with the fields that differ."""
    old = run_identity(settings())
    new = run_identity(settings(facts_sha256="e" * 64))
    readable = {"seed": 0, "n": 8, "layer": 1}
    old_stem, new_stem = run_stem("rome", old, readable), run_stem("rome", new, readable)
    save_checkpoint(tmp_path, old_stem, old, example_tensors(), example_state())
    other_seed = run_identity(settings(config={"seed": 1}))
    save_checkpoint(tmp_path, run_stem("rome", other_seed, {"seed": 1, "n": 8, "layer": 1}), other_seed, {}, {})
    stale = runs.stale_checkpoints(tmp_path, new_stem, new)
    assert [(path.name, fields) for path, fields in stale] == [(f"{old_stem}.partial.json", ["facts_sha256"])]
    assert runs.stale_checkpoints(tmp_path, old_stem, old) == []  # its own checkpoint is not stale
