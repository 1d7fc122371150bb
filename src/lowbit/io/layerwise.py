"""Calibrated methods (-gptq, -awq, -smooth) in the streaming quantizer, one decoder block at a time.

``lowbit quantize SRC --recipe a16w4-int-g64-gptq --out DST`` (lowbit.io.streaming) runs
the same algorithm as the in-memory ``lowbit.quantize_(model, recipe, calibration=ids)``
(lowbit.quant.calibration, whose functions it calls), without ever holding the model:

1. the model's skeleton is built by transformers from the source's config.json with
   its parameters on the meta device (accelerate's ``init_empty_weights``; buffers such
   as the rotary frequencies are real);
2. the modules outside the decoder blocks except linear layers (the embeddings, the
   final norm) are read from the memory-mapped source, the model runs on the
   calibration ids up to block 0, where ``capture_block_inputs`` keeps what the block
   receives (hidden states, and the keyword arguments: position embeddings, masks);
   those modules go back to the meta device;
3. for each block in order: its tensors are read from the source (in the dtype the
   skeleton gives them: the config's dtype, as ``from_pretrained`` does), its linear
   layers are quantized from the statistics of one pass over the cached inputs
   (``calibrate_block``: GPTQ Hessians, AWQ/SmoothQuant scale search,
   folding into the norms and linear layers of the block that the probe accepts), and
   the cached inputs become the block's outputs: those of the quantized block when the
   run is sequential (GPTQ), the full-precision outputs of the statistics pass
   otherwise (AWQ, SmoothQuant), exactly as in memory;
4. the caller writes the block (its QuantLinear tensors, and every full-precision
   tensor that calibration changed, e.g. a norm weight that absorbed AWQ scales) and
   the block is freed.

Resident memory: one block in the source dtype, the cached hidden states of all
calibration tokens (n_seqs x seq_len x hidden in the source dtype; twice that during
the statistics pass of a non-sequential run, which keeps the outputs apart), the
statistics of one group of layers (GPTQ: a K x K float32 Hessian, 822 MB for
Llama-3-8B's down_proj), and transformers' skeleton. The embedding matrix is resident
only while block 0's inputs are captured.

Resume: after each block, before the block is recorded as done, the next block's
inputs (hidden states of every calibration batch and of the fold probe) are written
to ``DST/.lowbit-partial/inputs-<block>.safetensors`` (one file of the size above,
replaced at each block: 128 x 512 x 4096 x bf16 = 512 MiB for Llama-3-8B's default
calibration); a resumed run captures the keyword arguments again (one embedding
pass) and reads the hidden states from that file, so it continues bit for bit as if
it had not stopped.

Limits (the in-memory path shares the first two): every block receives the keyword
arguments that block 0 received (models whose layers take different masks, e.g.
alternating sliding-window attention, are calibrated with block 0's mask); layers
outside the decoder blocks (a quantized lm_head) are refused with a calibrated recipe.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from ..nn.linear import QuantLinear
from ..nn.recipes import Recipe
from ..quant.calibration import Target, as_batches, calibrate_block, capture_block_inputs, find_blocks
from ..quant.methods import check_method_options

INPUTS = "inputs-{:05d}.safetensors"


class LayerwiseError(ValueError):
    """A calibrated streaming run that cannot go on (missing tensors, a stale resume)."""


def calibration_digest(batches: list[torch.Tensor]) -> str:
    """SHA-256 of the calibration ids (shapes and values): part of a run's settings."""
    h = hashlib.sha256()
    for b in batches:
        h.update(repr(tuple(b.shape)).encode())
        h.update(b.long().contiguous().numpy().tobytes())
    return h.hexdigest()


def default_calibration_ids(source, text_file: str | None = None, n_seqs: int = 128, seq_len: int = 512,
                            tokenizer=None) -> tuple[torch.Tensor, str]:
    """Calibration ids as ``lowbit eval`` builds them: the source's tokenizer over the
    calibration half of pydoc_data.topics (or ``text_file``), consecutive slices of
    ``seq_len`` tokens, at most ``n_seqs`` of them. -> (ids [n, seq_len], where they came from)."""
    from ..eval.corpus import read_text_file, topics_split
    from ..quant.calibration import calibration_ids

    if n_seqs < 1 or seq_len < 2:
        raise ValueError("calibration needs at least 1 sequence of at least 2 tokens "
                         f"(got {n_seqs} sequences of {seq_len})")
    if text_file:
        text, where = read_text_file(text_file), str(text_file)
    else:
        text, where = topics_split()[0], "pydoc_data.topics, calibration half"
    tok = tokenizer or load_tokenizer(source)
    ids = calibration_ids(tok, text, n_seqs=n_seqs, seq_len=seq_len)
    return ids, f"{where}: {ids.shape[0]} sequences of {ids.shape[1]} tokens"


def load_tokenizer(source):
    import transformers

    fix = "pass calibration=ids (a LongTensor [n, seq]) to quantize_checkpoint, or add the tokenizer's files"
    if getattr(source, "kind", "") != "gguf" and not any(
            (source.dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise LayerwiseError(f"calibrated recipes need calibration token ids, and {source.dir} has no tokenizer "
                             f"(tokenizer.json, tokenizer_config.json or tokenizer.model) to make them; {fix}")
    try:
        if getattr(source, "kind", "") == "gguf":
            return transformers.AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name,
                                                              local_files_only=True)
        return transformers.AutoTokenizer.from_pretrained(str(source.dir), local_files_only=True)
    except Exception as e:  # tokenizer files that transformers cannot read
        why = " ".join(str(e).split())
        raise LayerwiseError(f"calibrated recipes need calibration token ids, and the source's tokenizer could not "
                             f"be loaded to make them ({type(e).__name__}: {why}); {fix}") from None


def _set_tensor(root: nn.Module, name: str, t: torch.Tensor) -> None:
    """Put ``t`` in place of the parameter or buffer ``name`` of ``root`` (no copy into meta)."""
    mod_name, _, leaf = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = t
    else:  # pragma: no cover - names come from named_parameters/named_buffers
        raise KeyError(name)


class LayerwiseCalibration:
    """The calibrated quantization of one source, block by block (see the module docstring).

    ``block_units``: unit name (``model.layers.<i>``) -> block index. Call ``start(first)``
    once, then ``quantize_block(i)`` for i = first, first + 1, ... in order; each returns the
    quantized block (QuantLinear layers in place), which the caller writes, then
    ``save_inputs(i + 1)`` and ``finish_block(i)``."""

    def __init__(self, source, recipe: Recipe, quant: list[str], weight_options: dict | None,
                 method_options: dict | None, calibration, partial: Path, backend: str = "auto"):
        try:
            import transformers
            from accelerate import init_empty_weights
        except ImportError as e:
            raise ModuleNotFoundError(f"calibrated streaming quantization builds the model's skeleton with "
                                      f"transformers and accelerate: pip install 'lowbit[models]' ({e})") from None
        self.source = source
        self.recipe = recipe
        self.weight_options = weight_options
        self.opts = check_method_options(method_options)
        self.method_options = method_options
        self.partial = Path(partial)
        self.backend = backend
        self.batches = as_batches(calibration, self.opts["calibration"]["batch_size"])
        self.total_rows = sum(b.numel() for b in self.batches)
        self.probe_ids = self.batches[0][:1, : min(64, self.batches[0].shape[1])]
        self.search_tokens = max(self.opts["awq"]["search_tokens"], self.opts["smooth"]["search_tokens"])
        sequential = self.opts["calibration"]["sequential"]
        self.sequential = bool(recipe.quantizer == "gptq" if sequential is None else sequential)
        self.summary: dict = {"sequences": sum(b.shape[0] for b in self.batches), "tokens": self.total_rows,
                              "blocks": 0, "sequential": self.sequential}
        self.notes: dict[str, str] = {}

        cfg = source.hf_config()
        with init_empty_weights(include_buffers=False):
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=_config_dtype(source, cfg))
        model.eval()
        self.model = model
        modules = dict(model.named_modules())
        targets = {id(modules[n]) for n in quant if n in modules}
        found = find_blocks(model, targets)
        if found is None:
            raise LayerwiseError("no repeated block (an nn.ModuleList of decoder layers) holds the layers to quantize: "
                                 "the calibrated streaming path runs block by block; quantize in memory with "
                                 "lowbit.quantize_(model, recipe, calibration=ids)")
        self.list_name, self.blocks = found
        self.block_units = {f"{self.list_name}.{i}": i for i in range(len(self.blocks))}
        prefix = self.list_name + "."
        outside = [n for n in quant if not n.startswith(prefix)]
        if outside:
            raise LayerwiseError(f"{', '.join(outside[:3])}{' ...' if len(outside) > 3 else ''}: outside the decoder "
                                 f"blocks ({self.list_name}); the calibrated streaming path quantizes layers inside "
                                 "the blocks only: keep them in full precision (--skip), or quantize in memory with "
                                 "lowbit.quantize_(model, recipe, calibration=ids)")
        self.quant = set(quant)
        self.inputs = None
        self.probe = None

    # ------------------------------------------------------------ inputs of block 0, resume

    def _fill_outside(self, materialize: bool) -> None:
        """Read (or drop back to meta) the tensors outside the blocks, except linear layers'."""
        prefix = self.list_name + "."
        linear_params = {f"{n}.{p}" for n, m in self.model.named_modules() if isinstance(m, nn.Linear)
                         for p, _ in m.named_parameters(recurse=False)}
        names = set(self.source.names())
        for name, p in list(self.model.named_parameters()) + [
                (n, b) for n, b in self.model.named_buffers() if n in names]:
            if name.startswith(prefix) or name in linear_params:
                continue
            if materialize:
                if name not in names:
                    raise LayerwiseError(f"the source has no tensor {name!r}, which the model's forward needs before "
                                         "its first block")
                _set_tensor(self.model, name, self._read(name, p.dtype))
            else:
                _set_tensor(self.model, name, torch.empty(p.shape, dtype=p.dtype, device="meta"))

    def _read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        t = self.source.get(name)
        return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t

    def start(self, first: int) -> None:
        """Cached inputs of block ``first``: captured (block 0) or read from the partial dir."""
        from ..quant.calibration import model_device

        self._fill_outside(True)
        try:
            if model_device(self.model).type == "meta":
                raise LayerwiseError("the model's first parameter is not read before block 0; cannot run the "
                                     "calibration forward of this architecture layer by layer")
            with torch.no_grad():
                self.inputs = capture_block_inputs(self.model, self.blocks[0], self.batches)
                self.probe = capture_block_inputs(self.model, self.blocks[0], [self.probe_ids])[0]
        finally:
            self._fill_outside(False)
        for i in range(first):  # blocks already written: never materialized in this run
            self.blocks[i] = nn.Identity()
        if first == 0:
            return
        path = self.partial / INPUTS.format(first)
        if not path.is_file():
            raise LayerwiseError(f"{path} is missing: the inputs of block {first}, where this run resumes; "
                                 "restart the run (--restart)")
        from safetensors.torch import load_file

        saved = load_file(str(path))
        for k, inp in enumerate(self.inputs):
            h = saved.get(f"hidden.{k}")
            if h is None or h.shape != inp.hidden.shape or h.dtype != inp.hidden.dtype:
                raise LayerwiseError(f"{path} does not hold the inputs of these calibration batches; restart the "
                                     "run (--restart)")
            inp.hidden = h
        self.probe.hidden = saved["probe"]

    def save_inputs(self, block: int) -> Path:
        """Write the cached inputs (those of ``block``) to the partial dir, atomically."""
        from safetensors.torch import save_file

        path = self.partial / INPUTS.format(block)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {f"hidden.{k}": inp.hidden.contiguous() for k, inp in enumerate(self.inputs)}
        tensors["probe"] = self.probe.hidden.contiguous()
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        return path

    def drop_inputs(self, block: int) -> None:
        p = self.partial / INPUTS.format(block)
        if p.exists():
            p.unlink()

    # ------------------------------------------------------------ one block

    def _materialize(self, i: int) -> nn.Module:
        blk = self.blocks[i]
        prefix = f"{self.list_name}.{i}."
        names = set(self.source.names())
        for name, p in list(blk.named_parameters()):
            if prefix + name not in names:
                raise LayerwiseError(f"the source has no tensor {prefix + name!r} (block {i} of the model that "
                                     "transformers builds from config.json)")
            _set_tensor(blk, name, self._read(prefix + name, p.dtype))
        for name, b in list(blk.named_buffers()):
            if prefix + name in names:
                _set_tensor(blk, name, self._read(prefix + name, b.dtype))
        return blk

    def quantize_block(self, i: int) -> nn.Module:
        """Quantize block ``i`` in place from the cached inputs and advance the inputs to its outputs."""
        blk = self._materialize(i)
        prefix = f"{self.list_name}.{i}."
        members = [Target(n, m, self.recipe, self.weight_options) for n, m in blk.named_modules()
                   if isinstance(m, nn.Linear) and prefix + n in self.quant]

        def install(t, ql, note=""):
            parent, _, child = t.name.rpartition(".")
            setattr(blk.get_submodule(parent) if parent else blk, child, ql)
            if note:
                self.notes[prefix + t.name] = note

        calibrate_block(blk, members, self.inputs, self.probe, sequential=self.sequential,
                        total_rows=self.total_rows, search_tokens=self.search_tokens, opts=self.opts,
                        weight_options=self.weight_options, install=install, backend=self.backend,
                        summary=self.summary)
        return blk

    def changed_tensors(self, i: int, blk: nn.Module) -> dict[str, torch.Tensor]:
        """Full-precision tensors of block ``i`` (outside its QuantLinear layers) whose values
        calibration changed (a norm or linear layer that absorbed AWQ/SmoothQuant scales), by
        their names in the model; unchanged ones are copied from the source as they are."""
        prefix = f"{self.list_name}.{i}."
        quantized = {n for n, m in blk.named_modules() if isinstance(m, QuantLinear)}
        out = {}
        names = set(self.source.names())
        for name, t in blk.state_dict().items():
            if name.rpartition(".")[0] in quantized or prefix + name not in names:
                continue
            src = self._read(prefix + name, t.dtype)
            if src.shape != t.shape or not torch.equal(src, t):
                out[prefix + name] = t.detach().contiguous().clone()
        return out

    def finish_block(self, i: int) -> None:
        """Free block ``i`` (its tensors and QuantLinear layers)."""
        self.blocks[i] = nn.Identity()


def _config_dtype(source, cfg) -> torch.dtype:
    """The dtype transformers gives the model: the config's (``dtype``/``torch_dtype``), else
    the stored dtype of the source's first floating-point tensor."""
    d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(d, str) and d != "auto":
        d = getattr(torch, d, None)
    if isinstance(d, torch.dtype):
        return d
    if getattr(source, "kind", "") == "safetensors":
        for n in source.names():
            dt = source.reader.info(n).torch_dtype
            if dt.is_floating_point:
                return dt
    return torch.float32


__all__ = ["LayerwiseCalibration", "LayerwiseError", "default_calibration_ids", "calibration_digest", "INPUTS"]
