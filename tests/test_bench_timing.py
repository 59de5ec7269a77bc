"""hf_flex.bench's timed calls, on the CPU (the timings themselves run on the device machine)."""

import pytest
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


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")  # torch flex's eager form, meant
@pytest.mark.parametrize("kind,param", [("causal", 0), ("doc", 3), ("sliding", 40), ("softcap", 20)])
def test_setup_gives_both_libraries_the_same_case(kind, param):
    """bench.setup (what bench, tune_schedule, diagnose_docs and profile_kernels time) on the CPU, torch
    flex in its eager form: both libraries see the same mask and score mod on the same inputs (GQA,
    a length that does not divide the block). hf_flex runs through Triton's interpreter."""
    c = bench.Case(kind, 2, 4, 2, 200, 16, kind, param)
    st = bench.setup(c, seed=5, device="cpu", dtype=torch.float32, compiled=False)
    assert st.gqa and st.q.shape == (2, 4, 200, 16) and st.k.shape == (2, 2, 200, 16)
    torch.testing.assert_close(st.ours(st.q, st.k, st.v), st.theirs(st.q, st.k, st.v), rtol=2e-5, atol=2e-5)


def test_agreement_passes_matching_libraries_and_fails_a_wrong_one():
    """bench.agreement on the CPU, torch flex replaced by a plain causal attention in torch ops (torch
    flex has no CPU backward): hf_flex agrees with it on the output and all three gradients; a
    stand-in whose values are scaled by 1.05 (the output 5 % off) fails the check."""
    import dataclasses

    c = bench.Case("causal", 1, 4, 2, 96, 16, "causal")
    st = bench.setup(c, seed=7, device="cpu", dtype=torch.float32, compiled=False)

    def plain(q, k, v, score_mod=None, block_mask=None, enable_gqa=False, v_scale=1.0):
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
        s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(s, -1) @ (v * v_scale)

    errs = bench.agreement(dataclasses.replace(st, t_flex=plain))
    assert set(errs) == {"out", "dq", "dk", "dv"} and max(errs.values()) < 1e-4
    with pytest.raises(AssertionError, match="disagrees with torch flex"):
        bench.agreement(dataclasses.replace(st, t_flex=lambda *a, **kw: plain(*a, **kw, v_scale=1.05)))


def test_rotated_times_rotates_the_order_and_keeps_each_calls_readings():
    """bench.rotated_times: each call timed once a round, round r starting at call r mod n; the readings
    come back per call, in round order. median_spread: median and (max - min) / median."""
    order = []
    clock = iter(range(100))

    def fake_ms(fn):
        order.append(fn)
        return float(next(clock))

    times = bench.rotated_times(["a", "b", "c"], 4, time_ms=fake_ms)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert times == [[0.0, 5.0, 7.0, 9.0], [1.0, 3.0, 8.0, 10.0], [2.0, 4.0, 6.0, 11.0]]
    assert bench.median_spread([3.0, 1.0, 2.0]) == (2.0, 1.0)
    assert bench.median_spread([4.0, 1.0, 2.0, 3.0]) == (2.5, 3.0 / 2.5)
    with pytest.raises(ValueError, match="rounds"):
        bench.run_case(bench.ANCHORS[0], rounds=0)
