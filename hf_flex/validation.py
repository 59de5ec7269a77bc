"""Input checks for flex_attention: each failure names the argument and what was expected."""

from __future__ import annotations

from typing import Optional

import torch

from .block_mask import BlockMask
from .modtypes import ScoreMod

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _head_dim_ok(d: int) -> bool:
    # non-powers of two are padded inside the kernels; multiples of 8 keep rows 16-byte aligned in bf16
    return 16 <= d <= MAX_HEAD_DIM and d % 8 == 0


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    score_mod: Optional[ScoreMod],
    block_mask: Optional[BlockMask],
    scale,
    enable_gqa: bool,
    kernels: bool,
) -> None:
    """Raise a ValueError / TypeError naming the offending argument; return None when all is well.

    ``kernels``: whether the Triton kernels will run (head-dim and dtype limits apply only there).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flex_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"flex_attention: {name} must be 4-D [batch, heads, seq_len, head_dim], got shape {tuple(t.shape)}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flex_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    allowed = SUPPORTED_DTYPES if kernels else SUPPORTED_DTYPES + (torch.float64,)
    if q.dtype not in allowed:
        raise ValueError(f"flex_attention: q dtype {q.dtype} is not supported; use one of {allowed}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flex_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, HQ, SQ, D = q.shape
    Bk, HKV, SKV, Dk = k.shape
    Bv, HV, SV, DV = v.shape
    if Bk != B or Bv != B:
        raise ValueError(f"flex_attention: batch sizes differ: q {B}, k {Bk}, v {Bv}")
    if Dk != D:
        raise ValueError(f"flex_attention: k head_dim {Dk} must equal q head_dim {D}")
    if HV != HKV or SV != SKV:
        raise ValueError(f"flex_attention: v shape {tuple(v.shape)} must match k in heads and seq_len {tuple(k.shape)}")
    if SQ == 0 or SKV == 0 or B == 0 or HQ == 0:
        raise ValueError(f"flex_attention: empty input (q {tuple(q.shape)}, k {tuple(k.shape)})")
    if HQ != HKV:
        if HQ % HKV != 0:
            raise ValueError(f"flex_attention: q heads ({HQ}) must be a multiple of k/v heads ({HKV})")
        if not enable_gqa:
            raise ValueError(
                f"flex_attention: q has {HQ} heads and k/v {HKV}; pass enable_gqa=True for grouped-query attention"
            )
    if kernels:
        for name, d in (("head_dim (q, k)", D), ("head_dim (v)", DV)):
            if not _head_dim_ok(d):
                raise ValueError(
                    f"flex_attention: {name} = {d} is not supported: use a multiple of 8 in [16, {MAX_HEAD_DIM}]"
                )
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"flex_attention: scale must be a float or None, got {type(scale).__name__}")
    if score_mod is not None:
        if not isinstance(score_mod, ScoreMod):
            raise TypeError(
                "flex_attention: score_mod must be an hf_flex ScoreMod (a Triton function plus its PyTorch twin, "
                f"see hf_flex.mods), got {type(score_mod).__name__}"
            )
        for i, a in enumerate(score_mod.args):
            if isinstance(a, torch.Tensor) and a.device != q.device:
                raise ValueError(f"flex_attention: score_mod {score_mod.name} args[{i}] is on {a.device}, q on {q.device}")
        if score_mod.sink is not None:
            s = score_mod.sink
            if s.shape != (HQ,):
                raise ValueError(f"flex_attention: sinks logit must have shape [{HQ}] (query heads), got {tuple(s.shape)}")
            if s.device != q.device:
                raise ValueError(f"flex_attention: sinks logit is on {s.device}, q on {q.device}")
        if kernels and score_mod.needs_param_grad() and score_mod.param_grad_fn is None:
            raise ValueError(
                f"flex_attention: score_mod {score_mod.name} has tensors that require grad but no param_grad_fn"
            )
    if block_mask is not None:
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"flex_attention: block_mask must be an hf_flex BlockMask, got {type(block_mask).__name__}")
        if tuple(block_mask.seq_lengths) != (SQ, SKV):
            raise ValueError(
                f"flex_attention: block_mask was built for (Q_LEN, KV_LEN) = {tuple(block_mask.seq_lengths)}, "
                f"but q/k have ({SQ}, {SKV})"
            )
        Bm, Hm = block_mask.shape[:2]
        if Bm not in (1, B):
            raise ValueError(f"flex_attention: block_mask batch {Bm} must be 1 or the batch size {B}")
        if Hm not in (1, HQ):
            raise ValueError(f"flex_attention: block_mask heads {Hm} must be 1 or the number of query heads {HQ}")
        if block_mask.device != q.device:
            raise ValueError(f"flex_attention: block_mask is on {block_mask.device}, q on {q.device}; use block_mask.to()")
        for i, a in enumerate(block_mask.mask_mod.args):
            if isinstance(a, torch.Tensor) and a.device != q.device:
                raise ValueError(
                    f"flex_attention: block_mask's mask_mod {block_mask.mask_mod.name} args[{i}] is on {a.device}, q on {q.device}"
                )
