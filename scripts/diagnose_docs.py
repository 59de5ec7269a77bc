"""Where the time of a document-mask case goes, hf_flex against torch's compiled flex_attention (GPU).

    python scripts/diagnose_docs.py [--cases 4,1] [--out DIR]

Per case it prints, for every compiled attention kernel of both libraries, the registers, spills,
shared memory, warps and stages the GPU build reports (torch's Triton sources go to --out, for
scripts/inspect_ir.py-style reading offline), then times two diagnostics on hf_flex's own block mask:

- ``same tables, causal mask``: the document mask's tables walked with the causal mask_mod instead
  of the document one (a wrong result, timed only): what evaluating the document mask costs in the
  partial blocks;
- ``full only``: every listed block walked as full (the partial list emptied into the full one; also
  a wrong result): what the partial-block loop costs beyond the mask itself.

The checked variants (float64 check first) run through scripts/tune_schedule.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hf_flex  # noqa: E402
from hf_flex import bench, mods  # noqa: E402
from hf_flex.block_mask import BlockMask  # noqa: E402
from hf_flex.kernels import launch  # noqa: E402


def _ours_kernels():
    """(name, n_regs, n_spills, shared, num_warps, num_stages) of every compiled hf_flex kernel."""
    from hf_flex.kernels import backward, forward

    rows = []
    for fn in (forward.attn_fwd_kernel, backward.attn_bwd_kernel, backward.attn_bwd_dkdv_kernel,
               backward.attn_bwd_dq_kernel):
        for cache in getattr(fn, "device_caches", {}).values():
            for k in cache[0].values():
                md = k.metadata
                rows.append((fn.__name__, k.n_regs, k.n_spills, md.shared, md.num_warps, md.num_stages))
    return rows


def _torch_kernels(out_dir):
    """The same for torch inductor's flex templates; their sources are written to out_dir."""
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    rows = []
    found = []
    for o in gc.get_objects():
        try:  # gc also returns dead weak proxies, which raise on any use
            if isinstance(o, CachingAutotuner):
                found.append(o)
        except ReferenceError:
            pass
    for o in found:
        name = getattr(o.fn, "__name__", "?")
        if "tem" not in name:  # flex's forward and backward are templates; pointwise kernels are not
            continue
        try:  # the whole generated module: the template's helper functions live beside the kernel
            import inspect

            path = inspect.getfile(o.fn.fn if hasattr(o.fn, "fn") else o.fn)
            if out_dir and os.path.exists(path):
                with open(path) as src, open(os.path.join(out_dir, f"torch_{name}_{len(rows)}.py"), "w") as f:
                    f.write(src.read())
        except (TypeError, OSError):
            pass
        for ln in o.launchers:
            cfg = ln.config
            rows.append((name, ln.n_regs, ln.n_spills, ln.shared, cfg.num_warps, cfg.num_stages,
                         {k: v for k, v in cfg.kwargs.items() if k.startswith("BLOCK")}))
    return rows


def _variant_masks(bm: BlockMask):
    """The diagnostics' block masks: same tables with the causal mask_mod; every block full."""
    t = (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
         bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices)
    kw = dict(seq_lengths=bm.seq_lengths, block_size=bm.BLOCK_SIZE, tail_partial=bm.tail_partial)
    causal_tables = BlockMask(*t, mask_mod=mods.causal(), **kw)

    def merged(num, idx, fnum, fidx):
        # partial blocks first, then full: one list, every block walked as full
        n = idx.shape[-1]
        ar = torch.arange(n, device=idx.device)
        pos = torch.where(ar < num[..., None], ar, n + ar)  # partial slots in front
        fpos = torch.where(ar < fnum[..., None], num[..., None] + ar, 2 * n + ar)
        keys = torch.cat([pos, fpos], -1)
        vals = torch.cat([idx, fidx], -1)
        order = keys.argsort(-1)[..., :n]
        return torch.zeros_like(num), torch.zeros_like(idx), (num + fnum).int(), vals.gather(-1, order).int()

    a = merged(*t[:4])
    b_ = merged(*t[4:])
    full_only = BlockMask(*a, *b_, mask_mod=bm.mask_mod, **kw)
    return causal_tables, full_only


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="4")
    ap.add_argument("--out", default=os.environ.get("OUT", "diag_out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    report = []
    for i in (int(x) for x in args.cases.split(",")):
        c = bench.ANCHORS[i]
        st = bench.setup(c, seed=1)
        sm, ids, bm, tbm, gqa = st.sm, st.ids, st.bm, st.tbm, st.gqa
        q, k, v, do = st.q, st.k, st.v, st.do
        dens = bench.allowed_fraction(c, ids)
        flops = bench.case_flops(c, dens)
        causal_tables, full_only = _variant_masks(bm)

        def timed(f):
            return tuple(round(x, 1) for x in bench.timed_tflops(f, q, k, v, do, flops))

        row = dict(case=c.name, density=round(dens, 4), tflops={})
        row["tflops"]["torch flex"] = timed(st.theirs)
        for name, m in (("hf_flex", bm), ("same tables, causal mask (diagnostic)", causal_tables),
                        ("full only (diagnostic)", full_only)):
            row["tflops"][name] = timed(lambda a, b_, c_, m=m: hf_flex.flex_attention(a, b_, c_, sm, m, enable_gqa=gqa))
        # partial/full block counts per query row, as the forward walks them
        row["partial_per_row"] = round(bm.kv_num_blocks.float().mean().item(), 2)
        row["full_per_row"] = round(bm.full_kv_num_blocks.float().mean().item(), 2)
        row["torch_partial_per_row"] = round(tbm.kv_num_blocks.float().mean().item(), 2)
        row["torch_full_per_row"] = round(tbm.full_kv_num_blocks.float().mean().item(), 2)
        report.append(row)
        torch.cuda.synchronize()

    kern = dict(hf_flex=[list(r) for r in _ours_kernels()], torch=[list(map(str, r)) for r in _torch_kernels(args.out)])
    result = dict(bench.versions(), schedule=dict(launch.SCHEDULE),
                  cases=report, kernels=kern)
    with open(os.path.join(args.out, "diagnose_docs.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("kernels (name, regs, spills, shared, warps, stages[, blocks]):")
    for lib, rows in kern.items():
        for r in rows:
            print(f"  {lib}: {r}")
    print(f"{'case':28s} {'variant':40s} {'fwd':>7s} {'f+b':>7s}")
    for row in report:
        print(f"{row['case']}: partial/full per row hf_flex {row['partial_per_row']}/{row['full_per_row']}, "
              f"torch {row['torch_partial_per_row']}/{row['torch_full_per_row']}")
        for name, (a, b_) in row["tflops"].items():
            print(f"{row['case'][:28]:28s} {name:40s} {a:7.1f} {b_:7.1f}")


if __name__ == "__main__":
    main()
