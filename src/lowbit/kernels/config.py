"""The launch config of the Triton weight-only kernel (chosen by ``dispatch``)."""

from __future__ import annotations

from dataclasses import dataclass

from .packing import PackedWeight, kmajor_supported, row_supported


def check_row_tiling(block_n: int, block_k: int) -> None:
    """The row GEMV's tiling (``_row_gemv_triton``): block_n rows, block_k bytes per step."""
    if not (1 <= block_n <= 16 and block_n & (block_n - 1) == 0):
        raise ValueError(f"block_n={block_n}: the row GEMV takes a power of two in [1, 16] rows")
    if not (128 <= block_k <= 8192 and block_k & (block_k - 1) == 0):
        raise ValueError(f"block_k={block_k}: the row GEMV takes a power of two in [128, 8192]")


@dataclass(frozen=True)
class WeightOnlyConfig:
    """Launch config of the Triton weight-only kernel.

    mode: "swap" computes y^T = W x^T (the weight is the MMA's wide side; for
    small M), "gemm" the tiled y = x W^T (larger M), "gemv" sums products on
    the CUDA cores without the MMA (M of 1 to a few). K is walked in tiles of
    128. split_k > 1 splits K over that many programs per output tile (float32
    partials summed by a second kernel). "kmajor" is the MMA kernel on K-major 4-bit
    codes (``packing.with_kmajor``); "row" the one-token GEMV on the canonical 8-bit
    bytes (``_row_gemv_triton``: block_n whole rows per program, block_k bytes of
    each per step).
    """

    block_m: int
    block_n: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    mode: str = "gemm"
    group_m: int = 8
    stack: bool = True  # one dot per 128-element K tile (False: one per chunk of R)
    int_f32: bool = False  # gemv, int codes: float32 products, scale and bias once per group
    prefetch: int = 1  # K tiles of weight words loaded ahead into registers (1 or 2)
    max_regs: int | None = None  # cap on registers per thread (ptxas .maxnreg): more programs per SM
    block_k: int = 1024  # mode "row": K elements per step

    def check(self, pw: PackedWeight) -> "WeightOnlyConfig":
        if self.mode not in ("gemm", "swap", "gemv", "kmajor", "row"):
            raise ValueError(f"mode={self.mode!r}: must be 'gemm', 'swap', 'gemv', 'kmajor' or 'row'")
        if self.mode == "row":
            return self._check_row(pw)
        if self.mode == "kmajor":
            why = kmajor_supported(pw) or (None if pw.kbytes is not None else
                                          "the weight has no K-major codes (packing.with_kmajor)")
            if why:
                raise ValueError(f"mode 'kmajor': {why}")
        low = 1 if self.mode == "gemv" else 16
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < low or v & (v - 1):
                raise ValueError(f"{name}={v}: must be a power of two >= {low} for mode {self.mode!r}")
        if self.mode == "gemv" and self.block_m != 1:
            raise ValueError(f"block_m={self.block_m}: mode 'gemv' takes one token per program (block_m=1)")
        if self.mode in ("swap", "kmajor") and self.block_n < 64:
            raise ValueError(f"block_n={self.block_n}: mode {self.mode!r} needs block_n >= 64 (the MMA's 64 rows)")
        if self.block_n > 256:
            raise ValueError(f"block_n={self.block_n}: at most 256 (the packed N padding)")
        if self.split_k < 1 or self.group_m < 1 or self.num_stages < 1:
            raise ValueError(f"split_k, group_m and num_stages must be >= 1, got {self}")
        if self.prefetch not in (1, 2):
            raise ValueError(f"prefetch={self.prefetch}: must be 1 or 2 (K tiles loaded ahead)")
        if self.max_regs is not None and not (32 <= self.max_regs <= 255 and self.max_regs % 8 == 0):
            raise ValueError(f"max_regs={self.max_regs}: must be None or a multiple of 8 in [32, 255]")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps={self.num_warps}: must be 1, 2, 4, 8 or 16")
        return self

    def _check_row(self, pw: PackedWeight) -> "WeightOnlyConfig":
        why = row_supported(pw.layout) or (None if pw.row_codes is not None else
                                           "the weight carries no [N, K] codes (pack it from its QTensor)")
        if why:
            raise ValueError(f"mode 'row': {why}")
        if self.block_m != 1 or self.split_k != 1:
            raise ValueError(f"mode 'row' runs one token, all of K per program: block_m=1, split_k=1, got {self}")
        check_row_tiling(self.block_n, self.block_k)
        if self.num_warps not in (1, 2, 4, 8):
            raise ValueError(f"num_warps={self.num_warps}: mode 'row' takes 1, 2, 4 or 8")
        return self
