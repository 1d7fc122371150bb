"""One linear layer's weight through a recipe's methods: transform, then quantizer.

The transforms change the layer's input space (x -> x / s for AWQ/SmoothQuant scales,
x -> x R for the Hadamard rotation); the weight follows, W -> W diag(s) R, and so does
the Hessian of the layer's inputs, H -> R diag(1/s) H diag(1/s) R. The quantizer then
picks the codes of the transformed weight: round to nearest (quantize_tensor), HQQ,
or GPTQ (with the transformed Hessian).
"""

from __future__ import annotations

import torch

from ..formats import QTensor, quantize_tensor
from .grid import make_grid
from .hqq import HQQ_DEFAULTS, hqq_params
from .rotation import rotate, rotate_weight

__all__ = ["prepare_weight", "transform_hessian", "quantize_prepared", "quantize_linear_weight",
           "METHOD_OPTIONS", "check_method_options"]

# method -> its options and defaults (quantize_(..., method_options={"gptq": {...}}))
METHOD_OPTIONS = {
    "hqq": dict(HQQ_DEFAULTS),
    "gptq": {"block_size": 128, "percdamp": 0.01, "act_order": False, "static_groups": False, "mse": True},
    "awq": {"n_grid": 20, "clip": True, "clip_grid": 10, "max_shrink": 0.5, "search_tokens": 2048,
            "clip_tokens": 512},
    "smooth": {"alphas": tuple(round(0.05 * i, 2) for i in range(21)), "search_tokens": 2048},
    "calibration": {"batch_size": 4, "sequential": None},  # None: sequential when a layer uses GPTQ
}


def check_method_options(method_options: dict | None) -> dict:
    """Defaults merged with the user's options; unknown names are an error naming the known ones."""
    out = {k: dict(v) for k, v in METHOD_OPTIONS.items()}
    for method, opts in (method_options or {}).items():
        if method not in METHOD_OPTIONS:
            raise ValueError(f"method_options: unknown method {method!r}; known: {', '.join(METHOD_OPTIONS)}")
        if not isinstance(opts, dict):
            raise ValueError(f"method_options[{method!r}] must be a dict of options")
        unknown = set(opts) - set(METHOD_OPTIONS[method])
        if unknown:
            raise ValueError(f"method_options[{method!r}]: unknown option(s) {sorted(unknown)}; "
                             f"known: {sorted(METHOD_OPTIONS[method])}")
        out[method].update(opts)
    return out


def prepare_weight(weight: torch.Tensor, input_scale: torch.Tensor | None = None,
                   rotation_block: int | None = None) -> torch.Tensor:
    """W diag(s) R as float32 (the weight the layer stores quantized)."""
    w = weight.detach().float()
    if input_scale is not None:
        w = w * input_scale.float()[None, :]
    if rotation_block is not None:
        w = rotate_weight(w, rotation_block)
    return w


def transform_hessian(h: torch.Tensor, input_scale: torch.Tensor | None = None,
                      rotation_block: int | None = None) -> torch.Tensor:
    """The Hessian X^T X of the transformed inputs X diag(1/s) R, from that of X."""
    h = h.double()
    if input_scale is not None:
        inv = 1.0 / input_scale.double()
        h = h * inv[:, None] * inv[None, :]
    if rotation_block is not None:
        h = rotate(rotate(h, rotation_block).T.contiguous(), rotation_block)  # R^T H R (R symmetric)
    return h.float()


def quantize_prepared(w: torch.Tensor, fmt: str, weight_options: dict, quantizer: str,
                      method_options: dict | None = None, hessian: torch.Tensor | None = None,
                      shape=None) -> QTensor:
    """Quantize the prepared weight ``w`` [N, K] (float32) with ``quantizer``."""
    opts = check_method_options(method_options)
    if quantizer == "rtn":
        return quantize_tensor(w, fmt, **weight_options)
    grid = make_grid(fmt, w.shape[1], **weight_options)
    if quantizer == "hqq":
        if grid.family != "int":
            raise ValueError(f"-hqq optimises integer weights, not {fmt}")
        params = hqq_params(w, grid, **opts["hqq"])
        return grid.assemble(grid.round(w, params), params, shape)
    if quantizer == "gptq":
        if hessian is None:
            raise ValueError("-gptq needs the Hessian of the layer's inputs: quantize the model with "
                             "lowbit.quantize_(model, recipe, calibration=ids)")
        from .gptq import gptq_quantize

        return gptq_quantize(w, hessian, grid, **opts["gptq"])
    raise ValueError(f"unknown quantizer {quantizer!r}")


def quantize_linear_weight(weight: torch.Tensor, recipe, weight_options: dict,
                           method_options: dict | None = None) -> tuple[QTensor, int | None]:
    """The calibration-free path (rtn, hqq, rot): -> (QTensor, rotation block or None)."""
    if recipe.needs_calibration:
        needs = [m for m in (recipe.transform, recipe.quantizer) if m in ("awq", "gptq", "smooth")]
        raise ValueError(
            f"recipe {recipe.name!r} uses -{needs[0]}, which needs calibration data: "
            "lowbit.quantize_(model, recipe, calibration=ids) with ids a LongTensor [n, seq] of token ids"
        )
    w = prepare_weight(weight, None, recipe.rotation_block)
    q = quantize_prepared(w, recipe.weight_fmt, weight_options, recipe.quantizer, method_options)
    return q, recipe.rotation_block
