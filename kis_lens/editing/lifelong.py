"""The one sequential editing loop of ``kis lifelong``: each editor's edits written one after another, probed, saved.

Every run is locked while it writes and checkpoints to safetensors + JSON after each measurement; a restart resumes
only when its identity (kis_lens.editing.lifelong_identity) is the same. The model's own weights are restored on exit.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kis_lens.editing.evaluation import score_continuations
from kis_lens.editing.lifelong_bench import Bench, prepare_bench
from kis_lens.editing.lifelong_config import LifelongConfig
from kis_lens.editing.lifelong_identity import finished_run, identity_of, rekey_legacy_runs, stem_of
from kis_lens.editing.lifelong_probes import measure_edit_perplexity, measure_fluency, measure_perplexity
from kis_lens.editing.lifelong_result import LifelongResult, build_result
from kis_lens.editing.lifelong_steps import RunState, edit_step, measure_step
from kis_lens.editing.registry import EditSession, check_edit_layer, get_editor
from kis_lens.editing.runs import (
    find_pickle_checkpoints,
    load_checkpoint,
    remove_checkpoint,
    run_lock,
    save_checkpoint,
    stale_checkpoints,
)
from kis_lens.io import save_json
from kis_lens.layout import writable_lifelong_dir
from kis_lens.models import HookedModel, load_model
from kis_lens.w_out import output_weight


def _crossed(before: int, after: int, every: int) -> bool:
    """Return whether the edits from before to after passed a multiple of every (a batch may jump over one)."""
    return after // every > before // every


def _session(bench: Bench, editor: str) -> EditSession:
    """Return a fresh edit session of one editor, holding the keys P was built from."""
    layers = bench.config.edit_layers if get_editor(editor).multi_layer else (bench.config.layer,)
    session = EditSession.create(
        bench.model,
        bench.config.editor_settings,
        {layer: bench.covariances[layer] for layer in layers},
        editors=[editor],
        rome_templates=bench.rome_templates,
        memit_templates=bench.memit_templates,
    )
    session.remember_plain_keys([case.fact for case in bench.cases], bench.keys)  # the keys P was built from
    return session


def _run_editor(bench: Bench, editor: str, folder: Path, command: str | None = None) -> LifelongResult:
    """Run (or resume, or find finished) one editor's sequence of edits; save and return its result."""
    config = bench.config
    identity = identity_of(bench, editor)
    stem = stem_of(bench, editor, identity)
    with run_lock(folder, stem):
        for note in rekey_legacy_runs(bench, editor, folder, identity, stem):
            print(f"kis lifelong: {note}")
        finished = finished_run(folder, stem, identity) if config.resume else None
        if finished is not None:
            return finished
        session = _session(bench, editor)
        for stale, fields in stale_checkpoints(folder, stem, identity):
            warnings.warn(
                f"not resuming {stale.name}: it was made with other {', '.join(fields) or 'settings'}; this run "
                f"starts afresh as {stem} (delete the old checkpoint when you no longer need it)",
                stacklevel=2,
            )
        saved = load_checkpoint(folder, stem, identity) if config.resume else None
        if saved is not None:
            state = RunState.restore(*saved)
            session.restore(state.weights)
            session.earlier_keys_outer.update(state.earlier_keys_outer)
        else:
            state = RunState(weights={layer: weight.clone() for layer, weight in session.weights.items()})
            state.earlier_keys_outer = dict(session.earlier_keys_outer)
        clock = time.perf_counter()
        n = len(bench.cases)
        if not state.steps:
            measure_step(bench, state, "eval", clock)
        batch = config.batch_size if get_editor(editor).batches else 1
        bar = tqdm(
            total=n, initial=state.done, desc=f"lifelong {editor}", disable=not config.progress, dynamic_ncols=True
        )
        while state.done < n:
            rows = list(range(state.done, min(state.done + batch, n)))
            before = state.done
            edit_step(bench, editor, session, state, rows, update_index=len(set(state.update_of)))
            bar.update(state.done - before)
            if _crossed(before, state.done, config.eval_every) or state.done == n:
                measure_step(bench, state, "eval", clock)
            elif _crossed(before, state.done, config.probe_every):
                measure_step(bench, state, "probe", clock)
            else:
                continue
            last = state.steps[-1]
            bar.set_postfix(efficacy=last["efficacy"], perplexity=round(last["perplexity"], 2))
            state.seconds += time.perf_counter() - clock
            clock = time.perf_counter()
            save_checkpoint(folder, stem, identity, state.tensors(), state.record())
        bar.close()
        state.seconds += time.perf_counter() - clock
        result = build_result(bench, editor, state, session, identity, stem, command)
        result.path = save_json(folder / f"{stem}.json", result.to_dict())
        remove_checkpoint(folder, stem)
    return result


def run_lifelong(
    config: LifelongConfig = LifelongConfig(), model: HookedModel | None = None, command: str | None = None
) -> dict[str, LifelongResult]:
    """Run every editor's sequence of real edits, save one <stem>.json per run and the figures; return them."""
    model = load_model(model if model is not None else config.model_name, device=config.device, dtype=config.dtype)
    check_edit_layer(model, config.layer)
    handles = {layer: output_weight(model, layer) for layer in config.edit_layers}
    saved = {layer: handle.weight.detach().clone() for layer, handle in handles.items()}  # exact bits, restored

    def restore() -> None:
        with torch.no_grad():
            for layer, handle in handles.items():
                handle.weight.copy_(saved[layer])

    try:
        bench = prepare_bench(config, model)
        bench.unedited_nll0 = score_continuations(model, bench.unedited).nll.double().cpu()
        bench.perplexity0 = measure_perplexity(bench)
        bench.edit_perplexity0 = measure_edit_perplexity(bench)
        bench.fluency0 = measure_fluency(bench)
        folder = writable_lifelong_dir(config.output_dir, bench.info.name, config.layer)  # resumes an older kis's too
        folder.mkdir(parents=True, exist_ok=True)
        for legacy in find_pickle_checkpoints(folder):
            warnings.warn(
                f"ignoring {legacy}: pickle checkpoints of older versions are never loaded; delete it", stacklevel=2
            )
        results = {}
        for editor in config.editors:
            results[editor] = _run_editor(bench, editor, folder, command)
            restore()
    finally:
        restore()
    from kis_lens.editing.lifelong_files import load_lifelong_results
    from kis_lens.editing.lifelong_plots import write_lifelong_figures

    shown = load_lifelong_results(folder, stems=[result.settings["run_stem"] for result in results.values()])
    write_lifelong_figures(shown, folder)
    return results
