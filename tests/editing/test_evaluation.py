"""CounterFact evaluation: continuation scoring, ROME's summary metrics, n-gram fluency, generation, perplexity.

Most checks run on a hand-made model with known logits (logits[b, t] = table[token[b, t]] + position[t]), so
the expected numbers come from direct float64 loops; the dedupe is also checked on the tiny TransformerBridges.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from kis_lens.editing.counterfact import CounterFactCase, load_cases
from kis_lens.editing.evaluation import (
    Continuation,
    fluency,
    greedy_generate,
    harmonic_mean,
    neighborhood_success,
    ngram_entropy,
    perplexity,
    prompt_continuations,
    rewrite_success,
    score_continuations,
    word_tokens,
)
from kis_lens.errors import KisError
from kis_lens.models import resolve_prepend_bos
from kis_lens.tokens import encode

VOCAB = 7


class TableModel(torch.nn.Module):
    """Known logits: each position's logits are a fixed row for its token plus a fixed row for its position."""

    def __init__(self, vocab: int = VOCAB, n_positions: int = 24, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(2 * torch.randn(vocab, vocab, generator=generator, dtype=torch.float64))
        self.position = torch.nn.Parameter(torch.randn(n_positions, vocab, generator=generator, dtype=torch.float64))
        self.tokenizer = SimpleNamespace(pad_token_id=None, eos_token_id=None, bos_token_id=None)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        assert attention_mask is not None and attention_mask.shape == tokens.shape
        self.calls.append((tokens.clone(), attention_mask.clone()))
        return self.table[tokens] + self.position[: tokens.shape[1]]

    def logits_at(self, token: int, position: int) -> np.ndarray:
        """Return the known logits after `token` at `position` (numpy float64)."""
        return (self.table[token] + self.position[position]).detach().numpy()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run these tiny forwards on one thread: on a busy 2-core machine, thread hand-offs cost 100x the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def table_model() -> TableModel:
    return TableModel()


def _expected(model: TableModel, item: Continuation) -> tuple[float, bool]:
    """Return (mean target NLL, greedy) by a direct loop over the known logits."""
    sequence = [*item.prompt_ids, *item.target_ids]
    nlls, greedy = [], True
    for offset, label in enumerate(item.target_ids):
        position = len(item.prompt_ids) - 1 + offset
        logits = model.logits_at(sequence[position], position)
        log_normaliser = math.log(sum(math.exp(value) for value in logits))
        nlls.append(log_normaliser - logits[label])
        greedy = greedy and int(np.argmax(logits)) == label
    return sum(nlls) / len(nlls), greedy


def _argmax_chain(model: TableModel, prompt: tuple[int, ...], length: int) -> tuple[int, ...]:
    """Return the `length` tokens greedy decoding writes after a prompt, by a direct loop."""
    sequence = list(prompt)
    for _ in range(length):
        sequence.append(int(np.argmax(model.logits_at(sequence[-1], len(sequence) - 1))))
    return tuple(sequence[len(prompt) :])


def _table_items(model: TableModel) -> list[Continuation]:
    a, b, c, d, e = (1, 2, 3), (2,), (5, 5, 1, 0, 2, 6), (0, 1), (6, 4)
    return [
        Continuation(a, (4,)),
        Continuation(a, (5,)),
        Continuation(a, _argmax_chain(model, a, 1)),  # single token, greedy
        Continuation(a, (4, 6)),  # row (1, 2, 3, 4) hosts the three above
        Continuation(b, (3,)),
        Continuation(b, (1,)),
        Continuation(c, _argmax_chain(model, c, 3)),  # multi-token, greedy
        Continuation(d, (2, 3, 4)),  # row (0, 1, 2, 3)
        Continuation(d, (2,)),  # rides on (0, 1, 2, 3)
        Continuation(d, (2, 3)),  # needs (0, 1, 2): rides on (0, 1, 2, 3) too
        Continuation(e, _argmax_chain(model, e, 2)[:1] + ((_argmax_chain(model, e, 2)[1] + 1) % VOCAB,)),
        Continuation(e, (1,)),
    ]


def test_scores_match_a_direct_loop_over_known_logits(table_model):
    items = _table_items(table_model)
    expected = [_expected(table_model, item) for item in items]
    for batch_size in (1, 2, 3, 64):
        scores = score_continuations(table_model, items, batch_size=batch_size)
        assert scores.nll.dtype == torch.float64 and scores.greedy.dtype == torch.bool
        assert scores.nll.shape == scores.greedy.shape == (len(items),)
        np.testing.assert_allclose(scores.nll.numpy(), [nll for nll, _ in expected], rtol=0, atol=1e-10)
        assert scores.greedy.tolist() == [greedy for _, greedy in expected]
    # the case covers both outcomes, single- and multi-token greedy successes, and a multi-token near miss
    assert scores.greedy.tolist()[2] and scores.greedy.tolist()[6] and not scores.greedy.tolist()[10]


def test_rows_are_deduplicated_and_length_sorted(table_model):
    items = _table_items(table_model)
    score_continuations(table_model, items, batch_size=2)
    rows = [tuple(t[m.bool()].tolist()) for tokens, mask in table_model.calls for t, m in zip(tokens, mask)]
    # five distinct rows: (2,), (6, 4, x), (1, 2, 3, 4), (0, 1, 2, 3), and c + its chain without the last token
    assert len(rows) == 5 and len(set(rows)) == 5
    assert sorted(rows, key=len) == rows
    assert [len(row) for row in rows] == [1, 3, 4, 4, 8]
    # right padding only, and only 2 padded tokens (lengths 1 and 3 share a batch)
    for _, mask in table_model.calls:
        assert torch.equal(mask, (torch.arange(mask.shape[1]) < mask.sum(dim=1, keepdim=True)).long())
    assert sum(int((mask == 0).sum()) for _, mask in table_model.calls) == 2


class _SoftmaxSpy(TorchFunctionMode):
    """Records the number of dimensions of every softmax-family call."""

    def __init__(self):
        super().__init__()
        self.dims: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in {"log_softmax", "softmax", "logsumexp"}:
            self.dims.append(args[0].dim())
        return func(*args, **(kwargs or {}))


def test_normalises_only_the_gathered_positions(table_model):
    with _SoftmaxSpy() as spy:
        score_continuations(table_model, _table_items(table_model), batch_size=4)
        perplexity(table_model, [[1, 2, 3, 4], [5, 6]], batch_size=4)
    assert spy.dims and max(spy.dims) <= 2


def test_dedupe_equals_naive_per_item_on_a_tiny_transformer(tiny):
    generator = torch.Generator().manual_seed(1)
    vocab = int(tiny.cfg.d_vocab)

    def ids(length: int) -> tuple[int, ...]:
        return tuple(torch.randint(0, vocab, (length,), generator=generator).tolist())

    def naive(item: Continuation) -> tuple[float, bool]:
        sequence = torch.tensor([[*item.prompt_ids, *item.target_ids[:-1]]])
        with torch.no_grad():
            logits = tiny(sequence, attention_mask=torch.ones_like(sequence))[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        start = len(item.prompt_ids) - 1
        positions = range(start, start + len(item.target_ids))
        nll = -sum(float(logprobs[p, t]) for p, t in zip(positions, item.target_ids)) / len(item.target_ids)
        return nll, all(int(logits[p].argmax()) == t for p, t in zip(positions, item.target_ids))

    prompts = [ids(length) for length in (3, 7, 11)]
    items = []
    for prompt in prompts:
        items += [Continuation(prompt, ids(1)) for _ in range(2)]  # single tokens sharing a prompt
        items += [Continuation(prompt, ids(3)), Continuation(prompt, ids(2))]
    chained = [*prompts[1]]
    with torch.no_grad():
        for _ in range(3):
            chained.append(int(tiny(torch.tensor([chained]))[0, -1].argmax()))
    items += [Continuation(prompts[1], tuple(chained[7:])), Continuation(prompts[1], tuple(chained[7:8]))]
    scores = score_continuations(tiny, items, batch_size=4)
    expected = [naive(item) for item in items]
    np.testing.assert_allclose(scores.nll.numpy(), [nll for nll, _ in expected], rtol=0, atol=1e-5)
    assert scores.greedy.tolist() == [greedy for _, greedy in expected]
    assert scores.greedy.tolist()[-2:] == [True, True]


def test_prompt_continuations_follow_rome_and_the_bos_convention(tiny_gpt2):
    tokenizer = tiny_gpt2.tokenizer
    for prepend_bos in (None, False, True):
        bos = resolve_prepend_bos(tiny_gpt2, prepend_bos)
        items = prompt_continuations(tiny_gpt2, ["The capital of France is", "Paris is in"], ["Paris ", "France"], bos)
        assert items[0].prompt_ids == tuple(encode(tokenizer, "The capital of France is", bos))
        assert items[0].target_ids == tuple(encode(tokenizer, " Paris", False))
        assert items[1].target_ids == tuple(encode(tokenizer, " France", False))
    assert items[0].prompt_ids[0] == tokenizer.bos_token_id
    with pytest.raises(KisError, match="targets"):
        prompt_continuations(tiny_gpt2, ["a", "b"], ["c"])
    with pytest.raises(KisError, match="empty target"):
        prompt_continuations(tiny_gpt2, ["a"], ["  "])


def test_bad_continuations_raise_kis_error(table_model):
    with pytest.raises(KisError, match="target token"):
        Continuation((1, 2), ())
    with pytest.raises(KisError, match="prompt token"):
        Continuation((), (1,))
    with pytest.raises(KisError, match="batch_size"):
        score_continuations(table_model, [Continuation((1,), (2,))], batch_size=0)
    empty = score_continuations(table_model, [])
    assert empty.nll.shape == empty.greedy.shape == (0,)


# ---------------------------------------------------------------------------------------------------------
# Summary metrics
# ---------------------------------------------------------------------------------------------------------

# Three cases with 3, 1 and 2 prompts: the mean of case means differs from the pooled mean.
GROUPS = [0, 0, 0, 1, 2, 2]
NLL_NEW = [0.5, 2.0, 1.0, 3.0, 0.2, 0.9]
NLL_TRUE = [1.0, 1.0, 1.5, 1.0, 0.3, 0.4]


def test_rewrite_success_is_the_mean_of_case_means():
    success, magnitude = rewrite_success(NLL_NEW, NLL_TRUE, GROUPS)
    # [new < true] = [1, 0, 1 | 0 | 1, 0] -> case means 2/3, 0, 1/2
    assert success == pytest.approx((2 / 3 + 0 + 1 / 2) / 3)
    assert success != pytest.approx(3 / 6)  # not the pooled share
    d = [math.exp(-n) - math.exp(-t) for n, t in zip(NLL_NEW, NLL_TRUE)]
    assert magnitude == pytest.approx(((d[0] + d[1] + d[2]) / 3 + d[3] + (d[4] + d[5]) / 2) / 3)
    # tensors, arbitrary case labels and any prompt order give the same numbers
    order = [5, 2, 3, 0, 4, 1]
    labels = {0: 17, 1: 3, 2: 9}
    again = rewrite_success(
        torch.tensor([NLL_NEW[i] for i in order]),
        np.array([NLL_TRUE[i] for i in order]),
        [labels[GROUPS[i]] for i in order],
    )
    assert again == pytest.approx((success, magnitude))


def test_neighborhood_success_is_the_mean_of_case_means():
    success, magnitude = neighborhood_success(NLL_NEW, NLL_TRUE, GROUPS)
    # [true < new] = [0, 1, 0 | 1 | 0, 1] -> case means 1/3, 1, 1/2
    assert success == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)
    d = [math.exp(-t) - math.exp(-n) for n, t in zip(NLL_NEW, NLL_TRUE)]
    assert magnitude == pytest.approx(((d[0] + d[1] + d[2]) / 3 + d[3] + (d[4] + d[5]) / 2) / 3)


def test_ties_count_for_neither_side_and_empty_input_gives_none():
    assert rewrite_success([1.0, 2.0], [1.0, 2.0], [0, 1])[0] == 0.0
    assert neighborhood_success([1.0, 2.0], [1.0, 2.0], [0, 1])[0] == 0.0
    assert rewrite_success([], [], []) == (None, None)
    assert neighborhood_success(torch.zeros(0), torch.zeros(0), []) == (None, None)
    with pytest.raises(KisError, match="one entry per prompt"):
        rewrite_success([1.0], [1.0, 2.0], [0, 0])


def test_harmonic_mean():
    assert harmonic_mean([0.5, 1.0, 0.25]) == pytest.approx(3 / (2 + 1 + 4))
    assert harmonic_mean([0.8, 0.0, 0.9]) == 0.0
    assert harmonic_mean([0.4]) == pytest.approx(0.4)
    with pytest.raises(KisError):
        harmonic_mean([])
    with pytest.raises(KisError):
        harmonic_mean([0.5, -0.1])


# ---------------------------------------------------------------------------------------------------------
# Fluency
# ---------------------------------------------------------------------------------------------------------


def test_word_tokens_approximates_nltk():
    assert word_tokens("the cat sat on the mat, the cat ran.") == [
        "the", "cat", "sat", "on", "the", "mat", ",", "the", "cat", "ran", ".",
    ]  # fmt: skip
    assert word_tokens("Don't stop: state-of-the-art costs $3.14 (1,000 times)!") == [
        "Don't", "stop", ":", "state-of-the-art", "costs", "$", "3.14", "(", "1,000", "times", ")", "!",
    ]  # fmt: skip


def test_ngram_entropy_matches_hand_counts():
    text = "the cat sat on the mat, the cat ran."
    # 10 bigrams: (the, cat) twice, 8 others once; 9 trigrams, all different
    h2 = -(2 / 10) * math.log2(2 / 10) - 8 * (1 / 10) * math.log2(1 / 10)
    h3 = -9 * (1 / 9) * math.log2(1 / 9)
    assert ngram_entropy(text) == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert ngram_entropy("a b c") == pytest.approx((2 / 3 * 1.0 + 4 / 3 * 0.0) / 2)
    # fewer tokens than n: that n contributes 0 (no NaN)
    assert ngram_entropy("a b", ns=(1, 3), weights=(1.0, 1.0)) == pytest.approx(0.5)
    assert ngram_entropy("") == 0.0
    with pytest.raises(KisError):
        ngram_entropy(text, ns=(2, 3), weights=(1.0,))


def test_repetition_lowers_fluency():
    repetitive = "the war was the war was the war was the war was the war was the war"
    varied = "the treaty ended a long war, and both kingdoms rebuilt their ruined towns within a decade"
    assert ngram_entropy(repetitive) < ngram_entropy(varied)
    assert fluency([repetitive, varied]) == pytest.approx((ngram_entropy(repetitive) + ngram_entropy(varied)) / 2)
    with pytest.raises(KisError):
        fluency([])


# ---------------------------------------------------------------------------------------------------------
# Generation and perplexity
# ---------------------------------------------------------------------------------------------------------


def test_greedy_generate_follows_the_argmax_chain_in_input_order(table_model):
    prompts = [(1, 2, 3), (4,), (5, 6, 0), (2,), (3, 3, 3, 3), (0, 1, 2)]
    expected = [list(_argmax_chain(table_model, prompt, 5)) for prompt in prompts]
    for batch_size in (1, 2, 16):
        table_model.calls.clear()
        assert greedy_generate(table_model, prompts, 5, batch_size=batch_size) == expected
        assert all(bool(mask.all()) for _, mask in table_model.calls)  # no padding anywhere
    assert greedy_generate(table_model, prompts, 0) == [[] for _ in prompts]
    with pytest.raises(KisError):
        greedy_generate(table_model, [(1,), ()], 3)


def test_perplexity_matches_a_direct_loop(table_model):
    rows = [[1, 2, 3], [4], [5, 6, 0, 1, 2], [2, 2], [3, 1, 4, 1, 5, 6]]
    total, count = 0.0, 0
    for row in rows:
        for position in range(len(row) - 1):
            logits = table_model.logits_at(row[position], position)
            total += math.log(sum(math.exp(value) for value in logits)) - logits[row[position + 1]]
            count += 1
    for batch_size in (1, 2, 16):
        assert perplexity(table_model, rows, batch_size=batch_size) == pytest.approx(math.exp(total / count), rel=1e-9)
    with pytest.raises(KisError, match="two tokens"):
        perplexity(table_model, [[1], [2]])


# ---------------------------------------------------------------------------------------------------------
# CounterFact cases
# ---------------------------------------------------------------------------------------------------------


def test_load_packaged_cases():
    cases = load_cases("counterfact-known")
    assert len(cases) == 436
    assert all(isinstance(case, CounterFactCase) for case in cases)
    assert len({case.case_id for case in cases}) == 436
    for case in cases:
        assert len(case.paraphrase_prompts) == 2 and len(case.neighborhood_prompts) == 10
        assert len(case.generation_prompts) >= 1
        assert case.fact.target_new and case.case_id == case.fact.case_id
    assert cases[0].case_id == "12328" and cases[0].fact.target_new == "Finnish"


def test_bad_case_records_raise_kis_error(tmp_path):
    good = json.loads(
        json.dumps(
            {
                "case_id": 1,
                "requested_rewrite": {
                    "prompt": "{} is located in",
                    "subject": "Paris",
                    "target_true": {"str": "France"},
                    "target_new": {"str": "Italy"},
                },
                "paraphrase_prompts": ["Paris lies in"],
                "neighborhood_prompts": ["Lyon is located in"],
                "generation_prompts": ["Paris is"],
            }
        )
    )
    path = tmp_path / "cases.json"
    path.write_text(json.dumps([good]))
    assert load_cases(str(path))[0].paraphrase_prompts == ("Paris lies in",)
    no_neighbors = {key: value for key, value in good.items() if key != "neighborhood_prompts"}
    no_new = json.loads(json.dumps(good))
    del no_new["requested_rewrite"]["target_new"]
    not_a_list = dict(good, paraphrase_prompts="Paris")  # a bare string, not a list
    for record in (no_neighbors, no_new, not_a_list, {"subject": "x"}):
        path.write_text(json.dumps([good, record]))
        with pytest.raises(KisError, match="counterfact-known"):
            load_cases(str(path))
    with pytest.raises(KisError, match="counterfact-known"):
        load_cases("known-1000")
    with pytest.raises(KisError, match="not found"):
        load_cases(str(tmp_path / "missing.json"))
