"""End-to-end decode speed: tokens/s of a Llama-3-8B-shaped decoder (random
weights) at batch 1 and 16, bf16 against weight-only recipes, in one run.

    python -m lowbit.bench.decode --out DIR [--recipes a16w4-int-g128,a16w4-mxfp4]
                                  [--batches 1,16] [--context 1024] [--layers 32]

The model is written here in plain torch so that every step can be captured in
one CUDA graph: token embedding, ``layers`` x (RMSNorm, fused q/k/v projection,
rotary embedding, grouped-query attention over a static KV cache, o projection,
RMSNorm, fused gate/up projection, SiLU, down projection), final norm, lm_head. Every linear layer is an
``nn.Linear`` that ``lowbit.quantize_`` replaces (lm_head included). One decode
step = one token for each of the ``batch`` sequences, attending to ``context``
cached positions; tokens/s = batch / step time (CUDA-graph replay, median).
Weights are N(0, 0.02) bf16. As a check of the kernels in situ, each quantized
model's logits are compared with the same quantized model run on the reference
path (dequantized weights, cuBLAS); random weights make a quality comparison
with bf16 meaningless.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .shapes import ModelConfig

LLAMA3_8B = ModelConfig("llama3-8b", "Llama-3-8B", 4096, 32, 8, 128, 14336, True)
VOCAB = 128256


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Block(nn.Module):
    """A Llama decoder layer with the fused projections serving engines run
    (q/k/v in one matmul, gate and up in one): the shapes of bench.shapes' llama3-8b."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.attn_norm = RMSNorm(c.hidden)
        self.qkv_proj = nn.Linear(c.hidden, (c.heads + 2 * c.kv_heads) * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.heads * c.head_dim, c.hidden, bias=False)
        self.mlp_norm = RMSNorm(c.hidden)
        self.gate_up_proj = nn.Linear(c.hidden, 2 * c.intermediate, bias=False)
        self.down_proj = nn.Linear(c.intermediate, c.hidden, bias=False)

    def forward(self, x, cos, sin, k_cache, v_cache, pos):
        c = self.c
        b = x.shape[0]
        h = self.attn_norm(x)
        qkv = self.qkv_proj(h).view(b, c.heads + 2 * c.kv_heads, 1, c.head_dim)
        qk = _rotary(qkv[:, : c.heads + c.kv_heads], cos, sin)  # q and k rotated together
        q, k = qk[:, : c.heads], qk[:, c.heads:]
        v = qkv[:, c.heads + c.kv_heads:]
        k_cache.index_copy_(2, pos, k)  # the cache slot of this step (a device tensor: graph-safe)
        v_cache.index_copy_(2, pos, v)
        # one query per sequence over the whole (filled) cache: no mask
        a = F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True)
        x = x + self.o_proj(a.reshape(b, c.heads * c.head_dim))
        gate, up = self.gate_up_proj(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


def _rotary(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Decoder(nn.Module):
    def __init__(self, c: ModelConfig, layers: int, vocab: int):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(vocab, c.hidden)
        self.blocks = nn.ModuleList(Block(c) for _ in range(layers))
        self.norm = RMSNorm(c.hidden)
        self.lm_head = nn.Linear(c.hidden, vocab, bias=False)

    def forward(self, tokens, pos, caches):
        """tokens [B] (device), pos [1] (device, int64: the last cache slot) -> logits [B, vocab]."""
        c = self.c
        x = self.embed(tokens)
        inv = 1.0 / (500000.0 ** (torch.arange(0, c.head_dim, 2, device=x.device).float() / c.head_dim))
        ang = pos.float()[:, None] * inv[None, :]
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        for blk, (kc, vc) in zip(self.blocks, caches):
            x = blk(x, cos, sin, kc, vc, pos)
        return self.lm_head(self.norm(x))


def make_caches(model: Decoder, batch: int, context: int, dtype, device):
    c = model.c
    shape = (batch, c.kv_heads, context, c.head_dim)
    g = torch.Generator(device=device).manual_seed(1)
    return [(torch.randn(shape, device=device, dtype=dtype, generator=g),
             torch.randn(shape, device=device, dtype=dtype, generator=g)) for _ in model.blocks]


def build_model(layers: int, device, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    with torch.device(device):
        model = Decoder(LLAMA3_8B, layers, VOCAB)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.normal_(0.0, 0.02)
    return model.to(torch.bfloat16).eval()


def time_step(model, batch: int, context: int, reps: int = 20):
    """Capture one decode step in a CUDA graph; median replay time (s) and the logits."""
    device = next(model.parameters()).device
    caches = make_caches(model, batch, context, torch.bfloat16, device)
    tokens = torch.randint(0, VOCAB, (batch,), device=device, generator=torch.Generator(device=device).manual_seed(2))
    pos = torch.tensor([context - 1], device=device)
    with torch.inference_mode():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # compile the kernels, warm the caches
                model(tokens, pos, caches)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = model(tokens, pos, caches)
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 5 / 1e3)
    times.sort()
    return times[len(times) // 2], logits.float().clone()


def reference_logits(model, batch: int, context: int):
    """The same step of the same (quantized) model with every QuantLinear on the
    reference path (dequantized weight, cuBLAS): the kernels' correctness in situ."""
    from ..nn.linear import QuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    device = next(model.parameters()).device
    caches = make_caches(model, batch, context, torch.bfloat16, device)
    tokens = torch.randint(0, VOCAB, (batch,), device=device, generator=torch.Generator(device=device).manual_seed(2))
    pos = torch.tensor([context - 1], device=device)
    for m in layers:
        m.backend = "reference"
    try:
        with torch.inference_mode():
            out = model(tokens, pos, caches).float()
    finally:
        for m in layers:
            m.backend = "auto"
            m._w_cache = None  # free the dequantized weights
    return out


def run(recipes, batches, context, layers, log=print) -> dict:
    from .. import quantize_

    device = torch.device("cuda")
    t0 = time.time()
    base = build_model(layers, device)
    log(f"built a Llama-3-8B-shaped decoder: {layers} layers, vocab {VOCAB} "
        f"({sum(p.numel() for p in base.parameters()) / 1e9:.2f} B parameters) in {time.time() - t0:.0f} s")
    rows = []
    for b in batches:
        step, _ = time_step(base, b, context)
        rows.append({"recipe": "bf16", "batch": b, "step_ms": step * 1e3, "tokens_per_s": b / step, "speedup": 1.0})
        log(f"bf16 batch {b}: {step * 1e3:.2f} ms/step, {b / step:.1f} tokens/s")
    bf16_step = {r["batch"]: r["step_ms"] for r in rows}
    for recipe in recipes:
        t0 = time.time()
        model = copy.deepcopy(base)
        report = quantize_(model, recipe, skip=())
        log(f"{recipe}: {len(report.replaced)} layers quantized in {time.time() - t0:.0f} s "
            f"({report.bits_per_weight:.2f} bits/weight)")
        for b in batches:
            step, logits = time_step(model, b, context)
            ref = reference_logits(model, b, context)
            rel = float((logits - ref).norm() / ref.norm())
            rows.append({"recipe": recipe, "batch": b, "step_ms": step * 1e3, "tokens_per_s": b / step,
                         "speedup": bf16_step[b] / (step * 1e3), "logits_rel_err_vs_reference_path": rel})
            log(f"{recipe} batch {b}: {step * 1e3:.2f} ms/step, {b / step:.1f} tokens/s, "
                f"{bf16_step[b] / (step * 1e3):.2f}x bf16 (logits vs the same model on the reference path: "
                f"rel err {rel:.2e})")
        del model
        torch.cuda.empty_cache()
    return {"model": f"Llama-3-8B-shaped decoder, {layers} layers, random N(0, 0.02) bf16 weights, all linears "
                     f"quantized (lm_head included)", "context": context, "rows": rows}


def format_table(result: dict) -> str:
    batches = sorted({r["batch"] for r in result["rows"]})
    recipes = list(dict.fromkeys(r["recipe"] for r in result["rows"]))
    out = ["| recipe | " + " | ".join(f"batch {b}: tokens/s (x bf16)" for b in batches) + " |",
           "|---|" + "---|" * len(batches)]
    for rc in recipes:
        cells = []
        for b in batches:
            r = next((r for r in result["rows"] if r["recipe"] == rc and r["batch"] == b), None)
            cells.append("-" if r is None else f"{r['tokens_per_s']:.1f} ({r['speedup']:.2f}x)")
        out.append(f"| {rc} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="folder for decode.json and decode.md")
    ap.add_argument("--recipes", default="a16w4-int-g128,a16w4-mxfp4")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("lowbit.bench.decode needs a CUDA GPU", file=sys.stderr)
        return 2
    result = run(args.recipes.split(","), [int(b) for b in args.batches.split(",")], args.context, args.layers,
                 log=lambda s: print(s, flush=True))
    result.update({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                   "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    table = format_table(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "decode.json").write_text(json.dumps(result, indent=1))
        (out / "decode.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
