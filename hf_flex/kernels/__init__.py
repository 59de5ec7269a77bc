"""Triton kernels only: no torch.autograd, no transformers. Launch helpers take and return tensors."""

import functools

import torch
import triton


@triton.jit
def _probe():
    pass


def interpreted() -> bool:
    """True when Triton's interpreter runs these kernels (TRITON_INTERPRET=1 set before import)."""
    return not isinstance(_probe, triton.runtime.jit.JITFunction) or type(_probe).__name__ == "InterpretedFunction"


def launcher(warmup: bool):
    """kernel, grid -> what launches it (kernel[grid]), or with ``warmup`` what compiles its variant for
    those arguments and launches nothing (JITFunction.warmup; kernels.compile_ahead runs warm-ups while
    the forward runs). Triton and Gluon kernels alike."""
    def go(kernel, grid):
        return functools.partial(kernel.warmup, grid=grid) if warmup else kernel[grid]
    return go


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host ints. triton.cdiv is a @triton.jit function: called on the host it goes
    through JITFunction.__call__ (~7 us a call, several per attention call)."""
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _cuda_major(index: int) -> int:
    """The compute capability's major number of CUDA device ``index``: asked by every launch (a few per
    layer), and the answer never changes for a device."""
    return torch.cuda.get_device_capability(index)[0]


def cuda_index(device: torch.device) -> int:
    """The index of a CUDA device (a device without one means the current one)."""
    return device.index if device.index is not None else torch.cuda.current_device()
