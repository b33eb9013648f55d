"""One editor's run as it advances: its resumable state, an edit step and a measurement step.

A measurement step adds the interference P predicts for each earlier edit u (Σ over later edits i of P[i,u]·r_i
at the edit layer's output, r_i = k_i ΔW_i) against the drift measured with the edited weights: the fact–step pairs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kis_lens.editing.evaluation import score_continuations
from kis_lens.editing.lifelong_bench import Bench
from kis_lens.editing.lifelong_probes import (
    RewriteScores,
    accumulated_p2,
    baseline_rewrite,
    baseline_rewrite_rows,
    case_metrics,
    measure_edit_perplexity,
    measure_fluency,
    measure_perplexity,
    oldest_quarter_retention,
    rewrite_scores,
    weight_stats,
)
from kis_lens.editing.registry import EditSession, get_editor

# One row per earlier edit u at each probe t: P's prediction, the controls a verdict needs (the count of later edits,
# √Σ‖r_i‖² over them, P with its columns permuted across facts), and the drift measured with the edited weights.
PAIR_FIELDS: tuple[str, ...] = (
    "n_edits",
    "case_id",
    "edit_index",
    "predicted",
    "later_count",
    "later_residual_norm",
    "predicted_shuffled",
    "later_same_subject",
    "measured_output",
    "measured_logprob",
    "success_now",
)


@dataclass
class RunState:
    """Everything an editor's run has done so far: enough to resume it."""

    weights: dict[int, Tensor]  # float64 W_t of every layer the editor writes
    done: int = 0
    update_of: list[int] = field(default_factory=list)  # which update wrote each edit
    residuals: list[Tensor] = field(default_factory=list)  # r_u = k_u ΔW_u at the edit layer
    after: list[Tensor] = field(default_factory=list)  # k_u W + b right after u's update
    nll_after: list[float] = field(default_factory=list)  # NLL(target_new) on u's rewrite prompt right after
    earlier_keys_outer: dict[int, Tensor] = field(default_factory=dict)  # AlphaEdit's cache_c
    changed: bool = False  # whether any update so far moved a weight
    steps: list[dict[str, Any]] = field(default_factory=list)
    edits: list[dict[str, Any]] = field(default_factory=list)
    pairs: dict[str, list[Any]] = field(default_factory=lambda: {k: [] for k in PAIR_FIELDS})
    seconds: float = 0.0
    probe_seconds: list[float] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)

    _TENSOR_LISTS = ("residuals", "after")

    def tensors(self) -> dict[str, Tensor]:
        """Return the state's tensors by flat name (for safetensors)."""
        named = {f"weight.{layer}": weight for layer, weight in self.weights.items()}
        named |= {f"cache_c.{layer}": value for layer, value in self.earlier_keys_outer.items()}
        for name in self._TENSOR_LISTS:
            if getattr(self, name):
                named[name] = torch.stack(getattr(self, name))
        return named

    def record(self) -> dict[str, Any]:
        """Return the state's JSON part."""
        names = ("done", "update_of", "nll_after", "changed", "steps", "edits", "pairs", "seconds")
        return {name: getattr(self, name) for name in (*names, "probe_seconds", "eval_seconds")}

    @classmethod
    def restore(cls, tensors: dict[str, Tensor], record: dict[str, Any]) -> RunState:
        """Return the state saved by tensors() and record()."""
        weights = {int(name.split(".")[1]): t for name, t in tensors.items() if name.startswith("weight.")}
        cache = {int(name.split(".")[1]): t for name, t in tensors.items() if name.startswith("cache_c.")}
        lists = {name: list(tensors[name].unbind()) if name in tensors else [] for name in cls._TENSOR_LISTS}
        return cls(weights=weights, earlier_keys_outer=cache, **lists, **record)


def measure_step(bench: Bench, state: RunState, kind: str, clock: float) -> None:
    """Append one measurement step (and its fact–step pairs) to the state."""
    started = time.perf_counter()
    t, full = state.done, kind == "eval"
    unchanged = not state.changed  # a run that has moved no weight measures the unedited model: reuse its scores
    rewrite = baseline_rewrite(bench, t) if unchanged else rewrite_scores(bench, range(t))
    step: dict[str, Any] = {"n_edits": t, "kind": kind, **case_metrics(bench, t, full, rewrite, unchanged)}
    step["retention_oldest_quarter"] = oldest_quarter_retention(rewrite, t)
    if unchanged:
        step["fluency"] = bench.fluency0 if full else None
        step["perplexity"] = bench.perplexity0
        step["unedited_nll_drift"] = 0.0
    else:
        step["fluency"] = measure_fluency(bench) if full else None
        step["perplexity"] = measure_perplexity(bench)
        unedited = score_continuations(bench.model, bench.unedited).nll.double().cpu()
        step["unedited_nll_drift"] = float((unedited - bench.unedited_nll0).abs().mean())
    step.update(weight_stats(state.weights[bench.config.layer], bench.weight0))
    step["predicted_interference"], step["measured_interference"] = None, None
    if t > 0:
        _interference(bench, state, step, rewrite)
    step["accumulated_p2"] = accumulated_p2(bench.p_matrix, t)
    step["seconds"] = round(state.seconds + time.perf_counter() - clock, 2)
    state.steps.append(step)
    (state.eval_seconds if full else state.probe_seconds).append(time.perf_counter() - started)


def _interference(bench: Bench, state: RunState, step: dict[str, Any], rewrite: RewriteScores) -> None:
    """Fill the predicted and measured interference on earlier edits, and add their fact–step pairs."""
    t = state.done
    update = torch.tensor(state.update_of)
    later = update[None, :] > update[:, None]  # later[u, i]: edit i came in an update after u's
    if not later.any():
        return
    residuals = torch.stack(state.residuals)
    mixing = bench.p_matrix[:t, :t].T * later  # mixing[u, i] = P[i, u] for later i
    earlier = later.any(dim=1)
    # absolute norms in the layer output's units: a ratio to ‖r_u‖ explodes for an edit that needed no change
    predicted = (mixing @ residuals).norm(dim=1)[earlier]
    # controls that know nothing of P: how many edits came later, and how large they were
    later_count = later.sum(dim=1)[earlier]
    later_residual_norm = (later.double() @ residuals.norm(dim=1).pow(2)).sqrt()[earlier]
    shuffled = bench.p_matrix[:, bench.p_permutation][:t, :t].T * later  # P's columns permuted across facts
    predicted_shuffled = (shuffled @ residuals).norm(dim=1)[earlier]
    # a later edit of the same subject rewrites u's very key (P = 1): counted, and kept out of the verdicts
    subjects = bench.subject_ids[:t]
    same_subject = (subjects[None, :] == subjects[:, None]) & later
    later_same_subject = same_subject.sum(dim=1)[earlier]
    outputs = bench.keys[:t] @ state.weights[bench.config.layer] + bench.bias
    measured = (outputs - torch.stack(state.after)).norm(dim=1)[earlier]
    nll_new, nll_true, _ = rewrite
    logprob = (nll_new - torch.tensor(state.nll_after, dtype=torch.float64))[earlier]
    success_now = (nll_new < nll_true)[earlier]  # with the edit's newest_efficacy: was it lost since?
    step["predicted_interference"] = float(predicted.mean())
    step["measured_interference"] = float(measured.mean())
    indices = torch.nonzero(earlier).flatten().tolist()
    ids = [bench.cases[u].case_id for u in indices]
    state.pairs["n_edits"].extend([t] * len(ids))
    state.pairs["case_id"].extend(ids)
    state.pairs["edit_index"].extend(indices)
    state.pairs["predicted"].extend(predicted.tolist())
    state.pairs["later_count"].extend(later_count.tolist())
    state.pairs["later_residual_norm"].extend(later_residual_norm.tolist())
    state.pairs["predicted_shuffled"].extend(predicted_shuffled.tolist())
    state.pairs["later_same_subject"].extend(later_same_subject.tolist())
    state.pairs["measured_output"].extend(measured.tolist())
    state.pairs["measured_logprob"].extend(logprob.tolist())
    state.pairs["success_now"].extend(success_now.tolist())


def edit_step(
    bench: Bench, editor: str, session: EditSession, state: RunState, rows: list[int], update_index: int
) -> None:
    """Run the editor's update on the rows' facts (target values found on the model as it is now)."""
    started = time.perf_counter()
    facts = [bench.cases[row].fact for row in rows]
    record = get_editor(editor).update(session, facts)
    state.weights = {layer: session.weights[layer] for layer in state.weights}
    state.earlier_keys_outer = dict(session.earlier_keys_outer)
    state.changed = state.changed or any(bool(delta.abs().max() > 0) for delta in record.deltas.values())
    keys = bench.keys[rows]
    weight = state.weights[bench.config.layer]
    after = keys @ weight + bench.bias
    new, true, _ = rewrite_scores(bench, rows) if state.changed else baseline_rewrite_rows(bench, rows)
    seconds = time.perf_counter() - started
    # per update, not only per probe: what an alarm for a disabling edit would watch
    update = {
        "update": update_index,
        "update_delta_norm": float(record.deltas[bench.config.layer].norm()),
        **{key: value for key, value in weight_stats(weight, bench.weight0).items() if key != "weight_change_norm"},
        "accumulated_p2": accumulated_p2(bench.p_matrix, rows[-1] + 1),
        "edit_perplexity": measure_edit_perplexity(bench) if state.changed else bench.edit_perplexity0,
    }
    for position, row in enumerate(rows):
        target = record.targets[position]
        state.update_of.append(update_index)
        state.residuals.append(record.output_change[position].double().clone())  # own storage for the checkpoint
        state.after.append(after[position].clone())
        state.nll_after.append(float(new[position]))
        state.edits.append(
            {
                "case_id": bench.cases[row].case_id,
                "repeats_edit": _first_edit_of_subject(bench, row),
                "value_steps": target.steps if target is not None else None,
                "value_nll": target.nll if target is not None else None,
                "residual_norm": float(record.output_change[position].norm()),
                "newest_efficacy": bool(new[position] < true[position]),
                "seconds": round(seconds / len(rows), 3),
                **update,
                **record.details[position],
            }
        )
    state.done = rows[-1] + 1


def _first_edit_of_subject(bench: Bench, row: int) -> int | None:
    """Return the index of an earlier edit of the same subject (its key is this edit's), or None."""
    earlier = torch.nonzero(bench.subject_ids[:row] == bench.subject_ids[row]).flatten()
    return int(earlier[0]) if len(earlier) else None
