"""The formats on CUDA tensors give bit-identical codes, scales and values to the CPU.

The CPU path is checked against ml_dtypes and independent references in
tests/formats; here the GPU is checked against the CPU (bit tricks, frexp,
division and rounding must behave the same on both).
"""

import pytest
import torch

import lowbit
from lowbit.formats import FORMATS, fake_quantize

pytestmark = pytest.mark.gpu

OPTIONS = {
    "int8": [{}, {"granularity": "block", "block_shape": (128, 128)}, {"granularity": "token"}],
    "int4": [{}, {"group_size": 32, "zero_point": "integer"}, {"group_size": 64, "symmetric": True}],
    "int3": [{"group_size": 64}],
    "int2": [{"group_size": 64}],
    "fp8_e4m3": [{}, {"granularity": "block", "block_shape": (1, 128)}],
    "fp8_e5m2": [{}],
    "mxfp8_e4m3": [{}, {"scale_rule": "ceil"}],
    "mxfp8_e5m2": [{}],
    "mxfp6_e3m2": [{}],
    "mxfp6_e2m3": [{}],
    "mxfp4": [{}, {"scale_rule": "ceil"}],
    "mxint8": [{}],
    "nvfp4": [{}],
}
CASES = [(f, o) for f in FORMATS for o in OPTIONS[f]]


def spread(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2.0 ** torch.randint(-12, 12, (shape[0], 1), generator=g)
    x[0, :7] = torch.tensor([0.0, -0.0, 1e-40, -1e-38, 3.0e38, 0.25, -0.75])[: min(7, shape[1])]
    return x


def same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(torch.nan_to_num(a.cpu(), 7.0), torch.nan_to_num(b, 7.0))


@pytest.mark.parametrize("fmt,opts", CASES, ids=[f"{f}-{i}" for f, o in CASES for i in [OPTIONS[f].index(o)]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu(fmt, opts, dtype):
    x = spread((300, 727), seed=len(fmt)).to(dtype)
    if dtype != torch.float32:
        x = torch.nan_to_num(x, posinf=1000.0, neginf=-1000.0)
    cpu = lowbit.quantize_tensor(x, fmt, **opts)
    gpu = lowbit.quantize_tensor(x.cuda(), fmt, **opts)
    for name, t in cpu.parts().items():
        assert same(gpu.parts()[name], t), f"{fmt} {opts} {dtype}: {name} differs"
    assert same(gpu.dequantize(), cpu.dequantize())
    assert same(fake_quantize(x.cuda(), fmt, **opts), cpu.dequantize())


@pytest.mark.parametrize("recipe", ["a16w4-int-g128", "a8w8-fp8", "a8w4-mxfp4", "a4w4-nvfp4"])
def test_quant_linear_on_cuda(recipe):
    lin = torch.nn.Linear(576, 300)
    q = lowbit.QuantLinear.from_linear(lin, recipe)
    x = torch.randn(17, 576)
    want = q(x.double()).float()
    qc = q.cuda()
    got = qc(x.cuda()).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert qc(x.cuda().to(torch.bfloat16)).dtype == torch.bfloat16
