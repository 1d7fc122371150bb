"""QuantLinear: a linear layer whose weight is a QTensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import QTensor, fake_quantize, quantize_tensor
from .recipes import ActivationSpec, Recipe, parse_recipe

BACKENDS = ("auto", "reference")
_PARTS = ("codes", "scales", "zeros", "global_scale")
_ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _version(t: torch.Tensor | None):
    if t is None:
        return None
    try:
        return t.data_ptr(), t._version
    except RuntimeError:  # inference tensors have no version counter
        return t.data_ptr(), None


class QuantLinear(nn.Module):
    """y = act_quant(x) @ dequant(W)^T + b.

    The weight lives in buffers ``weight_codes``, ``weight_scales`` (and
    ``weight_zeros``, ``weight_global_scale`` where the format has them) in the
    canonical layout, so ``state_dict()`` is what a checkpoint stores.

    backend "reference" dequantizes the weight (cached per dtype and device)
    and fake-quantizes the activations exactly as the low-bit kernel would;
    "auto" is the reference until GPU kernels are registered.
    """

    def __init__(
        self,
        weight: QTensor,
        bias: torch.Tensor | None = None,
        activation: ActivationSpec | None = None,
        backend: str = "auto",
        recipe: str | None = None,
    ):
        super().__init__()
        if len(weight.shape) != 2 or weight.axis != 1:
            raise ValueError(f"QuantLinear needs a 2-D weight [out, in] blocked along in, got {weight!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.out_features, self.in_features = weight.shape
        self.fmt = weight.fmt
        self.tile = weight.tile
        self.weight_options = dict(weight.options)
        self.activation = activation or ActivationSpec()
        self.backend = backend
        self.recipe = recipe
        for part, t in weight.parts().items():
            self.register_buffer(f"weight_{part}", t)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias shape {tuple(bias.shape)} does not match out_features {self.out_features}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._w_cache: tuple | None = None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, recipe: Recipe | str, weight_options: dict | None = None, backend: str = "auto"
    ) -> "QuantLinear":
        r = parse_recipe(recipe) if isinstance(recipe, str) else recipe
        opts = {**r.weight_options, **(weight_options or {})}
        q = quantize_tensor(linear.weight.detach(), r.weight_fmt, **opts)
        return cls(q, linear.bias, r.activation, backend=backend, recipe=r.name)

    @property
    def qweight(self) -> QTensor:
        parts = {p: getattr(self, f"weight_{p}", None) for p in _PARTS}
        return QTensor(
            fmt=self.fmt,
            shape=torch.Size((self.out_features, self.in_features)),
            axis=1,
            tile=self.tile,
            options=self.weight_options,
            **parts,
        )

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight in ``dtype``, cached until a weight part changes."""
        parts = tuple(_version(getattr(self, f"weight_{p}", None)) for p in _PARTS)
        key = (dtype, self.weight_codes.device, parts)
        if self._w_cache is None or self._w_cache[0] != key:
            self._w_cache = (key, self.qweight.dequantize().to(dtype))
        return self._w_cache[1]

    def _apply(self, fn, recurse=True):
        """Moves the weight parts between devices but never changes their dtypes:
        ``model.half()`` or ``model.to(torch.bfloat16)`` must not round the scales."""
        self._w_cache = None
        names = [n for n in self._buffers if n.startswith("weight_") and self._buffers[n] is not None]
        parts = {n: self._buffers.pop(n) for n in names}
        try:
            super()._apply(fn, recurse)
        finally:
            for n, t in parts.items():
                device = fn(torch.empty(0, dtype=t.dtype, device=t.device)).device
                self._buffers[n] = t.to(device)
        return self

    def quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation.fmt is None:
            return x
        return fake_quantize(x, self.activation.fmt, **self.activation.options).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in _ACT_DTYPES:
            raise TypeError(f"QuantLinear takes float32, float16, bfloat16 or float64 inputs, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, this layer takes {self.in_features}")
        w = self.dequantized_weight(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(self.quantize_activation(x), w, b)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, weight={self.fmt}, "
            f"activation={self.activation}, bias={self.bias is not None}, backend={self.backend}"
        )
