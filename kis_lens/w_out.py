"""Find a layer's MLP output weight W_out on a hooked model, and read or write it as [d_mlp, d_model].

W_out is the weight every statistic of kis_lens is about and the one every editor writes: a TransformerBridge
keeps it in an nn.Linear ([d_model, d_mlp]) or a GPT-2 Conv1D ([d_mlp, d_model]), a HookedTransformer in W_out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from kis_lens.errors import KisError
from kis_lens.models import HookedModel


@dataclass(frozen=True)
class OutputWeight:
    """The parameter that holds a layer's W_out, and whether it is stored transposed ([d_model, d_mlp])."""

    weight: torch.nn.Parameter
    bias: torch.nn.Parameter | None
    transposed: bool

    def view(self) -> Float[Tensor, "d_mlp d_model"]:
        """Return the live weight as a [d_mlp, d_model] view (no copy)."""
        weight = self.weight.detach()
        return weight.T if self.transposed else weight

    def read(self) -> Float[Tensor, "d_mlp d_model"]:
        """Return a float64 copy of W_out in the [d_mlp, d_model] orientation."""
        return self.view().double().clone()

    def read_bias(self) -> Float[Tensor, " d_model"]:
        """Return a float64 copy of b_out (zeros when the layer has no output bias)."""
        if self.bias is None:
            size = self.weight.shape[0] if self.transposed else self.weight.shape[1]
            return torch.zeros(size, dtype=torch.float64, device=self.weight.device)
        return self.bias.detach().double().clone()

    def write(self, weight: Float[Tensor, "d_mlp d_model"]) -> None:
        """Overwrite W_out in place with a [d_mlp, d_model] matrix (cast to the parameter's dtype)."""
        stored = weight.T if self.transposed else weight
        if tuple(stored.shape) != tuple(self.weight.shape):
            raise KisError(f"new W_out has shape {tuple(weight.shape)}, expected [d_mlp, d_model]")
        with torch.no_grad():
            self.weight.copy_(stored.to(device=self.weight.device, dtype=self.weight.dtype))


def output_weight(model: HookedModel, layer: int) -> OutputWeight:
    """Return the live W_out parameter of a layer (TransformerBridge Linear/Conv1D, or HookedTransformer)."""
    n_layers = int(model.cfg.n_layers)
    if not 0 <= layer < n_layers:
        raise KisError(f"layer(s) [{layer}] out of range: this model has layers 0..{n_layers - 1}")
    mlp = model.blocks[layer].mlp
    d_mlp, d_model = int(model.cfg.d_mlp), int(model.cfg.d_model)
    if isinstance(getattr(mlp, "W_out", None), torch.nn.Parameter):  # HookedTransformer
        return OutputWeight(mlp.W_out, getattr(mlp, "b_out", None), transposed=False)
    module = getattr(getattr(mlp, "out", None), "original_component", None)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.nn.Parameter):
        raise KisError(
            f"cannot find the MLP output weight of layer {layer} on {type(model).__name__}: expected "
            "blocks[L].mlp.out.original_component.weight (TransformerBridge) or blocks[L].mlp.W_out"
        )
    bias = getattr(module, "bias", None)
    if isinstance(module, torch.nn.Linear):  # nn.Linear stores [out_features, in_features]
        transposed = True
    elif type(module).__name__ == "Conv1D":  # HF GPT-2 style stores [in, out]
        transposed = False
    elif d_mlp != d_model:
        transposed = tuple(weight.shape) == (d_model, d_mlp)
    else:
        raise KisError(f"cannot tell the orientation of {type(module).__name__} weights when d_mlp == d_model")
    expected = (d_model, d_mlp) if transposed else (d_mlp, d_model)
    if tuple(weight.shape) != expected:
        raise KisError(f"layer {layer} output weight has shape {tuple(weight.shape)}, expected {expected}")
    return OutputWeight(weight, bias if isinstance(bias, torch.nn.Parameter) else None, transposed)
