"""Where hf_flex's host time goes in one forward+backward (Python, allocations, launch preparation):
cProfile over many calls of one anchor case, the GPU kept busy so the host never waits on it.

    python scripts/profile_host.py [--case 4] [--calls 200] [--top 35]
    python scripts/profile_host.py --block-tables [--calls 2000]   # packed_block_mask from position_ids

The bench's forward+backward turns host-bound where the host's enqueue time nears the kernels' GPU
time (document masks: profile_kernels.py measured 1.27 ms host against 1.34 ms GPU); this names the
Python functions that time is spent in, for both libraries.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import time

import torch

from hf_flex import bench


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", type=int, default=4)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--top", type=int, default=35)
    ap.add_argument("--block-tables", action="store_true",
                    help="profile hf_flex.packed_block_mask(position_ids=...) (the bench's block-table case) instead")
    a = ap.parse_args()
    if a.block_tables:
        return block_tables(a)
    c = bench.ANCHORS[a.case]
    st = bench.setup(c, seed=0)
    for name, f in (("hf_flex", st.ours), ("torch_flex", st.theirs)):
        call = bench.fwdbwd_call(f, st.q, st.k, st.v, st.do)
        fwd = lambda: f(st.q, st.k, st.v)  # noqa: E731
        for _ in range(5):
            call()
        torch.cuda.synchronize()
        for what, fn in (("forward", fwd), ("forward+backward", call)):
            _host_ms(f"{name} {what}", fn, a.calls)
        _profile(f"{name}: {c.name}, {a.calls} forward+backward calls", call, a)


def _host_ms(label, fn, calls):
    """Host time per call of ``fn`` in ms with the GPU asleep (it never waits on it), printed with the GC
    time under ``label`` (None: not printed). Keep ``calls`` x launches per call below ~1000: past the
    GPU's queue of pending launches, a launch blocks and this times the blocking."""
    gc_s = [0.0, 0]

    def gc_cb(phase, info, t=[0.0]):  # time in Python's garbage collector
        if phase == "start":
            t[0] = time.perf_counter()
        else:
            gc_s[0] += time.perf_counter() - t[0]
            gc_s[1] += 1

    gc.callbacks.append(gc_cb)
    torch.cuda._sleep(2_000_000_000)  # keep the GPU busy: the host never waits on it
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e3
    gc.callbacks.remove(gc_cb)
    torch.cuda.synchronize()
    if label is not None:
        print(f"{label}: {host:.3f} ms host per call ({gc_s[1]} collections, "
              f"{gc_s[0] / calls * 1e3:.3f} ms per call in them; {len(gc.get_objects())} objects tracked)")
    return host


def _profile(title, fn, a):
    """cProfile of ``a.calls`` calls of ``fn`` behind a sleeping GPU: top functions by own and cumulative time."""
    torch.cuda._sleep(2_000_000_000)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(a.calls):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    for order in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats(order).print_stats(a.top)
        print(f"== {title}, by {order}")
        print("\n".join(s.getvalue().splitlines()[:a.top + 12]))


def block_table_call():
    """The bench's block-table case (S=16384, 24 documents): a call of packed_block_mask from
    position_ids, warmed up (compiled)."""
    import hf_flex
    from hf_flex.transformers.recognize import positions_in_documents

    pos = positions_in_documents(bench.doc_ids(1, 16384, 24))
    fn = lambda: hf_flex.packed_block_mask(position_ids=pos)  # noqa: E731
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    return fn


def block_tables(a):
    fn = block_table_call()
    _host_ms("hf_flex packed_block_mask(position_ids)", fn, a.calls)
    _profile(f"packed_block_mask(position_ids), {a.calls} calls", fn, a)


if __name__ == "__main__":
    main()
