"""Hook capture: one early-stopped forward for many layers equals TransformerLens run_with_cache."""

from __future__ import annotations

import pytest
import torch

from kis_lens.errors import KisError
from kis_lens.hooks import capture_mlp_inputs, layer_range, mlp_in_hook_name, run_mlp_hooks, to_tokens
from kis_lens.models import model_info


def test_hook_name_is_the_w_out_input():
    assert mlp_in_hook_name(7) == "blocks.7.mlp.hook_post"


def test_capture_equals_run_with_cache(tiny):
    tokens = torch.randint(1, 2048, (3, 12), generator=torch.Generator().manual_seed(0))
    captured = capture_mlp_inputs(tiny, tokens, [0, 2])
    _, cache = tiny.run_with_cache(tokens, names_filter=lambda name: name.endswith("mlp.hook_post"))
    for layer in (0, 2):
        torch.testing.assert_close(captured[layer], cache[mlp_in_hook_name(layer)], rtol=0, atol=0)
    assert set(captured) == {0, 2}


def test_hook_post_is_the_input_of_w_out(tiny):
    tokens = torch.randint(1, 2048, (2, 9), generator=torch.Generator().manual_seed(1))
    _, cache = tiny.run_with_cache(tokens)
    layer = 1
    out = cache[mlp_in_hook_name(layer)] @ tiny.W_out[layer]
    if hasattr(tiny, "b_out"):
        out = out + tiny.b_out[layer]
    torch.testing.assert_close(out, cache[f"blocks.{layer}.hook_mlp_out"], rtol=1e-5, atol=1e-5)


def test_forward_stops_after_last_requested_layer(tiny):
    """Hooks of later layers and the unembedding never run."""
    seen: list[str] = []

    def spy(activation, hook):
        seen.append(hook.name)

    hooks = [("blocks.2.mlp.hook_post", spy), ("blocks.2.hook_resid_post", spy), ("unembed.hook_out", spy)]
    hooks = [(name, fn) for name, fn in hooks if name in tiny.hook_dict]
    tokens = torch.randint(1, 2048, (1, 6))
    with tiny.hooks(fwd_hooks=hooks):
        captured = capture_mlp_inputs(tiny, tokens, [1])
    assert seen == [] and set(captured) == {1}
    with tiny.hooks(fwd_hooks=hooks):
        tiny(tokens)
    assert len(seen) == len(hooks)  # the same spies do fire on a full forward


def test_no_hooks_left_behind(tiny):
    before = sum(len(hp._forward_hooks) for hp in tiny.hook_dict.values())
    capture_mlp_inputs(tiny, torch.randint(1, 2048, (1, 5)), [0, 1])
    after = sum(len(hp._forward_hooks) for hp in tiny.hook_dict.values())
    assert before == after


def test_right_padding_with_mask_matches_unpadded(tiny):
    short = torch.randint(1, 2048, (1, 5), generator=torch.Generator().manual_seed(2))
    long = torch.randint(1, 2048, (1, 9), generator=torch.Generator().manual_seed(3))
    tokens = torch.cat([torch.cat([short, torch.zeros(1, 4, dtype=torch.long)], 1), long])
    mask = torch.ones_like(tokens)
    mask[0, 5:] = 0
    batched = capture_mlp_inputs(tiny, tokens, [2], attention_mask=mask)[2]
    alone = capture_mlp_inputs(tiny, short, [2])[2]
    torch.testing.assert_close(batched[0, :5], alone[0], rtol=1e-5, atol=1e-5)


def test_callback_sees_layers_in_order(tiny):
    order: list[int] = []
    run_mlp_hooks(tiny, torch.randint(1, 2048, (1, 4)), [2, 0, 1], lambda layer, act: order.append(layer))
    assert order == [0, 1, 2]


def test_layer_errors(tiny):
    with pytest.raises(KisError, match=r"out of range: this model has layers 0\.\.2"):
        capture_mlp_inputs(tiny, torch.ones(1, 3, dtype=torch.long), [3])
    with pytest.raises(KisError, match="start_layer 2 is after end_layer 1"):
        layer_range(tiny, 2, 1)
    assert layer_range(tiny) == [0, 1, 2]


TEXTS = ["The Eiffel Tower is located in", "Paris"]


@pytest.mark.parametrize("prepend_bos", [None, True, False])
def test_to_tokens_follows_the_bos_rule_and_masks_only_padding(tiny, prepend_bos):
    tokenizer = tiny.tokenizer
    bos = model_info(tiny).adds_bos if prepend_bos is None else prepend_bos
    tokens, mask = to_tokens(tiny, TEXTS, prepend_bos=prepend_bos)
    for row, text in enumerate(TEXTS):
        expected = ([tokenizer.bos_token_id] if bos else []) + tokenizer(text, add_special_tokens=False)["input_ids"]
        n = int(mask[row].sum())
        assert tokens[row, :n].tolist() == expected
        assert mask[row].tolist() == [1] * n + [0] * (tokens.shape[1] - n)


def test_capture_from_texts_matches_each_text_alone(tiny):
    """Texts in, activations out: each row equals the unpadded forward of that text alone, BOS rule included."""
    captured = capture_mlp_inputs(tiny, TEXTS, layers=[0, 2])
    bos = model_info(tiny).adds_bos
    for row, text in enumerate(TEXTS):
        plain = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ([tiny.tokenizer.bos_token_id] if bos else []) + plain
        alone = capture_mlp_inputs(tiny, torch.tensor([ids]), layers=[0, 2])
        for layer in (0, 2):
            torch.testing.assert_close(captured[layer][row, : len(ids)], alone[layer][0], rtol=1e-5, atol=1e-5)


def test_texts_with_a_mask_or_empty_texts_are_refused(tiny):
    tokens, mask = to_tokens(tiny, TEXTS)
    with pytest.raises(KisError, match="attention_mask was given with texts"):
        capture_mlp_inputs(tiny, TEXTS, layers=[0], attention_mask=mask)
    with pytest.raises(KisError, match="has no tokens"):
        to_tokens(tiny, ["", "Paris"], prepend_bos=False)
    with pytest.raises(KisError, match="non-empty list of texts"):
        to_tokens(tiny, [])
