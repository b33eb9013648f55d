"""The resumable covariance job behind ``kis cache-cov``: per-layer caches of E[k kᵀ] on disk.

For every requested layer the job reuses a cache that already holds what was asked for, extends one that
holds less (continuing its own token stream, so the result equals one uninterrupted run with the larger
budget, bit for bit), and estimates the rest in as few passes over the corpus as memory allows. A pass
checkpoints every N tokens (a killed job rerun with the same command continues to the identical result),
shards texts across torchrun ranks and all-reduces the sums. Given a range of the corpus' texts (a TextRange), the
job caches those texts alone, as a corpus of their own (kis_lens.corpus.Corpus.part): `kis reproduce`'s quarters.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from kis_lens._version import __version__
from kis_lens.cache_pass import JobSetting, PassPlan, PassResult, checkpoint_path, run_pass
from kis_lens.config import CacheOptions
from kis_lens.corpus import TextRange, open_corpus
from kis_lens.covariance import check_batch_token
from kis_lens.distributed import barrier, rank_and_world
from kis_lens.errors import KisError
from kis_lens.fingerprint import legacy_fingerprint
from kis_lens.gguf import file_sha256
from kis_lens.hooks import validate_layers
from kis_lens.io import check_writable, folder_lock, remove_stale_temp_files
from kis_lens.layout import checkpoints_dir
from kis_lens.models import HookedModel, ModelInfo, model_info, resolve_prepend_bos
from kis_lens.stats import SecondMoment
from kis_lens.storage import load_second_moment, read_metadata, rewrite_metadata, save_second_moment


@dataclass(frozen=True)
class LayerCache:
    """What one layer's cache holds after the job: where it is and how many tokens and texts its C averages."""

    path: Path
    tokens: int
    texts: int


@dataclass
class CacheReport:
    """Where the caches are, what each holds and what the job did."""

    paths: dict[int, Path]
    layers: dict[int, LayerCache] = field(default_factory=dict)
    computed_tokens: int = 0  # tokens run through the model by this job
    reused: list[int] = field(default_factory=list)
    extended: list[int] = field(default_factory=list)
    groups: list[list[int]] = field(default_factory=list)
    resumed: bool = False
    seconds: float = 0.0
    skipped_texts: list[int] = field(default_factory=list)  # corpus indices left out for NaN/inf (skip_nonfinite)
    notes: list[str] = field(default_factory=list)  # what the user should know: more than asked, fingerprints recorded

    @property
    def tokens(self) -> int:
        """Return the tokens the first layer's cache holds (every layer of one job holds the same, unless reused)."""
        return self.layers[min(self.layers)].tokens if self.layers else 0

    @property
    def texts(self) -> int:
        """Return the texts the first layer's cache holds."""
        return self.layers[min(self.layers)].texts if self.layers else 0

    def summary(self) -> str:
        """Return the one-line account of the job: totals, what was reused, and where the files are."""
        folder = next(iter(self.paths.values())).parent
        counts = sorted({(cache.tokens, cache.texts) for cache in self.layers.values()})
        held = " / ".join(f"{tokens:,} tokens from {texts:,} texts" for tokens, texts in counts)
        parts = [f"covariance of {len(self.paths)} layers: {held}"]
        if self.computed_tokens:
            parts.append(
                f"{self.computed_tokens:,} tokens run in {self.seconds:.1f} s "
                f"({self.computed_tokens / max(self.seconds, 1e-9):,.0f} tok/s)"
            )
        if self.reused:
            parts.append(f"{len(self.reused)} layers reused")
        if self.extended:
            parts.append(f"{len(self.extended)} layers extended")
        if self.resumed:
            parts.append("resumed from a checkpoint")
        if self.skipped_texts:
            parts.append(f"{len(self.skipped_texts)} texts with NaN/inf left out (first: {self.skipped_texts[:5]})")
        return "; ".join(parts + self.notes) + f"; caches in {folder}"


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


def cache_second_moments(
    model: HookedModel,
    layers: Sequence[int],
    request: CacheOptions,
    texts: TextRange | None = None,
    record: Mapping[str, Any] | None = None,
    timed: bool = False,
) -> CacheReport:
    """Estimate, extend or reuse each layer's cache of E[k kᵀ] on disk; return where they are and what they hold.

    texts: cache only this range of the corpus' texts, in a folder and under an identity of its own. record:
    entries to add to every cache's metadata (the job's own entries win). timed: record the seconds each cache
    took as "seconds" too (off by default: the bytes of a cache would then differ each time it is made, and runs
    key on them).
    """
    layers = validate_layers(model, layers)  # the request checked its own settings when it was made
    info = model_info(model)
    check_batch_token(request.batch_token, info.n_ctx)
    corpus = open_corpus(
        request.corpus,
        order=request.corpus_order,
        seed=request.corpus_seed,
        buffer=request.corpus_buffer,
        snapshot=request.wikipedia_snapshot,
    )
    if texts is not None:
        corpus = corpus.part(texts)
    setting = JobSetting(
        request,
        info,
        corpus,
        resolve_prepend_bos(model, request.prepend_bos),
        corpus.stop_for(request.sample_size),
        legacy_fingerprint(model),
        dict(record or {}),
        timed,
    )
    setting.key(layers[0])  # checks the stats dtype before anything is written
    # Everything checkable is checked before the first byte is written (or the lock is taken).
    check_writable(setting.folder)
    for layer in layers:
        if setting.path(layer).is_file():
            found = read_metadata(setting.path(layer))
            if setting.rekeyable(found):  # re-keyed under the lock below
                found = {**found, "model_fingerprint": info.fingerprint}
            setting.key(layer).check(setting.path(layer), found)
    rank, _ = rank_and_world()
    with folder_lock(setting.folder) if rank == 0 else contextlib.nullcontext(setting.folder):
        if rank == 0:  # a killed writer's leftovers; safe to remove now that no other job writes here
            remove_stale_temp_files(setting.folder)
            remove_stale_temp_files(checkpoints_dir(setting.folder))
        barrier()
        return _run_job(model, layers, setting)


def _covers(found: dict[str, Any], request: CacheOptions, stop: int | None) -> bool:
    """Return whether a cache already holds all the request asks for (or all its corpus can give)."""
    if "imported_from" in found:
        return True  # an imported cache cannot be extended: it is what it is
    exhausted = bool(found.get("exhausted", found.get("complete", False)))
    found_stop = found.get("stop")
    if exhausted and (found_stop is None or (stop is not None and found_stop >= stop)):
        return True
    if stop is not None and int(found.get("texts_read", 0)) >= stop:
        return True
    return request.max_tokens is not None and int(found["count"]) >= request.max_tokens


def _extension_plan(setting: JobSetting, layer: int, found: dict[str, Any]) -> PassPlan | None:
    """Return the pass that continues a cache holding less than asked, or None when it must be recomputed."""
    moment, _ = load_second_moment(setting.path(layer))
    texts = int(found.get("texts", 0))
    if found.get("exhausted"):  # the whole sample it asked for was read: more texts follow from where it ended
        return PassPlan([layer], int(found["texts_read"]), (0, 0), {layer: moment}, texts)
    position = found.get("position")
    if position is None or found.get("stats_dtype") != "float64":
        return None  # made without its stream position or rounded to float32: it cannot be continued exactly
    if found.get("stop") != setting.stop:
        raise KisError(
            f"covariance cache {setting.path(layer)} stopped at its token budget within a sample of "
            f"{found.get('stop')} texts, and this run asks for {setting.stop}: extend it with its own --sample_size "
            "(or none), or delete it to recompute"
        )
    return PassPlan(
        [layer],
        int(found["stream_start"]),
        (int(position[0]), int(position[1])),
        {layer: moment},
        texts,
        int(found["batch_token"]),
        int(found["sort_window"]),
    )


def _run_job(model: HookedModel, layers: list[int], setting: JobSetting) -> CacheReport:
    """Run cache_second_moments' job once its inputs are checked and its folder is locked."""
    request, info = setting.request, setting.info
    report = CacheReport({layer: setting.path(layer) for layer in layers})
    rank, world_size = rank_and_world()
    plans: dict[tuple[Any, ...], PassPlan] = {}
    earlier: dict[int, float] = {}  # seconds the caches being extended took to make
    for layer in layers:
        path = setting.path(layer)
        plan: PassPlan | None = None
        if path.is_file():
            found = read_metadata(path)
            if found.get("model_fingerprint") is None and "imported_from" in found and rank == 0:
                found = _record_fingerprint(path, info, report)
            if setting.rekeyable(found) and rank == 0:
                found = _rekey_legacy_fingerprint(path, info, report)
            if _covers(found, request, setting.stop):
                report.reused.append(layer)
                report.layers[layer] = LayerCache(path, int(found["count"]), int(found.get("texts", 0)))
                if request.max_tokens is not None and int(found["count"]) > request.max_tokens:
                    report.notes.append(
                        f"layer {layer}'s cache holds {int(found['count']):,} tokens, "
                        f"more than the {request.max_tokens:,} asked: used as it is"
                    )
                continue
            plan = _extension_plan(setting, layer, found)
            if plan is None:
                report.notes.append(
                    f"layer {layer}'s cache (from an older kis_lens or float32) cannot be extended exactly: recomputed"
                )
            else:
                report.extended.append(layer)
                earlier[layer] = float(found.get("seconds") or 0.0)
        plan = plan or PassPlan([layer], 0)
        plans.setdefault(plan.state_key(), replace(plan, layers=[], initial={}))
        plans[plan.state_key()].layers.append(layer)
        plans[plan.state_key()].initial.update(plan.initial)
    started = time.perf_counter()
    for plan in plans.values():
        for group in layer_groups(plan.layers, info.d_mlp, request.max_memory):
            if len(group) < len(plan.layers) and rank == 0:
                print(
                    f"kis: {len(plan.layers)} layers' accumulators need "
                    f"{len(plan.layers) * SecondMoment.bytes_needed(info.d_mlp) / 1e9:.2f} GB "
                    f"> --max_memory {request.max_memory / 1e9:.2f} GB: pass {len(report.groups) + 1} over the corpus "
                    f"covers layers {group[0]}..{group[-1]}"
                )
            report.groups.append(group)
            group_plan = replace(
                plan, layers=group, initial={layer: plan.initial[layer] for layer in group if layer in plan.initial}
            )
            result = run_pass(model, setting, group_plan)
            report.resumed |= result.resumed
            report.skipped_texts = sorted(set(report.skipped_texts) | set(result.skipped))
            report.computed_tokens += result.computed_tokens
            if rank == 0:
                for layer in group:
                    save_second_moment(
                        setting.path(layer),
                        result.moments[layer],
                        _cache_metadata(setting, group_plan, result, layer, earlier.get(layer, 0.0)),
                        request.stats_dtype,
                    )
            for layer in group:
                report.layers[layer] = LayerCache(setting.path(layer), result.tokens, result.texts)
            barrier()
            checkpoint_path(setting, group_plan).unlink(missing_ok=True)
    report.seconds = time.perf_counter() - started
    if rank == 0:
        _remove_finished_checkpoints(checkpoints_dir(setting.folder), layers)
    return report


def _record_fingerprint(path: Path, info: ModelInfo, report: CacheReport) -> dict[str, Any]:
    """Tie an imported cache to the model it is first used with (recording its fingerprint); return the new metadata."""
    rewrite_metadata(path, {"model_fingerprint": info.fingerprint})
    report.notes.append(
        f"imported cache {path.name} first used with {info.name}: its weight fingerprint {info.fingerprint} is now "
        "recorded, and another model of that name will be refused"
    )
    return read_metadata(path)


def _rekey_legacy_fingerprint(path: Path, info: ModelInfo, report: CacheReport) -> dict[str, Any]:
    """Record the full-weight fingerprint in a cache keyed on the older sampled one; return the new metadata."""
    old, old_sha256 = read_metadata(path)["model_fingerprint"], file_sha256(path)
    # what it was keyed and hashed as before: runs keyed on this cache's old file hash can be re-keyed too
    rewrite_metadata(
        path,
        {"model_fingerprint": info.fingerprint, "rekeyed_from_fingerprint": old, "rekeyed_from_sha256": old_sha256},
    )
    report.notes.append(
        f"{path.name} was keyed on the older sampled W_out fingerprint {old}, which this model matches: re-keyed to "
        f"its full-weight fingerprint {info.fingerprint}"
    )
    return read_metadata(path)


def _cache_metadata(
    setting: JobSetting, plan: PassPlan, result: PassResult, layer: int, earlier_seconds: float
) -> dict[str, Any]:
    """Return the metadata of a finished layer cache: its identity, what it holds and where its stream stands."""
    request, info = setting.request, setting.info
    metadata = {
        **setting.record,
        **setting.key(layer).to_metadata(),
        "corpus_credit": setting.corpus.credit,
        "model_dtype": info.dtype,
        "texts": result.texts,
        "texts_read": result.texts_read,
        "exhausted": result.exhausted,
        "stop": setting.stop,
        "stream_start": result.stream_start,
        "position": list(result.position) if result.position is not None else None,
        "batch_token": plan.batch_token or request.batch_token or info.n_ctx,
        "sort_window": plan.sort_window or request.sort_window,
        "sample_size": request.sample_size,
        "max_tokens": request.max_tokens,
        "world_size": rank_and_world()[1],
        "kis_lens_version": __version__,
    }
    if setting.timed:  # rounded once, here: whoever reports the time from the cache later reports this very number
        metadata["seconds"] = round(earlier_seconds + result.seconds, 2)
    if request.skip_nonfinite:
        metadata.update(nonfinite_skipped=len(result.skipped), nonfinite_skipped_texts=result.skipped[:1000])
    return metadata


def _remove_finished_checkpoints(folder: Path, layers: list[int]) -> None:
    """Delete checkpoints of passes over these layers only: every one of them now has its finished cache.

    A job killed after writing some final caches but before deleting its checkpoint leaves one behind;
    the rerun reuses those caches, computes the rest in a new pass, and so never reads it again.
    """
    for path in folder.glob("layers_*-*_*.safetensors") if folder.is_dir() else []:
        first, _, last = path.name.removeprefix("layers_").split("_")[0].partition("-")
        if first.isdigit() and last.isdigit() and set(range(int(first), int(last) + 1)) <= set(layers):
            path.unlink(missing_ok=True)
