"""The benchmark harness on the CPU: shape registry, roofline arithmetic, the JSON and
Markdown writers, and a dry run of run_bench (reference backend, eager timing).
The timings themselves are taken on the H200 (scripts/gpu_session.sh)."""

import json
import math

import pytest
import torch

import lowbit
from lowbit.bench import run as bench_run
from lowbit.bench.peers import PEERS, rel_err, select_peers
from lowbit.bench.run import ROW_KEYS, TOP_KEYS, markdown, run_bench, short_table, write_json
from lowbit.bench.shapes import DEFAULT_SHAPES, M_VALUES, SHAPES, parse_ms, select_shapes
from lowbit.bench.timing import (
    BF16_FLOPS,
    COPY_BW,
    DEFAULT_L2,
    cycle_calls,
    ideal_us,
    l2_bytes,
    matmul_bytes,
    nominal_weight_bytes,
    roofline_pct,
    rotation_copies,
    weight_copies,
)

# --------------------------------------------------------------------------- shapes


def test_registry_holds_the_real_shapes():
    want = {
        "llama3-8b.qkv": (6144, 4096),
        "llama3-8b.o": (4096, 4096),
        "llama3-8b.gate_up": (28672, 4096),
        "llama3-8b.down": (4096, 14336),
        "llama3-70b.qkv": (10240, 8192),
        "llama3-70b.o": (8192, 8192),
        "llama3-70b.gate_up": (57344, 8192),
        "llama3-70b.down": (8192, 28672),
        "smollm2-135m.q": (576, 576),
        "smollm2-135m.k_v": (192, 576),
        "smollm2-135m.o": (576, 576),
        "smollm2-135m.gate_up": (1536, 576),
        "smollm2-135m.down": (576, 1536),
    }
    assert {key: (s.n, s.k) for key, s in SHAPES.items()} == want
    assert M_VALUES == (1, 16, 128, 1024, 8192)
    assert set(DEFAULT_SHAPES) == {"llama3-8b.gate_up", "llama3-8b.o", "llama3-70b.down", "smollm2-135m.gate_up"}
    assert SHAPES["llama3-8b.gate_up"].title == "Llama-3-8B gate+up 28672x4096"


def test_select_shapes_and_ms():
    got = select_shapes("llama3-8b.gate_up,llama3-70b.down")
    assert [s.key for s in got] == ["llama3-8b.gate_up", "llama3-70b.down"]
    assert [s.key for s in select_shapes(None)] == list(DEFAULT_SHAPES)
    assert [s.name for s in select_shapes("smollm2-135m")] == ["q", "k_v", "o", "gate_up", "down"]
    assert len(select_shapes("all")) == len(SHAPES)
    custom = select_shapes("300x200,llama3-8b.o,300x200")  # duplicates dropped
    assert [(s.model, s.n, s.k) for s in custom] == [("custom", 300, 200), ("llama3-8b", 4096, 4096)]
    with pytest.raises(ValueError, match="llama3-8b.gate_up"):
        select_shapes("llama3-8b.gate")  # the error lists the real names
    assert parse_ms("1,16,128") == [1, 16, 128]
    assert parse_ms(None) == list(M_VALUES)
    for bad in ("0", "1,x", ""):
        with pytest.raises(ValueError):
            parse_ms(bad)


# --------------------------------------------------------------------------- roofline


def test_roofline_by_hand():
    # bf16 at M=1 on Llama-3-8B gate+up: 2*28672*4096 weight bytes + 2*4096 in + 2*28672 out
    n, k = 28672, 4096
    assert matmul_bytes(1, n, k, 2 * n * k) == 234_881_024 + 8_192 + 57_344
    assert ideal_us(1, n, k, 2 * n * k) == pytest.approx(234_946_560 / 4.27e12 * 1e6)  # 55.02 us, memory-bound
    # ANCHORS: bf16 takes 56.4 us there, "97% of copy bandwidth"
    assert roofline_pct(56.4, 1, n, k, 2 * n * k) == pytest.approx(97.55, abs=0.01)
    # M=8192 is compute-bound: 2*8192*28672*4096 FLOP at 672 TFLOP/s = 2863 us > 772 MB / 4.27 TB/s
    flops_us = 2 * 8192 * n * k / BF16_FLOPS * 1e6
    assert ideal_us(8192, n, k, 2 * n * k) == pytest.approx(flops_us)
    assert flops_us == pytest.approx(2863.3, abs=0.1)
    assert matmul_bytes(8192, n, k, 2 * n * k) / COPY_BW * 1e6 < flops_us
    # FP8 rate halves the compute floor
    assert ideal_us(8192, n, k, n * k, flops_rate=1269e12) < flops_us
    assert math.isnan(roofline_pct(0.0, 1, n, k, 1))


def test_nominal_weight_bytes_counts_16_bit_scales():
    w = torch.randn(256, 512) * 0.02
    int4 = lowbit.quantize_tensor(w, "int4", group_size=128)  # float32 scales and zeros stored
    assert nominal_weight_bytes(int4) == 256 * 256 + 2 * (256 * 4 * 2)  # codes + bf16 scale + bf16 zero
    mxfp4 = lowbit.quantize_tensor(w, "mxfp4")  # E8M0 scales: one byte per 32
    assert nominal_weight_bytes(mxfp4) == 256 * 256 + 256 * 16
    int8 = lowbit.quantize_tensor(w, "int8")  # per channel, symmetric
    assert nominal_weight_bytes(int8) == 256 * 512 + 256 * 2
    # ANCHORS: int4 g128 on 28672x4096 is 62 MB -> 14.6 us at copy bandwidth
    big = 28672 * 4096 // 2 + 2 * 2 * 28672 * 4096 // 128
    assert big == 62_390_272
    assert big / COPY_BW * 1e6 == pytest.approx(14.6, abs=0.05)


def test_rotation_copies():
    l2 = 50 * 2**20
    assert rotation_copies(2 * 28672 * 4096, l2) == 1  # bf16 gate+up: 235 MB > 4x L2
    assert rotation_copies(62_390_272, l2) == 4
    assert rotation_copies(1000, l2) == 64  # capped
    assert rotation_copies(0, l2) == 1


def test_cycle_calls_walks_the_copies_in_turn_and_l2_has_a_cpu_default():
    seen = []
    fn = cycle_calls([lambda i=i: seen.append(i) or i for i in range(3)])
    assert [fn() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0] and seen == [0, 1, 2, 0, 1, 2, 0]
    assert l2_bytes("cpu") == DEFAULT_L2
    made = iter(range(1, 100))
    assert weight_copies(0, lambda: next(made), 2 * DEFAULT_L2, "cpu") == [0, 1]  # 2 x 2 L2 >= 4 x L2
    assert weight_copies(0, lambda: next(made), 8 * DEFAULT_L2, "cpu") == [0]


def test_rel_err():
    ref = torch.tensor([[1.0, -4.0], [2.0, 0.5]], dtype=torch.float64)
    assert rel_err(ref.clone(), ref) == 0.0
    assert rel_err(ref + 0.04, ref) == pytest.approx(0.01)
    assert rel_err(torch.full_like(ref, float("nan")), ref) == math.inf
    assert rel_err(ref[:1], ref) == math.inf


def test_peers_registry():
    assert set(PEERS) == {"tinygemm-w4g128", "gemlite-w4g128", "cublas-fp8-rowwise", "gemlite-a8w8-fp8",
                          "gemlite-a8w8-int8"}
    assert select_peers("none") == [] and len(select_peers(None)) == 5
    assert [p.method for p in select_peers("tinygemm-w4g128")] == ["peer:tinygemm-w4g128"]
    with pytest.raises(ValueError, match="tinygemm-w4g128"):
        select_peers("marlin")


# --------------------------------------------------------------------------- writers

META = {"gpu": "NVIDIA H200", "date": "2026-11-29T00:00:00Z", "commit": "abc123", "torch": "2.11.0", "triton": "3.6.0"}


def fake_rows():
    rows = []
    for m, base, fast in ((1, 56.4, 16.5), (16, 57.1, 18.9)):
        common = {"shape": "llama3-8b.gate_up", "n": 28672, "k": 4096, "m": m}
        rows.append(
            {**common, "method": "bf16", "us": base, "speedup_vs_bf16": 1.0, "roofline_pct": 97.5, "rel_err": 2.1e-3}
        )
        rows.append(
            {**common, "method": "lowbit:a16w4-int-g128", "us": fast, "speedup_vs_bf16": round(base / fast, 3),
             "roofline_pct": 88.6, "rel_err": 3.9e-3}
        )
        rows.append(
            {**common, "method": "peer:tinygemm-w4g128", "us": 32.8, "speedup_vs_bf16": round(base / 32.8, 3),
             "roofline_pct": None, "rel_err": 2.5e-3}
        )
    return rows


def test_json_schema_is_exactly_the_issue_s(tmp_path):
    path = tmp_path / "h200.json"
    write_json(str(path), {**META, "extra": "not written"}, fake_rows())
    doc = json.loads(path.read_text())
    assert list(doc) == ["gpu", "date", "commit", "torch", "triton", "rows"] == list(TOP_KEYS)
    assert doc["gpu"] == "NVIDIA H200" and doc["commit"] == "abc123"
    assert len(doc["rows"]) == 6
    for row in doc["rows"]:
        assert list(row) == ["shape", "n", "k", "m", "method", "us", "speedup_vs_bf16", "roofline_pct", "rel_err"]
        assert row["method"] == "bf16" or row["method"].split(":")[0] in ("lowbit", "peer")
    assert doc["rows"][1]["speedup_vs_bf16"] == pytest.approx(3.418)
    assert doc["rows"][2]["roofline_pct"] is None  # unknown stays null, never NaN (strict JSON)


def test_markdown_table(tmp_path):
    key = "llama3-8b.gate_up"
    skipped = [{"shape": key, "m": None, "method": "peer:gemlite-w4g128", "reason": "gemlite is not importable"}]
    failed = [{"shape": key, "m": 16, "method": "peer:tinygemm-w4g128", "what": "rel_err", "error": 0.5}]
    info = {"command": "python -m lowbit.bench.run --out X", "timing": "CUDA graph"}
    md = markdown(META, fake_rows(), skipped, failed, info)
    lines = md.splitlines()
    assert lines[0] == "# Quantized matmul speed on NVIDIA H200"
    assert "- command: `python -m lowbit.bench.run --out X`" in lines
    assert any("commit: abc123" in line and "2026-11-29" in line for line in lines)
    assert "| shape (N x K) | M | bf16 us | lowbit:a16w4-int-g128 | peer:tinygemm-w4g128 |" in lines
    assert "| Llama-3-8B gate+up 28672x4096 | 1 | 56.4 (98%) | 3.42x (89%) | 1.72x (?) |" in lines
    assert "|  | 16 | 57.1 (98%) | 3.02x (89%) | 1.74x (?) ! |" in lines
    assert "- peer:gemlite-w4g128: gemlite is not importable (llama3-8b.gate_up)" in lines
    assert any(line.startswith("- peer:tinygemm-w4g128 on llama3-8b.gate_up M=16") for line in lines)
    table = short_table(fake_rows(), failed).splitlines()
    assert table[0].split() == ["shape", "M", "bf16", "us", "a16w4-int-g128", "tinygemm-w4g128"]
    assert table[3].split() == ["llama3-8b.gate_up", "16", "57.1", "3.02x", "1.74x!"]


# --------------------------------------------------------------------------- run_bench


def test_run_bench_without_cuda_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="--device cpu --backend reference"):
        run_bench(shapes="64x128", ms=[1], out_dir=str(tmp_path))
    with pytest.raises(NotImplementedError, match="item 6"):
        run_bench(shapes="64x128", ms=[1], out_dir=str(tmp_path), e2e=True)
    with pytest.raises(ValueError, match="graph"):
        run_bench(shapes="64x128", ms=[1], device="cpu", timing="graph", out_dir=None)


def test_cpu_dry_run_builds_rows_and_files(tmp_path):
    logs = []
    result = run_bench(
        shapes="96x256",
        ms=[1, 3],
        recipes=["a16w4-int-g128", "a8w8-int8", "a4w4-nvfp4", "a8w6-mxfp6"],
        peers=None,
        out_dir=str(tmp_path),
        device="cpu",
        backend="reference",
        rep_ms=1.0,
        command="pytest dry run",
        log=logs.append,
    )
    by = {(r["method"], r["m"]): r for r in result}
    assert set(by) == {(m, b) for m in ("bf16", "lowbit:a16w4-int-g128", "lowbit:a8w8-int8", "lowbit:a4w4-nvfp4")
                       for b in (1, 3)}
    for r in result:
        assert list(r) == list(ROW_KEYS)
        assert (r["shape"], r["n"], r["k"]) == ("custom.96x256", 96, 256)
        assert r["us"] > 0 and r["rel_err"] < 1e-2
    assert by[("bf16", 1)]["speedup_vs_bf16"] == 1.0
    assert by[("lowbit:a16w4-int-g128", 3)]["speedup_vs_bf16"] == pytest.approx(  # rounded to 3 decimals
        by[("bf16", 3)]["us"] / by[("lowbit:a16w4-int-g128", 3)]["us"], rel=1e-2, abs=6e-4
    )
    assert not result.failed
    reasons = {s["method"]: s["reason"] for s in result.skipped}
    assert "no MX kernel" in reasons["lowbit:a8w6-mxfp6"]
    for peer in PEERS.values():
        assert "CUDA" in reasons[peer.method]
    doc = json.loads((tmp_path / "cpu.json").read_text())
    assert list(doc) == list(TOP_KEYS) and len(doc["rows"]) == 8 and doc["torch"] == torch.__version__
    md = (tmp_path / "cpu.md").read_text()
    assert "pytest dry run" in md and "## Skipped" in md and "no MX kernel" in md


def test_a_recipe_the_backend_cannot_run_is_skipped_not_a_crash(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    result = run_bench(
        shapes="64x128", ms=[1], recipes=["a16w4-int-g128"], peers="none", out_dir=None,
        device="cpu", backend="triton", rep_ms=1.0, log=lambda s: None,
    )
    assert [r["method"] for r in result] == ["bf16"]
    (skip,) = result.skipped
    assert skip["method"] == "lowbit:a16w4-int-g128" and skip["m"] == 1 and "triton" in skip["reason"].lower()


def test_command_line_dry_run(tmp_path, capsys):
    assert bench_run.main(["--list"]) == 0
    assert "llama3-70b.down" in capsys.readouterr().out
    argv = ["--device", "cpu", "--backend", "reference", "--shapes", "64x128", "--m", "2",
            "--recipes", "a16w8-int8", "--peers", "none", "--rep-ms", "1", "--out", str(tmp_path)]
    assert bench_run.main(argv) == 0
    out = capsys.readouterr().out.rstrip().splitlines()
    assert out[-1].split()[:2] == ["custom.64x128", "2"]  # the short table comes last
    assert (tmp_path / "cpu.json").exists() and (tmp_path / "cpu.md").exists()
    assert bench_run.main(["--shapes", "nope"]) == 2
    assert "unknown shape" in capsys.readouterr().err


# --------------------------------------------------------------------------- peers' numerics on the CPU


def test_peer_references_match_their_ops_on_the_cpu(monkeypatch):
    """tinygemm's CPU twin (int32 codes, same scales-and-zeros layout) and _scaled_mm on the
    CPU check the peers' packing and their float64 references without a GPU."""
    from lowbit.bench import peers

    monkeypatch.setattr(peers, "_need_cuda", lambda w, what: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    cpu_ops = (torch._convert_weight_to_int4pack_for_cpu, torch._weight_int4pack_mm_for_cpu)
    monkeypatch.setattr(peers.Tinygemm, "_ops", lambda self: cpu_ops)
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(128, 512, generator=g) * 0.02).to(torch.bfloat16)
    x = torch.randn(3, 512, generator=g).to(torch.bfloat16)
    for peer in (peers.Tinygemm(), peers.CublasFp8()):
        prep = peer.prepare(w)
        y = prep.op()(x)
        assert rel_err(y, prep.reference(x)) < 1e-2, peer.name
        assert rel_err(prep.make()(x), prep.reference(x)) < 1e-2, peer.name  # a rotation copy
    # the FP8 peer is checked against its own quantized operands: against bf16 it is far off
    fp8 = peers.CublasFp8().prepare(w)
    assert rel_err(fp8.op()(x), x.double() @ w.double().t()) > 1e-2


def test_graph_branch_cycles_through_weight_copies(monkeypatch):
    """The CUDA-graph branch on the CPU, with the timer faked: the rotation copies are made
    once per method and the timed function cycles through them."""
    from lowbit.bench.peers import bf16_baseline
    from lowbit.bench.run import BenchRows, _measure
    from lowbit.bench.shapes import select_shapes

    seen = []

    def fake_timer(fn, rep_ms):
        for _ in range(6):
            fn()
        return 10.0

    monkeypatch.setattr(bench_run, "time_cuda_graph", fake_timer)
    (shape,) = select_shapes("32x64")
    w = torch.randn(32, 64).to(torch.bfloat16) * 0.02
    xs = {1: torch.randn(1, 64).to(torch.bfloat16), 4: torch.randn(4, 64).to(torch.bfloat16)}

    def prepare(w):
        prep = bf16_baseline(w)
        make = prep.make

        def counting_make():
            op = make()
            return lambda x: seen.append(id(op)) or op(x)

        prep.make = counting_make
        return prep

    result = BenchRows()
    l2 = 3 * 32 * 64 * 2 // 4
    ctx = dict(dev=torch.device("cpu"), timing="graph", rep_ms=1.0, l2=l2, rotate=True, log=lambda s: None)
    _measure("bf16", prepare, shape, w, xs, {}, result, ctx)
    assert [(r["m"], r["us"], r["speedup_vs_bf16"]) for r in result] == [(1, 10.0, 1.0), (4, 10.0, 1.0)]
    # 3 copies for a 4 KiB weight against a 3 KiB "L2": the first op plus 2 made ones, cycled
    assert len(set(seen)) == 2 and len(seen) == 2 * 4  # 6 calls per M, 2 of every 3 on made copies


def test_exit_status_fails_on_our_checks_not_on_peers(monkeypatch, capsys):
    import argparse

    rows = fake_rows()
    key = rows[0]["shape"]
    for method, status in (("peer:tinygemm-w4g128", 0), ("lowbit:a16w4-int-g128", 1), ("bf16", 1)):
        failed = [{"shape": key, "m": 16, "method": method, "what": "rel_err", "error": 0.5}]
        monkeypatch.setattr(bench_run, "run_bench", lambda **kw: bench_run.BenchRows(rows, META, [], failed))
        args = bench_run.add_arguments(argparse.ArgumentParser()).parse_args([])
        assert bench_run.run_from_args(args, command="test") == status, method
        assert f"{method} {key} M=16" in capsys.readouterr().out
