"""Which facts a model knows: its next-token prediction after the fact prompt versus the true target.

A fact is *known* when the first token of ``target_true`` is among the model's top-k next tokens
after the prompt with the subject filled in (and no target). The paper used facts known to all its
models; here each model gets its own split, saved with the model's fingerprint so
``--knowledge_type known|unknown`` draws from it.

>>> split = classify_facts(model, load_facts("counterfact-known"), top_k=1)
>>> len(split.known), len(split.unknown)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from kis_lens.blocks import Override, at_least, borrow, setting
from kis_lens.config import CorpusOptions, FactOptions, ModelOptions
from kis_lens.errors import KisError
from kis_lens.facts import Fact, load_facts
from kis_lens.fingerprint import fingerprint_matches, model_fingerprint
from kis_lens.hooks import gather_positions
from kis_lens.io import save_json
from kis_lens.layout import split_path
from kis_lens.models import (
    HookedModel,
    model_device,
    model_info,
    resolve_prepend_bos,
)
from kis_lens.tokens import encode, pad_batch, pad_token_id

SPLIT_FORMAT_VERSION = 1


@dataclass(frozen=True)
@borrow(CorpusOptions, prepend_bos=Override(section=ModelOptions.HELP_GROUP))  # BOS before each fact prompt
@borrow(FactOptions, "facts")
class ClassifyConfig(ModelOptions):
    """Settings of `kis classify-facts`: which facts to split into known/unknown, and the top-k test (no seed: the
    split takes every fact)."""

    top_k: int = setting(1, "known when the target's first token is in the top-k next tokens")

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least("top_k", self.top_k, 1)


def facts_digest(facts: Sequence[Fact]) -> str:
    """Return a short hash of the facts' content and order (detects an edited facts file)."""
    payload = json.dumps([fact.to_dict() for fact in facts], sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def prompt_ids(tokenizer: Any, fact: Fact, prepend_bos: bool) -> list[int]:
    """Return the token ids of the fact prompt with the subject filled in and no target."""
    return encode(tokenizer, fact.text, prepend_bos)


def target_first_token(tokenizer: Any, fact: Fact) -> int:
    """Return the id of the first token of target_true as it follows the prompt (with its leading space)."""
    # CounterFact stores targets without the space that separates them from the prompt. Tokenizing
    # prompt + " " + target and reading the first token past the prompt gets the space right for
    # byte-level BPE (" Paris" -> "ĠParis") and SentencePiece ("▁Paris") alike.
    target = fact.target_true if fact.target_true.startswith(" ") else " " + fact.target_true
    prompt = encode(tokenizer, fact.text, prepend_bos=False)
    full = encode(tokenizer, fact.text + target, prepend_bos=False)
    if len(full) > len(prompt) and full[: len(prompt)] == prompt:
        return int(full[len(prompt)])
    alone = encode(tokenizer, target, prepend_bos=False)
    if not alone:
        raise KisError(f"fact {fact.case_id}: target_true {fact.target_true!r} has no tokens")
    return int(alone[0])


def next_token_logits(
    model: HookedModel,
    facts: Sequence[Fact],
    prepend_bos: bool | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> Float[Tensor, "fact vocab"]:
    """Return the float32 next-token logits after each fact prompt, from right-padded batches."""
    if not facts:
        raise KisError("no facts given: load some with kis_lens.load_facts()")
    if batch_size < 1:
        raise KisError(f"batch_size must be at least 1, got {batch_size}")
    prepend_bos = resolve_prepend_bos(model, prepend_bos)
    sequences = [prompt_ids(model.tokenizer, fact, prepend_bos) for fact in facts]
    n_ctx = int(model.cfg.n_ctx)
    too_long = [fact.case_id for fact, ids in zip(facts, sequences) if len(ids) > n_ctx]
    if too_long:
        raise KisError(f"fact prompt(s) {too_long[:5]} are longer than the model's context of {n_ctx} tokens")
    pad_id = pad_token_id(model.tokenizer)
    device = model_device(model)
    rows: list[Tensor] = []
    for begin in tqdm(
        range(0, len(sequences), batch_size), desc="classify facts", disable=not progress, dynamic_ncols=True
    ):
        chunk = sequences[begin : begin + batch_size]
        tokens, mask = pad_batch(chunk, pad_id)
        # Right padding under a causal mask leaves every real position's logits untouched.
        last = mask.sum(dim=1) - 1
        with torch.no_grad():
            logits = model(tokens.to(device), return_type="logits", attention_mask=mask.to(device))
        rows.append(gather_positions(logits, last).float().cpu())
    return torch.cat(rows)


def target_ranks(logits: Float[Tensor, "fact vocab"], targets: Int[Tensor, " fact"]) -> Int[Tensor, " fact"]:
    """Return each target token's rank among the logits (0 = the model's top-1 prediction)."""
    target_logits = logits.gather(1, targets.view(-1, 1))
    return (logits > target_logits).sum(dim=1)


@dataclass
class KnowledgeSplit:
    """The known/unknown split of a fact set for one model, with what identifies both."""

    model_name: str
    model_fingerprint: str
    facts_source: str
    facts_digest: str
    top_k: int
    prepend_bos: bool
    known: list[int]  # indices into the fact set, in its order
    unknown: list[int]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    format_version: int = SPLIT_FORMAT_VERSION

    @property
    def n_facts(self) -> int:
        """Return how many facts were classified."""
        return len(self.known) + len(self.unknown)

    def indices(self, knowledge_type: str) -> list[int]:
        """Return the fact indices of "known", "unknown" or "all"."""
        if knowledge_type == "known":
            return list(self.known)
        if knowledge_type == "unknown":
            return list(self.unknown)
        if knowledge_type == "all":
            return sorted([*self.known, *self.unknown])
        raise KisError(f"unknown knowledge_type {knowledge_type!r}: use known, unknown or all")

    def select(self, facts: Sequence[Fact], knowledge_type: str) -> list[Fact]:
        """Return the facts of one knowledge type; KisError when facts are not the ones classified."""
        if facts_digest(facts) != self.facts_digest:
            raise KisError(
                f"these facts differ from the {self.n_facts} facts this split classified ({self.facts_source}); "
                "rerun `kis classify-facts` on them"
            )
        return [facts[index] for index in self.indices(knowledge_type)]

    def to_dict(self) -> dict[str, Any]:
        """Return the split as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KnowledgeSplit:
        """Return a split read back from its dict."""
        return cls(**data)


def classify_facts(
    model: HookedModel,
    facts: Sequence[Fact],
    top_k: int = 1,
    prepend_bos: bool | None = None,
    batch_size: int = 16,
    facts_source: str = "",
    progress: bool = False,
) -> KnowledgeSplit:
    """Return which facts the model knows: target_true's first token within its top-k next tokens."""
    if top_k < 1:
        raise KisError(f"top_k must be at least 1, got {top_k}")
    prepend_bos = resolve_prepend_bos(model, prepend_bos)
    logits = next_token_logits(model, facts, prepend_bos, batch_size, progress)
    targets = torch.tensor([target_first_token(model.tokenizer, fact) for fact in facts])
    ranks = target_ranks(logits, targets)
    probabilities = logits.log_softmax(dim=-1).exp()
    top1 = logits.argmax(dim=-1)
    decode = model.tokenizer.decode
    predictions = [
        {
            "case_id": fact.case_id,
            "target": fact.target_true,
            "target_token": decode([int(targets[i])]),
            "target_rank": int(ranks[i]),
            "target_prob": round(float(probabilities[i, targets[i]]), 6),
            "top1_token": decode([int(top1[i])]),
        }
        for i, fact in enumerate(facts)
    ]
    known = [i for i in range(len(facts)) if int(ranks[i]) < top_k]
    unknown = [i for i in range(len(facts)) if int(ranks[i]) >= top_k]
    return KnowledgeSplit(
        model_name=model_info(model).name,
        model_fingerprint=model_fingerprint(model),
        facts_source=facts_source,
        facts_digest=facts_digest(facts),
        top_k=top_k,
        prepend_bos=prepend_bos,
        known=known,
        unknown=unknown,
        predictions=predictions,
    )


def save_split(split: KnowledgeSplit, path: str | Path) -> Path:
    """Write the split as JSON atomically; return its path."""
    return save_json(path, split.to_dict())


def load_split(path: str | Path) -> KnowledgeSplit:
    """Return the split saved at path; KisError when it is missing or unreadable."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return KnowledgeSplit.from_dict(data)
    except FileNotFoundError:
        raise KisError(f"no known/unknown split at {path}: run `kis classify-facts` first") from None
    except (OSError, ValueError, TypeError) as error:
        raise KisError(
            f"known/unknown split {path} is unreadable ({error}); delete it and rerun `kis classify-facts`"
        ) from None


def ensure_split(
    model: HookedModel,
    facts_source: str,
    output_dir: str | Path,
    top_k: int | None = None,
    prepend_bos: bool | None = None,
    recompute: bool = False,
    progress: bool = False,
) -> tuple[KnowledgeSplit, Path]:
    """Return the model's saved split of a fact set when it still matches, else classify, save and return it."""
    facts = load_facts(facts_source)
    prepend_bos = resolve_prepend_bos(model, prepend_bos)
    path = split_path(output_dir, model_info(model).name, facts_source)
    if path.is_file() and not recompute:
        saved = load_split(path)
        matches = (
            fingerprint_matches(saved.model_fingerprint, model)
            and saved.facts_digest == facts_digest(facts)
            and saved.prepend_bos == prepend_bos
            and (top_k is None or saved.top_k == top_k)
        )
        if matches and saved.model_fingerprint != model_fingerprint(model):
            # saved under the older sampled fingerprint, which this model matches: re-keyed, not reclassified
            saved = replace(saved, model_fingerprint=model_fingerprint(model))
            return saved, save_split(saved, path)
        if matches:
            return saved, path
    split = classify_facts(
        model, facts, top_k=top_k or 1, prepend_bos=prepend_bos, facts_source=str(facts_source), progress=progress
    )
    return split, save_split(split, path)
