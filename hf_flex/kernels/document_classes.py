"""Triton kernel: block classes of causal / sliding-window / bidirectional masks over packed documents.

One launch per block mask, reading only the document ids at block edges: O(blocks), whatever the
sequence length. The rows of ids must be non-decreasing (ids from position_ids or cu_seqlens are, by
construction); in such a row a block's ids run from the id at its first position to the id at its
last, and two blocks share a document iff those ranges meet.
"""

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["stride_b", "stride_ob", "NKV", "Q_LEN", "KV_LEN", "WINDOW"])
def _document_classes_kernel(
    IDS,  # int32 [B, S], S >= max(Q_LEN, KV_LEN), rows non-decreasing
    stride_b,
    OUT,  # int8 [B, nQ, nKV]
    stride_ob,
    NKV,
    Q_LEN,
    KV_LEN,
    WINDOW,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    Q_BLOCK: tl.constexpr,
    KV_BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    i = tl.program_id(0)
    b = tl.program_id(1)
    row = IDS + b * stride_b
    q_lo = i * Q_BLOCK
    q_hi = tl.minimum(q_lo + Q_BLOCK - 1, Q_LEN - 1)
    dq_lo = tl.load(row + q_lo)
    dq_hi = tl.load(row + q_hi)
    out = OUT + b * stride_ob + i * NKV
    for s in range(0, NKV, CHUNK):
        j = s + tl.arange(0, CHUNK)
        m = j < NKV
        kv_lo = j * KV_BLOCK
        kv_hi = tl.minimum(kv_lo + KV_BLOCK - 1, KV_LEN - 1)
        dk_lo = tl.load(row + kv_lo, mask=m, other=0)
        dk_hi = tl.load(row + kv_hi, mask=m, other=0)
        # some pair shares a document / every pair does (one document spans both blocks)
        visited = (dk_hi >= dq_lo) & (dk_lo <= dq_hi)
        full = (dq_lo == dq_hi) & (dk_lo == dq_lo) & (dk_hi == dq_lo)
        if CAUSAL:  # kv <= q
            visited = visited & (kv_lo <= q_hi)
            full = full & (kv_hi <= q_lo)
        if HAS_WINDOW:  # q - WINDOW < kv
            visited = visited & (kv_hi > q_lo - WINDOW)
            full = full & (kv_lo > q_hi - WINDOW)
        cls = tl.where(full, 2, tl.where(visited, 1, 0))
        tl.store(out + j, cls.to(tl.int8), mask=m)


def document_classes(ids: torch.Tensor, q_len: int, kv_len: int, q_block: int, kv_block: int,
                     causal: bool, window) -> torch.Tensor:
    """Block classes [B, 1, nQ, nKV] int8 (0 empty, 1 partial, 2 full) of "same document" AND
    (``causal``: kv <= q) AND (``window``: q - window < kv), for int32 ids [B, S] with non-decreasing
    rows. Empty and full are exact; a partial block may hold no allowed pair only where blocks of
    different sizes straddle a diagonal or a window edge (safe: the kernels evaluate the mask there).
    """
    B = ids.shape[0]
    nq, nkv = triton.cdiv(q_len, q_block), triton.cdiv(kv_len, kv_block)
    out = torch.empty((B, 1, nq, nkv), dtype=torch.int8, device=ids.device)
    _document_classes_kernel[(nq, B)](
        ids, ids.stride(0), out, out.stride(0), nkv, q_len, kv_len, int(window or 0),
        CAUSAL=bool(causal), HAS_WINDOW=window is not None,
        Q_BLOCK=q_block, KV_BLOCK=kv_block, CHUNK=1024,
    )
    return out


@triton.jit(do_not_specialize=["stride_pb", "stride_ob", "S"])
def _ids_from_positions_kernel(POS, stride_pb, OUT, stride_ob, S, CHUNK: tl.constexpr):
    # ids[p] = number of q in (0, p] where pos[q] != pos[q - 1] + 1: a running sum over the row, a
    # chunk at a time, carried between chunks
    b = tl.program_id(0)
    row = POS + b * stride_pb
    out = OUT + b * stride_ob
    carry = tl.full((), 0, tl.int32)
    for s in range(0, S, CHUNK):
        o = s + tl.arange(0, CHUNK)
        m = o < S
        cur = tl.load(row + o, mask=m, other=0)
        prev = tl.load(row + o - 1, mask=m & (o > 0), other=0)
        start = ((o > 0) & (cur != prev + 1) & m).to(tl.int32)
        tl.store(out + o, carry + tl.cumsum(start, 0), mask=m)
        carry += tl.sum(start, 0)


def document_ids_kernel(position_ids: torch.Tensor) -> torch.Tensor:
    """int32 [B, S] document ids from integer position_ids [B, S] (any batch stride), one launch."""
    B, S = position_ids.shape
    out = torch.empty((B, S), dtype=torch.int32, device=position_ids.device)
    _ids_from_positions_kernel[(B,)](position_ids, position_ids.stride(0), out, out.stride(0), S, CHUNK=1024)
    return out
