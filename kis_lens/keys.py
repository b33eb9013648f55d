"""Key vectors: the MLP input of W_out at a fact's subject token, for many layers from batched forwards."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kis_lens.errors import KisError
from kis_lens.facts import Fact
from kis_lens.hooks import gather_positions, mlp_in_hook_name, run_mlp_hooks, validate_layers
from kis_lens.models import HookedModel, model_info, resolve_prepend_bos
from kis_lens.tokens import encode, pad_batch, pad_token_id, with_bos

TokenPosition = Literal["subject_last", "subject_first", "last"]
TOKEN_POSITIONS: tuple[str, ...] = ("subject_last", "subject_first", "last")


@dataclass(frozen=True)
class FactTokens:
    """A fact prompt's token ids and where its subject's first and last tokens are."""

    ids: list[int]
    subject_first: int
    subject_last: int

    def position(self, token_position: TokenPosition) -> int:
        """Return the index of the token the key is read at."""
        if token_position == "subject_last":
            return self.subject_last
        if token_position == "subject_first":
            return self.subject_first
        if token_position == "last":
            return len(self.ids) - 1
        raise KisError(f"unknown token_position {token_position!r}: use one of {', '.join(TOKEN_POSITIONS)}")


def _subject_tokens_by_prefix(tokenizer: Any, fact: Fact) -> tuple[list[int], int, int]:
    """ROME's method for tokenizers without offsets: count the tokens of the prefix and of prefix+subject.

    As ROME's ``get_words_idxs_in_templates`` does, a space just before the subject belongs to the subject's
    first token ("In " + "United" is "In", " United"), so the prefix is counted without that one space;
    counting "In " would count its lone trailing space as a token and point one token past the subject's start.
    """
    start, end = fact.subject_span
    text = fact.text
    ids = encode(tokenizer, text, prepend_bos=False)
    prefix = text[: start - 1] if start and text[start - 1] == " " else text[:start]
    n_prefix = len(encode(tokenizer, prefix, prepend_bos=False)) if prefix else 0
    n_through_subject = len(encode(tokenizer, text[:end], prepend_bos=False))
    return ids, n_prefix, n_through_subject - 1


def locate_subject(tokenizer: Any, fact: Fact, prepend_bos: bool) -> FactTokens:
    """Return the fact prompt's ids and the token indices of its subject (from character offsets)."""
    start, end = fact.subject_span
    try:
        encoded = tokenizer(fact.text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
        inside = [i for i, (lo, hi) in enumerate(offsets) if lo < end and hi > start and hi > lo]
        first, last = (inside[0], inside[-1]) if inside else (-1, -1)
    except (NotImplementedError, KeyError, TypeError):
        ids, first, last = _subject_tokens_by_prefix(tokenizer, fact)
    if first < 0 or last < first or last >= len(ids):
        raise KisError(
            f"fact {fact.case_id}: subject {fact.subject!r} not found among the tokens of {fact.text!r}; "
            "check the subject and prompt of this fact"
        )
    shift = int(prepend_bos)
    return FactTokens(with_bos(tokenizer, ids, prepend_bos), first + shift, last + shift)


@dataclass
class Keys:
    """Key vectors of facts at several layers, with the settings that produced them."""

    values: Float[Tensor, "layer fact d_mlp"]
    layers: list[int]
    facts: list[Fact]
    token_position: str
    prepend_bos: bool
    model_name: str
    hook_template: str = field(default=mlp_in_hook_name(0).replace(".0.", ".{layer}."))

    def at_layer(self, layer: int) -> Float[Tensor, "fact d_mlp"]:
        """Return the [fact, d_mlp] keys of one layer."""
        if layer not in self.layers:
            raise KisError(f"no keys for layer {layer}: these keys hold layers {self.layers}")
        return self.values[self.layers.index(layer)]

    def settings(self) -> dict[str, Any]:
        """Return the settings that made these keys (for result metadata)."""
        return {
            "model_name": self.model_name,
            "layers": self.layers,
            "token_position": self.token_position,
            "prepend_bos": self.prepend_bos,
            "hook": self.hook_template,
            "n_facts": len(self.facts),
        }


def compute_keys(
    model: HookedModel,
    facts: Sequence[Fact],
    layers: Sequence[int],
    token_position: TokenPosition = "subject_last",
    prepend_bos: bool | None = None,
    batch_size: int = 32,
) -> Keys:
    """Return the keys of every fact at every requested layer, from padded batches of one forward each."""
    if token_position not in TOKEN_POSITIONS:
        raise KisError(f"unknown token_position {token_position!r}: use one of {', '.join(TOKEN_POSITIONS)}")
    if not facts:
        raise KisError("no facts given: load some with kis_lens.load_facts()")
    layers = validate_layers(model, layers)
    prepend_bos = resolve_prepend_bos(model, prepend_bos)
    located = [locate_subject(model.tokenizer, fact, prepend_bos) for fact in facts]
    n_ctx = int(model.cfg.n_ctx)
    too_long = [fact.case_id for fact, tokens in zip(facts, located) if len(tokens.ids) > n_ctx]
    if too_long:
        raise KisError(f"fact prompt(s) {too_long[:5]} are longer than the model's context of {n_ctx} tokens")
    values = torch.empty(len(layers), len(facts), int(model.cfg.d_mlp), dtype=torch.float32)
    pad_id = pad_token_id(model.tokenizer)
    for begin in range(0, len(facts), batch_size):
        chunk = located[begin : begin + batch_size]
        tokens, mask = pad_batch([item.ids for item in chunk], pad_id)
        positions = torch.tensor([item.position(token_position) for item in chunk])

        # Bound as defaults: run_mlp_hooks calls keep within this iteration, on this batch.
        def keep(
            layer: int,
            activation: Tensor,
            positions: Tensor = positions,
            begin: int = begin,
            end: int = begin + len(chunk),
        ) -> None:
            rows = gather_positions(activation, positions).float().cpu()
            values[layers.index(layer), begin:end] = rows

        run_mlp_hooks(model, tokens, layers, keep, attention_mask=mask)
    return Keys(values, layers, list(facts), token_position, prepend_bos, model_info(model).name)
