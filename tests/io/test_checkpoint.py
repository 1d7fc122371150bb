"""save / load: round trips, refusal of checkpoints that do not fit, corruption.

References: bit-identical outputs and state (torch.equal, same dtypes), the
SHA-256 recomputed here with hashlib, the safetensors file read back with the
safetensors package itself.
"""

import hashlib
import json
import math

import pytest
import torch
from torch import nn

from lowbit import QTensor, quantize_tensor
from lowbit.io import CheckpointError, load, save
from lowbit.nn import QuantLinear, quantize_

D, VOCAB, KV = 64, 50, 32


pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    def __init__(self, hid=100):
        super().__init__()
        self.q_proj = nn.Linear(D, KV)
        self.k_proj = nn.Linear(D, KV, bias=False)
        self.v_proj = nn.Linear(D, KV)
        self.o_proj = nn.Linear(KV, D)
        self.mlp = nn.Sequential(nn.Linear(D, hid), nn.GELU(), nn.Linear(hid, D))
        self.norm = nn.LayerNorm(D)

    def forward(self, h):
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(KV), dim=-1) @ v
        h = h + self.o_proj(att)
        return h + self.mlp(self.norm(h))


class Tiny(nn.Module):
    """embed -> blocks -> norm -> lm_head, lm_head.weight is embed.weight."""

    def __init__(self, n_layers=2, seed=0, hid=100, vocab=VOCAB):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, D)
        self.layers = nn.ModuleList(Block(hid) for _ in range(n_layers))
        self.norm = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.layers:
            h = b(h)
        return self.lm_head(self.norm(h))


IDS = torch.tensor([[1, 7, 3, 49, 0, 12], [5, 5, 8, 2, 30, 11]])
RECIPES = ["a16w4-int-g32", "a16w3-int-g64", "a16w8-int8", "a8w8-fp8", "a16w6-mxfp6", "a8w4-mxfp4", "a4w4-nvfp4"]


def quantized(recipe="a16w4-int-g32", seed=0, **kw):
    model = Tiny(seed=seed, **kw).eval()
    quantize_(model, recipe, progress=False)
    return model


def snapshot(model):
    """Everything load could change: state (values and dtypes), module types, the tie."""
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [(n, type(m)) for n, m in model.named_modules()],
        model.lm_head.weight is model.embed.weight if hasattr(model, "lm_head") else None,
    )


def assert_same_snapshot(a, b):
    sa, ta, tie_a = a
    sb, tb, tie_b = b
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert ta == tb
    assert tie_a == tie_b


def assert_same_qtensor(a: QTensor, b: QTensor):
    assert (a.fmt, a.shape, a.axis, tuple(a.tile), a.options) == (b.fmt, b.shape, b.axis, tuple(b.tile), b.options)
    pa, pb = a.parts(), b.parts()
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and torch.equal(pa[k], pb[k]), k
    assert torch.equal(a.dequantize(), b.dequantize())


# ---- round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
def test_round_trip_is_bit_identical(recipe, tmp_path):
    model = quantized(recipe, seed=0)
    with torch.no_grad():
        out = model(IDS)
    save(model, tmp_path)
    fresh = Tiny(seed=1).eval()  # different weights: everything must come from the checkpoint
    with torch.no_grad():
        assert not torch.equal(fresh(IDS), out)
    got = load(tmp_path, fresh)
    assert got is fresh
    with torch.no_grad():
        assert torch.equal(fresh(IDS), out)
    assert_same_snapshot(snapshot(fresh), snapshot(model))
    assert fresh.lm_head.weight is fresh.embed.weight  # tie survives
    assert type(fresh.lm_head) is nn.Linear
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            n = fresh.get_submodule(name)
            assert isinstance(n, QuantLinear)
            assert (n.recipe, n.activation, n.fmt, tuple(n.tile), n.weight_options) == (
                m.recipe, m.activation, m.fmt, tuple(m.tile), m.weight_options), name
            assert_same_qtensor(n.qweight, m.qweight)


def test_load_into_a_model_quantized_with_another_recipe(tmp_path):
    src = quantized("a8w4-mxfp4", seed=0)
    save(src, tmp_path)
    dst = quantized("a16w8-int8", seed=1)
    load(tmp_path, dst)
    with torch.no_grad():
        assert torch.equal(dst(IDS), src(IDS))
    assert all(m.recipe == "a8w4-mxfp4" for m in dst.modules() if isinstance(m, QuantLinear))


def test_unquantized_model_round_trip(tmp_path):
    model = Tiny(seed=0).eval()
    save(model, tmp_path)
    fresh = Tiny(seed=1).eval()
    load(tmp_path, fresh)
    assert_same_snapshot(snapshot(fresh), snapshot(model))
    assert fresh.lm_head.weight is fresh.embed.weight


def test_bf16_model_round_trip(tmp_path):
    model = Tiny(seed=0).to(torch.bfloat16).eval()
    quantize_(model, "a16w4-int-g32", progress=False)
    with torch.no_grad():
        out = model(IDS)
    save(model, tmp_path)
    fresh = Tiny(seed=1).to(torch.bfloat16).eval()
    load(tmp_path, fresh)
    with torch.no_grad():
        y = fresh(IDS)
    assert y.dtype == torch.bfloat16 and torch.equal(y, out)
    assert_same_snapshot(snapshot(fresh), snapshot(model))


def test_files_and_metadata(tmp_path):
    from safetensors.torch import load_file

    model = quantized("a16w4-int-g32")
    out = save(model, tmp_path / "ckpt", metadata={"note": "tiny", "n": 3})
    assert out == tmp_path / "ckpt"
    assert sorted(p.name for p in out.iterdir()) == ["lowbit.json", "model.safetensors"]  # no temp files left
    meta = json.loads((out / "lowbit.json").read_text())
    assert meta["lowbit_format_version"] == 1
    assert meta["kind"] == "model"
    assert meta["sha256"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert meta["user"] == {"note": "tiny", "n": 3}
    qnames = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert sorted(meta["quantized_layers"]) == sorted(qnames)
    for name in qnames:
        m = model.get_submodule(name)
        entry = meta["quantized_layers"][name]
        assert entry["fmt"] == "int4" and entry["shape"] == [m.out_features, m.in_features]
        assert entry["tile"] == [1, 32] and entry["recipe"] == "a16w4-int-g32"
        assert entry["bias"] == (m.bias is not None)
        assert entry["activation"] == {"fmt": None, "options": {}}
    # the tensors are the state dict, canonical parts only
    tensors = load_file(out / "model.safetensors")
    sd = model.state_dict()
    assert set(tensors) == set(sd)
    for k, v in sd.items():
        assert tensors[k].dtype == v.dtype and torch.equal(tensors[k], v), k
    assert not any(k.endswith(".weight") and k.rpartition(".")[0] in qnames for k in tensors)


def test_save_replaces_an_existing_checkpoint(tmp_path):
    save(quantized("a16w4-int-g32", seed=0), tmp_path)
    second = quantized("a4w4-nvfp4", seed=2)
    save(second, tmp_path)
    fresh = load(tmp_path, Tiny(seed=1).eval())
    with torch.no_grad():
        assert torch.equal(fresh(IDS), second(IDS))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lowbit.json", "model.safetensors"]


# ---- load without a model ----------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["a16w4-int-g32", "a8w8-int8", "a4w4-nvfp4", "a16w6-mxfp6"])
def test_load_without_model_returns_qtensors(recipe, tmp_path):
    model = quantized(recipe)
    save(model, tmp_path)
    out = load(tmp_path)
    qnames = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    sd = model.state_dict()
    plain = {k for k in sd if k.rpartition(".")[0] not in qnames}
    biases = {f"{n}.bias" for n in qnames if model.get_submodule(n).bias is not None}
    assert set(out) == {f"{n}.weight" for n in qnames} | plain | biases
    for n in qnames:
        q = out[f"{n}.weight"]
        assert isinstance(q, QTensor)
        assert_same_qtensor(q, model.get_submodule(n).qweight)
    for k in plain | biases:
        assert isinstance(out[k], torch.Tensor) and out[k].dtype == sd[k].dtype and torch.equal(out[k], sd[k]), k


def test_state_dict_of_qtensors_round_trip(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(24, 100)
    state = {
        "a": quantize_tensor(w, "int4", group_size=32),
        "b": quantize_tensor(w, "int8"),  # int8 codes
        "c": quantize_tensor(w, "nvfp4"),
        "d": quantize_tensor(w, "mxfp6_e3m2", scale_rule="ceil"),
        "e": quantize_tensor(w, "fp8_e5m2", granularity="block", block_shape=(8, 32), scale_dtype=torch.float16),
        "f": quantize_tensor(torch.randn(3, 40, 5), "int3", axis=1, group_size=16, zero_point="integer"),
        "g": quantize_tensor(w.bfloat16(), "mxint8"),
        "t32": torch.randn(3, 4),
        "tbf": torch.randn(5).bfloat16(),
        "ti": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }
    assert state["b"].codes.dtype == torch.int8 and state["e"].scales.dtype == torch.float16
    save(state, tmp_path, metadata={"what": "loose tensors"})
    assert json.loads((tmp_path / "lowbit.json").read_text())["kind"] == "state"
    out = load(tmp_path)
    assert set(out) == set(state)
    for k, v in state.items():
        if isinstance(v, QTensor):
            assert isinstance(out[k], QTensor), k
            assert_same_qtensor(out[k], v)
        else:
            assert out[k].dtype == v.dtype and torch.equal(out[k], v), k


def test_save_rejects_other_objects(tmp_path):
    with pytest.raises(TypeError, match="'x'"):
        save({"x": [1, 2]}, tmp_path)
    with pytest.raises(TypeError):
        save([torch.zeros(2)], tmp_path)


def test_state_dict_name_collision_is_refused(tmp_path):
    qt = quantize_tensor(torch.randn(8, 64), "int4", group_size=32)
    try:
        save({"w": qt, "w.codes": torch.zeros(3)}, tmp_path)
    except (ValueError, TypeError):
        return
    out = load(tmp_path)
    assert_same_qtensor(out["w"], qt)
    assert torch.equal(out["w.codes"], torch.zeros(3))


# ---- checkpoints that do not fit the model -------------------------------------------------------------


def _identity_q_proj():
    m = Tiny(seed=1)
    m.layers[0].q_proj = nn.Identity()
    return m


def _conv_q_proj():
    m = Tiny(seed=1)
    m.layers[0].q_proj = nn.Conv1d(D, KV, 1)
    return m


def _extra_linear():
    m = Tiny(seed=1)
    m.layers[1].extra = nn.Linear(D, D)
    return m


MISMATCHES = {
    "wider mlp (shape)": (lambda: Tiny(seed=1, hid=104), r"layer 'layers\.0\.mlp\.0': checkpoint weight is 100x64"),
    "bigger vocab (float tensor shape)": (lambda: Tiny(seed=1, vocab=51), r"shape differs: embed\.weight"),
    "fewer layers (missing module)": (lambda: Tiny(seed=1, n_layers=1), r"'layers\.1\.q_proj'.*no such module"),
    "more layers (extra module)": (lambda: Tiny(seed=1, n_layers=3), r"missing in the checkpoint: layers\.2\."),
    "extra linear": (_extra_linear, r"missing in the checkpoint: layers\.1\.extra\.bias, layers\.1\.extra\.weight"),
    "not a linear": (_identity_q_proj, r"'layers\.0\.q_proj'.*Identity"),
    "a conv": (_conv_q_proj, r"'layers\.0\.q_proj'.*Conv1d"),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
@pytest.mark.parametrize("target_quantized", [False, True], ids=["float-target", "quantized-target"])
def test_mismatched_model_is_refused_and_untouched(case, target_quantized, tmp_path):
    save(quantized("a16w4-int-g32", seed=0), tmp_path)
    make, why = MISMATCHES[case]
    model = make()
    if target_quantized:
        quantize_(model, "a16w8-fp8", progress=False)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=why):
        load(tmp_path, model)
    assert_same_snapshot(snapshot(model), before)


def test_unquantized_layer_in_checkpoint_vs_quantized_model(tmp_path):
    save(Tiny(seed=0), tmp_path)  # float checkpoint
    model = quantized("a16w4-int-g32", seed=1)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="missing in the checkpoint.*weight_codes"):
        load(tmp_path, model)
    assert_same_snapshot(snapshot(model), before)


def test_state_checkpoint_into_a_model_is_refused(tmp_path):
    save({"layers.0.q_proj.weight": quantize_tensor(torch.randn(KV, D), "int8")}, tmp_path)
    model = Tiny(seed=1)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="does not fit"):
        load(tmp_path, model)
    assert_same_snapshot(snapshot(model), before)


def _nobias_target():
    m = Tiny(seed=1)
    m.layers[0].q_proj = nn.Linear(D, KV, bias=False)
    return m


def _bias_target():
    m = Tiny(seed=1)
    m.layers[0].k_proj = nn.Linear(D, KV, bias=True)
    return m


@pytest.mark.parametrize("make", [_nobias_target, _bias_target], ids=["ckpt-bias-model-none", "ckpt-none-model-bias"])
def test_bias_mismatch_is_refused(make, tmp_path):
    save(quantized("a16w4-int-g32", seed=0), tmp_path)
    model = make()
    before = snapshot(model)
    try:
        with pytest.raises(CheckpointError):
            load(tmp_path, model)
    finally:
        assert_same_snapshot(snapshot(model), before)


# ---- corrupted and missing files ---------------------------------------------------------------------


@pytest.fixture
def ckpt(tmp_path):
    save(quantized("a16w4-int-g32", seed=0), tmp_path)
    return tmp_path


def _flip(path, pos):
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated tensors": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-1000]),
                          "corrupted or truncated"),
    "tensors cut to the header": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:8]),
                                  "corrupted or truncated"),
    "flipped byte in data": (lambda d: _flip(d / "model.safetensors", (d / "model.safetensors").stat().st_size // 2),
                             "corrupted or truncated"),
    "flipped byte in header": (lambda d: _flip(d / "model.safetensors", 20), "corrupted or truncated"),
    "empty tensors file": (lambda d: (d / "model.safetensors").write_bytes(b""), "corrupted or truncated"),
    "truncated json": (lambda d: (d / "lowbit.json").write_text((d / "lowbit.json").read_text()[:-40]),
                       "lowbit.json is corrupted.*not valid JSON"),
    "garbage json": (lambda d: (d / "lowbit.json").write_text("{lowbit"), "lowbit.json is corrupted"),
    "missing json": (lambda d: (d / "lowbit.json").unlink(), "not a lowbit checkpoint: lowbit.json is missing"),
    "missing tensors": (lambda d: (d / "model.safetensors").unlink(),
                        "not a lowbit checkpoint: model.safetensors is missing"),
    "other version": (lambda d: (d / "lowbit.json").write_text(
        (d / "lowbit.json").read_text().replace('"lowbit_format_version": 1', '"lowbit_format_version": 2')),
        "format version 2, this lowbit reads version 1"),
    "sha replaced": (lambda d: (d / "lowbit.json").write_text(json.dumps(
        {**json.loads((d / "lowbit.json").read_text()), "sha256": "0" * 64})), "corrupted or truncated"),
}


@pytest.mark.parametrize("with_model", [False, True], ids=["no-model", "model"])
@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_checkpoint_raises_checkpoint_error(case, with_model, ckpt):
    corrupt, why = CORRUPTIONS[case]
    corrupt(ckpt)
    model = Tiny(seed=1) if with_model else None
    before = snapshot(model) if with_model else None
    with pytest.raises(CheckpointError, match=why):
        load(ckpt, model)
    if with_model:
        assert_same_snapshot(snapshot(model), before)


def test_non_utf8_json_raises_checkpoint_error(ckpt):
    data = bytearray((ckpt / "lowbit.json").read_bytes())
    data[5] |= 0x80
    (ckpt / "lowbit.json").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="lowbit.json is corrupted"):
        load(ckpt)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a lowbit checkpoint"):
        load(tmp_path / "nope")
    assert issubclass(CheckpointError, ValueError)


def _tamper(key, value):
    def f(d):
        meta = json.loads((d / "lowbit.json").read_text())
        entry = meta["quantized_layers"]["layers.0.mlp.2"]
        if value is None:
            del entry[key]
        else:
            entry[key] = value
        (d / "lowbit.json").write_text(json.dumps(meta))
    return f


# Metadata that is valid JSON but wrong: lowbit.json is not covered by the SHA-256,
# so these must be caught by checking the metadata against the tensors.
TAMPERED = {
    "tile": _tamper("tile", [1, 64]),
    "format": _tamper("fmt", "int3"),
    "unknown format": _tamper("fmt", "int5"),
    "shape": _tamper("shape", [64, 99]),
    "missing field": _tamper("fmt", None),
    "not an object": lambda d: (d / "lowbit.json").write_text("[1, 2]"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_metadata_raises_checkpoint_error(case, ckpt):
    TAMPERED[case](ckpt)
    with pytest.raises(CheckpointError):
        load(ckpt)


# ---- inference mode -------------------------------------------------------------------------------


def test_load_under_inference_mode_then_forward(ckpt):
    src = quantized("a16w4-int-g32", seed=0)
    with torch.inference_mode():
        model = load(ckpt, Tiny(seed=1).eval())
        out = model(IDS)
    with torch.no_grad():
        assert torch.equal(out, src(IDS))
