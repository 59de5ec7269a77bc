"""Where the time of one anchor case goes, hf_flex against torch's compiled flex_attention (CUDA).

    python scripts/profile_kernels.py [--cases 4,1] [--json out.json] [--set halves=False]
    ncu --clock-control none --kernel-name regex:'attn_fwd_kernel|attn_bwd_kernel|triton_tem' \\
        --launch-count 16 --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        python scripts/profile_kernels.py --cases 4 --ncu

Per case (hf_flex.bench.ANCHORS, by index), after checking both libraries' output and gradients
against each other (bench.agreement; the bench itself also checks both against float64):

- forward and forward+backward times, median of triton's do_bench (the bench's numbers), and the
  forward+backward as the bench timed it before the sixth round (``.backward()`` adding into the
  leaves' .grad: three elementwise kernels more per call);
- the same calls enqueued back to back behind a sleeping GPU (bench._gpu_and_host_ms): the kernels'
  own GPU time without launch gaps, and the host's time to enqueue one call. A host time near or
  above the GPU time means do_bench measured the host, not the kernels;
- each GPU kernel's time in one forward+backward (torch.profiler, averaged over a few calls), so a
  difference between the libraries lands on a kernel (forward, backward, the backward's delta
  pre-pass, copies) rather than on the whole call.

``--ncu``: no timing; each library's forward+backward runs three times (the first compiles), for
Nsight Compute to read the kernels it selects.
"""

from __future__ import annotations

import argparse
import json


def _kernel_times(fn, calls: int = 5) -> dict:
    """{kernel name: microseconds per call of fn} over ``calls`` calls, after one untimed call."""
    from hf_flex.bench_e2e import kernel_times

    fn()
    return kernel_times(fn, calls)


def profile_case(index: int, ncu: bool = False) -> dict:
    import torch

    from hf_flex import bench

    c = bench.ANCHORS[index]
    st = bench.setup(c, seed=0)
    q, k, v, do, ids = st.q, st.k, st.v, st.do, st.ids
    libs = {"hf_flex": st.ours, "torch_flex": st.theirs}

    def fwd(n):
        return lambda: libs[n](q, k, v)

    def fwdbwd(n):
        return bench.fwdbwd_call(libs[n], q, k, v, do)

    errs = bench.agreement(st)  # correctness first: the two libraries agree on out, dq, dk, dv
    if ncu:
        for n in libs:
            for _ in range(3):
                fwdbwd(n)()
        torch.cuda.synchronize()
        return {"case": c.name, "rel_err_vs_torch_flex": errs}

    flops = bench.case_flops(c, bench.allowed_fraction(c, ids))
    row = {"case": c.name, "index": index, "B": c.B, "Hq": c.Hq, "Hkv": c.Hkv, "S": c.S, "D": c.D,
           "rel_err_vs_torch_flex": errs}
    def accumulating(n):  # the bench's timing before the sixth round: .backward() into the leaves' .grad
        qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
        return lambda: libs[n](qs, ks, vs).backward(do)

    for n in libs:
        f_ms, fb_ms = bench._ms(fwd(n)), bench._ms(fwdbwd(n))
        acc_ms = bench._ms(accumulating(n))
        f_gpu, f_host = bench._gpu_and_host_ms(fwd(n))
        fb_gpu, fb_host = bench._gpu_and_host_ms(fwdbwd(n))
        row[n] = {
            "fwd_ms": f_ms, "fwdbwd_ms": fb_ms, "fwdbwd_accumulating_grads_ms": acc_ms,
            "fwd_tflops": flops / (f_ms * 1e-3) / 1e12, "fwdbwd_tflops": 3.5 * flops / (fb_ms * 1e-3) / 1e12,
            "fwd_gpu_ms_back_to_back": f_gpu, "fwd_host_ms": f_host,
            "fwdbwd_gpu_ms_back_to_back": fb_gpu, "fwdbwd_host_ms": fb_host,
            "fwdbwd_kernels_us": _kernel_times(fwdbwd(n)),
        }
    return row


def _print(row: dict) -> None:
    print(f"\n== {row['case']} (B{row['B']} Hq{row['Hq']} Hkv{row['Hkv']} S{row['S']} D{row['D']}); "
          f"rel err vs torch flex {row['rel_err_vs_torch_flex']}")
    print(f"{'':12s} {'fwd ms':>8s} {'f+b ms':>8s} {'+.grad':>8s} {'fwd TF':>7s} {'f+b TF':>7s} | back to back: "
          f"{'fwd GPU':>8s} {'host':>6s} {'f+b GPU':>8s} {'host':>6s}")
    for n in ("hf_flex", "torch_flex"):
        r = row[n]
        print(f"{n:12s} {r['fwd_ms']:8.3f} {r['fwdbwd_ms']:8.3f} {r['fwdbwd_accumulating_grads_ms']:8.3f} "
              f"{r['fwd_tflops']:7.1f} {r['fwdbwd_tflops']:7.1f} | "
              f"{'':13s} {r['fwd_gpu_ms_back_to_back']:8.3f} {r['fwd_host_ms']:6.3f} "
              f"{r['fwdbwd_gpu_ms_back_to_back']:8.3f} {r['fwdbwd_host_ms']:6.3f}")
    for n in ("hf_flex", "torch_flex"):
        print(f"  {n} kernels in one forward+backward (us):")
        for name, us in list(row[n]["fwdbwd_kernels_us"].items())[:8]:
            print(f"    {us:9.1f}  {name}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="4,1", help="indices into hf_flex.bench.ANCHORS")
    ap.add_argument("--ncu", action="store_true", help="no timing: three forward+backward calls per library")
    ap.add_argument("--json", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                    help="set hf_flex.kernels.launch.SCHEDULE[KNOB] to a Python literal first (repeatable)")
    a = ap.parse_args(argv)
    import ast

    from hf_flex.kernels import launch

    for kv in a.set:
        knob, _, value = kv.partition("=")
        if knob not in launch.SCHEDULE:
            raise SystemExit(f"--set: unknown SCHEDULE knob {knob!r} (known: {sorted(launch.SCHEDULE)})")
        launch.SCHEDULE[knob] = ast.literal_eval(value)
    rows = []
    for i in (int(x) for x in a.cases.split(",")):
        row = profile_case(i, a.ncu)
        rows.append(row)
        if not a.ncu:
            _print(row)
    if a.json:
        from hf_flex import bench

        with open(a.json, "w") as f:  # the card and versions with the numbers
            json.dump(dict(bench.versions(), schedule_set=a.set, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
