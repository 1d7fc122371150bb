"""Calibration data and the inputs of layers, captured one block at a time.

Methods that need data (AWQ, GPTQ, SmoothQuant) see the inputs of each linear layer
on calibration text. Holding every layer's inputs at once would take
n_tokens x (sum of all in_features) floats; instead the model runs block by block:

1. the model runs on the calibration ids up to its first repeated block (the
   ``nn.ModuleList`` holding the most layers to quantize), where a hook keeps the
   block's inputs (hidden states and the other arguments: masks, positions) and
   stops the forward;
2. for each block in turn: one pass of the block over all batches with hooks on its
   linear layers collects their input statistics (Hessian X^T X for GPTQ; per-channel
   mean and max |x| and an evenly spaced sample of at most ``search_tokens`` rows for
   AWQ/SmoothQuant); the block's layers are quantized; with GPTQ ("sequential"), a
   second pass of the now quantized block gives the next block's inputs (later layers
   see, and compensate, the errors of earlier ones, as GPTQ does); otherwise the
   full-precision outputs of the statistics pass are the next inputs (as AWQ and
   SmoothQuant do; one pass per block). ``method_options={"calibration":
   {"sequential": True/False}}`` overrides;
3. layers outside the blocks (e.g. a BERT pooler) are handled last, from one full
   forward of the (quantized) model with hooks.

Memory: the hidden states of all calibration tokens (n_tokens x d), plus one block's
statistics. Layers sharing one input tensor (q, k, v; gate, up) form a group: they
share statistics, and AWQ/SmoothQuant give them one scale.
"""

from __future__ import annotations

import copy
import inspect
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

__all__ = ["as_batches", "find_blocks", "InputStats", "quantize_calibrated", "calibration_ids"]


class _Stop(Exception):
    pass


def as_batches(calibration, batch_size: int = 4) -> list[torch.Tensor]:
    """calibration ids -> list of LongTensor batches [b, T] (sequences of one batch share T)."""
    def bad(why: str) -> ValueError:
        return ValueError(
            f"calibration must be token ids: a LongTensor [n, seq] or a list of LongTensors [seq] / [n, seq]; {why}"
        )

    items = [calibration] if isinstance(calibration, torch.Tensor) else calibration
    if not isinstance(items, (list, tuple)) or not items:
        raise bad(f"got {type(calibration).__name__}" + (" (empty)" if isinstance(items, (list, tuple)) else ""))
    out: list[torch.Tensor] = []
    for t in items:
        if not isinstance(t, torch.Tensor):
            raise bad(f"got an item of type {type(t).__name__}")
        if t.dtype not in (torch.long, torch.int32, torch.int64):
            raise bad(f"got dtype {t.dtype} (ids are integers; tokenize the text first)")
        if t.dim() == 1:
            t = t[None]
        if t.dim() != 2 or t.shape[1] == 0 or t.shape[0] == 0:
            raise bad(f"got shape {tuple(t.shape)}")
        out.extend(t.long().split(batch_size))
    return out


def calibration_ids(tokenizer, text: str, n_seqs: int = 128, seq_len: int = 512) -> torch.Tensor:
    """Consecutive slices of ``text``'s tokens: LongTensor [min(n_seqs, available), seq_len]."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    n = min(n_seqs, len(ids) // seq_len)
    if n < 1:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def find_blocks(model: nn.Module, targets: set[int]) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList whose children hold the most of the ``targets`` (module ids)."""
    best, best_count = None, 0
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m):
            count = sum(1 for child in m for sub in child.modules() if id(sub) in targets)
            if count > best_count:
                best, best_count = (name, m), count
    return best


def model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _run_model(model: nn.Module, ids: torch.Tensor):
    kw = {}
    try:
        if "use_cache" in inspect.signature(model.forward).parameters:
            kw["use_cache"] = False
    except (TypeError, ValueError):
        pass
    return model(ids.to(model_device(model)), **kw)


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise TypeError(f"cannot find the hidden states in a block output of type {type(out).__name__}")


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


@dataclass
class _BlockInput:
    hidden: torch.Tensor
    args: tuple
    kwargs: dict

    def run(self, block: nn.Module, hidden: torch.Tensor | None = None, cast=None):
        h = self.hidden if hidden is None else hidden
        args, kwargs = self.args, self.kwargs
        if cast is not None:
            h, args, kwargs = cast(h), _map_tensors(args, cast), _map_tensors(kwargs, cast)
        return _first(block(h, *args, **kwargs))


def capture_block_inputs(model: nn.Module, block: nn.Module, batches: list[torch.Tensor]) -> list[_BlockInput]:
    """Run ``model`` on each batch up to ``block`` and keep what the block receives."""
    got: list[_BlockInput] = []

    def hook(module, args, kwargs):
        if args:
            h, rest = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            h, rest = kwargs.pop("hidden_states"), ()
        got.append(_BlockInput(h.detach(), rest, dict(kwargs)))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                _run_model(model, ids)
            except _Stop:
                pass
            else:
                raise RuntimeError("the model's forward never reached its first block on the calibration data")
    finally:
        handle.remove()
    return got


@dataclass
class InputStats:
    """Statistics of one input tensor (shared by a group of linear layers)."""

    k: int
    hessian: bool
    sample_stride: int
    max_rows: int
    rows: int = 0
    h: torch.Tensor | None = None  # sum x^T x, float32 [K, K]
    abs_sum: torch.Tensor | None = None  # float64 [K]
    abs_max: torch.Tensor | None = None  # float32 [K]
    sample: list = field(default_factory=list)
    n_sample: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.k).float()
        self.rows += x.shape[0]
        a = x.abs()
        s, m = a.sum(0, dtype=torch.float64), a.amax(0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.abs_max = m if self.abs_max is None else torch.maximum(self.abs_max, m)
        if self.hessian:
            xtx = x.T @ x
            self.h = xtx if self.h is None else self.h.add_(xtx)
        if self.max_rows and self.n_sample < self.max_rows:
            take = x[:: self.sample_stride][: self.max_rows - self.n_sample].clone()
            self.sample.append(take)
            self.n_sample += take.shape[0]

    @property
    def x_sample(self) -> torch.Tensor:
        return torch.cat(self.sample) if self.sample else torch.zeros(0, self.k)

    @property
    def abs_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.rows, 1)).float()


@dataclass
class Target:
    name: str  # the layer's first name in the model
    module: nn.Linear
    recipe: object  # Recipe
    weight_options: dict | None = None  # quantize_'s extra weight options


def _collect(run: Callable[[], None], members: list[Target], needs: dict, total_rows: int, search_tokens: int,
             order_of: nn.Module | None = None):
    """Run ``run`` (one pass over the calibration data) with hooks on ``members``.
    -> (groups: list of lists of Target in call order, stats per group, call order info)."""
    first_inputs: dict[int, torch.Tensor] = {}  # id(module) -> input tensor of its first call
    counter = [0]
    group_of: dict[int, int] = {}
    groups: list[list[Target]] = []
    stats: list[InputStats] = []
    by_id = {id(t.module): t for t in members}
    handles = []
    module_order: dict[str, int] = {}
    group_start: dict[int, int] = {}

    def pre(mod, args):
        x = args[0]
        mid = id(mod)
        if mid not in group_of:
            for gi, g in enumerate(groups):
                if first_inputs.get(id(g[0].module)) is x:
                    group_of[mid] = gi
                    g.append(by_id[mid])
                    break
            else:
                t = by_id[mid]
                group_of[mid] = len(groups)
                groups.append([t])
                group_start[len(groups) - 1] = counter[0]
                want = needs[mid]
                stride = max(1, -(-total_rows // search_tokens)) if want["sample"] else 1
                stats.append(InputStats(k=x.shape[-1], hessian=want["hessian"], sample_stride=stride,
                                        max_rows=search_tokens if want["sample"] else 0))
            first_inputs[mid] = x
        gi = group_of[mid]
        if groups[gi][0].module is mod:
            stats[gi].add(x)

    for t in members:
        handles.append(t.module.register_forward_pre_hook(pre))
    if order_of is not None:
        def post(name):
            def hook(mod, args, out):
                if name not in module_order:
                    counter[0] += 1
                    module_order[name] = counter[0]
            return hook
        for name, m in order_of.named_modules():
            if name:
                handles.append(m.register_forward_hook(post(name)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return groups, stats, module_order, group_start


def _needs(recipe) -> dict:
    weight_only_awq = recipe.transform == "awq" and recipe.activation.fmt is None
    return {"hessian": recipe.quantizer == "gptq" or weight_only_awq,
            "sample": recipe.transform in ("awq", "smooth") and not weight_only_awq}


def _merge_needs(members: list[Target]) -> dict[int, dict]:
    return {id(t.module): _needs(t.recipe) for t in members}


def _group_needs(members, needs):
    # one statistics object per input: collect what any layer that might share it needs
    h = any(n["hessian"] for n in needs.values())
    s = any(n["sample"] for n in needs.values())
    return {k: {"hessian": h, "sample": s} for k in needs}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def _fold_candidates(block: nn.Module, group: list[Target], k: int, module_order: dict[str, int], start: int):
    """Modules of ``block`` that ran before the group and could absorb a per-channel
    scale of their output: a Linear with out_features == K, or a norm-like module with a
    1-D weight of size K. Nearest first, at most 3."""
    members = {id(t.module) for t in group}
    found = []
    for name, m in block.named_modules():
        if not name or id(m) in members or module_order.get(name, 10**9) > start:
            continue
        if isinstance(m, nn.Linear):
            ok = m.out_features == k
        else:
            w = getattr(m, "weight", None)
            b = getattr(m, "bias", None)
            ok = (isinstance(w, torch.Tensor) and w.dim() == 1 and w.numel() == k
                  and (b is None or (isinstance(b, torch.Tensor) and b.shape == w.shape))
                  and not any(True for _ in m.children()))
        if ok:
            found.append((module_order[name], name, m))
    found.sort(key=lambda t: -t[0])
    return [(n, m) for _, n, m in found[:3]]


@torch.no_grad()
def _scale_output(module: nn.Module, inv: torch.Tensor) -> None:
    """Multiply ``module``'s output channels by ``inv`` (in place, through its weight/bias)."""
    w = module.weight
    if isinstance(module, nn.Linear):
        w.copy_((w.float() * inv[:, None].to(w.device)).to(w.dtype))
    else:
        w.copy_((w.float() * inv.to(w.device)).to(w.dtype))
    b = getattr(module, "bias", None)
    if b is not None:
        b.copy_((b.float() * inv.to(b.device)).to(b.dtype))


@torch.no_grad()
def _record_outputs(work: nn.Module, probe: _BlockInput, cast) -> tuple[torch.Tensor, dict[str, list]]:
    """Run the block on the probe; -> (block output, every submodule's tensor outputs by name)."""
    outs: dict[str, list] = {}

    def keep(name):
        def hook(mod, args, out):
            t = out if isinstance(out, torch.Tensor) else next(
                (o for o in (out if isinstance(out, (tuple, list)) else ()) if isinstance(o, torch.Tensor)), None)
            if t is not None and t.is_floating_point():
                outs.setdefault(name, []).append(t.detach().clone())
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in work.named_modules() if n]
    try:
        out = probe.run(work, cast=cast).clone()
    finally:
        for h in handles:
            h.remove()
    return out, outs


@torch.no_grad()
def _probe_fold(block: nn.Module, block_names: dict[int, str], group: list[Target], candidates, probe: _BlockInput,
                k: int) -> str | None:
    """The first candidate whose output can take a per-channel scale 1/d that the group's
    inputs undo (x -> x d), leaving the block unchanged. Checked by running the block on a
    short probe sequence, in float32, with a random d in [0.5, 2]: the block's output and
    the output of every module inside it must be unchanged, or (for the candidate, and
    modules that merely pass its output on: containers, dropout) exactly 1/d times the
    original along a last dimension of size K. A nonlinearity between the candidate and the
    group (GELU), or another reader of the candidate's output (a residual), changes some
    output otherwise, however small its share of the block's output."""
    if not candidates:
        return None
    dtype = next(block.parameters()).dtype
    work = block if dtype in (torch.float32, torch.float64) else copy.deepcopy(block).float()
    cast = (lambda t: t.float() if t.is_floating_point() else t) if work is not block else None
    mods = dict(work.named_modules())
    ref, ref_outs = _record_outputs(work, probe, cast)
    gen = torch.Generator().manual_seed(0)
    d = 0.5 + 1.5 * torch.rand(k, generator=gen, dtype=torch.float32)
    tol = 1e-4

    def same(a, b):
        return a.shape == b.shape and _rel_err(a, b) < tol

    for name, _ in candidates:
        p = mods[name]
        saved = {n: t.detach().clone() for n, t in p.named_parameters(recurse=False)}
        _scale_output(p, 1.0 / d)
        hooks = [mods[block_names[id(t.module)]].register_forward_pre_hook(
            lambda mod, args: (args[0] * d.to(args[0].device, args[0].dtype),) + tuple(args[1:]))
            for t in group]
        try:
            out, outs = _record_outputs(work, probe, cast)
        finally:
            for h in hooks:
                h.remove()
            for n, t in saved.items():
                getattr(p, n).copy_(t)
        ok = same(out, ref) and outs.keys() == ref_outs.keys()
        for mname in ref_outs if ok else ():
            a_list, r_list = outs[mname], ref_outs[mname]
            if len(a_list) != len(r_list):
                ok = False
                break
            for a, r in zip(a_list, r_list):
                scaled = r.shape[-1:] == (k,) and same(a, r / d.to(r.device, r.dtype))
                if not (same(a, r) or scaled):
                    ok = False
                    break
            if not ok:
                break
        if ok:
            return name
    return None


def quantize_calibrated(model: nn.Module, targets: list[Target], calibration, weight_options: dict | None,
                        method_options: dict, install: Callable, backend: str = "auto", progress: bool = True,
                        log: Callable[[str], None] | None = None) -> dict:
    """Quantize ``targets`` (distinct modules) of ``model`` with calibration data, block by block;
    ``install(target, quant_linear, note)`` puts each new layer in place. Returns a summary dict."""
    from .methods import check_method_options

    opts = check_method_options(method_options)
    batches = as_batches(calibration, opts["calibration"]["batch_size"])
    total_rows = sum(b.numel() for b in batches)
    probe_ids = batches[0][:1, : min(64, batches[0].shape[1])]
    search_tokens = max(opts["awq"]["search_tokens"], opts["smooth"]["search_tokens"])
    ids = {id(t.module) for t in targets}
    found = find_blocks(model, ids)
    summary = {"sequences": sum(b.shape[0] for b in batches), "tokens": total_rows, "blocks": 0}
    t0 = time.perf_counter()
    bar = None
    in_blocks: list[Target] = []
    if found is not None:
        list_name, blocks = found
        block_of = {}
        for bi, blk in enumerate(blocks):
            for sub in blk.modules():
                block_of.setdefault(id(sub), bi)
        in_blocks = [t for t in targets if id(t.module) in block_of]
        was_training = model.training
        model.eval()
        with torch.no_grad():
            inputs = capture_block_inputs(model, blocks[0], batches)
            probe = capture_block_inputs(model, blocks[0], [probe_ids])[0]
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(blocks), desc="calibrated quantization", unit="block", leave=False)
        sequential = opts["calibration"]["sequential"]
        if sequential is None:  # GPTQ compensates the errors of the blocks before; AWQ/SmoothQuant need not
            sequential = any(t.recipe.quantizer == "gptq" for t in targets)
        summary["sequential"] = bool(sequential)
        for bi, blk in enumerate(blocks):
            members = [t for t in in_blocks if block_of[id(t.module)] == bi]
            calibrate_block(blk, members, inputs, probe, sequential=sequential, total_rows=total_rows,
                            search_tokens=search_tokens, opts=opts, weight_options=weight_options,
                            install=install, backend=backend, summary=summary)
            if bar:
                bar.update()
        if bar:
            bar.close()
        model.train(was_training)
        del inputs
    rest = [t for t in targets if t not in in_blocks]
    if rest:
        needs = _group_needs(rest, _merge_needs(rest))

        def run_all():
            with torch.no_grad():
                for b in batches:
                    _run_model(model, b)

        groups, stats, _, _ = _collect(run_all, rest, needs, total_rows, search_tokens)
        _process_groups(groups, stats, opts, install, backend, None, {}, {}, {}, None, summary)
        for t in rest:
            if not any(t in g for g in groups):
                _quantize_without_data(t, weight_options, opts, install, backend)
    summary["seconds"] = time.perf_counter() - t0
    if log:
        log(f"calibrated quantization: {summary['sequences']} sequences, {summary['tokens']} tokens, "
            f"{summary['blocks']} blocks, {summary['seconds']:.0f} s")
    return summary


def calibrate_block(blk: nn.Module, members: list[Target], inputs: list[_BlockInput], probe: _BlockInput, *,
                    sequential: bool, total_rows: int, search_tokens: int, opts: dict, weight_options,
                    install: Callable, backend: str, summary: dict) -> None:
    """Quantize one decoder block's target layers from one pass over its cached inputs,
    then advance ``inputs`` and ``probe`` to the block's outputs: those of the quantized
    block when ``sequential`` (GPTQ), else the full-precision ones of the statistics pass
    (AWQ, SmoothQuant). ``install(target, quant_linear, note)`` puts each result in place.
    Shared by the in-memory path (``quantize_calibrated``) and the streaming one
    (``lowbit.io.layerwise``)."""
    outs: list = []
    if members:
        needs = _group_needs(members, _merge_needs(members))

        def run_stats():
            with torch.no_grad():
                for inp in inputs:
                    out = inp.run(blk)
                    if not sequential:  # the full-precision output is the next block's input
                        outs.append(out)

        groups, stats, order, starts = _collect(run_stats, members, needs, total_rows, search_tokens, order_of=blk)
        names = {id(m): n for n, m in blk.named_modules()}
        _process_groups(groups, stats, opts, install, backend, blk, names, order, starts, probe, summary)
        for t in members:
            if not any(t in g for g in groups):  # never ran on the calibration data
                _quantize_without_data(t, weight_options, opts, install, backend)
        del groups, stats
    with torch.no_grad():
        if outs:
            for inp, out in zip(inputs, outs):
                inp.hidden = out
        else:
            for inp in inputs:
                inp.hidden = inp.run(blk)
        probe.hidden = probe.run(blk)
    summary["blocks"] += 1


def _quantize_without_data(t: Target, weight_options, opts, install, backend):
    """A layer that never ran on the calibration data: round to nearest (or HQQ), no transform."""
    from ..nn.linear import QuantLinear
    from .methods import prepare_weight, quantize_prepared

    r = t.recipe
    wopts = {**r.weight_options, **(weight_options or {})}
    quantizer = "hqq" if r.quantizer == "hqq" else "rtn"
    w = prepare_weight(t.module.weight, None, r.rotation_block)
    q = quantize_prepared(w, r.weight_fmt, wopts, quantizer, {"hqq": opts["hqq"]})
    install(t, QuantLinear(q, t.module.bias, r.activation, backend=backend, recipe=r.name,
                           rotation_block=r.rotation_block),
            "did not run on the calibration data: quantized without it (round to nearest)")


def _process_groups(groups, stats, opts, install, backend, block, block_names, module_order, group_start, probe,
                    summary):
    from ..nn.linear import QuantLinear
    from . import awq, smoothquant
    from .methods import prepare_weight, quantize_prepared, transform_hessian

    plans = []  # (target, input scale or None, kept as input scale?, note)
    for gi, group in enumerate(groups):
        st = stats[gi]
        transforms = {t.recipe.transform for t in group}
        same = len({(t.recipe.name, repr(t.weight_options)) for t in group}) == 1
        transform = group[0].recipe.transform if len(transforms) == 1 else None
        if transform in ("awq", "smooth") and same:
            search = awq.search_scale if transform == "awq" else smoothquant.search_scale
            t0 = group[0]
            s, info = search([t.module.weight for t in group], st, t0.recipe,
                             {**t0.recipe.weight_options, **(t0.weight_options or {})}, opts)
            folded = None
            if bool(torch.all(s == 1)):  # the search kept plain quantization: no transform at all
                for t in group:
                    plans.append((t, None, False, f"{transform}: no scale (s = 1 was best on the sample)"))
                continue
            if block is not None:
                cands = _fold_candidates(block, group, st.k, module_order, group_start.get(gi, 0))
                folded = _probe_fold(block, block_names, group, cands, probe, st.k)
                if folded is not None:
                    pred = dict(block.named_modules())[folded]
                    _scale_output(pred, 1.0 / s)
                    if isinstance(pred, nn.Linear):  # remembered for effective_weight (diagnostics)
                        prev = getattr(pred, "_lowbit_row_scale", None)
                        pred._lowbit_row_scale = (1.0 / s) if prev is None else prev / s
            note = (f"{transform} scale ({info}) folded into {folded}" if folded
                    else f"{transform} scale ({info}) kept as input_scale")
            summary.setdefault(f"{transform}_folded" if folded else f"{transform}_input_scale", 0)
            summary[f"{transform}_folded" if folded else f"{transform}_input_scale"] += len(group)
            for t in group:
                plans.append((t, s, folded is None, note))
        else:
            for t in group:
                s, note = None, ""
                if t.recipe.transform in ("awq", "smooth"):
                    search = awq.search_scale if t.recipe.transform == "awq" else smoothquant.search_scale
                    s, info = search([t.module.weight], st, t.recipe,
                                     {**t.recipe.weight_options, **(t.weight_options or {})}, opts)
                    note = f"{t.recipe.transform} scale ({info}) kept as input_scale (its input feeds other recipes)"
                    if bool(torch.all(s == 1)):
                        s, note = None, f"{t.recipe.transform}: no scale (s = 1 was best on the sample)"
                plans.append((t, s, s is not None, note))
    for t, s, keep, note in plans:
        r = t.recipe
        st = stats[next(i for i, g in enumerate(groups) if t in g)]
        wopts = {**r.weight_options, **(t.weight_options or {})}
        w = prepare_weight(t.module.weight, s, r.rotation_block)
        if r.transform == "awq" and r.quantizer == "rtn" and opts["awq"]["clip"]:
            w = awq.clip_search(w, st, s, r, wopts, opts["awq"])
        h = None
        if r.quantizer == "gptq":
            h = transform_hessian(st.h / max(st.rows, 1), s, r.rotation_block)
        q = quantize_prepared(w, r.weight_fmt, wopts, r.quantizer, opts, hessian=h)
        ql = QuantLinear(q, t.module.bias, r.activation, backend=backend, recipe=r.name,
                         input_scale=s if keep else None, rotation_block=r.rotation_block)
        if s is not None and not keep:
            ql.folded_input_scale = s.detach().float().cpu()
        row = getattr(t.module, "_lowbit_row_scale", None)
        if row is not None:
            ql.folded_output_scale = row.detach().float().cpu()
        install(t, ql, note)
