"""Write a synthetic checkpoint shaped like a real model (random bf16 weights), for
benchmarking lowbit quantize on models larger than memory.

    python scripts/make_synthetic_llama.py /tmp/llama3-8b-synthetic            # Llama-3-8B shapes, ~16 GB
    python scripts/make_synthetic_llama.py /tmp/tiny --layers 2 --hidden 256 --intermediate 512 --vocab 1000

The directory is what Hugging Face writes: config.json (LlamaForCausalLM),
generation_config.json, model-0000i-of-0000n.safetensors shards of at most
--shard-size and model.safetensors.index.json. Weights are normal with the
standard deviation of Llama's initialisation (0.02; norms are ones), drawn
tensor by tensor from a seeded generator, so the file is reproducible and only
one tensor is in memory at a time. Random weights do not change how long
quantization takes or how much memory it needs; they make the quality
meaningless (this is a benchmark input, not a model).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lowbit.io import _safetensors as st
from lowbit.io.commands import parse_size


def llama_config(args) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": args.hidden, "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads, "head_dim": args.hidden // args.heads,
        "vocab_size": args.vocab, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16", "dtype": "bfloat16",
        "initializer_range": 0.02,
    }


def tensors(cfg: dict):
    """(name, shape) of every tensor of a Llama checkpoint, in Hugging Face order."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    yield "model.embed_tokens.weight", (v, h)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (q, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, q)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def maker(seed: int, shape, std: float):
    def make():
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16)
        g = torch.Generator().manual_seed(seed)
        out = torch.empty(shape, dtype=torch.bfloat16)
        rows = max(1, (1 << 24) // shape[1])  # draw in float32 chunks of 64 MB
        for r in range(0, shape[0], rows):
            out[r:r + rows] = (torch.randn((min(rows, shape[0] - r), shape[1]), generator=g) * std).to(torch.bfloat16)
        return out
    return make


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--std", type=float, default=0.02)
    p.add_argument("--shard-size", default="5GB")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    cfg = llama_config(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    entries = [st.Entry.lazy(name, torch.bfloat16, shape, maker(args.seed * 100003 + i, shape, args.std))
               for i, (name, shape) in enumerate(tensors(cfg))]
    total = sum(e.nbytes for e in entries)
    print(f"writing {len(entries)} tensors, {total / 1e9:.2f} GB, to {out}")
    t0 = time.time()
    done = [0]

    def progress(e):
        done[0] += e.nbytes
        if e.name.endswith("down_proj.weight") or e.name == "lm_head.weight":
            el = time.time() - t0
            print(f"  {done[0] / 1e9:6.2f} GB  {el:5.0f} s  ETA {el / done[0] * (total - done[0]):5.0f} s", flush=True)

    files = st.write_sharded(out, entries, parse_size(args.shard_size), metadata={"format": "pt"}, progress=progress)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": 128001}))
    print(f"wrote {len(files)} shards in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
