"""a4w4-nvfp4 for GPUs with FP4 tensor cores (``mx.nvfp4_matmul``) under Triton's CPU
interpreter: the activation codes and scales bit for bit lowbit.formats', and the kernel's
product (its interpreter path: codes and E4M3 scales decoded, float32 products) against
the exact product of the NVFP4-quantized x and the weight's values. The ``tl.dot_scaled``
call on E4M3 scales itself runs only on a GPU (the interpreter decodes scales as E8M0)."""

import pytest
import torch

from lowbit import quantize_tensor
from lowbit.formats import fake_quantize
from lowbit.kernels.a8w8 import A8W8Config
from lowbit.kernels.act_quant import quantize_activation_nvfp4
from lowbit.kernels.mx import _nvfp4_weight, nvfp4_matmul, pack_nvfp4

from .conftest import _wide_activations as _x
from .test_a8w8 import EPS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m,k", [(3, 272), (2, 128), (1, 1040)])
def test_activation_codes_scales_and_tensor_scale_are_the_reference(dtype, m, k):
    x = _x(m, k, dtype, seed=k)
    codes, scales, s_t = quantize_activation_nvfp4(x)
    qt = quantize_tensor(x.float(), "nvfp4")
    assert torch.equal(codes[:, : k // 2], qt.codes) and torch.equal(scales[:, : k // 16], qt.scales)
    assert torch.equal(s_t, qt.global_scale.float().reshape(1))
    assert bool((codes[:, k // 2:] == 0).all()) and bool((scales[:, k // 16:] == 0).all())  # the K padding


CONFIGS = {"default": None, "split3": A8W8Config(16, 32, 128, split_k=3), "tiles": A8W8Config(32, 64, 128)}


@pytest.mark.parametrize("m,n,k", [(1, 37, 272), (5, 70, 400), (33, 64, 1024)])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_nvfp4_matmul_equals_the_exact_product(m, n, k, cfg):
    dtype = torch.bfloat16 if (m + n) % 2 else torch.float16
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, k, generator=g) * 0.05
    w[: n // 3] *= 16  # rows of different block scales
    pn = pack_nvfp4(quantize_tensor(w, "nvfp4"))
    x = _x(m, k, dtype, seed=m + k)
    bias = torch.randn(n, generator=g).to(dtype) if k % 3 else None
    y = nvfp4_matmul(x, pn, bias, backend="triton", config=CONFIGS[cfg])
    assert y.shape == (m, n) and y.dtype == dtype
    a = fake_quantize(x.float(), "nvfp4").double()
    wv = _nvfp4_weight(pn).double()
    exact = a @ wv.T + (0 if bias is None else bias.double())
    s = a.abs() @ wv.abs().T + (0 if bias is None else bias.double().abs())
    err = (y.double() - exact).abs()
    assert bool((err <= EPS[dtype] * exact.abs() + 1e-6 * s + 1e-30).all()), float((err / s.clamp(min=1e-30)).max())
    ref = nvfp4_matmul(x, pn, bias, backend="reference")
    assert float((y.float() - ref.float()).abs().max()) <= 2 * EPS[dtype] * float(s.max())


def test_nvfp4_matmul_refuses_what_it_cannot_run():
    pn = pack_nvfp4(quantize_tensor(torch.randn(16, 128), "nvfp4"))
    with pytest.raises(ValueError, match="tiled"):
        nvfp4_matmul(_x(2, 128, torch.bfloat16), pn, backend="triton", config=A8W8Config(16, 64, 128, swap=True))
    with pytest.raises(ValueError, match="nvfp4"):
        pack_nvfp4(quantize_tensor(torch.randn(16, 128), "mxfp4"))


def test_custom_op_and_quantlinear_route(monkeypatch):
    """The custom op (CPU tensors: the interpreter) gives nvfp4_matmul's output; QuantLinear
    takes the NVFP4 kernel only on a CUDA GPU with block-scaled MMA."""
    from lowbit.kernels.ops import nvfp4_linear
    from lowbit.nn import QuantLinear

    g = torch.Generator().manual_seed(9)
    pn = pack_nvfp4(quantize_tensor(torch.randn(48, 256, generator=g), "nvfp4"))
    x = _x(3, 256, torch.bfloat16, seed=4)
    bias = torch.randn(48, generator=g).to(torch.bfloat16)
    assert torch.equal(nvfp4_linear(x, pn, bias), nvfp4_matmul(x, pn, bias, backend="triton"))
    lin = QuantLinear.from_linear(torch.nn.Linear(256, 48), "a4w4-nvfp4")
    assert not lin._nvfp4_native_applies(x)  # CPU
    assert lin.packed_nvfp4().kq == 256
