"""lowbit.quant.grid: the explicit-parameter path must be the formats' own rounding.

Grid.quantize (fit -> round -> assemble) is compared bit for bit with
lowbit.quantize_tensor, which tests/formats checks against independent oracles.
"""

import pytest
import torch

from lowbit import quantize_tensor
from lowbit.quant import make_grid

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [
    ("int4", {"group_size": 64}),
    ("int4", {"group_size": 32, "zero_point": "integer"}),
    ("int4", {"group_size": 64, "symmetric": True}),
    ("int3", {"group_size": 48}),  # K = 100: a tail of 4
    ("int2", {"group_size": 128}),  # one group wider than K
    ("int8", {}),
    ("int8", {"symmetric": False, "granularity": "channel"}),
    ("int4", {"group_size": 32, "scale_dtype": torch.float16}),
    ("int4", {"group_size": 32, "scale_dtype": torch.bfloat16}),
    ("fp8_e4m3", {}),
    ("fp8_e5m2", {"group_size": 32}),
    ("mxfp4", {}),
    ("mxfp4", {"scale_rule": "ceil"}),
    ("mxfp6_e2m3", {}),
    ("mxint8", {}),
    ("nvfp4", {}),
]


def same_qtensor(a, b):
    assert a.fmt == b.fmt and a.shape == b.shape and a.axis == b.axis and a.tile == b.tile
    assert a.options == b.options
    pa, pb = a.parts(), b.parts()
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and torch.equal(pa[k], pb[k]), k


@pytest.mark.parametrize("fmt,opts", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grid_quantize_is_quantize_tensor(fmt, opts, dtype):
    torch.manual_seed(0)
    w = (torch.randn(19, 100) * torch.rand(19, 1) * 0.1).to(dtype)
    w[3, 7] = 0.5  # an outlier
    w[5] = 0.0  # an all-zero row
    grid = make_grid(fmt, 100, **opts)
    same_qtensor(grid.quantize(w), quantize_tensor(w, fmt, **opts))


@pytest.mark.parametrize("fmt,opts", CASES)
def test_per_column_rounding_matches_tile_rounding(fmt, opts):
    torch.manual_seed(1)
    w = torch.randn(7, 100) * 0.05
    grid = make_grid(fmt, 100, **opts).set_tensor(w)
    params = grid.fit(w)
    values = grid.round(w, params)
    deq = grid.dequantize(values, params)
    g = grid.tile_k
    for j in (0, 1, 31, 63, 99):
        p = {k: v[:, j // g: j // g + 1] for k, v in params.items()}
        v = grid.round(w[:, j:j + 1], p, per_column=True)
        assert torch.equal(v[:, 0], values[:, j])
        assert torch.equal(grid.dequantize(v, p, per_column=True)[:, 0], deq[:, j])
    assert torch.equal(grid.assemble(values, params).dequantize(), deq)


def test_make_grid_rejects_block_granularity_and_bad_options():
    with pytest.raises(ValueError, match="granularity"):
        make_grid("int8", 64, granularity="block")
    with pytest.raises(ValueError, match="does not take"):
        make_grid("mxfp4", 64, group_size=32)
    with pytest.raises(ValueError, match="zero_point"):
        make_grid("int4", 64, zero_point="nearest")


@pytest.mark.parametrize("fmt,opts", CASES)
def test_fit_search_never_increases_a_tiles_squared_error(fmt, opts):
    torch.manual_seed(2)
    w = torch.randn(9, 100) * 0.05
    w[:, 7] *= 10
    grid = make_grid(fmt, 100, **opts).set_tensor(w)
    p0, p1 = grid.fit(w), grid.fit_search(w)
    e0, e1 = grid._tile_error(w, p0), grid._tile_error(w, p1)
    assert bool((e1 <= e0).all())
    if fmt in ("int3", "int2", "nvfp4"):
        assert float(e1.sum()) < float(e0.sum())  # coarse grids gain from clipping
