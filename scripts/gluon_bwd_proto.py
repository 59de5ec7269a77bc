"""A whole causal attention backward in Gluon, timed against hf_flex's Triton backward, torch flex's
and cuDNN's on the same inputs: the measurement behind hf_flex/kernels/gluon_causal.py (sixteenth
round), whose kernels this script runs ("gluon": the dK/dV pass, then the dQ pass that waits for its
product each step), next to a dQ form kept here (``gluon_dqdef3``: each step's dQ product issued one
step late, under the next step's P and dS, K/V in 3 stages; within 3 % of the other).

On the device:  python scripts/gluon_bwd_proto.py [--cases 2k,8k] [--check-only]
Checks dQ, dK, dV against float64 (small shape), then against hf_flex's gradients on each timed case,
then times each backward alone (autograd.grad on a kept graph for hf_flex / torch flex / cuDNN; for
Gluon the delta rows, dK/dV, dQ launches) and the forward+backward ratios it would give with hf_flex's
forward. Offline: --compile-only.
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
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gluon_dkdv_proto import LOG2E, _gluon_descs  # noqa: E402

from hf_flex.kernels import gluon_causal  # noqa: E402
from hf_flex.kernels.gluon_causal import _copy_pair as copy_pair, _mma_layout as mma_layout  # noqa: E402


@gluon.jit
def _dq_deferred_step(i, n_steps, start_m, row0, q_smem, do_smem, k_smem, v_smem, bars, k_desc, v_desc, rows, lse,
                      delta, zero_s, dq, ds_prev, qk_scale, a_layout: gl.constexpr, MASKED: gl.constexpr,
                      FIRST: gl.constexpr, BLOCK_N: gl.constexpr):
    """Step i of gluon_dq_deferred_kernel: S_i and dP_i issued, then the previous step's dQ product
    (ds_prev K_{i-1}, unless FIRST), so that it runs under this step's P and dS; all three waited for
    within the step (nothing in flight across the loop edge), and the previous step's stage refilled
    with step i - 1 + NBUF's K and V once its dQ product is done (step 0: the stage the prologue left
    empty). Returns (dq, this step's dS)."""
    NBUF: gl.constexpr = k_smem.type.shape[0]
    st = i % NBUF
    mbarrier.wait(bars.index(st), (i // NBUF) & 1)
    ks = k_smem.index(st)
    s = warpgroup_mma(q_smem, ks.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    dp = warpgroup_mma(do_smem, v_smem.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    if FIRST:
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
    else:
        dq = warpgroup_mma(ds_prev, k_smem.index((i + NBUF - 1) % NBUF), dq, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=2, deps=(s,))
    if MASKED:
        keys = i * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, zero_s.type.layout))
        s = gl.where((start_m + rows)[:, None] >= keys[None, :], s, float("-inf"))
    p = gl.exp2(s * qk_scale - lse[:, None])
    if FIRST:
        dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp,))
    else:
        dp = warpgroup_mma_wait(num_outstanding=1, deps=(dp,))
    ds = gl.convert_layout((p * (dp - delta[:, None])).to(ks.dtype), a_layout)
    if not FIRST:
        dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq,))
    # the stage step i - 1 used (for step 0: the one stage the prologue left empty) takes step
    # i - 1 + NBUF's K and V
    nxt = i - 1 + NBUF
    if nxt < n_steps:
        fr = (i + NBUF - 1) % NBUF
        copy_pair(k_desc, v_desc, row0 + nxt * BLOCK_N, bars.index(fr), k_smem.index(fr), v_smem.index(fr))
    return dq, ds


@gluon.jit
def gluon_dq_deferred_kernel(q_desc, k_desc, v_desc, do_desc, LSE, DELTA, DQ, S, qk_scale, sm_scale,
                             BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, NBUF: gl.constexpr,
                             CAUSAL: gl.constexpr, num_warps: gl.constexpr):
    """gluon_causal's dQ kernel with each step's dQ product issued one step late (under the next step's
    softmax and dS) and K/V in NBUF stages. Step 0 is peeled (masked when CAUSAL: its keys are all allowed
    unless it is the diagonal's, and the mask costs one step)."""
    n_m = S // BLOCK_M
    pid_m = n_m - 1 - gl.program_id(0)
    bh = gl.program_id(1)
    row0 = bh * S
    start_m = pid_m * BLOCK_M
    dtype: gl.constexpr = q_desc.dtype
    s_layout: gl.constexpr = mma_layout(BLOCK_N, num_warps)
    acc_layout: gl.constexpr = mma_layout(D, num_warps)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, D], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, D], do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [NBUF, BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NBUF, BLOCK_N, D], v_desc.layout)
    qo_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bars = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    mbarrier.init(qo_bar, count=1)
    for j in gl.static_range(NBUF):
        mbarrier.init(bars.index(j), count=1)
    n_steps = S // BLOCK_N
    n_diag = 0
    if CAUSAL:
        n_steps = (start_m + BLOCK_M) // BLOCK_N
        n_diag = BLOCK_M // BLOCK_N
    copy_pair(q_desc, do_desc, row0 + start_m, qo_bar, q_smem, do_smem)
    for j in gl.static_range(NBUF - 1):
        if j < n_steps:
            copy_pair(k_desc, v_desc, row0 + j * BLOCK_N, bars.index(j), k_smem.index(j), v_smem.index(j))
    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    lse = gl.load(LSE + row0 + start_m + rows)
    delta = gl.load(DELTA + row0 + start_m + rows)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    dq = gl.zeros([BLOCK_M, D], gl.float32, acc_layout)
    ds = gl.zeros([BLOCK_M, BLOCK_N], dtype, a_layout)
    mbarrier.wait(qo_bar, 0)
    dq, ds = _dq_deferred_step(0, n_steps, start_m, row0, q_smem, do_smem, k_smem, v_smem, bars, k_desc, v_desc, rows,
                               lse, delta, zero_s, dq, ds, qk_scale, a_layout, CAUSAL, True, BLOCK_N)
    for i in range(1, n_steps - n_diag):
        dq, ds = _dq_deferred_step(i, n_steps, start_m, row0, q_smem, do_smem, k_smem, v_smem, bars, k_desc, v_desc,
                                   rows, lse, delta, zero_s, dq, ds, qk_scale, a_layout, False, False, BLOCK_N)
    for i in range(gl.maximum(n_steps - n_diag, 1), n_steps):
        dq, ds = _dq_deferred_step(i, n_steps, start_m, row0, q_smem, do_smem, k_smem, v_smem, bars, k_desc, v_desc,
                                   rows, lse, delta, zero_s, dq, ds, qk_scale, a_layout, True, False, BLOCK_N)
    dq = warpgroup_mma(ds, k_smem.index((n_steps - 1) % NBUF), dq, is_async=True)
    dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq,))
    mbarrier.invalidate(qo_bar)
    for j in gl.static_range(NBUF):
        mbarrier.invalidate(bars.index(j))
    rows_o = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, acc_layout))
    gl.store(DQ + (row0 + start_m + rows_o)[:, None] * D + cols[None, :], (dq * sm_scale).to(DQ.dtype.element_ty))


def gluon_backward(q, k, v, do, o, lse2, passes=("delta", "dkdv", "dq"), delta=None, dq_deferred=0):
    """(dQ, dK, dV) [B, H, S, D] of attention from bf16 q, k, v, do, the forward's o and its LSE in log2
    units lse2 [B, H, S] (float32): delta = rowsum(dO o) by torch, then the dK/dV and dQ launches
    (``passes`` names those to run, for timing them apart; a pass left out leaves its output empty and
    needs ``delta`` given when "delta" is left out). dq_deferred: NBUF of gluon_dq_deferred_kernel
    (0: gluon_causal's dQ kernel)."""
    B, H, S, D = q.shape
    sm_scale = 1 / math.sqrt(D)
    if "delta" in passes:
        delta = (do.float() * o.float()).sum(-1)
    flat = [t.reshape(B * H * S, D) for t in (q, k, v, do)]
    dk, dv, dq = (torch.empty_like(flat[0]) for _ in range(3))
    grid = (S // 128, B * H)
    if "dkdv" in passes:
        gluon_causal.attn_bwd_dkdv_causal_kernel[grid](*_gluon_descs(flat, 64, 128, D), lse2, delta, dk, dv, S,
                                                       sm_scale * LOG2E, sm_scale, S, SLIDING=False, BLOCK_M=64,
                                                       BLOCK_N=128, D=D, num_warps=8)
    if "dq" in passes and dq_deferred:
        gluon_dq_deferred_kernel[grid](*_gluon_descs(flat, 128, 64, D), lse2, delta, dq, S, sm_scale * LOG2E,
                                       sm_scale, BLOCK_M=128, BLOCK_N=64, D=D, NBUF=dq_deferred, CAUSAL=True,
                                       num_warps=8)
    elif "dq" in passes:
        gluon_causal.attn_bwd_dq_causal_kernel[grid](*_gluon_descs(flat, 128, 64, D), lse2, delta, dq, S,
                                                     sm_scale * LOG2E, sm_scale, S, SLIDING=False, BLOCK_M=128,
                                                     BLOCK_N=64, D=D, num_warps=8)
    return tuple(t.reshape(B, H, S, D) for t in (dq, dk, dv))


def reference(q, k, v, do, causal=True):
    """(dQ, dK, dV, O, LSE in log2 units) in float64."""
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, do))
    sm_scale = 1 / math.sqrt(q.shape[-1])
    s = q64 @ k64.transpose(-1, -2) * sm_scale
    if causal:
        S = s.shape[-1]
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None])
    o = p @ v64
    dv = p.transpose(-1, -2) @ do64
    dp = do64 @ v64.transpose(-1, -2)
    ds = p * (dp - (do64 * o).sum(-1)[..., None])
    return ds @ k64 * sm_scale, ds.transpose(-1, -2) @ q64 * sm_scale, dv, o, lse * LOG2E


CASES = {"2k": (8, 16, 2048, 128), "8k": (2, 16, 8192, 128)}  # the anchors' causal D=128 shapes
DQ_FORMS = {"gluon": 0, "gluon_dqdef3": 3}  # the Gluon backward's dQ pass: waited each step / deferred, 3 stages


def _rel_max(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _backward_timer(f, q, k, v, do):
    """A callable that runs only the backward of f(q, k, v) (the graph kept between calls)."""
    leaves = tuple(t.detach().requires_grad_() for t in (q, k, v))
    out = f(*leaves)
    return lambda: torch.autograd.grad(out, leaves, do, retain_graph=True)


def _profile_hf_flex_passes(cname, f, q, k, v, do):
    """hf_flex's backward with its dK/dV and dQ programs in two launches (SCHEDULE["fused_bwd"] off, for
    this reading only), each launch's GPU time from torch.profiler."""
    from hf_flex.kernels import launch as hf_launch

    before = hf_launch.SCHEDULE["fused_bwd"]
    hf_launch.SCHEDULE["fused_bwd"] = False
    try:
        bwd = _backward_timer(f, q, k, v, do)
        for _ in range(3):
            bwd()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                bwd()
            torch.cuda.synchronize()
    finally:
        hf_launch.SCHEDULE["fused_bwd"] = before
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:4]:
        print(f"{cname}: hf_flex unfused backward, {e.key[:60]}: {e.device_time_total / e.count / 1e3:.3f} ms "
              f"x {e.count // 10} a call", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--check-only", action="store_true", help="the float64 check alone (run it under a timeout)")
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--out", default="/tmp/gluon_bwd_proto")
    a = ap.parse_args()
    if a.compile_only:
        return compile_only(a.out)
    g = torch.Generator(device="cpu").manual_seed(1)
    q, k, v, do = (torch.randn(1, 3, 768, 128, generator=g).cuda().bfloat16() for _ in range(4))
    rdq, rdk, rdv, ro, rlse2 = reference(q, k, v, do)
    ok = True
    for nbuf in DQ_FORMS.values():
        dq, dk, dv = gluon_backward(q, k, v, do, ro.bfloat16(), rlse2.float(), dq_deferred=nbuf)
        torch.cuda.synchronize()
        errs = [_rel_max(x, r) for x, r in zip((dq, dk, dv), (rdq, rdk, rdv))]
        ok &= all(e < 2e-2 for e in errs)
        print("check vs float64 (B=1, H=3, S=768, D=128, causal, dq_deferred=%d): max |err| / max |ref| dQ %.2e "
              "dK %.2e dV %.2e %s" % (nbuf, *errs, "ok" if all(e < 2e-2 for e in errs) else "WRONG"), flush=True)
    if a.check_only or not ok:
        sys.exit(0 if ok else 1)

    import hf_flex
    from hf_flex import mods
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    rows = []
    for cname in a.cases.split(","):
        B, H, S, D = CASES[cname]
        gen = torch.Generator(device="cuda").manual_seed(2)
        q, k, v, do = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
        bm = hf_flex.create_block_mask(mods.causal(), None, None, S, S, device="cuda")
        tbm = create_block_mask(lambda b, h, qi, kv: qi >= kv, None, None, S, S, device="cuda")
        t_flex = torch.compile(flex_attention, dynamic=False)
        impls = {
            "hf_flex": lambda q, k, v: hf_flex.flex_attention(q, k, v, block_mask=bm),
            "torch_flex": lambda q, k, v: t_flex(q, k, v, block_mask=tbm),
            "cudnn": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
        }
        # the Gluon backward's inputs from hf_flex's own forward: O and its LSE (natural log -> log2)
        o = impls["hf_flex"](q, k, v)
        s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(D)
        s.masked_fill_(torch.ones(S, S, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
        lse2 = (torch.logsumexp(s, -1) * LOG2E).contiguous()
        del s
        ref = _backward_timer(impls["hf_flex"], q, k, v, do)()
        fns = {n: _backward_timer(f, q, k, v, do) for n, f in impls.items()}
        for form, nbuf in DQ_FORMS.items():
            mine = gluon_backward(q, k, v, do, o, lse2, dq_deferred=nbuf)
            errs = [((x.float() - r.float()).norm() / r.float().norm()).item() for x, r in zip(mine, ref)]
            print(f"{cname}: {form} backward vs hf_flex's, relative error dQ {errs[0]:.2e} dK {errs[1]:.2e} "
                  f"dV {errs[2]:.2e}", flush=True)
            if not all(e < 2e-2 for e in errs):
                raise AssertionError(f"{cname}: the {form} backward disagrees with hf_flex's")
            fns[form] = (lambda nbuf: lambda: gluon_backward(q, k, v, do, o, lse2, dq_deferred=nbuf))(nbuf)
        delta = (do.float() * o.float()).sum(-1)
        parts = {"gluon delta": lambda: gluon_backward(q, k, v, do, o, lse2, passes=("delta",)),
                 "gluon dK/dV": lambda: gluon_backward(q, k, v, do, o, lse2, passes=("dkdv",), delta=delta),
                 "gluon dQ": lambda: gluon_backward(q, k, v, do, o, lse2, passes=("dq",), delta=delta),
                 "gluon dQ deferred": lambda: gluon_backward(q, k, v, do, o, lse2, passes=("dq",), delta=delta,
                                                             dq_deferred=3)}
        for n, f in parts.items():
            print(f"{cname}: {n} alone {triton.testing.do_bench(f, warmup=25, rep=200):.3f} ms", flush=True)
        _profile_hf_flex_passes(cname, impls["hf_flex"], q, k, v, do)
        fwd = {n: (lambda f: lambda: f(q, k, v))(f) for n, f in impls.items()}
        names = list(fns)
        times = {n: [] for n in names}
        ftimes = {n: [] for n in fwd}
        for r in range(a.rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                times[n].append(triton.testing.do_bench(fns[n], warmup=25, rep=200))
            for n in fwd:
                ftimes[n].append(triton.testing.do_bench(fwd[n], warmup=25, rep=200))
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        flops = 4 * B * H * S * S * D * 0.5
        bwd = {n: med(times[n]) for n in names}
        fw = {n: med(ftimes[n]) for n in fwd}
        for form in DQ_FORMS:
            fw[form] = fw["hf_flex"]  # a Gluon backward would follow hf_flex's forward
        for n in names:
            rows.append((cname, n, bwd[n], 2.5 * flops / bwd[n] / 1e9, fw[n], 3.5 * flops / (fw[n] + bwd[n]) / 1e9,
                         (fw["torch_flex"] + bwd["torch_flex"]) / (fw[n] + bwd[n])))
        del fns, impls
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print("causal D=128 bf16; backward alone and forward+backward (gluon: hf_flex's forward + the Gluon backward)")
    print(f"{'case':5s} {'impl':11s} {'bwd ms':>8s} {'bwd TF/s':>9s} {'fwd ms':>8s} {'f+b TF/s':>9s} {'f+b vs torch flex':>18s}")
    for c, n, b, btf, f, fbtf, ratio in rows:
        print(f"{c:5s} {n:11s} {b:8.3f} {btf:9.1f} {f:8.3f} {fbtf:9.1f} {ratio:18.2f}")


def compile_only(out):
    """Compile the dQ and dK/dV kernels for sm_90 without a GPU (scripts/inspect_ir.py's stand-in driver)."""
    import inspect_ir

    compiled = inspect_ir._compile_only()
    q, k, v, do, o = (torch.empty(1, 2, 1024, 128, dtype=torch.bfloat16) for _ in range(5))
    for nbuf in (0, 3):
        try:
            gluon_backward(q, k, v, do, o, torch.empty(1, 2, 1024), dq_deferred=nbuf)
        except Exception as e:  # noqa: BLE001
            print(f"{type(e).__name__}: {str(e)[:3000]}")
    inspect_ir.write_ptx(compiled, out)


if __name__ == "__main__":
    main()
