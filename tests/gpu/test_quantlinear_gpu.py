"""QuantLinear on CUDA runs the GPU kernels (backend "auto") and agrees with its
own reference path; a model quantized with lowbit.quantize_ captures in a CUDA graph."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.nn.linear import QuantLinear

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("compiled_kernels")]


@pytest.mark.parametrize("recipe", ["a16w4-int-g128", "a16w4-mxfp4", "a16w8-int8", "a16w4-int-g32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 5, 200])
def test_quantlinear_kernel_matches_its_reference(recipe, dtype, m):
    torch.manual_seed(0)
    lin = nn.Linear(1024, 768, bias=True, device="cuda")
    q = QuantLinear.from_linear(lin, recipe).to(dtype)
    x = torch.randn(2, m, 1024, device="cuda", dtype=dtype)
    y = q(x)
    assert q._pw_cache is not None, "the kernel path was not taken"
    q.backend = "reference"
    y_ref = q(x)
    s = x.float().abs() @ q.dequantized_weight(torch.float32).abs().t()
    err = float((y.float() - y_ref.float()).abs().max() / s.max())
    assert err <= (2**-7 if dtype == torch.bfloat16 else 2**-9), err


def test_quantized_model_in_a_cuda_graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 2048), nn.SiLU(), nn.Linear(2048, 512)).cuda().bfloat16()
    lowbit.quantize_(model, "a16w4-int-g128", skip=())
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        eager = model(x)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            model(x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = model(x)
        g.replay()
        torch.cuda.synchronize()
    assert torch.equal(out, eager)
