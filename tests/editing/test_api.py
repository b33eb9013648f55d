"""kl.edit: the editing API in the field's terms, checked against the registry's own updates and the weights."""

from __future__ import annotations

import pytest
import torch

import kis_lens as kl
from kis_lens.editing.api import as_fact, estimate_covariances
from kis_lens.editing.registry import EditorSettings, EditSession, get_editor
from kis_lens.errors import KisError
from kis_lens.tiny import tiny_model
from kis_lens.w_out import output_weight

TOWER = {
    "prompt": "The Eiffel Tower is located in",
    "subject": "Eiffel Tower",
    "target_new": "Rome",
    "target_true": "Paris",
}
COLOSSEUM = {"prompt": "The Colosseum is in", "subject": "Colosseum", "target_new": "Berlin", "target_true": "Rome"}
FAST = EditorSettings(layer=1, value_prompts=2)  # two context templates: the search as ROME runs it, fewer prompts


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt2", n_layers=3)


@pytest.fixture(scope="module")
def covariances(model):
    return estimate_covariances(model, [0, 1], max_tokens=2000)


def weights(model, layers=(0, 1, 2)):
    return {layer: output_weight(model, layer).read() for layer in layers}


@pytest.mark.slow
def test_rome_edit_is_the_registry_update_and_restores_bit_for_bit(model, covariances):
    start = weights(model)
    with kl.edit(model, TOWER, "rome", covariances=covariances, settings=FAST) as outcome:
        delta = outcome.deltas[1]
        singular = torch.linalg.svdvals(delta)
        assert singular[1] < 1e-4 * singular[0]  # ROME writes a rank-one ΔW (float32 rounding aside)
        # a random-weight 64-wide model barely reads one MLP output: efficacy is checked on SmolLM2 below
    for layer, weight in weights(model).items():
        assert torch.equal(weight, start[layer])
    # the same update through the registry by hand, on the original weights
    session = EditSession.create(model, FAST, {1: covariances[1]}, editors=["rome"])
    record = get_editor("rome").update(session, [as_fact(model, TOWER)])
    torch.testing.assert_close(record.deltas[1], delta, rtol=1e-4, atol=1e-6)
    session.restore({1: start[1]})


@pytest.mark.slow
def test_request_forms_give_the_same_fact(model):
    record = {
        "case_id": 7,
        "requested_rewrite": {
            "prompt": "The {} is located in",
            "subject": "Eiffel Tower",
            "target_new": {"str": "Rome"},
            "target_true": {"str": "Paris"},
        },
    }
    as_dict = as_fact(model, {**TOWER, "prompt": "The {} is located in"})
    literal = as_fact(model, TOWER)
    counterfact = as_fact(model, record)
    assert (
        (literal.text, literal.subject, literal.target_new, literal.target_true)
        == (counterfact.text, counterfact.subject, counterfact.target_new, counterfact.target_true)
        == (as_dict.text, as_dict.subject, as_dict.target_new, as_dict.target_true)
    )
    guessed = as_fact(model, {key: value for key, value in TOWER.items() if key != "target_true"})
    assert guessed.target_true and guessed.target_true != "?"  # the model's own greedy answer


@pytest.mark.slow
def test_easyedit_string_form_matches_dicts(model, covariances):
    with kl.edit(
        model,
        [TOWER["prompt"]],
        "p-rome",
        target_new=["Rome"],
        subject=["Eiffel Tower"],
        covariances=covariances,
        settings=FAST,
    ) as by_strings:
        strings_delta = by_strings.deltas[1]
    with kl.edit(
        model,
        [{**TOWER, "target_true": by_strings.facts[0].target_true}],
        "p-rome",
        covariances=covariances,
        settings=FAST,
    ) as by_dicts:
        torch.testing.assert_close(by_dicts.deltas[1], strings_delta)


@pytest.mark.slow
def test_non_sequential_edits_each_request_alone_and_leaves_the_model(model, covariances):
    start = weights(model)
    together = kl.edit(model, [TOWER, COLOSSEUM], "p-rome", sequential=False, covariances=covariances, settings=FAST)
    for layer, weight in weights(model).items():
        assert torch.equal(weight, start[layer])
    for request, metrics in zip([TOWER, COLOSSEUM], together.metrics):
        with kl.edit(model, request, "p-rome", covariances=covariances, settings=FAST) as alone:
            assert alone.metrics[0]["post"]["target_new_logprob"] == pytest.approx(
                metrics["post"]["target_new_logprob"], abs=1e-4
            )


@pytest.mark.slow
def test_sequential_memit_edits_every_layer_of_its_span(model, covariances):
    settings = EditorSettings(layer=1, memit_span=2, value_prompts=2)
    with kl.edit(model, [TOWER, COLOSSEUM], "memit", covariances=covariances, settings=settings) as outcome:
        assert sorted(outcome.deltas) == [0, 1]
        assert all(float(delta.abs().max()) > 0 for delta in outcome.deltas.values())
        assert len(outcome.metrics) == 2


@pytest.mark.slow
def test_bad_requests_name_the_fix(model, covariances):
    with pytest.raises(KisError, match="unknown editor 'romee'"):
        kl.edit(model, TOWER, "romee", covariances=covariances)
    with pytest.raises(KisError, match="is not in prompt"):
        kl.edit(model, {**TOWER, "subject": "Louvre"}, covariances=covariances, settings=FAST)
    with pytest.raises(KisError, match="need target_new= and subject="):
        kl.edit(model, ["The Eiffel Tower is located in"], covariances=covariances)
    with pytest.raises(KisError, match=r"lack layer\(s\) \[0\]"):
        kl.edit(model, TOWER, "memit", covariances={1: covariances[1]}, settings=EditorSettings(layer=1, memit_span=2))
    with pytest.raises(KisError, match="cannot be edited"):
        kl.edit(model, TOWER, covariances=covariances, layer=2)


@pytest.mark.slow
@pytest.mark.smollm2
def test_rome_makes_smollm2_say_the_new_target(smollm2):
    """On the real model the original ROME edit wins: p(Rome) > p(Paris) after, not before; restored after."""
    start = output_weight(smollm2, 4).read()
    with kl.edit(smollm2, TOWER, "rome", covariance_tokens=8_000, settings=EditorSettings(value_prompts=4)) as out:
        pre, post = out.metrics[0]["pre"], out.metrics[0]["post"]
        assert not pre["success"] and post["success"]
        assert post["target_new_logprob"] > pre["target_new_logprob"] + 2.0
    assert torch.equal(output_weight(smollm2, 4).read(), start)


@pytest.mark.slow
def test_a_session_generates_only_the_templates_its_editors_read(model, covariances):
    """Templates cost hundreds of forwards: ROME's for the ROME family, MEMIT's for MEMIT/AlphaEdit, none for none."""
    rome = EditSession.create(model, FAST, {1: covariances[1]}, editors=["rome"])
    assert rome.rome_templates and rome.memit_templates == []
    memit = EditSession.create(model, EditorSettings(layer=1, memit_span=2), covariances, editors=["memit"])
    assert memit.memit_templates and memit.rome_templates == []
    nothing = EditSession.create(model, FAST, {1: covariances[1]}, editors=["none"])
    assert nothing.rome_templates == [] and nothing.memit_templates == []
    both = EditSession.create(model, EditorSettings(layer=1, memit_span=2), covariances)
    assert both.rome_templates and both.memit_templates
