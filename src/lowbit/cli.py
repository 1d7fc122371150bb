"""The `lowbit` command line."""

from __future__ import annotations

import argparse
import sys


def cmd_formats(args: argparse.Namespace) -> int:
    from .formats import FORMATS
    from .table import format_table

    rows = [
        [s.name, s.bits, s.block, s.scale, f"{s.reference_bits:.3f}", s.description]
        for s in FORMATS.values()
    ]
    print(format_table(["format", "bits", "block/group", "scale", "bits/weight", "what it is"], rows, "lrllrl"))
    print("\nbits/weight: a 4096x4096 weight with the default options and 16-bit software scales.")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from .eval.quality import baseline_row, evaluate, format_rows, prepare
    from .nn.recipes import parse_recipe

    for r in args.recipe:  # fail on a bad name before loading anything
        parse_recipe(r)
    weight_options = {"zero_point": args.zero_point} if args.zero_point else None
    method_options = None
    if args.method_options:
        from .quant.methods import check_method_options

        try:
            method_options = json.loads(args.method_options)
        except json.JSONDecodeError as e:
            raise ValueError(f"--method-options must be JSON, e.g. '{{\"gptq\": {{\"act_order\": true}}}}' ({e})")
        check_method_options(method_options)
    if args.calibration_seqs < 1 or args.calibration_len < 2:
        raise ValueError("--calibration-seqs must be >= 1 and --calibration-len >= 2")
    import torch

    dtype = getattr(torch, args.dtype)
    ev = prepare(args.model, text_file=args.text, n_tokens=args.tokens, seq_len=args.seq_len, dtype=dtype,
                 calibration_text=args.calibration_text, calibration_seqs=args.calibration_seqs,
                 calibration_len=args.calibration_len)
    print(f"model: {ev.bundled.description}")
    print(f"text: {ev.text_source}")
    if any(parse_recipe(r).needs_calibration for r in args.recipe):
        print(f"calibration: {ev.calibration_source}")
    rows = [baseline_row(ev)] + [evaluate(ev, r, weight_options=weight_options, method_options=method_options)
                                 for r in args.recipe]
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "text": ev.text_source, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.run import run_from_args

    try:
        return run_from_args(args)
    except (RuntimeError, NotImplementedError) as e:  # no CUDA GPU; --e2e not built yet
        print(f"lowbit bench: error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lowbit",
        description="Low-bit inference of attention-based models: quantize, measure, run.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    f = sub.add_parser("formats", help="list every element format with its bits, block and scale")
    f.set_defaults(func=cmd_formats)
    d = sub.add_parser("demo", help="the main job: quantize the bundled SmolLM2 with several recipes, measure, answer")
    d.add_argument("--model", default="smollm2", help="bundled model: smollm2 or minilm (default: smollm2)")
    d.add_argument("--recipes", nargs="+", metavar="R", help="recipes (default: a representative set)")
    d.add_argument("--tokens", type=int, default=2048,
                   help="evaluation tokens (default: 2048, to stay quick; `lowbit eval` uses 4096 like QUALITY.md)")
    d.set_defaults(func=cmd_demo)
    e = sub.add_parser("eval", help="measure recipes on a bundled model against its full-precision self")
    e.add_argument("--model", default="smollm2", help="bundled model: smollm2 or minilm (default: smollm2)")
    e.add_argument("--recipe", nargs="+", required=True, metavar="R", help="recipes, e.g. a16w4-int-g128 a8w8-fp8")
    e.add_argument("--text", help="evaluate on this text file instead of pydoc_data.topics' evaluation half")
    e.add_argument("--tokens", type=int, default=4096, help="evaluation tokens for a decoder (default: 4096)")
    e.add_argument("--seq-len", type=int, default=512, help="sequence length for a decoder (default: 512)")
    e.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the model and its activations (default: float32)")
    e.add_argument("--zero-point", choices=("float", "integer"), help="zero point of affine integer weights")
    e.add_argument("--calibration-text", metavar="FILE",
                   help="calibration text for -awq/-gptq/-smooth (default: the calibration half of pydoc_data.topics)")
    e.add_argument("--calibration-seqs", type=int, default=128,
                   help="at most this many calibration sequences (default: 128)")
    e.add_argument("--calibration-len", type=int, default=512,
                   help="tokens per calibration sequence for a decoder (default: 512)")
    e.add_argument("--method-options", metavar="JSON",
                   help='per-method options, e.g. \'{"gptq": {"act_order": true, "static_groups": true}}\'')
    e.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    e.set_defaults(func=cmd_eval)
    from .bench.run import add_arguments as add_bench_arguments

    b = sub.add_parser("bench", help="time weight-only matmuls against bf16 cuBLAS and peers on real model shapes (GPU)")
    add_bench_arguments(b)
    b.set_defaults(func=cmd_bench)
    t = sub.add_parser("tune", help="time the kernels on a model's linear shapes and record the fastest (GPU)")
    t.add_argument("--model", required=True,
                   help="a model's linear shapes: a bundled model (smollm2, minilm), a model of the benchmark "
                        "registry (llama3-8b, llama3-70b, smollm2-135m), a comma list of registry shapes, or NxK")
    t.add_argument("--recipe", nargs="+", default=["a16w4-int-g128"], metavar="R", help="weight-only (a16w*), A8W8 (a8w8-fp8, a8w8-int8, -b128) or W4A8 (a8w4-fp8-mxfp4: tunes a8w8-fp8 and a16w4-mxfp4, whose kernels it runs) recipes")
    t.add_argument("--m", default="1,2,4,8,16,32,64,128,256,512,1024,2048,4096,8192",
                   help="token counts (M) to tune, comma list (default: every M bucket up to 8192)")
    t.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    t.add_argument("--budget-s", type=float, help="stop after this many seconds (what was measured is kept)")
    t.set_defaults(func=cmd_tune)
    from .io.commands import add_commands as add_serving_commands  # export, quantize, check

    add_serving_commands(sub)
    return p


def cmd_tune(args: argparse.Namespace) -> int:
    import torch

    from .bench.shapes import parse_ms, select_shapes
    from .kernels import dispatch

    if not torch.cuda.is_available():
        print("lowbit tune: error: no CUDA GPU here; the shipped defaults apply (lowbit.kernels.dispatch)",
              file=sys.stderr)
        return 2
    # the bundled models by their short names: SmolLM2 is in the registry, MiniLM's linears are 384/1536 wide
    spec = {"smollm2": "smollm2-135m", "minilm": "384x384,1536x384,384x1536"}.get(args.model, args.model)
    shapes = sorted({(s.n, s.k) for s in select_shapes(spec)})
    cache = dispatch.tune(shapes, args.recipe, parse_ms(args.m), dtype=getattr(torch, args.dtype),
                          budget_s=args.budget_s, log=lambda s: print(s, flush=True))
    print(f"{len(cache.entries)} tuned entries for {cache.gpu} in {cache.path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, TypeError, ModuleNotFoundError, FileNotFoundError) as e:
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
