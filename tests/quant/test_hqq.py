"""HQQ: the half-quadratic zero-point solver, against a straightforward reference.

The reference below is written from the paper's equations (Badri & Shaji 2023), one
group at a time in float64, with lowbit's documented rules (start at round to
nearest, per-group early stop on the mean |error|, parameters rounded to the stored
dtype each step): no chunking, no working-set compaction, no algebraic shortcuts.
"""

import pytest
import torch

from lowbit import quantize_tensor
from lowbit.quant import make_grid, quantize_hqq
from lowbit.quant.hqq import HQQ_DEFAULTS

pytestmark = pytest.mark.usefixtures("one_thread")


def hqq_reference_group(w, s, z, qmax, p=0.7, beta=10.0, kappa=1.01, iters=20, dtype=torch.float32):
    """One group (1-D float64 w), zero only. -> best zero (float)."""
    def err_of(z):
        q = torch.clamp(torch.round(w / s + z), 0, qmax)
        return q, (w - (q - z) * s)

    best_err, best_z = float("inf"), z
    for it in range(iters + 1):
        q, e = err_of(z)
        err = float(e.abs().mean())
        if err < best_err:
            best_err, best_z = err, z
        else:  # early stop: the first step that does not improve ends the group
            break
        if it == iters:
            break
        we = torch.sign(e) * torch.relu(e.abs() - e.abs().pow(p - 1) / beta)
        z = float(torch.mean(q - (w - we) / s))
        z = float(torch.tensor(z, dtype=torch.float64).to(dtype).double())
        beta *= kappa
    return best_z, best_err


@pytest.mark.parametrize("bits,g", [(4, 64), (3, 32), (2, 16)])
def test_matches_straightforward_reference(bits, g):
    torch.manual_seed(bits)
    w = torch.randn(24, 4 * g) * 0.02
    w[0, 5] = 0.2
    q = quantize_hqq(w, f"int{bits}", group_size=g)
    rtn = quantize_tensor(w, f"int{bits}", group_size=g)
    assert torch.equal(q.scales, rtn.scales)  # zero only: the scale stays round to nearest's
    zs, ref_z, ref_e, our_e = q.zeros.flatten(), [], [], []
    deq = q.dequantize()
    for r in range(w.shape[0]):
        for t in range(w.shape[1] // g):
            wg = w[r, t * g:(t + 1) * g].double()
            s, z0 = float(rtn.scales[r, t]), float(rtn.zeros[r, t])
            bz, be = hqq_reference_group(wg, s, z0, 2**bits - 1)
            ref_z.append(bz)
            ref_e.append(be)
            our_e.append(float((deq[r, t * g:(t + 1) * g].double() - wg).abs().mean()))
    ref_z, ref_e, our_e = map(torch.tensor, (ref_z, ref_e, our_e))
    close = (zs.double() - ref_z).abs() <= 1e-4 * (1 + ref_z.abs())
    assert close.float().mean() >= 0.9, f"{int((~close).sum())} of {len(close)} zeros differ"
    # a zero that differs is a tie: a zero move that changes no code leaves the error equal up to
    # rounding, and float32 vs float64 decides which of the two counts as the improvement
    tie = (our_e - ref_e).abs() <= 1e-6 * ref_e
    assert bool((close | tie).all()), torch.nonzero(~(close | tie))


@pytest.mark.parametrize("fmt,opts", [
    ("int4", {"group_size": 64}),
    ("int4", {"group_size": 32, "optimize_scale": True}),
    ("int3", {"group_size": 64, "scale_dtype": torch.float16}),
    ("int8", {}),  # symmetric per channel: the scale is refitted
    ("int4", {"group_size": 64, "symmetric": True}),
    ("int4", {"group_size": 48}),  # K = 200: a tail of 8
])
def test_never_worse_than_round_to_nearest_per_group(fmt, opts):
    torch.manual_seed(0)
    w = torch.randn(33, 200) * 0.02
    w[:, 3] *= 8  # outlier input channel
    fmt_opts = {k: v for k, v in opts.items() if k != "optimize_scale"}
    h = quantize_hqq(w, fmt, **opts)
    r = quantize_tensor(w, fmt, **fmt_opts)
    grid = make_grid(fmt, 200, **fmt_opts)
    g = grid.tile_k
    e_h = (h.dequantize() - w).abs()
    e_r = (r.dequantize() - w).abs()
    n_t = -(-200 // g)
    for t in range(n_t):
        sl = slice(t * g, min(200, (t + 1) * g))
        assert bool((e_h[:, sl].mean(1) <= e_r[:, sl].mean(1) * (1 + 1e-6)).all()), t
    assert float(e_h.mean()) < float(e_r.mean())  # and it does improve
    # same canonical layout as round to nearest
    assert h.tile == r.tile and h.options == r.options and h.codes.shape == r.codes.shape
    assert h.scales.dtype == r.scales.dtype and h.scales.shape == r.scales.shape
    if r.zeros is not None:
        assert h.zeros.dtype == r.zeros.dtype
    # codes are the format's rounding under the stored parameters: (q - z) s with q = round(w / s + z)
    s = h.scales.float().repeat_interleave(g, 1)[:, :200]
    z = h.zeros.float().repeat_interleave(g, 1)[:, :200] if h.zeros is not None else torch.zeros_like(s)
    lo, hi = (0, 2**grid.bits - 1) if h.zeros is not None else (-(2 ** (grid.bits - 1) - 1), 2 ** (grid.bits - 1) - 1)
    q = torch.clamp(torch.round(w / s + z), lo, hi)
    assert torch.equal(h.dequantize(), (q - z) * s)


def test_chunking_does_not_change_the_result():
    torch.manual_seed(3)
    w = torch.randn(50, 192) * 0.02
    a = quantize_hqq(w, "int4", group_size=64, chunk_elements=192)  # one row at a time
    b = quantize_hqq(w, "int4", group_size=64, chunk_elements=1 << 22)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.zeros, b.zeros)


def test_integer_zero_stays_integer_and_half_inputs_work():
    torch.manual_seed(4)
    w = (torch.randn(16, 128) * 0.02).to(torch.bfloat16)
    q = quantize_hqq(w, "int4", group_size=64, zero_point="integer")
    assert torch.equal(q.zeros, torch.round(q.zeros))
    assert q.dequantize().dtype == torch.float32 and q.shape == w.shape


def test_defaults_are_the_published_ones():
    assert {k: HQQ_DEFAULTS[k] for k in ("p", "beta", "kappa", "iters", "early_stop")} == {
        "p": 0.7, "beta": 10.0, "kappa": 1.01, "iters": 20, "early_stop": True}


def test_errors_name_the_constraint():
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match="integer formats"):
        quantize_hqq(w, "mxfp4")
    with pytest.raises(ValueError, match="2-D"):
        quantize_hqq(torch.randn(64), "int4")
    with pytest.raises(ValueError, match="NaN"):
        quantize_hqq(torch.full((4, 64), float("nan")), "int4")
    with pytest.raises(ValueError, match="p <= 2"):
        quantize_hqq(w, "int4", group_size=32, p=0.0)
