"""Number formats: numerics only, pure PyTorch, CPU and GPU (docs/formats.md)."""

from .elements import ELEMENTS, ElementFormat, decode, encode
from .pack import pack_codes, packed_size, unpack_codes
from .qtensor import QTensor
from .quantize import fake_quantize, quantize_tensor
from .registry import FORMATS, FormatSpec, get_format

__all__ = [
    "ELEMENTS",
    "ElementFormat",
    "FORMATS",
    "FormatSpec",
    "QTensor",
    "decode",
    "encode",
    "fake_quantize",
    "get_format",
    "pack_codes",
    "packed_size",
    "quantize_tensor",
    "unpack_codes",
]
