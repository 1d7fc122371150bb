"""Checkpoints of layers with input transforms: AWQ/SmoothQuant input scales, folded
scales (in the preceding module's weights) and Hadamard rotations round-trip exactly."""

import json

import pytest
import torch

from lowbit.io import CheckpointError, load, save
from lowbit.nn import QuantLinear, quantize_
from test_checkpoint import IDS, Tiny, VOCAB  # noqa: E402  (tests/io is on sys.path)

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("recipe", ["a16w4-int-g32-awq", "a8w8-int8-smooth", "a16w4-mxfp4-rot-gptq", "a4w4-nvfp4-rot"])
def test_round_trip_keeps_transforms(recipe, tmp_path):
    model = Tiny().eval().requires_grad_(False)
    with torch.no_grad():
        model.embed.weight[:, 3] *= 20  # an outlier channel, so the scaling methods do something
    quantize_(model, recipe, calibration=CALIB, progress=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if "rot" in recipe:
        assert all(m.rotation_block == 32 for m in layers.values())
    else:
        assert any(m.input_scale is not None for m in layers.values())
    save(model, tmp_path)
    meta = json.loads((tmp_path / "lowbit.json").read_text())
    for n, m in layers.items():
        assert meta["quantized_layers"][n]["input_scale"] == (m.input_scale is not None)
        assert meta["quantized_layers"][n]["rotation_block"] == m.rotation_block
    fresh = load(tmp_path, Tiny().eval())
    for n, m in fresh.named_modules():
        if isinstance(m, QuantLinear):
            o = layers[n]
            assert m.rotation_block == o.rotation_block
            assert (m.input_scale is None) == (o.input_scale is None)
            if o.input_scale is not None:
                assert torch.equal(m.input_scale, o.input_scale) and m.input_scale.dtype == torch.float32
    # folded scales live in the other modules' weights (norms, v_proj rows): saved as plain tensors
    with torch.no_grad():
        assert torch.equal(fresh(IDS), model(IDS))


def test_bad_rotation_block_in_metadata_is_refused(tmp_path):
    model = Tiny().eval()
    quantize_(model, "a16w4-mxfp4-rot", progress=False)
    save(model, tmp_path)
    meta = json.loads((tmp_path / "lowbit.json").read_text())
    name = next(iter(meta["quantized_layers"]))
    meta["quantized_layers"][name]["rotation_block"] = 24
    from lowbit.io.checkpoint import _tables_sha256

    meta["tables_sha256"] = _tables_sha256(meta["quantized_layers"], meta["qtensors"])
    (tmp_path / "lowbit.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="input transform"):
        load(tmp_path, Tiny().eval())
