"""Known/unknown fact classification, checked against unpadded one-prompt-at-a-time forwards."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch

from kis_lens.classify import (
    classify_facts,
    ensure_split,
    load_split,
    next_token_logits,
    save_split,
    target_first_token,
)
from kis_lens.cli import main
from kis_lens.config import RunConfig
from kis_lens.errors import KisError
from kis_lens.facts import Fact, load_facts
from kis_lens.layout import split_path
from kis_lens.models import model_info
from kis_lens.runner import select_facts

HAND_FACTS = [
    Fact("h1", "Paris", "{} is the capital of", "France"),
    Fact("h2", "The Eiffel Tower", "{} is located in the city of", "Paris"),
    Fact("h3", "Toyota", "{}, a company that makes", "cars"),
    Fact("h4", "Mount Everest, the highest mountain on Earth,", "{} lies in", "Nepal"),
    Fact("h5", "Python", "The language {} was created by", "Guido van Rossum"),
]


def reference_logits(model, fact: Fact) -> np.ndarray:
    """Next-token logits of one unpadded prompt, no batching, no mask (the slow reference)."""
    ids = model.tokenizer(fact.text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids]), return_type="logits")
    return logits[0, -1].double().numpy()


def reference_rank(logits: np.ndarray, token: int) -> int:
    return int(np.sum(logits > logits[token]))


def write_facts(path, facts: list[Fact]) -> str:
    records = [
        {
            "case_id": f.case_id,
            "requested_rewrite": {"subject": f.subject, "prompt": f.prompt, "target_true": {"str": f.target_true}},
        }
        for f in facts
    ]
    path.write_text(json.dumps(records))
    return str(path)


def test_batched_logits_equal_one_at_a_time(tiny):
    batched = next_token_logits(tiny, HAND_FACTS, prepend_bos=False, batch_size=3).double().numpy()
    for row, fact in zip(batched, HAND_FACTS):
        np.testing.assert_allclose(row, reference_logits(tiny, fact), atol=1e-4, rtol=1e-4)


def test_target_token_carries_the_leading_space(tiny_gpt2):
    tokenizer = tiny_gpt2.tokenizer
    for fact in HAND_FACTS:
        spaced = tokenizer(" " + fact.target_true, add_special_tokens=False)["input_ids"][0]
        assert target_first_token(tokenizer, fact) == spaced
        assert tokenizer.decode([spaced]).startswith(" ")


@pytest.mark.slow
def test_known_exactly_when_target_rank_below_top_k(tiny):
    references = [reference_logits(tiny, fact) for fact in HAND_FACTS]
    ranks = [
        reference_rank(logits, target_first_token(tiny.tokenizer, fact)) for logits, fact in zip(references, HAND_FACTS)
    ]
    for top_k in (1, 10, 200, 2048):
        split = classify_facts(tiny, HAND_FACTS, top_k=top_k, prepend_bos=False, batch_size=2)
        assert split.known == [i for i, rank in enumerate(ranks) if rank < top_k]
        assert split.unknown == [i for i, rank in enumerate(ranks) if rank >= top_k]
        assert [p["target_rank"] for p in split.predictions] == ranks
    # A hand-built fact sits on the boundary: known at top-(rank+1), unknown at top-rank.
    fact, rank = HAND_FACTS[0], ranks[0]
    assert classify_facts(tiny, [fact], top_k=rank + 1, prepend_bos=False).known == [0]
    if rank > 0:
        assert classify_facts(tiny, [fact], top_k=rank, prepend_bos=False).known == []


def test_hand_built_fact_whose_target_is_a_predicted_word(tiny_gpt2):
    fact = HAND_FACTS[1]
    logits = reference_logits(tiny_gpt2, fact)
    order = np.argsort(-logits)
    # The best-ranked word-initial token (" word"): a target stored without its space must map to it.
    position, token = next(
        (i, int(t))
        for i, t in enumerate(order)
        if tiny_gpt2.tokenizer.decode([int(t)])[1:].isalpha() and tiny_gpt2.tokenizer.decode([int(t)]).startswith(" ")
    )
    made_up = Fact("m1", fact.subject, fact.prompt, tiny_gpt2.tokenizer.decode([token]).strip())
    split = classify_facts(tiny_gpt2, [made_up], top_k=position + 1, prepend_bos=False)
    assert split.known == [0] and split.predictions[0]["target_rank"] == position
    if position > 0:
        assert classify_facts(tiny_gpt2, [made_up], top_k=position, prepend_bos=False).known == []


def test_split_saved_reused_and_drives_select_facts(tiny_gpt2, tmp_path):
    facts_file = write_facts(tmp_path / "facts.json", HAND_FACTS)
    references = [reference_logits(tiny_gpt2, fact) for fact in HAND_FACTS]
    ranks = [
        reference_rank(logits, target_first_token(tiny_gpt2.tokenizer, f)) for logits, f in zip(references, HAND_FACTS)
    ]
    top_k = sorted(ranks)[2] + 1  # three of the five facts are "known"
    expected_known = {HAND_FACTS[i].case_id for i, rank in enumerate(ranks) if rank < top_k}

    split, path = ensure_split(tiny_gpt2, facts_file, tmp_path, top_k=top_k, prepend_bos=False)
    assert path == split_path(tmp_path, model_info(tiny_gpt2).name, facts_file) and path.is_file()
    assert load_split(path).known == split.known

    config = RunConfig(
        model_name="tiny-gpt2",
        facts=facts_file,
        output_dir=str(tmp_path),
        knowledge_type="known",
        record_size=10,
        prepend_bos=False,
        progress=False,
    )
    with pytest.warns(UserWarning, match="only 3 known facts"):
        chosen = select_facts(config, tiny_gpt2)
    assert {fact.case_id for fact in chosen} == expected_known
    unknown = select_facts(RunConfig(**{**config.to_dict(), "knowledge_type": "unknown", "record_size": 2}), tiny_gpt2)
    assert len(unknown) == 2 and not {fact.case_id for fact in unknown} & expected_known
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        everything = select_facts(
            RunConfig(**{**config.to_dict(), "knowledge_type": "all", "record_size": 5}), tiny_gpt2
        )
    assert sorted(fact.case_id for fact in everything) == sorted(fact.case_id for fact in HAND_FACTS)


def test_no_known_facts_is_a_clear_error(tiny_gpt2, tmp_path):
    facts_file = write_facts(tmp_path / "facts.json", HAND_FACTS[:2])
    ensure_split(tiny_gpt2, facts_file, tmp_path, top_k=1, prepend_bos=False)
    path = split_path(tmp_path, model_info(tiny_gpt2).name, facts_file)
    split = load_split(path)
    split.known, split.unknown = [], [0, 1]
    path.write_text(json.dumps(split.to_dict()))
    config = RunConfig(
        model_name="tiny-gpt2", facts=facts_file, output_dir=str(tmp_path), prepend_bos=False, progress=False
    )
    with pytest.raises(KisError, match="no known facts"):
        select_facts(config, tiny_gpt2)


def test_bad_top_k_is_rejected(tiny_gpt2):
    with pytest.raises(KisError, match="top_k"):
        classify_facts(tiny_gpt2, HAND_FACTS, top_k=0)


@pytest.mark.slow
def test_cli_classify_facts_writes_the_split(tmp_path, capsys):
    assert (
        main(
            [
                "classify-facts",
                "--model_name",
                "tiny-gpt2",
                "--output_dir",
                str(tmp_path),
                "--top_k",
                "2048",
                "--no_progress",
            ]
        )
        == 0
    )
    split = load_split(split_path(tmp_path, "tiny-gpt2", "counterfact-known"))
    assert len(split.known) == 436 and split.unknown == []  # top-2048 is the whole vocabulary
    assert "knows 436 of 436" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_knows_about_half_of_the_shipped_facts(smollm2):
    facts = load_facts("counterfact-known")
    split = classify_facts(smollm2, facts, top_k=1, batch_size=32)
    # Measured: 211 of 436 at top-1 (SmolLM2-135M-Instruct, Q4_1 GGUF, no BOS).
    assert 190 <= len(split.known) <= 232
    first = split.predictions[0]
    assert facts[0].subject == "United Kingdom" and first["target_token"] == " English" and first["target_rank"] == 0


def test_a_split_saved_under_the_legacy_fingerprint_is_re_keyed_not_reclassified(tiny_gpt2, tmp_path, monkeypatch):
    """A split an older kis saved (keyed on the sampled W_out fingerprint this model matches) is reused and saved
    again under the full-weight fingerprint; one of another model's legacy fingerprint is reclassified."""
    import kis_lens.classify as classify
    from kis_lens.fingerprint import legacy_fingerprint, model_fingerprint

    facts_file = write_facts(tmp_path / "facts.json", HAND_FACTS)
    split, path = ensure_split(tiny_gpt2, facts_file, tmp_path, top_k=2, prepend_bos=False)
    save_split(dataclasses.replace(split, model_fingerprint=legacy_fingerprint(tiny_gpt2)), path)
    calls = []
    real = classify.classify_facts
    monkeypatch.setattr(classify, "classify_facts", lambda *a, **k: calls.append(1) or real(*a, **k))
    again, _ = ensure_split(tiny_gpt2, facts_file, tmp_path, top_k=2, prepend_bos=False)
    assert calls == [] and again.known == split.known
    assert load_split(path).model_fingerprint == model_fingerprint(tiny_gpt2)
    save_split(dataclasses.replace(split, model_fingerprint="0123456789abcdef"), path)
    ensure_split(tiny_gpt2, facts_file, tmp_path, top_k=2, prepend_bos=False)
    assert calls == [1]
