"""Which per-batch mask tensors (document spans) outlive their training step, and what holds them (CUDA).

    python scripts/probe_alive.py [--S 4096] [--steps 4]

The end-to-end benchmark's model and loop (hf_flex.bench_e2e, the last step's output kept until the next
step's forward returns), hf_flex.mods.document_spans wrapped to remember (weakly) each spans tensor and
the step that made it. At the first attention backward of every step (the step's activations all
alive) it prints the spans still alive, their step, and the chain of objects referring to each
(gc.get_referrers, --depth levels: functions with their free variables, frames with their code
location, containers with the types they hold).
"""
from __future__ import annotations

import argparse
import gc
import types
import weakref

import torch

import hf_flex  # noqa: F401  (registers attn_implementation="flex")
from hf_flex import autograd as hf_autograd
from hf_flex import bench_e2e as e2e
from hf_flex import mods


def _describe(o) -> str:
    """A referrer in a few words: functions by name and free variables, frames by code location."""
    t = type(o).__name__
    if isinstance(o, types.FunctionType):
        return f"function {o.__module__}.{o.__qualname__} (free variables {o.__code__.co_freevars})"
    if isinstance(o, types.FrameType):
        return f"frame {o.f_code.co_name} at {o.f_code.co_filename}:{o.f_lineno}"
    if isinstance(o, types.CellType):
        try:
            return f"cell holding {type(o.cell_contents).__name__}"
        except ValueError:
            return "empty cell"
    if isinstance(o, dict):
        return f"dict(keys={list(o)[:6]!r})"[:160]
    if isinstance(o, (list, tuple)):
        return f"{t}(len={len(o)}: {', '.join(type(x).__name__ for x in o[:6])})"
    return f"{t} {repr(o)[:100]}"


def _chain(obj, depth: int, seen: set, indent: str):
    """Print the objects referring to ``obj``, ``depth`` levels up (gc.get_referrers), skipping this
    module's own frames and containers (``seen``)."""
    if depth == 0:
        return
    refs = gc.get_referrers(obj)
    seen.add(id(refs))  # the list get_referrers returns refers to obj too
    for r in refs:
        if type(r).__name__ == "list_iterator" or id(r) in seen or (isinstance(r, types.FrameType) and r.f_code.co_filename == __file__):
            continue
        seen.add(id(r))
        print(f"{indent}<- {_describe(r)}")
        _chain(r, depth - 1, seen, indent + "   ")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--depth", type=int, default=6, help="levels of referrers printed")
    ap.add_argument("--no-gc", action="store_true", help="disable Python's cyclic garbage collector: spans kept "
                    "only by a reference cycle then accumulate, step after step")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: tiny model (TRITON_INTERPRET=1 for the kernels)")
    a = ap.parse_args()
    cfg, doc_range = (e2e.TINY, e2e.TINY_DOC_RANGE) if a.tiny else (e2e.BIG, e2e.DOC_RANGE)
    made = []  # (weakref, step)
    step_no = {"i": -1}
    orig = mods.document_spans

    def tracked(ids):
        t = orig(ids)
        made.append((weakref.ref(t), step_no["i"]))
        return t

    mods.document_spans = tracked
    reported = set()
    orig_bwd = hf_autograd.FlexAttentionFunction.backward

    def bwd(ctx, dout, dlse):
        if step_no["i"] not in reported:
            reported.add(step_no["i"])
            steps = [s for r, s in made if r() is not None]
            print(f"step {step_no['i']}: first attention backward; spans alive: {steps} (made so far {len(made)})")
            for r, s in made:  # only weak references here: no container of ours refers to the spans
                if s != step_no["i"] and r() is not None:
                    print(f"  spans of step {s} ({r().numel() * r().element_size()} B) held by:")
                    _chain(r(), a.depth, {id(made)}, "    ")
        return orig_bwd(ctx, dout, dlse)

    hf_autograd.FlexAttentionFunction.backward = staticmethod(bwd)
    device = torch.device("cpu" if a.tiny else "cuda")
    ids, pos, labels, _ = e2e.packed_row(a.S, a.S, cfg["vocab_size"], doc_range)
    ids, pos, labels = ids.to(device), pos.to(device), labels.to(device)
    model = e2e._build_model(cfg, "flex", device, torch.float32 if a.tiny else torch.bfloat16)

    def on_step(i):
        step_no["i"] = i + 1

    step_no["i"] = 0
    if a.no_gc:
        gc.disable()
    e2e._train_steps(model, [(ids, pos, labels)] * a.steps, device, on_step)


if __name__ == "__main__":
    main()
