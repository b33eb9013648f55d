"""Causal trace (kis_lens.trace): against a slow per-sample reference, exact identities, seeding, files and CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kis_lens.cli import main
from kis_lens.facts import facts_path, load_facts
from kis_lens.keys import locate_subject
from kis_lens.models import resolve_prepend_bos
from kis_lens.tiny import tiny_model
from kis_lens.tokens import encode
from kis_lens.trace import TraceConfig, causal_trace, fact_noise, trace_fact

N_LAYERS = 4


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model64(request):
    """A random 4-layer tiny TransformerBridge in float64, so the reference agrees to 1e-6 and beyond."""
    return tiny_model(request.param, n_layers=N_LAYERS).to(torch.float64)


def _config(tmp_path, **overrides) -> TraceConfig:
    settings = dict(n_facts=2, samples=3, window=1, only_known=False, output_dir=str(tmp_path), progress=False)
    return TraceConfig(**{**settings, **overrides})


def _reference(model, fact, index: int, noise_std: float, samples: int, window: int, seed: int) -> np.ndarray:
    """IE per centre layer, one fact, one noise sample and one centre at a time: plain batch-1 forwards with hooks."""
    tokenizer = model.tokenizer
    located = locate_subject(tokenizer, fact, resolve_prepend_bos(model, None))
    begin, end, where = located.subject_first, located.subject_last + 1, located.subject_last
    answer = encode(tokenizer, " " + fact.target_true, prepend_bos=False)[0]
    tokens = torch.tensor([located.ids])
    clean = {}

    def grab(activation, hook):
        clean[int(hook.name.split(".")[1])] = activation[0, where].clone()

    with torch.no_grad(), model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_mlp_out", grab) for layer in range(N_LAYERS)]):
        model(tokens)
    noise = fact_noise(seed, index, samples, end - begin, int(model.cfg.d_model), noise_std)

    def p_answer(sample: int, restored: list[int]) -> float:
        def add_noise(activation, hook):
            activation = activation.clone()
            activation[0, begin:end] = activation[0, begin:end] + noise[sample]
            return activation

        def put_back(activation, hook):
            activation = activation.clone()
            activation[0, where] = clean[int(hook.name.split(".")[1])]
            return activation

        hooks = [("hook_embed", add_noise)] + [(f"blocks.{layer}.hook_mlp_out", put_back) for layer in restored]
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            logits = model(tokens)
        return float(torch.softmax(logits[0, -1].double(), -1)[answer])

    p_corrupt = np.mean([p_answer(s, []) for s in range(samples)])
    effects = []
    for center in range(N_LAYERS):
        low = center - window // 2  # ROME: window layers starting w//2 below the centre, clipped to the model
        restored = [layer for layer in range(N_LAYERS) if low <= layer < low + window]
        effects.append(np.mean([p_answer(s, restored) for s in range(samples)]) - p_corrupt)
    return np.array(effects)


@pytest.mark.slow
@pytest.mark.parametrize("window", [1, 3])
def test_indirect_effects_match_a_slow_reference(model64, tmp_path, window):
    """Batched trace (row 0 clean, layers batched) = one forward per sample and centre, to 1e-6 (float64)."""
    config = _config(tmp_path, window=window, seed=5, noise_multiplier=3.0)
    result = causal_trace(config, model=model64)
    facts = load_facts("known-1000")
    assert result.per_fact.shape == (2, N_LAYERS)
    for row, kept in enumerate(result.facts):
        expected = _reference(model64, facts[kept["index"]], kept["index"], result.noise_std, 3, window, seed=5)
        np.testing.assert_allclose(result.per_fact[row], expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(result.mean_indirect_effect, result.per_fact.mean(axis=0), atol=1e-15)
    assert np.abs(result.per_fact).max() > 1e-6  # the comparison is not between zeros


def test_identities(model64, tmp_path):
    """Exact identities: noise 0 => p_corrupt = p_clean, IE = 0; clean row = plain forward; window >= 2·n_layers =>
    the same IE at every layer; window 1 at the last layer, restored before the last token => IE = 0 (nothing
    downstream reads it); how many layers share one forward changes nothing."""
    fact = load_facts("known-1000")[0]
    located = locate_subject(model64.tokenizer, fact, resolve_prepend_bos(model64, None))
    subject = (located.subject_first, located.subject_last + 1)
    assert located.subject_last < len(located.ids) - 1
    answer = encode(model64.tokenizer, " " + fact.target_true, prepend_bos=False)[0]
    args = (model64, located.ids, subject, located.subject_last, answer)
    d_model = int(model64.cfg.d_model)

    silent = trace_fact(*args, torch.zeros(4, subject[1] - subject[0], d_model), window=3)
    assert silent.p_corrupt == pytest.approx(silent.p_clean, abs=1e-14)
    np.testing.assert_allclose(silent.p_restored - silent.p_corrupt, 0.0, atol=1e-14)
    with torch.no_grad():
        plain = torch.softmax(model64(torch.tensor([located.ids]))[0, -1].double(), -1)[answer]
    assert silent.p_clean == pytest.approx(float(plain), abs=1e-12)

    noise = fact_noise(0, 0, 4, subject[1] - subject[0], d_model, 1.0)
    wide = trace_fact(*args, noise, window=2 * N_LAYERS)
    np.testing.assert_allclose(wide.p_restored, wide.p_restored[0], atol=1e-14)
    assert abs(wide.p_corrupt - wide.p_clean) > 1e-6  # the noise does something

    single = trace_fact(*args, noise, window=1)
    assert single.p_restored[-1] == pytest.approx(single.p_corrupt, abs=1e-14)
    one_at_a_time = trace_fact(*args, noise, window=1, max_rows=5)  # one centre per forward, as ROME runs it
    np.testing.assert_allclose(one_at_a_time.p_restored, single.p_restored, atol=1e-12)
    assert single.p_clean == pytest.approx(wide.p_clean, abs=1e-14)


@pytest.mark.slow
def test_noise_is_seeded(tmp_path):
    """Same seed => the same effects; another seed => other effects."""
    model = tiny_model("gpt2", n_layers=3)
    first = causal_trace(_config(tmp_path / "a", seed=1), model=model)
    again = causal_trace(_config(tmp_path / "b", seed=1), model=model)
    other = causal_trace(_config(tmp_path / "c", seed=2), model=model)
    np.testing.assert_array_equal(first.per_fact, again.per_fact)
    np.testing.assert_array_equal(first.p_corrupt, again.p_corrupt)
    assert not np.allclose(first.p_corrupt, other.p_corrupt, atol=1e-9)


@pytest.mark.slow
def test_files_and_cli(tmp_path, capsys):
    """The JSON and the figure are written where documented; `kis trace` runs as typed and prints the peaks."""
    code = main(
        [
            "trace", "--model_name", "tiny-gpt2", "--device", "cpu", "--n_facts", "2", "--samples", "2",
            "--window", "1", "--no_only_known", "--output_dir", str(tmp_path), "--seed", "3",
        ]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    path = tmp_path / "trace" / "tiny-gpt2" / "causal_trace_mlp_w1.json"
    assert str(path) in out and "peak layer" in out
    data = json.loads(path.read_text())
    assert len(data["mean_indirect_effect"]) == 2 and len(data["per_fact"]) == 2
    assert data["settings"]["window"] == 1 and data["settings"]["seed"] == 3
    assert data["peak_layer"] in (0, 1)
    assert path.with_suffix(".html").is_file()


def test_only_known_refuses_a_model_that_knows_nothing(tmp_path):
    """A random model knows none of the facts: the error says how to trace them anyway."""
    from kis_lens.errors import KisError

    with pytest.raises(KisError, match="no_only_known"):
        causal_trace(_config(tmp_path, only_known=True, facts=str(_few_facts(tmp_path))), model=tiny_model("gpt2"))


def _few_facts(tmp_path):
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(json.loads(facts_path("known-1000").read_text())[:5]))
    return path
