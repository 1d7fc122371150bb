"""quantize_(model, recipe): swap nn.Linear layers for QuantLinear, with a report."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

from torch import nn

from ..table import format_table
from .linear import QuantLinear
from .recipes import Recipe, parse_recipe

DEFAULT_SKIP = ("lm_head",)


@dataclass
class LayerReport:
    name: str
    out_features: int
    in_features: int
    recipe: str | None  # None: left in full precision
    bits_per_weight: float
    note: str = ""


@dataclass
class QuantReport:
    recipe: str
    weight_options: dict = field(default_factory=dict)
    replaced: list[LayerReport] = field(default_factory=list)
    skipped: list[LayerReport] = field(default_factory=list)
    bytes_before: int = 0  # every nn.Linear weight and bias, as stored before
    bytes_after: int = 0  # the same layers after quantization

    @property
    def bits_per_weight(self) -> float:
        """Effective bits per weight over the replaced layers (codes, scales, zeros)."""
        n = sum(r.out_features * r.in_features for r in self.replaced)
        bits = sum(r.bits_per_weight * r.out_features * r.in_features for r in self.replaced)
        return bits / n if n else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "bits_per_weight": self.bits_per_weight}

    def __str__(self) -> str:
        opts = "".join(f", {k}={v}" for k, v in self.weight_options.items())
        head = (
            f"{self.recipe}{opts}: replaced {len(self.replaced)} linear layers, skipped {len(self.skipped)}; "
            f"{self.bits_per_weight:.3f} bits/weight; linear layers {self.bytes_before / 2**20:.1f} MiB -> "
            f"{self.bytes_after / 2**20:.1f} MiB"
        )
        notes = sorted({r.note for r in self.replaced if r.note})
        lines = [head] + [f"  note: {n}" for n in notes]
        if self.skipped:
            lines.append(
                format_table(
                    ["skipped layer", "shape", "reason"],
                    [[r.name, f"{r.out_features}x{r.in_features}", r.note] for r in self.skipped],
                )
            )
        return "\n".join(lines)


def _matches(name: str, patterns: Iterable[str]) -> str | None:
    for p in patterns:
        if fnmatch.fnmatchcase(name, p) or name.split(".")[-1] == p:
            return p
    return None


def _tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _tail_note(k: int, tile_k: int) -> str:
    if k % tile_k:
        return f"K={k} is not a multiple of {tile_k}: the last block holds {k % tile_k} real values (scales from those alone)"
    return ""


def quantize_(
    model: nn.Module,
    recipe: str | Recipe,
    skip: Iterable[str] | Callable[[str, nn.Module], bool] = DEFAULT_SKIP,
    overrides: dict[str, str | None] | None = None,
    weight_options: dict | None = None,
    backend: str = "auto",
    progress: bool = True,
) -> QuantReport:
    """Replace, in place, every nn.Linear of ``model`` that the filter admits.

    skip: name patterns (fnmatch, or a module's last name such as "lm_head") or
        a predicate (name, module) -> True to skip.
    overrides: pattern -> recipe for the layers it matches (None keeps them in
        full precision); the first matching pattern wins, and an override beats
        ``skip`` (it names the layer explicitly).
    A module registered under several names (shared) is quantized once and the
    same QuantLinear is put under every name.
    weight_options: extra options for the weight format (e.g. zero_point="integer").
    """
    if isinstance(model, nn.Linear):
        raise ValueError(
            "quantize_ replaces the linear layers inside a model; for a lone nn.Linear use "
            "lowbit.QuantLinear.from_linear(layer, recipe)"
        )
    base = parse_recipe(recipe) if isinstance(recipe, str) else recipe
    overrides = {p: (parse_recipe(r) if isinstance(r, str) else r) for p, r in (overrides or {}).items()}
    report = QuantReport(recipe=base.name, weight_options=dict(weight_options or {}))
    plan: list[tuple[str, nn.Linear, Recipe]] = []
    first_name: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, nn.Linear):
            continue
        out_f, in_f = module.weight.shape
        shared = id(module) in first_name
        if not shared:
            first_name[id(module)] = name
            report.bytes_before += _tensor_bytes(module.weight, module.bias)
        hit = _matches(name, overrides)
        if hit is not None:
            chosen = overrides[hit]
            reason = f"override {hit!r}: full precision" if chosen is None else None
        else:
            chosen = base
            if callable(skip):
                reason = "skip filter" if skip(name, module) else None
            else:
                hit = _matches(name, skip)
                reason = f"skip pattern {hit!r}" if hit else None
        if shared:
            plan.append((name, module, chosen if not reason else None))
            continue
        if reason:
            report.skipped.append(LayerReport(name, out_f, in_f, None, 8.0 * module.weight.element_size(), reason))
            report.bytes_after += _tensor_bytes(module.weight, module.bias)
            continue
        plan.append((name, module, chosen))

    bar = None
    if progress and plan:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan), desc=f"quantize {base.name}", unit="layer", leave=False)
    made: dict[int, QuantLinear] = {}
    for name, module, chosen in plan:
        if bar:
            bar.update()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if id(module) in made or id(module) in first_name and first_name[id(module)] != name:
            # a second name of a shared module: the same replacement (or none) as the first
            q = made.get(id(module))
            if q is None:
                continue
            setattr(parent, child, q)
            report.replaced.append(LayerReport(name, q.out_features, q.in_features, q.recipe,
                                               q.qweight.bits_per_element, f"same module as {first_name[id(module)]}"))
            continue
        q = QuantLinear.from_linear(module, chosen, weight_options, backend=backend)
        made[id(module)] = q
        setattr(parent, child, q)
        report.replaced.append(
            LayerReport(
                name, q.out_features, q.in_features, chosen.name, q.qweight.bits_per_element,
                _tail_note(q.in_features, q.tile[1]),
            )
        )
        report.bytes_after += q.qweight.nbytes + _tensor_bytes(q.bias)
    if bar:
        bar.close()
    return report
