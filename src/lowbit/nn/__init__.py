"""Model surgery: QuantLinear and quantize_(model, recipe)."""

from .linear import QuantLinear
from .recipes import ActivationSpec, Recipe, parse_recipe
from .surgery import QuantReport, quantize_

__all__ = ["ActivationSpec", "QuantLinear", "QuantReport", "Recipe", "parse_recipe", "quantize_"]
