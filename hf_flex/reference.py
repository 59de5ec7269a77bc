"""Dense PyTorch oracle with the same semantics as the kernels (tests, and the CPU path).

It runs the mods' PyTorch twins on broadcasting index tensors, one slab of queries at a time so a
slab's [B, Hq, rows, KV] scores stay under ``max_elements``; autograd works through it (each slab is
checkpointed when gradients are needed, so backward memory stays bounded too). Call it on float64
inputs to get the reference the kernels are held to.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from .modtypes import MaskMod, ScoreMod

__all__ = ["attention", "dense_mask"]


def _index_tensors(B, H, q0, q1, kv_len, device, Bm=None, Hm=None):
    bi = torch.arange(B, device=device).view(B, 1, 1, 1)
    hi = torch.arange(H, device=device).view(1, H, 1, 1)
    qi = torch.arange(q0, q1, device=device).view(1, 1, q1 - q0, 1)
    ki = torch.arange(kv_len, device=device).view(1, 1, 1, kv_len)
    if Bm == 1:
        bi = torch.zeros_like(bi)
    if Hm == 1:
        hi = torch.zeros_like(hi)
    return bi, hi, qi, ki


def dense_mask(mask_mod: Optional[MaskMod], B: int, H: int, q_len: int, kv_len: int, device="cpu"):
    """The element-level mask [B, H, Q, KV] bool of ``mask_mod`` (small shapes only)."""
    if mask_mod is None:
        return torch.ones((B, H, q_len, kv_len), dtype=torch.bool, device=device)
    b, h, q, kv = _index_tensors(B, H, 0, q_len, kv_len, device)
    return mask_mod(b, h, q, kv).expand(B, H, q_len, kv_len)


def _slab(q, k, v, q0, sink, score_args, *, score_mod, mask_mod, scale, mask_bh):
    B, H, rows, _ = q.shape
    kv_len = k.shape[2]
    b, h, qi, ki = _index_tensors(B, H, q0, q0 + rows, kv_len, q.device)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if score_mod is not None and score_mod.has_elementwise:
        s = score_mod.torch_fn(s, b, h, qi, ki, *score_args)
    if mask_mod is not None:
        mb, mh = mask_bh
        allowed = mask_mod(torch.zeros_like(b) if mb == 1 else b, torch.zeros_like(h) if mh == 1 else h, qi, ki)
        s = s.masked_fill(~allowed, float("-inf"))
    if sink is not None:
        s = torch.cat([s, sink.to(s.dtype).view(1, H, 1, 1).expand(B, H, rows, 1)], dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    # fully masked row (lse = -inf): weights 0, not NaN
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    p = torch.where(torch.isinf(lse)[..., None], torch.zeros_like(p), p)
    if sink is not None:
        p = p[..., :-1]
    return torch.matmul(p, v), lse


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    score_mod: Optional[ScoreMod] = None,
    mask_mod: Optional[MaskMod] = None,
    *,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    mask_bh=(0, 0),
    max_elements: int = 1 << 25,
):
    """Reference attention: q [B, Hq, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv] -> [B, Hq, Sq, Dv].

    Computes in the inputs' dtype. ``mask_mod`` / ``score_mod`` are evaluated through their PyTorch
    twins; ``score_mod.sink`` adds the sink logit to each row's denominator. ``mask_bh`` = (Bm, Hm) of
    the block mask the mask came from: a 1 there means the mask was built with that dim broadcast and
    the twin sees index 0 (0 = evaluate with the real indices). Returns out, or (out, lse) with lse
    [B, Hq, Sq] float32 (natural log; -inf for a fully masked row without sinks).
    """
    B, HQ, SQ, D = q.shape
    HKV = k.shape[1]
    if HQ != HKV:
        if not enable_gqa or HQ % HKV:
            raise ValueError(f"reference.attention: Hq={HQ} and Hkv={HKV} need enable_gqa=True and Hq % Hkv == 0")
        k = k.repeat_interleave(HQ // HKV, dim=1)
        v = v.repeat_interleave(HQ // HKV, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    sink = score_mod.sink if score_mod is not None else None
    score_args = tuple(score_mod.args) if score_mod is not None else ()
    rows = max(1, max_elements // max(1, B * HQ * k.shape[2]))
    grads = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v, sink, *score_args)
    )
    outs, lses = [], []
    for q0 in range(0, SQ, rows):
        qs = q[:, :, q0 : q0 + rows]
        kw = dict(score_mod=score_mod, mask_mod=mask_mod, scale=scale, mask_bh=mask_bh)
        if grads and SQ > rows:
            o, l = checkpoint(
                lambda qs_, k_, v_, sink_, *sa, q0=q0: _slab(qs_, k_, v_, q0, sink_, sa, **kw),
                qs, k, v, sink, *score_args,
                use_reentrant=False,
            )
        else:
            o, l = _slab(qs, k, v, q0, sink, score_args, **kw)
        outs.append(o)
        lses.append(l)
    out = torch.cat(outs, dim=2)
    if return_lse:
        return out, torch.cat(lses, dim=2).float()
    return out
