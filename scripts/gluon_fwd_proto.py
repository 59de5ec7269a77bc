"""Prototype (not wired into hf_flex): a persistent, warp-specialised attention forward in Gluon for
Hopper, to measure what cross-tile pipelining is worth on short rows (causal 2k), against hf_flex's
forward, torch flex and cuDNN SDPA in the same process.

Why (tests/benchmarks/NOTES.md, sixteenth round): from the tenth round's maskless ceilings, our forward
loses about two full 128 x 128 steps' worth of time per program (prologue: Q and the first K/V tiles
arrive before the first product; epilogue: O and LSE leave while no product runs). At 8k a program
runs 64 steps, at causal 2k 8.5 on average: the same loss is 3 % there and ~20 % here, the gap to
cuDNN at 2k (0.76x). Triton's pipeliner overlaps the loads of one loop only, never across programs.

Here one CTA per SM walks its tiles (longest first); a producer warp issues each tile's Q (two
buffers) and K/V (a ring of NBUF stages that runs on across tiles) by TMA behind mbarriers, so the
next tile's first copies are in flight while the current tile computes and stores; two consumer
warpgroups (8 warps, 128 query rows) run S = Q K^T, the online softmax (exp2, scale folded) and
O += P V as asynchronous wgmma, freeing each K/V stage once its P V product is known complete.
Causal: the key blocks before the diagonal unmasked, the diagonal's masked in a loop of their own.
The ``*_grid_*`` variants launch one program per tile instead (the same kernel without persistence).

On the device:  python scripts/gluon_fwd_proto.py [--cases 2k,8k,2k_full] [--variants ...]
Checks every variant against float64 (small shape, the timed cases' masks) and against SDPA on each
timed case, then times all side by side (rounds rotated) and prints a table. Run ``--check-only``
under a short timeout first: a barrier-protocol bug hangs the GPU instead of failing. Offline:
--compile-only.

Measured (H100, NOTES.md sixteenth round), every form slower than hf_flex's Triton forward (TFLOP/s):
causal 2k 288-311 against 372, no mask 2k 336-352 against 457, causal 8k 368-436 against 480-486.
Read in the SASS: with 8 compute warps in one partition, Gluon puts a CTA-wide barrier before every
mbarrier wait and arrive (four a step), so the two warpgroups never overlap each other's softmax
with their products; with one partition per warpgroup (``split``) ptxas serialises the wgmma
(C7512, insufficient registers), and with the S look-ahead (``ahead``) too (C7514, accumulator registers read between the products' start and end).
The split form also faults on causal rows (compute-sanitizer: an out-of-bounds shared-memory operand
read of the masked loop's S product), not resolved: its causal variants are not run.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier, tma, warpgroup_mma, warpgroup_mma_init, warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
from triton.runtime.jit import constexpr_function

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LOG2E = 1.4426950408889634


@constexpr_function
def mma_layout(n, num_warps):
    """wgmma accumulator layout of a [rows, n] tile: warps stacked along the rows (a warpgroup 64 rows)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])


@gluon.jit
def _tile_of(idx, BH, n_m):
    """Tile ``idx`` of the longest-first order: every row's last query tile first (causal rows are
    longest there), then the one before, ...: (query tile, batch x head)."""
    return n_m - 1 - idx // BH, idx % BH


@gluon.jit
def _n_blocks(m, n_m, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """Key blocks of query tile m: through its diagonal (causal) or all of the row."""
    if CAUSAL:
        return (m + 1) * (BLOCK_M // BLOCK_N)
    else:
        return n_m * (BLOCK_M // BLOCK_N)


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, q_empty, kv_bars,
              S, BH, n_m, first, step, total, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              D: gl.constexpr, CAUSAL: gl.constexpr):
    """One warp: for each tile of this program, Q into buffer t % 2, then its key blocks' K and V into
    their rings (stage c % NBUF each), each copy issued as soon as the consumers free the buffer it
    overwrites. K and V have rings and barriers of their own: a K stage frees when its S product is
    done, a V stage only when its P V product is (a block later with the S look-ahead).
    Barriers start in phase 0, so a first wait on phase 1 passes at once."""
    NBUF: gl.constexpr = k_bufs.type.shape[0]
    k_ready, k_empty, v_ready, v_empty = kv_bars
    t = 0
    c = 0
    for idx in range(first, total, step):
        m, bh = _tile_of(idx, BH, n_m)
        row0 = bh * S
        qb = t % 2
        mbarrier.wait(q_empty.index(qb), ((t // 2) & 1) ^ 1)
        mbarrier.expect(q_ready.index(qb), BLOCK_M * D * 2)
        tma.async_copy_global_to_shared(q_desc, [row0 + m * BLOCK_M, 0], q_ready.index(qb), q_bufs.index(qb))
        for j in range(_n_blocks(m, n_m, BLOCK_M, BLOCK_N, CAUSAL)):
            st = c % NBUF
            ph = ((c // NBUF) & 1) ^ 1
            mbarrier.wait(k_empty.index(st), ph)
            mbarrier.expect(k_ready.index(st), BLOCK_N * D * 2)
            tma.async_copy_global_to_shared(k_desc, [row0 + j * BLOCK_N, 0], k_ready.index(st), k_bufs.index(st))
            mbarrier.wait(v_empty.index(st), ph)
            mbarrier.expect(v_ready.index(st), BLOCK_N * D * 2)
            tma.async_copy_global_to_shared(v_desc, [row0 + j * BLOCK_N, 0], v_ready.index(st), v_bufs.index(st))
            c += 1
        t += 1


@gluon.jit
def _step(c, j, q_s, k_bufs, v_bufs, kv_bars, acc, m_i, l_i, zero_s, qk_scale, rows_s,
          a_layout: gl.constexpr, o_layout: gl.constexpr, MASKED: gl.constexpr, BLOCK_N: gl.constexpr):
    """Key block j (ring counter c): S = Q K^T waited for at once (which also completes the previous
    block's P V: its V stage freed, not for a tile's first block), the online softmax, O = O alpha + P V
    issued asynchronously."""
    NBUF: gl.constexpr = k_bufs.type.shape[0]
    k_ready, k_empty, v_ready, v_empty = kv_bars
    st = c % NBUF
    ph = (c // NBUF) & 1
    mbarrier.wait(k_ready.index(st), ph)
    s = warpgroup_mma(q_s, k_bufs.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s, acc = warpgroup_mma_wait(num_outstanding=0, deps=(s, acc))
    mbarrier.arrive(k_empty.index(st), count=1)
    if j > 0:
        mbarrier.arrive(v_empty.index((c - 1) % NBUF), count=1)
    p, alpha, m_i, l_i = _softmax(s, j, m_i, l_i, qk_scale, rows_s, MASKED, BLOCK_N)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    mbarrier.wait(v_ready.index(st), ph)
    acc = warpgroup_mma(gl.convert_layout(p.to(q_s.dtype), a_layout), v_bufs.index(st), acc, is_async=True)
    return acc, m_i, l_i


@gluon.jit
def _softmax(s, j, m_i, l_i, qk_scale, rows_s, MASKED: gl.constexpr, BLOCK_N: gl.constexpr):
    """The online softmax of one block's scores s [BLOCK_M, BLOCK_N] (block j): (P float32, alpha for O,
    m, l). MASKED: keys after the query masked; a row with every key masked so far shifts by 0 (P = 0)."""
    if MASKED:
        keys = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s.type.layout))
        s = gl.where(rows_s[:, None] >= keys[None, :], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)  # the scale folded into exp2's FFMA below
    if MASKED:
        m_new = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _ahead_step(c, j, s, q_s, k_bufs, v_bufs, kv_bars, acc, m_i, l_i, zero_s, qk_scale, rows_s,
                a_layout: gl.constexpr, o_layout: gl.constexpr, MASKED: gl.constexpr, LAST: gl.constexpr,
                BLOCK_N: gl.constexpr):
    """Block j (ring counter c) with its scores s already waited for: unless LAST, the next block's
    S = Q K^T is issued first so that it runs under this block's softmax; then the previous P V is
    waited for (its V stage freed), O = O alpha + P V issued, and the next block's scores waited for
    (its K stage freed; P V left in flight). Returns (next scores or s, acc in flight, m, l)."""
    NBUF: gl.constexpr = k_bufs.type.shape[0]
    k_ready, k_empty, v_ready, v_empty = kv_bars
    if not LAST:
        nx = (c + 1) % NBUF
        mbarrier.wait(k_ready.index(nx), ((c + 1) // NBUF) & 1)
        s_next = warpgroup_mma(q_s, k_bufs.index(nx).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    p, alpha, m_i, l_i = _softmax(s, j, m_i, l_i, qk_scale, rows_s, MASKED, BLOCK_N)
    if LAST:
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    else:
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
    if j > 0:
        mbarrier.arrive(v_empty.index((c - 1) % NBUF), count=1)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    mbarrier.wait(v_ready.index(c % NBUF), (c // NBUF) & 1)
    acc = warpgroup_mma(gl.convert_layout(p.to(q_s.dtype), a_layout), v_bufs.index(c % NBUF), acc, is_async=True)
    if LAST:
        s_next = s
    else:
        s_next = warpgroup_mma_wait(num_outstanding=1, deps=(s_next,))
        mbarrier.arrive(k_empty.index((c + 1) % NBUF), count=1)
    return s_next, acc, m_i, l_i


@gluon.jit
def _consumer(q_bufs, k_bufs, v_bufs, q_ready, q_empty, kv_bars, O, LSE, S, BH, n_m, first, step,
              total, qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
              CAUSAL: gl.constexpr, AHEAD: gl.constexpr, HALF: gl.constexpr, ROWS: gl.constexpr,
              num_warps: gl.constexpr):
    """Compute warps for ROWS query rows of each tile (from HALF * ROWS: all BLOCK_M rows with 8 warps,
    or one warpgroup's half in a partition of its own, so that the two warpgroups' barriers do not
    hold each other): the tile's blocks in the producer's order, then O / l and the LSE (natural log)
    stored from registers. AHEAD: each block's S = Q K^T issued before the previous block's softmax
    (_ahead_step); otherwise S waited for at once (_step)."""
    NBUF: gl.constexpr = k_bufs.type.shape[0]
    s_layout: gl.constexpr = mma_layout(BLOCK_N, num_warps)
    o_layout: gl.constexpr = mma_layout(D, num_warps)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    zero_s = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    rows_o = gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
    cols_o = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    t = 0
    c = 0
    for idx in range(first, total, step):
        m, bh = _tile_of(idx, BH, n_m)
        qb = t % 2
        mbarrier.wait(q_ready.index(qb), (t // 2) & 1)
        q_s = q_bufs.index(qb)
        if ROWS < BLOCK_M:
            q_s = q_s.slice(HALF * ROWS, ROWS)
        rows_s = m * BLOCK_M + HALF * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
        m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))
        acc = warpgroup_mma_init(gl.zeros([ROWS, D], gl.float32, o_layout))
        n_all = _n_blocks(m, n_m, BLOCK_M, BLOCK_N, CAUSAL)
        n_free = n_all
        if CAUSAL:
            n_free = m * (BLOCK_M // BLOCK_N)
        if AHEAD:
            # blocks 0 .. n_all - 2 issue their successor's S; the last (the diagonal's, when causal) not
            mbarrier.wait(kv_bars[0].index(c % NBUF), (c // NBUF) & 1)
            s = warpgroup_mma(q_s, k_bufs.index(c % NBUF).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
            mbarrier.arrive(kv_bars[1].index(c % NBUF), count=1)
            n_lead = n_free
            if not CAUSAL:
                n_lead = n_all - 1
            for j in range(0, n_lead):
                s, acc, m_i, l_i = _ahead_step(c, j, s, q_s, k_bufs, v_bufs, kv_bars, acc, m_i, l_i,
                                               zero_s, qk_scale, rows_s, a_layout, o_layout, False, False, BLOCK_N)
                c += 1
            for j in range(n_lead, n_all - 1):
                s, acc, m_i, l_i = _ahead_step(c, j, s, q_s, k_bufs, v_bufs, kv_bars, acc, m_i, l_i,
                                               zero_s, qk_scale, rows_s, a_layout, o_layout, True, False, BLOCK_N)
                c += 1
            s, acc, m_i, l_i = _ahead_step(c, n_all - 1, s, q_s, k_bufs, v_bufs, kv_bars, acc, m_i, l_i,
                                           zero_s, qk_scale, rows_s, a_layout, o_layout, CAUSAL, True, BLOCK_N)
            c += 1
        else:
            for j in range(0, n_free):
                acc, m_i, l_i = _step(c, j, q_s, k_bufs, v_bufs, kv_bars, acc, m_i, l_i, zero_s,
                                      qk_scale, rows_s, a_layout, o_layout, False, BLOCK_N)
                c += 1
            for j in range(n_free, n_all):
                acc, m_i, l_i = _step(c, j, q_s, k_bufs, v_bufs, kv_bars, acc, m_i, l_i, zero_s,
                                      qk_scale, rows_s, a_layout, o_layout, True, BLOCK_N)
                c += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(kv_bars[3].index((c - 1) % NBUF), count=1)
        mbarrier.arrive(q_empty.index(qb), count=1)
        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        row = bh * S + m * BLOCK_M + HALF * ROWS + rows_o
        gl.store(O + row[:, None] * D + cols_o[None, :], (acc / l_o[:, None]).to(O.dtype.element_ty))
        lse = (gl.convert_layout(m_i, gl.SliceLayout(1, o_layout)) + gl.log2(l_o)) / 1.4426950408889634
        gl.store(LSE + row, lse)
        t += 1


@gluon.jit
def gluon_fwd_kernel(q_desc, k_desc, v_desc, O, LSE, S, BH, qk_scale,
                     BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, NBUF: gl.constexpr,
                     CAUSAL: gl.constexpr, AHEAD: gl.constexpr, SPLIT: gl.constexpr, num_warps: gl.constexpr):
    """O [B * H * S, D] and LSE [B * H * S] of attention over q/k/v_desc (descriptors over the flat
    [B * H * S, D] tensors, boxes [BLOCK_M, D] for Q and [BLOCK_N, D] for K/V); program p of the grid
    takes tiles p, p + grid, ... of the longest-first order (a grid of one program per tile: no
    persistence). qk_scale = sm_scale * log2(e)."""
    dtype: gl.constexpr = q_desc.dtype
    q_bufs = gl.allocate_shared_memory(dtype, [2, BLOCK_M, D], q_desc.layout)
    k_bufs = gl.allocate_shared_memory(dtype, [NBUF, BLOCK_N, D], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [NBUF, BLOCK_N, D], v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    # SPLIT: two consumer partitions of one warpgroup each (num_warps = 4), each frees a buffer once
    NCONS: gl.constexpr = 2 if SPLIT else 1
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=NCONS)
    for i in gl.static_range(NBUF):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=NCONS)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=NCONS)
    kv_bars = (k_ready, k_empty, v_ready, v_empty)
    n_m = S // BLOCK_M
    total = n_m * BH
    first = gl.program_id(0)
    step = gl.num_programs(0)
    # argument tuples written out per partition: constexprs passed through a concatenated tuple arrive
    # as tensors
    if SPLIT:
        gl.warp_specialize([
            (_consumer, (q_bufs, k_bufs, v_bufs, q_ready, q_empty, kv_bars, O, LSE, S, BH, n_m, first, step, total,
                         qk_scale, BLOCK_M, BLOCK_N, D, CAUSAL, AHEAD, 0, BLOCK_M // 2, num_warps)),
            (_consumer, (q_bufs, k_bufs, v_bufs, q_ready, q_empty, kv_bars, O, LSE, S, BH, n_m, first, step, total,
                         qk_scale, BLOCK_M, BLOCK_N, D, CAUSAL, AHEAD, 1, BLOCK_M // 2, num_warps)),
            (_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, q_empty, kv_bars, S, BH, n_m, first,
                         step, total, BLOCK_M, BLOCK_N, D, CAUSAL)),
        ], [4, 1], [240, 24])
    else:
        gl.warp_specialize([
            (_consumer, (q_bufs, k_bufs, v_bufs, q_ready, q_empty, kv_bars, O, LSE, S, BH, n_m, first, step, total,
                         qk_scale, BLOCK_M, BLOCK_N, D, CAUSAL, AHEAD, 0, BLOCK_M, num_warps)),
            (_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, q_empty, kv_bars, S, BH, n_m, first,
                         step, total, BLOCK_M, BLOCK_N, D, CAUSAL)),
        ], [1], [24])


def launch(q, k, v, causal=True, block_m=128, block_n=128, nbuf=2, grid="persistent", maxnreg=None, ahead=False,
           split=False):
    """(O [B, H, S, D], LSE [B, H, S] natural log) of the Gluon forward on bf16 q, k, v [B, H, S, D]."""
    B, H, S, D = q.shape
    if S % block_m or block_m % block_n:
        raise ValueError(f"S={S} must be a multiple of block_m={block_m}, itself a multiple of block_n={block_n}")
    flat = [t.reshape(B * H * S, D) for t in (q, k, v)]
    lay_m = gl.NVMMASharedLayout.get_default_for([block_m, D], gl.bfloat16)
    lay_n = gl.NVMMASharedLayout.get_default_for([block_n, D], gl.bfloat16)
    descs = [GluonDescriptor(t, list(t.shape), list(t.stride()), [bl, D], lay)
             for t, bl, lay in zip(flat, (block_m, block_n, block_n), (lay_m, lay_n, lay_n))]
    o = torch.empty_like(flat[0])
    lse = torch.empty(B * H * S, device=q.device, dtype=torch.float32)
    tiles = (S // block_m) * B * H
    if grid == "persistent":
        n = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
        n = min(n, tiles)
    else:
        n = tiles
    kw = {} if maxnreg is None else {"maxnreg": maxnreg}
    gluon_fwd_kernel[(n,)](*descs, o, lse, S, B * H, LOG2E / math.sqrt(D), BLOCK_M=block_m, BLOCK_N=block_n,
                           D=D, NBUF=nbuf, CAUSAL=causal, AHEAD=ahead, SPLIT=split, num_warps=4 if split else 8, **kw)
    return o.reshape(B, H, S, D), lse.reshape(B, H, S)


VARIANTS = {  # p: persistent (one program per SM), grid: one program per tile
    "gluon_p_n128": dict(block_n=128, nbuf=2),
    "gluon_grid_n128": dict(block_n=128, nbuf=2, grid="tiles"),
    "gluon_p_n64": dict(block_n=64, nbuf=4),
    "gluon_grid_n64": dict(block_n=64, nbuf=4, grid="tiles"),
    "gluon_ahead_p_n128": dict(block_n=128, nbuf=2, ahead=True),
    "gluon_ahead_grid_n128": dict(block_n=128, nbuf=2, ahead=True, grid="tiles"),
    "gluon_ahead_p_n64": dict(block_n=64, nbuf=4, ahead=True),
    # one partition per compute warpgroup: faults on causal rows (module docstring), --cases 2k_full only
    "split_p_n128": dict(block_n=128, nbuf=2, split=True),
    "split_ahead_p_n128": dict(block_n=128, nbuf=2, split=True, ahead=True),
    "split_grid_n128": dict(block_n=128, nbuf=2, split=True, grid="tiles"),
    "split_ahead_grid_n128": dict(block_n=128, nbuf=2, split=True, ahead=True, grid="tiles"),
}
SAFE = [n for n in VARIANTS if not VARIANTS[n].get("split")]

CASES = {  # name: (B, H, S, D, causal); the first three are the anchors' causal 2k / 8k shapes
    "2k": (8, 16, 2048, 128, True),
    "8k": (2, 16, 8192, 128, True),
    "2k_full": (8, 16, 2048, 128, False),
}


def reference(q, k, v, causal):
    q64, k64, v64 = (t.double() for t in (q, k, v))
    s = q64 @ k64.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        S = s.shape[-1]
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse[..., None]) @ v64, lse


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def hf_flex_forward(B, H, S, D, causal):
    """hf_flex's own forward on the same shapes (its public API, a causal block mask or none)."""
    import hf_flex
    from hf_flex import mods

    bm = None
    if causal:
        bm = hf_flex.create_block_mask(mods.causal(), None, None, S, S, device="cuda")
    return lambda q, k, v: hf_flex.flex_attention(q, k, v, block_mask=bm)


def torch_flex_forward(B, H, S, D, causal):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    bm = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, S, S, device="cuda") if causal else None
    f = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: f(q, k, v, block_mask=bm)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--variants", default=",".join(SAFE), help=f"comma-separated, of {list(VARIANTS)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-torch-flex", action="store_true")
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--check-only", action="store_true",
                    help="the float64 check alone, exit status 1 if a variant is wrong (run it under a short "
                         "timeout first: a barrier bug hangs the GPU instead of failing)")
    ap.add_argument("--out", default="/tmp/gluon_fwd_proto")
    a = ap.parse_args()
    if a.compile_only:
        return compile_only(a.out, a.variants.split(","))
    variants = {n: VARIANTS[n] for n in a.variants.split(",")}
    ok = {n: True for n in variants}
    g = torch.Generator(device="cpu").manual_seed(1)
    print("check vs float64 (B=1, H=3, S=768, D=128): relative error of O and LSE")
    for causal in sorted({CASES[c][4] for c in a.cases.split(",")}, reverse=True):  # the timed cases' masks
        q, k, v = (torch.randn(1, 3, 768, 128, generator=g).cuda().bfloat16() for _ in range(3))
        ro, rl = reference(q, k, v, causal)
        for n, kw in variants.items():
            try:
                o, lse = launch(q, k, v, causal=causal, **kw)
                torch.cuda.synchronize()
                eo, el = _rel(o, ro), _rel(lse, rl)
                good = eo < 1e-2 and el < 1e-3 and bool(torch.isfinite(o).all())
            except Exception as e:  # noqa: BLE001 (one broken variant must not hide the others)
                eo = el = float("nan")
                good = False
                print(f"  {n}: {type(e).__name__}: {str(e)[:400]}")
            ok[n] &= good
            print(f"  causal={causal!s:5s} {n:16s} O {eo:.2e}  LSE {el:.2e}  {'ok' if good else 'WRONG'}", flush=True)
    if a.check_only:
        sys.exit(0 if all(ok.values()) else 1)
    results = []
    for cname in a.cases.split(","):
        B, H, S, D, causal = CASES[cname]
        gen = torch.Generator(device="cuda").manual_seed(2)
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        fns = {"sdpa": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal),
               "hf_flex": hf_flex_forward(B, H, S, D, causal)}
        if not a.no_torch_flex:
            fns["torch_flex"] = torch_flex_forward(B, H, S, D, causal)
        for n, kw in variants.items():
            if ok[n]:
                fns[n] = (lambda kw: lambda q, k, v: launch(q, k, v, causal=causal, **kw)[0])(kw)
        good = {}
        for n, f in fns.items():
            e = _rel(f(q, k, v), ref)
            good[n] = e < 1e-2
            print(f"{cname}: {n} vs SDPA rel err {e:.2e} {'ok' if good[n] else 'WRONG'}", flush=True)
        names = [n for n in fns if good[n]]
        times = {n: [] for n in names}
        for r in range(a.rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                times[n].append(triton.testing.do_bench(lambda: fns[n](q, k, v), warmup=25, rep=200))
        flops = 4 * B * H * S * S * D * (0.5 if causal else 1.0)
        for n in names:
            ms = sorted(times[n])[len(times[n]) // 2]
            results.append((cname, n, ms, flops / ms / 1e9))
    print(f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print("forward TFLOP/s (median of rounds), ratio vs hf_flex and vs sdpa in the same case")
    by = {(c, n): tf for c, n, _, tf in results}
    print(f"{'case':8s} {'impl':18s} {'ms':>8s} {'TFLOP/s':>8s} {'/hf_flex':>8s} {'/sdpa':>7s}")
    for c, n, ms, tf in results:
        print(f"{c:8s} {n:18s} {ms:8.3f} {tf:8.1f} {tf / by.get((c, 'hf_flex'), float('nan')):8.2f} "
              f"{tf / by.get((c, 'sdpa'), float('nan')):7.2f}")


def compile_only(out, names):
    """Compile the variants for sm_90 without a GPU (scripts/inspect_ir.py's stand-in driver)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import inspect_ir

    compiled = inspect_ir._compile_only()
    q, k, v = (torch.empty(1, 2, 1024, 128, dtype=torch.bfloat16) for _ in range(3))
    for name in names:
        for causal in (True, False):
            try:
                launch(q, k, v, causal=causal, **VARIANTS[name])
            except Exception as e:  # noqa: BLE001
                print(f"{name} causal={causal}: {type(e).__name__}: {str(e)[:3000]}")
    inspect_ir.write_ptx(compiled, out)


if __name__ == "__main__":
    main()
