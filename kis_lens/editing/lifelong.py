"""Lifelong editing for real: hundreds of CounterFact edits written one after another into the model's W_out.

``run_lifelong`` runs each registered editor (kis_lens.editing.registry: original ROME, r-ROME, p-ROME, MEMIT,
AlphaEdit, an EMMET-like batch fit, and ``none``) over the same seeded order of records, editing the weights
cumulatively, and every ``probe_every`` / ``eval_every`` edits measures what the field measures: ROME's
CounterFact metrics on all edits so far, held-out perplexity, the drift of never-edited facts, the edit layer's
norm and conditioning, and the interference P predicts for each earlier edit u (Σ over later edits i of
P[i,u]·r_i at the edit layer's output, r_i = k_i ΔW_i) against the drift measured with the edited weights.

Every run has its own file stem (editor, seed, size, layer and a hash of everything it depends on), is locked
while it writes, and checkpoints to safetensors + JSON; a restart resumes only when the facts' content, the
C it used, the model and the version are all the same. The model's own weights are restored on exit.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from kis_lens._version import __version__
from kis_lens.config import ModelOptions, at_least, setting
from kis_lens.corpus import EMBEDDED_CORPUS, open_corpus
from kis_lens.editing.counterfact import CounterFactCase, load_cases
from kis_lens.editing.evaluation import (
    Continuation,
    fluency,
    greedy_generate,
    harmonic_mean,
    neighborhood_success,
    perplexity,
    prompt_continuations,
    rewrite_success,
    score_continuations,
)
from kis_lens.editing.metrics import correlations
from kis_lens.editing.registry import EDITOR_NAMES, EditorSettings, EditSession, check_edit_layer, get_editor
from kis_lens.editing.runs import (
    checkpoint_paths,
    content_sha256,
    find_pickle_checkpoints,
    load_checkpoint,
    remove_checkpoint,
    run_identity,
    run_lock,
    run_stem,
    save_checkpoint,
    stale_checkpoints,
)
from kis_lens.editing.templates import memit_context_templates, rome_context_templates
from kis_lens.editing.values import ValueSearch
from kis_lens.editing.verdicts import (
    collapse_sensitivity,
    judge_prediction_with_controls,
    prediction_controls,
    rho_alarm,
)
from kis_lens.errors import KisError
from kis_lens.facts import DEFAULT_FACTS, Fact, facts_path, load_facts
from kis_lens.io import load_json_object, save_json
from kis_lens.keys import compute_keys
from kis_lens.layout import lifelong_dir
from kis_lens.matrices import p_matrix
from kis_lens.models import (
    HookedModel,
    ModelInfo,
    is_legacy_fingerprint,
    legacy_fingerprint,
    load_model,
    model_device,
    model_info,
    output_weight,
    resolve_prepend_bos,
)
from kis_lens.runner import editing_run_config, ensure_covariances
from kis_lens.storage import read_metadata
from kis_lens.tokens import encode

EDITORS: tuple[str, ...] = EDITOR_NAMES
DEFAULT_EDITORS: tuple[str, ...] = ("rome", "r-rome", "p-rome", "memit", "alphaedit", "none")
# Predicted and measured interference are norms of layer-output vectors (a ratio to ‖r_u‖ blows up for an edit
# that needed no change); recorded in each result's settings.
INTERFERENCE_UNITS = "layer output"
STEP_METRICS: tuple[str, ...] = (
    "efficacy",
    "efficacy_magnitude",
    "argmax_efficacy",
    "paraphrase",
    "paraphrase_magnitude",
    "neighborhood",
    "neighborhood_magnitude",
    "score",
    "fluency",
)
# One row per earlier edit u at each probe t: P's prediction, the controls a verdict needs (the count of later edits,
# √Σ‖r_i‖² over them, P with its columns permuted across facts), and the drift measured with the edited weights.
PAIR_FIELDS: tuple[str, ...] = (
    "n_edits",
    "case_id",
    "edit_index",
    "predicted",
    "later_count",
    "later_residual_norm",
    "predicted_shuffled",
    "later_same_subject",
    "measured_output",
    "measured_logprob",
    "success_now",
)
# Settings that change how a run is shown or where it runs, not what it computes: left out of its identity.
PRESENTATION_FIELDS: tuple[str, ...] = ("editors", "progress", "resume", "device", "output_dir")


@dataclass(frozen=True)
class LifelongConfig(ModelOptions):
    """Every setting of a lifelong-editing run: the shared model options, then the run's own."""

    editors: tuple[str, ...] = setting(
        DEFAULT_EDITORS, f"comma-separated subset of {','.join(EDITORS)}", choices=EDITORS, aliases=("editor",)
    )
    layer: int = setting(4, "ROME's edit layer (W_out), and the last of MEMIT's layers")
    memit_span: int = setting(5, "MEMIT/AlphaEdit edit this many layers ending at --layer (GPT-2 XL: 13–17 for 17)")
    n_edits: int | None = setting(None, "facts edited one after another", none="every record", cli_none="all")
    eval_every: int = setting(100, "every metric (paraphrase, neighborhood, score, fluency) every this many edits")
    probe_every: int = setting(10, "the cheap metrics (efficacy on all edits so far, perplexity, drift) this often")
    batch_size: int = setting(16, "facts per MEMIT/AlphaEdit/emmet batch")
    covariance_weight: float | None = setting(
        None, "MEMIT's mom2_update_weight λ on the mean C", none="GPT-J's 15000 per 16384 MLP dims × d_mlp"
    )
    null_threshold: float = setting(2e-2, "AlphaEdit's null space: singular values of C below this")
    null_relative: bool = setting(False, "AlphaEdit's threshold × the largest singular value (not the original)")
    null_l2: float = setting(10.0, "AlphaEdit's L2")
    emmet_weight: float = setting(1.0, "emmet's λ in C⁻¹Kᵀ(λI + K C⁻¹ Kᵀ)⁻¹R")
    value_steps: int = setting(20, "gradient steps of the value search (compute_v / compute_z)")
    value_lr: float = setting(0.5, "learning rate of the value search")
    kl_factor: float = setting(0.0625, "weight of the KL term at the subject of '{subject} is a'")
    value_weight_decay: float = setting(0.5, "ROME's weight decay ‖δ‖/‖v‖² on the value shift")
    clamp_norm_factor: float = setting(4.0, "ROME: ‖δ‖ ≤ this × ‖v‖")
    memit_clamp_norm_factor: float = setting(0.75, "MEMIT/AlphaEdit: ‖δ‖ ≤ this × ‖z‖")
    value_prompts: int | None = setting(None, "use only the first N of ROME's 21 templates", none="all 21")
    fast_values: bool = setting(True, "the exact fast forward in the value search where the architecture allows")
    facts: str = setting(
        DEFAULT_FACTS, "CounterFact records to edit: counterfact-known, counterfact-extended (1,599) or a path"
    )
    unedited_facts: str = setting("known-1000", "facts never edited, watched for drift: known-1000 or a path")
    n_unedited: int = setting(64, "how many never-edited facts to watch")
    corpus: str = setting(EMBEDDED_CORPUS, f"corpus for C and held-out text: {EMBEDDED_CORPUS} or a file")
    max_tokens: int | None = setting(100_000, "corpus tokens for C", none="no limit", cli_none=0)
    ridge: float = setting(0.0, "add ridge·mean(diag C)·I to C before solving")
    heldout_texts: int = setting(16, "held-out texts (after those C read) for perplexity")
    heldout_tokens: int = setting(128, "tokens per held-out text")
    edit_perplexity_texts: int = setting(4, "the first held-out texts scored after every update (0: off)")
    disabling_norm_ratio: float = setting(10.0, "a disabling edit: its ‖ΔW‖ above this × the running median …")
    disabling_perplexity_ratio: float = setting(1.5, "… and held-out perplexity right after it above this × before")
    fluency_prompts: int = setting(8, "generation prompts for fluency")
    fluency_tokens: int = setting(32, "greedy tokens generated per fluency prompt")
    bootstrap: int = setting(1000, "resamples of the bootstrap (clustered by edit) behind the P-prediction verdict")
    retention_threshold: float = setting(0.5, "collapse when efficacy on all edits so far falls below this")
    perplexity_ratio: float = setting(2.0, "… or when held-out perplexity exceeds this × the unedited model's")
    resume: bool = setting(True, "continue an interrupted run from its checkpoint")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prepend_bos is not None:
            raise KisError("lifelong follows the model's own BOS convention: leave prepend_bos as None (auto)")
        at_least("n_edits", self.n_edits, 1, none_means="all")
        at_least("value_prompts", self.value_prompts, 1, none_means="all")
        for name in ("eval_every", "probe_every", "batch_size", "value_steps", "n_unedited", "memit_span", "bootstrap"):
            at_least(name, getattr(self, name), 1)
        for name in ("heldout_texts", "fluency_prompts", "edit_perplexity_texts"):
            at_least(name, getattr(self, name), 0)
        at_least("max_tokens", self.max_tokens, 1, none_means="no limit")
        unknown = [name for name in self.editors if name not in EDITORS]
        if unknown or not self.editors:
            raise KisError(f"unknown editor(s) {unknown}: choose from {', '.join(EDITORS)}")
        numbers = (
            "covariance_weight",
            "null_threshold",
            "null_l2",
            "emmet_weight",
            "ridge",
            "perplexity_ratio",
            "disabling_norm_ratio",
            "disabling_perplexity_ratio",
        )
        for name in numbers:
            if getattr(self, name) is not None and not math.isfinite(getattr(self, name)):
                raise KisError(f"--{name} must be a finite number, got {getattr(self, name)}")
        if (self.covariance_weight or 0) < 0 or not self.null_l2 > 0 or not self.null_threshold > 0:
            raise KisError("covariance_weight must be >= 0, null_l2 and null_threshold > 0")
        if not self.ridge >= 0 or self.emmet_weight < 0:
            raise KisError(f"ridge and emmet_weight must be zero or positive, got {self.ridge}, {self.emmet_weight}")
        if not 0 <= self.retention_threshold <= 1 or not self.perplexity_ratio > 1:
            raise KisError("retention_threshold must lie in [0, 1] and perplexity_ratio be > 1")
        self.editor_settings  # noqa: B018 (validates the value-search settings)

    @property
    def editor_settings(self) -> EditorSettings:
        """Return the editors' hyperparameters."""
        search = dict(
            steps=self.value_steps,
            lr=self.value_lr,
            kl_factor=self.kl_factor,
            weight_decay=self.value_weight_decay,
            fast=self.fast_values,
        )
        return EditorSettings(
            layer=self.layer,
            memit_span=self.memit_span,
            rome_search=ValueSearch(clamp_norm_factor=self.clamp_norm_factor, **search),
            memit_search=ValueSearch(clamp_norm_factor=self.memit_clamp_norm_factor, **search),
            covariance_weight=self.covariance_weight,
            null_threshold=self.null_threshold,
            null_relative=self.null_relative,
            null_l2=self.null_l2,
            emmet_weight=self.emmet_weight,
            value_prompts=self.value_prompts,
            template_seed=self.seed,
            ridge=self.ridge,
        )

    @property
    def edit_layers(self) -> tuple[int, ...]:
        """Return every layer some chosen editor writes (for C and the restore)."""
        layers = {self.layer}
        if any(get_editor(name).multi_layer for name in self.editors):
            layers |= set(self.editor_settings.memit_layers)
        return tuple(sorted(layers))


@dataclass
class LifelongResult:
    """One editor's run: its measurement steps, its edits, the fact–step pairs of the P check, a summary."""

    editor: str
    steps: list[dict[str, Any]]
    edits: list[dict[str, Any]]
    pairs: dict[str, list[Any]]
    summary: dict[str, Any]
    settings: dict[str, Any]
    path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return everything as a JSON-ready dict (what the run's <stem>.json holds)."""
        return {
            "editor": self.editor,
            "steps": self.steps,
            "edits": self.edits,
            "pairs": self.pairs,
            "summary": self.summary,
            "settings": self.settings,
        }


# ---------------------------------------------------------------------------------------------------------
# What every editor shares: the facts in edit order, their keys, P, the evaluation prompts, held-out text
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Bench:
    model: HookedModel
    config: LifelongConfig
    cases: list[CounterFactCase]
    keys: Tensor  # [n, d_mlp] float64 plain keys at the edit layer, edit order
    covariances: dict[int, Tensor]
    p_matrix: Tensor  # [n, n] float64: P[i, j] = k_iᵀC⁻¹k_j / k_iᵀC⁻¹k_i
    p_permutation: Tensor  # a seeded permutation of the facts: the shuffled-P null's column order
    subject_ids: Tensor  # [n] int: facts with equal subjects share an id (their keys are identical)
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


def _ordered_cases(config: LifelongConfig, model: HookedModel) -> list[CounterFactCase]:
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


def _subject_ids(facts: Sequence[Fact]) -> Tensor:
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


def _prepare(config: LifelongConfig, model: HookedModel) -> _Bench:
    layer = config.layer
    cases = _ordered_cases(config, model)
    run_config = editing_run_config(config)
    info = model_info(model)
    covariances, report = ensure_covariances(run_config, model, list(config.edit_layers))
    texts_for_c = min(int(report.layers[each].texts) for each in config.edit_layers)
    covariance_identity = {
        str(each): {
            "file": report.layers[each].path.name,
            "tokens": int(report.layers[each].tokens),
            "texts": int(report.layers[each].texts),
            "sha256": content_sha256(report.layers[each].path),
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
    return _Bench(
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


# ---------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------


def _fluency(bench: _Bench) -> float | None:
    if not bench.fluency_prompts:
        return None
    generated = greedy_generate(bench.model, bench.fluency_prompts, bench.config.fluency_tokens)
    texts = [
        bench.model.tokenizer.decode([*prompt, *new], skip_special_tokens=True)
        for prompt, new in zip(bench.fluency_prompts, generated)
    ]
    return fluency(texts)


def _perplexity(bench: _Bench) -> float:
    return perplexity(bench.model, bench.heldout) if bench.heldout else float("nan")


def _edit_perplexity(bench: _Bench) -> float | None:
    """Return held-out perplexity on the first edit_perplexity_texts texts (scored after every update), or None."""
    count = bench.config.edit_perplexity_texts
    return perplexity(bench.model, bench.heldout[:count]) if count and bench.heldout else None


def _prompt_scores(
    bench: _Bench, name: str, upto: int, unedited_model: bool
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Return NLL(new), NLL(true) and the case of each paraphrase/neighborhood prompt of the first `upto` cases.

    The unedited model's scores are computed once for every case and sliced (curves of a run that changed nothing)."""
    news, trues, owners = getattr(bench, name)
    if unedited_model:
        cache = bench.unedited_scores
        if name not in cache:
            cache[name] = _prompt_scores(bench, name, len(bench.cases), unedited_model=False)
        new_nll, true_nll, all_owners = cache[name]
        keep = np.asarray(all_owners) < upto
        return new_nll[keep], true_nll[keep], [owner for owner in all_owners if owner < upto]
    rows = [i for i, owner in enumerate(owners) if owner < upto]
    nll = (
        score_continuations(bench.model, [news[i] for i in rows] + [trues[i] for i in rows]).nll.double().cpu().numpy()
    )
    return nll[: len(rows)], nll[len(rows) :], [owners[i] for i in rows]


def _case_metrics(
    bench: _Bench, upto: int, full: bool, rewrite: tuple[Tensor, Tensor, Tensor], unedited_model: bool = False
) -> dict[str, Any]:
    """Return ROME's CounterFact metrics on the first `upto` cases (paraphrase/neighborhood only when full)."""
    metrics: dict[str, Any] = dict.fromkeys(STEP_METRICS)
    if upto == 0:
        return metrics
    new, true, greedy = rewrite
    groups = list(range(upto))
    metrics["efficacy"], metrics["efficacy_magnitude"] = rewrite_success(new.numpy(), true.numpy(), groups)
    metrics["argmax_efficacy"] = float(greedy.double().mean())  # teacher-forced: no text is generated
    if full:
        for name, success in (("paraphrase", rewrite_success), ("neighborhood", neighborhood_success)):
            new_nll, true_nll, owners = _prompt_scores(bench, name, upto, unedited_model)
            metrics[name], metrics[f"{name}_magnitude"] = success(new_nll, true_nll, owners)
        metrics["score"] = harmonic_mean([metrics["efficacy"], metrics["paraphrase"], metrics["neighborhood"]])
    return metrics


def _oldest_quarter_retention(rewrite: tuple[Tensor, Tensor, Tensor], upto: int) -> float | None:
    """Return rewrite success on the oldest quarter of the edits so far (recent edits prop up efficacy on all)."""
    if upto == 0:
        return None
    oldest = max(1, upto // 4)
    new, true, _ = rewrite
    return rewrite_success(new[:oldest].numpy(), true[:oldest].numpy(), list(range(oldest)))[0]


def disabling_edits(
    edits: Sequence[dict[str, Any]], perplexity0: float | None, norm_ratio: float, perplexity_ratio: float
) -> list[dict[str, Any]]:
    """Return the updates whose ‖ΔW‖ exceeds norm_ratio × the running median of earlier updates' and after which
    held-out perplexity (on the per-edit texts) rises above perplexity_ratio × its value just before (Gupta et al.)."""
    members: dict[int, list[int]] = {}  # update → the indices of its edits (a batch shares one update's numbers)
    for index, edit in enumerate(edits):
        members.setdefault(edit.get("update", index), []).append(index)
    found, norms, before = [], [], perplexity0
    for indices in members.values():
        update, n_edits = edits[indices[0]], indices[-1] + 1
        norm, after = update.get("update_delta_norm"), update.get("edit_perplexity")
        if norm is None:
            continue
        median = float(np.median(norms)) if norms else None
        big = median is not None and median > 0 and norm > norm_ratio * median
        jump = before is not None and after is not None and before > 0 and after > perplexity_ratio * before
        if big and jump:
            found.append(
                {
                    "n_edits": n_edits,
                    "case_id": update.get("case_id"),
                    "update_delta_norm": norm,
                    "running_median": median,
                    "perplexity_before": before,
                    "perplexity_after": after,
                }
            )
        norms.append(norm)
        before = after if after is not None else before
    return found


def _weight_stats(weight: Tensor, weight0: Tensor) -> dict[str, float]:
    singular = torch.linalg.svdvals(weight)
    return {
        "weight_change_norm": float((weight - weight0).norm()),
        "sigma_max": float(singular[0]),
        "condition_number": float(singular[0] / singular[-1]) if singular[-1] > 0 else math.inf,
    }


def _accumulated_p2(p_matrix: Tensor, upto: int) -> float:
    block = p_matrix[:upto, :upto]
    return float((block**2).sum() - torch.diagonal(block).pow(2).sum())


# ---------------------------------------------------------------------------------------------------------
# One editor's run
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _State:
    """Everything an editor's run has done so far: enough to resume it."""

    weights: dict[int, Tensor]  # float64 W_t of every layer the editor writes
    done: int = 0
    update_of: list[int] = field(default_factory=list)  # which update wrote each edit
    residuals: list[Tensor] = field(default_factory=list)  # r_u = k_u ΔW_u at the edit layer
    after: list[Tensor] = field(default_factory=list)  # k_u W + b right after u's update
    nll_after: list[float] = field(default_factory=list)  # NLL(target_new) on u's rewrite prompt right after
    earlier_keys_outer: dict[int, Tensor] = field(default_factory=dict)  # AlphaEdit's cache_c
    changed: bool = False  # whether any update so far moved a weight
    steps: list[dict[str, Any]] = field(default_factory=list)
    edits: list[dict[str, Any]] = field(default_factory=list)
    pairs: dict[str, list[Any]] = field(default_factory=lambda: {k: [] for k in PAIR_FIELDS})
    seconds: float = 0.0
    probe_seconds: list[float] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)

    _TENSOR_LISTS = ("residuals", "after")

    def tensors(self) -> dict[str, Tensor]:
        """Return the state's tensors by flat name (for safetensors)."""
        named = {f"weight.{layer}": weight for layer, weight in self.weights.items()}
        named |= {f"cache_c.{layer}": value for layer, value in self.earlier_keys_outer.items()}
        for name in self._TENSOR_LISTS:
            if getattr(self, name):
                named[name] = torch.stack(getattr(self, name))
        return named

    def record(self) -> dict[str, Any]:
        """Return the state's JSON part."""
        names = ("done", "update_of", "nll_after", "changed", "steps", "edits", "pairs", "seconds")
        return {name: getattr(self, name) for name in (*names, "probe_seconds", "eval_seconds")}

    @classmethod
    def restore(cls, tensors: dict[str, Tensor], record: dict[str, Any]) -> _State:
        """Return the state saved by tensors() and record()."""
        weights = {int(name.split(".")[1]): t for name, t in tensors.items() if name.startswith("weight.")}
        cache = {int(name.split(".")[1]): t for name, t in tensors.items() if name.startswith("cache_c.")}
        lists = {name: list(tensors[name].unbind()) if name in tensors else [] for name in cls._TENSOR_LISTS}
        return cls(weights=weights, earlier_keys_outer=cache, **lists, **record)


def _measure(bench: _Bench, state: _State, kind: str, clock: float) -> None:
    """Append one measurement step (and its fact–step pairs) to the state."""
    started = time.perf_counter()
    t, full = state.done, kind == "eval"
    unchanged = not state.changed  # a run that has moved no weight measures the unedited model: reuse its scores
    rewrite = _baseline_rewrite(bench, t) if unchanged else _scores_of(bench, range(t))
    step: dict[str, Any] = {"n_edits": t, "kind": kind, **_case_metrics(bench, t, full, rewrite, unchanged)}
    step["retention_oldest_quarter"] = _oldest_quarter_retention(rewrite, t)
    if unchanged:
        step["fluency"] = bench.fluency0 if full else None
        step["perplexity"] = bench.perplexity0
        step["unedited_nll_drift"] = 0.0
    else:
        step["fluency"] = _fluency(bench) if full else None
        step["perplexity"] = _perplexity(bench)
        unedited = score_continuations(bench.model, bench.unedited).nll.double().cpu()
        step["unedited_nll_drift"] = float((unedited - bench.unedited_nll0).abs().mean())
    step.update(_weight_stats(state.weights[bench.config.layer], bench.weight0))
    step["predicted_interference"], step["measured_interference"] = None, None
    if t > 0:
        _interference(bench, state, step, rewrite)
    step["accumulated_p2"] = _accumulated_p2(bench.p_matrix, t)
    step["seconds"] = round(state.seconds + time.perf_counter() - clock, 2)
    state.steps.append(step)
    (state.eval_seconds if full else state.probe_seconds).append(time.perf_counter() - started)


def _interference(bench: _Bench, state: _State, step: dict[str, Any], rewrite: tuple[Tensor, Tensor, Tensor]) -> None:
    """Fill the predicted and measured interference on earlier edits, and add their fact–step pairs."""
    t = state.done
    update = torch.tensor(state.update_of)
    later = update[None, :] > update[:, None]  # later[u, i]: edit i came in an update after u's
    if not later.any():
        return
    residuals = torch.stack(state.residuals)
    mixing = bench.p_matrix[:t, :t].T * later  # mixing[u, i] = P[i, u] for later i
    earlier = later.any(dim=1)
    # absolute norms in the layer output's units: a ratio to ‖r_u‖ explodes for an edit that needed no change
    predicted = (mixing @ residuals).norm(dim=1)[earlier]
    # controls that know nothing of P: how many edits came later, and how large they were
    later_count = later.sum(dim=1)[earlier]
    later_residual_norm = (later.double() @ residuals.norm(dim=1).pow(2)).sqrt()[earlier]
    shuffled = bench.p_matrix[:, bench.p_permutation][:t, :t].T * later  # P's columns permuted across facts
    predicted_shuffled = (shuffled @ residuals).norm(dim=1)[earlier]
    # a later edit of the same subject rewrites u's very key (P = 1): counted, and kept out of the verdicts
    subjects = bench.subject_ids[:t]
    same_subject = (subjects[None, :] == subjects[:, None]) & later
    later_same_subject = same_subject.sum(dim=1)[earlier]
    outputs = bench.keys[:t] @ state.weights[bench.config.layer] + bench.bias
    measured = (outputs - torch.stack(state.after)).norm(dim=1)[earlier]
    nll_new, nll_true, _ = rewrite
    logprob = (nll_new - torch.tensor(state.nll_after, dtype=torch.float64))[earlier]
    success_now = (nll_new < nll_true)[earlier]  # with the edit's newest_efficacy: was it lost since?
    step["predicted_interference"] = float(predicted.mean())
    step["measured_interference"] = float(measured.mean())
    indices = torch.nonzero(earlier).flatten().tolist()
    ids = [bench.cases[u].case_id for u in indices]
    state.pairs["n_edits"].extend([t] * len(ids))
    state.pairs["case_id"].extend(ids)
    state.pairs["edit_index"].extend(indices)
    state.pairs["predicted"].extend(predicted.tolist())
    state.pairs["later_count"].extend(later_count.tolist())
    state.pairs["later_residual_norm"].extend(later_residual_norm.tolist())
    state.pairs["predicted_shuffled"].extend(predicted_shuffled.tolist())
    state.pairs["later_same_subject"].extend(later_same_subject.tolist())
    state.pairs["measured_output"].extend(measured.tolist())
    state.pairs["measured_logprob"].extend(logprob.tolist())
    state.pairs["success_now"].extend(success_now.tolist())


def _baseline_rewrite(bench: _Bench, upto: int) -> tuple[Tensor, Tensor, Tensor]:
    """Return the unedited model's rewrite scores of the first `upto` facts, scored once for all of them."""
    if "rewrite" not in bench.unedited_scores:
        bench.unedited_scores["rewrite"] = _scores_of(bench, range(len(bench.cases)))
    new, true, greedy = bench.unedited_scores["rewrite"]
    return new[:upto], true[:upto], greedy[:upto]


def _edit(bench: _Bench, editor: str, session: EditSession, state: _State, rows: list[int], update_index: int) -> None:
    """Run the editor's update on the rows' facts (target values found on the model as it is now)."""
    started = time.perf_counter()
    facts = [bench.cases[row].fact for row in rows]
    record = get_editor(editor).update(session, facts)
    state.weights = {layer: session.weights[layer] for layer in state.weights}
    state.earlier_keys_outer = dict(session.earlier_keys_outer)
    state.changed = state.changed or any(bool(delta.abs().max() > 0) for delta in record.deltas.values())
    keys = bench.keys[rows]
    weight = state.weights[bench.config.layer]
    after = keys @ weight + bench.bias
    new, true, _ = _scores_of(bench, rows) if state.changed else _baseline_rewrite_rows(bench, rows)
    seconds = time.perf_counter() - started
    # per update, not only per probe: what an alarm for a disabling edit would watch
    update = {
        "update": update_index,
        "update_delta_norm": float(record.deltas[bench.config.layer].norm()),
        **{key: value for key, value in _weight_stats(weight, bench.weight0).items() if key != "weight_change_norm"},
        "accumulated_p2": _accumulated_p2(bench.p_matrix, rows[-1] + 1),
        "edit_perplexity": _edit_perplexity(bench) if state.changed else bench.edit_perplexity0,
    }
    for position, row in enumerate(rows):
        target = record.targets[position]
        state.update_of.append(update_index)
        state.residuals.append(record.output_change[position].double().clone())  # own storage for the checkpoint
        state.after.append(after[position].clone())
        state.nll_after.append(float(new[position]))
        state.edits.append(
            {
                "case_id": bench.cases[row].case_id,
                "repeats_edit": _first_edit_of_subject(bench, row),
                "value_steps": target.steps if target is not None else None,
                "value_nll": target.nll if target is not None else None,
                "residual_norm": float(record.output_change[position].norm()),
                "newest_efficacy": bool(new[position] < true[position]),
                "seconds": round(seconds / len(rows), 3),
                **update,
                **record.details[position],
            }
        )
    state.done = rows[-1] + 1


def _first_edit_of_subject(bench: _Bench, row: int) -> int | None:
    """Return the index of an earlier edit of the same subject (its key is this edit's), or None."""
    earlier = torch.nonzero(bench.subject_ids[:row] == bench.subject_ids[row]).flatten()
    return int(earlier[0]) if len(earlier) else None


def _baseline_rewrite_rows(bench: _Bench, rows: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    new, true, greedy = _baseline_rewrite(bench, len(bench.cases))
    index = torch.tensor(list(rows))
    return new[index], true[index], greedy[index]


def _scores_of(bench: _Bench, rows: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Return NLL(new), NLL(true) and greedy-writes-new of the rewrite prompts of the facts in rows."""
    scores = score_continuations(
        bench.model, [bench.rewrite_new[row] for row in rows] + [bench.rewrite_true[row] for row in rows]
    )
    nll = scores.nll.double().cpu()
    return nll[: len(rows)], nll[len(rows) :], scores.greedy[: len(rows)].cpu()


def _collapse(config: LifelongConfig, changed: bool, steps: list[dict[str, Any]], p_matrix: Tensor) -> dict[str, Any]:
    """Return the first step where efficacy on all edits so far or held-out perplexity crosses its threshold.

    A run that moved no weight (the `none` editor) has no collapse: its efficacy is the unedited model's."""
    baseline = steps[0]["perplexity"]
    criterion = (
        f"efficacy on all edits so far < {config.retention_threshold:g}, or held-out perplexity > "
        f"{config.perplexity_ratio:g} × the unedited model's ({baseline:.3g})"
    )
    found = None
    for step in steps[1:] if changed else []:
        low = step["efficacy"] is not None and step["efficacy"] < config.retention_threshold
        if low or step["perplexity"] > config.perplexity_ratio * baseline:
            found = step["n_edits"]
            break
    return {
        "step": found,
        "criterion": criterion if changed else "the run moved no weight: no collapse is defined",
        "retention_threshold": config.retention_threshold,
        "perplexity_ratio": config.perplexity_ratio,
        "accumulated_p2_at_collapse": _accumulated_p2(p_matrix, found) if found is not None else None,
    }


def judged_pairs(pairs: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Return the pairs whose earlier edit's subject is never edited again (runs before the column: all pairs)."""
    if "later_same_subject" not in pairs:
        return pairs
    keep = [index for index, count in enumerate(pairs["later_same_subject"]) if count == 0]
    return {name: [column[index] for index in keep] for name, column in pairs.items()}


MIN_PREDICTION_EDITS = 5  # edits with later edits before the P-prediction verdict is computed at all


def _verdict_inputs(config: LifelongConfig, state: _State) -> dict[str, Any]:
    """Return the collapse sensitivity and the controlled P-prediction verdict of a finished run."""
    pairs = judged_pairs(state.pairs)
    n_edits_judged = len(set(pairs["edit_index"]))
    controls, too_few = None, f"{n_edits_judged} edits with later edits (< {MIN_PREDICTION_EDITS})"
    verdict: dict[str, Any] = {"verdict": "not judged", "reasons": [too_few if state.changed else "no weight moved"]}
    if state.changed and n_edits_judged >= MIN_PREDICTION_EDITS:
        controls = prediction_controls(pairs, "measured_logprob", config.bootstrap, config.seed)
        verdict = judge_prediction_with_controls(controls)
    sensitivity = collapse_sensitivity(state.steps, retention_threshold=config.retention_threshold)
    repeats = [index for index, edit in enumerate(state.edits) if edit.get("repeats_edit") is not None]
    return {
        "repeated_subjects": {
            "edits": repeats,
            "pairs_left_out": len(state.pairs["edit_index"]) - len(pairs["edit_index"]),
            "why": "a later edit of the same subject rewrites the earlier edit's very key (P = 1): left out of the "
            "P-prediction verdict",
        },
        "collapse_sensitivity": sensitivity if state.changed else None,
        "prediction_controls": controls,
        "prediction_verdict": verdict,
    }


def _identity(bench: _Bench, editor: str) -> dict[str, Any]:
    config = {k: v for k, v in bench.config.to_dict().items() if k not in PRESENTATION_FIELDS}
    return run_identity(
        {
            "editor": editor,
            "config": config,
            "model_fingerprint": bench.info.fingerprint,
            "facts_sha256": bench.facts_sha256,
            "unedited_facts_sha256": bench.unedited_facts_sha256,
            "covariance": bench.covariance_identity,
            "templates": {"rome": bench.rome_templates, "memit": bench.memit_templates},
            "kis_lens_version": __version__,
        }
    )


def _stem(bench: _Bench, editor: str, identity: dict[str, Any]) -> str:
    config = bench.config
    readable = {"seed": config.seed, "n": len(bench.cases), "layer": config.layer}
    return "lifelong_" + run_stem(editor, identity, readable)


def _crossed(before: int, after: int, every: int) -> bool:
    return after // every > before // every


def _session(bench: _Bench, editor: str) -> EditSession:
    layers = bench.config.edit_layers if get_editor(editor).multi_layer else (bench.config.layer,)
    session = EditSession.create(
        bench.model,
        bench.config.editor_settings,
        {layer: bench.covariances[layer] for layer in layers},
        editors=[editor],
        rome_templates=bench.rome_templates,
        memit_templates=bench.memit_templates,
    )
    session.remember_plain_keys([case.fact for case in bench.cases], bench.keys)  # the keys P was built from
    return session


def _rekeyed_from(metadata: dict[str, Any]) -> tuple[str, str]:
    """Return (legacy fingerprint, file sha256) a C cache had before it was re-keyed, or empty strings."""
    return str(metadata.get("rekeyed_from_fingerprint", "")), str(metadata.get("rekeyed_from_sha256", ""))


def _same_run_under_legacy_keys(bench: _Bench, old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Return whether a run's identity differs from new only by keys an older kis used for the same model and C.

    The model: the older sampled W_out fingerprint, which this model matches. Each C: the file hash changed only
    because its cache was re-keyed from that fingerprint (its metadata says so); file, tokens and texts agree."""
    if old == new or set(old) != set(new) or old["model_fingerprint"] == new["model_fingerprint"]:
        return False
    recorded = old["model_fingerprint"]
    if not (is_legacy_fingerprint(recorded) and recorded == bench.legacy_fingerprint):
        return False
    for name in old:
        if name == "covariance":
            if set(old[name]) != set(new[name]):
                return False
            for layer, entry in old[name].items():
                now = new[name][layer]
                if {k: v for k, v in entry.items() if k != "sha256"} != {k: v for k, v in now.items() if k != "sha256"}:
                    return False
                if entry["sha256"] != now["sha256"] and bench.covariance_rekeyed_from.get(layer) != (
                    recorded,
                    entry["sha256"],
                ):
                    return False
        elif name != "model_fingerprint" and old[name] != new[name]:
            return False
    return True


def _rekey_legacy_runs(bench: _Bench, editor: str, folder: Path, identity: dict[str, Any], stem: str) -> list[str]:
    """Move a finished run or a checkpoint keyed on an older kis's fingerprint to this stem; return what was done.

    Hours of a run are kept rather than recomputed when only the keys changed, never when anything it computed
    from did (see _same_run_under_legacy_keys)."""
    notes: list[str] = []
    readable = stem.rsplit("_", 1)[0]
    wanted = run_identity(identity)
    for path in sorted(folder.glob(f"{readable}_*.json")):
        other = path.name.removesuffix(".partial.json").removesuffix(".json")
        if other == stem or other.rsplit("_", 1)[0] != readable:
            continue
        partial = path.name.endswith(".partial.json")
        try:
            saved = json.loads(path.read_text())
            old = run_identity(saved["identity"] if partial else saved["settings"]["identity"])
        except (OSError, ValueError, KeyError, TypeError, KisError):
            continue  # not a run of this kind, or unreadable: left for stale_checkpoints to name
        if not _same_run_under_legacy_keys(bench, old, wanted):
            continue
        if partial:
            loaded = load_checkpoint(folder, other, old)
            if loaded is None or checkpoint_paths(folder, stem)[1].exists():
                continue
            save_checkpoint(folder, stem, wanted, *loaded)
            remove_checkpoint(folder, other)
        elif not (folder / f"{stem}.json").exists():
            saved["settings"]["identity"], saved["settings"]["run_stem"] = wanted, stem
            saved["settings"]["rekeyed_from"] = {"run_stem": other, "model_fingerprint": old["model_fingerprint"]}
            save_json(folder / f"{stem}.json", saved)
            path.unlink()
        else:
            continue
        notes.append(
            f"{path.name} was keyed on the older sampled fingerprint {old['model_fingerprint']}, which this model "
            f"matches: re-keyed as {stem} ({'checkpoint' if partial else 'finished run'}, nothing recomputed)"
        )
    return notes


def _finished_run(folder: Path, stem: str, identity: dict[str, Any]) -> LifelongResult | None:
    """Return the run already finished under this identity (a rerun of a queue skips it), else None."""
    path = folder / f"{stem}.json"
    if not path.is_file():
        return None
    saved = load_json_object(path, "delete it to rerun the run, or pass --no_resume")
    if run_identity(saved.get("settings", {}).get("identity", {})) != run_identity(identity):
        return None  # same hash prefix, other identity: rerun (its write replaces the file)
    print(f"kis lifelong: {path.name} is finished already (delete it, or pass --no_resume, to run it again)")
    fields = ("editor", "steps", "edits", "pairs", "summary", "settings")
    return LifelongResult(**{name: saved[name] for name in fields}, path=path)


def _run_editor(bench: _Bench, editor: str, folder: Path, command: str | None = None) -> LifelongResult:
    config = bench.config
    identity = _identity(bench, editor)
    stem = _stem(bench, editor, identity)
    with run_lock(folder, stem):
        for note in _rekey_legacy_runs(bench, editor, folder, identity, stem):
            print(f"kis lifelong: {note}")
        finished = _finished_run(folder, stem, identity) if config.resume else None
        if finished is not None:
            return finished
        session = _session(bench, editor)
        for stale, fields in stale_checkpoints(folder, stem, identity):
            warnings.warn(
                f"not resuming {stale.name}: it was made with other {', '.join(fields) or 'settings'}; this run "
                f"starts afresh as {stem} (delete the old checkpoint when you no longer need it)",
                stacklevel=2,
            )
        saved = load_checkpoint(folder, stem, identity) if config.resume else None
        if saved is not None:
            state = _State.restore(*saved)
            session.restore(state.weights)
            session.earlier_keys_outer.update(state.earlier_keys_outer)
        else:
            state = _State(weights={layer: weight.clone() for layer, weight in session.weights.items()})
            state.earlier_keys_outer = dict(session.earlier_keys_outer)
        clock = time.perf_counter()
        n = len(bench.cases)
        if not state.steps:
            _measure(bench, state, "eval", clock)
        batch = config.batch_size if get_editor(editor).batches else 1
        bar = tqdm(
            total=n, initial=state.done, desc=f"lifelong {editor}", disable=not config.progress, dynamic_ncols=True
        )
        while state.done < n:
            rows = list(range(state.done, min(state.done + batch, n)))
            before = state.done
            _edit(bench, editor, session, state, rows, update_index=len(set(state.update_of)))
            bar.update(state.done - before)
            if _crossed(before, state.done, config.eval_every) or state.done == n:
                _measure(bench, state, "eval", clock)
            elif _crossed(before, state.done, config.probe_every):
                _measure(bench, state, "probe", clock)
            else:
                continue
            last = state.steps[-1]
            bar.set_postfix(efficacy=last["efficacy"], perplexity=round(last["perplexity"], 2))
            state.seconds += time.perf_counter() - clock
            clock = time.perf_counter()
            save_checkpoint(folder, stem, identity, state.tensors(), state.record())
        bar.close()
        state.seconds += time.perf_counter() - clock
        result = _result(bench, editor, state, session, identity, stem, command)
        result.path = save_json(folder / f"{stem}.json", result.to_dict())
        remove_checkpoint(folder, stem)
    return result


def _result(
    bench: _Bench,
    editor: str,
    state: _State,
    session: EditSession,
    identity: dict[str, Any],
    stem: str,
    command: str | None,
) -> LifelongResult:
    config = bench.config
    pairs = state.pairs
    summary = {
        "collapse": _collapse(config, state.changed, state.steps, bench.p_matrix),
        "disabling_edits": disabling_edits(
            state.edits, bench.edit_perplexity0, config.disabling_norm_ratio, config.disabling_perplexity_ratio
        ),
        **_verdict_inputs(config, state),
        "disabling_rule": (
            f"‖ΔW‖ of an update > {config.disabling_norm_ratio:g} × the running median of earlier updates', and "
            f"held-out perplexity on {min(config.edit_perplexity_texts, len(bench.heldout))} texts right after it > "
            f"{config.disabling_perplexity_ratio:g} × just before"
        ),
        "correlations": {
            "predicted_vs_output": correlations(pairs["predicted"], pairs["measured_output"]),
            "predicted_vs_logprob": correlations(pairs["predicted"], pairs["measured_logprob"]),
        },
        "final": state.steps[-1],
        "wall_seconds": round(state.seconds, 1),
        "seconds_per_edit": float(np.mean([e["seconds"] for e in state.edits])) if state.edits else None,
        "seconds_per_probe": float(np.mean(state.probe_seconds)) if state.probe_seconds else None,
        "seconds_per_eval": float(np.mean(state.eval_seconds)) if state.eval_seconds else None,
    }
    summary["rho_alarm"] = rho_alarm(state.edits, summary["disabling_edits"], state.steps)
    entry = get_editor(editor)
    editor_settings = {
        "name": editor,
        "label": entry.label,
        "keys": entry.keys,
        "values": entry.values,
        "layers": sorted(session.weights),
        "batch_size": config.batch_size if entry.batches else 1,
        **{key: value for key, value in vars(config.editor_settings).items() if not key.endswith("search")},
        "covariance_weight": session.covariance_weight if entry.name == "memit" else config.covariance_weight,
        "rome_search": vars(config.editor_settings.rome_search),
        "memit_search": vars(config.editor_settings.memit_search),
        "value_prompts_used": len(bench.rome_templates),
        "null_space_rank": {str(layer): space.rank for layer, space in session.null_spaces.items()} or None,
    }
    settings = {
        "config": config.to_dict(),
        "editor": editor_settings,
        "model": asdict(bench.info),
        "facts": [case.case_id for case in bench.cases],
        "facts_sha256": bench.facts_sha256,
        "covariance": bench.covariance_identity,
        "corpus_texts_for_c": bench.corpus_texts_for_c,
        "templates": {"rome": bench.rome_templates, "memit": bench.memit_templates},
        "run_stem": stem,
        "identity": identity,
        "kis_lens_version": __version__,
        "device": str(model_device(bench.model)),
        "threads": torch.get_num_threads(),
        "command": command,
        "interference_units": INTERFERENCE_UNITS,
    }
    return LifelongResult(editor, state.steps, state.edits, state.pairs, summary, settings)


def run_lifelong(
    config: LifelongConfig = LifelongConfig(), model: HookedModel | None = None, command: str | None = None
) -> dict[str, LifelongResult]:
    """Run every editor's sequence of real edits, save one <stem>.json per run and the figures; return them."""
    model = load_model(model if model is not None else config.model_name, device=config.device, dtype=config.dtype)
    check_edit_layer(model, config.layer)
    handles = {layer: output_weight(model, layer) for layer in config.edit_layers}
    saved = {layer: handle.weight.detach().clone() for layer, handle in handles.items()}  # exact bits, restored

    def restore() -> None:
        with torch.no_grad():
            for layer, handle in handles.items():
                handle.weight.copy_(saved[layer])

    try:
        bench = _prepare(config, model)
        bench.unedited_nll0 = score_continuations(model, bench.unedited).nll.double().cpu()
        bench.perplexity0 = _perplexity(bench)
        bench.edit_perplexity0 = _edit_perplexity(bench)
        bench.fluency0 = _fluency(bench)
        folder = lifelong_dir(config.output_dir, bench.info.name, config.layer)
        folder.mkdir(parents=True, exist_ok=True)
        for legacy in find_pickle_checkpoints(folder):
            warnings.warn(
                f"ignoring {legacy}: pickle checkpoints of older versions are never loaded; delete it", stacklevel=2
            )
        results = {}
        for editor in config.editors:
            results[editor] = _run_editor(bench, editor, folder, command)
            restore()
    finally:
        restore()
    from kis_lens.editing.lifelong_plots import load_lifelong_results, write_lifelong_figures

    shown = load_lifelong_results(folder, stems=[result.settings["run_stem"] for result in results.values()])
    write_lifelong_figures(shown, folder)
    return results
