"""Real sequential edits (`kis lifelong`) on a tiny model: v* lands, W_0 comes back bitwise, AlphaEdit protects,
`none` changes nothing, the P bookkeeping holds, collapse is found, and the CLI writes what it says."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch

import kis_lens.editing.sequential as sequential
from kis_lens.cli import main
from kis_lens.editing.sequential import EDITORS, LifelongConfig, run_lifelong
from kis_lens.editing.values import edit_prompt, target_logprobs
from kis_lens.errors import KisError
from kis_lens.hooks import mlp_out_hook_name
from kis_lens.keys import locate_subject
from kis_lens.models import load_model, model_info, output_weight, resolve_prepend_bos

SMALL: dict[str, Any] = dict(
    model_name="tiny-gpt2",
    layer=0,
    n_edits=6,
    eval_every=3,
    probe_every=2,
    batch_size=3,
    max_tokens=4000,
    value_steps=4,
    n_prefixes=1,
    prefix_length=3,
    n_unedited=4,
    heldout_texts=3,
    heldout_tokens=24,
    fluency_prompts=2,
    fluency_tokens=6,
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
def run(tiny_model, tmp_path_factory):
    """Every editor on the tiny GPT-2, with a spy on the value search that checks the model between edits."""
    output = tmp_path_factory.mktemp("lifelong")
    config = LifelongConfig(**SMALL, output_dir=str(output))
    original = sequential.rome_target_value
    seen: dict[str, Any] = {"landed": [], "protected": [], "last": None}
    tokens = torch.tensor([[5, 9, 11, 40, 2, 7]])
    with torch.no_grad():
        logits_before = tiny_model(tokens).clone()
    bits_before = output_weight(tiny_model, 0).weight.detach().clone()

    def spy(model, layer, fact, prefixes, search):
        last = seen["last"]
        if last is not None and last["editor"] == "rome":
            # the previous ROME edit must have made the previous fact's real output exactly its v*
            error = (_subject_output(model, layer, last["fact"]) - last["value"]).norm() / last["value"].norm()
            seen["landed"].append(float(error))
        found = original(model, layer, fact, prefixes, search)
        seen["last"] = {"editor": seen["editor"], "fact": fact, "value": found.value}
        return found

    original_run_editor = sequential._run_editor
    original_measure = sequential._measure

    def measure(bench, editor, state, kind, clock):
        if editor == "alphaedit":  # the live weights, read from the model at every measurement
            weight = output_weight(bench.model, bench.config.layer).read().cpu()
            moved = (seen["protected_keys"] @ (weight - seen["weight0"])).norm(dim=1)
            scale = (seen["protected_keys"] @ seen["weight0"]).norm(dim=1)
            seen["protected"].append((state.done, float((moved / scale).max())))
        original_measure(bench, editor, state, kind, clock)

    def run_editor_with_protected(bench, editor, folder, command=None):
        covariance = bench.covariance.double().cpu().numpy()
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        top = torch.from_numpy(eigenvectors[:, eigenvalues >= 0.5 * eigenvalues.max()].T.copy())
        seen["protected_keys"] = top * bench.keys.norm(dim=1).mean()
        seen["weight0"] = bench.weight0.clone()
        seen["editor"], seen["last"] = editor, None
        return original_run_editor(bench, editor, folder, command)

    sequential.rome_target_value = spy
    sequential._run_editor = run_editor_with_protected
    sequential._measure = measure
    try:
        results = run_lifelong(config, model=tiny_model)
    finally:
        sequential.rome_target_value = original
        sequential._run_editor = original_run_editor
        sequential._measure = original_measure
    with torch.no_grad():
        logits_after = tiny_model(tokens)
    return {
        "results": results,
        "output": output,
        "seen": seen,
        "logits": (logits_before, logits_after),
        "bits": (bits_before, output_weight(tiny_model, 0).weight.detach().clone()),
        "model": tiny_model,
        "config": config,
    }


def test_each_sequential_rome_edit_makes_the_real_output_its_target_value(run):
    """After every ROME edit, a plain forward of the edited model gives v* at the fact's subject token (1e-5)."""
    landed = run["seen"]["landed"]
    assert len(landed) == SMALL["n_edits"] - 1  # checked before each next value search
    assert max(landed) < 1e-5


def test_restoring_w0_restores_the_model_bitwise(run):
    """The run edits the caller's model in place and gives it back with the exact original bits."""
    before, after = run["bits"]
    assert torch.equal(before, after)
    assert torch.equal(*run["logits"])


def test_alphaedit_leaves_protected_keys_outputs_unchanged(run):
    """Keys in C's preserved subspace (its top eigenvectors) keep their outputs through AlphaEdit's edits (1e-6)."""
    protected = dict(run["seen"]["protected"])
    assert sorted(protected) == [0, 2, 3, 4, 6]  # every measurement, the final weights included
    assert max(protected.values()) < 1e-6
    assert run["results"]["alphaedit"].steps[-1]["weight_change_norm"] > 0  # it did edit


def test_the_none_editor_changes_nothing(run):
    """`none` leaves W_out, perplexity and the unedited facts alone; its efficacy is the unedited model's."""
    none = run["results"]["none"]
    assert all(step["weight_change_norm"] == 0 for step in none.steps)
    assert all(step["unedited_nll_drift"] == 0 for step in none.steps)
    assert len({step["perplexity"] for step in none.steps}) == 1
    assert none.edits == [] and none.summary["collapse"]["step"] is None
    # independent scorer: kis_lens.editing.values.target_logprobs, summed log-probabilities of each target
    model, cases = run["model"], sequential._ordered_cases(run["config"])
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


def test_p_bookkeeping_for_rome_is_an_identity(run):
    """Identity check, not a prediction test: for rank-one edits with C, k_u(W_t − W_u) = Σ_{i>u} P[i,u] r_i exactly.

    It catches bookkeeping errors (P's orientation, which edits came later, the residual history)."""
    pairs = run["results"]["rome"].pairs
    assert len(pairs["predicted"]) > 0
    np.testing.assert_allclose(pairs["predicted"], pairs["measured_output"], rtol=1e-6, atol=1e-9)
    memit = run["results"]["memit"].pairs  # MEMIT batches edit jointly: only later batches count as later
    assert set(memit["n_edits"]) <= {3, 4, 6}


def test_every_step_holds_the_schema_and_the_files_exist(run):
    """Each editor wrote lifelong_<editor>.json with every step metric, the figures, and no checkpoint left."""
    folder = run["results"]["rome"].path.parent
    for editor in EDITORS:
        saved = json.loads((folder / f"lifelong_{editor}.json").read_text())
        kinds = [(step["n_edits"], step["kind"]) for step in saved["steps"]]
        if editor == "memit":  # batches of 3: measured after each batch, both cross an eval mark
            assert kinds == [(0, "eval"), (3, "eval"), (6, "eval")]
        else:
            assert kinds == [(0, "eval"), (2, "probe"), (3, "eval"), (4, "probe"), (6, "eval")]
        evals = [step for step in saved["steps"] if step["kind"] == "eval" and step["n_edits"] > 0]
        assert all(step["score"] is not None and step["fluency"] is not None for step in evals)
        probes = [step for step in saved["steps"] if step["kind"] == "probe"]
        assert all(step["paraphrase"] is None and step["perplexity"] > 1 for step in probes)
        assert saved["settings"]["facts"] == [case.case_id for case in sequential._ordered_cases(run["config"])]
        assert saved["settings"]["model"]["fingerprint"] == model_info(run["model"]).fingerprint  # unedited weights
    assert not list(folder.glob("*.partial.pt"))
    assert (folder / "lifelong_metrics.html").is_file()
    rome = run["results"]["rome"]
    assert len(rome.edits) == SMALL["n_edits"] and all(edit["value_steps"] >= 1 for edit in rome.edits)


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
    assert sequential._collapse(config, "rome", steps, p_matrix)["step"] == 20
    steps[2]["perplexity"] = 19.0
    assert sequential._collapse(config, "rome", steps, p_matrix)["step"] == 30
    steps[3]["efficacy"] = 0.5
    assert sequential._collapse(config, "rome", steps, p_matrix)["step"] is None
    assert sequential._collapse(config, "none", steps, p_matrix)["step"] is None


def test_an_interrupted_run_resumes_from_its_checkpoint(tiny_model, tmp_path, monkeypatch):
    """A run stopped after its first measurement resumes there and ends with the uninterrupted run's numbers."""
    config = LifelongConfig(
        **{**SMALL, "n_edits": 4, "eval_every": 2, "probe_every": 2}, editors=("rome",), output_dir=str(tmp_path / "a")
    )
    whole = run_lifelong(config, model=tiny_model)["rome"]
    interrupted = LifelongConfig(**{**config.to_dict(), "output_dir": str(tmp_path / "b")})
    original_measure = sequential._measure
    calls = {"n": 0}

    def failing_measure(bench, editor, state, kind, clock):
        original_measure(bench, editor, state, kind, clock)
        calls["n"] += 1
        if calls["n"] == 3:  # step 0, step 2 (checkpointed after it), then die at step 4 before saving
            raise KeyboardInterrupt

    monkeypatch.setattr(sequential, "_measure", failing_measure)
    with pytest.raises(KeyboardInterrupt):
        run_lifelong(interrupted, model=tiny_model)
    monkeypatch.setattr(sequential, "_measure", original_measure)
    folder = tmp_path / "b"
    assert list(folder.rglob("lifelong_rome.partial.pt"))
    searched = []
    original_search = sequential.rome_target_value
    monkeypatch.setattr(
        sequential, "rome_target_value", lambda *args, **kwargs: searched.append(1) or original_search(*args, **kwargs)
    )
    resumed = run_lifelong(interrupted, model=tiny_model)["rome"]
    assert len(searched) == 2  # only the 2 edits after the checkpoint, not all 4 again
    assert [s["n_edits"] for s in resumed.steps] == [s["n_edits"] for s in whole.steps]
    for a, b in zip(resumed.steps, whole.steps):
        assert a["efficacy"] == b["efficacy"]
        assert a["weight_change_norm"] == pytest.approx(b["weight_change_norm"], rel=1e-6)


def test_bad_settings_are_refused_with_the_fix(tiny_model, tmp_path):
    """Unknown editors, too many edits and an output layer are refused with a message that names the fix."""
    with pytest.raises(KisError, match="unknown editor"):
        LifelongConfig(editors=("rome", "fancy"))
    with pytest.raises(KisError, match="ask for fewer"):
        run_lifelong(LifelongConfig(**{**SMALL, "n_edits": 10_000}, output_dir=str(tmp_path)), model=tiny_model)
    with pytest.raises(KisError, match="choose a layer"):
        run_lifelong(LifelongConfig(**{**SMALL, "layer": 1}, output_dir=str(tmp_path)), model=tiny_model)


def test_cli_lifelong_runs_as_typed(tmp_path, capsys):
    """`kis lifelong --editor rome,none ...` writes both JSON files and prints one line per editor."""
    code = main(
        [
            "lifelong",
            "--editor",
            "rome,none",
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
            "--n_prefixes",
            "0",
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
    assert "rome" in out and "none" in out
    assert len(list(tmp_path.rglob("lifelong_rome.json"))) == 1
    assert len(list(tmp_path.rglob("lifelong_none.json"))) == 1
