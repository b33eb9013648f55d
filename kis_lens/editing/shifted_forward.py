"""Logits of a forward in which a shift δ is added to one activation of layer L, one position per row, fast.

ROME's value search and MEMIT's compute_z optimise such a δ for ~20 Adam steps, each a forward and a backward
over ~22 prompts. Nothing at layers ≤ L depends on δ, and at layers > L nothing at positions before the shifted
one does. ``full_shifted_forward`` is the reference (the model's whole forward under a hook);
``fast_shifted_forward`` runs layers 0..L once, without grad, and per call only layers L+1.. on each row's
positions from the shift to its last read, attending to cached keys/values of the earlier positions, then the
final norm and unembedding at the read positions alone. Both give the same logits and gradients up to float
rounding; ``shifted_forward`` picks the fast one when the architecture is supported (which ones:
kis_lens.editing.shifted_forward_plan).

The fast path takes its cache (and, as a guard, checks its own zero-shift logits against the model's) when it is
built, so build it after editing the weights, not before. It runs the model's own norm, MLP and unembedding
modules on the suffix but its own attention, so hooks other than the shift do not fire in layers > L.

>>> forward = shifted_forward(model, 4, "mlp_out", tokens, mask, subject_last, read_rows, read_positions)
>>> logits = forward(shift)        # [read, vocab], differentiable w.r.t. shift
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from kis_lens.editing.shifted_forward_plan import FastPlan, PlanLayer, fast_plan
from kis_lens.errors import KisError
from kis_lens.hooks import (
    MLP_OUT_HOOK_TEMPLATE,
    RESID_POST_HOOK_TEMPLATE,
    HookFunction,
    shift_at_positions,
    validate_layers,
)
from kis_lens.models import model_device

Site = Literal["mlp_out", "resid_post"]
SITE_HOOKS: dict[str, str] = {"mlp_out": MLP_OUT_HOOK_TEMPLATE, "resid_post": RESID_POST_HOOK_TEMPLATE}

# Relative logit error allowed by the construction-time self-check at zero shift. Not tighter in float64: the
# bridge's attention softmax runs in float32 whatever the model's dtype.
_SELF_CHECK_TOLERANCE = 1e-4
_SELF_CHECK_TOLERANCE_HALF = 5e-2
READ_ROW_MULTIPLE = 8


class ShiftedForward(Protocol):
    """Logits at the read positions of a forward with shift[b] added to the site at (b, shift_positions[b])."""

    initial: Float[Tensor, "batch d_model"]

    def __call__(self, shift: Float[Tensor, "batch d_model"]) -> Float[Tensor, "read vocab"]: ...


def site_hook_name(layer: int, site: Site) -> str:
    """Return the hook name of a shift site ("mlp_out": ROME's MLP output, "resid_post": MEMIT's z)."""
    if site not in SITE_HOOKS:
        raise KisError(f"unknown shift site {site!r}: use one of {', '.join(SITE_HOOKS)}")
    return SITE_HOOKS[site].format(layer=layer)


def _validate(
    model: Any,
    layer: int,
    site: Site,
    tokens: Int[Tensor, "batch pos"],
    mask: Int[Tensor, "batch pos"],
    shift_positions: Int[Tensor, " batch"],
    read_rows: Int[Tensor, " read"],
    read_positions: Int[Tensor, " read"],
) -> None:
    """Raise KisError for inconsistent inputs (all tensors on one device)."""
    site_hook_name(layer, site)
    validate_layers(model, [layer])
    integers = {"tokens": tokens, "mask": mask, "shift_positions": shift_positions, "read_rows": read_rows}
    floating = [
        name for name, tensor in {**integers, "read_positions": read_positions}.items() if tensor.is_floating_point()
    ]
    if floating:
        raise KisError(f"{', '.join(floating)} must be integer tensors (token ids, 0/1 mask, indices)")
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise KisError(f"tokens must be a non-empty [batch, pos] tensor, got shape {tuple(tokens.shape)}")
    if mask.shape != tokens.shape:
        raise KisError(f"mask shape {tuple(mask.shape)} differs from tokens shape {tuple(tokens.shape)}")
    batch = tokens.shape[0]
    if shift_positions.shape != (batch,):
        raise KisError(f"shift_positions must have shape ({batch},), one per row, got {tuple(shift_positions.shape)}")
    if read_rows.ndim != 1 or read_positions.shape != read_rows.shape or len(read_rows) == 0:
        raise KisError(
            f"read_rows and read_positions must be equal-length non-empty 1-D tensors, got shapes "
            f"{tuple(read_rows.shape)} and {tuple(read_positions.shape)}"
        )
    if ((mask != 0) & (mask != 1)).any():
        raise KisError("mask must hold only 0 (padding) and 1 (real token)")
    lengths = mask.long().sum(dim=1)
    if (mask != (torch.arange(tokens.shape[1], device=mask.device) < lengths[:, None]).to(mask.dtype)).any():
        raise KisError("tokens must be right-padded: each mask row must be ones followed by zeros")
    if ((shift_positions < 0) | (shift_positions >= lengths)).any():
        raise KisError("every shift position must point at a real (unpadded) token of its row")
    if ((read_rows < 0) | (read_rows >= batch)).any():
        raise KisError(f"read_rows must lie in 0..{batch - 1}")
    if ((read_positions < shift_positions[read_rows]) | (read_positions >= lengths[read_rows])).any():
        raise KisError(
            "every read position must be a real token at or after its row's shift position "
            "(earlier positions do not depend on the shift)"
        )


def _prepare(model: Any, layer: int, site: Site, *tensors: Any) -> tuple[Tensor, ...]:
    """Return tokens, mask, shift_positions, read_rows, read_positions on the model's device, validated."""
    names = ("tokens", "mask", "shift_positions", "read_rows", "read_positions")
    for name, tensor in zip(names, tensors):
        if not isinstance(tensor, Tensor):
            raise KisError(f"{name} must be a torch tensor, got {type(tensor).__name__}")
    device = model_device(model)
    moved = tuple(tensor.to(device) for tensor in tensors)
    _validate(model, layer, site, *moved)
    return moved


def _check_shift(shift: Tensor, batch: int, d_model: int) -> None:
    """Raise KisError unless shift is a floating [batch, d_model] tensor."""
    if shift.shape != (batch, d_model) or not shift.is_floating_point():
        raise KisError(f"shift must be a float tensor of shape ({batch}, {d_model}), got {tuple(shift.shape)}")


class _FullShiftedForward:
    """The reference: the model's whole forward, with the shift added by a hook at the site."""

    def __init__(
        self,
        model: Any,
        hook_name: str,
        tokens: Int[Tensor, "batch pos"],
        mask: Int[Tensor, "batch pos"],
        shift_positions: Int[Tensor, " batch"],
        read_rows: Int[Tensor, " read"],
        read_positions: Int[Tensor, " read"],
    ) -> None:
        self.model, self.hook_name = model, hook_name
        self.tokens, self.mask = tokens, mask
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        self.shift_positions, self.read_rows, self.read_positions = shift_positions, read_rows, read_positions
        captured: dict[str, Tensor] = {}

        def capture(activation: Tensor, hook: Any) -> None:
            captured["initial"] = activation[rows, shift_positions].detach().clone()

        with torch.no_grad(), model.hooks(fwd_hooks=[(hook_name, capture)]):
            model(tokens, attention_mask=mask)
        self.initial: Float[Tensor, "batch d_model"] = captured["initial"]

    def __call__(self, shift: Float[Tensor, "batch d_model"]) -> Float[Tensor, "read vocab"]:
        """Return the logits at the read positions with shift[b] added at (b, shift_positions[b])."""
        _check_shift(shift, *self.initial.shape)
        with self.model.hooks(fwd_hooks=[(self.hook_name, shift_at_positions(self.shift_positions, shift))]):
            logits = self.model(self.tokens, attention_mask=self.mask)
        return logits[self.read_rows, self.read_positions]


def full_shifted_forward(
    model: Any,
    layer: int,
    site: Site,
    tokens: Int[Tensor, "batch pos"],
    mask: Int[Tensor, "batch pos"],
    shift_positions: Int[Tensor, " batch"],
    read_rows: Int[Tensor, " read"],
    read_positions: Int[Tensor, " read"],
) -> ShiftedForward:
    """Return the reference shifted forward: the whole model under a hook (any TransformerLens model)."""
    tensors = _prepare(model, layer, site, tokens, mask, shift_positions, read_rows, read_positions)
    return _FullShiftedForward(model, site_hook_name(layer, site), *tensors)


class _ForwardDone(Exception):
    """Raised from the final norm's hook: the construction forward needs nothing of the unembedding."""


class _FastShiftedForward:
    """Suffix-only forward of layers L+1.., on cached layer-L residuals and prefix keys/values (see module doc)."""

    def __init__(
        self,
        model: Any,
        plan: FastPlan,
        layer: int,
        hook_name: str,
        tokens: Int[Tensor, "batch pos"],
        mask: Int[Tensor, "batch pos"],
        shift_positions: Int[Tensor, " batch"],
        read_rows: Int[Tensor, " read"],
        read_positions: Int[Tensor, " read"],
    ) -> None:
        device = tokens.device
        self.model, self.plan, self.layer = model, plan, layer
        batch = tokens.shape[0]
        later = range(layer + 1, int(model.cfg.n_layers))
        # Only rows with a read matter, and in each only positions from the shift to its last read (causality).
        last_read = torch.full((batch,), -1, dtype=torch.long, device=device)
        last_read = last_read.scatter_reduce(0, read_rows, read_positions, reduce="amax")
        self.active = torch.nonzero(last_read >= 0).squeeze(1)
        starts = shift_positions[self.active]
        suffix_lengths = last_read[self.active] - starts + 1
        suffix, prefix = int(suffix_lengths.max()), int(starts.max())
        columns = torch.arange(suffix, device=device)
        # Columns past a row's last read are padding: clamped to a real position, masked as keys, never read.
        positions = (starts[:, None] + columns[None, :]).clamp(max=tokens.shape[1] - 1)

        captured: dict[str, Tensor] = {}

        def keep(name: str, *index: Any) -> HookFunction:
            def hook(activation: Tensor, hook: Any) -> None:
                captured[name] = activation[index].detach().clone()

            return hook

        def stop(activation: Tensor, hook: Any) -> None:
            captured["final"] = activation[read_rows, read_positions].detach().clone()
            raise _ForwardDone  # the unembedding of every position would cost more than the rest of this setup

        rows = torch.arange(batch, device=device)
        hooks = [
            (hook_name, keep("initial", rows, shift_positions)),
            (site_hook_name(layer, "resid_post"), keep("suffix", self.active[:, None], positions)),
            *[
                (f"blocks.{index}.hook_resid_pre", keep(f"prefix{index}", self.active, slice(prefix)))
                for index in later
            ],
            ("ln_final.hook_out", stop),
        ]
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            try:
                model(tokens, attention_mask=mask)
            except _ForwardDone:
                pass
        if "final" not in captured:
            raise RuntimeError("the forward pass finished without reaching hook 'ln_final.hook_out'")
        self.initial: Float[Tensor, "batch d_model"] = captured["initial"]
        self.residual: Float[Tensor, "row suffix d_model"] = captured["suffix"]

        # Query i of a row sees its prefix (positions < start) and suffix columns j <= i that are not padding;
        # every query sees column 0, so no softmax row is empty (an empty one would put NaN into the backward).
        sees_prefix = torch.arange(prefix, device=device)[None, :] < starts[:, None]
        sees_suffix = (columns[None, None, :] <= columns[None, :, None]) & (
            columns[None, None, :] < suffix_lengths[:, None, None]
        )
        allowed = torch.cat([sees_prefix[:, None, :].expand(-1, suffix, -1), sees_suffix], dim=2)
        group = plan.n_heads // plan.n_kv_heads
        # Queries are grouped per key/value head ([row, kv head, group × suffix, d_head]) so GQA needs no copies.
        self.blocked = ~allowed[:, None, None].expand(-1, 1, group, -1, -1).reshape(
            len(self.active), 1, -1, prefix + suffix
        )
        slot = torch.full((batch,), -1, dtype=torch.long, device=device)
        slot[self.active] = torch.arange(len(self.active), device=device)
        # Reads padded to a multiple of 8 rows with copies of the first: on a CPU, MKL's kernel for the <4-row
        # remainder of a matmul sums the unembedding's vocab-long backward reduction ~10x less accurately in
        # float32 than the full forward's blocked one does. The copies' logits are dropped (their gradient is 0).
        self.n_reads = len(read_rows)
        padding = -self.n_reads % READ_ROW_MULTIPLE
        read_rows = torch.cat([read_rows, read_rows[:1].expand(padding)])
        read_positions = torch.cat([read_positions, read_positions[:1].expand(padding)])
        self.read_slots = slot[read_rows]
        self.read_columns = read_positions - shift_positions[read_rows]

        self.rope: tuple[Tensor, Tensor] | None = None
        prefix_rope: tuple[Tensor, Tensor] | None = None
        if plan.rotary is not None:
            tables, _ = plan.rotary
            like = self.residual
            self.rope = tuple(t.unsqueeze(1) for t in tables(like, positions))
            prefix_positions = torch.arange(prefix, device=device)[None, :].expand(len(self.active), -1)
            prefix_rope = tuple(t.unsqueeze(1) for t in tables(like, prefix_positions))
        self.prefix_kv: list[tuple[Tensor, Tensor]] = []
        with torch.no_grad():
            for index in later:
                hidden = captured[f"prefix{index}"]
                weights = plan.layers[index]
                normed = weights.ln1(hidden)
                keys = self._heads(F.linear(normed, *weights.k), plan.n_kv_heads)
                values = self._heads(F.linear(normed, *weights.v), plan.n_kv_heads)
                if prefix_rope is not None:
                    keys = plan.rotary[1](keys, *prefix_rope)
                self.prefix_kv.append((keys, values))
            fast = self(torch.zeros_like(self.initial))
            reference = model.unembed(captured["final"][None])[0]  # the model's logits at the read positions
        # A guard for configurations the flags above do not capture: the fast logits at zero shift must be the
        # model's own, else the caller gets None and falls back to the full forward.
        tolerance = (
            _SELF_CHECK_TOLERANCE if reference.dtype in (torch.float32, torch.float64) else _SELF_CHECK_TOLERANCE_HALF
        )
        scale = reference.abs().max().clamp_min(1e-12)
        self.self_check_error = float((fast - reference).abs().max() / scale)
        self.verified = self.self_check_error <= tolerance

    def _heads(self, projected: Tensor, heads: int) -> Tensor:
        """[row, pos, heads × d_head] -> [row, heads, pos, d_head]."""
        rows, positions, _ = projected.shape
        return projected.view(rows, positions, heads, self.plan.d_head).transpose(1, 2)

    def _attention(self, weights: PlanLayer, normed: Tensor, cached: tuple[Tensor, Tensor]) -> Tensor:
        """Self-attention of the suffix positions over the cached prefix and the suffix so far."""
        plan = self.plan
        rows, suffix, _ = normed.shape
        queries = self._heads(F.linear(normed, *weights.q), plan.n_heads)
        keys = self._heads(F.linear(normed, *weights.k), plan.n_kv_heads)
        values = self._heads(F.linear(normed, *weights.v), plan.n_kv_heads)
        if self.rope is not None and plan.rotary is not None:
            rotate = plan.rotary[1]
            queries, keys = rotate(queries, *self.rope), rotate(keys, *self.rope)
        keys = torch.cat([cached[0], keys], dim=2)
        values = torch.cat([cached[1], values], dim=2)
        # Query head h reads key/value head h // group (HF repeat_kv and the native repeat_interleave alike).
        grouped = queries.reshape(rows, plan.n_kv_heads, -1, plan.d_head)
        scores = torch.matmul(grouped, keys.transpose(-2, -1)) * weights.scale
        scores = scores.masked_fill(self.blocked, float("-inf"))
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        mixed = torch.matmul(pattern, values).view(rows, plan.n_heads, suffix, plan.d_head)
        return F.linear(mixed.transpose(1, 2).reshape(rows, suffix, -1), *weights.o)

    def __call__(self, shift: Float[Tensor, "batch d_model"]) -> Float[Tensor, "read vocab"]:
        """Return the logits at the read positions with shift[b] added at (b, shift_positions[b])."""
        _check_shift(shift, *self.initial.shape)
        residual = self.residual
        # Column 0 of each row is its shift position; adding δ to mlp_out there adds it to resid_post there.
        first = residual[:, :1] + shift[self.active].to(residual.device, residual.dtype)[:, None]
        residual = torch.cat([first, residual[:, 1:]], dim=1)
        for weights, cached in zip(self.plan.layers[self.layer + 1 :], self.prefix_kv):
            residual = residual + self._attention(weights, weights.ln1(residual), cached)
            residual = residual + weights.mlp(weights.ln2(residual))
        read = residual[self.read_slots, self.read_columns][None]
        return self.model.unembed(self.model.ln_final(read))[0, : self.n_reads]


def fast_shifted_forward(
    model: Any,
    layer: int,
    site: Site,
    tokens: Int[Tensor, "batch pos"],
    mask: Int[Tensor, "batch pos"],
    shift_positions: Int[Tensor, " batch"],
    read_rows: Int[Tensor, " read"],
    read_positions: Int[Tensor, " read"],
) -> ShiftedForward | None:
    """Return the exact suffix-only shifted forward, or None where the model's architecture is not supported."""
    tensors = _prepare(model, layer, site, tokens, mask, shift_positions, read_rows, read_positions)
    return _verified_fast(model, layer, site, tensors)


def _verified_fast(model: Any, layer: int, site: Site, tensors: tuple[Tensor, ...]) -> ShiftedForward | None:
    """Return the fast shifted forward on prepared (validated) tensors, or None where it does not apply."""
    plan = fast_plan(model)
    if plan is None:
        return None
    forward = _FastShiftedForward(model, plan, layer, site_hook_name(layer, site), *tensors)
    if not forward.verified:
        warnings.warn(
            f"fast shifted forward differs from the model's own logits (relative {forward.self_check_error:.2e}) "
            "on this architecture; using the full forward",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return forward


def shifted_forward(
    model: Any,
    layer: int,
    site: Site,
    tokens: Int[Tensor, "batch pos"],
    mask: Int[Tensor, "batch pos"],
    shift_positions: Int[Tensor, " batch"],
    read_rows: Int[Tensor, " read"],
    read_positions: Int[Tensor, " read"],
    fast: bool = True,
) -> ShiftedForward:
    """Return the fast shifted forward when asked for and supported, else the full reference."""
    tensors = _prepare(model, layer, site, tokens, mask, shift_positions, read_rows, read_positions)  # checked once
    forward = _verified_fast(model, layer, site, tensors) if fast else None
    return forward if forward is not None else _FullShiftedForward(model, site_hook_name(layer, site), *tensors)
