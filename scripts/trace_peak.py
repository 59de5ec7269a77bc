"""What is alive at the peak of one training step, per attention implementation (CUDA).

    python scripts/trace_peak.py [--S 4096] [--warm 2] [--variants hf_flex,flex_attention] [--json out.json]
    python scripts/trace_peak.py --bench [--S 4096] [--steps 10]   # the benchmark's own worker, traced

Each variant runs in a fresh subprocess: the end-to-end benchmark's model and packed row
(hf_flex.bench_e2e: 0.67B Llama-shaped, bf16, one packed row of S tokens), ``--warm`` steps (0: the
traced step is the first, with compilation and the optimizer's state allocation), then one step under
torch.cuda.memory._record_memory_history. The recorded trace is replayed
(:func:`peak_breakdown`) to find the step's peak of allocated bytes and the blocks alive at it, grouped
by where they were allocated (the innermost frame in hf_flex, transformers or the benchmark, else the
innermost frame). ``--keep-output``: the loop keeps each step's output (hence its graph) until the next
step, as the benchmark's loop does, and the recording starts before the first step, so that what the
kept output holds is named by its allocation site too; the peak is then the whole run's. The parent prints each variant's peak (max_memory_allocated) and the groups whose
bytes differ between the first variant and the others, largest difference first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_OURS = ("hf_flex", "transformers", "bench_e2e", "trace_peak")


def _site(frames) -> str:
    """'file:line name' of the innermost frame in our code or Transformers', else of the innermost frame."""
    if not frames:
        return "<no python frame>"
    pick = next((f for f in frames if any(k in f.get("filename", "") for k in _OURS)), frames[0])
    path = pick.get("filename", "?")
    parts = path.replace("\\", "/").split("/")
    short = "/".join(parts[-2:])
    return f"{short}:{pick.get('line', '?')} {pick.get('name', '?')}"


def peak_breakdown(events, start_bytes: int = 0) -> dict:
    """Replay allocator events (a snapshot's ``device_traces[d]``: dicts with action, addr, size, frames)
    and return {"peak_bytes", "groups": {site: [bytes, count]}} for the blocks alive at the peak.

    ``alloc`` makes a block alive, ``free_requested`` ends it (the allocated-bytes statistic drops
    there); blocks alive before the trace began count in ``start_bytes`` (the allocated bytes when the
    trace began) and, when one of them is freed during the trace, its size leaves the running total too
    (until the tenth round it did not, and the replayed "peak" sat above max_memory_allocated: the
    tool named the blocks alive at a moment that was not the peak).
    """
    live, cur = {}, start_bytes
    peak, at_peak = start_bytes, {}
    stacks: dict = {}  # site -> the stack of its first block (innermost first), to name who made it
    for e in events:
        act = e.get("action")
        if act == "alloc":
            site = _site(e.get("frames", []))
            live[e["addr"]] = (e["size"], site)
            if site not in stacks:
                stacks[site] = [f"{f.get('filename', '?').split('/')[-1]}:{f.get('line', '?')} {f.get('name', '?')}"
                                for f in e.get("frames", [])[:24]]
            cur += e["size"]
            if cur > peak:
                peak, at_peak = cur, dict(live)
        elif act == "free_requested":
            cur -= live.pop(e["addr"])[0] if e["addr"] in live else e["size"]
    groups: dict = {}
    for size, site in at_peak.values():
        g = groups.setdefault(site, [0, 0])
        g[0] += size
        g[1] += 1
    return {"peak_bytes": peak, "groups": groups, "stacks": {s: stacks[s] for s in groups}}


def _bench_worker(variant: str, S: int, steps: int) -> dict:
    """The benchmark's own worker (hf_flex.bench_e2e.worker: its model, row, loop and peak statistic),
    recorded from where it resets the peak statistic to its end."""
    import torch

    from hf_flex import bench_e2e as e2e

    mark = {}

    def record():
        torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")
        mark["start"] = torch.cuda.memory_allocated()

    spec = dict(variant=variant, S=S, seed=S, device="cuda", dtype="bfloat16", model=e2e.BIG,
                doc_range=list(e2e.DOC_RANGE), steps=steps)
    r = e2e.worker(spec, before_steps=record)
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    res = peak_breakdown(snap["device_traces"][torch.cuda.current_device()], mark["start"])
    res.update(variant=variant, S=S, bench=True, steps=steps, start_bytes=mark["start"],
               max_memory_allocated=torch.cuda.max_memory_allocated(), bench_peak_gib=r["peak_gib"],
               step_s=r["step_s"])
    return res


def _worker(variant: str, S: int, warm: int, seed: int, keep_output: bool = False) -> dict:
    import torch

    from hf_flex import bench_e2e as e2e

    if variant == "hf_flex":
        import hf_flex  # noqa: F401  (registers attn_implementation="flex")
    device = torch.device("cuda")
    ids, pos, labels, _ = e2e.packed_row(S, seed, e2e.BIG["vocab_size"], e2e.DOC_RANGE)
    ids, pos, labels = ids.to(device), pos.to(device), labels.to(device)
    model = e2e._build_model(e2e.BIG, e2e.ATTN[variant], device, torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, position_ids=pos, labels=labels, use_cache=False)
        out.loss.backward()
        opt.step()
        return out

    def record():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")
        return torch.cuda.memory_allocated()

    kept = None
    if keep_output:  # the benchmark's loop: the last output lives on through the next step
        start = record()
        for _ in range(warm + 1):
            kept = step()
    else:
        for _ in range(warm):
            step()
        start = record()
        step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    res = peak_breakdown(snap["device_traces"][torch.cuda.current_device()], start)
    res.update(variant=variant, S=S, warm=warm, seed=seed, start_bytes=start, keep_output=keep_output,
               max_memory_allocated=torch.cuda.max_memory_allocated())
    del kept
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, default=4096)
    ap.add_argument("--warm", type=int, default=2, help="untraced steps before the traced one")
    ap.add_argument("--seed", type=int, default=None, help="the packed row's seed (default S, as the benchmark's)")
    ap.add_argument("--variants", default="hf_flex,flex_attention")
    ap.add_argument("--keep-output", action="store_true",
                    help="keep each step's output until the next step (the benchmark's loop); record from the first step")
    ap.add_argument("--bench", action="store_true",
                    help="trace the benchmark's own worker (hf_flex.bench_e2e.worker, --steps timed steps "
                    "after its first) from its peak-statistic reset to its end")
    ap.add_argument("--steps", type=int, default=10, help="with --bench: the benchmark's timed steps")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        if a.bench:
            res = _bench_worker(a.worker, a.S, a.steps)
        else:
            res = _worker(a.worker, a.S, a.warm, a.S if a.seed is None else a.seed, a.keep_output)
        print("RESULT " + json.dumps(res), flush=True)
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = []
    for v in a.variants.split(","):
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", v, "--S", str(a.S),
                            "--warm", str(a.warm)] + ([] if a.seed is None else ["--seed", str(a.seed)])
                           + (["--keep-output"] if a.keep_output else [])
                           + (["--bench", "--steps", str(a.steps)] if a.bench else []),
                           capture_output=True, text=True, env=env, timeout=600)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{v} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
        out.append(json.loads(line[7:]))
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)
    base = out[0]
    for r in out:
        print(f"{r['variant']:16s} S={r['S']} max_memory_allocated {r['max_memory_allocated']} "
              f"(replayed peak {r['peak_bytes']}, {r['start_bytes']} alive when the trace began"
              f"{'' if r['peak_bytes'] == r['max_memory_allocated'] else '; the replay MISSES the peak'})")
    for r in out[1:]:
        print(f"\nalive at the peak: {base['variant']} minus {r['variant']} (bytes, blocks), by allocation site")
        sites = set(base["groups"]) | set(r["groups"])
        rows = [(base["groups"].get(s, [0, 0]), r["groups"].get(s, [0, 0]), s) for s in sites]
        rows.sort(key=lambda x: -abs(x[0][0] - x[1][0]))
        for a_, b_, s in rows[:25]:
            if a_[0] != b_[0]:
                print(f"  {a_[0] - b_[0]:+14d}  ({a_[1]} vs {b_[1]})  {s}")
        for a_, b_, s in rows[:6]:
            if a_[0] != b_[0]:
                stack = base.get("stacks", {}).get(s) or r.get("stacks", {}).get(s) or []
                print(f"  stack of {s}:\n    " + "\n    ".join(stack))


if __name__ == "__main__":
    main()
