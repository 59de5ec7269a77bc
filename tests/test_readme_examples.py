"""The README's "your own mods" examples, run as written (on the test device), against the reference."""

import torch
import triton
import triton.language as tl

import hf_flex


@triton.jit
def _dilated(b, h, q, kv, stride):
    return (kv <= q) & ((q - kv) % stride == 0)


@triton.jit
def _head_temperature(s, b, h, q, kv, temps):
    return s * tl.load(temps + h)


@triton.jit
def _head_temperature_grad(s, ds, b, h, q, kv, temps):
    return ds * tl.load(temps + h)


def test_readme_user_mods(device):
    H, S, D = 4, 96, 32
    dilated = hf_flex.MaskMod(
        _dilated, lambda b, h, q, kv, stride: (kv <= q) & ((q - kv) % stride == 0), args=(4,), name="dilated4"
    )
    temps = torch.linspace(0.5, 1.5, H, device=device)
    temperature = hf_flex.ScoreMod(
        _head_temperature,
        lambda s, b, h, q, kv, t: s * t[h],
        args=(temps,),
        name="temperature",
        grad_fn=_head_temperature_grad,
    )
    bm = hf_flex.create_block_mask(dilated, None, None, S, S, device=device, BLOCK_SIZE=32)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, H, S, D, generator=g).to(device).requires_grad_() for _ in range(3))
    do = torch.randn(1, H, S, D, generator=g).to(device)
    out = hf_flex.flex_attention(q, k, v, temperature, bm)
    grads = torch.autograd.grad(out, (q, k, v), do)

    r_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    t64 = hf_flex.ScoreMod(_head_temperature, lambda s, b, h, q, kv, t: s * t[h], args=(temps.double(),))
    ref = hf_flex.reference.attention(*r_in, t64, dilated)
    rgrads = torch.autograd.grad(ref, r_in, do.double())
    for a, r in zip((out,) + grads, (ref,) + rgrads):
        assert (a.double() - r).abs().max().item() < 1e-4
    # the temperature really changed the result (a test that can fail)
    plain = hf_flex.flex_attention(q, k, v, None, bm)
    assert (plain - out).abs().max().item() > 1e-3
