"""Lifelong-editing simulation: many closed-form edits of one layer, one after another, and what they break.

Every condition edits the same CounterFact facts towards ``target_new`` and tracks after each step the
efficacy of the newest edit, the retention of earlier edits, and the drift of facts that were never edited.

The edit acts on the layer's output at each fact's subject-last token: fact f's MLP output there is
``m_f + k_f ΔW`` (ΔW the summed edits), patched into an otherwise unchanged forward. For real keys this
is exactly what the edited weights produce at that token (checked at the end with the weights applied);
it is what lets the orthogonal-key control run on the same model: the keys k'_f (whitening + Gram–Schmidt,
k'_iᵀC⁻¹k'_j = 0) stand in for the real ones, so the only thing that differs between conditions is
whether the keys superpose.

Conditions (their keys are the historical names; kis_lens.editing.registry holds the faithful editors that
``kis lifelong`` runs): ``rome`` (p-ROME's rank one C⁻¹k rᵀ/kᵀC⁻¹k, real keys), ``rome_orthogonal`` (the same,
orthogonal keys),
``alphaedit`` (null-space projected, real keys, earlier edits protected), ``memit`` (batches, real keys).
For ``rome`` the interference is predicted from P alone: after t edits fact u has moved by Σ_i P[i,u] r_i.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from kis_lens._version import __version__
from kis_lens.blocks import Override, at_least, setting, with_defaults
from kis_lens.editing.editors import (
    NullSpace,
    alphaedit_update,
    memit_update,
    null_space_projector,
    rank_one_delta,
    whitened_orthogonal_keys,
)
from kis_lens.editing.metrics import correlations, fraction
from kis_lens.editing.options import EditorOptions
from kis_lens.editing.registry import check_edit_layer
from kis_lens.editing.templates import rome_context_templates
from kis_lens.editing.values import EditPrompt, compute_target, edit_prompt, target_logprobs
from kis_lens.editing.weights import applied_delta
from kis_lens.errors import KisError
from kis_lens.facts import Fact, load_facts, sample_facts
from kis_lens.hooks import capture_rows, mlp_out_hook_name
from kis_lens.io import save_json
from kis_lens.keys import compute_keys
from kis_lens.layout import EDIT_SIM_FILE, edit_sim_dir
from kis_lens.matrices import Whitener, p_matrix
from kis_lens.models import (
    HookedModel,
    load_model,
    model_device,
    model_info,
    resolve_prepend_bos,
)
from kis_lens.runner import ensure_covariances
from kis_lens.tokens import pad_batch, pad_token_id
from kis_lens.w_out import output_weight

CONDITIONS: tuple[str, ...] = ("rome", "rome_orthogonal", "alphaedit", "memit")


@dataclass(frozen=True)
@with_defaults(
    n_edits=32,
    n_unedited=32,
    batch_size=8,
    covariance_weight=1.0,
    null_threshold=Override(1e-2, help="AlphaEdit's null space: eigenvalues of C below this × the largest"),
    null_l2=1.0,
    max_tokens=50_000,
)
class EditSimConfig(EditorOptions):
    """Every setting of an edit simulation: the editing block (with smaller defaults), then the simulation's own."""

    conditions: tuple[str, ...] = setting(
        CONDITIONS, f"comma-separated subset of {','.join(CONDITIONS)}", choices=CONDITIONS
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least("max_tokens", self.max_tokens, 1, none_means="no limit")
        if not self.ridge >= 0:  # also refuses NaN
            raise KisError(f"ridge must be zero or positive, not {self.ridge}: e.g. --ridge 1e-6")
        self.check()

    def check(self) -> None:
        """Raise KisError for settings the simulation cannot run (also run on construction)."""
        if self.n_edits is None or self.n_edits < 2:  # None (every record) is lifelong's: the simulation needs a number
            raise KisError(f"n_edits must be at least 2 to measure retention, got {self.n_edits}")
        if self.n_unedited < 2:
            raise KisError(f"n_unedited must be at least 2 to measure drift, got {self.n_unedited}")
        if not 1 <= self.batch_size <= self.n_edits:
            raise KisError(f"batch_size must be between 1 and n_edits ({self.n_edits}), got {self.batch_size}")
        unknown = [name for name in self.conditions if name not in CONDITIONS]
        if unknown or not self.conditions:
            raise KisError(f"unknown condition(s) {unknown}: choose from {', '.join(CONDITIONS)}")
        weight = self.covariance_weight
        if weight is None or weight < 0 or self.null_l2 <= 0 or self.null_threshold <= 0:  # None: lifelong's scaling
            raise KisError("covariance_weight must be >= 0, null_l2 and null_threshold > 0")


@dataclass
class EditSimResult:
    """Per-condition curves, the P prediction check and the settings of one simulation."""

    curves: dict[str, dict[str, list[Any]]]
    summary: dict[str, Any]
    scatter: dict[str, list[float]]
    settings: dict[str, Any]
    path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return everything as a JSON-ready dict (what edit_sim.json holds)."""
        return {"curves": self.curves, "summary": self.summary, "scatter": self.scatter, "settings": self.settings}


@dataclass
class _Bench:
    """What every condition shares: the facts, their prompts, keys, original outputs and targets."""

    model: HookedModel
    layer: int
    facts: list[Fact]
    n_edits: int
    keys: torch.Tensor  # [fact, d_mlp] float64, edited facts first
    outputs: torch.Tensor  # [fact, d_model] original MLP outputs at the subject
    targets: torch.Tensor  # [edited, d_model] values that make the model say target_new
    new_prompts: list[EditPrompt]
    true_prompts: list[EditPrompt]
    whitener: Whitener
    covariance: torch.Tensor
    base_new: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    base_true: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    def score(self, shifts: torch.Tensor, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return log p(target_new), log p(target_true) with each fact's output moved by its shift.

        Only the first `upto` edited facts and the unedited ones are scored; the rest are NaN."""
        rows = [*range(upto), *range(self.n_edits, len(self.facts))]
        prompts = [self.new_prompts[i] for i in rows[:upto]] + [self.true_prompts[i] for i in rows]
        shift = torch.cat([shifts[rows[:upto]], shifts[rows]]).float().to(model_device(self.model))
        scores = target_logprobs(self.model, self.layer, prompts, output_shift=shift)
        new = torch.full((len(self.facts),), float("nan"), dtype=torch.float64)
        true = torch.full((len(self.facts),), float("nan"), dtype=torch.float64)
        new[rows[:upto]] = scores[:upto]
        true[rows] = scores[upto:]
        return new, true


def _select_facts(config: EditSimConfig) -> list[Fact]:
    facts = [fact for fact in load_facts(config.facts) if fact.target_new and fact.target_new != fact.target_true]
    total = config.n_edits + config.n_unedited
    if total > len(facts):
        raise KisError(f"n_edits + n_unedited = {total} but only {len(facts)} facts have a target_new: ask for fewer")
    return sample_facts(facts, total, seed=config.seed)


def _prepare(config: EditSimConfig, model: HookedModel) -> _Bench:
    facts = _select_facts(config)
    layer = config.layer
    covariance = ensure_covariances(config, model, [layer])[0][layer]
    whitener = Whitener.from_covariance(covariance, ridge=config.ridge)
    prepend_bos = resolve_prepend_bos(model, None)
    keys = compute_keys(model, facts, [layer], prepend_bos=prepend_bos).at_layer(layer).double()
    handle = output_weight(model, layer)
    outputs = keys @ handle.read().cpu() + handle.read_bias().cpu()
    edited = facts[: config.n_edits]
    # the one value search of kis lifelong (ROME's compute_v over its context templates), on the unedited model
    templates = rome_context_templates(model, seed=config.seed)
    shifts = [
        compute_target(model, layer, fact, templates, config.value_search, "mlp_out", prepend_bos).delta
        for fact in tqdm(edited, desc="target values", disable=not config.progress, dynamic_ncols=True, leave=False)
    ]
    targets = outputs[: config.n_edits] + torch.stack(shifts)
    bench = _Bench(
        model,
        layer,
        facts,
        config.n_edits,
        keys,
        outputs,
        targets,
        [edit_prompt(model, fact, fact.target_new, prepend_bos) for fact in facts],
        [edit_prompt(model, fact, fact.target_true, prepend_bos) for fact in facts],
        whitener,
        covariance,
    )
    bench.base_new, bench.base_true = bench.score(torch.zeros_like(outputs), config.n_edits)
    return bench


def _weights_logprob_drift(bench: _Bench, delta: torch.Tensor) -> torch.Tensor:
    """Return the unedited facts' |Δ log p(target_true)| from unpatched forwards with W_out += ΔW applied for real."""
    with applied_delta(bench.model, bench.layer, delta.to(model_device(bench.model))):
        true = target_logprobs(bench.model, bench.layer, bench.true_prompts[bench.n_edits :])
    return (true - bench.base_true[bench.n_edits :]).abs()


def _run_condition(
    bench: _Bench, name: str, config: EditSimConfig, projector: NullSpace | None
) -> tuple[dict[str, list[Any]], torch.Tensor, dict[str, Any]]:
    """Run one condition's sequence of edits; return its curves, its summed ΔW and its P-prediction data."""
    keys = bench.keys
    if name == "rome_orthogonal":
        keys = whitened_orthogonal_keys(bench.keys, bench.whitener)
    batch = config.batch_size if name == "memit" else 1
    n_edits, unedited = bench.n_edits, slice(bench.n_edits, len(bench.facts))
    delta = torch.zeros(keys.shape[1], bench.outputs.shape[1], dtype=torch.float64)
    p_to_all = p_matrix(keys, bench.whitener)[:n_edits]  # P[i, f] for edited i, every fact f
    residual_history = torch.zeros(n_edits, bench.outputs.shape[1], dtype=torch.float64)
    curves: dict[str, list[Any]] = {
        key: []
        for key in (
            "n_edits",
            "efficacy",
            "retention",
            "unedited_logprob_drift",
            "unedited_output_drift",
            "predicted_output_drift",
            "edit_residual",
            "weights_logprob_drift",
        )
    }
    prediction: dict[str, list[float]] = {
        "predicted": [],
        "measured_logprob": [],
        "measured_output": [],
        "weights_logprob": [],
    }
    steps = range(0, n_edits, batch)
    for start in tqdm(steps, desc=name, disable=not config.progress, dynamic_ncols=True, leave=False):
        rows = list(range(start, min(start + batch, n_edits)))
        residuals = bench.targets[rows] - (bench.outputs[rows] + keys[rows] @ delta)
        residual_history[rows] = residuals
        if name.startswith("rome"):
            update = rank_one_delta(keys[rows[0]], residuals[0], bench.whitener)
        elif name == "memit":
            update = memit_update(keys[rows], residuals, bench.whitener, config.covariance_weight)
        else:
            update = alphaedit_update(
                keys[rows], residuals, projector, previous_keys=keys[: rows[0]], l2=config.null_l2
            )
        delta = delta + update.cpu()
        shifts = keys @ delta
        done = rows[-1] + 1
        new, true = bench.score(shifts, done)
        prefers_new = (new[:done] > true[:done]).numpy()
        drift = (true[unedited] - bench.base_true[unedited]).abs()
        output_drift = shifts[unedited].norm(dim=1) / bench.outputs[unedited].norm(dim=1)
        predicted = (p_to_all[:done, unedited].T @ residual_history[:done]).norm(dim=1) / bench.outputs[unedited].norm(
            dim=1
        )
        curves["n_edits"].append(done)
        curves["efficacy"].append(fraction(prefers_new[rows]))
        curves["retention"].append(fraction(prefers_new[: rows[0]]))
        curves["unedited_logprob_drift"].append(float(drift.mean()))
        curves["unedited_output_drift"].append(float(output_drift.mean()))
        curves["edit_residual"].append(
            float(
                (
                    (bench.targets[rows] - bench.outputs[rows] - shifts[rows]).norm(dim=1)
                    / residuals.norm(dim=1).clamp_min(1e-30)
                ).mean()
            )
        )
        if name.startswith("rome"):
            curves["predicted_output_drift"].append(float(predicted.mean()))
            prediction["predicted"].extend(predicted.tolist())
            prediction["measured_logprob"].extend(drift.tolist())
            prediction["measured_output"].extend(output_drift.tolist())
        else:
            curves["predicted_output_drift"].append(None)
        if name == "rome":  # real keys, so the real edited weights reproduce the patched shifts at the subject
            weights_drift = _weights_logprob_drift(bench, delta)
            curves["weights_logprob_drift"].append(float(weights_drift.mean()))
            prediction["weights_logprob"].extend(weights_drift.tolist())
        else:
            curves["weights_logprob_drift"].append(None)
    return curves, delta, prediction


def _weights_check(bench: _Bench, delta: torch.Tensor) -> dict[str, float | None]:
    """Apply ΔW to the real weights: compare the forward's MLP outputs with m + kΔW, and score without patches."""
    model, layer = bench.model, bench.layer
    prompts = bench.true_prompts
    tokens, mask = pad_batch([p.ids[: p.target_start] for p in prompts], pad_token_id(model.tokenizer))
    subject = torch.tensor([p.subject_last for p in prompts])
    device = model_device(model)
    with applied_delta(model, layer, delta.to(device)):
        output = capture_rows(model, tokens, mlp_out_hook_name(layer), subject, mask).double().cpu()
        new = target_logprobs(model, layer, bench.new_prompts[: bench.n_edits])
        true = target_logprobs(model, layer, bench.true_prompts)
    expected = bench.outputs + bench.keys @ delta
    scale = (bench.keys @ delta).norm(dim=1).clamp_min(1e-12 * float(bench.outputs.norm(dim=1).mean()))
    error = ((output - expected).norm(dim=1) / scale).max()
    unedited = slice(bench.n_edits, len(bench.facts))
    return {
        "max_relative_error_of_output_change": float(error),
        "full_model_rewrite_rate": float((new > true[: bench.n_edits]).double().mean()),
        "full_model_unedited_logprob_drift": float((true[unedited] - bench.base_true[unedited]).abs().mean()),
    }


def run_edit_simulation(config: EditSimConfig = EditSimConfig(), model: HookedModel | None = None) -> EditSimResult:
    """Run every condition's sequence of edits, save edit_sim.json and the figures, and return the result."""
    config.check()
    started = time.perf_counter()
    model = load_model(model if model is not None else config.model_name, device=config.device, dtype=config.dtype)
    check_edit_layer(model, config.layer)
    bench = _prepare(config, model)
    projector = (
        null_space_projector(bench.covariance, threshold=config.null_threshold, relative=True)
        if "alphaedit" in config.conditions
        else None
    )
    curves, summary, scatter = {}, {}, {}
    for name in config.conditions:
        curves[name], delta, prediction = _run_condition(bench, name, config, projector)
        final = {key: values[-1] for key, values in curves[name].items()}
        summary[name] = {
            "final": final,
            "mean_efficacy": float(np.mean([v for v in curves[name]["efficacy"] if v is not None])),
        }
        if name.startswith("rome"):
            summary[name]["predicted_vs_measured_output_drift"] = correlations(
                prediction["predicted"], prediction["measured_output"]
            )
            summary[name]["predicted_vs_measured_logprob_drift"] = correlations(
                prediction["predicted"], prediction["measured_logprob"]
            )
            if name == "rome":
                summary[name]["predicted_vs_weights_logprob_drift"] = correlations(
                    prediction["predicted"], prediction["weights_logprob"]
                )
                scatter = {
                    key: prediction[key]
                    for key in ("predicted", "measured_logprob", "measured_output", "weights_logprob")
                }
        if name != "rome_orthogonal":  # orthogonal keys are synthetic: no weight forward can produce them
            summary[name]["weights_check"] = _weights_check(bench, delta)
    if projector is not None:
        summary["null_space_rank"] = projector.rank
    initially_true = float((bench.base_true[: bench.n_edits] > bench.base_new[: bench.n_edits]).double().mean())
    summary["baseline_prefers_true"] = initially_true
    info = model_info(model)
    settings = {
        "config": config.to_dict(),
        "model": asdict(info),
        "model_fingerprint": info.fingerprint,
        "facts": [fact.to_dict() for fact in bench.facts],
        "kis_lens_version": __version__,
        "seconds": round(time.perf_counter() - started, 1),
    }
    result = EditSimResult(curves, summary, scatter, settings)
    folder = edit_sim_dir(config.output_dir, info.name, config.layer, config.n_edits)
    result.path = save_json(folder / EDIT_SIM_FILE, result.to_dict())
    from kis_lens.editing.simulation_plots import (
        write_editing_figures,  # plotly only when figures are written
    )

    write_editing_figures(result.to_dict(), folder)
    return result
