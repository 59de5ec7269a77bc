"""The document-aligned causal backward and forward in Gluon for Hopper (sm_90): the dK/dV and dQ passes
of ``and_masks(causal(), document(ids))`` over the tile lists of the document-aligned Triton kernels
(kernels/varlen.py, launch_varlen.varlen_tiles), with the products and copies of
kernels/gluon_causal.py: explicitly asynchronous wgmma, TMA tiles behind mbarriers, two stages; and
the forward over the query-major list with kernels/gluon_forward.py's steps (two programs an SM:
``varlen_forward``; 24 documents GQA at 16k, 315 against 274 TFLOP/s on the Triton forward, H100,
NOTES.md, nineteenth round).

Why: on the H100, forward+backward of the 24-document GQA anchor case 253 against 242 TFLOP/s on the
Triton kernels (+4.5 %). Without GQA (12 documents, one query head a key head) the passes' kernels
ran 818 against 874 us, but the call turned host-bound: three launches and eight descriptors cost
the host more than the Triton kernels' one launch, so launch_varlen takes this path for query-head
groups of SCHEDULE["gluon_varlen_min_group"] heads or more (NOTES.md, seventeenth round).

Tiles: tile t of a row's list starts at position ``start`` of a document [lo, end) (lo + a multiple of
128); its queries (dQ) or keys (dK/dV) are start .. min(start + 128, end) - 1. A query past ``end``
(the next document's, or past the tensor) reads LSE +inf and delta 0: its P and dS are 0 in every
product, which is its whole mask outside the diagonal's steps; rows past ``end`` are not stored.

dK/dV: a launch of cdiv(S, 128) x B * Hkv programs, one tile each (the first cdiv(S, 128) of the row's
key-major list, the longest), then one of cdiv(S, 512) x B * Hkv programs walking the rest (at most
one tile per document). K and V of the tile resident; Q and dO in 64-query steps from ``start`` to
``end`` for each query head of the key head's group: the diagonal's two steps masked (keys past the
query, which include the keys past ``end`` of a short tile; both always run), the rest without mask.
dQ: cdiv(S, 128) x B * Hq programs walking tiles p, p + cdiv(S, 128), ... of the query-major list; Q
and dO resident, K and V of the key head in 64-key steps from ``lo``: those before ``start`` without
mask, the diagonal's masked. Deterministic: no atomics. With programs of 64 positions
(SCHEDULE["gluon_varlen_bwd_tiles"] (64, 64, 4): one warpgroup, two programs an SM), each listed tile
is two programs' tiles, its halves, and each count above doubles; a half past the document's end
runs nothing.

Layouts: q [B, Hq, S, D], k, v [B, Hkv, S, D], dout like q, all head-major or all token-major, the
gradients in the same (gluon_causal.layout; in the token-major layout a tile that runs past a batch
row's end reads the next row's first positions, which the rules above leave out like any other
document's); lse2 and delta contiguous float32 [B, Hq, S]; bf16 or fp16; any S. D = 128 (the kernels
take 64 too, but the document-aligned tile at D = 64 is not 128 positions: launch_varlen.varlen_tile).
"""
from __future__ import annotations

import torch

from . import _cuda_major, cuda_index, interpreted, launcher
from .forward import LOG2E
from .gluon_causal import (
    AVAILABLE, HEAD_DIMS, STEP, TILE, check_tiles, in_layout, layout, pass_descriptors, run_passes,
)
from .gluon_forward import launch_inputs

if AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier, tma, warpgroup_mma, warpgroup_mma_init, warpgroup_mma_wait,
    )

    from .gluon_causal import _buffers, _copy_pair, _mma_layout, _release, _tile_origin
    from .gluon_forward import _fwd_buffers, _fwd_release, _fwd_step, _fwd_store


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile: int, score_fn, head_dims=(128,)) -> bool:
    """Whether this backward runs for a document-aligned call (KernelSpec.varlen found its tiles):
    tile lists of 128 positions, no score mod, Gluon importable, q on a Hopper GPU (not Triton's
    interpreter), and inputs ``layout_ok`` accepts."""
    if not (tile == TILE and score_fn is None and AVAILABLE and q.device.type == "cuda" and not interpreted()):
        return False
    return _cuda_major(cuda_index(q.device)) == 9 and layout_ok(q, k, v, head_dims)


def layout_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dims=(128,)) -> bool:
    """The input part of ``applies`` (any device): 16-bit q, k, v of one dtype, q [B, Hq, S, D] and k, v
    [B, Hkv, S, D] with Hkv dividing Hq, all head-major or all token-major (gluon_causal.layout), D in
    ``head_dims`` and HEAD_DIMS, and fewer than 2**31 elements (the kernels' output offsets are
    32-bit)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    B, HQ, S, D = q.shape
    HKV = k.shape[1]
    return (q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype and v.dtype == q.dtype
            and k.shape == (B, HKV, S, D) and v.shape == k.shape and HKV > 0 and HQ % HKV == 0
            and D in head_dims and D in HEAD_DIMS and q.numel() < 2**31 and layout(q, k, v) is not None)


if AVAILABLE:

    @gluon.jit
    def _doc_tile(TILES, SPANS, b, t, stride_tb, stride_sb):
        """(first position, document's first position, document's end) of tile t of row b's list; SPANS
        [B, S] int64 lo | hi << 32 (mods.document_spans), hi the document's last position."""
        start = gl.load(TILES + b * stride_tb + t).to(gl.int32)  # int16 lists where positions fit
        sp = gl.load(SPANS + b * stride_sb + start)
        return start, sp.to(gl.int32), (sp >> 32).to(gl.int32) + 1

    @gluon.jit
    def _row_inputs(LSE, DELTA, row, pos, end, n: gl.constexpr, num_warps: gl.constexpr):
        """LSE (log2) and delta of the n flat rows from ``row`` (positions pos ...), one element a thread
        (gl.convert_layout moves them into the products' layout where they are used): +inf and 0 at
        positions from ``end`` on (past the tile's document), so that the row's P and dS are 0 in every
        product. A tile starts at any position: loads straight into the products' layout, unaligned,
        take a 64-bit address per element (register spills in the dK/dV loop)."""
        ld_layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        i = gl.arange(0, n, layout=ld_layout)
        inside = pos + i < end
        lse = gl.load(LSE + row + i, mask=inside, other=float("inf"))
        delta = gl.load(DELTA + row + i, mask=inside, other=0.0)
        return lse, delta

    @gluon.jit
    def _dkdv_step(r, r_end, rows, next_rows, next_col, first_q, end, keys, k_smem, v_smem, q_smem, do_smem, bars,
                   q_desc, do_desc, LSE, DELTA, offs_m, zero_s, dk, dv, qk_scale, a_layout: gl.constexpr,
                   MASKED: gl.constexpr, num_warps: gl.constexpr):
        """Step r (stage r % 2; the tile's steps end before r_end) of a dK/dV program: queries first_q ...
        of LSE rows ``rows`` ...; the next step's tiles at (``next_rows``, ``next_col``) of the descriptors.
        The order of gluon_causal's dK/dV step: S^T and dP^T issued, S^T waited, the other stage refilled,
        dV and dK products left in flight. MASKED: keys after the query masked."""
        st = r % 2
        mbarrier.wait(bars.index(st), (r // 2) & 1)
        qs = q_smem.index(st)
        dos = do_smem.index(st)
        lse, delta = _row_inputs(LSE, DELTA, rows, first_q, end, offs_m.shape[0], num_warps)
        sT = warpgroup_mma(k_smem, qs.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        dpT = warpgroup_mma(v_smem, dos.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        sT = warpgroup_mma_wait(num_outstanding=1, deps=(sT,))
        # moved into the products' layout only now: earlier, the 32 registers they take live through
        # the products' issue (spills)
        lse = gl.convert_layout(lse, offs_m.type.layout)
        if r + 1 < r_end:
            nx = (r + 1) % 2
            _copy_pair(q_desc, do_desc, next_rows, next_col, bars.index(nx), q_smem.index(nx), do_smem.index(nx))
        if MASKED:
            sT = gl.where((first_q + offs_m)[None, :] >= keys[:, None], sT, float("-inf"))
        pT = gl.exp2(sT * qk_scale - lse[None, :])
        dv = warpgroup_mma(gl.convert_layout(pT.to(qs.dtype), a_layout), dos, dv, is_async=True)
        dpT = warpgroup_mma_wait(num_outstanding=1, deps=(dpT,))
        delta = gl.convert_layout(delta, offs_m.type.layout)
        dsT = pT * (dpT - delta[None, :])
        dk = warpgroup_mma(gl.convert_layout(dsT.to(qs.dtype), a_layout), qs, dk, is_async=True)
        return dk, dv

    @gluon.jit
    def _dkdv_tile(t, valid, base, kv_phase, b, kv_row0, kv_col, kv_stride, q_row0, q_trow0, q_col0, q_desc, k_desc,
                   v_desc, do_desc, LSE, DELTA, DK, DV, TILES, SPANS, stride_tb, stride_sb, S, k_smem, v_smem, q_smem,
                   do_smem, kv_bar, bars, qk_scale, sm_scale, G: gl.constexpr, TOKENS: gl.constexpr,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, num_warps: gl.constexpr):
        """dK (times sm_scale) and dV of tile t of one key head, from the G query heads of its group (none
        where not ``valid``: no step, no store): the BLOCK_N keys from position (t % SPLIT) * BLOCK_N of
        tile t // SPLIT of row b's key-major list (SPLIT = 128 // BLOCK_N parts a listed tile); ``base``: the steps this
        program ran before (the stages' counter), ``kv_phase``: the K/V barrier's. Returns the counter
        after the tile's steps. One query head (G = 1): the diagonal's steps (masked), then the rest.
        A group: the diagonal's steps of every head in one masked loop, then the rest head by head (the
        head loop unrolled around both step loops, ptxas spills hundreds of bytes). (kv_row0, kv_col): the
        key head's first tile in the descriptors, kv_stride dK and dV's row stride; q_row0: the group's
        first LSE row, (q_trow0, q_col0): its first tile in the descriptors (head j's: j * S rows
        further, head-major; j * D columns, token-major: TOKENS)."""
        s_layout: gl.constexpr = _mma_layout(BLOCK_M, num_warps)  # S^T [BLOCK_N keys, BLOCK_M queries]
        acc_layout: gl.constexpr = _mma_layout(D, num_warps)
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        n_diag: gl.constexpr = BLOCK_N // BLOCK_M
        SPLIT: gl.constexpr = 128 // BLOCK_N  # programs' tiles per tile of the lists (128 positions)
        start, lo, end = _doc_tile(TILES, SPANS, b, t // SPLIT, stride_tb, stride_sb)
        start = start + (t % SPLIT) * BLOCK_N  # (a part past the document's end: no step, no store)
        end = gl.where(valid & (start < end), end, start)
        # the diagonal's n_diag steps always run (queries past ``end`` add nothing): a step loop that may
        # not run at all merges the accumulators' zeros with its products, which serialises the wgmma
        n_steps = gl.maximum((end - start + BLOCK_M - 1) // BLOCK_M, n_diag)
        r_end = base + G * n_steps
        _copy_pair(k_desc, v_desc, kv_row0 + start, kv_col, kv_bar, k_smem, v_smem)
        st0 = base % 2
        _copy_pair(q_desc, do_desc, q_trow0 + start, q_col0, bars.index(st0), q_smem.index(st0), do_smem.index(st0))
        offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
        zero_s = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)
        keys = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
        dk = warpgroup_mma_init(gl.zeros([BLOCK_N, D], gl.float32, acc_layout))
        dv = warpgroup_mma_init(gl.zeros([BLOCK_N, D], gl.float32, acc_layout))
        mbarrier.wait(kv_bar, kv_phase)
        head0 = q_row0 + start  # the LSE row of the first head's query ``start``; head j's: + j * S
        thead0 = q_trow0 + start  # its descriptor row (head-major: head0; head j's: + j * S)
        if G == 1:
            for i in gl.static_range(n_diag):
                nxt = thead0 + (i + 1) * BLOCK_M
                dk, dv = _dkdv_step(base + i, r_end, head0 + i * BLOCK_M, nxt, q_col0, start + i * BLOCK_M, end, keys,
                                    k_smem, v_smem, q_smem, do_smem, bars, q_desc, do_desc, LSE, DELTA, offs_m, zero_s,
                                    dk, dv, qk_scale, a_layout, True, num_warps)
            for i in range(n_diag, n_steps):
                dk, dv = _dkdv_step(base + i, r_end, head0 + i * BLOCK_M, thead0 + (i + 1) * BLOCK_M, q_col0,
                                    start + i * BLOCK_M, end, keys, k_smem, v_smem, q_smem, do_smem, bars, q_desc,
                                    do_desc, LSE, DELTA, offs_m, zero_s, dk, dv, qk_scale, a_layout, False, num_warps)
        else:
            for r in range(0, G * n_diag):  # head r // n_diag, step r % n_diag; then head 0's first unmasked
                i = r % n_diag
                if TOKENS:  # the next head's tiles D columns to the right
                    nxt = gl.where(r + 1 < G * n_diag, thead0 + ((r + 1) % n_diag) * BLOCK_M, thead0 + n_diag * BLOCK_M)
                    ncol = gl.where(r + 1 < G * n_diag, q_col0 + ((r + 1) // n_diag) * D, q_col0)
                else:
                    nxt = gl.where(r + 1 < G * n_diag, head0 + ((r + 1) // n_diag) * S + ((r + 1) % n_diag) * BLOCK_M,
                                   head0 + n_diag * BLOCK_M)
                    ncol = 0
                dk, dv = _dkdv_step(base + r, r_end, head0 + (r // n_diag) * S + i * BLOCK_M, nxt, ncol,
                                    start + i * BLOCK_M, end, keys, k_smem, v_smem, q_smem, do_smem, bars, q_desc,
                                    do_desc, LSE, DELTA, offs_m, zero_s, dk, dv, qk_scale, a_layout, True, num_warps)
            n_rest = n_steps - n_diag
            for j in range(G):
                head = head0 + j * S
                r0 = base + G * n_diag + j * n_rest - n_diag  # step i's counter: r0 + i
                for i in range(n_diag, n_steps):
                    if TOKENS:
                        col = q_col0 + j * D
                        nxt = gl.where(i + 1 < n_steps, thead0 + (i + 1) * BLOCK_M, thead0 + n_diag * BLOCK_M)
                        ncol = gl.where(i + 1 < n_steps, col, col + D)
                    else:
                        nxt = gl.where(i + 1 < n_steps, head + (i + 1) * BLOCK_M, head + S + n_diag * BLOCK_M)
                        ncol = 0
                    dk, dv = _dkdv_step(r0 + i, r_end, head + i * BLOCK_M, nxt, ncol, start + i * BLOCK_M, end, keys,
                                        k_smem, v_smem, q_smem, do_smem, bars, q_desc, do_desc, LSE, DELTA, offs_m,
                                        zero_s, dk, dv, qk_scale, a_layout, False, num_warps)
        dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv))
        rows_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_layout))
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, acc_layout))
        offs = (kv_row0 + start + rows_n)[:, None] * kv_stride + kv_col + cols[None, :]
        keep = (start + rows_n < end)[:, None]
        gl.store(DK + offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=keep)
        gl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=keep)
        return r_end

    # the arguments that follow the sequence length, never specialised (a packed length that divides 16, or
    # one tile's list, would otherwise compile another variant mid-training: the recompile check counts these)
    _DYNAMIC = ["stride_tb", "stride_sb", "stride_nb", "S", "N_PROGRAMS"]

    @gluon.jit(do_not_specialize=_DYNAMIC + ["FIRST", "stride_tl"])
    def attn_bwd_dkdv_varlen_kernel(q_desc, k_desc, v_desc, do_desc, LSE, DELTA, DK, DV, TILES, N_TILES, SPANS,
                                    stride_tb, stride_sb, stride_nb, S, HQ, HKV, N_PROGRAMS, qk_scale, sm_scale,
                                    FIRST, stride_tl, G: gl.constexpr, WALK: gl.constexpr, TOKENS: gl.constexpr,
                                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
                                    num_warps: gl.constexpr):
        """Grid (N_PROGRAMS, B * HKV): dK (times sm_scale) and dV of key head program_id(1) from the G query
        heads of its group, of tile FIRST + program_id(0) (_dkdv_tile's numbering: BLOCK_N keys, 128 //
        BLOCK_N of them a tile of the row's key-major list, TILES + stride_tl: tiles[:, 1], addressed from
        the lists' base, whose alignment does not depend on S); WALK: and of every N_PROGRAMS-th tile
        after it. A launch without WALK covers the first cdiv(S, 128) listed tiles (the longest): the
        walk's loop over tiles costs ptxas registers it then spills; a launch with it the rest (at most
        one listed tile per document). TOKENS: q, k, v, dout, dK and dV
        token-major ([B, S, H, D] storage; descriptors over [B * S, H * D]), else head-major."""
        pid = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // HKV
        q_row0 = (b * HQ + (bh % HKV) * G) * S  # LSE and delta's
        if TOKENS:
            kv_row0, kv_col, kv_stride = b * S, (bh % HKV) * D, HKV * D
            q_trow0, q_col0 = b * S, (bh % HKV) * G * D
        else:
            kv_row0, kv_col, kv_stride = bh * S, 0, D
            q_trow0, q_col0 = q_row0, 0
        k_smem, v_smem, q_smem, do_smem, kv_bar, bars = _buffers(k_desc, v_desc, q_desc, do_desc, BLOCK_N, BLOCK_M, D)
        n_tiles = gl.load(N_TILES + b * stride_nb)
        TILES = TILES + stride_tl
        if WALK:
            base = pid * 0  # steps run so far by this program (the stages' counter)
            kv_phase = pid * 0
            for t in range(FIRST + pid, (128 // BLOCK_N) * n_tiles, N_PROGRAMS):
                base = _dkdv_tile(t, True, base, kv_phase, b, kv_row0, kv_col, kv_stride, q_row0, q_trow0, q_col0,
                                  q_desc, k_desc, v_desc, do_desc, LSE, DELTA, DK, DV, TILES, SPANS, stride_tb,
                                  stride_sb, S, k_smem, v_smem, q_smem, do_smem, kv_bar, bars, qk_scale, sm_scale, G,
                                  TOKENS, BLOCK_M, BLOCK_N, D, num_warps)
                kv_phase = kv_phase ^ 1
        else:
            # (a program past the row's tiles reads a position of the list that starts no tile, and runs
            # no step: branch-free, as a branch around the steps also serialises the wgmma)
            _dkdv_tile(FIRST + pid, FIRST + pid < (128 // BLOCK_N) * n_tiles, 0, 0, b, kv_row0, kv_col, kv_stride, q_row0, q_trow0,
                       q_col0, q_desc, k_desc, v_desc, do_desc, LSE, DELTA, DK, DV, TILES, SPANS, stride_tb, stride_sb,
                       S, k_smem, v_smem, q_smem, do_smem, kv_bar, bars, qk_scale, sm_scale, G, TOKENS, BLOCK_M,
                       BLOCK_N, D, num_warps)
        _release(kv_bar, bars)

    @gluon.jit
    def _dq_step(r, r_end, next_rows, col, first_k, q_pos, q_smem, do_smem, k_smem, v_smem, bars, k_desc, v_desc,
                 lse, delta, zero_s, dq, qk_scale, a_layout: gl.constexpr, MASKED: gl.constexpr,
                 BLOCK_N: gl.constexpr):
        """Step r (stage r % 2; the tile's steps end before r_end) of a dQ program: keys first_k ...; the
        next step's tiles at (``next_rows``, ``col``) of the descriptors. The order of gluon_causal's dQ step,
        the dQ product waited before returning. MASKED: keys after the query (q_pos) masked."""
        st = r % 2
        mbarrier.wait(bars.index(st), (r // 2) & 1)
        ks = k_smem.index(st)
        s = warpgroup_mma(q_smem, ks.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        dp = warpgroup_mma(do_smem, v_smem.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
        if r + 1 < r_end:
            nx = (r + 1) % 2
            _copy_pair(k_desc, v_desc, next_rows, col, bars.index(nx), k_smem.index(nx), v_smem.index(nx))
        if MASKED:
            keys = first_k + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, zero_s.type.layout))
            s = gl.where(q_pos[:, None] >= keys[None, :], s, float("-inf"))
        p = gl.exp2(s * qk_scale - lse[:, None])
        dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp,))
        ds = p * (dp - delta[:, None])
        dq = warpgroup_mma(gl.convert_layout(ds.to(ks.dtype), a_layout), ks, dq, is_async=True)
        return warpgroup_mma_wait(num_outstanding=0, deps=(dq,))

    @gluon.jit(do_not_specialize=_DYNAMIC)
    def attn_bwd_dq_varlen_kernel(q_desc, k_desc, v_desc, do_desc, LSE, DELTA, DQ, TILES, N_TILES, SPANS,
                                  stride_tb, stride_sb, stride_nb, S, HQ, HKV, N_PROGRAMS, qk_scale, sm_scale,
                                  G: gl.constexpr, TOKENS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                  D: gl.constexpr, num_warps: gl.constexpr):
        """Grid (N_PROGRAMS, B * HQ): dQ (times sm_scale) of tiles program_id(0), + N_PROGRAMS, ... of query
        head program_id(1), from its document's keys through the tile's diagonal: tile u the BLOCK_M
        queries from position (u % SPLIT) * BLOCK_M of tile u // SPLIT of the query-major list (TILES:
        tiles[:, 0]; SPLIT = 128 // BLOCK_M). TOKENS: as attn_bwd_dkdv_varlen_kernel's."""
        pid = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // HQ
        q_row0 = bh * S  # LSE and delta's
        if TOKENS:
            q_trow0, q_col, q_stride = b * S, (bh % HQ) * D, HQ * D
            kv_row0, kv_col = b * S, ((bh % HQ) // G) * D
        else:
            q_trow0, q_col, q_stride = q_row0, 0, D
            kv_row0, kv_col = (b * HKV + (bh % HQ) // G) * S, 0
        s_layout: gl.constexpr = _mma_layout(BLOCK_N, num_warps)
        acc_layout: gl.constexpr = _mma_layout(D, num_warps)
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        q_smem, do_smem, k_smem, v_smem, qo_bar, bars = _buffers(q_desc, do_desc, k_desc, v_desc, BLOCK_M, BLOCK_N, D)
        rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        rows_o = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, acc_layout))
        SPLIT: gl.constexpr = 128 // BLOCK_M  # programs' tiles per tile of the lists (128 positions)
        n_tiles = gl.load(N_TILES + b * stride_nb)
        base = pid * 0
        qo_phase = pid * 0
        for u in range(pid, SPLIT * n_tiles, N_PROGRAMS):
            start, lo, end = _doc_tile(TILES, SPANS, b, u // SPLIT, stride_tb, stride_sb)
            start = start + (u % SPLIT) * BLOCK_M
            # a part past the document's end runs no step and copies no K/V (its tile's first part holds
            # every query; its Q copy lands and its stores are masked)
            n_full = gl.where(start < end, (start - lo) // BLOCK_N, 0)  # key steps before the tile: whole
            n_steps = gl.where(start < end, n_full + (gl.minimum(end - start, BLOCK_M) + BLOCK_N - 1) // BLOCK_N, 0)
            r_end = base + n_steps
            _copy_pair(q_desc, do_desc, q_trow0 + start, q_col, qo_bar, q_smem, do_smem)
            st0 = base % 2
            _copy_pair(k_desc, v_desc, kv_row0 + lo, kv_col, bars.index(st0), k_smem.index(st0), v_smem.index(st0),
                       n_steps > 0)
            q_pos = start + rows
            lse, delta = _row_inputs(LSE, DELTA, q_row0 + start, start, end, BLOCK_M, num_warps)
            lse = gl.convert_layout(lse, rows.type.layout)
            delta = gl.convert_layout(delta, rows.type.layout)
            dq = gl.zeros([BLOCK_M, D], gl.float32, acc_layout)
            mbarrier.wait(qo_bar, qo_phase)
            krow = kv_row0 + lo
            for i in range(0, n_full):
                dq = _dq_step(base + i, r_end, krow + (i + 1) * BLOCK_N, kv_col, lo + i * BLOCK_N, q_pos,
                              q_smem, do_smem, k_smem, v_smem, bars, k_desc, v_desc, lse, delta, zero_s, dq, qk_scale,
                              a_layout, False, BLOCK_N)
            for i in range(n_full, n_steps):
                dq = _dq_step(base + i, r_end, krow + (i + 1) * BLOCK_N, kv_col, lo + i * BLOCK_N, q_pos,
                              q_smem, do_smem, k_smem, v_smem, bars, k_desc, v_desc, lse, delta, zero_s, dq, qk_scale,
                              a_layout, True, BLOCK_N)
            keep = (start + rows_o < end)[:, None]
            gl.store(DQ + (q_trow0 + start + rows_o)[:, None] * q_stride + q_col + cols[None, :],
                     (dq * sm_scale).to(DQ.dtype.element_ty), mask=keep)
            base = r_end
            qo_phase = qo_phase ^ 1
        _release(qo_bar, bars)


    @gluon.jit(do_not_specialize=_DYNAMIC)
    def attn_fwd_varlen_gluon_kernel(q_desc, k_desc, v_desc, O, LSE, TILES, N_TILES, SPANS, stride_tb, stride_sb,
                                     stride_nb, S, HQ, HKV, N_PROGRAMS, qk_scale, TOKENS: gl.constexpr,
                                     Q_REG: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                     D: gl.constexpr, NB: gl.constexpr, num_warps: gl.constexpr):
        """Grid (N_PROGRAMS, B * HQ): O (q's layout) and LSE (log2) of tiles program_id(0), + N_PROGRAMS, ...
        of the query-major list (TILES: tiles[:, 0]) of query head program_id(1), with gluon_forward's steps
        (two programs an SM): keys from the tile's document's first position lo in BLOCK_N-key steps, those
        before the tile unmasked, the diagonal's two masked (keys after the query; those past the
        document's end are after every query it stores); rows past the document's end are not stored.
        The K/V stages' counter runs on across a program's tiles. TOKENS: as the dQ kernel's."""
        pid = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // HQ
        trow0, col, row_stride = _tile_origin(bh, HQ, S, TOKENS, D)  # q's and O's
        kv_row0, kv_col, _ = _tile_origin(b * HKV + (bh % HQ) // (HQ // HKV), HKV, S, TOKENS, D)
        q_s, k_bufs, v_bufs, q_bar, bars = _fwd_buffers(q_desc, k_desc, v_desc, BLOCK_M, BLOCK_N, D, NB)
        s_layout: gl.constexpr = _mma_layout(BLOCK_N, num_warps)
        o_layout: gl.constexpr = _mma_layout(D, num_warps)
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        rows_s = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        n_tiles = gl.load(N_TILES + b * stride_nb)
        base = pid * 0  # steps run so far by this program (the stages' counter)
        q_phase = pid * 0
        for t in range(pid, n_tiles, N_PROGRAMS):
            start, lo, end = _doc_tile(TILES, SPANS, b, t, stride_tb, stride_sb)
            n_free = (start - lo) // BLOCK_N  # key steps before the tile: every query sees them whole
            j_end = n_free + BLOCK_M // BLOCK_N
            mbarrier.expect(q_bar, BLOCK_M * D * q_desc.dtype.primitive_bitwidth // 8)
            tma.async_copy_global_to_shared(q_desc, [trow0 + start, col], q_bar, q_s)
            for i in gl.static_range(NB - 1):  # (j_end >= BLOCK_M // BLOCK_N >= NB - 1)
                st = (base + i) % NB
                _copy_pair(k_desc, v_desc, kv_row0 + lo + i * BLOCK_N, kv_col, bars.index(st), k_bufs.index(st),
                           v_bufs.index(st))
            rows = start + rows_s
            m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
            l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
            acc = warpgroup_mma_init(gl.zeros([BLOCK_M, D], gl.float32, o_layout))
            mbarrier.wait(q_bar, q_phase)
            if Q_REG:
                q_a = q_s.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
            else:
                q_a = q_s
            for j in range(0, n_free):
                acc, m_i, l_i = _fwd_step(base + j, j, j_end, kv_row0 + lo, kv_col, q_a, k_desc, v_desc, k_bufs,
                                          v_bufs, bars, acc, m_i, l_i, zero_s, qk_scale, rows, 0, a_layout, o_layout,
                                          False, False, BLOCK_N, lo)
            for j in range(n_free, j_end):
                acc, m_i, l_i = _fwd_step(base + j, j, j_end, kv_row0 + lo, kv_col, q_a, k_desc, v_desc, k_bufs,
                                          v_bufs, bars, acc, m_i, l_i, zero_s, qk_scale, rows, 0, a_layout, o_layout,
                                          True, False, BLOCK_N, lo)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            _fwd_store(acc, m_i, l_i, O, LSE, trow0 + start, col, row_stride, bh * S + start, o_layout, BLOCK_M, D,
                       end - start)
            base = base + j_end
            q_phase = q_phase ^ 1
        _fwd_release(q_bar, bars, NB)


def varlen_forward(q, k, v, out, lse2, tiles, n_tiles, spans, sm_scale: float, warmup: bool = False) -> None:
    """Writes out (launch.out_like(q, D): q's layout) and lse2 (float32 [B, Hq, S], rows of stride S,
    launch.row_buffer) of ``and_masks(causal(), document(ids))`` from inputs ``applies`` accepted and the
    tile lists of launch_varlen.varlen_tiles(spans, 128), with gluon_forward's steps and per-head-dim
    choices (gluon_forward.launch_inputs). No score mod, no sink, a positive scale (the caller's checks).
    ``warmup``: compile only."""
    from .launch_varlen import _list_args  # (launch_varlen imports this module)

    B, HQ, S, D = q.shape
    descs, kwargs = launch_inputs(q, k, v, out, lse2, "varlen_forward")
    _, _, _, stride_tb, stride_sb, stride_nb = _list_args(tiles, n_tiles, spans)
    n_programs = -(-S // TILE)
    launcher(warmup)(attn_fwd_varlen_gluon_kernel, (n_programs, B * HQ))(
        *descs, out, lse2, tiles[:, 0], n_tiles, spans, stride_tb, stride_sb, stride_nb, S, HQ, k.shape[1],
        n_programs, sm_scale * LOG2E, **kwargs)


def varlen_backward(q, k, v, dout, lse2, delta, tiles, n_tiles, spans, sm_scale: float, concurrent: bool = True,
                    warmup: bool = False, programs: tuple = (TILE, STEP, 8)):
    """(dq, dk, dv) of ``and_masks(causal(), document(ids))`` from the inputs ``applies`` accepted, dout
    (copied into q's layout where it is not in it; the gradients have the inputs' layout, as in
    gluon_causal.causal_backward), lse2 and delta contiguous float32 [B, Hq, S], and the tile
    lists of launch_varlen.varlen_tiles(spans, 128) (tiles [Bs, 2, S], n_tiles [Bs], spans [Bs, S];
    Bs = 1 serves every batch row). ``concurrent``: the dQ launch on a second stream, as in
    gluon_causal.causal_backward; ``warmup``: compile only, as there. ``programs``: (tile, step, warps)
    of both passes' programs (gluon_causal.check_tiles; launch.SCHEDULE["gluon_varlen_bwd_tiles"]): a
    program's tile of 64 positions is one half of a listed tile (the lists stay those of 128), and
    (64, 64, 4) puts two programs on an SM."""
    from .launch_varlen import _list_args  # (launch_varlen imports this module)

    B, HQ, S, D = q.shape
    HKV = k.shape[1]
    tile, step, warps = check_tiles(programs)
    split = TILE // tile  # programs a listed tile
    tokens = layout(q, k, v) == "tokens"
    dout = in_layout(dout, q)
    dq, dk, dv = (q, k, v) if warmup else (torch.empty_like(t) for t in (q, k, v))  # (as in causal_backward)
    qk_scale = sm_scale * LOG2E
    q_s, do_s, k_t, v_t, q_t, do_t, k_s, v_s = pass_descriptors(q, k, v, dout, tokens, tile, step)
    n_listed = -(-S // TILE)  # the listed tiles the dK/dV pass's first launch covers, the longest
    n_programs = split * n_listed
    _, _, _, stride_tb, stride_sb, stride_nb = _list_args(tiles, n_tiles, spans)
    lists = (spans, stride_tb, stride_sb, stride_nb, S, HQ, HKV, n_programs, qk_scale, sm_scale)
    go = launcher(warmup)

    def dq_pass():
        go(attn_bwd_dq_varlen_kernel, (n_programs, B * HQ))(
            q_t, k_s, v_s, do_t, lse2, delta, dq, tiles[:, 0], n_tiles, *lists, G=HQ // HKV, TOKENS=tokens,
            BLOCK_M=tile, BLOCK_N=step, D=D, num_warps=warps)

    def dkdv_pass():
        dkdv_args = (q_s, k_t, v_t, do_s, lse2, delta, dk, dv, tiles, n_tiles, *lists)
        go(attn_bwd_dkdv_varlen_kernel, (n_programs, B * HKV))(
            *dkdv_args, 0, tiles.stride(1), G=HQ // HKV, WALK=False, TOKENS=tokens, BLOCK_M=step, BLOCK_N=tile, D=D,
            num_warps=warps)
        # the listed tiles past the first n_listed: at most one per document, the shortest (key-major order)
        n_walk = -(-n_programs // 4)
        go(attn_bwd_dkdv_varlen_kernel, (n_walk, B * HKV))(
            *dkdv_args[:-3], n_walk, qk_scale, sm_scale, n_programs, tiles.stride(1), G=HQ // HKV, WALK=True,
            TOKENS=tokens, BLOCK_M=step, BLOCK_N=tile, D=D, num_warps=warps)

    run_passes(q.device, dq_pass, dkdv_pass, concurrent and not warmup)
    return None if warmup else (dq, dk, dv)
