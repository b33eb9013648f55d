"""Model resolution, names, BOS convention, fingerprints, and the real offline SmolLM2-135M."""

from __future__ import annotations

import pytest
import torch

from kis_lens.errors import KisError
from kis_lens.fingerprint import model_fingerprint
from kis_lens.hooks import capture_mlp_inputs
from kis_lens.models import (
    MODEL_ALIASES,
    load_model,
    model_info,
    model_slug,
    refresh_model_info,
)
from kis_lens.tiny import tiny_model
from kis_lens.w_out import output_weight


def test_original_names_are_aliases_of_hub_names():
    assert MODEL_ALIASES["gpt2-small"] == "gpt2"
    assert MODEL_ALIASES["llama2-7b"] == "meta-llama/Llama-2-7b-hf"
    assert MODEL_ALIASES["pythia-6.9b"] == "EleutherAI/pythia-6.9b"
    assert model_slug("EleutherAI/pythia-1b") == "pythia-1b" and model_slug("/some/dir/my-model/") == "my-model"


def test_unknown_model_suggests_close_names():
    with pytest.raises(KisError, match="unknown model 'smollm2-13m'.*Did you mean 'smollm2-135m'"):
        load_model("smollm2-13m")


def test_non_model_objects_are_refused():
    with pytest.raises(KisError, match="not a TransformerLens model"):
        load_model(torch.nn.Linear(2, 2))


def test_model_objects_pass_through(tiny):
    assert load_model(tiny) is tiny
    info = model_info(tiny)
    assert (info.n_layers, info.d_mlp) == (3, 256)


def test_tiny_models_by_name():
    model = load_model("tiny-llama", device="cpu")
    assert model_info(model).name == "tiny-llama" and model_info(model).adds_bos is False


def test_fingerprint_tells_weights_apart():
    a, b, a_again = tiny_model("gpt2", seed=0), tiny_model("gpt2", seed=1), tiny_model("gpt2", seed=0)
    assert model_fingerprint(a) == model_fingerprint(a_again) != model_fingerprint(b)


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_is_a_real_pretrained_model(smollm2):
    tokenizer = smollm2.tokenizer
    info = model_info(smollm2)
    assert (info.name, info.n_layers, info.d_mlp, info.d_model) == ("smollm2-135m", 30, 1536, 576)
    assert info.adds_bos is False  # the GGUF tokenizer adds no BOS
    ids = torch.tensor([tokenizer("The Eiffel Tower is located in the city of", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = smollm2(ids)
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"
    acts = capture_mlp_inputs(smollm2, ids, [0, 29])
    assert acts[29].shape == (1, ids.shape[1], 1536)


@pytest.mark.slow
@pytest.mark.smollm2
def test_packaged_gguf_is_converted_once_and_reloads_identically(smollm2, tmp_path, monkeypatch):
    """The first load dequantises the GGUF to a hash-named safetensors folder; later loads read it and match bitwise."""
    from kis_lens import gguf as gguf_module
    from kis_lens.gguf import converted_gguf_dir, file_sha256
    from kis_lens.models import _packaged_gguf_path

    monkeypatch.setenv("KIS_LENS_CACHE", str(tmp_path))
    gguf = _packaged_gguf_path("smollm2-135m")
    folder = converted_gguf_dir("smollm2-135m", gguf)
    assert folder.parent == tmp_path / "converted" and folder.name.endswith(file_sha256(gguf)[:16])
    read_gguf, gguf_tokenizers = gguf_module._read_gguf, []

    def recording_read_gguf(*args):
        tokenizer, hf_model = read_gguf(*args)
        gguf_tokenizers.append(tokenizer)  # the GGUF's own tokenizer, what the converting load used to boot with
        return tokenizer, hf_model

    monkeypatch.setattr(gguf_module, "_read_gguf", recording_read_gguf)
    first = load_model("smollm2-135m", device="cpu")  # reads the GGUF itself, then writes the folder
    assert len(gguf_tokenizers) == 1
    assert (folder / "model.safetensors").is_file() and not list(folder.parent.glob(".*.tmp"))
    second = load_model("smollm2-135m", device="cpu")  # reads the folder
    assert len(gguf_tokenizers) == 1
    _assert_same_tokenization(first, second, gguf_tokenizers[0])
    ids = torch.tensor([smollm2.tokenizer("The Eiffel Tower is located in the city of")["input_ids"]])
    assert second.tokenizer("The Eiffel Tower is located in the city of")["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(first(ids), second(ids))
    for layer in (0, 29):
        assert torch.equal(output_weight(first, layer).view(), output_weight(second, layer).view())
    assert model_info(first) == model_info(second)


def _assert_same_tokenization(first, second, gguf_tokenizer):
    """The converting and the cached load tokenize alike, raw and through kis_lens (as the GGUF's tokenizer does)."""
    from kis_lens.models import resolve_prepend_bos
    from kis_lens.tokens import encode

    # The model's own convention (what the GGUF tokenizer does) is recorded the same both ways: no BOS.
    assert model_info(first).adds_bos is model_info(second).adds_bos is False
    # The bridge's tokenizer follows TransformerLens (reloaded with add_bos_token=True), as for tiny and hub models.
    bos = first.tokenizer.bos_token_id
    assert first.tokenizer("a")["input_ids"] == second.tokenizer("a")["input_ids"] == [bos, 81]
    assert first.cfg.tokenizer_prepends_bos == second.cfg.tokenizer_prepends_bos
    texts = ["a", "The Eiffel Tower is located in the city of", " Zürich\n\tnaïve 東京 <|im_start|>x<|im_end|> 12345"]
    if hasattr(first, "to_tokens"):
        for text in texts:
            for prepend_bos in (None, True, False):
                assert torch.equal(first.to_tokens(text, prepend_bos=prepend_bos), second.to_tokens(text, prepend_bos))
    for text in texts:
        prepend_bos = resolve_prepend_bos(first, None)
        assert prepend_bos is resolve_prepend_bos(second, None) is False
        expected = encode(gguf_tokenizer, text, prepend_bos=prepend_bos)
        assert encode(first.tokenizer, text, prepend_bos=prepend_bos) == expected
        assert encode(second.tokenizer, text, prepend_bos=prepend_bos) == expected
        assert encode(first.tokenizer, text, prepend_bos=True) == encode(second.tokenizer, text, prepend_bos=True)


def _counting_fingerprints(monkeypatch) -> list[int]:
    """Make every full-weight hash append to the returned list."""
    from kis_lens import models

    calls: list[int] = []
    real = models._compute_fingerprint
    monkeypatch.setattr(models, "_compute_fingerprint", lambda m: calls.append(1) or real(m))
    return calls


def test_fingerprint_is_recorded_at_first_sight_and_changes_only_by_an_explicit_refresh(monkeypatch):
    """A model object gets its record the first time model_info sees it; a W_out written in place leaves the record
    (the fingerprint stays the weights' as first seen) until refresh_model_info says why and hashes again."""
    from kis_lens import models

    model = tiny_model("gpt2", seed=3)
    calls = _counting_fingerprints(monkeypatch)
    first_info = model_info(model)
    first = [model_info(model).fingerprint for _ in range(5)]
    assert len(set(first)) == 1 and len(calls) == 1
    weight = output_weight(model, 1)
    weight.write(weight.read() + 1.0)
    assert model_fingerprint(model) == model_info(model).fingerprint == first[0] and len(calls) == 1
    assert models._compute_fingerprint(model) != first[0] and len(calls) == 2  # the bytes did change
    refreshed = refresh_model_info(model, "W_out of layer 1 shifted by one")
    assert refreshed.fingerprint != first[0] and model_fingerprint(model) == refreshed.fingerprint
    assert model_info(model) == refreshed and refreshed.name == first_info.name and len(calls) == 3
    with pytest.raises(KisError, match="needs a reason"):
        refresh_model_info(model, " ")


def test_a_model_loaded_by_name_is_described_once_until_refreshed_or_converted(monkeypatch):
    """load_model hashes the weights once; model_info, an in-place W_out edit and model_fingerprint never hash again;
    refresh_model_info does; model.to(bfloat16) is the one automatic refresh (new dtype, new bytes, new hash),
    a device move only updates the device, and a model passed back into load_model keeps its record."""
    from kis_lens import models

    calls = _counting_fingerprints(monkeypatch)
    model = load_model("tiny-llama", device="cpu")
    loaded = model_info(model)
    for _ in range(10):
        assert model_info(model) is loaded and model_fingerprint(model) == loaded.fingerprint
    weight = output_weight(model, 0)
    weight.write(weight.read() * 3)
    assert load_model(model) is model and model_info(model) is loaded and len(calls) == 1
    refreshed = refresh_model_info(model, "W_out of layer 0 tripled")
    assert len(calls) == 2 and refreshed.fingerprint != loaded.fingerprint
    assert (refreshed.name, refreshed.adds_bos, refreshed.dtype) == ("tiny-llama", False, "float32")
    converted = model_info(model.to(torch.bfloat16))
    assert len(calls) == 3 and converted.dtype == "bfloat16" and converted.name == "tiny-llama"
    assert converted.fingerprint not in (loaded.fingerprint, refreshed.fingerprint)
    assert model_info(model) is converted and len(calls) == 3
    monkeypatch.setattr(models, "model_device", lambda m: torch.device("cuda", 0))  # as if moved to a GPU
    moved = model_info(model)
    assert (moved.device, moved.fingerprint) == ("cuda:0", converted.fingerprint) and len(calls) == 3


def test_legacy_fingerprint_equals_the_stacked_w_out_hash():
    """The legacy (sampled W_out) fingerprint, kept to re-key old caches, hashes exactly the entries the stacked
    [n_layers, d_mlp, d_model] W_out sampling did."""
    import hashlib

    from kis_lens.fingerprint import is_legacy_fingerprint, legacy_fingerprint

    model = tiny_model("llama", seed=2, n_layers=3)
    flat = model.W_out.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    digest = hashlib.sha256(f"3/64/256/{model.cfg.d_vocab}".encode())
    digest.update(flat[::step][:4096].float().half().numpy().tobytes())
    assert legacy_fingerprint(model) == digest.hexdigest()[:16]
    assert is_legacy_fingerprint(legacy_fingerprint(model)) and not is_legacy_fingerprint(model_fingerprint(model))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_the_fingerprint_changes_when_any_single_weight_changes(kind):
    """Flipping one value of any parameter (attention, W_in, W_out, embeddings, norms: every one the model has),
    even by one ulp, changes the fingerprint; restoring it gives the old one back. The sampled legacy fingerprint
    missed all of these but W_out."""
    from kis_lens.fingerprint import legacy_fingerprint
    from kis_lens.models import _compute_fingerprint

    model = tiny_model(kind, seed=4)
    clean, clean_legacy = model_fingerprint(model), legacy_fingerprint(model)  # the record, taken here
    names = [name.replace("._original_component", "") for name, _ in model.named_parameters()]
    for kind_of_weight in ("tok_embed", "attn.q", "attn.k", "attn.v", "attn.o", "ln1", "ln2", "mlp.", "ln_out"):
        assert any(kind_of_weight in name for name in names), kind_of_weight
    missed_by_legacy = 0
    for name, parameter in model.named_parameters():
        with torch.no_grad():
            flat = parameter.view(-1)
            index = flat.numel() // 2
            old = flat[index].clone()
            flat[index] = torch.nextafter(old, old + 1)  # the smallest change a float32 can make
            changed = _compute_fingerprint(model)  # a fresh hash: the record changes only by a refresh
            missed_by_legacy += legacy_fingerprint(model) == clean_legacy
            flat[index] = old
        assert changed != clean, f"{name}: a changed value left the fingerprint as it was"
        assert _compute_fingerprint(model) == clean
    assert model_fingerprint(model) == clean  # the flips never touched the record
    assert missed_by_legacy >= len(names) - model.cfg.n_layers  # the old fingerprint read W_out samples only


def test_the_fingerprint_tells_a_dtype_and_a_lora_on_attention_apart():
    """A model in bfloat16, and one fine-tuned on its attention's query and value weights only (a LoRA's usual
    targets), each get their own fingerprint: their covariance caches never mix with the base model's."""
    base = tiny_model("llama", seed=5)
    tuned = tiny_model("llama", seed=5)
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if ".attn." in name and (".q." in name or ".v." in name) and name.endswith("weight"):
                parameter.add_(1e-3 * torch.randn_like(parameter))
    assert len({model_fingerprint(base), model_fingerprint(tuned), model_fingerprint(base.to(torch.bfloat16))}) == 3


def test_a_model_object_is_recorded_as_it_is_and_ignored_arguments_warn(tmp_path):
    """A bfloat16 model passed in is recorded as bfloat16; a dtype or device load_model cannot apply warns."""
    from kis_lens.cache_job import cache_second_moments
    from kis_lens.config import CacheOptions
    from kis_lens.storage import read_metadata

    model = tiny_model("gpt2").to(torch.bfloat16)
    with pytest.warns(UserWarning, match="dtype=float32 ignored: the model passed in is bfloat16"):
        assert load_model(model, dtype="float32") is model
    with pytest.warns(UserWarning, match="device=meta ignored"):
        load_model(model, device="meta")
    assert model_info(model).dtype == "bfloat16" and model_info(model).device == "cpu"
    report = cache_second_moments(
        model,
        [0],
        CacheOptions(corpus="wikipedia-offline", output_dir=tmp_path, sample_size=4, max_tokens=None, progress=False),
    )
    assert read_metadata(report.paths[0])["model_dtype"] == "bfloat16"
