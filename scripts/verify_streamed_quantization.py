"""Check the output of `lowbit quantize` (lowbit's format) against its source, in bounded memory.

    python scripts/verify_streamed_quantization.py OUT SRC RECIPE [LAYER ...]

- the SHA-256 of OUT/model.safetensors and the layer tables match OUT/lowbit.json
  (what lowbit.load checks, without loading the file);
- each LAYER (default: two layers, early and late) is bit-identical to the same recipe
  run in memory on the source weight (lowbit.quant.methods.quantize_linear_weight);
- the full-precision tensors (embeddings, lm_head, a norm) are the source's bytes.
Exit status 0 when everything matches.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import torch

from lowbit.io._safetensors import CheckpointReader, SafetensorsReader
from lowbit.io.checkpoint import _build_qtensor, _tables_sha256
from lowbit.nn.recipes import parse_recipe
from lowbit.quant.methods import quantize_linear_weight


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__)
        return 2
    out, src, recipe, layers = argv[0], argv[1], argv[2], argv[3:]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    meta = json.load(open(f"{out}/lowbit.json"))
    h = hashlib.sha256()
    with open(f"{out}/model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    ok = {"sha256": h.hexdigest() == meta["sha256"],
          "tables": _tables_sha256(meta["quantized_layers"], meta["qtensors"]) == meta["tables_sha256"]}
    names = sorted(meta["quantized_layers"])
    layers = layers or [names[len(names) // 8], names[-len(names) // 4]]
    r = SafetensorsReader(f"{out}/model.safetensors")
    s = CheckpointReader(src)
    rec = parse_recipe(recipe)
    for name in layers:
        m = meta["quantized_layers"][name]
        parts = {k: r.get(k) for k in r.infos if k.rsplit(".", 1)[0] == name}
        q = _build_qtensor(name, m, parts, ".weight_")
        t = time.time()
        q2, _ = quantize_linear_weight(s.get(name + ".weight"), rec, dict(rec.weight_options))
        same = all(torch.equal(a, b) for a, b in ((q.codes, q2.codes), (q.scales, q2.scales))) and (
            (q.zeros is None and q2.zeros is None) or torch.equal(q.zeros, q2.zeros))
        ok[f"{name} == in-memory {recipe} ({time.time() - t:.0f} s)"] = same
    for name in [n for n in r.infos if n.rsplit(".", 1)[0] not in meta["quantized_layers"]][:3]:
        if name in s:
            ok[f"{name} copied"] = torch.equal(r.get(name).reshape(-1).view(torch.uint8),
                                               s.get(name).reshape(-1).view(torch.uint8))
    for k, v in ok.items():
        print(f"{'ok  ' if v else 'FAIL'} {k}")
    return 0 if all(ok.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
