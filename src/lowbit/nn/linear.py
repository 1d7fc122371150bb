"""QuantLinear: a linear layer whose weight is a QTensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import QTensor, fake_quantize, quantize_tensor
from ..quant.rotation import rotate
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
    """y = act_quant(T(x)) @ dequant(W)^T + b.

    The weight lives in buffers ``weight_codes``, ``weight_scales`` (and
    ``weight_zeros``, ``weight_global_scale`` where the format has them) in the
    canonical layout, so ``state_dict()`` is what a checkpoint stores.

    backend "reference" dequantizes the weight (cached per dtype and device)
    and fake-quantizes the activations exactly as the low-bit kernel would;
    "auto" runs weight-only recipes on CUDA with bf16/fp16 inputs through the
    GPU kernels (``lowbit.kernels``: the dispatcher picks the kernel by shape,
    as the custom op ``torch.ops.lowbit.weight_only_linear``), a8w8-fp8 and
    a8w8-int8 recipes through the A8W8 kernels (``torch.ops.lowbit.a8w8_linear``:
    activation quantization, then the FP8/INT8 tensor-core GEMM), a8w4-fp8-mxfp4
    through the W4A8 op (``torch.ops.lowbit.w4a8_linear``), MX recipes
    (a8w8-mxfp8, a8w4-mxfp4, a4w4-mxfp4) through the MX kernel
    (``torch.ops.lowbit.mx_linear``, tl.dot_scaled) on GPUs with block-scaled MMA,
    and elsewhere (Hopper) the MX recipes as MX activations dequantized
    exactly (``torch.ops.lowbit.mx_fake_quantize``) times the weight through the
    weight-only kernels (a4w4-nvfp4 likewise, with NVFP4 activations: e2m1 times the
    block scale exactly, ``torch.ops.lowbit.nvfp4_fake_quantize``, the tensor scale
    applied to the sums), and everything else (CPU, float32, formats without a kernel)
    through the reference.

    T is the input transform that AWQ/SmoothQuant and rotations leave behind when
    they cannot fold it into the preceding operation, applied before activation
    quantization: x -> x / input_scale (buffer ``input_scale`` [in], float32, per
    input channel; absent when None), then x -> x R with R the block-wise Hadamard
    rotation of ``rotation_block`` (lowbit.quant.rotation; None: no rotation). The
    stored weight is then the quantized W diag(input_scale) R.
    """

    def __init__(
        self,
        weight: QTensor,
        bias: torch.Tensor | None = None,
        activation: ActivationSpec | None = None,
        backend: str = "auto",
        recipe: str | None = None,
        input_scale: torch.Tensor | None = None,
        rotation_block: int | None = None,
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
        if input_scale is not None:
            input_scale = input_scale.detach().to(torch.float32).reshape(-1)
            if input_scale.numel() != self.in_features or not bool((input_scale > 0).all()):
                raise ValueError(f"input_scale must hold {self.in_features} positive values")
            self.register_buffer("input_scale", input_scale.clone())
        else:
            self.register_buffer("input_scale", None)
        if rotation_block is not None:
            from ..quant.rotation import rotation_blocks

            rotation_blocks(self.in_features, int(rotation_block))  # checks it is a power of two
            rotation_block = int(rotation_block)
        self.rotation_block = rotation_block
        # scales that AWQ/SmoothQuant folded into this layer's neighbours, for diagnostics only
        # (effective_weight), not part of the state dict: the layer's input is already x / s
        # (folded_input_scale), and its output rows were multiplied by folded_output_scale so
        # that the next layer's input is scaled
        self.folded_input_scale: torch.Tensor | None = None
        self.folded_output_scale: torch.Tensor | None = None
        self._w_cache: tuple | None = None
        self._pw_cache: tuple | None = None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, recipe: Recipe | str, weight_options: dict | None = None, backend: str = "auto",
        method_options: dict | None = None,
    ) -> "QuantLinear":
        """Quantize one nn.Linear with a recipe whose methods need no data (-rtn, -hqq, -rot);
        calibrated methods (-awq, -gptq, -smooth) go through ``lowbit.quantize_(model, recipe,
        calibration=ids)``."""
        r = parse_recipe(recipe) if isinstance(recipe, str) else recipe
        opts = {**r.weight_options, **(weight_options or {})}
        if r.method == "rtn" and r.transform is None:
            q = quantize_tensor(linear.weight.detach(), r.weight_fmt, **opts)
            return cls(q, linear.bias, r.activation, backend=backend, recipe=r.name)
        from ..quant.methods import quantize_linear_weight

        q, rot = quantize_linear_weight(linear.weight, r, opts, method_options)
        return cls(q, linear.bias, r.activation, backend=backend, recipe=r.name, rotation_block=rot)

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

    def effective_weight(self) -> torch.Tensor:
        """The float32 weight [out, in] in the space of the layer's original input and
        output: the dequantized weight with the input transforms undone, dequant(W) R^T
        diag(1/s) (s: input_scale, or a scale folded into the preceding operation), and
        rows scaled for a following layer restored. Used to measure weight error."""
        from ..quant.rotation import rotate

        w = self.qweight.dequantize()
        if self.rotation_block is not None:
            w = rotate(w.double(), self.rotation_block).float()  # R is symmetric: W R^T = W R
        for s in (self.input_scale, self.folded_input_scale):
            if s is not None:
                w = w / s.to(w.device, torch.float32)[None, :]
        if self.folded_output_scale is not None:
            w = w / self.folded_output_scale.to(w.device, torch.float32)[:, None]
        return w

    def _apply(self, fn, recurse=True):
        """Moves the weight parts between devices but never changes their dtypes:
        ``model.half()`` or ``model.to(torch.bfloat16)`` must not round the scales."""
        self._w_cache = None
        self._pw_cache = None
        names = [n for n in self._buffers
                 if (n.startswith("weight_") or n == "input_scale") and self._buffers[n] is not None]
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

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """x / input_scale, then the Hadamard rotation (each only where the layer has one)."""
        if self.input_scale is not None:
            if x.dtype in (torch.float16, torch.bfloat16):
                x = (x.float() / self.input_scale).to(x.dtype)
            else:
                x = x / self.input_scale.to(x.dtype)
        if self.rotation_block is not None:
            x = rotate(x, self.rotation_block)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in _ACT_DTYPES:
            raise TypeError(f"QuantLinear takes float32, float16, bfloat16 or float64 inputs, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, this layer takes {self.in_features}")
        if self._a8w8_applies(x):
            from ..kernels.ops import a8w8_linear

            # x / input_scale is fused into the activation quantization; a rotation is not
            fused = self.rotation_block is None
            xt = x if fused else self.transform_input(x)
            b = None if self.bias is None else self.bias.to(x.dtype)
            return a8w8_linear(xt, self.packed_a8w8(), b, self.input_scale if fused else None)
        x = self.transform_input(x)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self._w4a8_applies(x):
            from ..kernels.ops import w4a8_linear

            return w4a8_linear(x, self.packed_w4a8(x.dtype), b)
        if self._mx_applies(x):
            from ..kernels.ops import mx_linear

            return mx_linear(x, self.packed_mx(), self.activation.fmt, b)
        if self._nvfp4_native_applies(x):
            from ..kernels.ops import nvfp4_linear

            return nvfp4_linear(x, self.packed_nvfp4(), b)
        if self._kernel_applies(x):
            pw = self.packed_weight(x.dtype)
            if pw.triton_supported:
                from ..kernels.ops import mx_fake_quantize, weight_only_linear

                if self.activation.fmt == "nvfp4":  # e2m1 * s_b exactly; s_t on the sums (nvfp4_upcast_matmul)
                    from ..kernels.ops import nvfp4_fake_quantize
                    from ..kernels.packing import times_tensor_scale

                    x, s_t = nvfp4_fake_quantize(x)
                    pw = times_tensor_scale(pw, s_t)
                elif self.activation.fmt is not None:  # MX activations, dequantized exactly (mx_upcast_matmul)
                    x = mx_fake_quantize(x, self.activation.fmt)
                return weight_only_linear(x, pw, b)
        w = self.dequantized_weight(x.dtype)
        return F.linear(self.quantize_activation(x), w, b)

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        """backend "auto" on CUDA, bf16/fp16 input, a weight-only recipe, MX activations
        (floor rule; on GPUs without block-scaled MMA, ``lowbit.kernels.mx.mx_upcast_matmul``)
        or a4w4-nvfp4 (``lowbit.kernels.mx.nvfp4_upcast_matmul``): the weight-only kernels,
        where they take the weight."""
        from ..kernels.mx import upcast_activation_applies

        act = self.activation
        nvfp4 = act.fmt == "nvfp4" and not act.options and self.fmt == "nvfp4"  # a4w4-nvfp4
        return (self.backend == "auto" and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
                and (act.fmt is None or nvfp4 or upcast_activation_applies(act.fmt, act.options)))

    def _a8w8_applies(self, x: torch.Tensor) -> bool:
        """backend "auto" on CUDA, bf16/fp16 input, an a8w8-fp8/int8 recipe whose
        activation scales pair with the weight's (per token with per channel, 1 x 128
        with 128 x 128 blocks): the A8W8 kernels."""
        act = self.activation
        if not (self.backend == "auto" and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
                and act.fmt in ("fp8_e4m3", "int8") and act.fmt == self.fmt):
            return False
        per_token = act.options.get("granularity") == "token" and "group_size" not in act.options
        blocks = act.options.get("group_size") == 128
        tile = tuple(self.tile)
        if not ((per_token and tile == (1, self.in_features)) or (blocks and tile == (128, 128))):
            return False
        from ..kernels.a8w8 import a8w8_unsupported

        return a8w8_unsupported(self.qweight) is None

    def _w4a8_applies(self, x: torch.Tensor) -> bool:
        """backend "auto" on CUDA, bf16/fp16 input, FP8 activations per token with MXFP4
        weights (a8w4-fp8-mxfp4): the W4A8 op (``lowbit.kernels.w4a8``)."""
        act = self.activation
        if not (self.backend == "auto" and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
                and act.fmt == "fp8_e4m3" and act.options == {"granularity": "token"}):
            return False
        from ..kernels.w4a8 import w4a8_unsupported

        return w4a8_unsupported(self.qweight) is None

    def _mx_applies(self, x: torch.Tensor) -> bool:
        """backend "auto" on a CUDA GPU with block-scaled MMA (Blackwell, compute capability
        10+), bf16/fp16 input, MXFP8/MXFP4 activations (the spec's floor rule) with MXFP8/MXFP4
        weights (a8w8-mxfp8, a8w4-mxfp4, a4w4-mxfp4): the MX kernel. On Hopper Triton emulates
        that MMA at 0.1-0.7x bf16 (docs/perf/experiments/a8w8-h200.md): the MX recipes run the
        upcast path there (``_kernel_applies``)."""
        from ..kernels.mx import ACT_FORMATS, mx_native, mx_unsupported

        act = self.activation
        return (self.backend == "auto" and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
                and act.fmt in ACT_FORMATS and act.options.get("scale_rule", "floor") == "floor"
                and mx_native(x.device) and mx_unsupported(self.qweight) is None)

    def _nvfp4_native_applies(self, x: torch.Tensor) -> bool:
        """backend "auto" on a CUDA GPU with block-scaled MMA (Blackwell), bf16/fp16 input,
        a4w4-nvfp4: the NVFP4 kernel (``lowbit.kernels.mx.nvfp4_matmul``; not run here). On
        Hopper a4w4-nvfp4 runs the upcast path (``_kernel_applies``)."""
        from ..kernels.mx import mx_native

        act = self.activation
        return (self.backend == "auto" and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
                and act.fmt == "nvfp4" and not act.options and self.fmt == "nvfp4" and mx_native(x.device))

    def _packed(self, kind, make):
        """``make(qweight)`` for ``kind``, cached until a weight part changes; one packing
        at a time lives beside the canonical buffers (the old one is freed first)."""
        parts = tuple(_version(getattr(self, f"weight_{p}", None)) for p in _PARTS)
        key = (kind, self.weight_codes.device, parts)
        if self._pw_cache is None or self._pw_cache[0] != key:
            self._pw_cache = None
            self._pw_cache = (key, make(self.qweight))
        return self._pw_cache[1]

    def packed_mx(self):
        """The weight in the MX kernel's layout (``lowbit.kernels.mx.pack_mx``), cached."""
        from ..kernels.mx import pack_mx

        return self._packed("mx", pack_mx)

    def packed_nvfp4(self):
        """The weight in the NVFP4 kernel's layout (``lowbit.kernels.mx.pack_nvfp4``), cached."""
        from ..kernels.mx import pack_nvfp4

        return self._packed("nvfp4", pack_nvfp4)

    def packed_a8w8(self):
        """The weight in the A8W8 kernels' layout (``lowbit.kernels.a8w8.pack_a8w8``), cached."""
        from ..kernels.a8w8 import pack_a8w8

        return self._packed("a8w8", pack_a8w8)

    def packed_w4a8(self, dtype: torch.dtype):
        """The weight in the W4A8 layout for ``dtype`` activations (``lowbit.kernels.w4a8.pack_w4a8``:
        the canonical buffers, the fold's row exponents and the weight-only layout), cached."""
        from ..kernels.w4a8 import pack_w4a8

        return self._packed(("w4a8", dtype), lambda qt: pack_w4a8(qt, dtype=dtype))

    def packed_weight(self, dtype: torch.dtype):
        """The weight in the weight-only kernels' layout for ``dtype`` activations
        (``lowbit.kernels.pack_weight``), cached: about twice the weight's bytes on the
        device, beside the canonical buffers (the state dict keeps those)."""
        from ..kernels import pack_weight

        return self._packed(dtype, lambda qt: pack_weight(qt, dtype=dtype))

    def extra_repr(self) -> str:
        extra = ""
        if self.input_scale is not None:
            extra += ", input_scale=True"
        if self.rotation_block is not None:
            extra += f", rotation_block={self.rotation_block}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, weight={self.fmt}, "
            f"activation={self.activation}, bias={self.bias is not None}, backend={self.backend}{extra}"
        )
