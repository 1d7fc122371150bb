"""lowbit.eval: what quantization costs in quality, on bundled real models and text.

- :mod:`lowbit.eval.models`: ``load_model("smollm2" | "minilm")``
- :mod:`lowbit.eval.corpus`: ``topics_split()``, ``token_sequences()``, ``paragraphs()``
- :mod:`lowbit.eval.metrics`: decoder KL / top-1 / perplexity against a reference
  computed once, encoder embedding cosine and neighbour agreement, ``sqnr_db``

Importing this package needs only torch; transformers is imported when a model is
loaded. It does not depend on :mod:`lowbit.formats`.
"""

from .corpus import paragraphs, read_text_file, token_sequences, topics_split
from .metrics import (
    DecoderReference,
    compare_decoder,
    compare_encoder,
    compare_logits,
    decoder_reference,
    encode,
    reference_from_logits,
    sqnr_db,
)
from .models import MODELS, BundledModel, load_model, model_files

__all__ = [
    "BundledModel",
    "MODELS",
    "load_model",
    "model_files",
    "topics_split",
    "token_sequences",
    "paragraphs",
    "read_text_file",
    "DecoderReference",
    "decoder_reference",
    "reference_from_logits",
    "compare_decoder",
    "compare_logits",
    "encode",
    "compare_encoder",
    "sqnr_db",
]
