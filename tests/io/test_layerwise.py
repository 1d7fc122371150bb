"""lowbit quantize with calibrated recipes (-gptq, -awq, -smooth; -rot), block by block from disk.

Reference: the in-memory path, ``lowbit.quantize_(model, recipe, calibration=ids)`` on the
model transformers loads from the same directory with the same ids: the streamed checkpoint,
read back with ``lowbit.load``, must hold the same tensors bit for bit (quantized weights,
input scales, and the norms that absorbed AWQ/SmoothQuant scales) and give the same logits.
An interrupted run, resumed, must write the same bytes as an uninterrupted one.
"""

import json

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.io import layerwise, streaming
from lowbit.io.streaming import QuantizeError, quantize_checkpoint
from lowbit.nn import QuantLinear, quantize_

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(1))  # 2 batches of 4 + 2
WORDS = "the a of to and in is it that for on with as was by at be this from or".split()


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny Llama (3 blocks, hidden 64, 4 query / 2 key-value heads) in bf16, several shards,
    with a word-level tokenizer (for the default calibration ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        m.model.embed_tokens.weight[:, [3, 17]] *= 20  # activation outliers: what AWQ/SmoothQuant scale
    d = tmp_path_factory.mktemp("src")
    m.to(torch.bfloat16).save_pretrained(d, max_shard_size="100KB")
    assert len(list(d.glob("*.safetensors"))) > 2
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(d)
    return d


def in_memory(src, recipe, ids=IDS, **kw):
    m = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    quantize_(m, recipe, calibration=ids, progress=False, **kw)
    return m


def loaded(src, out):
    m = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    lowbit.load(out, m)  # checks every tensor's shape and the SHA-256
    return m


def assert_same_model(ref, got):
    a, b = ref.state_dict(), got.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, got(ids).logits)


@pytest.mark.parametrize("recipe", ["a16w4-int-g32-gptq", "a16w4-int-g32-awq", "a8w8-int8-smooth",
                                    "a16w4-mxfp4-rot", "a16w4-mxfp4-rot-gptq"])
def test_streamed_calibration_equals_in_memory(src, tmp_path, recipe):
    res = quantize_checkpoint(src, tmp_path / "q", recipe, calibration=IDS, progress=False)
    assert res.quantized == 21 and res.kept == ["lm_head"]
    ref = in_memory(src, recipe)
    got = loaded(src, tmp_path / "q")
    assert_same_model(ref, got)
    assert not (tmp_path / "q" / streaming.PARTIAL).exists()
    source = dict(transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).state_dict())
    norms = [k for k in source if k.endswith("layernorm.weight")]
    kept = [n for n, m in got.named_modules() if isinstance(m, QuantLinear) and m.input_scale is not None]
    if "awq" in recipe or "smooth" in recipe:
        # the norms took the scales of q/k/v and gate/up (written from the folded values, not
        # copied from the source); o_proj, whose input (GQA: 4 heads read 2 values) no layer
        # of the block can scale, keeps its scale as input_scale
        assert all(not torch.equal(got.state_dict()[k], source[k]) for k in norms)
        assert kept == [f"model.layers.{i}.self_attn.o_proj" for i in range(3)]
        assert "6 full-precision tensor(s) absorbed" in str(res) and "3 layer(s) keep an input_scale" in str(res)
    else:
        assert all(torch.equal(got.state_dict()[k], source[k]) for k in norms) and not kept
    if "rot" in recipe:
        assert {m.rotation_block for m in got.modules() if isinstance(m, QuantLinear)} == {32}


def test_interrupted_calibrated_run_resumes_bit_identically(src, tmp_path, monkeypatch):
    recipe = "a16w4-int-g32-gptq"
    full = tmp_path / "full"
    quantize_checkpoint(src, full, recipe, calibration=IDS, progress=False)

    class Killed(Exception):
        pass

    def kill_after_two(unit):
        if unit == "model.layers.1":
            raise Killed

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        quantize_checkpoint(src, out, recipe, calibration=IDS, progress=False, on_unit=kill_after_two)
    partial = out / streaming.PARTIAL
    state = json.loads((partial / streaming.PROGRESS).read_text())
    assert list(state["done"]) == ["model.layers.0", "model.layers.1"]
    # the inputs of block 2 are kept (every batch's hidden states + the fold probe), block 1's are gone
    assert sorted(p.name for p in partial.glob("inputs-*")) == ["inputs-00002.safetensors"]

    with pytest.raises(QuantizeError, match="different settings.*calibration"):
        quantize_checkpoint(src, out, recipe, calibration=IDS[:4], progress=False)

    blocks = []
    real = layerwise.LayerwiseCalibration.quantize_block
    monkeypatch.setattr(layerwise.LayerwiseCalibration, "quantize_block",
                        lambda self, i: blocks.append(i) or real(self, i))
    res = quantize_checkpoint(src, out, recipe, calibration=IDS, progress=False)
    assert res.resumed_units == 2 and blocks == [2]
    assert (out / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    assert json.loads((out / "lowbit.json").read_text()) == json.loads((full / "lowbit.json").read_text())

    # a resume whose saved inputs are gone says so
    with pytest.raises(Killed):
        quantize_checkpoint(src, tmp_path / "lost", recipe, calibration=IDS, progress=False, on_unit=kill_after_two)
    (tmp_path / "lost" / streaming.PARTIAL / "inputs-00002.safetensors").unlink()
    with pytest.raises(QuantizeError, match="inputs-00002.safetensors is missing.*--restart"):
        quantize_checkpoint(src, tmp_path / "lost", recipe, calibration=IDS, progress=False)


def test_compressed_tensors_export_of_calibrated_recipes(src, tmp_path):
    from lowbit.io import compressed_tensors as ct

    # GPTQ leaves plain weights: exported, and equal to the in-memory quantize + export
    opts = {"symmetric": True}
    quantize_checkpoint(src, tmp_path / "ct", "a16w4-int-g32-gptq", export="compressed-tensors",
                        weight_options=opts, calibration=IDS, progress=False)
    m = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    ct.quantize_for_export(m, "a16w4-int-g32-gptq", weight_options=opts, calibration=IDS, progress=False)
    ct.export(m, tmp_path / "ref", progress=False)
    from safetensors.torch import load_file

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    a, b = tensors(tmp_path / "ct"), tensors(tmp_path / "ref")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.bfloat16)
    assert got is not None

    # AWQ keeps o_proj's scale as an input scale: compressed-tensors cannot hold it
    with pytest.raises(QuantizeError, match=r"model.layers.0.self_attn.o_proj: awq left an input scale.*"
                                            r"--export lowbit.*--skip o_proj"):
        quantize_checkpoint(src, tmp_path / "awq", "a16w4-int-g32-awq", export="compressed-tensors",
                            calibration=IDS, progress=False)
    # ... and with o_proj kept in full precision, the folded norms go out with the weights
    res = quantize_checkpoint(src, tmp_path / "awq", "a16w4-int-g32-awq", export="compressed-tensors",
                              weight_options=opts, skip=("lm_head", "o_proj"), calibration=IDS, progress=False,
                              restart=True)
    assert res.quantized == 18
    ref = in_memory(src, "a16w4-int-g32-awq", skip=("lm_head", "o_proj"), weight_options=ct.export_weight_options(
        "a16w4-int-g32-awq", opts))
    out = tensors(tmp_path / "awq")
    sd = ref.state_dict()
    for k in ("model.layers.1.input_layernorm.weight", "model.layers.2.post_attention_layernorm.weight"):
        assert torch.equal(out[k], sd[k]), k
    # rotations: refused before any work
    with pytest.raises(QuantizeError, match="Hadamard rotation.*cannot be expressed in the compressed-tensors"):
        quantize_checkpoint(src, tmp_path / "rot", "a16w4-mxfp4-rot", export="compressed-tensors", progress=False)
    assert not (tmp_path / "rot").exists()


def test_cli_default_and_file_calibration(src, tmp_path, capsys):
    """Without ids, the source's tokenizer makes them (as lowbit eval does): from --calibration
    FILE, or from the calibration half of pydoc_data.topics."""
    from lowbit.quant.calibration import calibration_ids

    text = " ".join(WORDS[i % len(WORDS)] for i in range(7 * 13 * 5)) + " unknown words too"
    (tmp_path / "cal.txt").write_text(text)
    out = tmp_path / "q"
    assert main(["quantize", str(src), "--recipe", "a16w4-int-g32-gptq", "--out", str(out),
                 "--calibration", str(tmp_path / "cal.txt"), "--calibration-seqs", "5", "--calibration-len", "16"]) == 0
    assert "calibration: " + str(tmp_path / "cal.txt") + ": 5 sequences of 16 tokens" in capsys.readouterr().out
    tok = transformers.AutoTokenizer.from_pretrained(src)
    ids = calibration_ids(tok, text, n_seqs=5, seq_len=16)
    assert_same_model(in_memory(src, "a16w4-int-g32-gptq", ids=ids), loaded(src, out))

    res = quantize_checkpoint(src, tmp_path / "d", "a16w4-int-g32-awq", calibration_seqs=2, calibration_len=8,
                              progress=False)
    assert "pydoc_data.topics, calibration half: 2 sequences of 8 tokens" in str(res)


def test_calibrated_refusals(src, tmp_path):
    with pytest.raises(QuantizeError, match="lm_head: outside the decoder blocks.*--skip"):
        quantize_checkpoint(src, tmp_path / "a", "a16w4-int-g32-gptq", skip=(), calibration=IDS, progress=False)
    assert not (tmp_path / "a").exists()  # refused before any work
    with pytest.raises(QuantizeError, match="fewer than one sequence of 4096"):
        quantize_checkpoint(src, tmp_path / "b", "a16w4-int-g32-gptq", calibration_len=4096, calibration_seqs=1,
                            calibration_text=__file__, progress=False)
    with pytest.raises(QuantizeError, match="calibration must be token ids"):
        quantize_checkpoint(src, tmp_path / "c", "a16w4-int-g32-gptq", calibration=torch.zeros(2, 3),
                            progress=False)


def test_tied_embeddings_source_loads_back(tmp_path):
    """A source with tied embeddings stores no lm_head.weight; lowbit's checkpoint holds every
    tensor of the model's state_dict, so the final step writes the embeddings under that name too."""
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(tmp_path / "src")
    assert "lm_head.weight" not in st_names(tmp_path / "src")
    quantize_checkpoint(tmp_path / "src", tmp_path / "q", "a16w4-int-g32-gptq", calibration=IDS, progress=False)
    assert_same_model(in_memory(tmp_path / "src", "a16w4-int-g32-gptq"), loaded(tmp_path / "src", tmp_path / "q"))


def st_names(d):
    from safetensors import safe_open

    names = set()
    for f in d.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            names |= set(h.keys())
    return names
