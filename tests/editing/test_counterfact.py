"""Records built as CounterFact built its own (counterfact-extended): checked against a plain reading of ROME's
known facts, not against the builder's own output."""

from __future__ import annotations

import json
from collections import defaultdict

from kis_lens.editing.counterfact import EXTENDED_CASE_OFFSET, extended_records_text, load_cases, records_from_known
from kis_lens.facts import facts_path


def _known() -> list[dict]:
    return json.loads(facts_path("known-1000").read_text(encoding="utf-8"))


def _shipped() -> list[dict]:
    return json.loads(facts_path("counterfact-known").read_text(encoding="utf-8"))


def test_the_shipped_file_is_what_the_builder_writes():
    """counterfact_extended.jsonl is the raw output of extended_records (rebuild it when the builder changes)."""
    assert facts_path("counterfact-extended").read_text(encoding="utf-8") == extended_records_text()


def test_built_records_follow_counterfacts_recipe():
    """Each built record: a known fact of a subject the 436 never edit, target_new another object of its relation,
    neighborhood prompts of other subjects with the same relation and true object, no paraphrases."""
    known = {EXTENDED_CASE_OFFSET + fact["known_id"]: fact for fact in _known()}
    objects, holders = defaultdict(set), defaultdict(set)
    for fact in known.values():
        objects[fact["relation_id"]].add(fact["attribute"])
        holders[(fact["relation_id"], fact["attribute"])].add((fact["subject"], fact["prompt"]))
    shipped_subjects = {record["requested_rewrite"]["subject"] for record in _shipped()}
    cases = load_cases("counterfact-extended")
    built = [json.loads(line) for line in facts_path("counterfact-extended").read_text().splitlines()][436:]
    assert [case.case_id for case in cases[:436]] == [str(record["case_id"]) for record in _shipped()]
    eligible = [
        fact
        for fact in known.values()
        if fact["subject"] not in shipped_subjects and len(objects[fact["relation_id"]]) > 1
    ]
    assert len(built) == len(eligible) == len(cases) - 436 and len(cases) >= 1000
    for record in built:
        fact, rewrite = known[record["case_id"]], record["requested_rewrite"]
        assert rewrite["subject"] == fact["subject"] and rewrite["prompt"].format(fact["subject"]) == fact["prompt"]
        assert rewrite["target_true"]["str"] == fact["attribute"]
        assert rewrite["target_new"]["str"] in objects[fact["relation_id"]] - {fact["attribute"]}
        neighbours = {prompt for subject, prompt in holders[(fact["relation_id"], fact["attribute"])]}
        assert set(record["neighborhood_prompts"]) <= neighbours - {fact["prompt"]}
        assert len(record["neighborhood_prompts"]) == min(10, len(neighbours - {fact["prompt"]}))
        assert record["paraphrase_prompts"] == [] and record["generation_prompts"] == [fact["prompt"]]


def test_the_counterfactual_draw_is_seeded():
    """The same seed draws the same targets; another seed draws other ones."""
    known = _known()
    targets = lambda seed: [r["requested_rewrite"]["target_new"]["str"] for r in records_from_known(known, seed)]  # noqa: E731
    assert targets(0) == targets(0) and targets(0) != targets(1)
