"""The serving commands of the `lowbit` command line: export, quantize, check.

Registered by lowbit.cli (``add_commands(subparsers)``); kept here so that they
live beside the code they drive.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"bad size {text!r}: use e.g. 5GB, 500MB, 2GiB")
    unit = (m.group(2) or "").lower().rstrip("b").rstrip("i")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit]
    return int(float(m.group(1)) * mult)


def _weight_options(args) -> dict | None:
    opts = {}
    if getattr(args, "symmetric", False):
        opts["symmetric"] = True
    if getattr(args, "zero_point", None):
        opts["zero_point"] = args.zero_point
    return opts or None


def cmd_export(args: argparse.Namespace) -> int:
    from . import compressed_tensors as ct

    src = Path(args.src)
    if src.is_dir() and (src / "lowbit.json").is_file():
        report = export_lowbit_checkpoint(src, args.out, convert=args.convert,
                                          max_shard_bytes=parse_size(args.shard_size))
        print(report)
        return 0
    if src.is_dir() or src.suffix == ".gguf":
        if not args.recipe:
            raise ValueError(f"{src} is not quantized: give --recipe (or run lowbit quantize)")
        return cmd_quantize(argparse.Namespace(**{**vars(args), "export": "compressed-tensors", "tp": None,
                                                  "restart": False, "skip": args.skip}))
    # a bundled model
    if not args.recipe:
        raise ValueError("exporting a bundled model needs --recipe, e.g. --recipe a16w4-int-g64")
    import torch

    from ..eval.models import load_model

    bm = load_model(args.src)
    report_q = ct.quantize_for_export(bm.model, args.recipe, weight_options=_weight_options(args), skip=args.skip)
    print(report_q)
    cal = None
    if args.recipe.startswith("a4") and "nvfp4" in args.recipe:
        from ..eval.corpus import token_sequences, topics_split

        calib_text, _ = topics_split()
        ids = token_sequences(bm.tokenizer, calib_text, n_tokens=args.calib_tokens, seq_len=min(512, args.calib_tokens))
        cal = [ids[i:i + 1] for i in range(ids.shape[0])]
    dtype = getattr(torch, args.dtype) if args.dtype else None
    report = ct.export(bm.model, args.out, tokenizer=bm.tokenizer, convert=args.convert, calibration=cal,
                       dtype=dtype, max_shard_bytes=parse_size(args.shard_size))
    print(report)
    print(f"serve it: vllm serve {args.out}")
    return 0


def export_lowbit_checkpoint(src: Path, out, convert: bool = False, max_shard_bytes: int = 5 << 30):
    """A lowbit checkpoint directory (lowbit.json + model.safetensors + config.json) ->
    a compressed-tensors directory; layer by layer."""
    import shutil

    from ..nn.recipes import ActivationSpec
    from . import _safetensors as st
    from . import compressed_tensors as ct
    from .checkpoint import CheckpointError, _build_qtensor, _from_jsonable
    from .streaming import AUX_FILES

    meta = json.loads((src / "lowbit.json").read_text())
    if meta.get("kind") != "model":
        raise CheckpointError(f"{src} holds loose tensors (kind {meta.get('kind')!r}), not a model")
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src} has no config.json: export needs the model's Hugging Face config "
                              "(lowbit quantize writes it; for lowbit.save'd models use lowbit.export(model, ...))")
    cfg = json.loads((src / "config.json").read_text())
    layers = meta["quantized_layers"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = ct.ExportReport(str(out))
    schemes = {}
    entries = []
    with st.CheckpointReader(src) as r:
        names = r.keys()
        done = set()
        errors = []
        for n in sorted(names, key=lambda n: r.info(n).start):
            owner = n.rsplit(".", 1)[0]
            if owner in layers:
                if owner in done:
                    continue
                done.add(owner)
                m = layers[owner]
                parts = {k: r.get(k) for k in names if k.rsplit(".", 1)[0] == owner}
                q = _build_qtensor(owner, m, parts, ".weight_")
                act = ActivationSpec(m["activation"]["fmt"], _from_jsonable(m["activation"]["options"]))
                rep = ct.LayerExport(owner, m.get("recipe"), "", tuple(q.shape))
                try:
                    scheme = ct.weight_scheme(owner, q, act)
                    bad = ct._int_zero_out_of_range(q)
                    if bad is not None and bool(bad.any()):
                        if not convert:
                            raise ct.LayerError(owner, f"{q.fmt} affine weights with zero points compressed-tensors "
                                                       "cannot store (float, or outside the code range)",
                                                "pass --convert to re-quantize them (the error is reported)")
                        q, c = ct.convert_int_zero_points(q)
                        rep.conversions.append(c)
                except ct.LayerError as e:
                    errors.append(e)
                    continue
                rep.format = scheme.format
                report.layers.append(rep)
                schemes[owner] = scheme
                bias = parts.get(f"{owner}.bias")
                entries += [st.Entry.of(k, v) for k, v in ct.layer_tensors(owner, q, scheme, bias).items()]
            else:
                entries.append(st.Entry.from_file(r.info(n), r.where[n].path))
        if errors:
            raise ct.ExportError("cannot export as compressed-tensors:\n  " + ct._summarize(errors))
        nv = [l for l, s in schemes.items() if s.format == "nvfp4-pack-quantized"]
        if ct._siblings(nv):
            raise ct.ExportError("NVFP4 checkpoints: re-run lowbit quantize with --export compressed-tensors, which "
                                 "quantizes q/k/v and gate/up with one shared global scale as vLLM needs")
        if cfg.get("tie_word_embeddings"):
            entries = [e for e in entries if e.name != "lm_head.weight"]
        ignore = sorted(n[: -len(".weight")] for n in names if n.endswith("lm_head.weight"))
        report.ignored = ignore
        report.files = st.write_sharded(out, entries, max_shard_bytes, metadata={"format": "pt", "producer": "lowbit"})
    c = {k: v for k, v in cfg.items() if k != "quantization_config"}
    c["quantization_config"] = ct.quantization_config(schemes, ignore)
    (out / "config.json").write_text(json.dumps(c, indent=2, sort_keys=True))
    for f in AUX_FILES:
        if (src / f).is_file():
            shutil.copyfile(src / f, out / f)
    return report


def cmd_quantize(args: argparse.Namespace) -> int:
    from .streaming import quantize_checkpoint

    seqs, length = getattr(args, "calibration_seqs", 128), getattr(args, "calibration_len", 512)
    if seqs < 1 or length < 2:
        raise ValueError("--calibration-seqs must be >= 1 and --calibration-len >= 2")
    res = quantize_checkpoint(args.src, args.out, args.recipe, export=args.export, skip=tuple(args.skip),
                              weight_options=_weight_options(args), tp=args.tp, convert=args.convert,
                              shard_bytes=parse_size(args.shard_size), restart=args.restart,
                              calibration_text=getattr(args, "calibration", None), calibration_seqs=seqs,
                              calibration_len=length)
    print(res)
    if args.export == "compressed-tensors":
        print(f"serve it: vllm serve {args.out}" + (f" --tensor-parallel-size {args.tp}" if args.tp else ""))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from . import tp

    if bool(args.dir) == bool(args.model):
        raise ValueError("give a checkpoint directory or --model NAME (one of them)")
    acts = {}
    if args.model:
        layers = tp.layers_from_registry(args.model, args.recipe, _weight_options(args))
    else:
        layers, acts = tp.layers_from_directory(args.dir, args.recipe, _weight_options(args))
    if not any(l.fmt for l in layers):
        raise ValueError(f"no quantized layer in {args.dir or args.model}: give --recipe to check how it "
                         "would be quantized")
    report = tp.check(layers, args.tp, engines=tuple(args.engine), activations=acts, strict=args.strict)
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "tp": report.tp, "ok": report.ok,
            "layers": [{"name": l.spec.name, "n": l.spec.n, "k": l.spec.k, "fmt": l.spec.fmt,
                        "split": l.spec.split, "shard": l.shard, "ok": l.ok,
                        "issues": [vars(i) for i in l.issues]} for l in report.layers]}, indent=1))
    return 0 if report.ok else 1


def add_commands(sub) -> None:
    """Register export, quantize and check on the `lowbit` subparsers."""
    x = sub.add_parser("export", help="write a quantized model as a compressed-tensors directory (vLLM, transformers)")
    x.add_argument("src", help="bundled model (smollm2), a lowbit checkpoint directory, or a Hugging Face directory")
    x.add_argument("out", help="output directory")
    x.add_argument("--format", default="compressed-tensors", choices=("compressed-tensors",))
    x.add_argument("--recipe", help="quantize with this recipe first (bundled models and unquantized directories)")
    x.add_argument("--skip", nargs="*", default=["lm_head"], metavar="PAT", help="layers kept in full precision")
    x.add_argument("--symmetric", action="store_true", help="symmetric integer weights (no zero points)")
    x.add_argument("--zero-point", choices=("float", "integer"), help=argparse.SUPPRESS)
    x.add_argument("--convert", action="store_true",
                   help="convert what compressed-tensors cannot store exactly, and report the error (refused otherwise)")
    x.add_argument("--calib-tokens", type=int, default=2048,
                   help="calibration tokens for the static NVFP4 activation scale of a4w4-nvfp4 (default 2048)")
    x.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the full-precision tensors (default: as in the model)")
    x.add_argument("--shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    x.set_defaults(func=cmd_export)

    q = sub.add_parser("quantize", help="quantize a checkpoint layer by layer from disk (bounded memory, resumable)")
    q.add_argument("src", help="Hugging Face model directory (config.json + safetensors shards) or a .gguf file")
    q.add_argument("--recipe", required=True, help="e.g. a16w4-int-g128-hqq")
    q.add_argument("--out", required=True, help="output directory (an interrupted run there is resumed)")
    q.add_argument("--export", default="lowbit", choices=("lowbit", "compressed-tensors"),
                   help="output format: lowbit's checkpoint (default) or compressed-tensors (vLLM, transformers)")
    q.add_argument("--tp", type=int, help="refuse unless every layer splits cleanly over this many GPUs")
    q.add_argument("--skip", nargs="*", default=["lm_head"], metavar="PAT", help="layers kept in full precision")
    q.add_argument("--symmetric", action="store_true", help="symmetric integer weights (no zero points)")
    q.add_argument("--zero-point", choices=("float", "integer"), help="zero points of affine integer weights")
    q.add_argument("--convert", action="store_true",
                   help="compressed-tensors: convert what it cannot store exactly and report the error")
    q.add_argument("--shard-size", default="5GB", help="largest output shard for compressed-tensors (default 5GB)")
    q.add_argument("--restart", action="store_true", help="discard an interrupted run in --out instead of resuming")
    q.add_argument("--calibration", metavar="FILE",
                   help="calibration text for -gptq/-awq/-smooth, tokenized with the source's tokenizer "
                        "(default: the calibration half of pydoc_data.topics)")
    q.add_argument("--calibration-seqs", type=int, default=128,
                   help="at most this many calibration sequences (default: 128)")
    q.add_argument("--calibration-len", type=int, default=512,
                   help="tokens per calibration sequence (default: 512)")
    q.set_defaults(func=cmd_quantize)

    c = sub.add_parser("check", help="will a checkpoint split cleanly over N GPUs (tensor parallel)?")
    c.add_argument("dir", nargs="?", help="checkpoint directory (lowbit, compressed-tensors or Hugging Face)")
    c.add_argument("--model", help="a model of lowbit's shape registry instead of a directory (e.g. llama3-70b)")
    c.add_argument("--recipe", help="for unquantized checkpoints: check the split this recipe would need")
    c.add_argument("--tp", type=int, required=True, help="tensor-parallel size")
    c.add_argument("--symmetric", action="store_true", help=argparse.SUPPRESS)
    c.add_argument("--engine", nargs="+", default=["lowbit", "vllm"], choices=("lowbit", "vllm"),
                   help="whose kernel constraints to check (default: both)")
    c.add_argument("--strict", action="store_true",
                   help="fail on warnings too (shards that vLLM's fast kernels refuse), not only on cut groups")
    c.add_argument("--json", metavar="FILE", help="also write the per-layer results as JSON")
    c.set_defaults(func=cmd_check)


__all__ = ["add_commands", "parse_size", "cmd_export", "cmd_quantize", "cmd_check", "export_lowbit_checkpoint"]
