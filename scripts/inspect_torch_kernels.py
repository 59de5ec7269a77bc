"""Compile torch flex's generated Triton kernels for sm_90 on a machine without a GPU and report what the
compiler did, as scripts/inspect_ir.py does for hf_flex's own kernels.

    python scripts/inspect_torch_kernels.py DIR [--out DIR2]

DIR holds the modules scripts/diagnose_docs.py saved on the device machine (``torch_<kernel>_<n>.py``:
Inductor's whole generated module, the template kernel and its helpers). Each module's Inductor
decorator is dropped (it needs a GPU), the kernel is compiled from its own ``triton_meta`` signature
with the decorator's warps and stages, and for each loop of its TTGIR the script prints which global
loads the software pipeliner made asynchronous, the shared-memory buffers (depth x tile) and ptxas'
registers and spills. Run it under the device machine's Triton (3.6) to read what ran there; the
forward of a document mask compiled this way uses 229 registers, as the device reported.
"""

from __future__ import annotations

import argparse
import ast
import glob
import importlib.util
import os
import re
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import inspect_ir  # noqa: E402

_DECORATOR = re.compile(r"@triton_heuristics\.template\((?P<body>.*?)\n\)\n(?=@triton\.jit)", re.S)


def strip_module(src: str):
    """(source without Inductor's decorator and imports, signature dict, num_warps, num_stages, kernel name)."""
    m = _DECORATOR.search(src)
    if m is None:
        raise ValueError("no @triton_heuristics.template decorator: not an Inductor template module")
    body = m.group("body")
    sig = ast.literal_eval(re.search(r"'signature': (\{[^}]*\})", body).group(1))
    warps = int(re.search(r"num_warps=(\d+)", body).group(1))
    stages = int(re.search(r"num_stages=(\d+)", body).group(1))
    name = re.search(r"'kernel_name': '(\w+)'", body).group(1)
    src = src[: m.start()] + src[m.end():]
    src = "\n".join(ln for ln in src.split("\n") if not ln.startswith("from torch._inductor"))
    return src, sig, warps, stages, name


def compile_module(path: str):
    src, sig, warps, stages, name = strip_module(open(path).read())
    with tempfile.TemporaryDirectory() as d:
        mod_path = os.path.join(d, f"{name}.py")
        open(mod_path, "w").write(src)
        spec = importlib.util.spec_from_file_location(name, mod_path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        fn = getattr(mod, name)
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(sig))}  # as Inductor's triton_meta says
        k = triton.compile(ASTSource(fn, sig, constexprs={}, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps, "num_stages": stages})
    return name, warps, stages, k


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--out", default=None, help="write each kernel's TTGIR and PTX here")
    a = ap.parse_args()
    paths = sorted(glob.glob(os.path.join(a.dir, "torch_*.py")))
    if not paths:
        raise SystemExit(f"no torch_*.py in {a.dir} (scripts/diagnose_docs.py writes them)")
    for path in paths:
        name, warps, stages, k = compile_module(path)
        print(f"{os.path.basename(path)}: {name}, {warps} warps, {stages} stages (triton {triton.__version__}, sm_90)")
        for i, loads in enumerate(inspect_ir.loop_loads(k.asm["ttgir"])):
            print(f"  loop {i}: global loads {loads}")
        bufs = re.findall(r"ttg\.local_alloc[^:]*: \(\) -> !ttg\.memdesc<(\d+(?:x\d+)*x\w+)", k.asm["ttgir"])
        print(f"  shared buffers: {', '.join(sorted(bufs))}")
        print(f"  ptxas: {inspect_ir.ptxas_report(k.asm['ptx'])}")
        if a.out:
            os.makedirs(a.out, exist_ok=True)
            for ext in ("ttgir", "ptx"):
                open(os.path.join(a.out, f"{name}.{ext}"), "w").write(k.asm[ext])


if __name__ == "__main__":
    main()
