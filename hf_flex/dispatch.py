"""Where the work runs: Triton kernels on CUDA tensors, or on CPU tensors under Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before ``triton`` is first imported; Triton then turns every
``@triton.jit`` function into an interpreted one, and CPU tensors go through the real kernels (slowly).
Without it, CPU tensors take the PyTorch reference path -- and so they do, with a warning, where the
installed interpreter cannot run the kernels (Triton 3.6's with NumPy >= 2.5: a loaded scalar used as
a loop bound raises there).
"""

import functools
import warnings

import torch
import triton
import triton.language as tl

from .kernels import interpreted


@triton.jit
def _probe_kernel(N, OUT):
    # the kernels' pattern: a count loaded at a program-dependent address bounds a loop
    n = tl.load(N + tl.program_id(0))
    acc = tl.full((), 0, tl.int32)
    for i in range(0, n * 2):
        acc += i
    tl.store(OUT + tl.program_id(0), acc)


@functools.lru_cache(maxsize=None)
def interpreter_runs_kernels() -> bool:
    """Whether Triton's interpreter runs the kernels' constructs here (checked once per process)."""
    try:
        n = torch.tensor([3, 0], dtype=torch.int32)
        out = torch.full((2,), -1, dtype=torch.int32)
        _probe_kernel[(2,)](n, out)
        ok = out.tolist() == [15, 0]
        err = "wrong result"
    except Exception as e:  # the interpreter's own failure, whatever its type
        ok, err = False, f"{type(e).__name__}: {e}"
    if not ok:
        import numpy

        warnings.warn(
            f"hf_flex: Triton's interpreter (triton {triton.__version__}, numpy {numpy.__version__}) cannot run "
            f"hf_flex's kernels ({err}); CPU tensors take the PyTorch reference path instead",
            RuntimeWarning,
            stacklevel=3,
        )
    return ok


def triton_runs_on(device) -> bool:
    """True when hf_flex's Triton kernels can run on tensors of ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreted() and interpreter_runs_kernels()
