"""CounterFact evaluation cases: a fact to rewrite with its paraphrase, neighborhood and generation prompts.

A CounterFact record (ROME's ``counterfact.json``) holds ``requested_rewrite`` (the fact, with ``target_new``)
and three prompt lists: ``paraphrase_prompts`` (the same fact, reworded: should follow the edit),
``neighborhood_prompts`` (other subjects with the same true target: should not) and ``generation_prompts``
(prompts for the fluency of free generation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from kis_lens.errors import KisError
from kis_lens.facts import Fact, _read_records, facts_path, parse_fact

PROMPT_LISTS: tuple[str, ...] = ("paraphrase_prompts", "neighborhood_prompts", "generation_prompts")


@dataclass(frozen=True)
class CounterFactCase:
    """One CounterFact case: the fact to rewrite (with target_new) and the prompts its edit is judged on."""

    fact: Fact
    paraphrase_prompts: tuple[str, ...]
    neighborhood_prompts: tuple[str, ...]
    generation_prompts: tuple[str, ...]

    @property
    def case_id(self) -> str:
        """Return the case id of the fact (CounterFact's ``case_id``)."""
        return self.fact.case_id


def _prompt_list(record: dict[str, Any], name: str, where: str) -> tuple[str, ...]:
    """Return one of a record's prompt lists as a tuple of non-empty strings; KisError when missing or malformed."""
    if name not in record:
        raise KisError(
            f"{where}: no {name!r}: CounterFact evaluation needs the paraphrase, neighborhood and generation "
            "prompts of each case; use CounterFact records, e.g. counterfact-known"
        )
    value = record[name]
    if not isinstance(value, list) or not all(isinstance(prompt, str) and prompt.strip() for prompt in value):
        raise KisError(
            f"{where}: {name!r} must be a list of non-empty strings, not {value!r:.80}; "
            "use CounterFact records, e.g. counterfact-known"
        )
    return tuple(value)


def parse_case(record: Any, where: str = "case") -> CounterFactCase:
    """Return a validated CounterFactCase from one CounterFact record (requested_rewrite and the prompt lists)."""
    if not isinstance(record, dict) or "requested_rewrite" not in record:
        raise KisError(
            f"{where}: not a CounterFact record (needs 'requested_rewrite' and the prompt lists "
            f"{', '.join(PROMPT_LISTS)}); use CounterFact records, e.g. counterfact-known"
        )
    fact = parse_fact(record, where)
    if not fact.target_new:
        raise KisError(
            f"{where} (case {fact.case_id}): requested_rewrite has no target_new to edit towards; "
            "use CounterFact records, e.g. counterfact-known"
        )
    lists = [_prompt_list(record, name, f"{where} (case {fact.case_id})") for name in PROMPT_LISTS]
    return CounterFactCase(fact, *lists)


def load_cases(source: str | Path = "counterfact-known") -> list[CounterFactCase]:
    """Return the CounterFact cases of the packaged set "counterfact-known" or of a CounterFact JSON/JSONL file."""
    path = facts_path(source)
    cases = [parse_case(record, where) for where, record in _read_records(path)]
    if not cases:
        raise KisError(f"CounterFact file {path} holds no cases: use CounterFact records, e.g. counterfact-known")
    return cases


# ---------------------------------------------------------------------------------------------------------
# Records built as CounterFact built its own, from ROME's known facts (for runs longer than the 436 records)
# ---------------------------------------------------------------------------------------------------------

EXTENDED_CASE_OFFSET = 1_000_000  # built records get case_id = this + known_id (CounterFact's ids stay below)
MAX_NEIGHBORHOOD = 10  # CounterFact gives each record 10 neighborhood prompts


def records_from_known(
    known: Sequence[dict[str, Any]], seed: int = 0, exclude_subjects: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """Return CounterFact-style records of ROME's known facts, as CounterFact built its own (no paraphrases).

    target_new is drawn (seeded) from the other objects of the same relation; neighborhood prompts are the known
    prompts of other subjects that share the relation and the true object (up to 10, seeded); the one generation
    prompt is the fact's own prompt. CounterFact's paraphrases were written by people and cannot be built: the
    list is empty, so paraphrase is measured over the records that have them. Facts of a relation with a single
    object (nothing to draw a counterfactual from) and excluded subjects are left out."""
    rng = np.random.default_rng(seed)
    excluded = set(exclude_subjects)
    objects: dict[str, list[str]] = {}
    holders: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for fact in known:
        objects.setdefault(fact["relation_id"], [])
        if fact["attribute"] not in objects[fact["relation_id"]]:
            objects[fact["relation_id"]].append(fact["attribute"])
        holders.setdefault((fact["relation_id"], fact["attribute"]), []).append(fact)
    records = []
    for fact in known:
        subject, relation, true = fact["subject"], fact["relation_id"], fact["attribute"]
        others = [value for value in objects[relation] if value.strip() != true.strip()]
        if subject in excluded or not others or fact["prompt"].count(subject) != 1:
            continue
        target_new = others[int(rng.integers(len(others)))]
        neighbours = [other["prompt"] for other in holders[(relation, true)] if other["subject"] != subject]
        if len(neighbours) > MAX_NEIGHBORHOOD:
            neighbours = [neighbours[i] for i in sorted(rng.choice(len(neighbours), MAX_NEIGHBORHOOD, replace=False))]
        records.append(
            {
                "case_id": EXTENDED_CASE_OFFSET + int(fact["known_id"]),
                "requested_rewrite": {
                    "prompt": fact["prompt"].replace(subject, "{}"),
                    "relation_id": relation,
                    "subject": subject,
                    "target_new": {"str": target_new},
                    "target_true": {"str": true},
                },
                "paraphrase_prompts": [],
                "neighborhood_prompts": neighbours,
                "generation_prompts": [fact["prompt"]],
                "built_from": f"known_1000 known_id {fact['known_id']}",
            }
        )
    return records


def extended_records(seed: int = 0) -> list[dict[str, Any]]:
    """Return the 436 shipped CounterFact records, then records built from the known facts of other subjects."""
    shipped = json.loads(facts_path("counterfact-known").read_text(encoding="utf-8"))
    known = json.loads(facts_path("known-1000").read_text(encoding="utf-8"))
    edited = {record["requested_rewrite"]["subject"] for record in shipped}
    return shipped + records_from_known(known, seed=seed, exclude_subjects=edited)


def extended_records_text(seed: int = 0) -> str:
    """Return counterfact_extended.jsonl as extended_records writes it (one record per line)."""
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in extended_records(seed))
