"""Kernel benchmark: hf_flex vs torch's compiled flex_attention vs SDPA on the anchor cases.

    python -m hf_flex.bench [--quick] [--rounds 3] [--json out.json] [--no-sdpa]
    python -m hf_flex.bench --e2e [--e2e-S 4096,16384] [--e2e-steps 10] [--e2e-timeout 300]  # + end to end
    python -m hf_flex.bench --e2e-only [...]     # end to end and recompiles only (hf_flex.bench_e2e)
    python -m hf_flex.bench --tiny [--json ...]  # CPU self-check of the e2e path (Triton interpreter)

The JSON (issue 5's schema): {"device", "torch", "triton", "transformers", "date", "kernel": [...],
"e2e": [...], "recompiles_over_50_lengths", ...}; it is rewritten after every kernel case and e2e
row, so a run cut short still leaves what it measured. The end-to-end part is described in
hf_flex/bench_e2e.py.

Each case first checks correctness (hf_flex against torch flex on the whole output, then both against
a float64 reference on one slice: hf_flex's out/dq/dk/dv errors must stay within 2x torch flex's
plus 1e-3), then times forward and forward+backward with triton's do_bench
(median), ``--rounds`` times (default 3: hf_flex, torch flex and SDPA in turn, the order rotated each
round; the median over rounds, with its spread), then the block-mask build. TFLOP/s are over the unmasked FLOPs:
4 * B * Hq * Sq * Skv * D * density forward, x3.5 for forward+backward.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from dataclasses import dataclass

import torch

import hf_flex
from hf_flex import mods


@dataclass
class Case:
    name: str
    B: int
    Hq: int
    Hkv: int
    S: int
    D: int
    kind: str  # causal | doc | sliding | softcap
    param: int = 0


ANCHORS = [
    Case("causal", 8, 16, 16, 2048, 128, "causal"),
    Case("causal", 2, 16, 16, 8192, 128, "causal"),
    Case("causal", 2, 32, 32, 8192, 64, "causal"),
    Case("causal, GQA", 1, 32, 8, 16384, 128, "causal"),
    Case("12 docs + causal", 2, 16, 16, 8192, 128, "doc", 12),
    Case("24 docs + causal, GQA", 1, 32, 8, 16384, 128, "doc", 24),
    Case("sliding 1024 + causal", 2, 16, 16, 8192, 128, "sliding", 1024),
    Case("softcap 50 + causal", 2, 16, 16, 8192, 128, "softcap", 50),
]
QUICK = [ANCHORS[1], ANCHORS[4], ANCHORS[6], ANCHORS[7]]


def doc_ids(B, S, n_docs, seed=0, device="cuda"):
    """Random cut points, uniform: [B, S] int32 document ids on ``device``."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        cuts = torch.sort(torch.randperm(S - 1, generator=g)[: n_docs - 1] + 1).values
        r = torch.zeros(S, dtype=torch.int32)
        r[cuts] = 1
        rows.append(torch.cumsum(r, 0))
    return torch.stack(rows).to(device=device, dtype=torch.int32)


def allowed_fraction(c: Case, ids=None) -> float:
    S = c.S
    if c.kind in ("causal", "softcap"):
        return (S + 1) / (2 * S)
    if c.kind == "sliding":
        q = torch.arange(S, dtype=torch.float64)
        return torch.minimum(q + 1, torch.full_like(q, c.param)).sum().item() / (S * S)
    if c.kind == "doc":
        tot = 0.0
        for row in ids.cpu():
            lens = torch.bincount(row.long()).double()
            tot += (lens * (lens + 1) / 2).sum().item()
        return tot / (ids.shape[0] * S * S)
    raise ValueError(c.kind)


def build(c: Case, device="cuda"):
    """(our mask_mod, our score_mod, Bm, torch mask_mod, torch score_mod, sdpa kwargs or None, ids)."""
    ids = None
    if c.kind == "causal":
        return mods.causal(), None, None, (lambda b, h, q, kv: kv <= q), None, {"is_causal": True}, None
    if c.kind == "softcap":
        cap = float(c.param)
        return (
            mods.causal(),
            mods.softcap(cap),
            None,
            (lambda b, h, q, kv: kv <= q),
            (lambda s, b, h, q, kv: cap * torch.tanh(s / cap)),
            None,
            None,
        )
    if c.kind == "sliding":
        w = c.param
        return (
            mods.and_masks(mods.causal(), mods.sliding_window(w)),
            None,
            None,
            (lambda b, h, q, kv: (kv <= q) & (q - kv < w)),
            None,
            "dense",
            None,
        )
    if c.kind == "doc":
        ids = doc_ids(c.B, c.S, c.param, device=device)
        return (
            mods.and_masks(mods.causal(), mods.document(ids)),
            None,
            c.B,
            (lambda b, h, q, kv: (kv <= q) & (ids[b, q] == ids[b, kv])),
            None,
            "dense",
            ids,
        )
    raise ValueError(c.kind)


def reference_score_fn(c: Case):
    """The case's score mod on float64 scores (softcap), or None."""
    return (lambda s: c.param * torch.tanh(s / c.param)) if c.kind == "softcap" else None


def reference_slice(q, k, v, do, dense, sm_fn, b, hk, group):
    """float64 output and dq of the query heads of key head hk in batch b, and that key head's dk/dv
    (summed over those query heads, as GQA's gradient is)."""
    heads = slice(hk * group, (hk + 1) * group)
    qs = q[b, heads].double().detach().requires_grad_()
    ks, vs = (t[b, hk].double().detach().requires_grad_() for t in (k, v))
    s = qs @ ks.T / qs.shape[-1] ** 0.5
    if sm_fn is not None:
        s = sm_fn(s)
    s = s.masked_fill(~dense, float("-inf"))
    o = torch.softmax(s, -1) @ vs
    dq, dk, dv = torch.autograd.grad(o, (qs, ks, vs), do[b, heads].double())
    return o, dq, dk, dv


def slice_errors(f, q, k, v, do, ref, b, hk, group):
    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
    o = f(qs, ks, vs)
    g = torch.autograd.grad(o, (qs, ks, vs), do)
    heads = slice(hk * group, (hk + 1) * group)
    got = (o[b, heads], g[0][b, heads], g[1][b, hk], g[2][b, hk])
    return [((a.double() - r).norm() / r.norm()).item() for a, r in zip(got, ref)]


def _ms(fn, rep=100):
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def case_flops(c: Case, density: float) -> float:
    """Unmasked forward FLOPs of a case: 4 B Hq S^2 D times the allowed fraction (QK^T and PV)."""
    return 4 * c.B * c.Hq * c.S * c.S * c.D * density


def fwdbwd_call(f, q, k, v, do):
    """A call of ``f`` forward and backward on leaves made from q, k, v, returning (dq, dk, dv).

    torch.autograd.grad rather than .backward(): repeated calls must not add each call's gradients into
    the leaves' .grad (three elementwise kernels per call that training, whose q, k, v are not leaves,
    never runs; 0.1-0.2 ms, over 10 % of a document-mask case's forward+backward)."""
    leaves = tuple(t.detach().requires_grad_() for t in (q, k, v))
    return lambda: torch.autograd.grad(f(*leaves), leaves, do)


def timed_tflops(f, q, k, v, do, flops: float):
    """(forward, forward+backward) TFLOP/s of an attention ``f(q, k, v)`` over ``flops`` (forward+backward
    counted 3.5x: two matmuls forward, five backward), each the median of triton's do_bench."""
    fwd_ms = _ms(lambda: f(q, k, v))
    fwdbwd_ms = _ms(fwdbwd_call(f, q, k, v, do))
    return flops / (fwd_ms * 1e-3) / 1e12, 3.5 * flops / (fwdbwd_ms * 1e-3) / 1e12


def random_inputs(c: Case, seed: int, device="cuda", dtype=torch.bfloat16):
    """q [B, Hq, S, D], k and v [B, Hkv, S, D] and an upstream gradient like q (bf16, on CUDA)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(c.B, c.Hq, c.S, c.D, device=device, dtype=dtype, generator=g)
    k = torch.randn(c.B, c.Hkv, c.S, c.D, device=device, dtype=dtype, generator=g)
    v = torch.randn(c.B, c.Hkv, c.S, c.D, device=device, dtype=dtype, generator=g)
    return q, k, v, torch.randn_like(q)


@dataclass
class Setup:
    """One case made ready for both libraries: its mods (:func:`build`), random inputs, hf_flex's
    block mask and torch's; ``ours(q, k, v)`` / ``theirs(q, k, v)`` run hf_flex and torch flex on them."""

    case: Case
    mm: object
    sm: object
    Bm: object
    t_mask: object
    t_score: object
    sdpa_kw: object
    ids: object
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    do: torch.Tensor
    bm: object
    tbm: object
    t_flex: object

    @property
    def gqa(self) -> bool:
        return self.case.Hq != self.case.Hkv

    def ours(self, q, k, v):
        return hf_flex.flex_attention(q, k, v, self.sm, self.bm, enable_gqa=self.gqa)

    def theirs(self, q, k, v):
        return self.t_flex(q, k, v, score_mod=self.t_score, block_mask=self.tbm, enable_gqa=self.gqa)


def setup(c: Case, seed: int = 0, device="cuda", dtype=torch.bfloat16, compiled: bool = True) -> Setup:
    """:class:`Setup` of case ``c``: torch flex compiled (``dynamic=False``, dynamo's recompile limit
    raised so that a run of many cases never falls back to the unfused path) unless ``compiled`` is False
    (its eager form, for CPU tests)."""
    from torch.nn.attention.flex_attention import create_block_mask as t_cbm
    from torch.nn.attention.flex_attention import flex_attention as t_flex

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    mm, sm, Bm, t_mask, t_score, sdpa_kw, ids = build(c, device)
    q, k, v, do = random_inputs(c, seed, device, dtype)
    bm = hf_flex.create_block_mask(mm, Bm, None, c.S, c.S, device=device)
    tbm = t_cbm(t_mask, Bm, None, c.S, c.S, device=device)
    return Setup(c, mm, sm, Bm, t_mask, t_score, sdpa_kw, ids, q, k, v, do, bm, tbm,
                 torch.compile(t_flex, dynamic=False) if compiled else t_flex)


def agreement(st: Setup) -> dict:
    """hf_flex's relative errors against torch flex on the whole output and on dq, dk, dv ({"out", "dq",
    "dk", "dv"}): both are bf16 kernels with fp32 accumulation, so AssertionError above 1e-2 (the
    output, or any non-finite value in it) or 2e-2 (a gradient)."""
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    o1 = st.ours(st.q, st.k, st.v)
    errs = {"out": rel(o1, st.theirs(st.q, st.k, st.v))}
    if not (errs["out"] < 1e-2 and torch.isfinite(o1).all()):
        raise AssertionError(f"{st.case.name}: hf_flex disagrees with torch flex (rel err {errs['out']:.3e})")
    g1 = fwdbwd_call(st.ours, st.q, st.k, st.v, st.do)()
    g2 = fwdbwd_call(st.theirs, st.q, st.k, st.v, st.do)()
    for n, a, b in zip("qkv", g1, g2):
        errs[f"d{n}"] = rel(a, b)
        if not errs[f"d{n}"] < 2e-2:
            raise AssertionError(f"{st.case.name}: d{n} disagrees with torch flex (rel err {errs[f'd{n}']:.3e})")
    return errs


def median_spread(xs):
    """(median, (max - min) / median) of repeated readings."""
    ys = sorted(xs)
    m = ys[len(ys) // 2] if len(ys) % 2 else 0.5 * (ys[len(ys) // 2 - 1] + ys[len(ys) // 2])
    return m, (ys[-1] - ys[0]) / m


def rotated_times(calls, rounds: int, time_ms=_ms) -> list:
    """[[reading of round 0, 1, ...] for each call]: every call measured once a round by ``time_ms``
    (default: its median ms by triton's do_bench; tune_schedule passes its own), round r starting at
    call r mod len(calls), so that no call always runs first (after another case's compile) or always
    last."""
    times = [[] for _ in calls]
    n = len(calls)
    for r in range(rounds):
        for i in [(r + j) % n for j in range(n)]:
            times[i].append(time_ms(calls[i]))
    return times


def run_case(c: Case, do_sdpa=True, rounds: int = 3):
    """One anchor case: correctness checked (raises AssertionError on a disagreement), then each
    library's forward and forward+backward timed ``rounds`` times, all of them once per round in an
    order rotated each round (so that clock, thermal or host drift falls on all alike); each TFLOP/s
    is the median over the rounds, ``spread`` its (max - min) / median, ``readings`` every round's."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    from torch.nn.attention.flex_attention import create_block_mask as t_cbm

    st = setup(c, seed=0)
    mm, Bm, t_mask, sdpa_kw, ids, bm = st.mm, st.Bm, st.t_mask, st.sdpa_kw, st.ids, st.bm
    q, k, v, do = st.q, st.k, st.v, st.do
    ours_f = lambda: st.ours(q, k, v)  # noqa: E731
    torch_f = lambda: st.theirs(q, k, v)  # noqa: E731

    # correctness first: ours vs torch flex (output and gradients)
    err = agreement(st)["out"]
    # and both against float64 on one slice (the last batch and key head): out, dq, dk, dv
    sb, hk, group = c.B - 1, c.Hkv - 1, c.Hq // c.Hkv
    dense = bm.materialize()[sb if Bm else 0, 0].bool()
    ref = reference_slice(q, k, v, do, dense, reference_score_fn(c), sb, hk, group)
    del dense
    ours_err = slice_errors(st.ours, q, k, v, do, ref, sb, hk, group)
    torch_err = slice_errors(st.theirs, q, k, v, do, ref, sb, hk, group)
    del ref
    for n, e, t in zip(("out", "dq", "dk", "dv"), ours_err, torch_err):
        if not e <= 2 * t + 1e-3:
            raise AssertionError(f"{c.name}: hf_flex {n} error vs float64 {e:.3e} > 2 x torch flex's {t:.3e} + 1e-3")

    dens = allowed_fraction(c, ids)
    flops = case_flops(c, dens)
    tf = lambda ms, mult=1.0: flops * mult / (ms * 1e-3) / 1e12  # noqa: E731

    # each reading: (JSON key, the call, FLOP multiplier); timed `rounds` times in a rotated order
    timed = [("hf_flex_fwd", ours_f, 1.0), ("torch_flex_fwd", torch_f, 1.0),
             ("hf_flex_fwdbwd", fwdbwd_call(st.ours, q, k, v, do), 3.5),
             ("torch_flex_fwdbwd", fwdbwd_call(st.theirs, q, k, v, do), 3.5)]
    row = dict(case=c.name, B=c.B, Hq=c.Hq, Hkv=c.Hkv, S=c.S, D=c.D, density=round(dens, 4),
               sdpa_fwd_tflops=None, sdpa_fwdbwd_tflops=None)
    if do_sdpa and sdpa_kw is not None:
        kk = k.repeat_interleave(c.Hq // c.Hkv, 1) if st.gqa else k
        vv = v.repeat_interleave(c.Hq // c.Hkv, 1) if st.gqa else v
        if sdpa_kw == "dense":
            dense = bm.materialize() if c.B * c.S * c.S <= 2**31 else None
            kw = {"attn_mask": dense} if dense is not None else None
        else:
            kw = sdpa_kw
        if kw is not None:
            sd = lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, vv, **kw)  # noqa: E731
            # keys and values repeated for GQA beforehand, in both timings: the backward's leaves are q, kk, vv
            sd_fb = fwdbwd_call(lambda a, b_, c_: torch.nn.functional.scaled_dot_product_attention(a, b_, c_, **kw),
                                q, kk, vv, do)
            timed += [("sdpa_fwd", sd, 1.0), ("sdpa_fwdbwd", sd_fb, 3.5)]
    readings = {key: [tf(ms, mult) for ms in times]
                for (key, _, mult), times in zip(timed, rotated_times([fn for _, fn, _ in timed], rounds))}
    row["rounds"] = rounds
    row["spread"] = {}
    for key, xs in readings.items():
        row[f"{key}_tflops"], row["spread"][key] = median_spread(xs)
    row["readings"] = readings
    row["hf_flex_block_mask_ms"] = _ms(lambda: hf_flex.create_block_mask(mm, Bm, None, c.S, c.S), rep=50)
    row["torch_flex_block_mask_ms"] = _ms(lambda: t_cbm(t_mask, Bm, None, c.S, c.S, device="cuda"), rep=50)
    row["rel_err_vs_torch_flex"] = err
    row["hf_flex_rel_err_vs_fp64"] = dict(zip(("out", "dq", "dk", "dv"), ours_err))
    row["torch_flex_rel_err_vs_fp64"] = dict(zip(("out", "dq", "dk", "dv"), torch_err))
    return row


def _gpu_and_host_ms(fn, n: int = 50):
    """(GPU ms, host ms) per call of ``fn``. The GPU is held busy (torch.cuda._sleep) while the host
    enqueues n calls, so the two events time the kernels back to back, without the host's gaps; the
    host time is the enqueueing (Python, allocations, launches). do_bench's time is about the larger
    of the two when the host cannot run ahead; in training it runs ahead of the GPU."""
    import time

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(4e8))  # a few hundred ms: longer than enqueueing n calls
    start.record()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e3
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n, host


def _listed_blocks(num: torch.Tensor, idx: torch.Tensor, n_cols: int) -> torch.Tensor:
    """[..., R, n_cols] bool: the blocks a (num [..., R], idx [..., R, C]) block table lists."""
    keep = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
    out = torch.zeros(*idx.shape[:-1], n_cols + 1, dtype=torch.bool, device=idx.device)
    # entries past a row's count go to the spare last column
    out.scatter_(-1, torch.where(keep, idx.long(), n_cols), True)
    return out[..., :n_cols]


def _built(bm):
    """``bm`` with its tables built (BlockMask.deferred builds them at the first read)."""
    bm.kv_num_blocks
    return bm


def block_mask_timings(S: int = 16384, n_docs: int = 24) -> dict:
    """Block-mask build times (ms, median of triton's do_bench) for causal + packed documents.

    and_masks(causal(), document(ids)) over S tokens cut into ``n_docs`` random documents (B = 1,
    128 x 128 blocks), built by hf_flex's packed builder from position_ids (what the Transformers
    adapter does per batch: ids by a cumulative sum, then two Triton launches), the same from ready
    document ids, by its structural builder (block_fn in torch ops), by its generic Triton builder
    (the mask evaluated everywhere), and by torch.nn.attention.flex_attention.create_block_mask on the
    same mask. Checks first that all list the same blocks: the visited (partial or full) set, from
    torch's ``to_dense()``, and the full set, from its full_kv_num_blocks / full_kv_indices.
    Needs CUDA.
    """
    import dataclasses

    from torch.nn.attention.flex_attention import create_block_mask as t_cbm

    from .transformers.recognize import positions_in_documents

    ids = doc_ids(1, S, n_docs)
    mm = mods.and_masks(mods.causal(), mods.document(ids, packed=True))
    structural = dataclasses.replace(mm, structure=None)  # not recognised as packed documents
    generic = dataclasses.replace(mm, structure=None, block_fn=None)
    pos = positions_in_documents(ids)  # position_ids restarting per document

    t_mask = lambda b, h, q, kv: (kv <= q) & (ids[b, q] == ids[b, kv])  # noqa: E731
    # causal + packed documents defers its tables to their first read (BlockMask.deferred): read one,
    # so that the timings include building them
    builds = dict(
        from_position_ids=lambda: _built(hf_flex.packed_block_mask(position_ids=pos)),
        packed=lambda: _built(hf_flex.create_block_mask(mm, 1, None, S, S)),
        structural=lambda: hf_flex.create_block_mask(structural, 1, None, S, S),
        generic=lambda: hf_flex.create_block_mask(generic, 1, None, S, S),
    )
    theirs = lambda: t_cbm(t_mask, 1, None, S, S, device="cuda")  # noqa: E731

    tbm = theirs()
    t_visited = tbm.to_dense()[0, 0].bool()
    expect_builder = dict(from_position_ids="packed", packed="packed", structural="structural", generic="triton")
    cls = None
    for name, fn in builds.items():
        bm = fn()
        if bm.builder != expect_builder[name]:
            raise AssertionError(f"{name}: the {bm.builder} builder ran, expected {expect_builder[name]}")
        c = bm.to_dense()[0, 0]
        nkv = c.shape[-1]
        t_full = _listed_blocks(tbm.full_kv_num_blocks, tbm.full_kv_indices, nkv)[0, 0]
        if c.shape != t_visited.shape or not torch.equal(c > 0, t_visited) or not torch.equal(c == 2, t_full):
            raise AssertionError(f"hf_flex ({name}) and torch block masks differ (visited or full blocks)")
        cls = c

    res = dict(
        device=torch.cuda.get_device_name(),
        S=S,
        n_docs=n_docs,
        blocks=cls.numel(),
        visited_blocks=int((cls > 0).sum()),
        full_blocks=int((cls == 2).sum()),
    )
    for name, fn in builds.items():
        res[f"hf_flex_{name}_ms"] = _ms(fn, rep=200)
        res[f"hf_flex_{name}_gpu_ms"], res[f"hf_flex_{name}_host_ms"] = _gpu_and_host_ms(fn)
    res["torch_create_block_mask_ms"] = _ms(theirs, rep=100)
    res["speedup_from_position_ids"] = res["torch_create_block_mask_ms"] / res["hf_flex_from_position_ids_ms"]
    return res


def versions():
    import transformers
    import triton

    return dict(
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        torch=torch.__version__,
        triton=triton.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        date=datetime.date.today().isoformat(),
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a one-minute subset of the kernel cases")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--rounds", type=int, default=3,
                    help="timing rounds per kernel case (the libraries in a rotated order each round; median)")
    ap.add_argument("--e2e", action="store_true", help="add the end-to-end training step and the recompile count")
    ap.add_argument("--e2e-only", action="store_true", help="only the end-to-end part (no kernel cases)")
    ap.add_argument("--tiny", action="store_true",
                    help="CPU self-check of the end-to-end path: tiny model, tiny S, Triton's interpreter")
    ap.add_argument("--e2e-S", default=None, help="comma-separated packed lengths (default 4096,16384)")
    ap.add_argument("--e2e-steps", type=int, default=None, help="timed steps after the first (default 10)")
    ap.add_argument("--e2e-timeout", type=float, default=300.0, help="seconds per variant subprocess")
    ap.add_argument("--e2e-variants", default=None, help="subset of floor,hf_flex,flex_attention,sdpa_packed")
    ap.add_argument("--no-interleave", action="store_true",
                    help="step times from each variant's own process only (default: from one more process "
                    "taking the variants' steps in turn, hf_flex.bench_e2e.run_e2e)")
    ap.add_argument("--recompile-steps", type=int, default=None, help="default 50 (3 with --tiny)")
    ap.add_argument("--no-recompiles", action="store_true", help="skip the recompile count")
    ap.add_argument("--triton-cache", choices=("fresh", "inherit"), default="fresh",
                    help="fresh (default): each e2e subprocess gets new empty TRITON_CACHE_DIR and "
                    "TORCHINDUCTOR_CACHE_DIR, so first steps are cold; inherit: the environment's")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    do_kernel = not (args.e2e_only or args.tiny)
    do_e2e = args.e2e or args.e2e_only or args.tiny
    if not torch.cuda.is_available() and not args.tiny:
        sys.exit("hf_flex.bench needs a CUDA GPU (--tiny runs a CPU self-check of the end-to-end path)")
    res = versions()
    res["kernel"] = []
    res["e2e"] = []
    res["recompiles_over_50_lengths"] = None

    def dump():
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(res, fh, indent=1)

    hdr = f"{'case':24s} {'B':>2s} {'Hq/Hkv':>6s} {'S':>6s} {'D':>4s} {'dens':>6s} | {'fwd ours':>8s} {'torch':>6s} {'sdpa':>6s} | {'f+b ours':>8s} {'torch':>6s} {'sdpa':>6s} | {'mask ms ours':>12s} {'torch':>6s} | spread"
    lines = []
    for c in (QUICK if args.quick else ANCHORS) if do_kernel else []:
        r = run_case(c, do_sdpa=not args.no_sdpa, rounds=args.rounds)
        res["kernel"].append(r)
        f = lambda x: "   -  " if x is None else f"{x:6.0f}"  # noqa: E731
        lines.append(
            f"{r['case']:24s} {r['B']:2d} {r['Hq']:>3d}/{r['Hkv']:<2d} {r['S']:6d} {r['D']:4d} {r['density']:6.3f} | "
            f"{r['hf_flex_fwd_tflops']:8.0f} {f(r['torch_flex_fwd_tflops'])} {f(r['sdpa_fwd_tflops'])} | "
            f"{r['hf_flex_fwdbwd_tflops']:8.0f} {f(r['torch_flex_fwdbwd_tflops'])} {f(r['sdpa_fwdbwd_tflops'])} | "
            f"{r['hf_flex_block_mask_ms']:12.3f} {r['torch_flex_block_mask_ms']:6.2f} | "
            f"{100 * max(r['spread'].values()):5.1f}%"
        )
        print(lines[-1], flush=True)
        dump()
        torch.cuda.empty_cache()
    if do_kernel:
        try:
            res["block_tables"] = block_mask_timings()
        except Exception as e:  # recorded, not fatal: the e2e part still runs
            res["block_tables"] = {"error": f"{type(e).__name__}: {e}"}
        dump()

    e2e_table = None
    if do_e2e:
        from . import bench_e2e

        S_list = [int(x) for x in args.e2e_S.split(",")] if args.e2e_S else (
            list(bench_e2e.TINY_S) if args.tiny else [4096, 16384])
        steps = args.e2e_steps if args.e2e_steps is not None else (2 if args.tiny else 10)
        variants = tuple(args.e2e_variants.split(",")) if args.e2e_variants else bench_e2e.VARIANTS

        def on_row(rows):
            res["e2e"] = rows
            dump()

        rec, rec_thread = None, None
        n_rec = args.recompile_steps if args.recompile_steps is not None else (3 if args.tiny else 50)

        def recompiles():
            nonlocal rec
            rec = bench_e2e.run_recompiles(
                tiny=args.tiny, steps=n_rec, timeout=args.e2e_timeout, cache=args.triton_cache
            )

        if args.tiny and not args.no_recompiles:  # CPU self-check: side by side (timings mean nothing there)
            import threading

            rec_thread = threading.Thread(target=recompiles)
            rec_thread.start()
        bench_e2e.run_e2e(S_list, steps=steps, tiny=args.tiny, timeout=args.e2e_timeout, cache=args.triton_cache,
                          variants=variants, log=lambda m: print(m, flush=True), on_row=on_row,
                          jobs=4 if args.tiny else 1, interleave=not args.no_interleave)
        if not args.no_recompiles:
            if rec_thread is not None:
                rec_thread.join()
            else:
                recompiles()
            res["recompiles"] = rec
            res["recompiles_over_50_lengths"] = rec.get("recompiles") if n_rec == 50 else None
            print(f"  recompiles: {rec.get('recompiles', rec.get('error'))} over {n_rec} steps", flush=True)
        dump()
        e2e_table = bench_e2e.table(res["e2e"], rec)

    print(f"\n{res['device']}  torch {res['torch']}  triton {res['triton']}  transformers {res['transformers']}")
    if lines:
        print(f"(TFLOP/s: median of {args.rounds} rounds, the libraries in a rotated order each round; "
              "spread: the worst (max - min) / median of the row)")
        print(hdr)
        print("\n".join(lines))
        bt = res.get("block_tables", {})
        if "error" in bt:
            print(f"block tables: {bt['error']}")
        elif bt:
            print(f"block tables (S={bt['S']}, {bt['n_docs']} docs): hf_flex from position_ids "
                  f"{bt['hf_flex_from_position_ids_ms']:.3f} ms, torch create_block_mask "
                  f"{bt['torch_create_block_mask_ms']:.2f} ms ({bt['speedup_from_position_ids']:.0f}x)")
    if e2e_table:
        print("end to end (one packed training step; tokens/s = S / median step time):")
        print(e2e_table)


if __name__ == "__main__":
    main()
