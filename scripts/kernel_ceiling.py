"""How far each kernel target of issue 5 lies from what our kernels reach with no mask at all (CUDA).

    python scripts/kernel_ceiling.py [--cases 0,1,2,3,4,5,6] [--json out.json]

Per anchor case (hf_flex.bench.ANCHORS), side by side in one process: hf_flex and torch's compiled
flex_attention on the case, and hf_flex on the same shapes with no mask (every block full: no mask
evaluated, no partial blocks, no causal tail), TFLOP/s over each run's own allowed FLOPs; for the
causal cases also SDPA (cuDNN on the H100) on the case. Correctness first: hf_flex against torch flex
on the case (bench.agreement), and the maskless run against SDPA without a mask.

The maskless run is the fastest our loops go on these shapes: a masked case does the same work per
allowed block plus its mask, its partial blocks and its imbalance. So ``ceiling = maskless / torch
flex on the case`` bounds the ratio our kernels can reach on that case; where it is below a target,
no schedule of these loops meets it, only a faster loop.
"""

from __future__ import annotations

import argparse
import json

import torch

import hf_flex
from hf_flex import bench

TARGET_FWD = {"causal": 1.15, "sliding": 1.15, "doc": 1.25, "softcap": 1.4}
TARGET_FB = {"causal": 1.10, "sliding": 1.10, "doc": 1.25, "softcap": 1.4}


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def measure(c: bench.Case) -> dict:
    st = bench.setup(c, seed=0)
    errs = bench.agreement(st)  # raises when hf_flex disagrees with torch flex on the case
    q, k, v, do = st.q, st.k, st.v, st.do
    dens = bench.allowed_fraction(c, st.ids)
    ours_f, ours_fb = bench.timed_tflops(st.ours, q, k, v, do, bench.case_flops(c, dens))
    torch_f, torch_fb = bench.timed_tflops(st.theirs, q, k, v, do, bench.case_flops(c, dens))

    def maskless(a, b, cc):
        return hf_flex.flex_attention(a, b, cc, enable_gqa=st.gqa)

    group = c.Hq // c.Hkv
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
    err_maskless = _rel(maskless(q, k, v), ref)
    if not err_maskless < 1e-2:
        raise AssertionError(f"{c.name}: maskless hf_flex disagrees with SDPA (rel err {err_maskless:.3e})")
    del ref
    dense_f, dense_fb = bench.timed_tflops(maskless, q, k, v, do, bench.case_flops(c, 1.0))
    row = dict(case=c.name, kind=c.kind, B=c.B, Hq=c.Hq, Hkv=c.Hkv, S=c.S, D=c.D, density=round(dens, 4),
               hf_flex_fwd=ours_f, torch_flex_fwd=torch_f, hf_flex_fwdbwd=ours_fb, torch_flex_fwdbwd=torch_fb,
               hf_flex_maskless_fwd=dense_f, hf_flex_maskless_fwdbwd=dense_fb,
               ceiling_fwd=dense_f / torch_f, ceiling_fwdbwd=dense_fb / torch_fb,
               target_fwd=TARGET_FWD[c.kind], target_fwdbwd=TARGET_FB[c.kind],
               rel_err_vs_torch_flex=errs, maskless_rel_err_vs_sdpa=err_maskless)
    if c.kind == "causal" and group == 1:
        sd = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        e = _rel(st.ours(q, k, v), sd())
        if not e < 1e-2:
            raise AssertionError(f"{c.name}: hf_flex disagrees with SDPA causal (rel err {e:.3e})")
        row["sdpa_fwd"] = bench.case_flops(c, dens) / (bench._ms(sd) * 1e-3) / 1e12
        row["ceiling_vs_sdpa_fwd"] = dense_f / row["sdpa_fwd"]
    del st
    torch.cuda.empty_cache()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="0,1,2,3,4,5,6")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = [measure(bench.ANCHORS[int(i)]) for i in a.cases.split(",")]
    print(f"\n{torch.cuda.get_device_name()} | {bench.versions()}")
    print("TFLOP/s fwd | f+b; ceiling = hf_flex without a mask / torch flex on the case (target)")
    for r in rows:
        line = (f"{r['case']:24s} S={r['S']:5d} D={r['D']:3d}  ours {r['hf_flex_fwd']:5.0f} | {r['hf_flex_fwdbwd']:5.0f}"
                f"  torch {r['torch_flex_fwd']:5.0f} | {r['torch_flex_fwdbwd']:5.0f}"
                f"  maskless {r['hf_flex_maskless_fwd']:5.0f} | {r['hf_flex_maskless_fwdbwd']:5.0f}"
                f"  ratio {r['hf_flex_fwd'] / r['torch_flex_fwd']:.2f} | {r['hf_flex_fwdbwd'] / r['torch_flex_fwdbwd']:.2f}"
                f"  ceiling {r['ceiling_fwd']:.2f} ({r['target_fwd']}) | {r['ceiling_fwdbwd']:.2f} ({r['target_fwdbwd']})")
        if "sdpa_fwd" in r:
            line += f"  sdpa {r['sdpa_fwd']:5.0f}: ceiling {r['ceiling_vs_sdpa_fwd']:.2f} (0.85)"
        print(line)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), **bench.versions(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
