"""Plain-text tables for the command line."""

from __future__ import annotations


def format_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """Columns padded to width; ``align`` one char per column, 'l' or 'r' (default: text left, numbers right)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    if align is None:
        first = rows[0] if rows else headers
        align = "".join("r" if isinstance(v, (int, float)) else "l" for v in first)

    def line(values):
        return "  ".join(v.rjust(w) if a == "r" else v.ljust(w) for v, w, a in zip(values, widths, align)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])
