"""Host cost of a Triton launch through JITFunction (fn[grid](...)) against a direct launch of the
compiled kernel it returned (kernel[grid](*all args)), for every launch of packed_block_mask and of one
forward+backward of a bench case. GPU kept busy so the host never waits.

    python scripts/probe_launch.py [--case 4] [--calls 300] [--src OUTDIR]   (calls x launches < ~1000)
"""
from __future__ import annotations

import argparse
import inspect
import os

import torch
import triton
from triton.runtime import jit as tjit

from hf_flex import bench
from profile_host import _host_ms, block_table_call  # scripts/ is sys.path[0] when run as a script

LAUNCH_OPTS = {"num_warps", "num_stages", "maxnreg", "num_ctas", "enable_fp_fusion", "launch_cooperative_grid"}


def record(fn_call):
    """Run fn_call once, recording every JITFunction launch: (fn, grid, args, kwargs, compiled kernel)."""
    seen = []
    orig = tjit.JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        k = orig(self, *args, grid=grid, warmup=warmup, **kwargs)
        seen.append((self, grid, args, dict(kwargs), k))
        return k

    tjit.JITFunction.run = run
    try:
        fn_call()
    finally:
        tjit.JITFunction.run = orig
    return seen


def host_us(f, calls):
    return _host_ms(None, f, calls) * 1e3


def compare(label, fn_call, calls):
    launches = record(fn_call)
    torch.cuda.synchronize()
    print(f"== {label}: {len(launches)} launches; whole call {host_us(fn_call, calls):.1f} us host")
    for fn, grid, args, kw, k in launches:
        opts = {n: v for n, v in kw.items() if n in LAUNCH_OPTS}
        rest = {n: v for n, v in kw.items() if n not in LAUNCH_OPTS and n not in ("debug", "instrumentation_mode")}
        ba = inspect.signature(fn.fn).bind(*args, **rest)
        ba.apply_defaults()
        full = list(ba.arguments.values())
        g = grid if not callable(grid) else grid(ba.arguments)
        g = tuple(g) + (1,) * (3 - len(g))
        via_jit = host_us(lambda: fn[grid](*args, **rest, **opts), calls)
        runner = k[g]
        direct = host_us(lambda: runner(*full), calls)
        direct2 = host_us(lambda: k[g](*full), calls)
        print(f"  {fn.__name__:34s} {len(full):3d} args: fn[grid] {via_jit:7.1f} us | kernel[grid] {direct2:6.1f} us"
              f" | cached runner {direct:6.1f} us")
    return launches


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", type=int, default=4)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--src", default=None, help="write triton's jit.py / compiler.py sources here")
    a = ap.parse_args()
    print("triton", triton.__version__, "torch", torch.__version__, torch.cuda.get_device_name())
    if a.src:
        import triton.compiler.compiler as cc
        for m in (tjit, cc):
            with open(os.path.join(a.src, os.path.basename(m.__file__) + ".txt"), "w") as f:
                f.write(inspect.getsource(m))
    blk = block_table_call()
    compare("packed_block_mask(position_ids), S=16384, 24 docs", blk, a.calls)
    c = bench.ANCHORS[a.case]
    st = bench.setup(c, seed=0)
    fwd = lambda: st.ours(st.q, st.k, st.v)  # noqa: E731
    call = bench.fwdbwd_call(st.ours, st.q, st.k, st.v, st.do)
    for _ in range(3):
        call()
    compare(f"forward, {c.name}", fwd, a.calls)
    compare(f"forward+backward, {c.name}", call, a.calls)


if __name__ == "__main__":
    main()
