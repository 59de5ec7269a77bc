"""Triton kernel that classifies every (query block, key block) of a mask_mod: empty, partial or full.

Evaluates the mask tile by tile, so memory is O(number of blocks) whatever the sequence lengths.
"""

import torch
import triton
import triton.language as tl

EMPTY, PARTIAL, FULL = 0, 1, 2


@triton.jit(do_not_specialize=["stride_ob", "stride_oh", "stride_oq", "NKV", "Q_LEN", "KV_LEN"])
def _classify_blocks_kernel(
    OUT,  # int8 [Bm, Hm, nQ, nKV]
    stride_ob,
    stride_oh,
    stride_oq,
    Hm,
    NKV,
    Q_LEN,
    KV_LEN,
    mask_args,
    MASK_MOD: tl.constexpr,
    Q_BLOCK: tl.constexpr,
    KV_BLOCK: tl.constexpr,
    TILE_N: tl.constexpr,
):
    iq = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hm
    h = bh % Hm
    offs_q = iq * Q_BLOCK + tl.arange(0, Q_BLOCK)
    q_in = offs_q < Q_LEN
    q_idx = tl.minimum(offs_q, Q_LEN - 1)[:, None]
    out_row = OUT + b * stride_ob + h * stride_oh + iq * stride_oq
    for j in range(0, NKV):
        n_allowed = 0
        n_valid = 0
        for t in range(0, KV_BLOCK // TILE_N):
            offs_kv = j * KV_BLOCK + t * TILE_N + tl.arange(0, TILE_N)
            valid = q_in[:, None] & (offs_kv < KV_LEN)[None, :]
            kv_idx = tl.minimum(offs_kv, KV_LEN - 1)[None, :]
            allowed = MASK_MOD(b, h, q_idx, kv_idx, mask_args) & valid
            n_allowed += tl.sum(tl.sum(allowed.to(tl.int32), 1), 0)
            n_valid += tl.sum(tl.sum(valid.to(tl.int32), 1), 0)
        cls = tl.where(n_allowed == 0, 0, tl.where(n_allowed == n_valid, 2, 1))
        tl.store(out_row + j, cls.to(tl.int8))


def classify_blocks(mask_fn, mask_args, Bm, Hm, q_len, kv_len, q_block, kv_block, device) -> torch.Tensor:
    """Block classes [Bm, Hm, cdiv(q_len, q_block), cdiv(kv_len, kv_block)] int8: 0 empty, 1 partial, 2 full.

    ``mask_fn`` is the kernel-form mask (``fn(b, h, q, kv, args)``); ``b`` and ``h`` run over
    ``range(Bm)`` and ``range(Hm)``. Positions past the lengths are ignored in the classification.
    """
    nq, nkv = triton.cdiv(q_len, q_block), triton.cdiv(kv_len, kv_block)
    out = torch.empty((Bm, Hm, nq, nkv), dtype=torch.int8, device=device)
    tile_n = min(kv_block, max(16, 16384 // q_block))
    _classify_blocks_kernel[(nq, Bm * Hm)](
        out,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        Hm,
        nkv,
        q_len,
        kv_len,
        mask_args,
        MASK_MOD=mask_fn,
        Q_BLOCK=q_block,
        KV_BLOCK=kv_block,
        TILE_N=tile_n,
    )
    return out
