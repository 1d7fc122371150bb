"""Quality metrics: what quantization costs, measured against the full-precision model.

Decoder (causal LM)
    Compute the full-precision reference once with :func:`decoder_reference`, then
    evaluate as many quantized variants as needed with :func:`compare_decoder`::

        ref = decoder_reference(model, ids)          # full-precision model
        quantize_(model, ...)                         # or a separate quantized copy
        row = compare_decoder(ref, model)             # dict of metrics

    Metrics (QUALITY.md): ``mean_kl`` and ``p99_kl`` of KL(full || quantized) between
    the next-token distributions at every position; ``top1_agreement`` (percent of
    positions where the argmax agrees); ``ppl_ref`` and ``ppl``, perplexity of the
    shifted tokens (``ids[:, 1:]`` predicted from ``ids[:, :-1]``).

    Memory: the reference keeps the full-precision log-probabilities of every
    position in float32 (``n_tokens * vocab * 4`` bytes: 805 MB for 4096 tokens of
    SmolLM2's 49152-token vocabulary). float32 is kept on purpose: bf16/fp16 log-probs
    would put errors of 1e-3..1e-2 nats into every term, which is the size of the
    KL being measured (0.003 for int8). Forward passes run ``batch_size`` sequences
    at a time, so the transient memory is ``batch_size * seq_len * vocab`` floats.

Encoder (embedding model)
    :func:`encode` gives sentence-transformers-style embeddings (mean pooling over the
    attention mask, L2-normalised); :func:`compare_encoder` compares two sets.

Tensors
    :func:`sqnr_db` is the signal-to-quantization-noise ratio of a reconstruction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "DecoderReference",
    "decoder_reference",
    "reference_from_logits",
    "compare_decoder",
    "compare_logits",
    "encode",
    "compare_encoder",
    "sqnr_db",
]


# --------------------------------------------------------------------------- helpers


def _progress(iterable, total: int, desc: str, enabled: bool):
    """Wrap ``iterable`` in a tqdm bar if enabled and tqdm is installed."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are cosmetic; no tqdm -> no bar
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Run a causal LM on ``ids`` [b, T] and return float32 logits [b, T, V]."""
    out = model(input_ids=ids, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)
    return logits.float()


def _check_ids(ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError("ids must be a 2-D LongTensor [n_sequences, seq_len]")
    if ids.dtype != torch.long:
        raise ValueError(f"ids must be torch.long, got {ids.dtype}")
    if ids.shape[1] < 2:
        raise ValueError("sequences need at least 2 tokens (perplexity uses shifted tokens)")
    return ids


# --------------------------------------------------------------------------- decoder


@dataclass
class DecoderReference:
    """Full-precision outputs on a fixed token set, computed once.

    ``logprobs``: float32 ``[n_seq, seq_len, vocab]`` log-softmax of the reference
    logits; ``top1``: its argmax ``[n_seq, seq_len]``; ``ids``: the tokens;
    ``nll``: mean negative log-likelihood (nats) of ``ids[:, 1:]``.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    top1: torch.Tensor
    nll: float

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    @property
    def n_positions(self) -> int:
        return self.ids.numel()

    @property
    def nbytes(self) -> int:
        return self.logprobs.numel() * self.logprobs.element_size()


def _shifted_nll_sum(logprobs: torch.Tensor, ids: torch.Tensor) -> float:
    """Sum over the batch of -log p(ids[:, t+1] | ids[:, :t+1])."""
    tgt = ids[:, 1:].to(logprobs.device).unsqueeze(-1)
    return -logprobs[:, :-1].gather(-1, tgt).sum(dtype=torch.float64).item()


def reference_from_logits(logits: torch.Tensor, ids: torch.Tensor) -> DecoderReference:
    """Build a :class:`DecoderReference` from precomputed logits ``[n, T, V]``."""
    _check_ids(ids)
    if logits.shape[:2] != ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match ids {tuple(ids.shape)}")
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    nll = _shifted_nll_sum(logprobs, ids) / (ids.shape[0] * (ids.shape[1] - 1))
    return DecoderReference(ids=ids, logprobs=logprobs, top1=logprobs.argmax(-1), nll=nll)


@torch.inference_mode()
def decoder_reference(model, ids: torch.Tensor, batch_size: int = 1, progress: bool = True) -> DecoderReference:
    """Run the full-precision ``model`` over ``ids`` [n_seq, seq_len] once.

    The returned reference (float32 log-probs, kept on the model's device) can be
    passed to :func:`compare_decoder` for any number of quantized variants.
    """
    _check_ids(ids)
    device = _model_device(model)
    n, T = ids.shape
    logprobs: Optional[torch.Tensor] = None
    nll_sum = 0.0
    starts = range(0, n, batch_size)
    for s in _progress(starts, len(starts), "reference", progress):
        batch = ids[s : s + batch_size].to(device)
        lp = torch.log_softmax(_logits(model, batch), dim=-1)
        if logprobs is None:
            logprobs = torch.empty((n, T, lp.shape[-1]), dtype=torch.float32, device=lp.device)
        logprobs[s : s + batch.shape[0]] = lp
        nll_sum += _shifted_nll_sum(lp, batch)
        del lp
    nll = nll_sum / (n * (T - 1))
    return DecoderReference(ids=ids.cpu(), logprobs=logprobs, top1=logprobs.argmax(-1), nll=nll)


def _batch_stats(ref_lp: torch.Tensor, ref_top1: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor):
    """Per-position KL(ref || q) [b, T], top-1 agreement [b, T] and the shifted NLL sum."""
    lq = torch.log_softmax(logits.float().to(ref_lp.device), dim=-1)
    # sum_v p (log p - log q), exactly 0 where the distributions are identical
    kl = F.kl_div(lq, ref_lp, reduction="none", log_target=True).sum(-1)
    agree = lq.argmax(-1) == ref_top1
    nll_sum = _shifted_nll_sum(lq, ids)
    return kl, agree, nll_sum


def _summarise(ref: DecoderReference, kl: torch.Tensor, agree: torch.Tensor, nll_sum: float) -> Dict[str, float]:
    kl = kl.double().flatten()
    n, T = ref.ids.shape
    nll = nll_sum / (n * (T - 1))
    return {
        "mean_kl": kl.mean().item(),
        "p99_kl": torch.quantile(kl, 0.99).item(),
        "top1_agreement": 100.0 * agree.double().mean().item(),
        "ppl_ref": ref.ppl,
        "ppl": math.exp(nll),
    }


def compare_logits(ref: DecoderReference, logits: torch.Tensor) -> Dict[str, float]:
    """Metrics of precomputed quantized-model ``logits`` [n, T, V] against ``ref``."""
    if logits.shape != ref.logprobs.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match the reference {tuple(ref.logprobs.shape)}")
    kl, agree, nll_sum = _batch_stats(ref.logprobs, ref.top1, logits, ref.ids)
    return _summarise(ref, kl, agree, nll_sum)


@torch.inference_mode()
def compare_decoder(
    ref: DecoderReference,
    model,
    ids: Optional[torch.Tensor] = None,
    batch_size: int = 1,
    progress: bool = True,
) -> Dict[str, float]:
    """Evaluate a (quantized) causal LM against a precomputed reference.

    ``ids`` defaults to the reference's tokens; if given it must equal them.
    Returns ``dict(mean_kl, p99_kl, top1_agreement, ppl_ref, ppl)``; KL in nats,
    ``top1_agreement`` in percent.
    """
    if ids is not None and not torch.equal(ids.cpu(), ref.ids):
        raise ValueError("ids differ from the tokens the reference was computed on")
    ids = ref.ids
    device = _model_device(model)
    n, T = ids.shape
    kls: List[torch.Tensor] = []
    agrees: List[torch.Tensor] = []
    nll_sum = 0.0
    starts = range(0, n, batch_size)
    for s in _progress(starts, len(starts), "evaluate", progress):
        batch = ids[s : s + batch_size]
        logits = _logits(model, batch.to(device))
        kl, agree, nll = _batch_stats(ref.logprobs[s : s + batch.shape[0]], ref.top1[s : s + batch.shape[0]], logits, batch)
        del logits
        kls.append(kl.cpu())
        agrees.append(agree.cpu())
        nll_sum += nll
    return _summarise(ref, torch.cat(kls), torch.cat(agrees), nll_sum)


# --------------------------------------------------------------------------- encoder


@torch.inference_mode()
def encode(
    model,
    tokenizer,
    paragraphs: Sequence[str],
    max_len: int = 128,
    batch_size: int = 32,
    progress: bool = True,
) -> torch.Tensor:
    """Sentence embeddings ``[n, hidden]`` (float32, CPU), sentence-transformers style.

    Each text is truncated to ``max_len`` tokens; the last hidden state is averaged
    over the attention mask (mean pooling) and L2-normalised.
    """
    texts = list(paragraphs)
    if not texts:
        raise ValueError("no paragraphs to encode")
    device = _model_device(model)
    # batch texts of similar length together (less padding), restore the order after
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = torch.empty(0)
    starts = range(0, len(texts), batch_size)
    for s in _progress(starts, len(starts), "encode", progress):
        idx = order[s : s + batch_size]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        emb = F.normalize(pooled, p=2, dim=-1).cpu()
        if out.numel() == 0:
            out = torch.empty((len(texts), emb.shape[-1]), dtype=torch.float32)
        out[idx] = emb
    return out


def _neighbours(emb: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [n, k] of each row's k nearest other rows by cosine (self excluded)."""
    sim = emb @ emb.T
    sim.fill_diagonal_(-math.inf)
    return sim.topk(k, dim=-1).indices


def compare_encoder(ref_emb: torch.Tensor, emb: torch.Tensor, k: int = 10) -> Dict[str, float]:
    """Compare embeddings ``emb`` of a (quantized) encoder with the reference ones.

    ``mean_cos`` / ``min_cos``: cosine of each embedding to its reference;
    ``top1_neighbor``: percent of items whose nearest other item (by cosine) is the
    same as in the reference; ``recall_at_10``: mean overlap of the ``k`` (10)
    nearest other items, as a fraction.
    """
    if ref_emb.shape != emb.shape or ref_emb.dim() != 2:
        raise ValueError(f"embeddings must be 2-D and the same shape, got {tuple(ref_emb.shape)} and {tuple(emb.shape)}")
    n = ref_emb.shape[0]
    if n < k + 1:
        raise ValueError(f"need more than k={k} items for neighbour metrics, got {n}")
    a = F.normalize(ref_emb.double(), dim=-1)
    b = F.normalize(emb.double(), dim=-1)
    cos = (a * b).sum(-1)
    na, nb = _neighbours(a, k), _neighbours(b, k)
    top1 = (na[:, 0] == nb[:, 0]).double().mean().item()
    overlap = (na.unsqueeze(-1) == nb.unsqueeze(-2)).any(-1).sum(-1).double() / k
    return {
        "mean_cos": cos.mean().item(),
        "min_cos": cos.min().item(),
        "top1_neighbor": 100.0 * top1,
        f"recall_at_{k}": overlap.mean().item(),
    }


# --------------------------------------------------------------------------- tensors


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|x|^2 / |x - x_hat|^2)`` in dB.

    ``inf`` when ``x_hat`` equals ``x`` exactly. Computed in float64.
    """
    if x.shape != x_hat.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(x_hat.shape)}")
    x = x.detach().double()
    err = (x - x_hat.detach().double()).pow(2).sum().item()
    sig = x.pow(2).sum().item()
    if err == 0.0:
        return math.inf
    if sig == 0.0:
        return -math.inf
    return 10.0 * math.log10(sig / err)
