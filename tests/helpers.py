"""Shared test utilities: random inputs, the FlashAttention-style tolerance, and a kernel-vs-reference check.

Tolerance (as in FlashAttention's and torch flex_attention's tests): the kernel's max abs error against
an fp64 reference must be at most ``fudge`` times the max abs error that the *same-precision* PyTorch
reference (``hf_flex.reference.attention`` on inputs of the kernel's dtype) has against the same fp64
reference, plus a few ulps of the dtype at the reference's magnitude (so that a lucky, exact
same-precision reference does not demand bit-exactness of the kernel). The fp64 reference runs on the
kernel's inputs cast to float64, so the only difference it sees is arithmetic, not input rounding.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

import hf_flex
from hf_flex import reference


def listed_classes(classes: torch.Tensor, q_len: int, kv_len: int, qb: int, kb: int) -> torch.Tensor:
    """The classes [..., nQ, nKV] a BlockMask's tables list: a full block that reaches past a length
    (the last row when q_len % qb, the last column when kv_len % kb) is partial."""
    nq, nkv = classes.shape[-2:]
    row = torch.arange(nq, device=classes.device) == (nq - 1 if q_len % qb else -1)
    col = torch.arange(nkv, device=classes.device) == (nkv - 1 if kv_len % kb else -1)
    past = row[:, None] | col[None, :]
    return torch.where((classes == 2) & past, torch.ones_like(classes), classes)


def device_only(*values, id=None):
    """A test case of a non-default SCHEDULE knob, run on the device machine only (marked gpu: the CPU
    suite deselects it). Through Triton's interpreter such a case takes up to a minute and a half, and
    CI must stay under 20 minutes: each such test keeps its default schedule's case (and the checks of
    bad knob values) on the CPU, and the device runs every case (scripts/gpu_issue5_bench.sh runs
    tests/test_kernels.py and tests/test_varlen.py before it measures)."""
    import pytest

    return pytest.param(*values, marks=pytest.mark.gpu, id=id)


def rand_qkv(B, Hq, Hkv, Sq, Skv, D, Dv=None, dtype=torch.float32, device="cpu", seed=0):
    """Fresh standard-normal q [B, Hq, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv] (leaves, requires_grad).

    Drawn in float32 on the CPU from a seeded generator (reproducible on any device), then cast.
    """
    Dv = D if Dv is None else Dv
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, Hq, Sq, D), (B, Hkv, Skv, D), (B, Hkv, Skv, Dv))
    out = []
    for shp in shapes:
        t = torch.randn(shp, generator=g, dtype=torch.float32)
        out.append(t.to(device=device, dtype=dtype).requires_grad_())
    return tuple(out)


def randn_like(t: torch.Tensor, seed: int, dtype=None) -> torch.Tensor:
    """A seeded standard-normal tensor shaped like ``t`` (upstream gradients)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=g, dtype=torch.float32).to(device=t.device, dtype=dtype or t.dtype)


def assert_close_to_fp64(name, out, out_lowprec_ref, out_fp64, fudge=2.0, dtype=None):
    """max|out - fp64| <= fudge * max|lowprec_ref - fp64| + atol, atol = 4 ulp(dtype) * max(1, max|fp64|).

    Entries where the fp64 reference is not finite (lse = -inf for a fully masked row) must be equal in
    ``out`` (same infinity); NaN anywhere in ``out`` fails. ``dtype`` is the precision the ulps are taken
    in (default: the low-precision reference's dtype; pass the *input* dtype for float32 outputs such
    as lse).
    """
    dtype = dtype or out_lowprec_ref.dtype
    o = out.detach().double().cpu()
    r = out_fp64.detach().double().cpu()
    lo = out_lowprec_ref.detach().double().cpu()
    assert o.shape == r.shape == lo.shape, f"{name}: shapes differ: kernel {tuple(o.shape)}, ref {tuple(r.shape)}"
    n_nan = int(torch.isnan(o).sum())
    assert n_nan == 0, f"{name}: {n_nan} NaN in the kernel's result"
    assert not torch.isnan(r).any(), f"{name}: NaN in the fp64 reference (test setup error)"
    nonfin = ~torch.isfinite(r)
    if nonfin.any():
        bad = int((o[nonfin] != r[nonfin]).sum())
        assert bad == 0, f"{name}: {bad} entries where the fp64 reference is +-inf differ in the kernel's result"
    fin = ~nonfin
    n_inf = int((~torch.isfinite(o[fin])).sum())
    assert n_inf == 0, f"{name}: {n_inf} non-finite entries in the kernel's result where the reference is finite"
    if not fin.any():
        return
    # a non-finite baseline would make the bound infinite and the check vacuous
    assert torch.isfinite(lo[fin]).all(), f"{name}: the same-precision reference is not finite (test setup error)"
    err = (o - r)[fin].abs().max().item()
    lo_err = (lo - r)[fin].abs().max().item()
    ref_max = r[fin].abs().max().item()
    atol = 4 * torch.finfo(dtype).eps * max(1.0, ref_max)
    bound = fudge * lo_err + atol
    assert err <= bound, (
        f"{name}: kernel max abs err {err:.3e} > {fudge} * same-precision reference err {lo_err:.3e} "
        f"+ atol {atol:.3e} (= {bound:.3e}); max|ref| {ref_max:.3e}, dtype {dtype}"
    )


def allowed_mask(block_mask: Optional["hf_flex.BlockMask"], B, Hq, Sq, Skv) -> torch.Tensor:
    """Element-level mask [B, Hq, Sq, Skv] with the reference's broadcast rule (a 1 in the block mask's
    [Bm, Hm] means the mask_mod sees index 0 there)."""
    if block_mask is None:
        return torch.ones((B, Hq, Sq, Skv), dtype=torch.bool)
    Bm, Hm = block_mask.shape[:2]
    m = reference.dense_mask(
        block_mask.mask_mod, 1 if Bm == 1 else B, 1 if Hm == 1 else Hq, Sq, Skv, device=block_mask.device
    )
    return m.cpu().expand(B, Hq, Sq, Skv)


def _detach_like(t, dtype):
    return t.detach().to(dtype).clone().requires_grad_(t.requires_grad)


def check_attention(
    q,
    k,
    v,
    score_mod=None,
    block_mask=None,
    *,
    scale=None,
    enable_gqa=False,
    params: Sequence[torch.Tensor] = (),
    use_dout=True,
    use_dlse=True,
    backward=True,
    fudge=2.0,
    grad_fudge=3.0,
    seed=1234,
):
    """Run hf_flex.flex_attention (forward with return_lse=True, and backward) and compare with the
    reference at the same precision and in float64.

    ``params`` are learnable tensors read by ``score_mod`` (relative-bias table, ALiBi slopes, sink
    logits); the kernel and the same-precision reference read them as they are, the fp64 reference
    reads float64 copies (so its parameter gradients are accumulated in float64 too). The upstream gradient is random for ``out``
    (``use_dout``) and for ``lse`` (``use_dlse``); at least one must be used when ``backward``.

    Also checks: dtypes and shapes; every element of out / grads finite; rows with no allowed key give
    out exactly 0 and lse -inf (or the sink logit with sinks). Returns a dict of the kernel's results
    and the number of fully masked rows.
    """
    dtype = q.dtype
    B, Hq, Sq, D = q.shape
    Skv, Dv = k.shape[2], v.shape[3]
    kw = dict(scale=scale, enable_gqa=enable_gqa, return_lse=True)
    out, lse = hf_flex.flex_attention(q, k, v, score_mod, block_mask, **kw)
    assert out.shape == (B, Hq, Sq, Dv) and out.dtype == dtype, (out.shape, out.dtype)
    assert lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32, (lse.shape, lse.dtype)
    assert out.device == q.device and lse.device == q.device

    # expected fully masked rows, from the dense mask (independent of the kernels)
    allowed = allowed_mask(block_mask, B, Hq, Sq, Skv)
    empty = ~allowed.any(-1)
    sink = score_mod.sink if score_mod is not None else None
    o_cpu, l_cpu = out.detach().float().cpu(), lse.detach().cpu()
    assert torch.isfinite(o_cpu).all(), f"out: {int((~torch.isfinite(o_cpu)).sum())} non-finite entries"
    if empty.any():
        assert (o_cpu[empty] == 0).all(), "out: a fully masked row is not exactly 0"
        if sink is None:
            assert torch.isneginf(l_cpu[empty]).all(), "lse: a fully masked row is not -inf"
        else:
            s = sink.detach().float().cpu().view(1, Hq, 1).expand(B, Hq, Sq)
            torch.testing.assert_close(l_cpu[empty], s[empty], rtol=0, atol=1e-6)
    assert torch.isfinite(l_cpu[~empty]).all(), "lse: non-finite entry in a row with allowed keys"

    mm = block_mask.mask_mod if block_mask is not None else None
    bh = block_mask.shape[:2] if block_mask is not None else (0, 0)
    rkw = dict(scale=scale, enable_gqa=enable_gqa, return_lse=True, mask_bh=bh)

    params = tuple(params)
    # the fp64 run reads float64 copies of the learnable tensors: with float32 ones, autograd would
    # accumulate their gradient (an index / sum backward) in float32
    sm_hi, params_hi = _with_params_in(score_mod, params, torch.float64)

    def ref(dt, sm):
        ins = tuple(_detach_like(t, dt) for t in (q, k, v))
        return ins, reference.attention(*ins, sm, mm, **rkw)

    lo_in, (lo_out, lo_lse) = ref(dtype, score_mod)
    hi_in, (hi_out, hi_lse) = ref(torch.float64, sm_hi)
    assert_close_to_fp64("out", out, lo_out, hi_out, fudge)
    assert_close_to_fp64("lse", lse, lo_lse, hi_lse, fudge, dtype=dtype)
    result = dict(out=out, lse=lse, n_empty=int(empty.sum()), empty=empty)
    if not backward:
        return result

    assert use_dout or use_dlse
    dout = randn_like(out, seed) if use_dout else None
    dlse = randn_like(lse, seed + 1) if use_dlse else None

    def grads(o, l, inputs):
        outs, gos = [], []
        if dout is not None:
            outs.append(o)
            gos.append(dout.to(o.dtype))
        if dlse is not None:
            outs.append(l)
            gos.append(dlse)
        return torch.autograd.grad(outs, inputs, gos, allow_unused=True)

    g_k = grads(out, lse, (q, k, v) + params)
    g_lo = grads(lo_out, lo_lse, tuple(lo_in) + params)
    g_hi = grads(hi_out, hi_lse, tuple(hi_in) + params_hi)
    names = ["dq", "dk", "dv"] + [f"d{getattr(p, '_test_name', 'param')}" for p in params]
    inputs_shape = dict(zip(names, (t.shape for t in (q, k, v) + params)))
    for nm, a, lo, hi in zip(names, g_k, g_lo, g_hi):
        if hi is None:  # e.g. dv for a loss on lse alone: the true gradient is zero
            assert lo is None, f"{nm}: the references disagree on whether a gradient exists (test setup error)"
            hi = torch.zeros(inputs_shape[nm], dtype=torch.float64, device=q.device)
            lo = hi
        assert a is not None, f"{nm}: the kernel path gave no gradient"
        assert a.shape == hi.shape, (nm, a.shape, hi.shape)
        assert torch.isfinite(a.detach().float().cpu()).all(), f"{nm}: non-finite entries in the kernel's gradient"
        assert_close_to_fp64(nm, a, lo, hi, grad_fudge, dtype=dtype)
    result.update(grads=dict(zip(names, g_k)))
    return result


def _with_params_in(score_mod, params, dtype):
    """(score_mod with each tensor of ``params`` replaced by a ``dtype`` leaf copy, the copies)."""
    if score_mod is None or not params:
        return score_mod, ()
    copies = {id(p): p.detach().to(dtype).requires_grad_() for p in params}
    swap = lambda a: copies.get(id(a), a) if isinstance(a, torch.Tensor) else a  # noqa: E731
    changes = dict(args=tuple(swap(a) for a in score_mod.args))
    if score_mod.sink is not None:
        changes["sink"] = swap(score_mod.sink)
    used = {id(a) for a in changes["args"]} | {id(changes.get("sink"))}
    assert all(id(c) in used for c in copies.values()), "a param is not read by the score_mod (test setup error)"
    return dataclasses.replace(score_mod, **changes), tuple(copies[id(p)] for p in params)


def named(t: torch.Tensor, name: str) -> torch.Tensor:
    """Tag a learnable tensor with a name for assertion messages."""
    t._test_name = name
    return t


def make_param(shape, seed, scale=1.0, device="cpu", name="param"):
    """A learnable float32 leaf tensor (random normal * scale)."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g) * scale).to(device).requires_grad_()
    return named(t, name)


def random_doc_ids(B, S, seed, max_docs=5, same_rows=False):
    """[B, S] int32 document ids: each row cut into 1..max_docs documents of random lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(B):
        if same_rows and rows:
            rows.append(rows[0].clone())
            continue
        n = int(torch.randint(1, max_docs + 1, (1,), generator=g))
        cuts = torch.randperm(max(S - 1, 1), generator=g)[: n - 1] + 1 if S > 1 else torch.tensor([], dtype=torch.long)
        ids = torch.zeros(S, dtype=torch.int32)
        for c in sorted(cuts.tolist()):
            ids[c:] += 1
        rows.append(ids)
    return torch.stack(rows)


def run_bounded(cmd, timeout: float, **kw):
    """subprocess.run(cmd, capture_output=True, text=True) in a session of its own, so that on timeout
    the whole process group (a launcher's workers too, not just the launcher) is killed and the test
    fails with what the command printed, instead of leaving orphans or waiting on their pipes."""
    import os
    import signal
    import subprocess

    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"{cmd[:4]}... still running after {timeout:.0f} s (killed)\n--- stdout\n"
                             f"{(out or '')[-3000:]}\n--- stderr\n{(err or '')[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


class LaunchSpy:
    """Stands in for a Triton kernel where a launcher module looks it up (monkeypatch it there): records
    each launch's grid and keyword arguments, then launches the kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids, self.calls = kernel, [], []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grids.append(grid)
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


def poison_row_buffers(monkeypatch, *modules) -> list:
    """Make launch.row_buffer (in launch and in ``modules``, which import it by name) hand out memory
    whose every byte is 0xFF (a float32 NaN), slack included, so that anything a kernel reads without
    having written it carries NaN into its results unless it is masked or selected away. Returns the
    allocations made (uint8 views of their storage)."""
    from hf_flex.kernels import launch

    made = []
    real = launch.row_buffer

    def rows(*args):
        t = real(*args)
        raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
        made.append(raw.fill_(255))
        return t

    for m in (launch, *modules):
        monkeypatch.setattr(m, "row_buffer", rows)
    return made


def assert_no_worse_than(names, ours, theirs, refs, dtypes, fudge: float = 1.5):
    """Each of ``ours`` (a kernel path's outputs) against its float64 reference in ``refs``: finite, and a
    max abs error at most ``fudge`` times that of ``theirs`` (the same outputs by the path it replaces,
    on the same inputs) plus 2 ulp of its dtype at the reference's scale."""
    for name, a, b, r, dt in zip(names, ours, theirs, refs, dtypes):
        assert torch.isfinite(a).all(), name
        e_ours, e_theirs = ((x.double() - r).abs().max().item() for x in (a, b))
        atol = 2 * torch.finfo(dt).eps * max(1.0, r.abs().max().item())
        assert e_ours <= fudge * e_theirs + atol, f"{name}: {e_ours:.3e} against {e_theirs:.3e} on the path it replaces"


def assert_same_training_either_way(monkeypatch, knob: str, q, k, v, do, block_mask, rtol=2e-2, atol=2e-2):
    """The gradients of hf_flex.flex_attention(q, k, v) (GQA allowed) against ``do`` with
    SCHEDULE[knob] on equal, within bf16 rounding, those with it off."""
    from hf_flex.kernels import launch

    grads = []
    for on in (True, False):
        monkeypatch.setitem(launch.SCHEDULE, knob, on)
        leaves = tuple(t.detach().requires_grad_() for t in (q, k, v))
        out = hf_flex.flex_attention(*leaves, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
        grads.append(torch.autograd.grad(out, leaves, do))
    for a, b in zip(*grads):
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)
