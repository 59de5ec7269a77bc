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


def test_blocks_alive_before_the_trace_leave_the_total_when_freed():
    """A block allocated before the trace (counted in start_bytes) and freed during it lowers the running
    total: the peak is where the allocated bytes really peaked, not a sum that never existed."""
    here = [_f("/r/hf_flex/kernels/launch.py", 290, "flex_forward")]
    events = [
        {"action": "free_requested", "addr": 99, "size": 1000},  # alive before the trace
        {"action": "free_completed", "addr": 99, "size": 1000},
        {"action": "alloc", "addr": 1, "size": 600, "frames": here},
        {"action": "alloc", "addr": 2, "size": 300, "frames": here},
    ]
    r = trace_peak.peak_breakdown(events, start_bytes=1500)
    assert r["peak_bytes"] == 1500  # before the free; 1500 - 1000 + 900 = 1400 later
    assert r["groups"] == {}
    r = trace_peak.peak_breakdown(events + [{"action": "alloc", "addr": 3, "size": 200, "frames": here}], 1500)
    assert r["peak_bytes"] == 1600
    assert r["groups"] == {"kernels/launch.py:290 flex_forward": [1100, 3]}
    assert r["stacks"] == {"kernels/launch.py:290 flex_forward": ["launch.py:290 flex_forward"]}
