"""Write docs/quality.md and docs/quality.json from a real run: every recipe on both
bundled models with round to nearest, the round-to-nearest variants of
../shared/QUALITY.md, and every quantization method on every recipe it applies to.

    PYTHONPATH=src python scripts/quality_report.py                  # everything (hours on 2 cores)
    PYTHONPATH=src python scripts/quality_report.py --models minilm --part methods   # a subset ...
    PYTHONPATH=src python scripts/quality_report.py --write-only     # ... then merge and write the docs

Every measured row is kept in a cache (default build/quality_cache.json, keyed by model,
recipe, options and calibration size), so the work can be split into several runs (by
--models, --part, --recipes) and resumed; rows already in the cache are not measured
again unless --fresh. The documents are written when every row is in the cache (or with
--write-only, from what is there, marking what is missing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from lowbit.eval.quality import baseline_row, evaluate, format_rows, prepare  # noqa: E402
from lowbit.nn.recipes import EXAMPLES, parse_recipe  # noqa: E402

# (QUALITY.md row label, recipe, weight options): the independent RTN measurements to reproduce
REPRODUCE = [
    ("int8 per-channel symmetric", "a16w8-int8", {}),
    ("fp8_e4m3 per-channel", "a16w8-fp8", {}),
    ("mxfp8_e4m3", "a16w8-mxfp8", {}),
    ("mxfp6_e2m3", "a16w6-mxfp6", {}),
    ("int4 g32 affine, integer zero", "a16w4-int-g32", {"zero_point": "integer"}),
    ("int4 g64 affine, integer zero", "a16w4-int-g64", {"zero_point": "integer"}),
    ("int4 g64 affine, float zero", "a16w4-int-g64", {}),
    ("int4 g128 affine, integer zero", "a16w4-int-g128", {"zero_point": "integer"}),
    ("int4 g128 affine, float zero", "a16w4-int-g128", {}),
    ("int4 g128 symmetric", "a16w4-int-g128", {"symmetric": True}),
    ("nvfp4", "a16w4-nvfp4", {}),
    ("mxfp4", "a16w4-mxfp4", {}),
    ("int3 g64 affine, integer zero", "a16w3-int-g64", {"zero_point": "integer"}),
    ("int3 g64 affine, float zero", "a16w3-int-g64", {}),
    ("int2 g64 affine, integer zero", "a16w2-int-g64", {"zero_point": "integer"}),
]

# method suffixes measured on every recipe where they apply; rotations on the FP4 recipes,
# where they are meant to help (they parse for every format)
METHODS = ("hqq", "awq", "gptq", "smooth", "rot", "rot-gptq", "awq-gptq")  # awq-gptq: the acceptance recipes
FP4 = ("mxfp4", "nvfp4")
EXTRA: list = []  # further (recipe, options) rows

# the acceptance lines of the methods issue: (what, recipe, bound) on SmolLM2 mean KL
ACCEPTANCE = [
    ("a16w4-int-g64: HQQ <= 0.85x RTN", "a16w4-int-g64", ["hqq"], 0.85),
    ("a16w4-int-g64: AWQ <= 0.85x RTN", "a16w4-int-g64", ["awq"], 0.85),
    ("a16w4-int-g64: GPTQ <= 0.6x RTN", "a16w4-int-g64", ["gptq"], 0.6),
    ("a16w4-mxfp4: best method <= 0.6x RTN", "a16w4-mxfp4", None, 0.6),
    ("a16w3-int-g64: best method <= 0.5x RTN", "a16w3-int-g64", None, 0.5),
    ("a8w8-int8: SmoothQuant <= RTN", "a8w8-int8", ["smooth"], 1.0),
]

Q4_1_NOTE = (
    "Note: SmolLM2's bundled weights are GGUF Q4_1 values, i.e. 4-bit affine codes with a float scale and minimum per 32 weights along K. `a16w4-int-g32` with lowbit's default float zero point lands on that same grid, so on this model it is nearly lossless (KL 0.0000, weight SQNR 144 dB); that row says nothing about other models. With the integer zero point (the reproduction table) it costs what QUALITY.md measured."
)


def method_recipes() -> list[tuple[str, dict]]:
    out = []
    for r in EXAMPLES:
        fp4 = any(r.endswith(f) for f in FP4)
        for m in METHODS:
            if m.startswith("rot") and not fp4:
                continue
            if m == "awq-gptq" and r not in ("a16w4-int-g64", "a16w3-int-g64"):
                continue
            try:
                parse_recipe(f"{r}-{m}")
            except ValueError:
                continue
            out.append((f"{r}-{m}", {}))
    return out + [e for e in EXTRA if e not in out]


def anchors() -> dict[tuple[str, str], list[str]]:
    """Rows of ../shared/QUALITY.md by (section, label), if the file is there."""
    path = ROOT.parent / "shared" / "QUALITY.md"
    if not path.exists():
        return {}
    out, section = {}, "smollm2"
    for line in path.read_text().splitlines():
        if "MiniLM" in line and line.startswith("#"):
            section = "minilm"
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 3 and not re.fullmatch(r"-*", cells[0]) and cells[0] != "format (weights only)":
            out[(section, cells[0])] = cells[1:]
    return out


def key(model: str, recipe: str, opts: dict, cal: int) -> str:
    needs = parse_recipe(recipe).needs_calibration
    o = ",".join(f"{k}={v}" for k, v in sorted(opts.items()))
    return f"{model}|{recipe}|{o}|{cal if needs else '-'}"


def calibration_of(k: str) -> int | None:
    """The calibration sequences in a cache key (None: a row that needs no calibration)."""
    last = k.rsplit("|", 1)[-1]
    return int(last) if last.isdigit() else None


def find_key(cache: dict, model: str, recipe: str, opts: dict | None = None) -> str | None:
    """The cache key of (model, recipe, options): for a calibrated recipe, the one measured
    with the most calibration sequences (the acceptance rows were measured with more than
    the rest of the matrix; see the document's header)."""
    try:
        k = key(model, recipe, opts or {}, 0)
    except ValueError:  # a method that does not apply to the recipe
        return None
    if calibration_of(k) is None:
        return k if k in cache else None
    prefix = k.rsplit("|", 1)[0] + "|"
    found = [(calibration_of(c), c) for c in cache if c.startswith(prefix) and calibration_of(c) is not None]
    return max(found)[1] if found else None


def find(cache: dict, model: str, recipe: str, opts: dict | None = None):
    k = find_key(cache, model, recipe, opts)
    return None if k is None else cache[k]


def row_seqs(row) -> int | None:
    cal = row.get("calibration") if row else None
    return cal.get("sequences") if isinstance(cal, dict) else None


def load_cache(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def save_cache(path: Path, cache: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1, default=str))
    tmp.replace(path)


def plan(models, parts, only) -> list[tuple[str, str, str, dict]]:
    """(model, label, recipe, options) of every row to measure."""
    rows = []
    for model in models:
        if "rtn" in parts:
            rows += [(model, r, r, {}) for r in EXAMPLES]
            rows += [(model, label, r, o) for label, r, o in REPRODUCE]
        if "methods" in parts:
            rows += [(model, r, r, o) for r, o in method_recipes()]
    if only:
        rows = [x for x in rows if x[2] in only]
    return rows


def measure(args, cache_path: Path, cache: dict) -> None:
    todo = plan(args.models, args.part, args.recipes)
    for model in args.models:
        mine = [x for x in todo if x[0] == model]
        pending, seen = [], set()
        for x in mine:  # a reproduction row with default options is the recipe's own row: measure it once
            k = key(model, x[2], x[3], args.calibration_seqs)
            have = find_key(cache, model, x[2], x[3])  # a row measured with as much calibration data or more is kept
            enough = have is not None and (calibration_of(have) or 0) >= (calibration_of(k) or 0)
            if k not in seen and (args.fresh or not enough):
                pending.append(x)
            seen.add(k)
        if args.recipes:  # measured in the order given
            pending.sort(key=lambda x: args.recipes.index(x[2]))
        base_key = f"{model}|baseline"
        if not pending and base_key in cache:
            continue
        ev = prepare(model, progress=False, calibration_seqs=args.calibration_seqs)
        cache[base_key] = {**baseline_row(ev), "calibration_source": ev.calibration_source,
                           "description": ev.bundled.description}
        save_cache(cache_path, cache)
        t0 = time.perf_counter()
        for i, (_, label, recipe, opts) in enumerate(pending):
            row = evaluate(ev, recipe, weight_options=opts or None, progress=False)
            row.update(label=label, weight_options=opts, measured=datetime.date.today().isoformat(),
                       commit=commit(), command=COMMAND)
            cache[key(model, recipe, opts, args.calibration_seqs)] = row
            save_cache(cache_path, cache)
            done = time.perf_counter() - t0
            eta = done / (i + 1) * (len(pending) - i - 1)
            metric = row.get("mean_kl", row.get("mean_cos"))
            print(f"[{i + 1}/{len(pending)}] {model} {label} {opts or ''}: {metric:.4f} "
                  f"({row['seconds']:.0f} s; ETA {eta / 60:.0f} min)", flush=True)
        del ev


COMMAND = "PYTHONPATH=src python scripts/quality_report.py " + " ".join(sys.argv[1:])


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()


def fmt_kl(row) -> str:
    return "?" if row is None else f"{row['mean_kl']:.4f}"


def notes(cache: dict) -> list[str]:
    """Observations read off the measured rows (only those whose rows are there)."""
    out = []

    def val(model, recipe):
        r = find(cache, model, recipe)
        return None if r is None else r["mean_kl" if model == "smollm2" else "mean_cos"]

    s_rtn, s_rot, s_rg, s_g = (val("smollm2", f"a16w4-mxfp4{m}") for m in ("", "-rot", "-rot-gptq", "-gptq"))
    m_rtn, m_rot, m_rg, m_g = (val("minilm", f"a16w4-mxfp4{m}") for m in ("", "-rot", "-rot-gptq", "-gptq"))
    if None not in (s_rtn, s_rot, s_rg, s_g, m_rtn, m_rot, m_rg, m_g):
        out.append(
            f"- MXFP4 and the block-32 Hadamard rotation: with round to nearest the rotation "
            f"{'helps' if s_rot < s_rtn else 'does not help'} on SmolLM2 (mean KL {s_rtn:.4f} -> {s_rot:.4f}) and "
            f"{'helps' if m_rot > m_rtn else 'does not help'} on MiniLM (cosine {m_rtn:.5f} -> {m_rot:.5f}); "
            f"followed by GPTQ (`-rot-gptq`) it {'beats' if s_rg < s_g and m_rg > m_g else 'does not always beat'} "
            f"GPTQ alone (SmolLM2 {s_rg:.4f} against {s_g:.4f}; MiniLM {m_rg:.5f} against {m_g:.5f}). "
            + ("So on these models the rotation is worth using with GPTQ, not by itself."
               if s_rot > s_rtn and m_rot < m_rtn and s_rg < s_g and m_rg > m_g else ""))
    h3, r3 = val("smollm2", "a16w3-int-g64-hqq"), val("smollm2", "a16w3-int-g64")
    a3, g3 = val("smollm2", "a16w3-int-g64-awq"), val("smollm2", "a16w3-int-g64-gptq")
    r = find(cache, "smollm2", "a16w3-int-g64", {"zero_point": "integer"})
    if None not in (h3, r3, a3, g3, r):
        out.append(
            f"- 3-bit on SmolLM2: round to nearest with the float zero point ({r3:.4f}) is worse than with the "
            f"integer zero ({r['mean_kl']:.4f}), and HQQ's zero points barely change it ({h3:.4f}); the calibrated "
            f"methods do (AWQ {a3:.4f}, GPTQ {g3:.4f}). Above a mean KL of about 1 the measure is erratic "
            "(../shared/QUALITY.md).")
    return (["## Notes", ""] + out + [""]) if out else []


def write_docs(args, cache: dict) -> bool:
    ref = anchors()
    today = datetime.date.today().isoformat()
    result = {"date": today, "commit": commit(), "torch": torch.__version__, "models": {}}
    missing = []

    def get(model, recipe, opts=None):
        row = find(cache, model, recipe, opts)
        if row is None:
            missing.append(f"{model} {recipe} {opts or ''}")
        return row

    used = [r for r in cache.values() if isinstance(r, dict) and "measured" in r]
    commands = sorted({r.get("command", "PYTHONPATH=src python scripts/quality_report.py (command not recorded)")
                       for r in used})
    seqs = sorted({row_seqs(r) for r in used if row_seqs(r)})
    row_commits = sorted({r["commit"] for r in used if r.get("commit")}) or [commit()]
    result["calibration_seqs"] = seqs
    result["commands"] = commands
    md = [
        "# Quality of lowbit's recipes and quantization methods on the bundled models",
        "",
        "Generated by `scripts/quality_report.py`: its rows were measured by",
        "",
        *[f"    {c}" for c in commands],
        "",
        "(each row keeps the command that measured it in build/quality_cache.json), "
        "and the document written from them by `PYTHONPATH=src python scripts/quality_report.py --write-only`. "
        + (f"Calibrated rows used {' or '.join(map(str, seqs))} calibration sequences (see each cell's note): "
           "the acceptance rows of the methods issue got the larger number, the rest of the matrix the smaller, "
           "to keep the whole run within about two hours on 2 shared CPU cores. " if len(seqs) > 1 else "")
        + f"Rows measured at commit{'s' if len(row_commits) > 1 else ''} {', '.join(row_commits)} (the early ones with "
        "the methods issue's working tree; each row records its own in the cache), document written at "
        f"{commit()}; torch "
        f"{torch.__version__}, CPU reference path, float32 models, one torch thread; rows measured between "
        f"{min((r.get('measured', today) for r in cache.values() if isinstance(r, dict) and 'measured' in r), default=today)} "
        f"and {today}. Every `nn.Linear` but `lm_head` is quantized. Evaluation text: the evaluation half of "
        "`pydoc_data.topics` (SmolLM2: first 4096 tokens in sequences of 512; MiniLM: 512 paragraphs of more than "
        "80 characters, at most 128 tokens). SmolLM2's weights were themselves dequantized from GGUF Q4_1.",
        "",
        "Affine integer recipes use the HQQ float zero point by default (the reproduction tables also show "
        "`zero_point=integer`). Methods (recipe suffixes, `lowbit.quantize_(model, recipe, calibration=ids)`): "
        "`-hqq` HQQ zero points (no data); `-awq` AWQ scales and clipping; `-gptq` GPTQ; `-smooth` SmoothQuant "
        "(a8w8 only); `-rot` block-32 Hadamard rotation (no data); `-rot-gptq` both; `-awq-gptq` both. "
        "w SQNR dB: of the effective weight (input transforms undone) against the original weight.",
        "",
    ]
    for model in ("smollm2", "minilm"):
        base = cache.get(f"{model}|baseline")
        if base is None:
            missing.append(f"{model} baseline")
            continue
        rows = [base] + [r for r in (get(model, x) for x in EXAMPLES) if r]
        repro = []
        for label, recipe, opts in REPRODUCE:
            r = get(model, recipe, opts)
            if r:
                repro.append({**r, "label": label, "weight_options": opts})
        methods = [r for r in (get(model, x, o) for x, o in method_recipes()) if r]
        result["models"][model] = {"description": base["description"], "calibration": base["calibration_source"],
                                   "rows": rows, "reproduction": repro, "methods": methods}
        md += [f"## {base['description']}", "", "### Round to nearest", "", "```", format_rows(rows), "```", ""]
        if model == "smollm2":
            md += [Q4_1_NOTE, ""]
        md += [
            "Reproduction of the independent round-to-nearest measurements in `../shared/QUALITY.md` "
            "(anchor = that file's numbers, measured outside lowbit):",
            "",
        ]
        if model == "smollm2":
            md += ["| QUALITY.md row | recipe | options | mean KL (anchor) | top-1 % (anchor) | ppl (anchor) | w SQNR dB (anchor) |",
                   "|---|---|---|---|---|---|---|"]
        else:
            md += ["| QUALITY.md row | recipe | options | mean cos (anchor) | top-1 nbr % (anchor) | recall@10 (anchor) |",
                   "|---|---|---|---|---|---|"]
        for r in repro:
            a = ref.get((model, r["label"]), ["?"] * 5)
            opts = ", ".join(f"{k}={v}" for k, v in r["weight_options"].items()) or "default"
            if model == "smollm2":
                md.append(f"| {r['label']} | {r['recipe']} | {opts} | {r['mean_kl']:.4f} ({a[0]}) | "
                          f"{r['top1_agreement']:.2f} ({a[2]}) | {r['ppl']:.2f} ({a[3]}) | {r['weight_sqnr_db']:.1f} ({a[4]}) |")
            else:
                md.append(f"| {r['label']} | {r['recipe']} | {opts} | {r['mean_cos']:.5f} ({a[0]}) | "
                          f"{r['top1_neighbor']:.2f} ({a[2]}) | {r['recall_at_10']:.3f} ({a[3]}) |")
        md += ["", "### Methods", "",
               "Calibration data for `-awq`, `-gptq`, `-smooth`: the calibration half of `pydoc_data.topics` "
               "(disjoint from the evaluation text; "
               + ("consecutive sequences of 512 tokens" if model == "smollm2" else
                  "its paragraphs of more than 80 characters, at most 128 tokens each")
               + ("), as many sequences as each row's note says" if len(seqs) > 1 else
                  f"), {seqs[0] if seqs else '?'} of them")
               + ". Seconds: quantization alone (calibration "
               "passes included), on 2 shared CPU cores.",
               ""]
        metric = "mean KL" if model == "smollm2" else "mean cos"
        md += [f"{metric} by recipe (rows) and method (columns); `-` where the method does not apply, `?` where "
               "it was not measured" + ("; [n]: calibrated on n sequences" if len(seqs) > 1 else "") + ":", ""]
        cols = ("rtn",) + METHODS
        md += ["| recipe | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for x in EXAMPLES:
            cells = []
            for m in cols:
                planned = m == "rtn" or (f"{x}-{m}", {}) in method_recipes()
                r = find(cache, model, x if m == "rtn" else f"{x}-{m}") if planned else None
                if r is None:
                    cells.append("?" if planned else "-")
                else:
                    cell = f"{r['mean_kl']:.4f}" if model == "smollm2" else f"{r['mean_cos']:.5f}"
                    if row_seqs(r) and len(seqs) > 1:
                        cell += f" [{row_seqs(r)}]"
                    cells.append(cell)
            md.append(f"| {x} | " + " | ".join(cells) + " |")
        md += ["", "Every method row in full:", "", "```", format_rows(methods), "```", ""]
        secs = [f"{r['recipe']} {r['quantize_seconds']:.0f}" + (f" ({row_seqs(r)} seq)" if row_seqs(r) else "")
                for r in methods]
        md += ["Quantization seconds: " + ", ".join(secs) + ".", ""]
    # acceptance
    md += ["## Acceptance of the methods issue (SmolLM2, mean KL against fp32)", "",
           "RTN is the recipe's default (float zero point for affine integers, the like-for-like baseline of every "
           "integer method here); the integer-zero RTN of QUALITY.md is shown beside it.", "",
           "| line | RTN | method | method KL | ratio | bound | pass |", "|---|---|---|---|---|---|---|"]
    result["acceptance"] = []
    for what, recipe, methods, bound in ACCEPTANCE:
        rtn = find(cache, "smollm2", recipe)
        rtn_int = find(cache, "smollm2", recipe, {"zero_point": "integer"})
        cands = [m for m in (methods or [m for m in METHODS + ("awq-gptq",)]) if
                 find(cache, "smollm2", f"{recipe}-{m}")]
        if not rtn or not cands:
            md.append(f"| {what} | ? | ? | ? | ? | {bound} | ? |")
            continue
        best = min(cands, key=lambda m: find(cache, "smollm2", f"{recipe}-{m}")["mean_kl"])
        row = find(cache, "smollm2", f"{recipe}-{best}")
        ratio = row["mean_kl"] / rtn["mean_kl"]
        extra = f" (integer zero {rtn_int['mean_kl']:.4f}: {row['mean_kl'] / rtn_int['mean_kl']:.2f}x)" if rtn_int else ""
        ok = ratio <= bound
        if recipe == "a16w4-mxfp4":
            nv = find(cache, "smollm2", "a16w4-nvfp4")
            if nv:
                ok = ok and row["mean_kl"] < nv["mean_kl"]
                extra += f"; RTN a16w4-nvfp4 {nv['mean_kl']:.4f}"
        md.append(f"| {what} | {rtn['mean_kl']:.4f} | -{best} | {row['mean_kl']:.4f} | {ratio:.2f}x{extra} | "
                  f"{bound} | {'yes' if ok else 'NO'} |")
        result["acceptance"].append({"line": what, "rtn": rtn["mean_kl"], "method": best, "kl": row["mean_kl"],
                                     "ratio": ratio, "bound": bound, "pass": ok})
    mini = [r for r in (find(cache, "minilm", f"{x}-{m}") for x in EXAMPLES if "w4" in x
                        for m in METHODS) if r]
    if mini:
        best = max(mini, key=lambda r: r["mean_cos"])
        rtn = find(cache, "minilm", best["recipe"].split("-" + best["method"])[0])
        if rtn:
            md.append(f"| MiniLM: best 4-bit method's cosine above RTN's | {rtn['mean_cos']:.5f} | {best['recipe']} | "
                      f"cos {best['mean_cos']:.5f} | | | {'yes' if best['mean_cos'] > rtn['mean_cos'] else 'NO'} |")
    md.append("")
    md += notes(cache)
    if missing:
        md += ["Missing rows: the matrix is not complete. On 2 shared CPU cores a calibrated SmolLM2 row takes 3 to "
               "8 minutes, and this run had about two hours; the acceptance rows came first, then MiniLM's 4-bit "
               "rows, SmolLM2's round-to-nearest rows and the calibration-free methods. Not measured yet (the "
               "commands above measure them; rows already in the cache are kept): "
               + "; ".join(dict.fromkeys(m.strip() for m in missing)), ""]
    (ROOT / "docs" / "quality.json").write_text(json.dumps(result, indent=1, default=str))
    (ROOT / "docs" / "quality.md").write_text("\n".join(md))
    print(f"wrote docs/quality.md and docs/quality.json ({len(missing)} rows missing)")
    return not missing


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2", "minilm"], choices=["smollm2", "minilm"])
    p.add_argument("--part", nargs="+", default=["rtn", "methods"], choices=["rtn", "methods"])
    p.add_argument("--recipes", nargs="+", help="measure only these recipes (with their method suffix), in this order")
    p.add_argument("--calibration-seqs", type=int, default=32,
                   help="calibration sequences (decoder: of 512 tokens; encoder: paragraphs); default 32, "
                        "which keeps the whole report to hours on 2 CPU cores (`lowbit eval` takes up to 128)")
    p.add_argument("--cache", default=str(ROOT / "build" / "quality_cache.json"))
    p.add_argument("--fresh", action="store_true", help="measure again rows already in the cache")
    p.add_argument("--write-only", action="store_true", help="write the documents from the cache, measure nothing")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on 2 shared cores, two threads ran the calibrated "
                        "methods 3x slower than one)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cache_path = Path(args.cache)
    cache = load_cache(cache_path)
    if not args.write_only:
        measure(args, cache_path, cache)
    write_docs(args, cache)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
