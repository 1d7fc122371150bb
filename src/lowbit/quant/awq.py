"""AWQ: activation-aware weight quantization (Lin et al., 2023).

Input channels that carry large activations matter more: scaling them up in the
weight (W diag(s)) before quantization, and down in the input (x / s), keeps their
relative rounding error small. lowbit's rules:

- scale search per group of layers sharing one input (q, k, v; gate, up): for
  alpha in {0, 1/n, ..., (n-1)/n} (``n_grid`` = 20), s = mean|x|^alpha per input
  channel (over all calibration tokens), clamped to >= 1e-4 and normalised by
  sqrt(max(s) min(s)); the chosen s minimises the mean squared error of the group's
  outputs, act_q(x / s) Q(W diag(s))^T against x W^T, on an evenly spaced sample of
  ``search_tokens`` calibration tokens, with Q round to nearest in the recipe's
  format; for weight-only recipes the error is computed exactly from the Hessian of
  all calibration tokens (sum_n d_n H d_n^T, d = Q(W diag(s)) diag(1/s) - W), for
  recipes that quantize activations on the sample. alpha = 0 is s = 1 (plain
  quantization), so the search never does worse than that on its data;
- where the layers' input is the output of a module that can absorb the scale (a
  norm's weight and bias, or the rows of a preceding linear, checked by running the
  block: see lowbit.quant.calibration) 1/s is folded into it; otherwise the layers
  keep it as their ``input_scale``;
- weight clipping (with the round-to-nearest quantizer, ``clip=True``): per output
  row and scale tile (group, MX or NVFP4 block), the weights are clamped to
  +-c * max|w| with c in {1, 1 - max_shrink / clip_grid, ..., 1 - max_shrink (clip_grid - 1) / clip_grid}
  chosen to minimise that tile's output error sum_t (sum_k (Q(w_c) - w)_k x_tk)^2
  (from the tile's diagonal block of the Hessian, or on ``clip_tokens`` sample tokens
  when activations are quantized).
"""

from __future__ import annotations

import torch

from ..formats import fake_quantize

__all__ = ["search_scale", "clip_search", "group_loss"]


def group_loss(weights: list[torch.Tensor], stats, fmt: str, wopts: dict, activation):
    """loss(s): mean squared output error of the group with input scale s (None: none).

    Weight-only recipes use the Hessian of all calibration tokens, H = X^T X / n:
    the error of the outputs is sum_n d_n H d_n^T with d = Q(W diag(s)) diag(1/s) - W.
    Recipes that quantize activations use the token sample (the error is not quadratic
    in d there)."""
    ws = [w.detach().float() for w in weights]
    n_out = sum(w.shape[0] for w in ws)
    if activation.fmt is None and stats.h is not None:
        h = (stats.h / max(stats.rows, 1)).float()

        def loss(s: torch.Tensor | None) -> float:
            total = 0.0
            for w in ws:
                wq = fake_quantize(w if s is None else w * s[None, :], fmt, **wopts)
                d = (wq if s is None else wq / s[None, :]) - w
                total += float(((d @ h) * d).sum(dtype=torch.float64))
            return total / n_out

        return loss
    x = stats.x_sample
    ref = [x @ w.T for w in ws]
    n_out *= max(x.shape[0], 1)

    def loss(s: torch.Tensor | None) -> float:
        xs = x if s is None else x / s[None, :]
        if activation.fmt is not None:
            xs = fake_quantize(xs, activation.fmt, **activation.options)
        total = 0.0
        for w, r in zip(ws, ref):
            wq = fake_quantize(w if s is None else w * s[None, :], fmt, **wopts)
            total += float(((xs @ wq.T) - r).double().pow(2).sum())
        return total / n_out

    return loss


def search_scale(weights, stats, recipe, wopts: dict, opts: dict):
    """-> (s [K] float32, a short description of the choice)."""
    o = opts["awq"]
    if stats.rows == 0:
        return torch.ones(stats.k), "no data: s = 1"
    loss = group_loss(weights, stats, recipe.weight_fmt, wopts, recipe.activation)
    base = loss(None)
    best, best_alpha, best_loss = torch.ones(stats.k), 0.0, base
    x_mean = stats.abs_mean
    for i in range(1, int(o["n_grid"])):
        alpha = i / int(o["n_grid"])
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        cur = loss(s)
        if cur < best_loss:
            best, best_alpha, best_loss = s, alpha, cur
    gain = 100 * (1 - best_loss / base) if base > 0 else 0.0
    return best.float(), f"alpha={best_alpha:.2f}, sample error -{gain:.0f}%"


def clip_search(w: torch.Tensor, stats, input_scale: torch.Tensor | None, recipe, wopts: dict,
                o: dict) -> torch.Tensor:
    """The weight ``w`` [N, K] (already scaled: the layer's input is x / input_scale) clipped
    per (row, scale tile) to minimise the tile's output error sum_t (sum_k d_k x_tk)^2,
    d = Q(w_c) - w: computed as d_g H_gg d_g^T with H_gg the tile's diagonal block of the
    Hessian of all calibration tokens (weight-only recipes), or on ``clip_tokens`` sample
    tokens."""
    from .grid import make_grid

    n, k = w.shape
    g = make_grid(recipe.weight_fmt, k, **wopts).tile_k
    g = min(g, k)
    n_t = -(-k // g)
    pad = n_t * g - k
    inv = None if input_scale is None else (1.0 / input_scale.double())
    if stats.h is not None:
        h = (stats.h / max(stats.rows, 1)).double()
        if inv is not None:
            h = h * inv[:, None] * inv[None, :]
        h = torch.nn.functional.pad(h, (0, pad, 0, pad))
        blocks = torch.stack([h[t * g:(t + 1) * g, t * g:(t + 1) * g] for t in range(n_t)]).float()  # [G, g, g]

        def tile_err(d):  # d [n, G, g] -> [n, G]
            return torch.einsum("ngk,gkl,ngl->ng", d, blocks, d)
    else:
        x = stats.x_sample
        tokens = x[:: max(1, x.shape[0] // max(1, int(o["clip_tokens"])))][: int(o["clip_tokens"])]
        if tokens.shape[0] == 0:
            return w
        if inv is not None:
            tokens = tokens * inv.float()[None, :]
        xt = torch.nn.functional.pad(tokens, (0, pad)).view(-1, n_t, g)  # [T, G, g]

        def tile_err(d):
            out = torch.empty(d.shape[0], n_t)
            rows = max(1, (1 << 24) // max(1, n_t * tokens.shape[0]))
            for r0 in range(0, d.shape[0], rows):
                out[r0:r0 + rows] = torch.einsum("ngk,tgk->ngt", d[r0:r0 + rows], xt).pow(2).sum(-1)
            return out

    wp = torch.nn.functional.pad(w, (0, pad)).view(n, n_t, g)
    amax = wp.abs().amax(-1, keepdim=True)  # [N, G, 1]
    best_err = torch.full((n, n_t), float("inf"))
    best_c = torch.ones((n, n_t))
    for i in range(int(o["clip_grid"])):
        c = 1 - float(o["max_shrink"]) * i / int(o["clip_grid"])
        wc = torch.minimum(torch.maximum(wp, -c * amax), c * amax).view(n, -1)[:, :k]
        d = torch.nn.functional.pad(fake_quantize(wc, recipe.weight_fmt, **wopts) - w, (0, pad)).view(n, n_t, g)
        err = tile_err(d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_c = torch.where(better, torch.full_like(best_c, c), best_c)
    lim = best_c[:, :, None] * amax
    return torch.minimum(torch.maximum(wp, -lim), lim).view(n, -1)[:, :k].contiguous()
