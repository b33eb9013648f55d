"""The editors, one registry: name → what the update does, which keys and values it uses, how it is drawn.

Every editor is an ``update(session, facts)`` that finds its target values on the model as it is now, writes
its ΔW into the model's W_out (one or several layers) and returns an ``UpdateRecord``. The session
(``EditSession``) holds what updates share across a lifelong run: C per layer, the context templates, the
per-fact keys at the edit layer, AlphaEdit's null-space projectors and its accumulated keys of earlier edits.

- ``rome``      the original (kmeng01/rome): u = C⁻¹k̄/‖C⁻¹k̄‖ from the key averaged over 21 context templates,
                right = (v* − W k)/(k·u) from the plain prompt's key k; v* by compute_v at the MLP output.
- ``r-rome``    Gupta et al.'s r-ROME: k̄ for both the direction and the scale.
- ``p-rome``    k for both (what kis called "rome" before): ΔW = C⁻¹k rᵀ/(kᵀC⁻¹k).
- ``memit``     the original (kmeng01/memit): z at the residual stream of the last of several layers (clamp 0.75),
                keys averaged over MEMIT's template groups; per layer ΔW = solve(λC + KᵀK, Kᵀ)·(z − z_now)/layers left.
- ``alphaedit`` the original (jianghoucheng/AlphaEdit): MEMIT's z and keys; per layer
                ΔW = solve(P(KᵀK + K_pᵀK_p) + L2·I, P Kᵀ R/(layers left)), P the projector on C's singular vectors
                below an absolute threshold, K_p the keys of every earlier edit.
- ``emmet``     one layer, plain keys, v* as ROME: the batched near-exact fit C⁻¹Kᵀ(λI + K C⁻¹ Kᵀ)⁻¹R (λ small).
- ``none``      edits nothing (its update is zero): the unedited baseline of every curve.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kis_lens.editing.editors import (
    NullSpace,
    alphaedit_layer_delta,
    key_agreement,
    memit_layer_delta,
    memit_update,
    null_space_projector,
    rome_rank_one,
)
from kis_lens.editing.templates import (
    flatten_templates,
    memit_context_templates,
    rome_context_templates,
    template_keys,
)
from kis_lens.editing.values import TargetValue, ValueSearch, compute_target, site_activations
from kis_lens.errors import KisError
from kis_lens.facts import Fact
from kis_lens.keys import compute_keys
from kis_lens.matrices import Whitener
from kis_lens.models import HookedModel, model_device
from kis_lens.w_out import output_weight


@dataclass(frozen=True)
class EditorSettings:
    """The editors' hyperparameters; defaults are the originals' published settings (ROME/MEMIT GPT-J, AlphaEdit)."""

    layer: int = 4  # ROME's edit layer, and the last of MEMIT's layers
    memit_span: int = 5  # MEMIT's layers: this many ending at `layer` (GPT-2 XL: ROME 17, MEMIT 13–17)
    rome_search: ValueSearch = ValueSearch()
    memit_search: ValueSearch = ValueSearch(clamp_norm_factor=0.75)
    covariance_weight: float | None = None  # MEMIT's mom2_update_weight λ on the mean C; None: memit_lambda(d_mlp)
    null_threshold: float = 2e-2  # AlphaEdit's nullspace_threshold on C's singular values
    null_relative: bool = False  # True: the threshold is relative to the largest singular value (not AlphaEdit's)
    null_l2: float = 10.0  # AlphaEdit's L2
    emmet_weight: float = 1.0  # emmet's λ on I in (λI + K C⁻¹ Kᵀ)
    value_prompts: int | None = None  # cut the templates to this many (None: all); a run that cuts says so
    template_seed: int = 0
    ridge: float = 0.0

    @property
    def memit_layers(self) -> tuple[int, ...]:
        """Return MEMIT's and AlphaEdit's edit layers (clipped at layer 0)."""
        return tuple(range(max(0, self.layer - self.memit_span + 1), self.layer + 1))


# MEMIT's λ is 15000 for GPT-J (d_mlp 16384) and 20000 for GPT-2 XL (d_mlp 6400). Corpus keys have
# E[kᵀC⁻¹k] = tr(C⁻¹C) = d_mlp, so λ/d_mlp is what weighs the preserved keys against a typical edited one;
# GPT-J's ratio carries the setting to other widths (SmolLM2, d_mlp 1536: λ ≈ 1406).
MEMIT_LAMBDA_PER_MLP_DIM = 15000 / 16384


def memit_lambda(d_mlp: int) -> float:
    """Return MEMIT's default λ for an MLP width: GPT-J's λ per MLP dimension (15000 / 16384) × d_mlp."""
    return MEMIT_LAMBDA_PER_MLP_DIM * d_mlp


@dataclass
class UpdateRecord:
    """What one update did: ΔW per layer, the target values, and per fact the numbers that explain its size."""

    deltas: dict[int, Float[Tensor, "d_mlp d_model"]]
    targets: list[TargetValue | None]
    output_change: Float[Tensor, "fact d_model"]  # k ΔW at the edit layer, each fact's plain key (the edit's r)
    details: list[dict[str, Any]]


UpdateFunction = Callable[["EditSession", Sequence[Fact]], UpdateRecord]


@dataclass(frozen=True)
class Editor:
    """One registry entry: the update and how the editor is named, drawn and fed."""

    name: str
    label: str
    colour: str
    batches: bool  # takes --batch_size facts per update (else one)
    keys: str  # which keys the update uses
    values: str  # which target values it finds
    update: UpdateFunction
    multi_layer: bool = False


@dataclass
class EditSession:
    """What an editor's updates share across a run: the model, C per layer, templates, keys, AlphaEdit's state."""

    model: HookedModel
    settings: EditorSettings
    covariances: dict[int, Tensor]  # C = E[kkᵀ] per layer, float64
    whiteners: dict[int, Whitener] = field(default_factory=dict)
    rome_templates: list[str] = field(default_factory=list)
    memit_templates: list[list[str]] = field(default_factory=list)
    null_spaces: dict[int, NullSpace] = field(default_factory=dict)
    earlier_keys_outer: dict[int, Tensor] = field(default_factory=dict)  # AlphaEdit's cache_c
    weights: dict[int, Tensor] = field(default_factory=dict)  # float64 master copy of each edited W_out
    biases: dict[int, Tensor] = field(default_factory=dict)
    _averaged_keys: dict[tuple[str, str], Tensor] = field(default_factory=dict)
    _plain_keys: dict[tuple[str, str], Tensor] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        model: HookedModel,
        settings: EditorSettings,
        covariances: dict[int, Tensor],
        editors: Sequence[str] = (),
        rome_templates: Sequence[str] | None = None,
        memit_templates: Sequence[Sequence[str]] | None = None,
    ) -> EditSession:
        """Return a session for the editors; templates are generated (seeded) unless given."""
        needed = {settings.layer}
        if any(EDITORS[name].multi_layer for name in editors):
            needed |= set(settings.memit_layers)
        missing = sorted(needed - set(covariances))
        if missing:
            raise KisError(f"the editors need C at layer(s) {missing}: compute them (kis cache-cov) and pass them")
        session = cls(model, settings, {layer: c.double().cpu() for layer, c in covariances.items()})
        session.whiteners = {
            layer: Whitener.from_covariance(c, ridge=settings.ridge, label=f"C at layer {layer}")
            for layer, c in session.covariances.items()
        }
        # Generating templates costs hundreds of forwards: only for the editors that read them (all, when unnamed).
        chosen = [EDITORS[name] for name in editors] if editors else list(EDITORS.values())
        if rome_templates is None:
            wanted = any(not editor.multi_layer and editor.name != "none" for editor in chosen)
            rome_templates = rome_context_templates(model, seed=settings.template_seed) if wanted else []
        if memit_templates is None:
            wanted = any(editor.multi_layer for editor in chosen)
            memit_templates = memit_context_templates(model, seed=settings.template_seed) if wanted else []
        session.rome_templates = _cut(list(rome_templates), settings.value_prompts)
        session.memit_templates = [list(group) for group in memit_templates]
        if "alphaedit" in editors:
            for layer in settings.memit_layers:
                session.null_spaces[layer] = null_space_projector(
                    session.covariances[layer], settings.null_threshold, relative=settings.null_relative
                )
                d_mlp = session.covariances[layer].shape[0]
                session.earlier_keys_outer[layer] = torch.zeros(d_mlp, d_mlp, dtype=torch.float64)
        for layer in needed:
            handle = output_weight(model, layer)
            session.weights[layer], session.biases[layer] = handle.read().cpu(), handle.read_bias().cpu()
        return session

    def plain_keys(self, facts: Sequence[Fact], layer: int) -> Float[Tensor, "fact d_mlp"]:
        """Return the plain prompts' keys at a layer on the model as it is now, float64."""
        return compute_keys(self.model, list(facts), [layer]).at_layer(layer).double().cpu()

    @property
    def covariance_weight(self) -> float:
        """Return MEMIT's λ: the setting, or the width rule memit_lambda(d_mlp)."""
        chosen = self.settings.covariance_weight
        return chosen if chosen is not None else memit_lambda(int(self.model.cfg.d_mlp))

    def remember_plain_keys(self, facts: Sequence[Fact], keys: Float[Tensor, "fact d_mlp"]) -> None:
        """Use these plain keys at the edit layer for these facts (the caller's, so every number shares one key)."""
        for fact, key in zip(facts, keys):
            self._plain_keys[(fact.case_id, fact.text)] = key.double().cpu()

    def edit_layer_keys(self, fact: Fact) -> tuple[Tensor, Tensor]:
        """Return (k̄ over ROME's templates, plain k) at the edit layer (cached: its W_out edits never move them)."""
        name, layer = (fact.case_id, fact.text), self.settings.layer
        if name not in self._averaged_keys:
            self._averaged_keys[name] = template_keys(self.model, layer, [fact], [self.rome_templates])[0]
        if name not in self._plain_keys:
            self._plain_keys[name] = self.plain_keys([fact], layer)[0]
        return self._averaged_keys[name], self._plain_keys[name]

    def write(self, layer: int, delta: Float[Tensor, "d_mlp d_model"]) -> None:
        """Add ΔW to the layer's master weight and write it into the model."""
        self._set(layer, self.weights[layer] + delta.double().cpu())

    def restore(self, weights: dict[int, Tensor]) -> None:
        """Set the edited layers' weights (a resumed run's state) in the master copies and the model."""
        for layer, weight in weights.items():
            self._set(layer, weight.double().cpu().clone())

    def _set(self, layer: int, weight: Float[Tensor, "d_mlp d_model"]) -> None:
        self.weights[layer] = weight
        output_weight(self.model, layer).write(weight.to(model_device(self.model)))


def check_edit_layer(model: HookedModel, layer: int) -> None:
    """Raise KisError unless an edit at the layer can reach the prediction (some later layer reads it)."""
    n_layers = int(model.cfg.n_layers)
    if not 0 <= layer < n_layers - 1:
        raise KisError(
            f"layer {layer} cannot be edited here: an edit at the subject token reaches the prediction only through "
            f"later layers' attention; choose a layer between 0 and {n_layers - 2}"
        )


def _cut(templates: list[str], count: int | None) -> list[str]:
    if count is None or not templates:  # no templates: the session's editors read none
        return templates
    if not 1 <= count <= len(templates):
        raise KisError(f"value_prompts must lie in 1..{len(templates)} (the templates), got {count}")
    return templates[:count]


# ---------------------------------------------------------------------------------------------------------
# The updates
# ---------------------------------------------------------------------------------------------------------


def _rome_family(session: EditSession, facts: Sequence[Fact], direction: str, scale: str) -> UpdateRecord:
    (fact,) = facts
    layer, settings = session.settings.layer, session.settings
    averaged, plain = session.edit_layer_keys(fact)
    chosen = {"averaged": averaged, "plain": plain}
    target = compute_target(session.model, layer, fact, session.rome_templates, settings.rome_search, "mlp_out")
    edit = rome_rank_one(
        chosen[direction],
        chosen[scale],
        target.value,
        session.weights[layer],
        session.biases[layer],
        session.whiteners[layer],
    )
    session.write(layer, edit.delta)
    rho = key_agreement(averaged, plain, session.whiteners[layer])
    detail = {
        "rho": rho,
        "delta_norm": float(edit.delta.norm()),
        "relative_value_shift": target.relative_delta,
        "clamped": target.clamped,
    }
    return UpdateRecord({layer: edit.delta}, [target], (plain @ edit.delta)[None], [detail])


def rome_update(session: EditSession, facts: Sequence[Fact]) -> UpdateRecord:
    """Original ROME: direction from the template-averaged key k̄, scale and residual from the plain key k."""
    return _rome_family(session, facts, "averaged", "plain")


def r_rome_update(session: EditSession, facts: Sequence[Fact]) -> UpdateRecord:
    """r-ROME: the template-averaged key k̄ for both direction and scale."""
    return _rome_family(session, facts, "averaged", "averaged")


def p_rome_update(session: EditSession, facts: Sequence[Fact]) -> UpdateRecord:
    """p-ROME: the plain key k for both direction and scale."""
    return _rome_family(session, facts, "plain", "plain")


def _memit_family(session: EditSession, facts: Sequence[Fact], null_space: bool) -> UpdateRecord:
    settings, model = session.settings, session.model
    layers = settings.memit_layers
    z_layer = layers[-1]
    groups = session.memit_templates
    flat = flatten_templates(groups)
    targets = [compute_target(model, z_layer, fact, flat, settings.memit_search, "resid_post") for fact in facts]
    zs = torch.stack([target.value for target in targets])
    deltas: dict[int, Tensor] = {}
    for index, layer in enumerate(layers):
        keys = template_keys(model, layer, facts, groups)
        residual = zs - site_activations(model, z_layer, "resid_post", facts)
        remaining = len(layers) - index
        if null_space:
            delta = alphaedit_layer_delta(
                keys,
                residual,
                session.null_spaces[layer].projector,
                session.earlier_keys_outer[layer],
                settings.null_l2,
                remaining,
            )
        else:
            weight = session.covariance_weight
            delta = memit_layer_delta(keys, residual, session.covariances[layer], weight, remaining)
        session.write(layer, delta)
        deltas[layer] = delta
    if null_space:  # AlphaEdit accumulates the keys of this batch, taken with the edited weights
        for layer in layers:
            keys = template_keys(model, layer, facts, groups)
            session.earlier_keys_outer[layer] = session.earlier_keys_outer[layer] + keys.T @ keys
    plain = session.plain_keys(facts, settings.layer)
    details = [
        {"relative_value_shift": target.relative_delta, "clamped": target.clamped, "delta_norm": None}
        for target in targets
    ]
    details[0]["delta_norm"] = float(torch.linalg.vector_norm(torch.stack([d.norm() for d in deltas.values()])))
    return UpdateRecord(deltas, list(targets), plain @ deltas[settings.layer], details)


def memit_update_step(session: EditSession, facts: Sequence[Fact]) -> UpdateRecord:
    """Original MEMIT on its layers."""
    return _memit_family(session, facts, null_space=False)


def alphaedit_update_step(session: EditSession, facts: Sequence[Fact]) -> UpdateRecord:
    """Original AlphaEdit on MEMIT's layers."""
    return _memit_family(session, facts, null_space=True)


def emmet_update(session: EditSession, facts: Sequence[Fact]) -> UpdateRecord:
    """One layer, plain keys, ROME's v*: C⁻¹Kᵀ(λI + K C⁻¹ Kᵀ)⁻¹R, a batched near-exact fit."""
    settings, model = session.settings, session.model
    layer = settings.layer
    targets = [compute_target(model, layer, fact, session.rome_templates, settings.rome_search) for fact in facts]
    keys = torch.stack([session.edit_layer_keys(fact)[1] for fact in facts])
    values = torch.stack([target.value for target in targets])
    residuals = values - (keys @ session.weights[layer] + session.biases[layer])
    delta = memit_update(keys, residuals, session.whiteners[layer], settings.emmet_weight).cpu()
    session.write(layer, delta)
    details = [{"relative_value_shift": t.relative_delta, "clamped": t.clamped, "delta_norm": None} for t in targets]
    details[0]["delta_norm"] = float(delta.norm())
    return UpdateRecord({layer: delta}, list(targets), keys @ delta, details)


def no_update(session: EditSession, facts: Sequence[Fact]) -> UpdateRecord:
    """Edit nothing: ΔW = 0."""
    layer = session.settings.layer
    zero = torch.zeros_like(session.weights[layer])
    return UpdateRecord({layer: zero}, [None] * len(facts), torch.zeros(len(facts), zero.shape[1]), [{}] * len(facts))


def _register(*editors: Editor) -> dict[str, Editor]:
    registry: dict[str, Editor] = {}
    for editor in editors:
        if editor.name in registry:
            raise KisError(f"editor {editor.name!r} is registered twice")
        registry[editor.name] = editor
    return registry


EDITORS: dict[str, Editor] = _register(
    Editor("rome", "ROME (original)", "#d62728", False, "k̄ direction, k scale", "compute_v (MLP out)", rome_update),
    Editor("r-rome", "r-ROME", "#ff9896", False, "k̄ direction and scale", "compute_v (MLP out)", r_rome_update),
    Editor("p-rome", "p-ROME", "#e377c2", False, "k direction and scale", "compute_v (MLP out)", p_rome_update),
    Editor(
        "memit",
        "MEMIT",
        "#1f77b4",
        True,
        "template groups, each layer",
        "compute_z (residual)",
        memit_update_step,
        True,
    ),
    Editor(
        "alphaedit",
        "AlphaEdit",
        "#2ca02c",
        True,
        "template groups, each layer",
        "compute_z (residual)",
        alphaedit_update_step,
        True,
    ),
    Editor("emmet", "EMMET-like batch fit", "#9467bd", True, "k", "compute_v (MLP out)", emmet_update),
    Editor("none", "no edit", "#7f7f7f", False, "—", "—", no_update),
)
EDITOR_NAMES: tuple[str, ...] = tuple(EDITORS)


def get_editor(name: str) -> Editor:
    """Return a registered editor, or a KisError listing the choices."""
    if name not in EDITORS:
        raise KisError(f"unknown editor {name!r}: choose from {', '.join(EDITORS)}")
    return EDITORS[name]
