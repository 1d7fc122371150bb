"""save / load: safetensors plus JSON metadata, in the canonical layout.

A checkpoint directory holds ``model.safetensors`` (every tensor; a quantized
layer's weight as its canonical parts ``<layer>.weight_codes``,
``<layer>.weight_scales`` ...) and ``lowbit.json`` (format version, the
safetensors file's SHA-256, and per quantized layer: format, shape, tile,
options, activation spec, recipe). Kernel-private packings are never saved.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..formats import QTensor
from ..nn.linear import _PARTS, QuantLinear
from ..nn.recipes import ActivationSpec

FORMAT_VERSION = 1
TENSORS_FILE = "model.safetensors"
META_FILE = "lowbit.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model it is loaded into."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _tables_sha256(layers, qtensors) -> str:
    """Digest of the layer tables, so an edited or damaged lowbit.json is caught too."""
    text = json.dumps({"quantized_layers": layers, "qtensors": qtensors}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _qtensor_meta(q: QTensor) -> dict:
    return {"fmt": q.fmt, "shape": list(q.shape), "axis": q.axis, "tile": list(q.tile), "options": _jsonable(q.options)}


def _jsonable(options: dict) -> dict:
    return {k: (str(v) if isinstance(v, torch.dtype) else list(v) if isinstance(v, tuple) else v) for k, v in options.items()}


def _from_jsonable(options: dict) -> dict:
    out = {}
    for k, v in options.items():
        if isinstance(v, str) and v.startswith("torch."):
            v = getattr(torch, v[6:])
        elif isinstance(v, list):
            v = tuple(v)
        out[k] = v
    return out


def _state_of(obj) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """-> (tensors, quantized-layer metadata, loose QTensor metadata)."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    qtensors: dict[str, dict] = {}
    if isinstance(obj, nn.Module):
        for name, m in obj.named_modules():
            if isinstance(m, QuantLinear):
                layers[name] = {
                    **_qtensor_meta(m.qweight),
                    "activation": {"fmt": m.activation.fmt, "options": _jsonable(m.activation.options)},
                    "recipe": m.recipe,
                    "bias": m.bias is not None,
                    "input_scale": m.input_scale is not None,
                    "rotation_block": m.rotation_block,
                }
        tensors = dict(obj.state_dict())
    elif isinstance(obj, dict):
        for name, v in obj.items():
            if isinstance(v, QTensor):
                qtensors[name] = _qtensor_meta(v)
                named = {f"{name}.{part}": t for part, t in v.parts().items()}
            elif isinstance(v, torch.Tensor):
                named = {name: v}
            else:
                raise TypeError(f"cannot save {name!r}: a {type(v).__name__}, expected a tensor or QTensor")
            clash = sorted(set(named) & set(tensors))
            if clash:
                raise ValueError(f"cannot save: the name {clash[0]!r} is used twice (a QTensor's parts are "
                                 "stored as <name>.codes, <name>.scales ...); rename one")
            tensors.update(named)
    else:
        raise TypeError(f"save takes an nn.Module or a dict of tensors/QTensors, got {type(obj).__name__}")
    # safetensors refuses shared storage (tied weights): store independent copies
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return tensors, layers, qtensors


def save(model_or_state, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write a checkpoint directory (created if needed; existing files replaced atomically)."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors, layers, qtensors = _state_of(model_or_state)
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".tmp")
    os.close(fd)
    save_file(tensors, tmp)
    meta = {
        "lowbit_format_version": FORMAT_VERSION,
        "kind": "model" if isinstance(model_or_state, nn.Module) else "state",
        "sha256": _sha256(Path(tmp)),
        "quantized_layers": layers,
        "qtensors": qtensors,
        "tables_sha256": _tables_sha256(layers, qtensors),
        "user": metadata or {},
    }
    os.replace(tmp, out / TENSORS_FILE)
    (out / (META_FILE + ".tmp")).write_text(json.dumps(meta, indent=1))
    os.replace(out / (META_FILE + ".tmp"), out / META_FILE)
    return out


def _read(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    meta_path, data_path = directory / META_FILE, directory / TENSORS_FILE
    for p in (meta_path, data_path):
        if not p.is_file():
            raise CheckpointError(f"{directory} is not a lowbit checkpoint: {p.name} is missing")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is corrupted (not valid JSON: {e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} is corrupted (not a JSON object)")
    if meta.get("lowbit_format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: checkpoint format version {meta.get('lowbit_format_version')!r}, "
            f"this lowbit reads version {FORMAT_VERSION}"
        )
    if _sha256(data_path) != meta.get("sha256"):
        raise CheckpointError(
            f"{data_path} is corrupted or truncated: its SHA-256 does not match the one recorded at save time"
        )
    try:
        tensors = load_file(data_path)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{data_path} cannot be read: {e}") from None
    return meta, tensors


def _build_qtensor(prefix: str, m: dict, tensors: dict[str, torch.Tensor], sep: str) -> QTensor:
    parts = {p: tensors.get(f"{prefix}{sep}{p}") for p in _PARTS}
    if parts["codes"] is None or parts["scales"] is None:
        raise CheckpointError(f"checkpoint lacks the codes or scales of {prefix!r}")
    try:
        return QTensor(
            fmt=m["fmt"], shape=torch.Size(m["shape"]), axis=m["axis"], tile=tuple(m["tile"]),
            options=_from_jsonable(m["options"]), **parts,
        ).validate()
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(
            f"{META_FILE} does not describe the stored tensors of {prefix!r} ({type(e).__name__}: {e})"
        ) from None


def load(directory: str | os.PathLike, model: nn.Module | None = None):
    """Read a checkpoint.

    Without ``model``: returns a dict of name -> tensor or QTensor (quantized
    layers as ``<layer>.weight`` QTensors). With ``model``: checks that every
    tensor fits, then replaces its quantized layers by QuantLinear and loads
    all tensors; on any mismatch it raises CheckpointError and leaves the model
    untouched. Returns the model.

    A compressed-tensors directory (config.json with a compressed-tensors
    quantization_config, no lowbit.json) is read by lowbit.io.compressed_tensors.load.
    """
    directory = Path(directory)
    if not (directory / META_FILE).exists():
        from . import compressed_tensors

        if compressed_tensors.is_compressed_tensors_dir(directory):
            return compressed_tensors.load(directory, model)
    meta, tensors = _read(directory)
    layers, loose = meta.get("quantized_layers"), meta.get("qtensors")
    if not isinstance(layers, dict) or not isinstance(loose, dict):
        raise CheckpointError(f"{directory / META_FILE} is corrupted (no layer table)")
    if _tables_sha256(layers, loose) != meta.get("tables_sha256"):
        raise CheckpointError(
            f"{directory / META_FILE} was changed after saving: its layer tables do not match their SHA-256"
        )
    if model is None:
        out: dict = {}
        used = set()
        for name, m in {**layers, **loose}.items():
            is_layer = name in layers
            key = f"{name}.weight" if is_layer else name
            out[key] = _build_qtensor(name, m, tensors, ".weight_" if is_layer else ".")
            used |= {f"{name}{'.weight_' if is_layer else '.'}{p}" for p in _PARTS}
        out.update({k: v for k, v in tensors.items() if k not in used})
        return out

    # validate everything before touching the model
    modules = dict(model.named_modules())
    new_layers: dict[str, QuantLinear] = {}
    for name, m in layers.items():
        mod = modules.get(name)
        if not isinstance(mod, (nn.Linear, QuantLinear)):
            raise CheckpointError(
                f"checkpoint has a quantized layer {name!r} but the model has "
                f"{'no such module' if mod is None else type(mod).__name__}: wrong model for this checkpoint?"
            )
        q = _build_qtensor(name, m, tensors, ".weight_")
        out_f, in_f = q.shape
        if (mod.out_features, mod.in_features) != (out_f, in_f):
            raise CheckpointError(
                f"layer {name!r}: checkpoint weight is {out_f}x{in_f}, the model's is "
                f"{mod.out_features}x{mod.in_features}"
            )
        try:
            has_bias, act = bool(m["bias"]), m["activation"]
            spec = ActivationSpec(act["fmt"], _from_jsonable(act["options"]))
        except (KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{META_FILE}: layer {name!r} is described incompletely ({e})") from None
        if has_bias != (mod.bias is not None):
            raise CheckpointError(
                f"layer {name!r}: the checkpoint's layer {'has' if has_bias else 'has no'} bias, the model's "
                f"{'has none' if has_bias else 'has one'}: wrong model for this checkpoint?"
            )
        bias = tensors.get(f"{name}.bias") if has_bias else None
        try:  # input transforms (AWQ/SmoothQuant input scale, Hadamard rotation); absent in older files
            input_scale = torch.ones(in_f) if m.get("input_scale") else None
            new_layers[name] = QuantLinear(q, bias, spec, recipe=m.get("recipe"), input_scale=input_scale,
                                           rotation_block=m.get("rotation_block"))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{META_FILE}: layer {name!r} has a bad input transform ({e})") from None
    expected: dict[str, torch.Size] = {}
    for k, v in model.state_dict().items():
        owner = k.rpartition(".")[0]
        if owner not in layers:
            expected[k] = v.shape
    for name, q in new_layers.items():
        for k, v in q.state_dict().items():
            expected[f"{name}.{k}"] = v.shape
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tensors[k].shape != expected[k])
    if missing or unexpected or wrong:
        def show(keys):
            return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        problems = []
        if missing:
            problems.append(f"missing in the checkpoint: {show(missing)}")
        if unexpected:
            problems.append(f"not in the model: {show(unexpected)}")
        if wrong:
            problems.append(
                "shape differs: "
                + show([f"{k} {tuple(tensors[k].shape)} vs {tuple(expected[k])}" for k in wrong])
            )
        raise CheckpointError("checkpoint does not fit this model; " + "; ".join(problems))

    # all checks passed: mutate
    for name, q in new_layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        ref = next(iter(modules[name].buffers()), None)
        ref = ref if ref is not None else next(iter(modules[name].parameters()))
        setattr(parent, child, q.to(ref.device))
    model.load_state_dict(tensors, strict=True)
    return model
