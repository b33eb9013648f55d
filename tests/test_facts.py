"""Loading, validating and sampling facts."""

from __future__ import annotations

import json

import pytest

from kis_lens.errors import KisError
from kis_lens.facts import load_facts, parse_fact, sample_facts


def test_shipped_fact_sets():
    counterfact = load_facts()
    assert len(counterfact) == 436
    uk = next(f for f in counterfact if f.subject == "United Kingdom" and "language spoken" in f.prompt)
    assert uk.text == "In United Kingdom, the language spoken is" and uk.target_true == "English"
    assert uk.target_new and uk.relation_id == "P37"
    known = load_facts("known-1000")
    assert (
        len(known) == 1209 and known[0].text == "Vinson Massif is located in the continent of"
    )  # the prompt, not the shorter template
    assert known[0].target_true == "Antarctica"


def test_sampling_is_seeded_and_reproducible():
    facts = load_facts()
    assert sample_facts(facts, 50, seed=7) == sample_facts(facts, 50, seed=7)
    assert sample_facts(facts, 50, seed=7) != sample_facts(facts, 50, seed=8)
    assert len({f.case_id for f in sample_facts(facts, 128)}) == 128
    with pytest.raises(KisError, match="record_size 500 is larger than the 436 facts available"):
        sample_facts(facts, 500)


def test_jsonl_and_json(tmp_path):
    record = {
        "case_id": 1,
        "requested_rewrite": {
            "prompt": "{} plays",
            "subject": "Messi",
            "target_true": {"str": "soccer"},
            "target_new": {"str": "tennis"},
            "relation_id": "P641",
        },
    }
    (tmp_path / "f.jsonl").write_text(json.dumps(record) + "\n\n" + json.dumps(record) + "\n")
    (tmp_path / "f.json").write_text(json.dumps([record]))
    assert len(load_facts(tmp_path / "f.jsonl")) == 2
    fact = load_facts(tmp_path / "f.json")[0]
    assert (fact.text, fact.target_true, fact.target_new) == ("Messi plays", "soccer", "tennis")


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ('{"a": 1}\n{broken\n', "line 2: not valid JSON"),
        ('[{"subject": "x"}]', "not a CounterFact record"),
        ('[{"requested_rewrite": {"prompt": "x is", "subject": "x", "target_true": {"str": "y"}}}]', "has no '{}'"),
        (
            '[{"requested_rewrite": {"prompt": "{} is", "subject": " ", "target_true": {"str": "y"}}}]',
            "subject is empty",
        ),
        ('[{"requested_rewrite": {"prompt": "{} is", "subject": "x"}}]', "missing field 'target_true'"),
        ("[]", "holds no facts"),
    ],
)
def test_bad_facts_files(tmp_path, content, message):
    path = tmp_path / ("bad.jsonl" if "\n" in content else "bad.json")
    path.write_text(content)
    with pytest.raises(KisError, match=message):
        load_facts(path)


def test_missing_file_names_the_choices(tmp_path):
    with pytest.raises(KisError, match="not found.*counterfact-known"):
        load_facts(tmp_path / "nope.json")


def test_parse_fact_rejects_non_objects():
    with pytest.raises(KisError, match="expected a JSON object"):
        parse_fact(["not", "a", "dict"])
