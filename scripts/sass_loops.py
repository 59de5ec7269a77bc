"""Per-loop instruction counts of a kernel's SASS, from its PTX, without a GPU.

    python scripts/sass_loops.py KERNEL.ptx [--ptxas DIR] [--top 12]

Assembles the PTX with ptxas (-arch=sm_90a -O3; the device's Triton wheel ships one under
triton/backends/nvidia/bin), disassembles with nvdisasm, and for every backward branch (a loop: a
BRA to an earlier label) prints the loop body's instruction count, its spill traffic (STL / LDL),
its tensor-core instructions (HGMMA) and its most frequent opcodes. Instruction counts are not
times; they show where a change adds or removes work per step of a loop (tests/benchmarks/NOTES.md,
thirteenth round: the document backward's diagonal loop).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

_LABEL = re.compile(r"^\.(L_x_\d+):")
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def disassemble(ptx: str, bindir: str) -> list[str]:
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        subprocess.run([os.path.join(bindir, "ptxas"), "-arch=sm_90a", "-O3", ptx, "-o", cubin], check=True)
        out = subprocess.run([os.path.join(bindir, "nvdisasm"), "-c", cubin], check=True, capture_output=True, text=True)
    return out.stdout.splitlines()


def parse(lines: list[str]):
    """[(addr, opcode, operands)] and {label: addr}."""
    instrs, labels, pending = [], {}, []
    for line in lines:
        m = _LABEL.match(line.strip())
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.match(line)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            instrs.append((addr, m.group(3), m.group(4)))
    return instrs, labels


def loops(instrs, labels):
    """(start, end) address ranges of backward branches, innermost first by size."""
    out = []
    for addr, op, rest in instrs:
        if op.startswith("BRA"):
            m = re.search(r"(L_x_\d+)", rest)
            if m and labels.get(m.group(1), addr + 1) <= addr:
                out.append((labels[m.group(1)], addr))
    return sorted(set(out), key=lambda r: r[0])


def report(instrs, rng, top: int) -> str:
    body = [op for a, op, _ in instrs if rng[0] <= a <= rng[1]]
    base = collections.Counter(op.split(".")[0] for op in body)
    common = ", ".join(f"{k} {v}" for k, v in base.most_common(top))
    return (f"loop {rng[0]:#07x}-{rng[1]:#07x}: {len(body)} instr, STL {base['STL']}, LDL {base['LDL']}, "
            f"HGMMA {base['HGMMA']}, WARPGROUP {base['WARPGROUP']}\n    {common}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ptx")
    ap.add_argument("--ptxas", default=os.environ.get("PTXAS_DIR", "/tmp/t36/triton/backends/nvidia/bin"),
                    help="folder with ptxas and nvdisasm")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    instrs, labels = parse(disassemble(args.ptx, args.ptxas))
    total = collections.Counter(op.split(".")[0] for _, op, _ in instrs)
    print(f"{os.path.basename(args.ptx)}: {len(instrs)} instr, STL {total['STL']}, LDL {total['LDL']}")
    for rng in loops(instrs, labels):
        print(report(instrs, rng, args.top))


if __name__ == "__main__":
    sys.exit(main())
