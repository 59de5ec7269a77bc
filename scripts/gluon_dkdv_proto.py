"""Prototype (not wired into hf_flex): the dK/dV loop of the attention backward written in Gluon with
explicit asynchronous Hopper products, against the same loop in Triton (tl.dot), on the work of the
document backward's loop without mask: one program per (key tile, batch x head), every query of the
row, no mask, D = 128, bf16.

Why (tests/benchmarks/NOTES.md, thirteenth and fourteenth rounds): Triton 3.6 waits for every product
whose result is not a loop-carried accumulator as soon as it is issued, so the softmax and dS work run
with the tensor cores idle. Here each step issues S^T = K Q^T and dP^T = V dO^T together, computes P^T
while dP^T runs, issues dV += P^T dO, computes dS^T while dV's product runs, issues dK += dS^T Q, and
waits for dK / dV of a step only when the next step's S^T is needed; Q and dO arrive by TMA into two
stages behind mbarriers, the next step's pair issued as soon as the stage it overwrites is free.

On the device:  python scripts/gluon_dkdv_proto.py [--S 8192] [--heads 16] [--batch 2] [--variants ...]
checks every variant against float64 (dK, dV from the same LSE and delta), then times them side by
side and prints a table. ``--causal`` (hf_flex and the plain Gluon kernel): each key tile from its
diagonal on, the diagonal's steps masked, as the causal and document backwards walk their short rows
(e.g. --causal --S 2048 --batch 8: causal 2k, where our backward trails torch flex's; the Gluon form
has all of K/V and the first Q/dO copies in flight before its first wait, hf_flex waits for K/V
first). Offline (no GPU): --compile-only writes every kernel's PTX for sm_90 to --out.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_init, warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
from triton.runtime.jit import constexpr_function
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf_flex.kernels.backward import _dkdv_inner, load_pair, store_pair  # noqa: E402
from hf_flex.kernels.forward import tile_rows  # noqa: E402

LOG2E = 1.4426950408889634


@constexpr_function
def mma_layout(n, num_warps):
    """The wgmma accumulator layout of a [rows, n] tile: warps stacked along the rows (4 a warpgroup of
    64 rows), instruction [16, n, 16] (bf16)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])


@gluon.jit
def _dv_dk_products(sT, dpT, lse, delta, qs, dos, dk, dv, qk_scale, p_smem, ds_smem,
                    a_layout: gl.constexpr, P_IN_SMEM: gl.constexpr):
    """One step after S^T is waited for (dP^T still running): P^T, dV += P^T dO issued, dP^T waited for,
    dS^T under dV's product, dK += dS^T Q issued. P^T and dS^T feed the products from registers or,
    P_IN_SMEM, through shared memory (fewer registers). Returns (dk, dv) tokens still in flight."""
    pT = gl.exp2(sT * qk_scale - lse[None, :])
    dv = _issue_product(pT, p_smem, dos, dv, a_layout, P_IN_SMEM)
    dpT = warpgroup_mma_wait(num_outstanding=1, deps=(dpT,))
    dsT = pT * (dpT - delta[None, :])
    dk = _issue_product(dsT, ds_smem, qs, dk, a_layout, P_IN_SMEM)
    return dk, dv


@gluon.jit
def _issue_product(x, x_smem, b, acc, a_layout: gl.constexpr, IN_SMEM: gl.constexpr):
    """acc += x b issued asynchronously: x (float32 [BLOCK_N, BLOCK_M], cast to b's dtype) from registers
    in the dot-operand layout, or IN_SMEM stored to x_smem first (fenced for the async proxy)."""
    if IN_SMEM:
        x_smem.store(x.to(b.dtype))
        fence_async_shared()
        acc = warpgroup_mma(x_smem, b, acc, is_async=True)
    else:
        acc = warpgroup_mma(gl.convert_layout(x.to(b.dtype), a_layout), b, acc, is_async=True)
    return acc


@gluon.jit
def _store_dkdv(DK, DV, dk, dv, row, sm_scale, BLOCK_N: gl.constexpr, D: gl.constexpr, num_warps: gl.constexpr):
    """dK (times sm_scale) and dV [BLOCK_N, D] at flat row ``row`` of the [B * H * S, D] outputs."""
    acc_layout: gl.constexpr = mma_layout(D, num_warps)
    rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_layout))
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, acc_layout))
    offs = (row + rows)[:, None] * D + cols[None, :]
    gl.store(DK + offs, (dk * sm_scale).to(DK.dtype.element_ty))
    gl.store(DV + offs, dv.to(DV.dtype.element_ty))


@gluon.jit
def _plain_step(i, q0, n_steps, row0, start_n, k_smem, v_smem, q_smem, do_smem, bars, q_desc, do_desc, LSE, DELTA,
                offs_m, zero_s, dk, dv, qk_scale, p_smem, ds_smem, a_layout: gl.constexpr, P_IN_SMEM: gl.constexpr,
                MASKED: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """Step ``i`` (queries q0 + i * BLOCK_M ...) of gluon_dkdv_kernel's loop: wait for its stage, issue
    S^T and dP^T, wait for S^T (and with it the previous step's dV, dK, which read the other stage),
    refill the other stage with the next step's Q and dO, then _dv_dk_products. MASKED: the causal
    mask (query >= key) on S^T."""
    st = i % 2
    mbarrier.wait(bars.index(st), (i // 2) & 1)
    qs = q_smem.index(st)
    dos = do_smem.index(st)
    rows = row0 + q0 + i * BLOCK_M
    lse = gl.load(LSE + rows + offs_m)
    delta = gl.load(DELTA + rows + offs_m)
    sT = warpgroup_mma(k_smem, qs.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    dpT = warpgroup_mma(v_smem, dos.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    sT = warpgroup_mma_wait(num_outstanding=1, deps=(sT,))
    if i + 1 < n_steps:
        nx = (i + 1) % 2
        mbarrier.expect(bars.index(nx), 2 * BLOCK_M * qs.shape[1] * 2)
        tma.async_copy_global_to_shared(q_desc, [rows + BLOCK_M, 0], bars.index(nx), q_smem.index(nx))
        tma.async_copy_global_to_shared(do_desc, [rows + BLOCK_M, 0], bars.index(nx), do_smem.index(nx))
    if MASKED:
        keys = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, zero_s.type.layout))
        queries = q0 + i * BLOCK_M + offs_m
        sT = gl.where(queries[None, :] >= keys[:, None], sT, float("-inf"))
    return _dv_dk_products(sT, dpT, lse, delta, qs, dos, dk, dv, qk_scale, p_smem, ds_smem, a_layout, P_IN_SMEM)


@gluon.jit
def gluon_dkdv_kernel(q_desc, k_desc, v_desc, do_desc, LSE, DELTA, DK, DV, S, qk_scale, sm_scale,
                      BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, P_IN_SMEM: gl.constexpr,
                      CAUSAL: gl.constexpr, num_warps: gl.constexpr):
    """dK, dV [BLOCK_N, D] of key tile program_id(0) of row program_id(1) (= b * H + h) from all S
    queries of that row, or (CAUSAL) from the queries at and after the tile: its BLOCK_N / BLOCK_M
    diagonal steps masked in a loop of their own, the later ones unmasked in a second loop (the stages
    and their phases run on across both). q/k/v/do_desc: descriptors over [B * H * S, D] with
    [BLOCK_*, D] boxes; LSE in log2 units and delta: [B * H * S] float32. qk_scale = sm_scale * log2(e).
    Issue order written out: K/V and the first Q/dO copies all in flight before the first wait."""
    pid_n = gl.program_id(0)
    bh = gl.program_id(1)
    row0 = bh * S
    start_n = pid_n * BLOCK_N
    dtype: gl.constexpr = q_desc.dtype

    # the transposed scores S^T [BLOCK_N keys, BLOCK_M queries] and the [BLOCK_N, D] accumulators:
    # warps stacked along the keys (4 per warpgroup of 64 rows)
    s_layout: gl.constexpr = mma_layout(BLOCK_M, num_warps)
    acc_layout: gl.constexpr = mma_layout(D, num_warps)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)

    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, D], v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, D], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, D], do_desc.layout)
    pt_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
    p_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], pt_layout)
    ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], pt_layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    mbarrier.init(bars.index(0), count=1)
    mbarrier.init(bars.index(1), count=1)

    q0 = 0
    n_diag = 0
    if CAUSAL:
        q0 = start_n
        n_diag = BLOCK_N // BLOCK_M
    n_steps = (S - q0) // BLOCK_M
    mbarrier.expect(kv_bar, 2 * BLOCK_N * D * 2)
    tma.async_copy_global_to_shared(k_desc, [row0 + start_n, 0], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [row0 + start_n, 0], kv_bar, v_smem)
    mbarrier.expect(bars.index(0), 2 * BLOCK_M * D * 2)
    tma.async_copy_global_to_shared(q_desc, [row0 + q0, 0], bars.index(0), q_smem.index(0))
    tma.async_copy_global_to_shared(do_desc, [row0 + q0, 0], bars.index(0), do_smem.index(0))

    offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
    zero_s = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)
    dk = warpgroup_mma_init(gl.zeros([BLOCK_N, D], gl.float32, acc_layout))
    dv = warpgroup_mma_init(gl.zeros([BLOCK_N, D], gl.float32, acc_layout))
    mbarrier.wait(kv_bar, 0)
    for i in range(0, n_diag):
        dk, dv = _plain_step(i, q0, n_steps, row0, start_n, k_smem, v_smem, q_smem, do_smem, bars, q_desc, do_desc,
                             LSE, DELTA, offs_m, zero_s, dk, dv, qk_scale, p_smem, ds_smem, a_layout, P_IN_SMEM,
                             True, BLOCK_M, BLOCK_N)
    for i in range(n_diag, n_steps):
        dk, dv = _plain_step(i, q0, n_steps, row0, start_n, k_smem, v_smem, q_smem, do_smem, bars, q_desc, do_desc,
                             LSE, DELTA, offs_m, zero_s, dk, dv, qk_scale, p_smem, ds_smem, a_layout, P_IN_SMEM,
                             False, BLOCK_M, BLOCK_N)
    dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv))
    mbarrier.invalidate(kv_bar)
    mbarrier.invalidate(bars.index(0))
    mbarrier.invalidate(bars.index(1))
    _store_dkdv(DK, DV, dk, dv, row0 + start_n, sm_scale, BLOCK_N, D, num_warps)


@gluon.jit
def _ws_load_partition(descs, smem, bars, row0, start_n, n_steps, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                       D: gl.constexpr):
    """Producer warp: K and V once, then Q and dO of every step into NBUF stages, each issued as soon as
    the compute partition frees its stage (empty barrier)."""
    q_desc, k_desc, v_desc, do_desc = descs
    k_smem, v_smem, q_bufs, do_bufs = smem
    kv_bar, ready, empty = bars
    NBUF: gl.constexpr = q_bufs.type.shape[0]
    mbarrier.expect(kv_bar, 2 * BLOCK_N * D * 2)
    tma.async_copy_global_to_shared(k_desc, [row0 + start_n, 0], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [row0 + start_n, 0], kv_bar, v_smem)
    for i in range(n_steps):
        st = i % NBUF
        mbarrier.wait(empty.index(st), ((i // NBUF) & 1) ^ 1)  # barriers start with phase 1 complete
        mbarrier.expect(ready.index(st), 2 * BLOCK_M * D * 2)
        tma.async_copy_global_to_shared(q_desc, [row0 + i * BLOCK_M, 0], ready.index(st), q_bufs.index(st))
        tma.async_copy_global_to_shared(do_desc, [row0 + i * BLOCK_M, 0], ready.index(st), do_bufs.index(st))


@gluon.jit
def _ws_compute_partition(smem, bars, LSE, DELTA, row0, n_steps, qk_scale, p_smem, ds_smem,
                          BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, P_IN_SMEM: gl.constexpr,
                          num_warps: gl.constexpr):
    """Consumer warpgroups: the loop of gluon_dkdv_kernel, the stage of step i freed (empty barrier) once
    step i's dV and dK products are known complete (the next step's first wait)."""
    k_smem, v_smem, q_bufs, do_bufs = smem
    kv_bar, ready, empty = bars
    NBUF: gl.constexpr = q_bufs.type.shape[0]
    s_layout: gl.constexpr = mma_layout(BLOCK_M, num_warps)
    acc_layout: gl.constexpr = mma_layout(D, num_warps)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
    zero_s = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)
    dk = warpgroup_mma_init(gl.zeros([BLOCK_N, D], gl.float32, acc_layout))
    dv = warpgroup_mma_init(gl.zeros([BLOCK_N, D], gl.float32, acc_layout))
    mbarrier.wait(kv_bar, 0)
    for i in range(n_steps):
        st = i % NBUF
        mbarrier.wait(ready.index(st), (i // NBUF) & 1)
        qs = q_bufs.index(st)
        dos = do_bufs.index(st)
        lse = gl.load(LSE + row0 + i * BLOCK_M + offs_m)
        delta = gl.load(DELTA + row0 + i * BLOCK_M + offs_m)
        sT = warpgroup_mma(k_smem, qs.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        dpT = warpgroup_mma(v_smem, dos.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        sT = warpgroup_mma_wait(num_outstanding=1, deps=(sT,))
        if i > 0:  # step i - 1's products are complete: its stage may be refilled
            mbarrier.arrive(empty.index((i - 1) % NBUF), count=1)
        # P_IN_SMEM: at the 240 registers a compute thread gets, ptxas otherwise serialises the wgmma
        dk, dv = _dv_dk_products(sT, dpT, lse, delta, qs, dos, dk, dv, qk_scale, p_smem, ds_smem, a_layout, P_IN_SMEM)
    dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv))
    return dk, dv


@gluon.jit
def gluon_ws_dkdv_kernel(q_desc, k_desc, v_desc, do_desc, LSE, DELTA, DK, DV, S, qk_scale, sm_scale,
                         BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, NBUF: gl.constexpr,
                         P_IN_SMEM: gl.constexpr, num_warps: gl.constexpr):
    """gluon_dkdv_kernel with a producer warp (warp specialisation): the TMA copies leave the compute
    warpgroups' instruction stream, and with them the CTA-wide barriers around each issue."""
    pid_n = gl.program_id(0)
    bh = gl.program_id(1)
    row0 = bh * S
    start_n = pid_n * BLOCK_N
    dtype: gl.constexpr = q_desc.dtype
    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, D], v_desc.layout)
    q_bufs = gl.allocate_shared_memory(dtype, [NBUF, BLOCK_M, D], q_desc.layout)
    do_bufs = gl.allocate_shared_memory(dtype, [NBUF, BLOCK_M, D], do_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for j in gl.static_range(NBUF):
        mbarrier.init(ready.index(j), count=1)
        mbarrier.init(empty.index(j), count=1)
    pt_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
    p_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], pt_layout)
    ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], pt_layout)
    n_steps = S // BLOCK_M
    smem = (k_smem, v_smem, q_bufs, do_bufs)
    bars = (kv_bar, ready, empty)
    dk, dv = gl.warp_specialize([
        (_ws_compute_partition, (smem, bars, LSE, DELTA, row0, n_steps, qk_scale, p_smem, ds_smem, BLOCK_M, BLOCK_N,
                                 D, P_IN_SMEM, num_warps)),
        (_ws_load_partition, ((q_desc, k_desc, v_desc, do_desc), smem, bars, row0, start_n, n_steps, BLOCK_M,
                              BLOCK_N, D)),
    ], [1], [24])
    _store_dkdv(DK, DV, dk, dv, row0 + start_n, sm_scale, BLOCK_N, D, num_warps)


@triton.jit
def triton_dkdv_kernel(q_desc, k_desc, v_desc, do_desc, LSE, DELTA, DK, DV, S, qk_scale, sm_scale,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """The same loop as hf_flex's (backward._dkdv_inner without mask or checks, Q / dO by TMA)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    row0 = bh * S
    start_n = pid_n * BLOCK_N
    k = k_desc.load([row0 + start_n, 0])
    v = v_desc.load([row0 + start_n, 0])
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    for i in range(0, S // BLOCK_M):
        qT = tl.trans(q_desc.load([row0 + i * BLOCK_M, 0]))
        do = do_desc.load([row0 + i * BLOCK_M, 0])
        lse = tl.load(LSE + row0 + i * BLOCK_M + offs_m)
        delta = tl.load(DELTA + row0 + i * BLOCK_M + offs_m)
        sT = tl.dot(k, qT)
        pT = tl.math.exp2(sT * qk_scale - lse[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk)
    rows = start_n + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, D)
    offs = (row0 + rows)[:, None] * D + cols[None, :]
    tl.store(DK + offs, (dk * sm_scale).to(DK.dtype.element_ty))
    tl.store(DV + offs, dv.to(DV.dtype.element_ty))


@triton.jit
def _causal(b, h, q, kv, args):
    return q >= kv


@triton.jit
def hf_flex_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, Q_DESC, DO_DESC, S, H, sm_scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr):
    """hf_flex's own loop (backward._dkdv_inner as the document-aligned kernel's loop without mask
    calls it: no mask, no checks, Q / dO by TMA) over all S queries of the row; CAUSAL: the diagonal's
    steps first in a masked loop, then the later queries, as the document backward walks a tile."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    row = bh * S * D
    offs_n, kv_in, kv_idx = tile_rows(pid_n * BLOCK_N, S, S, BLOCK_N)
    k, v = load_pair(K + row, V + row, offs_n, kv_in, D, 1, D, 1, D, D, D, D)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    q0 = 0
    if CAUSAL:
        q0 = pid_n * BLOCK_N
        dk, dv = _dkdv_inner(
            dk, dv, k, v, Q + row, DO + row, LSE + bh * S, DELTA + bh * S, D, 1, D, 1,
            None, BLOCK_N // BLOCK_M, b, h, b, h, kv_idx, kv_in[:, None], S, sm_scale, (), (), Q + row, D, 1,
            Q_DESC, DO_DESC, h, _causal, None, None, False, True, True, True, BLOCK_M, BLOCK_M,
            D, D, D, D, None, False, None, 0, False, 1, 0, 0, 0, 0, base=q0,
        )
        q0 += BLOCK_N
    dk, dv = _dkdv_inner(
        dk, dv, k, v, Q + row, DO + row, LSE + bh * S, DELTA + bh * S, D, 1, D, 1,
        None, (S - q0) // BLOCK_M, b, h, b, h, kv_idx, kv_in[:, None], S, sm_scale, (), (), Q + row, D, 1,
        Q_DESC, DO_DESC, h, None, None, None, False, False, True, True, BLOCK_M, BLOCK_M,
        D, D, D, D, None, False, None, 0, False, 1, 0, 0, 0, 0, base=q0,
    )
    store_pair(DK + row, DV + row, dk * sm_scale, dv, offs_n, kv_in, D, 1, D, 1, D, D, D, D)


def make_inputs(B, H, S, D, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, S, D, generator=g).to(device, torch.bfloat16) for _ in range(4))
    return q, k, v, do


def reference(q, k, v, do, sm_scale, causal=False):
    """(dK, dV, LSE in log2 units, delta) in float64: attention without mask, or causal."""
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, do))
    s = q64 @ k64.transpose(-1, -2) * sm_scale
    if causal:
        S = s.shape[-1]
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None])
    o = p @ v64
    dv = p.transpose(-1, -2) @ do64
    dp = do64 @ v64.transpose(-1, -2)
    delta = (do64 * o).sum(-1)
    ds = p * (dp - delta[..., None])
    dk = ds.transpose(-1, -2) @ q64 * sm_scale
    return dk, dv, lse * LOG2E, delta


def _gluon_descs(flat, block_m, block_n, D):
    """Gluon tensor descriptors of the flat [B * H * S, D] Q, K, V, dO with [block, D] boxes in the
    default NVMMA shared layouts (Q and dO: block_m rows, K and V: block_n)."""
    lay_m = gl.NVMMASharedLayout.get_default_for([block_m, D], gl.bfloat16)
    lay_n = gl.NVMMASharedLayout.get_default_for([block_n, D], gl.bfloat16)
    return [GluonDescriptor(t, list(t.shape), list(t.stride()), [bl, D], lay)
            for t, bl, lay in zip(flat, (block_m, block_n, block_n, block_m), (lay_m, lay_n, lay_n, lay_m))]


def launch(which, q, k, v, do, lse2, delta, sm_scale, block_m=64, block_n=128, num_warps=8, num_stages=2,
           p_in_smem=False, nbuf=2, maxnreg=168, causal=False):
    B, H, S, D = q.shape
    if causal and which not in ("hf_flex", "gluon"):
        raise ValueError(f"causal: only the hf_flex and gluon variants have it, not {which}")
    flat = [t.reshape(B * H * S, D) for t in (q, k, v, do)]
    dk = torch.empty_like(flat[1])
    dv = torch.empty_like(flat[2])
    grid = (S // block_n, B * H)
    if which == "hf_flex":
        q_desc, do_desc = (TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_m, D]) for t in (q, do))
        hf_flex_dkdv_kernel[grid](q, k, v, do, lse2, delta, dk, dv, q_desc, do_desc, S, H, sm_scale,
                                  BLOCK_M=block_m, BLOCK_N=block_n, D=D, CAUSAL=causal, num_warps=num_warps,
                                  num_stages=num_stages)
    elif which == "gluon_ws":
        gluon_ws_dkdv_kernel[grid](*_gluon_descs(flat, block_m, block_n, D), lse2, delta, dk, dv, S, sm_scale * LOG2E,
                                   sm_scale, BLOCK_M=block_m, BLOCK_N=block_n, D=D, NBUF=nbuf, P_IN_SMEM=p_in_smem,
                                   num_warps=num_warps, maxnreg=maxnreg)
    elif which == "gluon":
        gluon_dkdv_kernel[grid](*_gluon_descs(flat, block_m, block_n, D), lse2, delta, dk, dv, S, sm_scale * LOG2E,
                                sm_scale,
                                BLOCK_M=block_m, BLOCK_N=block_n, D=D, P_IN_SMEM=p_in_smem, CAUSAL=causal,
                                num_warps=num_warps)
    else:
        descs = [TensorDescriptor(t, list(t.shape), list(t.stride()), [bl, D])
                 for t, bl in zip(flat, (block_m, block_n, block_n, block_m))]
        triton_dkdv_kernel[grid](*descs, lse2, delta, dk, dv, S, sm_scale * LOG2E, sm_scale,
                                 BLOCK_M=block_m, BLOCK_N=block_n, D=D, num_warps=num_warps, num_stages=num_stages)
    return dk.reshape(B, H, S, D), dv.reshape(B, H, S, D)


VARIANTS = {
    "triton": dict(which="triton"),
    "hf_flex_s2": dict(which="hf_flex"),
    "hf_flex_s3": dict(which="hf_flex", num_stages=3),
    "gluon_preg": dict(which="gluon", p_in_smem=False),
    "gluon_psmem": dict(which="gluon", p_in_smem=True),
    "gluon_ws2": dict(which="gluon_ws", nbuf=2, p_in_smem=True),
    "gluon_ws3": dict(which="gluon_ws", nbuf=3, p_in_smem=True),
    "gluon_ws2_preg": dict(which="gluon_ws", nbuf=2),
    "triton_s3": dict(which="triton", num_stages=3),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--S", type=int, default=8192)
    ap.add_argument("--check-S", type=int, default=512, help="length of the float64 check")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    ap.add_argument("--causal", action="store_true",
                    help="causal rows (each key tile from its diagonal on): hf_flex and the plain Gluon kernel only")
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--out", default="/tmp/gluon_proto")
    a = ap.parse_args()
    D = 128
    sm_scale = 1 / math.sqrt(D)
    if a.compile_only:
        return compile_only(a.out)
    dev = "cuda"
    # correctness against float64 on fresh random inputs (a short row: the float64 reference is dense)
    q, k, v, do = make_inputs(1, 4, a.check_S, D, dev, seed=1)
    rdk, rdv, lse2, delta = reference(q, k, v, do, sm_scale, a.causal)
    lse2, delta = lse2.float().contiguous(), delta.float().contiguous()
    ok = {}
    runs = {n: dict(VARIANTS[n], **({"causal": True} if a.causal else {})) for n in a.variants.split(",")}
    print(f"check vs float64 (B=1, H=4, S={a.check_S}, D={D}): max |err| / max |ref|")
    for name, kw in runs.items():
        try:
            dk, dv = launch(q=q, k=k, v=v, do=do, lse2=lse2, delta=delta, sm_scale=sm_scale, **kw)
            torch.cuda.synchronize()
            ek = ((dk.double() - rdk).abs().max() / rdk.abs().max()).item()
            ev = ((dv.double() - rdv).abs().max() / rdv.abs().max()).item()
            ok[name] = ek < 2e-2 and ev < 2e-2
            print(f"  {name:12s} dK {ek:.2e}  dV {ev:.2e}  {'ok' if ok[name] else 'WRONG'}", flush=True)
        except Exception as e:  # noqa: BLE001 (one broken variant must not hide the others)
            ok[name] = False
            print(f"  {name:12s} error: {type(e).__name__}: {str(e)[:300]}", flush=True)
    B, H, S = a.batch, a.heads, a.S
    q, k, v, do = make_inputs(B, H, S, D, dev, seed=2)
    lse2 = torch.randn(B, H, S, device=dev).abs() + 8.0  # timing only: values that keep P finite
    delta = torch.randn(B, H, S, device=dev)
    # four products per (query, key) pair; causal: the pairs the mask allows (S^2 / 2, as the bench counts)
    flops = 4 * 2 * B * H * S * S * D * (0.5 if a.causal else 1.0)
    rows = []
    names = [n for n in runs if ok.get(n)]
    times = {n: [] for n in names}
    for r in range(3):  # rounds, the variants rotated
        for n in names[r % len(names):] + names[:r % len(names)]:
            kw = runs[n]
            ms = triton.testing.do_bench(lambda: launch(q=q, k=k, v=v, do=do, lse2=lse2, delta=delta,
                                                        sm_scale=sm_scale, **kw), warmup=50, rep=300)
            times[n].append(ms)
    for n in names:
        ms = sorted(times[n])[1]
        rows.append((n, ms, flops / ms / 1e9))
    print(f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"dK/dV loop {'causal' if a.causal else 'without mask'}, B={B} H={H} S={S} D={D} bf16 (median of 3 rounds)")
    if not rows:
        return
    base_name, base = rows[0][:2]  # speed-ups against the first variant listed
    print(f"{'variant':12s} {'ms':>8s} {'TFLOP/s':>8s} vs {base_name}")
    for n, ms, tf in rows:
        print(f"{n:12s} {ms:8.3f} {tf:8.1f} {base / ms:9.2f}")


def compile_only(out):
    """Compile both kernels for sm_90 without a GPU (scripts/inspect_ir.py's stand-in driver)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import inspect_ir

    compiled = inspect_ir._compile_only()
    B, H, S, D = 1, 2, 1024, 128
    q, k, v, do = (torch.empty(B, H, S, D, dtype=torch.bfloat16) for _ in range(4))
    lse2, delta = torch.empty(B, H, S), torch.empty(B, H, S)
    runs = [(name, kw) for name, kw in VARIANTS.items()]
    runs += [(name + "+causal", dict(kw, causal=True)) for name, kw in VARIANTS.items() if kw["which"] in ("hf_flex", "gluon")]
    for name, kw in runs:
        try:
            launch(q=q, k=k, v=v, do=do, lse2=lse2, delta=delta, sm_scale=0.1, **kw)
        except Exception as e:  # noqa: BLE001
            print(f"{name}: {type(e).__name__}: {str(e)[:2000]}")
    inspect_ir.write_ptx(compiled, out)


if __name__ == "__main__":
    main()
