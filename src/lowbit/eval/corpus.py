"""Bundled evaluation text: the Python documentation topics in the standard library.

``pydoc_data.topics`` (about 465k characters of English technical prose) is on every
machine that has Python, so quality numbers can be reproduced anywhere without
downloads. The topics are split by sorted key into a calibration half and a disjoint
evaluation half, exactly as the reference measurements in QUALITY.md were made:

- ``sorted(pydoc_data.topics.topics)`` keys; the first ``len // 2`` keys are the
  calibration half, the rest the evaluation half;
- each half is the topic texts joined with blank lines (``"\\n\\n"``).

The text depends on the Python version (the topics follow the documentation of the
running interpreter); the reference numbers were measured on Python 3.11.
"""

from __future__ import annotations

import os
from typing import List, Tuple

import torch

__all__ = ["topics_split", "token_sequences", "paragraphs", "read_text_file"]

_SEPARATOR = "\n\n"


def _topic_halves() -> Tuple[List[str], List[str]]:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    half = len(keys) // 2
    return keys[:half], keys[half:]


def topics_split() -> Tuple[str, str]:
    """Return ``(calibration_text, evaluation_text)`` from ``pydoc_data.topics``.

    Deterministic and disjoint: the two halves share no topic.
    """
    from pydoc_data.topics import topics

    calib_keys, eval_keys = _topic_halves()
    calibration = _SEPARATOR.join(topics[k] for k in calib_keys)
    evaluation = _SEPARATOR.join(topics[k] for k in eval_keys)
    return calibration, evaluation


def token_sequences(tokenizer, text: str, n_tokens: int = 4096, seq_len: int = 512) -> torch.Tensor:
    """Tokenize ``text`` once and cut its first ``n_tokens`` tokens into rows.

    Returns a ``torch.long`` tensor of shape ``[n_tokens // seq_len, seq_len]``.
    No special tokens (BOS/EOS) are added: the sequences are plain slices of the
    tokenized text (this is the set-up that gives SmolLM2's reference perplexity
    of 18.05 in QUALITY.md). Raises ``ValueError`` if the text is too short.
    """
    if seq_len <= 0 or n_tokens < seq_len:
        raise ValueError(f"need n_tokens >= seq_len > 0, got n_tokens={n_tokens}, seq_len={seq_len}")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    n_seq = n_tokens // seq_len
    need = n_seq * seq_len
    if len(ids) < need:
        raise ValueError(
            f"text has only {len(ids)} tokens, need {need} ({n_seq} sequences of {seq_len}); "
            "use a longer text or lower n_tokens"
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(n_seq, seq_len)


def paragraphs(text: str, min_chars: int = 80, limit: int = 512) -> List[str]:
    """Split ``text`` on blank lines into paragraphs for the encoder evaluation.

    Each paragraph is stripped of surrounding whitespace; only those longer than
    ``min_chars`` characters are kept, in order of appearance, at most ``limit``
    of them (``limit=None`` keeps all). Repeated paragraphs are kept: this is the
    set-up of the QUALITY.md encoder numbers (the evaluation half gives 512
    paragraphs, 469 distinct).
    """
    out: List[str] = []
    for block in text.split(_SEPARATOR):
        block = block.strip()
        if len(block) > min_chars:
            out.append(block)
            if limit is not None and len(out) >= limit:
                break
    return out


def read_text_file(path) -> str:
    """Read a user's own evaluation text (UTF-8) with clear errors."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"text file not found: {path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"not a regular file: {path!r}")
    with open(path, "r", encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"text file is empty: {path!r}")
    return text
