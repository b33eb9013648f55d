"""The quarter caches of `kis reproduce`: C on four disjoint quarters of the offline Wikipedia's token budget.

¼ (q1), ½ (q1+q2) and all of the tokens give the convergence curve of P, and the two disjoint halves (q1+q2 vs
q3+q4) its estimation noise. The texts are split by their share of the budget; each quarter, a range of the
corpus' texts, is then a covariance cache job of its own (kis_lens.cache_job: checkpoints, resume, folder locks),
cached in a folder of its own (kis_lens.layout.part_cache_name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from kis_lens.blocks import block_of
from kis_lens.cache_job import cache_second_moments
from kis_lens.config import CacheOptions, CorpusOptions, ModelOptions
from kis_lens.corpus import EMBEDDED_CORPUS, TextRange, corpus_texts, open_corpus
from kis_lens.errors import KisError
from kis_lens.layout import stats_path
from kis_lens.models import HookedModel, model_info, resolve_prepend_bos
from kis_lens.stats import SecondMoment
from kis_lens.storage import CacheKey, load_second_moment, read_metadata
from kis_lens.tokens import encode

QUARTERS: tuple[str, ...] = ("q1", "q2", "q3", "q4")


def split_texts_by_tokens(
    tokenizer: Any, texts: Iterable[str], max_tokens: int | None, max_length: int, prepend_bos: bool, parts: int = 4
) -> tuple[list[range], list[int]]:
    """Return `parts` consecutive disjoint ranges of text indices with about equal shares of the budget, and tokens.

    Texts are taken in order until max_tokens; each goes to the part its running share of the total falls in.
    """
    counts: list[int] = []
    total = 0
    for text in texts:
        counts.append(len(encode(tokenizer, text, prepend_bos, max_length)))
        total += counts[-1]
        if max_tokens is not None and total >= max_tokens:
            break
    running = 0
    stops, tokens = [0] * parts, [0] * parts
    for index, count in enumerate(counts):
        part = min(parts - 1, int(parts * running / max(total, 1)))
        stops[part], tokens[part] = index + 1, tokens[part] + count
        running += count
    for part in range(1, parts):  # an empty part ends where the one before it does
        stops[part] = max(stops[part], stops[part - 1])
    return [range(start, stop) for start, stop in zip([0, *stops[:-1]], stops)], tokens


def quarter_ranges(model: HookedModel, max_tokens: int | None, batch_token: int | None) -> list[TextRange]:
    """Return the four quarters of the budget as ranges of the offline Wikipedia's texts (the model's tokens)."""
    n_ctx = int(model.cfg.n_ctx)
    ranges, tokens = split_texts_by_tokens(
        model.tokenizer,
        corpus_texts(EMBEDDED_CORPUS),
        max_tokens,
        min(n_ctx, batch_token or n_ctx),
        resolve_prepend_bos(model, None),
        len(QUARTERS),
    )
    # A quarter holding the whole budget would stop its cache job at the budget, short of its last texts.
    if not all(ranges) or (max_tokens is not None and max(tokens) >= max_tokens):
        raise KisError(f"the token budget {max_tokens} is too small to split the corpus in four: raise --max_tokens")
    return [TextRange(texts.start, texts.stop, quarter) for quarter, texts in zip(QUARTERS, ranges)]


def load_quarter_moments(
    output_dir: str | Path,
    model: HookedModel,
    layers: Sequence[int],
    max_tokens: int | None = None,
    batch_token: int | None = None,
) -> dict[str, dict[int, SecondMoment]] | None:
    """Return the four quarters' cached moments for every layer, made with this budget and batching, else None."""
    info, corpus = model_info(model), open_corpus(EMBEDDED_CORPUS)
    prepend_bos = resolve_prepend_bos(model, None)
    quarters: dict[str, dict[int, SecondMoment]] = {}
    for texts in quarter_ranges(model, max_tokens, batch_token):
        part = corpus.part(texts)  # where and under which identity the cache job put this quarter
        quarters[texts.name] = {}
        for layer in layers:
            path = stats_path(output_dir, info.name, part.cache_name, layer)
            if not path.is_file():
                return None
            key = CacheKey.for_model(info, layer, EMBEDDED_CORPUS, part.identity, prepend_bos)
            quarters[texts.name][layer] = load_second_moment(path, expect=key)[0]
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
    ReproduceConfig's); a setting it lacks keeps CorpusOptions' default. The seconds are what the caches took when
    they were made, not the instant of reading them back.
    """
    options = block_of(config, CorpusOptions)
    # The offline Wikipedia in its own order and the model's own BOS convention, whatever else config holds.
    request = CacheOptions(
        corpus=EMBEDDED_CORPUS,
        max_tokens=options.max_tokens,
        batch_token=options.batch_token,
        output_dir=options.output_dir,
        progress=options.progress,
    )
    quarters: dict[str, dict[int, SecondMoment]] = {}
    seconds = 0.0
    for texts in quarter_ranges(model, options.max_tokens, options.batch_token):
        report = cache_second_moments(model, layers, request, texts, {"quarter": texts.name}, timed=True)
        quarters[texts.name] = {layer: load_second_moment(report.paths[layer])[0] for layer in layers}
        seconds += float(read_metadata(report.paths[layers[0]]).get("seconds", 0.0))
    return quarters, round(seconds, 2)
