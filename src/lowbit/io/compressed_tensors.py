"""compressed-tensors checkpoints: the format llm-compressor writes and vLLM, SGLang
and transformers read.

    report = export(model, "out/")          # a complete Hugging Face model directory
    state = load("out/")                    # name -> tensor / QTensor (quantized layers)
    model = load("out/", model)             # swap the model's linears for QuantLinear

Layouts written (per quantized linear ``P``; docs/serving.md has the full table):

| lowbit weight / activation            | compressed-tensors format | tensors                                              |
|---------------------------------------|---------------------------|------------------------------------------------------|
| int2/3/4/8 group or channel, none     | pack-quantized            | P.weight_packed int32, P.weight_scale, P.weight_shape (+ P.weight_zero_point int32 when affine) |
| int8 channel / int8 per token         | int-quantized             | P.weight int8, P.weight_scale [N, 1]                 |
| fp8_e4m3 channel/block / fp8 per token| float-quantized           | P.weight float8_e4m3fn, P.weight_scale               |
| fp8_e4m3 channel/block, none          | naive-quantized           | P.weight float8_e4m3fn, P.weight_scale               |
| nvfp4 (/ nvfp4)                       | nvfp4-pack-quantized      | P.weight_packed uint8, P.weight_scale float8_e4m3fn, P.weight_global_scale (+ P.input_global_scale) |
| mxfp4, none                           | mxfp4-pack-quantized      | P.weight_packed uint8, P.weight_scale uint8 (E8M0)   |

Where lowbit's representation has no exact equivalent the export refuses,
naming the layer, the constraint and the fix; with ``convert=True`` it converts
instead and reports the error it introduced, measured against lowbit's own
dequantization:

- affine integers with float (HQQ) zero points, or integer zero points outside
  [0, 2^b - 1] (a group that does not contain 0): re-quantized from lowbit's
  dequantized weight with integer zero points and a range that includes 0 (what
  compressed-tensors' own observers do);
- NVFP4 q/k/v (and gate/up) with different global scales: vLLM fuses those
  layers and keeps one global scale (the largest), which would silently
  rescale the others; they are re-quantized with their shared largest scale.

NVFP4's tensor scale: lowbit keeps s_t = amax / (6 * 448); compressed-tensors
stores its reciprocal (``weight_global_scale`` = 6 * 448 / amax) and vLLM
divides 1 by it in float32. The export writes the float32 value g with
fl(1 / g) == s_t exactly (a neighbour of fl(1 / s_t) when that one is off by
an ulp), so vLLM recovers lowbit's s_t bit for bit; the report says so per
layer, and names any layer where no such g exists.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..formats import QTensor, pack_codes, quantize_tensor, unpack_codes
from ..formats import tiles as _tiles
from ..formats.pack import packed_size
from ..nn.linear import QuantLinear
from ..nn.recipes import ActivationSpec
from . import _safetensors as st

QUANT_METHOD = "compressed-tensors"
NVFP4_RANGE = 6.0 * 448.0
# sibling layers a serving engine fuses into one matmul (they must agree on scheme and global scales)
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
DEFAULT_SHARD_BYTES = 5 << 30
_WEIGHT_PARTS = {f"weight_{p}" for p in ("codes", "scales", "zeros", "global_scale")}


AFFINE_NOTE = ("affine integer weights (zero points): vLLM and compressed-tensors' decompression read them; "
               "transformers 5.x with compressed-tensors 0.20 refuses them (weight_zero_point size mismatch, "
               "llm-compressor issue #1618): quantize with symmetric=True to load them in transformers")


class ExportError(ValueError):
    """A model (or layer) that cannot be written as compressed-tensors without changing it."""


# ------------------------------------------------------------------ schemes


@dataclass
class Scheme:
    """One layer's compressed-tensors scheme."""

    format: str
    weights: dict
    input_activations: dict | None = None

    def key(self) -> str:
        return json.dumps([self.format, self.weights, self.input_activations], sort_keys=True)

    def to_json(self, targets: list[str], with_format: bool) -> dict:
        out = {"targets": targets, "weights": self.weights, "input_activations": self.input_activations,
               "output_activations": None}
        if with_format:
            out["format"] = self.format
        return out


def _args(num_bits: int, type_: str, strategy: str, *, symmetric=True, group_size=None, dynamic=False,
          block_structure=None) -> dict:
    a = {"num_bits": num_bits, "type": type_, "symmetric": symmetric, "group_size": group_size,
         "strategy": strategy, "block_structure": block_structure, "dynamic": dynamic, "actorder": None,
         "observer": None if dynamic else "minmax", "observer_kwargs": {}}
    return a


class LayerError(ExportError):
    """One layer that does not fit: ``why`` and ``fix`` are shared by the layers with the same problem."""

    def __init__(self, name: str, why: str, fix: str):
        super().__init__(f"layer {name!r}: {why}; {fix}")
        self.name, self.why, self.fix = name, why, fix


def _fail(name: str, why: str, fix: str) -> LayerError:
    return LayerError(name, why, fix)


def _summarize(errors: list[LayerError | str]) -> str:
    """One line per distinct problem, naming its layers (the first few, then a count)."""
    groups: dict[tuple, list[str]] = {}
    lines = []
    for e in errors:
        if isinstance(e, LayerError):
            groups.setdefault((e.why, e.fix), []).append(e.name)
        else:
            lines.append(str(e))
    for (why, fix), names in groups.items():
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        lines.append(f"{len(names)} layer(s) ({shown}): {why}; {fix}")
    return "\n  ".join(lines)


def _int_strategy(name: str, q: QTensor) -> tuple[str, int | None]:
    n, k = q.shape
    tr, tc = q.tile
    if tr == 1 and q.scales.shape[1] == 1:
        return "channel", None
    if tr == 1:
        if k % tc:
            raise _fail(name, f"K={k} is not a multiple of the group size {tc} (compressed-tensors and vLLM "
                              "need whole groups)", "quantize it with a group that divides K, or keep it in "
                                                    "full precision (skip/overrides)")
        return "group", tc
    if q.scales.numel() == 1:
        return "tensor", None
    return "block", None


def weight_scheme(name: str, q: QTensor, act: ActivationSpec) -> Scheme:
    """The compressed-tensors scheme of one quantized linear, or ExportError naming what does not fit."""
    if len(q.shape) != 2 or q.axis != 1:
        raise _fail(name, f"weight of shape {list(q.shape)} blocked along axis {q.axis}",
                    "compressed-tensors stores 2-D weights [out, in] blocked along in")
    spec = q.spec
    n, k = q.shape
    fam = spec.family
    w: dict
    if fam == "int":
        sym = bool(q.options.get("symmetric", True))
        strategy, group = _int_strategy(name, q)
        if strategy == "block":
            raise _fail(name, "integer weights with 2-D block scales", "use group or channel scales")
        if strategy == "tensor" and not sym:
            raise _fail(name, "affine integer weights with one scale per tensor", "use group or channel scales")
        w = _args(spec.bits, "int", strategy, symmetric=sym, group_size=group)
    elif fam == "fp8":
        if q.fmt != "fp8_e4m3":
            raise _fail(name, f"{q.fmt} weights (compressed-tensors and vLLM store FP8 as E4M3)",
                        "quantize with fp8_e4m3")
        tr, tc = q.tile
        if tr == 1 and q.scales.shape[1] == 1:
            w = _args(8, "float", "channel")
        elif q.scales.numel() == 1 and tr >= n:
            w = _args(8, "float", "tensor")
        elif tr > 1:
            w = _args(8, "float", "block", block_structure=[tr, tc])
        else:
            if k % tc:
                raise _fail(name, f"K={k} is not a multiple of the group size {tc}", "use a group that divides K")
            w = _args(8, "float", "group", group_size=tc)
    elif q.fmt == "nvfp4":
        if k % 16:
            raise _fail(name, f"K={k} is not a multiple of NVFP4's block of 16 (compressed-tensors and vLLM "
                              "need whole blocks)", "keep this layer in full precision or pad K")
        w = _args(4, "float", "tensor_group", group_size=16)
    elif q.fmt == "mxfp4":
        if k % 32:
            raise _fail(name, f"K={k} is not a multiple of MXFP4's block of 32", "keep this layer in full precision")
        w = _args(4, "float", "group", group_size=32)
    else:
        raise _fail(name, f"{q.fmt} weights have no compressed-tensors layout in this exporter",
                    "export int2/3/4/8, fp8_e4m3, nvfp4 or mxfp4 weights, or keep the layer in full precision")

    a = None
    fmt_name = None
    if act.fmt is None:
        if fam == "int":
            fmt_name = "pack-quantized"
        elif fam == "fp8":
            fmt_name = "naive-quantized"
        else:
            fmt_name = f"{q.fmt}-pack-quantized"
    elif act.fmt == "int8" and fam == "int":
        gran = act.options.get("granularity", "channel")
        if spec.bits != 8 or not w["symmetric"] or w["strategy"] != "channel" or gran not in ("token", "channel"):
            raise _fail(name, f"int8 per-token activations with {q.fmt} {w['strategy']} weights "
                              f"({'symmetric' if w['symmetric'] else 'affine'})",
                        "compressed-tensors' int-quantized layout takes symmetric int8 weights per channel")
        a = _args(8, "int", "token", dynamic=True)
        fmt_name = "int-quantized"
    elif act.fmt == "fp8_e4m3" and fam == "fp8":
        gran = act.options.get("granularity", "channel")
        if gran in ("token", "channel"):
            a = _args(8, "float", "token", dynamic=True)
        elif gran == "tensor":
            a = _args(8, "float", "tensor", dynamic=True)
        elif gran == "group":
            a = _args(8, "float", "group", group_size=act.options["group_size"], dynamic=True)
        else:
            raise _fail(name, f"fp8 activations with granularity {gran!r}", "use per-token activations")
        fmt_name = "float-quantized"
    elif act.fmt == "nvfp4" and q.fmt == "nvfp4":
        a = _args(4, "float", "tensor_group", group_size=16, dynamic="local")
        fmt_name = "nvfp4-pack-quantized"
    elif act.fmt == "fp8_e4m3" and q.fmt == "mxfp4":
        raise _fail(name, "FP8 activations with MXFP4 weights (a8w4-fp8-mxfp4): this exporter does not write "
                          "that pairing", "export a16w4-mxfp4 (the same weights; activations unquantized) or "
                          "keep the lowbit checkpoint")
    else:
        raise _fail(name, f"{act.fmt} activations with {q.fmt} weights have no faithful compressed-tensors "
                          "equivalent (compressed-tensors and vLLM compute MX activation scales by rounding to "
                          "the nearest power of two, not with the OCP floor rule)",
                    "export the weight-only recipe (a16...) or one of a8w8-int8, a8w8-fp8, a4w4-nvfp4")
    if fmt_name is None:  # pragma: no cover - every branch above sets it
        raise _fail(name, "unsupported combination", "see docs/serving.md")
    return Scheme(fmt_name, w, a)


def recipe_name(scheme: Scheme) -> str:
    """A lowbit-style name for a scheme (for reports and imported QuantLinear layers)."""
    w, a = scheme.weights, scheme.input_activations
    abits = 16 if a is None else a["num_bits"]
    if w["type"] == "int":
        body = f"int-g{w['group_size']}" if w["strategy"] == "group" else "int" + ("8" if w["num_bits"] == 8 else "")
        if w["num_bits"] == 8 and w["strategy"] == "channel":
            body = "int8"
    elif scheme.format.startswith("nvfp4"):
        body = "nvfp4"
    elif scheme.format.startswith("mxfp4"):
        body = "mxfp4"
    else:
        body = "fp8"
    return f"a{abits}w{w['num_bits']}-{body}"


# ------------------------------------------------------------------ conversions


@dataclass
class Conversion:
    what: str
    rel_rms: float  # ||W' - W|| / ||W||, W = lowbit's dequantization before the conversion
    max_abs: float
    groups: int = 0  # scale groups changed

    def __str__(self) -> str:
        g = f", {self.groups} group(s)" if self.groups else ""
        return f"{self.what}{g}: relative RMS error {self.rel_rms:.2e}, max abs error {self.max_abs:.3g}"


def _error(before: torch.Tensor, after: torch.Tensor) -> tuple[float, float]:
    d = (after.double() - before.double())
    denom = float(before.double().norm())
    rel = float(d.norm()) / denom if denom > 0 else float(d.norm())
    return rel, float(d.abs().max()) if d.numel() else 0.0


def _int_zero_out_of_range(q: QTensor) -> torch.Tensor | None:
    """Per scale tile: True where the zero point is not an integer in [0, 2^b - 1]."""
    if q.spec.family != "int" or q.options.get("symmetric", True):
        return None
    qmax = (1 << q.spec.bits) - 1
    z = q.zeros.double()
    return (z != torch.round(z)) | (z < 0) | (z > qmax) | ~torch.isfinite(z)


def requantize_integer_zero(x: torch.Tensor, bits: int, tile: tuple[int, int], scale_dtype: torch.dtype,
                            mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affine b-bit quantization with integer zero points in [0, 2^b - 1]: the range of
    each tile is widened to contain 0 (s = (max - min) / (2^b - 1), z = round(-min / s)),
    as compressed-tensors' observers do. Returns (q [R, K] int64, scales, zeros) for the
    tiles in ``mask`` (all when None); the caller keeps the others.
    Arithmetic as lowbit.formats.int: s rounded to scale_dtype first, then q from it."""
    r, k = x.shape
    qmax = (1 << bits) - 1
    lo, hi = _tiles.tile_min_max(x, tile)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    s = _tiles.divide(hi - lo, qmax)
    s = torch.where(s > 0, s, torch.ones_like(s)).to(scale_dtype).float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = torch.round(-lo / s).clamp(0, qmax).to(scale_dtype).float()
    q = torch.round(x / _tiles.expand(s, tile, r, k) + _tiles.expand(z, tile, r, k)).clamp(0, qmax)
    return q.to(torch.int64), s.to(scale_dtype), z.to(scale_dtype)


def convert_int_zero_points(q: QTensor, source: torch.Tensor | None = None) -> tuple[QTensor, Conversion]:
    """Re-quantize the tiles whose zero point compressed-tensors cannot store
    (float, or outside [0, 2^b - 1]) from lowbit's dequantized weight, or from
    ``source`` (the original weight, when quantizing for an export)."""
    bad = _int_zero_out_of_range(q)
    before = q.dequantize()
    x2 = (before if source is None else source.detach().float()).reshape(q.rows, q.k)
    bits = q.spec.bits
    qn, sn, zn = requantize_integer_zero(x2, bits, q.tile, q.scales.dtype)
    p_old = q.unpacked_codes().to(torch.int64)
    r, k = x2.shape
    pick = _tiles.expand(bad, q.tile, r, k)
    codes = pack_codes(torch.where(pick, qn, p_old), bits)
    scales = torch.where(bad, sn, q.scales)
    zeros = torch.where(bad, zn, q.zeros)
    opts = {**q.options, "zero_point": "integer"}
    q2 = QTensor(fmt=q.fmt, shape=q.shape, axis=q.axis, codes=codes, scales=scales, zeros=zeros, tile=q.tile,
                 options=opts).validate()
    rel, mx = _error(before, q2.dequantize())
    what = ("float zero points rounded to integers in [0, %d] (re-quantized)" % ((1 << bits) - 1)
            if q.options.get("zero_point") == "float" else
            "integer zero points outside [0, %d] (groups without 0 in their range) re-quantized" % ((1 << bits) - 1))
    return q2, Conversion(what, rel, mx, int(bad.sum()))


def nvfp4_reciprocal(s_t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """compressed-tensors' ``weight_global_scale`` for lowbit's tensor scale s_t: a float32
    g with fl32(1 / g) == s_t (what vLLM computes), searched around fl32(1 / s_t).
    -> (g as float32 [1], exact)."""
    s = s_t.to(torch.float32).reshape(())
    if not bool(s > 0) or not bool(torch.isfinite(s)):
        return torch.ones(1, dtype=torch.float32), True  # all-zero weight: every block scale is 0
    one = torch.ones((), dtype=torch.float32)
    g0 = one / s
    cands = [g0]
    up, down = g0, g0
    for _ in range(4):
        up = torch.nextafter(up, torch.tensor(float("inf")))
        down = torch.nextafter(down, torch.tensor(0.0))
        cands += [up, down]
    for g in cands:
        if bool(torch.isfinite(g)) and bool((one / g) == s):
            return g.reshape(1).clone(), True
    return g0.reshape(1).clone(), False


def share_nvfp4_global_scale(qs: list[QTensor]) -> tuple[list[QTensor], Conversion]:
    """Re-quantize NVFP4 siblings (q/k/v, gate/up) with one tensor scale: their stacked
    dequantized weights quantized as one tensor, then split by rows."""
    before = [q.dequantize() for q in qs]
    stacked = torch.cat(before, dim=0)
    joint = quantize_tensor(stacked, "nvfp4")
    out, row = [], 0
    for q in qs:
        n = q.shape[0]
        out.append(QTensor(fmt="nvfp4", shape=q.shape, axis=1, codes=joint.codes[row:row + n].clone(),
                           scales=joint.scales[row:row + n].clone(), tile=joint.tile,
                           global_scale=joint.global_scale.clone(), options=dict(joint.options)).validate())
        row += n
    rel, mx = _error(stacked, torch.cat([q.dequantize() for q in out], dim=0))
    return out, Conversion("NVFP4 global scales of fused siblings unified (re-quantized)", rel, mx)


# ------------------------------------------------------------------ tensors


def _little_endian() -> None:
    if sys.byteorder != "little":  # pragma: no cover
        raise RuntimeError("compressed-tensors int32 packing is written on little-endian hosts only")


def _to_int32_words(packed: torch.Tensor, n_values: int, bits: int) -> torch.Tensor:
    """lowbit's little-endian bit stream (uint8 [R, bytes]) -> compressed-tensors' int32
    words [R, ceil(n_values * bits / 32)] (the same stream; zero bits past the end)."""
    _little_endian()
    words = -(-n_values * bits // 32)
    r = packed.shape[0]
    out = torch.zeros((r, words * 4), dtype=torch.uint8)
    nb = min(packed.shape[1], words * 4)
    out[:, :nb] = packed[:, :nb]
    return out.view(torch.int32)


def _from_int32_words(words: torch.Tensor, n_values: int, bits: int) -> torch.Tensor:
    """compressed-tensors int32 words [R, W] -> unsigned b-bit values uint8 [R, n_values]."""
    _little_endian()
    b = words.contiguous().view(torch.uint8)
    need = packed_size(n_values, bits)
    if b.shape[1] < need:
        b = torch.nn.functional.pad(b, (0, need - b.shape[1]))
    return unpack_codes(b[:, :need].contiguous(), bits, n_values)


def layer_tensors(prefix: str, q: QTensor, scheme: Scheme, bias: torch.Tensor | None = None,
                  input_global_scale: float | None = None) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized linear (names prefixed by ``prefix``)."""
    n, k = (int(v) for v in q.shape)
    w = scheme.weights
    out: dict[str, torch.Tensor] = {}
    fmt = scheme.format
    if fmt == "pack-quantized":
        bits = q.spec.bits
        p = q.unpacked_codes().to(torch.int64)
        if w["symmetric"]:
            p = p ^ (1 << (bits - 1))  # two's complement pattern -> value + 2^(b-1)
        out["weight_packed"] = _to_int32_words(pack_codes(p, bits), k, bits)
        out["weight_scale"] = q.scales.reshape(1) if w["strategy"] == "tensor" else q.scales
        out["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        if not w["symmetric"]:
            zt = q.zeros.to(torch.int64).t().contiguous()  # [groups, N]: packed along N
            out["weight_zero_point"] = _to_int32_words(pack_codes(zt, bits), n, bits).t().contiguous()
    elif fmt in ("int-quantized", "naive-quantized", "float-quantized"):
        if q.spec.family == "int":
            out["weight"] = q.codes.view(torch.int8)
        else:
            out["weight"] = q.codes.view(torch.uint8).view(torch.float8_e4m3fn)
        out["weight_scale"] = q.scales.reshape(1) if w["strategy"] == "tensor" else q.scales
    elif fmt == "nvfp4-pack-quantized":
        out["weight_packed"] = q.codes.view(torch.uint8)
        out["weight_scale"] = q.scales.view(torch.float8_e4m3fn)
        g, _ = nvfp4_reciprocal(q.global_scale)
        out["weight_global_scale"] = g
        if scheme.input_activations is not None:
            if input_global_scale is None:
                raise ExportError(f"layer {prefix!r}: NVFP4 activations need a calibrated input_global_scale")
            out["input_global_scale"] = torch.tensor([input_global_scale], dtype=torch.float32)
    elif fmt == "mxfp4-pack-quantized":
        out["weight_packed"] = q.codes.view(torch.uint8)
        out["weight_scale"] = q.scales.view(torch.uint8)
    else:  # pragma: no cover
        raise ExportError(f"unknown compressed-tensors format {fmt!r}")
    if bias is not None:
        out["bias"] = bias
    return {f"{prefix}.{k_}": v.contiguous() for k_, v in out.items()}


def _targets(names: list[str], others: set[str]) -> list[str]:
    """Compact ``re:`` targets that match exactly ``names`` among ``names`` + ``others``:
    layer indices generalised (model.layers.3.mlp.up_proj -> re:model\\.layers\\.\\d+\\.mlp\\.up_proj$)
    where no other layer matches the pattern, exact names elsewhere. Name-based readers
    (compressed-tensors' model-free path) then never mistake an embedding for a linear."""
    out: list[str] = []
    by_pattern: dict[str, list[str]] = {}
    for n in names:
        pat = "re:" + re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n).replace(r"\.", "\\.")) + "$"
        by_pattern.setdefault(pat, []).append(n)
    for pat, members in by_pattern.items():
        rx = re.compile(pat[3:])
        if any(rx.match(o) for o in others):
            out += sorted(members)
        else:
            out.append(pat)
    return sorted(out)


def quantization_config(schemes: dict[str, Scheme], ignore: list[str]) -> dict:
    """config.json's ``quantization_config`` for layers -> schemes (one group per distinct scheme)."""
    groups: dict[str, tuple[Scheme, list[str]]] = {}
    for name, s in schemes.items():
        groups.setdefault(s.key(), (s, []))[1].append(name)
    formats = sorted({s.format for s, _ in groups.values()})
    mixed = len(formats) > 1
    config_groups = {}
    everything = set(schemes) | set(ignore)
    for i, (s, names) in enumerate(groups.values()):
        targets = _targets(names, everything - set(names))
        config_groups[f"group_{i}"] = s.to_json(targets, with_format=mixed)
    return {
        "quant_method": QUANT_METHOD,
        "format": "mixed-precision" if mixed else (formats[0] if formats else "dense"),
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


# ------------------------------------------------------------------ quantizing for an exact export


def export_weight_options(recipe, weight_options: dict | None = None) -> dict:
    """The recipe's weight options with what an exact compressed-tensors export needs:
    integer zero points for affine integer weights (lowbit's default is the float HQQ zero)."""
    from ..nn.recipes import parse_recipe

    r = parse_recipe(recipe) if isinstance(recipe, str) else recipe
    opts = dict(weight_options or {})
    if r.weight_fmt.startswith("int"):
        sym = opts.get("symmetric", r.weight_options.get("symmetric", r.weight_fmt == "int8"))
        if not sym:
            opts.setdefault("zero_point", "integer")
    return opts


def quantize_for_export(model: nn.Module, recipe, *, weight_options: dict | None = None, **kwargs):
    """``lowbit.quantize_(model, recipe, ...)`` the way an exact compressed-tensors export
    needs it: integer zero points for affine integer weights, and NVFP4 siblings (q/k/v,
    gate/up) that vLLM fuses quantized with one shared tensor scale (their stacked
    original weights quantized as one tensor, then split by rows; round to nearest
    only). Returns quantize_'s report."""
    from ..nn import quantize_
    from ..nn.recipes import parse_recipe

    r = parse_recipe(recipe) if isinstance(recipe, str) else recipe
    opts = export_weight_options(r, weight_options)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    report = quantize_(model, r, weight_options=opts or None, **kwargs)
    mods = dict(model.named_modules())
    for group in _siblings(list(linears)):
        qls = [mods.get(n) for n in group]
        if not all(isinstance(q, QuantLinear) and q.fmt == "nvfp4" for q in qls):
            continue
        recipes = {q.recipe for q in qls}
        if len(recipes) != 1 or parse_recipe(next(iter(recipes))).method != "rtn":
            continue  # other methods: export(convert=True) unifies the scales and reports the error
        w = torch.cat([linears[n].weight.detach().float() for n in group], dim=0)
        joint = quantize_tensor(w, "nvfp4")
        row = 0
        for n, q in zip(group, qls):
            rows = q.out_features
            qt = QTensor(fmt="nvfp4", shape=torch.Size((rows, q.in_features)), axis=1,
                         codes=joint.codes[row:row + rows].clone(), scales=joint.scales[row:row + rows].clone(),
                         tile=joint.tile, global_scale=joint.global_scale.clone(), options=dict(joint.options))
            row += rows
            new = QuantLinear(qt, linears[n].bias, q.activation, backend=q.backend, recipe=q.recipe)
            parent, _, child = n.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new.to(q.weight_codes.device))
    return report


# ------------------------------------------------------------------ export


@dataclass
class LayerExport:
    name: str
    recipe: str | None
    format: str
    shape: tuple[int, int]
    conversions: list[Conversion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class ExportReport:
    out_dir: str
    format: str = QUANT_METHOD
    layers: list[LayerExport] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """True when no layer was converted (every weight is lowbit's, bit for bit)."""
        return not any(l.conversions for l in self.layers)

    def __str__(self) -> str:
        from ..table import format_table

        fmts = sorted({l.format for l in self.layers})
        head = (f"wrote {self.out_dir} ({self.format}: {', '.join(fmts) or 'no quantized layer'}): "
                f"{len(self.layers)} quantized linear layers, {len(self.ignored)} kept in full precision, "
                f"{len(self.files)} safetensors file(s); "
                + ("every quantized weight exported exactly" if self.exact else "SOME LAYERS WERE CONVERTED"))
        lines = [head]
        kinds: dict[str, list] = {}
        for l in self.layers:
            for c in l.conversions:
                kinds.setdefault(c.what, []).append((l.name, c))
        rows = []
        for what, items in kinds.items():
            worst_name, worst = max(items, key=lambda it: it[1].rel_rms)
            mean = sum(c.rel_rms for _, c in items) / len(items)
            rows.append([what, len(items), f"{mean:.2e}", f"{worst.rel_rms:.2e} ({worst_name})",
                         f"{max(c.max_abs for _, c in items):.3g}"])
        if rows:
            lines.append(format_table(["conversion", "layers", "mean rel. RMS error", "worst (layer)",
                                       "max abs error"], rows))
            lines.append("  (errors against lowbit's dequantization before the conversion; "
                         "report.layers has every layer)")
        notes = sorted({n for l in self.layers for n in l.notes} | set(self.notes))
        lines += [f"  note: {n}" for n in notes]
        return "\n".join(lines)


def _siblings(names: list[str]) -> list[list[str]]:
    """Groups of fused siblings (q/k/v, gate/up) among ``names`` that share a parent."""
    by_parent: dict[str, dict[str, str]] = {}
    for n in names:
        parent, _, leaf = n.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = n
    out = []
    for kids in by_parent.values():
        for fused in FUSED_SIBLINGS:
            group = [kids[f] for f in fused if f in kids]
            if len(group) > 1:
                out.append(group)
    return out


def calibrate_input_amax(model: nn.Module, names: list[str], calibration) -> dict[str, float]:
    """max |x| of the inputs of the layers ``names`` over ``calibration`` (an iterable of
    input_ids tensors, or of dicts passed as ``model(**batch)``)."""
    amax: dict[str, float] = {n: 0.0 for n in names}
    mods = dict(model.named_modules())
    hooks = []
    for n in names:
        def hook(mod, args, n=n):
            amax[n] = max(amax[n], float(args[0].detach().abs().amax()))
        hooks.append(mods[n].register_forward_pre_hook(hook))
    seen = 0
    try:
        with torch.no_grad():
            for batch in calibration:
                model(**batch) if isinstance(batch, dict) else model(batch)
                seen += 1
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise ExportError("the calibration data is empty")
    return amax


def _model_config_dict(model, dtype: torch.dtype | None) -> dict:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ExportError("the model has no Hugging Face config (model.config); pass config=... "
                          "(a transformers PretrainedConfig or a dict) to export a model directory")
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    d.pop("quantization_config", None)
    if not d.get("architectures"):
        d["architectures"] = [type(model).__name__]
    if dtype is not None:
        name = str(dtype).replace("torch.", "")
        d["dtype"] = name
        d["torch_dtype"] = name
    return d


def _plan_layers(model: nn.Module, convert: bool):
    """-> (quantized layers {name: (QuantLinear, QTensor, Scheme, LayerExport)}, ignored linears)."""
    layers: dict[str, list] = {}
    ignored: list[str] = []
    errors: list = []
    seen: dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, QuantLinear):
            if id(m) in seen:
                errors.append(f"layer {name!r} is the same module as {seen[id(m)]!r} (shared weights); "
                              "compressed-tensors stores one weight per layer: quantize a single name")
                continue
            seen[id(m)] = name
            extra = sorted({k for k in m.state_dict() if k not in _WEIGHT_PARTS and k != "bias"})
            if getattr(m, "rotation_block", None) is not None:
                extra.append(f"a Hadamard rotation of block {m.rotation_block}")
            if extra:
                errors.append(f"layer {name!r} carries {', '.join(extra)} (an input transform?), which this "
                              "compressed-tensors export does not write; export it without the transform")
                continue
            q = m.qweight
            rep = LayerExport(name, m.recipe, "", (m.out_features, m.in_features))
            try:
                scheme = weight_scheme(name, q, m.activation)
                bad = _int_zero_out_of_range(q)
                if bad is not None and bool(bad.any()):
                    if not convert:
                        kind = ("float (HQQ-style) zero points" if q.options.get("zero_point") == "float"
                                else f"{int(bad.sum())} integer zero point(s) outside [0, {(1 << q.spec.bits) - 1}]"
                                     " (groups whose range does not contain 0)")
                        raise _fail(name, f"{q.fmt} affine weights with {kind}; compressed-tensors stores "
                                          "integer zero points in that range",
                                    "quantize with weight_options={'zero_point': 'integer'} for an exact export "
                                    "(groups without 0 still need conversion), or pass convert=True "
                                    "(lowbit export --convert) to re-quantize them and report the error")
                    q, c = convert_int_zero_points(q)
                    rep.conversions.append(c)
                if scheme.format == "int-quantized" and scheme.input_activations is not None:
                    rep.notes.append("int8 activations: compressed-tensors' CPU emulation (transformers) uses "
                                     "scale amax/127.5, vLLM's kernel and lowbit amax/127")
                if scheme.format == "pack-quantized" and not scheme.weights["symmetric"]:
                    rep.notes.append(AFFINE_NOTE)
                if scheme.weights["type"] == "int" and scheme.weights["num_bits"] not in (4, 8):
                    rep.notes.append(f"{scheme.weights['num_bits']}-bit integer weights load in transformers; "
                                     "vLLM's kernels take 4 and 8 bits")
            except LayerError as e:
                errors.append(e)
                continue
            rep.format = scheme.format
            rep.recipe = m.recipe or recipe_name(scheme)
            layers[name] = [m, q, scheme, rep]
        elif isinstance(m, nn.Linear):
            ignored.append(name)
    if errors:
        raise ExportError("cannot export as compressed-tensors:\n  " + _summarize(errors))
    return layers, ignored


def export(model: nn.Module, out_dir: str | os.PathLike, format: str = QUANT_METHOD, *, tokenizer=None,
           config=None, convert: bool = False, calibration=None, dtype: torch.dtype | None = None,
           max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> ExportReport:
    """Write ``model`` (quantized with lowbit) as a Hugging Face model directory in the
    compressed-tensors format: config.json with ``quantization_config``, safetensors
    shards, the tokenizer when given, generation_config.json when the model has one.

    convert: allow the conversions listed in the module docstring (refused otherwise).
    calibration: input batches (input_ids tensors or dicts) to measure the static input
        global scale of NVFP4 activations (a4w4-nvfp4); lowbit computes it per call,
        compressed-tensors and vLLM store one per layer.
    dtype: cast the full-precision tensors (embeddings, norms, lm_head, biases) to this
        dtype (default: as they are in the model).
    """
    if format != QUANT_METHOD:
        raise ValueError(f"format must be {QUANT_METHOD!r} (lowbit's own format: lowbit.save), got {format!r}")
    out = Path(out_dir)
    layers, ignored = _plan_layers(model, convert)
    report = ExportReport(str(out), ignored=sorted(ignored))

    # NVFP4: fused siblings must share one global scale (vLLM keeps the largest)
    nv = [n for n, v in layers.items() if v[2].format == "nvfp4-pack-quantized"]
    for group in _siblings(nv):
        scales = [layers[n][1].global_scale.float().reshape(()) for n in group]
        if all(bool(s == scales[0]) for s in scales):
            continue
        if not convert:
            raise ExportError(
                f"cannot export as compressed-tensors: NVFP4 layers {', '.join(group)} have different global "
                "scales; vLLM fuses them into one matmul with one global scale (the largest), which would "
                "rescale the others. Quantize them with a shared scale (lowbit quantize --export "
                "compressed-tensors does), or pass convert=True to re-quantize them with their shared scale "
                "(the error is reported)")
        new, c = share_nvfp4_global_scale([layers[n][1] for n in group])
        for n, q in zip(group, new):
            layers[n][1] = q
            layers[n][3].conversions.append(c)

    input_gs: dict[str, float] = {}
    needs_cal = [n for n, v in layers.items() if v[2].format == "nvfp4-pack-quantized"
                 and v[2].input_activations is not None]
    if needs_cal:
        if calibration is None:
            raise ExportError(
                f"cannot export as compressed-tensors: {len(needs_cal)} layer(s) quantize activations to NVFP4 "
                f"(e.g. {needs_cal[0]!r}); compressed-tensors and vLLM use a static per-layer activation global "
                "scale (input_global_scale), lowbit computes it per call. Pass calibration=[input_ids, ...] "
                "(lowbit export --calib-tokens N) to measure it, or export the weight-only recipe a16w4-nvfp4")
        amax = calibrate_input_amax(model, needs_cal, calibration)
        for n in needs_cal:
            a = amax[n]
            input_gs[n] = float(torch.tensor(NVFP4_RANGE, dtype=torch.float32) / torch.tensor(a, dtype=torch.float32)) \
                if a > 0 else 1.0
            layers[n][3].notes.append(
                "NVFP4 activations: the export stores a static input global scale (amax over the calibration "
                "data); lowbit's reference computes it per call, so outputs differ where the run-time amax differs")

    for n, v in layers.items():
        if v[2].format == "nvfp4-pack-quantized":
            _, exact = nvfp4_reciprocal(v[1].global_scale)
            if not exact:
                v[3].notes.append(f"{n}: no float32 g with 1/g == lowbit's NVFP4 tensor scale; vLLM's 1/g "
                                  "differs from it by one ulp")

    # tensors: quantized layers replaced by their compressed-tensors tensors, the rest as they are
    state = model.state_dict()
    tie = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    quant_prefixes = set(layers)
    entries: list[st.Entry] = []
    seen_ptr: dict[tuple, str] = {}
    written_layers: set[str] = set()
    for key, t in state.items():
        owner, _, leaf = key.rpartition(".")
        if owner in quant_prefixes:
            if owner in written_layers:
                continue
            written_layers.add(owner)
            m, q, scheme, rep = layers[owner]
            bias = m.bias.detach() if m.bias is not None else None
            if bias is not None and dtype is not None:
                bias = bias.to(dtype)
            for name, tensor in layer_tensors(owner, q, scheme, bias, input_gs.get(owner)).items():
                entries.append(st.Entry.of(name, tensor))
            continue
        if t.is_floating_point() and dtype is not None:
            t = t.to(dtype)
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if ptr is not None and ptr in seen_ptr:
            if tie:
                continue  # tied weight (lm_head = embed_tokens): Hugging Face stores it once
            t = t.clone()
        elif ptr is not None:
            seen_ptr[ptr] = key
        entries.append(st.Entry.of(key, t))

    qconfig = quantization_config({n: v[2] for n, v in layers.items()}, ignored)
    out.mkdir(parents=True, exist_ok=True)
    if config is None:
        cfg = _model_config_dict(model, dtype)
    else:
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    cfg["quantization_config"] = qconfig
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(e.nbytes for e in entries), unit="B", unit_scale=True, desc="export", leave=False)
    report.files = st.write_sharded(out, entries, max_shard_bytes, metadata={"format": "pt", "producer": "lowbit"},
                                    progress=(lambda e: bar.update(e.nbytes)) if bar else None)
    if bar:
        bar.close()
    _write_json(out / "config.json", cfg)
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "save_pretrained"):
        try:
            gen.save_pretrained(out)
        except Exception as e:  # a generation config that transformers itself refuses to save
            report.notes.append(f"generation_config.json not written ({type(e).__name__}: {e})")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    else:
        report.notes.append("no tokenizer given: the directory has none (pass tokenizer=...)")
    report.layers = [v[3] for v in layers.values()]
    return report


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


# ------------------------------------------------------------------ reading


def read_quantization_config(directory: str | os.PathLike) -> dict | None:
    """config.json's compressed-tensors ``quantization_config``, or None."""
    p = Path(directory) / "config.json"
    if not p.is_file():
        return None
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    qc = cfg.get("quantization_config") or cfg.get("compression_config")
    if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD:
        return qc
    return None


def is_compressed_tensors_dir(directory: str | os.PathLike) -> bool:
    return Path(directory).is_dir() and read_quantization_config(directory) is not None


def _match(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target


def _infer_format(scheme: dict, top: str) -> str:
    if scheme.get("format"):
        return scheme["format"]
    if top and top != "mixed-precision":
        return top
    w, a = scheme.get("weights") or {}, scheme.get("input_activations")
    if w.get("type") == "float" and w.get("num_bits") == 4:
        return "nvfp4-pack-quantized" if w.get("group_size") == 16 else "mxfp4-pack-quantized"
    if w.get("type") == "int":
        return "int-quantized" if a is not None else "pack-quantized"
    return "float-quantized" if a is not None else "naive-quantized"


_IMPORT_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized",
                   "nvfp4-pack-quantized", "mxfp4-pack-quantized")


def _scheme_for(module: str, qc: dict) -> dict | None:
    for ign in qc.get("ignore") or []:
        if _match(module, ign):
            return None
    for g in (qc.get("config_groups") or {}).values():
        if isinstance(g, list):  # a preset name -> targets; resolved by compressed-tensors only
            raise ValueError("config_groups given as preset names are not supported by lowbit's reader")
        for t in g.get("targets") or []:
            if t == "Linear" or _match(module, t):
                return g
    return None


def _import_activation(name: str, a: dict | None, warn: list[str]) -> ActivationSpec:
    if a is None:
        return ActivationSpec()
    bits, typ, strat = a.get("num_bits"), a.get("type"), a.get("strategy")
    dyn = a.get("dynamic")
    if typ == "int" and bits == 8 and strat == "token" and dyn is True and a.get("symmetric", True):
        return ActivationSpec("int8", {"granularity": "token"})
    if typ == "float" and bits == 8 and strat in ("token", "tensor", "group") and a.get("group_size") != 32:
        if dyn is not True:
            warn.append((name, "static FP8 activation scales are replaced by dynamic ones"))
        opts = {"granularity": strat}
        if strat == "group":
            opts["group_size"] = int(a["group_size"])
        return ActivationSpec("fp8_e4m3", opts)
    if typ == "float" and bits == 4 and a.get("group_size") == 16:
        warn.append((name, "NVFP4 activations use a per-call tensor scale in lowbit, not the checkpoint's "
                           "static input_global_scale"))
        return ActivationSpec("nvfp4", {})
    if typ == "float" and a.get("group_size") == 32 and bits in (4, 8):
        warn.append((name, "MX activations use lowbit's OCP floor scale rule, not compressed-tensors' rounding"))
        return ActivationSpec("mxfp4" if bits == 4 else "mxfp8_e4m3", {})
    raise ValueError(f"layer {name!r}: activation scheme {a} has no lowbit equivalent")


def _import_layer(name: str, fmt: str, scheme: dict, t: dict[str, torch.Tensor], warn: list[str]) -> QTensor:
    w = scheme.get("weights") or {}
    bits, typ, strat = w.get("num_bits"), w.get("type"), w.get("strategy")
    sym = bool(w.get("symmetric", True))
    if fmt == "pack-quantized":
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"layer {name!r}: {bits}-bit integer weights (lowbit has int2/3/4/8)")
        n, k = (int(v) for v in t["weight_shape"].tolist())
        p = _from_int32_words(t["weight_packed"], k, bits).to(torch.int64)
        if sym:
            p = p ^ (1 << (bits - 1))
        codes = pack_codes(p, bits)
        scales = t["weight_scale"]
        if strat == "group":
            g = int(w["group_size"])
            tile, opts = (1, g), {"granularity": "group", "group_size": g}
        elif strat == "channel":
            tile, opts = (1, k), {"granularity": "channel"}
        elif strat == "tensor":
            tile, opts = (n, k), {"granularity": "tensor"}
            scales = scales.reshape(1, 1)
        else:
            raise ValueError(f"layer {name!r}: pack-quantized strategy {strat!r} is not supported")
        zeros = None
        if not sym:
            if strat == "tensor":
                raise ValueError(f"layer {name!r}: affine weights with one scale per tensor are not supported")
            groups = scales.shape[1]
            zw = t["weight_zero_point"].t().contiguous()  # [groups, words over N]
            zeros = _from_int32_words(zw, n, bits).t().contiguous().to(scales.dtype)
            if zeros.shape != (scales.shape[0], groups):
                raise ValueError(f"layer {name!r}: zero points {list(zeros.shape)} do not match scales "
                                 f"{list(scales.shape)}")
            opts.update(symmetric=False, zero_point="integer")
        else:
            opts["symmetric"] = True
        fmt_l = f"int{bits}"
        if bits == 8 and sym:
            codes = codes.view(torch.int8)
        return QTensor(fmt=fmt_l, shape=torch.Size((n, k)), axis=1, codes=codes, scales=scales.contiguous(),
                       zeros=zeros, tile=tile, options=opts).validate()
    if fmt in ("int-quantized", "float-quantized", "naive-quantized"):
        weight = t["weight"]
        n, k = weight.shape
        scales = t["weight_scale"]
        if weight.dtype == torch.int8:
            if not sym or bits != 8:
                raise ValueError(f"layer {name!r}: {'affine ' if not sym else ''}{bits}-bit plain integer "
                                 "weights are not supported (lowbit reads symmetric int8)")
            codes, fmt_l, opts = weight.contiguous(), "int8", {"symmetric": True}
        elif weight.dtype == torch.float8_e4m3fn:
            codes, fmt_l, opts = weight.contiguous().view(torch.uint8), "fp8_e4m3", {}
        else:
            raise ValueError(f"layer {name!r}: weight of dtype {weight.dtype} in format {fmt}")
        if strat == "channel":
            tile = (1, k)
            opts["granularity"] = "channel"
            scales = scales.reshape(n, 1)
        elif strat == "tensor":
            tile = (n, k)
            opts["granularity"] = "tensor"
            scales = scales.reshape(1, 1)
        elif strat == "group":
            g = int(w["group_size"])
            tile = (1, g)
            opts.update(granularity="group", group_size=g)
        elif strat == "block":
            br, bc = (int(v) for v in w["block_structure"])
            tile = (br, bc)
            opts.update(granularity="block", block_shape=(br, bc))
        else:
            raise ValueError(f"layer {name!r}: strategy {strat!r} is not supported")
        return QTensor(fmt=fmt_l, shape=torch.Size((n, k)), axis=1, codes=codes, scales=scales.contiguous(),
                       tile=tile, options=opts).validate()
    if fmt == "nvfp4-pack-quantized":
        packed = t["weight_packed"].view(torch.uint8)
        n, k = packed.shape[0], packed.shape[1] * 2
        gs = t["weight_global_scale"].to(torch.float32).reshape(-1)
        if gs.numel() != 1:
            warn.append((name, "several weight global scales; lowbit keeps the largest, as vLLM does"))
        s_t = (torch.ones((), dtype=torch.float32) / gs.max()).reshape(())
        return QTensor(fmt="nvfp4", shape=torch.Size((n, k)), axis=1, codes=packed.contiguous(),
                       scales=t["weight_scale"].contiguous().view(torch.uint8), tile=(1, 16),
                       global_scale=s_t, options={}).validate()
    if fmt == "mxfp4-pack-quantized":
        packed = t["weight_packed"].view(torch.uint8)
        n, k = packed.shape[0], packed.shape[1] * 2
        return QTensor(fmt="mxfp4", shape=torch.Size((n, k)), axis=1, codes=packed.contiguous(),
                       scales=t["weight_scale"].contiguous().view(torch.uint8), tile=(1, 32), options={}).validate()
    raise ValueError(f"layer {name!r}: compressed-tensors format {fmt!r} is not supported by lowbit's reader "
                     f"(supported: {', '.join(_IMPORT_FORMATS)})")


_CT_PARAMS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_global_scale",
              "input_global_scale", "input_scale", "input_zero_point", "weight_g_idx")


def read(directory: str | os.PathLike):
    """-> (layers {module: (QTensor, ActivationSpec, recipe name)}, other tensors {name: tensor}, warnings)."""
    from .checkpoint import CheckpointError

    d = Path(directory)
    qc = read_quantization_config(d)
    if qc is None:
        raise CheckpointError(f"{d} is not a compressed-tensors checkpoint (no quantization_config with "
                              f"quant_method {QUANT_METHOD!r} in config.json)")
    status = qc.get("quantization_status", "compressed")
    top = qc.get("format") or ""
    if status != "compressed" or top in ("dense", "fakequant"):
        raise CheckpointError(f"{d}: quantization_status {status!r}, format {top!r}: the weights are stored in "
                              "full precision (not compressed); load it with transformers instead")
    if qc.get("sparsity_config"):
        raise CheckpointError(f"{d}: sparse compressed-tensors checkpoints are not supported")
    try:
        reader = st.CheckpointReader(d)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    warn: list[str] = []
    layers: dict = {}
    other: dict[str, torch.Tensor] = {}
    with reader:
        names = reader.keys()
        modules = sorted({n.rpartition(".")[0] for n in names
                          if n.rpartition(".")[2] in ("weight_packed", "weight_scale")})
        used: set[str] = set()
        for mod in modules:
            scheme = _scheme_for(mod, qc)
            if scheme is None:
                continue
            fmt = _infer_format(scheme, top)
            t = {p: reader.get(f"{mod}.{p}") for p in _CT_PARAMS + ("weight",) if f"{mod}.{p}" in reader}
            try:
                q = _import_layer(mod, fmt, scheme, t, warn)
                act = _import_activation(mod, scheme.get("input_activations"), warn)
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{d}: {e}") from None
            s = Scheme(fmt, scheme.get("weights") or {}, scheme.get("input_activations"))
            layers[mod] = (q, act, recipe_name(s) if fmt in _IMPORT_FORMATS else fmt)
            used |= {f"{mod}.{p}" for p in t}
        kv = [n for n in names if n.endswith((".k_scale", ".v_scale"))]
        if kv:
            warn.append((None, f"{len(kv)} kv-cache scales ignored (lowbit does not quantize the kv cache)"))
        for n in names:
            if n not in used and n not in kv:
                other[n] = reader.get(n)
    return layers, other, warn


def load(directory: str | os.PathLike, model: nn.Module | None = None):
    """Read a compressed-tensors checkpoint directory (lowbit's exports and llm-compressor's).

    Without ``model``: name -> tensor, quantized layers as ``<layer>.weight`` QTensors.
    With ``model`` (e.g. ``AutoModelForCausalLM.from_config(config)``): checks that
    everything fits, replaces the quantized layers by QuantLinear and loads every
    tensor; raises CheckpointError and leaves the model untouched on a mismatch.
    Differences that lowbit cannot represent exactly (static activation scales) are
    reported with ``warnings.warn``.
    """
    from .checkpoint import CheckpointError

    layers, other, warn = read(directory)
    by_msg: dict[str, list] = {}
    for layer, msg in warn:
        by_msg.setdefault(msg, []).append(layer)
    for msg, names in by_msg.items():
        names = [n for n in names if n]
        who = (f"{len(names)} layer(s) ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''}): "
               if names else "")
        warnings.warn(f"{directory}: {who}{msg}", stacklevel=2)
    if model is None:
        out = {f"{m}.weight": v[0] for m, v in layers.items()}
        out.update(other)
        return out
    modules = dict(model.named_modules())
    new: dict[str, QuantLinear] = {}
    for name, (q, act, recipe) in layers.items():
        mod = modules.get(name)
        if not isinstance(mod, (nn.Linear, QuantLinear)):
            raise CheckpointError(f"checkpoint has a quantized layer {name!r} but the model has "
                                  f"{'no such module' if mod is None else type(mod).__name__}")
        if (mod.out_features, mod.in_features) != tuple(q.shape):
            raise CheckpointError(f"layer {name!r}: checkpoint weight is {q.shape[0]}x{q.shape[1]}, the model's "
                                  f"is {mod.out_features}x{mod.in_features}")
        bias = other.pop(f"{name}.bias", None)
        if (bias is not None) != (mod.bias is not None):
            raise CheckpointError(f"layer {name!r}: bias {'present' if bias is not None else 'absent'} in the "
                                  "checkpoint but not in the model (or the reverse)")
        new[name] = QuantLinear(q, bias, act, recipe=recipe)
    state = model.state_dict()
    expected = {k: v for k, v in state.items() if k.rpartition(".")[0] not in layers}
    # tied weights (lm_head = embed_tokens) are stored once
    ptrs: dict = {}
    tied = set()
    for k, v in expected.items():
        if v.numel():
            p = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
            if p in ptrs and v.device.type != "meta":
                tied.add(k)
            ptrs.setdefault(p, k)
    missing = sorted(k for k in set(expected) - set(other) if k not in tied)
    unexpected = sorted(set(other) - set(expected))
    wrong = sorted(k for k in set(expected) & set(other) if tuple(other[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        def show(keys):
            return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        problems = [f"{what}: {show(keys)}" for what, keys in
                    (("missing in the checkpoint", missing), ("not in the model", unexpected),
                     ("shape differs", wrong)) if keys]
        raise CheckpointError("checkpoint does not fit this model; " + "; ".join(problems))
    for name, q in new.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, q)
    cast = {k: v.to(expected[k].dtype) for k, v in other.items()}
    on_meta = any(v.device.type == "meta" for v in expected.values())
    model.load_state_dict(cast, strict=False, assign=on_meta)
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model
