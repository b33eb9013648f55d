"""The one verdict type: a claim of the paper, what the measurements say of it and the evidence, as docs print it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

# The words of a verdict. Reproduction verdicts count layers (all, at least half, fewer); lifelong verdicts are
# read from runs, and "not measured" says a run the rule needs is missing.
REPRODUCES, PARTLY_REPRODUCES, DOES_NOT_REPRODUCE = "reproduces", "partly reproduces", "does not reproduce"
REPRODUCED, PARTLY_REPRODUCED, NOT_REPRODUCED = "reproduced", "partly reproduced", "not reproduced"
NOT_MEASURED, NOT_JUDGED = "not measured", "not judged"
VERDICT_KEYS = ("claim", "verdict", "evidence")


@dataclass(frozen=True)
class Verdict:
    """A claim, its verdict word(s) and the evidence; details (rule, editors, reasons, ...) are recorded beside them."""

    claim: str
    verdict: str
    evidence: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the verdict as the JSON results files record it: claim, verdict, evidence, then the details."""
        return {"claim": self.claim, "verdict": self.verdict, "evidence": self.evidence, **self.details}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Verdict:
        """Return the verdict a results file recorded (the inverse of to_dict)."""
        details = {key: value for key, value in record.items() if key not in VERDICT_KEYS}
        return cls(str(record["claim"]), str(record["verdict"]), str(record.get("evidence", "")), details)


def count_verdict(count: int, total: int) -> str:
    """Return the reproduction word for a claim that holds in count of total layers: all, at least half, fewer."""
    return REPRODUCES if count == total else (PARTLY_REPRODUCES if count >= total / 2 else DOES_NOT_REPRODUCE)


def markdown_cell(text: Any) -> str:
    """Return text safe inside a Markdown table cell: pipes escaped, line breaks as spaces."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def verdict_table(
    verdicts: Sequence[Verdict | Mapping[str, Any]], claim_header: str = "claim of the paper"
) -> list[str]:
    """Return the Markdown table of verdicts: claim | **verdict** | evidence, one row each."""
    rows = [v if isinstance(v, Verdict) else Verdict.from_dict(v) for v in verdicts]
    return [
        f"| {claim_header} | verdict | evidence |",
        "|---|---|---|",
        *(f"| {markdown_cell(v.claim)} | **{v.verdict}** | {markdown_cell(v.evidence)} |" for v in rows),
    ]
