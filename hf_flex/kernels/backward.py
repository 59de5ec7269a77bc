"""Backward kernels: Delta = rowsum(dO * O), then dK/dV (key-major tables) and dQ (query-major tables),
as two launches or as one (attn_bwd_kernel); or dK/dV programs alone that also add dQ with float32
atomics (ATOMIC_DQ: five tile products per tile pair instead of seven, not deterministic).

Without ATOMIC_DQ there are no atomics on dQ, dK or dV, so they are deterministic. GQA: one dK/dV program owns one key head and
sums over the GROUP query heads that read it, in order. Learnable score-mod tensors (relative bias
tables, ALiBi slopes) get their gradients in the dQ pass, through the mod's float64 atomics.

LSE arrives in the forward kernel's form (launch.flex_forward): log2 units, +inf for a row with no
allowed key, so P = exp2(s - LSE) is 0 there, not NaN. The loops read it and delta (one buffer of its
size, attn_bwd_delta_kernel) as they are, the size torch's flex backward allocates; loops that may
reach queries past the end (the partial-block loops of lengths that do not divide the block, the
document kernels' diagonal and ragged steps) give those queries LSE +inf and delta 0, by masked loads
or (ROW_SELECT) by selects after unmasked loads, which read up to a tile past the last row: then the
buffers have that slack (launch.row_buffer).
"""

import triton
import triton.language as tl

from .forward import (
    _reversed, block_start, kv_tiles, partial_list, run_start, scores_tile, tile_and_head, tile_positions, tile_rows,
    tma_tiles, two_tables_start,
)


# lengths and the strides that grow with them are run-time values: no variant per length
_DYNAMIC = ["stride_lb", "stride_lh", "stride_nb", "stride_nh", "stride_ib", "stride_ih", "stride_iq", "stride_ik", "Q_LEN", "KV_LEN"]


@triton.jit(do_not_specialize=["stride_gb", "stride_gh", "stride_db", "stride_dh", "Q_LEN"])
def attn_bwd_delta_kernel(
    O, DO, DLSE, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_gb, stride_gh,
    stride_db, stride_dh,
    Q_LEN, HQ,
    BLOCK_M: tl.constexpr,
    DV: tl.constexpr,
    DVP: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    """The backward loops' per-row input besides LSE, for rows 0..Q_LEN-1: DELTA = rowsum(dO * O) -
    dLSE (dLSE: the gradient reaching the returned LSE, when HAS_DLSE)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DVP)
    rows = offs_m < Q_LEN
    msk = rows[:, None] & (offs_d[None, :] < DV)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, mask=msk, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=msk, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + b * stride_gb + h * stride_gh + offs_m, mask=rows, other=0.0).to(tl.float32)
    tl.store(DELTA + b * stride_db + h * stride_dh + offs_m, delta, mask=rows)


@triton.jit
def load_tile(A, offs, rows_in, stride_am, stride_ad, D: tl.constexpr, DP: tl.constexpr):
    """Rows ``offs`` of A (head dim D, padded to DP); rows not ``rows_in`` and padding columns read 0."""
    offs_d = tl.arange(0, DP)
    return tl.load(A + offs[:, None] * stride_am + offs_d[None, :] * stride_ad,
                   mask=rows_in[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def store_tile(A, a, offs, rows_in, stride_am, stride_ad, D: tl.constexpr, DP: tl.constexpr):
    """:func:`load_tile`'s store (a program's dQ, dK or dV), in A's dtype."""
    offs_d = tl.arange(0, DP)
    tl.store(A + offs[:, None] * stride_am + offs_d[None, :] * stride_ad, a.to(A.dtype.element_ty),
             mask=rows_in[:, None] & (offs_d[None, :] < D))


@triton.jit
def load_pair(A, B_, offs, rows_in, stride_am, stride_ad, stride_bm, stride_bd,
              D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr):
    """Rows ``offs`` of A (head dim D, padded to DP) and of B_ (DV, padded to DVP), e.g. a program's K
    and V, or Q and dO (:func:`load_tile`)."""
    return (load_tile(A, offs, rows_in, stride_am, stride_ad, D, DP),
            load_tile(B_, offs, rows_in, stride_bm, stride_bd, DV, DVP))


@triton.jit
def store_pair(A, B_, a, b, offs, rows_in, stride_am, stride_ad, stride_bm, stride_bd,
               D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr):
    """:func:`load_pair`'s stores (a program's dK and dV), in the outputs' dtypes."""
    store_tile(A, a, offs, rows_in, stride_am, stride_ad, D, DP)
    store_tile(B_, b, offs, rows_in, stride_bm, stride_bd, DV, DVP)


@triton.jit
def row_inputs(LSE_ptr, DELTA_ptr, offs_m, Q_LEN, CHECK: tl.constexpr, SELECT: tl.constexpr = False):
    """(LSE in log2 units, delta) of queries ``offs_m``; CHECK: some may lie past Q_LEN, which read
    LSE +inf and delta 0 (P = 0: they add nothing to dK, dV).

    SELECT, only where LSE and delta are readable a tile of rows past their last row (launch.row_buffer's
    slack): the loads carry no mask, and what a query past Q_LEN reads there (the next row's values, or
    the slack's garbage) is replaced by a select. Masked loads instead cost the dK/dV loops about 200
    instructions a step (sm_90, Triton 3.6: per-element predicates kept as bits in a register for the
    asynchronous copies), the selects about 32. The dQ programs read their rows once: masked."""
    if not CHECK:
        return tl.load(LSE_ptr + offs_m), tl.load(DELTA_ptr + offs_m)
    q_ok = offs_m < Q_LEN
    if SELECT:
        return tl.where(q_ok, tl.load(LSE_ptr + offs_m), float("inf")), tl.where(q_ok, tl.load(DELTA_ptr + offs_m), 0.0)
    return (tl.load(LSE_ptr + offs_m, mask=q_ok, other=float("inf")),
            tl.load(DELTA_ptr + offs_m, mask=q_ok, other=0.0))


@triton.jit
def _dkdv_inner(
    dk, dv, k, v,
    Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr,
    stride_qm, stride_qd, stride_dom, stride_dod,
    idx_ptr, n_blocks, b, h, mb, mh, kv_idx, kv_in,
    Q_LEN, sm_scale, mask_args, score_args,
    DQ_ptr, stride_dqm, stride_dqd, Q_DESC, DO_DESC, hq,
    MASK_MOD: tl.constexpr,
    SCORE_MOD: tl.constexpr,
    SCORE_GRAD: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    APPLY_MASK: tl.constexpr,
    Q_DIVISIBLE: tl.constexpr,
    KV_DIVISIBLE: tl.constexpr,
    SPARSE_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    DV: tl.constexpr,
    DVP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    AHEAD: tl.constexpr,
    IDX2=None,
    n_blocks2=0,
    FLAT: tl.constexpr = False,
    n_heads=1,
    s_qh=0,
    s_doh=0,
    s_lh=0,
    s_dqh=0,
    base=0,
    base2=0,
    DQ_DESC=None,
    DP_FIRST: tl.constexpr = False,
    ROW_SELECT: tl.constexpr = False,
    STAGES: tl.constexpr = None,
):
    """dK, dV accumulated over the query blocks ``idx_ptr[:n_blocks]`` lists. With IDX2 (one loop), then
    over ``IDX2[:n_blocks2]`` in the same loop: the caller passes the partial blocks first, the full
    ones second, and the mask and position checks apply to both.

    FLAT: the same blocks for ``n_heads`` query heads h, h + 1, ... (their Q, dO, LSE, delta, dQ rows
    ``s_qh`` ... apart) in one loop, head after head: one pipeline fill and drain for the whole GQA
    group instead of one per head (the tables must not differ between heads; not with AHEAD).

    ``idx_ptr`` None: ``n_blocks`` consecutive blocks from position ``base``, then ``n_blocks2`` from
    ``base2`` (forward.run_start).

    ATOMIC_DQ: each step also adds its share of dQ (dS K * sm_scale) into the float32 accumulator,
    through DQ_DESC (a tensor descriptor over it, [1, 1, BLOCK_M, DP] boxes: the tensor-memory
    accelerator's bulk reduction, asynchronous, rows past the end dropped) or, without one, by pointer
    atomics at DQ_ptr.

    DP_FIRST: dP^T = V dO^T is issued right after S^T = K Q^T instead of after dV's product. The
    compiler waits for every product whose result is not a loop-carried accumulator as soon as it is
    issued (and a wait covers all products in flight); in the default order the wait for dP^T also
    waits for P^T dO, and dS's elementwise work runs with the tensor cores idle; issued first, dP^T is
    waited for with S^T, and P^T dO runs under dS's work.

    ROW_SELECT: queries past Q_LEN get LSE +inf and delta 0 by selects after unmasked loads (row_inputs'
    SELECT), not by masked loads.

    STAGES: this loop's software-pipelining depth where it differs from the kernel's num_stages."""
    SUB: tl.constexpr = SPARSE_Q // BLOCK_M
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DP)
    start = 0
    if AHEAD:
        start = block_start(idx_ptr, -1, n_blocks, start, SUB, SPARSE_Q, True)
    per_head = (n_blocks + n_blocks2) * SUB
    for it in tl.range(0, per_head * n_heads, num_stages=STAGES):
        if FLAT:
            g = it // per_head
            i = it - g * per_head
            Qg, DOg, DQg = Q_ptr + g * s_qh, DO_ptr + g * s_doh, DQ_ptr + g * s_dqh
            LSEg, DELTAg = LSE_ptr + g * s_lh, DELTA_ptr + g * s_lh
            hg, hqg = h + g, hq + g
        else:
            i = it
            Qg, DOg, DQg, LSEg, DELTAg, hg, hqg = Q_ptr, DO_ptr, DQ_ptr, LSE_ptr, DELTA_ptr, h, hq
        if IDX2 is not None:
            start = two_tables_start(idx_ptr, n_blocks, IDX2, i, SUB, SPARSE_Q)
        elif idx_ptr is None:
            start = run_start(base, i, SUB, SPARSE_Q, n_blocks, base2)
        elif not AHEAD:
            start = block_start(idx_ptr, i, n_blocks, start, SUB, SPARSE_Q, False)
        offs_m = start + (i % SUB) * BLOCK_M + offs_m0
        # Q^T [DP, BLOCK_M] and dO [BLOCK_M, DVP]; queries past the end (not Q_DIVISIBLE) load zeros
        # and LSE +inf: they add nothing to dK, dV
        if Q_DESC is not None:  # TMA
            qT, do = tma_tiles(Q_DESC, DO_DESC, b, hqg, start + (i % SUB) * BLOCK_M, BLOCK_M, DP, DVP)
            q_idx = tile_positions(offs_m, Q_LEN, not Q_DIVISIBLE)
        else:
            qT, do, q_idx = kv_tiles(Qg, DOg, offs_m, stride_qm, stride_qd, stride_dom, stride_dod, Q_LEN,
                                     D, DP, DV, DVP, not Q_DIVISIBLE, False)
        lse2, delta = row_inputs(LSEg, DELTAg, offs_m, Q_LEN, not Q_DIVISIBLE, ROW_SELECT)
        # transposed tile: rows are keys, columns are queries. Keys past the end need no check: their
        # rows of dK, dV are never stored and, row by row, touch no other row; only the dQ this
        # program adds (ATOMIC_DQ) sums over keys
        qkT = tl.dot(k, qT, input_precision=DOT_PREC)
        if DP_FIRST:
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        s_inT, sT = scores_tile(
            qkT, b, hg, mb, mh, q_idx, kv_idx, kv_in, sm_scale, mask_args, score_args,
            MASK_MOD, SCORE_MOD, APPLY_MASK, ATOMIC_DQ and not KV_DIVISIBLE, lse2[None, :],
        )
        pT = tl.math.exp2(sT)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        if not DP_FIRST:
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        if SCORE_GRAD is not None:
            dsT = SCORE_GRAD(s_inT, dsT, b, hg, q_idx, kv_idx, score_args)
        dsT_lp = dsT.to(qT.dtype)
        dk = tl.dot(dsT_lp, tl.trans(qT), dk, input_precision=DOT_PREC)
        if ATOMIC_DQ:
            # this key tile's share of dQ = dS K, added into the float32 accumulator (no dQ pass)
            dq = tl.dot(tl.trans(dsT_lp), k, input_precision=DOT_PREC) * sm_scale
            if DQ_DESC is not None:
                DQ_DESC.atomic_add([b, hqg, start + (i % SUB) * BLOCK_M, 0], tl.reshape(dq, (1, 1, BLOCK_M, DP)))
            else:
                dq_ptrs = DQg + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
                if Q_DIVISIBLE:
                    tl.atomic_add(dq_ptrs, dq, mask=offs_d[None, :] < D, sem="relaxed")
                else:
                    tl.atomic_add(dq_ptrs, dq, mask=(offs_m[:, None] < Q_LEN) & (offs_d[None, :] < D), sem="relaxed")
        if AHEAD:
            start = block_start(idx_ptr, i, n_blocks, start, SUB, SPARSE_Q, True)
    return dk, dv


@triton.jit
def _dkdv_program(
    pid_n, pid_bh,
    Q, K, V, DO, DK, DV_, LSE, DELTA,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_lb, stride_lh,
    Q_NUM, Q_IDX, FQ_NUM, FQ_IDX,
    stride_nb, stride_nh, stride_ib, stride_ih, stride_ik,
    QH_NUM, QH_IDX,
    Q_LEN, KV_LEN, HKV, GROUP, sm_scale,
    mask_args, score_args,
    DQ, stride_dqb, stride_dqh, stride_dqm, stride_dqd, Q_DESC, DO_DESC,
    MASK_MOD: tl.constexpr,
    SCORE_MOD: tl.constexpr,
    SCORE_GRAD: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    Q_DIVISIBLE: tl.constexpr,
    KV_DIVISIBLE: tl.constexpr,
    TAIL_PARTIAL: tl.constexpr,
    SPARSE_Q: tl.constexpr,
    PARTIAL_Q: tl.constexpr,
    SPARSE_KV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    DV: tl.constexpr,
    DVP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    AHEAD_FULL: tl.constexpr,
    ONE_LOOP: tl.constexpr = False,
    FLAT_GROUP: tl.constexpr = False,
    DQ_DESC=None,
    DP_FIRST: tl.constexpr = False,
    ROW_SELECT: tl.constexpr = False,
    FULL_STAGES: tl.constexpr = None,
):
    """dK, dV of BLOCK_N keys of one (batch, key head): program (pid_n, pid_bh) of the dK/dV pass.
    FULL_STAGES: the full-block loop's pipelining depth where it differs from the kernel's.

    FLAT_GROUP: the tables are the same for every head (broadcast), so each loop walks its blocks for
    all GROUP query heads of this key head in one pipelined loop (_dkdv_inner's FLAT) instead of a
    loop per head. Not with ONE_LOOP or AHEAD_FULL.

    PARTIAL_Q < SPARSE_Q: the partial-block loop walks the live halves of the partial query blocks
    (QH_NUM / QH_IDX, BlockMask.q_half_num) instead of whole blocks.

    ATOMIC_DQ: also adds these keys' share of dQ (times sm_scale) into DQ, a float32 [B, Hq, Sq, D]
    accumulator, so no dQ pass runs (two of the seven tile products fewer; not deterministic).
    ONE_LOOP: partial and full query blocks in one pipelined loop (the mask evaluated in both), instead
    of a loop each: one pipeline fill and drain per query head where rows list few blocks."""
    b = pid_bh // HKV
    hk = pid_bh % HKV
    start_n = pid_n * BLOCK_N
    col = start_n // SPARSE_KV
    offs_n, kv_in, kv_idx = tile_rows(start_n, KV_LEN, KV_LEN, BLOCK_N)
    k, v = load_pair(K + b * stride_kb + hk * stride_kh, V + b * stride_vb + hk * stride_vh, offs_n, kv_in,
                     stride_kn, stride_kd, stride_vn, stride_vd, D, DP, DV, DVP)
    dk = tl.zeros([BLOCK_N, DP], tl.float32)
    dv = tl.zeros([BLOCK_N, DVP], tl.float32)
    mb = tl.where(stride_nb != 0, b, 0)  # broadcast block-mask dims: the mask sees index 0
    # one pass of the loops per query head of this key head, or (FLAT_GROUP) one for all of them
    n_passes = GROUP
    n_heads = 1
    if FLAT_GROUP:
        n_passes = 1
        n_heads = GROUP
    for g in range(0, n_passes):
        h = hk * GROUP + g
        mh = tl.where(stride_nh != 0, h, 0)
        Q_ptr = Q + b * stride_qb + h * stride_qh
        DO_ptr = DO + b * stride_dob + h * stride_doh
        LSE_ptr = LSE + b * stride_lb + h * stride_lh
        DELTA_ptr = DELTA + b * stride_lb + h * stride_lh
        DQ_ptr = DQ + b * stride_dqb + h * stride_dqh
        num_off = b * stride_nb + h * stride_nh + col
        idx_off = b * stride_ib + h * stride_ih + col * stride_ik
        if ONE_LOOP:  # the full blocks join the partial blocks' loop
            full_idx, n_full = FQ_IDX + idx_off, tl.load(FQ_NUM + num_off)
        else:
            full_idx, n_full = None, 0
        part_idx, n_part = partial_list(Q_NUM, Q_IDX, QH_NUM, QH_IDX, num_off, idx_off, PARTIAL_Q < SPARSE_Q)
        dk, dv = _dkdv_inner(
            dk, dv, k, v, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, stride_qm, stride_qd, stride_dom, stride_dod,
            part_idx, n_part, b, h, mb, mh, kv_idx, kv_in[:, None],
            Q_LEN, sm_scale, mask_args, score_args, DQ_ptr, stride_dqm, stride_dqd, Q_DESC, DO_DESC, h,
            MASK_MOD, SCORE_MOD, SCORE_GRAD, ATOMIC_DQ, True, Q_DIVISIBLE, KV_DIVISIBLE, PARTIAL_Q, BLOCK_M,
            D, DP, DV, DVP, DOT_PREC, False, full_idx, n_full,
            FLAT_GROUP, n_heads, stride_qh, stride_doh, stride_lh, stride_dqh, DQ_DESC=DQ_DESC, DP_FIRST=DP_FIRST, ROW_SELECT=ROW_SELECT,
        )
        if not ONE_LOOP:
            dk, dv = _dkdv_inner(
                dk, dv, k, v, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, stride_qm, stride_qd, stride_dom, stride_dod,
                FQ_IDX + idx_off, tl.load(FQ_NUM + num_off), b, h, mb, mh, kv_idx, kv_in[:, None],
                Q_LEN, sm_scale, mask_args, score_args, DQ_ptr, stride_dqm, stride_dqd, Q_DESC, DO_DESC, h,
                MASK_MOD, SCORE_MOD, SCORE_GRAD, ATOMIC_DQ, False, Q_DIVISIBLE or TAIL_PARTIAL,
                KV_DIVISIBLE or TAIL_PARTIAL, SPARSE_Q, BLOCK_M,
                D, DP, DV, DVP, DOT_PREC, AHEAD_FULL, None, 0,
                FLAT_GROUP, n_heads, stride_qh, stride_doh, stride_lh, stride_dqh, DQ_DESC=DQ_DESC, DP_FIRST=DP_FIRST, ROW_SELECT=ROW_SELECT,
                STAGES=FULL_STAGES,
            )
    store_pair(DK + b * stride_dkb + hk * stride_dkh, DV_ + b * stride_dvb + hk * stride_dvh, dk * sm_scale, dv,
               offs_n, kv_in, stride_dkn, stride_dkd, stride_dvn, stride_dvd, D, DP, DV, DVP)


@triton.jit
def _dq_inner(
    dq, q, do, lse2, delta,
    K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
    idx_ptr, n_blocks, b, h, mb, mh, q_idx, KV_LEN, sm_scale,
    mask_args, score_args, score_grads, K_DESC, V_DESC, hk,
    MASK_MOD: tl.constexpr,
    SCORE_MOD: tl.constexpr,
    SCORE_GRAD: tl.constexpr,
    SCORE_PARAM_GRAD: tl.constexpr,
    APPLY_MASK: tl.constexpr,
    KV_DIVISIBLE: tl.constexpr,
    SPARSE_KV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    DV: tl.constexpr,
    DVP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    AHEAD: tl.constexpr,
    IDX2=None,
    n_blocks2=0,
    base=0,
    base2=0,
    STAGES: tl.constexpr = None,
):
    """dQ accumulated over the key blocks ``idx_ptr[:n_blocks]`` lists, then (IDX2, one loop) over
    ``IDX2[:n_blocks2]`` in the same loop, as in :func:`_dkdv_inner` (``idx_ptr`` None: consecutive
    blocks from ``base``, then from ``base2``). STAGES: as in :func:`_dkdv_inner`."""
    SUB: tl.constexpr = SPARSE_KV // BLOCK_N
    offs_n0 = tl.arange(0, BLOCK_N)
    start = 0
    if AHEAD:
        start = block_start(idx_ptr, -1, n_blocks, start, SUB, SPARSE_KV, True)
    for i in tl.range(0, (n_blocks + n_blocks2) * SUB, num_stages=STAGES):
        if IDX2 is not None:
            start = two_tables_start(idx_ptr, n_blocks, IDX2, i, SUB, SPARSE_KV)
        elif idx_ptr is None:
            start = run_start(base, i, SUB, SPARSE_KV, n_blocks, base2)
        elif not AHEAD:
            start = block_start(idx_ptr, i, n_blocks, start, SUB, SPARSE_KV, False)
        offs_n = start + (i % SUB) * BLOCK_N + offs_n0
        kv_in = offs_n < KV_LEN
        if K_DESC is not None:  # TMA: keys past the end arrive as zeros
            kT, v = tma_tiles(K_DESC, V_DESC, b, hk, start + (i % SUB) * BLOCK_N, BLOCK_N, DP, DVP)
            vT = tl.trans(v)
            kv_idx = tile_positions(offs_n, KV_LEN, not KV_DIVISIBLE)
        else:
            kT, vT, kv_idx = kv_tiles(K_ptr, V_ptr, offs_n, stride_kn, stride_kd, stride_vn, stride_vd, KV_LEN,
                                      D, DP, DV, DVP, not KV_DIVISIBLE, True)
        qk = tl.dot(q, kT, input_precision=DOT_PREC)
        s_in, s = scores_tile(
            qk, b, h, mb, mh, q_idx, kv_idx, kv_in[None, :], sm_scale, mask_args, score_args,
            MASK_MOD, SCORE_MOD, APPLY_MASK, not KV_DIVISIBLE, lse2[:, None],
        )
        p = tl.math.exp2(s)
        dp = tl.dot(do, vT, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        if SCORE_PARAM_GRAD is not None:
            SCORE_PARAM_GRAD(s_in, ds, b, h, q_idx, kv_idx, score_args, score_grads)
        if SCORE_GRAD is not None:
            ds = SCORE_GRAD(s_in, ds, b, h, q_idx, kv_idx, score_args)
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PREC)
        if AHEAD:
            start = block_start(idx_ptr, i, n_blocks, start, SUB, SPARSE_KV, True)
    return dq


@triton.jit
def _dq_program(
    pid_m, pid_bh,
    Q, K, V, DO, DQ, LSE, DELTA,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_lb, stride_lh,
    KV_NUM, KV_IDX, FKV_NUM, FKV_IDX,
    stride_nb, stride_nh, stride_ib, stride_ih, stride_iq,
    KVH_NUM, KVH_IDX,
    Q_LEN, KV_LEN, HQ, GROUP, sm_scale,
    mask_args, score_args, score_grads, K_DESC, V_DESC,
    MASK_MOD: tl.constexpr,
    SCORE_MOD: tl.constexpr,
    SCORE_GRAD: tl.constexpr,
    SCORE_PARAM_GRAD: tl.constexpr,
    KV_DIVISIBLE: tl.constexpr,
    TAIL_PARTIAL: tl.constexpr,
    SPARSE_Q: tl.constexpr,
    SPARSE_KV: tl.constexpr,
    PARTIAL_KV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    DV: tl.constexpr,
    DVP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    AHEAD_FULL: tl.constexpr,
    ONE_LOOP: tl.constexpr = False,
    FULL_STAGES: tl.constexpr = None,
):
    """dQ of BLOCK_M queries of one (batch, query head): program (pid_m, pid_bh) of the dQ pass.
    FULL_STAGES: as in :func:`_dkdv_program`.
    ONE_LOOP: partial and full key blocks in one loop, as in :func:`_dkdv_program`. PARTIAL_KV <
    SPARSE_KV: the partial loop walks the live halves of the partial key blocks (KVH_NUM / KVH_IDX)."""
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    row = start_m // SPARSE_Q
    offs_m, q_in, q_idx = tile_rows(start_m, Q_LEN, Q_LEN, BLOCK_M)
    q, do = load_pair(Q + b * stride_qb + h * stride_qh, DO + b * stride_dob + h * stride_doh, offs_m, q_in,
                      stride_qm, stride_qd, stride_dom, stride_dod, D, DP, DV, DVP)
    lse2, delta = row_inputs(LSE + b * stride_lb + h * stride_lh, DELTA + b * stride_lb + h * stride_lh, offs_m,
                             Q_LEN, True)
    K_ptr = K + b * stride_kb + hk * stride_kh
    V_ptr = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, DP], tl.float32)
    mb = tl.where(stride_nb != 0, b, 0)  # broadcast block-mask dims: the mask sees index 0
    mh = tl.where(stride_nh != 0, h, 0)
    num_off = b * stride_nb + h * stride_nh + row
    idx_off = b * stride_ib + h * stride_ih + row * stride_iq
    if ONE_LOOP:  # the full blocks join the partial blocks' loop
        full_idx, n_full = FKV_IDX + idx_off, tl.load(FKV_NUM + num_off)
    else:
        full_idx, n_full = None, 0
    part_idx, n_part = partial_list(KV_NUM, KV_IDX, KVH_NUM, KVH_IDX, num_off, idx_off, PARTIAL_KV < SPARSE_KV)
    dq = _dq_inner(
        dq, q, do, lse2, delta, K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
        part_idx, n_part, b, h, mb, mh, q_idx, KV_LEN, sm_scale,
        mask_args, score_args, score_grads, K_DESC, V_DESC, hk,
        MASK_MOD, SCORE_MOD, SCORE_GRAD, SCORE_PARAM_GRAD, True, KV_DIVISIBLE, PARTIAL_KV, BLOCK_N,
        D, DP, DV, DVP, DOT_PREC, False, full_idx, n_full,
    )
    if not ONE_LOOP:
        dq = _dq_inner(
            dq, q, do, lse2, delta, K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
            FKV_IDX + idx_off, tl.load(FKV_NUM + num_off), b, h, mb, mh, q_idx, KV_LEN, sm_scale,
            mask_args, score_args, score_grads, K_DESC, V_DESC, hk,
            MASK_MOD, SCORE_MOD, SCORE_GRAD, SCORE_PARAM_GRAD, False, KV_DIVISIBLE or TAIL_PARTIAL, SPARSE_KV,
            BLOCK_N, D, DP, DV, DVP, DOT_PREC, AHEAD_FULL, STAGES=FULL_STAGES,
        )
    store_tile(DQ + b * stride_dqb + h * stride_dqh, dq * sm_scale, offs_m, q_in, stride_dqm, stride_dqd, D, DP)


# Two launches (used where the passes want different warps or pipelining depths) ...


@triton.jit(do_not_specialize=[n for n in _DYNAMIC if n != "stride_iq"])
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV_, LSE, DELTA,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_lb, stride_lh,
    Q_NUM, Q_IDX, FQ_NUM, FQ_IDX,
    stride_nb, stride_nh, stride_ib, stride_ih, stride_ik,
    QH_NUM, QH_IDX,  # half-block tables of the partial blocks, read when PARTIAL_Q < SPARSE_Q
    Q_LEN, KV_LEN, HKV, GROUP, sm_scale,
    mask_args, score_args,
    DQ, stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    MASK_MOD: tl.constexpr, SCORE_MOD: tl.constexpr, SCORE_GRAD: tl.constexpr,
    Q_DIVISIBLE: tl.constexpr, KV_DIVISIBLE: tl.constexpr, TAIL_PARTIAL: tl.constexpr,
    SPARSE_Q: tl.constexpr, PARTIAL_Q: tl.constexpr, SPARSE_KV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, DOT_PREC: tl.constexpr, AHEAD_FULL: tl.constexpr = False,
    ATOMIC_DQ: tl.constexpr = False, ONE_LOOP: tl.constexpr = False, HEADS_FIRST: tl.constexpr = False,
    Q_DESC=None, DO_DESC=None,  # tensor descriptors of Q and dO (TMA), or pointer loads
    FLAT_GROUP: tl.constexpr = False,  # see _dkdv_program
    DQ_DESC=None,  # ATOMIC_DQ: a descriptor over DQ for the bulk reduction (TMA), or pointer atomics
    DP_FIRST: tl.constexpr = False,  # see _dkdv_inner
    ROW_SELECT: tl.constexpr = False,  # see _dkdv_inner
    FULL_STAGES: tl.constexpr = None,  # see _dkdv_program
):
    pid_n, pid_bh = tile_and_head(HEADS_FIRST, False)  # key tile 0 first: the longest under causal masks
    _dkdv_program(
        pid_n, pid_bh,
        Q, K, V, DO, DK, DV_, LSE, DELTA,
        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
        stride_lb, stride_lh,
        Q_NUM, Q_IDX, FQ_NUM, FQ_IDX, stride_nb, stride_nh, stride_ib, stride_ih, stride_ik, QH_NUM, QH_IDX,
        Q_LEN, KV_LEN, HKV, GROUP, sm_scale, mask_args, score_args,
        DQ, stride_dqb, stride_dqh, stride_dqm, stride_dqd, Q_DESC, DO_DESC,
        MASK_MOD, SCORE_MOD, SCORE_GRAD, ATOMIC_DQ, Q_DIVISIBLE, KV_DIVISIBLE, TAIL_PARTIAL, SPARSE_Q, PARTIAL_Q, SPARSE_KV,
        BLOCK_M, BLOCK_N,
        D, DP, DV, DVP, DOT_PREC, AHEAD_FULL, ONE_LOOP, FLAT_GROUP, DQ_DESC, DP_FIRST, ROW_SELECT, FULL_STAGES,
    )


@triton.jit(do_not_specialize=[n for n in _DYNAMIC if n != "stride_ik"])
def attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_lb, stride_lh,
    KV_NUM, KV_IDX, FKV_NUM, FKV_IDX,
    stride_nb, stride_nh, stride_ib, stride_ih, stride_iq,
    KVH_NUM, KVH_IDX,  # half-block tables of the partial blocks, read when PARTIAL_KV < SPARSE_KV
    Q_LEN, KV_LEN, HQ, GROUP, sm_scale,
    mask_args, score_args, score_grads,
    MASK_MOD: tl.constexpr, SCORE_MOD: tl.constexpr, SCORE_GRAD: tl.constexpr, SCORE_PARAM_GRAD: tl.constexpr,
    KV_DIVISIBLE: tl.constexpr, TAIL_PARTIAL: tl.constexpr, SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
    PARTIAL_KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, DOT_PREC: tl.constexpr,
    REVERSE_M: tl.constexpr, AHEAD_FULL: tl.constexpr = False, ONE_LOOP: tl.constexpr = False,
    HEADS_FIRST: tl.constexpr = False,
    K_DESC=None, V_DESC=None,  # tensor descriptors of K and V (TMA), or pointer loads
):
    pid_m, pid_bh = tile_and_head(HEADS_FIRST, REVERSE_M)
    _dq_program(
        pid_m, pid_bh,
        Q, K, V, DO, DQ, LSE, DELTA,
        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dqb, stride_dqh, stride_dqm, stride_dqd, stride_lb, stride_lh,
        KV_NUM, KV_IDX, FKV_NUM, FKV_IDX, stride_nb, stride_nh, stride_ib, stride_ih, stride_iq, KVH_NUM, KVH_IDX,
        Q_LEN, KV_LEN, HQ, GROUP, sm_scale, mask_args, score_args, score_grads, K_DESC, V_DESC,
        MASK_MOD, SCORE_MOD, SCORE_GRAD, SCORE_PARAM_GRAD, KV_DIVISIBLE, TAIL_PARTIAL, SPARSE_Q, SPARSE_KV, PARTIAL_KV,
        BLOCK_M, BLOCK_N,
        D, DP, DV, DVP, DOT_PREC, AHEAD_FULL, ONE_LOOP,
    )


# ... or one launch whose first N_DKDV programs are the dK/dV pass and the rest the dQ pass, so the two
# passes share the GPU instead of the dQ pass starting only after the dK/dV pass's slowest program.


@triton.jit(do_not_specialize=_DYNAMIC + ["stride_cnb", "stride_cnh", "stride_cib", "stride_cih", "N_DKDV", "N_TILES_KV", "N_TILES_Q"])
def attn_bwd_kernel(
    Q, K, V, DO, DQ, DK, DV_, LSE, DELTA,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_lb, stride_lh,
    Q_NUM, Q_IDX, FQ_NUM, FQ_IDX,  # key-major tables (dK/dV pass)
    stride_cnb, stride_cnh, stride_cib, stride_cih, stride_ik,
    KV_NUM, KV_IDX, FKV_NUM, FKV_IDX,  # query-major tables (dQ pass)
    stride_nb, stride_nh, stride_ib, stride_ih, stride_iq,
    QH_NUM, QH_IDX, KVH_NUM, KVH_IDX,  # half-block tables of the partial blocks, when PARTIAL_* < SPARSE_*
    Q_LEN, KV_LEN, HQ, HKV, GROUP, sm_scale,
    N_DKDV, N_TILES_KV, N_TILES_Q,
    mask_args, score_args, score_grads,
    MASK_MOD: tl.constexpr, SCORE_MOD: tl.constexpr, SCORE_GRAD: tl.constexpr, SCORE_PARAM_GRAD: tl.constexpr,
    Q_DIVISIBLE: tl.constexpr, KV_DIVISIBLE: tl.constexpr, TAIL_PARTIAL: tl.constexpr,
    SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr, PARTIAL_Q: tl.constexpr, PARTIAL_KV: tl.constexpr,
    DKDV_BLOCK_M: tl.constexpr, DKDV_BLOCK_N: tl.constexpr, DQ_BLOCK_M: tl.constexpr, DQ_BLOCK_N: tl.constexpr,
    D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, DOT_PREC: tl.constexpr,
    REVERSE_M: tl.constexpr, AHEAD_FULL: tl.constexpr = False, INTERLEAVE: tl.constexpr = False,
    ONE_LOOP: tl.constexpr = False, HEADS_FIRST: tl.constexpr = False,
    MASK_MOD_BY_KEY: tl.constexpr = None,  # the dK/dV programs' form of MASK_MOD (MaskMod.by_key_fn)
    Q_DESC=None, DO_DESC=None, K_DESC=None, V_DESC=None,  # tensor descriptors (TMA), or pointer loads
    FLAT_GROUP: tl.constexpr = False,  # see _dkdv_program
    DP_FIRST: tl.constexpr = False,  # see _dkdv_inner
    ROW_SELECT: tl.constexpr = False,  # see _dkdv_inner
    FULL_STAGES: tl.constexpr = None,  # the dK/dV programs' full-block loop depth (_dkdv_program)
    DQ_FULL_STAGES: tl.constexpr = None,  # the dQ programs' (_dq_program's FULL_STAGES)
):
    # programs: every dK/dV program first, then every dQ program; or (INTERLEAVE, torch flex's order)
    # per (batch, key head) its dK/dV programs then the dQ programs of its query heads. Within a pass,
    # tiles of one head after another, or (HEADS_FIRST) every head's tile t before any head's next
    # tile (key tile 0 and, with REVERSE_M, the last query tile first: the longest under causal masks)
    pid = tl.program_id(0)
    if HEADS_FIRST and not INTERLEAVE:
        n_kv_heads = N_DKDV // N_TILES_KV  # B * HKV
        is_dkdv = pid < N_DKDV
        grp = pid % n_kv_heads
        kv_tile = pid // n_kv_heads
        p = pid - N_DKDV
        q_bh = p % (n_kv_heads * GROUP)
        q_tile = p // (n_kv_heads * GROUP)
    elif INTERLEAVE:
        per = N_TILES_KV + GROUP * N_TILES_Q
        grp = pid // per
        r = pid % per
        is_dkdv = r < N_TILES_KV
        kv_tile = r
        p = r - N_TILES_KV
        q_tile = p % N_TILES_Q
        q_bh = grp * GROUP + p // N_TILES_Q  # b * HQ + hk * GROUP + g
    else:
        grp = pid // N_TILES_KV
        is_dkdv = pid < N_DKDV
        kv_tile = pid % N_TILES_KV
        p = pid - N_DKDV
        q_tile = p % N_TILES_Q
        q_bh = p // N_TILES_Q
    if is_dkdv:
        _dkdv_program(
            kv_tile, grp,
            Q, K, V, DO, DK, DV_, LSE, DELTA,
            stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
            stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
            stride_lb, stride_lh,
            Q_NUM, Q_IDX, FQ_NUM, FQ_IDX, stride_cnb, stride_cnh, stride_cib, stride_cih, stride_ik, QH_NUM, QH_IDX,
            Q_LEN, KV_LEN, HKV, GROUP, sm_scale, mask_args, score_args,
            DQ, stride_dqb, stride_dqh, stride_dqm, stride_dqd, Q_DESC, DO_DESC,
            MASK_MOD_BY_KEY, SCORE_MOD, SCORE_GRAD, False, Q_DIVISIBLE, KV_DIVISIBLE, TAIL_PARTIAL, SPARSE_Q, PARTIAL_Q,
            SPARSE_KV,
            DKDV_BLOCK_M, DKDV_BLOCK_N, D, DP, DV, DVP, DOT_PREC, AHEAD_FULL, ONE_LOOP, FLAT_GROUP, None, DP_FIRST,
            ROW_SELECT, FULL_STAGES,
        )
    else:
        _dq_program(
            _reversed(q_tile, N_TILES_Q, REVERSE_M), q_bh,
            Q, K, V, DO, DQ, LSE, DELTA,
            stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
            stride_dqb, stride_dqh, stride_dqm, stride_dqd, stride_lb, stride_lh,
            KV_NUM, KV_IDX, FKV_NUM, FKV_IDX, stride_nb, stride_nh, stride_ib, stride_ih, stride_iq, KVH_NUM, KVH_IDX,
            Q_LEN, KV_LEN, HQ, GROUP, sm_scale, mask_args, score_args, score_grads, K_DESC, V_DESC,
            MASK_MOD, SCORE_MOD, SCORE_GRAD, SCORE_PARAM_GRAD, KV_DIVISIBLE, TAIL_PARTIAL, SPARSE_Q, SPARSE_KV, PARTIAL_KV,
            DQ_BLOCK_M, DQ_BLOCK_N, D, DP, DV, DVP, DOT_PREC, AHEAD_FULL, ONE_LOOP, DQ_FULL_STAGES,
        )
