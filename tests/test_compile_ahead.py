"""The backward's kernels compiled in the background from the first forward (hf_flex.kernels.compile_ahead).

On the CPU machine nothing is compiled (Triton's interpreter), so the test stands in for the GPU: the
autograd glue is told the kernels compile, every backward kernel is wrapped to record its launches
(which still run, in the interpreter) and its warm-ups (which compile nothing here), and the test holds
the warm-up to what makes it useful: for each kernel it passes what the real launch passes, argument by
argument as Triton specialises them (dtypes, 16-byte alignment, ints ==1 / %16, constexprs, tensor
descriptors' shapes and blocks), so the kernel compiled ahead is the one the backward launches. It also
holds that gradients are unchanged, that a configuration starts one warm-up, and that a failing warm-up
never reaches training.
"""

from __future__ import annotations

import pytest
import torch

import hf_flex
from hf_flex import autograd, mods
from hf_flex.dispatch import triton_runs_on
from hf_flex.kernels import compile_ahead, launch, launch_varlen
from helpers import rand_qkv, random_doc_ids

BACKWARD_KERNELS = ("attn_bwd_delta_kernel", "attn_bwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel")
VARLEN_KERNELS = ("attn_bwd_varlen_kernel",)


class _Recorder:
    """Stands in for a JITFunction: launches run the real one; warm-ups are only recorded."""

    def __init__(self, name, real, log, fail=False):
        self.name, self.real, self.log, self.fail = name, real, log, fail

    def __getitem__(self, grid):
        def launch_(*args, **kwargs):
            self.log.append(("launch", self.name, args, kwargs))
            return self.real[grid](*args, **kwargs)

        return launch_

    def warmup(self, *args, grid, **kwargs):
        if self.fail:
            raise RuntimeError("compiler crashed")
        self.log.append(("warmup", self.name, args, kwargs))


def _spec(x):
    """An argument as Triton specialises it."""
    if isinstance(x, torch.Tensor):
        return ("tensor", x.dtype, tuple(x.stride()), x.data_ptr() % 16 == 0)
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, int):
        return ("int", x == 1, x % 16 == 0, -2**31 <= x < 2**31)
    if isinstance(x, float):
        return "float"
    if isinstance(x, tuple):
        return tuple(_spec(a) for a in x)
    if type(x).__name__ == "TensorDescriptor":
        return ("desc", _spec(x.base), tuple(x.shape), tuple(x.strides), tuple(x.block_shape))
    return x  # constexprs: functions, strings, sizes


@pytest.fixture
def ahead(monkeypatch):
    if not triton_runs_on(torch.device("cpu")):
        pytest.skip("needs Triton's interpreter for the CPU tensors")
    monkeypatch.setattr(autograd, "_compiles", lambda q: True)
    monkeypatch.setattr(compile_ahead, "_seen", set())
    monkeypatch.setattr(compile_ahead, "errors", [])
    monkeypatch.setattr(compile_ahead, "enabled", True)
    log = []
    for module, names in ((launch, BACKWARD_KERNELS), (launch_varlen, VARLEN_KERNELS)):
        for name in names:
            monkeypatch.setattr(module, name, _Recorder(name, getattr(module, name), log))
    return log


def _packed_gqa(seed):
    q, k, v = rand_qkv(1, 4, 2, 96, 96, 16, dtype=torch.float32, seed=seed)
    # Transformers' layout: [B, S, H, D] buffers seen transposed; out takes q's, so dO (the output
    # projection's gradient) comes in out's layout
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    ids = random_doc_ids(1, 96, seed=seed + 1, max_docs=4)
    bm = hf_flex.create_block_mask(mods.and_masks(mods.causal(), mods.document(ids, packed=True)), 1, None, 96, 96,
                                   BLOCK_SIZE=(32, 16))
    return q, k, v, bm


@pytest.mark.parametrize("fused, varlen", [(True, False), (False, False), (True, True)],
                         ids=["fused_bwd", "two_launches", "varlen"])
def test_warmup_compiles_what_the_backward_launches(ahead, fused, varlen, monkeypatch):
    monkeypatch.setitem(launch.SCHEDULE, "fused_bwd", fused)
    monkeypatch.setitem(launch.SCHEDULE, "varlen", varlen)
    q, k, v, bm = _packed_gqa(seed=5)
    out = hf_flex.flex_attention(q, k, v, mods.softcap(4.0), bm, enable_gqa=True)
    dout = torch.randn_like(out.transpose(1, 2).contiguous()).transpose(1, 2)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert compile_ahead.errors == []
    warm = [(n, a, kw) for kind, n, a, kw in ahead if kind == "warmup"]
    launched = [(n, a, kw) for kind, n, a, kw in ahead if kind == "launch"]
    expected = ["attn_bwd_delta_kernel"] + (
        ["attn_bwd_varlen_kernel"] if varlen else ["attn_bwd_kernel"] if fused else ["attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"])
    assert [n for n, _, _ in warm] == expected and [n for n, _, _ in launched] == expected
    for (n, wa, wkw), (_, la, lkw) in zip(warm, launched):
        assert len(wa) == len(la) and set(wkw) == set(lkw), n
        for i, (x, y) in enumerate(zip(wa, la)):
            assert _spec(x) == _spec(y), (n, i, _spec(x), _spec(y))
        for key in lkw:
            assert _spec(wkw[key]) == _spec(lkw[key]), (n, key)
    # the same gradients as without the warm-up
    monkeypatch.setattr(compile_ahead, "enabled", False)
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    out2 = hf_flex.flex_attention(q2, k2, v2, mods.softcap(4.0), bm, enable_gqa=True)
    for g, g2 in zip(grads, torch.autograd.grad(out2, (q2, k2, v2), dout)):
        torch.testing.assert_close(g, g2, rtol=0, atol=0)


def test_one_warmup_per_configuration_and_none_without_gradients(ahead, monkeypatch):
    monkeypatch.setitem(launch.SCHEDULE, "varlen", False)
    q, k, v, bm = _packed_gqa(seed=7)
    for _ in range(2):
        hf_flex.flex_attention(q, k, v, None, bm, enable_gqa=True)
    with torch.no_grad():
        hf_flex.flex_attention(*(t.detach() for t in (q, k, v)), mods.softcap(2.0), bm, enable_gqa=True)
    compile_ahead.wait()
    assert [n for kind, n, _, _ in ahead if kind == "warmup"] == ["attn_bwd_delta_kernel", "attn_bwd_kernel"]


def test_a_failing_warmup_never_reaches_training(ahead, monkeypatch):
    monkeypatch.setattr(launch, "attn_bwd_delta_kernel", _Recorder("delta", launch.attn_bwd_delta_kernel.real, ahead, fail=True))
    q, k, v, bm = _packed_gqa(seed=9)
    out = hf_flex.flex_attention(q, k, v, None, bm, enable_gqa=True)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(torch.isfinite(g).all() for g in grads)
    assert len(compile_ahead.errors) == 1 and "compiler crashed" in str(compile_ahead.errors[0])
