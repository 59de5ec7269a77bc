"""The Gluon causal forward (kernels/gluon_forward.py) on Hopper, plain causal and within sliding windows,
with and without GQA, on head-major and Transformers' token-major inputs: output and LSE against float64,
no worse than the block-sparse Triton forward's on the same inputs (SCHEDULE["gluon_fwd"] off), the
path actually taken, and the calls it must leave to the Triton forward. Run on the device machine:
``pytest -m gpu tests/gpu``."""

import math

import pytest
import torch

import hf_flex
from helpers import assert_no_worse_than, assert_same_training_either_way
from hf_flex import mods
from hf_flex.kernels import gluon_forward, launch

pytestmark = pytest.mark.gpu


def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _inputs(dtype, B, HQ, HKV, S, D, tokens, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def one(h):
        shape = (B, S, h, D) if tokens else (B, h, S, D)
        t = torch.randn(shape, device="cuda", dtype=dtype, generator=g)
        return t.transpose(1, 2) if tokens else t

    return one(HQ), one(HKV), one(HKV)


def _check(monkeypatch, dtype, S, D, window, tokens=False, HQ=3, HKV=3, seed=0):
    """O and LSE of a causal call (within ``window`` keys, when not None) through the Gluon forward, which
    must run once and get the window, against float64, each no worse than 1.5x the Triton forward's
    error on the same inputs plus 2 ulp of its scale; the output in the Triton forward's layout."""
    B = 2
    q, k, v = _inputs(dtype, B, HQ, HKV, S, D, tokens, seed)
    scale = 1.3 / math.sqrt(D)  # not the default scale
    mask = mods.causal() if window is None else mods.and_masks(mods.causal(), mods.sliding_window(window))
    bm = hf_flex.create_block_mask(mask, None, None, S, S, device="cuda")
    calls = []
    real = gluon_forward.causal_forward

    def counted(*args, **kwargs):
        calls.append(args[6])  # the window
        return real(*args, **kwargs)

    monkeypatch.setattr(gluon_forward, "causal_forward", counted)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_fwd", True)
    ours = hf_flex.flex_attention(q, k, v, block_mask=bm, scale=scale, return_lse=True, enable_gqa=HQ != HKV)
    assert calls == [S if window is None else min(window, S)], "the Gluon forward did not run, or not with the window"
    monkeypatch.setitem(launch.SCHEDULE, "gluon_fwd", False)
    theirs = hf_flex.flex_attention(q, k, v, block_mask=bm, scale=scale, return_lse=True, enable_gqa=HQ != HKV)
    assert len(calls) == 1
    ref = hf_flex.reference.attention(q.double(), k.double(), v.double(), None, mask, scale=scale, return_lse=True,
                                      enable_gqa=HQ != HKV)
    assert ours[0].stride() == theirs[0].stride()
    assert_no_worse_than(("out", "lse"), ours, theirs, ref, (dtype, torch.float32))


@pytest.mark.skipif(not _hopper(), reason="the Gluon kernels are written for sm_90")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S", [128, 384, 1024])
@pytest.mark.parametrize("D", [128, 64])
@pytest.mark.parametrize("tokens", [False, True])
def test_gluon_causal_forward_against_float64(monkeypatch, dtype, S, D, tokens):
    _check(monkeypatch, dtype, S, D, None, tokens, seed=S + D)


@pytest.mark.skipif(not _hopper(), reason="the Gluon kernels are written for sm_90")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S,window", [
    (384, 1),  # the diagonal only
    (384, 40),  # narrower than a step: the diagonal's steps are the window's edge
    (384, 64), (384, 100), (1024, 128), (1024, 200), (1024, 256),  # steps on both edges, whole steps between
    (1024, 700), (1024, 1000),  # edges that reach past the first tiles
    (1024, 1023),  # one key short of plain causal
])
@pytest.mark.parametrize("D", [128, 64])
def test_gluon_sliding_window_forward_against_float64(monkeypatch, dtype, S, window, D):
    _check(monkeypatch, dtype, S, D, window, tokens=window % 2 == 0, seed=S * window + D)


@pytest.mark.skipif(not _hopper(), reason="the Gluon kernels are written for sm_90")
@pytest.mark.parametrize("HQ,HKV", [(4, 2), (8, 2), (4, 1)])
@pytest.mark.parametrize("window", [None, 200])
@pytest.mark.parametrize("tokens", [False, True])
def test_gluon_forward_with_gqa(monkeypatch, HQ, HKV, window, tokens):
    """Query head h reads key head h // (HQ / HKV): in both layouts, with B = 2 (the key head's row of
    the next batch row starts right after)."""
    _check(monkeypatch, torch.bfloat16, 384, 128, window, tokens, HQ, HKV, seed=HQ * 10 + HKV)


@pytest.mark.skipif(not _hopper(), reason="the Gluon kernels are written for sm_90")
def test_gluon_forward_and_backward_train_like_the_triton_path(monkeypatch):
    """Gradients through the Gluon forward's output and LSE (the backward reads its LSE) equal, within
    rounding, those through the Triton forward."""
    q, k, v = _inputs(torch.bfloat16, 2, 4, 2, 1024, 128, True, 7)
    do = torch.randn(q.shape, device="cuda", dtype=q.dtype)
    bm = hf_flex.create_block_mask(mods.and_masks(mods.causal(), mods.sliding_window(300)), None, None, 1024, 1024,
                                   device="cuda")
    assert_same_training_either_way(monkeypatch, "gluon_fwd", q, k, v, do, bm)


@pytest.mark.skipif(not _hopper(), reason="the Gluon kernels are written for sm_90")
def test_gluon_forward_skips_what_it_does_not_take(monkeypatch):
    """A length that is not a multiple of 128, a head dim it is not written for, a score mod, a sink and a
    mask that is not causal keep the Triton forward."""
    called = []
    monkeypatch.setattr(gluon_forward, "causal_forward", lambda *a, **kw: called.append(1))
    monkeypatch.setitem(launch.SCHEDULE, "gluon_fwd", True)

    def run(S=256, D=128, mask=mods.causal(), score_mod=None):
        q = torch.randn(1, 2, S, D, device="cuda", dtype=torch.bfloat16)
        bm = hf_flex.create_block_mask(mask, None, None, S, S, device="cuda")
        hf_flex.flex_attention(q, q, q, score_mod, block_mask=bm)

    run(S=200)
    run(D=96)
    run(score_mod=mods.softcap(30.0))
    run(score_mod=mods.sinks(torch.zeros(2, device="cuda")))
    run(mask=mods.sliding_window(64))
    assert not called
    run()  # and the plain causal call does take it
    assert called == [1]
