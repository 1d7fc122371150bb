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
    calibration: dict = field(default_factory=dict)  # calibrated methods: sequences, tokens, blocks, seconds

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
        notes = sorted({r.note for r in self.replaced if r.note and not r.note.startswith(_TRANSFORM_NOTES)})
        lines = [head] + [f"  note: {n}" for n in notes]
        for kind in ("awq", "smooth"):
            folded = sum(1 for r in self.replaced if r.note.startswith(f"{kind} scale") and "folded into" in r.note)
            kept = sum(1 for r in self.replaced if r.note.startswith(f"{kind} scale") and "input_scale" in r.note)
            if folded or kept:
                lines.append(f"  {kind}: {folded} layers with the scale folded into the preceding operation, "
                             f"{kept} keep it as input_scale")
        if self.calibration:
            c = self.calibration
            lines.append(f"  calibration: {c.get('sequences')} sequences, {c.get('tokens')} tokens, "
                         f"{c.get('blocks')} blocks, {c.get('seconds', 0):.0f} s")
        if self.skipped:
            lines.append(
                format_table(
                    ["skipped layer", "shape", "reason"],
                    [[r.name, f"{r.out_features}x{r.in_features}", r.note] for r in self.skipped],
                )
            )
        return "\n".join(lines)


_TRANSFORM_NOTES = ("awq scale", "smooth scale")


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
    calibration=None,
    method_options: dict | None = None,
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
    calibration: token ids, a LongTensor [n, seq] (or a list of LongTensors), for
        the methods that need data (-awq, -gptq, -smooth); the model runs on them
        block by block (lowbit.quant.calibration).
    method_options: per-method options, e.g. {"gptq": {"act_order": True,
        "static_groups": True}, "hqq": {"optimize_scale": True}} (defaults:
        lowbit.quant.methods.METHOD_OPTIONS).
    """
    if isinstance(model, nn.Linear):
        raise ValueError(
            "quantize_ replaces the linear layers inside a model; for a lone nn.Linear use "
            "lowbit.QuantLinear.from_linear(layer, recipe)"
        )
    from ..quant.methods import check_method_options

    base = parse_recipe(recipe) if isinstance(recipe, str) else recipe
    overrides = {p: (parse_recipe(r) if isinstance(r, str) else r) for p, r in (overrides or {}).items()}
    check_method_options(method_options)
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

    needy = sorted({c.name for _, _, c in plan if c is not None and c.needs_calibration})
    if needy and calibration is None:
        methods = sorted({m for c in needy for m in parse_recipe(c).method.split("-") if m in ("awq", "gptq", "smooth")})
        raise ValueError(
            f"recipe {needy[0]!r} uses {', '.join('-' + m for m in methods)}, which needs calibration data: pass "
            "calibration=ids to quantize_ (ids: a LongTensor [n, seq] of token ids, or a list of them; "
            "`lowbit eval` builds it from the calibration half of its corpus or --calibration-text FILE)"
        )

    made: dict[int, QuantLinear] = {}
    names_of: dict[int, list[str]] = {}
    for name, module, chosen in plan:
        names_of.setdefault(id(module), []).append(name)

    def install(name: str, module: nn.Linear, q: QuantLinear, note: str = "") -> None:
        """Put ``q`` under every name of ``module`` and record it."""
        made[id(module)] = q
        for i, n in enumerate(names_of[id(module)]):
            parent_name, _, child = n.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, q)
            if i == 0:
                full_note = "; ".join(x for x in (note, _tail_note(q.in_features, q.tile[1])) if x)
                report.replaced.append(LayerReport(n, q.out_features, q.in_features, q.recipe,
                                                   q.qweight.bits_per_element, full_note))
                report.bytes_after += q.qweight.nbytes + _tensor_bytes(q.bias, q.input_scale)
            else:
                report.replaced.append(LayerReport(n, q.out_features, q.in_features, q.recipe,
                                                   q.qweight.bits_per_element, f"same module as {names_of[id(module)][0]}"))

    # the first name of every distinct module that is quantized
    firsts = [(name, module, chosen) for name, module, chosen in plan
              if chosen is not None and first_name.get(id(module)) == name]
    if needy:
        from ..quant.calibration import Target, quantize_calibrated

        targets = [Target(name, module, chosen, weight_options) for name, module, chosen in firsts]

        def install_target(t, q, note=""):
            install(t.name, t.module, q, note)

        report.calibration = quantize_calibrated(
            model, targets, calibration, weight_options, method_options, install_target, backend=backend,
            progress=progress)
    else:
        bar = None
        if progress and firsts:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(firsts), desc=f"quantize {base.name}", unit="layer", leave=False)
        for name, module, chosen in firsts:
            q = QuantLinear.from_linear(module, chosen, weight_options, backend=backend, method_options=method_options)
            install(name, module, q)
            if bar:
                bar.update()
        if bar:
            bar.close()
    # order the rows as the model names them
    order = {n: i for i, (n, _, _) in enumerate(plan)}
    report.replaced.sort(key=lambda r: order.get(r.name, len(order)))
    return report
