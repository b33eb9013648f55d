"""Target values and target log-probabilities: what the MLP output at the subject's last token must become
so that the model says ``target_new``, and how likely a target is with the output shifted there.

The search optimises a shift δ added to ``blocks.{L}.hook_mlp_out`` at each fact's subject-last token (ROME's
value step): v = output + δ, with a weight decay on δ and ROME's trust region ‖δ‖ ≤ clamp · ‖output‖.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from kis_lens.errors import KisError
from kis_lens.facts import Fact
from kis_lens.hooks import mlp_out_hook_name
from kis_lens.keys import FactTokens, locate_subject
from kis_lens.models import HookedModel, model_device, resolve_prepend_bos
from kis_lens.tokens import encode, pad_batch, pad_token_id

HookFunction = Callable[[Tensor, Any], Tensor]


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
        hooks = []
        if output_shift is not None:
            shift = output_shift[begin : begin + len(chunk)]
            hooks = [(mlp_out_hook_name(layer), _subject_shift_hook(subject, shift))]
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            logits = model(tokens, attention_mask=mask)
        scores.append(_target_logprobs(logits, labels).double().cpu())
    return torch.cat(scores)


def _subject_shift_hook(subject: Int[Tensor, " batch"], shift: Float[Tensor, "batch d_model"]) -> HookFunction:
    """Return a forward hook that adds each row's shift to the activation at its subject's last position."""
    rows = torch.arange(len(subject), device=subject.device)

    def hook(activation: Tensor, hook: Any) -> Tensor:
        activation = activation.clone()
        activation[rows, subject] = activation[rows, subject] + shift.to(activation.device, activation.dtype)
        return activation

    return hook


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
) -> tuple[Float[Tensor, "fact d_model"], Float[Tensor, "fact d_model"]]:
    """Return (v, output) at each fact's subject-last token: v = output + δ, δ trained so the model says target_new."""
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
    with frozen_parameters(model), model.hooks(fwd_hooks=[(mlp_out_hook_name(layer), add_shift)]):
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
    current = original["output"].cpu()
    return current + shift.detach().double().cpu(), current


# ---------------------------------------------------------------------------------------------------------
# ROME's value search for one fact (rome/compute_v.py): several prefixed prompts, a KL term, early stop
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValueSearch:
    """ROME's published value-search settings (GPT-2 XL): steps, lr, KL and weight-decay factors, norm clamp."""

    steps: int = 20
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    stop_loss: float = 5e-2

    def __post_init__(self) -> None:
        if self.steps < 1 or not self.lr > 0:
            raise KisError(f"the value search needs steps >= 1 and lr > 0, got steps={self.steps}, lr={self.lr}")
        if self.kl_factor < 0 or self.weight_decay < 0 or not self.clamp_norm_factor > 0:
            raise KisError("kl_factor and weight_decay must be >= 0 and clamp_norm_factor > 0")


@dataclass(frozen=True)
class TargetValue:
    """One fact's target value v* at the layer's MLP output (subject's last token), and how the search went."""

    value: Float[Tensor, " d_model"]
    initial_output: Float[Tensor, " d_model"]
    steps: int
    nll: float


def context_prefixes(model: HookedModel, count: int, length: int = 10, seed: int = 0) -> list[str]:
    """Return `count` short texts sampled from the model (top-5, seeded) to prefix rewrite prompts, as ROME does."""
    if count < 0 or length < 1:
        raise KisError(f"need count >= 0 and length >= 1 for context prefixes, got {count}, {length}")
    tokenizer = model.tokenizer
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise KisError("the tokenizer has neither a BOS nor an EOS token to start the context prefixes from")
    generator = torch.Generator().manual_seed(seed)
    device = model_device(model)
    prefixes = []
    for _ in range(count):
        ids = [int(start)]
        with torch.no_grad():
            for _ in range(length):
                logits = model(torch.tensor([ids], device=device))[0, -1].float().cpu()
                top = torch.topk(logits, 5)
                choice = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=generator)
                ids.append(int(top.indices[choice]))
        text = tokenizer.decode(ids[1:], skip_special_tokens=True)
        prefixes.append(text.replace("{", " ").replace("}", " ").strip() + ". ")
    return prefixes


def rome_target_value(
    model: HookedModel,
    layer: int,
    fact: Fact,
    prefixes: Sequence[str] = (),
    search: ValueSearch = ValueSearch(),
    prepend_bos: bool | None = None,
) -> TargetValue:
    """Return v* for one fact as ROME's compute_v finds it on the model as it is now (edits included)."""
    if not fact.target_new:
        raise KisError(f"fact {fact.case_id} has no target_new: use CounterFact facts (e.g. counterfact-known)")
    prepend_bos = resolve_prepend_bos(model, prepend_bos)
    rewrites = [
        edit_prompt(
            model,
            Fact(fact.case_id, fact.subject, prefix + fact.prompt, fact.target_true),
            fact.target_new,
            prepend_bos,
        )
        for prefix in ("", *prefixes)
    ]
    essence = locate_subject(
        model.tokenizer, Fact(fact.case_id, fact.subject, "{} is a", fact.target_true), prepend_bos
    )
    device = model_device(model)
    kl_prompt = EditPrompt(essence.ids, essence.subject_last, len(essence.ids))
    tokens, mask, labels, subject = _batch([*rewrites, kl_prompt], pad_token_id(model.tokenizer), device)
    n_rewrites = len(rewrites)
    kl_position = len(essence.ids) - 1
    n_target_tokens = (labels[:n_rewrites] >= 0).sum(dim=1).clamp_min(1)
    rows = torch.arange(len(subject), device=device)
    shift = torch.zeros(int(model.cfg.d_model), device=device, requires_grad=True)
    captured: dict[str, Tensor] = {}

    def add_shift(activation: Tensor, hook: Any) -> Tensor:
        captured.setdefault("initial", activation[0, subject[0]].detach().double().clone())
        activation = activation.clone()
        activation[rows, subject] = activation[rows, subject] + shift.to(activation.dtype)
        return activation

    optimizer = torch.optim.Adam([shift], lr=search.lr)
    initial_kl: Tensor | None = None
    steps, nll_value = 0, float("nan")
    with frozen_parameters(model), model.hooks(fwd_hooks=[(mlp_out_hook_name(layer), add_shift)]):
        for step in range(search.steps):
            optimizer.zero_grad()
            logits = model(tokens, attention_mask=mask)
            nll = -(_target_logprobs(logits[:n_rewrites], labels[:n_rewrites]) / n_target_tokens).mean()
            kl_logprobs = torch.log_softmax(logits[n_rewrites, kl_position].float(), dim=-1)
            if initial_kl is None:
                initial_kl = kl_logprobs.detach().clone()
            kl = torch.sum(initial_kl.exp() * (initial_kl - kl_logprobs))
            target_norm = captured["initial"].norm().float()
            # ROME's decay term, as published: ‖δ‖ / ‖m‖² (not squared in δ)
            loss = nll + search.kl_factor * kl + search.weight_decay * shift.norm() / target_norm**2
            steps, nll_value = step + 1, float(nll.detach())
            if loss.item() < search.stop_loss or step == search.steps - 1:
                break
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # ROME's trust region: ‖δ‖ ≤ clamp · ‖m‖
                limit = search.clamp_norm_factor * target_norm
                if shift.norm() > limit:
                    shift.mul_(limit / shift.norm())
    initial = captured["initial"].cpu()
    return TargetValue(initial + shift.detach().double().cpu(), initial, steps, nll_value)
