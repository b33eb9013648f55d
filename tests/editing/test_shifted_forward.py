"""The suffix-only shifted forward is the model's whole forward under a shift hook: same logits, gradients, initial."""

from __future__ import annotations

import pytest
import torch
from jaxtyping import Float
from torch import Tensor

from kis_lens.editing import shifted_forward as module
from kis_lens.editing.shifted_forward import (
    ShiftedForward,
    fast_shifted_forward,
    full_shifted_forward,
    shifted_forward,
    site_hook_name,
)
from kis_lens.editing.values import frozen_parameters
from kis_lens.errors import KisError
from kis_lens.tiny import tiny_config_kwargs, tiny_model, tiny_tokenizer

TOLERANCE = 1e-5  # max |fast - full| / max |full|, for the logits and for the gradient
SITES = ("mlp_out", "resid_post")

# Right-padded rows of different lengths; row 4 has no read (it must not matter), row 1 shifts at position 0.
LENGTHS = (9, 6, 12, 4, 7)
SHIFTS = (3, 0, 5, 3, 2)
READS = ((2, 11), (0, 3), (0, 8), (1, 2), (2, 5), (3, 3), (0, 5), (1, 5))  # (row, position), out of order


def _tiny_llama_gqa(n_layers: int = 4):
    """Return a Llama-style native bridge with grouped-query attention (2 kv heads) and half-width rotary."""
    from transformer_lens import TransformerBridge, TransformerBridgeConfig

    kwargs = dict(tiny_config_kwargs("llama", n_layers=n_layers), rotary_dim=8)
    config = TransformerBridgeConfig(**kwargs, n_key_value_heads=2, model_name="tiny-llama-gqa")
    return TransformerBridge.boot_native(config, tokenizer=tiny_tokenizer(), device="cpu").eval()


@pytest.fixture(scope="module", params=["gpt2", "llama", "llama-gqa"])
def model4(request):
    """A random 4-layer native bridge: GPT-2-style, Llama-style, and Llama-style with GQA and partial rotary."""
    model = _tiny_llama_gqa() if request.param == "llama-gqa" else tiny_model(request.param, n_layers=4)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _batch(vocab: int, lengths=LENGTHS, shifts=SHIFTS, reads=READS, seed: int = 0):
    """Return (tokens, mask, shift_positions, read_rows, read_positions) for right-padded random rows."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (len(lengths), max(lengths)), generator=generator)
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    tokens = tokens * mask  # pad id 0 past each row's end
    rows, positions = zip(*reads)
    return tokens, mask, torch.tensor(shifts), torch.tensor(rows), torch.tensor(positions)


def _relative(expected: Tensor, actual: Tensor) -> float:
    return float((expected - actual).abs().max() / expected.abs().max())


def _logits_and_gradient(forward: ShiftedForward, shift: Float[Tensor, "batch d_model"]) -> tuple[Tensor, Tensor]:
    """Return the logits at `shift` and the gradient of a ROME-like loss (target NLL + a KL-like term)."""
    shift = shift.detach().clone().requires_grad_(True)
    logits = forward(shift)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.arange(len(logits)) * 37 % logits.shape[-1]
    loss = -logprobs[torch.arange(len(logits)), targets].sum() + logprobs.exp()[:, :50].sum()
    loss.backward()
    return logits.detach(), shift.grad


def _random_shift(initial: Tensor, seed: int = 1) -> Tensor:
    """Return a shift per row with half the norm of the row's unshifted activation (ROME's δ are of that size)."""
    direction = torch.randn(initial.shape, generator=torch.Generator().manual_seed(seed), dtype=initial.dtype)
    return 0.5 * direction * initial.norm(dim=1, keepdim=True) / direction.norm(dim=1, keepdim=True)


def _assert_same(model, layer: int, site: str, batch) -> None:
    full = full_shifted_forward(model, layer, site, *batch)
    fast = fast_shifted_forward(model, layer, site, *batch)
    assert fast is not None, "the fast path should support this model"
    assert torch.equal(full.initial, fast.initial)
    shift = _random_shift(full.initial)
    full_logits, full_gradient = _logits_and_gradient(full, shift)
    fast_logits, fast_gradient = _logits_and_gradient(fast, shift)
    assert fast_logits.shape == full_logits.shape == (len(batch[3]), model.cfg.d_vocab)
    assert _relative(full_logits, fast_logits) < TOLERANCE
    assert _relative(full_gradient, fast_gradient) < TOLERANCE
    assert not fast_gradient[batch[3].max() + 1 :].any(), "rows without a read get no gradient"


@pytest.mark.slow
@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_fast_matches_full_logits_and_gradient(model4, layer, site):
    _assert_same(model4, layer, site, _batch(model4.cfg.d_vocab))


@pytest.mark.slow
def test_fast_matches_full_with_every_shift_at_position_zero(model4):
    """No row has a prefix: the cached keys/values are empty."""
    reads = ((0, 0), (0, 4), (1, 5), (2, 2), (3, 3), (4, 6))
    _assert_same(model4, 1, "mlp_out", _batch(model4.cfg.d_vocab, shifts=(0, 0, 0, 0, 0), reads=reads))


def test_fast_matches_full_with_one_read_at_the_shift(model4):
    """The smallest case: one row read only where it is shifted."""
    _assert_same(model4, 2, "resid_post", _batch(model4.cfg.d_vocab, reads=((2, 5),)))


@pytest.mark.slow
@pytest.mark.parametrize("site", SITES)
def test_initial_is_the_hooked_activation(model4, site):
    batch = _batch(model4.cfg.d_vocab)
    tokens, mask, shifts = batch[:3]
    captured = {}

    def keep(activation: Tensor, hook) -> None:
        captured["site"] = activation.detach().clone()

    with torch.no_grad(), model4.hooks(fwd_hooks=[(site_hook_name(1, site), keep)]):
        model4(tokens, attention_mask=mask)
    expected = captured["site"][torch.arange(len(shifts)), shifts]
    for forward in (full_shifted_forward(model4, 1, site, *batch), fast_shifted_forward(model4, 1, site, *batch)):
        assert torch.equal(forward.initial, expected)


@pytest.mark.slow
def test_zero_shift_gives_the_model_logits(model4):
    batch = _batch(model4.cfg.d_vocab)
    with torch.no_grad():
        expected = model4(batch[0], attention_mask=batch[1])[batch[3], batch[4]]
        for forward in (
            full_shifted_forward(model4, 1, "mlp_out", *batch),
            shifted_forward(model4, 1, "mlp_out", *batch),
        ):
            assert _relative(expected, forward(torch.zeros_like(forward.initial))) < TOLERANCE


@pytest.mark.parametrize(
    "flag, value",
    [("parallel_attn_mlp", True), ("architecture", "GPT2LMHeadModel"), ("attn_scores_soft_cap", 50.0)],
)
@pytest.mark.slow
def test_unsupported_configuration_falls_back_to_full(model4, monkeypatch, flag, value):
    batch = _batch(model4.cfg.d_vocab)
    monkeypatch.setattr(model4.cfg, flag, value)
    assert fast_shifted_forward(model4, 1, "mlp_out", *batch) is None
    chosen = shifted_forward(model4, 1, "mlp_out", *batch)
    assert type(chosen) is type(full_shifted_forward(model4, 1, "mlp_out", *batch))


def test_legacy_hooked_transformer_is_not_supported():
    from kis_lens.tiny import tiny_hooked_transformer

    try:
        model = tiny_hooked_transformer("gpt2", n_layers=2)
    except ImportError:
        pytest.skip("this TransformerLens has no HookedTransformer")
    batch = _batch(model.cfg.d_vocab)
    assert fast_shifted_forward(model, 0, "mlp_out", *batch) is None
    with frozen_parameters(model):
        forward = shifted_forward(model, 0, "mlp_out", *batch)
        assert forward(torch.zeros_like(forward.initial)).shape == (len(batch[3]), model.cfg.d_vocab)


@pytest.mark.slow
def test_failed_self_check_warns_and_falls_back(model4, monkeypatch):
    """A model the flags let through but whose fast logits differ from its own must get the full forward."""
    batch = _batch(model4.cfg.d_vocab)
    monkeypatch.setattr(module, "_SELF_CHECK_TOLERANCE", -1.0)
    with pytest.warns(RuntimeWarning, match="using the full forward"):
        assert fast_shifted_forward(model4, 1, "mlp_out", *batch) is None
    with pytest.warns(RuntimeWarning):
        chosen = shifted_forward(model4, 1, "mlp_out", *batch)
    assert type(chosen) is type(full_shifted_forward(model4, 1, "mlp_out", *batch))


def test_fast_false_gives_the_full_forward(model4):
    batch = _batch(model4.cfg.d_vocab)
    assert type(shifted_forward(model4, 1, "mlp_out", *batch, fast=False)) is type(
        full_shifted_forward(model4, 1, "mlp_out", *batch)
    )


def _bad_batches(vocab: int):
    tokens, mask, shifts, rows, positions = _batch(vocab)
    left_padded = mask.flip(1)
    yield "read position", (tokens, mask, shifts, rows, torch.where(rows == 0, shifts[0] - 1, positions))
    yield "read position", (tokens, mask, shifts, torch.tensor([3]), torch.tensor([LENGTHS[3]]))  # a pad
    yield "mask shape", (tokens, mask[:, :-1], shifts, rows, positions)
    yield "shift_positions must have shape", (tokens, mask, shifts[:-1], rows, positions)
    yield "equal-length", (tokens, mask, shifts, rows, positions[:-1])
    yield "right-padded", (tokens, left_padded, shifts, rows, positions)
    yield "real \\(unpadded\\) token", (tokens, mask, torch.tensor([3, 0, 5, 3, 7]), rows, positions)
    yield "read_rows must lie", (tokens, mask, shifts, torch.tensor([5]), torch.tensor([0]))
    yield "integer", (tokens, mask, shifts.float(), rows, positions)
    yield "torch tensor", (tokens, mask, list(SHIFTS), rows, positions)


@pytest.mark.parametrize("build", [full_shifted_forward, fast_shifted_forward, shifted_forward])
def test_bad_input_raises_kis_error(model4, build):
    for message, batch in _bad_batches(model4.cfg.d_vocab):
        with pytest.raises(KisError, match=message):
            build(model4, 1, "mlp_out", *batch)
    batch = _batch(model4.cfg.d_vocab)
    with pytest.raises(KisError, match="shift site"):
        build(model4, 1, "attn_out", *batch)
    with pytest.raises(KisError, match="out of range"):
        build(model4, 4, "mlp_out", *batch)
    forward = build(model4, 1, "mlp_out", *batch)
    if forward is not None:
        with pytest.raises(KisError, match="shift must be"):
            forward(torch.zeros(len(LENGTHS), model4.cfg.d_model + 1))


@pytest.mark.slow
@pytest.mark.smollm2
def test_fast_matches_full_on_smollm2(smollm2):
    """The real model: HF Llama attention under the bridge, GQA (9 query / 3 kv heads), its own rope_theta."""
    lengths, shifts = (17, 12, 22, 8, 15), (9, 4, 12, 7, 3)
    reads = ((0, 14), (0, 15), (1, 10), (2, 20), (2, 21), (3, 7), (4, 3))
    batch = _batch(smollm2.cfg.d_vocab, lengths=lengths, shifts=shifts, reads=reads)
    with frozen_parameters(smollm2):
        _assert_same(smollm2, 4, "mlp_out", batch)
