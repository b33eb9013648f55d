"""The quarter caches of `kis reproduce`: C on four disjoint quarters of the offline Wikipedia's token budget.

¼ (q1), ½ (q1+q2) and all of the tokens give the convergence curve of P, and the two disjoint halves (q1+q2 vs
q3+q4) its estimation noise. The texts are split by their share of the budget, each quarter's second moment is
estimated in memory and cached beside the run's caches (kis_lens.layout.quarter_stats_path), keyed like them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from kis_lens.config import CorpusOptions, ModelOptions, block_of
from kis_lens.corpus import EMBEDDED_CORPUS, EMBEDDED_WIKIPEDIA_CREDIT, corpus_texts
from kis_lens.covariance import estimate_second_moments
from kis_lens.errors import KisError
from kis_lens.layout import quarter_stats_path
from kis_lens.models import HookedModel, model_info
from kis_lens.runner import covariance_key
from kis_lens.stats import SecondMoment
from kis_lens.storage import load_second_moment, read_metadata, save_second_moment
from kis_lens.tokens import encode

QUARTERS: tuple[str, ...] = ("q1", "q2", "q3", "q4")
# The quarters' corpus settings: the offline Wikipedia in its own order, the model's own BOS convention.
QUARTER_CORPUS = CorpusOptions(corpus=EMBEDDED_CORPUS)


def split_texts_by_tokens(
    tokenizer: Any, texts: Iterable[str], max_tokens: int | None, max_length: int, prepend_bos: bool, parts: int = 4
) -> tuple[list[list[str]], int]:
    """Return `parts` consecutive disjoint runs of texts with about equal shares of the token budget, and the total."""
    chosen: list[str] = []
    counts: list[int] = []
    for text in texts:
        chosen.append(text)
        counts.append(len(encode(tokenizer, text, prepend_bos, max_length)))
        if max_tokens is not None and sum(counts) >= max_tokens:
            break
    total = sum(counts)
    runs: list[list[str]] = [[] for _ in range(parts)]
    running = 0
    for text, count in zip(chosen, counts):
        runs[min(parts - 1, int(parts * running / max(total, 1)))].append(text)
        running += count
    return runs, total


def load_quarter_moments(
    output_dir: str | Path, model: HookedModel, layers: Sequence[int], max_tokens: int | None = None
) -> dict[str, dict[int, SecondMoment]] | None:
    """Return the four quarters' cached moments for every layer, made with this budget, else None."""
    name = model_info(model).name
    quarters: dict[str, dict[int, SecondMoment]] = {}
    for quarter in QUARTERS:
        quarters[quarter] = {}
        for layer in layers:
            path = quarter_stats_path(output_dir, name, EMBEDDED_CORPUS, quarter, layer)
            if not path.is_file():
                return None
            moment, metadata = load_second_moment(path, expect=covariance_key(QUARTER_CORPUS, model, layer))
            if metadata.get("max_tokens") != max_tokens:
                return None
            quarters[quarter][layer] = moment
    return quarters


def merged(*moments: SecondMoment) -> SecondMoment:
    """Return a new accumulator holding all the given ones (disjoint token sets: their union's second moment)."""
    total = moments[0].clone()
    for moment in moments[1:]:
        total.merge(moment)
    return total


def quarter_second_moments(
    config: ModelOptions, model: HookedModel, layers: Sequence[int]
) -> tuple[dict[str, dict[int, SecondMoment]], float]:
    """Return {quarter: {layer: SecondMoment}} over four disjoint quarters of the budget (cached) and seconds spent.

    config gives the output folder, progress, and the token budget and batching (max_tokens, batch_token: a
    ReproduceConfig's); a setting it lacks keeps CorpusOptions' default.
    """
    config = block_of(config, CorpusOptions)
    name = model_info(model).name
    cached = load_quarter_moments(config.output_dir, model, layers, config.max_tokens)
    if cached is not None:
        # Report what the estimate cost when it was made, not the instant of reading it back.
        first = quarter_stats_path(config.output_dir, name, EMBEDDED_CORPUS, QUARTERS[0], layers[0])
        return cached, float(read_metadata(first)["seconds"])
    prepend_bos = covariance_key(QUARTER_CORPUS, model, layers[0]).prepend_bos
    n_ctx = int(model.cfg.n_ctx)
    max_length = min(n_ctx, config.batch_token or n_ctx)
    runs, _ = split_texts_by_tokens(
        model.tokenizer, corpus_texts(EMBEDDED_CORPUS), config.max_tokens, max_length, prepend_bos, len(QUARTERS)
    )
    started = time.perf_counter()
    quarters: dict[str, dict[int, SecondMoment]] = {}
    for quarter, texts in zip(QUARTERS, runs):
        if not texts:
            raise KisError(
                f"the token budget {config.max_tokens} is too small to split the corpus in four: raise --max_tokens"
            )
        quarters[quarter] = estimate_second_moments(
            model, texts, layers, batch_token=config.batch_token, prepend_bos=prepend_bos, progress=config.progress
        )
    # Rounded once, as the caches record it: a rerun that reads them then reports the very same number.
    seconds = round(time.perf_counter() - started, 2)
    for quarter, moments in quarters.items():
        for layer, moment in moments.items():
            metadata = covariance_key(QUARTER_CORPUS, model, layer).to_metadata()
            metadata.update(
                max_tokens=config.max_tokens,
                quarter=quarter,
                seconds=seconds,
                model_dtype=model_info(model).dtype,
                corpus_credit=EMBEDDED_WIKIPEDIA_CREDIT,
            )
            save_second_moment(
                quarter_stats_path(config.output_dir, name, EMBEDDED_CORPUS, quarter, layer), moment, metadata
            )
    return quarters, seconds
