"""Read what the fast shifted forward runs by hand from a model (block modules, attention weights, heads, rotary).

``fast_plan`` returns a ``FastPlan`` for the architectures and cfg flags kis_lens.editing.shifted_forward has been
checked against, and None for anything else, which then takes the full forward.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from jaxtyping import Int
from torch import Tensor

# Architectures whose blocks fast_shifted_forward has been checked against (the bridge's native GPT-2/Llama-style
# model and HF Llama); anything else falls back to the full forward.
FAST_ARCHITECTURES = ("TransformerLensNative", "LlamaForCausalLM")
# cfg flags that change the math of a block (or of its hooks) in ways the fast path does not reproduce: each must
# hold its neutral value. Missing attributes count as neutral (older configs lack the newer flags).
NEUTRAL_FLAGS: dict[str, Any] = {
    "attn_only": False,
    "parallel_attn_mlp": False,
    "use_local_attn": False,
    "window_size": None,
    "attn_types": None,
    "use_qk_norm": False,
    "qk_norm_after_rope": False,
    "use_normalization_before_and_after": False,
    "scale_attn_by_inverse_layer_idx": False,
    "rmsnorm_uses_offset": False,
    "rotary_adjacent_pairs": False,
    "rotary_interleaved_cos_sin": False,
    "use_NTK_by_parts_rope": False,
    "per_layer_head_dim": None,
    "per_layer_num_key_value_heads": None,
    "num_experts": None,
    "layer_norm_folding": False,
    "use_split_qkv_input": False,
    "use_attn_in": False,
    "use_attn_result": False,
    "gated_q_proj": False,
    "attention_dir": "causal",
}
ACTIVATIONS = ("gelu_new", "gelu", "silu", "relu")

LinearParts = tuple[Tensor, Tensor | None]  # an nn.Linear's live weight [out, in] and bias
RotaryTables = Callable[[Tensor, Int[Tensor, "batch pos"]], tuple[Tensor, Tensor]]
Rotate = Callable[[Tensor, Tensor, Tensor], Tensor]


def _unwrap(module: Any) -> Any:
    """Return the wrapped module of a bridge component (itself when it wraps nothing)."""
    original = getattr(module, "original_component", None)
    return module if original is None else original


def _linear_parts(component: Any) -> LinearParts | None:
    """Return the live (weight, bias) of a bridge LinearBridge around an nn.Linear, else None."""
    linear = _unwrap(component)
    if not isinstance(linear, torch.nn.Linear):
        return None
    return linear.weight, linear.bias


def _native_rotary(rotary: Any, rotary_dim: int) -> tuple[RotaryTables, Rotate]:
    """Return the NativeModel's rotary tables and its adjacent-pair rotation of the first rotary_dim dims."""

    def tables(like: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return rotary.cos_cached[positions].to(like.dtype), rotary.sin_cached[positions].to(like.dtype)

    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        x_rot = x_rot * cos + rotary._rotate_half(x_rot) * sin
        return torch.cat([x_rot, x_pass], dim=-1) if x_pass.shape[-1] else x_rot

    return tables, rotate


def _hf_llama_rotary(rotary_emb: Any) -> tuple[RotaryTables, Rotate]:
    """Return HF Llama's rotary tables (its own rotary_emb, so rope_theta/scaling are the model's) and rotation."""
    from transformers.models.llama.modeling_llama import rotate_half

    def tables(like: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return rotary_emb(like, positions)

    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return x * cos + rotate_half(x) * sin

    return tables, rotate


class PlanLayer:
    """One block's modules and attention weights, as the fast path uses them."""

    def __init__(
        self, block: Any, q: LinearParts, k: LinearParts, v: LinearParts, o: LinearParts, scale: float
    ) -> None:
        self.ln1, self.ln2, self.mlp = block.ln1, block.ln2, block.mlp
        self.q, self.k, self.v, self.o = q, k, v, o
        self.scale = scale


class FastPlan:
    """What the fast path needs of a supported model: per-layer modules, head sizes and the rotary."""

    def __init__(self, layers: list[PlanLayer], n_heads: int, n_kv_heads: int, d_head: int, rotary: Any) -> None:
        self.layers, self.n_heads, self.n_kv_heads, self.d_head = layers, n_heads, n_kv_heads, d_head
        self.rotary: tuple[RotaryTables, Rotate] | None = rotary


def fast_plan(model: Any) -> FastPlan | None:
    """Return how to run the blocks of the model by hand, or None where the fast path does not apply."""
    try:
        from transformer_lens import TransformerBridge
    except ImportError:  # TransformerLens 2.x/3.x has no bridge: only the full forward
        return None
    if not isinstance(model, TransformerBridge) or getattr(model, "compatibility_mode", False):
        return None  # compatibility mode may fold or centre weights, which the hand-written attention ignores
    if model.training:
        return None  # dropout would make the two forwards differ
    cfg = model.cfg
    architecture = getattr(cfg, "architecture", None)
    if architecture not in FAST_ARCHITECTURES:
        return None
    if any(getattr(cfg, flag, neutral) != neutral for flag, neutral in NEUTRAL_FLAGS.items()):
        return None
    if float(getattr(cfg, "attn_scores_soft_cap", -1.0)) > 0 or float(getattr(cfg, "output_logits_soft_cap", -1.0)) > 0:
        return None
    if str(cfg.normalization_type).upper() not in ("LN", "RMS") or cfg.act_fn not in ACTIVATIONS:
        return None
    n_heads, d_head = int(cfg.n_heads), int(cfg.d_head)
    n_kv_heads = int(cfg.n_key_value_heads or n_heads)
    if n_heads % n_kv_heads:
        return None
    positional = (getattr(cfg, "positional_embedding_type", None) or "standard").lower()
    original = model.original_model
    layers = []
    for block in model.blocks:
        attention = _unwrap(block.attn)
        parts = [_linear_parts(getattr(block.attn, name, None)) for name in "qkvo"]
        if any(part is None for part in parts):
            return None
        if architecture == "TransformerLensNative":
            if type(attention).__name__ != "NativeAttention" or getattr(_unwrap(block.mlp), "ln", None) is not None:
                return None
            scale = 1.0 / float(attention.scale)
        else:
            extras = ("q_norm", "k_norm", "sinks", "attn_logit_softcapping", "sliding_window")
            if type(attention).__name__ != "LlamaAttention" or any(
                getattr(attention, x, None) is not None for x in extras
            ):
                return None
            if int(attention.head_dim) != d_head:
                return None
            scale = float(attention.scaling)
        layers.append(PlanLayer(block, *parts, scale=scale))
    rotary = None
    if positional == "rotary":
        if architecture == "TransformerLensNative":
            rotary = _native_rotary(original.rotary, int(original.rotary.rotary_dim))
        else:
            rope = getattr(original.config, "rope_parameters", None) or getattr(original.config, "rope_scaling", None)
            if isinstance(rope, dict) and rope.get("llama_4_scaling_beta") is not None:
                return None  # Ministral-3's position-dependent query scale
            rotary = _hf_llama_rotary(_unwrap(original.model.rotary_emb))
    elif positional != "standard" or architecture != "TransformerLensNative":
        return None
    return FastPlan(layers, n_heads, n_kv_heads, d_head, rotary)
