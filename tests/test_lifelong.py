"""The lifelong-editing simulation on a tiny model: the P prediction, the orthogonal control, the outputs and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kis_lens.cli import main
from kis_lens.errors import KisError
from kis_lens.lifelong import EditSimConfig, run_edit_simulation
from kis_lens.plots_editing import editing_figures

SMALL = dict(model_name="tiny-gpt2", layer=0, n_edits=6, n_unedited=6, batch_size=3, max_tokens=4000, v_steps=3, progress=False)


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    """One small simulation of every condition on the 2-layer tiny GPT-2."""
    output = tmp_path_factory.mktemp("edit_sim")
    return run_edit_simulation(EditSimConfig(**SMALL, output_dir=str(output))), output


def test_p_predicts_the_output_drift_and_the_weights_agree(simulation):
    """ROME on real keys: Σ P[i,u] r_i is the measured output drift, and the real edited weights give it too."""
    result, _ = simulation
    rome = result.summary["rome"]
    predicted, measured = np.array(result.scatter["predicted"]), np.array(result.scatter["measured_output"])
    np.testing.assert_allclose(predicted, measured, rtol=1e-6, atol=1e-12)
    assert measured.max() > 1e-3  # real keys do interfere
    assert rome["predicted_vs_measured_output_drift"]["pearson"] > 0.999999
    for name in ("rome", "alphaedit", "memit"):
        assert result.summary[name]["weights_check"]["max_relative_error_of_output_change"] < 1e-4


def test_orthogonal_control_has_no_interference(simulation):
    """With whitened-orthogonal keys the unedited facts' outputs do not move (float64 round-off only)."""
    result, _ = simulation
    curve = result.curves["rome_orthogonal"]
    assert max(curve["unedited_output_drift"]) < 1e-8
    assert max(curve["predicted_output_drift"]) < 1e-8
    assert max(result.curves["rome"]["unedited_output_drift"]) > 1e-3


def test_curves_are_complete_and_edits_land(simulation):
    """ROME reaches its target exactly on the newest edit; every step of every condition is recorded."""
    result, _ = simulation
    assert result.curves["rome"]["n_edits"] == list(range(1, 7))
    assert result.curves["memit"]["n_edits"] == [3, 6]
    assert max(result.curves["rome"]["edit_residual"]) < 1e-8
    assert result.curves["rome"]["retention"][0] is None
    assert 0 < result.summary["null_space_rank"] < 256


def test_json_and_figures_are_written(simulation):
    """edit_sim.json reloads to the same curves; both HTML figures exist and the figure function returns both."""
    result, output = simulation
    loaded = json.loads(result.path.read_text())
    assert loaded["curves"]["rome"]["efficacy"] == result.curves["rome"]["efficacy"]
    assert (result.path.parent / "edit_retention.html").is_file()
    assert (result.path.parent / "edit_interference.html").is_file()
    figures = editing_figures(loaded)
    assert set(figures) == {"edit_retention", "edit_interference"}
    assert len(figures["edit_retention"].data) == 3 * len(result.curves)


def test_bad_settings_raise_kis_error(tmp_path):
    """The last layer, too few edits and unknown conditions are refused with a KisError."""
    with pytest.raises(KisError, match="layer 1 cannot be edited"):
        run_edit_simulation(EditSimConfig(**{**SMALL, "layer": 1}, output_dir=str(tmp_path)))
    with pytest.raises(KisError, match="n_edits"):
        EditSimConfig(n_edits=1).check()
    with pytest.raises(KisError, match="unknown condition"):
        EditSimConfig(conditions=("rome", "fancy")).check()


def test_cli_runs_and_reports_errors(tmp_path, capsys):
    """`kis edit-sim` writes its results; a bad layer exits with code 2 and a message."""
    args = ["edit-sim", "--model_name", "tiny-gpt2", "--layer", "0", "--n_edits", "3", "--n_unedited", "3",
            "--batch_size", "3", "--max_tokens", "3000", "--v_steps", "2", "--conditions", "rome,memit",
            "--output_dir", str(tmp_path), "--no_progress"]
    assert main(args) == 0
    assert "P-predicted vs measured drift" in capsys.readouterr().out
    assert list(tmp_path.rglob("edit_sim.json"))
    assert main([*args[:4], "5", *args[5:]]) == 2
    assert "cannot be edited" in capsys.readouterr().err
