"""kis_lens.report and `kis report`: contents, extra sections, CLI, and the file rendered in headless Chromium."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from plotly.offline import get_plotlyjs

from kis_lens.cli import main
from kis_lens.config import RunConfig
from kis_lens.editing.results import run_report_sections
from kis_lens.editing.simulation import EditSimConfig, EditSimResult
from kis_lens.errors import KisError
from kis_lens.facts import Fact
from kis_lens.figure_files import PLOTLY_BUNDLE
from kis_lens.io import save_json
from kis_lens.layout import edit_sim_dir, find_results
from kis_lens.matrices import MATRIX_NAMES, all_matrices
from kis_lens.plots import decode_layer
from kis_lens.report import (
    ReportSection,
    build_report,
    write_report,
)
from kis_lens.results import RunResult, save_result

LAYERS = (0, 1, 2)
# 2 trend figures + (slider heatmap, histogram, KDE) for each of the 4 matrices.
STANDARD_FIGURES = 2 + 3 * len(MATRIX_NAMES)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def make_facts(n: int) -> list[Fact]:
    facts = [Fact(str(i), f"Subject{i}", "{} plays the", f"Instrument{i}") for i in range(n)]
    facts[1] = Fact("1", "<b>Tag & Co</b>", "{} is owned by", "<i>Owner</i>")  # must come out escaped
    return facts


def synthetic_result(n_facts: int = 8) -> RunResult:
    generator = torch.Generator().manual_seed(5)
    stacked: dict[str, list[torch.Tensor]] = {name: [] for name in MATRIX_NAMES}
    for _ in LAYERS:
        corpus = torch.randn(300, 16, generator=generator, dtype=torch.float64) + 0.5
        keys = torch.randn(n_facts, 16, generator=generator, dtype=torch.float64) + 0.5
        for name, matrix in all_matrices(keys, corpus.T @ corpus / 300).items():
            stacked[name].append(matrix)
    settings = {"model": {"name": "synthetic", "d_mlp": 16}, "config": {"model_name": "synthetic", "seed": 0}}
    return RunResult({k: torch.stack(v) for k, v in stacked.items()}, list(LAYERS), make_facts(n_facts), settings)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> RunResult:
    result = synthetic_result()
    save_result(result, RunConfig(output_dir=str(tmp_path_factory.mktemp("run"))))
    return result


def packed_heatmaps(page: str) -> dict[str, dict]:
    """Return {div id: packed layers} of every on-demand heatmap a report page draws (its kisLayers.plot calls)."""
    decoder, found = json.JSONDecoder(), {}
    for call in page.split("kisLayers.plot(")[1:]:
        div_id, end = decoder.raw_decode(call)
        figure, end = decoder.raw_decode(call, end + 2)
        packed, _ = decoder.raw_decode(call, end + 2)
        found[div_id] = {"figure": figure, **packed}
    return found


def test_report_holds_every_part_and_loads_plotly_from_beside_itself():
    result = synthetic_result()
    report = build_report(result, top_k=4)
    assert report.n_figures == STANDARD_FIGURES
    assert report.html.count('class="plotly-graph-div"') == STANDARD_FIGURES
    assert report.section_titles[:2] == ["Run settings", "Superposition across layers"]
    assert "Top 4 most superposed pairs per layer" in report.section_titles
    # Offline: Plotly comes from plotly.min.js beside the file (write_report puts it there), nothing from a network.
    assert report.bundle == PLOTLY_BUNDLE
    assert re.findall(r"<script[^>]+src=\"([^\"]+)\"", report.html) == [PLOTLY_BUNDLE]
    assert get_plotlyjs()[:200] not in report.html and "cdn." not in report.html
    # One collapsible top-pairs table per matrix and layer, 4 ranked rows each.
    assert report.html.count("<details><summary>layer ") == len(MATRIX_NAMES) * len(LAYERS)
    # User text is escaped everywhere (tables, and the JSON inside the plot scripts).
    assert "&lt;b&gt;Tag &amp; Co&lt;/b&gt;" in report.html
    assert "<b>Tag" not in report.html and "<i>Owner" not in report.html
    # Every layer of every matrix is in the page (drawn when the slider reaches it).
    heatmaps = packed_heatmaps(report.html)
    assert [len(packed["layers"]) for packed in heatmaps.values()] == [len(LAYERS)] * len(MATRIX_NAMES)


def test_self_contained_report_embeds_plotly():
    report = build_report(synthetic_result(), names=["p_matrix"], self_contained=True)
    assert report.bundle is None
    assert get_plotlyjs()[:200] in report.html
    assert not re.search(r"<script[^>]+src=", report.html)
    assert "cdn." not in report.html.split(get_plotlyjs())[1]


def test_thin_report_keeps_summary_tables_and_every_heatmap_layer_at_8_bits():
    result = synthetic_result()
    full, thin = build_report(result), build_report(result, thin=True)
    assert thin.n_figures == 2 + len(MATRIX_NAMES)  # trends, then one heatmap per matrix: no histograms, no KDEs
    assert thin.section_titles == full.section_titles and len(thin.html) < len(full.html)
    for name, packed in zip(MATRIX_NAMES, packed_heatmaps(thin.html).values()):
        for index, layer in enumerate(packed["layers"]):
            assert layer["encoding"] == "u8"
            exact = result.matrices[name][index].numpy()
            assert np.abs(decode_layer(layer, packed["n"]) - exact).max() <= np.ptp(exact) / 254 / 2 * (1 + 1e-9)


def large_result(n_facts: int = 128, n_layers: int = 30, width: int = 48) -> RunResult:
    """Return a run of n_facts facts × n_layers layers with fact texts as long as CounterFact's and Q growing ~10×
    every 10 layers; the matrices are [fact, fact] whatever the model's d_mlp (width here)."""
    generator = torch.Generator().manual_seed(7)
    stacked: dict[str, list[torch.Tensor]] = {name: [] for name in MATRIX_NAMES}
    for layer in range(n_layers):
        scale = 10.0 ** (layer / 10)
        corpus = (torch.randn(200, width, generator=generator, dtype=torch.float64) + 0.3) * scale
        keys = (torch.randn(n_facts, width, generator=generator, dtype=torch.float64) + 0.3) * scale
        for name, matrix in all_matrices(keys, corpus.T @ corpus / 200).items():
            stacked[name].append(matrix.float())
    facts = [
        Fact(str(i), f"Subject number {i} of Somewhere", "The mother tongue of {} is the language of", f"Answer{i}")
        for i in range(n_facts)
    ]
    settings = {"model": {"name": "HuggingFaceTB/SmolLM2-135M", "d_mlp": 1536}, "config": {"seed": 0}}
    return RunResult({k: torch.stack(v) for k, v in stacked.items()}, list(range(n_layers)), facts, settings)


@pytest.fixture(scope="module")
def large() -> RunResult:
    return large_result()


@pytest.mark.slow  # builds a 128 × 30 report (~7 s)
def test_report_of_128_facts_by_30_layers_is_under_5_mb_with_every_layer_heatmap(large, tmp_path):
    path = write_report(large, tmp_path / "report.html")
    page = path.read_text(encoding="utf-8")
    assert path.stat().st_size < 5_000_000
    assert (tmp_path / PLOTLY_BUNDLE).read_text(encoding="utf-8") == get_plotlyjs()
    heatmaps = packed_heatmaps(page)
    assert len(heatmaps) == len(MATRIX_NAMES)
    for name, packed in zip(MATRIX_NAMES, heatmaps.values()):
        assert packed["n"] == 128 and [layer["layer"] for layer in packed["layers"]] == large.layers
        for index, layer in enumerate(packed["layers"]):
            exact = large.matrices[name][index].double().numpy()
            scale = np.abs(exact).max()
            assert layer["encoding"] == "f16" and layer["scale"] == pytest.approx(scale)
            # Stored precision: float16 of value / scale, the symmetric matrices' lower triangle from the upper.
            stored = (exact / scale).astype(np.float16).astype(np.float64) * scale
            assert np.abs(decode_layer(layer, 128) - stored).max() <= scale * 2**-11
            assert np.abs(decode_layer(layer, 128) - exact).max() <= scale * 2**-11
        # Q spans 1000× over the layers: each layer's colours cover its own values, none drawn blank.
        if name == "q_matrix":
            first, last = packed["layers"][0], packed["layers"][-1]
            assert last["zmax"] > 100 * first["zmax"]
    assert build_report(large, thin=True).html.encode().__len__() < len(page.encode()) / 1.5


def test_report_lists_the_largest_pair_first():
    result = synthetic_result()
    matrix = result.layer("p_matrix", 2).clone()
    matrix.fill_diagonal_(0)
    row, column = divmod(int(matrix.abs().argmax()), matrix.shape[0])
    html = build_report(result, names=["p_matrix"], top_k=1).html
    block = html.split("<details><summary>layer 2</summary>")[1].split("</details>")[0]
    cells = re.findall(r"<td[^>]*>(.*?)</td>", block)
    assert cells[0] == "1" and cells[2] == str(row) and cells[4] == str(column)
    assert float(cells[1]) == pytest.approx(float(result.layer("p_matrix", 2)[row, column]), rel=1e-3)


def test_extra_sections_and_registered_providers(monkeypatch):
    result = synthetic_result()
    figure = go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))
    report = build_report(
        result,
        names=["q_matrix"],
        sections=[lambda run: [("Plugged in", figure)]],
        extra_sections=[
            ("Two figures", [figure, figure]),
            ("Notes", "<p id='note'>edited facts</p>"),
            ReportSection("Custom", figures=[figure], intro="a < b"),
        ],
    )
    assert report.section_titles[-4:] == ["Plugged in", "Two figures", "Notes", "Custom"]
    assert report.n_figures == 1 + 3 + 1 + 2 + 1  # trends, q's three, plugged, two, custom
    assert "<p id='note'>edited facts</p>" in report.html and "a &lt; b" in report.html
    with pytest.raises(KisError, match="report section"):
        build_report(result, extra_sections=["just a string"])
    with pytest.raises(KisError, match="plotly Figure"):
        build_report(result, extra_sections=[("Bad", [1, 2])])


def test_write_report_and_cli(saved, tmp_path, capsys):
    run_folder = saved.path.parent
    output_dir = run_folder.parents[3]
    assert find_results(output_dir) == saved.path  # an --output_dir with one run is enough
    path = write_report(saved)
    assert path == run_folder / "report.html" and path.read_text().startswith("<!DOCTYPE html>")
    assert (run_folder / PLOTLY_BUNDLE).is_file()  # the report's Plotly, beside it
    assert main(["report", "--results", str(output_dir), "--output", str(tmp_path / "r.html"), "--top_k", "3"]) == 0
    assert (tmp_path / "r.html").is_file()
    with open(tmp_path / "layer_summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["matrix"], int(r["layer"])) for r in rows] == [
        (name, layer) for name in MATRIX_NAMES for layer in LAYERS
    ]
    assert "report:" in capsys.readouterr().out
    assert main(["report", "--results", str(tmp_path / "nothing")]) == 2
    assert "no results.safetensors" in capsys.readouterr().err


@pytest.mark.slow
def test_kis_all_report_flag(tmp_path, capsys):
    code = main(
        [
            "all",
            "--model_name",
            "tiny-gpt2",
            "--output_dir",
            str(tmp_path),
            "--record_size",
            "6",
            "--knowledge_type",
            "all",
            "--max_tokens",
            "1500",
            "--no_progress",
            "--report",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    report_path = Path(re.search(r"report: (\S+)", out).group(1))
    assert report_path.name == "report.html" and report_path.parent == find_results(tmp_path).parent
    assert (report_path.parent / "layer_summary.csv").is_file()


def _save_edit_sim(output_dir: Path, model: str, layer: int, **config: str) -> None:
    """Write a small edit_sim.json where `kis edit-sim` puts it, with the settings it records (no simulation run)."""
    curve = {"n_edits": [1, 2], "efficacy": [1.0, 1.0], "retention": [None, 1.0], "unedited_logprob_drift": [0.1, 0.2]}
    settings = {
        "config": EditSimConfig(model_name=model, layer=layer, output_dir=str(output_dir), **config).to_dict(),
        "model": {"name": model},
    }
    result = EditSimResult({"rome": curve}, {}, {}, settings)
    save_json(edit_sim_dir(output_dir, model, layer, 2) / "edit_sim.json", result.to_dict())


def test_report_shows_only_the_edit_sims_of_its_own_run(tmp_path, capsys):
    """Of the edit simulations in the run's output dir, the report shows only those with its model, facts and corpus."""
    run_config = RunConfig(model_name="synthetic", output_dir=str(tmp_path))
    result = synthetic_result()
    result.settings = {**result.settings, "config": run_config.to_dict()}
    save_result(result, run_config)
    _save_edit_sim(tmp_path, "synthetic", 0)  # same model, facts source and corpus: shown
    _save_edit_sim(tmp_path, "other-model", 1)  # another model
    _save_edit_sim(tmp_path, "synthetic", 2, facts="my_facts.json")  # another facts file
    _save_edit_sim(tmp_path, "synthetic", 3, corpus="other_corpus.txt")  # another corpus
    titles = build_report(result, names=["q_matrix"], sections=[run_report_sections]).section_titles
    assert [title for title in titles if title.startswith("Lifelong editing")] == ["Lifelong editing: layer_0_n2"]
    assert not any(
        title.startswith("Lifelong editing") for title in build_report(result, names=["q_matrix"]).section_titles
    )
    assert (
        main(["report", "--results", str(tmp_path), "--output", str(tmp_path / "r.html")]) == 0
    )  # the CLI passes them
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "Lifelong editing: layer_0_n2" in html
    assert not any(f"Lifelong editing: layer_{layer}_n2" in html for layer in (1, 2, 3))
    assert "report:" in capsys.readouterr().out


@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian chromium + chromium-driver (apt-get install chromium chromium-driver)",
)
@pytest.mark.slow
def test_report_renders_in_headless_chromium(saved, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    report = build_report(saved)
    page = write_report(saved, tmp_path / "report.html")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1800",
        f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download a driver
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        driver.get(page.as_uri())
        deadline = time.monotonic() + 30
        plots = 0
        while time.monotonic() < deadline:
            plots = len(driver.find_elements("css selector", ".js-plotly-plot"))
            if plots >= report.n_figures and driver.execute_script("return document.readyState") == "complete":
                break
            time.sleep(0.2)
        assert plots == report.n_figures == STANDARD_FIGURES
        # Every plot drew its traces (an SVG layer per figure), not just an empty div.
        drawn = driver.execute_script(
            "return Array.from(document.querySelectorAll('.js-plotly-plot'))"
            ".filter(p => p.querySelector('.main-svg')).length"
        )
        assert drawn == report.n_figures
        # The packed heatmaps: layer 0 drawn at first; moving a slider draws the layer it reaches.
        heatmaps = list(packed_heatmaps(report.html))
        q_plot = heatmaps[MATRIX_NAMES.index("q_matrix")]
        shown = "const gd = document.getElementById(arguments[0]); return [gd.layout.title.text, gd.data[0].z];"
        title, z = driver.execute_script(shown, q_plot)
        assert title.endswith("layer 0") and np.asarray(z, dtype=float) == pytest.approx(
            saved.layer("q_matrix", 0).numpy(), rel=1e-3
        )
        driver.execute_script(
            "document.getElementById(arguments[0]).emit('plotly_sliderchange', {step: {value: '2'}});", q_plot
        )
        title, z = driver.execute_script(shown, q_plot)
        assert title.endswith("layer 2") and np.asarray(z, dtype=float) == pytest.approx(
            saved.layer("q_matrix", 2).numpy(), rel=1e-3
        )
        errors = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
        assert errors == []
        screenshot = Path(os.environ.get("KIS_REPORT_SCREENSHOT", tmp_path / "report.png"))
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    finally:
        driver.quit()
