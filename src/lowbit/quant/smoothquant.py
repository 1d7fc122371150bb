"""SmoothQuant (Xiao et al., 2022) for recipes that quantize activations (a8w8-*).

Per-token activation quantization suffers from a few input channels with large
values in every token; SmoothQuant divides those channels by s (x / s) and
multiplies the matching weight columns by s, migrating the difficulty into the
weights, which are quantized per output channel and tolerate it better:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

max|X_j| over all calibration tokens, max|W_j| over the output rows of every layer
sharing the input; clamped to >= 1e-5. alpha is searched: for each alpha in
``alphas`` (0, 0.05, ..., 1) and for s = 1 (no smoothing), the mean squared error
of the group's outputs act_q(x / s) Q(W diag(s))^T against x W^T on a sample of
``search_tokens`` calibration tokens; the smallest wins, so smoothing is used only
where it helps. The scale is folded into the preceding operation where the block
allows it (lowbit.quant.calibration), else kept as the layers' ``input_scale``.
"""

from __future__ import annotations

import torch

from .awq import group_loss

__all__ = ["search_scale"]


def search_scale(weights, stats, recipe, wopts: dict, opts: dict):
    """-> (s [K] float32, a short description of the choice)."""
    o = opts["smooth"]
    if stats.rows == 0 or stats.x_sample.shape[0] == 0:
        return torch.ones(stats.k), "no data: s = 1"
    loss = group_loss(weights, stats, recipe.weight_fmt, wopts, recipe.activation)
    base = loss(None)
    best, best_alpha, best_loss = torch.ones(stats.k), None, base
    w_max = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0).clamp(min=1e-5)
    x_max = stats.abs_max.float().clamp(min=1e-5)
    for alpha in o["alphas"]:
        s = (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
        cur = loss(s)
        if cur < best_loss:
            best, best_alpha, best_loss = s, alpha, cur
    gain = 100 * (1 - best_loss / base) if base > 0 else 0.0
    what = "none" if best_alpha is None else f"alpha={best_alpha:.2f}"
    return best.float(), f"{what}, sample error -{gain:.0f}%"
