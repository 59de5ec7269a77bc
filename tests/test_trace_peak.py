"""scripts/trace_peak.py's replay of allocator events (the device run reads real snapshots)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import trace_peak  # noqa: E402


def _f(filename, line, name):
    return {"filename": filename, "line": line, "name": name}


def test_peak_breakdown_finds_the_peak_and_its_live_blocks():
    ours = [_f("/x/torch/nn/functional.py", 1, "linear"), _f("/r/hf_flex/kernels/launch.py", 240, "flex_backward")]
    theirs = [_f("/x/torch/_inductor/x.py", 9, "call")]
    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": ours},
        {"action": "alloc", "addr": 2, "size": 50, "frames": theirs},
        {"action": "free_requested", "addr": 1, "size": 100},
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 3, "size": 120, "frames": ours},
        {"action": "alloc", "addr": 4, "size": 10, "frames": []},
        {"action": "free_requested", "addr": 99, "size": 1000},  # alive before the trace: not replayed
        {"action": "free_requested", "addr": 3, "size": 120},
        {"action": "alloc", "addr": 5, "size": 60, "frames": theirs},
    ]
    r = trace_peak.peak_breakdown(events, start_bytes=7)
    assert r["peak_bytes"] == 7 + 50 + 120 + 10
    assert r["groups"] == {
        "kernels/launch.py:240 flex_backward": [120, 1],  # the innermost frame in hf_flex, not torch's
        "_inductor/x.py:9 call": [50, 1],
        "<no python frame>": [10, 1],
    }
