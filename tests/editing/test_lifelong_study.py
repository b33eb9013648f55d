"""kis_lens.editing.lifelong_study: numbers and verdicts across lifelong runs, on synthetic runs shaped like the
<stem>.json files `kis lifelong` writes, each verdict rule flipped by a planted case and the numbers checked
against plain slow references."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats
from study_fixtures import (
    RHO_DISABLING,
    forgetting_pairs,
    make_edits,
    make_run,
    make_steps,
    nll_pairs,
    paired_run,
    rho_run,
    write_run,
)

from kis_lens.editing.lifelong_result import judged_pairs
from kis_lens.editing.lifelong_study import load_study, study
from kis_lens.editing.study_collapse import (
    RULE_COLLAPSE,
    censored_median,
    collapse_by_editor,
    collapse_rows,
    rho_alarm_rows,
    rho_alarm_verdict,
)
from kis_lens.editing.study_paired import paired_comparison
from kis_lens.editing.study_prediction import (
    forgetting_across_orders,
    forgetting_before_collapse_rows,
    forgetting_rows,
    prediction_across_orders,
    prediction_before_collapse_rows,
    prediction_rows,
)
from kis_lens.editing.study_predictors import collapse_predictors, cumulative_update_norm
from kis_lens.editing.study_runs import check_study, covariance_hash_notes, run_key
from kis_lens.editing.verdicts import PREDICTORS, judge_prediction_with_controls, prediction_controls
from kis_lens.errors import KisError

N_BOOT = 200


# ------------------------------------------------------------------------------------------------- synthetic runs


# ------------------------------------------------------------------------------------------------------- loading
def test_load_study_reads_every_layer_and_skips_checkpoints_and_legacy(tmp_path):
    runs = [make_run("alphaedit", 1, 8), make_run("rome", 1, 4), make_run("rome", 0, 4, n_edits=30)]
    for run in runs:
        write_run(tmp_path, run)
    write_run(tmp_path, make_run("memit", 0, 4), "lifelong_memit_seed0_n40_layer4_0000abcd.partial.json")
    legacy = make_run("p-rome", 0, 4)
    del legacy["settings"]["identity"]
    write_run(tmp_path, legacy, "lifelong_rome.json")
    (tmp_path / "notes.json").write_text("{}", encoding="utf-8")

    with pytest.warns(UserWarning, match="legacy"):
        loaded = load_study(tmp_path)

    assert [run_key(run) for run in loaded] == [("rome", 0, 4), ("rome", 1, 4), ("alphaedit", 1, 8)]
    assert loaded[0]["_source"] == "layer_4/lifelong_rome_seed0_n30_layer4_0000abcd.json"
    assert all(not Path(run["_source"]).is_absolute() for run in loaded)


def test_load_study_refuses_an_empty_folder_and_a_missing_one(tmp_path):
    with pytest.raises(KisError, match="no finished lifelong runs"):
        load_study(tmp_path)
    with pytest.raises(KisError, match="not a folder"):
        load_study(tmp_path / "absent")


def test_two_runs_with_one_key_are_refused_naming_both_files(tmp_path):
    write_run(tmp_path, make_run("rome", 3, 4), "lifelong_rome_seed3_n40_layer4_aaaaaaaa.json")
    write_run(tmp_path, make_run("rome", 3, 4, n_edits=50), "lifelong_rome_seed3_n50_layer4_bbbbbbbb.json")
    with pytest.raises(KisError) as error:
        load_study(tmp_path)
    message = str(error.value)
    assert "aaaaaaaa" in message and "bbbbbbbb" in message and "seed 3" in message


def test_runs_that_mix_a_setting_are_refused_listing_the_field(tmp_path):
    write_run(tmp_path, make_run("rome", 0, 4))
    write_run(tmp_path, make_run("memit", 0, 4, value_steps=25))
    with pytest.raises(KisError) as error:
        load_study(tmp_path)
    message = str(error.value)
    assert "config.value_steps: " in message and "25 in layer_4/lifelong_memit" in message and "4 in" in message

    other_slice = _with_c(make_run("memit", 1, 4), "a" * 64, tokens=106425)  # another corpus slice, one hash
    with pytest.raises(KisError, match=r"mix settings.*covariance\.4: .*106424.* in .*106425.* in "):
        check_study([_with_c(make_run("rome", 0, 4), "a" * 64), other_slice])

    newer = make_run("memit", 1, 4)
    newer["settings"]["identity"]["kis_lens_version"] = "0.3.0"
    with pytest.raises(KisError, match="kis_lens_version"):
        check_study([make_run("rome", 0, 4), newer])


def _with_c(run: dict[str, Any], digest: str, key: str = "sha256", layer: str = "4", **entry: Any) -> dict[str, Any]:
    """Return run with layer's C recorded as kis lifelong records it: file, texts, tokens and one hash (key)."""
    recorded = {"file": f"layer_{layer}_mom2.safetensors", "texts": 962, "tokens": 106424, **entry, key: digest}
    run["settings"]["identity"]["covariance"][layer] = recorded
    return run


FILE_HASH_A, FILE_HASH_B = "a12c209f18aea9f237b4fd637216349147056713ba4dd186cf48b445d5754c2d", "0f" * 32


def test_runs_of_one_corpus_slice_with_other_c_hashes_are_accepted_and_noted():
    """Another hash of the same C (file, texts, tokens agree) is no conflict; the note names each hash and its runs."""
    runs = [
        _with_c(make_run("rome", 0, 4), FILE_HASH_A),
        _with_c(make_run("memit", 0, 4), FILE_HASH_A),
        _with_c(make_run("p-rome", 0, 4), FILE_HASH_B),
    ]
    accepted = check_study(runs)
    assert [run_key(run) for run in accepted] == [("rome", 0, 4), ("p-rome", 0, 4), ("memit", 0, 4)]
    (note,) = covariance_hash_notes(runs)
    assert note == (
        "The runs read layer 4's C from the same corpus slice (`layer_4_mom2.safetensors`, 962 texts, 106424 tokens) "
        "but record other hashes of it: file hash a12c209f18ae in rome seed 0 layer 4, memit seed 0 layer 4; "
        "file hash 0f0f0f0f0f0f in p-rome seed 0 layer 4. The safetensors library writes a file's header in a random "
        "order, so one C written twice has two file hashes and a file hash cannot tell whether two Cs are equal; kis "
        "now records a content hash (content_sha256) instead."
    )
    same = [_with_c(make_run("rome", seed, 4), FILE_HASH_A) for seed in range(3)]
    assert covariance_hash_notes(check_study(same)) == []


def test_a_content_hash_beside_file_hashes_and_differing_content_hashes_are_noted_apart():
    """A run of this kis (content_sha256) beside older runs (sha256) is accepted; only content hashes that differ say
    the contents differ."""
    newer = _with_c(make_run("alphaedit", 1, 4), "c0" * 32, key="content_sha256")
    runs = check_study([_with_c(make_run("rome", 0, 4), FILE_HASH_A), newer])
    (note,) = covariance_hash_notes(runs)
    assert "file hash a12c209f18ae in rome seed 0 layer 4; content hash c0c0c0c0c0c0 in alphaedit seed 1" in note
    assert "random order" in note
    contents = [_with_c(make_run("rome", seed, 4), f"{seed}e" * 32, key="content_sha256") for seed in (1, 2)]
    (note,) = covariance_hash_notes(check_study(contents))
    assert "content hash 1e1e1e1e1e1e in rome seed 1 layer 4; content hash 2e2e2e2e2e2e in rome seed 2" in note
    assert "Their contents (values or metadata) differ" in note and "random order" not in note
    alike = [_with_c(make_run("rome", 1, 4), "ab" * 32), _with_c(make_run("rome", 2, 4), "ab" * 31 + "cd")]
    (note,) = covariance_hash_notes(check_study(alike))  # hashes alike in their first 12 digits are still two
    assert "file hash abababababab in rome seed 1 layer 4; file hash abababababab in rome seed 2 layer 4" in note
    other_slice = _with_c(make_run("rome", 3, 4), "c0" * 32, key="content_sha256", texts=961)
    with pytest.raises(KisError, match=r"covariance\.4: .*962.* in .*961.* in "):
        check_study([newer, other_slice])


def test_the_varying_settings_and_what_follows_them_do_not_count_as_mixed():
    memit = make_run("memit", 1, 8, n_edits=25)  # other editor, seed, layer, size, templates, covariance layers
    memit["settings"]["identity"]["covariance"]["6"] = {"file": "layer_6_mom2.safetensors", "sha256": "cov6"}
    runs = check_study([make_run("rome", 0, 4), memit, make_run("none", 0, 8)])
    assert [run_key(run) for run in runs] == [("rome", 0, 4), ("memit", 1, 8), ("none", 0, 8)]

    other_templates = make_run("memit", 0, 4)
    other_templates["settings"]["identity"]["templates"] = {"rome": ["{}"]}
    with pytest.raises(KisError, match=r"templates \(seed 0\)"):
        check_study([make_run("rome", 0, 4), other_templates])


def test_run_key_and_a_run_without_its_settings():
    assert run_key(make_run("p-rome", 5, 12)) == ("p-rome", 5, 12)
    with pytest.raises(KisError, match="settings.config.seed"):
        run_key({"editor": "rome", "settings": {"config": {"layer": 4}}})


# ------------------------------------------------------------------------------------------------------ collapse
def test_collapse_rows_list_each_run():
    run = make_run(
        "rome",
        2,
        4,
        collapse=30,
        summary={
            "disabling_edits": [{"n_edits": 25}, {"n_edits": 12}],
            "collapse_sensitivity": {"perplexity > 1.5× unedited": 20, "oldest-quarter retention < 0.5": None},
        },
    )
    row = collapse_rows([run, make_run("none", 2, 4, summary={"collapse_sensitivity": None})])[0]
    assert row["edits_made"] == 40 and row["collapse_step"] == 30 and row["first_disabling_edit"] == 12
    assert row["collapse_sensitivity"] == {"perplexity > 1.5× unedited": 20, "oldest-quarter retention < 0.5": None}
    assert row["wall_hours"] == pytest.approx(2.0)


@pytest.mark.parametrize(
    "observations, expected",
    [
        ([(30, True), (10, True), (20, True)], {"median": 20.0, "median_above": None}),
        ([(10, True), (20, True), (30, True), (40, True)], {"median": 25.0, "median_above": None}),
        ([(10, True), (20, True), (100, False)], {"median": 20.0, "median_above": None}),
        ([(10, True), (100, False), (100, False)], {"median": None, "median_above": 100.0}),
        ([(5, False), (10, True), (20, True)], {"median": None, "median_above": 10.0}),  # the 5 may be a 30
        ([(20, True), (20, False), (40, True)], {"median": None, "median_above": 20.0}),
        ([], {"median": None, "median_above": None}),
    ],
)
def test_censored_median_by_hand(observations, expected):
    assert censored_median(observations) == expected


def test_censored_median_is_exact_or_a_lower_bound_of_every_completion():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 8))
        times = rng.integers(1, 12, n)
        collapsed = rng.random(n) < 0.6
        found = censored_median(list(zip(times.tolist(), collapsed.tolist())))
        completions = [
            np.median(np.where(collapsed, times, times + rng.integers(1, 20, n))) for _ in range(40)
        ]  # a censored run collapses (if ever) after its edit count
        if found["median"] is not None:
            assert all(value == found["median"] for value in completions)
        else:
            assert all(value >= found["median_above"] for value in completions)


def test_collapse_verdict_flips_with_the_orders_that_collapse():
    every = [make_run("rome", seed, 4, collapse=step) for seed, step in enumerate((30, 10, 20))]
    some = [make_run("memit", seed, 4, collapse=step) for seed, step in enumerate((30, None, 20))]
    never = [make_run("alphaedit", seed, 4, n_edits=n) for seed, n in enumerate((40, 35, 40))]
    nothing = [make_run("none", seed, 4) for seed in range(3)]
    rows = {row["editor"]: row for row in collapse_by_editor(every + some + never + nothing)}

    assert rows["rome"]["verdict"] == "collapses in every order"
    assert (rows["rome"]["median"], rows["rome"]["min"], rows["rome"]["max"]) == (20.0, 10, 30)
    assert rows["memit"]["verdict"] == "collapses in 2 of 3 orders"
    assert rows["memit"]["median"] == 30.0  # 20, 30 collapsed; the uncollapsed run (40 edits) ranks above both
    assert rows["alphaedit"]["verdict"] == "no collapse within 35 edits in any order"
    assert rows["alphaedit"]["median"] is None and rows["alphaedit"]["median_above"] == 40.0
    assert rows["none"]["verdict"] == "no weight moved: not judged"
    assert [row["editor"] for row in collapse_by_editor(every + some + never + nothing)] == [
        "rome",
        "memit",
        "alphaedit",
        "none",
    ]


def test_collapse_is_judged_per_layer():
    runs = [make_run("rome", 0, 4, collapse=20), make_run("rome", 0, 8), make_run("rome", 1, 8, collapse=15)]
    rows = {row["layer"]: row for row in collapse_by_editor(runs)}
    assert rows[4]["verdict"] == "collapses in 1 of 1 order" and rows[4]["n_orders"] == 1
    assert rows[8]["verdict"] == "collapses in 1 of 2 orders"


def test_every_order_needs_three_orders_that_all_collapse():
    two = [make_run("rome", seed, 4, collapse=20) for seed in range(2)]
    assert collapse_by_editor(two)[0]["verdict"] == "collapses in 2 of 2 orders"
    three = two + [make_run("rome", 2, 4, collapse=30)]
    assert collapse_by_editor(three)[0]["verdict"] == "collapses in every order"


def test_rho_alarm_rows_only_for_runs_with_rho():
    rows = rho_alarm_rows([rho_run(0, False), make_run("memit", 0, 4)], n_boot=N_BOOT)
    assert [(row["editor"], row["n_disabling"], row["low_rho"]) for row in rows] == [("rome", 6, 1.0)]


def test_rho_alarm_verdict_flips_when_a_control_read_reversed_flags_the_edits_too():
    unrelated, reversed_residual = rho_alarm_rows([rho_run(0, False), rho_run(1, True)], n_boot=N_BOOT)
    assert unrelated["verdict"] == "low ρ singles them out" and unrelated["matched_by"] == []
    assert unrelated["gaps"]["residual_norm"]["low"] > 0
    assert reversed_residual["residual_norm"] == 0.0  # the summary's AUROC as written: lowest for the disabling
    assert reversed_residual["verdict"] == "a control flags them as well"
    assert reversed_residual["matched_by"] == ["residual_norm"]

    disabling = [index in RHO_DISABLING for index in range(60)]
    area = slow_auroc([edit["residual_norm"] for edit in rho_run(0, False)["edits"]], disabling)
    expected = 1.0 - max(area, 1.0 - area)  # low ρ's AUROC is 1: the disabling edits have the lowest ρ
    assert unrelated["gaps"]["residual_norm"]["value"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "low_rho, residual_low, verdict, matched_by",
    [
        (0.998, 0.1, "low ρ singles them out", []),
        (0.998, -0.02, "a control flags them as well", ["residual_norm"]),
        (0.998, None, "a control flags them as well", ["residual_norm"]),  # no interval: not shown to be better
        (0.4, 0.1, "low ρ does not flag them", []),
        (None, 0.1, "not judged", []),  # no disabling edit
    ],
)
def test_rho_alarm_verdict_needs_every_gap_above_zero(low_rho, residual_low, verdict, matched_by):
    gaps = {"residual_norm": {"low": residual_low}, "previous_probe_perplexity": {"low": 0.2}}
    assert rho_alarm_verdict(low_rho, gaps) == {"verdict": verdict, "matched_by": matched_by}


# ---------------------------------------------------------------------------------------------------- prediction
def test_prediction_rows_take_the_summary_as_written():
    controls = {"difference": {}, "marker": "kept as written"}
    pairs = {
        "edit_index": [0, 1, 2, 2, 3],
        "later_same_subject": [1, 0, 0, 0, 0],
        "predicted": [0.1] * 5,
    }
    run = make_run(
        "p-rome",
        0,
        4,
        pairs=pairs,
        summary={
            "prediction_controls": controls,
            "prediction_verdict": {"verdict": "reproduced", "reasons": []},
            "repeated_subjects": {"edits": [5], "pairs_left_out": 1},
        },
    )
    row = prediction_rows([run])[0]
    assert row["verdict"] == "reproduced" and row["prediction_controls"] == controls
    assert row["n_edits_judged"] == 3  # edit 0 is edited again later: left out
    assert row["repeated_subjects"] == {"edits": [5], "pairs_left_out": 1}
    assert row["output_correlation"]["spearman"] == 0.98
    assert row["output_correlation_note"].startswith("listed, not judged")


def judged_run(editor: str, seed: int, verdict: str, gap: float | None, layer: int = 4) -> dict[str, Any]:
    """Return a run whose summary holds a P-prediction verdict and its Spearman gap of P over the count."""
    controls = {"difference": {"later_count": {"value": gap, "low": None, "high": None}}}
    verdict_entry = {"verdict": verdict, "reasons": []}
    return make_run(editor, seed, layer, summary={"prediction_controls": controls, "prediction_verdict": verdict_entry})


def test_prediction_across_orders_needs_every_one_of_three_orders():
    gaps = {0: 0.21, 1: 0.16, 2: 0.05}
    runs = [judged_run("memit", seed, "reproduced", gap) for seed, gap in gaps.items()]
    runs += [judged_run("rome", seed, "not reproduced", -0.1 * (seed + 1)) for seed in range(2)]
    runs += [judged_run("none", 0, "not judged", None)]
    rows = {row["editor"]: row for row in prediction_across_orders(prediction_rows(runs))}

    assert set(rows) == {"memit", "rome"}  # a run that was not judged is no order of its editor
    assert rows["memit"]["verdict"] == "reproduced in every order" and rows["memit"]["seeds"] == [0, 1, 2]
    assert rows["memit"]["gap_median"] == 0.16 and (rows["memit"]["gap_min"], rows["memit"]["gap_max"]) == (0.05, 0.21)
    assert rows["rome"]["verdict"] == "reproduced in no order" and rows["rome"]["gap_median"] == pytest.approx(-0.15)

    flipped = [judged_run("memit", 2, "not reproduced", -0.01) if index == 2 else run for index, run in enumerate(runs)]
    (memit,) = [row for row in prediction_across_orders(prediction_rows(flipped)) if row["editor"] == "memit"]
    assert memit["verdict"] == "reproduced in 2 of 3 orders" and memit["n_holding"] == 2
    two_orders = prediction_across_orders(prediction_rows(runs[:2]))[0]
    assert two_orders["verdict"] == "reproduced in 2 of 2 orders"  # every order, but fewer than three


def test_forgetting_across_orders_reads_each_runs_auroc_gap_per_layer():
    rows = [
        {"editor": "rome", "seed": 0, "layer": 4, "verdict": "P beats the count", "difference": {"value": 0.1}},
        {
            "editor": "rome",
            "seed": 1,
            "layer": 4,
            "verdict": "P does not beat the count",
            "difference": {"value": -0.2},
        },
        {"editor": "rome", "seed": 0, "layer": 8, "verdict": "not judged", "difference": None},
    ]
    (found,) = forgetting_across_orders(rows)
    assert (found["layer"], found["verdict"], found["n_orders"]) == (4, "P beats the count in 1 of 2 orders", 2)
    assert found["gap_median"] == pytest.approx(-0.05)


# ---------------------------------------------------------------------------------------------------- forgetting
def slow_auroc(scores: list[float], positive: list[bool]) -> float:
    """Return the AUROC by comparing every positive with every negative (ties count one half)."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_forgetting_verdict_flips_with_what_the_lost_edits_track():
    failed_first = {5, 17}  # these edits never succeeded: their rows are no forgetting
    edits = make_edits(40, succeeded=lambda index: index not in failed_first)
    by_p = make_run("rome", 0, 4, edits=edits, pairs=forgetting_pairs("P"))
    by_count = make_run("rome", 1, 4, edits=edits, pairs=forgetting_pairs("count"))
    rows = forgetting_rows([by_p, by_count], n_boot=N_BOOT)

    assert rows[0]["verdict"] == "P beats the count"
    assert rows[0]["difference"]["low"] > 0
    assert rows[1]["verdict"] == "P does not beat the count"
    assert rows[1]["difference"]["high"] < 0

    pairs = forgetting_pairs("P")
    keep = [
        row
        for row, u in enumerate(pairs["edit_index"])
        if pairs["later_same_subject"][row] == 0 and u not in failed_first
    ]
    lost = [not pairs["success_now"][row] for row in keep]
    assert rows[0]["n_pairs"] == len(keep) and rows[0]["n_lost"] == sum(lost)
    assert rows[0]["n_kept"] == len(keep) - sum(lost) and rows[0]["n_edits"] == 40 - 1 - len(failed_first)
    for name in PREDICTORS:
        expected = slow_auroc([pairs[name][row] for row in keep], lost)
        assert rows[0]["auroc"][name]["value"] == pytest.approx(expected, abs=1e-12)
        assert rows[0]["auroc"][name]["n_clusters"] == rows[0]["n_edits"]
    expected_gap = slow_auroc([pairs["predicted"][row] for row in keep], lost) - slow_auroc(
        [pairs["later_count"][row] for row in keep], lost
    )
    assert rows[0]["difference"]["value"] == pytest.approx(expected_gap, abs=1e-12)


def test_forgetting_is_not_judged_without_both_classes_or_without_a_moved_weight():
    pairs = forgetting_pairs("P")
    pairs["success_now"] = [True] * len(pairs["success_now"])
    rows = forgetting_rows([make_run("rome", 0, 4, pairs=pairs), make_run("none", 0, 4, pairs=pairs)], n_boot=10)
    assert rows[0]["verdict"] == "not judged" and rows[0]["auroc"] is None and rows[0]["n_lost"] == 0
    assert rows[1]["verdict"] == "not judged" and rows[1]["reasons"] == ["no weight moved"]
    assert forgetting_rows([make_run("rome", 0, 4)], n_boot=10) == []  # no pairs


# ------------------------------------------------------------------------------------------------ before collapse
def slow_before(pairs: dict[str, list[Any]], collapse: int) -> dict[str, list[Any]]:
    """Return the pairs of probes before the collapse whose subject is never edited again, row by row."""
    keep = [row for row in range(len(pairs["n_edits"])) if pairs["n_edits"][row] < collapse]
    keep = [row for row in keep if pairs["later_same_subject"][row] == 0]
    return {name: [column[row] for row in keep] for name, column in pairs.items()}


def test_before_collapse_the_prediction_is_judged_on_the_earlier_probes_only():
    pairs = nll_pairs(collapse=30)
    collapsed = make_run("rome", 0, 4, collapse=30, pairs=pairs)
    everything = prediction_controls(judged_pairs(pairs), "measured_logprob", N_BOOT, 0)
    assert judge_prediction_with_controls(everything)["verdict"] == "not reproduced"  # the collapse swamps P

    steady = make_run("memit", 0, 4, pairs=nll_pairs(collapse=99))
    rows = prediction_before_collapse_rows([collapsed, steady, make_run("none", 0, 4, pairs=pairs)], n_boot=N_BOOT)
    assert len(rows) == 1  # a run that never collapsed is judged on all its probes; `none` moves nothing
    (row,) = rows
    assert (row["editor"], row["collapse_step"], row["verdict"]) == ("rome", 30, "reproduced")
    early = slow_before(pairs, 30)
    assert row["n_edits_judged"] == len(set(early["edit_index"])) == 20 - 1  # probe 20's edits but edit 3
    for name in PREDICTORS:
        expected = stats.spearmanr(early[name], early["measured_logprob"]).statistic
        assert row["prediction_controls"]["spearman"][name]["value"] == pytest.approx(expected, abs=1e-12)
    assert row["prediction_controls"]["spearman"]["predicted"]["n_clusters"] == 19


def test_before_collapse_the_lost_edits_are_judged_on_the_earlier_probes_only():
    pairs = forgetting_pairs("P")
    (row,) = forgetting_before_collapse_rows([make_run("rome", 0, 4, collapse=30, pairs=pairs)], n_boot=N_BOOT)
    early = slow_before(pairs, 30)
    lost = [not success for success in early["success_now"]]
    assert (row["collapse_step"], row["n_pairs"], row["n_lost"]) == (30, len(lost), sum(lost))
    for name in PREDICTORS:
        assert row["auroc"][name]["value"] == pytest.approx(slow_auroc(early[name], lost), abs=1e-12)
    assert row["verdict"] == "P beats the count"


def test_before_collapse_too_few_edits_are_not_judged_and_old_pairs_are_refused():
    early_collapse = make_run("rome", 0, 4, collapse=10, pairs=nll_pairs(collapse=10))  # no probe before it
    (prediction,) = prediction_before_collapse_rows([early_collapse], n_boot=N_BOOT)
    assert prediction["verdict"] == "not judged" and prediction["reasons"] == [
        "0 earlier edits judged before the collapse (< 5)"
    ]
    four = make_run("rome", 0, 4, collapse=20, pairs=_only_edits(forgetting_pairs("P"), 4))  # lost and kept
    (forgetting,) = forgetting_before_collapse_rows([four], n_boot=N_BOOT)
    assert forgetting["verdict"] == "not judged" and "(< 5)" in forgetting["reasons"][0]

    old = nll_pairs(collapse=30)
    del old["n_edits"]
    with pytest.raises(KisError, match="lack n_edits"):
        prediction_before_collapse_rows([make_run("rome", 0, 4, collapse=30, pairs=old)], n_boot=N_BOOT)


def _only_edits(pairs: dict[str, list[Any]], n: int) -> dict[str, list[Any]]:
    """Return the pairs of the first n earlier edits whose subject is never edited again, lost and kept alike."""
    keep = [row for row, u in enumerate(pairs["edit_index"]) if u < n + 1 and pairs["later_same_subject"][row] == 0]
    return {name: [column[row] for row in keep] for name, column in pairs.items()}


# ------------------------------------------------------------------------------------------ predictors of collapse
def slow_cumulative_norm(edits: list[dict[str, Any]], n_edits: int) -> float:
    """Return Σ‖ΔW‖ over the updates all of whose edits are among the first n_edits, by a plain loop."""
    total = 0.0
    for update in sorted({edit["update"] for edit in edits}):
        members = [index for index, edit in enumerate(edits) if edit["update"] == update]
        if max(members) < n_edits:
            total += edits[members[0]]["update_delta_norm"]
    return total


@pytest.mark.parametrize("batch", [1, 16])
def test_cumulative_update_norm_counts_each_update_once(batch):
    edits = make_edits(70, batch=batch, norm=lambda update: 1.0 + update**0.5)
    for n in (0, 1, 15, 16, 17, 48, 64, 70):
        assert cumulative_update_norm(edits, n) == pytest.approx(slow_cumulative_norm(edits, n))
    assert cumulative_update_norm(make_edits(32, batch=16, norm=2.0), 20) == 2.0


COLLAPSES = (20, 30, 45, 60, 80, 100)


def predictor_runs(signal: bool, collapses: tuple[int, ...] = COLLAPSES) -> list[dict[str, Any]]:
    """Return collapsing runs whose ΣP² reaches 1 at collapse (signal) or only grows with the count (no signal)."""
    runs = []
    for seed, collapse in enumerate(collapses):
        n_edits = collapse + 10
        p2 = (lambda n, c=collapse: n / c) if signal else (lambda n: 0.01 * n)
        steps = make_steps(n_edits, every=5, accumulated_p2=p2, perplexity=lambda n, s=seed: 20.0 + n + s)
        edits = make_edits(n_edits, norm=lambda update, s=seed: 1.0 + 0.1 * s)
        runs.append(make_run("rome", seed, 4, n_edits=n_edits, collapse=collapse, steps=steps, edits=edits))
    return runs


def test_collapse_predictors_flip_with_where_the_signal_lies():
    found = collapse_predictors([*predictor_runs(True), make_run("none", 0, 8, collapse=None)], n_boot=N_BOOT)
    assert found["n_runs"] == len(COLLAPSES) and not found["too_few"] and found["note"] is None
    assert found["n_steps"] == sum(len(range(5, c, 5)) for c in COLLAPSES)  # 0 < n_edits < collapse
    p2 = found["predictors"]["accumulated_p2"]
    assert p2["beats_n_edits"] is True and p2["abs_spearman_minus_n_edits"]["low"] > 0
    assert p2["spearman"]["value"] < 0 and p2["spearman"]["n_clusters"] == len(COLLAPSES)
    # ΣP² at the last step before collapse is 1 − 5/c in every run; the count there is c − 5
    assert [item["value"] for item in p2["at_last_step_before_collapse"]] == pytest.approx(
        [1 - 5 / c for c in COLLAPSES]
    )
    count = found["predictors"]["n_edits"]
    assert count["abs_spearman_minus_n_edits"] is None and count["beats_n_edits"] is None
    assert p2["variation_at_last_step"] < 0.2 < count["variation_at_last_step"]
    kappa = found["predictors"]["condition_number"]  # 3 + 0.01·n: the offset hides the spread of its rise
    assert kappa["variation_at_last_step"] < 0.2 < kappa["variation_of_rise_at_last_step"]
    assert [item["rise"] for item in kappa["at_last_step_before_collapse"]] == pytest.approx(
        [0.01 * (c - 5) for c in COLLAPSES]
    )
    assert count["variation_of_rise_at_last_step"] == pytest.approx(count["variation_at_last_step"])
    last = found["predictors"]["previous_perplexity"]["at_last_step_before_collapse"]
    assert [item["value"] for item in last] == [20.0 + (c - 10) + seed for seed, c in enumerate(COLLAPSES)]
    norms = found["predictors"]["cumulative_update_norm"]["at_last_step_before_collapse"]
    assert [item["value"] for item in norms] == pytest.approx(
        [(c - 5) * (1 + 0.1 * s) for s, c in enumerate(COLLAPSES)]
    )

    flat = collapse_predictors(predictor_runs(False), n_boot=N_BOOT)["predictors"]["accumulated_p2"]
    assert flat["beats_n_edits"] is False  # the same ranks as the count: the difference is 0 on every resample
    assert flat["abs_spearman_minus_n_edits"]["value"] == pytest.approx(0.0)


def test_collapse_predictors_with_too_few_runs_judge_nothing():
    found = collapse_predictors(predictor_runs(True, (20, 40, 60)), n_boot=20)
    assert found["too_few"] is True and "cannot separate the predictors" in found["note"]
    assert all(item["beats_n_edits"] is None for item in found["predictors"].values())
    assert found["n_runs"] == 3
    for item in found["predictors"].values():  # listed without an interval: resampling 3 runs says nothing
        assert item["spearman"]["value"] is not None and item["spearman"]["low"] is item["spearman"]["high"] is None


# ------------------------------------------------------------------------------------------------ paired editors


def test_paired_verdict_flips_when_one_order_collapses_earlier():
    rome = [paired_run("rome", seed, step) for seed, step in enumerate((10, 20, 30))]
    later = [paired_run("alphaedit", 0, 15), paired_run("alphaedit", 1, None), paired_run("alphaedit", 2, 35)]
    layer = paired_comparison(rome + later)["layers"][0]
    assert layer["verdict"] == "alphaedit holds longer in every order"
    assert layer["a_collapses_later"] == 3 and layer["n_orders"] == 3

    one_earlier = [paired_run("alphaedit", 0, 15), paired_run("alphaedit", 1, None), paired_run("alphaedit", 2, 25)]
    layer = paired_comparison(rome + one_earlier)["layers"][0]
    assert layer["verdict"] == "mixed: 2 of 3 orders"
    assert [order["collapse_outcome"] for order in layer["orders"]] == ["later", "later", "earlier"]


def test_paired_orders_where_neither_collapses_are_judged_by_efficacy():
    rome = [paired_run("rome", seed, None, efficacy=0.6) for seed in range(3)]
    ahead = [paired_run("alphaedit", seed, None, efficacy=0.8) for seed in range(3)]
    assert paired_comparison(rome + ahead)["layers"][0]["verdict"] == "alphaedit holds longer in every order"
    behind = [*ahead[:2], paired_run("alphaedit", 2, None, efficacy=0.5)]
    layer = paired_comparison(rome + behind)["layers"][0]
    assert layer["verdict"] == "mixed: 2 of 3 orders" and layer["a_collapses_later"] == 0
    assert layer["orders"][2]["last_common_n_edits"] == 40 and layer["orders"][2]["efficacy_a"] == 0.5


def test_paired_comparison_needs_two_orders_and_a_run_that_ends_early_decides_nothing():
    single = paired_comparison([paired_run("rome", 0, 10), paired_run("alphaedit", 0, None)])["layers"][0]
    assert single["verdict"] == "not judged" and single["orders"][0]["favours_a"] is True

    short = paired_run("alphaedit", 1, None, n_edits=20)  # ends before rome's collapse at 30
    layer = paired_comparison(
        [paired_run("rome", 0, 10), paired_run("alphaedit", 0, None), paired_run("rome", 1, 30), short]
    )["layers"][0]
    assert layer["orders"][1]["collapse_outcome"] == "undecided" and layer["verdict"] == "mixed: 1 of 2 orders"
    assert layer["orders"][1]["last_common_n_edits"] == 20


def test_paired_differences_by_hand():
    rome = [paired_run("rome", seed, None, efficacy=0.5) for seed in range(3)]
    alpha = [
        paired_run("alphaedit", seed, None, efficacy=value, perplexity=lambda n, s=seed: 20.0 + n - 2 * s)
        for seed, value in enumerate((0.7, 0.4, 0.9))
    ]
    alpha.append(paired_run("alphaedit", 7, None))  # no rome partner
    layer = paired_comparison([*rome, *alpha])["layers"][0]
    efficacy = {row["n_edits"]: row for row in layer["by_metric"]["efficacy"]}
    assert sorted(efficacy) == [10, 20, 30, 40]  # step 0 measures no efficacy
    row = efficacy[40]
    assert [item["difference"] for item in row["differences"]] == pytest.approx([0.2, -0.1, 0.4])
    assert row["mean"] == pytest.approx(0.5 / 3) and row["min"] == pytest.approx(-0.1) and row["max"] == 0.4
    assert row["a_better"] == 2 and row["n_orders"] == 3
    perplexity = {row["n_edits"]: row for row in layer["by_metric"]["perplexity"]}[40]
    # rome's perplexity is 20 + n; alphaedit's 20 + n − 2·seed: lower in orders 1 and 2 (lower is better)
    assert [item["difference"] for item in perplexity["differences"]] == [0.0, -2.0, -4.0]
    assert perplexity["a_better"] == 2
    assert layer["unpaired"] == ["alphaedit seed 7"]


def test_paired_comparison_keeps_layers_apart():
    runs = [paired_run("rome", seed, 10) for seed in range(2)] + [paired_run("alphaedit", s, 20) for s in range(2)]
    other = [make_run("rome", 0, 8, collapse=30), make_run("alphaedit", 0, 8, collapse=20)]
    layers = paired_comparison(runs + other)["layers"]
    assert [(item["layer"], item["verdict"]) for item in layers] == [
        (4, "alphaedit holds longer in every order"),
        (8, "not judged"),
    ]
    # A layer where only one of the two editors ran has nothing to pair: it is left out, not "not judged".
    only_rome = [make_run("rome", 0, 12, collapse=30)]
    assert [item["layer"] for item in paired_comparison(runs + other + only_rome)["layers"]] == [4, 8]


def success_pairs(n_edits: int, succeeds: Any) -> dict[str, list[Any]]:
    """Return pairs at probes 10, 20, …: every earlier edit u < n - 1 with success_now = succeeds(u, n)."""
    rows: dict[str, list[Any]] = {"n_edits": [], "edit_index": [], "success_now": []}
    for n in range(10, n_edits + 1, 10):
        for u in range(n - 1):
            rows["n_edits"].append(n)
            rows["edit_index"].append(u)
            rows["success_now"].append(bool(succeeds(u, n)))
    return rows


def slow_paired_mean(runs: list[tuple[dict, dict]], n: int, counted: Any) -> float:
    """Return the mean over orders' edits u of A's success minus B's at probe n, by plain loops."""
    differences = []
    for a, b in runs:
        found_b = {}
        for at, u, s in zip(*(b["pairs"][k] for k in ("n_edits", "edit_index", "success_now"))):
            if at == n:
                found_b[u] = s
        for at, u, s in zip(*(a["pairs"][k] for k in ("n_edits", "edit_index", "success_now"))):
            if at == n and counted(u, n) and u in found_b:
                differences.append(float(s) - float(found_b[u]))
    return sum(differences) / len(differences)


def test_paired_edits_compare_each_earlier_edit_under_both_editors():
    """AlphaEdit keeps every edit; ROME loses the oldest ones (order 0) or every third (order 1): the per-edit
    differences, pooled over the orders, against a plain loop; and the interval flips sign with the editors."""
    losing = {0: lambda u, n: u >= n // 3, 1: lambda u, n: u % 3 != 0}
    pairs = {
        (editor, seed): success_pairs(40, (lambda u, n: True) if editor == "alphaedit" else losing[seed])
        for editor in ("alphaedit", "rome")
        for seed in (0, 1)
    }
    runs = [make_run(editor, seed, 4, pairs=found) for (editor, seed), found in pairs.items()]
    by_edit = paired_comparison(runs, n_boot=N_BOOT)["layers"][0]["by_edit"]
    ordered = [(runs[seed], runs[2 + seed]) for seed in (0, 1)]  # (alphaedit, rome) per order

    retention = {row["n_edits"]: row for row in by_edit["retention_oldest_quarter"]}
    assert sorted(retention) == [10, 20, 30, 40]
    expected = slow_paired_mean(ordered, 40, lambda u, n: u < max(1, n // 4))
    assert retention[40]["value"] == pytest.approx(expected, abs=1e-12) and retention[40]["low"] > 0
    assert retention[40]["n_clusters"] == 2 * 10 and retention[40]["n_orders"] == 2
    efficacy = {row["n_edits"]: row for row in by_edit["efficacy_on_earlier_edits"]}
    assert efficacy[40]["value"] == pytest.approx(slow_paired_mean(ordered, 40, lambda u, n: True), abs=1e-12)
    assert efficacy[40]["n_clusters"] == 2 * 39

    swapped = [
        make_run("rome" if run["editor"] == "alphaedit" else "alphaedit", *run_key(run)[1:], pairs=run["pairs"])
        for run in runs
    ]
    flipped = paired_comparison(swapped, n_boot=N_BOOT)["layers"][0]["by_edit"]["retention_oldest_quarter"][-1]
    assert flipped["value"] == pytest.approx(-expected, abs=1e-12) and flipped["high"] < 0


# --------------------------------------------------------------------------------------------------------- study
def test_study_from_a_folder_and_from_runs(tmp_path):
    runs = [
        *predictor_runs(True, (20, 30)),
        paired_run("alphaedit", 0, None),
        paired_run("alphaedit", 1, 35),
        make_run("none", 0, 4, pairs=forgetting_pairs("P")),
    ]
    for run in runs:
        write_run(tmp_path, run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no legacy file: nothing to warn about
        found = study(tmp_path, n_boot=20)
    assert set(found) == {
        "runs",
        "rules",
        "collapse_rows",
        "collapse_by_editor",
        "rho_alarm_rows",
        "prediction_rows",
        "prediction_across_orders",
        "forgetting_rows",
        "forgetting_across_orders",
        "before_collapse",
        "collapse_predictors",
        "paired_comparison",
    }
    assert len(found["runs"]) == 5 and found["runs"][0]["source"].startswith("layer_4/")
    assert found["paired_comparison"]["layers"][0]["verdict"] == "alphaedit holds longer in every order"
    assert found["collapse_predictors"]["too_few"] is True
    assert found["rules"]["collapse"] == RULE_COLLAPSE and "alphaedit" in found["rules"]["paired"]
    json.dumps(found, allow_nan=False)  # plain JSON for a renderer

    again = study(runs, n_boot=20)
    assert again["collapse_by_editor"] == found["collapse_by_editor"]
    with pytest.raises(KisError, match="two runs of rome"):
        study([*runs, runs[0]], n_boot=20)
