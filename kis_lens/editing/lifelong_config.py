"""What a ``kis lifelong`` run is asked to do: LifelongConfig, every setting of a run of real sequential edits.

A run (kis_lens.editing.lifelong.run_lifelong) has each registered editor (kis_lens.editing.registry: original
ROME, r-ROME, p-ROME, MEMIT, AlphaEdit, an EMMET-like batch fit, and ``none``) write hundreds of CounterFact edits one
after another into the model's W_out, in the same seeded order, and every ``probe_every`` / ``eval_every`` edits
measures what the field measures: ROME's CounterFact metrics on all edits so far, held-out perplexity, the drift of
never-edited facts, the edit layer's norm and conditioning, and the interference P predicts for each earlier edit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from kis_lens.blocks import Override, at_least, setting, with_defaults
from kis_lens.corpus import EMBEDDED_CORPUS
from kis_lens.editing.options import EditorOptions
from kis_lens.editing.registry import EDITOR_NAMES, EditorSettings, get_editor
from kis_lens.errors import KisError

EDITORS: tuple[str, ...] = EDITOR_NAMES
DEFAULT_EDITORS: tuple[str, ...] = ("rome", "r-rome", "p-rome", "memit", "alphaedit", "none")


@dataclass(frozen=True)
@with_defaults(
    corpus=Override(help=f"corpus for C and held-out text: {EMBEDDED_CORPUS} or a file"),
    seed=Override(help="random seed of the edit order, the watched facts, the context templates and the bootstrap"),
)
class LifelongConfig(EditorOptions):
    """Every setting of a lifelong-editing run: the editing block, then the run's own."""

    editors: tuple[str, ...] = setting(
        DEFAULT_EDITORS, f"comma-separated subset of {','.join(EDITORS)}", choices=EDITORS, aliases=("editor",)
    )
    memit_span: int = setting(5, "MEMIT/AlphaEdit edit this many layers ending at --layer (GPT-2 XL: 13–17 for 17)")
    eval_every: int = setting(100, "every metric (paraphrase, neighborhood, score, fluency) every this many edits")
    probe_every: int = setting(10, "the cheap metrics (efficacy on all edits so far, perplexity, drift) this often")
    null_relative: bool = setting(False, "AlphaEdit's threshold × the largest singular value (not the original)")
    emmet_weight: float = setting(1.0, "emmet's λ in C⁻¹Kᵀ(λI + K C⁻¹ Kᵀ)⁻¹R")
    memit_clamp_norm_factor: float = setting(
        0.75, "MEMIT/AlphaEdit: ‖δ‖ ≤ this × ‖z‖ (ROME: --value_clamp_norm_factor)"
    )
    value_prompts: int | None = setting(None, "use only the first N of ROME's 21 templates", none="all 21")
    unedited_facts: str = setting("known-1000", "facts never edited, watched for drift: known-1000 or a path")
    heldout_texts: int = setting(16, "held-out texts (after those C read) for perplexity")
    heldout_tokens: int = setting(128, "tokens per held-out text")
    edit_perplexity_texts: int = setting(4, "the first held-out texts scored after every update (0: off)")
    disabling_norm_ratio: float = setting(10.0, "a disabling edit: its ‖ΔW‖ above this × the running median …")
    disabling_perplexity_ratio: float = setting(1.5, "… and held-out perplexity right after it above this × before")
    fluency_prompts: int = setting(8, "generation prompts for fluency")
    fluency_tokens: int = setting(32, "greedy tokens generated per fluency prompt")
    bootstrap: int = setting(1000, "resamples of the bootstrap (clustered by edit) behind the P-prediction verdict")
    retention_threshold: float = setting(0.5, "collapse when efficacy on all edits so far falls below this")
    perplexity_ratio: float = setting(2.0, "… or when held-out perplexity exceeds this × the unedited model's")
    resume: bool = setting(True, "continue an interrupted run from its checkpoint")

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least("n_edits", self.n_edits, 1, none_means="all")
        at_least("value_prompts", self.value_prompts, 1, none_means="all")
        for name in ("eval_every", "probe_every", "batch_size", "n_unedited", "memit_span", "bootstrap"):
            at_least(name, getattr(self, name), 1)
        for name in ("heldout_texts", "fluency_prompts", "edit_perplexity_texts"):
            at_least(name, getattr(self, name), 0)
        at_least("max_tokens", self.max_tokens, 1, none_means="no limit")
        unknown = [name for name in self.editors if name not in EDITORS]
        if unknown or not self.editors:
            raise KisError(f"unknown editor(s) {unknown}: choose from {', '.join(EDITORS)}")
        numbers = (
            "covariance_weight",
            "null_threshold",
            "null_l2",
            "emmet_weight",
            "ridge",
            "perplexity_ratio",
            "disabling_norm_ratio",
            "disabling_perplexity_ratio",
        )
        for name in numbers:
            if getattr(self, name) is not None and not math.isfinite(getattr(self, name)):
                raise KisError(f"--{name} must be a finite number, got {getattr(self, name)}")
        if (self.covariance_weight or 0) < 0 or not self.null_l2 > 0 or not self.null_threshold > 0:
            raise KisError("covariance_weight must be >= 0, null_l2 and null_threshold > 0")
        if not self.ridge >= 0 or self.emmet_weight < 0:
            raise KisError(f"ridge and emmet_weight must be zero or positive, got {self.ridge}, {self.emmet_weight}")
        if not 0 <= self.retention_threshold <= 1 or not self.perplexity_ratio > 1:
            raise KisError("retention_threshold must lie in [0, 1] and perplexity_ratio be > 1")
        if not self.memit_clamp_norm_factor > 0:  # the value search checks the rest of its settings itself
            raise KisError(
                f"memit_clamp_norm_factor must be positive, not {self.memit_clamp_norm_factor}: "
                "e.g. --memit_clamp_norm_factor 0.75 (its default)"
            )

    @property
    def editor_settings(self) -> EditorSettings:
        """Return the editors' hyperparameters: the value search as configured (MEMIT's with its own clamp)."""
        return EditorSettings(
            layer=self.layer,
            memit_span=self.memit_span,
            rome_search=self.value_search,
            memit_search=replace(self.value_search, clamp_norm_factor=self.memit_clamp_norm_factor),
            covariance_weight=self.covariance_weight,
            null_threshold=self.null_threshold,
            null_relative=self.null_relative,
            null_l2=self.null_l2,
            emmet_weight=self.emmet_weight,
            value_prompts=self.value_prompts,
            template_seed=self.seed,
            ridge=self.ridge,
        )

    @property
    def edit_layers(self) -> tuple[int, ...]:
        """Return every layer some chosen editor writes (for C and the restore)."""
        layers = {self.layer}
        if any(get_editor(name).multi_layer for name in self.editors):
            layers |= set(self.editor_settings.memit_layers)
        return tuple(sorted(layers))
