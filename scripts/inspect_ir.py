"""Compile hf_flex's attention kernels for sm_90 on a machine without a GPU and report what the compiler did.

    python scripts/inspect_ir.py [--D 64] [--S 1000] [--backward] [--schedule one_variant=1,fused_bwd=0] [--out DIR]

Triton's compiler needs no GPU, only a target: a stand-in driver answers "sm_90" and every launch
becomes a compile-only warmup. Per kernel variant it prints, for each loop of the TTGIR, which global
loads the software pipeliner turned into asynchronous copies and which stayed synchronous (a
synchronous load in the loop is a global-memory round trip per iteration), and the registers and
spills ptxas reports (registers decide how many programs share an SM: 128 per thread at 8 warps
allow two, more allow one). The TTGIR and PTX go to --out.

To read what the device machine compiles, run it under that machine's Triton (3.6: pip install the
wheel into a folder put first on PYTHONPATH). Found this way (tests/benchmarks/NOTES.md): the variant
that checked keys past the end in full blocks kept the block-index load synchronous there (since
fixed: full blocks never check, BlockMask.tail_partial); at D=64 that variant needed 131 registers,
one program per SM (since capped, Tiles.maxnreg). The sync/async labels are not a cost model: a
synchronous load of an index cached in L1 measured faster than the asynchronous copy that replaced it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import jit
from triton.runtime.driver import driver

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _CompileOnlyDriver:
    """Enough of Triton's driver interface for JITFunction.run(warmup=True) without a GPU."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


def _compile_only():
    driver.set_active(_CompileOnlyDriver())
    compiled = {}
    run = jit.JITFunction.run

    def warmup_run(self, *args, grid, warmup, **kwargs):
        k = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.setdefault(self.fn.__name__, []).append(k)
        return k

    jit.JITFunction.run = warmup_run
    return compiled


def loop_loads(ttgir: str):
    """Per scf.for in the TTGIR: the global loads in its body, "async" or "sync"."""
    out, depth, cur = [], 0, []
    for ln in ttgir.split("\n"):
        if depth == 0 and "scf.for" in ln:
            depth, cur = 1, []
            continue
        if depth:
            depth += ln.count("{") - ln.count("}")
            if "async_copy_global_to_local" in ln:
                cur.append("async")
            elif re.search(r"= tt\.load ", ln):
                cur.append("sync")
            if depth <= 0:
                out.append(cur)
                depth = 0
    return out


def write_ptx(compiled: dict, out: str) -> None:
    """Each kernel _compile_only caught ({name: [compiled kernel, ...]}) as OUT/name_i.ptx, with its
    ptxas register and spill report printed."""
    os.makedirs(out, exist_ok=True)
    for name, ks in compiled.items():
        for i, kern in enumerate(ks):
            path = os.path.join(out, f"{name}_{i}.ptx")
            with open(path, "w") as f:
                f.write(kern.asm["ptx"])
            print(f"{name}[{i}]: {path}  ptxas: {ptxas_report(kern.asm['ptx'])}")


def ptxas_report(ptx: str) -> str:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        # the bundled ptxas may be older than the PTX version Triton writes; the kernels use nothing newer
        open(src, "w").write(re.sub(r"^\.version \d+\.\d+", ".version 8.7", ptx, flags=re.M))
        p = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    found = re.findall(r"Used \d+ registers|\d+ bytes spill (?:stores|loads)", p.stdout + p.stderr)
    return ", ".join(found) or (p.stdout + p.stderr).strip()[:200]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--S", type=int, default=1024, help="a multiple of 128 gives the divisible variant")
    ap.add_argument("--schedule", default="", help="comma-separated knob=value for launch.SCHEDULE (0/1 for on/off knobs)")
    ap.add_argument("--out", default="ir_out")
    ap.add_argument("--backward", action="store_true", help="also the backward kernel(s)")
    ap.add_argument("--mask", default="causal", choices=["causal", "document", "softcap"],
                    help="causal; document: 4 packed documents + causal; softcap: causal with softcap(50)")
    ap.add_argument("--tiles", action="append", default=[],
                    help="PASS=block_m,block_n,warps,stages[,block_n_full] for launch.OVERRIDES (fwd, dkdv, dq)")
    ap.add_argument("--varlen", action="store_true", help="with --mask document: the document-aligned kernels")
    a = ap.parse_args()
    if a.varlen and a.mask != "document":
        raise SystemExit("--varlen needs --mask document")
    compiled = _compile_only()

    import hf_flex
    from hf_flex import mods
    from hf_flex.kernels import launch

    defaults = dict(launch.SCHEDULE)
    for kv in filter(None, a.schedule.split(",")):
        k, v = kv.split("=")
        if k not in launch.SCHEDULE:
            raise SystemExit(f"--schedule: unknown knob {k!r} (known: {sorted(launch.SCHEDULE)})")
        # boolean knobs take 0/1, integer ones a number or true/false (bwd_dp_first), the others their
        # value (index_ahead=full)
        old = launch.SCHEDULE[k]
        if isinstance(old, bool):
            launch.SCHEDULE[k] = bool(int(v))
        elif isinstance(old, int):
            launch.SCHEDULE[k] = v.lower() == "true" if v.lower() in ("true", "false") else int(v)
        else:
            launch.SCHEDULE[k] = v
    launch.has_tma = lambda device: True  # the stand-in target is sm_90 (SCHEDULE["tma"] still decides)
    for spec in a.tiles:
        name, vals = spec.split("=")
        launch.OVERRIDES[name] = launch.Tiles(*(int(x) for x in vals.split(",")))
    q = torch.empty(1, 2, a.S, a.D, dtype=torch.bfloat16)
    mask = mods.causal()
    if a.mask == "document":
        ids = (torch.arange(a.S) * 4 // a.S)[None].to(torch.int32)
        mask = mods.and_masks(mods.document(ids), mask)
    bm = hf_flex.create_block_mask(mask, None, None, a.S, a.S, device="cpu")
    tables = launch.MaskTables.of(bm)
    mm = bm.mask_mod
    sm_fn, sm_args, sm_grad = None, (), None
    if a.mask == "softcap":
        sm = mods.softcap(50.0)
        sm_fn, sm_args, sm_grad = sm.kernel_fn, sm.args, sm.kernel_grad_fn
    if a.varlen:  # the document-aligned kernels (kernels/varlen.py) on the same documents
        from hf_flex.kernels import launch_varlen

        spans = mods.document_spans(ids)
        tile = launch_varlen.varlen_tile(a.D, a.D, 2)
        tiles, n_tiles = launch_varlen.varlen_tiles(spans, tile)
        launch_varlen.varlen_forward(q, q, q, tiles, n_tiles, spans, tile, sm_fn, sm_args, None, 0.125)
        if a.backward:
            lse = torch.empty(1, 2, a.S)
            # a compile-ahead (warmup) call, or a launch (one that compiles only here) where the
            # backward adds dQ with atomics, whose compile-ahead is skipped
            launch_varlen.varlen_backward(q, q, q, q, lse, q, tiles, n_tiles, spans, tile, sm_fn, sm_args, sm_grad,
                                          None, (), 0.125, warmup=not launch.SCHEDULE["varlen_atomic_dq"])
    else:
        launch.flex_forward(q, q, q, tables, bm.BLOCK_SIZE, mm.kernel_fn, mm.args, sm_fn, sm_args, None, 0.125)
    if a.backward and not a.varlen:
        bwd = launch.MaskTables.of(bm, transposed=True)
        lse = torch.empty(1, 2, a.S)
        try:  # the launches only compile here; the delta folding after them reads garbage, harmlessly
            launch.flex_backward(q, q, q, q, lse, q, tables, bwd, bm.BLOCK_SIZE, mm.kernel_fn, mm.args,
                                 sm_fn, sm_args, sm_grad, None, (), 0.125, mask_fn_by_key=mm.kernel_fn_by_key)
        except Exception as e:  # noqa: BLE001 (compile-only driver: anything after the launches may fail)
            print(f"(after the backward launches: {type(e).__name__})")
    os.makedirs(a.out, exist_ok=True)
    # the knobs set away from their defaults (all of them would make too long a file name)
    sched = "".join(f"_{k}{int(v) if isinstance(v, bool) else v}" for k, v in sorted(launch.SCHEDULE.items())
                    if v != defaults[k]) or "_default"
    print(f"{a.mask} D={a.D} S={a.S} schedule{sched} (triton {triton.__version__}, sm_90)")
    for name, kernels in compiled.items():
        if not name.startswith("attn_") or name == "attn_bwd_delta_kernel":
            continue
        kern = kernels[-1]
        tag = f"{name}_D{a.D}_S{a.S}{sched}"
        for ext in ("ttgir", "ptx"):
            open(os.path.join(a.out, f"{tag}.{ext}"), "w").write(kern.asm[ext])
        print(f"{name}:")
        for i, loads in enumerate(loop_loads(kern.asm["ttgir"])):
            print(f"  loop {i}: global loads {loads}")
        print(f"  ptxas: {ptxas_report(kern.asm['ptx'])}")


if __name__ == "__main__":
    main()
