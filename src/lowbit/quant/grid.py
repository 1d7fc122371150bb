"""Quantization grids with explicit parameters: what every algorithm in lowbit.quant
shares with lowbit.formats.

A :class:`Grid` is a weight format with its options resolved (``quantize_tensor``'s
rules). It splits the work the formats do in one go into three steps that the
algorithms need separately:

- ``fit(w)``: the round-to-nearest parameters (scale, zero, E8M0 exponent, E4M3
  block scale) of each tile of a weight slice, exactly as ``quantize_tensor`` picks
  them;
- ``round(w, params)``: the grid values of a slice under given parameters (HQQ
  changes the zero; GPTQ rounds one column at a time; AWQ clips first);
- ``assemble(values, params)``: the QTensor in the canonical layout.

``Grid.quantize(w)`` = assemble(round(w, fit(w))) is bit-identical to
``quantize_tensor(w, fmt, **options)`` (tests/quant/test_grid.py), so an algorithm
that only changes the parameters or the values returns a QTensor that every kernel
and checkpoint path reads unchanged.

Parameters are a dict of tensors with one row per weight row and one column per
tile along K (tiles are always (1, tc) here: per channel, group, MX or NVFP4 block):
int affine ``{"scale", "zero"}`` (float32, already rounded to ``scale_dtype``),
int symmetric / fp8 ``{"scale"}``, MX ``{"exp"}`` (int64 exponent E, scale 2^E),
NVFP4 ``{"block"}`` (float32 decoded E4M3 block scale) plus the tensor scale
``Grid.global_scale`` fixed once per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import QTensor
from ..formats import elements, int as int_fmt, mx, nvfp4, pack, tiles
from ..formats.quantize import checked_spec, scale_granularity

__all__ = ["Grid", "make_grid"]


@dataclass
class Grid:
    fmt: str
    family: str  # "int" | "fp8" | "mx" | "nvfp4"
    bits: int
    tile_k: int  # columns covered by one parameter (K for per-channel)
    options: dict  # the options kept in the QTensor (as quantize_tensor keeps them)
    symmetric: bool = False
    zero_point: str = "float"
    scale_dtype: torch.dtype = torch.float32
    element: elements.ElementFormat | None = None
    scale_rule: str = "floor"
    global_scale: torch.Tensor | None = None  # NVFP4 s_t (float32 scalar), set by set_tensor()

    # ---------------------------------------------------------------- ranges
    @property
    def qmin(self) -> int:
        return int_fmt.qrange(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return int_fmt.qrange(self.bits, self.symmetric)[1]

    def n_tiles(self, k: int) -> int:
        return -(-k // self.tile_k)

    def set_tensor(self, w: torch.Tensor) -> "Grid":
        """Fix the per-tensor parameter (NVFP4's s_t = amax / (6 * 448)) from the whole weight."""
        if self.family == "nvfp4":
            amax = w.abs().amax() if w.numel() else torch.zeros((), device=w.device)
            self.global_scale = tiles.divide(amax.to(torch.float32), nvfp4.E2M1.max * nvfp4.E4M3.max).reshape(())
        return self

    # ---------------------------------------------------------------- fit
    def fit(self, w: torch.Tensor) -> dict:
        """Round-to-nearest parameters of every tile of ``w`` [R, k] (float32), k <= K,
        tiles starting at column 0 of the slice."""
        tile = (1, self.tile_k)
        if self.family == "int":
            _, s, z = int_fmt.quantize(w, self.bits, tile, self.symmetric, self.zero_point, self.scale_dtype)
            out = {"scale": s.float()}
            if z is not None:
                out["zero"] = z.float()
            return out
        if self.family == "fp8":
            amax = tiles.tile_amax(w, tile)
            s = torch.where(amax > 0, tiles.divide(amax, self.element.max), torch.ones_like(amax))
            s = s.to(self.scale_dtype).float()
            return {"scale": torch.where(s > 0, s, torch.ones_like(s))}
        if self.family == "mx":
            amax = tiles.tile_amax(torch.where(torch.isfinite(w), w, torch.zeros_like(w)), tile)
            return {"exp": mx.shared_exponent(amax, self.element, self.scale_rule)}
        if self.global_scale is None:
            raise RuntimeError("NVFP4 grid: call set_tensor(weight) first (the tensor scale comes from the whole weight)")
        s_t = self.global_scale
        six_s_t = torch.tensor(nvfp4.E2M1.max, dtype=torch.float32, device=w.device) * s_t
        nonzero = six_s_t > 0
        amax = tiles.tile_amax(w, tile)
        ratio = torch.where(nonzero, amax / torch.where(nonzero, six_s_t, 1.0), 0.0)
        return {"block": elements.decode(elements.encode(ratio, nvfp4.E4M3), nvfp4.E4M3)}

    def fit_search(self, w: torch.Tensor, steps: int = 20, lowest: float = 0.6) -> dict:
        """Parameters of every tile chosen among round to nearest's for the shrunk tiles
        c * w, c in ``steps`` values from 1 down to ``lowest`` (MX: c in {1, 1/2, 2}, the
        neighbouring power-of-two scales): the one with the smallest squared error
        sum (w - Q(w))^2 of the tile (an MSE-optimal range: clips the tile's extremes when
        that helps the rest; c = 1 is round to nearest itself)."""
        best = self.fit(w)
        if steps <= 1:
            return best
        err = self._tile_error(w, best)
        # MX scales are powers of two: the only other choices are one binade up or down
        shrink = [0.5, 2.0] if self.family == "mx" else [1 - (1 - lowest) * i / (steps - 1) for i in range(1, steps)]
        for c in shrink:
            p = self.fit(w * c)
            e = self._tile_error(w, p)
            better = e < err
            err = torch.where(better, e, err)
            for name in best:
                best[name] = torch.where(better, p[name], best[name])
        return best

    def _tile_error(self, w: torch.Tensor, params: dict) -> torch.Tensor:
        return _tile_sum((self.fake(w, params) - w).pow(2), self.tile_k)

    def fit_columns(self, w: torch.Tensor) -> dict:
        """``fit`` with one parameter column per column of ``w`` (each column its own tile)."""
        saved = self.tile_k
        self.tile_k = 1
        try:
            return self.fit(w)
        finally:
            self.tile_k = saved

    # ---------------------------------------------------------------- round / dequantize
    def _expand(self, p: torch.Tensor, k: int, per_column: bool) -> torch.Tensor:
        if per_column:
            return p
        return tiles.expand(p, (1, self.tile_k), p.shape[0], k)

    def round(self, w: torch.Tensor, params: dict, per_column: bool = False) -> torch.Tensor:
        """Grid values of ``w`` [R, k] under ``params`` (tiles from column 0 of the slice;
        ``per_column``: params have one column per column of w). int: int64 q; others:
        float32 element values. Same arithmetic as lowbit.formats."""
        k = w.shape[1]
        ex = lambda name: self._expand(params[name], k, per_column)  # noqa: E731
        if self.family == "int":
            x = w / ex("scale")
            if "zero" in params:
                x = x + ex("zero")
            return torch.round(x).clamp(self.qmin, self.qmax).to(torch.int64)
        if self.family == "fp8":
            return elements.round_to_grid(w / ex("scale"), self.element)
        if self.family == "mx":
            scaled = elements.scale_pow2(w, -ex("exp"))
            return elements.round_to_grid(scaled, self.element)
        denom = ex("block") * self.global_scale
        ok = denom > 0
        return elements.round_to_grid(torch.where(ok, w / torch.where(ok, denom, 1.0), 0.0), nvfp4.E2M1)

    def dequantize(self, values: torch.Tensor, params: dict, per_column: bool = False) -> torch.Tensor:
        """float32 weights of grid ``values`` [R, k] under ``params`` (formats' arithmetic)."""
        k = values.shape[1]
        ex = lambda name: self._expand(params[name], k, per_column)  # noqa: E731
        if self.family == "int":
            if "zero" in params:
                return (values.float() - ex("zero")) * ex("scale")
            return values.float() * ex("scale")
        if self.family == "fp8":
            return values * ex("scale")
        if self.family == "mx":
            return elements.scale_pow2(values, ex("exp"))
        return (values * ex("block")) * self.global_scale

    def fake(self, w: torch.Tensor, params: dict, per_column: bool = False) -> torch.Tensor:
        return self.dequantize(self.round(w, params, per_column), params, per_column)

    # ---------------------------------------------------------------- assemble
    def assemble(self, values: torch.Tensor, params: dict, shape: torch.Size | None = None) -> QTensor:
        """Grid values [R, K] and parameters [R, n_tiles] -> QTensor (axis 1, canonical layout)."""
        r, k = values.shape
        shape = torch.Size(shape) if shape is not None else torch.Size((r, k))
        parts: dict = {}
        if self.family == "int":
            patterns = int_fmt.to_patterns(values.to(torch.int64), self.bits)
            parts["scales"] = params["scale"].to(self.scale_dtype)
            if "zero" in params:
                parts["zeros"] = params["zero"].to(self.scale_dtype)
        else:
            patterns = elements.grid_to_codes(values, self.element)
            if self.family == "fp8":
                parts["scales"] = params["scale"].to(self.scale_dtype)
            elif self.family == "mx":
                parts["scales"] = (params["exp"] + 127).to(torch.uint8)
            else:
                parts["scales"] = elements.encode(params["block"], nvfp4.E4M3)
                parts["global_scale"] = self.global_scale.reshape(()).to(torch.float32)
        codes = pack.pack_codes(patterns, self.bits)
        if self.family == "int" and self.bits == 8 and self.symmetric:
            codes = codes.view(torch.int8)
        return QTensor(fmt=self.fmt, shape=shape, axis=1, codes=codes, tile=(1, self.tile_k),
                       options=dict(self.options), **parts)

    def quantize(self, w: torch.Tensor) -> QTensor:
        """Round to nearest (bit-identical to quantize_tensor)."""
        w = w.detach().float()
        self.set_tensor(w)
        p = self.fit(w)
        return self.assemble(self.round(w, p), p)


def make_grid(fmt: str, k: int, **options) -> Grid:
    """The Grid of format ``fmt`` for weights with ``k`` input features, with
    quantize_tensor's option rules (defaults, checks, the options kept)."""
    spec = checked_spec(fmt, options)
    if options.get("axis", -1) not in (-1, 1):
        raise ValueError("lowbit.quant works on weights [out, in] blocked along in (axis=-1 or 1)")
    if spec.family in ("int", "fp8"):
        default_8bit = spec.bits == 8
        group_size, granularity = scale_granularity(spec, options)
        if granularity not in ("group", "channel", "token"):
            raise ValueError(
                f"lowbit.quant algorithms need one scale per row and tile of K (granularity 'channel' or "
                f"'group'), got granularity={granularity!r}; quantize with round to nearest (-rtn) instead"
            )
        tile = tiles.resolve_tile(granularity, group_size, None, 1, k, 2)
        scale_dtype = options.get("scale_dtype", torch.float32)
        if not (isinstance(scale_dtype, torch.dtype) and scale_dtype.is_floating_point):
            raise ValueError(f"scale_dtype must be a torch float dtype, got {scale_dtype!r}")
        kept = {"granularity": granularity}
        if granularity == "group":
            kept["group_size"] = group_size
        g = Grid(fmt, spec.family, spec.bits, tile[1], kept, scale_dtype=scale_dtype, element=spec.element)
        if spec.family == "int":
            g.symmetric = bool(options.get("symmetric", default_8bit))
            g.zero_point = options.get("zero_point", "float")
            if g.zero_point not in ("float", "integer"):
                raise ValueError(f"zero_point must be 'float' or 'integer', got {g.zero_point!r}")
            if g.symmetric and "zero_point" in options:
                raise ValueError("zero_point applies to affine formats; drop it or pass symmetric=False")
            kept["symmetric"] = g.symmetric
            if not g.symmetric:
                kept["zero_point"] = g.zero_point
        return g
    if spec.family == "mx":
        rule = options.get("scale_rule", "floor")
        if rule not in mx.SCALE_RULES:
            raise ValueError(f"scale_rule must be one of {mx.SCALE_RULES}, got {rule!r}")
        return Grid(fmt, "mx", spec.bits, mx.BLOCK, {"scale_rule": rule}, element=spec.element, scale_rule=rule)
    return Grid(fmt, "nvfp4", spec.bits, nvfp4.BLOCK, {}, element=spec.element)


def _tile_sum(d: torch.Tensor, g: int) -> torch.Tensor:
    """Sum of d [R, k] over tiles of g columns (the last one partial, no padding counted)."""
    k = d.shape[1]
    pad = -k % g
    return torch.nn.functional.pad(d, (0, pad)).view(d.shape[0], -1, g).sum(-1)
