"""Closed-form editors against slow float64 references: the P identity, MEMIT's residual, AlphaEdit's null space."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kis_lens.corpus import embedded_sample_texts
from kis_lens.covariance import estimate_second_moments
from kis_lens.editing.editors import (
    alphaedit_delta,
    memit_delta,
    memit_residual,
    null_space_projector,
    rank_one_delta,
    rome_delta,
    whitened_orthogonal_keys,
)
from kis_lens.editing.values import ValueSearch, compute_target, edit_prompt, target_logprobs
from kis_lens.editing.weights import applied_delta
from kis_lens.errors import KisError
from kis_lens.facts import load_facts
from kis_lens.keys import locate_subject
from kis_lens.tiny import tiny_model
from kis_lens.w_out import output_weight

LAYER = 1
N_FACTS = 6


def _transformer_lens_has(name: str) -> bool:
    import transformer_lens

    try:
        return hasattr(transformer_lens, name)
    except ImportError:  # TL 4 raises ImportError for the removed HookedTransformer
        return False


def _make_model(architecture: str, wrapper: str):
    if wrapper == "hooked":
        from kis_lens.tiny import tiny_hooked_transformer

        model = tiny_hooked_transformer(architecture, n_layers=3)
    else:
        model = tiny_model(architecture, n_layers=3)
    return model.to(torch.float64)


# TL 4 has only the bridge; TL 3.9 (/tmp/tl39 in development) only the HookedTransformer.
WRAPPERS = [
    name
    for name, cls in (("bridge", "TransformerBridge"), ("hooked", "HookedTransformer"))
    if _transformer_lens_has(cls)
]


@pytest.fixture(scope="module", params=[(a, w) for a in ("gpt2", "llama") for w in WRAPPERS], ids=lambda p: "-".join(p))
def setup(request):
    """A float64 tiny model, its layer-1 covariance, and a few facts' keys and MLP outputs read one prompt at a time."""
    architecture, wrapper = request.param
    model = _make_model(architecture, wrapper)
    covariance = estimate_second_moments(model, embedded_sample_texts(16), [LAYER], progress=False)[LAYER].compute(
        torch.float64
    )
    facts = load_facts()[:N_FACTS]
    keys, outputs = _read_subject_activations(model, facts)
    return model, covariance, facts, keys, outputs


def _read_subject_activations(model, facts):
    """Return keys and MLP outputs at each fact's subject-last token, one unpadded forward per fact."""
    keys, outputs = [], []
    names = (f"blocks.{LAYER}.mlp.hook_post", f"blocks.{LAYER}.hook_mlp_out")
    for fact in facts:
        located = locate_subject(model.tokenizer, fact, prepend_bos=False)
        tokens = torch.tensor([located.ids])
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
        keys.append(cache[names[0]][0, located.subject_last].double())
        outputs.append(cache[names[1]][0, located.subject_last].double())
    return torch.stack(keys), torch.stack(outputs)


def _numpy_p(keys: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    """P[i, j] pair by pair with a dense solve."""
    n = len(keys)
    p = np.empty((n, n))
    for i in range(n):
        solved = np.linalg.solve(covariance, keys[i])
        for j in range(n):
            p[i, j] = solved @ keys[j] / (solved @ keys[i])
    return p


@pytest.mark.slow
def test_accessor_matches_the_forward(setup):
    """hook_post @ W_out + b_out reproduces hook_mlp_out, so the accessor holds the weight the forward uses."""
    model, _, _, keys, outputs = setup
    handle = output_weight(model, LAYER)
    predicted = keys @ handle.read() + handle.read_bias()
    torch.testing.assert_close(predicted, outputs, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_rank_one_edit_moves_fact_j_by_p_times_fact_i(setup):
    """After a rank-one edit of fact i, Δoutput(j) = P[i, j] · Δoutput(i) in the real forward, for every i and j."""
    model, covariance, facts, keys, outputs = setup
    p_reference = _numpy_p(keys.numpy(), covariance.numpy())
    generator = torch.Generator().manual_seed(0)
    handle = output_weight(model, LAYER)
    for i in range(N_FACTS):
        value = outputs[i] + torch.randn(outputs.shape[1], generator=generator, dtype=torch.float64)
        delta = rome_delta(handle.read(), handle.read_bias(), keys[i], value, covariance)
        with applied_delta(model, LAYER, delta):
            _, edited = _read_subject_activations(model, facts)
        change = edited - outputs
        torch.testing.assert_close(edited[i], value, rtol=1e-9, atol=1e-9)
        for j in range(N_FACTS):
            expected = p_reference[i, j] * change[i]
            error = (change[j] - expected).norm() / change[i].norm()
            assert error < 1e-5, f"fact {i} -> {j}: relative error {error:.2e}"
        assert np.abs(p_reference[i]).max() >= 1.0 - 1e-12  # the diagonal is 1: the identity is not trivially zero


@pytest.mark.slow
def test_memit_residual_follows_least_squares(setup):
    """A MEMIT edit leaves λ(λI + G)⁻¹R on its keys, and its ΔW equals the primal solve (λC + KᵀK)⁻¹KᵀR."""
    model, covariance, facts, keys, outputs = setup
    handle = output_weight(model, LAYER)
    generator = torch.Generator().manual_seed(1)
    values = outputs + torch.randn(outputs.shape, generator=generator, dtype=torch.float64)
    residuals = values - outputs
    k, c, r = keys.numpy(), covariance.numpy(), residuals.numpy()
    for weight_lambda in (0.0, 0.3, 5.0):
        delta = memit_delta(handle.read(), handle.read_bias(), keys, values, covariance, weight_lambda)
        primal = np.linalg.solve(weight_lambda * c + k.T @ k, k.T @ r) if weight_lambda else None
        if primal is not None:
            np.testing.assert_allclose(delta.numpy(), primal, rtol=1e-6, atol=1e-9 * np.abs(primal).max())
        with applied_delta(model, LAYER, delta):
            _, edited = _read_subject_activations(model, facts)
        gram = np.array([[np.linalg.solve(c, k[a]) @ k[b] for b in range(len(k))] for a in range(len(k))])
        expected = weight_lambda * np.linalg.solve(gram + weight_lambda * np.eye(len(k)), r)
        np.testing.assert_allclose((values - edited).numpy(), expected, atol=1e-7 * np.abs(r).max())
        np.testing.assert_allclose(
            memit_residual(keys, residuals, covariance, weight_lambda).numpy(), expected, atol=1e-9 * np.abs(r).max()
        )


@pytest.mark.slow
def test_current_output_as_target_is_a_no_op(setup):
    """v = the current output gives ΔW = 0 and leaves every fact's output unchanged."""
    model, covariance, facts, keys, outputs = setup
    handle = output_weight(model, LAYER)
    delta = rome_delta(handle.read(), handle.read_bias(), keys[2], outputs[2], covariance)
    assert delta.abs().max() < 1e-9 * handle.read().abs().max()
    with applied_delta(model, LAYER, delta):
        _, edited = _read_subject_activations(model, facts)
    torch.testing.assert_close(edited, outputs, rtol=0, atol=1e-10)


@pytest.mark.slow
def test_apply_then_restore_is_exact_even_after_an_error(setup):
    """The context manager restores the original bits, also when the block raises."""
    model, covariance, _, keys, outputs = setup
    handle = output_weight(model, LAYER)
    before = handle.weight.detach().clone()
    delta = rome_delta(handle.read(), handle.read_bias(), keys[0], outputs[0] + 1.0, covariance)
    with applied_delta(model, LAYER, delta):
        assert not torch.equal(handle.weight, before)
    assert torch.equal(handle.weight, before)
    with pytest.raises(RuntimeError), applied_delta(model, LAYER, delta):
        raise RuntimeError("boom")
    assert torch.equal(handle.weight, before)


@pytest.mark.slow
def test_orthogonal_keys_do_not_interfere(setup):
    """Whitened Gram–Schmidt keys are C⁻¹-orthogonal, so a rank-one edit of one moves the others by < 1e-8."""
    model, covariance, _, keys, _ = setup
    orthogonal = whitened_orthogonal_keys(keys, covariance)
    c = covariance.numpy()
    k_prime = orthogonal.numpy()
    gram = np.array([[np.linalg.solve(c, k_prime[a]) @ k_prime[b] for b in range(N_FACTS)] for a in range(N_FACTS)])
    original_gram = np.array([np.linalg.solve(c, keys.numpy()[a]) @ keys.numpy()[a] for a in range(N_FACTS)])
    np.testing.assert_allclose(np.diag(gram), original_gram, rtol=1e-9)  # C⁻¹-norms kept
    generator = torch.Generator().manual_seed(2)
    for i in range(N_FACTS):
        residual = torch.randn(int(model.cfg.d_model), generator=generator, dtype=torch.float64)
        delta = rank_one_delta(orthogonal[i], residual, covariance)
        moved = orthogonal @ delta
        for j in range(N_FACTS):
            if j != i:
                assert moved[j].norm() / moved[i].norm() < 1e-8
    real_p = _numpy_p(keys.numpy(), c)
    assert np.abs(real_p - np.eye(N_FACTS)).max() > 1e-3  # the real keys do interfere


@pytest.mark.slow
def test_batch_of_one_is_the_rank_one_edit(setup):
    """MEMIT on one fact equals ROME at λ = 0, and ROME scaled by g/(g + λ) otherwise (g = kᵀC⁻¹k)."""
    model, covariance, _, keys, outputs = setup
    handle = output_weight(model, LAYER)
    weight, bias = handle.read(), handle.read_bias()
    value = outputs[3] + 0.5
    rank_one = rome_delta(weight, bias, keys[3], value, covariance)
    g = float(keys[3].numpy() @ np.linalg.solve(covariance.numpy(), keys[3].numpy()))
    for weight_lambda in (0.0, 2.0):
        batch = memit_delta(weight, bias, keys[3:4], value[None], covariance, weight_lambda)
        torch.testing.assert_close(batch, rank_one * g / (g + weight_lambda), rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_alphaedit_stays_in_the_null_space(setup):
    """AlphaEdit's ΔW has no component along the preserved eigenvectors and matches a dense numpy solve."""
    model, covariance, _, keys, outputs = setup
    handle = output_weight(model, LAYER)
    c = covariance.numpy()
    eigenvalues, eigenvectors = np.linalg.eigh(c)
    threshold = float(np.quantile(eigenvalues, 0.5))  # half the directions are "preserved"
    null = null_space_projector(covariance, threshold=threshold)
    basis = eigenvectors[:, eigenvalues < threshold]
    projector = basis @ basis.T
    assert null.rank == basis.shape[1]
    values = outputs[:3] + 1.0
    previous = keys[3:]
    delta = alphaedit_delta(handle.read(), handle.read_bias(), keys[:3], values, null, previous_keys=previous, l2=0.1)
    preserved = eigenvectors[:, eigenvalues >= threshold]
    assert np.abs(preserved.T @ delta.numpy()).max() < 1e-9 * np.abs(delta.numpy()).max()
    k, kp = keys[:3].numpy(), previous.numpy()
    residuals = (values - outputs[:3]).numpy()
    system = projector @ (k.T @ k + kp.T @ kp) + 0.1 * np.eye(len(c))
    reference = projector @ np.linalg.solve(system, projector @ k.T @ residuals)
    np.testing.assert_allclose(delta.numpy(), reference, atol=1e-8 * np.abs(reference).max())


@pytest.mark.slow
def test_value_search_raises_target_new(setup):
    """A few steps of the value search (ROME's compute_v, three templates) raise log p(target_new).

    The KL and decay terms are off: on a random tiny model ‖m‖ is small, so ROME's ‖δ‖/‖m‖² decay would win."""
    model, _, facts, _, outputs = setup
    templates = ["{}", "Once upon a time. {}", "He said. {}"]
    search = ValueSearch(steps=5, kl_factor=0.0, weight_decay=0.0)
    found = [compute_target(model, LAYER, fact, templates, search) for fact in facts[:2]]
    current = torch.stack([target.initial_output for target in found])
    torch.testing.assert_close(current, outputs[:2], rtol=1e-5, atol=1e-6)
    prompts = [edit_prompt(model, fact, fact.target_new) for fact in facts[:2]]
    before = target_logprobs(model, LAYER, prompts)
    after = target_logprobs(model, LAYER, prompts, output_shift=torch.stack([target.delta for target in found]))
    assert (after > before).all()


def test_bad_inputs_raise_kis_error(setup):
    """Mismatched shapes and impossible settings give a KisError."""
    model, covariance, _, keys, outputs = setup
    handle = output_weight(model, LAYER)
    with pytest.raises(KisError, match="pair up"):
        memit_delta(handle.read(), handle.read_bias(), keys[:2], outputs[:3], covariance)
    with pytest.raises(KisError, match="λ"):
        memit_delta(handle.read(), handle.read_bias(), keys[:2], outputs[:2], covariance, -1.0)
    with pytest.raises(KisError, match="delta has shape"):
        with applied_delta(model, LAYER, torch.zeros(3, 3, dtype=torch.float64)):
            pass
    with pytest.raises(KisError, match="out of range"):
        output_weight(model, 99)
