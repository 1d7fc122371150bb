"""QTensor: packed codes, scales and metadata in the canonical layout."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from . import elements, fp8, int as int_fmt, mx, nvfp4, pack
from .registry import FORMATS


def dequantize_values(family: str, values: torch.Tensor, parts: dict, tile: tuple[int, int]) -> torch.Tensor:
    """Grid values (int: q; others: element values) [R, K] + scales -> float32 [R, K]."""
    if family == "int":
        return int_fmt.dequantize(values, parts["scales"], parts.get("zeros"), tile)
    if family == "fp8":
        return fp8.dequantize(values, parts["scales"], tile)
    if family == "mx":
        return mx.dequantize(values, parts["scales"])
    return nvfp4.dequantize(values, parts["scales"], parts["global_scale"])


def restore_shape(x: torch.Tensor, shape: torch.Size, axis: int) -> torch.Tensor:
    """[R, K] (axis moved last, the rest flattened) -> the logical shape."""
    moved = list(shape)
    moved.append(moved.pop(axis))
    return x.reshape(moved).movedim(-1, axis)


@dataclass(frozen=True, repr=False)
class QTensor:
    fmt: str
    shape: torch.Size  # logical shape of the quantized tensor
    axis: int  # the blocked dimension, non-negative
    codes: torch.Tensor  # packed along K: [R, packed_K]
    scales: torch.Tensor
    tile: tuple[int, int]  # rows x columns of the 2-D view covered by one scale
    zeros: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None
    options: dict = field(default_factory=dict)

    @property
    def spec(self):
        return FORMATS[self.fmt]

    @property
    def k(self) -> int:
        return self.shape[self.axis]

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def parts(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (what a checkpoint holds)."""
        out = {"codes": self.codes, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        if self.global_scale is not None:
            out["global_scale"] = self.global_scale
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts().values())

    @property
    def bits_per_element(self) -> float:
        n = self.shape.numel()
        return 8 * self.nbytes / n if n else float("nan")

    def validate(self) -> "QTensor":
        """Check that the stored parts fit the metadata (e.g. after reading a file);
        raises ValueError naming the first inconsistency."""
        from . import tiles

        spec = self.spec  # KeyError for an unknown format
        if not 0 <= self.axis < len(self.shape):
            raise ValueError(f"axis {self.axis} out of range for shape {list(self.shape)}")
        k = self.shape[self.axis]
        r = self.shape.numel() // k if k else 0
        want_codes = (r, pack.packed_size(k, spec.bits))
        if tuple(self.codes.shape) != want_codes or self.codes.element_size() != 1:
            raise ValueError(f"codes are {self.codes.dtype}{list(self.codes.shape)}, expected 8-bit {list(want_codes)}")
        fixed = {"mx": (1, mx.BLOCK), "nvfp4": (1, nvfp4.BLOCK)}.get(spec.family)
        if fixed and tuple(self.tile) != fixed:
            raise ValueError(f"{self.fmt} scales cover {fixed}, not {tuple(self.tile)}")
        want_scales = tiles.grid(r, k, tuple(self.tile))
        if tuple(self.scales.shape) != want_scales:
            raise ValueError(f"scales are {list(self.scales.shape)}, expected {list(want_scales)}")
        if fixed and self.scales.dtype != torch.uint8:
            raise ValueError(f"{self.fmt} scales must be uint8, got {self.scales.dtype}")
        affine = spec.family == "int" and not self.options.get("symmetric", True)
        if affine != (self.zeros is not None) or (affine and self.zeros.shape != self.scales.shape):
            raise ValueError("zero points do not match the format's options")
        if (spec.family == "nvfp4") != (self.global_scale is not None):
            raise ValueError("a global scale belongs to nvfp4 alone")
        return self

    def unpacked_codes(self) -> torch.Tensor:
        """[R, K] unsigned bit patterns."""
        return pack.unpack_codes(self.codes.view(torch.uint8), self.spec.bits, self.k)

    def dequantize(self) -> torch.Tensor:
        """float32 tensor of the logical shape."""
        spec = self.spec
        p = self.unpacked_codes()
        if spec.family == "int":
            values = int_fmt.from_patterns(p, spec.bits, self.options["symmetric"])
        else:
            values = elements.decode(p, spec.element)
        x = dequantize_values(spec.family, values, self.parts(), self.tile)
        return restore_shape(x, self.shape, self.axis)

    def to(self, device) -> "QTensor":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            codes=move(self.codes),
            scales=move(self.scales),
            zeros=move(self.zeros),
            global_scale=move(self.global_scale),
        )

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        scale = f"{str(self.scales.dtype).replace('torch.', '')}{list(self.scales.shape)}"
        return (
            f"QTensor({self.fmt}, shape={list(self.shape)}, axis={self.axis}, "
            f"tile={self.tile}, scales={scale}, {opts + ', ' if opts else ''}"
            f"{self.bits_per_element:.3g} bits/elem, device={self.device})"
        )


__all__ = ["QTensor", "elements"]
