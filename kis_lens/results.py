"""A run's results on disk: the consolidated results.safetensors and the original scripts' per-layer .npy tree.

Readers (analysis, plots, report) import this module, never the job that wrote the files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from kis_lens.config import RunConfig
from kis_lens.errors import KisError
from kis_lens.facts import Fact
from kis_lens.io import atomic_write, save_npy
from kis_lens.models import MODEL_ALIASES, model_slug

RESULTS_FILE = "results.safetensors"
# The original scripts' directory name for each matrix.
LEGACY_DIRS: dict[str, str] = {
    "p_matrix": "p_matrix",
    "q_matrix": "q_matrix",
    "whitening_cos": "whitening_cos_matrix",
    "activation_cos": "activation_cos_matrix",
}
# How the original scripts end each matrix's file name: both cosines end in _cos_matrix.npy.
LEGACY_SUFFIXES: dict[str, str] = {
    "p_matrix": "p_matrix",
    "q_matrix": "q_matrix",
    "whitening_cos": "cos_matrix",
    "activation_cos": "cos_matrix",
}
# The original scripts' --model_name choices; their result folders are named by exactly these strings.
ORIGINAL_MODEL_NAMES: tuple[str, ...] = (
    "gpt2-small",
    "gpt2-medium",
    "gpt2-large",
    "gpt2-xl",
    "EleutherAI/gpt-j-6B",
    "EleutherAI/pythia-1b",
    "EleutherAI/pythia-1.4b",
    "EleutherAI/pythia-2.8b",
    "EleutherAI/pythia-6.9b",
    "meta-llama/Meta-Llama-3-8B",
    "meta-llama/Meta-Llama-3.1-8B",
    "meta-llama/Llama-2-7b-hf",
    "meta-llama/Llama-2-13b-hf",
)
# Hub repositories renamed since the original scripts were written: kis's name -> the original's.
ORIGINAL_HUB_NAMES: dict[str, str] = {"meta-llama/Llama-3.1-8B": "meta-llama/Meta-Llama-3.1-8B"}
# The file name the original scripts write whatever --fact_token was.
ORIGINAL_POSITION = "subject_last"


@dataclass
class RunResult:
    """The matrices of every layer for one run, with its facts and settings."""

    matrices: dict[str, Float[Tensor, "layer fact fact"]]
    layers: list[int]
    facts: list[Fact]
    settings: dict[str, Any]
    path: Path | None = None

    def layer(self, name: str, layer: int) -> Float[Tensor, "fact fact"]:
        """Return one matrix of one layer, [fact, fact]."""
        return self.matrices[name][self.layers.index(layer)]


def run_dir(config: RunConfig, model_slug: str, n_facts: int) -> Path:
    """Return the folder of a run's consolidated results."""
    tag = f"{config.knowledge_type}_sample_size_{n_facts}"
    return Path(config.output_dir) / "runs" / model_slug / tag / config.token_position


def legacy_npy_path(
    output_dir: str | Path, name: str, model_slug: str, knowledge_type: str, n_facts: int, layer: int, position: str
) -> Path:
    """Return the per-layer .npy path of a matrix in the original scripts' tree (kis layout: short model name)."""
    folder = Path(output_dir) / LEGACY_DIRS[name] / model_slug / f"{knowledge_type}_sample_size_{n_facts}"
    return folder / f"layer_{layer}_{position}_{LEGACY_SUFFIXES[name]}.npy"


def original_model_folder(model_name: str) -> str:
    """Return the model folder the original scripts write for a model: its --model_name there (EleutherAI/pythia-1b).

    The original's names (gpt2-small, EleutherAI/pythia-1b, ...) stay as given; kis aliases and hub names map to
    the original's spelling (pythia-1b and EleutherAI/pythia-1b -> EleutherAI/pythia-1b, gpt2 -> gpt2-small).
    Another hub name (org/model) nests as given; a local directory or packaged model uses its short name.
    """
    if model_name in ORIGINAL_MODEL_NAMES:
        return model_name
    slug = model_slug(model_name)
    hub = MODEL_ALIASES.get(slug, model_name)
    for candidate in (slug, ORIGINAL_HUB_NAMES.get(hub, hub)):
        if candidate in ORIGINAL_MODEL_NAMES:
            return candidate
    parts = model_name.split("/")
    is_hub_name = len(parts) == 2 and all(part not in ("", ".", "..") and "\\" not in part for part in parts)
    return model_name if is_hub_name and not Path(model_name).exists() else slug


def original_npy_path(
    output_dir: str | Path, name: str, model_name: str, knowledge_type: str, n_facts: int, layer: int
) -> Path:
    """Return the exact path the original scripts write a matrix of a layer to, under output_dir (theirs: data)."""
    return legacy_npy_path(
        output_dir, name, original_model_folder(model_name), knowledge_type, n_facts, layer, ORIGINAL_POSITION
    )


def npy_path(config: RunConfig, name: str, slug: str, n_facts: int, layer: int) -> Path:
    """Return where a run writes a matrix of a layer: config.layout "kis" or "original" (the original's exact path)."""
    if config.layout == "original":
        # The name the user gave, when it is the loaded model's (a model object passed in may differ from it).
        given = config.model_name if model_slug(config.model_name) == slug else slug
        return original_npy_path(config.output_dir, name, given, config.knowledge_type, n_facts, layer)
    return legacy_npy_path(config.output_dir, name, slug, config.knowledge_type, n_facts, layer, config.token_position)


def save_result(result: RunResult, config: RunConfig) -> Path:
    """Write the per-layer .npy files (config.layout) and one consolidated safetensors; return its path."""
    slug = result.settings["model"]["name"]
    n_facts = len(result.facts)
    for name, stacked in result.matrices.items():
        for index, layer in enumerate(result.layers):
            save_npy(npy_path(config, name, slug, n_facts, layer), stacked[index].float().cpu().numpy())
    folder = run_dir(config, slug, n_facts)
    tensors = {name: stacked.float().cpu().contiguous() for name, stacked in result.matrices.items()}
    metadata = {
        "layers": json.dumps(result.layers),
        "facts": json.dumps([fact.to_dict() for fact in result.facts]),
        "settings": json.dumps(result.settings),
    }
    path = atomic_write(folder / RESULTS_FILE, lambda temp: save_file(tensors, str(temp), metadata=metadata))
    result.path = path
    return path


def find_results(path: str | Path) -> Path:
    """Return the results.safetensors of a run folder, a results file, or an output dir holding exactly one run."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / RESULTS_FILE).is_file():
        return path / RESULTS_FILE
    found = sorted(path.glob(f"runs/**/{RESULTS_FILE}")) if path.is_dir() else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise KisError(f"no {RESULTS_FILE} in or under {path}: run `kis all` first, or give the run folder")
    listing = "\n  ".join(str(item.parent) for item in found)
    raise KisError(f"{path} holds {len(found)} runs; pick one with --results:\n  {listing}")


def load_result(path: str | Path) -> RunResult:
    """Return a run's results from its results.safetensors (or the folder holding it).

    A file that cannot be parsed, or whose metadata or matrices do not fit together, raises KisError naming it
    and the command that writes it again (a truncated copy, a killed disk, a hand edit).
    """
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise KisError(f"no results at {path}: run `kis all` first or give the run folder")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        missing = [key for key in ("layers", "facts", "settings") if key not in metadata]
        if missing:
            raise ValueError(f"its metadata lacks {', '.join(missing)}")
        facts = [Fact(**record) for record in json.loads(metadata["facts"])]
        layers, settings = json.loads(metadata["layers"]), json.loads(metadata["settings"])
        matrices: dict[str, torch.Tensor] = load_file(str(path))
        _check_shapes(matrices, layers, len(facts))
    except (SafetensorError, OSError, ValueError, TypeError, KeyError) as error:
        # KeyError/TypeError: a facts record with other fields; ValueError covers json's decode errors.
        raise KisError(
            f"results file {path} is corrupt or truncated ({type(error).__name__}: {error}): {_rewrite_hint(path)}"
        ) from None
    return RunResult(matrices, layers, facts, settings, path)


def _check_shapes(matrices: dict[str, Tensor], layers: Any, n_facts: int) -> None:
    """Raise ValueError unless every matrix is [layer, fact, fact] for the recorded layers and facts."""
    if not isinstance(layers, list) or not all(isinstance(layer, int) for layer in layers):
        raise ValueError(f"its layers are {layers!r}, not a list of layer numbers")
    for name, stacked in matrices.items():
        if tuple(stacked.shape) != (len(layers), n_facts, n_facts):
            raise ValueError(
                f"{name} is {tuple(stacked.shape)}, not ({len(layers)}, {n_facts}, {n_facts}) for its layers and facts"
            )


def _rewrite_hint(path: Path) -> str:
    """Return how to write a results file again: its `kis all` rerun, with the --output_dir it sits under."""
    parts = path.parts
    # <output_dir>/runs/<model>/<knowledge_type>_sample_size_<n>/<token_position>/results.safetensors
    if len(parts) >= 5 and parts[-5] == "runs":
        output_dir = Path(*parts[:-5]) if len(parts) > 5 else Path(".")
        return (
            f"rerun `kis all --output_dir {output_dir}` with the settings that wrote it (model {parts[-4]}, "
            f"{parts[-3]}, --token_position {parts[-2]}) to write it again"
        )
    return "rerun `kis all` with the settings that wrote it to write it again, and give --results that run's folder"
