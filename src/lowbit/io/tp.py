"""Tensor-parallel checks: does an N-way split of every quantized linear layer fall on
scale-group, block, head and kernel-tile boundaries?

A serving engine splits each linear layer of a decoder over the GPUs:

- column-parallel (q/k/v, gate/up): the output features N are cut into ``tp``
  slices; every GPU holds whole rows, so only scale tiles that span several rows
  (FP8 128x128 blocks) and the attention heads (q: heads; k/v: key/value heads,
  replicated when tp exceeds their number) must not be cut;
- row-parallel (o, down): the input features K are cut; every GPU holds a
  K/tp slice of each row, which must be made of whole scale groups (or blocks,
  MX/NVFP4 blocks) and whole packed words.

``check(layers, tp)`` returns a report naming each layer that breaks and how to
fix it (a group that divides K/tp, padding K, or a smaller tp). Errors are
splits that cannot be served correctly or that the engine refuses; notes are
shapes the kernels pad (correct, slower). The kernels' tile rules live in
``lowbit_kernel_tiles`` and ``vllm_kernel_rules``, one function each, so they
are easy to update as the kernels change.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "qkv_proj", "gate_up_proj", "query_key_value",
          "w1", "w3", "fc1", "c_fc", "c_attn", "in_proj")
ROW = ("o_proj", "down_proj", "out_proj", "dense", "w2", "fc2", "c_proj", "dense_4h_to_h")


@dataclass(frozen=True)
class LinearSpec:
    """One linear layer as far as tensor parallelism is concerned."""

    name: str
    n: int  # out_features
    k: int  # in_features
    fmt: str | None = None  # lowbit weight format; None: full precision
    tile: tuple[int, int] | None = None  # scale tile (rows, K); K == tile[1] >= k means one scale per row
    heads: int | None = None  # attention heads in N (q: heads, k/v: kv heads)
    head_dim: int | None = None

    @property
    def split(self) -> str:
        leaf = self.name.rsplit(".", 1)[-1]
        if leaf in COLUMN:
            return "column"
        if leaf in ROW:
            return "row"
        return "none"


@dataclass
class Issue:
    severity: str  # "error" (cannot be served correctly) | "warning" (an engine's fast kernel refuses it) | "note"
    what: str
    fix: str = ""


@dataclass
class LayerCheck:
    spec: LinearSpec
    shard: tuple[int, int] | None  # (N, K) per GPU
    issues: list[Issue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No error (warnings: see TPReport.strict)."""
        return not any(i.severity == "error" for i in self.issues)


@dataclass
class TPReport:
    tp: int
    layers: list[LayerCheck]
    engines: tuple[str, ...]

    strict: bool = False  # warnings count as failures

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> list[LayerCheck]:
        bad = ("error", "warning") if self.strict else ("error",)
        return [l for l in self.layers if any(i.severity in bad for i in l.issues)]

    @property
    def warnings(self) -> list[LayerCheck]:
        return [l for l in self.layers if any(i.severity == "warning" for i in l.issues)]

    def __str__(self) -> str:
        from ..table import format_table

        quant = [l for l in self.layers if l.spec.fmt]
        bad = self.failures
        warn = self.warnings
        head = (f"tensor parallel {self.tp}: {len(self.layers)} linear layers checked ({len(quant)} quantized), "
                + ("every split falls on group, block and head boundaries" if not bad
                   else f"{len(bad)} layer(s) do NOT split cleanly")
                + (f"; {len(warn)} layer(s) miss an engine's kernel tiles (warnings)" if warn
                   else "; every shard fits the kernels' tiles" if not bad else ""))
        lines = [head]
        # one row per distinct (problem, shape) so that 80 identical layers take one line
        rows: dict[tuple, list[str]] = {}
        for l in self.layers:
            for i in l.issues:
                key = (i.severity, l.spec.split, f"{l.spec.n}x{l.spec.k}",
                       f"{l.shard[0]}x{l.spec.k if l.spec.split != 'row' else l.shard[1]}" if l.shard else "-",
                       l.spec.fmt or "full", i.what, i.fix)
                rows.setdefault(key, []).append(l.spec.name)
        if rows:
            table = []
            order = {"error": 0, "warning": 1, "note": 2}
            for (sev, split, shape, shard, fmt, what, fix), names in sorted(rows.items(), key=lambda kv: order[kv[0][0]]):
                shown = _compact(names)
                table.append([sev.upper(), shown, split, shape, shard, fmt, what + (f" -> fix: {fix}" if fix else "")])
            lines.append(format_table(["", "layers", "split", "N x K", "per GPU", "format", "problem"], table))
        lines.append(f"checked for: {', '.join(self.engines)} (errors: a scale group, block or head cut between GPUs; "
                     "warnings: vLLM's Marlin kernels refuse the shard and vLLM falls back to a slower kernel, or "
                     "refuses the layer where Marlin is its only one; notes: lowbit's kernels pad)"
                     + ("; --strict: warnings fail" if self.strict else ""))
        return "\n".join(lines)


def _compact(names: list[str]) -> str:
    """model.layers.0.mlp.down_proj ... model.layers.79.mlp.down_proj -> model.layers.{0..79}.mlp.down_proj (80)."""
    pats: dict[str, list[int]] = {}
    for n in names:
        m = re.search(r"\.(\d+)\.", n)
        key = n if not m else n[: m.start(1)] + "{}" + n[m.end(1):]
        pats.setdefault(key, []).append(int(m.group(1)) if m else -1)
    out = []
    for key, idx in pats.items():
        if "{}" in key:
            idx = sorted(idx)
            if len(idx) > 1:
                out.append(key.replace("{}", "{" + f"{idx[0]}..{idx[-1]}" + "}") + f" ({len(idx)})")
            else:
                out.append(key.replace("{}", str(idx[0])))
        else:
            out.append(key)
    return ", ".join(out)


# ------------------------------------------------------------------ the rules


def _bits(fmt: str) -> int:
    from ..formats import get_format

    return get_format(fmt).bits


def _chunk_codes(fmt: str) -> int:
    """Codes per whole chunk of lowbit's canonical packing (a K slice must start on one)."""
    from ..formats.pack import chunk

    return chunk(_bits(fmt))[0]


def _per_row(spec: LinearSpec) -> bool:
    return spec.tile is not None and spec.tile[1] >= spec.k


def lowbit_kernel_tiles(fmt: str, tile: tuple[int, int] | None) -> tuple[int, int] | None:
    """(N, K) multiples that lowbit's Triton weight-only kernels run without padding one
    GPU's shard (src/lowbit/kernels/packing.py: N padded to N_ALIGN = 256, K to
    TILE_K = 128), or None where they do not run the format (reference path)."""
    if fmt not in ("int4", "int8", "mxfp4"):
        return None
    return 256, 128


def vllm_kernel_rules(fmt: str, tile: tuple[int, int] | None, activation: str | None = None) -> list[tuple[str, int]]:
    """What vLLM's kernels require of one GPU's shard: [("N" or "K", multiple)].
    Weight-only int4/int8, FP8, MXFP4 and NVFP4 run on Marlin on Hopper
    (verify_marlin_supports_shape: N per GPU a multiple of 64, K per GPU of 128)."""
    if activation is None and fmt in ("int4", "int8", "fp8_e4m3", "mxfp4", "nvfp4"):
        return [("N", 64), ("K", 128)]
    return []


def _divisors_fix(k_shard: int, current: int) -> str:
    good = [g for g in (32, 64, 128, 256) if k_shard % g == 0 and g != current]
    return f"a group that divides {k_shard} ({', '.join(map(str, good))})" if good else ""


def _tp_fix(total: int, unit: int, tp: int) -> str:
    """The largest divisor of tp (the GPU counts one would actually use) that works."""
    ok = [t for t in range(tp - 1, 1, -1) if tp % t == 0 and total % (t * unit) == 0]
    return f"tp {ok[0]}" if ok else ""


def check_layer(spec: LinearSpec, tp: int, engines=("lowbit", "vllm"), activation: str | None = None) -> LayerCheck:
    split = spec.split
    issues: list[Issue] = []
    n, k = spec.n, spec.k
    if spec.fmt is None:  # full precision: the engine splits (and pads) it as it would the original
        return LayerCheck(spec, None, [])
    if split == "none":
        return LayerCheck(spec, None, [Issue("note", "not split (not a known column- or row-parallel layer)")])
    if split == "column":
        dim_total = n
        replicated = False
        if spec.heads and spec.head_dim:
            kv = spec.name.rsplit(".", 1)[-1] in ("k_proj", "v_proj")
            if spec.heads % tp == 0:
                pass
            elif kv and tp % spec.heads == 0:
                replicated = True  # vLLM replicates key/value heads when tp exceeds them
            else:
                what = "key/value heads" if kv else "attention heads"
                issues.append(Issue("error", f"{spec.heads} {what} cannot be split {tp} ways",
                                    f"a tp that divides {spec.heads}" + (" (or a multiple of it)" if kv else "")))
                return LayerCheck(spec, None, issues)
        if not replicated and n % tp:
            issues.append(Issue("error", f"N={n} is not divisible by tp={tp}", _tp_fix(n, 1, tp)))
            return LayerCheck(spec, None, issues)
        n_s, k_s = (spec.head_dim if replicated else n // tp), k
        if replicated:
            issues.append(Issue("note", f"{spec.heads} key/value heads replicated over {tp} GPUs (one per GPU)"))
        if spec.fmt and spec.tile and spec.tile[0] > 1 and n_s % spec.tile[0]:
            issues.append(Issue("error", f"N per GPU {n_s} cuts the {spec.tile[0]}x{spec.tile[1]} scale blocks",
                                f"N per GPU a multiple of {spec.tile[0]}: " + (_tp_fix(n, spec.tile[0], tp) or
                                                                                "smaller blocks")))
        del dim_total
    else:
        if k % tp:
            issues.append(Issue("error", f"K={k} is not divisible by tp={tp}", _tp_fix(k, 1, tp)))
            return LayerCheck(spec, None, issues)
        n_s, k_s = n, k // tp
        if spec.fmt and spec.tile and not _per_row(spec):
            g = spec.tile[1]
            if k_s % g:
                fix = " or ".join(f for f in (
                    _divisors_fix(k_s, g),
                    f"pad K to {math.ceil(k / (tp * g)) * tp * g} (zero input columns; exact, "
                    f"{math.ceil(k / (tp * g)) * tp * g - k} more columns)",
                    _tp_fix(k, g, tp)) if f)
                what = ("block" if spec.fmt in ("mxfp4", "nvfp4") or spec.fmt.startswith("mx") else "group")
                issues.append(Issue("error", f"K per GPU {k_s} is not a multiple of the {what} of {g}: a scale "
                                             "group would be cut between two GPUs", fix))
        if spec.fmt:
            c = _chunk_codes(spec.fmt)
            if k_s % c:
                issues.append(Issue("error", f"K per GPU {k_s} cuts a packed chunk of {c} {_bits(spec.fmt)}-bit codes",
                                    _tp_fix(k, c, tp)))
            words = 32 // math.gcd(32, _bits(spec.fmt))  # compressed-tensors packs codes into int32 words
            if spec.fmt.startswith("int") and _bits(spec.fmt) < 8 and k_s % words:
                issues.append(Issue("error", f"K per GPU {k_s} cuts an int32 word of {words} packed codes",
                                    _tp_fix(k, words, tp)))
    shard = (n_s, k_s)
    if spec.fmt:
        if "lowbit" in engines:
            t = lowbit_kernel_tiles(spec.fmt, spec.tile)
            if t:
                pads = [f"{d} per GPU {v} is padded to a multiple of {m}"
                        for d, v, m in (("N", n_s, t[0]), ("K", k_s, t[1])) if v % m]
                if pads:
                    issues.append(Issue("note", "lowbit kernels: " + "; ".join(pads) + " (correct, slower)"))
        if "vllm" in engines:
            for dim, m in vllm_kernel_rules(spec.fmt, spec.tile, activation):
                v = n_s if dim == "N" else k_s
                if v % m:
                    total = n if dim == "N" else k
                    fallback = "pad K (zero input columns)" if dim == "K" else "a smaller tp"
                    issues.append(Issue("warning", f"vLLM's Marlin kernels need {dim} per GPU a multiple of {m}, "
                                                   f"got {v}", _tp_fix(total, m, tp) or fallback))
            if spec.fmt.startswith("int") and spec.tile and not _per_row(spec) and spec.tile[1] not in (32, 64, 128):
                issues.append(Issue("warning", f"vLLM's Marlin kernels take groups of 32, 64, 128 or per channel, "
                                               f"not {spec.tile[1]}", "group 128"))
    return LayerCheck(spec, shard, issues)


def check(layers: list[LinearSpec], tp: int, engines=("lowbit", "vllm"),
          activations: dict[str, str | None] | None = None, strict: bool = False) -> TPReport:
    """Check an N-way split of every layer. ``strict``: warnings (kernel tiles an engine
    wants) fail too, not only splits that cut a scale group, block or head."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    acts = activations or {}
    return TPReport(tp, [check_layer(s, tp, engines, acts.get(s.name)) for s in layers], tuple(engines), strict)


# ------------------------------------------------------------------ where the shapes come from


def recipe_tile(recipe, k: int, weight_options: dict | None = None) -> tuple[str, tuple[int, int]]:
    """(weight format, scale tile) a recipe gives a weight with K input features."""
    import torch

    from ..formats import quantize_tensor
    from ..nn.recipes import parse_recipe

    r = parse_recipe(recipe) if isinstance(recipe, str) else recipe
    opts = {**r.weight_options, **(weight_options or {})}
    q = quantize_tensor(torch.ones(1, k), r.weight_fmt, **opts)
    return r.weight_fmt, tuple(q.tile)


def _head_info(name: str, cfg: dict) -> tuple[int | None, int | None]:
    leaf = name.rsplit(".", 1)[-1]
    heads = cfg.get("num_attention_heads")
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads and cfg.get("hidden_size") else None)
    if leaf == "q_proj":
        return heads, hd
    if leaf in ("k_proj", "v_proj"):
        return kv, hd
    return None, None


def layers_from_config(cfg: dict, recipe=None, skip=("lm_head",), weight_options=None) -> list[LinearSpec]:
    """The linear layers of a Llama-style decoder described by a Hugging Face config.json."""
    try:
        h, inter, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
        n_layers = cfg["num_hidden_layers"]
    except KeyError as e:
        raise ValueError(f"config lacks {e.args[0]!r}: lowbit derives shapes from Llama-style configs only; "
                         "point lowbit check at a directory with safetensors weights instead") from None
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim") or h // heads
    shapes = [("self_attn.q_proj", heads * hd, h), ("self_attn.k_proj", kv * hd, h), ("self_attn.v_proj", kv * hd, h),
              ("self_attn.o_proj", h, heads * hd), ("mlp.gate_proj", inter, h), ("mlp.up_proj", inter, h),
              ("mlp.down_proj", h, inter)]
    raw = [(f"model.layers.{i}.{leaf}", n, k) for i in range(n_layers) for leaf, n, k in shapes]
    raw.append(("lm_head", cfg.get("vocab_size", 0), h))
    return _with_recipe(raw, cfg, recipe, skip, weight_options)


def _with_recipe(raw, cfg, recipe, skip, weight_options) -> list[LinearSpec]:
    out = []
    tiles: dict[int, tuple] = {}
    for name, n, k in raw:
        fmt = tile = None
        if recipe is not None and not any(name == s or name.endswith("." + s) or name.rsplit(".", 1)[-1] == s
                                           for s in skip):
            if k not in tiles:
                tiles[k] = recipe_tile(recipe, k, weight_options)
            fmt, tile = tiles[k]
        heads, hd = _head_info(name, cfg)
        out.append(LinearSpec(name, n, k, fmt, tile, heads, hd))
    return out


def layers_from_registry(model: str, recipe=None, weight_options=None) -> list[LinearSpec]:
    """One decoder layer of a model of lowbit's shape registry (lowbit.bench.shapes), as
    separate q/k/v and gate/up projections (the engine shards each before fusing)."""
    from ..bench.shapes import MODELS

    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    c = MODELS[model]
    cfg = {"hidden_size": c.hidden, "intermediate_size": c.intermediate, "num_attention_heads": c.heads,
           "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim, "num_hidden_layers": 1, "vocab_size": 0}
    return [s for s in layers_from_config(cfg, recipe, weight_options=weight_options) if s.name != "lm_head"]


def layers_from_directory(directory: str | os.PathLike, recipe=None, weight_options=None,
                          skip=("lm_head",)) -> tuple[list[LinearSpec], dict[str, str | None]]:
    """Linear layers of a checkpoint directory: lowbit's own (lowbit.json), compressed-tensors,
    or plain Hugging Face weights (quantized as ``recipe`` would quantize them); a directory
    with only config.json is read as a Llama-style config. -> (layers, activation format per layer)."""
    d = Path(directory)
    cfg = {}
    if (d / "config.json").is_file():
        cfg = json.loads((d / "config.json").read_text())
    meta = d / "lowbit.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        out, acts = [], {}
        for name, e in (m.get("quantized_layers") or {}).items():
            n, k = e["shape"]
            heads, hd = _head_info(name, cfg) if cfg else (None, None)
            out.append(LinearSpec(name, n, k, e["fmt"], tuple(e["tile"]), heads, hd))
            acts[name] = (e.get("activation") or {}).get("fmt")
        return out, acts
    from . import compressed_tensors as ct
    from ._safetensors import read_header, checkpoint_files

    try:
        files = checkpoint_files(d)
    except FileNotFoundError:
        if not cfg:
            raise FileNotFoundError(f"{d} has neither safetensors weights nor a config.json") from None
        return layers_from_config(cfg, recipe, skip, weight_options), {}
    infos = {}
    for f in files:
        infos.update(read_header(f)[0])
    if ct.is_compressed_tensors_dir(d):
        layers = _ct_layers(d, infos)
        out, acts = [], {}
        for name, (fmt, tile, n, k, act) in layers.items():
            heads, hd = _head_info(name, cfg)
            out.append(LinearSpec(name, n, k, fmt, tile, heads, hd))
            acts[name] = act
        return out, acts
    raw = [(name[: -len(".weight")], *info.shape) for name, info in infos.items()
           if name.endswith(".weight") and len(info.shape) == 2
           and name.rsplit(".", 2)[-2] in COLUMN + ROW + ("lm_head",)]
    return _with_recipe(raw, cfg, recipe, skip, weight_options), {}


def _ct_layers(d: Path, infos: dict):
    """Shapes and tiles of a compressed-tensors checkpoint's layers from its headers and config."""
    from . import compressed_tensors as ct
    from ._safetensors import CheckpointReader

    qc = ct.read_quantization_config(d)
    out = {}
    for name in sorted({n.rpartition(".")[0] for n in infos if n.endswith((".weight_packed", ".weight_scale"))}):
        scheme = ct._scheme_for(name, qc)
        if scheme is None:
            continue
        fmt_ct = ct._infer_format(scheme, qc.get("format") or "")
        w = scheme.get("weights") or {}
        if f"{name}.weight_shape" in infos:
            with CheckpointReader(d) as r:
                n, k = (int(v) for v in r.get(f"{name}.weight_shape").tolist())
        elif f"{name}.weight_packed" in infos:
            n, pk = infos[f"{name}.weight_packed"].shape
            k = pk * 2
        else:
            n, k = infos[f"{name}.weight"].shape
        if fmt_ct == "nvfp4-pack-quantized":
            fmt, tile = "nvfp4", (1, 16)
        elif fmt_ct == "mxfp4-pack-quantized":
            fmt, tile = "mxfp4", (1, 32)
        else:
            fmt = f"int{w['num_bits']}" if w.get("type") == "int" else "fp8_e4m3"
            st = w.get("strategy")
            tile = ((1, int(w["group_size"])) if st == "group" else tuple(w["block_structure"]) if st == "block"
                    else (1, k))
        a = scheme.get("input_activations")
        act = None if a is None else ("nvfp4" if a.get("num_bits") == 4 else
                                      "int8" if a.get("type") == "int" else "fp8_e4m3")
        out[name] = (fmt, tile, n, k, act)
    return out
