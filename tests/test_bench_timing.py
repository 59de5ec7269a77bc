"""hf_flex.bench's timed calls, on the CPU (the timings themselves run on the device machine)."""

import torch

from hf_flex import bench
from helpers import rand_qkv


def test_fwdbwd_call_leaves_no_gradients_behind():
    """Repeated forward+backward calls return the gradients and add nothing to .grad: a timed loop of
    .backward() would time three accumulation kernels per call that training never runs."""
    q, k, v = rand_qkv(1, 2, 2, 8, 8, 4, seed=3)
    do = torch.randn(1, 2, 8, 4, generator=torch.Generator().manual_seed(4))
    f = lambda a, b, c: torch.softmax(a @ b.transpose(-1, -2), -1) @ c  # noqa: E731
    call = bench.fwdbwd_call(f, q, k, v, do)
    first, second = call(), call()
    want = torch.autograd.grad(f(q, k, v), (q, k, v), do)
    for a, b, w in zip(first, second, want):
        torch.testing.assert_close(a, w)
        torch.testing.assert_close(b, w)
    assert all(t.grad is None for t in (q, k, v))
