"""Subject location and batched key extraction, against an independent decode-based reference."""

from __future__ import annotations

import pytest
import torch

from kis_lens.errors import KisError
from kis_lens.facts import Fact, load_facts, sample_facts
from kis_lens.hooks import mlp_in_hook_name
from kis_lens.keys import compute_keys, locate_subject
from kis_lens.testing import tiny_tokenizer


def reference_subject_tokens(tokenizer, fact: Fact) -> tuple[int, int]:
    """First and last subject token by decoding growing token prefixes (slow, independent of offsets)."""
    ids = tokenizer(fact.text, add_special_tokens=False)["input_ids"]
    start, end = fact.subject_span
    lengths = [len(tokenizer.decode(ids[: t + 1])) for t in range(len(ids))]
    first = next(t for t, length in enumerate(lengths) if length > start)
    last = next(t for t, length in enumerate(lengths) if length >= end)
    return first, last


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.mark.parametrize(
    "prompt, subject",
    [
        ("In {}, the language spoken is", "United Kingdom"),  # leading-space tokens
        ("{} is located in the continent of", "Vinson Massif"),  # subject at the very start
        ("The name Paris is used in {}, a city in", "Paris"),  # subject repeated earlier in the prompt
        ("{}'s capital is", "Danmark"),  # subject glued to the next characters
        ("Ünïcödé {} ✓ is", "naïve café"),  # multi-byte characters
    ],
)
def test_locate_subject_matches_decode_reference(tokenizer, prompt, subject):
    fact = Fact("t", subject, prompt, "x")
    located = locate_subject(tokenizer, fact, prepend_bos=False)
    assert (located.subject_first, located.subject_last) == reference_subject_tokens(tokenizer, fact)
    decoded = tokenizer.decode(located.ids[located.subject_first : located.subject_last + 1])
    assert subject in decoded


def test_repeated_subject_uses_the_placeholder_position(tokenizer):
    fact = Fact("t", "Paris", "The name Paris is used in {}, a city in", "x")
    located = locate_subject(tokenizer, fact, prepend_bos=False)
    first_paris = locate_subject(tokenizer, Fact("t", "Paris", "The name {} is used in Paris, a city in", "x"), False)
    assert located.subject_last > first_paris.subject_last


def test_bos_shifts_positions_by_one(tokenizer):
    fact = Fact("t", "United Kingdom", "In {}, the language spoken is", "x")
    plain = locate_subject(tokenizer, fact, prepend_bos=False)
    with_bos = locate_subject(tokenizer, fact, prepend_bos=True)
    assert with_bos.ids == [tokenizer.bos_token_id, *plain.ids]
    assert (with_bos.subject_first, with_bos.subject_last) == (plain.subject_first + 1, plain.subject_last + 1)


def test_all_shipped_facts_locate(tokenizer):
    for fact in load_facts():
        located = locate_subject(tokenizer, fact, prepend_bos=False)
        assert (located.subject_first, located.subject_last) == reference_subject_tokens(tokenizer, fact)


def test_missing_subject_is_a_clear_error(tokenizer):
    with pytest.raises(KisError, match="fact 42: subject '' not found"):
        locate_subject(tokenizer, Fact("42", "", "In {}, people speak", "x"), prepend_bos=False)


@pytest.mark.parametrize("position", ["subject_last", "subject_first", "last"])
def test_batched_keys_equal_one_at_a_time(tiny, position):
    facts = sample_facts(load_facts(), 10, seed=1)
    batched = compute_keys(tiny, facts, [0, 2], token_position=position, batch_size=4)
    single = compute_keys(tiny, facts, [0, 2], token_position=position, batch_size=1)
    torch.testing.assert_close(batched.values, single.values, rtol=1e-5, atol=1e-5)
    assert batched.values.shape == (2, 10, tiny.cfg.d_mlp)


def test_keys_equal_run_with_cache_at_subject_last(tiny):
    facts = sample_facts(load_facts(), 3, seed=2)
    keys = compute_keys(tiny, facts, [1], prepend_bos=False)
    for index, fact in enumerate(facts):
        first, last = reference_subject_tokens(tiny.tokenizer, fact)
        ids = torch.tensor([tiny.tokenizer(fact.text, add_special_tokens=False)["input_ids"]])
        _, cache = tiny.run_with_cache(ids)
        torch.testing.assert_close(keys.at_layer(1)[index], cache[mlp_in_hook_name(1)][0, last], rtol=1e-5, atol=1e-5)


def test_keys_record_their_settings(tiny):
    keys = compute_keys(tiny, sample_facts(load_facts(), 2), [0], token_position="last", prepend_bos=True)
    assert keys.settings()["token_position"] == "last" and keys.settings()["prepend_bos"] is True
    assert keys.settings()["hook"] == "blocks.{layer}.mlp.hook_post"
    with pytest.raises(KisError, match="no keys for layer 1"):
        keys.at_layer(1)


def test_bad_token_position(tiny):
    with pytest.raises(KisError, match="unknown token_position 'middle'"):
        compute_keys(tiny, sample_facts(load_facts(), 2), [0], token_position="middle")
