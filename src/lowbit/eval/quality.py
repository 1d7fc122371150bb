"""Recipes on a bundled model, measured against its full-precision self.

    ev = prepare("smollm2")                 # loads the model, data, reference once
    row = evaluate(ev, "a16w4-int-g128")    # quantized copy -> metrics row
    row = evaluate(ev, "a16w4-int-g64-gptq")  # calibrated methods use ev's calibration data

Calibration data (for -awq, -gptq, -smooth) comes from the calibration half of
pydoc_data.topics, disjoint from the evaluation half, unless ``calibration_text`` is
given: a decoder gets consecutive slices of ``calibration_len`` tokens (at most
``calibration_seqs`` of them), an encoder the text's paragraphs (more than 80
characters, at most ``calibration_seqs``, tokenized with special tokens, at most 128
tokens each).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..table import format_table
from .corpus import paragraphs, read_text_file, token_sequences, topics_split
from .metrics import compare_decoder, compare_encoder, decoder_reference, encode
from .models import BundledModel, load_model

DEMO_RECIPES = ("a16w8-int8", "a8w8-fp8", "a16w4-int-g64", "a16w4-mxfp4", "a16w4-nvfp4", "a4w4-nvfp4")


@dataclass
class Evaluation:
    bundled: BundledModel
    data: Any  # decoder: LongTensor [n, seq_len]; encoder: list of paragraphs
    reference: Any  # decoder: DecoderReference; encoder: embeddings [n, d]
    text_source: str
    batch_size: int
    calibration: Any = None  # token ids for calibrated methods (LongTensor [n, T] or a list of [1, T])
    calibration_source: str = ""


def calibration_data(bundled: BundledModel, text: str, n_seqs: int = 128, seq_len: int = 512):
    """Calibration ids from ``text``: decoder LongTensor [n, seq_len]; encoder a list of
    [1, T] paragraphs (special tokens added, at most 128 tokens)."""
    from ..quant.calibration import calibration_ids

    if bundled.kind == "decoder":
        return calibration_ids(bundled.tokenizer, text, n_seqs=n_seqs, seq_len=seq_len)
    paras = paragraphs(text, limit=n_seqs)
    if not paras:
        raise ValueError("the calibration text has no paragraph longer than 80 characters")
    return [bundled.tokenizer(p, truncation=True, max_length=128, return_tensors="pt")["input_ids"] for p in paras]


def prepare(
    model: str = "smollm2",
    text_file: str | None = None,
    n_tokens: int = 4096,
    seq_len: int = 512,
    n_paragraphs: int = 512,
    batch_size: int = 4,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    calibration_text: str | None = None,
    calibration_seqs: int = 128,
    calibration_len: int = 512,
) -> Evaluation:
    """Load a bundled model and its evaluation data, and run the full-precision reference once.

    The text is the evaluation half of pydoc_data.topics unless ``text_file`` is given;
    the calibration data the calibration half unless ``calibration_text`` (a file) is given.
    """
    bundled = load_model(model, dtype=dtype)
    if text_file:
        text, source = read_text_file(text_file), text_file
    else:
        text, source = topics_split()[1], "pydoc_data.topics, evaluation half"
    if bundled.kind == "decoder":
        data = token_sequences(bundled.tokenizer, text, n_tokens=n_tokens, seq_len=seq_len)
        ref = decoder_reference(bundled.model, data, batch_size=batch_size, progress=progress)
    else:
        data = paragraphs(text, limit=n_paragraphs)
        ref = encode(bundled.model, bundled.tokenizer, data, progress=progress)
    if calibration_text:
        cal_text, cal_source = read_text_file(calibration_text), calibration_text
    else:
        cal_text, cal_source = topics_split()[0], "pydoc_data.topics, calibration half"
    calib = calibration_data(bundled, cal_text, calibration_seqs, calibration_len)
    n_cal = len(calib) if isinstance(calib, list) else calib.shape[0]
    n_tok = sum(c.numel() for c in calib) if isinstance(calib, list) else calib.numel()
    cal_source = f"{cal_source}: {n_cal} sequences, {n_tok} tokens"
    return Evaluation(bundled, data, ref, source, batch_size, calib, cal_source)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, shared storage counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


def evaluate(
    ev: Evaluation,
    recipe: str,
    weight_options: dict | None = None,
    progress: bool = True,
    return_model: bool = False,
    method_options: dict | None = None,
):
    """Quantize a copy of the model with ``recipe`` and measure it. Returns a row dict
    (and the quantized model when ``return_model``). Calibrated methods use
    ``ev.calibration``."""
    from ..nn import parse_recipe, quantize_

    t0 = time.perf_counter()
    needs = parse_recipe(recipe).needs_calibration
    model = copy.deepcopy(ev.bundled.model)
    report = quantize_(model, recipe, weight_options=weight_options, progress=progress,
                       calibration=ev.calibration if needs else None, method_options=method_options)
    t_quant = time.perf_counter() - t0
    originals = dict(ev.bundled.model.named_modules())
    signal = noise = 0.0
    layer_sqnr = {}
    for name, module in model.named_modules():
        if hasattr(module, "qweight"):
            w = originals[name].weight.detach().float()
            err = (w - module.effective_weight()).double().pow(2).sum().item()
            sig = w.double().pow(2).sum().item()
            signal, noise = signal + sig, noise + err
            layer_sqnr[name] = 10 * torch.log10(torch.tensor(sig / err)).item() if err else float("inf")
    row = {
        "model": ev.bundled.name,
        "recipe": report.recipe,
        "bits_per_weight": report.bits_per_weight,
        "size_mib": model_bytes(model) / 2**20,
        "weight_sqnr_db": 10 * torch.log10(torch.tensor(signal / noise)).item() if noise else float("inf"),
        "layers_replaced": len(report.replaced),
        "layers_skipped": len(report.skipped),
        "method": parse_recipe(recipe).method,
        "quantize_seconds": t_quant,
    }
    if needs:
        row["calibration"] = {**report.calibration, "source": ev.calibration_source}
    if method_options:
        row["method_options"] = method_options
    if ev.bundled.kind == "decoder":
        row.update(compare_decoder(ev.reference, model, batch_size=ev.batch_size, progress=progress))
    else:
        emb = encode(model, ev.bundled.tokenizer, ev.data, progress=progress)
        row.update(compare_encoder(ev.reference, emb))
    row["seconds"] = time.perf_counter() - t0
    row["layer_sqnr_db"] = layer_sqnr
    return (row, model) if return_model else row


def baseline_row(ev: Evaluation) -> dict:
    """The full-precision model's own row (for the table's first line)."""
    m = ev.bundled.model
    dtype_bits = 8 * next(m.parameters()).element_size()
    row = {"model": ev.bundled.name, "recipe": f"full ({str(next(m.parameters()).dtype)[6:]})",
           "bits_per_weight": float(dtype_bits), "size_mib": model_bytes(m) / 2**20, "weight_sqnr_db": float("inf")}
    if ev.bundled.kind == "decoder":
        row.update(mean_kl=0.0, p99_kl=0.0, top1_agreement=100.0, ppl=ev.reference.ppl, ppl_ref=ev.reference.ppl)
    else:
        row.update(mean_cos=1.0, min_cos=1.0, top1_neighbor=100.0, recall_at_10=1.0)
    return row


def format_rows(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    sq = lambda v: "inf" if v == float("inf") else f"{v:.1f}"  # noqa: E731
    if "mean_kl" in rows[0]:
        headers = ["recipe", "bits/w", "size MiB", "mean KL", "p99 KL", "top-1 %", "ppl", "w SQNR dB"]
        body = [[r["recipe"], f"{r['bits_per_weight']:.2f}", f"{r['size_mib']:.0f}", f"{r['mean_kl']:.4f}",
                 f"{r['p99_kl']:.3f}", f"{r['top1_agreement']:.2f}", f"{r['ppl']:.2f}", sq(r["weight_sqnr_db"])]
                for r in rows]
    else:
        headers = ["recipe", "bits/w", "size MiB", "mean cos", "min cos", "top-1 nbr %", "recall@10", "w SQNR dB"]
        body = [[r["recipe"], f"{r['bits_per_weight']:.2f}", f"{r['size_mib']:.0f}", f"{r['mean_cos']:.5f}",
                 f"{r['min_cos']:.4f}", f"{r['top1_neighbor']:.2f}", f"{r['recall_at_10']:.3f}", sq(r["weight_sqnr_db"])]
                for r in rows]
    return format_table(headers, body, "l" + "r" * (len(headers) - 1))
