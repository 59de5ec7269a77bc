"""Forward kernel: block-sparse FlashAttention-2 (online softmax in the log2 domain).

One program = one tile of BLOCK_M queries of one (batch, query head). It walks the key blocks its
row of the block table lists: first the partial ones (mask_mod evaluated), then the full ones
(mask_mod skipped). Table blocks (SPARSE_KV wide) are walked in tiles of BLOCK_N keys.

Compile-time constants: head dims, dtypes, tile and table block sizes, the mods' identities and
whether keys past the end need checks: not where the length divides the table block (KV_DIVISIBLE),
and never in full blocks when the tables list a ragged last block partial (TAIL_PARTIAL,
BlockMask.tail_partial). Sequence lengths, batch and head counts, and every tensor a mod reads are
run-time values: new lengths never recompile.
"""

import triton
import triton.language as tl

# for host-side code (autograd, launch); the kernels spell the literals: a plain module float is not
# a constexpr Triton can read
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def scores_tile(
    qk,
    b,
    h,
    mb,
    mh,
    q_idx,
    kv_idx,
    kv_in,
    sm_scale,
    mask_args,
    score_args,
    MASK_MOD: tl.constexpr,
    SCORE_MOD: tl.constexpr,
    APPLY_MASK: tl.constexpr,
    CHECK_KV: tl.constexpr,
    shift=None,
):
    """Scaled, score-modded, masked scores in log2 units (times log2(e), for exp2); masked entries -inf.
    ``shift`` (the backward's LSE, broadcast to the tile): subtracted before the mask, so that the
    scale and the subtraction fuse into one multiply-add (the mask's select after it).

    Returns (s_in, s2): s_in is the natural-units score before score_mod (score_mod derivatives need
    it; without a score mod nothing reads it and the compiler drops it), s2 the score times log2(e).
    Without a score mod, log2(e) folds into the scale: one multiply per score.
    The score mod sees the real (b, h); the mask sees (mb, mh), which are 0 where the block mask
    was built with that dimension broadcast, as its block classification did.
    """
    s_in = qk * sm_scale
    if SCORE_MOD is None:
        s = qk * (sm_scale * 1.4426950408889634)
    else:
        s = SCORE_MOD(s_in, b, h, q_idx, kv_idx, score_args) * 1.4426950408889634
    if shift is not None:
        s = s - shift
    # two selects, not one of the predicates' conjunction: measured 1-5 % faster in the forward
    # (H100, tests/benchmarks/NOTES.md, seventh round)
    if APPLY_MASK:
        s = tl.where(MASK_MOD(mb, mh, q_idx, kv_idx, mask_args), s, float("-inf"))
    if CHECK_KV:
        s = tl.where(kv_in, s, float("-inf"))
    return s_in, s


@triton.jit
def _reversed(pid, n, REVERSE: tl.constexpr):
    """Program ``pid`` of ``n`` in reverse order when REVERSE: causal-like masks give the last query
    tiles the most key blocks, and starting those first leaves no long program for the tail."""
    if REVERSE:
        return n - 1 - pid
    return pid


@triton.jit
def tile_and_head(HEADS_FIRST: tl.constexpr, REVERSE: tl.constexpr):
    """(tile, batch * heads index) of this program of a 2-D grid: (tiles, B * H), or (B * H, tiles) when
    HEADS_FIRST, so that programs start every head's tile t before any head's next tile: with
    REVERSE and causal masks, the longest programs of all heads first (longest-first scheduling)."""
    if HEADS_FIRST:
        return _reversed(tl.program_id(1), tl.num_programs(1), REVERSE), tl.program_id(0)
    return _reversed(tl.program_id(0), tl.num_programs(0), REVERSE), tl.program_id(1)


@triton.jit
def partial_list(NUM, IDX, HALF_NUM, HALF_IDX, num_off, idx_off, HALVES: tl.constexpr):
    """(index row, count) of the partial blocks a program's partial-block loop walks: the whole-block
    table's row at ``num_off`` / ``idx_off``, or (HALVES) the live halves of those blocks
    (BlockMask.kv_half_num ...), whose index rows are twice as long, hence at twice the offset."""
    if HALVES:
        return HALF_IDX + 2 * idx_off, tl.load(HALF_NUM + num_off)
    return IDX + idx_off, tl.load(NUM + num_off)


@triton.jit
def run_start(base, i, SUB: tl.constexpr, SPARSE: tl.constexpr, n_first, base2):
    """First position of the block tile ``i`` of a loop lies in, where the loop walks no table but
    ``n_first`` consecutive blocks from position ``base``, then consecutive blocks from ``base2`` (the
    document-aligned kernels, kernels/varlen.py)."""
    j = i // SUB
    # int32 as a table's entries are (the interpreter's loop counter is int64; TMA wants int32)
    return tl.cast(tl.where(j < n_first, base + j * SPARSE, base2 + (j - n_first) * SPARSE), tl.int32)


@triton.jit
def block_start(idx_ptr, i, n_blocks, start, SUB: tl.constexpr, SPARSE: tl.constexpr, AHEAD: tl.constexpr):
    """First position of the table block that tile ``i`` of a loop lies in (SUB tiles per block).

    Not AHEAD: loads the block's index now. AHEAD (i = -1 before the loop, then at the end of each
    iteration): ``start`` carried from the previous call, and the next block's index loaded when the
    next tile starts a block (torch flex's order; the compiler schedules the loads differently)."""
    if not AHEAD:
        return tl.load(idx_ptr + i // SUB) * SPARSE
    j = (i + 1) // SUB
    nxt = tl.load(idx_ptr + j, mask=j < n_blocks, other=0) * SPARSE
    return tl.where((i + 1) % SUB == 0, nxt, start)


@triton.jit
def two_tables_start(idx_ptr, n_first, IDX2, i, SUB: tl.constexpr, SPARSE: tl.constexpr):
    """First position of the block tile ``i`` of a one-loop walk lies in: the ``i // SUB``-th entry of
    the first table's ``n_first`` blocks, then of the second table's (both loads masked: one reads)."""
    j = i // SUB
    first = j < n_first
    a = tl.load(idx_ptr + j, mask=first, other=0)
    b = tl.load(IDX2 + (j - n_first), mask=j >= n_first, other=0)
    return tl.where(first, a, b) * SPARSE


@triton.jit
def tile_rows(start, rows_end, LEN, TILE: tl.constexpr):
    """(offs [TILE], rows_in [TILE], idx [TILE, 1]) of a program's rows start .. start + TILE - 1: those
    before ``rows_end`` are its own (loaded, stored), and the positions the mods see are clamped to
    LEN - 1 (mods never see positions past the end)."""
    offs = start + tl.arange(0, TILE)
    return offs, offs < rows_end, tl.minimum(offs, LEN - 1)[:, None]


@triton.jit
def tile_positions(offs, LEN, CHECK: tl.constexpr):
    """[1, n] positions the mods see for rows ``offs`` [n]: clamped to LEN - 1 when CHECK (rows past
    the end exist), so a mod never reads past its tensors."""
    if CHECK:
        return tl.minimum(offs, LEN - 1)[None, :]
    return offs[None, :]


@triton.jit
def kv_tiles(K_ptr, V_ptr, offs_n, stride_kn, stride_kd, stride_vn, stride_vd, KV_LEN,
             D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
             CHECK: tl.constexpr, V_T: tl.constexpr):
    """K^T [DP, BLOCK_N], V [BLOCK_N, DVP] (V^T [DVP, BLOCK_N] when V_T) of keys ``offs_n`` [BLOCK_N],
    and the key positions the mods see (tile_positions). The backward's dK/dV pass loads its Q^T and dO
    tiles with it too. CHECK: keys at or past KV_LEN load zeros and
    their positions are clamped (mods never see positions past the end); without it every key is in
    range and the loads carry no bounds checks."""
    offs_d = tl.arange(0, DP)
    offs_dv = tl.arange(0, DVP)
    k_ptrs = K_ptr + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    if V_T:
        v_ptrs = V_ptr + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd
        v_dims = offs_dv[:, None] < DV
    else:
        v_ptrs = V_ptr + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
        v_dims = offs_dv[None, :] < DV
    if CHECK:
        kv_in = offs_n < KV_LEN
        kT = tl.load(k_ptrs, mask=kv_in[None, :] & (offs_d[:, None] < D), other=0.0)
        if V_T:
            v = tl.load(v_ptrs, mask=kv_in[None, :] & v_dims, other=0.0)
        else:
            v = tl.load(v_ptrs, mask=kv_in[:, None] & v_dims, other=0.0)
    else:
        kT = tl.load(k_ptrs, mask=offs_d[:, None] < D, other=0.0)
        v = tl.load(v_ptrs, mask=v_dims, other=0.0)
    return kT, v, tile_positions(offs_n, KV_LEN, CHECK)


@triton.jit
def tma_tiles(K_DESC, V_DESC, b, hk, start_n, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr):
    """K^T [D, BLOCK_N] and V [BLOCK_N, DV] of rows start_n .. start_n + BLOCK_N of (b, hk), by the
    Hopper tensor-memory accelerator: descriptors over [B, H, S, D] tensors with [1, 1, BLOCK_N, D]
    boxes; no per-thread addresses, and rows past the end arrive as zeros. The backward reads its
    Q^T and dO tiles this way too."""
    k = tl.reshape(K_DESC.load([b, hk, start_n, 0]), (BLOCK_N, D))
    v = tl.reshape(V_DESC.load([b, hk, start_n, 0]), (BLOCK_N, DV))
    return tl.trans(k), v


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    K_ptr,
    V_ptr,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    idx_ptr,
    n_blocks,
    b,
    h,
    mb,
    mh,
    q_idx,
    KV_LEN,
    sm_scale,
    mask_args,
    score_args,
    MASK_MOD: tl.constexpr,
    SCORE_MOD: tl.constexpr,
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
    K_DESC=None,
    V_DESC=None,
    hk=0,
    IDX2=None,
    n_blocks2=0,
    base=0,
    base2=0,
):
    """The online softmax over the key blocks ``idx_ptr[:n_blocks]`` lists; with IDX2 (one loop), then
    over ``IDX2[:n_blocks2]`` in the same loop (the caller passes partial blocks first, full ones
    second; the mask and position checks then apply to both). ``idx_ptr`` None: ``n_blocks``
    consecutive blocks from position ``base``, then ``n_blocks2`` from ``base2`` (run_start)."""
    SUB: tl.constexpr = SPARSE_KV // BLOCK_N
    offs_n0 = tl.arange(0, BLOCK_N)
    start = 0
    if AHEAD:
        start = block_start(idx_ptr, -1, n_blocks, start, SUB, SPARSE_KV, True)
    for i in range(0, (n_blocks + n_blocks2) * SUB):
        if IDX2 is not None:
            start = two_tables_start(idx_ptr, n_blocks, IDX2, i, SUB, SPARSE_KV)
        elif idx_ptr is None:
            start = run_start(base, i, SUB, SPARSE_KV, n_blocks, base2)
        elif not AHEAD:
            start = block_start(idx_ptr, i, n_blocks, start, SUB, SPARSE_KV, False)
        offs_n = start + (i % SUB) * BLOCK_N + offs_n0
        kv_in = offs_n < KV_LEN
        if K_DESC is not None:
            kT, v = tma_tiles(K_DESC, V_DESC, b, hk, start + (i % SUB) * BLOCK_N, BLOCK_N, DP, DVP)
            kv_idx = tile_positions(offs_n, KV_LEN, not KV_DIVISIBLE)
        else:
            kT, v, kv_idx = kv_tiles(K_ptr, V_ptr, offs_n, stride_kn, stride_kd, stride_vn, stride_vd, KV_LEN,
                                     D, DP, DV, DVP, not KV_DIVISIBLE, False)
        qk = tl.dot(q, kT, input_precision=DOT_PREC)
        _, s = scores_tile(
            qk, b, h, mb, mh, q_idx, kv_idx, kv_in[None, :], sm_scale, mask_args, score_args,
            MASK_MOD, SCORE_MOD, APPLY_MASK, not KV_DIVISIBLE,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far: avoid inf - inf
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
        if AHEAD:
            start = block_start(idx_ptr, i, n_blocks, start, SUB, SPARSE_KV, True)
    return acc, l_i, m_i


# lengths and the strides that grow with them are run-time values: no variant per length
_FWD_DYNAMIC = ["stride_lb", "stride_lh", "stride_nb", "stride_nh", "stride_ib", "stride_ih", "stride_iq", "Q_LEN", "KV_LEN"]


@triton.jit(do_not_specialize=_FWD_DYNAMIC)
def attn_fwd_kernel(
    Q, K, V, O, LSE, SINK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh,
    KV_NUM, KV_IDX, FKV_NUM, FKV_IDX,
    stride_nb, stride_nh, stride_ib, stride_ih, stride_iq,
    KVH_NUM, KVH_IDX,  # half-block tables of the partial blocks (BlockMask.kv_half_num), read when PARTIAL_KV < SPARSE_KV
    Q_LEN, KV_LEN, HQ, GROUP, sm_scale,
    mask_args, score_args,
    MASK_MOD: tl.constexpr,
    SCORE_MOD: tl.constexpr,
    HAS_SINK: tl.constexpr,
    KV_DIVISIBLE: tl.constexpr,
    TAIL_PARTIAL: tl.constexpr,
    SPARSE_Q: tl.constexpr,
    SPARSE_KV: tl.constexpr,
    PARTIAL_KV: tl.constexpr,  # keys per entry of the partial-block list: SPARSE_KV, or half of it (halves)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_N_FULL: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    DV: tl.constexpr,
    DVP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    REVERSE_M: tl.constexpr,
    AHEAD_PARTIAL: tl.constexpr = False,
    AHEAD_FULL: tl.constexpr = False,
    K_DESC=None,  # with V_DESC: tensor descriptors the full-block loop loads K/V tiles through (TMA)
    V_DESC=None,
    K_DESC_PARTIAL=None,  # the same for the partial-block loop (BLOCK_N-key boxes)
    V_DESC_PARTIAL=None,
    ONE_LOOP: tl.constexpr = False,  # partial and full blocks in one loop of BLOCK_N-key tiles
    HEADS_FIRST: tl.constexpr = False,  # grid (B * HQ, query tiles): see tile_and_head
):
    pid_m, pid_bh = tile_and_head(HEADS_FIRST, REVERSE_M)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    row = start_m // SPARSE_Q

    offs_m, q_in, q_idx = tile_rows(start_m, Q_LEN, Q_LEN, BLOCK_M)
    offs_d = tl.arange(0, DP)
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=q_in[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    K_ptr = K + b * stride_kb + hk * stride_kh
    V_ptr = V + b * stride_vb + hk * stride_vh
    mb = tl.where(stride_nb != 0, b, 0)  # broadcast block-mask dims: the mask sees index 0
    mh = tl.where(stride_nh != 0, h, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DVP], tl.float32)

    num_off = b * stride_nb + h * stride_nh + row
    idx_off = b * stride_ib + h * stride_ih + row * stride_iq
    if ONE_LOOP:  # the full blocks join the partial blocks' loop (in its key tiles, without AHEAD)
        full_idx, n_full = FKV_IDX + idx_off, tl.load(FKV_NUM + num_off)
    else:
        full_idx, n_full = None, 0
    part_idx, n_part = partial_list(KV_NUM, KV_IDX, KVH_NUM, KVH_IDX, num_off, idx_off, PARTIAL_KV < SPARSE_KV)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
        part_idx, n_part, b, h, mb, mh, q_idx, KV_LEN, sm_scale, mask_args,
        score_args, MASK_MOD, SCORE_MOD, True, KV_DIVISIBLE, PARTIAL_KV, BLOCK_N, D, DP, DV, DVP, DOT_PREC,
        AHEAD_PARTIAL and not ONE_LOOP, K_DESC_PARTIAL, V_DESC_PARTIAL, hk, full_idx, n_full,
    )
    if not ONE_LOOP:
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
            FKV_IDX + idx_off, tl.load(FKV_NUM + num_off), b, h, mb, mh, q_idx, KV_LEN, sm_scale, mask_args,
            score_args, MASK_MOD, SCORE_MOD, False, KV_DIVISIBLE or TAIL_PARTIAL, SPARSE_KV, BLOCK_N_FULL, D, DP,
            DV, DVP, DOT_PREC, AHEAD_FULL, K_DESC, V_DESC, hk,
        )

    store_rows(acc, l_i, m_i, SINK, O, LSE, b, h, offs_m, q_in, stride_ob, stride_oh, stride_om, stride_od,
               stride_lb, stride_lh, HAS_SINK, DV, DVP)


@triton.jit
def store_rows(acc, l_i, m_i, SINK, O, LSE, b, h, offs_m, q_in, stride_ob, stride_oh, stride_om, stride_od,
               stride_lb, stride_lh, HAS_SINK: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr):
    """The end of a forward program: the sink's share of the softmax (HAS_SINK), then the output rows
    ``offs_m`` where ``q_in`` and their LSE. The LSE in the backward loops' form (launch.flex_forward):
    log2 units, a row with no allowed key +inf (its P is then 0, not NaN). The backward reads it as
    it is: no second per-row buffer."""
    if HAS_SINK:
        sink = tl.load(SINK + h).to(tl.float32) * 1.4426950408889634
        m_fin = tl.maximum(m_i, sink)
        alpha = tl.math.exp2(m_i - m_fin)
        l_i = l_i * alpha + tl.math.exp2(sink - m_fin)
        acc = acc * alpha[:, None]
        m_i = m_fin
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    offs_dv = tl.arange(0, DVP)
    tl.store(
        O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
        out.to(O.dtype.element_ty),
        mask=q_in[:, None] & (offs_dv[None, :] < DV),
    )
    tl.store(LSE + b * stride_lb + h * stride_lh + offs_m, lse, mask=q_in)
