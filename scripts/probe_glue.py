"""Host cost of hf_flex's own Python around the attention kernels, the kernel launches stubbed out, so it
runs on any machine (no GPU, no interpreter) and shows what our glue costs apart from Triton's launches.

    python scripts/probe_glue.py [--S 4096] [--calls 300] [--profile 18]

One forward and one forward+backward (torch.autograd.grad) of hf_flex.flex_attention on bf16 CPU tensors
shaped as a Transformers layer hands them over (q/k/v transposed views, GQA 16/8, D=128, a packed-documents
causal block mask), with every attention kernel replaced by a no-op and the tensor-descriptor (TMA) path
taken as on Hopper. Prints microseconds per call, then a cProfile of the forward+backward by own time.
Triton's launch costs come on top (scripts/probe_launch.py measures those on the GPU).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import hf_flex
import hf_flex.attention as attention
from hf_flex import mods
from hf_flex.kernels import launch, launch_varlen


class _NoLaunch:
    """Stands in for a JITFunction: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", type=int, default=18, help="rows of the cProfile listing (0: none)")
    ap.add_argument("--block-sparse", action="store_true",
                    help="SCHEDULE['varlen'] off: the block-sparse kernels' glue instead of the document-aligned")
    a = ap.parse_args()
    for name in ("attn_fwd_kernel", "attn_bwd_delta_kernel", "attn_bwd_kernel", "attn_bwd_dkdv_kernel",
                 "attn_bwd_dq_kernel"):
        setattr(launch, name, _NoLaunch())
    for name in ("attn_fwd_varlen_kernel", "attn_bwd_varlen_kernel"):
        setattr(launch_varlen, name, _NoLaunch())
    launch.SCHEDULE["varlen"] = not a.block_sparse
    attention.triton_runs_on = lambda device: True  # the kernel path, not the PyTorch reference
    launch.has_tma = lambda device: True  # descriptors built as on Hopper

    S, D = a.S, 128
    q = torch.randn(1, S, 16, D, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(1, S, 8, D, dtype=torch.bfloat16).transpose(1, 2).requires_grad_() for _ in range(2))
    ids = (torch.arange(S) // 800)[None].to(torch.int32)
    bm = hf_flex.create_block_mask(mods.and_masks(mods.causal(), mods.document(ids, packed=True)),
                                   None, None, S, S, device="cpu")
    do = torch.randn(1, S, 16, D, dtype=torch.bfloat16).transpose(1, 2)  # as the output projection's backward hands it

    def fwd():
        return hf_flex.flex_attention(q, k, v, None, bm, enable_gqa=True)

    def fwd_bwd():
        torch.autograd.grad(fwd(), (q, k, v), do)

    for _ in range(20):
        fwd_bwd()
    class _Nothing(torch.autograd.Function):  # the floor: an autograd function that only allocates
        @staticmethod
        def forward(ctx, q, k, v):
            ctx.save_for_backward(q, k, v)
            return torch.empty_like(q)

        @staticmethod
        def backward(ctx, g):
            q, k, v = ctx.saved_tensors
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def nothing():
        torch.autograd.grad(_Nothing.apply(q, k, v), (q, k, v), do)

    # the least of several batches: this machine's other load only ever adds
    for name, fn in (("forward", fwd), ("forward+backward", fwd_bwd), ("autograd floor (allocations only)", nothing)):
        best = float("inf")
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            for _ in range(a.calls):
                fn()
            best = min(best, (time.perf_counter() - t0) / a.calls * 1e6)
        print(f"{name}: {best:.0f} us of host time per call (launches stubbed; least of {a.repeats} x {a.calls})")
    if a.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(a.calls):
            fwd_bwd()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(a.profile)


if __name__ == "__main__":
    main()
