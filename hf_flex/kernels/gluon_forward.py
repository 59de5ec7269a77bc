"""The causal attention forward in Gluon for Hopper (sm_90): O and LSE of a mask that is exactly causal, or
causal within a sliding window (key <= query < key + window), with its products as explicitly
asynchronous wgmma and its K/V tiles by TMA behind mbarriers, written like the Gluon backwards
(kernels/gluon_causal.py): no warp specialisation, the compute warps issue their own copies.

Why: its programs are small enough (at most 128 registers a thread at D=128, 126 at D=64; 96 KB and
64 KB of shared memory) that two share an SM, so one program's softmax, loads and epilogue run under
the other's products. The Triton forward runs one 8-warp program an SM: nothing hides a program's
prologue (Q and the first K/V tiles) and epilogue (O and LSE), about three 128 x 128 steps of time a
program, a quarter of a sliding-window or causal-2k program. Measured on the H100 (prototype
``scripts/gluon_fwd_plain.py``, tests/benchmarks/NOTES.md, nineteenth round), forward TFLOP/s against the
Triton forward and torch flex in the same run: sliding window 1024 at 8k 352 against 336 and 307
(1.15x torch flex), D=64 causal 8k 410 against 369 and 357 (1.15x), causal 8k 499 against 470, causal 2k
372 against 361.

One program a 128-query tile of one (batch, query head), the last (longest under a causal mask) tiles
of every head first; K and V of its key head (query heads h of a group of Hq / Hkv share key head
h // (Hq / Hkv)) in 64-key steps through two stages: the window edge's steps (masked), those every
query of the tile sees whole (no mask), the diagonal's (masked). At D=64 Q is the S product's
operand from registers (smem bandwidth: the 64-deep products read Q as often as K); at D=128 it stays
in shared memory (its 32 registers would leave one program an SM).

Layouts: q [B, Hq, S, D], k, v [B, Hkv, S, D], all head-major or all token-major (gluon_causal.layout),
the output in q's (launch.out_like); LSE [B, Hq, S] float32 rows of stride S (launch.row_buffer) in the
backward's form: log2 units of the scaled scores (every causal row has a key: never +inf). S a multiple
of 128, D = 64 or 128, bf16 or fp16, no score mod, no sink, a positive scale.
"""
from __future__ import annotations

import torch

from . import _cuda_major, cuda_index, interpreted, launcher
from .forward import LOG2E
from .gluon_causal import AVAILABLE, HEAD_DIMS, STEP, TILE, _token_major, layout

if AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier, tma, warpgroup_mma, warpgroup_mma_init, warpgroup_mma_wait,
    )

    from .gluon_causal import _copy_pair, _descriptors, _mma_layout, _rows, _tile_origin

NBUF = 2  # K/V stages: two programs an SM need the shared memory of two
# per head dim: Q from registers (D=64), the register cap that keeps two 8-warp programs on an SM (D=128:
# 153 registers uncapped, one program an SM; capped, 96 bytes of spills, and measured fastest)
CONFIG = {128: dict(Q_REG=False, maxnreg=128), 64: dict(Q_REG=True, maxnreg=None)}


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window, score_fn, sink, sm_scale: float,
            head_dims=(64, 128)) -> bool:
    """Whether this forward runs for these inputs: the call's ``mask_ok``, Gluon importable, q on a Hopper
    GPU (not Triton's interpreter), and inputs ``layout_ok`` accepts."""
    if not (mask_ok(window, score_fn, sink, sm_scale) and AVAILABLE and q.device.type == "cuda"
            and not interpreted()):
        return False
    return _cuda_major(cuda_index(q.device)) == 9 and layout_ok(q, k, v, head_dims)


def mask_ok(window, score_fn, sink, sm_scale: float) -> bool:
    """The call part of ``applies``: ``window`` not None (the mask is exactly causal, or causal within a
    window of that many keys, over S x S: KernelSpec.causal_window), no score mod, no sink, and a
    positive scale (the kernel takes the row maximum before scaling)."""
    return window is not None and score_fn is None and sink is None and sm_scale > 0


def layout_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dims=(64, 128)) -> bool:
    """The input part of ``applies`` (any device): 16-bit q, k, v of one dtype, q [B, Hq, S, D] and k, v
    [B, Hkv, S, D] with Hkv dividing Hq, one ``layout``, S a multiple of 128, D in ``head_dims`` and
    HEAD_DIMS, and fewer than 2**31 elements (32-bit output offsets)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    B, HQ, S, D = q.shape
    HKV = k.shape[1]
    return (q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype and v.dtype == q.dtype
            and k.shape == (B, HKV, S, D) and v.shape == k.shape and HKV > 0 and HQ % HKV == 0
            and S % TILE == 0 and D in head_dims and D in HEAD_DIMS and q.numel() < 2**31
            and layout(q, k, v) is not None)


if AVAILABLE:

    @gluon.jit
    def _fwd_buffers(q_desc, k_desc, v_desc, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
                     NB: gl.constexpr):
        """Shared memory of a forward program: Q [BLOCK_M, D], K and V in NB stages of [BLOCK_N, D], Q's
        barrier and one barrier a stage, initialised."""
        dtype: gl.constexpr = q_desc.dtype
        q_s = gl.allocate_shared_memory(dtype, [BLOCK_M, D], q_desc.layout)
        k_bufs = gl.allocate_shared_memory(dtype, [NB, BLOCK_N, D], k_desc.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [NB, BLOCK_N, D], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        bars = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(NB):
            mbarrier.init(bars.index(i), count=1)
        return q_s, k_bufs, v_bufs, q_bar, bars

    @gluon.jit
    def _fwd_release(q_bar, bars, NB: gl.constexpr):
        mbarrier.invalidate(q_bar)
        for i in gl.static_range(NB):
            mbarrier.invalidate(bars.index(i))

    @gluon.jit
    def _fwd_store(acc, m_i, l_i, O, LSE, o_row0, col, row_stride, lse_row0, o_layout: gl.constexpr,
                   BLOCK_M: gl.constexpr, D: gl.constexpr, end=None):
        """A forward program's epilogue: O = acc / l of its BLOCK_M rows (O's row o_row0 ..., columns col ...
        of rows row_stride apart: q's layout) and their LSE (log2: m + log2 l) at LSE + lse_row0 ...;
        ``end``: only the rows before it (the rows' index from 0), else all."""
        rows_o = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
        cols_o = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        lse = gl.convert_layout(m_i, gl.SliceLayout(1, o_layout)) + gl.log2(l_o)
        o_ptrs = O + (o_row0 + rows_o)[:, None] * row_stride + col + cols_o[None, :]
        o = (acc / l_o[:, None]).to(O.dtype.element_ty)
        if end is None:
            gl.store(o_ptrs, o)
            gl.store(LSE + lse_row0 + rows_o, lse)
        else:
            keep = rows_o < end
            gl.store(o_ptrs, o, mask=keep[:, None])
            gl.store(LSE + lse_row0 + rows_o, lse, mask=keep)

    @gluon.jit
    def _fwd_step(c, j, j_end, kv_row0, kv_col, q_a, k_desc, v_desc, k_bufs, v_bufs, bars, acc, m_i, l_i, zero_s,
                  qk_scale, rows, window, a_layout: gl.constexpr, o_layout: gl.constexpr, MASKED: gl.constexpr,
                  SLIDING: gl.constexpr, BLOCK_N: gl.constexpr, key0=0):
        """Key block j (the program's c-th step, stage c % NBUF; keys key0 + j * BLOCK_N ..., at descriptor
        row kv_row0 + j * BLOCK_N): S = Q K^T waited for together with the previous step's P V (whose
        stage then refills with block j + NBUF - 1), the online softmax in log2 units (the scale folded
        into exp2's FFMA), O = O alpha + P V issued and left in flight. MASKED: a key is allowed where
        0 <= query - key (< window where SLIDING); a row with no allowed key so far shifts by 0 (its P
        and alpha 0)."""
        NB: gl.constexpr = k_bufs.type.shape[0]
        st = c % NB
        mbarrier.wait(bars.index(st), (c // NB) & 1)
        s = warpgroup_mma(q_a, k_bufs.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s, acc = warpgroup_mma_wait(num_outstanding=0, deps=(s, acc))
        if j + NB - 1 < j_end:
            nx = (c + NB - 1) % NB
            _copy_pair(k_desc, v_desc, kv_row0 + (j + NB - 1) * BLOCK_N, kv_col, bars.index(nx), k_bufs.index(nx),
                       v_bufs.index(nx))
        if MASKED:
            keys = key0 + j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, zero_s.type.layout))
            gap = rows[:, None] - keys[None, :]
            if SLIDING:  # 0 <= query - key < window in one unsigned compare (window >= 1)
                s = gl.where(gap.to(gl.uint32) < window.to(gl.uint32), s, float("-inf"))
            else:
                s = gl.where(gap >= 0, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        if MASKED:
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_safe = m_new
        alpha = gl.exp2(m_i - m_safe)
        p = gl.exp2(s * qk_scale - m_safe[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        acc = warpgroup_mma(gl.convert_layout(p.to(k_bufs.dtype), a_layout), v_bufs.index(st), acc, is_async=True)
        return acc, m_new, l_i

    @gluon.jit(do_not_specialize=["window"])  # window 1 would be a constexpr; one compile for every window
    def attn_fwd_causal_kernel(q_desc, k_desc, v_desc, O, LSE, S, BH, HQ, HKV, qk_scale, window,
                               SLIDING: gl.constexpr, TOKENS: gl.constexpr, Q_REG: gl.constexpr,
                               BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, NB: gl.constexpr,
                               num_warps: gl.constexpr):
        """Grid (S // BLOCK_M * BH,), BH = B * HQ: program p takes query tile S // BLOCK_M - 1 - p // BH of
        row p % BH (every row's last tile first). O (q's layout) and LSE (log2) of its rows. TOKENS: q, k,
        v and O token-major ([B, S, H, D] storage; descriptors over [B * S, H * D]), else head-major."""
        pid = gl.program_id(0)
        m = S // BLOCK_M - 1 - pid // BH
        bh = pid % BH
        q0 = m * BLOCK_M
        trow0, col, row_stride = _tile_origin(bh, HQ, S, TOKENS, D)  # q's and O's
        kv_row0, kv_col, _ = _tile_origin((bh // HQ) * HKV + (bh % HQ) // (HQ // HKV), HKV, S, TOKENS, D)
        j_diag = q0 // BLOCK_N  # the diagonal's first block
        j_end = (q0 + BLOCK_M) // BLOCK_N
        if SLIDING:
            # the first query sees keys from q0 - window + 1, the last every key from q0 + BLOCK_M - window
            # (clamped at 0 before the division: // truncates toward zero)
            j0 = gl.maximum(q0 - window + 1, 0) // BLOCK_N
            j_free = gl.minimum(gl.maximum((gl.maximum(q0 + BLOCK_M - window, 0) + BLOCK_N - 1) // BLOCK_N, j0),
                                j_diag)
        else:
            j0 = q0 * 0
            j_free = j0

        q_s, k_bufs, v_bufs, q_bar, bars = _fwd_buffers(q_desc, k_desc, v_desc, BLOCK_M, BLOCK_N, D, NB)
        # Q and the first NB - 1 steps' K and V in flight before the first wait
        mbarrier.expect(q_bar, BLOCK_M * D * q_desc.dtype.primitive_bitwidth // 8)
        tma.async_copy_global_to_shared(q_desc, [trow0 + q0, col], q_bar, q_s)
        for i in gl.static_range(NB - 1):
            if j0 + i < j_end:
                _copy_pair(k_desc, v_desc, kv_row0 + (j0 + i) * BLOCK_N, kv_col, bars.index(i), k_bufs.index(i),
                           v_bufs.index(i))

        s_layout: gl.constexpr = _mma_layout(BLOCK_N, num_warps)
        o_layout: gl.constexpr = _mma_layout(D, num_warps)
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        rows = q0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
        acc = warpgroup_mma_init(gl.zeros([BLOCK_M, D], gl.float32, o_layout))
        mbarrier.wait(q_bar, 0)
        if Q_REG:
            q_a = q_s.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
        else:
            q_a = q_s
        if SLIDING:
            for j in range(j0, j_free):
                acc, m_i, l_i = _fwd_step(j - j0, j, j_end, kv_row0, kv_col, q_a, k_desc, v_desc, k_bufs, v_bufs, bars,
                                          acc, m_i, l_i, zero_s, qk_scale, rows, window, a_layout, o_layout, True,
                                          True, BLOCK_N)
        for j in range(j_free, j_diag):
            acc, m_i, l_i = _fwd_step(j - j0, j, j_end, kv_row0, kv_col, q_a, k_desc, v_desc, k_bufs, v_bufs, bars,
                                      acc, m_i, l_i, zero_s, qk_scale, rows, window, a_layout, o_layout, False,
                                      SLIDING, BLOCK_N)
        for j in range(j_diag, j_end):
            acc, m_i, l_i = _fwd_step(j - j0, j, j_end, kv_row0, kv_col, q_a, k_desc, v_desc, k_bufs, v_bufs, bars,
                                      acc, m_i, l_i, zero_s, qk_scale, rows, window, a_layout, o_layout, True,
                                      SLIDING, BLOCK_N)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        _fwd_release(q_bar, bars, NB)
        _fwd_store(acc, m_i, l_i, O, LSE, trow0 + q0, col, row_stride, bh * S + q0, o_layout, BLOCK_M, D)


def launch_inputs(q, k, v, out, lse2, caller: str):
    """(descriptors (q, k, v), keyword arguments) of a Gluon forward launch (this module's kernel and
    gluon_varlen's) for inputs ``applies`` accepted: q in TILE-row tiles, k and v in STEP-row tiles of
    their ``layout``'s 2-D matrices, and the per-head-dim choices (CONFIG). Refuses, naming ``caller``, an
    lse2 whose rows are not S apart or an out not in q's layout (launch.row_buffer, launch.out_like:
    the kernels write both through offsets of that form)."""
    HQ, S, D = q.shape[1:]
    tokens = layout(q, k, v) == "tokens"
    if lse2.stride() != (HQ * S, S, 1) or not (_token_major(out) if tokens else out.is_contiguous()):
        raise ValueError(f"{caller}: lse2 must have rows of stride S and out q's layout (launch.row_buffer, "
                         "launch.out_like)")
    gl_dtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    (q_d,) = _descriptors([_rows(q, tokens)], TILE, D, gl_dtype)
    k_d, v_d = _descriptors([_rows(k, tokens), _rows(v, tokens)], STEP, D, gl_dtype)
    cfg = CONFIG[D]
    kwargs = dict(TOKENS=tokens, Q_REG=cfg["Q_REG"], BLOCK_M=TILE, BLOCK_N=STEP, D=D, NB=NBUF, num_warps=8)
    if cfg["maxnreg"]:
        kwargs["maxnreg"] = cfg["maxnreg"]
    return (q_d, k_d, v_d), kwargs


def causal_forward(q, k, v, out, lse2, sm_scale: float, window=None, warmup: bool = False) -> None:
    """Writes out (launch.out_like(q, D): q's layout) and lse2 (float32 [B, Hq, S], rows of stride S, as
    launch.row_buffer allocates) of causal attention (``window``: within a sliding window of that many
    keys, key <= query < key + window; None or S or more: plain causal) from inputs ``applies``
    accepted. ``warmup``: compile the kernel for these arguments and launch nothing."""
    B, HQ, S, D = q.shape
    HKV = k.shape[1]
    window = S if window is None else min(int(window), S)
    if window < 1:
        raise ValueError(f"causal_forward: window must be a positive int, got {window}")
    descs, kwargs = launch_inputs(q, k, v, out, lse2, "causal_forward")
    launcher(warmup)(attn_fwd_causal_kernel, (S // TILE * B * HQ,))(
        *descs, out, lse2, S, B * HQ, HQ, HKV, sm_scale * LOG2E, window, SLIDING=window < S, **kwargs)
