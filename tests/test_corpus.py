"""Corpus sources (embedded, .txt, folder, .jsonl, saved dataset, streamed Wikipedia) and resumable batching."""

from __future__ import annotations

import json
import random

import pytest

from kis_lens.blocks import block_of
from kis_lens.cache_job import cache_second_moments
from kis_lens.config import CacheOptions, RunConfig
from kis_lens.corpus import (
    EMBEDDED_CORPUS,
    WIKIPEDIA_CONFIG,
    buffered_shuffle,
    corpus_texts,
    open_corpus,
    seeded_permutation,
)
from kis_lens.errors import KisError
from kis_lens.storage import read_metadata
from kis_lens.tiny import tiny_tokenizer
from kis_lens.tokens import token_batches

TEXTS = ["The Eiffel Tower is in Paris.", "Water boils at 100 degrees.", "", "Mount Everest is high.", "Rome is old."]


def test_text_file_one_text_per_nonempty_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(TEXTS) + "\n\n", encoding="utf-8")
    corpus = open_corpus(str(path))
    assert list(corpus.texts()) == [t for t in TEXTS if t]
    assert list(corpus_texts(str(path), sample_size=2)) == TEXTS[:2]
    assert corpus.cache_name == "corpus" and corpus.identity.startswith("file:")


def test_folder_one_text_per_file_in_path_order(tmp_path):
    for name, text in [("b.txt", "second"), ("a.txt", "first"), ("sub/c.txt", "third"), ("skip.md", "no")]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert list(open_corpus(str(tmp_path)).texts()) == ["first", "second", "third"]


def test_jsonl_text_field_and_bad_lines(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)), encoding="utf-8")
    assert list(open_corpus(str(path)).texts(start=1, stop=3)) == TEXTS[1:3]
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(KisError, match=r"c.jsonl:2 .*'text'"):
        open_corpus(str(path))


def test_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": TEXTS, "n": list(range(5))}).save_to_disk(str(tmp_path / "ds"))
    corpus = open_corpus(str(tmp_path / "ds"))
    assert corpus.size == 5 and list(corpus.texts(start=3)) == TEXTS[3:]
    assert list(corpus.texts(rank=1, world_size=2)) == TEXTS[1::2]


def test_streamed_wikipedia_fails_clearly_offline(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def unreachable(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)  # the test must never touch the network
    corpus = open_corpus("wikipedia")
    assert corpus.size is None and corpus.cache_name == "wikipedia"
    with pytest.raises(KisError, match="could not stream wikimedia/wikipedia.*--corpus wikipedia-offline"):
        next(corpus.texts())


def test_unknown_corpus_is_refused(tmp_path):
    with pytest.raises(KisError, match="not 'wikipedia-offline'"):
        open_corpus(str(tmp_path / "missing.txt"))


def test_embedded_order_is_fixed_and_sample_size_counts_texts():
    corpus = open_corpus(EMBEDDED_CORPUS)
    first = list(corpus.texts(stop=5))
    assert len(first) == 5 and first == list(corpus.texts(stop=5))
    assert list(corpus.texts(start=3, stop=5)) == first[3:]


def test_batches_respect_budget_skip_empty_and_resume_exactly():
    tokenizer = tiny_tokenizer()
    texts = list(open_corpus(EMBEDDED_CORPUS).texts(stop=60)) + [""] * 6
    batches = list(token_batches(tokenizer, texts, 128, 512, prepend_bos=False, sort_window=16))
    real = [b for b in batches if b.n_tokens]
    assert all(b.tokens.numel() <= 512 for b in real)
    assert sum(b.n_texts for b in real) == 60  # the six empty texts add no batch row
    expected_tokens = sum(min(len(tokenizer(t, add_special_tokens=False)["input_ids"]), 128) for t in texts)
    assert sum(b.n_tokens for b in batches) == expected_tokens
    for cut in (3, 7, len(batches) - 2):
        position = batches[cut].resume_position()
        resumed = list(token_batches(tokenizer, texts[position[0] :], 128, 512, False, 16, start=position))
        assert len(resumed) == len(batches) - cut - 1
        for got, want in zip(resumed, batches[cut + 1 :]):
            assert got.tokens.equal(want.tokens) and got.attention_mask.equal(want.attention_mask)


# A stand-in for wikimedia/wikipedia: a real datasets.IterableDataset of N_SHARDS shards (more than the
# shuffle reads at once), with the hub's extra columns, returned by a monkeypatched datasets.load_dataset.
N_SHARDS, PER_SHARD = 11, 40
SOURCE = [f"article {shard}-{row}" for shard in range(N_SHARDS) for row in range(PER_SHARD)]


@pytest.fixture
def fake_hub(monkeypatch):
    """Return the list of (args, kwargs) datasets.load_dataset gets; it streams SOURCE, never the network."""
    datasets = pytest.importorskip("datasets")

    def rows(shards):
        for shard in shards:
            for row in range(PER_SHARD):
                yield {"id": str(shard * 1000 + row), "url": "u", "title": "t", "text": f"article {shard}-{row}"}

    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.IterableDataset.from_generator(rows, gen_kwargs={"shards": list(range(N_SHARDS))})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_streamed_wikipedia_first_n_texts_in_row_order(fake_hub):
    corpus = open_corpus("wikipedia")
    assert list(corpus.texts(stop=5)) == SOURCE[:5]
    assert list(corpus.texts(start=37, stop=45)) == SOURCE[37:45]  # resumes across a shard boundary
    assert list(corpus.texts(start=2, stop=10, rank=1, world_size=3)) == SOURCE[3:10:3]
    assert fake_hub[0] == (("wikimedia/wikipedia", WIKIPEDIA_CONFIG), {"split": "train", "streaming": True})
    # The default's identity and folder are what they always were: existing caches stay valid.
    assert corpus.identity == "hf:wikimedia/wikipedia/20231101.en/train" and corpus.cache_name == "wikipedia"


def test_streamed_wikipedia_seeded_shuffle(fake_hub):
    shuffled = list(open_corpus("wikipedia", order="shuffle", seed=0, buffer=25).texts())
    again = list(open_corpus("wikipedia", order="shuffle", seed=0, buffer=25).texts())
    other = list(open_corpus("wikipedia", order="shuffle", seed=1, buffer=25).texts())
    assert shuffled == again  # same seed, same texts in the same order
    assert shuffled[:50] != other[:50] and set(shuffled[:50]) != set(other[:50])
    for texts in (shuffled, other):
        assert len(texts) == len(set(texts)) == len(SOURCE) and set(texts) == set(SOURCE)  # all, none repeated
    assert shuffled[:50] != SOURCE[:50]
    assert len({text.split("-")[0] for text in shuffled[:50]}) > 3  # the first texts come from several shards
    corpus = open_corpus("wikipedia", order="shuffle", seed=0, buffer=25)
    assert list(corpus.texts(start=30, stop=60)) == shuffled[30:60]  # a fixed sequence: caches resume and extend
    assert list(corpus.texts(start=30, stop=60, rank=2, world_size=4)) == shuffled[32:60:4]
    assert all(kwargs == {"split": "train", "streaming": True} for _, kwargs in fake_hub)


def test_streamed_wikipedia_snapshot_is_the_config_name(fake_hub):
    corpus = open_corpus("wikipedia", snapshot="20231101.simple")
    assert list(corpus.texts(stop=3)) == SOURCE[:3]
    assert fake_hub[-1][0] == ("wikimedia/wikipedia", "20231101.simple") and fake_hub[-1][1]["streaming"] is True
    assert corpus.identity == "hf:wikimedia/wikipedia/20231101.simple/train"
    with pytest.raises(KisError, match="not a wikimedia/wikipedia config name.*--wikipedia_snapshot 20231101.en"):
        open_corpus("wikipedia", snapshot="../20231101.en")
    with pytest.raises(KisError, match="applies only to --corpus wikipedia"):
        open_corpus(EMBEDDED_CORPUS, snapshot="20231101.simple")


def test_identity_and_cache_folder_differ_by_order_seed_buffer_and_snapshot():
    variants = {
        "first": open_corpus("wikipedia"),
        "shuffle": open_corpus("wikipedia", order="shuffle"),
        "seed": open_corpus("wikipedia", order="shuffle", seed=1),
        "buffer": open_corpus("wikipedia", order="shuffle", buffer=500),
        "snapshot": open_corpus("wikipedia", snapshot="20231101.de"),
        "both": open_corpus("wikipedia", order="shuffle", snapshot="20231101.de"),
    }
    assert len({corpus.identity for corpus in variants.values()}) == len(variants)
    assert len({corpus.cache_name for corpus in variants.values()}) == len(variants)
    assert variants["shuffle"].identity == (
        "hf:wikimedia/wikipedia/20231101.en/train|shuffle(seed=0,buffer=10000,shards_open=8)"
    )
    assert variants["shuffle"].cache_name == "wikipedia-shuffle-s0-b10000"
    assert variants["both"].cache_name == "wikipedia-20231101.de-shuffle-s0-b10000"
    local = {seed: open_corpus(EMBEDDED_CORPUS, order="shuffle", seed=seed) for seed in (0, 1)}
    assert local[0].identity == "wikipedia-offline|shuffle(seed=0)" != local[1].identity
    assert local[0].cache_name == "wikipedia-offline-shuffle-s0"
    assert open_corpus(EMBEDDED_CORPUS).identity == "wikipedia-offline"  # unchanged for first-N


def test_shuffled_local_corpus_is_an_exact_seeded_permutation(tmp_path):
    texts = [f"text number {i}" for i in range(60)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    first = open_corpus(str(path))
    shuffled = open_corpus(str(path), order="shuffle", seed=7)
    order = list(shuffled.texts())
    assert list(first.texts()) == texts and sorted(order) == sorted(texts) and order != texts  # a permutation
    assert order == list(open_corpus(str(path), order="shuffle", seed=7).texts())  # deterministic per seed
    assert order != list(open_corpus(str(path), order="shuffle", seed=8).texts())
    assert order == [texts[i] for i in seeded_permutation(60, 7)]
    assert list(shuffled.texts(start=10, stop=20)) == order[10:20] and shuffled.size == 60
    assert list(corpus_texts(str(path), sample_size=5, order="shuffle", seed=7)) == order[:5]  # a uniform sample
    assert shuffled.identity == first.identity + "|shuffle(seed=7)" and shuffled.cache_name == "corpus-shuffle-s7"
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    saved = open_corpus(str(tmp_path / "ds"), order="shuffle", seed=7)  # the same permutation of the same rows
    assert list(saved.texts()) == order and list(saved.texts(start=55)) == order[55:]


def test_seeded_permutation_and_buffered_shuffle_are_fixed_sequences():
    assert list(seeded_permutation(10, 0)) == list(seeded_permutation(10, 0)) != list(range(10))
    assert sorted(seeded_permutation(1000, 3)) == list(range(1000)) and list(seeded_permutation(1, 5)) == [0]
    source = [str(i) for i in range(500)]
    out = list(buffered_shuffle(source, 20, random.Random(4)))
    assert out == list(buffered_shuffle(source, 20, random.Random(4))) and sorted(out) == sorted(source)
    assert all(out.index(text) >= int(text) - 20 for text in source)  # never more than a buffer early
    assert list(buffered_shuffle(source[:5], 20, random.Random(4))) != source[:5]  # shorter than the buffer


def test_bad_sampling_settings_are_refused():
    with pytest.raises(KisError, match="unknown corpus order 'random'.*--corpus_order first or shuffle"):
        open_corpus(EMBEDDED_CORPUS, order="random")
    with pytest.raises(KisError, match="corpus_seed must be at least 0"):
        open_corpus(EMBEDDED_CORPUS, order="shuffle", seed=-1)
    with pytest.raises(KisError, match="corpus_buffer must be at least 1.*--corpus_buffer 1"):
        open_corpus("wikipedia", order="shuffle", buffer=0)
    with pytest.raises(KisError, match="corpus_seed must be at least 0"):
        RunConfig(corpus_seed=-1)
    with pytest.raises(KisError, match="unknown corpus_order"):
        RunConfig(corpus_order="random")


@pytest.mark.slow
def test_sampling_settings_reach_the_cache_job_and_name_its_folder(tiny_gpt2, tmp_path):
    config = RunConfig(
        corpus_order="shuffle", corpus_seed=3, corpus_buffer=50, wikipedia_snapshot="20231101.simple", progress=False
    )
    request = block_of(config, CacheOptions)
    assert (request.corpus_order, request.corpus_seed, request.corpus_buffer, request.wikipedia_snapshot) == (
        "shuffle",
        3,
        50,
        "20231101.simple",
    )
    # Both orders of one corpus cache side by side, each under its own identity.
    reports = {
        order: cache_second_moments(
            tiny_gpt2,
            [0],
            CacheOptions(
                corpus=EMBEDDED_CORPUS,
                output_dir=tmp_path,
                sample_size=4,
                max_tokens=None,
                corpus_order=order,
                progress=False,
            ),
        )
        for order in ("first", "shuffle")
    }
    first, shuffled = (reports[order].paths[0] for order in ("first", "shuffle"))
    assert (
        first.parent.name == "wikipedia-offline_stats" and shuffled.parent.name == "wikipedia-offline-shuffle-s0_stats"
    )
    assert read_metadata(first)["corpus_identity"] == "wikipedia-offline"
    assert read_metadata(shuffled)["corpus_identity"] == "wikipedia-offline|shuffle(seed=0)"
    assert first.is_file() and shuffled.is_file()
