"""The document-aligned Gluon backward (kernels/gluon_varlen.py) on Hopper: gradients of causal attention
over packed documents against float64, no worse than the Triton kernels' on the same inputs
(SCHEDULE["gluon_varlen"] off), and the path actually taken. Run on the device machine:
``pytest -m gpu tests/gpu``."""

import math

import pytest
import torch

import hf_flex
from helpers import assert_no_worse_than, assert_same_training_either_way
from hf_flex import mods
from hf_flex.kernels import compile_ahead, gluon_varlen, launch

pytestmark = pytest.mark.gpu


def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _doc_ids(B, S, lengths, g):
    """[B, S] int32 ids: row 0 cut at ``lengths`` (the rest one last document), other rows at random."""
    ids = torch.empty(B, S, dtype=torch.int32)
    for b in range(B):
        if b == 0:
            cuts = torch.tensor(lengths).cumsum(0)
        else:
            cuts = torch.randint(1, S, (len(lengths),), generator=g).sort().values
        ids[b] = torch.bucketize(torch.arange(S), cuts, right=True).to(torch.int32)
    return ids.cuda()


def _grads(q, k, v, do, dlse, bm, scale):
    leaves = tuple(t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = hf_flex.flex_attention(*leaves, block_mask=bm, scale=scale, return_lse=True,
                                      enable_gqa=q.shape[1] != k.shape[1])
    outs, grads = ((out, lse), (do, dlse)) if dlse is not None else ((out,), (do,))
    return torch.autograd.grad(outs, leaves, grads)


@pytest.mark.skipif(not _hopper(), reason="the Gluon kernels are written for sm_90")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S,lengths", [
    (1000, [1, 63, 64, 65, 127, 128, 129, 200]),  # documents shorter, as long as and longer than the tiles
    (2048, [700, 5, 300, 1000]),  # several tiles a document; S a multiple of 128
    (777, [777]),  # one document, S not a multiple of 128
])
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("tokens", [False, True])
def test_gluon_varlen_backward_against_float64(monkeypatch, dtype, S, lengths, G, tokens):
    """D = 128: the document-aligned kernels' tile at D = 64 is not 128 positions (launch_varlen.varlen_tile),
    and those calls run the block-sparse kernels. ``tokens``: q, k, v, dO token-major (Transformers'
    layout; a tile past a batch row's end reads the next row's first positions), the gradients too."""
    _check_backward(monkeypatch, dtype, S, lengths, G, tokens)


@pytest.mark.skipif(not _hopper(), reason="the Gluon kernels are written for sm_90")
@pytest.mark.parametrize("programs", [(128, 64, 8), (64, 64, 4), (64, 32, 4)])
@pytest.mark.parametrize("S,lengths", [
    (1000, [1, 63, 64, 65, 127, 128, 129, 200]),  # a half of a listed tile past its document's end
    (2048, [700, 5, 300, 1000]),
    (777, [777]),
])
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("tokens", [False, True])
def test_gluon_varlen_backward_in_each_program_form(monkeypatch, programs, S, lengths, G, tokens):
    """SCHEDULE["gluon_varlen_bwd_tiles"]: one-warpgroup programs of 64 keys (dK/dV) or 64 queries (dQ),
    each a half of a listed tile, or the 8-warp programs of a whole one; bf16."""
    monkeypatch.setitem(launch.SCHEDULE, "gluon_varlen_bwd_tiles", programs)
    _check_backward(monkeypatch, torch.bfloat16, S, lengths, G, tokens)


def _check_backward(monkeypatch, dtype, S, lengths, G, tokens):
    B, HKV, D = 2, 2, 128
    HQ = HKV * G
    with_dlse = G == 4
    scale = 1 / math.sqrt(D) * (1.3 if with_dlse else 1.0)
    g = torch.Generator().manual_seed(S + G + D)

    def randn(H):
        if tokens:
            return torch.randn(B, S, H, D, generator=g).to("cuda", dtype).transpose(1, 2)
        return torch.randn(B, H, S, D, generator=g).to("cuda", dtype)

    q, do = randn(HQ), randn(HQ)
    k, v = randn(HKV), randn(HKV)
    dlse = torch.randn(B, HQ, S, generator=g).cuda() if with_dlse else None
    mask = mods.and_masks(mods.causal(), mods.document(_doc_ids(B, S, lengths, g)))
    bm = hf_flex.create_block_mask(mask, B, None, S, S, device="cuda")

    calls = []
    real = gluon_varlen.varlen_backward

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gluon_varlen, "varlen_backward", counted)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_varlen", True)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_min_rows", 0)  # the tests' calls are small
    monkeypatch.setitem(launch.SCHEDULE, "gluon_varlen_min_group", 1)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_bwd_head_dims", gluon_varlen.HEAD_DIMS)
    ours = _grads(q, k, v, do, dlse, bm, scale)
    assert calls == [1], "the Gluon backward did not run"
    monkeypatch.setitem(launch.SCHEDULE, "gluon_varlen", False)
    triton_grads = _grads(q, k, v, do, dlse, bm, scale)
    assert calls == [1]
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out, lse = hf_flex.reference.attention(q64, k64, v64, None, mask, scale=scale, return_lse=True,
                                           enable_gqa=G > 1)
    loss = (out * do.double()).sum() + ((lse * dlse.double()).sum() if with_dlse else 0)
    ref = torch.autograd.grad(loss, (q64, k64, v64))
    for name, a, b, r, x in zip(("dq", "dk", "dv"), ours, triton_grads, ref, (q, k, v)):
        assert torch.isfinite(a).all(), name
        assert a.stride() == x.stride(), f"{name}: strides {a.stride()}, the input's {x.stride()}"
        e_ours, e_triton = ((x.double() - r).abs().max().item() for x in (a, b))
        atol = 2 * torch.finfo(dtype).eps * max(1.0, r.abs().max().item())
        assert e_ours <= 1.5 * e_triton + atol, f"{name}: Gluon {e_ours:.3e} against the Triton kernels' {e_triton:.3e}"


@pytest.mark.skipif(not _hopper(), reason="the Gluon kernels are written for sm_90")
def test_compile_ahead_compiles_the_gluon_backward(monkeypatch):
    """The first forward of a configuration compiles its Gluon backward in the background
    (kernels.compile_ahead): Transformers' layout, a query-head group of 2 (a variant no other test
    here compiles); the backward then compiles no Gluon variant of its own."""
    monkeypatch.setattr(compile_ahead, "_seen", set())
    monkeypatch.setattr(compile_ahead, "errors", [])
    monkeypatch.setattr(compile_ahead, "enabled", True)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_varlen", True)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_min_rows", 0)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_varlen_min_group", 2)
    kernels = (gluon_varlen.attn_bwd_dq_varlen_kernel, gluon_varlen.attn_bwd_dkdv_varlen_kernel)
    B, S, HQ, HKV, D = 1, 1500, 4, 2, 128
    g = torch.Generator().manual_seed(5)
    q, do = (torch.randn(B, S, HQ, D, generator=g).to("cuda", torch.bfloat16).transpose(1, 2) for _ in range(2))
    k, v = (torch.randn(B, S, HKV, D, generator=g).to("cuda", torch.bfloat16).transpose(1, 2) for _ in range(2))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = mods.and_masks(mods.causal(), mods.document(_doc_ids(B, S, [300, 900], g)))
    bm = hf_flex.create_block_mask(mask, B, None, S, S, device="cuda")
    before = launch.count_variants(kernels)
    out = hf_flex.flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
    compile_ahead.wait()
    assert compile_ahead.errors == []
    ahead = launch.count_variants(kernels)
    assert ahead == before + 3, "the warm-up did not compile dQ and both dK/dV launches' variants"
    grads = torch.autograd.grad(out, (q, k, v), do)
    assert launch.count_variants(kernels) == ahead, "the backward compiled a variant the warm-up did not"
    assert all(torch.isfinite(t).all() for t in grads)


@pytest.mark.skipif(not _hopper(), reason="the Gluon kernels are written for sm_90")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S,lengths", [
    (1000, [1, 63, 64, 65, 127, 128, 129, 200]),  # documents shorter, as long as and longer than the tiles
    (2048, [700, 5, 300, 1000]),  # several tiles a document; S a multiple of 128
    (777, [777]),  # one document, S not a multiple of 128
])
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("tokens", [False, True])
def test_gluon_varlen_forward_against_float64(monkeypatch, dtype, S, lengths, G, tokens):
    """The document-aligned Gluon forward (SCHEDULE["gluon_varlen_fwd"]): O and LSE against float64, each no
    worse than 1.5x the Triton forward's error on the same inputs plus 2 ulp of its scale, the path
    taken once, the output in the Triton forward's layout. B = 2 with other cuts on row 1 (a tile past a
    batch row's end reads the next row's first positions, token-major)."""
    B, HKV, D = 2, 2, 128
    HQ = HKV * G
    scale = 1.3 / math.sqrt(D)
    g = torch.Generator().manual_seed(S + 10 * G + tokens)

    def randn(H):
        if tokens:
            return torch.randn(B, S, H, D, generator=g).to("cuda", dtype).transpose(1, 2)
        return torch.randn(B, H, S, D, generator=g).to("cuda", dtype)

    q, k, v = randn(HQ), randn(HKV), randn(HKV)
    mask = mods.and_masks(mods.causal(), mods.document(_doc_ids(B, S, lengths, g)))
    bm = hf_flex.create_block_mask(mask, B, None, S, S, device="cuda")
    calls = []
    real = gluon_varlen.varlen_forward

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gluon_varlen, "varlen_forward", counted)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_varlen_fwd", True)
    monkeypatch.setitem(launch.SCHEDULE, "gluon_min_rows", 0)  # the tests' calls are small
    ours = hf_flex.flex_attention(q, k, v, block_mask=bm, scale=scale, return_lse=True, enable_gqa=G > 1)
    assert calls == [1], "the Gluon forward did not run"
    monkeypatch.setitem(launch.SCHEDULE, "gluon_varlen_fwd", False)
    theirs = hf_flex.flex_attention(q, k, v, block_mask=bm, scale=scale, return_lse=True, enable_gqa=G > 1)
    assert calls == [1]
    ref = hf_flex.reference.attention(q.double(), k.double(), v.double(), None, mask, scale=scale, return_lse=True,
                                      enable_gqa=G > 1)
    assert ours[0].stride() == theirs[0].stride()
    assert_no_worse_than(("out", "lse"), ours, theirs, ref, (dtype, torch.float32))


@pytest.mark.skipif(not _hopper(), reason="the Gluon kernels are written for sm_90")
def test_gluon_varlen_forward_trains_like_the_triton_path(monkeypatch):
    """Gradients through the document-aligned Gluon forward (the backward reads its LSE) equal, within
    rounding, those through the Triton forward."""
    B, S, HQ, HKV, D = 1, 1500, 4, 2, 128
    g = torch.Generator().manual_seed(9)
    q, do = (torch.randn(B, S, HQ, D, generator=g).to("cuda", torch.bfloat16).transpose(1, 2) for _ in range(2))
    k, v = (torch.randn(B, S, HKV, D, generator=g).to("cuda", torch.bfloat16).transpose(1, 2) for _ in range(2))
    mask = mods.and_masks(mods.causal(), mods.document(_doc_ids(B, S, [300, 900], g)))
    bm = hf_flex.create_block_mask(mask, B, None, S, S, device="cuda")
    monkeypatch.setitem(launch.SCHEDULE, "gluon_min_rows", 0)
    assert_same_training_either_way(monkeypatch, "gluon_varlen_fwd", q, k, v, do, bm)
