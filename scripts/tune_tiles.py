"""Sweep kernel tile configs (fwd, dK/dV, dQ) on a causal case; prints TFLOP/s per config.

    python scripts/tune_tiles.py [--S 8192] [--D 128 64]

Every config is checked against the default config's output and gradients before it is timed.
"""

import argparse

import torch
import triton

import hf_flex
from hf_flex import mods
from hf_flex.kernels import launch
from hf_flex.kernels.launch import Tiles

FWD = [Tiles(128, 64, 8, 3), Tiles(128, 128, 8, 3), Tiles(128, 64, 4, 3), Tiles(128, 32, 4, 4),
       Tiles(64, 64, 4, 3), Tiles(128, 64, 8, 4), Tiles(128, 128, 8, 2)]
DKDV = [Tiles(64, 64, 8, 2), Tiles(64, 128, 8, 2), Tiles(32, 128, 4, 3), Tiles(64, 64, 4, 3),
        Tiles(32, 64, 4, 3), Tiles(64, 128, 8, 3), Tiles(32, 128, 8, 2), Tiles(16, 128, 4, 3)]
DQ = [Tiles(64, 64, 8, 2), Tiles(128, 32, 4, 3), Tiles(128, 64, 8, 2), Tiles(64, 64, 4, 3),
      Tiles(64, 32, 4, 3), Tiles(128, 32, 8, 3), Tiles(128, 64, 8, 3)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, default=8192)
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--D", type=int, nargs="+", default=[128, 64])
    a = ap.parse_args()
    for D in a.D:
        H = a.H * 128 // D
        q, k, v = (torch.randn(a.B, H, a.S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        bm = hf_flex.create_block_mask(mods.causal(), None, None, a.S, a.S)
        flops = 4 * a.B * H * a.S * a.S * D * 0.5

        def fwd():
            return hf_flex.flex_attention(q, k, v, None, bm)

        def bwd_only(out):
            return lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)

        launch.OVERRIDES.clear()
        ref_out = fwd()
        ref_g = torch.autograd.grad(ref_out, (q, k, v), do)
        for name, space in (("fwd", FWD), ("dkdv", DKDV), ("dq", DQ)):
            for t in space:
                launch.OVERRIDES.clear()
                launch.OVERRIDES[name] = t
                try:
                    out = fwd()
                    g = torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
                    err = max(((x.float() - y.float()).norm() / y.float().norm()).item() for x, y in zip((out,) + g, (ref_out,) + ref_g))
                    if not err < 1e-2:
                        print(f"D={D} {name} {t}: WRONG rel err {err:.2e}")
                        continue
                    if name == "fwd":
                        ms = triton.testing.do_bench(fwd, warmup=25, rep=100, return_mode="median")
                        tf = flops / ms / 1e9
                    else:
                        ms = triton.testing.do_bench(bwd_only(out), warmup=25, rep=100, return_mode="median")
                        tf = 2.5 * flops / ms / 1e9
                    print(f"D={D} {name:5s} BM={t.block_m:4d} BN={t.block_n:4d} w={t.num_warps} s={t.num_stages}: {ms:7.3f} ms {tf:6.0f} TFLOP/s", flush=True)
                except Exception as e:  # a config that does not fit (shared memory) is skipped, said
                    print(f"D={D} {name} {t}: failed {type(e).__name__}: {str(e)[:120]}")
        launch.OVERRIDES.clear()


if __name__ == "__main__":
    main()
