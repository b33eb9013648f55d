"""Real sequential edits (`kis lifelong`) on tiny models: v* lands, W_0 comes back bitwise, AlphaEdit protects,
`none` changes nothing, the P bookkeeping holds, collapse is found, runs never overwrite or mix with another,
checkpoints are data only, and the CLI writes what it says."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import kis_lens.editing.lifelong as lifelong
import kis_lens.editing.lifelong_bench as lifelong_bench
import kis_lens.editing.lifelong_steps as lifelong_steps
import kis_lens.editing.registry as registry
from kis_lens.cli import main
from kis_lens.config import RunConfig
from kis_lens.editing.lifelong import run_lifelong
from kis_lens.editing.lifelong_config import DEFAULT_EDITORS, LifelongConfig
from kis_lens.editing.lifelong_result import collapse_summary, disabling_edits, judged_pairs
from kis_lens.editing.values import ValueSearch, edit_prompt, target_logprobs
from kis_lens.errors import KisError
from kis_lens.facts import facts_path
from kis_lens.hooks import mlp_out_hook_name
from kis_lens.keys import locate_subject
from kis_lens.layout import legacy_lifelong_dir, lifelong_dir
from kis_lens.models import load_model, model_info, resolve_prepend_bos
from kis_lens.runner import ensure_covariances
from kis_lens.tiny import tiny_model as build_tiny_model
from kis_lens.w_out import output_weight

SMALL: dict[str, Any] = dict(
    model_name="tiny-gpt2",
    layer=0,
    n_edits=6,
    eval_every=3,
    probe_every=2,
    batch_size=3,
    max_tokens=4000,
    value_search=ValueSearch(steps=4),
    value_prompts=3,
    n_unedited=4,
    heldout_texts=3,
    heldout_tokens=24,
    fluency_prompts=2,
    fluency_tokens=6,
    bootstrap=200,
    progress=False,
)


def _subject_output(model, layer: int, fact) -> torch.Tensor:
    """Return the layer's MLP output at the fact's subject-last token, from a plain forward (float64)."""
    located = locate_subject(model.tokenizer, fact, resolve_prepend_bos(model, None))
    captured = {}

    def keep(activation, hook):
        captured["out"] = activation[0, located.subject_last].detach().double().cpu()

    with torch.no_grad(), model.hooks(fwd_hooks=[(mlp_out_hook_name(layer), keep)]):
        model(torch.tensor([located.ids]))
    return captured["out"]


@pytest.fixture(scope="module")
def tiny_model():
    return load_model("tiny-gpt2")


@pytest.fixture(scope="module")
def deep_model():
    """A 4-layer tiny GPT-2: MEMIT and AlphaEdit edit layers 0–2 of it."""
    return load_model(build_tiny_model("gpt2", n_layers=4, seed=3))


DEEP: dict[str, Any] = {**SMALL, "layer": 2, "memit_span": 3}


@pytest.fixture(scope="module")
def run(deep_model, tmp_path_factory):
    """Every editor on the 4-layer tiny GPT-2, with spies on the value search and on the measurements."""
    output = tmp_path_factory.mktemp("lifelong")
    config = LifelongConfig(**DEEP, editors=(*DEFAULT_EDITORS, "emmet"), output_dir=str(output))
    original = registry.compute_target
    seen: dict[str, Any] = {"landed": {}, "protected": [], "last": None, "editor": None}
    tokens = torch.tensor([[5, 9, 11, 40, 2, 7]])
    with torch.no_grad():
        logits_before = deep_model(tokens).clone()
    bits_before = {layer: output_weight(deep_model, layer).weight.detach().clone() for layer in range(4)}

    def spy(model, layer, fact, templates, search, site="mlp_out"):
        last = seen["last"]
        if last is not None and last["editor"] in ("rome", "p-rome"):
            # the previous edit must have made the previous fact's real output (plain prompt) exactly its v*
            error = (_subject_output(model, layer, last["fact"]) - last["value"]).norm() / last["value"].norm()
            seen["landed"].setdefault(last["editor"], []).append(float(error))
        found = original(model, layer, fact, templates, search, site)
        seen["last"] = {"editor": seen["editor"], "fact": fact, "value": found.value}
        return found

    original_run_editor = lifelong._run_editor
    original_measure = lifelong.measure_step

    def measure(bench, state, kind, clock):
        if seen["editor"] == "alphaedit":  # the live weights of every edit layer, read from the model
            worst = 0.0
            for layer, keys in seen["protected_keys"].items():
                weight = output_weight(bench.model, layer).read().cpu()
                moved = (keys @ (weight - bench.weights0[layer])).norm(dim=1)
                worst = max(worst, float((moved / (keys @ bench.weights0[layer]).norm(dim=1)).max()))
            seen["protected"].append((state.done, worst))
        original_measure(bench, state, kind, clock)

    def run_editor_with_protected(bench, editor, folder, command=None):
        seen["protected_keys"] = {}
        for layer in bench.config.edit_layers:  # directions whose singular value is far above the threshold
            eigenvalues, eigenvectors = np.linalg.eigh(bench.covariances[layer].double().numpy())
            top = torch.from_numpy(eigenvectors[:, eigenvalues >= 0.5 * eigenvalues.max()].T.copy())
            seen["protected_keys"][layer] = top * 10
        seen["editor"], seen["last"] = editor, None
        return original_run_editor(bench, editor, folder, command)

    registry.compute_target = spy
    lifelong._run_editor = run_editor_with_protected
    lifelong.measure_step = measure
    try:
        results = run_lifelong(config, model=deep_model)
    finally:
        registry.compute_target = original
        lifelong._run_editor = original_run_editor
        lifelong.measure_step = original_measure
    with torch.no_grad():
        logits_after = deep_model(tokens)
    return {
        "results": results,
        "output": output,
        "seen": seen,
        "logits": (logits_before, logits_after),
        "bits": (bits_before, {layer: output_weight(deep_model, layer).weight.detach().clone() for layer in range(4)}),
        "model": deep_model,
        "config": config,
    }


@pytest.mark.slow
def test_each_rome_and_p_rome_edit_makes_the_real_output_its_target_value(run):
    """After every ROME and p-ROME edit, a plain forward gives v* at the fact's subject token (1e-5).

    Original ROME takes its direction from k̄ but its scale from k, so k's output lands on v* all the same."""
    landed = run["seen"]["landed"]
    for editor in ("rome", "p-rome"):
        assert len(landed[editor]) == DEEP["n_edits"] - 1  # checked before each next value search
        assert max(landed[editor]) < 1e-5


@pytest.mark.slow
def test_restoring_w0_restores_the_model_bitwise(run):
    """The run edits the caller's model in place (several layers) and gives it back with the exact original bits."""
    before, after = run["bits"]
    assert all(torch.equal(before[layer], after[layer]) for layer in before)
    assert torch.equal(*run["logits"])


@pytest.mark.slow
def test_alphaedit_leaves_protected_keys_outputs_unchanged(run):
    """Keys in C's preserved subspace keep their outputs at every edit layer through AlphaEdit's edits (1e-6)."""
    protected = dict(run["seen"]["protected"])
    assert sorted(protected) == [0, 3, 6]  # batches of 3: every measurement, the final weights included
    assert max(protected.values()) < 1e-6
    alphaedit = run["results"]["alphaedit"]
    assert alphaedit.steps[-1]["weight_change_norm"] > 0  # it did edit
    ranks = alphaedit.settings["editor"]["null_space_rank"]
    assert set(ranks) == {"0", "1", "2"} and all(0 < rank < 256 for rank in ranks.values())


@pytest.mark.slow
def test_memit_and_alphaedit_write_every_layer_of_their_span(run):
    """MEMIT's and AlphaEdit's runs record layers 0–2 and leave no layer outside them changed."""
    for editor in ("memit", "alphaedit"):
        assert run["results"][editor].settings["editor"]["layers"] == [0, 1, 2]
    assert run["results"]["rome"].settings["editor"]["layers"] == [2]


@pytest.mark.slow
def test_the_none_editor_changes_nothing(run):
    """`none` leaves W_out, perplexity and the unedited facts alone; its efficacy is the unedited model's."""
    none = run["results"]["none"]
    assert all(step["weight_change_norm"] == 0 for step in none.steps)
    assert all(step["unedited_nll_drift"] == 0 for step in none.steps)
    assert len({step["perplexity"] for step in none.steps}) == 1
    assert none.summary["collapse"]["step"] is None
    assert all(edit["residual_norm"] == 0 for edit in none.edits)
    # independent scorer: kis_lens.editing.values.target_logprobs, summed log-probabilities of each target
    model, cases = run["model"], lifelong_bench.ordered_cases(run["config"], run["model"])
    facts = [case.fact for case in cases]
    new = target_logprobs(model, 0, [edit_prompt(model, f, f.target_new) for f in facts])
    true = target_logprobs(model, 0, [edit_prompt(model, f, f.target_true) for f in facts])
    lengths = lambda target: torch.tensor(  # noqa: E731
        [len(edit_prompt(model, f, getattr(f, target)).target_ids) for f in facts], dtype=torch.float64
    )
    prefers_new = (-new / lengths("target_new")) < (-true / lengths("target_true"))  # mean NLL(new) < NLL(true)
    for step in none.steps[1:]:
        t = step["n_edits"]
        assert step["efficacy"] == pytest.approx(float(prefers_new[:t].double().mean()))


@pytest.mark.slow
def test_p_bookkeeping_for_p_rome_is_an_identity(run):
    """Identity check, not a prediction test: for p-ROME, k_u(W_t − W_u) = Σ_{i>u} P[i,u] r_i exactly.

    It catches bookkeeping errors (P's orientation, which edits came later, the residual history). Original ROME
    updates along C⁻¹k̄, not C⁻¹k, so for it the same sum is only an approximation and must not match exactly."""
    pairs = run["results"]["p-rome"].pairs
    assert len(pairs["predicted"]) > 0
    np.testing.assert_allclose(pairs["predicted"], pairs["measured_output"], rtol=1e-6, atol=1e-9)
    rome = run["results"]["rome"].pairs
    assert not np.allclose(rome["predicted"], rome["measured_output"], rtol=1e-3)
    memit = run["results"]["memit"].pairs  # MEMIT batches edit jointly: only later batches count as later
    assert set(memit["n_edits"]) <= {3, 6}


@pytest.mark.slow
def test_the_controls_of_each_pair_are_what_they_say(run):
    """Each pair (u, t) carries the count of later edits, √Σ‖r_i‖² over them and P's prediction with P's columns
    permuted, checked against the per-edit records directly; the shuffled prediction is not P's."""
    result = run["results"]["p-rome"]
    pairs, norms = result.pairs, [edit["residual_norm"] for edit in result.edits]
    for t, u, count, size in zip(
        pairs["n_edits"], pairs["edit_index"], pairs["later_count"], pairs["later_residual_norm"]
    ):
        assert count == t - 1 - u  # one edit per update: every edit after u up to t
        assert size == pytest.approx(float(np.sqrt(np.sum(np.square(norms[u + 1 : t])))), rel=1e-9)
    assert not np.allclose(pairs["predicted_shuffled"], pairs["predicted"])
    for step in result.steps[1:]:  # success_now of the earlier edits and the newest edit's make the step's efficacy
        t = step["n_edits"]
        now = [ok for n, ok in zip(pairs["n_edits"], pairs["success_now"]) if n == t]
        assert len(now) == t - 1
        assert step["efficacy"] == pytest.approx((sum(now) + result.edits[t - 1]["newest_efficacy"]) / t)
    assert set(pairs) == set(lifelong_steps.PAIR_FIELDS) and len({len(column) for column in pairs.values()}) == 1


@pytest.mark.slow
def test_every_run_carries_its_verdict_inputs(run):
    """Each run's summary holds the collapse sensitivity, the ρ alarm and the controlled P verdict (or why not)."""
    for editor, result in run["results"].items():
        summary = result.summary
        assert set(summary) >= {"collapse_sensitivity", "rho_alarm", "prediction_verdict", "disabling_edits"}
        if editor == "none":
            assert summary["collapse_sensitivity"] is None and summary["prediction_verdict"]["verdict"] == "not judged"
            continue
        assert len(summary["collapse_sensitivity"]) == 6
        if not registry.EDITORS[editor].batches:  # 5 edits with later edits: judged, with clustered intervals
            controls = summary["prediction_controls"]
            assert summary["prediction_verdict"]["verdict"] in ("reproduced", "not reproduced")
            assert controls["spearman"]["predicted"]["n_clusters"] == 5 and controls["n_boot"] == 200
    assert run["results"]["rome"].summary["rho_alarm"]["n_edits"] == DEEP["n_edits"]


@pytest.mark.slow
def test_rome_variants_record_rho_and_differ(run):
    """Every ROME-family edit records ρ, ‖ΔW‖ and the clamp; the three variants write different weights."""
    norms = {}
    for editor in ("rome", "r-rome", "p-rome"):
        edits = run["results"][editor].edits
        assert all({"rho", "delta_norm", "relative_value_shift", "clamped"} <= set(edit) for edit in edits)
        norms[editor] = run["results"][editor].steps[-1]["weight_change_norm"]
    rhos = [edit["rho"] for edit in run["results"]["rome"].edits]
    assert rhos == [edit["rho"] for edit in run["results"]["p-rome"].edits[:1]] + rhos[1:]  # a fact's ρ is the same
    assert all(rho != 1.0 for rho in rhos)  # k̄ ≠ k: the variants cannot coincide
    assert len({round(value, 9) for value in norms.values()}) == 3


@pytest.mark.slow
def test_every_run_holds_the_schema_settings_and_files(run):
    """Each editor wrote its own <stem>.json with every step metric and its settings, the figures, no checkpoint."""
    folder = run["results"]["rome"].path.parent
    for editor, result in run["results"].items():
        saved = json.loads(result.path.read_text())
        assert result.path.name.startswith(f"lifelong_{editor}_seed0_n6_layer2_")
        kinds = [(step["n_edits"], step["kind"]) for step in saved["steps"]]
        if registry.EDITORS[editor].batches:  # batches of 3: measured after each batch, both cross an eval mark
            assert kinds == [(0, "eval"), (3, "eval"), (6, "eval")]
        else:
            assert kinds == [(0, "eval"), (2, "probe"), (3, "eval"), (4, "probe"), (6, "eval")]
        evals = [step for step in saved["steps"] if step["kind"] == "eval" and step["n_edits"] > 0]
        assert all(step["score"] is not None and step["fluency"] is not None for step in evals)
        settings = saved["settings"]
        assert settings["facts"] == [case.case_id for case in lifelong_bench.ordered_cases(run["config"], run["model"])]
        assert settings["model"]["fingerprint"] == model_info(run["model"]).fingerprint  # unedited weights
        assert settings["editor"]["name"] == editor and settings["editor"]["value_prompts_used"] == 3
        assert settings["editor"]["rome_search"]["steps"] == 4 and settings["config"]["covariance_weight"] is None
        assert len(settings["templates"]["rome"]) == 3 and len(settings["templates"]["memit"]) == 2
        per_edit = ("update", "update_delta_norm", "sigma_max", "condition_number", "accumulated_p2", "edit_perplexity")
        assert all(set(per_edit) <= set(edit) for edit in saved["edits"])
        assert all(step["retention_oldest_quarter"] is not None for step in saved["steps"][1:])
        assert saved["summary"]["disabling_edits"] == [] or editor != "none"
    assert not list(folder.glob("*.partial.*"))
    assert (folder / "lifelong_metrics.html").is_file()


def test_collapse_is_the_first_step_past_a_threshold():
    """The collapse step is where efficacy on all edits so far, or perplexity, first crosses its threshold."""
    config = LifelongConfig(retention_threshold=0.5, perplexity_ratio=2.0)
    steps = [
        {"n_edits": 0, "efficacy": None, "perplexity": 10.0},
        {"n_edits": 10, "efficacy": 0.9, "perplexity": 12.0},
        {"n_edits": 20, "efficacy": 0.6, "perplexity": 21.0},
        {"n_edits": 30, "efficacy": 0.4, "perplexity": 15.0},
    ]
    p_matrix = torch.eye(40, dtype=torch.float64)
    assert collapse_summary(config, True, steps, p_matrix)["step"] == 20
    assert collapse_summary(config, False, steps, p_matrix)["step"] is None  # a run that moved no weight
    steps[2]["perplexity"] = 19.0
    assert collapse_summary(config, True, steps, p_matrix)["step"] == 30
    steps[3]["efficacy"] = 0.5
    assert collapse_summary(config, True, steps, p_matrix)["step"] is None


def test_a_disabling_edit_is_a_norm_outlier_followed_by_a_perplexity_jump():
    """The rule flags the update whose ‖ΔW‖ > 10× the running median and after which perplexity jumps ×1.5; each
    half of the rule alone flags nothing."""

    def edits(norms, perplexities):
        return [
            {"case_id": str(i), "update": i, "update_delta_norm": n, "edit_perplexity": p}
            for i, (n, p) in enumerate(zip(norms, perplexities))
        ]

    found = disabling_edits(edits([1, 2, 1, 30, 2], [10, 10, 11, 20, 21]), 10.0, 10.0, 1.5)
    assert [(item["n_edits"], item["running_median"], item["perplexity_before"]) for item in found] == [(4, 1.0, 11)]
    assert disabling_edits(edits([1, 2, 1, 30, 2], [10, 10, 11, 16, 21]), 10.0, 10.0, 1.5) == []
    assert disabling_edits(edits([1, 2, 1, 9, 2], [10, 10, 11, 20, 21]), 10.0, 10.0, 1.5) == []
    batch = [{"update": 0, "update_delta_norm": 1, "edit_perplexity": 10}] * 2 + [
        {"update": 1, "update_delta_norm": 50, "edit_perplexity": 30, "case_id": "x"}
    ] * 2
    assert [item["n_edits"] for item in disabling_edits(batch, 10.0, 10.0, 1.5)] == [4]  # last of its batch


# ---------------------------------------------------------------------------------------------------------
# Resume, and runs that must never overwrite or mix with another
# ---------------------------------------------------------------------------------------------------------

RESUMABLE: dict[str, Any] = {**SMALL, "n_edits": 4, "eval_every": 2, "probe_every": 2, "editors": ("p-rome",)}


def _interrupt(monkeypatch, config: LifelongConfig, model) -> Path:
    """Run until the second measurement has been checkpointed, then die; return the run folder."""
    original_measure = lifelong.measure_step
    calls = {"n": 0}

    def failing_measure(bench, state, kind, clock):
        original_measure(bench, state, kind, clock)
        calls["n"] += 1
        if calls["n"] == 3:  # step 0, step 2 (checkpointed after it), then die at step 4 before saving
            raise KeyboardInterrupt

    monkeypatch.setattr(lifelong, "measure_step", failing_measure)
    with pytest.raises(KeyboardInterrupt):
        run_lifelong(config, model=model)
    monkeypatch.setattr(lifelong, "measure_step", original_measure)
    (checkpoint,) = Path(config.output_dir).rglob("lifelong_p-rome_*.partial.json")
    assert checkpoint.with_name(checkpoint.name.replace(".json", ".safetensors")).is_file()
    return checkpoint.parent


def _count_searches(monkeypatch) -> list[int]:
    searched: list[int] = []
    original = registry.compute_target
    monkeypatch.setattr(registry, "compute_target", lambda *a, **k: searched.append(1) or original(*a, **k))
    return searched


@pytest.mark.slow
def test_the_identity_records_each_c_by_its_content(tiny_model, tmp_path):
    """The bench records C's content hash, under its own key; writing the same C again keeps it (not a file hash)."""
    from kis_lens.editing.runs import safetensors_content_sha256
    from kis_lens.storage import rewrite_metadata

    bench = lifelong_bench.prepare_bench(LifelongConfig(**RESUMABLE, output_dir=str(tmp_path)), tiny_model)
    (cache,) = tmp_path.rglob("layer_0_mom2.safetensors")
    entry = bench.covariance_identity["0"]
    assert set(entry) == {"file", "tokens", "texts", "content_sha256"} and entry["file"] == cache.name
    assert entry["content_sha256"] == safetensors_content_sha256(cache)
    rewrite_metadata(cache, {})  # the same tensors and metadata, written again (its header in another order)
    assert safetensors_content_sha256(cache) == entry["content_sha256"]


@pytest.mark.slow
def test_an_interrupted_run_resumes_from_its_checkpoint(tiny_model, tmp_path, monkeypatch):
    """A run stopped after its second measurement resumes there and ends with the uninterrupted run's numbers."""
    whole = run_lifelong(LifelongConfig(**RESUMABLE, output_dir=str(tmp_path / "a")), model=tiny_model)["p-rome"]
    interrupted = LifelongConfig(**RESUMABLE, output_dir=str(tmp_path / "b"))
    _interrupt(monkeypatch, interrupted, tiny_model)
    searched = _count_searches(monkeypatch)
    resumed = run_lifelong(interrupted, model=tiny_model)["p-rome"]
    assert len(searched) == 2  # only the 2 edits after the checkpoint, not all 4 again
    assert [s["n_edits"] for s in resumed.steps] == [s["n_edits"] for s in whole.steps]
    for a, b in zip(resumed.steps, whole.steps):
        assert a["efficacy"] == b["efficacy"]
        assert a["weight_change_norm"] == pytest.approx(b["weight_change_norm"], rel=1e-6)


@pytest.mark.slow
def test_a_checkpoint_left_in_the_older_model_first_folder_resumes(tiny_model, tmp_path, monkeypatch, capsys):
    """A run an older kis checkpointed at <model>/lifelong/layer_<L>/ is moved to lifelong/<model>/ and resumed."""
    config = LifelongConfig(**RESUMABLE, output_dir=str(tmp_path))
    folder = _interrupt(monkeypatch, config, tiny_model)
    assert folder == lifelong_dir(tmp_path, "tiny-gpt2", RESUMABLE["layer"])
    old = legacy_lifelong_dir(tmp_path, "tiny-gpt2", RESUMABLE["layer"])
    old.parent.mkdir(parents=True)
    os.replace(folder, old)  # where the older kis wrote it
    capsys.readouterr()
    searched = _count_searches(monkeypatch)
    resumed = run_lifelong(config, model=tiny_model)["p-rome"]
    assert len(searched) == 2 and resumed.path.parent == folder and not old.exists()
    assert f"moved {old} to {folder}" in capsys.readouterr().out


@pytest.mark.slow
def test_a_changed_facts_file_makes_a_restart_not_a_resume(tiny_model, tmp_path, monkeypatch):
    """Editing the facts file between a kill and a rerun restarts the run: its edits never come from two fact sets."""
    facts = tmp_path / "facts.json"
    records = json.loads(facts_path("counterfact-known").read_text())
    facts.write_text(json.dumps(records))
    config = LifelongConfig(**RESUMABLE, facts=str(facts), output_dir=str(tmp_path / "out"))
    _interrupt(monkeypatch, config, tiny_model)
    records[-1]["requested_rewrite"]["prompt"] = records[-1]["requested_rewrite"]["prompt"] + " "  # one byte
    facts.write_text(json.dumps(records))
    searched = _count_searches(monkeypatch)
    with pytest.warns(UserWarning, match="facts_sha256"):
        run_lifelong(config, model=tiny_model)
    assert len(searched) == 4  # all 4 edits again


@pytest.mark.slow
def test_a_grown_covariance_makes_a_restart_not_a_resume(tiny_model, tmp_path, monkeypatch):
    """When `kis cache-cov` grows the cached C between a kill and a rerun, the rerun restarts with the new C."""
    config = LifelongConfig(**RESUMABLE, output_dir=str(tmp_path / "out"))
    _interrupt(monkeypatch, config, tiny_model)
    grown = RunConfig(model_name="tiny-gpt2", output_dir=config.output_dir, max_tokens=8000, progress=False)
    ensure_covariances(grown, tiny_model, [0])  # the cache now averages more tokens than the checkpoint's C
    searched = _count_searches(monkeypatch)
    with pytest.warns(UserWarning, match="covariance"):
        result = run_lifelong(config, model=tiny_model)["p-rome"]
    assert len(searched) == 4
    assert result.settings["covariance"]["0"]["tokens"] > 4000


@pytest.mark.slow
def test_runs_with_other_seeds_sit_side_by_side(tiny_model, tmp_path):
    """Two runs that differ only in their seed, in one folder, both keep their results."""
    first = run_lifelong(LifelongConfig(**RESUMABLE, seed=0, output_dir=str(tmp_path)), model=tiny_model)["p-rome"]
    second = run_lifelong(LifelongConfig(**RESUMABLE, seed=1, output_dir=str(tmp_path)), model=tiny_model)["p-rome"]
    assert first.path != second.path and first.path.is_file() and second.path.is_file()
    assert json.loads(first.path.read_text())["settings"]["config"]["seed"] == 0
    assert json.loads(second.path.read_text())["settings"]["config"]["seed"] == 1


class _Payload:
    """A pickle that would create a marker file when loaded: what a crafted checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_a_crafted_checkpoint_is_never_executed(tiny_model, tmp_path):
    """A pickle planted as an old-style checkpoint, or disguised as the safetensors part, runs nothing."""
    config = LifelongConfig(**RESUMABLE, output_dir=str(tmp_path))
    folder = lifelong_dir(tmp_path, "tiny-gpt2", 0)
    folder.mkdir(parents=True)
    marker = tmp_path / "pwned"
    with open(folder / "lifelong_p-rome.partial.pt", "wb") as handle:  # the old checkpoint name
        pickle.dump({"identity": None, "state": _Payload(marker)}, handle)
    with pytest.warns(UserWarning, match="never loaded"):
        run_lifelong(config, model=tiny_model)
    assert not marker.exists()
    stem = next(folder.glob("lifelong_p-rome_*.json")).name.removesuffix(".json")
    # a checkpoint whose JSON is genuine but whose tensors are a pickle: refused with the fix, nothing runs
    from kis_lens.editing.runs import save_checkpoint

    finished = next(folder.glob("lifelong_p-rome_*.json"))
    identity = json.loads(finished.read_text())["settings"]["identity"]
    finished.unlink()  # else the finished run is returned and no checkpoint is even looked at
    (folder / "lifelong_p-rome.partial.pt").unlink()  # its warning was checked above
    save_checkpoint(folder, stem, identity, {"x": torch.zeros(1)}, {"done": 0})
    with open(folder / f"{stem}.partial.safetensors", "wb") as handle:
        pickle.dump(_Payload(marker), handle)
    with pytest.raises(KisError, match="delete it"):
        run_lifelong(config, model=tiny_model)
    assert not marker.exists()


def test_targets_that_tokenize_alike_are_refused(tiny_model, tmp_path):
    """A record whose target_new differs from target_true only by spaces is refused before any edit."""
    records = json.loads(facts_path("counterfact-known").read_text())[:8]
    rewrite = records[3]["requested_rewrite"]
    rewrite["target_new"]["str"] = " " + rewrite["target_true"]["str"] + " "
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(records))
    with pytest.raises(KisError, match="tokenizes exactly like target_true"):
        run_lifelong(LifelongConfig(**RESUMABLE, facts=str(facts), output_dir=str(tmp_path)), model=tiny_model)


def test_bad_settings_are_refused_with_the_fix(tiny_model, tmp_path):
    """Unknown editors, NaN settings, too many edits and an output layer are refused with the fix."""
    with pytest.raises(KisError, match="unknown editor"):
        LifelongConfig(editors=("rome", "fancy"))
    with pytest.raises(KisError, match="finite"):
        LifelongConfig(covariance_weight=float("nan"))
    with pytest.raises(KisError, match="--value_lr must be a finite number"):
        LifelongConfig(value_search=ValueSearch(lr=float("inf")))
    with pytest.raises(KisError, match="ask for fewer"):
        run_lifelong(LifelongConfig(**{**SMALL, "n_edits": 10_000}, output_dir=str(tmp_path)), model=tiny_model)
    with pytest.raises(KisError, match="choose a layer"):
        run_lifelong(LifelongConfig(**{**SMALL, "layer": 1}, output_dir=str(tmp_path)), model=tiny_model)


@pytest.mark.slow
def test_cli_lifelong_runs_every_editor_as_typed(tmp_path, capsys):
    """`kis lifelong --editors rome,r-rome,p-rome,memit,alphaedit,none ...` writes a file per run, a line each."""
    code = main(
        [
            "lifelong",
            "--editors",
            "rome,r-rome,p-rome,memit,alphaedit,none",
            "--model_name",
            "tiny-gpt2",
            "--layer",
            "0",
            "--n_edits",
            "3",
            "--eval_every",
            "3",
            "--probe_every",
            "1",
            "--value_steps",
            "2",
            "--value_prompts",
            "2",
            "--n_unedited",
            "2",
            "--max_tokens",
            "3000",
            "--heldout_texts",
            "2",
            "--fluency_prompts",
            "1",
            "--fluency_tokens",
            "3",
            "--no_progress",
            "--output_dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    for editor in ("rome", "r-rome", "p-rome", "memit", "alphaedit", "none"):
        assert f"  {editor} " in out
        assert len(list(tmp_path.rglob(f"lifelong_{editor}_seed0_n3_layer0_*.json"))) == 1


@pytest.mark.slow
def test_a_finished_run_is_returned_not_run_again(tiny_model, tmp_path, monkeypatch, capsys):
    """Rerunning a finished run (a queue restarted after a session ends) loads it; --no_resume runs it again."""
    config = LifelongConfig(**RESUMABLE, output_dir=str(tmp_path))
    first = run_lifelong(config, model=tiny_model)["p-rome"]
    searched = _count_searches(monkeypatch)
    again = run_lifelong(config, model=tiny_model)["p-rome"]
    assert searched == [] and "finished already" in capsys.readouterr().out
    assert again.path == first.path and again.steps == json.loads(first.path.read_text())["steps"]
    run_lifelong(LifelongConfig(**RESUMABLE, output_dir=str(tmp_path), resume=False), model=tiny_model)
    assert len(searched) == RESUMABLE["n_edits"]


@pytest.mark.slow
def test_a_subject_edited_twice_is_flagged_and_left_out_of_the_verdict(tiny_model, tmp_path):
    """Two records of one subject share a key: the second edit names the first, the pairs count the later edit of
    the same subject, and the P-prediction verdict leaves exactly those pairs out."""
    records = json.loads(facts_path("counterfact-known").read_text())[:6]
    twin = json.loads(json.dumps(records[0]))
    twin["case_id"] = 10**6
    twin["requested_rewrite"]["target_new"] = records[1]["requested_rewrite"]["target_new"]
    records.append(twin)
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(records))
    config = {**RESUMABLE, "n_edits": 7, "probe_every": 1, "eval_every": 7}
    result = run_lifelong(LifelongConfig(**config, facts=str(facts), output_dir=str(tmp_path)), model=tiny_model)
    result = result["p-rome"]
    order = [str(edit["case_id"]) for edit in result.edits]
    first, second = order.index(str(records[0]["case_id"])), order.index(str(10**6))
    earlier, later = min(first, second), max(first, second)
    assert result.edits[later]["repeats_edit"] == earlier
    assert [e["repeats_edit"] for i, e in enumerate(result.edits) if i != later] == [None] * 6
    pairs = result.pairs
    flagged = [i for i, u in enumerate(pairs["edit_index"]) if u == earlier and pairs["n_edits"][i] > later]
    assert flagged and all(pairs["later_same_subject"][i] == 1 for i in flagged)
    assert sum(count > 0 for count in pairs["later_same_subject"]) == len(flagged)
    repeated = result.summary["repeated_subjects"]
    assert repeated["edits"] == [later] and repeated["pairs_left_out"] == len(flagged)
    kept = judged_pairs(pairs)
    assert len(kept["edit_index"]) == len(pairs["edit_index"]) - len(flagged)


def _as_written_by_an_older_kis(folder: Path, model, path: Path, partial: bool) -> Path:
    """Rewrite a run (finished JSON or checkpoint) and its C cache as an older kis keyed them: on the sampled W_out
    fingerprint, the C file's hash taken before its re-key; return the run's old-style path."""
    from kis_lens.editing.runs import content_sha256, load_checkpoint, remove_checkpoint, run_stem, save_checkpoint
    from kis_lens.fingerprint import legacy_fingerprint
    from kis_lens.storage import rewrite_metadata

    legacy = legacy_fingerprint(model)
    (cache,) = Path(folder).rglob("layer_0_mom2.safetensors")
    rewrite_metadata(cache, {"model_fingerprint": legacy})
    saved = json.loads(path.read_text())
    identity = saved["identity"] if partial else saved["settings"]["identity"]
    stem = path.name.removesuffix(".partial.json").removesuffix(".json")
    old = {**identity, "model_fingerprint": legacy}
    # an older kis recorded C's file hash under "sha256" (this one its content hash, under "content_sha256")
    recorded = {key: value for key, value in identity["covariance"]["0"].items() if key != "content_sha256"}
    old["covariance"] = {"0": {**recorded, "sha256": content_sha256(cache)}}
    readable = dict(
        zip(
            ("seed", "n", "layer"),
            (int(p.removeprefix(k)) for p, k in zip(stem.split("_")[2:5], ("seed", "n", "layer"))),
        )
    )
    old_stem = "lifelong_" + run_stem("p-rome", old, readable)
    if partial:
        loaded = load_checkpoint(path.parent, stem, identity)
        save_checkpoint(path.parent, old_stem, old, *loaded)
        remove_checkpoint(path.parent, stem)
        return path.parent / f"{old_stem}.partial.json"
    saved["settings"]["identity"], saved["settings"]["run_stem"] = old, old_stem
    (path.parent / f"{old_stem}.json").write_text(json.dumps(saved))
    path.unlink()
    return path.parent / f"{old_stem}.json"


@pytest.mark.slow
def test_runs_keyed_on_the_legacy_fingerprint_are_re_keyed_not_rerun(tiny_model, tmp_path, monkeypatch, capsys):
    """A finished run and a checkpoint an older kis keyed on the sampled fingerprint (its C cache too) are moved to
    the new stems with a line saying so: the finished run is not rerun, the checkpoint resumes where it stopped."""
    finished = run_lifelong(LifelongConfig(**RESUMABLE, output_dir=str(tmp_path / "a")), model=tiny_model)["p-rome"]
    old_path = _as_written_by_an_older_kis(tmp_path / "a", tiny_model, finished.path, partial=False)
    searched = _count_searches(monkeypatch)
    again = run_lifelong(LifelongConfig(**RESUMABLE, output_dir=str(tmp_path / "a")), model=tiny_model)["p-rome"]
    out = capsys.readouterr().out
    assert searched == [] and "re-keyed" in out and "finished already" in out
    assert again.path.is_file() and again.path != old_path and not old_path.exists()
    assert again.steps == finished.steps and again.settings["rekeyed_from"]["run_stem"] == old_path.stem

    interrupted = LifelongConfig(**RESUMABLE, output_dir=str(tmp_path / "b"))
    folder = _interrupt(monkeypatch, interrupted, tiny_model)
    (checkpoint,) = folder.glob("*.partial.json")
    old_checkpoint = _as_written_by_an_older_kis(tmp_path / "b", tiny_model, checkpoint, partial=True)
    searched = _count_searches(monkeypatch)
    resumed = run_lifelong(interrupted, model=tiny_model)["p-rome"]
    assert len(searched) == 2 and not old_checkpoint.exists() and "re-keyed" in capsys.readouterr().out
    assert [s["efficacy"] for s in resumed.steps] == [s["efficacy"] for s in finished.steps]


@pytest.mark.slow
def test_a_run_whose_inputs_changed_is_not_re_keyed(tiny_model, tmp_path, monkeypatch):
    """Only the keys may differ: an old run whose C was not re-keyed from the legacy fingerprint (its hash differs
    for another reason) starts afresh."""
    from kis_lens.fingerprint import legacy_fingerprint
    from kis_lens.storage import rewrite_metadata

    first = run_lifelong(LifelongConfig(**RESUMABLE, output_dir=str(tmp_path)), model=tiny_model)["p-rome"]
    _as_written_by_an_older_kis(tmp_path, tiny_model, first.path, partial=False)
    (cache,) = tmp_path.rglob("layer_0_mom2.safetensors")
    rewrite_metadata(cache, {"model_fingerprint": legacy_fingerprint(tiny_model), "note": "another C"})
    old_runs = set(tmp_path.rglob("lifelong_p-rome_*.json"))
    searched = _count_searches(monkeypatch)
    run_lifelong(LifelongConfig(**RESUMABLE, output_dir=str(tmp_path)), model=tiny_model)
    assert len(searched) == RESUMABLE["n_edits"] and all(path.exists() for path in old_runs)
