"""Bad input raises ValueError / TypeError whose message names the argument and what was expected.

flex_attention is called on the ``device`` fixture (the kernel path: dtype and head-dim limits apply
there). Each case also checks that a *valid* neighbour of the bad input passes, so a check that fires
on everything cannot hide behind pytest.raises.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import hf_flex
from hf_flex import mods
from hf_flex.dispatch import triton_runs_on


def _qkv(device, B=1, Hq=2, Hkv=2, Sq=16, Skv=16, D=16, Dv=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    Dv = D if Dv is None else Dv
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return mk(B, Hq, Sq, D), mk(B, Hkv, Skv, D), mk(B, Hkv, Skv, Dv)


def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


fa = hf_flex.flex_attention


def test_valid_baseline(device):
    assert triton_runs_on(device)
    q, k, v = _qkv(device)
    out = fa(q, k, v)
    assert out.shape == (1, 2, 16, 16)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_wrong_ndim(device, which):
    q, k, v = _qkv(device)
    t = dict(q=q, k=k, v=v)
    t[which] = t[which][0]
    _raises(ValueError, rf"{which} must be 4-D", fa, t["q"], t["k"], t["v"])


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_not_a_tensor(device, which):
    q, k, v = _qkv(device)
    t = dict(q=q, k=k, v=v)
    t[which] = t[which].tolist()
    _raises(TypeError, rf"{which} must be a torch.Tensor", fa, t["q"], t["k"], t["v"])


def test_dtype_mismatch(device):
    q, k, v = _qkv(device)
    _raises(ValueError, "share a dtype", fa, q, k.half(), v)
    _raises(ValueError, "share a dtype", fa, q.half(), k.half(), v)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.complex64])
def test_unsupported_dtype(device, dtype):
    q, k, v = _qkv(device)
    _raises(ValueError, "dtype", fa, q.to(dtype), k.to(dtype), v.to(dtype))


def test_device_mismatch(device):
    q, k, v = _qkv(device)
    _raises(ValueError, "one device", fa, q, k.to("meta"), v)
    _raises(ValueError, "one device", fa, q, k, v.to("meta"))


def test_heads_not_divisible(device):
    q, k, v = _qkv(device, Hq=3, Hkv=2)
    _raises(ValueError, r"q heads \(3\) must be a multiple of k/v heads \(2\)", fa, q, k, v, enable_gqa=True)


def test_gqa_needs_enable_gqa(device):
    q, k, v = _qkv(device, Hq=4, Hkv=2)
    _raises(ValueError, "enable_gqa", fa, q, k, v)
    assert fa(q, k, v, enable_gqa=True).shape == (1, 4, 16, 16)


def test_batch_mismatch(device):
    q, k, v = _qkv(device, B=2)
    _raises(ValueError, "batch", fa, q, k[:1], v[:1])
    _raises(ValueError, "batch", fa, q, k, v[:1])


def test_kv_head_dim_mismatch(device):
    q, k, v = _qkv(device, D=16)
    _raises(ValueError, "k head_dim 32 must equal q head_dim 16", fa, q, torch.cat([k, k], -1), v)


def test_kv_shape_mismatch(device):
    q, k, v = _qkv(device)
    _raises(ValueError, "v shape", fa, q, k, v[:, :, :8])
    _raises(ValueError, "v shape", fa, q, k, v[:, :1])


def test_empty_input(device):
    q, k, v = _qkv(device)
    _raises(ValueError, "empty", fa, q[:, :, :0], k, v)
    _raises(ValueError, "empty", fa, q, k[:, :, :0], v[:, :, :0])


@pytest.mark.parametrize("D,Dv,what", [(12, 12, r"head_dim \(q, k\) = 12"), (260, 260, r"head_dim \(q, k\) = 260"),
                                       (8, 8, r"head_dim \(q, k\) = 8"), (16, 20, r"head_dim \(v\) = 20"),
                                       (16, 264, r"head_dim \(v\) = 264")])
def test_unsupported_head_dim(device, D, Dv, what):
    q, k, v = _qkv(device, Sq=4, Skv=4, D=D, Dv=Dv)
    _raises(ValueError, what, fa, q, k, v)


def test_scale_type(device):
    q, k, v = _qkv(device)
    _raises(TypeError, "scale", fa, q, k, v, scale="0.5")
    _raises(TypeError, "scale", fa, q, k, v, scale=torch.tensor(0.5))
    fa(q, k, v, scale=2)  # an int is fine


# --- block masks -------------------------------------------------------------------------------------


def test_block_mask_for_other_lengths(device):
    q, k, v = _qkv(device, Sq=16, Skv=32)
    swapped = hf_flex.create_block_mask(mods.causal(), None, None, 32, 16, device=device, BLOCK_SIZE=16)
    _raises(ValueError, r"block_mask was built for \(Q_LEN, KV_LEN\) = \(32, 16\)", fa, q, k, v, block_mask=swapped)
    ok = hf_flex.create_block_mask(mods.offset(mods.causal(), 16, 0), None, None, 16, 32, device=device, BLOCK_SIZE=16)
    fa(q, k, v, block_mask=ok)


def test_block_mask_batch_and_heads(device):
    q, k, v = _qkv(device, B=2, Hq=4, Hkv=2)
    bad_b = hf_flex.create_block_mask(mods.causal(), 3, None, 16, 16, device=device, BLOCK_SIZE=16)
    _raises(ValueError, "block_mask batch 3 must be 1 or the batch size 2", fa, q, k, v, block_mask=bad_b, enable_gqa=True)
    bad_h = hf_flex.create_block_mask(mods.causal(), None, 2, 16, 16, device=device, BLOCK_SIZE=16)
    _raises(ValueError, "block_mask heads 2 must be 1 or the number of query heads 4", fa, q, k, v, block_mask=bad_h,
            enable_gqa=True)
    for B, H in ((None, None), (2, None), (None, 4), (2, 4), (1, 1)):
        bm = hf_flex.create_block_mask(mods.causal(), B, H, 16, 16, device=device, BLOCK_SIZE=16)
        fa(q, k, v, block_mask=bm, enable_gqa=True)


def test_block_mask_type_and_device(device):
    q, k, v = _qkv(device)
    bm = hf_flex.create_block_mask(mods.causal(), None, None, 16, 16, device=device, BLOCK_SIZE=16)
    _raises(TypeError, "block_mask must be an hf_flex BlockMask", fa, q, k, v, block_mask=bm.to_dense())
    _raises(ValueError, "block_mask is on meta", fa, q, k, v, block_mask=bm.to("meta"))
    # the mask_mod reads a tensor on another device than q
    ids = torch.zeros(1, 16, dtype=torch.int32)
    other = hf_flex.block_mask_from_classes(bm.to_dense(), 16, 16, 16, mods.document(ids.to("meta"))).to(device)
    _raises(ValueError, "mask_mod document args", fa, q, k, v, block_mask=other)


# --- score mods --------------------------------------------------------------------------------------


def test_plain_function_score_mod(device):
    q, k, v = _qkv(device)
    _raises(TypeError, "score_mod must be an hf_flex ScoreMod", fa, q, k, v, score_mod=lambda s, b, h, q, kv: s)
    _raises(TypeError, "score_mod must be an hf_flex ScoreMod", fa, q, k, v, score_mod=mods.causal())


def test_sinks_shape_for_query_heads(device):
    q, k, v = _qkv(device, Hq=4, Hkv=2)
    _raises(ValueError, r"sinks logit must have shape \[4\]", fa, q, k, v, mods.sinks(torch.zeros(2, device=device)),
            enable_gqa=True)
    fa(q, k, v, mods.sinks(torch.zeros(4, device=device)), enable_gqa=True)


def test_score_mod_tensor_on_other_device(device):
    q, k, v = _qkv(device)
    _raises(ValueError, "score_mod alibi args", fa, q, k, v, mods.alibi(torch.zeros(2, device="meta")))
    _raises(ValueError, "sinks logit is on meta", fa, q, k, v, mods.sinks(torch.zeros(2, device="meta")))


@triton.jit
def _add_bias(s, b, h, q, kv, bias):
    return s + tl.load(bias + h)


def test_learnable_without_param_grad_fn(device):
    q, k, v = _qkv(device)
    bias = torch.zeros(2, device=device, requires_grad=True)
    sm = hf_flex.ScoreMod(_add_bias, lambda s, b, h, q, kv, t: s + t[h], (bias,), "add_bias", learnable=(0,))
    _raises(ValueError, "add_bias has tensors that require grad but no param_grad_fn", fa, q, k, v, sm)
    fa(q, k, v, hf_flex.ScoreMod(_add_bias, lambda s, b, h, q, kv, t: s + t[h], (bias.detach(),), "add_bias"))


# --- mod constructors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build,exc,match",
    [
        (lambda: mods.sliding_window(0), ValueError, "sliding_window: window"),
        (lambda: mods.sliding_window(-3), ValueError, "sliding_window: window"),
        (lambda: mods.sliding_window(2.5), ValueError, "sliding_window: window"),
        (lambda: mods.sliding_window(True), ValueError, "sliding_window: window"),
        (lambda: mods.chunked(0), ValueError, "chunked: chunk_size"),
        (lambda: mods.chunked(torch.tensor(1.5)), ValueError, "chunked: chunk_size"),
        (lambda: mods.prefix_lm(-1), ValueError, "prefix_lm: prefix_len"),
        (lambda: mods.prefix_lm(3.0), ValueError, "prefix_lm: prefix_len"),
        (lambda: mods.document(torch.zeros(2, 8)), ValueError, "document: doc_ids"),
        (lambda: mods.document(torch.zeros(8, dtype=torch.int32)), ValueError, "document: doc_ids"),
        (lambda: mods.document([[0, 1]]), ValueError, "document: doc_ids"),
        (lambda: mods.padding(torch.ones(2, 8)), ValueError, "padding: kv_valid"),
        (lambda: mods.padding(torch.ones(8, dtype=torch.bool)), ValueError, "padding: kv_valid"),
        (lambda: mods.softcap(0), ValueError, "softcap: cap"),
        (lambda: mods.softcap(-2.0), ValueError, "softcap: cap"),
        (lambda: mods.softcap("3"), ValueError, "softcap: cap"),
        (lambda: mods.alibi(torch.zeros(2, 2)), ValueError, "alibi: slopes"),
        (lambda: mods.alibi(torch.zeros(2, dtype=torch.int32)), ValueError, "alibi: slopes"),
        (lambda: mods.relative_bias(torch.zeros(2, 4)), ValueError, "relative_bias: table"),
        (lambda: mods.relative_bias(torch.zeros(7)), ValueError, "relative_bias: table"),
        (lambda: mods.relative_bias(torch.zeros(2, 5, dtype=torch.int64)), ValueError, "relative_bias: table"),
        (lambda: mods.sinks(torch.zeros(2, 2)), ValueError, "sinks: logit"),
        (lambda: mods.sinks(torch.zeros(2, dtype=torch.int32)), ValueError, "sinks: logit"),
        (lambda: mods.offset(mods.causal(), 1.5, 0), TypeError, "q_offset"),
        (lambda: mods.offset(mods.causal(), 0, torch.tensor(1.0)), ValueError, "kv_offset"),
        (lambda: mods.offset(lambda b, h, q, kv: q >= kv, 1, 0), TypeError, "offset: mask"),
        (lambda: mods.and_masks(), ValueError, "and_masks"),
        (lambda: mods.or_masks(mods.causal(), lambda b, h, q, kv: q >= kv), TypeError, "or_masks: argument 1"),
        (lambda: mods.and_masks(mods.softcap(2.0)), TypeError, "and_masks: argument 0"),
        (lambda: mods.chain(), ValueError, "chain"),
        (lambda: mods.chain(mods.causal()), TypeError, "chain: argument 0"),
        (lambda: mods.chain(mods.sinks(torch.zeros(2)), mods.sinks(torch.zeros(2))), ValueError, "sinks"),
        (lambda: hf_flex.MaskMod(lambda b, h, q, kv: q >= kv, lambda b, h, q, kv: q >= kv), TypeError, "triton_fn"),
        (lambda: hf_flex.MaskMod(mods.causal().triton_fn, None), TypeError, "torch_fn"),
        (lambda: hf_flex.MaskMod(mods.causal().triton_fn, lambda *a: a[3] <= a[2], ("x",)), TypeError, r"args\[0\]"),
        (lambda: hf_flex.ScoreMod(_add_bias, lambda *a: a[0], (3,), learnable=(0,)), TypeError, "learnable index 0"),
        (lambda: hf_flex.ScoreMod(_add_bias, None, (torch.zeros(2),)), TypeError, "torch_fn"),
    ],
)
def test_mod_constructor_errors(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


def test_mod_constructor_valid_neighbours():
    """The valid inputs next to the bad ones above are accepted."""
    mods.sliding_window(1)
    mods.chunked(torch.tensor(4))
    mods.prefix_lm(0)
    mods.document(torch.zeros(2, 8, dtype=torch.int64))
    mods.document(torch.zeros(2, 8, dtype=torch.uint8))
    mods.padding(torch.ones(2, 8, dtype=torch.int32))
    mods.softcap(1)
    mods.alibi(torch.zeros(2, dtype=torch.float16))
    mods.relative_bias(torch.zeros(2, 1))
    mods.sinks(torch.zeros(2))
    mods.offset(mods.causal(), torch.tensor(2), 0)
    mods.chain(mods.softcap(1.0), mods.sinks(torch.zeros(2)))
