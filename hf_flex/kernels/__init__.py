"""Triton kernels only: no torch.autograd, no transformers. Launch helpers take and return tensors."""

import triton


@triton.jit
def _probe():
    pass


def interpreted() -> bool:
    """True when Triton's interpreter runs these kernels (TRITON_INTERPRET=1 set before import)."""
    return not isinstance(_probe, triton.runtime.jit.JITFunction) or type(_probe).__name__ == "InterpretedFunction"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host ints. triton.cdiv is a @triton.jit function: called on the host it goes
    through JITFunction.__call__ (~7 us a call, several per attention call)."""
    return -(-a // b)
