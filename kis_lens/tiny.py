"""Tiny offline models and a tokenizer: what load_model("tiny-gpt2") builds, for tests, tutorials and benchmarks.

Nothing here downloads: the tokenizer is a 2,048-token byte-level BPE trained on the embedded
Wikipedia sample and shipped in ``kis_lens/data/tiny_tokenizer``; the models are random-weight
TransformerBridges built in-process.
"""

from __future__ import annotations

from importlib import resources
from typing import Literal

import torch

TINY_TOKENIZER_DIR = str(resources.files("kis_lens") / "data" / "tiny_tokenizer")

TinyArchitecture = Literal["gpt2", "llama"]


def tiny_tokenizer(add_bos_token: bool = False):
    """Return the shipped 2,048-token byte-level BPE tokenizer (GPT-2 conventions, offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR, add_bos_token=add_bos_token)


def tiny_config_kwargs(
    architecture: TinyArchitecture = "gpt2",
    n_layers: int = 2,
    d_model: int = 64,
    d_mlp: int = 256,
    n_ctx: int = 256,
    seed: int = 0,
) -> dict:
    """Return config keyword arguments shared by the bridge and the legacy HookedTransformer."""
    common = dict(
        n_layers=n_layers,
        d_model=d_model,
        n_ctx=n_ctx,
        d_head=16,
        n_heads=d_model // 16,
        d_mlp=d_mlp,
        d_vocab=2048,
        seed=seed,
    )
    if architecture == "gpt2":
        return dict(common, act_fn="gelu_new", normalization_type="LN")
    if architecture == "llama":
        return dict(
            common,
            act_fn="silu",
            gated_mlp=True,
            normalization_type="RMS",
            positional_embedding_type="rotary",
            rotary_dim=16,
        )
    raise ValueError(f"unknown tiny architecture {architecture!r}: use 'gpt2' or 'llama'")


def tiny_model(
    architecture: TinyArchitecture = "gpt2",
    n_layers: int = 2,
    d_model: int = 64,
    d_mlp: int = 256,
    n_ctx: int = 256,
    seed: int = 0,
    device: str | torch.device = "cpu",
):
    """Return a random-weight TransformerBridge (GPT-2-style LN/GELU or Llama-style gated/RMS/rotary)."""
    from transformer_lens import TransformerBridge, TransformerBridgeConfig

    kwargs = tiny_config_kwargs(architecture, n_layers, d_model, d_mlp, n_ctx, seed)
    config = TransformerBridgeConfig(**kwargs, model_name=f"tiny-{architecture}")
    # The bridge reloads the tokenizer from its name_or_path, so pass the shipped directory's tokenizer.
    model = TransformerBridge.boot_native(config, tokenizer=tiny_tokenizer(), device=device)
    model.eval()
    return model


def tiny_hooked_transformer(
    architecture: TinyArchitecture = "gpt2",
    n_layers: int = 2,
    d_model: int = 64,
    d_mlp: int = 256,
    n_ctx: int = 256,
    seed: int = 0,
):
    """Return a random-weight legacy HookedTransformer (TransformerLens 2.x/3.x only)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    kwargs = tiny_config_kwargs(architecture, n_layers, d_model, d_mlp, n_ctx, seed)
    config = HookedTransformerConfig(**kwargs, model_name=f"tiny-{architecture}")
    model = HookedTransformer(config, tokenizer=tiny_tokenizer())
    model.eval()
    return model
