"""The causal attention backward in Gluon for Hopper (sm_90): the dK/dV and dQ passes of a mask that is
exactly causal, or causal within a sliding window (key <= query < key + window), with its products as
explicitly asynchronous wgmma and its tiles by TMA behind mbarriers, issued in an order Triton's
``tl.dot`` pipeline does not produce.

Why: on the H100 these passes run 13-16 % faster than the block-sparse Triton kernels' on causal 2k and
8k, forward+backward 4-8 % (tests/benchmarks/NOTES.md, sixteenth round: ``scripts/gluon_bwd_proto.py``,
``scripts/tune_schedule.py`` variants gluon_bwd_off, gluon_one_stream); within a 1024-key window at
8k, forward+backward 312 against 297 TFLOP/s (seventeenth round, variant gluon_sliding_off): each program issues
its resident tiles and its first two stages of streamed tiles before it waits for any, and runs the
softmax and dS work while the next products are in flight. Gluon kernels cannot call hf_flex's Triton
mask and score functions, so this path takes only the mask it knows (``applies``); every other mask,
score mod, device and Triton's interpreter run the Triton kernels (kernels/backward.py).

Layouts: q, k, v, dout [B, H, S, D], all head-major (contiguous: read as [B * H * S, D] rows through
TMA descriptors) or all token-major (transposed views of contiguous [B, S, H, D], Transformers' q, k
and v: read as [B * S, H * D], a head's tiles D columns wide at column h * D), the gradients written
in the same layout (``layout``, constexpr TOKENS); lse2 and delta contiguous float32 [B, H, S] (lse2 in
log2 units of the scaled scores, delta = rowsum(dO O) - dLSE, launch.delta_pass). S a multiple of 128,
D = 64 or 128, bf16 or fp16, as many key heads as query heads.

dK/dV programs: one per (128-key tile, batch x head), tile 0 (the longest causal column) first; K and
V resident, Q and dO in 64-query steps through two stages, from the tile's diagonal to the end (or
the last query the window lets see a key of the tile): the diagonal's two steps masked in a loop of
their own, then a loop without mask (with a window: the steps between the diagonal and the window's
edge without mask first, then the diagonal's and the edge's masked in one loop). dQ programs: one per
(128-query tile, batch x head), the last (longest) tile first; Q and dO resident, K and V in 64-key
steps through two stages from key 0 (or the first key the window lets one of its queries see)
through the diagonal: the window edge's steps masked, a loop without mask, the diagonal's two steps
masked. A plain causal mask (a window of S keys or more) runs the kernels compiled without the
window's loops and compares (SLIDING false). Deterministic: no atomics.
"""
from __future__ import annotations

import functools

import torch

from . import _cuda_major, cuda_index, interpreted, launcher
from .forward import LOG2E

try:  # Gluon ships with Triton >= 3.5; without it (or its Hopper module) this path never applies
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier, tma, warpgroup_mma, warpgroup_mma_init, warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import constexpr_function

    AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    AVAILABLE = False

TILE = 128  # key tile of the dK/dV programs, query tile of the dQ programs: S must be a multiple
STEP = 64  # the streamed tiles: query step of dK/dV, key step of dQ
HEAD_DIMS = (64, 128)  # the head dims the kernels are written for (launch.SCHEDULE["gluon_bwd_head_dims"] picks)


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window, score_fn,
            head_dims=(128,)) -> bool:
    """Whether this backward runs for these inputs: ``window`` not None (the block mask's mask_mod is
    exactly causal, or causal within a sliding window of that many keys, over S x S: the caller's
    KernelSpec.causal_window), no score mod, Gluon importable, q on a
    Hopper GPU (not Triton's interpreter), 16-bit q, k, v of one dtype and one [B, H, S, D] shape, all
    head-major or all token-major (``layout``), S a multiple of 128 and D in ``head_dims`` (of
    HEAD_DIMS)."""
    if not (window is not None and score_fn is None and AVAILABLE and q.device.type == "cuda" and not interpreted()):
        return False
    return _cuda_major(cuda_index(q.device)) == 9 and layout_ok(q, k, v, head_dims)


def layout_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dims=(128,)) -> bool:
    """The input part of ``applies`` (any device): 16-bit q, k, v of one dtype and one [B, H, S, D] shape,
    one ``layout``, S a multiple of 128, D in ``head_dims`` and HEAD_DIMS, and fewer than 2**31 elements
    (the kernels' output offsets are 32-bit)."""
    B, H, S, D = q.shape
    return (q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype and v.dtype == q.dtype
            and k.shape == q.shape and v.shape == q.shape and S % TILE == 0 and D in head_dims and D in HEAD_DIMS
            and q.numel() < 2**31 and layout(q, k, v) is not None)


def _token_major(t: torch.Tensor) -> bool:
    return t.transpose(1, 2).is_contiguous()


def layout(*ts: torch.Tensor):
    """The storage the [B, H, S, D] tensors ``ts`` share, as the Gluon kernels read it: "heads" where
    all are contiguous (head-major: each head's [S, D] rows in one block), "tokens" where all are
    transposed views of contiguous [B, S, H, D] (token-major: Transformers' q, k and v, the projections'
    outputs seen per head), None otherwise (the Triton kernels take any strides)."""
    if all(t.is_contiguous() for t in ts):
        return "heads"
    if all(_token_major(t) for t in ts):
        return "tokens"
    return None


def in_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t (dout) in the storage of ``like`` (q, whose ``layout`` is known): t itself where it already is,
    else a copy."""
    if layout(like) == "heads":
        return t if t.is_contiguous() else t.contiguous()
    return t if _token_major(t) else torch.empty_like(like).copy_(t)


if AVAILABLE:

    @constexpr_function
    def _mma_layout(n, num_warps):
        """The wgmma accumulator layout of a [rows, n] tile: warps stacked along the rows (a warpgroup of
        4 per 64 rows), instruction [16, n, 16]."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])

    @gluon.jit
    def _copy_pair(desc_a, desc_b, row, col, bar, dst_a, dst_b, pred=True):
        """The tiles at (``row``, ``col``) of two descriptors into dst_a and dst_b by TMA, both signalling
        ``bar`` (col: the head's first column in the token-major layout, else 0); none where not ``pred``."""
        mbarrier.expect(bar, 2 * dst_a.type.shape[0] * dst_a.type.shape[1] * dst_a.dtype.primitive_bitwidth // 8,
                        pred=pred)
        tma.async_copy_global_to_shared(desc_a, [row, col], bar, dst_a, pred=pred)
        tma.async_copy_global_to_shared(desc_b, [row, col], bar, dst_b, pred=pred)

    @gluon.jit
    def _tile_origin(bh, H, S, TOKENS: gl.constexpr, D: gl.constexpr):
        """(first descriptor row, column, row stride in elements) of row bh (batch row bh // H, head bh %
        H): the head's [S, D] block in the head-major layout ([B * H * S, D] descriptors), the batch
        row's [S, H * D] block at the head's D columns in the token-major one ([B * S, H * D])."""
        if TOKENS:
            return (bh // H) * S, (bh % H) * D, H * D
        else:
            return bh * S, 0, D

    @gluon.jit
    def _buffers(res_a, res_b, str_a, str_b, RES: gl.constexpr, STR: gl.constexpr, D: gl.constexpr):
        """Shared memory of a program: the resident pair ([RES, D] each, from descriptors res_a / res_b:
        K, V for dK/dV, Q, dO for dQ), the streamed pair in two stages ([2, STR, D] each), the resident
        pair's barrier and the stages' two, initialised."""
        dtype: gl.constexpr = res_a.dtype
        ra = gl.allocate_shared_memory(dtype, [RES, D], res_a.layout)
        rb = gl.allocate_shared_memory(dtype, [RES, D], res_b.layout)
        sa = gl.allocate_shared_memory(dtype, [2, STR, D], str_a.layout)
        sb = gl.allocate_shared_memory(dtype, [2, STR, D], str_b.layout)
        res_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(res_bar, count=1)
        mbarrier.init(bars.index(0), count=1)
        mbarrier.init(bars.index(1), count=1)
        return ra, rb, sa, sb, res_bar, bars

    @gluon.jit
    def _release(res_bar, bars):
        mbarrier.invalidate(res_bar)
        mbarrier.invalidate(bars.index(0))
        mbarrier.invalidate(bars.index(1))

    @gluon.jit
    def _dkdv_order(r, n_diag: gl.constexpr, n_whole, edge0):
        """The query step a sliding window's dK/dV program takes r-th: the unmasked ones (n_diag ..
        edge0 - 1, n_whole of them), then the diagonal's (0 .. n_diag - 1) and the window edge's (edge0
        ...): both masked runs in one loop (a third loop body costs ptxas registers it then spills)."""
        m = r - n_whole
        return gl.where(m < 0, r + n_diag, gl.where(m < n_diag, m, m - n_diag + edge0))

    @gluon.jit
    def _dkdv_step(r, step, next_step, n_steps, q0, row0, trow0, col, start_n, k_smem, v_smem, q_smem, do_smem, bars,
                   q_desc, do_desc, LSE, DELTA, offs_m, zero_s, dk, dv, qk_scale, window, a_layout: gl.constexpr,
                   MASKED: gl.constexpr, SLIDING: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        """The r-th step of a dK/dV program, queries q0 + step * BLOCK_M ... (``next_step``: the next
        one's): wait for its stage, issue S^T = K Q^T and dP^T = V dO^T, wait for S^T (and with it the
        previous step's dV and dK products, which read the other stage), refill the other stage with the
        next step's Q and dO, then P^T, dV += P^T dO issued, dP^T waited for, dS^T under dV's product,
        dK += dS^T Q issued (both left in flight). MASKED: the mask evaluated (the diagonal's steps and
        the window's edge): a key is allowed where 0 <= query - key (< window where SLIDING). row0: the
        head's first row of LSE and delta; (trow0, col): its first tile's in the descriptors."""
        st = r % 2
        mbarrier.wait(bars.index(st), (r // 2) & 1)
        qs = q_smem.index(st)
        dos = do_smem.index(st)
        rows = row0 + q0 + step * BLOCK_M
        lse = gl.load(LSE + rows + offs_m)
        delta = gl.load(DELTA + rows + offs_m)
        sT = warpgroup_mma(k_smem, qs.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        dpT = warpgroup_mma(v_smem, dos.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        sT = warpgroup_mma_wait(num_outstanding=1, deps=(sT,))
        if r + 1 < n_steps:
            nx = (r + 1) % 2
            # (the forms without the window kept as they were before it: ptxas's registers and loop
            # lengths of the plain causal kernel unchanged)
            next_rows = trow0 + q0 + next_step * BLOCK_M if SLIDING else trow0 + q0 + step * BLOCK_M + BLOCK_M
            _copy_pair(q_desc, do_desc, next_rows, col, bars.index(nx), q_smem.index(nx), do_smem.index(nx))
        if MASKED:
            keys = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, zero_s.type.layout))
            if SLIDING:  # 0 <= query - key < window in one unsigned compare (window >= 1)
                gap = (q0 + step * BLOCK_M + offs_m)[None, :] - keys[:, None]
                sT = gl.where(gap.to(gl.uint32) < window.to(gl.uint32), sT, float("-inf"))
            else:
                sT = gl.where((q0 + step * BLOCK_M + offs_m)[None, :] >= keys[:, None], sT, float("-inf"))
        pT = gl.exp2(sT * qk_scale - lse[None, :])
        dv = warpgroup_mma(gl.convert_layout(pT.to(qs.dtype), a_layout), dos, dv, is_async=True)
        dpT = warpgroup_mma_wait(num_outstanding=1, deps=(dpT,))
        dsT = pT * (dpT - delta[None, :])
        dk = warpgroup_mma(gl.convert_layout(dsT.to(qs.dtype), a_layout), qs, dk, is_async=True)
        return dk, dv

    @gluon.jit
    def _dkdv_program(q_desc, k_desc, v_desc, do_desc, LSE, DELTA, DK, DV, S, H, qk_scale, sm_scale, window, pid_n, bh,
                      SLIDING: gl.constexpr, TOKENS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                      D: gl.constexpr, num_warps: gl.constexpr):
        """dK (times sm_scale) and dV [BLOCK_N, D] of key tile pid_n of row bh from the queries at and
        after the tile, up to the last that ``window`` lets see one of its keys (SLIDING; else the last):
        K/V and the first Q/dO stage all in flight before the first wait. Steps: plain causal, the
        diagonal's (masked), then the rest (no mask); SLIDING, those whose every query sees every key
        of the tile (no mask), then the diagonal's and the window edge's (masked, one loop)."""
        row0 = bh * S  # LSE and delta's
        trow0, col, row_stride = _tile_origin(bh, H, S, TOKENS, D)  # the descriptors' and outputs'
        start_n = pid_n * BLOCK_N
        s_layout: gl.constexpr = _mma_layout(BLOCK_M, num_warps)  # S^T [BLOCK_N keys, BLOCK_M queries]
        acc_layout: gl.constexpr = _mma_layout(D, num_warps)
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        k_smem, v_smem, q_smem, do_smem, kv_bar, bars = _buffers(k_desc, v_desc, q_desc, do_desc, BLOCK_N, BLOCK_M, D)
        q0 = start_n
        n_diag: gl.constexpr = BLOCK_N // BLOCK_M
        _copy_pair(k_desc, v_desc, trow0 + start_n, col, kv_bar, k_smem, v_smem)
        if SLIDING:
            # step i holds queries q0 + i * BLOCK_M ...: some query sees a key of the tile while
            # i * BLOCK_M <= window + BLOCK_N - 2, every query every key while (i + 1) * BLOCK_M <= window
            n_steps = gl.minimum((S - q0) // BLOCK_M, (window + BLOCK_N - 2) // BLOCK_M + 1)
            edge0 = gl.maximum(gl.minimum(window // BLOCK_M, n_steps), n_diag)  # the window edge's first step
            step0 = gl.where(edge0 > n_diag, n_diag, 0)
        else:
            step0 = 0
        _copy_pair(q_desc, do_desc, trow0 + q0 + step0 * BLOCK_M, col, bars.index(0), q_smem.index(0),
                   do_smem.index(0))
        offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
        zero_s = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)
        dk = warpgroup_mma_init(gl.zeros([BLOCK_N, D], gl.float32, acc_layout))
        dv = warpgroup_mma_init(gl.zeros([BLOCK_N, D], gl.float32, acc_layout))
        mbarrier.wait(kv_bar, 0)
        if SLIDING:
            n_whole = edge0 - n_diag
            for i in range(n_diag, edge0):  # the steps without mask first, in order: r = i - n_diag
                dk, dv = _dkdv_step(i - n_diag, i, _dkdv_order(i - n_diag + 1, n_diag, n_whole, edge0), n_steps, q0,
                                    row0, trow0, col, start_n, k_smem, v_smem, q_smem, do_smem, bars, q_desc, do_desc,
                                    LSE, DELTA, offs_m, zero_s, dk, dv, qk_scale, window, a_layout, False, True,
                                    BLOCK_M, BLOCK_N)
            for r in range(n_whole, n_steps):
                dk, dv = _dkdv_step(r, _dkdv_order(r, n_diag, n_whole, edge0),
                                    _dkdv_order(r + 1, n_diag, n_whole, edge0), n_steps, q0, row0, trow0, col,
                                    start_n, k_smem, v_smem, q_smem, do_smem, bars, q_desc, do_desc, LSE, DELTA,
                                    offs_m, zero_s, dk, dv, qk_scale, window, a_layout, True, True, BLOCK_M, BLOCK_N)
        else:
            n_steps = (S - q0) // BLOCK_M
            for i in range(0, n_diag):
                dk, dv = _dkdv_step(i, i, i + 1, n_steps, q0, row0, trow0, col, start_n, k_smem, v_smem, q_smem,
                                    do_smem, bars, q_desc, do_desc, LSE, DELTA, offs_m, zero_s, dk, dv, qk_scale,
                                    window, a_layout, True, False, BLOCK_M, BLOCK_N)
            for i in range(n_diag, n_steps):
                dk, dv = _dkdv_step(i, i, i + 1, n_steps, q0, row0, trow0, col, start_n, k_smem, v_smem, q_smem,
                                    do_smem, bars, q_desc, do_desc, LSE, DELTA, offs_m, zero_s, dk, dv, qk_scale,
                                    window, a_layout, False, False, BLOCK_M, BLOCK_N)
        dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv))
        _release(kv_bar, bars)
        rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_layout))
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, acc_layout))
        offs = (trow0 + start_n + rows)[:, None] * row_stride + col + cols[None, :]
        gl.store(DK + offs, (dk * sm_scale).to(DK.dtype.element_ty))
        gl.store(DV + offs, dv.to(DV.dtype.element_ty))

    @gluon.jit(do_not_specialize=["window"])  # window 1 would be a constexpr; one compile for every window
    def attn_bwd_dkdv_causal_kernel(q_desc, k_desc, v_desc, do_desc, LSE, DELTA, DK, DV, S, H, qk_scale, sm_scale,
                                    window, SLIDING: gl.constexpr, TOKENS: gl.constexpr, BLOCK_M: gl.constexpr,
                                    BLOCK_N: gl.constexpr, D: gl.constexpr, num_warps: gl.constexpr):
        """Grid (S // BLOCK_N, B * H): the dK/dV program of key tile program_id(0), row program_id(1).
        TOKENS: q, k, v, dout, dK and dV token-major ([B, S, H, D] storage), else head-major."""
        _dkdv_program(q_desc, k_desc, v_desc, do_desc, LSE, DELTA, DK, DV, S, H, qk_scale, sm_scale, window,
                      gl.program_id(0), gl.program_id(1), SLIDING, TOKENS, BLOCK_M, BLOCK_N, D, num_warps)

    @gluon.jit
    def _dq_step(i, first, n_steps, start_m, row0, col, q_smem, do_smem, k_smem, v_smem, bars, k_desc, v_desc, rows,
                 lse, delta, zero_s, dq, qk_scale, window, a_layout: gl.constexpr, MASKED: gl.constexpr,
                 SLIDING: gl.constexpr, BLOCK_N: gl.constexpr):
        """Step i (keys i * BLOCK_N ...; the program's steps run from ``first``) of a dQ program: wait for
        its stage, issue S = Q K^T and dP = dO V^T, wait for S, refill the other stage with the next
        step's K and V, then P, dP waited for, dS and dQ += dS K, waited for before returning (left in
        flight across the loop edge it makes ptxas serialise every product of the loop, C7515).
        MASKED: the mask evaluated: a key is allowed where 0 <= query - key (< window where SLIDING).
        (row0, col): the head's first tile in the descriptors."""
        st = (i - first) % 2
        mbarrier.wait(bars.index(st), ((i - first) // 2) & 1)
        ks = k_smem.index(st)
        s = warpgroup_mma(q_smem, ks.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        dp = warpgroup_mma(do_smem, v_smem.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
        if i + 1 < n_steps:
            nx = (i + 1 - first) % 2
            _copy_pair(k_desc, v_desc, row0 + (i + 1) * BLOCK_N, col, bars.index(nx), k_smem.index(nx),
                       v_smem.index(nx))
        if MASKED:
            keys = i * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, zero_s.type.layout))
            if SLIDING:  # 0 <= query - key < window in one unsigned compare (window >= 1)
                gap = (start_m + rows)[:, None] - keys[None, :]
                s = gl.where(gap.to(gl.uint32) < window.to(gl.uint32), s, float("-inf"))
            else:
                s = gl.where((start_m + rows)[:, None] >= keys[None, :], s, float("-inf"))
        p = gl.exp2(s * qk_scale - lse[:, None])
        dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp,))
        ds = p * (dp - delta[:, None])
        dq = warpgroup_mma(gl.convert_layout(ds.to(ks.dtype), a_layout), ks, dq, is_async=True)
        return warpgroup_mma_wait(num_outstanding=0, deps=(dq,))

    @gluon.jit(do_not_specialize=["window"])  # window 1 would be a constexpr; one compile for every window
    def attn_bwd_dq_causal_kernel(q_desc, k_desc, v_desc, do_desc, LSE, DELTA, DQ, S, H, qk_scale, sm_scale, window,
                                  SLIDING: gl.constexpr, TOKENS: gl.constexpr, BLOCK_M: gl.constexpr,
                                  BLOCK_N: gl.constexpr, D: gl.constexpr, num_warps: gl.constexpr):
        """Grid (S // BLOCK_M, B * H): dQ (times sm_scale) [BLOCK_M, D] of query tile S // BLOCK_M - 1 -
        program_id(0) (the longest causal rows first) of row program_id(1), from the first key ``window``
        lets one of its queries see through the tile's diagonal. Steps: those on the window's edge
        (masked), those whose every key every query of the tile sees (unmasked), the diagonal's (masked).
        TOKENS: as attn_bwd_dkdv_causal_kernel's."""
        pid_m = S // BLOCK_M - 1 - gl.program_id(0)
        bh = gl.program_id(1)
        row0 = bh * S  # LSE and delta's
        trow0, col, row_stride = _tile_origin(bh, H, S, TOKENS, D)  # the descriptors' and dQ's
        start_m = pid_m * BLOCK_M
        s_layout: gl.constexpr = _mma_layout(BLOCK_N, num_warps)
        acc_layout: gl.constexpr = _mma_layout(D, num_warps)
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        q_smem, do_smem, k_smem, v_smem, qo_bar, bars = _buffers(q_desc, do_desc, k_desc, v_desc, BLOCK_M, BLOCK_N, D)
        n_diag: gl.constexpr = BLOCK_M // BLOCK_N
        n_steps = (start_m + BLOCK_M) // BLOCK_N  # one past the last step
        diag = n_steps - n_diag
        if SLIDING:
            # the first query sees keys from start_m - window + 1, the last every key from start_m + BLOCK_M -
            # window (clamped at 0 before the division: Triton's // truncates toward zero)
            first = gl.maximum(start_m - window + 1, 0) // BLOCK_N
            whole = gl.minimum((gl.maximum(start_m + BLOCK_M - window, 0) + BLOCK_N - 1) // BLOCK_N, diag)
        else:
            first = 0
        _copy_pair(q_desc, do_desc, trow0 + start_m, col, qo_bar, q_smem, do_smem)
        _copy_pair(k_desc, v_desc, trow0 + first * BLOCK_N, col, bars.index(0), k_smem.index(0), v_smem.index(0))
        rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        lse = gl.load(LSE + row0 + start_m + rows)
        delta = gl.load(DELTA + row0 + start_m + rows)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        dq = gl.zeros([BLOCK_M, D], gl.float32, acc_layout)
        mbarrier.wait(qo_bar, 0)
        if SLIDING:
            for i in range(first, whole):
                dq = _dq_step(i, first, n_steps, start_m, trow0, col, q_smem, do_smem, k_smem, v_smem, bars, k_desc,
                              v_desc, rows, lse, delta, zero_s, dq, qk_scale, window, a_layout, True, True, BLOCK_N)
            for i in range(whole, diag):
                dq = _dq_step(i, first, n_steps, start_m, trow0, col, q_smem, do_smem, k_smem, v_smem, bars, k_desc,
                              v_desc, rows, lse, delta, zero_s, dq, qk_scale, window, a_layout, False, True, BLOCK_N)
        else:
            for i in range(0, diag):
                dq = _dq_step(i, first, n_steps, start_m, trow0, col, q_smem, do_smem, k_smem, v_smem, bars, k_desc,
                              v_desc, rows, lse, delta, zero_s, dq, qk_scale, window, a_layout, False, False, BLOCK_N)
        for i in range(diag, n_steps):
            dq = _dq_step(i, first, n_steps, start_m, trow0, col, q_smem, do_smem, k_smem, v_smem, bars, k_desc,
                          v_desc, rows, lse, delta, zero_s, dq, qk_scale, window, a_layout, True, SLIDING, BLOCK_N)
        _release(qo_bar, bars)
        rows_o = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, acc_layout))
        gl.store(DQ + (trow0 + start_m + rows_o)[:, None] * row_stride + col + cols[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty))


@functools.lru_cache(maxsize=None)
def _shared_layout(block: int, D: int, gl_dtype):
    # built once per tile shape: get_default_for takes ~16 us on the host, and a backward builds 8
    # descriptors per layer
    return gl.NVMMASharedLayout.get_default_for([block, D], gl_dtype)


def _descriptors(flat, block: int, D: int, gl_dtype):
    """TMA descriptors of 2-D tensors ``flat`` in [block, D] tiles."""
    layout = _shared_layout(block, D, gl_dtype)
    return [TensorDescriptor(t, list(t.shape), list(t.stride()), [block, D], layout) for t in flat]


def _rows(t: torch.Tensor, tokens: bool) -> torch.Tensor:
    """[B, H, S, D] t as the 2-D matrix its descriptors tile: [B * H * S, D] head-major, [B * S, H * D]
    token-major (``tokens``; a head's tiles at columns h * D ...)."""
    B, H, S, D = t.shape
    return t.transpose(1, 2).reshape(B * S, H * D) if tokens else t.reshape(B * H * S, D)


def pass_descriptors(q, k, v, dout, tokens: bool = False, tile: int = TILE, step: int = STEP):
    """The TMA descriptors both passes read, from q, k, v, dout [B, H, S, D] of one ``layout``
    (``tokens``: token-major; else head-major), as 2-D matrices (_rows): (q, dout) in ``step``-row tiles
    and (k, v) in ``tile``-row tiles for the dK/dV pass (Q and dO streamed, K and V resident), then (q,
    dout) in ``tile`` rows and (k, v) in ``step`` rows for the dQ pass; every tile D columns wide."""
    D = q.shape[-1]
    gl_dtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    qo = [_rows(q, tokens), _rows(dout, tokens)]
    kv = [_rows(k, tokens), _rows(v, tokens)]
    return (*_descriptors(qo, step, D, gl_dtype), *_descriptors(kv, tile, D, gl_dtype),
            *_descriptors(qo, tile, D, gl_dtype), *_descriptors(kv, step, D, gl_dtype))


def check_tiles(tiles) -> tuple:
    """(tile, step, warps) of the causal backward's programs (launch.SCHEDULE["gluon_bwd_tiles"]): the
    resident tile (keys of a dK/dV program, queries of a dQ program), the streamed step, the warps of a
    program; the resident tile a multiple of 16 rows a warp (a warpgroup's wgmma covers 64). Anything
    else is refused by name."""
    ok = (isinstance(tiles, tuple) and len(tiles) == 3 and all(type(x) is int for x in tiles)
          and tiles[0] in (64, 128) and tiles[1] in (32, 64) and tiles[1] <= tiles[0] and tiles[2] in (4, 8)
          and tiles[0] % (16 * tiles[2]) == 0)
    if not ok:
        raise ValueError('SCHEDULE["gluon_bwd_tiles"] must be (tile, step, warps): tile 64 or 128, step 32 or 64 '
                         f'and at most tile, warps 4 or 8 with 16 * warps dividing tile; got {tiles!r}')
    return tiles


_side_streams: dict = {}


def _side_stream(device) -> "torch.cuda.Stream":
    s = _side_streams.get(device)
    if s is None:
        s = _side_streams[device] = torch.cuda.Stream(device)
    return s


def run_passes(device, dq_pass, dkdv_pass, concurrent: bool) -> None:
    """dq_pass() then dkdv_pass(); ``concurrent``: dq_pass on a second stream, so that its programs fill
    the SMs the dK/dV launch's last programs leave idle (what one launch of both passes does for the
    Triton kernels); the caller's stream waits for it before returning."""
    if not concurrent:
        dq_pass()
        dkdv_pass()
        return
    main = torch.cuda.current_stream(device)
    side = _side_stream(device)
    side.wait_stream(main)  # delta and the buffers written on the caller's stream
    with torch.cuda.stream(side):
        dq_pass()
    dkdv_pass()
    # every tensor the dQ launch reads or writes was made on the caller's stream, which now waits for
    # it: their memory is not reused before it is done
    main.wait_stream(side)


def causal_backward(q, k, v, dout, lse2, delta, sm_scale: float, window=None, concurrent: bool = True,
                    warmup: bool = False, tiles: tuple = (TILE, STEP, 8)):
    """(dq, dk, dv) like q of causal attention (``window``: a sliding window's, key <= query < key +
    window; None: plain causal), from the inputs ``applies`` accepted, dout (copied into q's ``layout``
    where it is not in it), lse2 and delta contiguous float32 [B, H, S]. The gradients have the inputs'
    layout: token-major ones hand Transformers' transposes back contiguous [B, S, H, D] gradients, with no
    copy. ``concurrent``: the dQ launch on a second stream (run_passes). ``warmup``: compile the kernels
    for these arguments and launch nothing (returns None; dout, lse2 and delta may be stand-ins of the
    same layouts: the forward's output, its LSE). ``tiles``: (tile, step, warps) of both passes'
    programs (check_tiles; launch.SCHEDULE["gluon_bwd_tiles"]): (64, 64, 4) puts two programs on an SM."""
    B, H, S, D = q.shape
    tile, step, warps = check_tiles(tiles)
    # a window of S keys or more over S x S is plain causal: the kernels compiled without the window's
    # loops and compares (SLIDING false) then run
    window = S if window is None else min(int(window), S)
    if window < 1:
        raise ValueError(f"causal_backward: window must be a positive int, got {window}")
    sliding = window < S
    tokens = layout(q, k, v) == "tokens"
    dout = in_layout(dout, q)
    # (empty_like keeps a dense tensor's strides; a warm-up's stand-ins: q, k, v themselves)
    dq, dk, dv = (q, k, v) if warmup else (torch.empty_like(t) for t in (q, k, v))
    qk_scale = sm_scale * LOG2E
    q_s, do_s, k_t, v_t, q_t, do_t, k_s, v_s = pass_descriptors(q, k, v, dout, tokens, tile, step)
    grid = (S // tile, B * H)
    go = launcher(warmup)

    def dq_pass():
        go(attn_bwd_dq_causal_kernel, grid)(
            q_t, k_s, v_s, do_t, lse2, delta, dq, S, H, qk_scale, sm_scale, window,
            SLIDING=sliding, TOKENS=tokens, BLOCK_M=tile, BLOCK_N=step, D=D, num_warps=warps)

    def dkdv_pass():
        go(attn_bwd_dkdv_causal_kernel, grid)(
            q_s, k_t, v_t, do_s, lse2, delta, dk, dv, S, H, qk_scale, sm_scale, window,
            SLIDING=sliding, TOKENS=tokens, BLOCK_M=step, BLOCK_N=tile, D=D, num_warps=warps)

    run_passes(q.device, dq_pass, dkdv_pass, concurrent and not warmup)
    return None if warmup else (dq, dk, dv)
