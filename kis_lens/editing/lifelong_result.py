"""The record of a finished lifelong run: LifelongResult, its summary (collapse, disabling edits, verdict inputs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from kis_lens._version import __version__
from kis_lens.editing.lifelong_bench import Bench
from kis_lens.editing.lifelong_config import LifelongConfig
from kis_lens.editing.lifelong_probes import accumulated_p2
from kis_lens.editing.lifelong_steps import RunState
from kis_lens.editing.metrics import correlations
from kis_lens.editing.registry import EditSession, get_editor
from kis_lens.editing.verdicts import (
    collapse_sensitivity,
    judge_prediction_with_controls,
    prediction_controls,
    rho_alarm,
)
from kis_lens.models import model_device

# Predicted and measured interference are norms of layer-output vectors (a ratio to ‖r_u‖ blows up for an edit
# that needed no change); recorded in each result's settings.
INTERFERENCE_UNITS = "layer output"


@dataclass
class LifelongResult:
    """One editor's run: its measurement steps, its edits, the fact–step pairs of the P check, a summary."""

    editor: str
    steps: list[dict[str, Any]]
    edits: list[dict[str, Any]]
    pairs: dict[str, list[Any]]
    summary: dict[str, Any]
    settings: dict[str, Any]
    path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return everything as a JSON-ready dict (what the run's <stem>.json holds)."""
        return {
            "editor": self.editor,
            "steps": self.steps,
            "edits": self.edits,
            "pairs": self.pairs,
            "summary": self.summary,
            "settings": self.settings,
        }


def collapse_summary(
    config: LifelongConfig, changed: bool, steps: list[dict[str, Any]], p_matrix: Float[Tensor, "fact fact"]
) -> dict[str, Any]:
    """Return the first step where efficacy on all edits so far or held-out perplexity crosses its threshold.

    A run that moved no weight (the `none` editor) has no collapse: its efficacy is the unedited model's."""
    baseline = steps[0]["perplexity"]
    criterion = (
        f"efficacy on all edits so far < {config.retention_threshold:g}, or held-out perplexity > "
        f"{config.perplexity_ratio:g} × the unedited model's ({baseline:.3g})"
    )
    found = None
    for step in steps[1:] if changed else []:
        low = step["efficacy"] is not None and step["efficacy"] < config.retention_threshold
        if low or step["perplexity"] > config.perplexity_ratio * baseline:
            found = step["n_edits"]
            break
    return {
        "step": found,
        "criterion": criterion if changed else "the run moved no weight: no collapse is defined",
        "retention_threshold": config.retention_threshold,
        "perplexity_ratio": config.perplexity_ratio,
        "accumulated_p2_at_collapse": accumulated_p2(p_matrix, found) if found is not None else None,
    }


def disabling_edits(
    edits: Sequence[dict[str, Any]], perplexity0: float | None, norm_ratio: float, perplexity_ratio: float
) -> list[dict[str, Any]]:
    """Return the updates whose ‖ΔW‖ exceeds norm_ratio × the running median of earlier updates' and after which
    held-out perplexity (on the per-edit texts) rises above perplexity_ratio × its value just before (Gupta et al.)."""
    members: dict[int, list[int]] = {}  # update → the indices of its edits (a batch shares one update's numbers)
    for index, edit in enumerate(edits):
        members.setdefault(edit.get("update", index), []).append(index)
    found, norms, before = [], [], perplexity0
    for indices in members.values():
        update, n_edits = edits[indices[0]], indices[-1] + 1
        norm, after = update.get("update_delta_norm"), update.get("edit_perplexity")
        if norm is None:
            continue
        median = float(np.median(norms)) if norms else None
        big = median is not None and median > 0 and norm > norm_ratio * median
        jump = before is not None and after is not None and before > 0 and after > perplexity_ratio * before
        if big and jump:
            found.append(
                {
                    "n_edits": n_edits,
                    "case_id": update.get("case_id"),
                    "update_delta_norm": norm,
                    "running_median": median,
                    "perplexity_before": before,
                    "perplexity_after": after,
                }
            )
        norms.append(norm)
        before = after if after is not None else before
    return found


def judged_pairs(pairs: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Return the pairs whose earlier edit's subject is never edited again (runs before the column: all pairs)."""
    if "later_same_subject" not in pairs:
        return pairs
    keep = [index for index, count in enumerate(pairs["later_same_subject"]) if count == 0]
    return {name: [column[index] for index in keep] for name, column in pairs.items()}


MIN_PREDICTION_EDITS = 5  # edits with later edits before the P-prediction verdict is computed at all


def controlled_prediction(
    pairs: dict[str, list[Any]], n_boot: int, seed: int, edits_are: str = "edits with later edits"
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Return (the controls, the verdict) of P's prediction of the NLL rise over judged pairs: not judged, without
    controls, under MIN_PREDICTION_EDITS edits (edits_are says which edits the reason counts)."""
    n_edits_judged = len(set(pairs.get("edit_index") or []))
    if n_edits_judged < MIN_PREDICTION_EDITS:
        reason = f"{n_edits_judged} {edits_are} (< {MIN_PREDICTION_EDITS})"
        return None, {"verdict": "not judged", "reasons": [reason]}
    controls = prediction_controls(pairs, "measured_logprob", n_boot, seed)
    return controls, judge_prediction_with_controls(controls)


def _verdict_inputs(config: LifelongConfig, state: RunState) -> dict[str, Any]:
    """Return the collapse sensitivity and the controlled P-prediction verdict of a finished run."""
    pairs = judged_pairs(state.pairs)
    controls, verdict = None, {"verdict": "not judged", "reasons": ["no weight moved"]}
    if state.changed:
        controls, verdict = controlled_prediction(pairs, config.bootstrap, config.seed)
    sensitivity = collapse_sensitivity(state.steps, retention_threshold=config.retention_threshold)
    repeats = [index for index, edit in enumerate(state.edits) if edit.get("repeats_edit") is not None]
    return {
        "repeated_subjects": {
            "edits": repeats,
            "pairs_left_out": len(state.pairs["edit_index"]) - len(pairs["edit_index"]),
            "why": "a later edit of the same subject rewrites the earlier edit's very key (P = 1): left out of the "
            "P-prediction verdict",
        },
        "collapse_sensitivity": sensitivity if state.changed else None,
        "prediction_controls": controls,
        "prediction_verdict": verdict,
    }


def build_result(
    bench: Bench,
    editor: str,
    state: RunState,
    session: EditSession,
    identity: dict[str, Any],
    stem: str,
    command: str | None,
) -> LifelongResult:
    """Return a finished run's record: steps, edits, pairs, its summary and every setting that made it."""
    config = bench.config
    pairs = state.pairs
    summary = {
        "collapse": collapse_summary(config, state.changed, state.steps, bench.p_matrix),
        "disabling_edits": disabling_edits(
            state.edits, bench.edit_perplexity0, config.disabling_norm_ratio, config.disabling_perplexity_ratio
        ),
        **_verdict_inputs(config, state),
        "disabling_rule": (
            f"‖ΔW‖ of an update > {config.disabling_norm_ratio:g} × the running median of earlier updates', and "
            f"held-out perplexity on {min(config.edit_perplexity_texts, len(bench.heldout))} texts right after it > "
            f"{config.disabling_perplexity_ratio:g} × just before"
        ),
        "correlations": {
            "predicted_vs_output": correlations(pairs["predicted"], pairs["measured_output"]),
            "predicted_vs_logprob": correlations(pairs["predicted"], pairs["measured_logprob"]),
        },
        "final": state.steps[-1],
        "wall_seconds": round(state.seconds, 1),
        "seconds_per_edit": float(np.mean([e["seconds"] for e in state.edits])) if state.edits else None,
        "seconds_per_probe": float(np.mean(state.probe_seconds)) if state.probe_seconds else None,
        "seconds_per_eval": float(np.mean(state.eval_seconds)) if state.eval_seconds else None,
    }
    summary["rho_alarm"] = rho_alarm(state.edits, summary["disabling_edits"], state.steps)
    entry = get_editor(editor)
    editor_settings = {
        "name": editor,
        "label": entry.label,
        "keys": entry.keys,
        "values": entry.values,
        "layers": sorted(session.weights),
        "batch_size": config.batch_size if entry.batches else 1,
        **{key: value for key, value in vars(config.editor_settings).items() if not key.endswith("search")},
        "covariance_weight": session.covariance_weight if entry.name == "memit" else config.covariance_weight,
        "rome_search": vars(config.editor_settings.rome_search),
        "memit_search": vars(config.editor_settings.memit_search),
        "value_prompts_used": len(bench.rome_templates),
        "null_space_rank": {str(layer): space.rank for layer, space in session.null_spaces.items()} or None,
    }
    settings = {
        "config": config.to_dict(),
        "editor": editor_settings,
        "model": asdict(bench.info),
        "facts": [case.case_id for case in bench.cases],
        "facts_sha256": bench.facts_sha256,
        "covariance": bench.covariance_identity,
        "corpus_texts_for_c": bench.corpus_texts_for_c,
        "templates": {"rome": bench.rome_templates, "memit": bench.memit_templates},
        "run_stem": stem,
        "identity": identity,
        "kis_lens_version": __version__,
        "device": str(model_device(bench.model)),
        "threads": torch.get_num_threads(),
        "command": command,
        "interference_units": INTERFERENCE_UNITS,
    }
    return LifelongResult(editor, state.steps, state.edits, state.pairs, summary, settings)
