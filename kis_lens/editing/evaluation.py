"""CounterFact metrics (ROME's ``eval_utils_counterfact.py`` and ``summarize.py``), our own code.

- Scoring: the mean per-token NLL of a target continuing a prompt (teacher-forced), and whether greedy
  decoding would write the target, for many (prompt, target) pairs in a few deduplicated, batched forwards.
- Summaries: rewrite / paraphrase / neighborhood success and magnitude as means of per-case means, and the
  harmonic-mean score.
- Fluency: ROME's weighted 2-/3-gram entropy of generated texts; greedy generation; perplexity.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from kis_lens.errors import KisError
from kis_lens.models import HookedModel, model_device, resolve_prepend_bos
from kis_lens.tokens import encode, pad_batch, pad_token_id

# ---------------------------------------------------------------------------------------------------------
# Scoring continuations
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Continuation:
    """A prompt's token ids and the target token ids that should continue it (both non-empty)."""

    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_ids", tuple(int(i) for i in self.prompt_ids))
        object.__setattr__(self, "target_ids", tuple(int(i) for i in self.target_ids))
        if not self.prompt_ids or not self.target_ids:
            raise KisError(
                f"a continuation needs at least one prompt token and one target token, got "
                f"{len(self.prompt_ids)} and {len(self.target_ids)}: drop empty prompts/targets, or encode the "
                "prompt with BOS"
            )


@dataclass(frozen=True)
class ContinuationScores:
    """Per continuation: the mean per-token NLL of its target (teacher-forced) and whether greedy decoding writes it."""

    nll: Float[Tensor, " n"]
    greedy: Bool[Tensor, " n"]


def _pad_id(model: Any) -> int:
    """Return the id to pad with (never read: right padding sits after every real token and is masked)."""
    tokenizer = getattr(model, "tokenizer", None)
    return pad_token_id(tokenizer) if tokenizer is not None else 0


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise KisError(f"batch_size must be a positive integer, got {batch_size!r}")


def _logsumexp_rows(logits: Float[Tensor, "row vocab"], chunk: int = 256) -> Float[Tensor, " row"]:
    """Return the float64 log-normaliser of each row of logits, a chunk of rows at a time to bound memory."""
    return torch.cat(
        [torch.logsumexp(logits[begin : begin + chunk].double(), dim=-1) for begin in range(0, len(logits), chunk)]
    )


def _host_rows(sequences: list[tuple[int, ...]]) -> tuple[list[tuple[int, ...]], dict[tuple[int, ...], int]]:
    """Return the rows to run (sequences that are no prefix of another) and, per sequence, the row that holds it.

    A causal model's logits at the positions of a prefix are the same in any row that starts with it, so a
    sequence that is a prefix of another needs no row of its own. In sorted order a sequence is a prefix of
    some other one exactly when it is a prefix of the next one.
    """
    unique = sorted(set(sequences))
    host = list(range(len(unique)))
    for index in range(len(unique) - 2, -1, -1):
        current, following = unique[index], unique[index + 1]
        if following[: len(current)] == current:
            host[index] = host[index + 1]
    rows = sorted({host[index] for index in range(len(unique))}, key=lambda index: (len(unique[index]), index))
    row_of = {index: number for number, index in enumerate(rows)}
    return [unique[index] for index in rows], {seq: row_of[host[index]] for index, seq in enumerate(unique)}


def score_continuations(model: HookedModel, items: Sequence[Continuation], batch_size: int = 64) -> ContinuationScores:
    """Return each continuation's mean target NLL and greedy flag, from deduplicated, length-sorted batches.

    An item needs the next-token distributions at the positions of prompt + target[:-1]; every such sequence
    that is a prefix of another (single-token targets of a shared prompt, or a shorter target) rides along on
    the longer row. Logits are gathered at the needed positions before the (float64) log-softmax.
    """
    _check_batch_size(batch_size)
    if any(not isinstance(item, Continuation) for item in items):
        raise KisError("score_continuations takes Continuation items: build them with prompt_continuations()")
    n = len(items)
    if n == 0:
        return ContinuationScores(torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool))
    needed = [item.prompt_ids + item.target_ids[:-1] for item in items]
    rows, row_of = _host_rows(needed)
    # each batch of rows, with the items it serves; the logits at position p predict token p + 1
    by_batch: dict[int, list[int]] = {}
    for index, sequence in enumerate(needed):
        by_batch.setdefault(row_of[sequence] // batch_size, []).append(index)
    device = model_device(model)
    pad_id = _pad_id(model)
    nll = torch.zeros(n, dtype=torch.float64)
    greedy = torch.zeros(n, dtype=torch.bool)
    for batch, members in sorted(by_batch.items()):
        begin = batch * batch_size
        chunk = rows[begin : begin + batch_size]
        pairs: dict[tuple[int, int], int] = {}
        pair_of_token: list[int] = []
        labels: list[int] = []
        segment: list[int] = []
        for slot, index in enumerate(members):
            item = items[index]
            row = row_of[needed[index]] - begin
            start = len(item.prompt_ids) - 1
            for offset, label in enumerate(item.target_ids):
                pair_of_token.append(pairs.setdefault((row, start + offset), len(pairs)))
                labels.append(label)
                segment.append(slot)
        tokens, mask = pad_batch([list(row) for row in chunk], pad_id)
        row_index = torch.tensor([row for row, _ in pairs], device=device)
        position_index = torch.tensor([position for _, position in pairs], device=device)
        with torch.no_grad():
            logits = model(tokens.to(device), attention_mask=mask.to(device))
            picked = logits[row_index, position_index].detach()  # [pairs, vocab]: never the whole batch
            del logits
            top = picked.argmax(dim=-1).cpu()
            pair_tensor = torch.tensor(pair_of_token, device=picked.device)
            label_tensor = torch.tensor(labels, device=picked.device)
            token_nll = _logsumexp_rows(picked)[pair_tensor] - picked[pair_tensor, label_tensor].double()
        pair_tensor, label_tensor, token_nll = pair_tensor.cpu(), label_tensor.cpu(), token_nll.cpu()
        segment_tensor = torch.tensor(segment)
        misses = (top[pair_tensor] != label_tensor).long()
        sums = torch.zeros(len(members), dtype=torch.float64).index_add_(0, segment_tensor, token_nll)
        counts = torch.zeros(len(members), dtype=torch.float64).index_add_(
            0, segment_tensor, torch.ones_like(token_nll)
        )
        missed = torch.zeros(len(members), dtype=torch.long).index_add_(0, segment_tensor, misses)
        member_tensor = torch.tensor(members)
        nll[member_tensor] = sums / counts
        greedy[member_tensor] = missed == 0
    return ContinuationScores(nll, greedy)


def prompt_continuations(
    model: HookedModel, prompts: Sequence[str], targets: Sequence[str], prepend_bos: bool | None = None
) -> list[Continuation]:
    """Return one Continuation per (prompt, target): the prompt's ids (model's BOS convention) and " " + target's."""
    if isinstance(prompts, str) or isinstance(targets, str):
        raise KisError("prompts and targets must be lists of strings, not one string: wrap it in a list")
    if len(prompts) != len(targets):
        raise KisError(f"got {len(prompts)} prompts but {len(targets)} targets: give one target per prompt")
    prepend_bos = resolve_prepend_bos(model, prepend_bos)
    tokenizer = model.tokenizer
    continuations = []
    for prompt, target in zip(prompts, targets):
        if not isinstance(target, str) or not target.strip():
            raise KisError(f"empty target for prompt {prompt!r}: every prompt needs a non-empty target string")
        if not isinstance(prompt, str) or not prompt.strip():
            raise KisError(f"empty prompt (target {target!r}): every target needs a non-empty prompt string")
        prompt_ids = encode(tokenizer, prompt, prepend_bos)
        target_ids = encode(tokenizer, " " + target.strip(), prepend_bos=False)
        continuations.append(Continuation(tuple(prompt_ids), tuple(target_ids)))
    return continuations


# ---------------------------------------------------------------------------------------------------------
# Summaries (ROME's summarize.py)
# ---------------------------------------------------------------------------------------------------------

# One NLL per prompt, and the case each prompt belongs to (any integer labels).
PromptValues = Float[Tensor, " prompt"] | Float[np.ndarray, " prompt"] | Sequence[float]
PromptGroups = Int[Tensor, " prompt"] | Int[np.ndarray, " prompt"] | Sequence[int]


def _as_arrays(
    nll_new: PromptValues, nll_true: PromptValues, groups: PromptGroups
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Return the three inputs as flat numpy arrays (float64, float64, case index), or None when empty."""
    arrays = []
    for value in (nll_new, nll_true):
        if isinstance(value, Tensor):
            value = value.detach().cpu().double().numpy()
        arrays.append(np.asarray(value, dtype=np.float64).reshape(-1))
    group = groups.detach().cpu().numpy() if isinstance(groups, Tensor) else np.asarray(groups)
    group = group.reshape(-1)
    if not (len(arrays[0]) == len(arrays[1]) == len(group)):
        raise KisError(
            f"nll_new, nll_true and groups must have one entry per prompt, got lengths "
            f"{len(arrays[0])}, {len(arrays[1])} and {len(group)}"
        )
    if len(group) == 0:
        return None
    if np.isnan(arrays[0]).any() or np.isnan(arrays[1]).any():
        raise KisError("NaN among the NLLs: check the model's logits (a NaN forward) before summarising")
    return arrays[0], arrays[1], group


def _mean_of_case_means(values: np.ndarray, groups: np.ndarray) -> float:
    """Return the mean over cases of each case's mean value (each case counts once, whatever its prompt count)."""
    _, inverse = np.unique(groups, return_inverse=True)
    inverse = inverse.reshape(-1)
    sums = np.bincount(inverse, weights=values)
    counts = np.bincount(inverse)
    return float(np.mean(sums / counts))


def rewrite_success(
    nll_new: PromptValues, nll_true: PromptValues, groups: PromptGroups
) -> tuple[float | None, float | None]:
    """Return (success, magnitude): mean over cases of mean [nll_new < nll_true] and of mean(p_new − p_true).

    For rewrite (efficacy) and paraphrase prompts; ``groups`` gives each prompt's case. (None, None) when empty.
    """
    arrays = _as_arrays(nll_new, nll_true, groups)
    if arrays is None:
        return None, None
    new, true, group = arrays
    success = _mean_of_case_means((new < true).astype(np.float64), group)
    magnitude = _mean_of_case_means(np.exp(-new) - np.exp(-true), group)
    return success, magnitude


def neighborhood_success(
    nll_new: PromptValues, nll_true: PromptValues, groups: PromptGroups
) -> tuple[float | None, float | None]:
    """Return (success, magnitude): mean over cases of mean [nll_true < nll_new] and of mean(p_true − p_new).

    For neighborhood prompts (the edit should leave them on target_true). (None, None) when empty.
    """
    arrays = _as_arrays(nll_new, nll_true, groups)
    if arrays is None:
        return None, None
    new, true, group = arrays
    success = _mean_of_case_means((true < new).astype(np.float64), group)
    magnitude = _mean_of_case_means(np.exp(-true) - np.exp(-new), group)
    return success, magnitude


def harmonic_mean(values: Sequence[float]) -> float:
    """Return the harmonic mean of non-negative values (0 when any is 0), ROME's score of the three successes."""
    if len(values) == 0:
        raise KisError("harmonic_mean needs at least one value")
    if any(value is None for value in values):
        raise KisError("harmonic_mean got None (a metric with no prompts): leave it out or report no score")
    array = np.asarray(values, dtype=np.float64)
    if np.isnan(array).any() or (array < 0).any():
        raise KisError(f"harmonic_mean needs non-negative numbers, got {list(values)}")
    if (array == 0).any():
        return 0.0
    return float(len(array) / np.sum(1.0 / array))


# ---------------------------------------------------------------------------------------------------------
# Fluency: n-gram entropy of generated text
# ---------------------------------------------------------------------------------------------------------

# numbers with inner separators (3.14, 1,000), words with inner apostrophes/hyphens, any other single mark
_WORD_PATTERN = re.compile(r"\d+(?:[.,]\d+)+|\w+(?:['’-]\w+)*|[^\w\s]")


def word_tokens(text: str) -> list[str]:
    """Return the word tokens of a text: a regex approximation of nltk.word_tokenize that needs no NLTK data.

    Tokens are numbers with inner separators ("3.14", "1,000"), words with their inner apostrophes and hyphens
    ("don't", "state-of-the-art"), and each other non-space mark on its own ("." "," "(" "$"). Unlike NLTK it
    does not split contractions ("don't" stays one token, NLTK gives "do" "n't"), does not join "..." or "--",
    and does not turn quotes into `` and ''. n-gram counts on ordinary prose differ little.
    """
    if not isinstance(text, str):
        raise KisError(f"word_tokens needs a string, not {type(text).__name__}")
    return _WORD_PATTERN.findall(text)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Return the mean over n of weight_n · H_n, H_n the base-2 entropy of the text's n-gram frequencies (ROME).

    A text with fewer than n tokens has H_n = 0.
    """
    if len(ns) == 0 or len(ns) != len(weights):
        raise KisError(f"ngram_entropy needs one weight per n, got ns={tuple(ns)} and weights={tuple(weights)}")
    if any(not isinstance(n, int) or n < 1 for n in ns):
        raise KisError(f"ngram_entropy needs positive integer n, got {tuple(ns)}")
    tokens = word_tokens(text)
    weighted = []
    for n, weight in zip(ns, weights):
        counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        entropy = -sum((c / total) * math.log2(c / total) for c in counts.values()) if total else 0.0
        weighted.append(weight * entropy)
    return float(np.mean(weighted))


def fluency(texts: Sequence[str]) -> float:
    """Return the arithmetic mean of ngram_entropy over texts (ROME's generation fluency)."""
    if isinstance(texts, str):
        raise KisError("fluency takes a list of texts, not one string: wrap it in a list")
    if len(texts) == 0:
        raise KisError("fluency needs at least one generated text")
    return float(np.mean([ngram_entropy(text) for text in texts]))


# ---------------------------------------------------------------------------------------------------------
# Generation and perplexity
# ---------------------------------------------------------------------------------------------------------


def _id_rows(rows: Sequence[Sequence[int]], what: str) -> list[list[int]]:
    """Return the rows as lists of ints; KisError for an empty row."""
    result = []
    for index, row in enumerate(rows):
        ids = [int(token) for token in row]
        if not ids:
            raise KisError(f"{what} {index} has no tokens: drop it, or encode it with BOS")
        result.append(ids)
    return result


def greedy_generate(
    model: HookedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 16
) -> list[list[int]]:
    """Return the max_new_tokens greedily decoded token ids after each prompt (prompt excluded), in input order.

    Prompts of equal length share batches, so no row is padded and every position stays where it belongs.
    """
    _check_batch_size(batch_size)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise KisError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    rows = _id_rows(prompts, "prompt")
    generated: list[list[int]] = [[] for _ in rows]
    if max_new_tokens == 0:
        return generated
    by_length: dict[int, list[int]] = {}
    for index, row in enumerate(rows):
        by_length.setdefault(len(row), []).append(index)
    device = model_device(model)
    for _, members in sorted(by_length.items()):
        for begin in range(0, len(members), batch_size):
            chunk = members[begin : begin + batch_size]
            tokens: Int[Tensor, "batch pos"] = torch.tensor([rows[index] for index in chunk], device=device)
            with torch.no_grad():
                for _ in range(max_new_tokens):
                    logits = model(tokens, attention_mask=torch.ones_like(tokens))
                    following = logits[:, -1].argmax(dim=-1)
                    tokens = torch.cat([tokens, following[:, None].to(tokens.dtype)], dim=1)
            new = tokens[:, -max_new_tokens:].cpu().tolist()
            for index, ids in zip(chunk, new):
                generated[index] = ids
    return generated


def perplexity(model: HookedModel, token_rows: Sequence[Sequence[int]], batch_size: int = 16) -> float:
    """Return exp(total NLL of every next-token prediction / number of predictions) over the rows."""
    _check_batch_size(batch_size)
    rows = _id_rows(token_rows, "token row")
    if sum(len(row) - 1 for row in rows) == 0:
        raise KisError("perplexity needs a row of at least two tokens (there is nothing to predict)")
    order = sorted(range(len(rows)), key=lambda index: len(rows[index]))
    device = model_device(model)
    pad_id = _pad_id(model)
    total, count = 0.0, 0
    for begin in range(0, len(order), batch_size):
        chunk = [rows[index] for index in order[begin : begin + batch_size]]
        if max(len(row) for row in chunk) < 2:
            continue
        tokens, mask = pad_batch(chunk, pad_id)
        tokens, mask = tokens.to(device), mask.to(device)
        # a prediction at position t is scored when both t and t + 1 are real tokens
        scored = (mask[:, :-1] * mask[:, 1:]).bool()
        with torch.no_grad():
            logits = model(tokens, attention_mask=mask)
            picked = logits[:, :-1][scored]  # [predictions, vocab]
            del logits
            labels = tokens[:, 1:][scored]
            nll = _logsumexp_rows(picked) - picked.gather(-1, labels[:, None]).squeeze(-1).double()
        total += float(nll.sum())
        count += int(nll.numel())
    return math.exp(total / count)
