"""``kl.edit``: edit facts in a model by editor name and measure each edit, as EasyEdit's ``BaseEditor.edit`` does.

>>> outcome = kl.edit(model, [{"prompt": "The Eiffel Tower is located in", "subject": "Eiffel Tower",
...                            "target_new": "Rome"}], editor="rome")
>>> outcome.metrics[0]["post"]["success"]        # p(Rome) > p(Paris) after the edit
>>> outcome.restore()                            # or: with kl.edit(...) as outcome: ... (restores on exit)

It runs the same editors as ``kis lifelong`` (kis_lens.editing.registry: original ROME, r-ROME, p-ROME, MEMIT,
AlphaEdit, emmet, none), with the same value search and the originals' settings (EditorSettings). C, the second
moment of the MLP keys, is estimated on the embedded Wikipedia text unless given. Only the rewrite prompt is
scored here; CounterFact's paraphrase, neighbourhood and fluency metrics over many edits are ``kis lifelong``'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kis_lens.corpus import embedded_wikipedia_texts
from kis_lens.covariance import estimate_second_moments
from kis_lens.editing.registry import EDITORS, EditorSettings, EditSession, check_edit_layer, get_editor
from kis_lens.editing.values import edit_prompt, target_logprobs
from kis_lens.errors import KisError
from kis_lens.facts import Fact, parse_fact
from kis_lens.hooks import to_tokens
from kis_lens.models import HookedModel, model_device
from kis_lens.stats import SecondMoment
from kis_lens.w_out import output_weight

Request = str | Mapping[str, Any] | Fact
DEFAULT_COVARIANCE_TOKENS = 100_000  # kis's default corpus budget for C (kis all, kis lifelong)


@dataclass
class EditOutcome:
    """The edited model, each request's scores before and after, and the ΔW written per layer; restores on exit."""

    model: HookedModel
    editor: str
    facts: list[Fact]
    metrics: list[dict[str, Any]]
    deltas: dict[int, Float[Tensor, "d_mlp d_model"]]
    original_weights: dict[int, Tensor] = field(repr=False, default_factory=dict)

    def restore(self) -> HookedModel:
        """Write the weights back as they were before the edits, and return the model."""
        for layer, weight in self.original_weights.items():
            output_weight(self.model, layer).write(weight)
        return self.model

    def __enter__(self) -> EditOutcome:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.restore()


def _model_argmax(model: HookedModel, fact: Fact) -> str:
    """Return the model's greedy next token after the fact's prompt, as text: the answer the edit replaces."""
    tokens, _ = to_tokens(model, fact.text)
    with torch.no_grad():
        logits = model(tokens.to(model_device(model)))
    return model.tokenizer.decode([int(logits[0, -1].argmax())]).strip() or "?"


def as_fact(model: HookedModel, request: Request, where: str = "request") -> Fact:
    """Return the Fact of one request: a CounterFact record, a Fact, or a dict with prompt, subject and target_new.

    A dict's prompt holds the subject literally ("The Eiffel Tower is located in") or as "{}"; target_true (or
    EasyEdit's ground_truth) defaults to the model's own greedy answer.
    """
    if isinstance(request, Fact):
        fact = request
    elif isinstance(request, Mapping) and "requested_rewrite" in request:
        fact = parse_fact(dict(request), where)
    elif isinstance(request, Mapping):
        missing = [name for name in ("prompt", "subject", "target_new") if not request.get(name)]
        if missing:
            raise KisError(
                f"{where}: no {', '.join(missing)}: give prompt, subject and target_new (or a CounterFact record)"
            )
        prompt, subject = str(request["prompt"]), str(request["subject"])
        if "{}" not in prompt:
            if subject not in prompt:
                raise KisError(f"{where}: subject {subject!r} is not in prompt {prompt!r}: fix one of them")
            prompt = prompt.replace(subject, "{}", 1)
        target = request["target_new"]
        target = target.get("str") if isinstance(target, Mapping) else target
        true = request.get("target_true", request.get("ground_truth"))
        true = true.get("str") if isinstance(true, Mapping) else true
        fact = Fact(str(request.get("case_id", where)), subject, prompt, str(true or "?"), str(target))
        if not true:
            fact = dataclasses.replace(fact, target_true=_model_argmax(model, fact))
    else:
        raise KisError(f"{where}: a request is a dict (prompt, subject, target_new), a CounterFact record or a Fact")
    if not fact.target_new:
        raise KisError(f"{where} (subject {fact.subject!r}): no target_new to edit towards")
    return fact


def _requests(
    requests: Request | Sequence[Request], target_new: Sequence[str] | None, subject: Sequence[str] | None
) -> list[Request]:
    """Return the requests as a list; prompts given as strings take target_new and subject lists (EasyEdit's form)."""
    listed = [requests] if isinstance(requests, (str, Mapping, Fact)) else list(requests)
    if not listed:
        raise KisError("no requests to edit: give at least one")
    if all(isinstance(item, str) for item in listed):
        if target_new is None or subject is None or not len(target_new) == len(subject) == len(listed):
            raise KisError("prompts given as strings need target_new= and subject= lists of the same length")
        return [{"prompt": prompt, "subject": s, "target_new": t} for prompt, s, t in zip(listed, subject, target_new)]
    if any(isinstance(item, str) for item in listed):
        raise KisError("mix of prompt strings and request dicts: give one kind")
    return listed


def _scores(model: HookedModel, facts: Sequence[Fact], layer: int) -> list[dict[str, Any]]:
    """Return log p(target_new) and log p(target_true) of each fact's rewrite prompt, and whether new wins."""
    targets = [fact.target_new or "" for fact in facts] + [fact.target_true for fact in facts]
    prompts = [edit_prompt(model, fact, target) for fact, target in zip([*facts, *facts], targets)]
    scores = target_logprobs(model, layer, prompts)  # both targets of every fact in one batched pass
    new, true = scores[: len(facts)], scores[len(facts) :]
    return [
        {"target_new_logprob": float(n), "target_true_logprob": float(t), "success": bool(n > t)}
        for n, t in zip(new, true)
    ]


def estimate_covariances(
    model: HookedModel, layers: Sequence[int], max_tokens: int = DEFAULT_COVARIANCE_TOKENS, progress: bool = False
) -> dict[int, Float[Tensor, "d_mlp d_mlp"]]:
    """Return C = E[kkᵀ] per layer from max_tokens tokens of the embedded Wikipedia text, float64."""
    moments = estimate_second_moments(
        model, embedded_wikipedia_texts(), layers, max_tokens=max_tokens, progress=progress
    )
    return {layer: moment.compute() for layer, moment in moments.items()}


def edit(
    model: HookedModel,
    requests: Request | Sequence[Request],
    editor: str = "rome",
    *,
    sequential: bool = True,
    layer: int | None = None,
    batch_size: int = 1,
    target_new: Sequence[str] | None = None,
    subject: Sequence[str] | None = None,
    covariances: Mapping[int, Tensor | SecondMoment] | None = None,
    covariance_tokens: int = DEFAULT_COVARIANCE_TOKENS,
    settings: EditorSettings | None = None,
    progress: bool = False,
) -> EditOutcome:
    """Edit the requests into the model with a registered editor; return the outcome (a context manager that restores).

    sequential=True: the edits pile up in order, batch_size requests per update (MEMIT, AlphaEdit, emmet batch;
    ROME takes one); the model keeps them until ``restore()``. sequential=False: each request is edited alone into
    the original weights, scored, and undone (EasyEdit's sequential_edit=False); the model ends as it began.
    layer: the edit layer (MEMIT's last); None keeps EditorSettings' (4), or the last editable layer of a smaller
    model. covariances: C per layer (tensors or SecondMoments), else estimated on covariance_tokens tokens.
    """
    if editor not in EDITORS:
        raise KisError(f"unknown editor {editor!r}: use one of {', '.join(EDITORS)}")
    if batch_size < 1:
        raise KisError(f"batch_size must be at least 1, not {batch_size}")
    settings = settings or EditorSettings()
    if layer is not None:
        settings = dataclasses.replace(settings, layer=layer)
    elif settings.layer > int(model.cfg.n_layers) - 2:
        settings = dataclasses.replace(settings, layer=int(model.cfg.n_layers) - 2)
    check_edit_layer(model, settings.layer)
    chosen = get_editor(editor)
    layers = list(settings.memit_layers) if chosen.multi_layer else [settings.layer]
    facts = [as_fact(model, item, f"request {i}") for i, item in enumerate(_requests(requests, target_new, subject))]
    if covariances is None:
        found = estimate_covariances(model, layers, covariance_tokens, progress)
    else:
        absent = [at for at in layers if at not in covariances]
        if absent:
            raise KisError(f"covariances lack layer(s) {absent}, which {editor} edits: pass C for them or omit it")
        found = {at: c.compute() if isinstance(c, SecondMoment) else c for at, c in covariances.items()}
    original = {at: output_weight(model, at).read() for at in layers}
    before = _scores(model, facts, settings.layer)
    covariance = {at: found[at] for at in layers}
    session = EditSession.create(model, settings, covariance, editors=[editor])
    step = batch_size if chosen.batches else 1
    after: list[dict[str, Any]] = []
    for start in range(0, len(facts), step):
        group = facts[start : start + step]
        if not sequential and start:  # each edit alone: a fresh session (AlphaEdit's cache_c too), same templates
            session = EditSession.create(
                model, settings, covariance, [editor], session.rome_templates, session.memit_templates
            )
        chosen.update(session, group)
        if not sequential:
            after += _scores(model, group, settings.layer)
            for at, weight in original.items():
                output_weight(model, at).write(weight)
    if sequential:
        after = _scores(model, facts, settings.layer)
    deltas = {at: (output_weight(model, at).read() - original[at]).cpu() for at in layers}
    metrics = [
        {
            "case_id": fact.case_id,
            "subject": fact.subject,
            "target_new": fact.target_new,
            "target_true": fact.target_true,
            "pre": pre,
            "post": post,
        }
        for fact, pre, post in zip(facts, before, after)
    ]
    return EditOutcome(model, editor, facts, metrics, deltas, original)
