"""Compare the JSON logs of recipes/sft.py runs: throughput, MFU, memory, losses, and the loss curves.

    python recipes/compare_logs.py runs/flex/log.jsonl runs/sdpa-padded/log.jsonl [--json out.json]

The first log is the reference for the curve columns: the largest |loss difference| over the steps
both runs logged, and the same over the last 10% of those steps. Runs on the same data, seed and
batch shapes (e.g. --attn flex vs --attn sdpa --padded) see the same documents at every step, so
their curves differ only by arithmetic.
"""

from __future__ import annotations

import argparse
import json
import statistics


def load(path):
    recs = [json.loads(line) for line in open(path)]
    start = next((r for r in recs if r["event"] == "start"), {})
    train = {r["step"]: r for r in recs if r["event"] == "train"}
    evals = {r["step"]: r["eval_loss"] for r in recs if r["event"] == "eval"}
    parity = [r for r in recs if r["event"] == "parity"]
    steady = [train[s] for s in sorted(train)][1:] or list(train.values())  # step 1 includes compilation
    a = start.get("args", {})
    return {
        "log": path,
        "run": f"{a.get('model')} {a.get('attn')}{' padded' if a.get('padded') else ''} x{start.get('processes')} "
               f"{a.get('dtype')} S={a.get('seq_len')} B={a.get('batch_size')}x{a.get('grad_accum')}",
        "device": start.get("device_name"),
        "steps": len(train),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady) if steady else None,
        "mfu": statistics.median(r["mfu"] for r in steady) if steady and steady[0]["mfu"] is not None else None,
        "peak_mem_gib": max((r["peak_mem_gib"] for r in train.values()), default=None),
        "first_step_s": train[min(train)]["step_time"] if train else None,
        "first_loss": train[min(train)]["loss"] if train else None,
        "last_loss": train[max(train)]["loss"] if train else None,
        "eval_loss": evals[max(evals)] if evals else None,
        "parity_ok": all(p["ok"] for p in parity) if parity else None,
        "_curve": {s: r["loss"] for s, r in train.items()},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--json", default=None, help="write the table here")
    a = ap.parse_args(argv)
    runs = [load(p) for p in a.logs]
    ref = runs[0]["_curve"]
    for r in runs:
        common = sorted(set(ref) & set(r["_curve"]))
        tail = common[-max(1, len(common) // 10):]
        r["max_abs_loss_diff_vs_first"] = max((abs(r["_curve"][s] - ref[s]) for s in common), default=None)
        r["max_abs_loss_diff_vs_first_last10pct"] = max((abs(r["_curve"][s] - ref[s]) for s in tail), default=None)

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    print(f"{'run':58} {'tok/s':>10} {'MFU':>6} {'mem GiB':>8} {'1st step s':>10} {'loss first->last':>18} "
          f"{'eval':>7} {'max|dL|':>8} {'parity':>6}")
    for r in runs:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['run'][:58]:58} {f(r['tokens_per_s'], ',.0f'):>10} {mfu:>6} {f(r['peak_mem_gib'], '.2f'):>8} "
              f"{f(r['first_step_s'], '.2f'):>10} {f(r['first_loss'], '.3f'):>8} -> {f(r['last_loss'], '.3f'):<6} "
              f"{f(r['eval_loss'], '.3f'):>7} {f(r['max_abs_loss_diff_vs_first'], '.4f'):>8} "
              f"{'-' if r['parity_ok'] is None else ('ok' if r['parity_ok'] else 'FAIL'):>6}")
    if runs[0]["device"]:
        print(f"device: {runs[0]['device']}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump([{k: v for k, v in r.items() if not k.startswith("_")} | {"loss_curve": r["_curve"]}
                       for r in runs], fh, indent=1)


if __name__ == "__main__":
    main()
