"""Prototype (not wired into hf_flex): an attention forward in Gluon for Hopper written the way the
Gluon backwards are (kernels/gluon_causal.py): no warp specialisation, the compute warps issue their
own TMA copies behind mbarriers, products as asynchronous wgmma. Measures whether programs of ONE
warpgroup (4 warps, 64 or 128 query rows), two of them on an SM, beat hf_flex's Triton forward where
its programs are short (causal 2k, a 1024-key sliding window at 8k; D=64) against torch flex and
cuDNN SDPA in the same process.

Why (tests/benchmarks/NOTES.md, sixteenth to eighteenth rounds): the Triton forward runs one 8-warp
program an SM (registers), so nothing hides a program's prologue (Q and the first K/V tiles before the
first product) and epilogue (O and LSE after the last): about three 128 x 128 steps of time a
program, a quarter of a causal-2k or sliding-window program. The warp-specialised persistent Gluon
forward (scripts/gluon_fwd_proto.py) lost to CTA-wide barriers and serialised wgmma. Here two
independent one-warpgroup CTAs share an SM: one's softmax and loads run under the other's products,
and one's epilogue under the other's steps, with no barrier between them.

Variants: rows per program (BLOCK_M), keys per step (BLOCK_N), stages (NBUF), warps, and AHEAD (the
next block's S = Q K^T issued before this block's softmax, FlashAttention-3's in-warpgroup overlap).

On the device:  python scripts/gluon_fwd_plain.py --check-only   (short timeout first), then
                python scripts/gluon_fwd_plain.py [--cases 2k,8k,d64,sliding] [--variants ...]
Offline:        PYTHONPATH=/tmp/t36:. python scripts/gluon_fwd_plain.py --compile-only --out DIR
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
    """wgmma accumulator layout of a [rows, n] tile: warps stacked along the rows (a warpgroup 64 rows
    an instruction; 128 rows on 4 warps take two)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])


@gluon.jit
def _load_kv(k_desc, v_desc, row, bar, k_dst, v_dst):
    mbarrier.expect(bar, 2 * k_dst.type.shape[0] * k_dst.type.shape[1] * k_dst.dtype.primitive_bitwidth // 8)
    tma.async_copy_global_to_shared(k_desc, [row, 0], bar, k_dst)
    tma.async_copy_global_to_shared(v_desc, [row, 0], bar, v_dst)


@gluon.jit
def _refill(c, row0, j_next, j_end, k_desc, v_desc, k_bufs, v_bufs, bars, BLOCK_N: gl.constexpr):
    """Block j_next (ring counter c) into its stage, if the row has it."""
    NBUF: gl.constexpr = k_bufs.type.shape[0]
    if j_next < j_end:
        st = c % NBUF
        _load_kv(k_desc, v_desc, row0 + j_next * BLOCK_N, bars.index(st), k_bufs.index(st), v_bufs.index(st))


@gluon.jit
def _softmax(s, j, m_i, l_i, qk_scale, rows, WINDOW, MASKED: gl.constexpr, BLOCK_N: gl.constexpr):
    """Online softmax of block j's scores s [BLOCK_M, BLOCK_N]: (P, alpha, m, l). MASKED: keys after the
    query, or WINDOW or more before it, are -inf; a row with no key so far shifts by 0 (P = 0)."""
    if MASKED:
        keys = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s.type.layout))
        d = rows[:, None] - keys[None, :]
        s = gl.where((d >= 0) & (d < WINDOW), s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    if MASKED:
        m_new = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _step(c, j, j_end, row0, q_s, q_a, k_desc, v_desc, k_bufs, v_bufs, bars, acc, m_i, l_i, zero_s, qk_scale, rows,
          WINDOW, a_layout: gl.constexpr, o_layout: gl.constexpr, MASKED: gl.constexpr, BLOCK_N: gl.constexpr):
    """Block j (ring counter c): S = Q K^T waited for with the previous P V (its stage then free: block
    j + NBUF - 1 refills it), the softmax, O = O alpha + P V issued and left in flight."""
    NBUF: gl.constexpr = k_bufs.type.shape[0]
    st = c % NBUF
    mbarrier.wait(bars.index(st), (c // NBUF) & 1)
    s = warpgroup_mma(q_a, k_bufs.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s, acc = warpgroup_mma_wait(num_outstanding=0, deps=(s, acc))
    _refill(c + NBUF - 1, row0, j + NBUF - 1, j_end, k_desc, v_desc, k_bufs, v_bufs, bars, BLOCK_N)
    p, alpha, m_i, l_i = _softmax(s, j, m_i, l_i, qk_scale, rows, WINDOW, MASKED, BLOCK_N)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    acc = warpgroup_mma(gl.convert_layout(p.to(q_s.dtype), a_layout), v_bufs.index(st), acc, is_async=True)
    return acc, m_i, l_i


@gluon.jit
def _ahead_step(c, j, j_end, s, row0, q_s, k_desc, v_desc, k_bufs, v_bufs, bars, acc, m_i, l_i, zero_s, qk_scale,
                rows, WINDOW, a_layout: gl.constexpr, o_layout: gl.constexpr, MASKED: gl.constexpr,
                LAST: gl.constexpr, BLOCK_N: gl.constexpr):
    """Block j (counter c) with its scores s complete: the next block's S issued first (not LAST), the
    softmax of s under it, the previous P V waited for (its stage refilled with block j + NBUF - 1),
    O = O alpha + P V issued, the next scores waited for. NBUF >= 3: stages j - 1, j, j + 1 are in use."""
    NBUF: gl.constexpr = k_bufs.type.shape[0]
    st = c % NBUF
    if not LAST:
        nx = (c + 1) % NBUF
        mbarrier.wait(bars.index(nx), ((c + 1) // NBUF) & 1)
        s_next = warpgroup_mma(q_s, k_bufs.index(nx).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    p, alpha, m_i, l_i = _softmax(s, j, m_i, l_i, qk_scale, rows, WINDOW, MASKED, BLOCK_N)
    if LAST:
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    else:
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
    _refill(c + NBUF - 1, row0, j + NBUF - 1, j_end, k_desc, v_desc, k_bufs, v_bufs, bars, BLOCK_N)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    acc = warpgroup_mma(gl.convert_layout(p.to(q_s.dtype), a_layout), v_bufs.index(st), acc, is_async=True)
    if LAST:
        s_next = s
    else:
        s_next = warpgroup_mma_wait(num_outstanding=1, deps=(s_next,))
    return s_next, acc, m_i, l_i


@gluon.jit
def plain_fwd_kernel(q_desc, k_desc, v_desc, O, LSE, S, BH, WINDOW, qk_scale,
                     BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, NBUF: gl.constexpr,
                     AHEAD: gl.constexpr, Q_REG: gl.constexpr, num_warps: gl.constexpr):
    """O [B * H * S, D] and LSE [B * H * S] (natural log) of causal attention within WINDOW keys (S or
    more: plain causal) over descriptors of the flat [B * H * S, D] q, k, v. One program a query tile,
    the last tiles of every row first. Key blocks of tile m: the window edge's (masked), those wholly
    inside (unmasked), the diagonal's (masked). S a multiple of BLOCK_M, BLOCK_M of BLOCK_N."""
    pid = gl.program_id(0)
    n_m = S // BLOCK_M
    m = n_m - 1 - pid // BH
    bh = pid % BH
    row0 = bh * S
    q0 = m * BLOCK_M
    j0 = gl.maximum(q0 - WINDOW + 1, 0) // BLOCK_N  # first block with a key some row sees
    j_diag = q0 // BLOCK_N  # first block with a key after some row
    j_end = (q0 + BLOCK_M) // BLOCK_N
    # blocks before j_free hold a key WINDOW or more before the tile's last row
    j_free = gl.minimum(gl.maximum(j0, (q0 + BLOCK_M - WINDOW + BLOCK_N - 1) // BLOCK_N), j_diag)
    j_free = gl.maximum(j_free, j0)

    dtype: gl.constexpr = q_desc.dtype
    q_s = gl.allocate_shared_memory(dtype, [BLOCK_M, D], q_desc.layout)
    k_bufs = gl.allocate_shared_memory(dtype, [NBUF, BLOCK_N, D], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [NBUF, BLOCK_N, D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bars = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NBUF):
        mbarrier.init(bars.index(i), count=1)
    mbarrier.expect(q_bar, BLOCK_M * D * dtype.primitive_bitwidth // 8)
    tma.async_copy_global_to_shared(q_desc, [row0 + q0, 0], q_bar, q_s)
    for i in gl.static_range(NBUF - 1):
        _refill(i, row0, j0 + i, j_end, k_desc, v_desc, k_bufs, v_bufs, bars, BLOCK_N)

    s_layout: gl.constexpr = mma_layout(BLOCK_N, num_warps)
    o_layout: gl.constexpr = mma_layout(D, num_warps)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    rows = q0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    acc = warpgroup_mma_init(gl.zeros([BLOCK_M, D], gl.float32, o_layout))
    mbarrier.wait(q_bar, 0)
    if Q_REG:  # the S product's A operand from registers: half the shared-memory reads of the S product
        s_a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
        q_a = q_s.load(s_a_layout)
    else:
        q_a = q_s
    if AHEAD:
        mbarrier.wait(bars.index(0), 0)
        s = warpgroup_mma(q_s, k_bufs.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        for j in range(j0, j_free):
            s, acc, m_i, l_i = _ahead_step(j - j0, j, j_end, s, row0, q_s, k_desc, v_desc, k_bufs, v_bufs, bars, acc,
                                           m_i, l_i, zero_s, qk_scale, rows, WINDOW, a_layout, o_layout, True, False,
                                           BLOCK_N)
        for j in range(j_free, j_diag):
            s, acc, m_i, l_i = _ahead_step(j - j0, j, j_end, s, row0, q_s, k_desc, v_desc, k_bufs, v_bufs, bars, acc,
                                           m_i, l_i, zero_s, qk_scale, rows, WINDOW, a_layout, o_layout, False, False,
                                           BLOCK_N)
        for j in range(j_diag, j_end - 1):
            s, acc, m_i, l_i = _ahead_step(j - j0, j, j_end, s, row0, q_s, k_desc, v_desc, k_bufs, v_bufs, bars, acc,
                                           m_i, l_i, zero_s, qk_scale, rows, WINDOW, a_layout, o_layout, True, False,
                                           BLOCK_N)
        s, acc, m_i, l_i = _ahead_step(j_end - 1 - j0, j_end - 1, j_end, s, row0, q_s, k_desc, v_desc, k_bufs,
                                       v_bufs, bars, acc, m_i, l_i, zero_s, qk_scale, rows, WINDOW, a_layout,
                                       o_layout, True, True, BLOCK_N)
    else:
        for j in range(j0, j_free):
            acc, m_i, l_i = _step(j - j0, j, j_end, row0, q_s, q_a, k_desc, v_desc, k_bufs, v_bufs, bars, acc, m_i, l_i,
                                  zero_s, qk_scale, rows, WINDOW, a_layout, o_layout, True, BLOCK_N)
        for j in range(j_free, j_diag):
            acc, m_i, l_i = _step(j - j0, j, j_end, row0, q_s, q_a, k_desc, v_desc, k_bufs, v_bufs, bars, acc, m_i, l_i,
                                  zero_s, qk_scale, rows, WINDOW, a_layout, o_layout, False, BLOCK_N)
        for j in range(j_diag, j_end):
            acc, m_i, l_i = _step(j - j0, j, j_end, row0, q_s, q_a, k_desc, v_desc, k_bufs, v_bufs, bars, acc, m_i, l_i,
                                  zero_s, qk_scale, rows, WINDOW, a_layout, o_layout, True, BLOCK_N)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(NBUF):
        mbarrier.invalidate(bars.index(i))
    rows_o = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    cols_o = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    row = row0 + q0 + rows_o
    gl.store(O + row[:, None] * D + cols_o[None, :], (acc / l_o[:, None]).to(O.dtype.element_ty))
    lse = (gl.convert_layout(m_i, gl.SliceLayout(1, o_layout)) + gl.log2(l_o)) / 1.4426950408889634
    gl.store(LSE + row, lse)


def launch(q, k, v, window=None, block_m=64, block_n=64, nbuf=3, num_warps=4, ahead=False, maxnreg=None,
           q_reg=False):
    """(O [B, H, S, D], LSE [B, H, S] natural log) of causal attention within ``window`` keys (None: all)
    on bf16 q, k, v [B, H, S, D] (contiguous)."""
    B, H, S, D = q.shape
    if S % block_m or block_m % block_n:
        raise ValueError(f"S={S} must be a multiple of block_m={block_m}, itself a multiple of block_n={block_n}")
    if ahead and nbuf < 3:
        raise ValueError("ahead needs nbuf >= 3")
    flat = [t.reshape(B * H * S, D) for t in (q, k, v)]
    lay_m = gl.NVMMASharedLayout.get_default_for([block_m, D], gl.bfloat16)
    lay_n = gl.NVMMASharedLayout.get_default_for([block_n, D], gl.bfloat16)
    descs = [GluonDescriptor(t, list(t.shape), list(t.stride()), [bl, D], lay)
             for t, bl, lay in zip(flat, (block_m, block_n, block_n), (lay_m, lay_n, lay_n))]
    o = torch.empty_like(flat[0])
    lse = torch.empty(B * H * S, device=q.device, dtype=torch.float32)
    kw = {} if maxnreg is None else {"maxnreg": maxnreg}
    plain_fwd_kernel[((S // block_m) * B * H,)](
        *descs, o, lse, S, B * H, S if window is None else window, LOG2E / math.sqrt(D), BLOCK_M=block_m,
        BLOCK_N=block_n, D=D, NBUF=nbuf, AHEAD=ahead, Q_REG=q_reg, num_warps=num_warps, **kw)
    return o.reshape(B, H, S, D), lse.reshape(B, H, S)


VARIANTS = {  # w: warps, m: query rows a program, n: keys a step, s: stages (CTAs an SM at D=128 in the comment)
    "w4_m64_n64_s3": dict(block_m=64, block_n=64, nbuf=3, num_warps=4),  # 2 (shared memory 112 KB)
    "w4_m64_n64_s2": dict(block_m=64, block_n=64, nbuf=2, num_warps=4),  # 2 (80 KB)
    "w4_m128_n64_s2": dict(block_m=128, block_n=64, nbuf=2, num_warps=4),  # spills at D=128; D=64: 2
    "w8_m128_n128_s2": dict(block_m=128, block_n=128, nbuf=2, num_warps=8),  # 1 (registers), Triton's tiles
    "w8_m128_n64_s3": dict(block_m=128, block_n=64, nbuf=3, num_warps=8),  # 1 (registers); D=64: 2
    "ahead_w4_m64_n64_s3": dict(block_m=64, block_n=64, nbuf=3, num_warps=4, ahead=True),  # ptxas C7514
    # second call
    "qreg_w4_m64_n64_s3": dict(block_m=64, block_n=64, nbuf=3, num_warps=4, q_reg=True),
    "qreg_w4_m64_n64_s2": dict(block_m=64, block_n=64, nbuf=2, num_warps=4, q_reg=True),
    "w8_m128_n64_s2_r128": dict(block_m=128, block_n=64, nbuf=2, num_warps=8, maxnreg=128),  # 2 (96 KB)
    "qreg_w8_m128_n64_s2_r128": dict(block_m=128, block_n=64, nbuf=2, num_warps=8, maxnreg=128, q_reg=True),
    "w8_m128_n64_s4": dict(block_m=128, block_n=64, nbuf=4, num_warps=8),  # D=64: 2 (80 KB)
    "qreg_w8_m128_n64_s3": dict(block_m=128, block_n=64, nbuf=3, num_warps=8, q_reg=True),
    "qreg_w4_m128_n64_s2": dict(block_m=128, block_n=64, nbuf=2, num_warps=4, q_reg=True),
    # third call
    "qreg_w8_m128_n64_s2": dict(block_m=128, block_n=64, nbuf=2, num_warps=8, q_reg=True),
    "qreg_w8_m128_n64_s4": dict(block_m=128, block_n=64, nbuf=4, num_warps=8, q_reg=True),
    "w8_m128_n32_s3_r128": dict(block_m=128, block_n=32, nbuf=3, num_warps=8, maxnreg=128),
    "w8_m128_n32_s4_r128": dict(block_m=128, block_n=32, nbuf=4, num_warps=8, maxnreg=128),
    "w4_m64_n32_s3": dict(block_m=64, block_n=32, nbuf=3, num_warps=4),
    "qreg_w4_m64_n32_s3": dict(block_m=64, block_n=32, nbuf=3, num_warps=4, q_reg=True),
}

CASES = {  # name: (B, H, S, D, window or None): the anchors' causal 2k, 8k, D=64 and sliding shapes
    "2k": (8, 16, 2048, 128, None),
    "8k": (2, 16, 8192, 128, None),
    "d64": (2, 32, 8192, 64, None),
    "sliding": (2, 16, 8192, 128, 1024),
}


def reference(q, k, v, window):
    q64, k64, v64 = (t.double() for t in (q, k, v))
    s = q64 @ k64.transpose(-1, -2) / math.sqrt(q.shape[-1])
    S = s.shape[-1]
    d = torch.arange(S, device=s.device)[:, None] - torch.arange(S, device=s.device)[None, :]
    allowed = (d >= 0) & (d < (S if window is None else window))
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse[..., None]) @ v64, lse


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def hf_flex_forward(S, window):
    import hf_flex
    from hf_flex import mods

    mm = mods.causal() if window is None else mods.and_masks(mods.causal(), mods.sliding_window(window))
    bm = hf_flex.create_block_mask(mm, None, None, S, S, device="cuda")
    return lambda q, k, v: hf_flex.flex_attention(q, k, v, block_mask=bm)


def torch_flex_forward(S, window):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    w = S if window is None else window
    bm = create_block_mask(lambda b, h, q, kv: (q >= kv) & (q - kv < w), None, None, S, S, device="cuda")
    f = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: f(q, k, v, block_mask=bm)


def allowed_fraction(S, window):
    w = S if window is None else min(window, S)
    return (w * (w + 1) / 2 + (S - w) * w) / (S * S)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--out", default="/tmp/gluon_fwd_plain")
    a = ap.parse_args()
    names = a.variants.split(",")
    if a.compile_only:
        return compile_only(a.out, names)
    ok = {n: True for n in names}
    g = torch.Generator(device="cpu").manual_seed(1)
    print("check vs float64 (B=1, H=3, S=768): relative error of O and LSE")
    for D in sorted({CASES[c][3] for c in a.cases.split(",")}):
        for window in (None, 1, 100, 200, 256, 700):
            q, k, v = (torch.randn(1, 3, 768, D, generator=g).cuda().bfloat16() for _ in range(3))
            ro, rl = reference(q, k, v, window)
            for n in names:
                try:
                    o, lse = launch(q, k, v, window=window, **VARIANTS[n])
                    torch.cuda.synchronize()
                    eo, el = _rel(o, ro), _rel(lse, rl)
                    good = eo < 1e-2 and el < 1e-3 and bool(torch.isfinite(o).all())
                except Exception as e:  # noqa: BLE001
                    eo = el = float("nan")
                    good = False
                    print(f"  {n}: {type(e).__name__}: {str(e)[:400]}")
                ok[n] &= good
                print(f"  D={D} window={window!s:5s} {n:22s} O {eo:.2e} LSE {el:.2e} {'ok' if good else 'WRONG'}",
                      flush=True)
    if a.check_only:
        sys.exit(0 if all(ok.values()) else 1)
    results = []
    for cname in a.cases.split(","):
        B, H, S, D, window = CASES[cname]
        gen = torch.Generator(device="cuda").manual_seed(2)
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        fns = {"hf_flex": hf_flex_forward(S, window), "torch_flex": torch_flex_forward(S, window)}
        if window is None:
            fns["sdpa"] = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        ref = fns["hf_flex"](q, k, v)
        for n in names:
            if ok[n] and D in (64, 128) and S % VARIANTS[n]["block_m"] == 0:
                fns[n] = (lambda kw: lambda q, k, v: launch(q, k, v, window=window, **kw)[0])(VARIANTS[n])
        good = {}
        for n, f in fns.items():
            e = _rel(f(q, k, v), ref)
            good[n] = e < 1e-2
            print(f"{cname}: {n} vs hf_flex rel err {e:.2e} {'ok' if good[n] else 'WRONG'}", flush=True)
        names_c = [n for n in fns if good[n]]
        times = {n: [] for n in names_c}
        for r in range(a.rounds):
            for n in names_c[r % len(names_c):] + names_c[:r % len(names_c)]:
                times[n].append(triton.testing.do_bench(lambda: fns[n](q, k, v), warmup=25, rep=200))
        flops = 4 * B * H * S * S * D * allowed_fraction(S, window)
        for n in names_c:
            ms = sorted(times[n])[len(times[n]) // 2]
            results.append((cname, n, ms, flops / ms / 1e9, (max(times[n]) - min(times[n])) / ms))
    print(f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print("forward TFLOP/s (median of rounds, spread), ratios against hf_flex, torch flex and sdpa in the same case")
    by = {(c, n): tf for c, n, _, tf, _ in results}
    print(f"{'case':8s} {'impl':22s} {'ms':>8s} {'TFLOP/s':>8s} {'spread':>7s} {'/hf_flex':>8s} {'/torch':>7s} {'/sdpa':>7s}")
    for c, n, ms, tf, sp in results:
        print(f"{c:8s} {n:22s} {ms:8.3f} {tf:8.1f} {sp:7.3f} {tf / by.get((c, 'hf_flex'), float('nan')):8.2f} "
              f"{tf / by.get((c, 'torch_flex'), float('nan')):7.2f} {tf / by.get((c, 'sdpa'), float('nan')):7.2f}")


def compile_only(out, names):
    """Compile the variants for sm_90 without a GPU (scripts/inspect_ir.py's stand-in driver)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import inspect_ir

    compiled = inspect_ir._compile_only()
    for name in names:
        for D in (128, 64):
            q, k, v = (torch.empty(1, 2, 1024, D, dtype=torch.bfloat16) for _ in range(3))
            try:
                launch(q, k, v, window=256, **VARIANTS[name])
            except Exception as e:  # noqa: BLE001
                print(f"{name} D={D}: {type(e).__name__}: {str(e)[:3000]}")
    inspect_ir.write_ptx(compiled, out)


if __name__ == "__main__":
    main()
