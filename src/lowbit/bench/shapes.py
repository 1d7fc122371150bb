"""Registry of real linear-layer shapes (N x K: out_features x in_features) by model.

Each shape is derived from its model's configuration (hidden size, attention
heads, key/value heads, head dimension, MLP width), so the numbers can be
checked against the published configs:

    llama3-8b     hidden 4096, 32 heads / 8 kv heads of 128, MLP 14336
    llama3-70b    hidden 8192, 64 heads / 8 kv heads of 128, MLP 28672
    smollm2-135m  hidden 576, 9 heads / 3 kv heads of 64, MLP 1536 (the bundled model)

Llama-3 shapes are the fused projections a serving engine runs (q/k/v in one
matmul, gate and up in one); SmolLM2's are the separate modules of the
Hugging Face model (k and v are one shape, so are gate and up).

Pick a subset with a comma list (`select_shapes`):

    llama3-8b.gate_up,llama3-70b.down    named shapes
    llama3-8b                            every shape of one model
    all                                  the whole registry
    4096x4096                            an ad-hoc N x K shape (model "custom")
"""

from __future__ import annotations

import re
from dataclasses import dataclass

M_VALUES: tuple[int, ...] = (1, 16, 128, 1024, 8192)


@dataclass(frozen=True)
class ModelConfig:
    key: str
    label: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    fused: bool  # fused qkv and gate_up (serving engines) or separate modules (HF)


@dataclass(frozen=True)
class Shape:
    model: str  # registry key of the model, e.g. "llama3-8b"
    name: str  # projection, e.g. "gate_up"
    n: int  # out_features
    k: int  # in_features
    label: str = ""  # human-readable, e.g. "Llama-3-8B gate+up"
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.model}.{self.name}"

    @property
    def title(self) -> str:
        """e.g. 'Llama-3-8B gate+up 28672x4096' (for tables)."""
        return f"{self.label or self.key} {self.n}x{self.k}"


MODELS: dict[str, ModelConfig] = {
    c.key: c
    for c in (
        ModelConfig("llama3-8b", "Llama-3-8B", 4096, 32, 8, 128, 14336, fused=True),
        ModelConfig("llama3-70b", "Llama-3-70B", 8192, 64, 8, 128, 28672, fused=True),
        ModelConfig("smollm2-135m", "SmolLM2-135M", 576, 9, 3, 64, 1536, fused=False),
    )
}


def model_shapes(c: ModelConfig) -> list[Shape]:
    """The distinct linear shapes of one decoder layer of model ``c``."""
    q = c.heads * c.head_dim
    kv = c.kv_heads * c.head_dim
    if c.fused:
        parts = [
            ("qkv", q + 2 * kv, c.hidden, "q/k/v", "q, k and v in one matmul"),
            ("o", c.hidden, q, "o_proj", ""),
            ("gate_up", 2 * c.intermediate, c.hidden, "gate+up", "gate and up in one matmul"),
            ("down", c.hidden, c.intermediate, "down", ""),
        ]
    else:
        parts = [
            ("q", q, c.hidden, "q_proj", ""),
            ("k_v", kv, c.hidden, "k/v", "k_proj and v_proj, each (separate matmuls)"),
            ("o", c.hidden, q, "o_proj", ""),
            ("gate_up", c.intermediate, c.hidden, "gate/up", "gate_proj and up_proj, each (separate matmuls)"),
            ("down", c.hidden, c.intermediate, "down", ""),
        ]
    return [Shape(c.key, name, n, k, f"{c.label} {lab}", note) for name, n, k, lab, note in parts]


SHAPES: dict[str, Shape] = {s.key: s for c in MODELS.values() for s in model_shapes(c)}

# what `python -m lowbit.bench.run` measures without --shapes/--all: the shapes of the
# acceptance criteria plus a small and a square one; fits a ~8-minute H200 session
DEFAULT_SHAPES: tuple[str, ...] = ("llama3-8b.gate_up", "llama3-8b.o", "llama3-70b.down", "smollm2-135m.gate_up")

_CUSTOM = re.compile(r"^(\d+)x(\d+)$")


def select_shapes(spec: str | list[str] | tuple[str, ...] | None = None) -> list[Shape]:
    """Comma list (or list) of shape keys, model keys, 'all' or 'NxK' -> shapes, in order,
    without duplicates. None -> DEFAULT_SHAPES."""
    if spec is None:
        items = list(DEFAULT_SHAPES)
    elif isinstance(spec, str):
        items = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        items = list(spec)
    out: list[Shape] = []
    for item in items:
        if isinstance(item, Shape):
            found = [item]
        elif item == "all":
            found = list(SHAPES.values())
        elif item in SHAPES:
            found = [SHAPES[item]]
        elif item in MODELS:
            found = [s for s in SHAPES.values() if s.model == item]
        elif _CUSTOM.match(item):
            n, k = (int(v) for v in _CUSTOM.match(item).groups())
            if n <= 0 or k <= 0:
                raise ValueError(f"shape {item!r}: N and K must be positive")
            found = [Shape("custom", item, n, k, "custom")]
        else:
            raise ValueError(
                f"unknown shape {item!r}: use model.name ({', '.join(SHAPES)}), a model "
                f"({', '.join(MODELS)}), 'all', or NxK such as 4096x4096"
            )
        out.extend(s for s in found if s not in out)
    if not out:
        raise ValueError("no shapes selected")
    return out


def parse_ms(spec: str | list[int] | tuple[int, ...] | None = None) -> list[int]:
    """'1,16,128' (or a list) -> [1, 16, 128]; None -> M_VALUES."""
    if spec is None:
        return list(M_VALUES)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        ms = [int(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        raise ValueError(f"batch sizes must be integers, e.g. 1,16,128; got {spec!r}") from None
    if not ms or any(m <= 0 for m in ms):
        raise ValueError(f"batch sizes must be positive integers, got {spec!r}")
    return list(dict.fromkeys(ms))


def describe_registry() -> str:
    """The registry as a plain-text table (for --list)."""
    from ..table import format_table

    rows = [[s.key, s.n, s.k, s.label, s.note, "yes" if s.key in DEFAULT_SHAPES else ""] for s in SHAPES.values()]
    return format_table(["shape", "N", "K", "what", "note", "default"], rows, "lrrlll")
