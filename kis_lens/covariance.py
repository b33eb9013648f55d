"""Estimate every requested layer's MLP-input second moment C = E[k kᵀ] from one forward pass per batch.

``estimate_second_moments`` is the in-memory core. ``cache_second_moments`` is the research-scale job
behind ``kis cache-cov``: it reuses or extends caches, splits layers into groups under a memory
budget, checkpoints every N tokens (a killed job rerun with the same command continues to the identical
result), shards texts across torchrun ranks and all-reduces the sums.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import torch
from tqdm.auto import tqdm

from kis_lens import __version__
from kis_lens.corpus import Corpus, TokenBatch, open_corpus, token_batches
from kis_lens.distributed import all_reduce_ints, all_reduce_moments, barrier, rank_and_world
from kis_lens.errors import KisError
from kis_lens.hooks import mlp_in_hook_name, run_mlp_hooks, validate_layers
from kis_lens.io import check_writable, folder_lock, remove_stale_temp_files
from kis_lens.models import model_device, model_fingerprint, model_info, tokenizer_adds_bos
from kis_lens.stats import NonFiniteBatch, SecondMoment
from kis_lens.storage import (
    MATCH_KEYS,
    STATS_DTYPES,
    check_metadata,
    load_checkpoint,
    load_second_moment,
    read_metadata,
    save_checkpoint,
    save_second_moment,
    stats_dir,
    stats_path,
)

DEFAULT_CHECKPOINT_EVERY = 5_000_000
DEFAULT_SORT_WINDOW = 1024
# Batches pack (and checkpoint) by --batch_token, n_ctx by default, but on a CPU a forward over 8,192 tokens
# pushes its activations out of cache and the elementwise ops turn memory-bound. So a CPU runs each batch as
# row groups of this many tokens: SmolLM2's covariance at its default batch_token went from 359 to 478 tok/s
# (benchmarks/covariance.py; 1,024–4,096 were within noise of each other).
CPU_FORWARD_TOKENS = 2048


TextIndex = Callable[[TokenBatch, int], int]


def _stream_index(batch: TokenBatch, row: int) -> int:
    """Return the index, in the stream given to token_batches, of a batch row's text."""
    return batch.window_start + batch.text_offsets[row]


def check_batch_token(batch_token: int | None, n_ctx: int) -> int:
    """Return the tokens per forward batch (n_ctx when None); KisError when one sequence would not fit."""
    if batch_token is None:
        return n_ctx
    if batch_token < n_ctx:
        raise KisError(
            f"--batch_token {batch_token} is smaller than one sequence (the model's context, n_ctx={n_ctx} tokens): "
            f"longer texts would be cut to {batch_token} tokens and C would describe only their beginnings; "
            f"use --batch_token {n_ctx} or more (short texts share a batch)"
        )
    return batch_token


def _nonfinite_rows(activation: torch.Tensor, keep: torch.Tensor) -> list[int]:
    """Return the batch rows with a NaN or inf at one of their real (unpadded) tokens."""
    bad = ~torch.isfinite(activation).all(dim=-1) & keep
    return bad.any(dim=-1).nonzero().flatten().tolist()


def _probe_nonfinite(model: Any, tokens: torch.Tensor, mask: torch.Tensor, layers: list[int], keep: torch.Tensor) -> list[int]:
    """Return the rows with a NaN or inf at any requested layer (one extra forward, nothing accumulated)."""
    bad: set[int] = set()
    run_mlp_hooks(model, tokens, layers, lambda _, activation: bad.update(_nonfinite_rows(activation, keep)), mask)
    return sorted(bad)


def forward_row_groups(batch: TokenBatch, group_tokens: int | None) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Return [(first row, tokens, mask)]: the batch's rows in consecutive groups of ≤ group_tokens padded tokens.

    Rows come longest first, so each group is trimmed to its first row's length: less padding, same real tokens.
    A row longer than group_tokens forms its own group. None keeps the batch whole.
    """
    if group_tokens is None:
        return [(0, batch.tokens, batch.attention_mask)]
    lengths = batch.attention_mask.sum(dim=1).tolist()
    groups, first = [], 0
    while first < len(lengths):
        width = max(int(lengths[first]), 1)
        stop = first + max(1, group_tokens // width)
        groups.append((first, batch.tokens[first:stop, :width], batch.attention_mask[first:stop, :width]))
        first = stop
    return groups


def accumulate_batches(
    model: Any,
    batches: Iterable[TokenBatch],
    moments: dict[int, SecondMoment],
    text_index: TextIndex = _stream_index,
    skip_nonfinite: bool = False,
    skipped: list[int] | None = None,
    group_tokens: int | Literal["auto"] | None = "auto",
) -> Iterator[TokenBatch]:
    """Run each batch through the model once, add every layer's real-token rows, and yield the batch when done.

    A NaN or inf in a text's activations stops the job with a KisError naming the text (text_index gives
    its number in the corpus). With skip_nonfinite each batch is first probed by an extra forward and
    such texts are left out of every layer and appended to skipped. group_tokens splits each batch's
    forward into row groups of that many tokens ("auto": CPU_FORWARD_TOKENS on a CPU, whole batches elsewhere).
    """
    layers = sorted(moments)
    device = model_device(model)
    if group_tokens == "auto":
        group_tokens = CPU_FORWARD_TOKENS if device.type == "cpu" else None

    def add_rows(batch: TokenBatch, first: int, tokens: torch.Tensor, mask: torch.Tensor) -> None:
        keep = mask.to(device).bool()
        if skip_nonfinite:
            bad = _probe_nonfinite(model, tokens, mask, layers, keep)
            keep[bad] = False
            if skipped is not None:
                skipped.extend(text_index(batch, first + row) for row in bad)
        if not keep.any():
            return
        unpadded = bool(keep.all())

        def accumulate(layer: int, activation: torch.Tensor) -> None:
            # Padding positions never enter the statistics; rows without padding need no copy.
            rows = activation.reshape(-1, activation.shape[-1]) if unpadded else activation[keep]
            try:
                moments[layer].update(rows)  # upcasts fp16/bf16 rows to float32 before any product
            except NonFiniteBatch:
                # Finite activations whose float32 products overflow name every text of the group.
                suspects = _nonfinite_rows(activation, keep) or keep.any(dim=-1).nonzero().flatten().tolist()
                texts = sorted(text_index(batch, first + row) for row in suspects)
                raise KisError(
                    f"NaN or inf in the layer-{layer} MLP activations of corpus text(s) {texts[:10]} "
                    f"(numbered from 0): the model overflowed on them (or their float32 products did). Run it in "
                    "float32 or bfloat16 (--dtype), or pass --skip_nonfinite to leave such texts out and count them"
                ) from None

        run_mlp_hooks(model, tokens, layers, accumulate, attention_mask=mask)

    for batch in batches:
        if batch.n_tokens:
            for first, tokens, mask in forward_row_groups(batch, group_tokens):
                add_rows(batch, first, tokens, mask)
        yield batch


def estimate_second_moments(
    model: Any,
    texts: Iterable[str],
    layers: Sequence[int],
    batch_token: int | None = None,
    max_tokens: int | None = None,
    prepend_bos: bool | None = None,
    accumulate_on: str | torch.device | None = None,
    progress: bool = True,
    skip_nonfinite: bool = False,
    skipped: list[int] | None = None,
) -> dict[int, SecondMoment]:
    """Return {layer: SecondMoment} over the texts' real (unpadded) tokens, all layers from the same forward."""
    layers = validate_layers(model, layers)
    n_ctx = int(model.cfg.n_ctx)
    batch_token = check_batch_token(batch_token, n_ctx)
    prepend_bos = tokenizer_adds_bos(model) if prepend_bos is None else prepend_bos
    device = accumulate_on or model_device(model)
    moments = {layer: SecondMoment(int(model.cfg.d_mlp), device=device) for layer in layers}
    bar = tqdm(total=max_tokens, unit="tok", desc="second moments", disable=not progress, dynamic_ncols=True)
    seen_tokens = 0
    batches = token_batches(model.tokenizer, texts, n_ctx, batch_token, prepend_bos)
    for batch in accumulate_batches(model, batches, moments, skip_nonfinite=skip_nonfinite, skipped=skipped):
        seen_tokens += batch.n_tokens
        bar.update(batch.n_tokens)
        if max_tokens is not None and seen_tokens >= max_tokens:
            break
    bar.close()
    if seen_tokens == 0:
        raise KisError("the corpus gave no tokens: it is empty, or every text was empty after tokenization")
    return moments


@dataclass(frozen=True)
class CovarianceRequest:
    """What to estimate: corpus and sample, token budget, batching, tokenization and where caches go."""

    corpus: str
    output_dir: str | Path
    sample_size: int | None = None  # number of corpus texts (None: all)
    max_tokens: int | None = None  # token budget (None: no limit)
    batch_token: int | None = None  # tokens per forward, padding included (None: n_ctx)
    prepend_bos: bool | None = None  # None: what the model's own tokenizer does
    model_dtype: str = "float32"
    stats_dtype: str = "float32"  # dtype of the stored E[k kᵀ]
    checkpoint_every: int | None = DEFAULT_CHECKPOINT_EVERY  # tokens between checkpoints (None/0: never)
    max_memory: int | None = None  # bytes for the accumulators; more layers than fit → several passes
    sort_window: int = DEFAULT_SORT_WINDOW
    skip_nonfinite: bool = False  # leave out (and count) texts whose activations hold NaN/inf instead of stopping
    progress: bool = True


@dataclass
class CacheReport:
    """Where the caches are and what the job did."""

    paths: dict[int, Path]
    tokens: int = 0  # tokens the caches now hold
    texts: int = 0  # texts the caches now hold (empty ones not counted)
    computed_tokens: int = 0  # tokens run through the model by this job
    reused: list[int] = field(default_factory=list)
    extended: list[int] = field(default_factory=list)
    groups: list[list[int]] = field(default_factory=list)
    resumed: bool = False
    seconds: float = 0.0
    skipped_texts: list[int] = field(default_factory=list)  # corpus indices left out for NaN/inf (skip_nonfinite)

    def summary(self) -> str:
        """Return the one-line account of the job: totals, what was reused, and where the files are."""
        folder = next(iter(self.paths.values())).parent
        parts = [f"covariance of {len(self.paths)} layers: {self.tokens:,} tokens from {self.texts:,} texts"]
        if self.computed_tokens:
            parts.append(f"{self.computed_tokens:,} tokens run in {self.seconds:.1f} s ({self.computed_tokens / max(self.seconds, 1e-9):,.0f} tok/s)")
        if self.reused:
            parts.append(f"{len(self.reused)} layers reused")
        if self.extended:
            parts.append(f"{len(self.extended)} layers extended")
        if self.resumed:
            parts.append("resumed from a checkpoint")
        if self.skipped_texts:
            parts.append(f"{len(self.skipped_texts)} texts with NaN/inf left out (first: {self.skipped_texts[:5]})")
        return "; ".join(parts) + f"; caches in {folder}"


def parse_bytes(text: str | int | None) -> int | None:
    """Return a byte count from "30GB", "512MiB", "2e9" or an int (None stays None)."""
    if text is None or isinstance(text, int):
        return text
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    stripped = text.strip().lower().replace(" ", "")
    number = stripped.rstrip("abgikmt")
    unit = stripped[len(number):]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise KisError(f"cannot read {text!r} as a memory size: write e.g. 30GB, 512MiB or 2e9") from None
    if value <= 0:
        raise KisError(f"memory size {text!r} must be positive")
    return int(value)


def layer_groups(layers: Sequence[int], d_mlp: int, max_memory: int | None) -> list[list[int]]:
    """Return the layers split into consecutive groups whose accumulators fit in max_memory bytes."""
    layers = list(layers)
    if max_memory is None:
        return [layers]
    per_layer = SecondMoment.bytes_needed(d_mlp)
    if per_layer > max_memory:
        raise KisError(
            f"--max_memory {max_memory / 1e9:.2f} GB is less than one layer's accumulator "
            f"({per_layer / 1e9:.2f} GB for d_mlp={d_mlp}): raise --max_memory"
        )
    size = max_memory // per_layer
    return [layers[start : start + size] for start in range(0, len(layers), size)]


def cache_identity(model: Any, layer: int, corpus: str, prepend_bos: bool) -> dict[str, Any]:
    """Return the metadata that says which model, layer, hook, corpus and BOS convention a cache belongs to."""
    info = model_info(model)
    return {
        "model_name": info.name,
        "model_fingerprint": model_fingerprint(model),
        "layer": layer,
        "hook": mlp_in_hook_name(layer),
        "d_mlp": info.d_mlp,
        "corpus": corpus,
        "prepend_bos": prepend_bos,
    }


def _base_metadata(model: Any, corpus: Corpus, request: CovarianceRequest, prepend_bos: bool, layer: int) -> dict[str, Any]:
    info = model_info(model)
    return {
        **cache_identity(model, layer, request.corpus, prepend_bos),
        "corpus_identity": corpus.identity,
        "corpus_credit": corpus.credit,
        "max_length": info.n_ctx,
        "model_dtype": request.model_dtype,
    }


@dataclass
class _Pass:
    """One pass over the corpus for a group of layers that start at the same text."""

    layers: list[int]
    start_text: int
    initial: dict[int, SecondMoment]  # existing caches being extended (empty for a fresh pass)
    initial_texts: int = 0


def cache_second_moments(model: Any, layers: Sequence[int], request: CovarianceRequest) -> CacheReport:
    """Estimate, extend or reuse each layer's cache of E[k kᵀ] on disk; return where they are and what was done."""
    layers = validate_layers(model, layers)
    if request.stats_dtype not in STATS_DTYPES:
        raise KisError(f"unknown stats dtype {request.stats_dtype!r}: use one of {', '.join(STATS_DTYPES)}")
    if request.sample_size is not None and request.sample_size < 1:
        raise KisError(f"sample_size must be at least 1, not {request.sample_size}")
    info = model_info(model)
    check_batch_token(request.batch_token, info.n_ctx)
    corpus = open_corpus(request.corpus)
    prepend_bos = tokenizer_adds_bos(model) if request.prepend_bos is None else request.prepend_bos
    paths = {layer: stats_path(request.output_dir, info.name, corpus.cache_name, layer) for layer in layers}
    folder = stats_dir(request.output_dir, info.name, corpus.cache_name)
    # Everything checkable is checked before the first byte is written (or the lock is taken).
    check_writable(folder)
    for layer in layers:
        if paths[layer].is_file():
            expect = _base_metadata(model, corpus, request, prepend_bos, layer)
            check_metadata(paths[layer], read_metadata(paths[layer]), {key: expect[key] for key in (*MATCH_KEYS, "corpus_identity")})
    rank, _ = rank_and_world()
    with folder_lock(folder) if rank == 0 else contextlib.nullcontext(folder):
        if rank == 0:  # a killed writer's leftovers; safe to remove now that no other job writes here
            remove_stale_temp_files(folder)
            remove_stale_temp_files(folder / "checkpoints")
        barrier()
        return _cache_locked(model, layers, request, corpus, prepend_bos, paths)


def _cache_locked(
    model: Any, layers: list[int], request: CovarianceRequest, corpus: Corpus, prepend_bos: bool, paths: dict[int, Path]
) -> CacheReport:
    """Run cache_second_moments' job once its inputs are checked and its folder is locked."""
    info = model_info(model)
    stop = corpus.stop_for(request.sample_size)
    report = CacheReport(paths)
    rank, world_size = rank_and_world()
    passes: dict[tuple[int, int], _Pass] = {}
    existing: dict[int, dict[str, Any]] = {}
    for layer in layers:
        metadata = _base_metadata(model, corpus, request, prepend_bos, layer)
        if paths[layer].is_file():
            found = read_metadata(paths[layer])
            check_metadata(paths[layer], found, {key: metadata[key] for key in (*MATCH_KEYS, "corpus_identity")})
            texts_read = int(found.get("texts_read", 0))
            wants_more = request.sample_size is not None and found.get("complete") and (stop is None or texts_read < stop)
            if not wants_more:
                existing[layer] = found
                report.reused.append(layer)
                continue
            moment, _ = load_second_moment(paths[layer])
            key = (texts_read, 1)
            passes.setdefault(key, _Pass([], texts_read, {}, int(found.get("texts", 0))))
            passes[key].layers.append(layer)
            passes[key].initial[layer] = moment
            report.extended.append(layer)
        else:
            passes.setdefault((0, 0), _Pass([], 0, {}))
            passes[(0, 0)].layers.append(layer)
    started = time.perf_counter()
    for job in passes.values():
        for group in layer_groups(job.layers, info.d_mlp, request.max_memory):
            if len(group) < len(job.layers) and rank == 0:
                print(
                    f"kis: {len(job.layers)} layers' accumulators need {len(job.layers) * SecondMoment.bytes_needed(info.d_mlp) / 1e9:.2f} GB "
                    f"> --max_memory {request.max_memory / 1e9:.2f} GB: pass {len(report.groups) + 1} over the corpus covers layers {group[0]}..{group[-1]}"
                )
            report.groups.append(group)
            initial = {layer: job.initial[layer] for layer in group if layer in job.initial}
            moments, texts, complete, texts_read, resumed, computed, skipped = _run_pass(
                model, corpus, group, job.start_text, stop, initial, request, prepend_bos, paths
            )
            report.resumed |= resumed
            report.skipped_texts = sorted(set(report.skipped_texts) | set(skipped))
            report.computed_tokens += computed
            if rank == 0:
                for layer in group:
                    metadata = _base_metadata(model, corpus, request, prepend_bos, layer)
                    metadata.update(
                        texts=texts + job.initial_texts,
                        texts_read=texts_read,
                        complete=complete,
                        sample_size=request.sample_size,
                        max_tokens=request.max_tokens,
                        batch_token=request.batch_token or info.n_ctx,
                        kis_lens_version=__version__,
                    )
                    if request.skip_nonfinite:
                        metadata.update(nonfinite_skipped=len(skipped), nonfinite_skipped_texts=skipped[:1000])
                    save_second_moment(paths[layer], moments[layer], metadata, dtype=request.stats_dtype)
                    existing[layer] = {"count": moments[layer].count, "texts": texts + job.initial_texts}
            barrier()
            _checkpoint_path(request, model, corpus, group, job.start_text, stop, prepend_bos, initial).unlink(missing_ok=True)
    report.seconds = time.perf_counter() - started
    if rank == 0:
        _remove_finished_checkpoints(stats_dir(request.output_dir, info.name, corpus.cache_name) / "checkpoints", layers)
    if existing:
        report.tokens = int(existing[layers[0]].get("count", 0))
        report.texts = int(existing[layers[0]].get("texts", 0))
    return report


def _remove_finished_checkpoints(folder: Path, layers: list[int]) -> None:
    """Delete checkpoints of passes over these layers only: every one of them now has its finished cache.

    A job killed after writing some final caches but before deleting its checkpoint leaves one behind;
    the rerun reuses those caches, computes the rest in a new pass, and so never reads it again.
    """
    for path in folder.glob("layers_*-*_*.safetensors") if folder.is_dir() else []:
        first, _, last = path.name.removeprefix("layers_").split("_")[0].partition("-")
        if first.isdigit() and last.isdigit() and set(range(int(first), int(last) + 1)) <= set(layers):
            path.unlink(missing_ok=True)


def _checkpoint_path(
    request: CovarianceRequest,
    model: Any,
    corpus: Corpus,
    layers: list[int],
    start_text: int,
    stop: int | None,
    prepend_bos: bool,
    initial: dict[int, SecondMoment],
) -> Path:
    """Return the checkpoint file of one pass; its name hashes every setting that changes the result."""
    rank, world_size = rank_and_world()
    identity = {
        "model_fingerprint": model_fingerprint(model),
        "model_dtype": request.model_dtype,
        "layers": layers,
        "corpus": corpus.identity,
        "start_text": start_text,
        "stop": stop,
        "max_tokens": request.max_tokens,
        "batch_token": request.batch_token,
        "prepend_bos": prepend_bos,
        "sort_window": request.sort_window,
        "skip_nonfinite": request.skip_nonfinite,
        "initial_counts": {str(layer): moment.count for layer, moment in initial.items()},
        "world_size": world_size,
        "rank": rank,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    folder = stats_dir(request.output_dir, model_info(model).name, corpus.cache_name) / "checkpoints"
    suffix = f".rank{rank}of{world_size}" if world_size > 1 else ""
    return folder / f"layers_{layers[0]}-{layers[-1]}_{digest}{suffix}.safetensors"


def _run_pass(
    model: Any,
    corpus: Corpus,
    layers: list[int],
    start_text: int,
    stop: int | None,
    initial: dict[int, SecondMoment],
    request: CovarianceRequest,
    prepend_bos: bool,
    paths: dict[int, Path],
) -> tuple[dict[int, SecondMoment], int, bool, int, bool, int, list[int]]:
    """Run one checkpointed pass; return (moments, texts, complete, texts_read, resumed, tokens run, skipped texts)."""
    rank, world_size = rank_and_world()
    device = model_device(model)
    d_mlp = int(model.cfg.d_mlp)
    n_ctx = int(model.cfg.n_ctx)
    checkpoint = _checkpoint_path(request, model, corpus, layers, start_text, stop, prepend_bos, initial)
    initial_tokens = next(iter(initial.values())).count if initial else 0
    budget = None
    if request.max_tokens is not None:
        budget = max(0, math.ceil((request.max_tokens - initial_tokens) / world_size))
    resumed = checkpoint.is_file()
    if resumed:
        moments, state = load_checkpoint(checkpoint, device=device)
        if sorted(moments) != layers:
            raise KisError(f"checkpoint {checkpoint} holds layers {sorted(moments)}, not {layers}; delete it to start afresh")
        position = (int(state["window_start"]), int(state["batches_done"]))
        tokens, texts, done = int(state["tokens"]), int(state["texts"]), bool(state["done"])
        skipped = [int(index) for index in state.get("skipped", [])]
        if rank == 0:
            print(f"kis: resuming layers {layers[0]}..{layers[-1]} from {checkpoint} ({tokens:,} tokens, {texts:,} texts done)")
    else:
        moments = {layer: SecondMoment(d_mlp, device=device) for layer in layers}
        if rank == 0:  # an extended cache's sums enter once, not once per rank
            for layer, moment in initial.items():
                moments[layer] = SecondMoment.from_state(moment.upper.to(device), moment.count)
        position, tokens, texts, done = (0, 0), 0, 0, False
        skipped = []
    computed = 0
    complete = False
    if not done:
        if world_size == 1:
            stream: Iterable[str] = corpus.texts(start_text + position[0], stop)
        else:  # each rank reads every world_size-th text; positions count this rank's texts
            stream = itertools.islice(corpus.texts(start_text, stop, rank, world_size), position[0], None)
        batches = token_batches(
            model.tokenizer, stream, n_ctx, request.batch_token or n_ctx, prepend_bos, request.sort_window, (position[0], position[1])
        )
        total = None if stop is None else math.ceil((stop - start_text - rank) / world_size)
        bar = tqdm(
            total=total, initial=texts, unit="text", desc=f"C layers {layers[0]}..{layers[-1]}",
            disable=not request.progress or rank != 0, dynamic_ncols=True,
        )
        last_checkpoint, started = tokens, time.perf_counter()
        stopped_by_budget = False
        if world_size == 1:
            text_index: TextIndex = lambda batch, row: start_text + _stream_index(batch, row)  # noqa: E731
        else:
            text_index = lambda batch, row: start_text + rank + _stream_index(batch, row) * world_size  # noqa: E731
        for batch in accumulate_batches(model, batches, moments, text_index, request.skip_nonfinite, skipped):
            tokens += batch.n_tokens
            computed += batch.n_tokens
            texts += batch.n_texts
            position = batch.resume_position()
            bar.set_postfix(tokens=f"{tokens:,}", tok_s=f"{computed / max(time.perf_counter() - started, 1e-9):,.0f}", refresh=False)
            bar.update(batch.n_texts)  # per batch, so a budget smaller than one sort window still shows progress
            if budget is not None and tokens >= budget:
                stopped_by_budget = True
                break
            if request.checkpoint_every and tokens - last_checkpoint >= request.checkpoint_every:
                state = {"window_start": position[0], "batches_done": position[1], "tokens": tokens, "texts": texts, "done": False, "skipped": skipped}
                save_checkpoint(checkpoint, moments, state)
                last_checkpoint = tokens
        bar.close()
        complete = not stopped_by_budget
        if request.checkpoint_every and world_size > 1:
            # Before the collective: a rank killed later resumes from here without redoing its shard.
            state = {"window_start": position[0], "batches_done": position[1], "tokens": tokens, "texts": texts, "done": True, "complete": complete, "skipped": skipped}
            save_checkpoint(checkpoint, moments, state)
    else:
        complete = bool(state.get("complete", True))
    local_read = position[0]
    tokens, texts, local_read, incomplete = all_reduce_ints([tokens, texts, local_read, int(not complete)], device)
    all_reduce_moments(moments)
    if tokens == 0 and not initial:
        raise KisError("the corpus gave no tokens: it is empty, or every text was empty after tokenization")
    texts_read = start_text + local_read
    return moments, texts, incomplete == 0, texts_read, resumed, computed, skipped
