"""What a lifelong run measures on the model as it is now: CounterFact scores, perplexity, fluency, weight stats.

The unedited model's scores are computed once per bench and reused while a run has moved no weight.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from kis_lens.editing.evaluation import (
    fluency,
    greedy_generate,
    harmonic_mean,
    neighborhood_success,
    perplexity,
    rewrite_success,
    score_continuations,
)
from kis_lens.editing.lifelong_bench import Bench

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

# NLL(target_new), NLL(target_true) and whether greedy decoding writes target_new, per rewrite prompt
RewriteScores = tuple[Float[Tensor, " fact"], Float[Tensor, " fact"], Bool[Tensor, " fact"]]


def measure_fluency(bench: Bench) -> float | None:
    """Return the fluency of greedy continuations of the fluency prompts, or None without prompts."""
    if not bench.fluency_prompts:
        return None
    generated = greedy_generate(bench.model, bench.fluency_prompts, bench.config.fluency_tokens)
    texts = [
        bench.model.tokenizer.decode([*prompt, *new], skip_special_tokens=True)
        for prompt, new in zip(bench.fluency_prompts, generated)
    ]
    return fluency(texts)


def measure_perplexity(bench: Bench) -> float:
    """Return the perplexity of the model as it is now on the held-out texts (NaN without them)."""
    return perplexity(bench.model, bench.heldout) if bench.heldout else float("nan")


def measure_edit_perplexity(bench: Bench) -> float | None:
    """Return held-out perplexity on the first edit_perplexity_texts texts (scored after every update), or None."""
    count = bench.config.edit_perplexity_texts
    return perplexity(bench.model, bench.heldout[:count]) if count and bench.heldout else None


def _prompt_scores(
    bench: Bench, name: str, upto: int, unedited_model: bool
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


def case_metrics(
    bench: Bench, upto: int, full: bool, rewrite: RewriteScores, unedited_model: bool = False
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


def oldest_quarter_retention(rewrite: RewriteScores, upto: int) -> float | None:
    """Return rewrite success on the oldest quarter of the edits so far (recent edits prop up efficacy on all)."""
    if upto == 0:
        return None
    oldest = max(1, upto // 4)
    new, true, _ = rewrite
    return rewrite_success(new[:oldest].numpy(), true[:oldest].numpy(), list(range(oldest)))[0]


def weight_stats(weight: Float[Tensor, "d_mlp d_model"], weight0: Float[Tensor, "d_mlp d_model"]) -> dict[str, float]:
    """Return ‖W − W_0‖_F, W's largest singular value and its condition number."""
    singular = torch.linalg.svdvals(weight)
    return {
        "weight_change_norm": float((weight - weight0).norm()),
        "sigma_max": float(singular[0]),
        "condition_number": float(singular[0] / singular[-1]) if singular[-1] > 0 else math.inf,
    }


def accumulated_p2(p_matrix: Float[Tensor, "fact fact"], upto: int) -> float:
    """Return Σ P[i, j]² over i ≠ j among the first `upto` facts: the off-diagonal mass the edits so far share."""
    block = p_matrix[:upto, :upto]
    return float((block**2).sum() - torch.diagonal(block).pow(2).sum())


def rewrite_scores(bench: Bench, rows: Sequence[int]) -> RewriteScores:
    """Return NLL(new), NLL(true) and greedy-writes-new of the rewrite prompts of the facts in rows."""
    scores = score_continuations(
        bench.model, [bench.rewrite_new[row] for row in rows] + [bench.rewrite_true[row] for row in rows]
    )
    nll = scores.nll.double().cpu()
    return nll[: len(rows)], nll[len(rows) :], scores.greedy[: len(rows)].cpu()


def baseline_rewrite(bench: Bench, upto: int) -> RewriteScores:
    """Return the unedited model's rewrite scores of the first `upto` facts, scored once for all of them."""
    if "rewrite" not in bench.unedited_scores:
        bench.unedited_scores["rewrite"] = rewrite_scores(bench, range(len(bench.cases)))
    new, true, greedy = bench.unedited_scores["rewrite"]
    return new[:upto], true[:upto], greedy[:upto]


def baseline_rewrite_rows(bench: Bench, rows: Sequence[int]) -> RewriteScores:
    """Return the unedited model's rewrite scores of the facts in rows (scored once for all facts)."""
    new, true, greedy = baseline_rewrite(bench, len(bench.cases))
    index = torch.tensor(list(rows))
    return new[index], true[index], greedy[index]
