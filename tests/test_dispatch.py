"""Where the work runs: the interpreter probe, and the fallback when the interpreter cannot run the kernels."""

import pytest
import torch

import hf_flex
from hf_flex import dispatch, mods
from hf_flex.kernels import interpreted


def test_probe_passes_where_the_suite_runs_kernels():
    if interpreted():
        assert dispatch.interpreter_runs_kernels()
        assert dispatch.triton_runs_on("cpu")
    assert dispatch.triton_runs_on("cuda")
    assert not dispatch.triton_runs_on("meta")


def test_broken_interpreter_falls_back_to_the_reference(monkeypatch):
    class Broken:
        def __getitem__(self, grid):
            def launch(*args):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return launch

    monkeypatch.setattr(dispatch, "_probe_kernel", Broken())
    monkeypatch.setattr(dispatch, "interpreted", lambda: True)
    dispatch.interpreter_runs_kernels.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="cannot run hf_flex's kernels.*0-dimensional"):
            assert not dispatch.triton_runs_on("cpu")
        # CPU tensors then take the PyTorch reference: still right
        q, k, v = (torch.randn(1, 2, 20, 16, dtype=torch.float64) for _ in range(3))
        bm = hf_flex.create_block_mask(mods.causal(), None, None, 20, 20, device="cpu", BLOCK_SIZE=16)
        out = hf_flex.flex_attention(q, k, v, block_mask=bm)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.testing.assert_close(out, want)
    finally:
        dispatch.interpreter_runs_kernels.cache_clear()
