"""Subject location and batched key extraction, against an independent decode-based reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import regex
import torch
from transformers import PreTrainedTokenizer

from kis_lens.errors import KisError
from kis_lens.facts import Fact, load_facts, sample_facts
from kis_lens.hooks import mlp_in_hook_name
from kis_lens.keys import compute_keys, locate_subject
from kis_lens.tiny import TINY_TOKENIZER_DIR, tiny_tokenizer


def reference_subject_tokens(tokenizer, fact: Fact) -> tuple[int, int]:
    """First and last subject token by decoding growing token prefixes (slow, independent of offsets)."""
    ids = tokenizer(fact.text, add_special_tokens=False)["input_ids"]
    start, end = fact.subject_span
    lengths = [len(tokenizer.decode(ids[: t + 1])) for t in range(len(ids))]
    first = next(t for t, length in enumerate(lengths) if length > start)
    last = next(t for t, length in enumerate(lengths) if length >= end)
    return first, last


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.mark.parametrize(
    "prompt, subject",
    [
        ("In {}, the language spoken is", "United Kingdom"),  # leading-space tokens
        ("{} is located in the continent of", "Vinson Massif"),  # subject at the very start
        ("The name Paris is used in {}, a city in", "Paris"),  # subject repeated earlier in the prompt
        ("{}'s capital is", "Danmark"),  # subject glued to the next characters
        ("Ünïcödé {} ✓ is", "naïve café"),  # multi-byte characters
    ],
)
def test_locate_subject_matches_decode_reference(tokenizer, prompt, subject):
    fact = Fact("t", subject, prompt, "x")
    located = locate_subject(tokenizer, fact, prepend_bos=False)
    assert (located.subject_first, located.subject_last) == reference_subject_tokens(tokenizer, fact)
    decoded = tokenizer.decode(located.ids[located.subject_first : located.subject_last + 1])
    assert subject in decoded


def test_repeated_subject_uses_the_placeholder_position(tokenizer):
    fact = Fact("t", "Paris", "The name Paris is used in {}, a city in", "x")
    located = locate_subject(tokenizer, fact, prepend_bos=False)
    first_paris = locate_subject(tokenizer, Fact("t", "Paris", "The name {} is used in Paris, a city in", "x"), False)
    assert located.subject_last > first_paris.subject_last


def test_bos_shifts_positions_by_one(tokenizer):
    fact = Fact("t", "United Kingdom", "In {}, the language spoken is", "x")
    plain = locate_subject(tokenizer, fact, prepend_bos=False)
    with_bos = locate_subject(tokenizer, fact, prepend_bos=True)
    assert with_bos.ids == [tokenizer.bos_token_id, *plain.ids]
    assert (with_bos.subject_first, with_bos.subject_last) == (plain.subject_first + 1, plain.subject_last + 1)


def test_all_shipped_facts_locate(tokenizer):
    for fact in load_facts():
        located = locate_subject(tokenizer, fact, prepend_bos=False)
        assert (located.subject_first, located.subject_last) == reference_subject_tokens(tokenizer, fact)


def test_missing_subject_is_a_clear_error(tokenizer):
    with pytest.raises(KisError, match="fact 42: subject '' not found"):
        locate_subject(tokenizer, Fact("42", "", "In {}, people speak", "x"), prepend_bos=False)


@pytest.mark.slow
@pytest.mark.parametrize("position", ["subject_last", "subject_first", "last"])
def test_batched_keys_equal_one_at_a_time(tiny, position):
    facts = sample_facts(load_facts(), 10, seed=1)
    batched = compute_keys(tiny, facts, [0, 2], token_position=position, batch_size=4)
    single = compute_keys(tiny, facts, [0, 2], token_position=position, batch_size=1)
    torch.testing.assert_close(batched.values, single.values, rtol=1e-5, atol=1e-5)
    assert batched.values.shape == (2, 10, tiny.cfg.d_mlp)


def test_keys_equal_run_with_cache_at_subject_last(tiny):
    facts = sample_facts(load_facts(), 3, seed=2)
    keys = compute_keys(tiny, facts, [1], prepend_bos=False)
    for index, fact in enumerate(facts):
        first, last = reference_subject_tokens(tiny.tokenizer, fact)
        ids = torch.tensor([tiny.tokenizer(fact.text, add_special_tokens=False)["input_ids"]])
        _, cache = tiny.run_with_cache(ids)
        torch.testing.assert_close(keys.at_layer(1)[index], cache[mlp_in_hook_name(1)][0, last], rtol=1e-5, atol=1e-5)


def test_keys_record_their_settings(tiny):
    keys = compute_keys(tiny, sample_facts(load_facts(), 2), [0], token_position="last", prepend_bos=True)
    assert keys.settings()["token_position"] == "last" and keys.settings()["prepend_bos"] is True
    assert keys.settings()["hook"] == "blocks.{layer}.mlp.hook_post"
    with pytest.raises(KisError, match="no keys for layer 1"):
        keys.at_layer(1)


def test_bad_token_position(tiny):
    with pytest.raises(KisError, match="unknown token_position 'middle'"):
        compute_keys(tiny, sample_facts(load_facts(), 2), [0], token_position="middle")


# --- tokenizers without offset mappings (slow tokenizers): ROME's prefix-counting path -------------------------

GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map (bytes_to_unicode)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + n) for n, b in enumerate(moved)}}


class SlowByteLevelBPE(PreTrainedTokenizer):
    """A pure-Python (slow) GPT-2 byte-level BPE tokenizer: no offset mapping, like GPT2Tokenizer before v5."""

    vocab_files_names = {"vocab_file": "vocab.json", "merges_file": "merges.txt"}

    def __init__(self, vocab_file: str, merges_file: str, **kwargs):
        self.encoder = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
        self.decoder = {index: token for token, index in self.encoder.items()}
        lines = Path(merges_file).read_text(encoding="utf-8").splitlines()
        self.ranks = {tuple(line.split()): rank for rank, line in enumerate(x for x in lines[1:] if x)}
        self.byte_encoder = gpt2_byte_alphabet()
        self.byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.encoder)

    def bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            rank, at = min((self.ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(parts, parts[1:])))
            if rank == float("inf"):
                break
            pair, merged, i = (parts[at], parts[at + 1]), [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        pieces = regex.findall(GPT2_SPLIT, text)
        return [t for piece in pieces for t in self.bpe("".join(self.byte_encoder[b] for b in piece.encode()))]

    def _convert_token_to_id(self, token: str) -> int:
        return self.encoder[token]

    def _convert_id_to_token(self, index: int) -> str:
        return self.decoder[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return bytes(self.byte_decoder[c] for c in "".join(tokens)).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def slow_tokenizer(tmp_path_factory):
    """The shipped tiny tokenizer's vocab and merges, loaded into a slow (pure-Python) tokenizer."""
    bpe = json.loads((Path(TINY_TOKENIZER_DIR) / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    folder = tmp_path_factory.mktemp("slow_tokenizer")
    (folder / "vocab.json").write_text(json.dumps(bpe["vocab"]), encoding="utf-8")
    merges = [" ".join(m) if isinstance(m, list) else m for m in bpe["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = "<|endoftext|>"
    slow = SlowByteLevelBPE(
        str(folder / "vocab.json"), str(folder / "merges.txt"), bos_token=special, eos_token=special, unk_token=special
    )
    assert not slow.is_fast
    assert "offset_mapping" not in slow("In Paris", add_special_tokens=False, return_offsets_mapping=True)
    return slow


def test_slow_tokenizer_tokenizes_like_the_fast_one(slow_tokenizer, tokenizer):
    for fact in load_facts():
        for text in (fact.text, f"{fact.text} {fact.target_true}"):
            assert slow_tokenizer(text)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert slow_tokenizer.bos_token_id == tokenizer.bos_token_id


@pytest.mark.parametrize(
    "prompt, subject, first, last",
    [
        ("In {}, the language spoken is", "United Kingdom", "ĠUnited", "ĠKingdom"),  # in the middle
        ("The official language of {}", "United Kingdom", "ĠUnited", "ĠKingdom"),  # at the very end
        ("{} is located in", "United Kingdom", "U", "ĠKingdom"),  # at the start: no space, "United" splits
        (" {} is located in", "United Kingdom", "ĠUnited", "ĠKingdom"),  # after a lone leading space
        ("In  {}, the language spoken is", "United Kingdom", "ĠUnited", "ĠKingdom"),  # after two spaces
        ("In ({}) people speak", "United Kingdom", "U", "ĠKingdom"),  # glued to "(": no space to move
        ("In {}, the language spoken is", "Vinson Massif", "ĠV", "if"),  # several sub-tokens per word
    ],
)
def test_slow_tokenizer_subject_tokens_are_the_subjects_first_and_last(slow_tokenizer, prompt, subject, first, last):
    fact = Fact("t", subject, prompt, "x")
    located = locate_subject(slow_tokenizer, fact, prepend_bos=False)
    tokens = slow_tokenizer.convert_ids_to_tokens(located.ids)
    assert (tokens[located.subject_first], tokens[located.subject_last]) == (first, last)
    assert (located.subject_first, located.subject_last) == reference_subject_tokens(slow_tokenizer, fact)
    assert slow_tokenizer.decode(located.ids[located.subject_first : located.subject_last + 1]).strip() == subject


def test_slow_and_fast_tokenizers_agree_on_subject_positions(slow_tokenizer, tokenizer):
    prompts = [
        Fact("t", "United Kingdom", "In {}, the language spoken is", "x"),
        Fact("t", "United Kingdom", "{} is located in", "x"),
        Fact("t", "Danmark", "{}'s capital is", "x"),
        Fact("t", "naïve café", "Ünïcödé {} ✓ is", "x"),
    ]
    for fact in [*prompts, *load_facts()]:
        for prepend_bos in (False, True):
            slow = locate_subject(slow_tokenizer, fact, prepend_bos=prepend_bos)
            fast = locate_subject(tokenizer, fact, prepend_bos=prepend_bos)
            assert (slow.ids, slow.subject_first, slow.subject_last) == (
                fast.ids,
                fast.subject_first,
                fast.subject_last,
            ), fact
