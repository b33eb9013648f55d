"""The one Verdict type, the layer-count words, the Markdown table, and the reproduction's verdict rules."""

from __future__ import annotations

import json

import pytest

from kis_lens.docs.reproduction import Reproduction, judge, reproduction_markdown
from kis_lens.docs.verdict import (
    DOES_NOT_REPRODUCE,
    PARTLY_REPRODUCES,
    REPRODUCES,
    Verdict,
    count_verdict,
    markdown_cell,
    verdict_table,
)
from kis_lens.errors import KisError


def test_verdict_round_trips_through_its_record():
    """to_dict is the flat JSON record (claim, verdict, evidence first, details beside them); from_dict reads it."""
    verdict = Verdict("claim", "reproduced", "evidence", {"rule": "all editors", "editors": ["rome"]})
    record = verdict.to_dict()
    assert list(record) == ["claim", "verdict", "evidence", "rule", "editors"]
    assert Verdict.from_dict(json.loads(json.dumps(record))) == verdict
    plain = Verdict("c", "v", "e")
    assert plain.to_dict() == {"claim": "c", "verdict": "v", "evidence": "e"}
    assert Verdict.from_dict({"claim": "c", "verdict": "v"}) == Verdict("c", "v", "")


@pytest.mark.parametrize(
    ("count", "total", "word"),
    [
        (3, 3, REPRODUCES),
        (2, 3, PARTLY_REPRODUCES),
        (2, 4, PARTLY_REPRODUCES),  # exactly half counts as partly
        (1, 3, DOES_NOT_REPRODUCE),
        (1, 4, DOES_NOT_REPRODUCE),
        (0, 30, DOES_NOT_REPRODUCE),
        (29, 30, PARTLY_REPRODUCES),
    ],
)
def test_count_verdict_reads_all_half_and_fewer(count, total, word):
    assert count_verdict(count, total) == word


def test_verdict_table_escapes_cells_and_takes_records_too():
    """Pipes would split a cell and a line break would end the row: both are made harmless, in claim and evidence."""
    verdicts = [Verdict("a | b", REPRODUCES, "x|y\nz"), {"claim": "plain", "verdict": "not measured", "evidence": ""}]
    assert verdict_table(verdicts, claim_header="claim") == [
        "| claim | verdict | evidence |",
        "|---|---|---|",
        r"| a \| b | **reproduces** | x\|y z |",
        "| plain | **not measured** |  |",
    ]
    assert markdown_cell(3) == "3"


def _interval(value: float, low: float, high: float) -> dict[str, float]:
    return {"value": value, "low": low, "high": high}


# One layer where every claim holds, and one where every claim fails, by a margin on each rule.
PASS = {
    "std": _interval(0.1, 0.08, 0.12),
    "mean": _interval(0.001, -0.002, 0.004),
    "kurtosis": _interval(10.0, 5.0, 20.0),
    "whitened": _interval(0.2, 0.15, 0.25),
    "p_value": 0.01,
}
FAIL = {
    "std": _interval(0.1, 0.02, 0.12),  # low 0.02 is under 3 × the noise 0.01
    "mean": _interval(0.05, 0.03, 0.07),  # excludes 0, and 0.05 > 0.25 × std 0.1
    "kurtosis": _interval(0.8, 0.5, 1.2),
    "whitened": _interval(0.09, 0.08, 0.1),  # under 2 × random 0.05
    "p_value": 0.5,
}


def _row(layer: int, numbers: dict) -> dict:
    return {
        "layer": layer,
        "condition": 10.0,
        "statistics": {
            "p": {"std": numbers["std"], "mean": numbers["mean"], "excess_kurtosis": numbers["kurtosis"]},
            "whitening": {"mean_abs": numbers["whitened"]},
        },
        "halves": {"rms": 0.02},  # noise of P from all tokens: 0.01
        "relation": {"p_value": numbers["p_value"], "same_subject_pairs_excluded": 4},
        "p_max_abs_distinct_subjects": 0.7,
        "random_mean_abs_cos": 0.05,
    }


def _report(*layers: dict, null: bool = True) -> Reproduction:
    rows = [_row(index, numbers) for index, numbers in enumerate(layers)]
    null_rows = [
        {
            "layer": row["layer"],
            "statistics": {
                "p": {"excess_kurtosis": _interval(1.0, 0.5, 2.0)},
                "whitening": {"mean_abs": _interval(0.06, 0.05, 0.1)},
            },
        }
        for row in rows
    ]
    null_model = {"name": "tiny-random-init", "layers": null_rows} if null else {}
    return Reproduction(model={}, settings={}, known={}, covariance={}, layers=rows, null_model=null_model)


CLAIMS = 5


def test_judge_reproduces_when_every_layer_passes():
    verdicts = judge(_report(PASS, PASS))
    assert [v.verdict for v in verdicts] == [REPRODUCES] * CLAIMS
    assert all("2/2 layers" in v.evidence for v in verdicts)
    assert "above the random-weight null model's interval in 2/2 layers (null model: tiny-random-init)" in (
        verdicts[2].evidence
    )
    assert "4 ordered pairs" in verdicts[3].evidence


def test_judge_says_partly_at_half_and_not_below():
    assert [v.verdict for v in judge(_report(PASS, FAIL))] == [PARTLY_REPRODUCES] * CLAIMS
    assert [v.verdict for v in judge(_report(FAIL, PASS, FAIL))] == [DOES_NOT_REPRODUCE] * CLAIMS
    assert all("1/3 layers" in v.evidence for v in judge(_report(FAIL, PASS, FAIL)))


def test_judge_rules_at_their_edges():
    """Zero-mean also passes on |mean| <= 0.25 std; whitened passes at exactly 2 x random; no null model is said."""
    edge = dict(PASS, mean=_interval(0.025, 0.02, 0.03), whitened=_interval(0.12, 0.1, 0.14))
    verdicts = judge(_report(edge, null=False))
    assert [v.verdict for v in verdicts] == [REPRODUCES] * CLAIMS
    assert verdicts[4].evidence.endswith("in 0/1 layers (no null model in this run).")
    over = dict(PASS, mean=_interval(0.026, 0.02, 0.03))
    assert judge(_report(over))[1].verdict == DOES_NOT_REPRODUCE


def test_judge_refuses_a_report_without_layers():
    with pytest.raises(KisError, match="no layer rows"):
        judge(_report())


def test_reproduction_record_round_trips_and_renders():
    """The numbers file keeps verdicts as flat records and layer keys as text; from_dict restores both."""
    report = _report(PASS, FAIL)
    report.verdicts = judge(report)
    report.top_pairs = {1: []}
    record = json.loads(json.dumps(report.to_dict()))
    assert [sorted(v) for v in record["verdicts"]] == [["claim", "evidence", "verdict"]] * CLAIMS
    assert Reproduction.from_dict(record) == report
    assert "| Its distribution is zero-mean | **partly reproduces** | the interval of mean(P)" in _rendered(report)


def _rendered(report: Reproduction) -> str:
    """Return the rendered document, with what the hand-made report lacks for it filled in."""
    report.model = {"name": "tiny", "n_layers": 2, "d_mlp": 8, "fingerprint": "f", "device": "cpu", "dtype": "float32"}
    report.settings = {"bootstrap_resamples": 10, "permutations": 10, "doc_path": "docs/reproduction.md"}
    report.known = {"n_known": 3, "n_facts": 4, "top_k": 1, "split_path": "s.json", "n_used": 3}
    report.covariance = {"max_tokens": None, "tokens_total": 8, "tokens_quarters": {"q1": 2}, "corpus": "Wikipedia."}
    for row in report.layers:
        row["statistics"]["activation"] = {"mean_abs": _interval(0.1, 0.1, 0.1)}
        row["halves"]["relative_rms"] = 0.1
        row["convergence"] = {
            f: {"p_vs_all": {"relative_rms": 0.1}, "p_std": 0.1, "p_kurtosis": 1.0, "whitening_mean_abs": 0.1}
            for f in ("1/4", "1/2", "all")
        }
        row["relation"].update(same_relation_pairs=2, same_mean_abs=0.1, other_mean_abs=0.1)
        row["relation"].update(same_share_above=0.1, other_share_above=0.1)
    for row in report.null_model["layers"]:
        row["condition"] = 5.0
    return reproduction_markdown(report)
