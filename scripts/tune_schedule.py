"""Compare launch schedules (hf_flex.kernels.launch.SCHEDULE knobs and tile OVERRIDES) side by side on
the anchor cases.

    python scripts/tune_schedule.py [--cases 0,1,4] [--variants main,divisible_variant] [--shrink 72]
                                    [--budget-s 420] [--json out.json]

--shrink N runs every case at S - N tokens (a length that does not divide the 128 block, as ragged
packed lengths are). --tokens gives every library q, k, v and dO in Transformers' token-major layout
(transposed [B, S, H, D]) instead of contiguous [B, H, S, D]; --hkv N runs every case with N key heads
(another query-head group size).

Per case: hf_flex under every schedule and torch's compiled flex_attention are first checked against
a float64 reference on one slice (the last batch, the last key head and its query heads: output and
dq/dk/dv); hf_flex's error must stay
within 2x torch flex's plus 1e-3 (both are bf16 kernels with fp32 accumulation). Then each is timed
(forward, forward+backward; median of triton's do_bench), TFLOP/s over the unmasked FLOPs as in
hf_flex.bench. Cases start only while --budget-s seconds have not passed (device calls are capped).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time

import hf_flex
from hf_flex import bench
from hf_flex.kernels import launch

# name -> SCHEDULE knobs to set, and optionally "tiles": {pass: Tiles} for launch.OVERRIDES
SCHEDULES = {
    "main": {},  # the defaults (one_variant on)
    "no_halves": {"halves": False},  # partial-block loops over whole blocks, dead halves included
    "bwd_flat_group": {"bwd_flat_group": True},  # GQA: one dK/dV loop over the group's heads
    "exact_mods": {"approx_mods": False},
    "divisible_variant": {"one_variant": False},
    "fwd64x64w4": {"tiles": {"fwd": launch.Tiles(64, 64, 4, 3, 128)}},
    "fwd128x64w4": {"tiles": {"fwd": launch.Tiles(128, 64, 4, 3, 64)}},
    "bwd_stages3": {"tiles": {"dkdv": launch.Tiles(64, 128, 8, 3), "dq": launch.Tiles(128, 64, 8, 3)}},
    # one pass at 3 stages: the passes no longer share warps and stages, so two launches
    "bwd_dkdv_stages3": {"tiles": {"dkdv": launch.Tiles(64, 128, 8, 3), "dq": launch.Tiles(128, 64, 8, 2)}},
    "bwd_dq_stages3": {"tiles": {"dkdv": launch.Tiles(64, 128, 8, 2), "dq": launch.Tiles(128, 64, 8, 3)}},
    "bwd_stages3_ahead": {"bwd_index_ahead": True,
                          "tiles": {"dkdv": launch.Tiles(64, 128, 8, 3), "dq": launch.Tiles(128, 64, 8, 3)}},
    # dQ added by the dK/dV programs with float32 atomics (no dQ pass), at the default tiles, with
    # 32-query sub-tiles (fewer registers for the dS and dQ tiles), at 3 stages
    "atomic_dq": {"atomic_dq": True},
    "atomic_dq_m32": {"atomic_dq": True, "tiles": {"dkdv": launch.Tiles(32, 128, 8, 2)}},
    "atomic_dq_s3": {"atomic_dq": True, "tiles": {"dkdv": launch.Tiles(64, 128, 8, 3)}},
    "atomic_dq_m32s3": {"atomic_dq": True, "tiles": {"dkdv": launch.Tiles(32, 128, 8, 3)}},
    # thirteenth round: dQ by the tensor-memory accelerator's bulk reduction (atomic_dq_tma, the default
    # form of atomic_dq on Hopper) against per-thread atomics; the same for the document-aligned kernels
    "atomic_dq_ptr": {"atomic_dq": True, "atomic_dq_tma": False},
    "varlen_atomic": {"varlen_atomic_dq": True},
    "varlen_atomic_ptr": {"varlen_atomic_dq": True, "atomic_dq_tma": False},
    "varlen_atomic_s2": {"varlen_atomic_dq": True, "varlen_bwd_stages": 2},
    "block_atomic": {"varlen": False, "atomic_dq": True},  # document masks on the block-sparse kernels
    # the dK/dV loops issue dP^T before the softmax (P^T dO then runs under dS's elementwise work)
    # LSE / delta of queries past the end by masked loads / by selects (backward.row_inputs)
    "row_masked": {"row_select": False, "varlen_row_select": False},
    "row_select": {"row_select": True, "varlen_row_select": True},
    # fifteenth round: the block-sparse full-block loops at 3 stages (the kernel's other loops at 2)
    "full_s3": {"bwd_full_stages": 3},
    "full_s3_dq": {"bwd_full_stages": 3, "bwd_dq_full_stages": 3},
    "dq_full_s3": {"bwd_dq_full_stages": 3},
    "dp_first": {"bwd_dp_first": True, "varlen_dp_first": True},
    "varlen_dp_first": {"varlen_dp_first": True},
    "block_dp_first": {"varlen": False, "bwd_dp_first": True},
    # K/V tiles of the forward through tensor descriptors (TMA): full-block loop, both loops
    "tma_full": {"tma": "full"},
    "tma_both": {"tma": "both"},
    "tma_full_stages4": {"tma": "full", "tiles": {"fwd": launch.Tiles(128, 64, 8, 4, 128)}},
    "bwd_tma": {"tma": "both", "bwd_tma": True},
    "bwd_tma_stages3": {"tma": "both", "bwd_tma": True,
                        "tiles": {"dkdv": launch.Tiles(64, 128, 8, 3), "dq": launch.Tiles(128, 64, 8, 3)}},
    "bwd_dkdv128x128": {"tiles": {"dkdv": launch.Tiles(128, 128, 8, 2), "dq": launch.Tiles(128, 64, 8, 2)}},
    "index_ahead": {"index_ahead": "both"},
    "ahead_full": {"index_ahead": "full"},
    "bwd_ahead": {"bwd_index_ahead": True},
    "ahead_all": {"index_ahead": "full", "bwd_index_ahead": True},
    "interleave": {"bwd_interleave": True},
    "interleave_ahead": {"bwd_interleave": True, "bwd_index_ahead": True},
    # fifteenth round (ncu, causal 2k: torch flex's backward runs its programs per (batch, key head)
    # dK/dV then dQ, at 3 stages, with an L2 hit rate of 84 % against our 70 %)
    "interleave_s3": {"bwd_interleave": True,
                      "tiles": {"dkdv": launch.Tiles(64, 128, 8, 3), "dq": launch.Tiles(128, 64, 8, 3)}},
    "interleave_full_s3": {"bwd_interleave": True, "bwd_full_stages": 3, "bwd_dq_full_stages": 3},
    # bwd_interleave and bwd_index_ahead are the defaults since then ("interleave", "interleave_ahead"
    # and "bwd_ahead" equal main); the order before them:
    "dkdv_first": {"bwd_interleave": False, "bwd_index_ahead": False},
    # the block-sparse Triton backward for exactly causal masks instead of the Gluon passes (sixteenth round)
    "gluon_bwd_off": {"gluon_bwd": False},
    "gluon_one_stream": {"gluon_bwd_streams": False},
    "gluon_d128_only": {"gluon_bwd_head_dims": (128,)},  # D = 64 on the Triton kernels (before the default)
    # seventeenth round: causal within a sliding window on the block-sparse Triton backward, not the Gluon passes
    "gluon_sliding_off": {"gluon_bwd_sliding": False},
    # the document-aligned Triton backward for causal packed documents instead of kernels/gluon_varlen.py
    "gluon_varlen_off": {"gluon_varlen": False},
    "gluon_varlen_mha": {"gluon_varlen_min_group": 1},  # without GQA too
    # Transformers' layout (token-major q, k, v) to the Triton kernels instead of the Gluon backwards
    "gluon_tokens_off": {"gluon_token_major": False},
    # nineteenth round: causal and sliding-window forwards on the block-sparse Triton kernel, not kernels/gluon_forward.py
    "gluon_fwd_off": {"gluon_fwd": False},
    # the document-aligned forward as kernels/gluon_varlen.py's Gluon forward (on by default since it was
    # measured with this variant), and off: the Triton document-aligned forward
    "gluon_varlen_fwd_on": {"gluon_varlen_fwd": True},
    "gluon_varlen_fwd_off": {"gluon_varlen_fwd": False},
    # the Gluon causal backward in one-warpgroup programs, two an SM (offline: 254 / 218 registers for dK/dV)
    "gluon_bwd_w4_64": {"gluon_bwd_tiles": (64, 64, 4)},
    "gluon_bwd_w4_32": {"gluon_bwd_tiles": (64, 32, 4)},
    # twentieth round: (64, 64, 4) the default since measured; the earlier one-program-an-SM tiles
    "gluon_bwd_w8_128": {"gluon_bwd_tiles": (128, 64, 8)},
    # the document-aligned Gluon backward in one-warpgroup programs (halves of the listed tiles)
    "gluon_varlen_w4_64": {"gluon_varlen_bwd_tiles": (64, 64, 4)},
    "gluon_varlen_w4_32": {"gluon_varlen_bwd_tiles": (64, 32, 4)},
    "gluon_varlen_w8_128": {"gluon_varlen_bwd_tiles": (128, 64, 8)},
    "gluon_varlen_mha_w4_64": {"gluon_varlen_min_group": 1, "gluon_varlen_bwd_tiles": (64, 64, 4)},
    "ahead_full_stages2": {"index_ahead": "full", "tiles": {"fwd": launch.Tiles(128, 64, 8, 2, 128)}},
    # torch flex's forward tiles at D=128 on the H100: 64-key tiles in full blocks too
    "fwd_full64": {"tiles": {"fwd": launch.Tiles(128, 64, 8, 3, 64)}},
    "fwd_full64_ahead": {"index_ahead": "both", "tiles": {"fwd": launch.Tiles(128, 64, 8, 3, 64)}},
    "fwd_stages2": {"tiles": {"fwd": launch.Tiles(128, 64, 8, 2, 128)}},
    # sixth round, D=128 forward: 128-key tiles where the mask is evaluated too (the span form of
    # document masks made evaluation cheap since 64 was chosen); 4 stages now that K/V come by TMA
    "fwd_part128": {"tiles": {"fwd": launch.Tiles(128, 128, 8, 3, 128)}},
    "fwd_stages4": {"tiles": {"fwd": launch.Tiles(128, 64, 8, 4, 128)}},
    # D=64 forward (the default: Tiles(128, 64, 8, 3, 0, 128, False)): TMA, 128-key full tiles, 4 warps,
    # 4 stages; only meaningful on D=64 cases (OVERRIDES apply to every head dim)
    "d64_tma": {"tiles": {"fwd": launch.Tiles(128, 64, 8, 3, 0, 128, True)}},
    "d64_full128": {"tiles": {"fwd": launch.Tiles(128, 64, 8, 3, 128, 128, False)}},
    "d64_full128_tma": {"tiles": {"fwd": launch.Tiles(128, 64, 8, 3, 128, 0, True)}},
    "d64_w4": {"tiles": {"fwd": launch.Tiles(128, 64, 4, 3, 0, 0, False)}},
    "d64_stages4": {"tiles": {"fwd": launch.Tiles(128, 64, 8, 4, 0, 128, False)}},
    # backward: partial and full blocks in one loop per program (one pipeline fill and drain per head)
    "bwd_one_loop": {"bwd_one_loop": True},
    "bwd_one_loop_s3": {"bwd_one_loop": True,
                        "tiles": {"dkdv": launch.Tiles(64, 128, 8, 3), "dq": launch.Tiles(128, 64, 8, 3)}},
    # the forward in one loop: in the partial blocks' 64-key tiles, or in 128-key tiles throughout
    "fwd_one_loop": {"fwd_one_loop": True},
    "fwd_one_loop128": {"fwd_one_loop": True, "tiles": {"fwd": launch.Tiles(128, 128, 8, 3, 128)}},
    "one_loop_both": {"fwd_one_loop": True, "bwd_one_loop": True},
    # longest-first across heads: grids (B * H, tiles), in the forward, the backward, or both
    "heads_first": {"heads_first": True},
    "heads_first_never": {"heads_first": False},  # the forward as before the "documents" default
    "bwd_heads_first": {"bwd_heads_first": True},
    "heads_first_all": {"heads_first": True, "bwd_heads_first": True},
    # seventh round, D=128 backward tiles (the first sweep, results/h100_tune_tiles_2026-11-25.log, had
    # dK/dV 32x64 at 4 warps level with 64x128 at 8): fewer registers per program, more programs
    "bwd_w4": {"tiles": {"dkdv": launch.Tiles(32, 64, 4, 3), "dq": launch.Tiles(64, 64, 4, 3)}},
    "bwd_w4_dkdv64": {"tiles": {"dkdv": launch.Tiles(64, 64, 4, 3), "dq": launch.Tiles(64, 64, 4, 3)}},
    "bwd_dkdv_w4": {"tiles": {"dkdv": launch.Tiles(32, 64, 4, 3)}},
    "bwd_dkdv128x64": {"tiles": {"dkdv": launch.Tiles(128, 64, 8, 2)}},
    "bwd_dkdv128x64_s3": {"tiles": {"dkdv": launch.Tiles(128, 64, 8, 3), "dq": launch.Tiles(128, 64, 8, 3)}},
    "bwd_dq64_w4": {"tiles": {"dkdv": launch.Tiles(64, 128, 8, 2), "dq": launch.Tiles(64, 64, 4, 3)}},
    "unfused": {"fused_bwd": False},
    # eighth round: finer block tables (hf_flex's block mask built with this BLOCK_SIZE; torch flex
    # keeps 128 x 128): fewer elements computed only to be masked at document boundaries, more and
    # smaller tiles (the tiles shrink to the blocks, launch._fit)
    "bs128x64": {"block_size": (128, 64)},
    "bs64x128": {"block_size": (64, 128)},
    "bs64": {"block_size": (64, 64)},
    # twelfth round: causal AND packed documents through the block-sparse kernels instead of the
    # document-aligned ones (kernels/varlen.py), and tile choices of the document-aligned ones
    "block_path": {"varlen": False},
    "varlen_part128": {"tiles": {"fwd": launch.Tiles(128, 128, 8, 3, 128)}},
    "varlen_fwd_stages2": {"tiles": {"fwd": launch.Tiles(128, 64, 8, 2, 128)}},
    "varlen_no_flat": {"bwd_flat_group": False},
    "varlen_one_loop": {"varlen_one_loop": True},
    "varlen_one_loop128": {"varlen_one_loop": True, "tiles": {"fwd": launch.Tiles(128, 128, 8, 3, 128)}},
    "varlen_bwd_stages2": {"varlen_bwd_stages": 2},
}


@contextlib.contextmanager
def _applied(name):
    """SCHEDULE / OVERRIDES as variant ``name`` sets them, restored on exit."""
    sched = dict(SCHEDULES[name])
    saved, saved_tiles = dict(launch.SCHEDULE), dict(launch.OVERRIDES)
    launch.OVERRIDES.update(sched.pop("tiles", {}))
    sched.pop("block_size", None)  # read by run()
    launch.SCHEDULE.update(sched)
    try:
        yield
    finally:
        launch.SCHEDULE.clear()
        launch.SCHEDULE.update(saved)
        launch.OVERRIDES.clear()
        launch.OVERRIDES.update(saved_tiles)


def run(c: bench.Case, variants, do_torch=True, rounds=1, tokens=False):
    """One case: every variant checked against float64, then timed ``rounds`` times, the variants (and
    torch flex) in a rotated order each round, so that clock and thermal drift during a run falls on
    all of them alike; each reading is the median over rounds, with its spread."""
    st = bench.setup(c, seed=1)
    Bm, ids, bm, group = st.Bm, st.ids, st.bm, c.Hq // c.Hkv
    q, k, v, do = st.q, st.k, st.v, st.do
    if tokens:  # the same values, stored as Transformers' projections are: [B, S, H, D] seen per head
        q, k, v, do = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, do))
    ours, theirs = st.ours, st.theirs

    b, hk = c.B - 1, c.Hkv - 1  # the last slice: the one a wrong batch/head offset would get wrong
    dense = bm.materialize()[b if Bm else 0, 0].bool()
    ref = bench.reference_slice(q, k, v, do, dense, bench.reference_score_fn(c), b, hk, group)
    del dense
    t_err = bench.slice_errors(theirs, q, k, v, do, ref, b, hk, group) if do_torch else None

    dens = bench.allowed_fraction(c, ids)
    flops = bench.case_flops(c, dens)

    def timed(f):
        return bench.timed_tflops(f, q, k, v, do, flops)

    row = dict(case=c.name, B=c.B, Hq=c.Hq, Hkv=c.Hkv, S=c.S, D=c.D, tokens=tokens, density=round(dens, 4),
               torch_err=t_err, variants={}, rounds=rounds)
    ok, own = [], {}

    def ours_of(name):
        """hf_flex with the variant's block mask (its own BLOCK_SIZE, built once) or the case's."""
        bs = SCHEDULES[name].get("block_size")
        if bs is None:
            return ours
        if bs not in own:
            own[bs] = hf_flex.create_block_mask(st.mm, Bm, None, c.S, c.S, device=q.device, BLOCK_SIZE=bs)
        return lambda q, k, v: hf_flex.flex_attention(q, k, v, st.sm, own[bs], enable_gqa=st.gqa)

    for name in variants:
        if SCHEDULES[name].get("approx_mods") is False and c.kind != "softcap":
            continue  # no approximate mod to compare against
        with _applied(name):
            try:
                err = bench.slice_errors(ours_of(name), q, k, v, do, ref, b, hk, group)
                limit = [2 * t + 1e-3 for t in t_err] if t_err else [2e-2] * 4
                if not all(e <= lim for e, lim in zip(err, limit)):
                    raise AssertionError(f"{c.name} [{name}]: errors vs float64 {err} exceed {limit}")
                row["variants"][name] = dict(err=err, fwd=[], fwdbwd=[])
                ok.append(name)
            except Exception as e:  # one broken variant must not hide the others' numbers
                row["variants"][name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    order = ok + (["torch"] if do_torch else [])
    seen = {n: row["variants"][n] for n in ok}
    seen["torch"] = dict(fwd=[], fwdbwd=[])

    def timed_as(name):
        """(forward, forward+backward) TFLOP/s of variant ``name`` under its schedule, or of torch flex."""
        if name == "torch":
            return timed(theirs)
        with _applied(name):
            return timed(ours_of(name))

    for name, readings in zip(order, bench.rotated_times(order, rounds, time_ms=timed_as)):
        seen[name]["fwd"] += [fwd for fwd, _ in readings]
        seen[name]["fwdbwd"] += [fb for _, fb in readings]
    for name in order:
        d = seen[name]
        (d["fwd_tflops"], d["fwd_spread"]), (d["fwdbwd_tflops"], d["fwdbwd_spread"]) = (
            bench.median_spread(d["fwd"]), bench.median_spread(d["fwdbwd"]))
    if do_torch:
        row["torch_fwd_tflops"], row["torch_fwdbwd_tflops"] = seen["torch"]["fwd_tflops"], seen["torch"]["fwdbwd_tflops"]
        row["torch_spread"] = [seen["torch"]["fwd_spread"], seen["torch"]["fwdbwd_spread"]]
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=None, help="indices into hf_flex.bench.ANCHORS (default: all)")
    ap.add_argument("--variants", default="main,divisible_variant", help=f"comma-separated, of {sorted(SCHEDULES)}")
    ap.add_argument("--shrink", type=int, default=0, help="run each case at S minus this many tokens")
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--rounds", type=int, default=1, help="timings per variant, interleaved (median reported)")
    ap.add_argument("--tokens", action="store_true", help="q, k, v, dO token-major (Transformers' layout)")
    ap.add_argument("--hkv", type=int, default=0, help="key heads of every case (0: the case's)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    idx = [int(i) for i in a.cases.split(",")] if a.cases else range(len(bench.ANCHORS))
    names = a.variants.split(",")
    unknown = [n for n in names if n not in SCHEDULES]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown} (known: {sorted(SCHEDULES)})")
    res = dict(bench.versions(), rows=[])
    t0 = time.time()
    for i in idx:
        if time.time() - t0 > a.budget_s:
            print(f"budget spent: case {i} and later not run", flush=True)
            break
        c = bench.ANCHORS[i]
        if a.shrink:
            c = dataclasses.replace(c, S=c.S - a.shrink)
        if a.hkv:
            c = dataclasses.replace(c, Hkv=a.hkv)
        try:
            row = run(c, names, rounds=a.rounds, tokens=a.tokens)
        except Exception as e:
            row = dict(case=c.name, error=f"{type(e).__name__}: {str(e)[:500]}")
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        if a.json:
            json.dump(res, open(a.json, "w"), indent=1)
    print(f"\n{res['device']}  torch {res['torch']}  triton {res['triton']}")
    print(f"{'case':28s} {'S':>6s} " + " ".join(f"{n[:13]:>13s}" for n in names)
          + f"   torch   (fwd | fwd+bwd TFLOP/s, median of {a.rounds} interleaved rounds; worst spread last)")
    for r in res["rows"]:
        if "error" in r:
            print(f"{r['case']:28s} ERROR {r['error'][:150]}")
            continue
        cells = []
        for n in names:
            v = r["variants"].get(n, {"fwd_tflops": 0, "fwdbwd_tflops": 0})
            cells.append("  error      " if "error" in v else f"{v['fwd_tflops']:5.0f}|{v['fwdbwd_tflops']:<5.0f}  ")
        spreads = [max(v.get("fwd_spread", 0), v.get("fwdbwd_spread", 0)) for v in r["variants"].values()]
        spreads += r.get("torch_spread", [])
        print(f"{r['case']:28s} {r['S']:6d} " + " ".join(f"{x:>13s}" for x in cells)
              + f"  {r.get('torch_fwd_tflops', 0):5.0f}|{r.get('torch_fwdbwd_tflops', 0):<5.0f}"
              + f"  {100 * max(spreads, default=0):.1f}%")
        for n in names:
            if "error" in r["variants"].get(n, {}):
                print(f"   {n}: {r['variants'][n]['error'][:200]}")


if __name__ == "__main__":
    main()
