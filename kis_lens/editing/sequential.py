"""Lifelong editing for real: hundreds of CounterFact edits written one after another into a layer's W_out.

``run_lifelong`` edits the model's weights cumulatively (ROME one fact at a time, MEMIT in batches,
AlphaEdit in the null space of C plus earlier edits' keys; ``none`` edits nothing), and every
``probe_every`` / ``eval_every`` edits measures what the field measures: ROME's CounterFact metrics on all
edits so far, held-out perplexity, the drift of never-edited facts, the weight's norm and conditioning, and
the interference P predicts for each earlier edit u (Σ over later edits i of P[i,u]·r_i at the layer output)
against the drift measured with the edited weights. The model's own weights are restored on exit.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from kis_lens._version import __version__
from kis_lens.config import ModelOptions, RunConfig, at_least, setting
from kis_lens.corpus import EMBEDDED_CORPUS, open_corpus
from kis_lens.editing.counterfact import CounterFactCase, load_cases
from kis_lens.editing.editors import NullSpace, alphaedit_update, memit_update, null_space_projector, rank_one_delta
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
from kis_lens.editing.results import lifelong_dir, lifelong_file
from kis_lens.editing.values import ValueSearch, context_prefixes, rome_target_value
from kis_lens.errors import KisError
from kis_lens.facts import DEFAULT_FACTS, Fact, load_facts
from kis_lens.io import atomic_write, save_json
from kis_lens.keys import compute_keys
from kis_lens.matrices import Whitener
from kis_lens.models import (
    HookedModel,
    ModelInfo,
    load_model,
    model_device,
    model_info,
    output_weight,
    resolve_prepend_bos,
)
from kis_lens.runner import ensure_covariances
from kis_lens.tokens import encode

EDITORS: tuple[str, ...] = ("rome", "memit", "alphaedit", "none")
# Predicted and measured interference are norms of layer-output vectors (a ratio to ‖r_u‖ blows up for an edit
# that needed no change); recorded in each result's settings.
INTERFERENCE_UNITS = "layer output"
STEP_METRICS: tuple[str, ...] = (
    "efficacy",
    "efficacy_magnitude",
    "generation_efficacy",
    "paraphrase",
    "paraphrase_magnitude",
    "neighborhood",
    "neighborhood_magnitude",
    "score",
    "fluency",
)


@dataclass(frozen=True)
class LifelongConfig(ModelOptions):
    """Every setting of a lifelong-editing run: the shared model options, then the run's own."""

    editors: tuple[str, ...] = setting(
        EDITORS, f"comma-separated subset of {','.join(EDITORS)}", choices=EDITORS, aliases=("editor",)
    )
    layer: int = setting(4, "layer whose W_out is edited")
    n_edits: int | None = setting(None, "facts edited one after another", none="every record", cli_none="all")
    eval_every: int = setting(100, "every metric (paraphrase, neighborhood, score, fluency) every this many edits")
    probe_every: int = setting(10, "the cheap metrics (efficacy on all edits so far, perplexity, drift) this often")
    batch_size: int = setting(16, "facts per MEMIT batch")
    covariance_weight: float = setting(1.0, "MEMIT's λ on C = E[kkᵀ] (mom2_update_weight)")
    null_threshold: float = setting(1e-2, "AlphaEdit's null space: eigenvalues of C below this × the largest")
    null_l2: float = setting(1.0, "AlphaEdit's l2 term α")
    value_steps: int = setting(20, "gradient steps of ROME's value search (per edit)")
    value_lr: float = setting(0.5, "learning rate of the value search")
    kl_factor: float = setting(0.0625, "weight of the KL term on '{subject} is a'")
    value_weight_decay: float = setting(0.5, "ROME's weight decay on the value shift")
    clamp_norm_factor: float = setting(4.0, "the value shift's norm is at most this × the output's norm")
    n_prefixes: int = setting(2, "sampled text prefixes of the rewrite prompt in the value search")
    prefix_length: int = setting(5, "tokens per sampled prefix")
    facts: str = setting(DEFAULT_FACTS, "CounterFact records to edit: counterfact-known or a path")
    unedited_facts: str = setting("known-1000", "facts never edited, watched for drift: known-1000 or a path")
    n_unedited: int = setting(64, "how many never-edited facts to watch")
    corpus: str = setting(EMBEDDED_CORPUS, f"corpus for C and held-out text: {EMBEDDED_CORPUS} or a file")
    max_tokens: int | None = setting(100_000, "corpus tokens for C", none="no limit", cli_none=0)
    ridge: float = setting(0.0, "add ridge·mean(diag C)·I to C before solving")
    heldout_texts: int = setting(16, "held-out texts (after those C read) for perplexity")
    heldout_tokens: int = setting(128, "tokens per held-out text")
    fluency_prompts: int = setting(8, "generation prompts for fluency")
    fluency_tokens: int = setting(32, "greedy tokens generated per fluency prompt")
    retention_threshold: float = setting(0.5, "collapse when efficacy on all edits so far falls below this")
    perplexity_ratio: float = setting(2.0, "… or when held-out perplexity exceeds this × the unedited model's")
    resume: bool = setting(True, "continue an interrupted run from its checkpoint")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prepend_bos is not None:
            raise KisError("lifelong follows the model's own BOS convention: leave prepend_bos as None (auto)")
        at_least("n_edits", self.n_edits, 1, none_means="all")
        for name in ("eval_every", "probe_every", "batch_size", "value_steps", "prefix_length", "n_unedited"):
            at_least(name, getattr(self, name), 1)
        for name in ("n_prefixes", "heldout_texts", "fluency_prompts"):
            at_least(name, getattr(self, name), 0)
        at_least("max_tokens", self.max_tokens, 1, none_means="no limit")
        unknown = [name for name in self.editors if name not in EDITORS]
        if unknown or not self.editors:
            raise KisError(f"unknown editor(s) {unknown}: choose from {', '.join(EDITORS)}")
        if self.covariance_weight < 0 or not self.null_l2 > 0 or not self.null_threshold > 0:
            raise KisError("covariance_weight must be >= 0, null_l2 and null_threshold > 0")
        if not self.ridge >= 0:
            raise KisError(f"ridge must be zero or positive, not {self.ridge}: e.g. --ridge 1e-6")
        if not 0 <= self.retention_threshold <= 1 or not self.perplexity_ratio > 1:
            raise KisError("retention_threshold must lie in [0, 1] and perplexity_ratio be > 1")
        ValueSearch(self.value_steps, self.value_lr, self.kl_factor, self.value_weight_decay, self.clamp_norm_factor)

    @property
    def value_search(self) -> ValueSearch:
        """Return the value-search settings."""
        return ValueSearch(
            self.value_steps, self.value_lr, self.kl_factor, self.value_weight_decay, self.clamp_norm_factor
        )


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
        """Return everything as a JSON-ready dict (what lifelong_<editor>.json holds)."""
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
    keys: Tensor  # [n, d_mlp] float64, edit order
    whitener: Whitener
    covariance: Tensor
    p_matrix: Tensor  # [n, n] float64: P[i, j] = k_iᵀC⁻¹k_j / k_iᵀC⁻¹k_i
    rewrite_new: list[Continuation]
    rewrite_true: list[Continuation]
    paraphrase: tuple[list[Continuation], list[Continuation], list[int]]  # new, true, case index per prompt
    neighborhood: tuple[list[Continuation], list[Continuation], list[int]]  # (named like the metrics they feed)
    unedited: list[Continuation]
    heldout: list[list[int]]
    fluency_prompts: list[list[int]]
    prefixes: list[str]
    weight0: Tensor  # float64 W_0 [d_mlp, d_model]
    bias: Tensor
    corpus_texts_for_c: int
    info: ModelInfo  # of the unedited model: the fingerprint read while W_out is edited would be another model's
    null_space: NullSpace | None = None
    unedited_nll0: Tensor = field(default_factory=lambda: torch.empty(0))
    perplexity0: float = float("nan")
    fluency0: float | None = None
    unedited_scores: dict[str, Any] = field(default_factory=dict)  # the `none` editor's scores, computed once


def _paired(model: HookedModel, cases: Sequence[CounterFactCase], attribute: str) -> tuple[list, list, list[int]]:
    prompts, groups = [], []
    for index, case in enumerate(cases):
        for prompt in getattr(case, attribute):
            prompts.append(prompt)
            groups.append(index)
    new = prompt_continuations(model, prompts, [cases[g].fact.target_new for g in groups])
    true = prompt_continuations(model, prompts, [cases[g].fact.target_true for g in groups])
    return new, true, groups


def _ordered_cases(config: LifelongConfig) -> list[CounterFactCase]:
    cases = [case for case in load_cases(config.facts) if case.fact.target_new != case.fact.target_true]
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
    cases = _ordered_cases(config)
    run_config = RunConfig(
        model_name=config.model_name,
        device=config.device,
        dtype=config.dtype,
        output_dir=config.output_dir,
        corpus=config.corpus,
        max_tokens=config.max_tokens,
        progress=config.progress,
    )
    covariances, report = ensure_covariances(run_config, model, [layer])
    covariance = covariances[layer]
    texts_for_c = int(report.layers[layer].texts)
    whitener = Whitener.from_covariance(covariance, ridge=config.ridge)
    prepend_bos = resolve_prepend_bos(model, None)
    facts = [case.fact for case in cases]
    keys = compute_keys(model, facts, [layer], prepend_bos=prepend_bos).at_layer(layer).double().cpu()
    whitened = whitener.whiten(keys).cpu()
    gram = whitened @ whitened.T
    p_matrix = gram / torch.diagonal(gram)[:, None]
    unedited = _unedited_facts(config, cases)
    handle = output_weight(model, layer)
    fluency_ids = [
        encode(model.tokenizer, case.generation_prompts[0], prepend_bos=prepend_bos)
        for case in cases[: config.fluency_prompts]
        if case.generation_prompts
    ]
    return _Bench(
        model=model,
        config=config,
        cases=cases,
        keys=keys,
        whitener=whitener,
        covariance=covariance,
        p_matrix=p_matrix,
        rewrite_new=prompt_continuations(model, [f.text for f in facts], [f.target_new for f in facts]),
        rewrite_true=prompt_continuations(model, [f.text for f in facts], [f.target_true for f in facts]),
        paraphrase=_paired(model, cases, "paraphrase_prompts"),
        neighborhood=_paired(model, cases, "neighborhood_prompts"),
        unedited=prompt_continuations(model, [f.text for f in unedited], [f.target_true for f in unedited]),
        heldout=_heldout_rows(config, model, texts_for_c) if config.heldout_texts else [],
        fluency_prompts=fluency_ids,
        prefixes=context_prefixes(model, config.n_prefixes, config.prefix_length, seed=config.seed),
        weight0=handle.read().cpu(),
        bias=handle.read_bias().cpu(),
        corpus_texts_for_c=texts_for_c,
        info=model_info(model),
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


def _prompt_scores(
    bench: _Bench, name: str, upto: int, unedited_model: bool
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Return NLL(new), NLL(true) and the case of each paraphrase/neighborhood prompt of the first `upto` cases.

    The unedited model's scores are computed once for every case and sliced (the `none` editor's curves)."""
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
    metrics["generation_efficacy"] = float(greedy.double().mean())
    if full:
        for name, success in (("paraphrase", rewrite_success), ("neighborhood", neighborhood_success)):
            new_nll, true_nll, owners = _prompt_scores(bench, name, upto, unedited_model)
            metrics[name], metrics[f"{name}_magnitude"] = success(new_nll, true_nll, owners)
        metrics["score"] = harmonic_mean([metrics["efficacy"], metrics["paraphrase"], metrics["neighborhood"]])
    return metrics


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

    weight: Tensor  # float64 W_t
    done: int = 0
    update_of: list[int] = field(default_factory=list)  # which update wrote each edit
    residuals: list[Tensor] = field(default_factory=list)  # r_u = v*_u − (k_u W + b) when u was edited
    after: list[Tensor] = field(default_factory=list)  # k_u W + b right after u's update
    nll_after: list[float] = field(default_factory=list)  # NLL(target_new) on u's rewrite prompt right after
    steps: list[dict[str, Any]] = field(default_factory=list)
    edits: list[dict[str, Any]] = field(default_factory=list)
    pairs: dict[str, list[Any]] = field(
        default_factory=lambda: {
            k: [] for k in ("n_edits", "case_id", "predicted", "measured_output", "measured_logprob")
        }
    )
    seconds: float = 0.0
    probe_seconds: list[float] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)


def _measure(bench: _Bench, editor: str, state: _State, kind: str, clock: float) -> None:
    """Append one measurement step (and its fact–step pairs) to the state."""
    started = time.perf_counter()
    t, full = state.done, kind == "eval"
    if editor == "none":
        rewrite = _baseline_rewrite(bench, t)
    else:
        rewrite = _scores_of(bench, range(t))
    step: dict[str, Any] = {"n_edits": t, "kind": kind, **_case_metrics(bench, t, full, rewrite, editor == "none")}
    if editor == "none" or t == 0:
        step["fluency"] = bench.fluency0 if full else None
        step["perplexity"] = bench.perplexity0
        step["unedited_nll_drift"] = 0.0
    else:
        step["fluency"] = _fluency(bench) if full else None
        step["perplexity"] = _perplexity(bench)
        unedited = score_continuations(bench.model, bench.unedited).nll.double().cpu()
        step["unedited_nll_drift"] = float((unedited - bench.unedited_nll0).abs().mean())
    step.update(_weight_stats(state.weight, bench.weight0))
    step["predicted_interference"], step["measured_interference"] = None, None
    if editor != "none" and t > 0:
        _interference(bench, state, step, rewrite[0])
    step["accumulated_p2"] = _accumulated_p2(bench.p_matrix, t)
    step["seconds"] = round(state.seconds + time.perf_counter() - clock, 2)
    state.steps.append(step)
    (state.eval_seconds if full else state.probe_seconds).append(time.perf_counter() - started)


def _interference(bench: _Bench, state: _State, step: dict[str, Any], nll_now: Tensor) -> None:
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
    outputs = bench.keys[:t] @ state.weight + bench.bias
    measured = (outputs - torch.stack(state.after)).norm(dim=1)[earlier]
    logprob = (nll_now - torch.tensor(state.nll_after, dtype=torch.float64))[earlier]
    step["predicted_interference"] = float(predicted.mean())
    step["measured_interference"] = float(measured.mean())
    ids = [bench.cases[u].case_id for u in torch.nonzero(earlier).flatten().tolist()]
    state.pairs["n_edits"].extend([t] * len(ids))
    state.pairs["case_id"].extend(ids)
    state.pairs["predicted"].extend(predicted.tolist())
    state.pairs["measured_output"].extend(measured.tolist())
    state.pairs["measured_logprob"].extend(logprob.tolist())


def _baseline_rewrite(bench: _Bench, upto: int) -> tuple[Tensor, Tensor, Tensor]:
    """Return the unedited model's rewrite scores of the first `upto` facts, scored once for all of them."""
    if "rewrite" not in bench.unedited_scores:
        bench.unedited_scores["rewrite"] = _scores_of(bench, range(len(bench.cases)))
    new, true, greedy = bench.unedited_scores["rewrite"]
    return new[:upto], true[:upto], greedy[:upto]


def _edit(bench: _Bench, editor: str, state: _State, rows: list[int], update_index: int) -> None:
    """Find the rows' target values on the model as it is now, write the editor's ΔW into W_out."""
    config, model = bench.config, bench.model
    started = time.perf_counter()
    targets = [
        rome_target_value(model, config.layer, bench.cases[row].fact, bench.prefixes, config.value_search)
        for row in rows
    ]
    keys = bench.keys[rows]
    values = torch.stack([target.value for target in targets])
    residuals = values - (keys @ state.weight + bench.bias)
    if editor == "rome":
        delta = rank_one_delta(keys[0], residuals[0], bench.whitener)
    elif editor == "memit":
        delta = memit_update(keys, residuals, bench.whitener, config.covariance_weight)
    else:
        assert bench.null_space is not None
        delta = alphaedit_update(keys, residuals, bench.null_space, bench.keys[: rows[0]], config.null_l2)
    state.weight = state.weight + delta.cpu()
    output_weight(model, config.layer).write(state.weight.to(model_device(model)))
    after = keys @ state.weight + bench.bias
    new, true, _ = _scores_of(bench, rows)
    seconds = time.perf_counter() - started
    for position, row in enumerate(rows):
        state.update_of.append(update_index)
        state.residuals.append(residuals[position].clone())  # own storage: a checkpoint saves each row once
        state.after.append(after[position].clone())
        state.nll_after.append(float(new[position]))
        state.edits.append(
            {
                "case_id": bench.cases[row].case_id,
                "value_steps": targets[position].steps,
                "value_nll": targets[position].nll,
                "residual_norm": float(residuals[position].norm()),
                "newest_efficacy": bool(new[position] < true[position]),
                "seconds": round(seconds / len(rows), 3),
            }
        )
    state.done = rows[-1] + 1


def _scores_of(bench: _Bench, rows: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Return NLL(new), NLL(true) and greedy-writes-new of the rewrite prompts of the facts in rows."""
    scores = score_continuations(
        bench.model, [bench.rewrite_new[row] for row in rows] + [bench.rewrite_true[row] for row in rows]
    )
    nll = scores.nll.double().cpu()
    return nll[: len(rows)], nll[len(rows) :], scores.greedy[: len(rows)].cpu()


def _collapse(config: LifelongConfig, editor: str, steps: list[dict[str, Any]], p_matrix: Tensor) -> dict[str, Any]:
    """Return the first step where efficacy on all edits so far or held-out perplexity crosses its threshold."""
    baseline = steps[0]["perplexity"]
    criterion = (
        f"efficacy on all edits so far < {config.retention_threshold:g}, or held-out perplexity > "
        f"{config.perplexity_ratio:g} × the unedited model's ({baseline:.3g})"
    )
    found = None
    if editor != "none":
        for step in steps[1:]:
            low = step["efficacy"] is not None and step["efficacy"] < config.retention_threshold
            if low or step["perplexity"] > config.perplexity_ratio * baseline:
                found = step["n_edits"]
                break
    return {
        "step": found,
        "criterion": criterion if editor != "none" else "none edits nothing: no collapse is defined",
        "retention_threshold": config.retention_threshold,
        "perplexity_ratio": config.perplexity_ratio,
        "accumulated_p2_at_collapse": _accumulated_p2(p_matrix, found) if found is not None else None,
    }


def _identity(bench: _Bench) -> dict[str, Any]:
    config = {k: v for k, v in bench.config.to_dict().items() if k not in ("editors", "progress", "resume", "device")}
    return {"config": config, "fingerprint": bench.info.fingerprint}


def _save_checkpoint(path: Path, bench: _Bench, state: _State) -> None:
    payload = {"identity": _identity(bench), "state": asdict(state)}
    atomic_write(path, lambda temp: torch.save(payload, temp))


def _load_checkpoint(path: Path, bench: _Bench) -> _State | None:
    if not (bench.config.resume and path.is_file()):
        return None
    payload = torch.load(path, weights_only=False)
    if payload.get("identity") != _identity(bench):
        return None  # another run's checkpoint: start afresh (it is overwritten at the first measurement)
    return _State(**payload["state"])


def _crossed(before: int, after: int, every: int) -> bool:
    return after // every > before // every


def _run_editor(bench: _Bench, editor: str, folder: Path, command: str | None = None) -> LifelongResult:
    config, model = bench.config, bench.model
    handle = output_weight(model, config.layer)
    checkpoint = lifelong_file(folder, editor, ".partial.pt")
    state = _load_checkpoint(checkpoint, bench) if editor != "none" else None
    if state is not None:
        handle.write(state.weight.to(model_device(model)))
    else:
        state = _State(weight=bench.weight0.clone())
    clock = time.perf_counter()
    n = len(bench.cases)
    if not state.steps:
        _measure(bench, editor, state, "eval", clock)
    batch = config.batch_size if editor == "memit" else 1
    bar = tqdm(total=n, initial=state.done, desc=f"lifelong {editor}", disable=not config.progress, dynamic_ncols=True)
    while state.done < n:
        rows = list(range(state.done, min(state.done + batch, n)))
        before = state.done
        if editor != "none":
            _edit(bench, editor, state, rows, update_index=len(set(state.update_of)))
        else:
            state.done = rows[-1] + 1
        bar.update(state.done - before)
        if _crossed(before, state.done, config.eval_every) or state.done == n:
            _measure(bench, editor, state, "eval", clock)
        elif _crossed(before, state.done, config.probe_every):
            _measure(bench, editor, state, "probe", clock)
        else:
            continue
        last = state.steps[-1]
        bar.set_postfix(efficacy=last["efficacy"], perplexity=round(last["perplexity"], 2))
        if editor != "none":
            _save_checkpoint(checkpoint, bench, state)
    bar.close()
    state.seconds += time.perf_counter() - clock
    return _result(bench, editor, state, checkpoint, command)


def _result(bench: _Bench, editor: str, state: _State, checkpoint: Path, command: str | None) -> LifelongResult:
    config = bench.config
    pairs = state.pairs
    summary = {
        "collapse": _collapse(config, editor, state.steps, bench.p_matrix),
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
    info = bench.info
    settings = {
        "config": config.to_dict(),
        "model": asdict(info),
        "facts": [case.case_id for case in bench.cases],
        "corpus_texts_for_c": bench.corpus_texts_for_c,
        "null_space_rank": bench.null_space.rank if bench.null_space is not None else None,
        "prefixes": bench.prefixes,
        "kis_lens_version": __version__,
        "device": str(model_device(bench.model)),
        "threads": torch.get_num_threads(),
        "command": command,
        "interference_units": INTERFERENCE_UNITS,
    }
    result = LifelongResult(editor, state.steps, state.edits, state.pairs, summary, settings)
    folder = checkpoint.parent
    result.path = save_json(lifelong_file(folder, editor), result.to_dict())
    checkpoint.unlink(missing_ok=True)
    return result


def run_lifelong(
    config: LifelongConfig = LifelongConfig(), model: HookedModel | None = None, command: str | None = None
) -> dict[str, LifelongResult]:
    """Run every editor's sequence of real edits, save lifelong_<editor>.json and figures; return {editor: result}."""
    model = load_model(model if model is not None else config.model_name, device=config.device, dtype=config.dtype)
    n_layers = int(model.cfg.n_layers)
    if not 0 <= config.layer < n_layers - 1:
        raise KisError(
            f"layer {config.layer} cannot be edited here: an edit at the subject token reaches the prediction "
            f"only through later layers; choose a layer between 0 and {n_layers - 2}"
        )
    handle = output_weight(model, config.layer)
    saved = handle.weight.detach().clone()  # the exact bits, restored on exit whatever happens
    try:
        bench = _prepare(config, model)
        bench.unedited_nll0 = score_continuations(model, bench.unedited).nll.double().cpu()
        bench.perplexity0 = _perplexity(bench)
        bench.fluency0 = _fluency(bench)
        if "alphaedit" in config.editors:
            bench.null_space = null_space_projector(bench.covariance, config.null_threshold, relative=True)
        folder = lifelong_dir(config.output_dir, bench.info.name, config.layer)
        folder.mkdir(parents=True, exist_ok=True)
        results = {}
        for editor in config.editors:
            results[editor] = _run_editor(bench, editor, folder, command)
            with torch.no_grad():
                handle.weight.copy_(saved)
    finally:
        with torch.no_grad():
            handle.weight.copy_(saved)
    from kis_lens.editing.sequential_plots import load_lifelong_results, write_lifelong_figures

    write_lifelong_figures(load_lifelong_results(folder), folder)
    return results
