"""HQQ: half-quadratic quantization (Badri & Shaji, 2023), calibration-free.

For integer weights, HQQ keeps round-to-nearest's codes rule q = clamp(round(W/s + z))
but chooses the zero point z (and optionally the scale s) of every group to minimise
an lp-norm of the error with p < 1, which tolerates a few large errors (outliers)
in exchange for many small ones. Splitting the error off as a variable W_e gives a
half-quadratic problem solved by alternating two closed-form steps:

    W_e <- shrink_p(W - (q - z) s, beta)      generalised soft threshold
    z   <- mean(q - (W - W_e) / s)            over the group
    beta <- kappa * beta

with shrink_p(x, beta) = sign(x) * max(|x| - |x|^(p-1) / beta, 0). Published defaults:
p = 0.7, beta = 10, kappa = 1.01, 20 iterations, early stop.

lowbit's rules, stated exactly:
- start: the round-to-nearest parameters of the format (min-max scale; float zero
  -min/s, or its rounding with ``zero_point="integer"``);
- error of a candidate: mean |W - (q - z) s| over the group (HQQ's stopping measure,
  ``error="l1"``; ``"lp"`` uses the mean of |.|^p);
- early stop per group: a group keeps the best parameters it has seen and stops
  at the first iteration that does not improve its error (the published rule, applied
  to every group on its own, so the result does not depend on how rows are chunked);
- the zero (and scale) are rounded to ``scale_dtype`` (and the zero to an integer for
  ``zero_point="integer"``) at every step, so the error that decides is the error of
  what is stored;
- ``optimize_scale=True`` also refits the scale: (s, z) by least squares of
  W - W_e on q per group (a > 0 required, else the scale is kept);
- symmetric formats (int8 by default) have no zero: the scale is refitted,
  s = <q, W - W_e> / <q, q>;
- codes are finally rounded with the stored parameters through the same arithmetic as
  lowbit.formats, so ``QTensor.dequantize()`` reproduces (q - z) s.

Work is float32 in chunks of whole rows (``chunk_elements`` weights at a time), so a
14336x4096 float32 weight needs a few hundred MB beyond itself.
"""

from __future__ import annotations

import torch

from ..formats import QTensor
from .grid import Grid, make_grid

__all__ = ["HQQ_DEFAULTS", "quantize_hqq", "hqq_params"]

HQQ_DEFAULTS = {"p": 0.7, "beta": 10.0, "kappa": 1.01, "iters": 20, "early_stop": True,
                "optimize_scale": False, "error": "l1"}


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.pow(p - 1) / beta)


def _project(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).float()


def _solve(w: torch.Tensor, grid: Grid, s: torch.Tensor, z: torch.Tensor | None, cfg: dict):
    """One chunk of groups: w [M, g] float32, s and z [M] -> best (s, z) [M].

    Groups that stop early leave the working set (their rows are dropped), so the
    later iterations cost only what is still improving."""
    p, beta, kappa, iters = cfg["p"], cfg["beta"], cfg["kappa"], int(cfg["iters"])
    qmin, qmax = grid.qmin, grid.qmax
    integer_zero = grid.zero_point == "integer"
    affine = z is not None
    fit_scale = not affine or cfg["optimize_scale"]
    m = w.shape[0]
    best_err = torch.full((m,), float("inf"), device=w.device)
    best_s, best_z = s.clone(), (z.clone() if affine else None)
    idx = None  # rows of the working set (None: all)
    wa, sa, za = w, s, z
    for it in range(iters + 1):  # the last pass only scores the last update
        s2 = sa[:, None]
        u = wa / s2
        if affine:
            u += za[:, None]
        q = torch.round(u).clamp_(qmin, qmax)
        e = (u.sub_(q)).mul_(s2)  # W - (q - z) s, computed as (W/s + z - q) s
        del u
        err = e.abs().mean(1) if cfg["error"] == "l1" else e.abs().pow_(p).mean(1)
        better = err < (best_err if idx is None else best_err[idx])
        rows = better if idx is None else idx[better]
        best_err[rows] = err[better]
        best_s[rows] = sa[better]
        if affine:
            best_z[rows] = za[better]
        if it == iters:
            break
        if cfg["early_stop"]:
            if not bool(better.any()):
                break
            if not bool(better.all()):
                idx = (torch.nonzero(better).squeeze(1) if idx is None else idx[better])
                wa, sa, q, e = wa[better], sa[better], q[better], e[better]
                za = za[better] if affine else None
        target = wa - _shrink(e, beta, p)  # W - W_e
        del e
        if affine and not cfg["optimize_scale"]:
            z_new = q.mean(1) - target.mean(1) / sa
        elif affine:  # least squares: target ~ a q + b, s = a, z = -b / a
            qm, tm = q.mean(1), target.mean(1)
            dq = q - qm[:, None]
            var = dq.pow(2).sum(1)
            a = (dq * (target - tm[:, None])).sum(1) / torch.where(var > 0, var, 1.0)
            a = _project(a, grid.scale_dtype)
            ok = (var > 0) & (a > 0)
            s_new = torch.where(ok, a, sa)
            z_new = torch.where(ok, qm - tm / s_new, za)
        else:  # symmetric: s = <q, target> / <q, q>
            qq = q.pow(2).sum(1)
            a = _project((q * target).sum(1) / torch.where(qq > 0, qq, 1.0), grid.scale_dtype)
            s_new = torch.where((qq > 0) & (a > 0), a, sa)
        if affine:
            if integer_zero:
                z_new = torch.round(z_new)
            za = _project(z_new, grid.scale_dtype)
        if fit_scale:
            sa = s_new
        beta *= kappa
    return best_s, best_z


def hqq_params(w: torch.Tensor, grid: Grid, chunk_elements: int = 1 << 22, **cfg) -> dict:
    """HQQ parameters of an integer grid for ``w`` [R, K] float32: {"scale", "zero"?} [R, n_tiles]."""
    if grid.family != "int":
        raise ValueError(f"HQQ optimises integer formats (int8, int4, int3, int2); {grid.fmt} is not one")
    unknown = set(cfg) - set(HQQ_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown HQQ option(s) {sorted(unknown)}; HQQ takes {sorted(HQQ_DEFAULTS)}")
    cfg = {**HQQ_DEFAULTS, **cfg}
    if not 0 < cfg["p"] <= 2 or cfg["beta"] <= 0 or cfg["kappa"] < 1 or cfg["iters"] < 0:
        raise ValueError(f"HQQ needs 0 < p <= 2, beta > 0, kappa >= 1, iters >= 0; got {cfg}")
    if cfg["error"] not in ("l1", "lp"):
        raise ValueError(f"HQQ error must be 'l1' or 'lp', got {cfg['error']!r}")
    r, k = w.shape
    params = grid.fit(w)
    g = grid.tile_k
    if g >= k:  # per channel, or one group wider than K
        spans = [(0, k, 1)]  # (first column, tile width, number of tiles)
    else:
        spans = [(0, g, k // g)] + ([(k // g * g, k % g, 1)] if k % g else [])
    s_all, z_all = params["scale"], params.get("zero")
    rows_per_chunk = max(1, chunk_elements // max(k, 1))
    for r0 in range(0, r, rows_per_chunk):
        r1 = min(r, r0 + rows_per_chunk)
        for c0, width, n in spans:
            t0 = c0 // g
            wc = w[r0:r1, c0:c0 + width * n].reshape(-1, width)
            sc = s_all[r0:r1, t0:t0 + n].reshape(-1)
            zc = None if z_all is None else z_all[r0:r1, t0:t0 + n].reshape(-1)
            bs, bz = _solve(wc, grid, sc, zc, cfg)
            s_all[r0:r1, t0:t0 + n] = bs.reshape(r1 - r0, n)
            if z_all is not None:
                z_all[r0:r1, t0:t0 + n] = bz.reshape(r1 - r0, n)
    return params


def quantize_hqq(weight: torch.Tensor, fmt: str = "int4", chunk_elements: int = 1 << 22,
                 p: float = 0.7, beta: float = 10.0, kappa: float = 1.01, iters: int = 20,
                 early_stop: bool = True, optimize_scale: bool = False, error: str = "l1",
                 **format_options) -> QTensor:
    """HQQ-quantize one weight [out, in] into integer format ``fmt`` (int8/int4/int3/int2).

    ``format_options`` are quantize_tensor's (group_size, symmetric, zero_point,
    scale_dtype, granularity "group"/"channel"); the result is a QTensor in the same
    canonical layout as ``quantize_tensor(weight, fmt, **format_options)``, with the
    optimised scales and zeros. Works on any device; computes in float32, ``chunk_elements``
    weights at a time.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("quantize_hqq takes a 2-D weight [out_features, in_features]")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"cannot quantize a {weight.dtype} weight; convert it first (weight.float())")
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("the weight holds NaN/Inf values; clean them first (torch.nan_to_num)")
    grid = make_grid(fmt, w.shape[1], **format_options)
    if grid.family != "int":
        raise ValueError(f"HQQ optimises integer formats (int8, int4, int3, int2), not {fmt}; "
                         "for MX/NVFP4 weights use GPTQ or the Hadamard rotation")
    params = hqq_params(w, grid, chunk_elements=chunk_elements, p=p, beta=beta, kappa=kappa, iters=iters,
                        early_stop=early_stop, optimize_scale=optimize_scale, error=error)
    return grid.assemble(grid.round(w, params), params, weight.shape)
