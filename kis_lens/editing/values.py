"""Target values and target log-probabilities: what the MLP output at the subject's last token must become
so that the model says ``target_new``, and how likely a target is with the output shifted there.

The search optimises a shift δ added to ``blocks.{L}.hook_mlp_out`` at each fact's subject-last token (ROME's
value step): v = output + δ, with a weight decay on δ and ROME's trust region ‖δ‖ ≤ clamp · ‖output‖.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kis_lens.blocks import at_least, check_finite_settings, setting
from kis_lens.editing.shifted_forward import shifted_forward, site_hook_name
from kis_lens.errors import KisError
from kis_lens.facts import Fact
from kis_lens.hooks import HookFunction, capture_rows, mlp_out_hook_name, shift_at_positions
from kis_lens.keys import FactTokens, locate_subject
from kis_lens.models import HookedModel, model_device, resolve_prepend_bos
from kis_lens.tokens import encode, pad_batch, pad_token_id


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


def _batch(
    prompts: Sequence[EditPrompt], pad_id: int, device: torch.device
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Int[Tensor, " batch"]]:
    """Return the padded tokens, their mask, the target labels (-100 elsewhere) and each subject's last position."""
    tokens, mask = pad_batch([prompt.ids for prompt in prompts], pad_id)
    # label[b, t] = the token predicted at position t, only for target tokens; -100 elsewhere
    labels = torch.full_like(tokens, -100)
    for row, prompt in enumerate(prompts):
        for position in range(prompt.target_start, len(prompt.ids)):
            labels[row, position - 1] = prompt.ids[position]
    subject = torch.tensor([prompt.subject_last for prompt in prompts])
    return tokens.to(device), mask.to(device), labels.to(device), subject.to(device)


def _target_logprobs(logits: Tensor, labels: Int[Tensor, "batch pos"]) -> Float[Tensor, " batch"]:
    """Return the summed log-probability of each row's labelled target tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * (labels >= 0)).sum(dim=1)


def target_logprobs(
    model: HookedModel,
    layer: int,
    prompts: Sequence[EditPrompt],
    output_shift: Float[Tensor, "fact d_model"] | None = None,
    batch_size: int = 64,
) -> Float[Tensor, " fact"]:
    """Return log p(target | prompt) per prompt, optionally adding output_shift to the MLP output at the subject."""
    device = model_device(model)
    pad_id = pad_token_id(model.tokenizer)
    scores = []
    for begin in range(0, len(prompts), batch_size):
        chunk = prompts[begin : begin + batch_size]
        tokens, mask, labels, subject = _batch(chunk, pad_id, device)
        hooks: list[tuple[str, HookFunction]] = []
        if output_shift is not None:
            shift = output_shift[begin : begin + len(chunk)]
            hooks = [(mlp_out_hook_name(layer), shift_at_positions(subject, shift))]
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            logits = model(tokens, attention_mask=mask)
        scores.append(_target_logprobs(logits, labels).double().cpu())
    return torch.cat(scores)


@contextlib.contextmanager
def frozen_parameters(model: HookedModel) -> Iterator[HookedModel]:
    """Context manager yielding the model with no parameter requiring grad, each flag restored on exit."""
    flags = [parameter.requires_grad for parameter in model.parameters()]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    try:
        yield model
    finally:
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------------------
# The one value search: ROME's compute_v (site mlp_out) and MEMIT's compute_z (site resid_post)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValueSearch:
    """The value search's settings; the defaults are ROME's GPT-2 XL hparams (MEMIT: clamp_norm_factor 0.75).

    The editing jobs nest it whole (EditorOptions.value_search): each setting's flag is --value_<name>, and its
    aliases are ROME's hparam names and the flat names older configs gave it (kis_lens.blocks.flat_settings).
    """

    HELP_GROUP = "value search"  # the --help section of its flags (kis_lens.flags)
    FLAG_PREFIX = "value_"  # its settings' flags: --value_steps, --value_lr, …

    steps: int = setting(20, "gradient steps of the value search, per fact and update", aliases=("v_steps",))
    lr: float = setting(0.5, "learning rate of the value search", aliases=("v_lr",))
    kl_factor: float = setting(
        0.0625, "weight of the KL term at the subject of '{subject} is a'", aliases=("kl_factor",)
    )
    weight_decay: float = setting(0.5, "ROME's weight decay ‖δ‖/‖v‖² on the value shift")
    clamp_norm_factor: float = setting(
        4.0,
        "ROME's trust region ‖δ‖ ≤ this × ‖v‖ (kis lifelong's MEMIT/AlphaEdit: --memit_clamp_norm_factor)",
        aliases=("clamp_norm_factor",),
    )
    stop_loss: float = setting(5e-2, "a fact's search stops once its loss is below this (negative: never early)")
    fast: bool = setting(
        True, "the exact fast forward in the value search where the architecture allows", aliases=("fast_values",)
    )

    def __post_init__(self) -> None:
        check_finite_settings(self)
        at_least(f"{self.FLAG_PREFIX}steps", self.steps, 1)
        for name in ("lr", "clamp_norm_factor", "kl_factor", "weight_decay"):
            value, positive = getattr(self, name), name in ("lr", "clamp_norm_factor")
            if value < 0 or (positive and value == 0):
                flag, default = self.FLAG_PREFIX + name, type(self).__dataclass_fields__[name].default
                bound = "positive" if positive else "zero or more"
                raise KisError(f"--{flag} must be {bound}, not {value}: e.g. --{flag} {default} (its default)")


@dataclass(frozen=True)
class TargetValue:
    """One fact's target value at the site (subject's last token), and how the search went."""

    value: Float[Tensor, " d_model"]  # target_init + δ
    initial_output: Float[Tensor, " d_model"]  # the site activation of the plain rewrite prompt before the search
    steps: int  # loss evaluations (ROME's loop iterations)
    nll: float  # the rewrite NLL at the last evaluation
    loss: float
    clamped: bool  # whether the norm clamp ‖δ‖ ≤ clamp·‖target_init‖ bound at the last step

    @property
    def delta(self) -> Float[Tensor, " d_model"]:
        """Return δ = value − initial_output."""
        return self.value - self.initial_output

    @property
    def relative_delta(self) -> float:
        """Return ‖δ‖ / ‖target_init‖."""
        return float(self.delta.norm() / self.initial_output.norm().clamp_min(1e-30))


@dataclass(frozen=True)
class SearchPrompts:
    """The padded batch of a value search: the rewrite prompts, then the KL prompt "{subject} is a"."""

    tokens: Int[Tensor, "batch pos"]
    mask: Int[Tensor, "batch pos"]
    subject: Int[Tensor, " batch"]
    read_rows: Int[Tensor, " read"]
    read_positions: Int[Tensor, " read"]
    labels: Int[Tensor, " read"]  # the target token predicted at each read position (-1 at the KL row)
    n_rewrites: int
    n_target_tokens: int


def search_prompts(
    model: HookedModel, fact: Fact, templates: Sequence[str], prepend_bos: bool | None = None
) -> SearchPrompts:
    """Return compute_v's prompts: template(prompt) + target_new[:-1] for every template, then "{subject} is a"."""
    if not fact.target_new:
        raise KisError(f"fact {fact.case_id} has no target_new: use CounterFact facts (e.g. counterfact-known)")
    if not templates:
        raise KisError("the value search needs at least one context template ('{}' is the plain prompt)")
    prepend_bos = resolve_prepend_bos(model, prepend_bos)
    target_ids = encode(model.tokenizer, " " + fact.target_new.strip(), prepend_bos=False)
    rows, subject, read_rows, read_positions, labels = [], [], [], [], []
    for row, template in enumerate(templates):
        prompt = Fact(fact.case_id, fact.subject, template.format(fact.prompt), fact.target_true)
        located = locate_subject(model.tokenizer, prompt, prepend_bos)
        rows.append([*located.ids, *target_ids[:-1]])
        subject.append(located.subject_last)
        for offset, token in enumerate(target_ids):  # the logits at position p predict token p + 1
            read_rows.append(row)
            read_positions.append(len(located.ids) - 1 + offset)
            labels.append(token)
    essence = locate_subject(
        model.tokenizer, Fact(fact.case_id, fact.subject, "{} is a", fact.target_true), prepend_bos
    )
    rows.append(essence.ids)
    subject.append(essence.subject_last)
    read_rows.append(len(templates))
    read_positions.append(essence.subject_last)  # ROME's KL term reads the subject's last token, not the prompt's end
    labels.append(-1)
    tokens, mask = pad_batch(rows, pad_token_id(model.tokenizer))
    device = model_device(model)
    as_tensor = lambda values: torch.tensor(values, device=device)  # noqa: E731
    return SearchPrompts(
        tokens.to(device),
        mask.to(device),
        as_tensor(subject),
        as_tensor(read_rows),
        as_tensor(read_positions),
        as_tensor(labels),
        len(templates),
        len(target_ids),
    )


def compute_target(
    model: HookedModel,
    layer: int,
    fact: Fact,
    templates: Sequence[str],
    search: ValueSearch = ValueSearch(),
    site: str = "mlp_out",
    prepend_bos: bool | None = None,
) -> TargetValue:
    """Return v* (site mlp_out: ROME's compute_v) or z (resid_post: MEMIT's compute_z) on the model as it is now."""
    site_hook_name(layer, site)  # refuses an unknown site before any work
    prompts = search_prompts(model, fact, templates, prepend_bos)
    with frozen_parameters(model):
        forward = shifted_forward(
            model,
            layer,
            site,
            prompts.tokens,
            prompts.mask,
            prompts.subject,
            prompts.read_rows,
            prompts.read_positions,
            fast=search.fast,
        )
        target_init = forward.initial[0].detach()  # the plain "{}" prompt, as ROME records it (model dtype)
        # the originals compute in the model's dtype; half-precision models are lifted to float32 for the loss
        loss_dtype = torch.promote_types(target_init.dtype, torch.float32)
        target_init = target_init.to(loss_dtype)
        delta = torch.zeros_like(target_init, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=search.lr)
        n_reads = len(prompts.read_rows)
        is_target = torch.arange(n_reads, device=delta.device) < n_reads - 1
        labels = prompts.labels[is_target]
        initial_kl: Tensor | None = None
        limit = search.clamp_norm_factor * target_init.norm()
        steps, nll_value, loss_value, clamped = 0, float("nan"), float("nan"), False
        for step in range(search.steps):
            optimizer.zero_grad()
            logits = forward(delta.expand(len(prompts.subject), -1))
            log_probs = torch.log_softmax(logits.to(loss_dtype), dim=-1)
            picked = log_probs[is_target].gather(1, labels[:, None]).squeeze(1)
            nll = -picked.sum() / prompts.n_target_tokens / prompts.n_rewrites  # mean over prompts of the per-token NLL
            kl_log_probs = log_probs[-1:]
            if initial_kl is None:
                initial_kl = kl_log_probs.detach().clone()
            kl = torch.nn.functional.kl_div(initial_kl, kl_log_probs, log_target=True, reduction="batchmean")
            loss = nll + search.kl_factor * kl + search.weight_decay * (delta.norm() / target_init.norm() ** 2)
            steps, nll_value, loss_value = step + 1, float(nll.detach()), float(loss.detach())
            if loss_value < search.stop_loss or step == search.steps - 1:
                break
            loss.backward()
            optimizer.step()
            clamped = bool(delta.norm() > limit)
            if clamped:
                with torch.no_grad():
                    delta.mul_(limit / delta.norm())
    initial = target_init.double().cpu()
    return TargetValue(initial + delta.detach().double().cpu(), initial, steps, nll_value, loss_value, clamped)


def site_activations(
    model: HookedModel, layer: int, site: str, facts: Sequence[Fact], prepend_bos: bool | None = None
) -> Float[Tensor, "fact d_model"]:
    """Return the site activation (mlp_out or resid_post of a layer) at each fact prompt's subject-last token."""
    hook_name = site_hook_name(layer, site)
    prepend_bos = resolve_prepend_bos(model, prepend_bos)
    located = [locate_subject(model.tokenizer, fact, prepend_bos) for fact in facts]
    tokens, mask = pad_batch([item.ids for item in located], pad_token_id(model.tokenizer))
    positions = torch.tensor([item.subject_last for item in located])
    return capture_rows(model, tokens, hook_name, positions, mask).double().cpu()
