"""kis_lens's editors equal the original authors' algorithms (tests/mirrors.py, written from their code).

Everything runs on tiny 4-layer models in float64, with fixed context templates and a random SPD C per layer
whose spectrum is set by hand (64 eigenvalues below AlphaEdit's threshold 2e-2, the rest in [0.1, 10]).
Each comparison is ‖ΔW − ΔW_mirror‖ / ‖ΔW_mirror‖ ≤ 1e-5, and each swap test shows that the comparison
fails (> 1e-2) when the mirror runs a wrong variant (p-ROME for ROME, MEMIT without spreading the residual,
AlphaEdit without cache_c or with a relative threshold).

Noise floor: the value search (ROME's compute_v / MEMIT's compute_z) trains a float32 δ with Adam, as the
originals do, and kis_lens computes its loss in float32 (values.py compute_target); a 1e-7 relative change of
the gradient moves δ by 3e-6–5e-6 after 19 steps at lr 0.5 here (measured on the mirror). So the comparisons
that depend on v* (ROME's ΔW, δ at mlp_out) sit at 1e-6–9e-6; where the 0.75 clamp binds (z) they sit at ~1e-7.
Run `pytest -s` to see every measured difference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from kis_lens.editing.registry import EditorSettings, EditSession, get_editor
from kis_lens.editing.values import ValueSearch, compute_target
from kis_lens.facts import load_facts
from kis_lens.tiny import tiny_model
from kis_lens.w_out import output_weight

sys.path.insert(0, str(Path(__file__).parents[1]))
import mirrors  # noqa: E402

ARCHITECTURES = ("gpt2", "llama")
N_LAYERS = 4
ROME_LAYER = 2
MEMIT_LAYERS = (0, 1, 2)  # z at layer 2's residual output, loss at layer 3
TEMPLATES = ["{}", "Once upon a time. {}", "He said. {}"]
GROUPS = [["{}"], ["Once upon a time. {}", "He said. {}", "The weather was fine. {}"]]
NULL_RANK = 64  # eigenvalues of C below the threshold 2e-2
MEMIT_LAMBDA = 2.0  # λ in λC + KKᵀ: comparable to KKᵀ here (‖k‖² ≈ 30–80), so every layer's update is large
TOLERANCE = 1e-5
SWAP_MINIMUM = 1e-2


def relative(a: torch.Tensor, b: torch.Tensor, label: str = "") -> float:
    """Return ‖a − b‖ / ‖b‖ in float64 (printed with its label: pytest -s shows the measured differences)."""
    return report(label, float((a.double() - b.double()).norm() / b.double().norm()))


def report(label: str, value: float) -> float:
    if label:
        print(f"{label}: {value:.2e}")
    return value


def spd_covariance(d_mlp: int, seed: int) -> torch.Tensor:
    """Return Q diag(s) Qᵀ: a random rotation of 64 eigenvalues in [1e-3, 5e-3] and the rest in [0.1, 10]."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d_mlp, d_mlp, generator=generator, dtype=torch.float64))
    s = torch.cat([torch.logspace(-3, -2.3, NULL_RANK), torch.logspace(-1, 1, d_mlp - NULL_RANK)]).double()
    return (q * s) @ q.T


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Float64 matmuls of this size crawl when two OpenMP threads contend on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Tiny:
    """A float64 tiny model, its C per layer, and a way back to its unedited W_out."""

    def __init__(self, architecture: str) -> None:
        self.model = tiny_model(architecture, n_layers=N_LAYERS, seed=0)
        self.model.to(torch.float64)
        self.original = {layer: output_weight(self.model, layer).read() for layer in range(N_LAYERS)}
        d_mlp = int(self.model.cfg.d_mlp)
        self.covariances = {layer: spd_covariance(d_mlp, seed=100 + layer) for layer in range(N_LAYERS)}

    def reset(self) -> None:
        for layer, weight in self.original.items():
            output_weight(self.model, layer).write(weight)

    def weights(self) -> dict[int, torch.Tensor]:
        return {layer: output_weight(self.model, layer).read() for layer in range(N_LAYERS)}

    def restore(self, weights: dict[int, torch.Tensor]) -> None:
        for layer, weight in weights.items():
            output_weight(self.model, layer).write(weight)


_TINY: dict[str, Tiny] = {}


def tiny(architecture: str) -> Tiny:
    if architecture not in _TINY:
        _TINY[architecture] = Tiny(architecture)
    _TINY[architecture].reset()
    return _TINY[architecture]


@pytest.fixture(scope="module")
def facts():
    return load_facts("counterfact-known")[:4]


def settings(**overrides) -> EditorSettings:
    base = dict(
        layer=ROME_LAYER,
        memit_span=len(MEMIT_LAYERS),
        rome_search=ValueSearch(),
        memit_search=ValueSearch(clamp_norm_factor=0.75),
        covariance_weight=MEMIT_LAMBDA,
        null_threshold=2e-2,
        null_relative=False,
        null_l2=10.0,
    )
    base.update(overrides)
    return EditorSettings(**base)


def session_for(t: Tiny, editor: str, **overrides) -> EditSession:
    return EditSession.create(
        t.model,
        settings(**overrides),
        covariances=dict(t.covariances),
        editors=[editor],
        rome_templates=TEMPLATES,
        memit_templates=GROUPS,
    )


# ---------------------------------------------------------------------------------------------------------
# 1. ROME, r-ROME, p-ROME
# ---------------------------------------------------------------------------------------------------------

ROME_NAMES = tuple(mirrors.ROME_VARIANTS)
_ROME: dict[str, dict[str, dict[str, torch.Tensor]]] = {}


def rome_deltas(architecture: str, fact) -> dict[str, dict[str, torch.Tensor]]:
    """Return {"kis": {variant: ΔW}, "mirror": {variant: ΔW}}, each from the unedited model (cached)."""
    if architecture not in _ROME:
        t = tiny(architecture)
        assert settings().memit_layers == MEMIT_LAYERS
        out: dict[str, dict[str, torch.Tensor]] = {"kis": {}, "mirror": {}}
        for name in ROME_NAMES:
            t.reset()
            record = get_editor(name).update(session_for(t, name), [fact])
            out["kis"][name] = record.deltas[ROME_LAYER]
            # the update is written into the model's W_out
            written = output_weight(t.model, ROME_LAYER).read() - t.original[ROME_LAYER]
            assert relative(written, out["kis"][name]) < 1e-12
            t.reset()
            cov = t.covariances[ROME_LAYER]
            out["mirror"][name] = mirrors.execute_rome(t.model, fact, ROME_LAYER, TEMPLATES, cov, variant=name)
        t.reset()
        _ROME[architecture] = out
    return _ROME[architecture]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ROME_NAMES)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_rome_family_equals_mirror(architecture, variant, facts):
    deltas = rome_deltas(architecture, facts[0])
    assert relative(deltas["kis"][variant], deltas["mirror"][variant], f"{architecture} {variant}") <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_rome_variants_differ_and_swaps_fail(architecture, facts):
    """k̄ ≠ k here, so the three key choices give different ΔW; each kis editor fails against the others' mirrors."""
    deltas = rome_deltas(architecture, facts[0])
    for name in ROME_NAMES:
        for other in ROME_NAMES:
            if other != name:
                label = f"{architecture} kis {name} vs mirror {other}"
                assert relative(deltas["kis"][name], deltas["mirror"][other], label) > SWAP_MINIMUM


# ---------------------------------------------------------------------------------------------------------
# 2. MEMIT
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_memit_equals_mirror(architecture, facts):
    t = tiny(architecture)
    batch = facts[:3]
    record = get_editor("memit").update(session_for(t, "memit"), batch)
    edited = t.weights()
    assert sorted(record.deltas) == list(MEMIT_LAYERS)
    for layer in MEMIT_LAYERS:  # written layer by layer into the model
        assert relative(edited[layer] - t.original[layer], record.deltas[layer]) < 1e-12

    t.reset()
    z_cache: dict[str, torch.Tensor] = {}
    mirror = mirrors.execute_memit(t.model, batch, MEMIT_LAYERS, GROUPS, t.covariances, MEMIT_LAMBDA, z_cache=z_cache)
    for layer in MEMIT_LAYERS:
        assert relative(record.deltas[layer], mirror[layer], f"{architecture} memit L{layer}") <= TOLERANCE
    for layer in MEMIT_LAYERS:  # the mirror's weights after the edit are kis's too
        assert relative(output_weight(t.model, layer).read(), edited[layer]) <= TOLERANCE

    # swap: MEMIT without spreading the residual over the remaining layers (same unedited model: same z)
    t.reset()
    unspread = mirrors.execute_memit(
        t.model, batch, MEMIT_LAYERS, GROUPS, t.covariances, MEMIT_LAMBDA, spread_residual=False, z_cache=z_cache
    )
    swap = max(relative(record.deltas[layer], unspread[layer]) for layer in MEMIT_LAYERS)
    assert report(f"{architecture} memit vs unspread mirror (max over layers)", swap) > SWAP_MINIMUM
    t.reset()


# ---------------------------------------------------------------------------------------------------------
# 3. AlphaEdit over two batches
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_alphaedit_equals_mirror_over_two_batches(architecture, facts):
    t = tiny(architecture)
    batches = [facts[:2], facts[2:4]]
    session = session_for(t, "alphaedit")
    for layer in MEMIT_LAYERS:
        assert session.null_spaces[layer].rank == NULL_RANK
    records = [get_editor("alphaedit").update(session, batch) for batch in batches]

    t.reset()
    projectors = torch.stack([mirrors.get_project(t.covariances[layer], 2e-2) for layer in MEMIT_LAYERS])
    for projector in projectors:
        assert torch.linalg.matrix_rank(projector).item() == NULL_RANK
    d_mlp = projectors.shape[1]
    cache_c = torch.zeros(len(MEMIT_LAYERS), d_mlp, d_mlp, dtype=torch.float64)
    mirror_deltas, before_batch, z_caches = [], [], []
    for batch in batches:
        before_batch.append(t.weights())
        z_caches.append({})
        deltas, cache_c = mirrors.apply_alphaedit(
            t.model, batch, MEMIT_LAYERS, GROUPS, projectors, cache_c, 10.0, z_cache=z_caches[-1]
        )
        mirror_deltas.append(deltas)
    for index, (record, mirror) in enumerate(zip(records, mirror_deltas)):
        for layer in MEMIT_LAYERS:
            label = f"{architecture} alphaedit batch {index + 1} L{layer}"
            assert relative(record.deltas[layer], mirror[layer], label) <= TOLERANCE
    for i, layer in enumerate(MEMIT_LAYERS):  # cache_c after both batches
        assert relative(session.earlier_keys_outer[layer], cache_c[i], f"{architecture} cache_c L{layer}") <= TOLERANCE

    # swap 1: the second batch without cache_c (the keys of the first batch are not protected); z is computed
    # before any layer of the batch is written, on the same model as in the real run, so it is reused
    t.restore(before_batch[1])
    zeros = torch.zeros_like(cache_c)
    no_cache, _ = mirrors.apply_alphaedit(
        t.model, batches[1], MEMIT_LAYERS, GROUPS, projectors, zeros, 10.0, z_cache=z_caches[1]
    )
    swap = max(relative(records[1].deltas[layer], no_cache[layer]) for layer in MEMIT_LAYERS)
    assert report(f"{architecture} alphaedit batch 2 vs mirror without cache_c", swap) > SWAP_MINIMUM

    # swap 2: the first batch with the threshold relative to the largest singular value
    t.reset()
    relative_projectors = torch.stack(
        [mirrors.get_project(t.covariances[layer], 2e-2, relative=True) for layer in MEMIT_LAYERS]
    )
    assert torch.linalg.matrix_rank(relative_projectors[0]).item() > NULL_RANK
    rel, _ = mirrors.apply_alphaedit(
        t.model, batches[0], MEMIT_LAYERS, GROUPS, relative_projectors, zeros, 10.0, z_cache=z_caches[0]
    )
    swap = max(relative(records[0].deltas[layer], rel[layer]) for layer in MEMIT_LAYERS)
    assert report(f"{architecture} alphaedit batch 1 vs mirror with relative threshold", swap) > SWAP_MINIMUM
    t.reset()


# ---------------------------------------------------------------------------------------------------------
# 4. The value search alone: compute_v (mlp_out) and compute_z (resid_post)
# ---------------------------------------------------------------------------------------------------------

SITES = {  # site: (mirror hook, templates, clamp_norm_factor)
    "mlp_out": (mirrors.MLP_OUT, TEMPLATES, 4.0),
    "resid_post": (mirrors.RESID, [template for group in GROUPS for template in group], 0.75),
}
_SEARCH: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, int]] = {}


@pytest.mark.slow
@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("site", tuple(SITES))
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_compute_target_equals_mirror(architecture, site, fast, facts):
    t = tiny(architecture)
    hook, templates, clamp = SITES[site]
    if (architecture, site) not in _SEARCH:
        hp = mirrors.Hparams(clamp_norm_factor=clamp)
        _SEARCH[architecture, site] = mirrors.value_search(t.model, facts[1], ROME_LAYER, templates, hp, hook)
    target_init, delta, iterations = _SEARCH[architecture, site]
    search = ValueSearch(clamp_norm_factor=clamp, fast=fast)
    target = compute_target(t.model, ROME_LAYER, facts[1], templates, search, site=site)
    assert target.steps == iterations
    assert relative(target.initial_output, target_init) <= 1e-6  # kis keeps target_init in float32
    assert relative(target.delta, delta, f"{architecture} {site} fast={fast} delta") <= TOLERANCE
    assert relative(target.value, target_init + delta) <= TOLERANCE
