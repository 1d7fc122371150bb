"""Algorithms that choose scales and codes; each returns a QTensor in the canonical layout.

- :func:`lowbit.quant.hqq.quantize_hqq`: HQQ (calibration-free), integer formats
"""

from .grid import Grid, make_grid
from .hqq import HQQ_DEFAULTS, hqq_params, quantize_hqq

__all__ = ["Grid", "HQQ_DEFAULTS", "hqq_params", "make_grid", "quantize_hqq"]
