"""Triton kernels only: no torch.autograd, no transformers. Launch helpers take and return tensors."""

import triton


@triton.jit
def _probe():
    pass


def interpreted() -> bool:
    """True when Triton's interpreter runs these kernels (TRITON_INTERPRET=1 set before import)."""
    return not isinstance(_probe, triton.runtime.jit.JITFunction) or type(_probe).__name__ == "InterpretedFunction"
