"""QuantLinear against an independent float64 reference.

Reference for y = QuantLinear(x):
    w   = quantize_tensor(W, wfmt, **wopts).dequantize()           (the documented weight format)
    xa  = x, or quantize_tensor(x.reshape(-1, K), afmt, **aopts).dequantize()  (activations, by hand)
    ref = xa.double() @ w.double().T + b.double()

Tolerances are relative to bound = |xa| @ |w|^T + |b| (the sum the rounding
errors scale with), per activation dtype:
    float32   1e-5  (fp32 accumulation; K <= 576 gives ~1e-6 in practice)
    float16   2^-8  (weight, activation and output each rounded once to fp16: 3 * 2^-11, plus accumulation)
    bfloat16  2^-6  (the same with 2^-9 roundings)
A second check, in float32, shows the tolerance is tight enough to tell the
quantized layer from the float layer and to see the activation quantization.
"""

import pytest
import torch
from torch import nn

from lowbit import QTensor, quantize_tensor
from lowbit.nn import QuantLinear, parse_recipe
from lowbit.nn.recipes import ActivationSpec

from recipe_table import DOCUMENTED as RECIPES  # noqa: E402  (tests/nn is on sys.path)
ACT_QUANT = [r for r, v in RECIPES.items() if v[2] is not None]
FLOAT_SCALED = [r for r, v in RECIPES.items() if v[0].startswith(("int", "fp8", "nvfp4"))]



pytestmark = pytest.mark.usefixtures("one_thread")


RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-8, torch.bfloat16: 2.0**-6}
OUT = 37


def make_linear(k, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    lin = nn.Linear(k, OUT, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(1 + torch.rand(OUT, 1) * 3)  # rows of different ranges
        if bias:
            lin.bias.mul_(2)
    return lin.to(dtype)


def ref_weight(lin, recipe):
    wfmt, wopts, _, _ = RECIPES[recipe]
    return quantize_tensor(lin.weight.detach(), wfmt, **wopts)


def ref_act(x, recipe):
    _, _, afmt, aopts = RECIPES[recipe]
    if afmt is None:
        return x.float()
    k = x.shape[-1]
    return quantize_tensor(x.reshape(-1, k), afmt, **aopts).dequantize().reshape(x.shape)


def reference(x, w, b, recipe):
    xa = ref_act(x, recipe).double()
    wd = w.double()
    ref = xa @ wd.T
    bound = xa.abs() @ wd.abs().T
    if b is not None:
        ref = ref + b.double()
        bound = bound + b.double().abs()
    return ref, bound


def assert_within(y, ref, bound, rtol, tag):
    err = (y.double() - ref).abs()
    lim = rtol * bound + 1e-30
    bad = err > lim
    if bool(bad.any()):
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise AssertionError(
            f"{tag}: {int(bad.sum())} of {bad.numel()} outputs outside rtol={rtol:g}; first at {idx}: "
            f"got {y[idx].item()!r}, ref {ref[idx].item()!r}, err {err[idx].item():.3g}, allowed {lim[idx].item():.3g}"
        )


INPUT_SHAPES = [(1,), (5,), (0,), (1, 1), (2, 3), (2, 0)]  # leading dims; K appended


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("k", [70, 576])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_forward_matches_float64_reference(recipe, k, bias):
    lin = make_linear(k, bias)
    q = QuantLinear.from_linear(lin, recipe)
    qt = ref_weight(lin, recipe)
    w = qt.dequantize()
    assert torch.equal(q.qweight.dequantize(), w), "layer weight differs from quantize_tensor of the same weight"
    b = None if lin.bias is None else lin.bias.detach()
    torch.manual_seed(k)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for lead in INPUT_SHAPES:
            x = (torch.randn(*lead, k) * 2).to(dtype)
            y = q(x)
            tag = f"{recipe} K={k} bias={bias} {dtype} x{tuple(x.shape)}"
            assert y.dtype == dtype, tag
            assert y.shape == (*lead, OUT), tag
            ref, bound = reference(x, w, b, recipe)
            assert_within(y, ref, bound, RTOL[dtype], tag)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_reference_check_can_fail(recipe):
    """The fp32 tolerance tells the quantized layer from the float layer, and
    weight-only from weight+activation quantization."""
    lin = make_linear(576)
    q = QuantLinear.from_linear(lin, recipe)
    torch.manual_seed(1)
    x = torch.randn(8, 576)
    y = q(x).double()
    ref, bound = reference(x, ref_weight(lin, recipe).dequantize(), lin.bias.detach(), recipe)
    float_y = lin(x).double()
    assert bool(((float_y - ref).abs() > RTOL[torch.float32] * bound).any()), "float output passes as quantized"
    if recipe in ACT_QUANT:
        w = ref_weight(lin, recipe).dequantize().double()
        weight_only = x.double() @ w.T + lin.bias.double()
        assert bool(((weight_only - ref).abs() > RTOL[torch.float32] * bound).any())
        assert bool(((weight_only - y).abs() > RTOL[torch.float32] * bound).any()), "activations not quantized"


@pytest.mark.parametrize("recipe", ACT_QUANT)
def test_activation_fake_quant_matches_quantize_tensor(recipe):
    lin = make_linear(70)
    q = QuantLinear.from_linear(lin, recipe)
    torch.manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(2, 3, 70).to(dtype)
        got = q.quantize_activation(x)
        assert got.dtype == dtype and got.shape == x.shape
        # per token: the same as quantizing each token alone (except nvfp4, one global scale per tensor)
        want = ref_act(x, recipe).to(dtype)
        assert torch.equal(got, want), f"{recipe} {dtype}"


def test_weight_only_recipes_leave_activations_alone():
    q = QuantLinear.from_linear(make_linear(70), "a16w4-int-g32")
    x = torch.randn(3, 70)
    assert q.quantize_activation(x) is x
    assert q.activation == ActivationSpec()


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_state_dict_holds_the_canonical_parts(recipe):
    wfmt = RECIPES[recipe][0]
    lin = make_linear(70)
    q = QuantLinear.from_linear(lin, recipe)
    qt = ref_weight(lin, recipe)
    sd = q.state_dict()
    expected = {"weight_codes", "weight_scales", "bias"}
    if wfmt in ("int4", "int3", "int2"):
        expected.add("weight_zeros")
    if wfmt == "nvfp4":
        expected.add("weight_global_scale")
    assert set(sd) == expected
    # buffers: codes are integers in the canonical dtype
    want_codes_dtype = torch.int8 if wfmt == "int8" else torch.uint8
    assert sd["weight_codes"].dtype == want_codes_dtype
    if wfmt.startswith(("mx", "nvfp4")):
        assert sd["weight_scales"].dtype == torch.uint8
    # codes row length: ceil(K / e) * b bytes
    bits = {"int8": 8, "fp8_e4m3": 8, "int4": 4, "int3": 3, "int2": 2, "mxfp8_e4m3": 8, "mxfp6_e2m3": 6,
            "mxfp4": 4, "nvfp4": 4}[wfmt]
    e, nb = {8: (1, 1), 4: (2, 1), 2: (4, 1), 6: (4, 3), 3: (8, 3)}[bits]
    assert tuple(sd["weight_codes"].shape) == (OUT, -(-70 // e) * nb)
    parts = {k[len("weight_"):]: v for k, v in sd.items() if k.startswith("weight_")}
    rebuilt = QTensor(fmt=q.fmt, shape=torch.Size((OUT, 70)), axis=1, tile=q.tile, options=q.weight_options, **parts)
    for name, t in qt.parts().items():
        assert parts[name].dtype == t.dtype and torch.equal(parts[name], t), name
    assert torch.equal(rebuilt.dequantize(), qt.dequantize())
    assert q.tile == qt.tile and q.weight_options == qt.options
    assert torch.equal(sd["bias"], lin.bias.detach())


def test_from_linear_takes_a_recipe_object_and_weight_options():
    lin = make_linear(70)
    a = QuantLinear.from_linear(lin, parse_recipe("a16w4-int-g32"))
    b = QuantLinear.from_linear(lin, "a16w4-int-g32")
    assert a.recipe == b.recipe == "a16w4-int-g32"
    assert torch.equal(a.weight_codes, b.weight_codes) and torch.equal(a.weight_scales, b.weight_scales)
    c = QuantLinear.from_linear(lin, "a16w4-int-g32", weight_options={"zero_point": "integer"})
    assert c.weight_options["zero_point"] == "integer"
    assert torch.equal(c.weight_zeros, c.weight_zeros.round())
    want = quantize_tensor(lin.weight.detach(), "int4", group_size=32, zero_point="integer")
    assert torch.equal(c.qweight.dequantize(), want.dequantize())
    with pytest.raises(ValueError, match="scale_rule"):
        QuantLinear.from_linear(lin, "a16w4-int-g32", weight_options={"scale_rule": "ceil"})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_from_half_precision_linear(dtype):
    lin = make_linear(70, dtype=dtype)
    q = QuantLinear.from_linear(lin, "a16w4-mxfp4")
    assert torch.equal(q.qweight.dequantize(), quantize_tensor(lin.weight.detach(), "mxfp4").dequantize())
    assert q.bias.dtype == dtype
    x = torch.randn(4, 70).to(dtype)
    y = q(x)
    ref, bound = reference(x, q.qweight.dequantize(), lin.bias.detach(), "a16w4-mxfp4")
    assert y.dtype == dtype
    assert_within(y, ref, bound, RTOL[dtype], f"{dtype} linear")


def test_bias_is_a_frozen_copy():
    lin = make_linear(70)
    q = QuantLinear.from_linear(lin, "a16w8-int8")
    assert isinstance(q.bias, nn.Parameter) and not q.bias.requires_grad
    with torch.no_grad():
        lin.bias.add_(1.0)
    assert not torch.equal(q.bias, lin.bias)


@pytest.mark.parametrize("recipe", ["a16w4-int-g32", "a8w8-fp8"])
def test_wrong_input_features(recipe):
    q = QuantLinear.from_linear(make_linear(70), recipe)
    with pytest.raises(ValueError, match="69 features.*takes 70"):
        q(torch.randn(2, 69))
    with pytest.raises(ValueError, match="takes 70"):
        q(torch.randn(70, 2))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_unsupported_input_dtype(dtype):
    q = QuantLinear.from_linear(make_linear(70), "a16w4-int-g32")
    x = torch.ones(2, 70).to(dtype)
    with pytest.raises(TypeError, match=str(dtype).replace("torch.", "torch\\.")):
        q(x)


def test_constructor_checks():
    lin = make_linear(70)
    qt = quantize_tensor(lin.weight.detach(), "int8")
    with pytest.raises(ValueError, match="backend"):
        QuantLinear(qt, backend="triton")
    with pytest.raises(ValueError, match="bias shape"):
        QuantLinear(qt, torch.zeros(OUT + 1))
    with pytest.raises(ValueError, match="2-D weight"):
        QuantLinear(quantize_tensor(torch.randn(2, 3, 64), "int8"))
    with pytest.raises(ValueError, match="2-D weight"):
        QuantLinear(quantize_tensor(lin.weight.detach(), "int8", axis=0))
    q = QuantLinear(qt, None, backend="reference")
    assert q.bias is None and (q.out_features, q.in_features) == (OUT, 70)
    r = repr(q)
    assert "in_features=70" in r and "out_features=37" in r and "weight=int8" in r and "bias=False" in r


# ---- dtype casts of the module ---------------------------------------------------------------------


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_to_float64_keeps_codes_and_weights(recipe):
    lin = make_linear(70)
    q = QuantLinear.from_linear(lin, recipe)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    w0 = q.qweight.dequantize()
    q = q.to(torch.float64)
    sd = q.state_dict()
    assert sd["weight_codes"].dtype == before["weight_codes"].dtype
    assert torch.equal(sd["weight_codes"], before["weight_codes"])
    for k, v in before.items():
        if not v.is_floating_point():
            assert sd[k].dtype == v.dtype, k  # uint8 scales (MX, NVFP4) stay uint8
        assert torch.equal(sd[k].double(), v.double()), k
    assert torch.equal(q.qweight.dequantize().float(), w0)
    # float32 activations still run, with the same weights
    x = torch.randn(3, 70)
    ref, bound = reference(x, w0, lin.bias.detach(), recipe)
    assert_within(q(x), ref, bound, RTOL[torch.float32], f"{recipe} after .to(float64)")


def _half_cast_params():
    out = []
    for r in RECIPES:
        for dt in (torch.bfloat16, torch.float16):
            out.append(pytest.param(r, dt, id=f"{r}-{str(dt)[6:]}"))
    return out


@pytest.mark.parametrize("recipe,dtype", _half_cast_params())
def test_to_half_keeps_quantized_weight(recipe, dtype):
    """model.to(torch.bfloat16) is how users run a model in bf16; the quantized
    weight (codes + scales) must survive it unchanged."""
    lin = make_linear(70)
    q = QuantLinear.from_linear(lin, recipe)
    w0 = q.qweight.dequantize()
    codes = q.weight_codes.clone()
    q = q.to(dtype)
    assert q.weight_codes.dtype == codes.dtype and torch.equal(q.weight_codes, codes)
    assert torch.equal(q.qweight.dequantize().float(), w0)


# ---- the dequantized-weight cache ---------------------------------------------------------------------


def test_cache_follows_input_dtype():
    lin = make_linear(70)
    q = QuantLinear.from_linear(lin, "a16w4-int-g32")
    x = torch.randn(3, 70)
    y32 = q(x)
    yb = q(x.bfloat16())
    y16 = q(x.half())
    assert y32.dtype == torch.float32 and yb.dtype == torch.bfloat16 and y16.dtype == torch.float16
    assert torch.equal(q(x), y32)
    w = q.qweight.dequantize()
    assert torch.equal(q.dequantized_weight(torch.bfloat16), w.bfloat16())
    assert torch.equal(q.dequantized_weight(torch.float32), w)


def test_cache_not_stale_after_load_state_dict():
    a = QuantLinear.from_linear(make_linear(70, seed=0), "a16w4-int-g32")
    b = QuantLinear.from_linear(make_linear(70, seed=1), "a16w4-int-g32")
    x = torch.randn(4, 70)
    ya, yb = a(x), b(x)
    assert not torch.equal(ya, yb)
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(x), yb)
    assert torch.equal(a.dequantized_weight(torch.float32), b.qweight.dequantize())


def test_cache_not_stale_after_partial_load_of_scales():
    a = QuantLinear.from_linear(make_linear(70), "a16w4-int-g32")
    x = torch.randn(4, 70)
    y0 = a(x)
    a.load_state_dict({"weight_scales": a.weight_scales * 2}, strict=False)
    assert not torch.equal(a(x), y0)
    assert torch.equal(a.dequantized_weight(torch.float32), a.qweight.dequantize())


def test_cache_not_stale_after_in_place_scale_update():
    a = QuantLinear.from_linear(make_linear(70), "a16w8-int8")
    x = torch.randn(4, 70)
    a(x)
    with torch.no_grad():
        a.weight_scales.mul_(0.5)
    assert torch.equal(a.dequantized_weight(torch.float32), a.qweight.dequantize())


def test_cache_not_stale_after_assign_load():
    a = QuantLinear.from_linear(make_linear(70, seed=0), "a16w4-int-g32")
    b = QuantLinear.from_linear(make_linear(70, seed=1), "a16w4-int-g32")
    x = torch.randn(4, 70)
    a(x)
    a.load_state_dict(b.state_dict(), assign=True)
    assert torch.equal(a(x), b(x))


# ---- inference mode -------------------------------------------------------------------------------


def test_forward_under_inference_mode():
    q = QuantLinear.from_linear(make_linear(70), "a8w8-int8")
    x = torch.randn(3, 70)
    y = q(x)
    with torch.inference_mode():
        assert torch.equal(q(x), y)


def test_layer_built_under_inference_mode_runs():
    lin = make_linear(70)
    with torch.inference_mode():
        q = QuantLinear.from_linear(lin, "a16w4-int-g32")
        y = q(torch.randn(3, 70))
    assert y.shape == (3, OUT)
