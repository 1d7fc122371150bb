import math
from types import SimpleNamespace

import pytest
import torch

from lowbit.eval.metrics import (
    compare_decoder,
    compare_encoder,
    compare_logits,
    decoder_reference,
    encode,
    reference_from_logits,
    sqnr_db,
)


# --------------------------------------------------------------------------- decoder


def _kl64(ref_logits, q_logits):
    p = torch.softmax(ref_logits.double(), -1)
    return (p * (torch.log_softmax(ref_logits.double(), -1) - torch.log_softmax(q_logits.double(), -1))).sum(-1)


def test_identical_distributions():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7) * 3
    ids = torch.randint(0, 7, (2, 5))
    ref = reference_from_logits(logits, ids)
    m = compare_logits(ref, logits.clone())
    assert m["mean_kl"] == 0.0 and m["p99_kl"] == 0.0
    assert m["top1_agreement"] == 100.0
    assert m["ppl"] == m["ppl_ref"]


def test_two_token_case_by_hand():
    # one sequence of two tokens, vocab of 3
    ref_logits = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]]])
    q_logits = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 0.5, 3.0]]])
    ids = torch.tensor([[0, 2]])
    ref = reference_from_logits(ref_logits, ids)
    m = compare_logits(ref, q_logits)

    # by hand in float64
    def softmax(z):
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]

    kls = []
    for zr, zq in zip(ref_logits[0].tolist(), q_logits[0].tolist()):
        p, q = softmax(zr), softmax(zq)
        kls.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
    assert m["mean_kl"] == pytest.approx(sum(kls) / 2, rel=1e-6)
    # numpy-style linear interpolation between the two values
    lo, hi = sorted(kls)
    assert m["p99_kl"] == pytest.approx(lo + 0.99 * (hi - lo), rel=1e-6)
    # argmax: position 0 ref=0 vs q=1 (disagree), position 1: 2 vs 2 (agree)
    assert m["top1_agreement"] == pytest.approx(50.0)
    # perplexity: the single shifted token is ids[0, 1] = 2, predicted at position 0
    assert m["ppl_ref"] == pytest.approx(1 / softmax(ref_logits[0, 0].tolist())[2], rel=1e-6)
    assert m["ppl"] == pytest.approx(1 / softmax(q_logits[0, 0].tolist())[2], rel=1e-6)


def test_random_against_float64():
    torch.manual_seed(1)
    ref_logits = torch.randn(3, 16, 50) * 4
    q_logits = ref_logits + 0.3 * torch.randn_like(ref_logits)
    ids = torch.randint(0, 50, (3, 16))
    m = compare_logits(reference_from_logits(ref_logits, ids), q_logits)
    kl = _kl64(ref_logits, q_logits).flatten()
    assert m["mean_kl"] == pytest.approx(kl.mean().item(), rel=1e-5)
    assert m["p99_kl"] == pytest.approx(torch.quantile(kl, 0.99).item(), rel=1e-5)
    top1 = (ref_logits.argmax(-1) == q_logits.argmax(-1)).double().mean().item() * 100
    assert m["top1_agreement"] == pytest.approx(top1)
    nll = -torch.log_softmax(q_logits.double(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).mean().item()
    assert m["ppl"] == pytest.approx(math.exp(nll), rel=1e-6)
    assert m["mean_kl"] > 0


class _TableLM(torch.nn.Module):
    """A causal 'LM' whose logits at each position depend on the current token and
    the previous one, so batching mistakes would show."""

    def __init__(self, vocab=11, seed=0, noise=0.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g) * 2)
        self.b = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g) + noise * torch.randn(vocab, vocab, generator=g))

    def forward(self, input_ids, use_cache=False):
        prev = torch.cat([input_ids[:, :1], input_ids[:, :-1]], dim=1)
        return SimpleNamespace(logits=self.a[input_ids] + self.b[prev])


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_model_path_matches_logits_path(batch_size):
    torch.manual_seed(2)
    ids = torch.randint(0, 11, (5, 9))
    full, quant = _TableLM(seed=3), _TableLM(seed=3, noise=0.0)
    with torch.no_grad():
        quant.b.add_(0.2 * torch.randn_like(quant.b))
    ref = decoder_reference(full, ids, batch_size=batch_size, progress=False)
    with torch.no_grad():
        ref_direct = reference_from_logits(full(ids).logits, ids)
        q_logits = quant(ids).logits
    torch.testing.assert_close(ref.logprobs, ref_direct.logprobs)
    assert ref.nll == pytest.approx(ref_direct.nll, rel=1e-6)
    assert ref.logprobs.dtype == torch.float32 and ref.nbytes == 5 * 9 * 11 * 4
    m = compare_decoder(ref, quant, ids, batch_size=batch_size, progress=False)
    expected = compare_logits(ref_direct, q_logits)
    for k in expected:
        assert m[k] == pytest.approx(expected[k], rel=1e-5, abs=1e-9), k
    same = compare_decoder(ref, full, batch_size=batch_size, progress=False)
    assert same["mean_kl"] == 0.0 and same["top1_agreement"] == 100.0


def test_compare_decoder_rejects_other_ids():
    ids = torch.randint(0, 11, (2, 4))
    ref = decoder_reference(_TableLM(), ids, progress=False)
    with pytest.raises(ValueError, match="ids differ"):
        compare_decoder(ref, _TableLM(), ids + 1, progress=False)


def test_reference_input_checks():
    with pytest.raises(ValueError, match="2-D"):
        decoder_reference(_TableLM(), torch.zeros(8, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        reference_from_logits(torch.zeros(1, 1, 3), torch.zeros(1, 1, dtype=torch.long))


# --------------------------------------------------------------------------- encoder


def test_compare_encoder_identical():
    torch.manual_seed(3)
    e = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
    m = compare_encoder(e, e.clone())
    assert m["mean_cos"] == pytest.approx(1.0) and m["min_cos"] == pytest.approx(1.0)
    assert m["top1_neighbor"] == 100.0 and m["recall_at_10"] == 1.0


def _circle(angles):
    a = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([torch.cos(a), torch.sin(a)], dim=-1)


def test_compare_encoder_constructed():
    # points on the unit circle at angles 0, 1, 3, 6 (radians*0.1)
    ref = _circle([0.0, 0.1, 0.3, 0.6])
    # move point 3 from 0.6 to 0.25: cos(0.35) to its reference
    emb = _circle([0.0, 0.1, 0.3, 0.25])
    m = compare_encoder(ref, emb, k=2)
    cos = [1.0, 1.0, 1.0, math.cos(0.35)]
    assert m["mean_cos"] == pytest.approx(sum(cos) / 4)
    assert m["min_cos"] == pytest.approx(math.cos(0.35))
    # reference nearest: 0->1, 1->0, 2->1 (0.2 vs 0.3), 3->2
    # quantized nearest: 0->1, 1->0, 2->3 (0.05),        3->2
    assert m["top1_neighbor"] == pytest.approx(75.0)
    # 2 nearest, ref: 0:{1,2} 1:{0,2} 2:{1,3} 3:{2,1}
    #        quant:   0:{1,3} 1:{0,3} 2:{3,1} 3:{2,1}  -> overlaps 1,1,2,2 of 2
    assert m["recall_at_2"] == pytest.approx((0.5 + 0.5 + 1 + 1) / 4)


def test_compare_encoder_normalises_and_checks():
    ref = _circle([0.0, 0.1, 0.3, 0.6])
    assert compare_encoder(ref, 3.0 * ref, k=2)["min_cos"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same shape"):
        compare_encoder(ref, ref[:3], k=2)
    with pytest.raises(ValueError, match="more than k"):
        compare_encoder(ref, ref, k=10)


class _Tok:
    """Tokenizer stand-in: words -> ids 1..; pads with 0 and a mask."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        rows = [[len(w) for w in t.split()][:max_length] for t in texts]
        n = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}


class _Enc(torch.nn.Module):
    def __init__(self):
        super().__init__()
        w = torch.zeros(20, 3)
        w[0] = 1e6  # padding would dominate if the mask were ignored
        w[1:, 0] = torch.arange(1, 20, dtype=torch.float32)
        w[1:, 1] = 1.0
        self.emb = torch.nn.Parameter(w)

    def forward(self, input_ids, attention_mask, **_):
        return SimpleNamespace(last_hidden_state=self.emb[input_ids])


def test_encode_mean_pooling_over_mask():
    texts = ["a bb ccc", "dddd", "a a a a a a"]
    e = encode(_Enc(), _Tok(), texts, max_len=4, batch_size=2, progress=False)
    assert e.shape == (3, 3) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    expected = torch.nn.functional.normalize(
        torch.tensor([[2.0, 1.0, 0.0], [4.0, 1.0, 0.0], [1.0, 1.0, 0.0]]), dim=-1
    )
    torch.testing.assert_close(e, expected)


# --------------------------------------------------------------------------- sqnr


def test_sqnr_db():
    x = torch.tensor([3.0, 4.0])
    assert sqnr_db(x, x.clone()) == math.inf
    assert sqnr_db(x, torch.tensor([3.0, 3.0])) == pytest.approx(10 * math.log10(25.0))
    assert sqnr_db(torch.zeros(2), torch.ones(2)) == -math.inf
    w = torch.randn(64, 64, dtype=torch.float64)
    assert sqnr_db(w, w * 1.01) == pytest.approx(40.0)
    with pytest.raises(ValueError, match="shapes"):
        sqnr_db(x, x[:1])
