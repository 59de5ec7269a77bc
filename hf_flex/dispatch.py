"""Where the work runs: Triton kernels on CUDA tensors, or on CPU tensors under Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before ``triton`` is first imported; Triton then turns every
``@triton.jit`` function into an interpreted one, and CPU tensors go through the real kernels (slowly).
Without it, CPU tensors take the PyTorch reference path.
"""

import torch

from .kernels import interpreted


def triton_runs_on(device) -> bool:
    """True when hf_flex's Triton kernels can run on tensors of ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreted()
