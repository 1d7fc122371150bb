"""lowbit: low-bit inference of attention-based models.

Importing lowbit needs torch alone; triton, transformers, gguf and the bundled
models are optional and imported where they are used.
"""

from .formats import FORMATS, QTensor, quantize_tensor
from .io import export, load, quantize_checkpoint, save
from .nn import QuantLinear, quantize_

__version__ = "0.1.0"

__all__ = ["FORMATS", "QTensor", "QuantLinear", "export", "load", "quantize_", "quantize_checkpoint", "quantize_tensor",
           "save", "__version__"]
