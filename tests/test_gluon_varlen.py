"""The document-aligned Gluon backward's dispatch (kernels/gluon_varlen.py): which inputs it takes, and
that launch_varlen.varlen_backward hands it the right buffers and tile lists. Its kernels run on
Hopper only: tests/gpu/test_gpu_gluon_varlen.py checks them against float64 on the device machine."""

import pytest
import torch

import hf_flex
from hf_flex import mods
from hf_flex.kernels import gluon_varlen, launch, launch_varlen


def test_applies_only_where_the_kernels_run():
    q = torch.randn(1, 4, 300, 128, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 300, 128, dtype=torch.bfloat16)
    assert not gluon_varlen.applies(q, k, k, 128, None)  # not on a CUDA device
    assert gluon_varlen.layout_ok(q, k, k)  # GQA and any S


def test_layout_ok_takes_only_what_the_kernels_are_written_for():
    def t(B=1, H=2, S=300, D=128, dtype=torch.bfloat16, device="cpu"):
        return torch.empty(B, H, S, D, dtype=dtype, device=device)

    q = t(H=4)
    assert gluon_varlen.layout_ok(q, t(), t())
    assert gluon_varlen.layout_ok(t(D=64), t(D=64), t(D=64), (64, 128))
    assert not gluon_varlen.layout_ok(t(D=64), t(D=64), t(D=64), (128,))
    assert not gluon_varlen.layout_ok(t(D=96), t(D=96), t(D=96), (96,))
    assert not gluon_varlen.layout_ok(t(H=3), t(), t())  # 2 key heads do not divide 3 query heads
    assert not gluon_varlen.layout_ok(q, t(S=200), t(S=200))
    assert not gluon_varlen.layout_ok(q, t(dtype=torch.float16), t())
    assert not gluon_varlen.layout_ok(t(dtype=torch.float32), t(dtype=torch.float32), t(dtype=torch.float32))
    def tt(H):  # Transformers' layout: [B, S, H, D] projections seen per head
        return torch.empty(1, 300, H, 128, dtype=torch.bfloat16).transpose(1, 2)

    assert gluon_varlen.layout_ok(tt(4), tt(2), tt(2))
    assert not gluon_varlen.layout_ok(tt(4), t(), t())  # one layout for all three
    assert not gluon_varlen.layout_ok(q, tt(2), tt(2))
    big = t(B=2, H=64, S=131072, D=128, device="meta")
    assert not gluon_varlen.layout_ok(big, big, big)


@pytest.mark.parametrize("knob", [True, False])
def test_varlen_backward_hands_the_gluon_pass_its_buffers(device, monkeypatch, knob):
    """With applies() forced true, the document-aligned backward goes to gluon_varlen.varlen_backward (a
    stand-in here) with lse2, delta (dLSE folded in) and the call's tile lists, and returns its
    gradients; the knob off keeps the Triton kernels."""
    calls = []

    def fake(q, k, v, dout, lse2, delta, tiles, n_tiles, spans, sm_scale, concurrent, warmup=False, programs=None):
        assert not warmup  # (CPU tensors: compile_ahead never starts)
        assert programs == launch.SCHEDULE["gluon_varlen_bwd_tiles"]
        calls.append((lse2.clone(), delta.clone(), tiles, n_tiles, spans, sm_scale))
        return torch.full_like(q, 1.0), torch.full_like(k, 2.0), torch.full_like(v, 3.0)

    monkeypatch.setattr(gluon_varlen, "applies", lambda q, k, v, tile, score_fn, dims: score_fn is None)
    monkeypatch.setattr(gluon_varlen, "varlen_backward", fake)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_varlen", knob)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_varlen_fwd", False)  # (the forward's stand-in is the next test's)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_min_rows", 0)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_varlen_min_group", 1)
    seen = []
    real_tiles = launch_varlen.varlen_tiles

    def tiles_seen(spans, tile):
        seen.append(real_tiles(spans, tile))
        return seen[-1]

    monkeypatch.setattr(hf_flex.autograd, "varlen_tiles", tiles_seen)
    B, H, S, D = 1, 2, 256, 32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=g).to(device).requires_grad_() for _ in range(3))
    do = torch.randn(B, H, S, D, generator=g).to(device)
    ids = torch.zeros(B, S, dtype=torch.int32)
    ids[:, 100:] = 1
    bm = hf_flex.create_block_mask(mods.and_masks(mods.causal(), mods.document(ids.to(device))), B, None, S, S,
                                   device=device)
    out, lse = hf_flex.flex_attention(q, k, v, block_mask=bm, scale=0.25, return_lse=True)
    dlse = torch.randn(B, H, S, generator=g).to(device)
    dq, dk, dv = torch.autograd.grad((out, lse), (q, k, v), (do, dlse))
    assert len(calls) == int(knob)
    if not knob:
        assert not torch.equal(dq, torch.full_like(dq, 1.0))
        return
    assert torch.equal(dq, torch.full_like(dq, 1.0)) and torch.equal(dk, torch.full_like(dk, 2.0))
    lse2, delta, tiles, n_tiles, spans, scale = calls[0]
    assert scale == 0.25 and seen and tiles is seen[-1][0] and n_tiles is seen[-1][1]
    torch.testing.assert_close(spans.cpu(), mods.document_spans(ids).cpu())
    torch.testing.assert_close(lse2.cpu(), (lse.detach() * 1.4426950408889634).cpu(), rtol=1e-5, atol=1e-5)
    want = (do.float() * out.detach().float()).sum(-1) - dlse
    torch.testing.assert_close(delta.cpu(), want.cpu(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("knob", [True, False])
def test_varlen_forward_hands_the_gluon_forward_its_buffers(device, monkeypatch, knob):
    """With applies() forced true, the document-aligned forward of a call without score mod or sink goes
    to gluon_varlen.varlen_forward (a stand-in that runs the Triton forward into the buffers it is given)
    with an output in q's layout, the LSE buffer the backward reads, the call's tile lists and the
    scale; the result and the gradients are the Triton path's. The knob off, a score mod, or a call
    gluon_allowed refuses (fewer rows than gluon_min_rows) keep the Triton forward."""
    calls = []
    real_forward = launch_varlen.varlen_forward
    seen = []
    real_tiles = launch_varlen.varlen_tiles

    def tiles_seen(spans, tile):
        seen.append(real_tiles(spans, tile))
        return seen[-1]

    def fake(q, k, v, out, lse2, tiles, n_tiles, spans, sm_scale, warmup=False):
        assert not warmup
        calls.append((out.stride() == launch.out_like(q, v.shape[-1]).stride(), lse2.shape, tiles, n_tiles, sm_scale))
        with monkeypatch.context() as m:
            m.setitem(launch.SCHEDULE, "gluon_varlen_fwd", False)
            o, l2 = real_forward(q, k, v, tiles, n_tiles, spans, 128, None, (), None, sm_scale)
        out.copy_(o)
        lse2.copy_(l2)

    monkeypatch.setattr(hf_flex.autograd, "varlen_tiles", tiles_seen)
    monkeypatch.setattr(gluon_varlen, "applies", lambda q, k, v, tile, score_fn, dims: score_fn is None)
    monkeypatch.setattr(gluon_varlen, "varlen_forward", fake)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_varlen_fwd", knob)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_varlen", False)
    B, HQ, HKV, S, D = 1, 4, 2, 256, 32
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, S, HQ, D, generator=g).to(device).transpose(1, 2)  # Transformers' layout
    k, v = (torch.randn(B, S, HKV, D, generator=g).to(device).transpose(1, 2) for _ in range(2))
    ids = torch.zeros(B, S, dtype=torch.int32)
    ids[:, 70:] = 1
    mm = mods.and_masks(mods.causal(), mods.document(ids.to(device)))
    bm = hf_flex.create_block_mask(mm, B, None, S, S, device=device)
    ref = hf_flex.reference.attention(q.double(), k.double(), v.double(), None, mm, scale=0.25, enable_gqa=True)
    for min_rows, score_mod, expect in ((0, None, knob), (0, mods.softcap(30.0), False), (B * HQ * S + 1, None, False)):
        monkeypatch.setitem(launch.SCHEDULE, "gluon_min_rows", min_rows)
        calls.clear()
        leaves = tuple(t.detach().requires_grad_() for t in (q, k, v))
        out = hf_flex.flex_attention(*leaves, score_mod, block_mask=bm, scale=0.25, enable_gqa=True)
        assert len(calls) == int(expect)
        if score_mod is None:
            torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
        if expect:
            layout_ok, lse_shape, tiles, n_tiles, scale = calls[0]
            assert layout_ok and lse_shape == (B, HQ, S) and scale == 0.25
            assert tiles is seen[-1][0] and n_tiles is seen[-1][1]
            grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
            assert all(torch.isfinite(x).all() for x in grads)


def test_min_group_keeps_the_triton_kernels_for_small_groups(device, monkeypatch):
    """gluon_varlen_min_group: query-head groups smaller than it keep the Triton kernels."""
    calls = []
    monkeypatch.setattr(gluon_varlen, "applies", lambda q, k, v, tile, score_fn, dims: True)
    monkeypatch.setattr(gluon_varlen, "varlen_backward", lambda q, k, v, *a, **kw: calls.append(q.shape[1]) or (
        torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)))
    monkeypatch.setitem(launch.SCHEDULE, "gluon_varlen", True)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_varlen_fwd", False)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_min_rows", 0)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_varlen_min_group", 2)
    S, D = 256, 32
    ids = torch.zeros(1, S, dtype=torch.int32)
    ids[:, 90:] = 1
    bm = hf_flex.create_block_mask(mods.and_masks(mods.causal(), mods.document(ids.to(device))), 1, None, S, S,
                                   device=device)
    for hq, hkv in ((2, 2), (4, 2)):
        q = torch.randn(1, hq, S, D, device=device, requires_grad=True)
        k, v = (torch.randn(1, hkv, S, D, device=device, requires_grad=True) for _ in range(2))
        out = hf_flex.flex_attention(q, k, v, block_mask=bm, enable_gqa=hq != hkv)
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert calls == [4]
