"""A run's results on disk: the consolidated results.safetensors and the original scripts' per-layer .npy tree
(where each file goes: kis_lens.layout; here, the original's model folder names and which tree a run writes).

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
from kis_lens.layout import RESULTS_FILE, legacy_npy_path, original_npy_path, run_dir, run_of_results_file
from kis_lens.models import MODEL_ALIASES, model_slug

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


def npy_path(config: RunConfig, name: str, slug: str, n_facts: int, layer: int) -> Path:
    """Return where a run writes a matrix of a layer: config.layout "kis" or "original" (the original's exact path)."""
    if config.layout == "original":
        # The name the user gave, when it is the loaded model's (a model object passed in may differ from it).
        given = config.model_name if model_slug(config.model_name) == slug else slug
        folder = original_model_folder(given)
        return original_npy_path(config.output_dir, name, folder, config.knowledge_type, n_facts, layer)
    return legacy_npy_path(config.output_dir, name, slug, config.knowledge_type, n_facts, layer, config.token_position)


def save_result(result: RunResult, config: RunConfig) -> Path:
    """Write the per-layer .npy files (config.layout) and one consolidated safetensors; return its path."""
    slug = result.settings["model"]["name"]
    n_facts = len(result.facts)
    for name, stacked in result.matrices.items():
        for index, layer in enumerate(result.layers):
            save_npy(npy_path(config, name, slug, n_facts, layer), stacked[index].float().cpu().numpy())
    folder = run_dir(config.output_dir, slug, config.knowledge_type, n_facts, config.token_position)
    tensors = {name: stacked.float().cpu().contiguous() for name, stacked in result.matrices.items()}
    metadata = {
        "layers": json.dumps(result.layers),
        "facts": json.dumps([fact.to_dict() for fact in result.facts]),
        "settings": json.dumps(result.settings),
    }
    path = atomic_write(folder / RESULTS_FILE, lambda temp: save_file(tensors, str(temp), metadata=metadata))
    result.path = path
    return path


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
    run = run_of_results_file(path)
    if run is not None:
        output_dir, model, sample, position = run
        return (
            f"rerun `kis all --output_dir {output_dir}` with the settings that wrote it (model {model}, "
            f"{sample}, --token_position {position}) to write it again"
        )
    return "rerun `kis all` with the settings that wrote it to write it again, and give --results that run's folder"
