"""Device probe: do Hopper's tensor-memory-accelerator loads take a box whose innermost start is NOT
16-byte aligned? Triton's interpreter refuses such boxes (``block offset start must be 16-byte aligned``),
while cuTensorMapEncodeTiled's documented rules constrain only the base address, the strides and the
box's byte width. The LSE / delta rows of the document backward start at any position, so a bulk
copy of them is usable only if the hardware takes any start; this script says whether it does.

For 1-D descriptors over a flat float32 buffer (any length) and 3-D [B, H, S] ones, boxes of 64 and
128 values at every start in a random sample (and the last ones, which run past the end: zero fill),
loaded one per program and in a pipelined loop (num_stages 3), compared with torch indexing; starts
rounded down to a multiple of 4 (aligned) and not; each form in its own process. Prints a table.

    python scripts/probe_tma_rows.py

Answer on the H100 (driver 580.159.04, Triton 3.6.0; results/h100_probe_tma_rows_2026-11-27q.log):
no. Every form with starts rounded to 16 bytes matched torch (zero fill past the end included); every
form with any start faulted (``illegal instruction``). The interpreter's rule is the hardware's.
"""
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _one(desc, starts, out, BOX: tl.constexpr):
    pid = tl.program_id(0)
    s = tl.load(starts + pid)
    x = desc.load([s])
    tl.store(out + pid * BOX + tl.arange(0, BOX), x)


@triton.jit
def _loop(desc, starts, out, n, BOX: tl.constexpr, STAGES: tl.constexpr):
    # every step's box stored (the loads pipelined ahead of the stores), plus a running sum
    acc = tl.zeros([BOX], dtype=tl.float32)
    for i in tl.range(0, n, num_stages=STAGES):
        s = tl.load(starts + i)
        x = desc.load([s])
        acc += x
        tl.store(out + i * BOX + tl.arange(0, BOX), x)
    tl.store(out + n * BOX + tl.arange(0, BOX), acc)


@triton.jit
def _three(desc, starts, out, H, BOX: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.load(starts + 2 * pid)
    s = tl.load(starts + 2 * pid + 1)
    x = desc.load([bh // H, bh % H, s])
    tl.store(out + pid * BOX + tl.arange(0, BOX), tl.reshape(x, [BOX]))


def _expect(flat, starts, box):
    pad = torch.cat([flat, torch.zeros(box, device=flat.device, dtype=flat.dtype)])
    idx = starts[:, None].long() + torch.arange(box, device=flat.device)[None, :]
    return pad[idx]  # past the end: the pad's zeros (TMA's zero fill)


def _starts(n, box, aligned, dev):
    s = torch.cat([torch.randint(0, n, (997,), device=dev), torch.arange(n - box - 3, n, device=dev)])
    return (s - s % 4 if aligned else s).to(torch.int32)


def run_case(case: str) -> int:
    """One form; returns the number of mismatching values (a fault ends the process)."""
    torch.manual_seed(0)
    dev = "cuda"
    kind, align = case.split("_")
    aligned = align == "aligned"
    bad = 0
    if kind in ("1d", "loop"):
        for n in (12345, 16 * 4096, 65536 + 7):
            flat = torch.randn(n, device=dev, dtype=torch.float32)
            for box in (64, 128):
                starts = _starts(n, box, aligned, dev)
                desc = TensorDescriptor(flat, [n], [1], [box])
                want = _expect(flat, starts, box)
                if kind == "1d":
                    out = torch.empty(starts.numel() * box, device=dev)
                    _one[(starts.numel(),)](desc, starts, out, BOX=box)
                    torch.cuda.synchronize()
                    b = (out != want.reshape(-1)).sum().item()
                else:
                    out = torch.empty((starts.numel() + 1) * box, device=dev)
                    _loop[(1,)](desc, starts, out, starts.numel(), BOX=box, STAGES=3)
                    torch.cuda.synchronize()
                    b = (out[: starts.numel() * box] != want.reshape(-1)).sum().item()
                    b += int((out[starts.numel() * box:] - want.sum(0)).abs().max().item() > 1e-3)
                print(f"  {case} n={n} box={box}: {b} mismatches", flush=True)
                bad += b
    else:
        B, H, S = 2, 3, 4100
        lse = torch.randn(B, H, S, device=dev)
        for box in (64, 128):
            desc = TensorDescriptor(lse, [B, H, S], list(lse.stride()), [1, 1, box])
            bh = torch.randint(0, B * H, (500,), device=dev)
            s = torch.cat([torch.randint(0, S, (480,), device=dev), torch.arange(S - 20, S, device=dev)])
            if aligned:
                s = s - s % 4
            starts = torch.stack([bh, s], 1).to(torch.int32).contiguous()
            out = torch.empty(500 * box, device=dev)
            _three[(500,)](desc, starts, out, H, BOX=box)
            torch.cuda.synchronize()
            pad = torch.cat([lse.reshape(B * H, S), torch.zeros(B * H, box, device=dev)], 1)
            idx = s[:, None] + torch.arange(box, device=dev)[None, :]
            want = pad[bh[:, None], idx]  # past the row's end: the pad's zeros
            b = (out.reshape(500, box) != want).sum().item()
            print(f"  {case} [{B},{H},{S}] box={box}: {b} mismatches", flush=True)
            bad += b
    return bad


CASES = ["1d_aligned", "1d_unaligned", "loop_aligned", "loop_unaligned", "3d_aligned", "3d_unaligned"]


def main():
    import subprocess

    if len(sys.argv) > 1:  # one case, in this process
        sys.exit(1 if run_case(sys.argv[1]) else 0)
    rows = []
    for case in CASES:  # each in its own process: a fault (illegal instruction) ends only its case
        r = subprocess.run([sys.executable, __file__, case], capture_output=True, text=True, timeout=300)
        tail = (r.stdout + r.stderr).strip().splitlines()
        fault = next((ln for ln in tail if "Error" in ln), "")
        print("\n".join(ln for ln in tail if ln.startswith("  ")), flush=True)
        rows.append((case, "ok" if r.returncode == 0 else ("mismatch" if not fault else "FAULT: " + fault[:90])))
    print("\ncase            result")
    for case, res in rows:
        print(f"{case:15s} {res}")


if __name__ == "__main__":
    main()
