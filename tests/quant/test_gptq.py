"""GPTQ against a straightforward float64 reference of its column sweep.

The reference quantizes one column at a time and applies the Optimal Brain Surgeon
update with an explicit inverse Hessian that it downdates after every column
(Hinv <- Hinv - Hinv[:, j] Hinv[j, :] / Hinv[j, j]): no Cholesky factor, no lazy
blocks. Tile parameters come from lowbit.quantize_tensor on the current (updated)
columns of the tile (or on the original weight for static groups), NVFP4 block
scales from the element casts of lowbit.formats with the tensor scale of the original
weight. The implementation under test runs in float64 here so the two agree code for
code.
"""

import pytest
import torch

from lowbit import quantize_tensor
from lowbit.formats import decode, encode
from lowbit.formats.elements import round_to_grid, scale_pow2
from lowbit.quant import make_grid
from lowbit.quant.gptq import gptq_quantize

pytestmark = pytest.mark.usefixtures("one_thread")


def tile_params(fmt, opts, w_tile, s_t):
    """Round-to-nearest parameters of one tile (columns w_tile [N, g]) from the formats library."""
    if fmt == "nvfp4":
        amax = w_tile.abs().amax(1).float()
        ratio = amax / (torch.tensor(6.0) * s_t) if s_t > 0 else torch.zeros_like(amax)
        return {"block": decode(encode(ratio, "fp8_e4m3"), "fp8_e4m3")}
    g = w_tile.shape[1]
    tile_opts = dict(opts)
    if fmt.startswith("int") and "group_size" in opts:
        tile_opts["group_size"] = g
    q = quantize_tensor(w_tile.float(), fmt, **tile_opts)
    if fmt.startswith("mx"):
        return {"exp": q.scales.long()[:, 0] - 127}
    out = {"scale": q.scales.float()[:, 0]}
    if q.zeros is not None:
        out["zero"] = q.zeros.float()[:, 0]
    return out


def quantize_column(fmt, w, p, s_t, bits, symmetric):
    """-> (grid value, dequantized) of one column under tile parameters p."""
    if fmt.startswith("int"):
        lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
        z = p.get("zero", torch.zeros_like(p["scale"]))
        q = torch.clamp(torch.round(w.float() / p["scale"] + z), lo, hi)
        return q, (q - z) * p["scale"]
    if fmt.startswith("mx"):
        v = round_to_grid(scale_pow2(w.float(), -p["exp"]), "fp4_e2m1")
        return v, scale_pow2(v, p["exp"])
    d = p["block"] * s_t
    v = torch.where(d > 0, round_to_grid(w.float() / torch.where(d > 0, d, 1.0), "fp4_e2m1"), 0.0)
    return v, (v * p["block"]) * s_t


def mse_tile_params(fmt, opts, w_tile, s_t, bits, symmetric):
    """The MSE grid: round to nearest's parameters of c * tile for c = 1, then 19 values down
    to 0.6 (MX: c = 1/2 and 2), keeping per row the first with the smallest squared error."""
    cs = [0.5, 2.0] if fmt.startswith("mx") else [1 - 0.4 * i / 19 for i in range(1, 20)]
    best = tile_params(fmt, opts, w_tile, s_t)

    def err(p):
        return sum((quantize_column(fmt, w_tile[:, j], p, s_t, bits, symmetric)[1].double()
                    - w_tile[:, j].float().double()) ** 2 for j in range(w_tile.shape[1]))

    e_best = err(best)
    for c in cs:
        p = tile_params(fmt, opts, w_tile.float() * c, s_t)
        e = err(p)
        better = e < e_best
        e_best = torch.where(better, e, e_best)
        best = {k: torch.where(better, p[k], best[k]) for k in best}
    return best


def gptq_reference(w, h, fmt, opts, g, percdamp=0.01, order=None, static=False, mse=False):
    w0 = w.double().clone()
    W = w.double().clone()
    H = h.double().clone()
    n, k = W.shape
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.diagonal(H).mean() * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.inv(H)
    s_t = (w0.abs().max().float() / (6 * 448)) if fmt == "nvfp4" else None
    bits = int(fmt[3]) if fmt.startswith("int") else 4
    symmetric = opts.get("symmetric", fmt == "int8")
    tiles = {}
    values = torch.zeros(n, k, dtype=torch.float64)
    order = list(range(k)) if order is None else order
    for j in order:
        t = j // g
        if t not in tiles:
            src = w0 if static or g >= k else W
            tile = src[:, t * g:min(k, (t + 1) * g)]
            tiles[t] = (mse_tile_params(fmt, opts, tile, s_t, bits, symmetric) if mse
                        else tile_params(fmt, opts, tile, s_t))
        v, q = quantize_column(fmt, W[:, j], tiles[t], s_t, bits, symmetric)
        values[:, j] = v.double()
        err = (W[:, j] - q.double()) / hinv[j, j]
        W -= err[:, None] * hinv[j][None, :]
        W[:, j] = q.double()
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
        hinv[j, j] = 1.0  # j is done: keep the matrix invertible-looking (its row and column are zero)
    return values


def random_problem(n, k, seed):
    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.05
    x = torch.randn(4 * k, k) @ (torch.eye(k) + 0.3 * torch.randn(k, k))  # correlated inputs
    x[:, 1] *= 10  # an outlier input channel
    return w, x.T @ x / x.shape[0]


CASES = [
    ("int4", {"group_size": 16}, 16),
    ("int3", {"group_size": 32, "zero_point": "integer"}, 32),
    ("int4", {"group_size": 16, "symmetric": True}, 16),
    ("int8", {}, None),  # per channel: one tile spanning K
    ("mxfp4", {}, 32),
    ("nvfp4", {}, 16),
]


@pytest.mark.parametrize("fmt,opts,g", CASES)
@pytest.mark.parametrize("block_size,mse", [(128, False), (32, False), (128, True)])
def test_codes_equal_the_reference_sweep(fmt, opts, g, block_size, mse):
    w, h = random_problem(12, 96, 0)
    grid = make_grid(fmt, 96, **opts)
    q = gptq_quantize(w, h, grid, block_size=block_size, mse=mse, dtype=torch.float64)
    ref = gptq_reference(w, h, fmt, opts, g or 96, mse=mse)
    vals = grid.round(q.dequantize(), {k: v.float() for k, v in _params(q, grid).items()})
    assert torch.equal(vals.double(), ref)


def _params(q, grid):
    """The parameters stored in a QTensor, in Grid's units."""
    if grid.family == "int":
        out = {"scale": q.scales.float()}
        if q.zeros is not None:
            out["zero"] = q.zeros.float()
        return out
    if grid.family == "mx":
        return {"exp": q.scales.long() - 127}
    grid.global_scale = q.global_scale
    return {"block": decode(q.scales, "fp8_e4m3")}


@pytest.mark.parametrize("fmt,opts,g", [CASES[0], CASES[4]])
def test_act_order_with_static_groups_equals_the_reference(fmt, opts, g):
    w, h = random_problem(10, 64, 1)
    grid = make_grid(fmt, 64, **opts)
    q = gptq_quantize(w, h, grid, act_order=True, static_groups=True, mse=False, dtype=torch.float64)
    order = torch.argsort(torch.diagonal(h), descending=True).tolist()
    ref = gptq_reference(w, h, fmt, opts, g, order=order, static=True)
    # static groups: the stored parameters are round to nearest's on the original weight
    rtn = quantize_tensor(w, fmt, **opts)
    assert torch.equal(q.scales, rtn.scales)
    vals = grid.round(q.dequantize(), {k: v.float() for k, v in _params(q, grid).items()})
    assert torch.equal(vals.double(), ref)


@pytest.mark.parametrize("fmt,opts", [("int4", {"group_size": 32}), ("mxfp4", {}), ("nvfp4", {}), ("int3", {"group_size": 32})])
def test_lowers_the_output_error_of_round_to_nearest(fmt, opts):
    w, h = random_problem(64, 128, 2)
    grid = make_grid(fmt, 128, **opts)
    q = gptq_quantize(w, h, grid)
    r = quantize_tensor(w, fmt, **opts)

    def out_err(wq):
        d = (wq - w).double()
        return float(torch.einsum("nk,kl,nl->", d, h.double(), d))

    assert out_err(q.dequantize()) < 0.75 * out_err(r.dequantize())
    assert q.tile == r.tile and q.options == r.options and q.codes.shape == r.codes.shape


def test_dead_inputs_and_errors():
    w, h = random_problem(8, 64, 3)
    h[5, :] = 0
    h[:, 5] = 0
    grid = make_grid("int4", 64, group_size=32)
    q = gptq_quantize(w, h, grid)
    assert torch.isfinite(q.dequantize()).all()
    with pytest.raises(ValueError, match="static_groups=True"):
        gptq_quantize(w, h, grid, act_order=True)
    with pytest.raises(ValueError, match="does not match"):
        gptq_quantize(w, h[:10, :10], grid)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(w, -torch.eye(64), grid, percdamp=0.0)


def test_sweep_restores_the_thread_setting():
    w, h = random_problem(8, 64, 4)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gptq_quantize(w, h, make_grid("int4", 64, group_size=32))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
