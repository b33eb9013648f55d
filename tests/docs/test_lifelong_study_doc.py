"""kis_lens.docs.lifelong_study: a study's docs/lifelong.md (every table well formed, each verdict the study module's,
nothing machine-bound) and the study's figures (kis_lens.editing.lifelong_plots)."""

from __future__ import annotations

import re

import pytest
from study_fixtures import make_run, nll_pairs, paired_run, rho_run

from kis_lens.docs.lifelong_study import render_study_markdown
from kis_lens.editing.lifelong_plots import study_figure, update_norm_figure
from kis_lens.editing.lifelong_study import study


def _study_runs() -> list[dict]:
    rome = [paired_run("rome", seed, step) for seed, step in enumerate((10, 20, 30))]
    alphaedit = [paired_run("alphaedit", 0, 15), paired_run("alphaedit", 1, None), paired_run("alphaedit", 2, 25)]
    return rome + alphaedit + [paired_run("none", 0, None)]


def _study_with_rho() -> list[dict]:
    """Return a study whose ROME runs record ρ: two orders of rho_run, two of AlphaEdit."""
    return [rho_run(0, False), rho_run(1, True), paired_run("alphaedit", 0, None), paired_run("alphaedit", 1, 30)]


def _study_collapsing_with_pairs() -> list[dict]:
    """Return three ROME orders whose pairs follow P before their collapse: every before-collapse verdict judged."""
    return [make_run("rome", seed, 4, collapse=30, pairs=nll_pairs(30, seed=seed)) for seed in range(3)]


def _tables(text: str) -> list[list[str]]:
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


@pytest.mark.parametrize("runs", [_study_runs(), _study_collapsing_with_pairs()], ids=["orders", "before"])
def test_every_table_row_has_as_many_cells_as_its_header(runs):
    """A stray '|' in a header or cell breaks a Markdown table: count unescaped pipes row by row."""
    text = render_study_markdown(runs, n_boot=50)
    tables = _tables(text)
    assert len(tables) >= 8
    for table in tables:
        counts = {len(re.findall(r"(?<!\\)\|", row)) for row in table}
        assert len(counts) == 1, table[:2]


def test_the_doc_carries_the_study_verdicts_and_rules():
    """Each verdict the study module computes is printed, next to its rule; interim studies say so."""
    runs = _study_runs()
    numbers = study(runs, n_boot=50)
    text = render_study_markdown(runs, n_boot=50)
    for row in numbers["collapse_by_editor"]:
        assert f"**{row['verdict']}**" in text
    assert "**mixed: 2 of 3 orders**" in text  # AlphaEdit vs ROME: one order collapses earlier
    for row in numbers["prediction_across_orders"] + numbers["forgetting_across_orders"]:
        assert f"**{row['verdict']}**" in text
    for rule in numbers["rules"].values():
        assert rule.split(":")[0] in text
    assert "Fewer than 3 edit orders" not in text  # three orders each
    short = render_study_markdown(runs[:2] + runs[3:4], n_boot=50)
    assert "> **Fewer than 3 edit orders** for: `rome` (2), `alphaedit` (1). " in short
    assert "/tmp/" not in text


def test_the_study_figures_draw_one_line_per_run():
    """The metrics figure has a line per run and panel; the update-norm figure one per run that moved weights."""
    runs = _study_runs()
    figure = study_figure(runs)
    efficacy = [t for t in figure.data if (t.meta or {}).get("metric") == "efficacy"]
    assert len(efficacy) == len(runs)
    assert {t.line.dash for t in efficacy} == {"solid", "dash", "dot"}
    update_norm_figure(runs)


def _github_anchor(heading: str) -> str:
    """Return GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return "#" + re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize(
    "runs", [_study_runs(), _study_with_rho(), _study_collapsing_with_pairs()], ids=["orders", "rho", "before"]
)
def test_the_glance_table_links_real_sections_and_carries_every_verdict(runs):
    numbers = study(runs, n_boot=50)
    text = render_study_markdown(runs, n_boot=50)
    anchors = {_github_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("## ")}
    glance = text.split("## At a glance", 1)[1].split("\n## ", 1)[0]
    links = re.findall(r"\]\((#[^)]+)\)", glance)
    assert links and set(links) <= anchors, set(links) - anchors
    verdicts = [row["verdict"] for row in numbers["collapse_by_editor"] if row["editor"] != "none"]
    verdicts += [row["verdict"] for row in numbers["prediction_across_orders"] + numbers["forgetting_across_orders"]]
    verdicts += [layer["verdict"] for layer in numbers["paired_comparison"]["layers"]]
    verdicts += [row["verdict"] for row in numbers["rho_alarm_rows"]]
    early = numbers["before_collapse"]
    verdicts += [row["verdict"] for row in early["prediction_across_orders"] + early["forgetting_across_orders"]]
    assert verdicts and all(f"**{verdict}" in glance for verdict in verdicts)


def test_the_before_collapse_section_prints_each_collapsed_runs_verdicts():
    runs = _study_collapsing_with_pairs()
    numbers = study(runs, n_boot=50)
    text = render_study_markdown(runs, n_boot=50)
    section = text.split("## Before the collapse", 1)[1].split("\n## ", 1)[0]
    early = numbers["before_collapse"]
    assert [row["verdict"] for row in early["prediction_across_orders"]] == ["reproduced in every order"]
    assert "**reproduced in every order**" in section and "**P beats the count in every order**" in section
    assert section.count("| ROME (original) (`rome`) | 0 | 4 | 30 |") == 2  # one row in each of its two tables
    steady = [paired_run("alphaedit", seed, None) for seed in range(3)]
    assert "No run collapsed" in render_study_markdown(steady, n_boot=50)


def _section(text: str, heading: str) -> str:
    """Return the text of a level-2 section, from its heading to the next one."""
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_runs_that_record_other_hashes_of_one_c_get_a_note_under_the_runs_table():
    """Where runs of one corpus slice record other C hashes, the Runs section says which and why; else nothing."""
    runs = _study_runs()
    plain = render_study_markdown(runs, n_boot=50)
    assert "hash" not in _section(plain, "Runs")
    rehashed = [dict(run) for run in runs]
    rehashed[2] = paired_run("rome", 2, 30)
    rehashed[2]["settings"]["identity"]["covariance"]["4"]["sha256"] = "0f" * 32
    section = _section(render_study_markdown(rehashed, n_boot=50), "Runs")
    table_end = section.rindex("|")
    paragraphs = [p.strip() for p in section[table_end + 1 :].split("\n\n") if p.strip()]
    assert len(paragraphs) == 1
    assert paragraphs[0].startswith("The runs read layer 4's C from the same corpus slice (`layer_4_mom2.safetensors`)")
    assert "file hash cov4 in rome seed 0 layer 4, rome seed 1 layer 4, alphaedit seed 0 layer 4" in paragraphs[0]
    assert "; file hash 0f0f0f0f0f0f in rome seed 2 layer 4." in paragraphs[0]
    assert "random order" in paragraphs[0] and "content_sha256" in paragraphs[0]
    # the rest of the doc is unchanged: the note is the only difference
    assert render_study_markdown(rehashed, n_boot=50).replace("\n\n" + paragraphs[0], "", 1) == plain


def test_a_second_layer_with_one_order_is_named_by_its_layer():
    """Orders are counted per editor and layer: ROME's three orders at layer 4 do not cover its one at layer 8."""
    runs = [*_study_runs(), make_run("rome", 0, 8, collapse=40)]
    text = render_study_markdown(runs, n_boot=50)
    assert "> **Fewer than 3 edit orders** for: `rome` at layer 8 (1). " in text
    assert "| ROME (original) (`rome`) | 8 | 1 | 1 | 40 |" in text  # its collapse row: 1 of 1, not "every order"
    assert "**collapses in 1 of 1 order**" in text
    assert "rome order 0 layer 8: " in text and "rome order 0 layer 4: " in text  # the listed output correlations
    assert "Layer 8, " not in text  # no AlphaEdit at layer 8: nothing paired there
