"""The Gluon causal forward's dispatch (kernels/gluon_forward.py): which masks and inputs it takes, and that
flex_forward hands it the buffers the backward reads. Its kernel runs on Hopper only:
tests/gpu/test_gpu_gluon_forward.py checks it against float64 on the device machine."""

import pytest
import torch

import hf_flex
from hf_flex import mods
from hf_flex.kernels import gluon_causal, gluon_forward, launch


def _t(B=1, H=2, S=256, D=128, dtype=torch.bfloat16, device="cpu"):
    return torch.empty(B, H, S, D, dtype=dtype, device=device)


def test_applies_only_where_the_kernel_runs():
    q = torch.randn(1, 2, 256, 128, dtype=torch.bfloat16)
    assert not gluon_forward.applies(q, q, q, 256, None, None, 0.1)  # not on a CUDA device
    assert not gluon_forward.applies(q, q, q, None, None, None, 0.1)  # not a causal mask


def test_mask_ok_takes_causal_calls_without_score_mod_sink_or_non_positive_scale():
    assert gluon_forward.mask_ok(64, None, None, 0.1)
    assert gluon_forward.mask_ok(1, None, None, 2.0)
    for window, score_fn, sink, scale in ((None, None, None, 0.1), (64, object(), None, 0.1),
                                          (64, None, torch.zeros(2), 0.1), (64, None, None, 0.0),
                                          (64, None, None, -0.5)):
        assert not gluon_forward.mask_ok(window, score_fn, sink, scale)
    q = _t()
    assert gluon_forward.layout_ok(q, q, q) and not gluon_forward.applies(q, q, q, 64, None, None, 0.1)  # CPU


def test_layout_ok_takes_only_what_the_kernel_is_written_for():
    q = _t()
    assert gluon_forward.layout_ok(q, q, q)
    assert gluon_forward.layout_ok(_t(D=64), _t(D=64), _t(D=64))
    assert not gluon_forward.layout_ok(_t(D=64), _t(D=64), _t(D=64), (128,))  # a head dim left out
    assert not gluon_forward.layout_ok(_t(D=96), _t(D=96), _t(D=96), (96,))  # not written for
    assert gluon_forward.layout_ok(_t(H=4), _t(H=2), _t(H=2))  # GQA: groups of 2
    assert not gluon_forward.layout_ok(_t(H=4), _t(H=3), _t(H=3))  # 3 does not divide 4
    assert not gluon_forward.layout_ok(_t(H=4), _t(H=2), _t(H=1))  # k and v differ
    assert not gluon_forward.layout_ok(_t(S=200), _t(S=200), _t(S=200))  # S not a multiple of 128
    assert not gluon_forward.layout_ok(q, _t(S=384), _t(S=384))  # keys of another length
    f32 = _t(dtype=torch.float32)
    assert not gluon_forward.layout_ok(f32, f32, f32)
    assert not gluon_forward.layout_ok(q, _t(dtype=torch.float16), q)
    qt = torch.empty(1, 256, 4, 128, dtype=torch.bfloat16).transpose(1, 2)  # Transformers' layout
    kt = torch.empty(1, 256, 2, 128, dtype=torch.bfloat16).transpose(1, 2)
    assert gluon_forward.layout_ok(qt, kt, kt)
    assert not gluon_forward.layout_ok(qt, _t(H=2), _t(H=2))  # one layout for all three
    big = _t(B=2, H=64, S=131072, D=128, device="meta")  # 2**31 elements: 32-bit offsets would wrap
    assert not gluon_forward.layout_ok(big, big, big)
    assert not gluon_forward.layout_ok(torch.empty(2, 256, 128), torch.empty(2, 256, 128), torch.empty(2, 256, 128))


def test_causal_forward_refuses_bad_arguments():
    """A window below 1, and output buffers the kernel would address wrongly, are refused by name before
    anything is compiled or launched."""
    if not gluon_causal.AVAILABLE:
        pytest.skip("Gluon not importable")
    q = torch.empty(1, 2, 256, 64, dtype=torch.bfloat16)
    out = launch.out_like(q, 64)
    lse = launch.row_buffer(1, 2, 256, q.device, 0)
    with pytest.raises(ValueError, match="window must be a positive int"):
        gluon_forward.causal_forward(q, q, q, out, lse, 0.1, 0)
    with pytest.raises(ValueError, match="lse2 must have rows of stride S"):
        gluon_forward.causal_forward(q, q, q, out, torch.empty(1, 256, 2).transpose(1, 2), 0.1, 64)
    with pytest.raises(ValueError, match="out q's layout"):
        gluon_forward.causal_forward(q, q, q, torch.empty(1, 256, 2, 64, dtype=q.dtype).transpose(1, 2), lse, 0.1)


@pytest.mark.parametrize("knob", [True, False])
def test_flex_forward_hands_the_gluon_forward_its_buffers(device, monkeypatch, knob):
    """With applies() forced true where the mask is causal (alone or within a window) and there is no score
    mod or sink, the forward goes to causal_forward (a stand-in that runs the Triton forward into the
    buffers it is given) with the window, the scale, an output in q's layout and the LSE buffer the
    backward reads; the result and the gradients are the Triton path's. The knob off, or any other mask,
    keeps the Triton forward."""
    calls = []

    def fake(q, k, v, out, lse2, sm_scale, window, warmup=False):
        assert not warmup
        calls.append((sm_scale, window, out.stride() == launch.out_like(q, v.shape[-1]).stride(), lse2.shape))
        o, l2 = real_forward(q, k, v, *state["args"])  # the Triton forward (no causal_window passed)
        out.copy_(o)
        lse2.copy_(l2)

    state = {}
    real_forward = launch.flex_forward

    def recording_forward(q, k, v, tables, sparse, mask_fn, mask_args, score_fn, score_args, sink, sm_scale, **kw):
        state["args"] = (tables, sparse, mask_fn, mask_args, score_fn, score_args, sink, sm_scale)
        return real_forward(q, k, v, tables, sparse, mask_fn, mask_args, score_fn, score_args, sink, sm_scale, **kw)

    import hf_flex.autograd as autograd_module
    monkeypatch.setattr(autograd_module, "flex_forward", recording_forward)
    monkeypatch.setattr(gluon_forward, "applies",
                        lambda q, k, v, window, score_fn, sink, scale: window is not None and score_fn is None
                        and sink is None)
    monkeypatch.setattr(gluon_forward, "causal_forward", fake)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_fwd", knob)
    B, HQ, HKV, S, D = 1, 4, 2, 128, 32
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, S, HQ, D, generator=g).to(device).transpose(1, 2)  # Transformers' layout
    k, v = (torch.randn(B, S, HKV, D, generator=g).to(device).transpose(1, 2) for _ in range(2))
    ids = torch.zeros(1, S, dtype=torch.int32)
    ids[:, 50:] = 1
    cases = (
        (mods.causal(), knob, S),
        (mods.and_masks(mods.causal(), mods.sliding_window(40)), knob, 40),
        (mods.and_masks(mods.causal(), mods.document(ids.to(device))), False, None),
        (mods.sliding_window(40), False, None),  # no causal: keys after the query allowed
    )
    for mm, expect_gluon, window in cases:
        calls.clear()
        bm = hf_flex.create_block_mask(mm, None, None, S, S, device=device)
        leaves = tuple(t.detach().requires_grad_() for t in (q, k, v))
        out, lse = hf_flex.flex_attention(*leaves, block_mask=bm, scale=0.25, return_lse=True, enable_gqa=True)
        assert len(calls) == int(expect_gluon), mm
        ref = hf_flex.reference.attention(q.double(), k.double(), v.double(), None, mm, scale=0.25, enable_gqa=True)
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
        if expect_gluon:
            scale, got_window, out_layout, lse_shape = calls[0]
            assert scale == 0.25 and got_window == window and out_layout and lse_shape == (B, HQ, S)
            assert out.stride() == launch.out_like(q, D).stride()
            grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
            assert all(torch.isfinite(x).all() for x in grads)
