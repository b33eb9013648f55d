"""Load, validate and sample facts in CounterFact or ROME known_1000 format."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from kis_lens.errors import KisError

# Named fact sets shipped in kis_lens/data (ROME/CounterFact release, MIT; see data/ATTRIBUTION.md).
PACKAGED_FACTS: dict[str, str] = {
    "counterfact-known": "counterfact_known_436.json",
    "known-1000": "known_1000.json",
    "counterfact-extended": "counterfact_extended.jsonl",  # kis_lens.editing.counterfact.extended_records()
}
DEFAULT_FACTS = "counterfact-known"
DEFAULT_RECORD_SIZE = 128


@dataclass(frozen=True)
class Fact:
    """One fact: a prompt template with "{}" for the subject, and its true (and counterfactual) target."""

    case_id: str
    subject: str
    prompt: str
    target_true: str
    target_new: str | None = None
    relation_id: str | None = None

    @property
    def text(self) -> str:
        """Return the prompt with the subject filled in (no target appended)."""
        return self.prompt.replace("{}", self.subject, 1)

    @property
    def subject_span(self) -> tuple[int, int]:
        """Return the character span [start, end) of the subject inside ``text``."""
        start = self.prompt.index("{}")
        return start, start + len(self.subject)

    def to_dict(self) -> dict[str, Any]:
        """Return the fact as a plain JSON-ready dict."""
        return asdict(self)


def _target_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("str")
    return str(value)


def _validate(fact: Fact, where: str) -> Fact:
    for name in ("subject", "prompt", "target_true"):
        value = getattr(fact, name)
        if value is not None and not isinstance(value, str):
            raise KisError(f"{where}: {name} must be a string, not {type(value).__name__} {value!r}")
    if not fact.subject or not fact.subject.strip():
        raise KisError(f"{where}: the subject is empty; give each fact a non-empty subject")
    if "{}" not in fact.prompt:
        literal = (
            f" (it holds the subject literally: replace {fact.subject!r} with '{{}}')"
            if fact.subject in fact.prompt
            else ""
        )
        raise KisError(
            f"{where}: prompt {fact.prompt!r} has no '{{}}' where the subject goes{literal}; "
            f"write it like '{{}} is located in'"
        )
    if not fact.target_true:
        raise KisError(f"{where}: target_true is missing or empty")
    return fact


def parse_fact(record: dict[str, Any], where: str = "fact") -> Fact:
    """Return a validated Fact from a CounterFact record or a ROME known_1000 record."""
    if not isinstance(record, dict):
        raise KisError(f"{where}: expected a JSON object, got {type(record).__name__}")
    try:
        if "requested_rewrite" in record:
            rewrite = record["requested_rewrite"]
            fact = Fact(
                case_id=str(record.get("case_id", rewrite.get("case_id", ""))),
                subject=rewrite["subject"],
                prompt=rewrite["prompt"],
                target_true=_target_text(rewrite["target_true"]),
                target_new=_target_text(rewrite.get("target_new")),
                relation_id=rewrite.get("relation_id"),
            )
        elif "template" in record and "subject" in record:
            fact = Fact(
                case_id=str(record.get("known_id", record.get("case_id", ""))),
                subject=record["subject"],
                prompt=record["template"],
                target_true=record["attribute"],
                target_new=None,
                relation_id=record.get("relation_id"),
            )
            full_prompt = record.get("prompt")
            if (
                isinstance(full_prompt, str)
                and isinstance(fact.subject, str)
                and fact.subject
                and fact.subject not in full_prompt
            ):
                raise KisError(
                    f"{where} (case {fact.case_id}): subject {fact.subject!r} is not in its prompt {full_prompt!r}; "
                    "fix the subject or the prompt of this fact"
                )
            if isinstance(full_prompt, str) and isinstance(fact.prompt, str) and "{}" in fact.prompt:
                # ROME's template can stop short of the prompt ("... the continent" vs "... the continent of"):
                # keep the prompt's ending so the fact reads the way the model was asked it.
                filled = fact.prompt.replace("{}", fact.subject, 1)
                if full_prompt.startswith(filled):
                    fact = replace(fact, prompt=fact.prompt + full_prompt[len(filled) :])
        else:
            raise KisError(
                f"{where}: not a CounterFact record (needs 'requested_rewrite') nor a known_1000 record "
                "(needs 'subject', 'template', 'attribute')"
            )
    except KeyError as missing:
        raise KisError(f"{where}: missing field {missing}") from None
    except (TypeError, AttributeError) as error:
        raise KisError(f"{where}: malformed record ({error})") from None
    return _validate(fact, f"{where} (case {fact.case_id}, subject {fact.subject!r})")


def _read_records(path: Path) -> list[tuple[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise KisError(f"cannot read facts file {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise KisError(
            f"facts file {path} is not UTF-8 text (byte {error.start}): save it as UTF-8 JSON or JSONL"
        ) from None
    if not text.strip():
        raise KisError(f"facts file {path} is empty: give a JSON list or JSONL file of facts")
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path.name} line {number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise KisError(f"{path.name} line {number}: not valid JSON ({error.msg})") from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise KisError(f"{path.name}: not valid JSON at line {error.lineno} ({error.msg})") from None
    return [(f"{path.name} record {index}", record) for index, record in enumerate(data)]


def facts_path(source: str | Path) -> Path:
    """Return the file of a packaged fact set name ("counterfact-known", "known-1000") or of an existing path."""
    if str(source) in PACKAGED_FACTS:
        return Path(str(resources.files("kis_lens") / "data" / PACKAGED_FACTS[str(source)]))
    path = Path(source)
    if not path.is_file():
        raise KisError(f"facts file {path} not found: give a JSON/JSONL path or one of {', '.join(PACKAGED_FACTS)}")
    return path


def load_facts(source: str | Path = DEFAULT_FACTS) -> list[Fact]:
    """Return all facts of a packaged set name ("counterfact-known", "known-1000") or a JSON/JSONL file."""
    path = facts_path(source)
    facts = [parse_fact(record, where) for where, record in _read_records(path)]
    if not facts:
        raise KisError(f"facts file {path} holds no facts")
    return facts


def sample_facts(facts: Sequence[Fact], record_size: int | None = DEFAULT_RECORD_SIZE, seed: int = 0) -> list[Fact]:
    """Return a seeded, reproducible sample of record_size facts (all of them when record_size is None)."""
    if record_size is None:
        return list(facts)
    if record_size < 1:
        raise KisError(f"record_size must be at least 1, got {record_size}")
    if record_size > len(facts):
        raise KisError(
            f"record_size {record_size} is larger than the {len(facts)} facts available: "
            f"use --record_size {len(facts)} or fewer, or a larger facts file"
        )
    return random.Random(seed).sample(list(facts), record_size)
