"""Triton kernels for packed documents: document ids from position_ids, each position's document span
(first and last position, which the attention kernels read instead of the keys' ids), and the eight
block tables of causal / sliding-window / bidirectional masks over them.

One launch each, reading only the document ids at block edges: O(blocks), whatever the sequence
length. The rows of ids must be non-decreasing (ids from position_ids or cu_seqlens are, by
construction); in such a row a block's ids run from the id at its first position to the id at its
last, and two blocks share a document iff those ranges meet.
"""

import torch
import triton
import triton.language as tl

from . import cdiv as _cdiv

from .block_tables import count_or_list, demote_ragged, list_blocks, list_destinations, ragged_tail


@triton.jit
def _document_class(dq_lo, dq_hi, q_lo, q_hi, dk_lo, dk_hi, kv_lo, kv_hi, WINDOW,
                    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Class (0 empty, 1 partial, 2 full) of the block of queries q_lo..q_hi (documents dq_lo..dq_hi)
    and keys kv_lo..kv_hi (documents dk_lo..dk_hi); broadcasts (a row: scalar q, vector kv)."""
    # some pair shares a document / every pair does (one document spans both blocks)
    visited = (dk_hi >= dq_lo) & (dk_lo <= dq_hi)
    full = (dq_lo == dq_hi) & (dk_lo == dq_lo) & (dk_hi == dq_lo)
    if CAUSAL:  # kv <= q
        visited = visited & (kv_lo <= q_hi)
        full = full & (kv_hi <= q_lo)
    if HAS_WINDOW:  # q - WINDOW < kv
        visited = visited & (kv_hi > q_lo - WINDOW)
        full = full & (kv_lo > q_hi - WINDOW)
    return tl.where(full, 2, tl.where(visited, 1, 0))


@triton.jit(do_not_specialize=["stride_b", "stride_s", "NQ", "NKV", "Q_LEN", "KV_LEN", "TAIL_Q", "TAIL_KV", "WINDOW",
                               "kvn_half", "kvi_half", "qn_half", "qi_half"])
def _document_tables_kernel(
    IDS,  # int32 [B, S], S >= max(Q_LEN, KV_LEN), rows non-decreasing
    stride_b,
    stride_s,
    NQ,
    NKV,
    Q_LEN,
    KV_LEN,
    TAIL_Q,  # the ragged last query block (block_tables.ragged_tail), else -1
    TAIL_KV,
    WINDOW,
    KV_NUM,  # int32 [2, B, 1, nQ]: partial counts, then (kvn_half elements further) full counts
    KV_IDX,  # int32 [2, B, 1, nQ, nKV]
    Q_NUM,  # int32 [2, B, 1, nKV]
    Q_IDX,  # int32 [2, B, 1, nKV, nQ]
    kvn_half,
    kvi_half,
    qn_half,
    qi_half,
    KVH_NUM,  # int32 [B, 1, nQ]: live halves of each row's partial key blocks (BlockMask.kv_half_num)
    KVH_IDX,  # int32 [B, 1, nQ, 2 nKV]
    QH_NUM,  # int32 [B, 1, nKV]
    QH_IDX,  # int32 [B, 1, nKV, 2 nQ]
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    Q_BLOCK: tl.constexpr,
    KV_BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
    HALVES: tl.constexpr = False,
):
    # Program r < nQ: the key-block lists of query block r, classifying its row of blocks on the fly;
    # program nQ + c: the query-block lists of key block c (its column). Lists as in block_tables.
    r = tl.program_id(0)
    b = tl.program_id(1)
    row = IDS + b * stride_b
    is_row = r < NQ
    # this program's own block: a query block (row) or a key block (column)
    c = tl.where(is_row, r, r - NQ)
    own_block = tl.where(is_row, Q_BLOCK, KV_BLOCK)
    own_len = tl.where(is_row, Q_LEN, KV_LEN)
    lo = c * own_block
    hi = tl.minimum(lo + own_block - 1, own_len - 1)
    d_lo = tl.load(row + lo * stride_s)
    d_hi = tl.load(row + hi * stride_s)
    L = tl.where(is_row, NKV, NQ)
    num, idx, num_half, idx_half, own_is_tail, other_tail = list_destinations(
        is_row, b, c, NQ, NKV, TAIL_Q, TAIL_KV, KV_NUM, KV_IDX, Q_NUM, Q_IDX, kvn_half, kvi_half, qn_half, qi_half
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
            if is_row:
                k_lo = o * KV_BLOCK
                k_hi = tl.minimum(k_lo + KV_BLOCK - 1, KV_LEN - 1)
                dk_lo = tl.load(row + k_lo * stride_s, mask=m, other=0)
                dk_hi = tl.load(row + k_hi * stride_s, mask=m, other=0)
                cls = _document_class(d_lo, d_hi, lo, hi, dk_lo, dk_hi, k_lo, k_hi, WINDOW, CAUSAL, HAS_WINDOW)
            else:
                q_lo = o * Q_BLOCK
                q_hi = tl.minimum(q_lo + Q_BLOCK - 1, Q_LEN - 1)
                dq_lo = tl.load(row + q_lo * stride_s, mask=m, other=0)
                dq_hi = tl.load(row + q_hi * stride_s, mask=m, other=0)
                cls = _document_class(dq_lo, dq_hi, q_lo, q_hi, d_lo, d_hi, lo, hi, WINDOW, CAUSAL, HAS_WINDOW)
            cls = demote_ragged(cls, own_is_tail, o, other_tail)
            n_p, n_f, sel_p, oth_p, sel_f, oth_f = count_or_list(
                p, cls, o, m, n_p, n_f, sel_p, oth_p, sel_f, oth_f, idx, idx_half
            )
    tl.store(num, n_p)
    tl.store(num + num_half, n_f)
    if HALVES:
        _list_live_halves(row, stride_s, is_row, b, c, d_lo, d_hi, lo, hi, L, NQ, NKV, Q_LEN, KV_LEN, WINDOW,
                          own_is_tail, other_tail, KVH_NUM, KVH_IDX, QH_NUM, QH_IDX,
                          CAUSAL, HAS_WINDOW, Q_BLOCK, KV_BLOCK, CHUNK)


@triton.jit
def _list_live_halves(row, stride_s, is_row, b, c, d_lo, d_hi, lo, hi, L, NQ, NKV, Q_LEN, KV_LEN, WINDOW,
                      own_is_tail, other_tail, KVH_NUM, KVH_IDX, QH_NUM, QH_IDX,
                      CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, Q_BLOCK: tl.constexpr,
                      KV_BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """The half-block list of this program's row (query block c: halves of its partial key blocks) or
    column (key block c: halves of its partial query blocks): the halves holding an allowed pair
    first, ascending, then the others (count in KVH_NUM / QH_NUM). A half is KV_BLOCK / 2 keys (or
    Q_BLOCK / 2 queries), half 2 j + t of block j starting at (2 j + t) * half; one past the length
    holds nothing."""
    if is_row:
        num = KVH_NUM + b * NQ + c
        idx = KVH_IDX + (b * NQ + c) * (2 * NKV)
        other_len = KV_LEN
    else:
        num = QH_NUM + b * NKV + c
        idx = QH_IDX + (b * NKV + c) * (2 * NQ)
        other_len = Q_LEN
    n_live = tl.full((), 0, tl.int32)
    for p in range(2):  # pass 0 counts, pass 1 lists
        sel = tl.full((), 0, tl.int32)
        oth = tl.full((), 0, tl.int32)
        for s in range(0, 2 * L, CHUNK):
            o = s + tl.arange(0, CHUNK)  # half numbers
            m = o < 2 * L
            blk = o // 2
            if is_row:
                half = KV_BLOCK // 2
                b_lo = blk * KV_BLOCK
                b_hi = tl.minimum(b_lo + KV_BLOCK - 1, KV_LEN - 1)
            else:
                half = Q_BLOCK // 2
                b_lo = blk * Q_BLOCK
                b_hi = tl.minimum(b_lo + Q_BLOCK - 1, Q_LEN - 1)
            h_lo = o * half
            h_in = m & (h_lo < other_len)
            h_hi = tl.minimum(h_lo + half - 1, other_len - 1)
            db_lo = tl.load(row + b_lo * stride_s, mask=m, other=0)
            db_hi = tl.load(row + b_hi * stride_s, mask=m, other=0)
            dh_lo = tl.load(row + h_lo * stride_s, mask=h_in, other=0)
            dh_hi = tl.load(row + h_hi * stride_s, mask=h_in, other=0)
            if is_row:  # this program's queries lo..hi against the keys of block / half
                cls = _document_class(d_lo, d_hi, lo, hi, db_lo, db_hi, b_lo, b_hi, WINDOW, CAUSAL, HAS_WINDOW)
                hcls = _document_class(d_lo, d_hi, lo, hi, dh_lo, dh_hi, h_lo, h_hi, WINDOW, CAUSAL, HAS_WINDOW)
            else:  # the queries of block / half against this program's keys lo..hi
                cls = _document_class(db_lo, db_hi, b_lo, b_hi, d_lo, d_hi, lo, hi, WINDOW, CAUSAL, HAS_WINDOW)
                hcls = _document_class(dh_lo, dh_hi, h_lo, h_hi, d_lo, d_hi, lo, hi, WINDOW, CAUSAL, HAS_WINDOW)
            cls = demote_ragged(cls, own_is_tail, blk, other_tail)
            live = ((cls == 1) & (hcls != 0) & h_in).to(tl.int32)
            if p == 0:
                n_live += tl.sum(live, 0)
            else:
                sel, oth = list_blocks(live, o, m, 1, n_live, sel, oth, idx)
    tl.store(num, n_live)


def document_tables(ids: torch.Tensor, q_len: int, kv_len: int, q_block: int, kv_block: int, causal: bool,
                    window, kv_num, kv_idx, q_num, q_idx, halves=None) -> None:
    """Fill the eight block tables (as :func:`~hf_flex.kernels.block_tables.tables_from_classes` lays
    them out, Hm = 1) of "same document" AND (``causal``: kv <= q) AND (``window``: q - window < kv),
    for int32 ids [B, S] with non-decreasing rows (any strides: the packed document mask's ids are a
    view of its spans), in one launch.

    Classes are exact where blocks have one size: empty and full always (the kernels skip an empty
    block and do not evaluate the mask in a full one); with a query block smaller than the key block,
    a block that straddles a diagonal or a window edge may be listed partial and hold no allowed pair
    (safe: the kernels evaluate the mask there). A full block that reaches past a length is listed
    partial (``demote_ragged``).

    ``halves``: also fill the four half-block tables of :func:`~hf_flex.block_mask.half_buffers`
    (BlockMask.kv_half_num ...): per row / column, the halves of its partial blocks that hold an
    allowed pair (exact, from the ids at the halves' edges). Needs even block sizes.
    """
    B = ids.shape[0]
    if halves is not None and (q_block % 2 or kv_block % 2):
        raise ValueError(f"document_tables: half-block tables need even block sizes, got {q_block} x {kv_block}")
    nq, nkv = _cdiv(q_len, q_block), _cdiv(kv_len, kv_block)
    _document_tables_kernel[(nq + nkv, B)](
        ids, ids.stride(0), ids.stride(1), nq, nkv, q_len, kv_len, ragged_tail(q_len, q_block), ragged_tail(kv_len, kv_block),
        int(window or 0),
        kv_num, kv_idx, q_num, q_idx,
        kv_num.stride(0), kv_idx.stride(0), q_num.stride(0), q_idx.stride(0),
        *(halves if halves is not None else (kv_num, kv_idx, q_num, q_idx)),
        CAUSAL=bool(causal), HAS_WINDOW=window is not None,
        Q_BLOCK=q_block, KV_BLOCK=kv_block, CHUNK=1024, HALVES=halves is not None,
    )


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min_combine(a, b):
    return tl.minimum(a, b)


@triton.jit
def _starts(row, o, m, POSITIONS: tl.constexpr):
    """Where a document starts after the row's first position, for positions ``o`` (in range: ``m``)
    of a row of document ids, or of positions (POSITIONS: where a position is not the previous + 1)."""
    cur = tl.load(row + o, mask=m, other=0)
    prev = tl.load(row + o - 1, mask=m & (o > 0), other=0)
    if POSITIONS:
        new = cur != prev + 1
    else:
        new = cur != prev
    return (o > 0) & new & m


@triton.jit
def _store_lo(spans, o, m, first, carry):
    """Pass 1 of a row's spans, one chunk: lo = the last document start at or before each position
    (``first``: the position where a document starts, else 0; position 0 starts one either way),
    carried from earlier chunks."""
    tl.store(spans + o, tl.maximum(tl.associative_scan(first, 0, _max_combine), carry).to(tl.int64), mask=m)
    return tl.maximum(carry, tl.max(first, 0))


@triton.jit
def _add_hi(row, spans, S, CHUNK: tl.constexpr, POSITIONS: tl.constexpr):
    """Pass 2 of a row's spans, right to left: hi = the first document end at or after each position,
    or'ed into the lo that pass 1 stored. The row holds document ids, or positions (POSITIONS: a
    document ends where the next position is not this one + 1)."""
    tl.debug_barrier()  # this pass reads what other threads of the program stored in pass 1
    carry = S - 1
    n = tl.cdiv(S, CHUNK)
    for j in range(0, n):
        o = (n - 1 - j) * CHUNK + tl.arange(0, CHUNK)
        m = o < S
        cur = tl.load(row + o, mask=m, other=0)
        nxt = tl.load(row + o + 1, mask=m & (o + 1 < S), other=0)
        if POSITIONS:
            ends = nxt != cur + 1
        else:
            ends = nxt != cur
        last = tl.where(m & ((o == S - 1) | ends), o, S)
        hi = tl.minimum(tl.associative_scan(last, 0, _min_combine, reverse=True), carry)
        lo = tl.load(spans + o, mask=m, other=0)
        tl.store(spans + o, lo | (hi.to(tl.int64) << 32), mask=m)
        carry = tl.minimum(carry, tl.min(last, 0))


@triton.jit(do_not_specialize=["stride_ib", "stride_ob", "S"])
def _spans_kernel(IDS, stride_ib, OUT, stride_ob, S, CHUNK: tl.constexpr):
    # OUT[b, p] = lo | hi << 32, lo / hi the first / last position of p's document in a non-decreasing
    # row of ids: lo a running max of document starts (left to right), hi a running min of document
    # ends (right to left), each carried between chunks
    b = tl.program_id(0)
    row = IDS + b * stride_ib
    out = OUT + b * stride_ob
    carry = tl.full((), 0, tl.int32)
    for s in range(0, S, CHUNK):
        o = s + tl.arange(0, CHUNK)
        m = o < S
        carry = _store_lo(out, o, m, tl.where(_starts(row, o, m, False), o, 0), carry)
    _add_hi(row, out, S, CHUNK, False)


def document_spans_kernel(ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """int64 [B, S]: lo | hi << 32, the first and last position of each position's document, for
    non-decreasing ids [B, S] (any batch stride, contiguous rows). One launch."""
    B, S = ids.shape
    out = torch.empty((B, S), dtype=torch.int64, device=ids.device)
    _spans_kernel[(B,)](ids, ids.stride(0), out, out.stride(0), S, CHUNK=chunk)
    return out


@triton.jit(do_not_specialize=["stride_pb", "stride_ob", "stride_sb", "S"])
def _ids_from_positions_kernel(POS, stride_pb, OUT, stride_ob, SPANS, stride_sb, S, CHUNK: tl.constexpr,
                               WITH_SPANS: tl.constexpr):
    # ids[p] = number of q in (0, p] where pos[q] != pos[q - 1] + 1: a running sum over the row, a
    # chunk at a time, carried between chunks. WITH_SPANS: also SPANS[p] = lo | hi << 32 (the first and
    # last position of p's document, mods.document_spans): lo in this pass, hi in a second one
    b = tl.program_id(0)
    row = POS + b * stride_pb
    out = OUT + b * stride_ob
    spans = SPANS + b * stride_sb
    carry = tl.full((), 0, tl.int32)
    carry_lo = tl.full((), 0, tl.int32)
    for s in range(0, S, CHUNK):
        o = s + tl.arange(0, CHUNK)
        m = o < S
        start = _starts(row, o, m, True)
        tl.store(out + o, carry + tl.cumsum(start.to(tl.int32), 0), mask=m)
        carry += tl.sum(start.to(tl.int32), 0)
        if WITH_SPANS:
            carry_lo = _store_lo(spans, o, m, tl.where(start, o, 0), carry_lo)
    if WITH_SPANS:
        _add_hi(row, spans, S, CHUNK, True)


def document_ids_kernel(position_ids: torch.Tensor, with_spans: bool = False, chunk: int = 1024):
    """int32 [B, S] document ids from integer position_ids [B, S] (any batch stride), one launch.
    ``with_spans``: (ids, spans), spans the int64 [B, S] of mods.document_spans(ids), same launch."""
    B, S = position_ids.shape
    out = torch.empty((B, S), dtype=torch.int32, device=position_ids.device)
    spans = torch.empty((B, S), dtype=torch.int64, device=position_ids.device) if with_spans else out
    _ids_from_positions_kernel[(B,)](position_ids, position_ids.stride(0), out, out.stride(0), spans, spans.stride(0),
                                     S, CHUNK=chunk, WITH_SPANS=with_spans)
    return (out, spans) if with_spans else out
