"""Layer-by-layer quantization of checkpoints larger than memory, with resume.

    result = quantize_checkpoint("Llama-3-8B/", "out/", "a16w4-int-g128-hqq")
    lowbit quantize SRC --recipe R --out DST [--export compressed-tensors] [--tp N]

The source is a Hugging Face directory of safetensors shards (or a GGUF file). It
is read one tensor at a time from memory-mapped files whose pages are released
after each read, and quantized one decoder block at a time; each block's result
goes to a part file in ``DST/.lowbit-partial/`` (written to a temporary name and
renamed, then recorded in ``progress.json``), so the resident memory stays near
one block whatever the model's size, and a run that is killed resumes at the
first block it had not finished. Full-precision tensors of a safetensors source
(embeddings, norms, an unquantized lm_head) are never loaded: the final step
copies their bytes from the source file.

The last step assembles the output from the part files (by chunked copies):
lowbit's own checkpoint (``model.safetensors`` + ``lowbit.json``, what
``lowbit.load`` reads) or, with ``export="compressed-tensors"``, a Hugging Face
directory in the compressed-tensors format (shards + index + config.json with its
``quantization_config``, what vLLM and transformers load). config.json, the
tokenizer and generation config are copied from the source.

Methods: round to nearest and the calibration-free methods (-hqq, -rot) run per
weight on the fly. Methods that need calibration data (-gptq, -awq, -smooth) run one
decoder block at a time (lowbit.io.layerwise): the model's skeleton is built on the
meta device, block 0's inputs are captured for the calibration ids, and each block is
read, quantized from its cached inputs exactly as ``lowbit.quantize_(model, recipe,
calibration=ids)`` does in memory, and run to give the next block's inputs; those are
saved in the partial directory after every block so that a resumed run continues bit
for bit. Full-precision tensors that calibration changes (norms that absorb AWQ or
SmoothQuant scales) are written from their new values. Calibration ids default to
the calibration half of pydoc_data.topics through the source's tokenizer
(``calibration_text``, ``calibration_seqs``, ``calibration_len``). Compressed-tensors
output refuses rotations (before any work) and AWQ/SmoothQuant scales left as a
layer's input_scale (at the first block that has one): that format has no input
transform.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..formats import QTensor, quantize_tensor
from ..nn.linear import QuantLinear
from ..nn.recipes import Recipe, parse_recipe
from . import _safetensors as st

PARTIAL = ".lowbit-partial"
PROGRESS = "progress.json"
EXPORTS = ("lowbit", "compressed-tensors")
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
             "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")
STREAM_VERSION = 1
_BLOCK = re.compile(r"^(.*?\.)(\d+)\.")


class QuantizeError(ValueError):
    """A streaming quantization that cannot run as asked (bad input, a refused split, a stale resume)."""


# ------------------------------------------------------------------ sources


class HFSource:
    """A Hugging Face model directory: config.json and safetensors shards, read tensor by tensor."""

    kind = "safetensors"

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        cfg = self.dir / "config.json"
        if not cfg.is_file():
            raise QuantizeError(f"{self.dir} has no config.json: the source must be a Hugging Face model directory "
                                "(config.json + *.safetensors) or a GGUF file")
        self.config = json.loads(cfg.read_text())
        try:
            self.reader = st.CheckpointReader(self.dir)
        except (FileNotFoundError, ValueError) as e:
            raise QuantizeError(str(e)) from None
        order = sorted(self.reader.keys(), key=lambda n: (str(self.reader.where[n].path), self.reader.info(n).start))
        self._names = order

    def names(self) -> list[str]:
        return list(self._names)

    def hf_config(self):
        import transformers

        return transformers.AutoConfig.from_pretrained(str(self.dir), local_files_only=True)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.reader.info(name).shape)

    def nbytes(self, name: str) -> int:
        return self.reader.info(name).nbytes

    def get(self, name: str) -> torch.Tensor:
        return self.reader.get(name)

    def entry(self, name: str, as_name: str | None = None) -> st.Entry:
        """A zero-copy reference to the tensor's bytes in the source file."""
        r = self.reader.where[name]
        return st.Entry.from_file(r.infos[name], r.path, as_name)

    def fingerprint(self) -> list:
        return [[p.path.name, p.path.stat().st_size, p.path.stat().st_mtime_ns] for p in self.reader.readers]

    def write_aux(self, out: Path) -> list[str]:
        done = []
        for f in AUX_FILES:
            if (self.dir / f).is_file():
                shutil.copyfile(self.dir / f, out / f)
                done.append(f)
        return done

    def close(self) -> None:
        self.reader.close()


class GGUFSource:
    """A GGUF file (llama.cpp), read tensor by tensor: each tensor dequantized to float32
    and renamed/permuted to its Hugging Face form with transformers' own GGUF mapping."""

    kind = "gguf"

    def __init__(self, path: str | os.PathLike):
        try:
            import gguf
            import transformers
            from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                                  get_gguf_hf_weights_map, load_gguf_checkpoint)
        except ImportError as e:
            raise ModuleNotFoundError(f"reading GGUF files needs gguf and transformers: pip install 'lowbit[models]' "
                                      f"({e})") from None
        from transformers.modeling_gguf_pytorch_utils import read_field

        self.path = Path(path)
        self._gguf = gguf
        parsed = load_gguf_checkpoint(str(self.path), return_tensors=False)  # transformers' GGUF -> HF config
        raw = dict(parsed.get("config", {}))
        # what AutoConfig.from_pretrained(gguf_file=...) builds, without parsing the file a second time
        cfg = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
        d = cfg.to_dict()
        d.pop("quantization_config", None)
        with torch.device("meta"):
            meta = transformers.AutoModelForCausalLM.from_config(cfg)
        if not d.get("architectures"):
            d["architectures"] = [type(meta).__name__]
        d["dtype"] = d["torch_dtype"] = "float32"
        self.config = d
        self._hf_config = cfg
        self.reader = gguf.GGUFReader(str(self.path))
        arch = (read_field(self.reader, "general.architecture") or [None])[0]
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed.get("config", {}))
        mapping = self._name_map(meta, arch) or get_gguf_hf_weights_map(meta, self.processor)
        self._tensors = {}
        for t in self.reader.tensors:
            if t.name in mapping:
                self._tensors[mapping[t.name]] = t
        self._names = list(self._tensors)
        self._shapes = {n: tuple(int(v) for v in reversed(t.shape)) for n, t in self._tensors.items()}
        del meta

    def hf_config(self):
        return self._hf_config

    def _name_map(self, meta, arch) -> dict | None:
        """GGUF name -> Hugging Face name from one gguf tensor-name map over the model's
        state_dict (what transformers' get_gguf_hf_weights_map does first, without its
        slow walk over every submodule); None when a GGUF tensor stays unmapped."""
        try:
            from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
        except ImportError:  # pragma: no cover
            return None
        key = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
        if key is None:
            return None
        nmap = get_tensor_name_map(key, self._hf_config.num_hidden_layers)
        out = {}
        for hf in meta.state_dict():
            base, _, suffix = hf.rpartition(".")
            g = nmap.get_name(base)
            if g is not None:
                out[f"{g}.{suffix}"] = hf
        if any(t.name not in out for t in self.reader.tensors):
            return None
        return out

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def nbytes(self, name: str) -> int:
        return int(self._tensors[name].n_bytes)

    def get(self, name: str) -> torch.Tensor:
        import numpy as np

        t = self._tensors[name]
        w = self._gguf.dequantize(t.data, t.tensor_type)
        res = self.processor.process(weights=w, name=t.name)
        if res.name is None:
            raise QuantizeError(f"GGUF tensor {t.name}: this architecture's tensors need a merge that the streaming "
                                "reader does not do; load the model with transformers and use lowbit.quantize_")
        return torch.from_numpy(np.ascontiguousarray(res.weights)).reshape(self._shapes[name]).to(torch.float32)

    def entry(self, name: str, as_name: str | None = None) -> st.Entry:
        return st.Entry.of(as_name or name, self.get(name))

    def fingerprint(self) -> list:
        s = self.path.stat()
        return [[self.path.name, s.st_size, s.st_mtime_ns]]

    def write_aux(self, out: Path) -> list[str]:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name,
                                                         local_files_only=True)
        tok.save_pretrained(out)
        return ["tokenizer"]

    def close(self) -> None:
        pass


def open_source(src: str | os.PathLike):
    p = Path(src)
    if p.is_file() and p.suffix == ".gguf":
        return GGUFSource(p)
    if p.is_dir():
        return HFSource(p)
    raise QuantizeError(f"{src}: not a Hugging Face model directory nor a .gguf file")


# ------------------------------------------------------------------ planning


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name.rsplit(".", 1)[-1] == p for p in patterns)


def linear_names(source) -> list[str]:
    """Module names of the source's nn.Linear layers: from the model class that transformers
    builds (on the meta device) from config.json; 2-D ``*_proj``-style weights otherwise."""
    names = set(n[: -len(".weight")] for n in source.names() if n.endswith(".weight") and len(source.shape(n)) == 2)
    try:
        import transformers

        cfg = source.hf_config()
        with torch.device("meta"):
            meta = transformers.AutoModelForCausalLM.from_config(cfg)
        lin = {n for n, m in meta.named_modules() if isinstance(m, nn.Linear)}
        return sorted(names & lin)
    except Exception:  # an architecture transformers does not know: fall back to names
        from .tp import COLUMN, ROW

        return sorted(n for n in names if n.rsplit(".", 1)[-1] in COLUMN + ROW + ("lm_head",))


def _units(names: list[str]) -> list[tuple[str, list[str]]]:
    """Tensor names grouped by decoder block (``...layers.<i>.``), in block order; the
    remaining tensors (embeddings, final norm, lm_head) form the last unit."""
    blocks: dict[tuple[str, int], list[str]] = {}
    rest = []
    for n in names:
        m = _BLOCK.match(n)
        if m:
            blocks.setdefault((m.group(1), int(m.group(2))), []).append(n)
        else:
            rest.append(n)
    out = [(f"{p}{i}", blocks[(p, i)]) for p, i in sorted(blocks, key=lambda k: (k[0], k[1]))]
    if rest:
        out.append(("rest", rest))
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.dtype):
        return str(obj)
    return obj


@dataclass
class QuantizeResult:
    out_dir: str
    export: str
    recipe: str
    quantized: int = 0  # linear layers
    kept: list[str] = field(default_factory=list)  # linear layers left in full precision
    units: int = 0
    resumed_units: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"wrote {self.out_dir} ({self.export}, {self.recipe}): {self.quantized} linear layers quantized, "
            f"{len(self.kept)} kept in full precision ({', '.join(self.kept[:3])}{' ...' if len(self.kept) > 3 else ''})",
            f"  {self.units} blocks ({self.resumed_units} already done by an earlier run), "
            f"{self.bytes_in / 2**30:.2f} GiB -> {self.bytes_out / 2**30:.2f} GiB, {self.seconds:.0f} s, "
            f"peak resident memory {self.peak_rss_bytes / 2**30:.2f} GiB",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


CHUNK_ELEMENTS = 1 << 24  # rows are quantized in chunks of about this many weights


def _quantize_weight(w: torch.Tensor, recipe: Recipe, opts: dict, method_options: dict | None,
                     chunk_elements: int | None = None) -> tuple[QTensor, int | None]:
    """One weight through a calibration-free recipe: -> (QTensor, Hadamard block of -rot or None)."""
    chunk_elements = chunk_elements or CHUNK_ELEMENTS
    if recipe.method == "rtn":
        q0 = quantize_tensor(w[:1], recipe.weight_fmt, **opts)  # the tile: one row per scale?
        rows = max(1, chunk_elements // max(1, w.shape[1]))
        per_row = q0.tile[0] == 1 and q0.options.get("granularity") not in ("tensor", "block")
        if not per_row or q0.global_scale is not None or w.shape[0] <= rows:
            return quantize_tensor(w, recipe.weight_fmt, **opts), None
        # scales cover one row each: quantizing row chunks gives the same QTensor, in less memory
        parts = [quantize_tensor(w[i:i + rows], recipe.weight_fmt, **opts) for i in range(0, w.shape[0], rows)]
        cat = lambda name: (None if getattr(q0, name) is None  # noqa: E731
                            else torch.cat([getattr(p, name) for p in parts], dim=0))
        return QTensor(fmt=q0.fmt, shape=w.shape, axis=1, codes=cat("codes"), scales=cat("scales"),
                       zeros=cat("zeros"), tile=q0.tile, options=dict(q0.options)).validate(), None
    from ..quant.methods import quantize_linear_weight

    q, rot = quantize_linear_weight(w, recipe, opts, method_options)
    return q, rot


def _wrap(name: str, module: nn.Module) -> nn.Module:
    """A module tree holding ``module`` under the dotted ``name`` (for checkpoint._state_of)."""
    root = cur = nn.Module()
    parts = name.split(".")
    for p in parts[:-1]:
        child = nn.Module()
        cur.add_module(p, child)
        cur = child
    cur.add_module(parts[-1], module)
    return root


def quantize_checkpoint(src: str | os.PathLike, out: str | os.PathLike, recipe: str | Recipe, *,
                        export: str = "lowbit", skip=("lm_head",), weight_options: dict | None = None,
                        method_options: dict | None = None, tp: int | None = None, convert: bool = False,
                        shard_bytes: int = 5 << 30, restart: bool = False, progress: bool = True,
                        calibration=None, calibration_text: str | os.PathLike | None = None,
                        calibration_seqs: int = 128, calibration_len: int = 512,
                        on_unit=None) -> QuantizeResult:
    """Quantize the checkpoint ``src`` block by block into ``out`` (see the module docstring).

    export: "lowbit" (lowbit's checkpoint) or "compressed-tensors".
    skip: linear layers left in full precision (fnmatch patterns or last names).
    tp: refuse, before any work, a model whose layers would not split ``tp`` ways on
        group, block, head and kernel-tile boundaries (lowbit.io.tp).
    convert: compressed-tensors only: allow converting what it cannot store exactly
        (methods that leave float zero points, NVFP4 siblings quantized apart).
    restart: discard an interrupted run in ``out`` instead of resuming it.
    calibration: token ids for the calibrated methods (-gptq, -awq, -smooth), a LongTensor
        [n, seq] or a list of them, as for ``lowbit.quantize_``; by default they are made
        with the source's tokenizer from ``calibration_text`` (a text file) or the
        calibration half of pydoc_data.topics: at most ``calibration_seqs`` sequences of
        ``calibration_len`` tokens (what ``lowbit eval`` uses).
    on_unit: called with the unit name after each block is written (tests use it to
        interrupt a run).
    """
    t0 = time.time()
    if export not in EXPORTS:
        raise QuantizeError(f"export must be one of {EXPORTS}, got {export!r}")
    r = parse_recipe(recipe) if isinstance(recipe, str) else recipe
    if export == "compressed-tensors" and r.transform == "rot":
        raise QuantizeError(
            f"recipe {r.name!r}: a Hadamard rotation of the layers' inputs (-rot) cannot be expressed in the "
            "compressed-tensors checkpoints this exporter writes (no input transform is stored: vLLM would "
            "multiply unrotated activations by rotated weights); write lowbit's format (--export lowbit) or "
            "use a recipe without -rot")
    if not r.needs_calibration and calibration is not None:
        calibration = None  # as lowbit.quantize_: recipes without calibrated methods ignore it
    from . import compressed_tensors as ct

    user = ct.export_weight_options(r, weight_options) if export == "compressed-tensors" else dict(weight_options or {})
    opts = {**r.weight_options, **user}  # what QuantLinear.from_linear passes to the format
    out = Path(out)
    source = open_source(src)
    try:
        cal = dict(ids=calibration, text=calibration_text, seqs=calibration_seqs, len=calibration_len,
                   user_options=user)
        return _run(source, out, r, opts, export, tuple(skip), method_options, tp, convert, shard_bytes, restart,
                    progress, on_unit, t0, cal)
    finally:
        source.close()


def _run(source, out: Path, r: Recipe, opts: dict, export: str, skip: tuple, method_options, tp, convert,
         shard_bytes, restart, progress, on_unit, t0, cal_args) -> QuantizeResult:
    from . import compressed_tensors as ct
    from . import tp as tpmod
    from .checkpoint import FORMAT_VERSION, META_FILE, TENSORS_FILE, _state_of, _tables_sha256

    names = source.names()
    linears = linear_names(source)
    quant = [l for l in linears if not _matches(l, skip) and f"{l}.weight" in names]
    kept = [l for l in linears if l not in quant]
    if not quant:
        raise QuantizeError(f"no linear layer to quantize in {src_name(source)} (skip={list(skip)})")
    cfg = source.config
    tie = bool(cfg.get("tie_word_embeddings", False))
    if export == "compressed-tensors" and tie and "lm_head" in quant:
        raise QuantizeError("lm_head is tied to the embeddings: compressed-tensors checkpoints store it once, "
                            "unquantized; keep lm_head in full precision (--skip lm_head)")

    # pre-flight: every distinct shape through the format (and the compressed-tensors layout)
    act = r.activation
    problems = []
    shapes = {}
    for l in quant:
        shp = source.shape(f"{l}.weight")
        if len(shp) != 2:
            raise QuantizeError(f"{l}.weight has shape {list(shp)}, expected [out, in]")
        shapes[l] = shp
    for k in sorted({s[1] for s in shapes.values()}):
        proxy = quantize_tensor(torch.ones(1, k), r.weight_fmt, **opts)
        if export == "compressed-tensors":
            try:
                ct.weight_scheme(f"(layers with K={k})", proxy, act)
            except ct.LayerError as e:
                problems += [ct.LayerError(l, e.why, e.fix) for l, s in shapes.items() if s[1] == k]
    if problems:
        raise QuantizeError("cannot export as compressed-tensors:\n  " + ct._summarize(problems))
    if tp:
        specs = [tpmod.LinearSpec(l, s[0], s[1], *tpmod.recipe_tile(r, s[1], opts), *tpmod._head_info(l, cfg))
                 for l, s in shapes.items()]
        rep = tpmod.check(specs, tp, activations={l: act.fmt for l in shapes})
        if not rep.ok:
            raise QuantizeError(f"refusing to quantize for tensor parallel {tp}:\n{rep}")
        tp_warnings = len(rep.warnings)
    else:
        tp_warnings = 0

    # calibration data (calibrated recipes): the ids and their digest, part of the run's settings
    cal_ids, cal_source, digest, cal = None, "", None, None
    if r.needs_calibration:
        from ..quant.calibration import as_batches
        from . import layerwise

        if cal_args["ids"] is not None:
            cal_ids, cal_source = cal_args["ids"], "calibration ids given by the caller"
        else:
            try:
                cal_ids, cal_source = layerwise.default_calibration_ids(source, cal_args["text"], cal_args["seqs"],
                                                                        cal_args["len"])
            except (layerwise.LayerwiseError, ValueError, FileNotFoundError) as e:
                raise QuantizeError(str(e)) from None
        try:
            digest = layerwise.calibration_digest(as_batches(cal_ids))
            # the model's skeleton (meta device) and its blocks; refuses what it cannot run, before any work
            cal = layerwise.LayerwiseCalibration(source, r, quant, cal_args["user_options"] or None, method_options,
                                                 cal_ids, out / PARTIAL)
        except (ValueError, layerwise.LayerwiseError) as e:
            raise QuantizeError(str(e)) from None

    # resume bookkeeping
    partial = out / PARTIAL
    signature = _jsonable({"version": STREAM_VERSION, "source": [source.kind, str(src_name(source))],
                           "fingerprint": source.fingerprint(), "recipe": r.name, "weight_options": opts,
                           "method_options": method_options or {}, "export": export, "skip": list(skip),
                           "convert": convert})
    if digest is not None:
        signature["calibration"] = digest
    state = {"signature": signature, "done": {}}
    if partial.exists():
        try:
            old = json.loads((partial / PROGRESS).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            old = None
        if restart or old is None:
            shutil.rmtree(partial)
        elif old.get("signature") != signature:
            diff = sorted(k for k in signature if old.get("signature", {}).get(k) != signature[k])
            raise QuantizeError(f"{out} holds an interrupted run with different settings ({', '.join(diff)}); "
                                "pass restart=True (lowbit quantize --restart) to discard it, or another --out")
        else:
            state = old
    partial.mkdir(parents=True, exist_ok=True)
    _write_json(partial / PROGRESS, state)

    units = _units(names)
    qset = set(quant)
    work = {u: sum(_numel(source.shape(f"{l}.weight")) for l in _unit_layers(ns, qset)) for u, ns in units}
    done_before = [u for u, _ in units if u in state["done"]]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(work.values()), initial=sum(work[u] for u in done_before), unit="weight",
                   unit_scale=True, desc=f"quantize {r.name}", smoothing=0.1)
        if done_before:
            bar.write(f"resuming: {len(done_before)} of {len(units)} blocks already done in {partial}")

    if cal is not None:
        if bar:
            how = ("sequential (each block calibrated on the quantized blocks before it)" if cal.sequential
                   else "each block calibrated on the full-precision outputs of the blocks before it")
            bar.write(f"calibration: {cal_source}; {len(cal.blocks)} blocks of {cal.list_name}, {how}")
        started = False
    for uname, unames in units:
        if uname in state["done"]:
            continue
        layers_meta: dict = {}
        schemes: dict = {}
        entries: list[st.Entry] = []
        notes: list[str] = []
        qs: dict[str, QTensor] = {}
        rot: dict[str, int | None] = {}
        originals: dict[str, torch.Tensor] = {}
        biases: dict[str, torch.Tensor | None] = {}
        unit_layers = _unit_layers(unames, qset)
        calib_rec = None
        block = None
        if cal is not None and uname in cal.block_units:
            # calibrated: the whole block at once, from the cached inputs (lowbit.io.layerwise)
            block = cal.block_units[uname]
            if bar:
                bar.set_postfix_str(f"{uname} (calibration)", refresh=False)
            try:
                if not started:
                    cal.start(block)
                    started = True
                blk = cal.quantize_block(block)
            except layerwise.LayerwiseError as e:
                raise QuantizeError(str(e)) from None
            qls = {f"{uname}.{n}": m for n, m in blk.named_modules() if isinstance(m, QuantLinear)}
            kept_scale = [l for l, m in qls.items() if m.input_scale is not None]
            if export == "compressed-tensors" and kept_scale:
                last_names = " ".join(sorted({l.rsplit(".", 1)[1] for l in kept_scale}))
                raise QuantizeError(
                    f"{', '.join(kept_scale)}: {r.transform} left an input scale (x / s before the layer) that no "
                    "preceding norm or linear layer of the block could absorb; compressed-tensors checkpoints have no "
                    "place for it (a reader would skip the division); write lowbit's format (--export lowbit), "
                    f"keep these layers in full precision (--skip {last_names}), "
                    "or use a recipe without the transform (e.g. -gptq)")
            for l in unit_layers:
                ql = qls[l]
                qs[l], rot[l], biases[l] = ql.qweight, ql.rotation_block, ql.bias
            changed = cal.changed_tensors(block, blk)
            calib_rec = {"input_scale": len(kept_scale), "changed": sorted(changed)}
            entries += [st.Entry.of(k, v) for k, v in changed.items()]
            del blk, qls
        for l in unit_layers:
            if block is None:
                if bar:
                    bar.set_postfix_str(l, refresh=False)
                w = source.get(f"{l}.weight")
                q, rot[l] = _quantize_weight(w, r, opts, method_options)
                biases[l] = source.get(f"{l}.bias") if f"{l}.bias" in names else None
            else:
                w, q = None, qs[l]
            if export == "compressed-tensors":
                bad = ct._int_zero_out_of_range(q)
                if bad is not None and bool(bad.any()):
                    if r.method == "rtn" or convert:
                        q, c = ct.convert_int_zero_points(q, source=w if r.method == "rtn" else None)
                        notes.append(f"{l}: {c}")
                    else:
                        raise QuantizeError(f"{l}: {r.name} left {int(bad.sum())} zero point(s) that "
                                            "compressed-tensors cannot store; pass --convert to re-quantize them "
                                            "(the error is reported)")
                if q.fmt == "nvfp4" and w is not None:
                    originals[l] = w
            qs[l] = q
            del w
            if bar and block is None:
                bar.update(_numel(q.shape))
        if export == "compressed-tensors":
            for group in ct._siblings([l for l in unit_layers if qs[l].fmt == "nvfp4"]):
                if len({float(qs[g].global_scale) for g in group}) == 1:
                    continue
                if r.method == "rtn":  # quantize the siblings as one tensor: one shared scale, exactly
                    joint = quantize_tensor(torch.cat([originals[g].float() for g in group]), "nvfp4")
                    row = 0
                    for g in group:
                        n = qs[g].shape[0]
                        qs[g] = QTensor(fmt="nvfp4", shape=qs[g].shape, axis=1, codes=joint.codes[row:row + n].clone(),
                                        scales=joint.scales[row:row + n].clone(), tile=joint.tile,
                                        global_scale=joint.global_scale.clone(), options=dict(joint.options))
                        row += n
                elif convert:
                    new, c = ct.share_nvfp4_global_scale([qs[g] for g in group])
                    qs.update(zip(group, new))
                    notes.append(f"{', '.join(group)}: {c}")
                else:
                    raise QuantizeError(f"{', '.join(group)}: NVFP4 siblings with different global scales; pass "
                                        "--convert to unify them (the error is reported)")
            originals.clear()
        for l in unit_layers:
            q = qs.pop(l)
            bias = biases.pop(l)
            if export == "lowbit":
                if block is not None:  # the QuantLinear calibration made (input_scale, rotation included)
                    ql = cal.blocks[block].get_submodule(l[len(uname) + 1:])
                else:
                    ql = QuantLinear(q, bias, act, recipe=r.name, rotation_block=rot[l])
                tensors, meta, _ = _state_of(_wrap(l, ql))
                layers_meta.update(meta)
            else:
                scheme = ct.weight_scheme(l, q, act)
                tensors = ct.layer_tensors(l, q, scheme, bias)
                schemes[l] = {"format": scheme.format, "weights": scheme.weights,
                              "input_activations": scheme.input_activations}
            entries += [st.Entry.of(k, v) for k, v in tensors.items()]
        if block is not None and block + 1 < len(cal.blocks):
            cal.save_inputs(block + 1)  # before the block is recorded: a resume needs them
        part = partial / f"unit-{len(state['done']):05d}-{_safe(uname)}.safetensors"
        st.write_safetensors(part, entries)
        state["done"][uname] = {"file": part.name, "layers": layers_meta, "schemes": schemes, "notes": notes}
        if calib_rec is not None:
            state["done"][uname]["calibration"] = calib_rec
        _write_json(partial / PROGRESS, state)
        del entries
        if block is not None:
            cal.drop_inputs(block)
            cal.finish_block(block)
            if bar:
                bar.update(work[uname])
        if on_unit:
            on_unit(uname)
    if bar:
        bar.close()

    # assemble the output
    parts: dict[str, tuple[Path, st.TensorInfo]] = {}
    all_layers, all_schemes, notes = {}, {}, []
    for uname, rec in state["done"].items():
        p = partial / rec["file"]
        for n, info in st.read_header(p)[0].items():
            parts[n] = (p, info)
        all_layers.update(rec["layers"])
        all_schemes.update(rec["schemes"])
        notes += rec["notes"]
    entries = []
    seen = set()
    for n in names:
        owner = n.rsplit(".", 1)[0]
        if owner in qset:
            if owner in seen:
                continue
            seen.add(owner)
            entries += [st.Entry.from_file(info, p) for k, (p, info) in parts.items() if k.rsplit(".", 1)[0] == owner]
            continue
        if n in parts:  # a full-precision tensor that calibration changed (a norm that absorbed AWQ scales)
            p, info = parts[n]
            entries.append(st.Entry.from_file(info, p))
            continue
        entries.append(source.entry(n))
    if export == "lowbit" and tie and "lm_head.weight" not in names:
        emb = next((n for n in names if n.endswith("embed_tokens.weight")), None)
        if emb:  # lowbit checkpoints hold every tensor of the model's state_dict, tied ones included
            entries.append(source.entry(emb, "lm_head.weight"))
    out.mkdir(parents=True, exist_ok=True)
    files = []
    if export == "lowbit":
        h = hashlib.sha256()
        st.write_safetensors(out / TENSORS_FILE, entries, hasher=h)
        files = [TENSORS_FILE]
        meta = {"lowbit_format_version": FORMAT_VERSION, "kind": "model", "sha256": h.hexdigest(),
                "quantized_layers": all_layers, "qtensors": {},
                "tables_sha256": _tables_sha256(all_layers, {}),
                "user": {"source": str(src_name(source)), "recipe": r.name, "written_by": "lowbit quantize"}}
        _write_json(out / META_FILE, meta)
        _write_json(out / "config.json", {k: v for k, v in cfg.items() if k != "quantization_config"})
    else:
        schemes = {l: ct.Scheme(s["format"], s["weights"], s["input_activations"]) for l, s in all_schemes.items()}
        files = st.write_sharded(out, entries, shard_bytes, metadata={"format": "pt", "producer": "lowbit"})
        c = {k: v for k, v in cfg.items() if k != "quantization_config"}
        c["quantization_config"] = ct.quantization_config(schemes, kept)
        _write_json(out / "config.json", c)
        for stale in ("lowbit.json",):
            if (out / stale).exists():
                (out / stale).unlink()
    aux = source.write_aux(out)
    shutil.rmtree(partial)
    res = QuantizeResult(str(out), export, r.name, quantized=len(quant), kept=kept, units=len(units),
                         resumed_units=len(done_before), seconds=time.time() - t0, peak_rss_bytes=_peak_rss(),
                         bytes_in=sum(source.nbytes(n) for n in names),
                         bytes_out=sum((out / f).stat().st_size for f in files), files=files)
    if r.needs_calibration:
        recs = [rec.get("calibration", {}) for rec in state["done"].values()]
        kept_scale = sum(c.get("input_scale", 0) for c in recs)
        changed = sum(len(c.get("changed", ())) for c in recs)
        res.notes.append(f"calibration: {cal_source}"
                         + (f"; {changed} full-precision tensor(s) absorbed {r.transform} scales" if changed else "")
                         + (f"; {kept_scale} layer(s) keep an input_scale" if kept_scale else ""))
    if notes:
        res.notes.append(f"{len(notes)} conversion(s): " + "; ".join(notes[:3]) + (" ..." if len(notes) > 3 else ""))
    if not aux:
        res.notes.append("the source has no tokenizer files: none copied")
    if tp_warnings:
        res.notes.append(f"tensor parallel {tp}: {tp_warnings} layer(s) split cleanly but miss vLLM's Marlin kernel "
                         f"tiles (a slower kernel serves them): lowbit check {out} --tp {tp}")
    if export == "compressed-tensors" and any(not s["weights"].get("symmetric", True)
                                              for s in all_schemes.values()):
        res.notes.append(ct.AFFINE_NOTE)
    return res


def src_name(source) -> str:
    return str(getattr(source, "dir", None) or getattr(source, "path", ""))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _unit_layers(unit_names: list[str], qset: set) -> list[str]:
    return [n[: -len(".weight")] for n in unit_names if n.endswith(".weight") and n[: -len(".weight")] in qset]
