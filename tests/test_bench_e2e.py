"""CPU self-check of the end-to-end benchmark (`python -m hf_flex.bench --tiny`): runs it in a subprocess
(tiny Llama, S=128, Triton's interpreter) and checks the JSON has issue 5's schema and sane values."""

import json
import os
import sys

from helpers import run_bounded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

E2E_KEYS = {
    "S", "floor_tokens_per_s", "hf_flex_tokens_per_s", "flex_attention_tokens_per_s", "sdpa_packed_tokens_per_s",
    "hf_flex_first_step_s", "flex_attention_first_step_s", "hf_flex_peak_gib", "flex_attention_peak_gib",
    "sdpa_packed_peak_gib", "floor_peak_gib", "hf_flex_overhead_over_flex_attention",
    "hf_flex_overhead_over_sdpa_packed", "correctness_check_passed",
}


def test_bench_tiny_json(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)  # the bench sets it in its own subprocesses
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU self-check also on a GPU machine (the GPU run is the real bench)
    cmd = [sys.executable, "-m", "hf_flex.bench", "--tiny", "--e2e-S", "128", "--e2e-steps", "1",
           "--recompile-steps", "2", "--json", str(out)]
    p = run_bounded(cmd, 300, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    for k in ("device", "torch", "triton", "transformers", "date", "kernel", "e2e", "recompiles_over_50_lengths"):
        assert k in res, k
    assert res["device"] == "cpu" and res["kernel"] == []
    assert res["recompiles_over_50_lengths"] is None  # interpreter: nothing compiled; and only 2 steps
    rec = res["recompiles"]
    assert "error" not in rec, rec
    assert rec["steps"] == 2 and rec["losses_finite"] and len(set(rec["lengths"])) == 2
    (row,) = res["e2e"]
    assert E2E_KEYS <= set(row), E2E_KEYS - set(row)
    assert row["S"] == 128
    for v in ("floor", "hf_flex", "sdpa_packed"):
        assert row[f"{v}_tokens_per_s"] > 0, (v, row.get(f"{v}_error"))
        assert row[f"{v}_first_step_s"] > 0
        assert row[f"{v}_triton_cache_empty"] is True  # fresh TRITON_CACHE_DIR per subprocess
    assert row["flex_attention_tokens_per_s"] is None and "CUDA" in row["flex_attention_error"]
    # the correctness check ran against the per-document eager truth, and was able to see a document leak
    assert row["correctness_check_passed"] is True
    for v in ("hf_flex", "sdpa_packed"):
        chk = row[f"{v}_check"]
        assert chk["passed"] and chk["rel_err"] < 1e-4, chk
    assert row["hf_flex_check"]["check_sensitive"], row["hf_flex_check"]
    assert row["hf_flex_overhead_over_sdpa_packed"] is not None
    # step times from the run taking the variants' steps in turn (one model, one process)
    assert row["step_times"] == "interleaved", row.get("interleaved_error")
    assert row["interleaved_rounds"] == 1 and row["interleaved_turn_steps"] == 2
    for v in ("floor", "hf_flex", "sdpa_packed"):
        # each turn: a step right after the switch of implementation (kept apart), then the timed one
        assert len(row[f"{v}_step_times_ms_interleaved"]) == len(row[f"{v}_step_times_ms_after_switch"]) == 1
        assert row[f"{v}_step_ms"] == row[f"{v}_step_times_ms_interleaved"][0]
        assert row[f"{v}_step_ms_isolated"] > 0
    for v in ("hf_flex", "sdpa_packed"):
        paired = row[f"{v}_step_times_ms_interleaved"][0] - row["floor_step_times_ms_interleaved"][0]
        assert abs(row[f"{v}_overhead_ms"] - paired) < 1e-6
        switched = row[f"{v}_step_times_ms_after_switch"][0] - row["floor_step_times_ms_after_switch"][0]
        assert abs(row[f"{v}_overhead_ms_after_switch"] - switched) < 1e-6
    assert "end to end" in p.stdout and "| pass" in p.stdout
