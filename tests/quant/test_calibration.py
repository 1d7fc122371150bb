"""The calibrated pipeline: block-by-block capture, groups, folding, and the methods end to end
on a tiny random model (tests/nn/test_surgery.py's Tiny)."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit.nn import QuantLinear, quantize_
from lowbit.quant import make_grid
from lowbit.quant.calibration import (Target, _fold_candidates, _probe_fold, _scale_output, as_batches,
                                      capture_block_inputs, find_blocks)
from lowbit.quant.gptq import gptq_quantize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nn"))
from test_surgery import BODY, VOCAB, Tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(0))


def outlier_tiny(dtype=torch.float32):
    """Tiny with a few large embedding channels: the activation outliers AWQ and SmoothQuant are for."""
    m = Tiny().requires_grad_(False)
    with torch.no_grad():
        m.embed.weight[:, [3, 17]] *= 25
    return m.to(dtype)


def output_error(model, ref_model, ids=CALIB):
    with torch.no_grad():
        a, b = model(ids).double(), ref_model(ids).double()
    return float((a - b).pow(2).mean())


def test_as_batches():
    assert [tuple(b.shape) for b in as_batches(torch.zeros(10, 8, dtype=torch.long), 4)] == [(4, 8), (4, 8), (2, 8)]
    got = as_batches([torch.zeros(5, dtype=torch.long), torch.zeros(1, 7, dtype=torch.long)], 4)
    assert [tuple(b.shape) for b in got] == [(1, 5), (1, 7)]
    for bad, why in [(torch.zeros(2, 3), "dtype torch.float32"), ([], "empty"), ("text", "got str"),
                     (torch.zeros(2, 2, 2, dtype=torch.long), "shape"), ([torch.zeros(0, dtype=torch.long)], "shape")]:
        with pytest.raises(ValueError, match=why):
            as_batches(bad)


def test_find_blocks_and_capture():
    m = Tiny()
    ids = {id(mod) for mod in m.modules() if isinstance(mod, nn.Linear)}
    name, blocks = find_blocks(m, ids)
    assert name == "layers" and blocks is m.layers
    got = capture_block_inputs(m, m.layers[0], as_batches(CALIB, 4))
    assert len(got) == 2 and torch.equal(torch.cat([g.hidden for g in got]), m.embed(CALIB).detach())


def test_fold_probe_finds_what_can_absorb_a_scale():
    m = Tiny().double()
    blk = m.layers[0]
    probe = capture_block_inputs(m, blk, [CALIB[:1]])[0]
    names = {id(mod): n for n, mod in blk.named_modules()}
    order = {}
    def done(name):
        def hook(mod, args, out):
            order.setdefault(name, len(order) + 1)
        return hook

    def start(name):
        def hook(mod, args):
            starts.setdefault(name, len(order))
        return hook

    handles = [mod.register_forward_hook(done(n)) for n, mod in blk.named_modules() if n]
    starts = {}
    mods = dict(blk.named_modules())
    handles += [mods[n].register_forward_pre_hook(start(n)) for n in ("o_proj", "mlp.0", "mlp.2")]
    with torch.no_grad():
        probe.run(blk)
    for h in handles:
        h.remove()

    def target(name):
        mod = dict(blk.named_modules())[name]
        return [Target(name, mod, None)]

    def fold(name, k):
        cands = _fold_candidates(blk, target(name), k, order, starts[name])
        return _probe_fold(blk, names, target(name), cands, probe, k)

    assert fold("mlp.0", 64) == "norm"  # LayerNorm feeding only mlp.0
    assert fold("o_proj", 32) == "v_proj"  # attention is linear in v, channel by channel
    assert fold("mlp.2", 100) is None  # GELU in between
    # the fold itself: predecessor / s, consumer columns * s, same block output (float64)
    with torch.no_grad():
        ref = probe.run(blk).clone()
        s = 0.3 + torch.rand(64, dtype=torch.float64)
        _scale_output(blk.norm, 1 / s)
        blk.mlp[0].weight.mul_(s[None, :])
        assert torch.allclose(probe.run(blk), ref, rtol=0, atol=1e-12)


def _hessian(xs):
    h, rows = None, 0
    for x in xs:
        x = x.reshape(-1, x.shape[-1]).float()
        h = x.T @ x if h is None else h.add_(x.T @ x)
        rows += x.shape[0]
    return h / rows


def test_gptq_end_to_end_uses_each_block_inputs_after_the_quantized_blocks_before():
    m = Tiny().requires_grad_(False)
    orig = copy.deepcopy(m)
    report = quantize_(m, "a16w4-int-g32-gptq", calibration=CALIB, progress=False)
    assert len(report.replaced) == len(BODY) and report.calibration["tokens"] == CALIB.numel()
    assert report.calibration["blocks"] == 2
    batches = as_batches(CALIB, 4)
    grid = make_grid("int4", 64, group_size=32)
    # block 0: q_proj sees the embeddings
    h0 = _hessian([orig.embed(b) for b in batches])
    want = gptq_quantize(orig.layers[0].q_proj.weight, h0, grid)
    assert torch.equal(m.layers[0].q_proj.weight_codes, want.codes)
    assert torch.equal(m.layers[0].q_proj.weight_zeros, want.zeros)
    # block 1: its inputs are the outputs of the quantized block 0
    h1 = _hessian([m.layers[0](m.embed(b)) for b in batches])
    want = gptq_quantize(orig.layers[1].k_proj.weight, h1, grid)
    assert torch.equal(m.layers[1].k_proj.weight_codes, want.codes)
    rtn = copy.deepcopy(orig)
    quantize_(rtn, "a16w4-int-g32", progress=False)
    assert output_error(m, orig) < output_error(rtn, orig)


@pytest.mark.parametrize("recipe,base", [("a16w4-int-g32-awq", "a16w4-int-g32"), ("a16w3-int-g32-awq", "a16w3-int-g32"),
                                         ("a8w8-int8-smooth", "a8w8-int8"), ("a16w4-mxfp4-awq", "a16w4-mxfp4")])
def test_scaling_methods_beat_round_to_nearest_on_outlier_channels(recipe, base):
    m, ref, rtn = outlier_tiny(), outlier_tiny(), outlier_tiny()
    report = quantize_(m, recipe, calibration=CALIB, progress=False)
    quantize_(rtn, base, progress=False)
    assert output_error(m, ref) < output_error(rtn, ref)
    kind = recipe.split("-")[-1]
    notes = [r.note for r in report.replaced]
    folded = [n for n in notes if "folded into" in n]
    assert folded and all(n.startswith(f"{kind} scale") for n in folded)
    # folded layers: the predecessor holds 1/s, the layer keeps no input_scale
    for name, mod in m.named_modules():
        if isinstance(mod, QuantLinear) and mod.folded_input_scale is not None:
            assert mod.input_scale is None
    assert any(isinstance(mod, QuantLinear) and mod.folded_input_scale is not None for mod in m.modules())


def test_awq_folds_into_the_norm_exactly():
    m, ref = outlier_tiny(), outlier_tiny()
    quantize_(m, "a16w4-int-g32-awq", calibration=CALIB, progress=False)
    for i in range(2):
        s = m.layers[i].mlp[0].folded_input_scale
        assert s is not None  # mlp.0 reads the block's LayerNorm
        assert torch.allclose(m.layers[i].norm.weight * s, ref.layers[i].norm.weight, rtol=1e-6)
        assert torch.allclose(m.layers[i].norm.bias * s, ref.layers[i].norm.bias, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("recipe", ["a16w4-mxfp4-rot-gptq", "a16w4-nvfp4-gptq", "a8w4-mxfp4-rot-gptq",
                                    "a16w4-int-g32-awq-gptq", "a16w4-int-g32-awq-hqq", "a8w8-fp8-smooth-gptq"])
def test_combinations_run_and_beat_round_to_nearest(recipe):
    m, ref, rtn = outlier_tiny(), outlier_tiny(), outlier_tiny()
    quantize_(m, recipe, calibration=CALIB, progress=False)
    base = "-".join(t for t in recipe.split("-") if t not in ("rot", "gptq", "awq", "hqq", "smooth"))
    quantize_(rtn, base, progress=False)
    assert output_error(m, ref) < output_error(rtn, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("recipe", ["a16w4-int-g32-gptq", "a16w4-int-g32-awq", "a8w8-int8-smooth"])
def test_half_precision_models(dtype, recipe):
    m32, m = outlier_tiny(), outlier_tiny(dtype)
    quantize_(m32, recipe, calibration=CALIB, progress=False)
    quantize_(m, recipe, calibration=CALIB, progress=False)
    with torch.no_grad():
        a, b = m(CALIB), m32(CALIB)
    assert a.dtype == dtype and torch.isfinite(a).all()
    assert float((a.float() - b).norm() / b.norm()) < 0.1
    assert all(mod.weight_scales.dtype == torch.float32 for mod in m.modules() if isinstance(mod, QuantLinear))


class WithHead(nn.Module):
    """Tiny plus a linear outside the block list, and an unused linear inside a block."""

    def __init__(self):
        super().__init__()
        self.body = Tiny()
        self.body.layers[0].unused = nn.Linear(64, 8)
        self.head = nn.Linear(50, 12)

    def forward(self, ids):
        return self.head(self.body(ids))


def test_layers_outside_the_blocks_and_layers_that_never_run():
    m = WithHead().requires_grad_(False)
    report = quantize_(m, "a16w4-int-g32-gptq", calibration=list(CALIB), progress=False)
    names = {r.name: r for r in report.replaced}
    assert isinstance(m.head, QuantLinear) and "head" in names
    assert "did not run on the calibration data" in names["body.layers.0.unused"].note
    assert report.calibration["sequences"] == CALIB.shape[0]


def test_sample_is_bounded():
    from lowbit.quant.calibration import InputStats

    st = InputStats(k=4, hessian=False, sample_stride=3, max_rows=10)
    for _ in range(5):
        st.add(torch.randn(2, 8, 4))
    assert st.x_sample.shape == (10, 4) and st.rows == 80


def test_effective_weight_is_close_to_the_original_after_folds():
    """Folds change neighbouring weights (a norm, v_proj's rows); effective_weight undoes every
    transform, so it must be about as close to the original weight as round to nearest's."""
    m, ref, rtn = outlier_tiny(), outlier_tiny(), outlier_tiny()
    quantize_(m, "a16w8-int8-awq", calibration=CALIB, progress=False)
    quantize_(rtn, "a16w8-int8", progress=False)
    orig = dict(ref.named_modules())
    r = dict(rtn.named_modules())
    assert any(mod.folded_output_scale is not None for mod in m.modules() if isinstance(mod, QuantLinear))
    for name, mod in m.named_modules():
        if isinstance(mod, QuantLinear):
            w = orig[name].weight
            e_awq = float((mod.effective_weight() - w).norm() / w.norm())
            e_rtn = float((r[name].effective_weight() - w).norm() / w.norm())
            assert e_awq < 4 * e_rtn + 1e-3, name


def test_four_bit_activations_with_rotation_and_gptq_run():
    """a4w4: GPTQ's Hessian is that of the unquantized (rotated) inputs, as in the published
    method; on this toy model with 25x outliers it need not beat round to nearest, but it runs."""
    m = outlier_tiny()
    quantize_(m, "a4w4-nvfp4-rot-gptq", calibration=CALIB, progress=False)
    layers = [mod for mod in m.modules() if isinstance(mod, QuantLinear)]
    assert len(layers) == len(BODY) and all(mod.rotation_block == 32 for mod in layers)
    with torch.no_grad():
        assert torch.isfinite(m(CALIB)).all()


def test_no_fold_across_a_nonlinearity_even_behind_a_large_residual():
    """Tiny's mlp.0 -> GELU -> mlp.2 sits beside a residual stream with 25x outliers: a fold of
    mlp.2's scale into mlp.0 changes the block's output by little overall, but it is wrong."""
    report = quantize_(outlier_tiny(), "a8w8-int8-smooth", calibration=CALIB, progress=False)
    notes = {r.name: r.note for r in report.replaced}
    for i in range(2):
        assert "kept as input_scale" in notes[f"layers.{i}.mlp.2"]
        assert notes[f"layers.{i}.mlp.0"].endswith("folded into norm")
        assert notes[f"layers.{i}.o_proj"].endswith("folded into v_proj")


def _tiny_llama(kv_heads):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval().requires_grad_(False)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_folds_in_a_real_llama_block(kv_heads):
    """transformers' Llama (kwargs: masks, rotary embeddings): AWQ scales go into the RMSNorms
    and up_proj's rows; o_proj's into v_proj only without grouped-query attention."""
    m, ref = _tiny_llama(kv_heads), _tiny_llama(kv_heads)
    with torch.no_grad():
        logits_ref = ref(CALIB).logits
    report = quantize_(m, "a16w8-int8-awq", calibration=CALIB, progress=False)
    notes = {r.name.replace("model.layers.0.", ""): r.note for r in report.replaced if ".layers.0." in r.name}
    for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        assert notes[n].endswith("folded into input_layernorm"), notes[n]
    for n in ("mlp.gate_proj", "mlp.up_proj"):
        assert notes[n].endswith("folded into post_attention_layernorm"), notes[n]
    assert notes["mlp.down_proj"].endswith("folded into mlp.up_proj"), notes["mlp.down_proj"]
    o = notes["self_attn.o_proj"]
    assert o.endswith("folded into self_attn.v_proj") if kv_heads == 4 else "kept as input_scale" in o, o
    with torch.no_grad():
        logits = m(CALIB).logits
    # int8 weights: the folded model computes nearly what the original does
    assert float((logits - logits_ref).norm() / logits_ref.norm()) < 0.02
