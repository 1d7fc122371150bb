"""QuantLinear's input transforms (input_scale, Hadamard rotation) and quantize_ with methods."""

import copy

import pytest
import torch
from torch import nn

from lowbit import quantize_tensor
from lowbit.formats import fake_quantize
from lowbit.nn import QuantLinear, quantize_
from lowbit.quant.rotation import rotation_matrix
from test_surgery import BODY, Tiny, VOCAB  # noqa: E402  (tests/nn is on sys.path)

pytestmark = pytest.mark.usefixtures("one_thread")


def layer(k=96, n=20, recipe_fmt="int4", opts=None, act=None, rot=None, scale=True, seed=0):
    from lowbit.nn import ActivationSpec

    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.1
    s = (0.5 + torch.rand(k)) if scale else None
    wt = w * s if scale else w
    if rot:
        wt = wt @ rotation_matrix(k, rot).float()
    q = quantize_tensor(wt, recipe_fmt, **(opts or {"group_size": 32}))
    bias = torch.randn(n)
    spec = ActivationSpec(*act) if act else None
    return QuantLinear(q, bias, spec, input_scale=s, rotation_block=rot), w, s, q, bias


@pytest.mark.parametrize("rot", [None, 32])
@pytest.mark.parametrize("act", [None, ("int8", {"granularity": "token"})])
def test_forward_applies_scale_then_rotation_then_activation_quantization(rot, act):
    ql, w, s, q, bias = layer(rot=rot, act=act)
    x = torch.randn(7, 96)
    xt = x.double() / s.double()
    if rot:
        xt = xt @ rotation_matrix(96, rot)
    if act:
        xt = fake_quantize(xt.float(), act[0], **act[1]).double()
    want = xt @ q.dequantize().double().T + bias.double()
    got = ql(x).double()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_effective_weight_undoes_the_transforms():
    ql, w, s, q, _ = layer(rot=32, opts={"granularity": "channel"}, recipe_fmt="int8")
    eff = ql.effective_weight()
    want = (q.dequantize().double() @ rotation_matrix(96, 32)) / s.double()
    assert torch.allclose(eff.double(), want, atol=1e-6)
    assert (eff - w).abs().max() < 0.02  # int8: close to the original weight


def test_input_scale_is_a_float32_buffer_that_survives_half_and_state_dict():
    ql, *_ = layer()
    assert "input_scale" in ql.state_dict()
    s = ql.input_scale.clone()
    ql.half()
    assert ql.input_scale.dtype == torch.float32 and torch.equal(ql.input_scale, s)
    y = ql(torch.randn(3, 96).half())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    fresh, *_ = layer(seed=1)
    fresh.load_state_dict(ql.state_dict())
    assert torch.equal(fresh.input_scale, s)
    plain = QuantLinear(quantize_tensor(torch.randn(4, 96), "int8"))
    assert "input_scale" not in plain.state_dict() and plain.rotation_block is None


def test_constructor_checks_the_transforms():
    q = quantize_tensor(torch.randn(4, 96), "int8")
    with pytest.raises(ValueError, match="96 positive values"):
        QuantLinear(q, input_scale=torch.ones(95))
    with pytest.raises(ValueError, match="96 positive values"):
        QuantLinear(q, input_scale=torch.zeros(96))
    with pytest.raises(ValueError, match="power of two"):
        QuantLinear(q, rotation_block=24)
    assert "rotation_block=32" in repr(QuantLinear(q, rotation_block=32))


@pytest.mark.parametrize("recipe", ["a16w4-int-g32-hqq", "a16w4-mxfp4-rot", "a8w8-int8-rot", "a16w8-int8-hqq"])
def test_calibration_free_methods_through_quantize_(recipe):
    model = Tiny().requires_grad_(False)
    ids = torch.randint(0, VOCAB, (2, 9))
    ref = model(ids)
    report = quantize_(model, recipe, progress=False)
    assert len(report.replaced) == len(BODY) and report.calibration == {}
    out = model(ids)
    assert torch.isfinite(out).all()
    rel = float((out - ref).norm() / ref.norm())
    assert rel < (0.05 if "w8" in recipe else 0.5)


@pytest.mark.parametrize("recipe", ["a16w4-int-g32-gptq", "a16w4-int-g32-awq", "a8w8-int8-smooth"])
def test_calibrated_methods_need_calibration_named_in_the_error(recipe):
    model = Tiny()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"calibration=ids"):
        quantize_(model, recipe, progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="calibration data"):
        QuantLinear.from_linear(nn.Linear(64, 8), recipe)


def test_method_options_are_checked():
    with pytest.raises(ValueError, match="unknown method 'gptqq'"):
        quantize_(Tiny(), "a16w4-int-g32", method_options={"gptqq": {}}, progress=False)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['damp'\]"):
        quantize_(Tiny(), "a16w4-int-g32", method_options={"gptq": {"damp": 0.1}}, progress=False)
