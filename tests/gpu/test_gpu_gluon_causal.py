"""The Gluon causal backward (kernels/gluon_causal.py) on Hopper, plain causal and within sliding windows:
gradients against float64, no worse than the block-sparse Triton kernels' on the same inputs
(SCHEDULE["gluon_bwd"] off), and the path actually taken. Run on the device machine: ``pytest -m gpu tests/gpu``."""

import math

import pytest
import torch

import hf_flex
from hf_flex import mods
from hf_flex.kernels import gluon_causal, launch

pytestmark = pytest.mark.gpu


def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _grads(q, k, v, do, dlse, bm, scale):
    leaves = tuple(t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = hf_flex.flex_attention(*leaves, block_mask=bm, scale=scale, return_lse=True)
    outs, grads = (out,), (do,)
    if dlse is not None:
        outs, grads = (out, lse), (do, dlse)
    return torch.autograd.grad(outs, leaves, grads)


def _reference(q, k, v, do, dlse, scale, mask_mod):
    """float64 gradients of sum(out dO) (+ sum(lse dLSE)) through hf_flex's dense oracle."""
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out, lse = hf_flex.reference.attention(q64, k64, v64, None, mask_mod, scale=scale, return_lse=True)
    loss = (out * do.double()).sum()
    if dlse is not None:
        loss = loss + (lse * dlse.double()).sum()
    return torch.autograd.grad(loss, (q64, k64, v64))


def _check(monkeypatch, dtype, S, D, window, with_dlse, streams, seed, tokens=False, tiles=(128, 64, 8)):
    """Gradients of a causal call (within ``window`` keys, when not None) through the Gluon kernels,
    which must run once and get the window, against float64, each no worse than 1.5x the Triton
    kernels' error on the same inputs plus 2 ulp of the gradient's scale. ``tokens``: q, k, v and dO
    token-major (Transformers' transposed [B, S, H, D] projections), the gradients too."""
    B, H = 2, 3
    scale = 1 / math.sqrt(D) * (1.3 if with_dlse else 1.0)  # a scale other than the default, once
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (B, S, H, D) if tokens else (B, H, S, D)
    q, k, v, do = (torch.randn(shape, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    if tokens:
        q, k, v, do = (t.transpose(1, 2) for t in (q, k, v, do))
    dlse = torch.randn(B, H, S, device="cuda", generator=g) if with_dlse else None
    mask = mods.causal() if window is None else mods.and_masks(mods.causal(), mods.sliding_window(window))
    bm = hf_flex.create_block_mask(mask, None, None, S, S, device="cuda")

    calls = []
    real = gluon_causal.causal_backward

    def counted(*args, **kwargs):
        calls.append(args[7])  # the window
        return real(*args, **kwargs)

    monkeypatch.setattr(gluon_causal, "causal_backward", counted)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_bwd", True)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_min_rows", 0)  # the tests' calls are small
    monkeypatch.setitem(launch.SCHEDULE, "gluon_bwd_sliding", True)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_bwd_streams", streams)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_bwd_head_dims", gluon_causal.HEAD_DIMS)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_bwd_tiles", tiles)
    ours = _grads(q, k, v, do, dlse, bm, scale)
    assert calls == [S if window is None else min(window, S)], "the Gluon backward did not run, or not with the window"
    monkeypatch.setitem(launch.SCHEDULE, "gluon_bwd", False)
    triton_grads = _grads(q, k, v, do, dlse, bm, scale)
    assert len(calls) == 1
    ref = _reference(q, k, v, do, dlse, scale, mask)
    for name, a, b, r, x in zip(("dq", "dk", "dv"), ours, triton_grads, ref, (q, k, v)):
        assert torch.isfinite(a).all(), name
        assert a.stride() == x.stride(), f"{name}: strides {a.stride()}, the input's {x.stride()}"
        e_ours, e_triton = ((x.double() - r).abs().max().item() for x in (a, b))
        atol = 2 * torch.finfo(dtype).eps * max(1.0, r.abs().max().item())
        assert e_ours <= 1.5 * e_triton + atol, f"{name}: Gluon {e_ours:.3e} against the Triton kernels' {e_triton:.3e}"


@pytest.mark.skipif(not _hopper(), reason="the Gluon kernels are written for sm_90")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S", [128, 384, 1024])
@pytest.mark.parametrize("with_dlse", [False, True])
@pytest.mark.parametrize("streams", [True, False])
@pytest.mark.parametrize("D", [128, 64])
def test_gluon_causal_backward_against_float64(monkeypatch, dtype, S, with_dlse, streams, D):
    _check(monkeypatch, dtype, S, D, None, with_dlse, streams, seed=S + with_dlse)


@pytest.mark.skipif(not _hopper(), reason="the Gluon kernels are written for sm_90")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S,window", [
    (384, 1),  # the diagonal only
    (384, 40),  # narrower than a step: the diagonal's steps are the window's edge
    (384, 64), (384, 100), (1024, 128), (1024, 200), (1024, 256),  # steps on both edges, whole steps between
    (1024, 700), (1024, 1000),  # edges that reach past the sequence's last tiles
    (1024, 1023),  # one key short of plain causal
])
@pytest.mark.parametrize("D", [128, 64])
def test_gluon_sliding_window_backward_against_float64(monkeypatch, dtype, S, window, D):
    _check(monkeypatch, dtype, S, D, window, with_dlse=window % 2 == 0, streams=True, seed=S * window + D)


@pytest.mark.skipif(not _hopper(), reason="the Gluon kernels are written for sm_90")
def test_gluon_causal_backward_skips_what_it_does_not_take(monkeypatch):
    """GQA, a head dim the schedule leaves out and a length that is not a multiple of 128 keep the Triton
    kernels."""
    monkeypatch.setitem(launch.SCHEDULE, "gluon_bwd_head_dims", (128,))
    monkeypatch.setitem(launch.SCHEDULE, "gluon_min_rows", 0)
    called = []
    monkeypatch.setattr(gluon_causal, "causal_backward", lambda *a, **kw: called.append(1))
    for Hq, Hkv, S, D in ((4, 2, 256, 128), (2, 2, 256, 64), (2, 2, 200, 128)):
        q = torch.randn(1, Hq, S, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, Hkv, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        bm = hf_flex.create_block_mask(mods.causal(), None, None, S, S, device="cuda")
        leaves = tuple(t.requires_grad_() for t in (q, k, v))
        out = hf_flex.flex_attention(*leaves, block_mask=bm, enable_gqa=Hq != Hkv)
        torch.autograd.grad(out, leaves, torch.randn_like(out))
    assert not called


@pytest.mark.skipif(not _hopper(), reason="the Gluon kernels are written for sm_90")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S,window", [(384, None), (1024, None), (384, 40), (1024, 200), (1024, 1000)])
@pytest.mark.parametrize("D", [128, 64])
def test_gluon_backward_of_token_major_inputs(monkeypatch, dtype, S, window, D):
    """Transformers' layout: the kernels read q, k, v, dO as [B * S, H * D] tiles and write the gradients
    in it (no copy either way)."""
    _check(monkeypatch, dtype, S, D, window, with_dlse=D == 64, streams=True, seed=S + D + (window or 0),
           tokens=True)


@pytest.mark.skipif(not _hopper(), reason="the Gluon kernels are written for sm_90")
@pytest.mark.parametrize("tiles", [(64, 64, 4), (64, 32, 4)])
@pytest.mark.parametrize("S,window", [(128, None), (1024, None), (384, 40), (1024, 100), (1024, 1000)])
@pytest.mark.parametrize("D", [128, 64])
def test_gluon_backward_with_other_tiles(monkeypatch, tiles, S, window, D):
    """SCHEDULE["gluon_bwd_tiles"]: the same kernels in one-warpgroup programs of 64 keys (dK/dV) or 64
    queries (dQ), two an SM, plain causal and within windows, both layouts."""
    _check(monkeypatch, torch.bfloat16, S, D, window, with_dlse=S == 1024, streams=True,
           seed=S + D + tiles[1] + (window or 0), tokens=(window or 0) % 2 == 0, tiles=tiles)
