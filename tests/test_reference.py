"""The oracle itself: hf_flex.reference.attention against torch's SDPA and hand-written eager attention.

All in float64 on the CPU. SDPA gets the explicit dense bool mask from reference.dense_mask (and
repeated k/v for GQA); score mods are checked against eager formulas written here. The reference's
chunking (small ``max_elements``, so several checkpointed query slabs) must give the same output, lse
and gradients as one slab.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hf_flex import mods, reference
from helpers import make_param, random_doc_ids

TOL = dict(rtol=1e-10, atol=1e-10)


def _qkv(B, Hq, Hkv, Sq, Skv, D, Dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    return mk(B, Hq, Sq, D), mk(B, Hkv, Skv, D), mk(B, Hkv, Skv, Dv)


def _grads(outs, inputs, seed=9):
    g = torch.Generator().manual_seed(seed)
    gos = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    return torch.autograd.grad(outs, inputs, gos)


def _mask(name, B, S):
    return {
        "causal": lambda: mods.causal(),
        "sliding": lambda: mods.and_masks(mods.causal(), mods.sliding_window(9)),
        "document": lambda: mods.and_masks(mods.causal(), mods.document(random_doc_ids(B, S, seed=4))),
        "bidirectional_document": lambda: mods.document(random_doc_ids(B, S, seed=5)),
        "prefix_lm": lambda: mods.prefix_lm(13),
    }[name]()


@pytest.mark.parametrize("name", ["causal", "sliding", "document", "bidirectional_document", "prefix_lm"])
@pytest.mark.parametrize("Hkv", [4, 2, 1])
def test_matches_sdpa(name, Hkv):
    B, Hq, S, D = 2, 4, 37, 16
    q, k, v = _qkv(B, Hq, Hkv, S, S, D, seed=Hkv)
    mm = _mask(name, B, S)
    out, lse = reference.attention(q, k, v, None, mm, enable_gqa=Hkv != Hq, return_lse=True)
    dense = reference.dense_mask(mm, B, Hq, S, S)
    assert dense.any(-1).all(), "test setup: SDPA gives NaN on fully masked rows"
    kr, vr = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (k, v))
    ref = F.scaled_dot_product_attention(q, kr, vr, attn_mask=dense)
    torch.testing.assert_close(out, ref, **TOL)
    s = (q @ kr.transpose(-1, -2)) / math.sqrt(D)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s.masked_fill(~dense, -math.inf), -1), rtol=1e-6, atol=1e-6)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(_grads([out], (q, k, v)), _grads([ref], (q, k, v)), **TOL)


def test_matches_sdpa_scale_and_dv():
    q, k, v = _qkv(1, 2, 2, 20, 33, 16, Dv=24, seed=3)
    mm = mods.offset(mods.causal(), 13, 0)
    out = reference.attention(q, k, v, None, mm, scale=0.3)
    dense = reference.dense_mask(mm, 1, 2, 20, 33)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=0.3)
    assert out.shape == (1, 2, 20, 24)
    torch.testing.assert_close(out, ref, **TOL)


def _eager(q, k, v, bias_fn, dense, sink=None, scale=None):
    """Plain softmax attention with an additive / elementwise score function and an optional sink column."""
    D = q.shape[-1]
    s = (q @ k.transpose(-1, -2)) * (scale or 1 / math.sqrt(D))
    s = bias_fn(s)
    s = s.masked_fill(~dense, -math.inf)
    if sink is not None:
        B, H, Sq, _ = s.shape
        s = torch.cat([s, sink.view(1, H, 1, 1).expand(B, H, Sq, 1)], -1)
    p = torch.softmax(s, -1)
    if sink is not None:
        p = p[..., :-1]
    return p @ v, torch.logsumexp(s, -1)


@pytest.mark.parametrize("score", ["softcap", "alibi", "relative_bias", "sinks", "chain"])
def test_score_mods_match_eager(score):
    B, H, S, D = 1, 3, 29, 16
    q, k, v = _qkv(B, H, H, S, S, D, seed=7)
    qi = torch.arange(S).view(S, 1)
    ki = torch.arange(S).view(1, S)
    slopes = make_param((H,), 1, 0.3).double().detach().requires_grad_()
    L = 6
    table = make_param((H, 2 * L - 1), 2).double().detach().requires_grad_()
    sink = make_param((H,), 3).double().detach().requires_grad_()
    rel = lambda s: s + table[torch.arange(H).view(H, 1, 1), (ki - qi + L - 1).clamp(0, 2 * L - 2)]  # noqa: E731
    cases = {
        "softcap": (mods.softcap(1.5), lambda s: 1.5 * torch.tanh(s / 1.5), None, []),
        "alibi": (mods.alibi(slopes), lambda s: s + slopes.view(1, H, 1, 1) * (ki - qi), None, [slopes]),
        "relative_bias": (mods.relative_bias(table), rel, None, [table]),
        "sinks": (mods.sinks(sink), lambda s: s, sink, [sink]),
        "chain": (
            mods.chain(mods.relative_bias(table), mods.softcap(2.0), mods.sinks(sink)),
            lambda s: 2.0 * torch.tanh(rel(s) / 2.0),
            sink,
            [table, sink],
        ),
    }
    sm, fn, sk, params = cases[score]
    dense = reference.dense_mask(mods.causal(), B, H, S, S)
    out, lse = reference.attention(q, k, v, sm, mods.causal(), return_lse=True)
    ref, ref_lse = _eager(q, k, v, fn, dense, sk)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-6)
    ins = (q, k, v, *params)
    torch.testing.assert_close(_grads([out], ins), _grads([ref], ins), **TOL)


def test_fully_masked_rows():
    """out 0, lse -inf, finite gradients (zero for the empty rows); with a sink, lse = sink."""
    q, k, v = _qkv(2, 2, 2, 24, 24, 16, seed=11)
    valid = torch.ones(2, 24, dtype=torch.bool)
    valid[1] = False
    mm = mods.and_masks(mods.offset(mods.causal(), 0, 5), mods.padding(valid))
    out, lse = reference.attention(q, k, v, None, mm, return_lse=True)
    empty = ~reference.dense_mask(mm, 2, 2, 24, 24).any(-1)
    assert empty[0, :, :5].all() and empty[1].all() and not empty[0, :, 5:].any()
    assert (out[empty] == 0).all() and torch.isneginf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()
    dq, dk, dv = _grads([out, torch.where(empty, torch.zeros_like(lse), lse)], (q, k, v))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert (dq[empty] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    sink = torch.tensor([0.5, -1.0], dtype=torch.float64)
    out, lse = reference.attention(q, k, v, mods.sinks(sink), mm, return_lse=True)
    assert (out[empty] == 0).all()
    torch.testing.assert_close(lse[empty].double(), sink.view(1, 2, 1).expand(2, 2, 24)[empty])


@pytest.mark.parametrize("score", [None, "chain"])
def test_chunking_matches_single_slab(score):
    """max_elements small enough for several (checkpointed) slabs: same out, lse and gradients."""
    B, H, S, D = 2, 2, 45, 16
    q, k, v = _qkv(B, H, 1, S, S, D, seed=13)
    params = []
    sm = None
    if score == "chain":
        table = make_param((H, 9), 4).double().detach().requires_grad_()
        sink = make_param((H,), 5).double().detach().requires_grad_()
        sm = mods.chain(mods.softcap(3.0), mods.relative_bias(table), mods.sinks(sink))
        params = [table, sink]
    mm = mods.and_masks(mods.causal(), mods.document(random_doc_ids(B, S, seed=6)))
    ins = (q, k, v, *params)
    res = []
    for max_elements in (1 << 25, B * H * S * 7, 1):  # one slab; 7 rows per slab; 1 row per slab
        out, lse = reference.attention(q, k, v, sm, mm, enable_gqa=True, return_lse=True, max_elements=max_elements)
        res.append((out, lse) + _grads([out, lse], ins))
    for other in res[1:]:
        for a, b in zip(res[0], other):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_mask_bh_broadcast():
    """mask_bh = (1, 1): the mask_mod sees b = 0 and h = 0 for every batch row and head."""
    q, k, v = _qkv(2, 2, 2, 20, 20, 16, seed=15)
    ids = torch.stack([random_doc_ids(1, 20, seed=8)[0], torch.zeros(20, dtype=torch.int32)])
    mm = mods.document(ids)
    out_b = reference.attention(q, k, v, None, mm, mask_bh=(1, 1))
    row0 = mods.document(ids[:1].expand(2, 20).contiguous())
    torch.testing.assert_close(out_b, reference.attention(q, k, v, None, row0), **TOL)
    assert not torch.allclose(out_b, reference.attention(q, k, v, None, mm))


def test_dense_mask():
    mm = mods.and_masks(mods.causal(), mods.sliding_window(3))
    m = reference.dense_mask(mm, 2, 3, 5, 6)
    assert m.shape == (2, 3, 5, 6) and m.dtype == torch.bool
    qi, ki = torch.arange(5).view(5, 1), torch.arange(6).view(1, 6)
    assert torch.equal(m[1, 2], (ki <= qi) & (qi - 3 < ki))
    assert reference.dense_mask(None, 1, 1, 2, 3).all()


def test_gqa_needs_enable_gqa():
    q, k, v = _qkv(1, 4, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="enable_gqa"):
        reference.attention(q, k, v)


def test_tolerance_helper_can_fail():
    """helpers.assert_close_to_fp64 rejects NaN, a wrong infinity and an error over the bound."""
    from helpers import assert_close_to_fp64

    hi = torch.tensor([1.0, -2.0, float("-inf")], dtype=torch.float64)
    lo = (hi + torch.tensor([1e-3, 0.0, 0.0], dtype=torch.float64)).half()  # baseline error 1e-3
    assert_close_to_fp64("ok", hi.float() + torch.tensor([1.9e-3, 0, 0]), lo, hi, fudge=2.0, dtype=torch.float32)
    with pytest.raises(AssertionError, match="kernel max abs err"):
        assert_close_to_fp64("big", hi.float() + torch.tensor([3e-3, 0, 0]), lo, hi, fudge=2.0, dtype=torch.float32)
    with pytest.raises(AssertionError, match="NaN"):
        assert_close_to_fp64("nan", torch.tensor([1.0, float("nan"), float("-inf")]), lo, hi)
    with pytest.raises(AssertionError, match="inf"):
        assert_close_to_fp64("inf", torch.tensor([1.0, -2.0, 0.0]), lo, hi)
