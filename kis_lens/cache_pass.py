"""One pass of the covariance job over a token stream: what it reads, where it checkpoints, what it leaves.

A pass accumulates E[k kᵀ] for a group of layers whose caches stand at the same point of one stream, from where
its checkpoint (or the extended caches) left off until the token budget or the stream ends; it checkpoints every N
tokens under a name that hashes every setting that changes the result, and with torchrun each rank reads every
world_size-th text and the sums are all-reduced. ``kis_lens.cache_job`` plans the passes and writes the caches.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from tqdm.auto import tqdm

from kis_lens.config import CacheOptions
from kis_lens.corpus import Corpus
from kis_lens.covariance import TextIndex, accumulate_batches, stream_index
from kis_lens.distributed import all_reduce_ints, all_reduce_moments, rank_and_world
from kis_lens.errors import KisError
from kis_lens.fingerprint import is_legacy_fingerprint
from kis_lens.layout import checkpoints_dir, stats_dir, stats_path
from kis_lens.models import HookedModel, ModelInfo
from kis_lens.stats import SecondMoment
from kis_lens.storage import CacheKey, load_checkpoint, save_checkpoint
from kis_lens.tokens import token_batches


@dataclass(frozen=True)
class JobSetting:
    """What is fixed for the whole job once the model is resolved and the corpus opened."""

    request: CacheOptions
    info: ModelInfo
    corpus: Corpus
    prepend_bos: bool
    stop: int | None  # index after the last corpus text the request may read (None: to the end)
    legacy_fingerprint: str | None = None  # the model's sampled W_out fingerprint of older kis: caches keyed on it
    record: Mapping[str, Any] = field(default_factory=dict)  # the caller's entries in every cache's metadata
    timed: bool = False  # whether the caches record the seconds they took

    def rekeyable(self, metadata: dict[str, Any]) -> bool:
        """Return whether a cache was keyed on this model's legacy fingerprint (re-keyed, not recomputed)."""
        recorded = metadata.get("model_fingerprint")
        return is_legacy_fingerprint(recorded) and recorded == self.legacy_fingerprint

    def key(self, layer: int) -> CacheKey:
        """Return the identity of this job's cache for a layer."""
        return CacheKey.for_model(
            self.info, layer, self.request.corpus, self.corpus.identity, self.prepend_bos, self.request.stats_dtype
        )

    def path(self, layer: int) -> Path:
        """Return where a layer's cache lives."""
        return stats_path(
            self.request.output_dir, self.info.name, self.corpus.cache_name, layer, self.request.stats_dir
        )

    @property
    def folder(self) -> Path:
        """Return the folder of this model's caches for this corpus."""
        return stats_dir(self.request.output_dir, self.info.name, self.corpus.cache_name, self.request.stats_dir)


@dataclass
class PassPlan:
    """One pass over a token stream for a group of layers whose caches stand at the same point of it."""

    layers: list[int]
    start_text: int  # corpus index where the pass's stream begins
    position: tuple[int, int] = (0, 0)  # (window start, batches done) within that stream
    initial: dict[int, SecondMoment] = field(default_factory=dict)  # the sums of caches being extended
    initial_texts: int = 0
    batch_token: int | None = None  # None: the request's (an extended cache keeps its own batching)
    sort_window: int | None = None

    @property
    def initial_tokens(self) -> int:
        """Return the tokens the extended caches already hold (0 for a fresh pass)."""
        return next(iter(self.initial.values())).count if self.initial else 0

    def state_key(self) -> tuple[Any, ...]:
        """Return what layers must share to be extended in the same pass."""
        return (
            self.start_text,
            self.position,
            self.initial_tokens,
            self.initial_texts,
            self.batch_token,
            self.sort_window,
        )


@dataclass
class PassResult:
    """What a pass leaves: every layer's sums, the totals they hold and where in the corpus the pass stopped."""

    moments: dict[int, SecondMoment]
    tokens: int  # held by the sums (extended caches' included)
    texts: int
    texts_read: int  # corpus index up to which every text was read
    stream_start: int
    position: tuple[int, int] | None  # where to continue this stream (None with several ranks)
    exhausted: bool  # the stream ended (at the stop or the corpus' end) before the token budget did
    resumed: bool
    computed_tokens: int
    skipped: list[int]
    seconds: float  # the pass' wall time (resumed from a checkpoint: the time before the kill too)


def checkpoint_path(setting: JobSetting, plan: PassPlan) -> Path:
    """Return the checkpoint file of one pass; its name hashes every setting that changes the result."""
    rank, world_size = rank_and_world()
    request = setting.request
    identity = {
        "model_fingerprint": setting.info.fingerprint,
        "model_dtype": setting.info.dtype,
        "layers": plan.layers,
        "corpus": setting.corpus.identity,
        "start_text": plan.start_text,
        "position": list(plan.position),
        "stop": setting.stop,
        "max_tokens": request.max_tokens,
        "batch_token": plan.batch_token or request.batch_token,
        "prepend_bos": setting.prepend_bos,
        "sort_window": plan.sort_window or request.sort_window,
        "skip_nonfinite": request.skip_nonfinite,
        "initial_counts": {str(layer): moment.count for layer, moment in plan.initial.items()},
        "world_size": world_size,
        "rank": rank,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    suffix = f".rank{rank}of{world_size}" if world_size > 1 else ""
    return checkpoints_dir(setting.folder) / f"layers_{plan.layers[0]}-{plan.layers[-1]}_{digest}{suffix}.safetensors"


@dataclass
class _Progress:
    """A pass's running state: what a checkpoint saves and a resumed pass restores."""

    position: tuple[int, int]
    tokens: int = 0  # run by this pass on this rank (extended caches' not included)
    texts: int = 0
    done: bool = False
    exhausted: bool = False
    skipped: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def to_state(self) -> dict[str, Any]:
        """Return the checkpoint metadata of this state."""
        return {
            "window_start": self.position[0],
            "batches_done": self.position[1],
            "tokens": self.tokens,
            "texts": self.texts,
            "done": self.done,
            "complete": self.exhausted,
            "skipped": self.skipped,
            "seconds": self.seconds,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _Progress:
        """Return the progress a checkpoint saved."""
        return cls(
            (int(state["window_start"]), int(state["batches_done"])),
            int(state["tokens"]),
            int(state["texts"]),
            bool(state["done"]),
            bool(state.get("complete", False)),
            [int(index) for index in state.get("skipped", [])],
            float(state.get("seconds", 0.0)),
        )


def run_pass(model: HookedModel, setting: JobSetting, plan: PassPlan) -> PassResult:
    """Run one checkpointed pass of a plan over its stream; return the summed statistics and where it stopped."""
    request, info = setting.request, setting.info
    rank, world_size = rank_and_world()
    device = next(model.parameters()).device
    checkpoint = checkpoint_path(setting, plan)
    budget = None
    if request.max_tokens is not None:
        budget = max(0, math.ceil((request.max_tokens - plan.initial_tokens) / world_size))
    resumed = checkpoint.is_file()
    if resumed:
        moments, state = load_checkpoint(checkpoint, device=device)
        if sorted(moments) != plan.layers:
            raise KisError(
                f"checkpoint {checkpoint} holds layers {sorted(moments)}, not {plan.layers}; delete it to start afresh"
            )
        progress = _Progress.from_state(state)
        if rank == 0:
            print(
                f"kis: resuming layers {plan.layers[0]}..{plan.layers[-1]} from {checkpoint} "
                f"({progress.tokens:,} tokens, {progress.texts:,} texts done)"
            )
    else:
        moments = {layer: SecondMoment(info.d_mlp, device=device) for layer in plan.layers}
        if rank == 0:  # an extended cache's sums enter once, not once per rank
            moments.update({layer: moment.clone(device) for layer, moment in plan.initial.items()})
        progress = _Progress(plan.position)
    computed = 0
    if not progress.done:
        computed = _stream(model, setting, plan, moments, progress, budget, checkpoint)
    tokens, texts, local_read, unfinished = all_reduce_ints(
        [progress.tokens, progress.texts, progress.position[0], int(not progress.exhausted)], device
    )
    all_reduce_moments(moments)
    if tokens == 0 and not plan.initial:
        raise KisError("the corpus gave no tokens: it is empty, or every text was empty after tokenization")
    return PassResult(
        moments=moments,
        tokens=tokens + plan.initial_tokens,
        texts=texts + plan.initial_texts,
        texts_read=plan.start_text + local_read,
        stream_start=plan.start_text,
        position=progress.position if world_size == 1 else None,
        exhausted=unfinished == 0,
        resumed=resumed,
        computed_tokens=computed,
        skipped=progress.skipped,
        seconds=progress.seconds,
    )


def _stream(
    model: HookedModel,
    setting: JobSetting,
    plan: PassPlan,
    moments: dict[int, SecondMoment],
    progress: _Progress,
    budget: int | None,
    checkpoint: Path,
) -> int:
    """Accumulate the plan's stream from progress.position until the budget or the stream ends; return tokens run."""
    request, info = setting.request, setting.info
    rank, world_size = rank_and_world()
    start_text, stop = plan.start_text, setting.stop
    if world_size == 1:
        texts: Iterable[str] = setting.corpus.texts(start_text + progress.position[0], stop)
        text_index: TextIndex = lambda batch, row: start_text + stream_index(batch, row)  # noqa: E731
    else:  # each rank reads every world_size-th text; positions count this rank's texts
        texts = itertools.islice(setting.corpus.texts(start_text, stop, rank, world_size), progress.position[0], None)
        text_index = lambda batch, row: start_text + rank + stream_index(batch, row) * world_size  # noqa: E731
    batches = token_batches(
        model.tokenizer,
        texts,
        info.n_ctx,
        plan.batch_token or request.batch_token or info.n_ctx,
        setting.prepend_bos,
        plan.sort_window or request.sort_window,
        progress.position,
    )
    # A budget is what ends the pass: count tokens against it. Without one the texts are the limit.
    if budget is not None:
        total, initial, unit = budget, progress.tokens, "tok"
    else:
        total = None if stop is None else math.ceil((stop - start_text - rank) / world_size)
        initial, unit = progress.texts, "text"
    bar = tqdm(
        total=total,
        initial=initial,
        unit=unit,
        unit_scale=budget is not None,
        desc=f"C layers {plan.layers[0]}..{plan.layers[-1]}",
        disable=not request.progress or rank != 0,
        dynamic_ncols=True,
    )
    computed, last_checkpoint, started, earlier = 0, progress.tokens, time.perf_counter(), progress.seconds
    stopped_by_budget = False
    for batch in accumulate_batches(model, batches, moments, text_index, request.skip_nonfinite, progress.skipped):
        progress.tokens += batch.n_tokens
        progress.texts += batch.n_texts
        progress.position = batch.resume_position()
        computed += batch.n_tokens
        bar.set_postfix(tok_s=f"{computed / max(time.perf_counter() - started, 1e-9):,.0f}", refresh=False)
        bar.update(min(batch.n_tokens, budget - bar.n) if budget is not None else batch.n_texts)
        if budget is not None and progress.tokens >= budget:
            stopped_by_budget = True
            break
        if request.checkpoint_every and progress.tokens - last_checkpoint >= request.checkpoint_every:
            progress.seconds = earlier + time.perf_counter() - started
            save_checkpoint(checkpoint, moments, progress.to_state())
            last_checkpoint = progress.tokens
    bar.close()
    progress.done, progress.exhausted = True, not stopped_by_budget
    progress.seconds = earlier + time.perf_counter() - started
    if request.checkpoint_every and world_size > 1:
        # Before the collective: a rank killed later resumes from here without redoing its shard.
        save_checkpoint(checkpoint, moments, progress.to_state())
    return computed
