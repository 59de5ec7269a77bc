"""Which kernels the end-to-end model's attention takes, and that it agrees with the Triton kernels.

    python scripts/probe_e2e_paths.py [--S 16384] [--layers 2] [--knob gluon_token_major]

Builds hf_flex.bench_e2e's Llama-shaped model (its BIG config, ``--layers`` layers) with
attn_implementation="flex", runs one forward and backward on a packed row of bench_e2e.packed_row, and
counts the calls of the Gluon forwards and backwards (document-aligned, causal; the rest run the Triton
kernels) and the layouts of the q they got (warm-ups included: kernels.compile_ahead); then runs the
same step with SCHEDULE[--knob] off (gluon_token_major: the Triton kernels; gluon_varlen_fwd: the
Triton document forward) and prints the largest relative difference of every parameter's gradient and
the loss's. Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_flex import bench_e2e  # noqa: E402
from hf_flex.kernels import gluon_causal, gluon_forward, gluon_varlen, launch  # noqa: E402


def _counting(module, name, counts, key, layouts):
    real = getattr(module, name)

    def wrapped(q, *args, **kwargs):
        counts[key] = counts.get(key, 0) + 1
        layouts.add(gluon_causal.layout(q) or f"other {tuple(q.stride())}")
        return real(q, *args, **kwargs)

    setattr(module, name, wrapped)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, default=16384)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--knob", default="gluon_token_major", help="the SCHEDULE knob on, then off")
    args = ap.parse_args()
    cfg = dict(bench_e2e.BIG, num_hidden_layers=args.layers)
    device = torch.device("cuda")
    ids, pos, labels, lens = bench_e2e.packed_row(args.S, 0, cfg["vocab_size"])
    ids, pos, labels = ids.to(device), pos.to(device), labels.to(device)
    counts, layouts = {}, set()
    _counting(gluon_varlen, "varlen_backward", counts, "gluon_varlen", layouts)
    _counting(gluon_causal, "causal_backward", counts, "gluon_causal", layouts)
    _counting(gluon_varlen, "varlen_forward", counts, "gluon_varlen_fwd", layouts)
    _counting(gluon_forward, "causal_forward", counts, "gluon_fwd", layouts)
    grads = {}
    for token_major in (True, False):
        launch.SCHEDULE[args.knob] = token_major
        model = bench_e2e._build_model(cfg, "flex", device, torch.bfloat16)
        loss = model(input_ids=ids, position_ids=pos, labels=labels, use_cache=False).loss
        loss.backward()
        grads[token_major] = (loss.item(), {n: p.grad.float() for n, p in model.named_parameters()})
        if token_major:
            print(f"S={args.S}, {len(lens)} documents, {args.layers} layers; calls: {counts}; q layouts: {layouts}")
        del model
    (l_on, g_on), (l_off, g_off) = grads[True], grads[False]
    worst = max(((g_on[n] - g_off[n]).abs().max() / g_off[n].abs().max().clamp_min(1e-30)).item() for n in g_on)
    print(f"loss {l_on:.6f} ({args.knob} on) against {l_off:.6f} (off); largest relative gradient difference "
          f"{worst:.3e}")


if __name__ == "__main__":
    main()
