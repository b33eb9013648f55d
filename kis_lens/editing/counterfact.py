"""CounterFact evaluation cases: a fact to rewrite with its paraphrase, neighborhood and generation prompts.

A CounterFact record (ROME's ``counterfact.json``) holds ``requested_rewrite`` (the fact, with ``target_new``)
and three prompt lists: ``paraphrase_prompts`` (the same fact, reworded: should follow the edit),
``neighborhood_prompts`` (other subjects with the same true target: should not) and ``generation_prompts``
(prompts for the fluency of free generation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
