"""Tensor-parallel checks (lowbit check --tp N).

References: the published Llama-3-70B configuration (hidden 8192, 64 heads / 8
key-value heads of 128, MLP 28672, 80 layers) and arithmetic written out here
(K per GPU = K / tp; a split is clean when it is a multiple of the group).
"""

import json

import pytest

from lowbit.cli import main
from lowbit.io import tp

LLAMA3_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8,
              "head_dim": 128, "num_hidden_layers": 80, "vocab_size": 128256, "model_type": "llama"}


def test_llama3_70b_at_group_128_splits_8_ways_cleanly():
    layers = tp.layers_from_config(LLAMA3_70B, "a16w4-int-g128")
    assert len(layers) == 80 * 7 + 1 and sum(l.fmt is not None for l in layers) == 560  # lm_head kept
    report = tp.check(layers, 8)
    assert report.ok, str(report)
    down = next(l for l in report.layers if l.spec.name == "model.layers.0.mlp.down_proj")
    assert down.spec.split == "row" and down.shard == (8192, 28672 // 8) and 3584 % 128 == 0
    kv = next(l for l in report.layers if l.spec.name == "model.layers.5.self_attn.k_proj")
    assert kv.shard == (128, 8192)
    for recipe in ("a8w8-fp8", "a16w4-nvfp4", "a16w4-mxfp4", "a8w8-int8", "a16w8-int8"):
        assert tp.check(tp.layers_from_config(LLAMA3_70B, recipe), 8).ok, recipe


def test_a_misaligned_group_names_the_layers_and_the_fix():
    report = tp.check(tp.layers_from_config(LLAMA3_70B, "a16w4-int-g1024"), 8, engines=("lowbit",))
    assert not report.ok
    bad = {l.spec.name for l in report.failures}
    assert bad == {f"model.layers.{i}.mlp.down_proj" for i in range(80)}  # 28672 / 8 = 3584 = 3.5 x 1024
    text = str(report)
    assert "model.layers.{0..79}.mlp.down_proj (80)" in text
    assert "K per GPU 3584 is not a multiple of the group of 1024" in text
    assert "a group that divides 3584 (32, 64, 128, 256)" in text and "pad K to 32768" in text and "tp 4" in text
    # vLLM's Marlin kernels also refuse groups other than 32/64/128: a warning for every layer (strict: failures)
    r = tp.check(tp.layers_from_config(LLAMA3_70B, "a16w4-int-g1024"), 8)
    assert len(r.failures) == 80 and len(r.warnings) == 560
    assert len(tp.check(tp.layers_from_config(LLAMA3_70B, "a16w4-int-g1024"), 8, strict=True).failures) == 560


def test_heads_blocks_and_kernel_tiles():
    r = tp.check(tp.layers_from_config(LLAMA3_70B, "a16w4-int-g128"), 3)
    assert any("64 attention heads cannot be split 3 ways" in i.what for l in r.failures for i in l.issues)
    assert any("8 key/value heads cannot be split 3 ways" in i.what for l in r.failures for i in l.issues)
    r16 = tp.check(tp.layers_from_config(LLAMA3_70B, "a16w4-int-g128"), 16)  # 8 kv heads: replicated
    assert r16.ok
    kv = next(l for l in r16.layers if l.spec.name.endswith("0.self_attn.v_proj"))
    assert kv.shard == (128, 8192) and any("replicated" in i.what for i in kv.issues)
    blk = tp.LinearSpec("m.layers.0.mlp.up_proj", 384, 256, "fp8_e4m3", (128, 128))
    assert not tp.check([blk], 2).ok  # 192 rows per GPU cut the 128x128 scale blocks
    assert tp.check([blk], 3).ok
    small = tp.LinearSpec("m.layers.0.mlp.down_proj", 4096, 1536, "int4", (1, 64))
    c = tp.check_layer(small, 4)  # K per GPU 384: whole groups, but not a multiple of Marlin's 128 -> fine (384)
    assert c.ok
    spec = tp.LinearSpec("m.layers.0.mlp.down_proj", 4096, 1024, "int4", (1, 64))
    c = tp.check_layer(spec, 16)  # K per GPU 64: whole groups, but Marlin wants a multiple of 128
    assert c.ok and any(i.severity == "warning" and "Marlin" in i.what and "K per GPU" in i.what for i in c.issues)
    assert not tp.check([spec], 16, strict=True).ok and tp.check([spec], 16, engines=("lowbit",), strict=True).ok


def test_cli_check_registry_and_config_dir(tmp_path, capsys):
    assert main(["check", "--model", "llama3-70b", "--recipe", "a16w4-int-g128", "--tp", "8"]) == 0
    assert "every split falls on group, block and head boundaries; every shard fits" in capsys.readouterr().out
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_70B))
    assert main(["check", str(tmp_path), "--recipe", "a16w4-int-g1024", "--tp", "8", "--engine", "lowbit",
                 "--json", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert "model.layers.{0..79}.mlp.down_proj (80)" in out and "ERROR" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert not data["ok"] and sum(not l["ok"] for l in data["layers"]) == 80
    assert main(["check", str(tmp_path), "--tp", "8"]) == 2  # unquantized, no recipe: says what to give
    assert "give --recipe" in capsys.readouterr().err
    with pytest.raises(ValueError, match="tp must be a positive integer"):
        tp.check([], 0)
