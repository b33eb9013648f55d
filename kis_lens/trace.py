"""ROME's causal trace (Meng et al. 2022, ``experiments/causal_trace.py``): which layer's MLP recalls a known fact.

For each fact the subject tokens' embeddings are corrupted with seeded Gaussian noise (std = ``noise_multiplier`` ×
the std of subject-token embeddings, ROME's ``collect_embedding_std``). One batch holds the clean prompt in row 0
and ``samples`` noised copies in rows 1..n, as ROME's ``trace_with_patch`` does; restoring a hidden state copies
row 0's value into the corrupted rows. The indirect effect of layer L is IE(L) = p_restored(L) − p_corrupt, where
p is the mean over noise samples of the softmax probability of the true answer's first token at the last position,
and p_restored(L) restores the MLP outputs (``blocks.{l}.hook_mlp_out``) of the window of layers around L
(ROME's ``trace_important_window``: l in [L − w//2, L + ⌈w/2⌉) clipped to the model) at the subject's last token.

>>> result = causal_trace(TraceConfig(model_name="smollm2-135m", n_facts=50, window=10))
>>> result.peak_layer, result.mean_indirect_effect          # [layer]

Identities that hold exactly (tests/test_trace.py checks them): with noise 0 the corrupted run is the clean run, so
p_corrupt = p_clean and IE ≡ 0; the clean row 0 is untouched by noise and restoring, so p_clean is the plain forward's
probability; with window ≥ 2·n_layers every centre restores every layer, so IE is the same at every layer; batching
several restored layers into one forward changes nothing. Restoring every MLP output does *not* give back p_clean:
the attention outputs and the earlier subject tokens stay corrupted.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from kis_lens.blocks import Override, at_least, borrow, setting
from kis_lens.config import CorpusOptions, FactOptions, ModelOptions
from kis_lens.errors import KisError
from kis_lens.facts import load_facts
from kis_lens.figure_files import write_figure_files
from kis_lens.io import save_json
from kis_lens.keys import locate_subject
from kis_lens.layout import writable_trace_path
from kis_lens.models import HookedModel, load_model, model_device, model_info, resolve_prepend_bos
from kis_lens.tokens import encode, pad_batch, pad_token_id

EMBED_HOOK = "hook_embed"  # token embedding only (GPT-2's wte, before positions), as ROME noises ``wte``
KIND_HOOKS: dict[str, str] = {
    "mlp": "blocks.{layer}.hook_mlp_out",
    "attn": "blocks.{layer}.hook_attn_out",
    "resid": "blocks.{layer}.hook_resid_post",
}
KINDS: tuple[str, ...] = tuple(KIND_HOOKS)


@dataclass(frozen=True)
@borrow(CorpusOptions, prepend_bos=Override(section=ModelOptions.HELP_GROUP))  # BOS before each fact prompt
@borrow(FactOptions, facts="known-1000", seed=Override(help="random seed of the noise"))  # ROME traces its known facts
class TraceConfig(ModelOptions):
    """Settings of a causal trace: the model options, then the facts, the noise (and its seed), the states."""

    n_facts: int = setting(100, "facts traced (the first ones in file order that pass --only_known)")
    samples: int = setting(10, "noise samples per fact (ROME: 10)")
    noise_multiplier: float = setting(3.0, "noise std = this x std of subject-token embeddings (ROME: 3)")
    window: int = setting(10, "layers restored around each layer (ROME: 10; 1 = that layer alone)")
    kind: str = setting("mlp", "which hidden state is restored", choices=KINDS)
    only_known: bool = setting(True, "trace only facts whose answer's first token is the clean argmax")
    max_rows: int = setting(64, "most sequences in one forward (restored layers are batched up to this)")

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least("n_facts", self.n_facts, 1)
        at_least("samples", self.samples, 1)
        at_least("window", self.window, 1)
        at_least("max_rows", self.max_rows, self.samples + 1)
        if not (isinstance(self.noise_multiplier, (int, float)) and self.noise_multiplier >= 0):
            raise KisError(f"noise_multiplier must be >= 0, not {self.noise_multiplier!r}")
        if self.kind not in KIND_HOOKS:
            raise KisError(f"unknown kind {self.kind!r}: use one of {', '.join(KINDS)}")


@dataclass
class FactTrace:
    """One fact's probabilities of the answer: clean, corrupted, and corrupted with each layer's window restored."""

    p_clean: float
    p_corrupt: float
    p_restored: Float[np.ndarray, " layer"]
    clean_top: int  # the clean run's argmax token at the last position


@dataclass
class TraceResult:
    """Indirect effects by layer, averaged over facts and per fact, with the settings that produced them."""

    layers: list[int]
    mean_indirect_effect: Float[np.ndarray, " layer"]
    per_fact: Float[np.ndarray, "fact layer"]
    p_clean: Float[np.ndarray, " fact"]
    p_corrupt: Float[np.ndarray, " fact"]
    peak_layer: int
    peak_layer_early: int
    noise_std: float
    facts: list[dict[str, Any]]
    settings: dict[str, Any]
    path: Path | None = None
    figures: dict[str, str | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the result as a JSON-ready dict."""
        return {
            "layers": list(self.layers),
            "mean_indirect_effect": self.mean_indirect_effect.tolist(),
            "per_fact": self.per_fact.tolist(),
            "p_clean": self.p_clean.tolist(),
            "p_corrupt": self.p_corrupt.tolist(),
            "mean_p_clean": float(self.p_clean.mean()),
            "mean_p_corrupt": float(self.p_corrupt.mean()),
            "peak_layer": self.peak_layer,
            "peak_layer_early": self.peak_layer_early,
            "noise_std": self.noise_std,
            "facts": self.facts,
            "settings": self.settings,
            "figures": self.figures,
        }


def window_layers(center: int, window: int, n_layers: int) -> range:
    """Return the layers restored for a centre layer (ROME's trace_important_window, clipped to the model)."""
    return range(max(0, center - window // 2), min(n_layers, center - (-window // 2)))


def peak_layers(mean_ie: Float[np.ndarray, " layer"]) -> tuple[int, int]:
    """Return (argmax over all layers but the last, argmax over the first half of layers: early-to-middle)."""
    n = len(mean_ie)
    return int(np.argmax(mean_ie[: max(1, n - 1)])), int(np.argmax(mean_ie[: max(1, math.ceil(n / 2))]))


class _EmbedDone(Exception):
    """Raised from the embedding hook so no block runs when only embeddings are wanted."""


def embedding_std(model: HookedModel, subjects: Sequence[str], batch_size: int = 256) -> float:
    """Return the std of all token-embedding entries of the subjects' tokens (ROME's collect_embedding_std)."""
    tokenizer, device = model.tokenizer, model_device(model)
    ids = [encode(tokenizer, subject, prepend_bos=False) for subject in subjects]
    ids = [row for row in ids if row]
    if not ids:
        raise KisError("no subject tokens to measure the embedding std on")
    chunks: list[Tensor] = []
    for start in range(0, len(ids), batch_size):
        tokens, mask = pad_batch(ids[start : start + batch_size], pad_token_id(tokenizer))

        def keep(activation: Tensor, hook: Any, mask: Tensor = mask) -> None:
            chunks.append(activation[mask.to(activation.device).bool()].detach().double().cpu())
            raise _EmbedDone

        with torch.no_grad(), model.hooks(fwd_hooks=[(EMBED_HOOK, keep)]):
            try:
                model(tokens.to(device), return_type=None)
            except _EmbedDone:
                pass
    return float(torch.cat(chunks).std())


def fact_noise(
    seed: int, index: int, samples: int, n_tokens: int, d_model: int, std: float
) -> Float[Tensor, "sample subj d_model"]:
    """Return the seeded float64 noise of one fact (a generator per (seed, fact index), so facts don't share it)."""
    state = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
    generator = torch.Generator().manual_seed(state)
    return std * torch.randn(samples, n_tokens, d_model, generator=generator, dtype=torch.float64)


def _patched_probs(
    model: HookedModel,
    ids: Sequence[int],
    subject_range: tuple[int, int],
    position: int,
    answer: int,
    noise: Float[Tensor, "sample subj d_model"],
    n_blocks: int,
    restore: dict[int, Int[Tensor, " row"]],
    hook_template: str,
) -> tuple[Float[Tensor, " row"], int]:
    """Run row 0 clean and n_blocks × samples noised rows, restoring rows[layer] from row 0; return p(answer), top."""
    device = model_device(model)
    begin, end = subject_range
    tokens = torch.tensor([list(ids)] * (1 + n_blocks * noise.shape[0]), device=device)
    noise_rows = noise.repeat(n_blocks, 1, 1).to(device)

    def corrupt(activation: Tensor, hook: Any) -> Tensor:
        activation = activation.clone()
        activation[1:, begin:end] += noise_rows.to(activation.dtype)
        return activation

    def restore_state(activation: Tensor, hook: Any) -> Tensor:
        rows = restore[int(hook.name.split(".")[1])].to(activation.device)
        activation = activation.clone()
        activation[rows, position] = activation[0, position]
        return activation

    hooks = [(EMBED_HOOK, corrupt)] + [(hook_template.format(layer=layer), restore_state) for layer in restore]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(tokens, return_type="logits")[:, -1]
    probs = torch.softmax(logits.double(), dim=-1)
    return probs[:, answer].cpu(), int(logits[0].argmax())


def trace_fact(
    model: HookedModel,
    ids: Sequence[int],
    subject_range: tuple[int, int],
    position: int,
    answer: int,
    noise: Float[Tensor, "sample subj d_model"],
    window: int = 10,
    kind: str = "mlp",
    max_rows: int = 64,
) -> FactTrace:
    """Return one fact's clean, corrupted and per-layer restored p(answer) (ROME's calculate_hidden_flow, one token)."""
    n_layers, samples = int(model.cfg.n_layers), int(noise.shape[0])
    begin, end = subject_range
    if not 0 <= begin < end <= len(ids) or noise.shape[1] != end - begin:
        raise KisError(f"subject range {subject_range} does not fit {len(ids)} tokens and noise {tuple(noise.shape)}")
    template = KIND_HOOKS[kind]
    base, clean_top = _patched_probs(model, ids, subject_range, position, answer, noise, 1, {}, template)
    p_restored = np.zeros(n_layers)
    per_forward = max(1, (max_rows - 1) // samples)
    for start in range(0, n_layers, per_forward):
        centers = list(range(start, min(n_layers, start + per_forward)))
        restore: dict[int, list[int]] = {}
        for block, center in enumerate(centers):
            rows = list(range(1 + block * samples, 1 + (block + 1) * samples))
            for layer in window_layers(center, window, n_layers):
                restore.setdefault(layer, []).extend(rows)
        restore_rows = {layer: torch.tensor(rows) for layer, rows in restore.items()}
        probs, _ = _patched_probs(
            model, ids, subject_range, position, answer, noise, len(centers), restore_rows, template
        )
        for block, center in enumerate(centers):
            p_restored[center] = float(probs[1 + block * samples : 1 + (block + 1) * samples].mean())
    return FactTrace(float(base[0]), float(base[1:].mean()), p_restored, clean_top)


def trace_figure(result: TraceResult) -> Any:
    """Return a Plotly figure of the mean indirect effect by layer with both peaks marked."""
    import plotly.graph_objects as go

    kind, window = result.settings["kind"], result.settings["window"]
    ie = result.mean_indirect_effect
    figure = go.Figure(go.Bar(x=result.layers, y=ie, name="mean IE", marker_color="#2ca02c"))
    for peak, label, colour in (
        (result.peak_layer, "peak", "#d62728"),
        (result.peak_layer_early, "early peak", "#1f77b4"),
    ):
        figure.add_trace(
            go.Scatter(
                x=[peak],
                y=[ie[peak]],
                mode="markers+text",
                text=[f"{label} L{peak}"],
                textposition="top center",
                marker={"size": 12, "color": colour, "symbol": "star"},
                name=f"{label} (layer {peak})",
            )
        )
    figure.update_layout(
        title=(
            f"Causal trace ({kind}, window {window}) of {result.settings['model']}: "
            f"mean indirect effect over {len(result.facts)} facts"
        ),
        xaxis_title=f"centre of the {window} restored {kind} layer(s)",
        yaxis_title="p_restored − p_corrupt",
        template="plotly_white",
    )
    return figure


def causal_trace(config: TraceConfig, model: HookedModel | None = None) -> TraceResult:
    """Trace the first n_facts (known) facts, average the indirect effects and write JSON and a figure."""
    started = time.perf_counter()
    model = load_model(config.model_name if model is None else model, device=config.device, dtype=config.dtype)
    tokenizer, n_layers = model.tokenizer, int(model.cfg.n_layers)
    prepend_bos = resolve_prepend_bos(model, config.prepend_bos)
    facts = load_facts(config.facts)
    base_std = embedding_std(model, [fact.subject for fact in facts])
    noise_std = config.noise_multiplier * base_std
    d_model = int(model.cfg.d_model)
    traces: list[FactTrace] = []
    kept: list[dict[str, Any]] = []
    checked = 0
    for index, fact in enumerate(facts):
        if len(traces) == config.n_facts:
            break
        checked += 1
        located = locate_subject(tokenizer, fact, prepend_bos)
        answer = encode(tokenizer, " " + fact.target_true, prepend_bos=False)[0]
        subject_range = (located.subject_first, located.subject_last + 1)
        noise = fact_noise(config.seed, index, config.samples, subject_range[1] - subject_range[0], d_model, noise_std)
        if config.only_known:  # the clean argmax first: an unknown fact costs one forward, not the whole trace
            _, top = _patched_probs(model, located.ids, subject_range, 0, answer, noise[:1], 0, {}, "")
            if top != answer:
                continue
        trace = trace_fact(
            model,
            located.ids,
            subject_range,
            located.subject_last,
            answer,
            noise,
            config.window,
            config.kind,
            config.max_rows,
        )
        traces.append(trace)
        kept.append(
            {
                "index": index,
                "case_id": fact.case_id,
                "subject": fact.subject,
                "text": fact.text,
                "target_true": fact.target_true,
                "answer_token": answer,
                "subject_tokens": list(subject_range),
                "restored_position": located.subject_last,
            }
        )
    if not traces:
        raise KisError(
            f"none of the {checked} facts of {config.facts} is known to {model_info(model).name}: "
            "pass --no_only_known to trace them anyway"
        )
    p_clean = np.array([trace.p_clean for trace in traces])
    p_corrupt = np.array([trace.p_corrupt for trace in traces])
    per_fact = np.stack([trace.p_restored - trace.p_corrupt for trace in traces])
    mean_ie = per_fact.mean(axis=0)
    peak, early = peak_layers(mean_ie)
    settings = {
        **config.to_dict(),
        "model": model_info(model).name,
        "hook": KIND_HOOKS[config.kind],
        "embed_hook": EMBED_HOOK,
        "prepend_bos": prepend_bos,
        "n_layers": n_layers,
        "embedding_std": base_std,
        "n_subjects_for_std": len(facts),
        "facts_checked": checked,
        "n_facts_traced": len(traces),
        "seconds": round(time.perf_counter() - started, 2),
    }
    result = TraceResult(
        list(range(n_layers)), mean_ie, per_fact, p_clean, p_corrupt, peak, early, noise_std, kept, settings
    )
    path = writable_trace_path(config.output_dir, model_info(model).name, config.kind, config.window)
    path.parent.mkdir(parents=True, exist_ok=True)
    result.figures = write_figure_files(trace_figure(result), path.with_suffix(".html"))
    result.path = save_json(path, result.to_dict())
    return result
