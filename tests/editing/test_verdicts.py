"""Verdicts on the lifelong prediction: rank statistics, the clustered bootstrap and planted cases that flip them."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from kis_lens.editing import verdicts
from kis_lens.editing.verdicts import (
    auroc_draws,
    clustered_auroc_bootstrap,
    clustered_bootstrap,
    draws_interval,
    forgetting_auroc,
    judge_prediction_with_controls,
    partial_spearman,
    prediction_controls,
    spearman,
)
from kis_lens.errors import KisError


def _planted(case: str, n_edits: int = 60, probes: int = 5, seed: int = 1) -> dict[str, list]:
    """Return lifelong-style pairs (each edit seen at several probes) where the target follows the planted case."""
    rng = np.random.default_rng(seed)
    edit = np.repeat(np.arange(n_edits), probes)
    probe = np.tile(np.arange(1, probes + 1), n_edits)
    later_count = (n_edits - edit) // 10 + probe  # grows with later edits, tied within blocks
    later_residual_norm = np.sqrt(later_count) * (1 + 0.1 * rng.standard_normal(len(edit)))
    edit_effect = rng.standard_normal(n_edits)[edit]  # what P knows about u beyond the count: fixed per edit
    if case == "A":
        predicted = later_count * np.exp(0.8 * edit_effect)
        target = np.log(predicted) + 0.3 * rng.standard_normal(len(edit))
        shuffled = predicted[rng.permutation(len(edit))]
    elif case == "B":
        predicted = 2.0 * later_count + 1.5 * rng.standard_normal(len(edit))
        target = later_count + 0.3 * rng.standard_normal(len(edit))
        shuffled = predicted[rng.permutation(len(edit))]
    else:  # C: the shuffled null carries the same information as P
        predicted = later_count * np.exp(0.8 * edit_effect)
        target = np.log(predicted) + 0.3 * rng.standard_normal(len(edit))
        shuffled = 3.0 * predicted + 1.0  # permuting P changed nothing: same ranks as P
    return {
        "n_edits": (probe + n_edits).tolist(),
        "case_id": [f"case{u}" for u in edit],
        "edit_index": edit.tolist(),
        "predicted": predicted.tolist(),
        "later_count": later_count.tolist(),
        "later_residual_norm": later_residual_norm.tolist(),
        "predicted_shuffled": shuffled.tolist(),
        "measured_output": target.tolist(),
        "measured_logprob": target.tolist(),
    }


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 8, 200).astype(float), rng.standard_normal(200)
    y = y + 0.3 * x
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert spearman([1, 1, 1, 1], [1, 2, 3, 4]) is None
    assert spearman([1, 2], [1, 2]) is None


def test_partial_spearman_matches_the_residual_formula_and_vanishes_given_the_cause():
    rng = np.random.default_rng(0)
    control = rng.standard_normal(500)
    x = control + 0.5 * rng.standard_normal(500)
    y = x + control + 0.5 * rng.standard_normal(500)
    rx, ry, rc = (stats.rankdata(v) for v in (x, y, control))
    slope = lambda v: np.polyfit(rc, v, 1)  # noqa: E731
    expected = np.corrcoef(rx - np.polyval(slope(rx), rc), ry - np.polyval(slope(ry), rc))[0, 1]
    assert partial_spearman(x, y, control) == pytest.approx(expected, abs=1e-10)
    assert expected > 0.3
    # x and y depend only on the control (monotone in it, plus independent noise): nothing is left between them.
    x, y = np.exp(control) + 0.3 * rng.standard_normal(500), control**3 + 0.3 * rng.standard_normal(500)
    assert abs(spearman(x, y)) > 0.5
    assert abs(partial_spearman(x, y, control)) < 0.1


def test_clustered_bootstrap_interval_seed_and_clusters():
    pairs = _planted("A")
    statistic = lambda c: spearman(c["predicted"], c["measured_logprob"])  # noqa: E731
    result = clustered_bootstrap(pairs, statistic, n_boot=300, seed=3)
    assert result["low"] <= result["value"] <= result["high"]
    assert result["n_clusters"] == len(set(pairs["edit_index"])) == 60
    assert result["n_pairs"] == len(pairs["edit_index"])
    assert result == clustered_bootstrap(pairs, statistic, n_boot=300, seed=3)
    assert result != clustered_bootstrap(pairs, statistic, n_boot=300, seed=4)


def test_clustered_bootstrap_does_not_shrink_when_pairs_are_duplicated():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(40)
    y = 0.5 * x + rng.standard_normal(40)
    statistic = lambda c: spearman(c["x"], c["y"])  # noqa: E731
    single = clustered_bootstrap({"edit_index": np.arange(40), "x": x, "y": y}, statistic, n_boot=500)
    copies = {"edit_index": np.repeat(np.arange(40), 20), "x": np.repeat(x, 20), "y": np.repeat(y, 20)}
    copies["row"] = np.arange(800)
    clustered = clustered_bootstrap(copies, statistic, n_boot=500)
    naive = clustered_bootstrap(copies, statistic, cluster="row", n_boot=500)
    width = lambda r: r["high"] - r["low"]  # noqa: E731
    assert clustered["n_clusters"] == 40 and naive["n_clusters"] == 800
    assert width(clustered) > 0.7 * width(single)
    assert width(naive) < 0.5 * width(single)


def test_clustered_bootstrap_skips_and_counts_undefined_statistics():
    pairs = {"edit_index": [0, 1, 2, 3], "x": [1.0, 2.0, 3.0, 4.0]}
    result = clustered_bootstrap(pairs, lambda c: None if len(set(c["edit_index"])) < 4 else 1.0, n_boot=50)
    assert 0 < result["n_skipped"] < 50


def test_planted_case_a_is_reproduced():
    controls = prediction_controls(_planted("A"), n_boot=300)
    verdict = judge_prediction_with_controls(controls)
    assert verdict["verdict"] == "reproduced", verdict["reasons"]
    assert verdict["reasons"] == []
    assert controls["partial_given_count"]["low"] > 0


def test_planted_case_b_count_only_is_not_reproduced():
    controls = prediction_controls(_planted("B"), n_boot=300)
    verdict = judge_prediction_with_controls(controls)
    assert verdict["verdict"] == "not reproduced"
    text = " ".join(verdict["reasons"])
    assert "later_count (the number" in text
    assert "partial Spearman" in text
    assert "shuffled" not in text


def test_planted_case_c_shuffled_null_as_good_is_not_reproduced():
    controls = prediction_controls(_planted("C"), n_boot=300)
    verdict = judge_prediction_with_controls(controls)
    assert verdict["verdict"] == "not reproduced"
    assert len(verdict["reasons"]) == 1 and "shuffled null" in verdict["reasons"][0]


def test_bad_pairs_name_the_column():
    pairs = _planted("A")
    del pairs["later_count"]
    with pytest.raises(KisError, match="later_count"):
        prediction_controls(pairs, n_boot=5)
    pairs = _planted("A")
    pairs["predicted_shuffled"] = pairs["predicted_shuffled"][:-1]
    with pytest.raises(KisError, match="predicted_shuffled"):
        prediction_controls(pairs, n_boot=5)
    with pytest.raises(KisError, match="lost"):
        forgetting_auroc(_planted("A"), lost=[True, False])


def test_forgetting_auroc_against_a_pairwise_count():
    rng = np.random.default_rng(0)
    score = rng.integers(0, 5, 300).astype(float)
    lost = rng.random(300) < 0.2 + 0.1 * score
    positives, negatives = score[lost], score[~lost]
    wins = (positives[:, None] > negatives[None, :]).sum() + 0.5 * (positives[:, None] == negatives[None, :]).sum()
    expected = wins / (len(positives) * len(negatives))
    assert forgetting_auroc({"predicted": score}, lost=lost) == pytest.approx(expected, abs=1e-12)
    assert forgetting_auroc({"s": [1, 2, 3, 4]}, "s", lost=[False, False, True, True]) == 1.0
    assert forgetting_auroc({"s": [7, 7, 7, 7]}, "s", lost=[False, True, False, True]) == 0.5
    assert forgetting_auroc({"s": [1, 2, 3]}, "s", lost=[False, False, False]) is None


def pairwise_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Return the AUROC by comparing every finite positive with every finite negative (ties one half)."""
    keep = np.isfinite(scores)
    pos, neg = scores[keep & positive], scores[keep & ~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def test_auroc_draws_equal_the_auroc_of_each_resample_written_out():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, 80).astype(float)  # many ties
    scores[[4, 9]] = np.nan
    positive = rng.random(80) < 0.3
    weights = rng.integers(0, 3, size=(25, 80))
    weights[0] = 0
    weights[1] = positive  # only positives drawn: one class
    found = auroc_draws(scores, positive, weights)
    for draw, counts in enumerate(weights):
        rows = np.repeat(np.arange(80), counts)
        expected = pairwise_auroc(scores[rows], positive[rows])
        assert found[draw] == pytest.approx(expected, abs=1e-12, nan_ok=True), draw
    assert np.isnan(found[:2]).all()


def test_the_weighted_auroc_bootstrap_is_the_clustered_bootstrap_of_the_auroc():
    """Same seed, same resamples: the fast draws give clustered_bootstrap's interval of the AUROC exactly."""
    rng = np.random.default_rng(5)
    n = 400
    pairs = {
        "edit_index": rng.integers(0, 60, n),
        "score": rng.integers(0, 20, n).astype(float),
        "lost": rng.random(n) < 0.25,
    }
    slow = clustered_bootstrap(pairs, lambda c: verdicts.auroc(c["score"], c["lost"]), "edit_index", 300, seed=9)
    draws = clustered_auroc_bootstrap(pairs, ["score"], "lost", "edit_index", 300, seed=9, chunk=70)["score"]
    value = verdicts.auroc(pairs["score"], pairs["lost"])
    fast = draws_interval(value, draws, slow["n_clusters"], slow["n_pairs"])
    assert fast.keys() == slow.keys()
    for key, expected in slow.items():
        assert fast[key] == pytest.approx(expected, abs=1e-12), key


def test_collapse_sensitivity_names_the_first_step_each_criterion_holds():
    """Each perplexity ratio and each retention criterion gets its own first crossing (None: never)."""
    steps = [
        {"n_edits": 0, "perplexity": 10.0, "efficacy": None, "retention_oldest_quarter": None},
        {"n_edits": 10, "perplexity": 16.0, "efficacy": 0.9, "retention_oldest_quarter": 0.4},
        {"n_edits": 20, "perplexity": 21.0, "efficacy": 0.6, "retention_oldest_quarter": 0.3},
        {"n_edits": 30, "perplexity": 55.0, "efficacy": 0.45, "retention_oldest_quarter": 0.2},
    ]
    found = verdicts.collapse_sensitivity(steps)
    assert found == {
        "perplexity > 1.5× unedited": 10,
        "perplexity > 2× unedited": 20,
        "perplexity > 5× unedited": 30,
        "perplexity > 10× unedited": None,
        "efficacy on all edits < 0.5": 30,
        "oldest-quarter retention < 0.5": 10,
    }


def test_rho_alarm_scores_low_rho_against_the_other_alarms():
    """Low ρ before the disabling edits gives AUROC 1; a ρ that says nothing gives 0.5; no ρ, no AUROC."""
    edits = [{"rho": rho, "residual_norm": 1.0} for rho in (1.0, 0.9, 0.2, 1.1, 0.95)]
    steps = [{"n_edits": 0, "perplexity": 10.0}, {"n_edits": 3, "perplexity": 12.0}]
    alarm = verdicts.rho_alarm(edits, [{"n_edits": 3}], steps)
    assert alarm["low_rho"] == 1.0 and alarm["residual_norm"] == 0.5 and alarm["n_disabling"] == 1
    assert verdicts.rho_alarm(edits, [], steps)["low_rho"] is None  # no disabling edit: one class only
    flat = [{"rho": 1.0, "residual_norm": 1.0}] * 5
    assert verdicts.rho_alarm(flat, [{"n_edits": 3}], steps)["low_rho"] == 0.5
    assert "ROME-family" in verdicts.rho_alarm([{"rho": None}], [], steps)["note"]
