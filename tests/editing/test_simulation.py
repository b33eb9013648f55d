"""The lifelong-editing simulation on a tiny model: P prediction, the orthogonal control, the outputs and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kis_lens.cli import main
from kis_lens.corpus import embedded_sample_texts
from kis_lens.covariance import estimate_second_moments
from kis_lens.editing.editors import rome_delta
from kis_lens.editing.simulation import EditSimConfig, run_edit_simulation
from kis_lens.editing.simulation_plots import editing_figures
from kis_lens.editing.values import ValueSearch, edit_prompt
from kis_lens.editing.weights import apply_delta
from kis_lens.errors import KisError
from kis_lens.facts import load_facts, sample_facts
from kis_lens.hooks import mlp_out_hook_name
from kis_lens.models import load_model
from kis_lens.w_out import output_weight

SMALL = dict(
    model_name="tiny-gpt2",
    layer=0,
    n_edits=6,
    n_unedited=6,
    batch_size=3,
    max_tokens=4000,
    value_search=ValueSearch(steps=3),
    progress=False,
)


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    """One small simulation of every condition on the 2-layer tiny GPT-2."""
    output = tmp_path_factory.mktemp("edit_sim")
    return run_edit_simulation(EditSimConfig(**SMALL, output_dir=str(output))), output


@pytest.mark.slow
def test_interference_identity_sum_p_r_equals_output_change(simulation):
    """Identity check of the algebra, not a test of a prediction: k_u ΣΔW_i = Σ_i P[i,u] r_i for rank-one ΔW_i.

    "predicted" (from P and the residual history) and "measured_output" (k_u @ ΔW, the shift the simulation
    patches in) are two evaluations of the same formula, so they agree to round-off whatever the model does;
    this catches bookkeeping errors (P indexing, residual history, normalisation) only. The real-forward check
    is test_sequential_rome_edits_move_unedited_outputs_by_sum_p_r_in_real_forwards."""
    result, _ = simulation
    rome = result.summary["rome"]
    predicted, measured = np.array(result.scatter["predicted"]), np.array(result.scatter["measured_output"])
    np.testing.assert_allclose(predicted, measured, rtol=1e-6, atol=1e-12)
    assert measured.max() > 1e-3  # real keys do interfere
    assert rome["predicted_vs_measured_output_drift"]["pearson"] > 0.999999


@pytest.mark.slow
def test_final_edited_weights_reproduce_the_patched_outputs(simulation):
    """With the summed ΔW written into W_out, a plain forward gives m + kΔW at every fact's subject token."""
    result, _ = simulation
    for name in ("rome", "alphaedit", "memit"):
        assert result.summary[name]["weights_check"]["max_relative_error_of_output_change"] < 1e-4


@pytest.mark.slow
def test_rome_records_the_logprob_drift_of_the_really_edited_model(simulation):
    """Every ROME step scores the unedited facts with ΔW applied to W_out; the last step is the final weights check.

    No correlation with the P-predicted drift is asserted: on this random tiny model it is weak and unstable
    (Pearson 0.42 here, 0.09 to 0.51 over seeds 0-2), because the real edit also moves the MLP output at
    every other token (the last prompt token included), which P at the subject's last token does not cover."""
    result, _ = simulation
    rome = result.curves["rome"]
    drift = np.array(result.scatter["weights_logprob"])
    assert len(drift) == len(result.scatter["predicted"]) == 6 * 6 and np.isfinite(drift).all()
    assert drift.max() > 1e-3
    full = result.summary["rome"]["weights_check"]["full_model_unedited_logprob_drift"]
    assert rome["weights_logprob_drift"][-1] == pytest.approx(full, rel=1e-6)
    assert result.summary["rome"]["predicted_vs_weights_logprob_drift"]["n"] == 36
    assert set(result.curves["memit"]["weights_logprob_drift"]) == {None}


def _subject_outputs(model, layer, prompts):
    """MLP input (key) and output at each prompt's subject-last token, one unpadded plain forward per prompt."""
    names = (f"blocks.{layer}.mlp.hook_post", mlp_out_hook_name(layer))
    keys, outputs = [], []
    for prompt in prompts:
        with torch.no_grad():
            _, cache = model.run_with_cache(
                torch.tensor([prompt.ids[: prompt.target_start]]), names_filter=lambda name: name in names
            )
        keys.append(cache[names[0]][0, prompt.subject_last].double())
        outputs.append(cache[names[1]][0, prompt.subject_last].double())
    return torch.stack(keys), torch.stack(outputs)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-llama"])
def test_sequential_rome_edits_move_unedited_outputs_by_sum_p_r_in_real_forwards(model_name):
    """Six ROME edits written one after another into W_out: after each, a real forward of six never-edited
    facts shows their layer output at the subject's last token moved by exactly Σ_i P[i,u] r_i.

    P comes from a dense solve with C, r_i from the live weights before edit i, and the change from plain
    forwards before and after: nothing is shared with the simulation's algebra. float64 so the tolerance
    can be tight (measured ≤ 6e-14 relative; in float32 it is 1e-6 to 2e-3 for facts that move little)."""
    layer, n_edits, n_unedited = 0, 6, 6
    model = load_model(model_name, device="cpu", dtype="float64")
    facts = sample_facts(load_facts(), n_edits + n_unedited, seed=3)
    prompts = [edit_prompt(model, fact, fact.target_true, prepend_bos=False) for fact in facts]
    edited_keys, edited_outputs = _subject_outputs(model, layer, prompts[:n_edits])
    unedited_keys, before = _subject_outputs(model, layer, prompts[n_edits:])
    covariance = estimate_second_moments(model, embedded_sample_texts(16), [layer], progress=False)[layer]
    c = covariance.compute(torch.float64)
    solved = np.linalg.solve(c.numpy(), edited_keys.numpy().T).T  # rows C⁻¹k_i
    scale = np.einsum("id,id->i", solved, edited_keys.numpy())[:, None]  # k_iᵀC⁻¹k_i
    p = torch.from_numpy(solved @ unedited_keys.numpy().T / scale)  # P[i, u]
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(edited_outputs.shape, generator=generator, dtype=torch.float64)
    values = edited_outputs + noise * edited_outputs.norm(dim=1, keepdim=True) / edited_outputs.shape[1] ** 0.5
    handle = output_weight(model, layer)
    saved = handle.weight.detach().clone()
    residuals = []
    try:
        for i in range(n_edits):
            weight, bias = handle.read(), handle.read_bias()
            residuals.append(values[i] - (edited_keys[i] @ weight + bias))
            apply_delta(model, layer, rome_delta(weight, bias, edited_keys[i], values[i], c))
            _, after = _subject_outputs(model, layer, prompts[n_edits:])
            expected = p[: i + 1].T @ torch.stack(residuals)  # Σ_i P[i,u] r_i, [unedited, d_model]
            error = ((after - before) - expected).norm(dim=1) / expected.norm(dim=1)
            assert error.max() < 1e-9, f"after edit {i}: relative error {error.max():.2e}"
            assert (expected.norm(dim=1) / before.norm(dim=1)).min() > 1e-3  # not trivially zero
    finally:
        with torch.no_grad():
            handle.weight.copy_(saved)
    assert p.abs().max() > 0.01  # the keys superpose: the identity has something to check


@pytest.mark.slow
def test_orthogonal_control_has_no_interference(simulation):
    """With whitened-orthogonal keys the unedited facts' outputs do not move (float64 round-off only)."""
    result, _ = simulation
    curve = result.curves["rome_orthogonal"]
    assert max(curve["unedited_output_drift"]) < 1e-8
    assert max(curve["predicted_output_drift"]) < 1e-8
    assert max(result.curves["rome"]["unedited_output_drift"]) > 1e-3


@pytest.mark.slow
def test_curves_are_complete_and_edits_land(simulation):
    """ROME reaches its target exactly on the newest edit; every step of every condition is recorded."""
    result, _ = simulation
    assert result.curves["rome"]["n_edits"] == list(range(1, 7))
    assert result.curves["memit"]["n_edits"] == [3, 6]
    assert max(result.curves["rome"]["edit_residual"]) < 1e-8
    assert result.curves["rome"]["retention"][0] is None
    assert 0 < result.summary["null_space_rank"] < 256


@pytest.mark.slow
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


@pytest.mark.slow
def test_cli_runs_and_reports_errors(tmp_path, capsys):
    """`kis edit-sim` writes its results; a bad layer exits with code 2 and a message."""
    args = [
        "edit-sim",
        "--model_name",
        "tiny-gpt2",
        "--layer",
        "0",
        "--n_edits",
        "3",
        "--n_unedited",
        "3",
        "--batch_size",
        "3",
        "--max_tokens",
        "3000",
        "--v_steps",
        "2",
        "--conditions",
        "rome,memit",
        "--output_dir",
        str(tmp_path),
        "--no_progress",
    ]
    assert main(args) == 0
    assert "P-predicted vs measured drift" in capsys.readouterr().out
    assert list(tmp_path.rglob("edit_sim.json"))
    assert main([*args[:4], "5", *args[5:]]) == 2
    assert "cannot be edited" in capsys.readouterr().err
