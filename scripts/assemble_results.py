"""Merge benchmark JSON files (``python -m hf_flex.bench --json X``) into one results file of issue 5's
schema and render it as Markdown.

    python scripts/assemble_results.py IN1.json IN2.json ... --out tests/benchmarks/results/<card>.json \
        [--markdown out.md]

The inputs must agree on device, torch, triton and transformers. Kernel rows are concatenated and
deduplicated by (case, B, Hq, Hkv, S, D); e2e rows are merged by S and sorted by S (a later file wins
in both); ``recompiles_over_50_lengths`` comes from the file(s) that have it (an error if they
disagree); every other key (block_tables, recompiles, python, ...) is kept, a later non-null value
winning; ``date`` is the latest date (all of them in ``dates`` when they differ). Each kernel row gets
fwd_ratio_vs_torch_flex, fwdbwd_ratio_vs_torch_flex, fwd_ratio_vs_sdpa, fwdbwd_ratio_vs_sdpa
(hf_flex TFLOP/s over the other's) and block_mask_speedup (torch ms over hf_flex ms); null where a
number is missing. The Markdown goes to stdout and, with --markdown, to that file.
"""

from __future__ import annotations

import argparse
import json
import os

VERSION_KEYS = ("device", "torch", "triton", "transformers")
KERNEL_KEY = ("case", "B", "Hq", "Hkv", "S", "D")
NULL = "–"


def _ratio(a, b):
    ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return a / b if ok and b != 0 else None


def add_ratios(row: dict) -> dict:
    g = row.get
    row["fwd_ratio_vs_torch_flex"] = _ratio(g("hf_flex_fwd_tflops"), g("torch_flex_fwd_tflops"))
    row["fwdbwd_ratio_vs_torch_flex"] = _ratio(g("hf_flex_fwdbwd_tflops"), g("torch_flex_fwdbwd_tflops"))
    row["fwd_ratio_vs_sdpa"] = _ratio(g("hf_flex_fwd_tflops"), g("sdpa_fwd_tflops"))
    row["fwdbwd_ratio_vs_sdpa"] = _ratio(g("hf_flex_fwdbwd_tflops"), g("sdpa_fwdbwd_tflops"))
    row["block_mask_speedup"] = _ratio(g("torch_flex_block_mask_ms"), g("hf_flex_block_mask_ms"))
    return row


def merge(docs: list[dict], names: list[str]) -> dict:
    """Merge bench result dicts (in order: a later one wins); ``names`` label them in error messages
    and, as ``source`` (the file's base name), every kernel and e2e row taken from them."""
    for k in VERSION_KEYS:
        vals = {n: d.get(k) for n, d in zip(names, docs)}
        if len(set(map(json.dumps, vals.values()))) > 1:
            raise SystemExit(f"inputs disagree on {k!r}: " + ", ".join(f"{n}: {v!r}" for n, v in vals.items()))
    res = {k: docs[0].get(k) for k in VERSION_KEYS}
    dates = sorted({d["date"] for d in docs if d.get("date")})
    res["date"] = dates[-1] if dates else None
    if len(dates) > 1:
        res["dates"] = dates
    kernel, e2e, rec = {}, {}, {}
    for n, d in zip(names, docs):
        for r in d.get("kernel") or []:
            kernel[tuple(r.get(k) for k in KERNEL_KEY)] = dict(r, source=os.path.basename(n))
        for r in d.get("e2e") or []:
            e2e[r["S"]] = dict(r, source=os.path.basename(n))
        if d.get("recompiles_over_50_lengths") is not None:
            rec[n] = d["recompiles_over_50_lengths"]
        for k, v in d.items():
            if k not in (*VERSION_KEYS, "date", "kernel", "e2e", "recompiles_over_50_lengths") and (
                v is not None or k not in res
            ):
                res[k] = v
    if len(set(rec.values())) > 1:
        raise SystemExit("inputs disagree on 'recompiles_over_50_lengths': "
                         + ", ".join(f"{n}: {v!r}" for n, v in rec.items()))
    res["kernel"] = [add_ratios(r) for r in kernel.values()]
    res["e2e"] = [e2e[s] for s in sorted(e2e)]
    res["recompiles_over_50_lengths"] = next(iter(rec.values()), None)
    return res


def _f(x, spec):
    if x is None or isinstance(x, bool) or not isinstance(x, (int, float)):
        return NULL
    try:
        return format(x, spec)
    except ValueError:  # e.g. a float where an int was expected
        return str(x)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def render(res: dict, card: str | None = None) -> str:
    vers = ", ".join(f"{k} {res[k]}" for k in ("torch", "triton", "transformers", "python") if res.get(k))
    lines = [f"### {card + ': ' if card else ''}{res.get('device')} ({vers}), {res.get('date')}", ""]
    if res.get("kernel"):
        hdr = ["case", "B", "Hq/Hkv", "S", "D", "density", "hf_flex fwd", "torch flex fwd", "SDPA fwd",
               "fwd ratio", "hf_flex f+b", "torch f+b", "SDPA f+b", "f+b ratio", "hf_flex mask ms",
               "torch mask ms"]
        rows = []
        for r in res["kernel"]:
            g = r.get
            rows.append([
                g("case", NULL), _f(g("B"), "d"), f"{_f(g('Hq'), 'd')}/{_f(g('Hkv'), 'd')}", _f(g("S"), "d"),
                _f(g("D"), "d"), _f(g("density"), ".3f"),
                _f(g("hf_flex_fwd_tflops"), ".0f"), _f(g("torch_flex_fwd_tflops"), ".0f"),
                _f(g("sdpa_fwd_tflops"), ".0f"), _f(g("fwd_ratio_vs_torch_flex"), ".2f"),
                _f(g("hf_flex_fwdbwd_tflops"), ".0f"), _f(g("torch_flex_fwdbwd_tflops"), ".0f"),
                _f(g("sdpa_fwdbwd_tflops"), ".0f"), _f(g("fwdbwd_ratio_vs_torch_flex"), ".2f"),
                _f(g("hf_flex_block_mask_ms"), ".3f"), _f(g("torch_flex_block_mask_ms"), ".3f"),
            ])
        lines += ["Kernels (TFLOP/s; ratio = hf_flex / torch flex):", ""] + _table(hdr, rows) + [""]
    if res.get("e2e"):
        hdr = ["S", "floor tok/s", "hf_flex", "flex_attention", "sdpa_packed", "overhead ratio vs flex_attention",
               "vs sdpa_packed", "first step hf_flex s", "flex_attention s", "peak GiB hf_flex", "flex_attention",
               "check"]
        rows, errors = [], []
        for r in res["e2e"]:
            g = r.get
            rows.append([
                _f(g("S"), "d"), *(_f(g(f"{v}_tokens_per_s"), ",.0f") for v in
                                   ("floor", "hf_flex", "flex_attention", "sdpa_packed")),
                _f(g("hf_flex_overhead_over_flex_attention"), ".3f"), _f(g("hf_flex_overhead_over_sdpa_packed"), ".3f"),
                _f(g("hf_flex_first_step_s"), ".2f"), _f(g("flex_attention_first_step_s"), ".2f"),
                _f(g("hf_flex_peak_gib"), ".2f"), _f(g("flex_attention_peak_gib"), ".2f"),
                {True: "pass", False: "FAIL"}.get(g("correctness_check_passed"), NULL),
            ])
            errors += [f"- S={g('S')} {k}: {v}" for k, v in r.items() if k.endswith("_error")]
        lines += ["End to end (one packed training step; overhead = step time - floor step time):", ""]
        lines += _table(hdr, rows) + [""] + (errors + [""] if errors else [])
    bt = res.get("block_tables")
    if isinstance(bt, dict) and "error" in bt:
        lines.append(f"block tables: {bt['error']}")
    elif isinstance(bt, dict) and bt:
        g = bt.get
        speed = g("speedup_from_position_ids") or _ratio(g("torch_create_block_mask_ms"),
                                                         g("hf_flex_from_position_ids_ms"))
        line = (f"block tables (S={g('S')}, {g('n_docs')} docs): hf_flex from position_ids "
                f"{_f(g('hf_flex_from_position_ids_ms'), '.3f')} ms, from ids {_f(g('hf_flex_packed_ms'), '.3f')} ms, "
                f"torch create_block_mask {_f(g('torch_create_block_mask_ms'), '.3f')} ms "
                f"({_f(speed, '.1f')}x from position_ids)")
        parts = [f"{name} {_f(g(f'hf_flex_{key}_gpu_ms'), '.3f')} / {_f(g(f'hf_flex_{key}_host_ms'), '.3f')}"
                 for key, name in (("from_position_ids", "from position_ids"), ("packed", "from ids"))
                 if f"hf_flex_{key}_gpu_ms" in bt or f"hf_flex_{key}_host_ms" in bt]
        lines.append(line + ("; GPU / host ms: " + ", ".join(parts) if parts else ""))
    rec = res.get("recompiles") if isinstance(res.get("recompiles"), dict) else {}
    note = rec.get("reason") or rec.get("error")
    lines.append(f"recompiles over 50 lengths: {_f(res.get('recompiles_over_50_lengths'), 'd')}"
                 + (f" ({note})" if note else ""))
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="bench JSON files, in order (a later one wins)")
    ap.add_argument("--out", required=True, help="merged JSON, e.g. tests/benchmarks/results/<card>.json")
    ap.add_argument("--markdown", default=None, help="also write the Markdown here")
    args = ap.parse_args(argv)
    docs = []
    for p in args.inputs:
        with open(p) as fh:
            docs.append(json.load(fh))
    res = merge(docs, args.inputs)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1)
    md = render(res, card=os.path.splitext(os.path.basename(args.out))[0])
    print(md, end="")
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(md)
    return res


if __name__ == "__main__":
    main()
