"""What every editor of a lifelong run shares: the facts in edit order, their keys, P, C, prompts and held-out text.

``prepare_bench`` reads the CounterFact records in the seeded edit order, the never-edited facts, the covariance C
of every edit layer (cached), and the held-out texts right after those C read; every editor's run starts from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from kis_lens.corpus import open_corpus
from kis_lens.editing.counterfact import CounterFactCase, load_cases
from kis_lens.editing.evaluation import Continuation, prompt_continuations
from kis_lens.editing.lifelong_config import LifelongConfig
from kis_lens.editing.runs import content_sha256, safetensors_content_sha256
from kis_lens.editing.templates import memit_context_templates, rome_context_templates
from kis_lens.errors import KisError
from kis_lens.facts import Fact, facts_path, load_facts
from kis_lens.fingerprint import legacy_fingerprint
from kis_lens.keys import compute_keys
from kis_lens.matrices import p_matrix
from kis_lens.models import HookedModel, ModelInfo, model_info, resolve_prepend_bos
from kis_lens.runner import ensure_covariances
from kis_lens.storage import read_metadata
from kis_lens.tokens import encode
from kis_lens.w_out import output_weight


@dataclass
class Bench:
    """What every editor's run starts from: facts in edit order, keys, P, C, prompts, held-out text, W_0."""

    model: HookedModel
    config: LifelongConfig
    cases: list[CounterFactCase]
    keys: Float[Tensor, "fact d_mlp"]  # float64 plain keys at the edit layer, edit order
    covariances: dict[int, Tensor]
    p_matrix: Float[Tensor, "fact fact"]  # float64: P[i, j] = k_iᵀC⁻¹k_j / k_iᵀC⁻¹k_i
    p_permutation: Tensor  # a seeded permutation of the facts: the shuffled-P null's column order
    subject_ids: Int[Tensor, " fact"]  # facts with equal subjects share an id (their keys are identical)
    rewrite_new: list[Continuation]
    rewrite_true: list[Continuation]
    paraphrase: tuple[list[Continuation], list[Continuation], list[int]]  # new, true, case index per prompt
    neighborhood: tuple[list[Continuation], list[Continuation], list[int]]  # (named like the metrics they feed)
    unedited: list[Continuation]
    heldout: list[list[int]]
    fluency_prompts: list[list[int]]
    rome_templates: list[str]
    memit_templates: list[list[str]]
    weights0: dict[int, Tensor]  # float64 W_0 of every layer an editor may write
    bias: Tensor  # b_out of the edit layer
    corpus_texts_for_c: int
    covariance_identity: dict[str, Any]
    facts_sha256: str
    unedited_facts_sha256: str
    info: ModelInfo  # the unedited model's record, taken by load_model: edits to W_out never refresh it
    legacy_fingerprint: str = ""  # the unedited model's sampled W_out fingerprint of older kis (to re-key its runs)
    covariance_rekeyed_from: dict[str, tuple[str, str]] = field(default_factory=dict)  # layer → (legacy key, sha)
    unedited_nll0: Tensor = field(default_factory=lambda: torch.empty(0))
    perplexity0: float = float("nan")
    edit_perplexity0: float | None = None  # the unedited model's perplexity on the per-edit texts
    fluency0: float | None = None
    unedited_scores: dict[str, Any] = field(default_factory=dict)  # the unedited model's scores, computed once

    @property
    def weight0(self) -> Tensor:
        """Return W_0 of the edit layer."""
        return self.weights0[self.config.layer]


def _paired(model: HookedModel, cases: Sequence[CounterFactCase], attribute: str) -> tuple[list, list, list[int]]:
    prompts, groups = [], []
    for index, case in enumerate(cases):
        for prompt in getattr(case, attribute):
            prompts.append(prompt)
            groups.append(index)
    new = prompt_continuations(model, prompts, [cases[g].fact.target_new for g in groups])
    true = prompt_continuations(model, prompts, [cases[g].fact.target_true for g in groups])
    return new, true, groups


def refuse_indistinct_targets(model: HookedModel, cases: Sequence[CounterFactCase]) -> None:
    """Raise KisError for records whose target_new and target_true are the same tokens (nothing to edit)."""
    same = [
        case.case_id
        for case in cases
        if encode(model.tokenizer, " " + (case.fact.target_new or "").strip(), prepend_bos=False)
        == encode(model.tokenizer, " " + case.fact.target_true.strip(), prepend_bos=False)
    ]
    if same:
        raise KisError(
            f"record(s) {same[:5]} have a target_new that tokenizes exactly like target_true (e.g. they differ only "
            "in spaces): nothing to edit, and efficacy would read 0; fix or drop them from the facts file"
        )


def ordered_cases(config: LifelongConfig, model: HookedModel) -> list[CounterFactCase]:
    """Return the first n_edits records of config.facts in the order config.seed draws."""
    cases = load_cases(config.facts)
    refuse_indistinct_targets(model, cases)
    n_edits = len(cases) if config.n_edits is None else config.n_edits
    if n_edits > len(cases):
        raise KisError(f"n_edits = {n_edits} but {config.facts} holds {len(cases)} records: ask for fewer")
    order = np.random.default_rng(config.seed).permutation(len(cases))[:n_edits]
    return [cases[i] for i in order]


def _unedited_facts(config: LifelongConfig, edited: Sequence[CounterFactCase]) -> list[Fact]:
    subjects = {case.fact.subject for case in edited}
    pool = [fact for fact in load_facts(config.unedited_facts) if fact.subject not in subjects]
    if len(pool) < config.n_unedited:
        raise KisError(f"only {len(pool)} never-edited facts in {config.unedited_facts}: lower --n_unedited")
    order = np.random.default_rng(config.seed + 1).permutation(len(pool))[: config.n_unedited]
    return [pool[i] for i in order]


def _subject_ids(facts: Sequence[Fact]) -> Int[Tensor, " fact"]:
    """Return one id per fact, equal for facts that share a subject (in order of first appearance)."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(fact.subject, len(ids)) for fact in facts], dtype=torch.long)


def _heldout_rows(config: LifelongConfig, model: HookedModel, texts_for_c: int) -> list[list[int]]:
    """Return token rows of the texts right after those C read: text the covariance never saw."""
    corpus = open_corpus(config.corpus)
    rows, prepend_bos = [], resolve_prepend_bos(model, None)
    for text in corpus.texts(texts_for_c, None):
        if len(rows) == config.heldout_texts:
            break
        ids = encode(model.tokenizer, text, prepend_bos=prepend_bos)[: config.heldout_tokens]
        if len(ids) >= 2:
            rows.append(ids)
    if len(rows) < config.heldout_texts:
        raise KisError(
            f"the corpus holds only {len(rows)} texts after the {texts_for_c} C read: lower --heldout_texts "
            "or --max_tokens"
        )
    return rows


def _rekeyed_from(metadata: dict[str, Any]) -> tuple[str, str]:
    """Return (legacy fingerprint, file sha256) a C cache had before it was re-keyed, or empty strings."""
    return str(metadata.get("rekeyed_from_fingerprint", "")), str(metadata.get("rekeyed_from_sha256", ""))


def prepare_bench(config: LifelongConfig, model: HookedModel) -> Bench:
    """Return what every editor's run shares, read once from the unedited model (C computed or loaded)."""
    layer = config.layer
    cases = ordered_cases(config, model)
    info = model_info(model)
    covariances, report = ensure_covariances(config, model, list(config.edit_layers))
    texts_for_c = min(int(report.layers[each].texts) for each in config.edit_layers)
    covariance_identity = {
        str(each): {
            "file": report.layers[each].path.name,
            "tokens": int(report.layers[each].tokens),
            "texts": int(report.layers[each].texts),
            # by content, not file bytes, which change with safetensors' header order; a new key, so an identity
            # of an older kis (its file hash under "sha256") is told apart from this one
            "content_sha256": safetensors_content_sha256(report.layers[each].path),
        }
        for each in config.edit_layers
    }
    prepend_bos = resolve_prepend_bos(model, None)
    facts = [case.fact for case in cases]
    keys = compute_keys(model, facts, [layer], prepend_bos=prepend_bos).at_layer(layer).double().cpu()
    unedited = _unedited_facts(config, cases)
    fluency_ids = [
        encode(model.tokenizer, case.generation_prompts[0], prepend_bos=prepend_bos)
        for case in cases[: config.fluency_prompts]
        if case.generation_prompts
    ]
    settings = config.editor_settings
    rome_templates = rome_context_templates(model, seed=settings.template_seed)
    if settings.value_prompts is not None:
        rome_templates = rome_templates[: settings.value_prompts]
    weights0 = {each: output_weight(model, each).read().cpu() for each in config.edit_layers}
    return Bench(
        model=model,
        config=config,
        cases=cases,
        keys=keys,
        covariances=covariances,
        p_matrix=p_matrix(keys, covariances[layer], ridge=config.ridge).cpu(),
        p_permutation=torch.from_numpy(np.random.default_rng(config.seed + 2).permutation(len(cases))),
        subject_ids=_subject_ids(facts),
        rewrite_new=prompt_continuations(model, [f.text for f in facts], [f.target_new for f in facts]),
        rewrite_true=prompt_continuations(model, [f.text for f in facts], [f.target_true for f in facts]),
        paraphrase=_paired(model, cases, "paraphrase_prompts"),
        neighborhood=_paired(model, cases, "neighborhood_prompts"),
        unedited=prompt_continuations(model, [f.text for f in unedited], [f.target_true for f in unedited]),
        heldout=_heldout_rows(config, model, texts_for_c) if config.heldout_texts else [],
        fluency_prompts=fluency_ids,
        rome_templates=rome_templates,
        memit_templates=memit_context_templates(model, seed=settings.template_seed),
        weights0=weights0,
        bias=output_weight(model, layer).read_bias().cpu(),
        corpus_texts_for_c=texts_for_c,
        covariance_identity=covariance_identity,
        facts_sha256=content_sha256(facts_path(config.facts)),
        unedited_facts_sha256=content_sha256(facts_path(config.unedited_facts)),
        info=info,
        legacy_fingerprint=legacy_fingerprint(model),
        covariance_rekeyed_from={
            str(each): _rekeyed_from(read_metadata(report.layers[each].path)) for each in config.edit_layers
        },
    )
