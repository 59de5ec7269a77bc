"""Kernels for causal attention over packed documents, in tiles aligned to each document's start.

The block-sparse kernels (forward.py, backward.py) cut every row into TILE-position blocks counted
from position 0: a document starting inside a block shares it with the one before, so every row of
blocks holds two partial blocks (the document's first, which also holds the previous document's
tail, and the diagonal), and partial blocks cost the mask's evaluation and its span loads. Here the
tiles start at each document's first position, as FlashAttention's variable-length kernels do: tile
i of a document holds its positions lo + i * TILE .. lo + (i + 1) * TILE - 1 (the last tile ragged),
sees keys lo .. lo + i * TILE - 1 whole (no mask), and one diagonal tile under the causal mask alone
(keys past the document's end are past every query of the tile: the causal mask removes them). No
block table is read: the loops walk consecutive key (or query) tiles from a position.

The tile lists (launch_varlen.varlen_tiles): per batch row, the first position of every tile in two
orders, and their count: query-major (forward, dQ: tiles with more keys before them first) and
key-major (dK/dV: tiles with more queries after them first), longest first. The count of tiles is
only known on the device, and it exceeds N_PROGRAMS = cdiv(S, TILE) by up to one per document. A
forward or dQ program walks tiles t, t + N_PROGRAMS, ... of its row's list; a dK/dV program takes
one of the first N_PROGRAMS tiles, and N_OVER more programs walk the rest (the dK/dV loops spilled
registers under a loop over tiles).

Allowed pairs: kv <= q and both in one document, i.e. ``and_masks(causal(), document(ids))`` of
non-decreasing ids; the score mod, sinks and GQA as in the block-sparse kernels.
"""

import triton
import triton.language as tl

from .backward import _dkdv_inner, _dq_inner, load_pair, row_inputs, store_pair, store_tile
from .forward import _fwd_inner, store_rows, tile_and_head, tile_rows


@triton.jit
def _causal(b, h, q, kv, args):
    # the diagonal tile's mask: in a document-aligned tile, kv <= q is the whole predicate for every
    # query the kernels store
    return kv <= q


@triton.jit
def doc_tile(TILES, SPANS, b, t, stride_tb, stride_sb):
    """(first position, document's first position, document's end) of tile ``t`` of row ``b``'s list;
    SPANS [B, S] int64 ``lo | hi << 32`` (mods.document_spans), hi the document's last position."""
    start = tl.load(TILES + b * stride_tb + t).to(tl.int32)  # int16 lists where positions fit
    sp = tl.load(SPANS + b * stride_sb + start)
    # lo < 2**31: the truncation to 32 bits is lo itself
    return start, sp.to(tl.int32), (sp >> 32).to(tl.int32) + 1


_FWD_DYNAMIC = ["stride_lb", "stride_lh", "stride_tb", "stride_sb", "stride_nb", "N_PROGRAMS", "Q_LEN"]


@triton.jit(do_not_specialize=_FWD_DYNAMIC)
def attn_fwd_varlen_kernel(
    Q, K, V, O, LSE, SINK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh,
    TILES, N_TILES, SPANS, stride_tb, stride_sb, stride_nb, N_PROGRAMS,
    Q_LEN, HQ, GROUP, sm_scale,
    score_args,
    SCORE_MOD: tl.constexpr,
    HAS_SINK: tl.constexpr,
    TILE: tl.constexpr,  # queries per tile (BLOCK_M): the tile list's unit
    BLOCK_N: tl.constexpr,  # keys per step of the diagonal tile's loop (mask evaluated)
    BLOCK_N_FULL: tl.constexpr,  # keys per step of the loop over earlier keys (no mask)
    D: tl.constexpr,
    DP: tl.constexpr,
    DV: tl.constexpr,
    DVP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    HEADS_FIRST: tl.constexpr = False,
    ONE_LOOP: tl.constexpr = False,  # one loop of BLOCK_N-key steps over the tile's keys, masked throughout
    K_DESC=None,  # with V_DESC: tensor descriptors (BLOCK_N_FULL-key boxes) of the no-mask loop (TMA)
    V_DESC=None,
    K_DESC_PARTIAL=None,  # the same with BLOCK_N-key boxes, for the diagonal tile
    V_DESC_PARTIAL=None,
):
    """Output and LSE (log2 units, as attn_fwd_kernel writes them) of the tiles of one (batch, query
    head) this program walks."""
    pid_t, pid_bh = tile_and_head(HEADS_FIRST, False)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    K_ptr = K + b * stride_kb + hk * stride_kh
    V_ptr = V + b * stride_vb + hk * stride_vh
    offs_d = tl.arange(0, DP)
    n_tiles = tl.load(N_TILES + b * stride_nb)
    for t in range(pid_t, n_tiles, N_PROGRAMS):
        start_m, lo, end = doc_tile(TILES, SPANS, b, t, stride_tb, stride_sb)
        q_end = tl.minimum(start_m + TILE, end)
        offs_m, q_in, q_idx = tile_rows(start_m, q_end, Q_LEN, TILE)
        q = tl.load(
            Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
            mask=q_in[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        m_i = tl.full([TILE], float("-inf"), tl.float32)
        l_i = tl.zeros([TILE], tl.float32)
        acc = tl.zeros([TILE, DVP], tl.float32)
        if ONE_LOOP:  # keys lo .. q_end - 1 in one loop, the causal mask evaluated throughout
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                None, tl.cdiv(q_end - lo, BLOCK_N), b, h, b, h, q_idx, Q_LEN, sm_scale, (),
                score_args, _causal, SCORE_MOD, True, False, BLOCK_N, BLOCK_N, D, DP, DV, DVP, DOT_PREC,
                False, K_DESC_PARTIAL, V_DESC_PARTIAL, hk, base=lo,
            )
        else:
            # the diagonal tile: keys start_m .. q_end - 1 under the causal mask (keys past q_end, in
            # the next document or past the end, are past every stored query)
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                None, tl.cdiv(q_end - start_m, BLOCK_N), b, h, b, h, q_idx, Q_LEN, sm_scale, (),
                score_args, _causal, SCORE_MOD, True, False, BLOCK_N, BLOCK_N, D, DP, DV, DVP, DOT_PREC,
                False, K_DESC_PARTIAL, V_DESC_PARTIAL, hk, base=start_m,
            )
            # the document's earlier keys lo .. start_m - 1 (a multiple of TILE of them): all allowed
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                None, (start_m - lo) // BLOCK_N_FULL, b, h, b, h, q_idx, Q_LEN, sm_scale, (),
                score_args, _causal, SCORE_MOD, False, True, BLOCK_N_FULL, BLOCK_N_FULL, D, DP, DV, DVP,
                DOT_PREC, False, K_DESC, V_DESC, hk, base=lo,
            )
        store_rows(acc, l_i, m_i, SINK, O, LSE, b, h, offs_m, q_in, stride_ob, stride_oh, stride_om, stride_od,
                   stride_lb, stride_lh, HAS_SINK, DV, DVP)


@triton.jit
def _dkdv_tile(
    t, b, hk, tensors, strides, TILES, SPANS, stride_tb, stride_sb, Q_LEN, GROUP, sm_scale, score_args,
    Q_DESC, DO_DESC, DQ_DESC,
    SCORE_MOD: tl.constexpr, SCORE_GRAD: tl.constexpr, ATOMIC_DQ: tl.constexpr, TILE: tl.constexpr,
    DKDV_BLOCK_M: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
    DOT_PREC: tl.constexpr, FLAT_GROUP: tl.constexpr, ONE_LOOP: tl.constexpr, DP_FIRST: tl.constexpr,
    ROW_SELECT: tl.constexpr,
):
    """dK, dV of tile ``t`` of row ``b``'s key-major list (TILES: that list; tiles with more of their
    document after them, more queries, first) for key head ``hk``: the tile's diagonal queries and the
    document's later ones, over the GROUP query heads that read ``hk``. ``tensors`` and ``strides``:
    the kernel's, as attn_bwd_varlen_kernel packs them (one argument list for its two call sites)."""
    Q, K, V, DO, DQ, DK, DV_, LSE, DELTA = tensors
    (stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
     stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
     stride_dqb, stride_dqh, stride_dqm, stride_dqd, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
     stride_dvb, stride_dvh, stride_dvn, stride_dvd, stride_lb, stride_lh) = strides
    start_n, lo, end = doc_tile(TILES, SPANS, b, t, stride_tb, stride_sb)
    kv_end = tl.minimum(start_n + TILE, end)
    offs_n, kv_in, kv_idx = tile_rows(start_n, kv_end, Q_LEN, TILE)
    k, v = load_pair(K + b * stride_kb + hk * stride_kh, V + b * stride_vb + hk * stride_vh, offs_n, kv_in,
                     stride_kn, stride_kd, stride_vn, stride_vd, D, DP, DV, DVP)
    dk = tl.zeros([TILE, DP], tl.float32)
    dv = tl.zeros([TILE, DVP], tl.float32)
    n_passes = GROUP
    n_heads = 1
    if FLAT_GROUP:
        n_passes = 1
        n_heads = GROUP
    # queries past the document's end (``end`` as the loops' query length) read LSE +inf:
    # they add nothing
    # the later queries: n_full whole steps, then a ragged one (tail: 0 or 1) walked with the
    # diagonal's steps, whose query checks it needs
    n_later = tl.maximum(end - (start_n + TILE), 0)
    n_full = n_later // DKDV_BLOCK_M
    tail = (n_later % DKDV_BLOCK_M > 0).to(tl.int32)
    for g in range(0, n_passes):
        h = hk * GROUP + g
        Q_ptr = Q + b * stride_qb + h * stride_qh
        DO_ptr = DO + b * stride_dob + h * stride_doh
        LSE_ptr = LSE + b * stride_lb + h * stride_lh
        DELTA_ptr = DELTA + b * stride_lb + h * stride_lh
        DQ_ptr = DQ + b * stride_dqb + h * stride_dqh
        if ONE_LOOP:  # queries start_n .. end - 1 in one loop, masked and checked throughout
            dk, dv = _dkdv_inner(
                dk, dv, k, v, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, stride_qm, stride_qd, stride_dom,
                stride_dod, None, tl.cdiv(end - start_n, DKDV_BLOCK_M), b, h, b, h, kv_idx,
                kv_in[:, None], end, sm_scale, (), score_args, DQ_ptr, stride_dqm, stride_dqd, Q_DESC, DO_DESC, h,
                _causal, SCORE_MOD, SCORE_GRAD, ATOMIC_DQ, True, False, True, DKDV_BLOCK_M, DKDV_BLOCK_M,
                D, DP, DV, DVP, DOT_PREC, False, None, 0,
                FLAT_GROUP, n_heads, stride_qh, stride_doh, stride_lh, stride_dqh, base=start_n, DQ_DESC=DQ_DESC, DP_FIRST=DP_FIRST,
                ROW_SELECT=ROW_SELECT,
            )
        else:
            # the diagonal tile (queries start_n .. kv_end - 1, causal), then the ragged last
            # step of the later queries (the causal mask holds there; the query checks matter)
            dk, dv = _dkdv_inner(
                dk, dv, k, v, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, stride_qm, stride_qd, stride_dom,
                stride_dod, None, tl.cdiv(kv_end - start_n, DKDV_BLOCK_M), b, h, b, h, kv_idx,
                kv_in[:, None], end, sm_scale, (), score_args, DQ_ptr, stride_dqm, stride_dqd, Q_DESC, DO_DESC, h,
                _causal, SCORE_MOD, SCORE_GRAD, ATOMIC_DQ, True, False, True, DKDV_BLOCK_M, DKDV_BLOCK_M,
                D, DP, DV, DVP, DOT_PREC, False, None, tail,
                FLAT_GROUP, n_heads, stride_qh, stride_doh, stride_lh, stride_dqh, DQ_DESC=DQ_DESC, DP_FIRST=DP_FIRST,
                ROW_SELECT=ROW_SELECT,
                base=start_n, base2=start_n + TILE + n_full * DKDV_BLOCK_M,
            )
            # the document's later queries in whole steps: all allowed, all in the document
            dk, dv = _dkdv_inner(
                dk, dv, k, v, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, stride_qm, stride_qd, stride_dom,
                stride_dod, None, n_full, b, h, b, h, kv_idx, kv_in[:, None],
                end, sm_scale, (), score_args, DQ_ptr, stride_dqm, stride_dqd, Q_DESC, DO_DESC, h,
                _causal, SCORE_MOD, SCORE_GRAD, ATOMIC_DQ, False, True, True, DKDV_BLOCK_M, DKDV_BLOCK_M,
                D, DP, DV, DVP, DOT_PREC, False, None, 0,
                FLAT_GROUP, n_heads, stride_qh, stride_doh, stride_lh, stride_dqh, base=start_n + TILE, DQ_DESC=DQ_DESC, DP_FIRST=DP_FIRST,
                ROW_SELECT=ROW_SELECT,
            )
    store_pair(DK + b * stride_dkb + hk * stride_dkh, DV_ + b * stride_dvb + hk * stride_dvh, dk * sm_scale,
               dv, offs_n, kv_in, stride_dkn, stride_dkd, stride_dvn, stride_dvd, D, DP, DV, DVP)


_BWD_DYNAMIC = _FWD_DYNAMIC + ["N_DKDV", "N_OVER", "stride_to"]


@triton.jit(do_not_specialize=_BWD_DYNAMIC)
def attn_bwd_varlen_kernel(
    Q, K, V, DO, DQ, DK, DV_, LSE, DELTA,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_lb, stride_lh,
    TILES, N_TILES, SPANS, stride_tb, stride_to, stride_sb, stride_nb, N_PROGRAMS, N_OVER,
    Q_LEN, HQ, HKV, GROUP, sm_scale, N_DKDV,
    score_args, score_grads,
    SCORE_MOD: tl.constexpr,
    SCORE_GRAD: tl.constexpr,
    SCORE_PARAM_GRAD: tl.constexpr,
    TILE: tl.constexpr,  # keys per dK/dV program and queries per dQ program: the tile list's unit
    DKDV_BLOCK_M: tl.constexpr,  # queries per step of the dK/dV loops
    DQ_BLOCK_N: tl.constexpr,  # keys per step of the dQ loops
    D: tl.constexpr,
    DP: tl.constexpr,
    DV: tl.constexpr,
    DVP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    FLAT_GROUP: tl.constexpr = False,  # one loop over the GQA group's query heads (_dkdv_inner's FLAT)
    ONE_LOOP: tl.constexpr = False,  # each program's steps in one loop, masked and checked throughout
    Q_DESC=None, DO_DESC=None, K_DESC=None, V_DESC=None,  # tensor descriptors (TMA), or pointer loads
    ATOMIC_DQ: tl.constexpr = False,  # the dK/dV programs add dQ into DQ (float32, zeroed); no dQ programs
    DQ_DESC=None,  # ATOMIC_DQ: a descriptor over DQ for the bulk reduction (TMA), or pointer atomics
    DP_FIRST: tl.constexpr = False,  # see backward._dkdv_inner
    ROW_SELECT: tl.constexpr = False,  # see backward._dkdv_inner
):
    """dK, dV (programs 0 .. N_DKDV - 1: tile slot major, (batch, key head) minor; slots 0 ..
    N_PROGRAMS - 1 one tile each, the N_OVER slots after them the rest of the list) and dQ (the rest
    of the programs: slot major, (batch, query head) minor, walking tiles t, t + N_PROGRAMS, ...); no
    atomics. ATOMIC_DQ: only
    the N_DKDV programs, each adding its keys' share of dQ (_dkdv_inner's ATOMIC_DQ): five tile
    products per tile pair instead of seven, dQ's summation order (its last bits) varying run to run."""
    pid = tl.program_id(0)
    if ATOMIC_DQ or pid < N_DKDV:
        n_kv_heads = N_DKDV // (N_PROGRAMS + N_OVER)  # B * HKV
        grp = pid % n_kv_heads
        b = grp // HKV
        hk = grp % HKV
        n_tiles = tl.load(N_TILES + b * stride_nb)
        slot = pid // n_kv_heads
        tensors = (Q, K, V, DO, DQ, DK, DV_, LSE, DELTA)
        strides = (stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
                   stride_dqb, stride_dqh, stride_dqm, stride_dqd, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                   stride_dvb, stride_dvh, stride_dvn, stride_dvd, stride_lb, stride_lh)
        if slot < N_PROGRAMS:
            # one tile per program: a loop over tiles here kept its state in registers through the
            # inner loops, which then spilled (ptxas, sm_90, Triton 3.6: 42 spill stores and 42
            # loads per step of the diagonal's loop; 2 and 4 without the loop)
            if slot < n_tiles:
                _dkdv_tile(
                    slot, b, hk, tensors, strides, TILES + stride_to, SPANS, stride_tb, stride_sb, Q_LEN, GROUP,
                    sm_scale, score_args, Q_DESC, DO_DESC, DQ_DESC, SCORE_MOD, SCORE_GRAD, ATOMIC_DQ, TILE, DKDV_BLOCK_M,
                    D, DP, DV, DVP, DOT_PREC, FLAT_GROUP, ONE_LOOP, DP_FIRST, ROW_SELECT,
                )
        else:
            # the tiles past the first N_PROGRAMS (each document adds at most one partial tile past
            # S / TILE): the list's shortest, walked by the N_OVER programs that follow, in one loop
            # each (less code to compile; these tiles have few or no later queries)
            for t in range(slot, n_tiles, N_OVER):
                _dkdv_tile(
                    t, b, hk, tensors, strides, TILES + stride_to, SPANS, stride_tb, stride_sb, Q_LEN, GROUP,
                    sm_scale, score_args, Q_DESC, DO_DESC, DQ_DESC, SCORE_MOD, SCORE_GRAD, ATOMIC_DQ, TILE, DKDV_BLOCK_M,
                    D, DP, DV, DVP, DOT_PREC, FLAT_GROUP, True, DP_FIRST, ROW_SELECT,
                )
    else:
        p = pid - N_DKDV
        n_q_heads = N_DKDV // (N_PROGRAMS + N_OVER) * GROUP  # B * HQ
        q_bh = p % n_q_heads
        b = q_bh // HQ
        h = q_bh % HQ
        hk = h // GROUP
        K_ptr = K + b * stride_kb + hk * stride_kh
        V_ptr = V + b * stride_vb + hk * stride_vh
        n_tiles = tl.load(N_TILES + b * stride_nb)
        for t in range(p // n_q_heads, n_tiles, N_PROGRAMS):
            start_m, lo, end = doc_tile(TILES, SPANS, b, t, stride_tb, stride_sb)
            q_end = tl.minimum(start_m + TILE, end)
            offs_m, q_in, q_idx = tile_rows(start_m, q_end, Q_LEN, TILE)
            q, do = load_pair(Q + b * stride_qb + h * stride_qh, DO + b * stride_dob + h * stride_doh, offs_m, q_in,
                              stride_qm, stride_qd, stride_dom, stride_dod, D, DP, DV, DVP)
            # rows past the tile (the next document's) read LSE +inf: P = 0, nothing reaches the
            # score mod's parameter gradients from them
            lse2, delta = row_inputs(LSE + b * stride_lb + h * stride_lh, DELTA + b * stride_lb + h * stride_lh,
                                     offs_m, q_end, True)
            dq = tl.zeros([TILE, DP], tl.float32)
            if ONE_LOOP:  # keys lo .. q_end - 1 in one loop, masked throughout
                dq = _dq_inner(
                    dq, q, do, lse2, delta, K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                    None, tl.cdiv(q_end - lo, DQ_BLOCK_N), b, h, b, h, q_idx, Q_LEN, sm_scale,
                    (), score_args, score_grads, K_DESC, V_DESC, hk,
                    _causal, SCORE_MOD, SCORE_GRAD, SCORE_PARAM_GRAD, True, False, DQ_BLOCK_N, DQ_BLOCK_N,
                    D, DP, DV, DVP, DOT_PREC, False, base=lo,
                )
            else:
                dq = _dq_inner(
                    dq, q, do, lse2, delta, K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                    None, tl.cdiv(q_end - start_m, DQ_BLOCK_N), b, h, b, h, q_idx, Q_LEN, sm_scale,
                    (), score_args, score_grads, K_DESC, V_DESC, hk,
                    _causal, SCORE_MOD, SCORE_GRAD, SCORE_PARAM_GRAD, True, False, DQ_BLOCK_N, DQ_BLOCK_N,
                    D, DP, DV, DVP, DOT_PREC, False, base=start_m,
                )
                dq = _dq_inner(
                    dq, q, do, lse2, delta, K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                    None, (start_m - lo) // DQ_BLOCK_N, b, h, b, h, q_idx, Q_LEN, sm_scale,
                    (), score_args, score_grads, K_DESC, V_DESC, hk,
                    _causal, SCORE_MOD, SCORE_GRAD, SCORE_PARAM_GRAD, False, True, DQ_BLOCK_N, DQ_BLOCK_N,
                    D, DP, DV, DVP, DOT_PREC, False, base=lo,
                )
            store_tile(DQ + b * stride_dqb + h * stride_dqh, dq * sm_scale, offs_m, q_in, stride_dqm, stride_dqd,
                       D, DP)
