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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lowbit",
        description="Low-bit inference of attention-based models: quantize, measure, run.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    f = sub.add_parser("formats", help="list every element format with its bits, block and scale")
    f.set_defaults(func=cmd_formats)
    d = sub.add_parser("demo", help="the main job on the bundled SmolLM2: quantize into every format, report")
    d.add_argument("--model", default="smollm2", help="bundled model (default: smollm2)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
