"""Closed-form edits of one layer's MLP output weight W_out: ROME (rank one), MEMIT (batch), AlphaEdit (null space).

Convention (TransformerLens, row vectors): the layer's MLP output at a token is ``m = k @ W + b`` with the key
``k`` = ``blocks.{L}.mlp.hook_post`` [d_mlp] and ``W`` = W_out [d_mlp, d_model]. Every editor returns a
float64 delta ``ΔW`` [d_mlp, d_model]; nothing touches the model until ``apply_delta`` / ``applied_delta``.

With C = E[k kᵀ] (the cached second moment) and a residual ``r = v - (k W + b)``:

- rank one (ROME):  ΔW = C⁻¹k rᵀ / (kᵀC⁻¹k), so another key k_j moves by (k_jᵀC⁻¹k / kᵀC⁻¹k)·r = P[i, j]·r.
- batch (MEMIT):    ΔW = argmin Σ‖(W+ΔW)ᵀk_i + b − v_i‖² + λ tr(ΔWᵀ C ΔW) = C⁻¹Kᵀ(λI + K C⁻¹ Kᵀ)⁻¹ R,
                    leaving the residual λ(λI + G)⁻¹R on the edited keys (G = K C⁻¹ Kᵀ).
- null space (AlphaEdit): ΔW = P⊥ (P⊥(KᵀK + K_pᵀK_p) + αI)⁻¹ P⊥ Kᵀ R, with P⊥ the projector on the
                    eigenvectors of the preserved keys' covariance whose eigenvalues fall below a threshold,
                    so that ΔW changes (almost) nothing on the preserved keys.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from kis_lens.corpus import encode, pad_batch, pad_token_id
from kis_lens.errors import KisError
from kis_lens.facts import Fact
from kis_lens.hooks import validate_layers
from kis_lens.keys import FactTokens, locate_subject
from kis_lens.matrices import CovarianceLike, Whitener
from kis_lens.models import HookedModel, OutputWeight, model_device, output_weight, resolve_prepend_bos

MLP_OUT_HOOK_TEMPLATE = "blocks.{layer}.hook_mlp_out"


def mlp_out_hook_name(layer: int) -> str:
    """Return the hook name of a layer's MLP output (what W_out writes into the residual stream)."""
    return MLP_OUT_HOOK_TEMPLATE.format(layer=layer)


# W_out's accessor (OutputWeight, output_weight) lives in kis_lens.models, beside the fingerprint that reads it.


def apply_delta(model: HookedModel, layer: int, delta: Float[Tensor, "d_mlp d_model"]) -> Float[Tensor, "d_mlp d_model"]:
    """Add ΔW to the layer's W_out in place (summed in float64); return the original weight for restoring."""
    handle = output_weight(model, layer)
    original = handle.read()
    if tuple(delta.shape) != tuple(original.shape):
        raise KisError(f"delta has shape {tuple(delta.shape)}, expected [d_mlp, d_model] = {tuple(original.shape)}")
    handle.write(original + delta.to(device=original.device, dtype=torch.float64))
    return original


@contextlib.contextmanager
def applied_delta(model: HookedModel, layer: int, delta: Float[Tensor, "d_mlp d_model"]) -> Iterator[Any]:
    """Context manager: W_out += ΔW inside the block; the exact original bits are restored on exit."""
    handle = output_weight(model, layer)
    saved = handle.weight.detach().clone()  # the stored bits, not a float64 round trip
    try:
        apply_delta(model, layer, delta)
        yield model
    finally:
        with torch.no_grad():
            handle.weight.copy_(saved)


# ---------------------------------------------------------------------------------------------------------
# Editors (pure functions of W, b, keys, values and C; all solves in float64)
# ---------------------------------------------------------------------------------------------------------


def _as_whitener(covariance: CovarianceLike, ridge: float = 0.0) -> Whitener:
    return covariance if isinstance(covariance, Whitener) else Whitener.from_covariance(covariance, ridge=ridge)


def solve_covariance(covariance: CovarianceLike, keys: Float[Tensor, "n d_mlp"]) -> Float[Tensor, "n d_mlp"]:
    """Return C⁻¹k for every key (rows), from the Cholesky factor in float64."""
    whitener = _as_whitener(covariance)
    rhs = keys.to(device=whitener.factor.device, dtype=whitener.factor.dtype).T
    return torch.cholesky_solve(rhs, whitener.factor, upper=False).T


def layer_outputs(
    weight: Float[Tensor, "d_mlp d_model"], bias: Float[Tensor, " d_model"], keys: Float[Tensor, "n d_mlp"]
) -> Float[Tensor, "n d_model"]:
    """Return the MLP outputs k @ W + b of the keys, in float64."""
    return keys.double() @ weight.double() + bias.double()


def _check_pairs(keys: Tensor, values: Tensor, weight: Tensor) -> None:
    if keys.ndim != 2 or values.ndim != 2 or keys.shape[0] != values.shape[0]:
        raise KisError(f"keys [n, d_mlp] and values [n, d_model] must pair up, got {tuple(keys.shape)} and {tuple(values.shape)}")
    if keys.shape[1] != weight.shape[0] or values.shape[1] != weight.shape[1]:
        raise KisError(
            f"keys/values of width {keys.shape[1]}/{values.shape[1]} do not fit W_out {tuple(weight.shape)}"
        )


def rank_one_delta(
    key: Float[Tensor, " d_mlp"], residual: Float[Tensor, " d_model"], covariance: CovarianceLike
) -> Float[Tensor, "d_mlp d_model"]:
    """Return ROME's ΔW = C⁻¹k rᵀ / (kᵀC⁻¹k): moves the output at k by r, least change on the key distribution."""
    key64 = key.double().reshape(1, -1)
    solved = solve_covariance(covariance, key64)[0]
    denominator = solved @ key64[0].to(solved.device)
    if not denominator > 0:
        raise KisError("kᵀC⁻¹k is not positive: the key is zero or C is not positive definite")
    return torch.outer(solved, residual.double().to(solved.device)) / denominator


def rome_delta(
    weight: Float[Tensor, "d_mlp d_model"],
    bias: Float[Tensor, " d_model"],
    key: Float[Tensor, " d_mlp"],
    value: Float[Tensor, " d_model"],
    covariance: CovarianceLike,
) -> Float[Tensor, "d_mlp d_model"]:
    """Return the rank-one ΔW that makes the layer output exactly `value` at `key`."""
    _check_pairs(key.reshape(1, -1), value.reshape(1, -1), weight)
    residual = value.double() - layer_outputs(weight, bias, key.reshape(1, -1))[0]
    return rank_one_delta(key, residual, covariance)


def memit_update(
    keys: Float[Tensor, "n d_mlp"],
    residuals: Float[Tensor, "n d_model"],
    covariance: CovarianceLike,
    covariance_weight: float = 0.0,
) -> Float[Tensor, "d_mlp d_model"]:
    """Return MEMIT's least-squares ΔW = C⁻¹Kᵀ(λI + K C⁻¹ Kᵀ)⁻¹ R that moves the outputs at K by (about) R."""
    if covariance_weight < 0:
        raise KisError(f"covariance_weight λ must be >= 0, got {covariance_weight}")
    solved = solve_covariance(covariance, keys)  # rows C⁻¹k_i
    gram = solved @ keys.double().T.to(solved.device)
    gram = (gram + gram.T) / 2 + covariance_weight * torch.eye(len(keys), dtype=torch.float64, device=gram.device)
    try:
        mixing = torch.linalg.solve(gram, residuals.double().to(gram.device))
    except RuntimeError:
        raise KisError("K C⁻¹ Kᵀ + λI is singular (repeated or dependent keys): use covariance_weight > 0") from None
    return solved.T @ mixing


def memit_delta(
    weight: Float[Tensor, "d_mlp d_model"],
    bias: Float[Tensor, " d_model"],
    keys: Float[Tensor, "n d_mlp"],
    values: Float[Tensor, "n d_model"],
    covariance: CovarianceLike,
    covariance_weight: float = 0.0,
) -> Float[Tensor, "d_mlp d_model"]:
    """Return MEMIT's batch ΔW that maps every key to its value in the least-squares sense (λ = covariance_weight)."""
    _check_pairs(keys, values, weight)
    return memit_update(keys, values.double() - layer_outputs(weight, bias, keys), covariance, covariance_weight)


def memit_residual(
    keys: Float[Tensor, "n d_mlp"],
    residuals: Float[Tensor, "n d_model"],
    covariance: CovarianceLike,
    covariance_weight: float,
) -> Float[Tensor, "n d_model"]:
    """Return the residual a MEMIT edit leaves on its own keys, λ(λI + K C⁻¹ Kᵀ)⁻¹ R (zero when λ = 0)."""
    whitened = _as_whitener(covariance).whiten(keys)
    gram = whitened @ whitened.T
    eye = torch.eye(len(keys), dtype=torch.float64, device=gram.device)
    return covariance_weight * torch.linalg.solve(gram + covariance_weight * eye, residuals.double().to(gram.device))


@dataclass(frozen=True)
class NullSpace:
    """AlphaEdit's projector onto the low-eigenvalue directions of the preserved keys' covariance."""

    projector: Float[Tensor, "d_mlp d_mlp"]
    rank: int
    threshold: float

    @property
    def dim(self) -> int:
        """Return d_mlp."""
        return int(self.projector.shape[0])


def null_space_projector(
    preserved_covariance: Float[Tensor, "d_mlp d_mlp"], threshold: float = 1e-2, relative: bool = False
) -> NullSpace:
    """Return the projector U Uᵀ on the eigenvectors with eigenvalue < threshold (× the largest if relative)."""
    if preserved_covariance.ndim != 2 or preserved_covariance.shape[0] != preserved_covariance.shape[1]:
        raise KisError(f"preserved covariance must be square [d_mlp, d_mlp], got {tuple(preserved_covariance.shape)}")
    if threshold <= 0:
        raise KisError(f"null-space threshold must be > 0, got {threshold}")
    matrix = preserved_covariance.double()
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    cutoff = threshold * eigenvalues.max().item() if relative else threshold
    basis = eigenvectors[:, eigenvalues < cutoff]
    return NullSpace(basis @ basis.T, int(basis.shape[1]), float(cutoff))


def alphaedit_update(
    keys: Float[Tensor, "n d_mlp"],
    residuals: Float[Tensor, "n d_model"],
    null_space: NullSpace,
    previous_keys: Float[Tensor, "m d_mlp"] | None = None,
    l2: float = 1.0,
) -> Float[Tensor, "d_mlp d_model"]:
    """Return AlphaEdit's ΔW = P⊥(P⊥(KᵀK + K_pᵀK_p) + αI)⁻¹P⊥KᵀR, which lies in the preserved keys' null space."""
    if l2 <= 0:
        raise KisError(f"AlphaEdit's l2 term α must be > 0 (the projected system is singular otherwise), got {l2}")
    projector = null_space.projector
    device = projector.device
    keys64 = keys.double().to(device)
    outer = keys64.T @ keys64
    if previous_keys is not None and len(previous_keys):
        previous = previous_keys.double().to(device)
        outer = outer + previous.T @ previous
    system = projector @ outer + l2 * torch.eye(null_space.dim, dtype=torch.float64, device=device)
    delta = torch.linalg.solve(system, projector @ keys64.T @ residuals.double().to(device))
    return projector @ delta  # already in range(P⊥) in exact arithmetic; projecting again removes round-off


def alphaedit_delta(
    weight: Float[Tensor, "d_mlp d_model"],
    bias: Float[Tensor, " d_model"],
    keys: Float[Tensor, "n d_mlp"],
    values: Float[Tensor, "n d_model"],
    null_space: NullSpace,
    previous_keys: Float[Tensor, "m d_mlp"] | None = None,
    l2: float = 1.0,
) -> Float[Tensor, "d_mlp d_model"]:
    """Return AlphaEdit's null-space ΔW towards the values, protecting previously edited keys too."""
    _check_pairs(keys, values, weight)
    residuals = values.double() - layer_outputs(weight, bias, keys)
    return alphaedit_update(keys, residuals, null_space, previous_keys, l2)


# ---------------------------------------------------------------------------------------------------------
# Keys that do not superpose: whitening + Gram–Schmidt
# ---------------------------------------------------------------------------------------------------------


def whitened_orthogonal_keys(keys: Float[Tensor, "n d_mlp"], covariance: CovarianceLike) -> Float[Tensor, "n d_mlp"]:
    """Return keys k'_i with k'_iᵀC⁻¹k'_j = 0 (i ≠ j), each the Gram–Schmidt successor of k_i with its C⁻¹-norm kept."""
    whitener = _as_whitener(covariance)
    if keys.shape[0] > whitener.dim:
        raise KisError(f"cannot make {keys.shape[0]} keys orthogonal in {whitener.dim} dimensions: use fewer facts")
    whitened = whitener.whiten(keys)  # rows L⁻¹k_i
    basis, triangle = torch.linalg.qr(whitened.T)  # Gram–Schmidt of the whitened keys, in order
    signs = torch.sign(torch.diagonal(triangle))
    signs[signs == 0] = 1
    norms = whitened.norm(dim=1)
    orthogonal = basis.T * (signs * norms)[:, None]
    return orthogonal @ whitener.factor.T  # back from the whitened space: k' = L w'


# ---------------------------------------------------------------------------------------------------------
# Target values: optimise the MLP output at the subject's last token so that the model says target_new
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditPrompt:
    """A fact prompt followed by one of its targets, with where the subject ends and the target starts."""

    ids: list[int]
    subject_last: int
    target_start: int

    @property
    def target_ids(self) -> list[int]:
        """Return the target's token ids."""
        return self.ids[self.target_start :]


def edit_prompt(model: HookedModel, fact: Fact, target: str, prepend_bos: bool | None = None) -> EditPrompt:
    """Return the token ids of fact prompt + " " + target and the positions the editors need."""
    if not target:
        raise KisError(f"fact {fact.case_id} has no target to score: give it a target_new")
    prepend_bos = resolve_prepend_bos(model, prepend_bos)
    located: FactTokens = locate_subject(model.tokenizer, fact, prepend_bos)
    target_ids = encode(model.tokenizer, " " + target.strip(), prepend_bos=False)
    return EditPrompt([*located.ids, *target_ids], located.subject_last, len(located.ids))


def _batch(prompts: Sequence[EditPrompt], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    tokens, mask = pad_batch([prompt.ids for prompt in prompts], pad_id)
    # label[b, t] = the token predicted at position t, only for target tokens; -100 elsewhere
    labels = torch.full_like(tokens, -100)
    for row, prompt in enumerate(prompts):
        for position in range(prompt.target_start, len(prompt.ids)):
            labels[row, position - 1] = prompt.ids[position]
    subject = torch.tensor([prompt.subject_last for prompt in prompts])
    return tokens.to(device), mask.to(device), labels.to(device), subject.to(device)


def _target_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * (labels >= 0)).sum(dim=1)


def target_logprobs(
    model: HookedModel,
    layer: int,
    prompts: Sequence[EditPrompt],
    output_shift: Float[Tensor, "n d_model"] | None = None,
    batch_size: int = 64,
) -> Float[Tensor, " n"]:
    """Return log p(target | prompt) per prompt, optionally adding output_shift to the MLP output at the subject."""
    device = model_device(model)
    pad_id = pad_token_id(model.tokenizer)
    scores = []
    for begin in range(0, len(prompts), batch_size):
        chunk = prompts[begin : begin + batch_size]
        tokens, mask, labels, subject = _batch(chunk, pad_id, device)
        hooks = []
        if output_shift is not None:
            shift = output_shift[begin : begin + len(chunk)]
            hooks = [(mlp_out_hook_name(layer), _subject_shift_hook(subject, shift))]
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            logits = model(tokens, attention_mask=mask)
        scores.append(_target_logprobs(logits, labels).double().cpu())
    return torch.cat(scores)


def _subject_shift_hook(subject: Tensor, shift: Tensor):
    rows = torch.arange(len(subject), device=subject.device)

    def hook(activation: Tensor, hook: Any) -> Tensor:
        activation = activation.clone()
        activation[rows, subject] = activation[rows, subject] + shift.to(activation.device, activation.dtype)
        return activation

    return hook


def find_target_values(
    model: HookedModel,
    layer: int,
    facts: Sequence[Fact],
    steps: int = 20,
    lr: float = 0.5,
    weight_decay: float = 1e-3,
    clamp_norm_factor: float = 4.0,
    prepend_bos: bool | None = None,
    progress: bool = False,
) -> tuple[Float[Tensor, "n d_model"], Float[Tensor, "n d_model"]]:
    """Return (v, current output) at each fact's subject-last token: v = output + δ, δ trained so the model says target_new."""
    if steps < 1 or lr <= 0:
        raise KisError(f"the value search needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    missing = [fact.case_id for fact in facts if not fact.target_new]
    if missing:
        raise KisError(f"fact(s) {missing[:5]} have no target_new: use CounterFact facts (e.g. counterfact-known)")
    prompts = [edit_prompt(model, fact, fact.target_new, prepend_bos) for fact in facts]
    device = model_device(model)
    tokens, mask, labels, subject = _batch(prompts, pad_token_id(model.tokenizer), device)
    n_target_tokens = (labels >= 0).sum(dim=1).clamp_min(1)
    rows = torch.arange(len(prompts), device=device)
    shift = torch.zeros(len(prompts), int(model.cfg.d_model), device=device, requires_grad=True)
    original: dict[str, Tensor] = {}

    def add_shift(activation: Tensor, hook: Any) -> Tensor:
        original.setdefault("output", activation[rows, subject].detach().double().clone())
        activation = activation.clone()
        activation[rows, subject] = activation[rows, subject] + shift.to(activation.dtype)
        return activation

    optimizer = torch.optim.Adam([shift], lr=lr)
    requires_grad = [parameter.requires_grad for parameter in model.parameters()]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    try:
        with model.hooks(fwd_hooks=[(mlp_out_hook_name(layer), add_shift)]):
            for _ in tqdm(range(steps), desc="target values", disable=not progress, dynamic_ncols=True, leave=False):
                optimizer.zero_grad()
                logits = model(tokens, attention_mask=mask)
                nll = -(_target_logprobs(logits, labels) / n_target_tokens)
                norms = original["output"].norm(dim=1).float().clamp_min(1e-6)
                loss = (nll + weight_decay * shift.norm(dim=1) ** 2 / norms**2).sum()
                loss.backward()
                optimizer.step()
                with torch.no_grad():  # ROME's trust region: ‖δ‖ ≤ clamp · ‖output‖
                    limit = (clamp_norm_factor * norms)[:, None]
                    scale = (limit / shift.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
                    shift.mul_(scale)
    finally:
        for parameter, flag in zip(model.parameters(), requires_grad):
            parameter.requires_grad_(flag)
    current = original["output"].cpu()
    return current + shift.detach().double().cpu(), current
