"""The Gluon causal backward's dispatch (kernels/gluon_causal.py): which masks and inputs it takes, and
that flex_backward hands it the right buffers. Its kernels run on Hopper only: tests/gpu/test_gpu_gluon_causal.py
checks them against float64 on the device machine."""

import pytest
import torch

import hf_flex
from hf_flex import mods
from hf_flex.autograd import KernelSpec
from hf_flex.kernels import gluon_causal, launch


def _spec(mask_mod, q_len=256, kv_len=256):
    bm = hf_flex.create_block_mask(mask_mod, None, None, q_len, kv_len, device="cpu")
    return KernelSpec(bm, None, 0.1)


def test_causal_window_recognises_causal_and_sliding_window_masks():
    """The window of a causal mask over S x S (S: plain causal), alone or in "and"s of sliding windows;
    None for every other mask."""
    assert _spec(mods.causal()).causal_window() == 256
    assert _spec(mods.and_masks(mods.causal(), mods.causal())).causal_window() == 256
    assert _spec(mods.and_masks(mods.causal(), mods.sliding_window(64))).causal_window() == 64
    assert _spec(mods.and_masks(mods.sliding_window(100), mods.causal())).causal_window() == 100
    nested = mods.and_masks(mods.sliding_window(96), mods.and_masks(mods.causal(), mods.sliding_window(40)))
    assert _spec(nested).causal_window() == 40  # two windows: the narrower
    assert _spec(mods.and_masks(mods.causal(), mods.sliding_window(1000))).causal_window() == 256  # wider than S
    assert _spec(mods.sliding_window(64)).causal_window() is None  # no causal: keys after the query allowed
    assert _spec(mods.or_masks(mods.causal(), mods.sliding_window(64))).causal_window() is None
    assert _spec(mods.causal(), 256, 384).causal_window() is None  # queries and keys of different lengths
    ids = torch.zeros(1, 256, dtype=torch.int32)
    ids[:, 100:] = 1
    assert _spec(mods.and_masks(mods.causal(), mods.document(ids))).causal_window() is None
    assert _spec(mods.and_masks(mods.causal(), mods.sliding_window(64), mods.document(ids))).causal_window() is None


def test_applies_only_where_the_kernels_run():
    q = torch.randn(1, 2, 256, 128, dtype=torch.bfloat16)
    assert not gluon_causal.applies(q, q, q, 256, None)  # not on a CUDA device
    assert not gluon_causal.applies(q, q, q, None, None)
    assert not gluon_causal.applies(q, q, q, 64, object())


def test_layout_ok_takes_only_what_the_kernels_are_written_for():
    def t(B=1, H=2, S=256, D=128, dtype=torch.bfloat16, device="cpu"):
        return torch.empty(B, H, S, D, dtype=dtype, device=device)

    q = t()
    assert gluon_causal.layout_ok(q, q, q)
    assert gluon_causal.layout_ok(t(D=64), t(D=64), t(D=64), (64, 128))
    assert not gluon_causal.layout_ok(t(D=64), t(D=64), t(D=64), (128,))  # a head dim the schedule leaves out
    assert not gluon_causal.layout_ok(t(D=96), t(D=96), t(D=96), (96,))  # one the kernels are not written for
    assert not gluon_causal.layout_ok(q, t(H=1), t(H=1))  # GQA
    assert not gluon_causal.layout_ok(t(S=200), t(S=200), t(S=200))  # S not a multiple of 128
    assert not gluon_causal.layout_ok(t(dtype=torch.float32), t(dtype=torch.float32), t(dtype=torch.float32))
    assert not gluon_causal.layout_ok(q, t(dtype=torch.float16), q)
    qt = torch.empty(1, 256, 2, 128, dtype=torch.bfloat16).transpose(1, 2)  # Transformers' layout
    assert gluon_causal.layout_ok(qt, qt, qt)
    assert not gluon_causal.layout_ok(q, qt, qt)  # one layout for all three
    assert not gluon_causal.layout_ok(q[:, :, :, :64], q[:, :, :, :64], q[:, :, :, :64], (64,))  # neither
    big = t(B=2, H=64, S=131072, D=128, device="meta")  # 2**31 elements: 32-bit offsets would wrap
    assert not gluon_causal.layout_ok(big, big, big)
    below = t(B=1, H=64, S=131072, D=128, device="meta")
    assert gluon_causal.layout_ok(below, below, below)


def test_layout_names_the_storage_the_kernels_read():
    """Head-major (contiguous [B, H, S, D]) and token-major (transposed [B, S, H, D]) storage, as the
    descriptors tile it (_rows); anything else is neither; dout moves into q's layout only when it is
    not in it."""
    heads = torch.randn(2, 3, 256, 64)
    tokens = torch.randn(2, 256, 3, 64).transpose(1, 2)
    assert gluon_causal.layout(heads, heads) == "heads"
    assert gluon_causal.layout(tokens, tokens) == "tokens"
    assert gluon_causal.layout(heads, tokens) is None
    assert gluon_causal.layout(torch.randn(2, 3, 64, 256).transpose(2, 3)) is None  # S and D swapped
    single = torch.randn(2, 1, 256, 64)  # one head: both at once; head-major is taken
    assert gluon_causal.layout(single) == "heads" and gluon_causal.layout(single, tokens) == "tokens"
    # the 2-D matrices the descriptors tile: a head's [S, D] tile at (b * H + h) * S rows (head-major),
    # at b * S rows and h * D columns (token-major)
    for t, tok in ((heads, False), (tokens, True)):
        rows = gluon_causal._rows(t, tok)
        assert rows.data_ptr() == t.data_ptr()
        b, h = 1, 2
        r0, c0 = (b * 256, h * 64) if tok else ((b * 3 + h) * 256, 0)
        assert torch.equal(rows[r0:r0 + 256, c0:c0 + 64], t[b, h])
    assert gluon_causal.in_layout(tokens, tokens) is tokens
    assert gluon_causal.in_layout(heads, heads) is heads
    moved = gluon_causal.in_layout(heads, tokens)
    assert gluon_causal.layout(moved) == "tokens" and torch.equal(moved, heads)
    moved = gluon_causal.in_layout(tokens, heads)
    assert moved.is_contiguous() and torch.equal(moved, tokens)


@pytest.mark.parametrize("knob,sliding_knob", [(True, True), (True, False), (False, True)])
def test_flex_backward_hands_the_gluon_pass_its_buffers(device, monkeypatch, knob, sliding_knob):
    """With applies() forced true, the backward of a causal call (or one within a sliding window) goes to
    causal_backward (a stand-in here) with lse2 and delta as the Triton kernels would read them and the
    window, and returns its gradients; the knob off (gluon_bwd_sliding off: for a window shorter than
    S), or a mask that is neither, keeps the Triton kernels."""
    calls = []

    def fake(q, k, v, dout, lse2, delta, sm_scale, window, concurrent, warmup=False, tiles=None):
        assert not warmup  # (CPU tensors: compile_ahead never starts)
        assert tiles == launch.SCHEDULE["gluon_bwd_tiles"]
        calls.append((lse2.clone(), delta.clone(), sm_scale, dout.is_contiguous(), window))
        return torch.full_like(q, 1.0), torch.full_like(k, 2.0), torch.full_like(v, 3.0)

    monkeypatch.setattr(gluon_causal, "applies",
                        lambda q, k, v, window, score_fn, dims: window is not None and score_fn is None)
    monkeypatch.setattr(gluon_causal, "causal_backward", fake)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_bwd", knob)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_min_rows", 0)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_bwd_sliding", sliding_knob)
    B, H, S, D = 1, 2, 128, 32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=g).to(device).requires_grad_() for _ in range(3))
    do = torch.randn(B, H, S, D, generator=g).to(device)
    ids = torch.zeros(1, S, dtype=torch.int32)
    ids[:, 50:] = 1
    cases = (
        (mods.causal(), knob, S),
        (mods.and_masks(mods.causal(), mods.sliding_window(64)), knob and sliding_knob, 64),
        (mods.and_masks(mods.causal(), mods.sliding_window(1000)), knob, S),  # wider than S: plain causal
        (mods.and_masks(mods.causal(), mods.document(ids.to(device))), False, None),
    )
    for mm, expect_gluon, window in cases:
        calls.clear()
        bm = hf_flex.create_block_mask(mm, None, None, S, S, device=device)
        out, lse = hf_flex.flex_attention(q, k, v, block_mask=bm, scale=0.25, return_lse=True)
        dlse = torch.randn(B, H, S, generator=g).to(device)
        dq, dk, dv = torch.autograd.grad((out, lse), (q, k, v), (do, dlse))
        assert len(calls) == int(expect_gluon)
        if not expect_gluon:
            assert not torch.equal(dq, torch.full_like(dq, 1.0))
            continue
        assert torch.equal(dq, torch.full_like(dq, 1.0)) and torch.equal(dv, torch.full_like(dv, 3.0))
        lse2, delta, scale, contiguous, got_window = calls[0]
        assert scale == 0.25 and contiguous and got_window == window
        log2e = 1.4426950408889634
        torch.testing.assert_close(lse2.cpu(), (lse.detach() * log2e).cpu(), rtol=1e-5, atol=1e-5)
        # delta = rowsum(dO O) - dLSE: the LSE's gradient folded in
        want = (do.float() * out.detach().float()).sum(-1) - dlse
        torch.testing.assert_close(delta.cpu(), want.cpu(), rtol=1e-4, atol=1e-4)


def test_gluon_allowed_by_size_and_layout(monkeypatch):
    """SCHEDULE["gluon_min_rows"] (B * Hq * S) and ["gluon_token_major"] decide which calls may take a
    Gluon backward; a value that is not an int >= 0 is refused by name."""
    heads = torch.empty(2, 4, 256, 64, device="meta")  # 2048 rows
    tokens = torch.empty(2, 256, 4, 64, device="meta").transpose(1, 2)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_token_major", True)
    for min_rows, expect in ((0, True), (2048, True), (2049, False)):
        monkeypatch.setitem(launch.SCHEDULE, "gluon_min_rows", min_rows)
        assert launch.gluon_allowed(heads) is expect and launch.gluon_allowed(tokens) is expect
    monkeypatch.setitem(launch.SCHEDULE, "gluon_min_rows", 0)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_token_major", False)
    assert launch.gluon_allowed(heads) and not launch.gluon_allowed(tokens)
    for bad in (-1, 2.5, True, "big"):
        monkeypatch.setitem(launch.SCHEDULE, "gluon_min_rows", bad)
        with pytest.raises(ValueError, match=r'SCHEDULE\["gluon_min_rows"\]'):
            launch.gluon_allowed(heads)


def test_default_gate_keeps_the_measured_calls():
    """The default gluon_min_rows lets the smallest anchor call where the Gluon kernels measured faster
    (causal 2k, B = 8, 16 heads) take them, and keeps the host-bound 4k end-to-end step's (16 heads)
    on the Triton kernels."""
    rows = launch.SCHEDULE["gluon_min_rows"]
    assert 8 * 16 * 2048 >= rows > 1 * 16 * 4096


def test_backward_tiles_are_checked_by_name():
    """SCHEDULE["gluon_bwd_tiles"]: the tile shapes the causal backward's kernels are written for pass,
    anything else is refused naming the knob (before any descriptor or launch)."""
    assert launch.SCHEDULE["gluon_bwd_tiles"] == (64, 64, 4)  # measured (NOTES.md, twentieth round)
    assert launch.SCHEDULE["gluon_varlen_bwd_tiles"] == (64, 64, 4)
    for ok in ((128, 64, 8), (64, 64, 4), (64, 32, 4), (128, 32, 4)):
        assert gluon_causal.check_tiles(ok) == ok
    for bad in ((64, 64, 8), (128, 128, 8), (256, 64, 8), (64, 16, 4), (128, 64, 2), [128, 64, 8], (128, 64),
                (128.0, 64, 8), (True, 64, 8)):
        with pytest.raises(ValueError, match=r'SCHEDULE\["gluon_bwd_tiles"\]'):
            gluon_causal.check_tiles(bad)
