"""Model resolution, names, BOS convention, fingerprints, and the real offline SmolLM2-135M."""

from __future__ import annotations

import pytest
import torch

from kis_lens.errors import KisError
from kis_lens.hooks import capture_mlp_inputs
from kis_lens.models import (
    MODEL_ALIASES,
    load_model,
    model_fingerprint,
    model_info,
    model_slug,
    tokenizer_adds_bos,
)
from kis_lens.testing import tiny_model


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
    assert model_info(model).name == "tiny-llama" and tokenizer_adds_bos(model) is False


def test_fingerprint_tells_weights_apart():
    a, b, a_again = tiny_model("gpt2", seed=0), tiny_model("gpt2", seed=1), tiny_model("gpt2", seed=0)
    assert model_fingerprint(a) == model_fingerprint(a_again) != model_fingerprint(b)


@pytest.mark.smollm2
def test_smollm2_is_a_real_pretrained_model(smollm2):
    tokenizer = smollm2.tokenizer
    info = model_info(smollm2)
    assert (info.name, info.n_layers, info.d_mlp, info.d_model) == ("smollm2-135m", 30, 1536, 576)
    assert tokenizer_adds_bos(smollm2) is False  # the GGUF tokenizer adds no BOS
    ids = torch.tensor([tokenizer("The Eiffel Tower is located in the city of", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = smollm2(ids)
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"
    acts = capture_mlp_inputs(smollm2, ids, [0, 29])
    assert acts[29].shape == (1, ids.shape[1], 1536)
