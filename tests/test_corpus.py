"""Corpus sources (embedded, .txt, folder, .jsonl, saved dataset, streamed Wikipedia) and resumable batching."""

from __future__ import annotations

import json

import pytest

from kis_lens.corpus import EMBEDDED_CORPUS, corpus_texts, open_corpus
from kis_lens.errors import KisError
from kis_lens.testing import tiny_tokenizer
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
