"""The baseline and the peers lowbit is timed against, in the same run.

    bf16                      cuBLAS through F.linear (the baseline of every speed-up)
    peer:tinygemm-w4g128      torch's int4 weight-only kernel (what torchao uses):
                              torch._convert_weight_to_int4pack + torch._weight_int4pack_mm,
                              4-bit affine, group 128, bf16 scales and zeros
    peer:cublas-fp8-rowwise   torch._scaled_mm, FP8 E4M3 weights per row, activations
                              quantized per row in plain torch on every call (unfused)
    peer:gemlite-a8w8-fp8     gemlite's A8W8 FP8 / INT8 (dynamic per-token activations,
    peer:gemlite-a8w8-int8    per-channel weights), optional like the one below
    peer:gemlite-w4g128       gemlite's A16W4 (HQQ convention (q - z) * s), group 128,
                              its shipped H100 autotune configs loaded on Hopper (GPU.md);
                              optional: unavailable with the reason when not installed

What each is checked against (float64, before it is timed, on every M):

    bf16        x @ W^T with W the bf16 weight itself
    tinygemm    x @ W^T with W = (q - 8) * s + z, its own quantized weight (bf16 s, z)
    gemlite     x @ W^T with W = q * s + bf16(-z * s), its own quantized weight as it
                stores it (fma mode)
    cublas-fp8  (xq * sx) @ (wq * sw)^T, its own quantized activations and weight

The int4 peers quantize with lowbit's own int4 g128 affine format (the same codes as
`lowbit:a16w4-int-g128`), so their error is their arithmetic, not their rounding
rules. A peer that cannot run here (no CUDA, missing package, op signature changed,
K not a multiple of its group) raises PeerUnavailable with the reason; the harness
reports it and goes on.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .timing import BF16_FLOPS, FP8_FLOPS, bf16_weight_bytes

TOL = 1e-2  # max|y - y_ref| / max|y_ref| for a bf16 output against its own float64 reference


class PeerUnavailable(RuntimeError):
    """A peer (or a lowbit recipe) cannot run on this machine or shape; the message says why."""


@dataclass
class Prepared:
    """One method on one weight, ready to be checked and timed."""

    method: str  # the row's method: "bf16", "lowbit:<recipe>", "peer:<name>"
    make: Callable[[], Callable[[torch.Tensor], torch.Tensor]]  # binds a fresh copy of the weight
    reference: Callable[[torch.Tensor], torch.Tensor]  # x -> float64 y to check against
    weight_bytes: int  # nominal, for the roofline (timing.py)
    flops_rate: float = BF16_FLOPS
    checked_against: str = ""
    tol: float = TOL
    first: Callable[[torch.Tensor], torch.Tensor] | None = None  # the op made at prepare time
    # raises PeerUnavailable when this method cannot run on x (checked before each M)
    precheck: Callable[[torch.Tensor], None] | None = None
    # cross-checks beside rel_err: [(label, (x, y_ref) -> error)], flagged when error > tol
    extra_checks: list = field(default_factory=list)

    def op(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.first is None:
            self.first = self.make()
        return self.first


def rel_err(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    """max|y - y_ref| / max|y_ref| in float64; inf for a wrong shape or a non-finite value."""
    if tuple(y.shape) != tuple(y_ref.shape):
        return math.inf
    y = y.detach().double()
    y_ref = y_ref.detach().double()
    if y.numel() == 0:
        return 0.0
    if not bool(torch.isfinite(y).all()):
        return math.inf
    denom = float(y_ref.abs().max())
    diff = float((y - y_ref).abs().max())
    if denom == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / denom


def f64_linear(x: torch.Tensor, w64: torch.Tensor) -> torch.Tensor:
    return x.double() @ w64.t()


def bf16_baseline(w: torch.Tensor) -> Prepared:
    """cuBLAS bf16 (F.linear); checked against float64 x @ W^T of the same bf16 weight."""
    w64 = w.double()

    def make():
        wc = w.clone()
        return lambda x: F.linear(x, wc)

    return Prepared(
        method="bf16",
        make=make,
        reference=lambda x: f64_linear(x, w64),
        weight_bytes=bf16_weight_bytes(*w.shape),
        checked_against="float64 x @ W^T, the bf16 weight",
        first=lambda x: F.linear(x, w),
    )


def _need_cuda(w: torch.Tensor, what: str) -> None:
    if w.device.type != "cuda":
        raise PeerUnavailable(f"{what} needs a CUDA device (the weight is on {w.device})")


def _int4_g128(w: torch.Tensor, group: int):
    """lowbit's int4 affine, group `group`, float zero: -> (q uint8 [N, K] in 0..15, s f32 [N, G], z f32 [N, G], qt)."""
    from ..formats import quantize_tensor

    qt = quantize_tensor(w, "int4", group_size=group)
    q = qt.unpacked_codes().to(torch.uint8)
    return q, qt.scales.float(), qt.zeros.float(), qt


def _expand(t: torch.Tensor, group: int, k: int) -> torch.Tensor:
    return t.repeat_interleave(group, dim=1)[:, :k]


class Peer:
    name = ""
    description = ""

    @property
    def method(self) -> str:
        return f"peer:{self.name}"

    def prepare(self, w: torch.Tensor) -> Prepared:  # pragma: no cover - interface
        raise NotImplementedError


class Tinygemm(Peer):
    name = "tinygemm-w4g128"
    description = "torch._weight_int4pack_mm (tinygemm, torchao's int4 kernel), int4 affine g128"
    group = 128

    def _ops(self):
        conv = getattr(torch, "_convert_weight_to_int4pack", None) or getattr(
            torch.ops.aten, "_convert_weight_to_int4pack", None
        )
        mm = getattr(torch, "_weight_int4pack_mm", None) or getattr(torch.ops.aten, "_weight_int4pack_mm", None)
        if conv is None or mm is None:
            raise PeerUnavailable(
                f"this torch ({torch.__version__}) has no _convert_weight_to_int4pack/_weight_int4pack_mm"
            )
        return conv, mm

    def prepare(self, w: torch.Tensor) -> Prepared:
        _need_cuda(w, "tinygemm")
        conv, mm = self._ops()
        n, k = w.shape
        g = self.group
        if k % g or n % 8:
            raise PeerUnavailable(f"tinygemm needs K % {g} == 0 and N % 8 == 0 (N={n}, K={k})")
        inner_k_tiles = next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)
        if inner_k_tiles is None:
            raise PeerUnavailable(f"tinygemm needs K % 32 == 0 (K={k})")
        q, s, z, _ = _int4_g128(w, g)
        s_b = s.to(torch.bfloat16)
        zt_b = ((8.0 - z) * s).to(torch.bfloat16)  # tinygemm: w = (q - 8) * s + zt
        w64 = (q.double() - 8.0) * _expand(s_b.double(), g, k) + _expand(zt_b.double(), g, k)
        sz = torch.stack([s_b, zt_b], dim=2).transpose(0, 1).contiguous()  # [G, N, 2]
        # the packed input changed across torch versions: try each layout, keep the one
        # whose output matches the float64 reference
        q32 = q.to(torch.int32)
        layouts = {
            "uint8 [N, K/2], even k in the high nibble": lambda: ((q32[:, ::2] << 4) | q32[:, 1::2]).to(torch.uint8),
            "int32 [N, K]": lambda: q32,
            "uint8 [N, K/2], even k in the low nibble": lambda: (q32[:, ::2] | (q32[:, 1::2] << 4)).to(torch.uint8),
        }
        gen = torch.Generator(device=w.device).manual_seed(1234)
        x = torch.randn(16, k, device=w.device, dtype=torch.bfloat16, generator=gen)
        ref = f64_linear(x, w64)
        tried = []
        packed = None
        for label, build in layouts.items():
            try:
                cand = conv(build().contiguous(), inner_k_tiles)
                err = rel_err(mm(x, cand, g, sz), ref)
            except Exception as e:  # a signature this torch does not take
                tried.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                continue
            if err <= TOL:
                packed = cand
                break
            tried.append(f"{label}: ran but rel_err {err:.3g}")
        if packed is None:
            raise PeerUnavailable("no int4pack layout works on this torch: " + "; ".join(tried))

        def make():
            wp = packed.clone()
            return lambda x: mm(x, wp, g, sz)

        return Prepared(
            method=self.method,
            make=make,
            reference=lambda x: f64_linear(x, w64),
            weight_bytes=n * k // 2 + 2 * sz.numel(),  # bf16 scale + zero per group
            checked_against="float64 x @ W^T, W = (q - 8) * s + z (its own bf16 scales and zeros)",
            first=lambda x: mm(x, packed, g, sz),
        )


_GEMLITE_CONFIG: dict = {}


class Gemlite(Peer):
    name = "gemlite-w4g128"
    description = "gemlite A16W4_HQQ_INT, int4 affine g128, bf16 (shipped H100 configs on Hopper)"
    group = 128

    def _import(self):
        try:
            import gemlite
            from gemlite.helper import A16W4_HQQ_INT
        except Exception as e:
            raise PeerUnavailable(
                f"gemlite is not importable ({type(e).__name__}: {e}); it is pure Python: "
                "pip install --no-deps gemlite==0.6.0.post2 (needs triton >= 3.6)"
            ) from None
        key = torch.cuda.get_device_name()
        if key not in _GEMLITE_CONFIG:
            _GEMLITE_CONFIG[key] = self._load_config(gemlite)
        return gemlite, A16W4_HQQ_INT

    @staticmethod
    def _load_config(gemlite) -> str:
        """gemlite loads configs/<tag>.json only when the tag is in the device name; an H200
        matches none, so load h100.json (same chip) rather than autotune from scratch."""
        try:
            from gemlite import core

            if getattr(core, "selected_tag", None):
                return f"auto: {os.path.basename(core.selected_tag)}"
        except Exception:
            pass
        if torch.cuda.get_device_capability() != (9, 0):
            return "none (autotunes)"
        path = os.path.join(os.path.dirname(gemlite.__file__), "configs", "h100.json")
        ok = os.path.exists(path) and gemlite.load_config(path)
        return "h100.json" if ok else f"none ({path} not loaded; autotunes)"

    def prepare(self, w: torch.Tensor) -> Prepared:
        _need_cuda(w, "gemlite")
        gemlite, A16W4_HQQ_INT = self._import()
        n, k = w.shape
        g = self.group
        if k % g:
            raise PeerUnavailable(f"gemlite needs K % {g} == 0 (K={k})")
        q, s, z, _ = _int4_g128(w, g)
        s_b, z_b = s.to(torch.bfloat16), z.to(torch.bfloat16)
        # gemlite's fma mode stores W ~ q * s + bf16(-z * s)
        zf = (-z_b.float() * s_b.float()).to(torch.bfloat16)
        w64 = q.double() * _expand(s_b.double(), g, k) + _expand(zf.double(), g, k)
        dev = str(w.device)

        def make():
            layer = A16W4_HQQ_INT(device=dev, dtype=torch.bfloat16).from_weights(q, s_b.clone(), z_b.clone())
            return lambda x: layer(x)

        config = _GEMLITE_CONFIG.get(torch.cuda.get_device_name())
        return Prepared(
            method=self.method,
            make=make,
            reference=lambda x: f64_linear(x, w64),
            weight_bytes=n * k // 2 + 2 * 2 * s_b.numel(),
            checked_against=f"float64 x @ W^T, W = q * s + bf16(-z * s) (its own); config {config}",
        )


class CublasFp8(Peer):
    name = "cublas-fp8-rowwise"
    description = "torch._scaled_mm FP8 E4M3, row-wise scales, unfused per-row activation quantization"

    FP8_MAX = 448.0

    def prepare(self, w: torch.Tensor) -> Prepared:
        _need_cuda(w, "FP8 _scaled_mm")
        if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
            raise PeerUnavailable(f"this torch ({torch.__version__}) has no torch._scaled_mm / float8_e4m3fn")
        if torch.cuda.get_device_capability(w.device) < (8, 9):
            raise PeerUnavailable("FP8 matmul needs compute capability 8.9 or newer")
        n, k = w.shape
        if k % 16 or n % 16:
            raise PeerUnavailable(f"_scaled_mm needs N and K multiples of 16 (N={n}, K={k})")
        fmax = self.FP8_MAX
        f8 = torch.float8_e4m3fn

        def quant_rows(t: torch.Tensor):
            amax = t.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
            scale = amax / fmax
            return (t.float() / scale).clamp(-fmax, fmax).to(f8), scale

        wq, sw = quant_rows(w)  # [N, K] fp8, [N, 1] f32
        w64 = wq.double() * sw.double()

        def run(x, wq_t, sw_row):
            xq, sx = quant_rows(x)
            return torch._scaled_mm(xq, wq_t, scale_a=sx, scale_b=sw_row, out_dtype=torch.bfloat16, use_fast_accum=True)

        def make():
            wc = wq.clone()
            wq_t, sw_row = wc.t(), sw.reshape(1, n).clone()
            return lambda x: run(x, wq_t, sw_row)

        def reference(x):
            xq, sx = quant_rows(x)
            return (xq.double() * sx.double()) @ w64.t()

        return Prepared(
            method=self.method,
            make=make,
            reference=reference,
            weight_bytes=n * k + 4 * n,
            flops_rate=FP8_FLOPS,
            checked_against="float64 (xq * sx) @ (wq * sw)^T, its own FP8 activations and weight",
        )


class GemliteA8W8(Gemlite):
    """gemlite's A8W8 with dynamic per-token activations and per-channel weights
    (A8W8_fp8_dynamic / A8W8_int8_dynamic), quantizing the bf16 weight itself."""

    def __init__(self, fp8: bool):
        self.fp8 = fp8
        self.name = "gemlite-a8w8-fp8" if fp8 else "gemlite-a8w8-int8"
        self.description = f"gemlite A8W8_{'fp8' if fp8 else 'int8'}_dynamic, per-token x per-channel"

    def prepare(self, w: torch.Tensor) -> Prepared:
        _need_cuda(w, "gemlite")
        self._import()
        from gemlite.helper import A8W8_fp8_dynamic, A8W8_int8_dynamic

        n, k = w.shape
        qmax = 448.0 if self.fp8 else 127.0

        def quant_rows(t: torch.Tensor):
            # its rule: s = max(amax / qmax, 1e-6), codes clamped (FP8 cast, or rounded int8)
            s = (t.float().abs().amax(dim=1, keepdim=True) / qmax).clamp(min=1e-6)
            v = (t.float() / s).clamp(-qmax, qmax)
            v = v.to(torch.float8_e4m3fn).double() if self.fp8 else v.round().double()
            return v * s.double()

        w64 = quant_rows(w)
        dev = str(w.device)
        cls = A8W8_fp8_dynamic if self.fp8 else A8W8_int8_dynamic

        def make():
            layer = cls(device=dev, dtype=torch.bfloat16).from_weights(w.clone())
            return lambda x: layer(x)

        return Prepared(
            method=self.method,
            make=make,
            reference=lambda x: quant_rows(x) @ w64.t(),
            weight_bytes=n * k + 4 * n,
            flops_rate=FP8_FLOPS,
            checked_against="float64 (its quantized activations) @ (its quantized weight)^T",
        )


# gemlite last: where its shipped configs miss a shape it autotunes (slow), and the
# harness's time budget is checked between methods
PEERS: dict[str, Peer] = {p.name: p for p in (Tinygemm(), CublasFp8(), Gemlite(), GemliteA8W8(True),
                                                GemliteA8W8(False))}


def select_peers(spec: str | list | tuple | None = None) -> list[Peer]:
    """Comma list of peer names, 'all' (None) or 'none' -> peers."""
    if spec is None or spec == "all":
        return list(PEERS.values())
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    out: list[Peer] = []
    for item in items:
        if isinstance(item, Peer):
            out.append(item)
        elif item in ("", "none"):
            continue
        elif item in PEERS:
            out.append(PEERS[item])
        else:
            raise ValueError(f"unknown peer {item!r}; peers: {', '.join(PEERS)} (or 'all', 'none')")
    return out
