"""kis reproduce's quarters are cache jobs on ranges of texts, and hold what the in-memory estimate did, exactly."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kis_lens.cache_job import cache_second_moments
from kis_lens.config import CacheOptions
from kis_lens.corpus import EMBEDDED_CORPUS, EMBEDDED_WIKIPEDIA_CREDIT, TextRange, corpus_texts, open_corpus
from kis_lens.covariance import estimate_second_moments
from kis_lens.errors import KisError
from kis_lens.layout import part_cache_name, stats_path
from kis_lens.models import load_model, resolve_prepend_bos
from kis_lens.quarters import QUARTERS, load_quarter_moments, quarter_second_moments
from kis_lens.reproduce import ReproduceConfig
from kis_lens.runner import covariance_key
from kis_lens.storage import load_second_moment, read_metadata
from kis_lens.tokens import encode

LAYERS = [0, 1]
BUDGET = 2500


@pytest.fixture(scope="module")
def model():
    """The model `--model_name tiny-gpt2` loads."""
    return load_model("tiny-gpt2", device="cpu")


def _old_quarter_texts(model, max_tokens: int, max_length: int) -> list[list[str]]:
    """The quarters as kis_lens split them before they were cache jobs: texts in order, by running token share."""
    prepend_bos = resolve_prepend_bos(model, None)
    chosen, counts = [], []
    for text in corpus_texts(EMBEDDED_CORPUS):
        chosen.append(text)
        counts.append(len(encode(model.tokenizer, text, prepend_bos, max_length)))
        if sum(counts) >= max_tokens:
            break
    runs: list[list[str]] = [[] for _ in QUARTERS]
    running = 0
    for text, count in zip(chosen, counts):
        runs[min(3, int(4 * running / sum(counts)))].append(text)
        running += count
    return runs


@pytest.mark.parametrize("batch_token", [None, 700])
def test_quarter_caches_equal_the_in_memory_estimate_bit_for_bit(tmp_path, model, batch_token):
    """Each quarter's cache job holds the very float64 sums estimate_second_moments gives on the same texts."""
    config = ReproduceConfig(
        model_name="tiny-gpt2", max_tokens=BUDGET, batch_token=batch_token, output_dir=str(tmp_path), progress=False
    )
    quarters, seconds = quarter_second_moments(config, model, LAYERS)
    runs = _old_quarter_texts(model, BUDGET, model.cfg.n_ctx)
    assert all(runs) and seconds > 0
    for quarter, texts in zip(QUARTERS, runs):
        expected = estimate_second_moments(
            model, texts, LAYERS, batch_token=batch_token, prepend_bos=resolve_prepend_bos(model, None), progress=False
        )
        for layer in LAYERS:
            assert quarters[quarter][layer].count == expected[layer].count
            assert torch.equal(quarters[quarter][layer].sum, expected[layer].sum), (quarter, layer)


def test_quarter_caches_live_apart_say_what_they_are_and_are_reused(tmp_path, model):
    """Each quarter's folder and identity name its texts; a rerun reads them back; a whole-corpus cache is apart."""
    config = ReproduceConfig(model_name="tiny-gpt2", max_tokens=BUDGET, output_dir=str(tmp_path), progress=False)
    quarters, seconds = quarter_second_moments(config, model, LAYERS)
    runs = _old_quarter_texts(model, BUDGET, model.cfg.n_ctx)
    start = 0
    for quarter, texts in zip(QUARTERS, runs):
        folder = part_cache_name(EMBEDDED_CORPUS, quarter, start, start + len(texts))
        path = stats_path(tmp_path, "tiny-gpt2", folder, 1)
        assert path.parent.name == f"wikipedia-offline_{quarter}_texts{start}-{start + len(texts)}_stats"
        metadata = read_metadata(path)
        assert metadata["corpus_identity"] == f"wikipedia-offline|texts[{start}:{start + len(texts)}]"
        assert metadata["quarter"] == quarter and metadata["max_tokens"] == BUDGET and metadata["exhausted"]
        assert metadata["corpus_credit"] == EMBEDDED_WIKIPEDIA_CREDIT and metadata["seconds"] >= 0
        assert metadata["texts"] == len(texts) and not list((path.parent / "checkpoints").glob("*"))
        start += len(texts)
    again, seconds_again = quarter_second_moments(config, model, LAYERS)  # read back: the recorded time
    assert seconds_again == seconds
    assert all(torch.equal(again[q][layer].sum, quarters[q][layer].sum) for q in QUARTERS for layer in LAYERS)
    loaded = load_quarter_moments(tmp_path, model, LAYERS, BUDGET)
    assert loaded is not None and torch.equal(loaded["q3"][0].sum, quarters["q3"][0].sum)
    assert load_quarter_moments(tmp_path, model, LAYERS, BUDGET + 500) is None  # another budget: other texts

    whole = cache_second_moments(
        model, [1], CacheOptions(corpus=EMBEDDED_CORPUS, max_tokens=300, output_dir=str(tmp_path), progress=False)
    )
    assert whole.paths[1] == stats_path(tmp_path, "tiny-gpt2", EMBEDDED_CORPUS, 1)
    whole_key = covariance_key(ReproduceConfig(model_name="tiny-gpt2"), model, 1)
    quarter_key = replace(whole_key, corpus_identity=metadata["corpus_identity"])
    load_second_moment(whole.paths[1], expect=whole_key)
    load_second_moment(path, expect=quarter_key)
    for file, key in ((path, whole_key), (whole.paths[1], quarter_key)):  # neither is ever read as the other
        with pytest.raises(KisError, match="corpus_identity"):
            load_second_moment(file, expect=key)


def test_a_text_range_is_a_corpus_of_its_own():
    """Texts [start, stop) in the corpus' order; a range past the corpus or an empty one is refused."""
    corpus = open_corpus(EMBEDDED_CORPUS)
    part = corpus.part(TextRange(5, 9, "q2"))
    assert list(part.texts()) == list(corpus.texts(5, 9)) and part.size == 4
    assert list(part.texts(1, 3)) == list(corpus.texts(6, 8)) and list(part.open_texts(2)) == list(corpus.texts(7, 9))
    assert part.cache_name == "wikipedia-offline_q2_texts5-9" and part.identity == "wikipedia-offline|texts[5:9]"
    with pytest.raises(KisError, match="past the"):
        corpus.part(TextRange(5, corpus.size + 1, "q4"))
    with pytest.raises(KisError, match="holds no texts"):
        TextRange(3, 3, "q1")
    with pytest.raises(KisError, match="already texts"):
        part.part(TextRange(0, 1, "q1"))
