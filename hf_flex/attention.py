"""The public entry point: flex_attention()."""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import reference
from .autograd import FlexAttentionFunction, KernelSpec
from .block_mask import BlockMask, full_block_mask
from .dispatch import triton_runs_on
from .modtypes import ScoreMod
from .validation import check_inputs

__all__ = ["flex_attention"]


# Under torch.compile (a compiled model, Transformers' generate with a static cache) dynamo must not trace
# into the kernels' launch code: it runs as it is, a graph break around each call.
@torch.compiler.disable
def flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Optional[ScoreMod] = None,
    block_mask: Optional[BlockMask] = None,
    *,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
):
    """Attention with a block-sparse mask and an optional score modification, forward and backward.

    Args:
        query: [B, Hq, Sq, D].
        key:   [B, Hkv, Skv, D]; Hkv divides Hq (GQA needs ``enable_gqa=True``); query head h reads
            key head h // (Hq // Hkv). K/V are never repeated in memory.
        value: [B, Hkv, Skv, Dv]; Dv may differ from D.
        score_mod: an :class:`hf_flex.ScoreMod` applied to the scaled score ``scale * q.k`` before the
            mask (``hf_flex.mods.softcap(50)``, ``alibi``, ``relative_bias``, ``sinks``, ``chain``...).
        block_mask: from :func:`hf_flex.create_block_mask` for exactly (Sq, Skv); ``None`` = no mask.
            Query i and key j are absolute positions 0..Sq-1 and 0..Skv-1 (for a decode step after a
            cache, shift them with ``hf_flex.mods.offset``)::

                causal, Sq = Skv = 4        causal, Sq = 2, Skv = 4, offset(causal(), 2, 0)
                1 0 0 0                     1 1 1 0
                1 1 0 0                     1 1 1 1
                1 1 1 0
                1 1 1 1
        scale: multiplies q.k; default 1 / sqrt(D).
        enable_gqa: allow Hq != Hkv.
        return_lse: also return the log-sum-exp of each row.

    Returns:
        out [B, Hq, Sq, Dv] in the inputs' dtype, and with ``return_lse`` also lse [B, Hq, Sq] float32
        (natural log; with sinks it includes the sink). A row with every key masked gives out 0 and
        lse -inf (no NaN anywhere, gradients included).

    Dtypes: bf16, fp16, fp32. Under ``torch.autocast`` float32 inputs run in the autocast dtype, as
    SDPA's do (mixed-precision training: the residual stream, hence q/k/v after RoPE, is float32). Head dims: multiples of 8 up to 256 (non-powers of two are padded
    inside the kernel). Any Sq, Skv. On CUDA tensors the Triton kernels run; on CPU tensors the
    chunked PyTorch reference runs, unless TRITON_INTERPRET=1 was set before triton was imported, in
    which case the Triton kernels run in Triton's interpreter.

    Compilation: kernels are compiled per (head dims, dtype, tile sizes, mods' Triton functions,
    whether the lengths divide the block size). New sequence lengths, batch sizes and new *values* of
    the tensors a mod reads (document ids, slopes, tables) reuse the compiled kernels. No torch.compile.

    Gradients flow to query, key, value, to the sink logits and to the learnable tensors of the score
    mod (those that require grad). dQ, dK and dV are deterministic (no atomics); learnable score-mod
    tensors are accumulated with float64 atomics.
    """
    if isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor):
        query, key, value = _autocast(query, key, value)
    kernels = isinstance(query, torch.Tensor) and triton_runs_on(query.device)
    check_inputs(query, key, value, score_mod, block_mask, scale, enable_gqa, kernels)
    D = query.shape[-1]
    sm_scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    if not kernels:
        mm = block_mask.mask_mod if block_mask is not None else None
        bh = block_mask.shape[:2] if block_mask is not None else (0, 0)
        return reference.attention(
            query, key, value, score_mod, mm, scale=sm_scale, enable_gqa=True, return_lse=return_lse, mask_bh=bh
        )

    if block_mask is None:
        block_mask = full_block_mask(query.shape[2], key.shape[2], query.device)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    sink = score_mod.sink if score_mod is not None else None
    learnables = tuple(score_mod.learnable_tensors()) if score_mod is not None and score_mod.has_elementwise else ()
    spec = KernelSpec(block_mask, score_mod, sm_scale, return_lse=bool(return_lse))
    out, lse = FlexAttentionFunction.apply(q, k, v, sink, spec, *learnables)
    return (out, lse) if return_lse else out


def _autocast(query, key, value):
    """q, k, v cast to the autocast dtype where autocast is on for their device and they are float32."""
    dev = query.device.type
    if not torch.is_autocast_enabled(dev):
        return query, key, value
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t.dtype == torch.float32 else t for t in (query, key, value))
