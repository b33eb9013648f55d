"""Property tests (hypothesis): random Unicode facts into locate_subject, random shapes and dtypes into the matrices.

locate_subject is checked against the bytes each token decodes to (an independent route from the character
offsets it uses): the chosen first and last tokens overlap the subject's bytes and together cover all of them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from reference import reference_matrices

from kis_lens.errors import KisError
from kis_lens.facts import Fact
from kis_lens.keys import locate_subject
from kis_lens.matrices import (
    Whitener,
    activation_cos,
    all_matrices,
    p_matrix,
    q_matrix,
    whitening_cos,
)
from kis_lens.tiny import tiny_tokenizer

TOKENIZER = tiny_tokenizer()
# GPT-2 byte-level BPE: each token string maps back to raw bytes through this table (GPT-2's bytes_to_unicode).
_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
_BYTE_OF = {chr(byte): byte for byte in _PRINTABLE}
_BYTE_OF.update({chr(256 + n): byte for n, byte in enumerate(b for b in range(256) if b not in _PRINTABLE)})

unicode_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
mixed_text = st.one_of(
    unicode_text, st.text(alphabet="ab é😀 ,.\n{}", max_size=12), st.sampled_from(["", " ", "The", " of"])
)


def token_byte_spans(ids: list[int]) -> list[tuple[int, int]]:
    """Return each token's [start, end) byte range in the encoded text, from the tokens' own bytes."""
    spans, position = [], 0
    for token in TOKENIZER.convert_ids_to_tokens(ids):
        size = len(token)  # one character per byte in byte-level BPE
        assert all(char in _BYTE_OF for char in token)
        spans.append((position, position + size))
        position += size
    return spans


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=mixed_text, subject=mixed_text, suffix=mixed_text, prepend_bos=st.booleans())
def test_subject_located_on_its_own_tokens_or_a_clear_error(prefix, subject, suffix, prepend_bos):
    fact = Fact("p", subject, prefix.replace("{}", "") + "{}" + suffix, "x")
    text = fact.text
    start, end = fact.subject_span
    ids = TOKENIZER(text, add_special_tokens=False)["input_ids"]
    spans = token_byte_spans(ids)
    assert b"".join(bytes(_BYTE_OF[c] for c in t) for t in TOKENIZER.convert_ids_to_tokens(ids)) == text.encode()
    low, high = len(text[:start].encode()), len(text[:end].encode())
    meaningful = [i for i, char in enumerate(subject) if char != " "]  # byte-level offsets trim plain spaces only
    try:
        located = locate_subject(TOKENIZER, fact, prepend_bos)
    except KisError as error:
        assert "not found among the tokens" in str(error) and "check the subject and prompt" in str(error)
        assert not meaningful, f"a subject with visible characters ({subject!r}) must be found"
        return
    shift = int(prepend_bos)
    first, last = located.subject_first - shift, located.subject_last - shift
    assert located.ids[shift:] == ids and (not prepend_bos or located.ids[0] == TOKENIZER.bos_token_id)
    assert 0 <= first <= last < len(ids)
    for index in (first, last):  # both ends sit on the subject's own bytes
        assert spans[index][0] < high and spans[index][1] > low, (spans[index], (low, high))
    for i in meaningful:  # and every visible character of the subject lies between them
        char_low = low + len(subject[:i].encode())
        assert spans[first][0] <= char_low < spans[last][1]


# Matrices: random shapes and dtypes give a correct float64 result or a KisError, never another exception.

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64]


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(0, 5),
    d=st.integers(0, 6),
    d_cov=st.integers(0, 6),
    cov_cols=st.integers(0, 6),
    key_dtype=st.sampled_from(DTYPES),
    cov_dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    poison=st.sampled_from([None, "nan", "inf"]),
    ndim=st.sampled_from([1, 2, 3]),
)
def test_matrices_on_random_shapes_and_dtypes(n, d, d_cov, cov_cols, key_dtype, cov_dtype, seed, poison, ndim):
    rng = np.random.default_rng(seed)
    keys64 = rng.integers(-3, 4, size=(n, d)).astype(np.float64) + (rng.random((n, d)) > 0.5) * 0.5  # exact in fp16
    if cov_cols == d_cov:
        mixing = rng.normal(size=(d_cov, d_cov))
        covariance64 = mixing @ mixing.T + np.eye(d_cov)
    else:
        covariance64 = rng.normal(size=(d_cov, cov_cols))
    keys = torch.tensor(keys64).to(key_dtype)
    if ndim == 1:
        keys = keys.reshape(-1)
    elif ndim == 3:
        keys = keys.unsqueeze(0)
    covariance = torch.tensor(covariance64).to(cov_dtype)
    if poison and keys.numel() and keys.is_floating_point():
        keys.view(-1)[0] = float(poison)
    valid_keys = ndim == 2 and n > 0 and d > 0 and not (poison and keys.numel() and keys.is_floating_point())
    assume(
        bool((keys.double().reshape(n, d).abs().sum(dim=1) > 0).all()) if n * d else True
    )  # a zero key has no cosine
    valid_cov = cov_cols == d_cov == d and d > 0 and cov_dtype.is_floating_point
    cov_in_dtype = covariance.double().numpy()

    for function, needs_cov in (
        (q_matrix, False),
        (activation_cos, False),
        (p_matrix, True),
        (whitening_cos, True),
        (all_matrices, True),
    ):
        args = (keys, covariance) if needs_cov else (keys,)
        ok = valid_keys and (valid_cov or not needs_cov)
        if ok and needs_cov:
            assume(np.linalg.cond(cov_in_dtype) < 1e4)  # fp16/bf16 rounding of C must keep it positive definite
        try:
            got = function(*args)
        except KisError:
            assert not ok, f"{function.__name__} refused valid input"
            continue
        assert ok, (
            f"{function.__name__} accepted bad input: keys {tuple(keys.shape)} {keys.dtype}, "
            f"C {tuple(covariance.shape)} {covariance.dtype}"
        )
        want = reference_matrices(keys.double().numpy(), cov_in_dtype if needs_cov else np.eye(d))
        results = got if isinstance(got, dict) else {function.__name__: got}
        for name, value in results.items():
            assert value.dtype == torch.float64 and value.shape == (n, n)
            np.testing.assert_allclose(value.numpy(), want[name], rtol=1e-7, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(d=st.integers(1, 6), ridge=st.sampled_from([-1.0, float("nan"), 0.0, 1e-3]), seed=st.integers(0, 1000))
def test_whitener_ridge_is_checked(d, ridge, seed):
    mixing = np.random.default_rng(seed).normal(size=(d, d))
    covariance = torch.tensor(mixing @ mixing.T + np.eye(d))
    if ridge < 0 or ridge != ridge:
        with pytest.raises(KisError, match="ridge must be zero or positive"):
            Whitener.from_covariance(covariance, ridge=ridge)
        return
    whitener = Whitener.from_covariance(covariance, ridge=ridge)
    shifted = covariance.numpy() + ridge * np.mean(np.diag(covariance.numpy())) * np.eye(d)
    np.testing.assert_allclose(whitener.factor.numpy() @ whitener.factor.numpy().T, shifted, rtol=1e-10, atol=1e-12)
    assert whitener.condition == pytest.approx(np.linalg.cond(shifted), rel=1e-6)
