"""kis_lens: knowledge superposition in LLM MLPs, on TransformerLens hooks.

Pipeline: corpus → hooks → stats/covariance → keys → matrices → analysis → plots/report.
"""

from kis_lens._version import __version__
from kis_lens.covariance import estimate_second_moments
from kis_lens.editing.api import EditOutcome, edit
from kis_lens.errors import KisError
from kis_lens.facts import Fact, load_facts, sample_facts
from kis_lens.hooks import capture_mlp_inputs, mlp_in_hook_name, run_mlp_hooks, to_tokens
from kis_lens.keys import Keys, compute_keys, locate_subject
from kis_lens.matrices import Whitener, activation_cos, all_matrices, p_matrix, q_matrix, whitening_cos
from kis_lens.models import HookedModel, ModelInfo, load_model, model_info
from kis_lens.stats import SecondMoment

__all__ = [
    "__version__",
    "Fact",
    "HookedModel",
    "ModelInfo",
    "KisError",
    "Keys",
    "SecondMoment",
    "Whitener",
    "activation_cos",
    "all_matrices",
    "capture_mlp_inputs",
    "compute_keys",
    "edit",
    "EditOutcome",
    "estimate_second_moments",
    "load_facts",
    "load_model",
    "locate_subject",
    "mlp_in_hook_name",
    "model_info",
    "p_matrix",
    "q_matrix",
    "run_mlp_hooks",
    "sample_facts",
    "to_tokens",
    "whitening_cos",
]
