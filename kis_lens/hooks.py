"""Hook utilities: name W_out's MLP input and output; capture the input for many layers in one early-stopped forward.

Hook names are the contract shared by TransformerLens 4's ``TransformerBridge`` and the legacy
``HookedTransformer``; nothing here depends on which one it is given.

>>> acts = capture_mlp_inputs(model, ["The Eiffel Tower is in", "Paris is"], layers=[3, 7])  # stops after layer 7
>>> acts[7].shape                                             # [batch, pos, d_mlp]
>>> tokens, mask = to_tokens(model, ["The Eiffel Tower is in", "Paris is"])  # kis's BOS rule, right-padded

Strings are tokenized by ``to_tokens``, with kis's BOS rule rather than TransformerLens's ``model.to_tokens``
(which always prepends BOS, and whose pad-based mask treats a BOS that shares the pad id as padding): BOS goes in
front only where the model's own Hugging Face tokenizer puts it, and the mask marks real tokens, BOS included.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kis_lens.errors import KisError
from kis_lens.models import HookedModel, resolve_prepend_bos
from kis_lens.tokens import encode, pad_batch, pad_token_id

MLP_IN_HOOK_TEMPLATE = "blocks.{layer}.mlp.hook_post"
MLP_OUT_HOOK_TEMPLATE = "blocks.{layer}.hook_mlp_out"
RESID_POST_HOOK_TEMPLATE = "blocks.{layer}.hook_resid_post"

ActivationCallback = Callable[[int, Float[Tensor, "batch pos d_mlp"]], None]
# What the capture functions accept: token ids, one text, or several texts (tokenized by to_tokens).
TextsOrTokens = str | Sequence[str] | Int[Tensor, "batch pos"]


class HookFunction(Protocol):
    """A forward hook: called with a hook point's activation and the HookPoint; returns a replacement or None."""

    def __call__(self, activation: Tensor, hook: Any) -> Tensor | None: ...


def mlp_in_hook_name(layer: int) -> str:
    """Return the hook name of the MLP hidden activation that feeds W_out at a layer."""
    return MLP_IN_HOOK_TEMPLATE.format(layer=layer)


def mlp_out_hook_name(layer: int) -> str:
    """Return the hook name of a layer's MLP output (what W_out writes into the residual stream)."""
    return MLP_OUT_HOOK_TEMPLATE.format(layer=layer)


def shift_at_positions(positions: Int[Tensor, " batch"], shift: Float[Tensor, "batch d"]) -> HookFunction:
    """Return a forward hook that adds shift[b] to its activation [batch, pos, d] at (b, positions[b]), each row b."""
    rows = torch.arange(len(positions), device=positions.device)

    def add_shift(activation: Float[Tensor, "batch pos d"], hook: Any) -> Float[Tensor, "batch pos d"]:
        activation = activation.clone()
        activation[rows, positions] = activation[rows, positions] + shift.to(activation.device, activation.dtype)
        return activation

    return add_shift


def validate_layers(model: HookedModel, layers: Iterable[int]) -> list[int]:
    """Return the layers sorted and de-duplicated; raise KisError for any outside the model."""
    n_layers = int(model.cfg.n_layers)
    chosen = sorted(set(int(layer) for layer in layers))
    if not chosen:
        raise KisError("no layers requested: give at least one layer (e.g. --start_layer 0 --end_layer 0)")
    bad = [layer for layer in chosen if not 0 <= layer < n_layers]
    if bad:
        raise KisError(f"layer(s) {bad} out of range: this model has layers 0..{n_layers - 1}")
    return chosen


def layer_range(model: HookedModel, start_layer: int | None = None, end_layer: int | None = None) -> list[int]:
    """Return layers start..end inclusive (defaults: all layers), checked against the model."""
    n_layers = int(model.cfg.n_layers)
    start = 0 if start_layer is None else start_layer
    end = n_layers - 1 if end_layer is None else end_layer
    if start > end:
        raise KisError(f"start_layer {start} is after end_layer {end}: give start_layer <= end_layer")
    return validate_layers(model, range(start, end + 1))


def to_tokens(
    model: HookedModel, texts: str | Sequence[str], prepend_bos: bool | None = None
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Return right-padded token ids and attention mask (1 = real token) of texts, with the model's BOS rule.

    prepend_bos None: BOS in front exactly when the model's own Hugging Face tokenizer adds it (Llama does; GPT-2
    and SmolLM2's GGUF tokenizer do not), the rule every kis job uses; True/False forces it. TransformerLens'
    ``model.to_tokens`` prepends BOS by default, so its ids give other activations. The mask, not the pad id,
    says which tokens are real, so a BOS whose id is also the pad id stays a real token.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not texts or not all(isinstance(text, str) for text in texts):
        raise KisError(f"to_tokens takes a text or a non-empty list of texts, not {type(texts).__name__}")
    tokenizer = model.tokenizer
    bos = resolve_prepend_bos(model, prepend_bos)
    ids = [encode(tokenizer, text, bos) for text in texts]
    if empty := [i for i, row in enumerate(ids) if not row]:
        raise KisError(f"text {empty[0]} has no tokens: pass non-empty texts (or prepend_bos=True)")
    return pad_batch(ids, pad_token_id(tokenizer))


def _as_tokens(
    model: HookedModel, inputs: TextsOrTokens, attention_mask: Int[Tensor, "batch pos"] | None
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"] | None]:
    """Return (tokens, mask): ids as given, or texts tokenized by to_tokens (a mask given with texts is refused)."""
    if isinstance(inputs, Tensor):
        return inputs, attention_mask
    if attention_mask is not None:
        raise KisError("attention_mask was given with texts: pass token ids with their mask, or texts alone")
    return to_tokens(model, inputs)


class _ForwardDone(Exception):
    """Raised from the last requested layer's hook so no later block (nor the unembedding) runs."""


def run_mlp_hooks(
    model: HookedModel,
    tokens: TextsOrTokens,
    layers: Sequence[int],
    on_activation: ActivationCallback,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> None:
    """Run one forward that hands each requested layer's MLP input to on_activation, then stops (texts or ids)."""
    layers = validate_layers(model, layers)
    tokens, attention_mask = _as_tokens(model, tokens, attention_mask)
    last = layers[-1]

    def hook_fn(activation: Tensor, hook: Any) -> Tensor:
        layer = int(hook.name.split(".")[1])
        on_activation(layer, activation)
        if layer == last:
            raise _ForwardDone
        return activation

    fwd_hooks: list[tuple[str, HookFunction]] = [(mlp_in_hook_name(layer), hook_fn) for layer in layers]
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask.to(device)}
    with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks):
        try:
            model(tokens, return_type=None, **kwargs)
        except _ForwardDone:
            return
    raise RuntimeError(f"the forward pass finished without reaching hook {mlp_in_hook_name(last)!r}")


def capture_mlp_inputs(
    model: HookedModel,
    tokens: TextsOrTokens,
    layers: Sequence[int],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> dict[int, Float[Tensor, "batch pos d_mlp"]]:
    """Return {layer: MLP input of W_out} for the requested layers from one early-stopped forward (texts or ids)."""
    captured: dict[int, Tensor] = {}

    def keep(layer: int, activation: Tensor) -> None:
        captured[layer] = activation.detach().clone()

    run_mlp_hooks(model, tokens, layers, keep, attention_mask=attention_mask)
    return captured


def gather_positions(
    activation: Float[Tensor, "batch pos d_mlp"], positions: Int[Tensor, " batch"]
) -> Float[Tensor, "batch d_mlp"]:
    """Return, for each sequence, the activation row at its given token position."""
    index = positions.to(activation.device).view(-1, 1, 1).expand(-1, 1, activation.shape[-1])
    return activation.gather(1, index).squeeze(1)


def capture_rows(
    model: HookedModel,
    tokens: Int[Tensor, "batch pos"],
    hook_name: str,
    positions: Int[Tensor, " batch"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "batch d"]:
    """Return each sequence's activation at its position from a named hook, in a forward that stops there."""
    captured: dict[str, Tensor] = {}

    def hook_fn(activation: Tensor, hook: Any) -> Tensor:
        captured["rows"] = gather_positions(activation, positions).detach().clone()
        raise _ForwardDone  # nothing after this hook is read: no later block, no unembedding

    device = next(model.parameters()).device
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask.to(device)}
    fwd_hooks: list[tuple[str, HookFunction]] = [(hook_name, hook_fn)]
    with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks):
        try:
            model(tokens.to(device), return_type=None, **kwargs)
        except _ForwardDone:
            return captured["rows"]
    raise RuntimeError(f"the forward pass finished without reaching hook {hook_name!r}")
