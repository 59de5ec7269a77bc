"""Triton kernel that classifies every (query block, key block) of a mask_mod: empty, partial or full.

Evaluates the mask tile by tile, so memory is O(number of blocks) whatever the sequence lengths.
"""

import torch
import triton
import triton.language as tl

from . import cdiv as _cdiv

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
    nq, nkv = _cdiv(q_len, q_block), _cdiv(kv_len, kv_block)
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


@triton.jit
def list_blocks(cls, o, m, code, n_sel, sel, oth, idx):
    """Scatter block numbers ``o`` (one chunk of a row or column; ``m`` = in range) into the index list
    ``idx``: blocks of class ``code`` first, at ``sel`` + their rank, the others after all ``n_sel``
    selected ones, at ``n_sel + oth`` + their rank. Returns the updated (sel, oth) counts."""
    is_sel = ((cls == code) & m).to(tl.int32)
    is_oth = ((cls != code) & m).to(tl.int32)
    pos = tl.where(is_sel != 0, sel + tl.cumsum(is_sel, 0) - is_sel, n_sel + oth + tl.cumsum(is_oth, 0) - is_oth)
    tl.store(idx + pos, o, mask=m)
    return sel + tl.sum(is_sel, 0), oth + tl.sum(is_oth, 0)


@triton.jit
def demote_ragged(cls, own_is_tail, o, other_tail):
    """Classes ``cls`` of one chunk of a row or column (block numbers ``o``), with the full blocks that
    reach past a length made partial: the row/column's own block is the ragged last one
    (``own_is_tail``), or a block of the chunk is (``o == other_tail``; -1 when that length divides
    its block). The kernels visit a full block without any check, so every full block must lie
    inside the lengths (BlockMask.tail_partial); the check for keys past the end lives in the
    partial-block loop alone."""
    return tl.where((cls == 2) & (own_is_tail | (o == other_tail)), 1, cls)


@triton.jit
def count_or_list(p, cls, o, m, n_p, n_f, sel_p, oth_p, sel_f, oth_f, idx, idx_half):
    """One chunk of a row or column of block classes ``cls`` (block numbers ``o``, ``m`` = in range).
    Pass p = 0 counts the partial (n_p) and full (n_f) blocks; pass 1 lists them, partial blocks in
    ``idx``, full ones in ``idx + idx_half``. Returns the updated counters."""
    if p == 0:
        n_p += tl.sum(((cls == 1) & m).to(tl.int32), 0)
        n_f += tl.sum(((cls == 2) & m).to(tl.int32), 0)
    else:
        sel_p, oth_p = list_blocks(cls, o, m, 1, n_p, sel_p, oth_p, idx)
        sel_f, oth_f = list_blocks(cls, o, m, 2, n_f, sel_f, oth_f, idx + idx_half)
    return n_p, n_f, sel_p, oth_p, sel_f, oth_f


@triton.jit
def list_destinations(is_row, bh, i, NQ, NKV, TAIL_Q, TAIL_KV, KV_NUM, KV_IDX, Q_NUM, Q_IDX,
                      kvn_half, kvi_half, qn_half, qi_half):
    """Where the lists of row i (query block i: kv tables) or column i (key block i: q tables) of
    batch-head bh go: (count pointer, index-row pointer, half strides of both), and the arguments of
    :func:`demote_ragged` for it: whether block i is the ragged last one of its direction, and the
    ragged last block of the other direction (TAIL_Q / TAIL_KV from :func:`ragged_tail`)."""
    if is_row:
        num = KV_NUM + bh * NQ + i
        idx = KV_IDX + (bh * NQ + i) * NKV
        num_half = kvn_half
        idx_half = kvi_half
        own_is_tail = i == TAIL_Q
        other_tail = TAIL_KV
    else:
        num = Q_NUM + bh * NKV + i
        idx = Q_IDX + (bh * NKV + i) * NQ
        num_half = qn_half
        idx_half = qi_half
        own_is_tail = i == TAIL_KV
        other_tail = TAIL_Q
    return num, idx, num_half, idx_half, own_is_tail, other_tail


@triton.jit(do_not_specialize=["s_b", "s_h", "s_q", "s_kv", "NQ", "NKV", "TAIL_Q", "TAIL_KV",
                               "kvn_half", "kvi_half", "qn_half", "qi_half"])
def _tables_kernel(
    CLS,  # int8 classes [Bm, Hm, nQ, nKV], any strides (an expanded view is fine)
    s_b,
    s_h,
    s_q,
    s_kv,
    Hm,
    NQ,
    NKV,
    TAIL_Q,  # the ragged last query block (the query length does not divide the block), else -1
    TAIL_KV,  # the same for keys
    KV_NUM,  # int32 [2, Bm, Hm, nQ]: partial counts, then (kvn_half elements further) full counts
    KV_IDX,  # int32 [2, Bm, Hm, nQ, nKV]
    Q_NUM,  # int32 [2, Bm, Hm, nKV]
    Q_IDX,  # int32 [2, Bm, Hm, nKV, nQ]
    kvn_half,
    kvi_half,
    qn_half,
    qi_half,
    CHUNK: tl.constexpr,
):
    # Program r < nQ lists the key blocks of query block r (a row of classes), program nQ + c the
    # query blocks of key block c (a column). Each list: the selected blocks in ascending order, then
    # the others, also ascending (what a stable argsort gives; the kernels may prefetch past a count).
    r = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hm
    h = bh % Hm
    base = CLS + b * s_b + h * s_h
    is_row = r < NQ
    c = tl.where(is_row, r, r - NQ)
    if is_row:
        line = base + c * s_q
        step = s_kv
        L = NKV
    else:
        line = base + c * s_kv
        step = s_q
        L = NQ
    num, idx, num_half, idx_half, own_is_tail, other_tail = list_destinations(
        is_row, bh, c, NQ, NKV, TAIL_Q, TAIL_KV, KV_NUM, KV_IDX, Q_NUM, Q_IDX, kvn_half, kvi_half, qn_half, qi_half
    )
    n_p = tl.full((), 0, tl.int32)
    n_f = tl.full((), 0, tl.int32)
    for p in range(2):  # pass 0 counts the partial and full blocks, pass 1 lists them
        sel_p = tl.full((), 0, tl.int32)
        oth_p = tl.full((), 0, tl.int32)
        sel_f = tl.full((), 0, tl.int32)
        oth_f = tl.full((), 0, tl.int32)
        for s in range(0, L, CHUNK):
            o = s + tl.arange(0, CHUNK)
            m = o < L
            cls = demote_ragged(tl.load(line + o * step, mask=m, other=0), own_is_tail, o, other_tail)
            n_p, n_f, sel_p, oth_p, sel_f, oth_f = count_or_list(
                p, cls, o, m, n_p, n_f, sel_p, oth_p, sel_f, oth_f, idx, idx_half
            )
    tl.store(num, n_p)
    tl.store(num + num_half, n_f)


def ragged_tail(length: int, block: int) -> int:
    """The index of the last block when ``length`` does not fill it (``length % block != 0``), else -1."""
    return -(-length // block) - 1 if length % block else -1


def tables_from_classes(classes: torch.Tensor, q_len: int, kv_len: int, block_size, kv_num, kv_idx, q_num, q_idx) -> None:
    """Fill the eight block tables from classes [Bm, Hm, nQ, nKV] (0 empty, 1 partial, 2 full), in one launch.

    A full block that reaches past ``q_len`` or ``kv_len`` (the last block, where a length does not
    divide its ``block_size`` entry) is listed partial (see :func:`demote_ragged`).

    ``kv_num`` [2, Bm, Hm, nQ], ``kv_idx`` [2, Bm, Hm, nQ, nKV], ``q_num`` [2, Bm, Hm, nKV], ``q_idx``
    [2, Bm, Hm, nKV, nQ] are int32, each half contiguous (half 0: partial blocks, half 1: full
    blocks); the two halves of a pair may lie apart (``stride(0)``). Index rows list the selected blocks
    in ascending order, then the others in ascending order: what a stable argsort of "not selected"
    gives, so every index in a row is in range.
    """
    Bm, Hm, nq, nkv = classes.shape
    qb, kb = block_size
    _tables_kernel[(nq + nkv, Bm * Hm)](
        classes, classes.stride(0), classes.stride(1), classes.stride(2), classes.stride(3),
        Hm, nq, nkv, ragged_tail(q_len, qb), ragged_tail(kv_len, kb),
        kv_num, kv_idx, q_num, q_idx,
        kv_num.stride(0), kv_idx.stride(0), q_num.stride(0), q_idx.stride(0),
        CHUNK=1024,  # one compiled variant for every length: rows longer than this loop
    )
