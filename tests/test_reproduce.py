"""kis reproduce on the tiny model: budget quarters, intervals, permutation test, null model, the document."""

from __future__ import annotations

import json

import pytest
import torch

from kis_lens.docs.reproduction import Reproduction, judge, reproduction_markdown
from kis_lens.models import load_model
from kis_lens.quarters import QUARTERS, load_quarter_moments
from kis_lens.reproduce import ReproduceConfig, reproduce


@pytest.fixture(scope="module")
def reproduction(tmp_path_factory):
    """One small reproduction (every fact counts as known with top_k = the vocabulary) and where it wrote."""
    folder = tmp_path_factory.mktemp("reproduce")
    config = ReproduceConfig(
        model_name="tiny-gpt2",
        top_k=2048,
        max_tokens=6000,
        record_size=24,
        output_dir=str(folder / "results"),
        doc_path=str(folder / "docs" / "reproduction.md"),
        figures_dir=str(folder / "docs" / "figures"),
        numbers_path=str(folder / "numbers" / "reproduction_tiny-gpt2.json"),
        bootstrap_resamples=50,
        permutations=100,
        progress=False,
    )
    return reproduce(config), config, folder


@pytest.mark.slow
def test_quarters_hold_the_budget_and_merge_into_the_whole(reproduction):
    """Four disjoint quarters of about a quarter of the tokens each; together they are C's token count."""
    report, config, _ = reproduction
    quarters = load_quarter_moments(config.output_dir, load_model("tiny-gpt2"), [0], config.max_tokens)
    counts = [quarters[quarter][0].count for quarter in QUARTERS]
    assert counts == list(report.covariance["tokens_quarters"].values())
    assert sum(counts) == report.covariance["tokens_total"] >= 6000
    assert max(counts) < 0.5 * sum(counts)  # no quarter holds most of the tokens
    assert report.covariance["tokens_half1"] == counts[0] + counts[1]


@pytest.mark.slow
def test_every_layer_has_intervals_tests_convergence_and_a_null(reproduction):
    """Each per-layer number the document shows is present, and the intervals hold their point values."""
    report, _, _ = reproduction
    assert [row["layer"] for row in report.layers] == [0, 1]
    for row in report.layers:
        for matrix, names in (("p", ("mean", "std", "excess_kurtosis", "mean_abs")), ("whitening", ("mean_abs",))):
            for name in names:
                interval = row["statistics"][matrix][name]
                assert interval["low"] <= interval["value"] <= interval["high"]
        assert row["convergence"]["all"]["p_std"] == pytest.approx(row["statistics"]["p"]["std"]["value"])
        assert set(row["convergence"]) == {"1/4", "1/2", "all"} and row["halves"]["rms"] > 0
        assert 0 < row["relation"]["p_value"] <= 1 and row["condition"] > 1
    assert report.null_model["name"] == "tiny-gpt2-random-init"
    assert report.null_model["fingerprint"] != report.model["fingerprint"]
    assert [size["kind"] for size in report.model_sizes] == ["pretrained", "random init"]


@pytest.mark.slow
def test_document_and_numbers_are_written(reproduction):
    """The Markdown carries every section and the five verdicts; the JSON reloads to the same numbers."""
    report, config, _ = reproduction
    text = open(config.doc_path, encoding="utf-8").read()
    for heading in (
        "## Verdicts",
        "95% interval",
        "## Is the token budget enough?",
        "## Related facts",
        "## Null model",
        "## Superposition vs model size",
        "Fisher's excess kurtosis",
    ):
        assert heading in text
    assert len(report.verdicts) == 5 and text.count("| **") == 5
    saved = json.loads(open(config.numbers_path, encoding="utf-8").read())
    assert saved["layers"][1]["relation"] == report.layers[1]["relation"]
    assert [sorted(verdict) for verdict in saved["verdicts"]] == [["claim", "evidence", "verdict"]] * 5
    assert Reproduction.from_dict(saved).verdicts == report.verdicts == judge(Reproduction.from_dict(saved))
    # The document renders again from its numbers file alone (the wall-time steps come back in sorted order).
    again = reproduction_markdown(Reproduction.from_dict(saved))
    assert [line for line in again.splitlines() if "Wall time" not in line] == [
        line for line in text.splitlines() if "Wall time" not in line
    ]
    for figure in report.figures:
        assert figure["html"].endswith(".html") and open(figure["html"], encoding="utf-8").read(15)
        if figure["png"]:
            assert open(figure["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
            assert f"![{figure['html'].rsplit('/', 1)[1][:-5]}]" in text


@pytest.mark.slow
def test_a_rerun_reads_the_quarter_caches(reproduction):
    """The covariance is not estimated again: the rerun reports the first run's estimate time and the same C."""
    report, config, _ = reproduction
    again = reproduce(config)
    assert again.seconds["covariance (four quarters)"] == report.seconds["covariance (four quarters)"]
    assert again.layers[0]["statistics"] == report.layers[0]["statistics"]
    assert torch.isfinite(torch.tensor(again.layers[0]["halves"]["rms"]))
