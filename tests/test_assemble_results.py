"""scripts/assemble_results.py (CPU): merging bench JSON files, the ratio fields, the Markdown."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("assemble_results", os.path.join(ROOT, "scripts", "assemble_results.py"))
ar = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ar)

VERSIONS = dict(device="NVIDIA H100 80GB HBM3", torch="2.11.0+cu130", triton="3.6.0", transformers="5.17.0",
                python="3.12.3")


def kernel_row(case, S, fwd, torch_fwd, sdpa_fwd, fb, torch_fb, sdpa_fb, mask, torch_mask):
    return dict(case=case, B=2, Hq=16, Hkv=16, S=S, D=128, density=0.5, hf_flex_fwd_tflops=fwd,
                torch_flex_fwd_tflops=torch_fwd, hf_flex_fwdbwd_tflops=fb, torch_flex_fwdbwd_tflops=torch_fb,
                sdpa_fwd_tflops=sdpa_fwd, sdpa_fwdbwd_tflops=sdpa_fb, hf_flex_block_mask_ms=mask,
                torch_flex_block_mask_ms=torch_mask, rel_err_vs_torch_flex=1e-3)


def e2e_row(S, hf_tok, overhead_flex=None, passed=True):
    row = {"S": S, "device_kind": "cuda", "dtype": "bfloat16", "n_docs": 7, "correctness_check_passed": passed,
           "triton_cache": "fresh", "hf_flex_overhead_over_flex_attention": overhead_flex,
           "hf_flex_overhead_over_sdpa_packed": 0.25}
    for v, tok in (("floor", 40000.0), ("hf_flex", hf_tok), ("flex_attention", 20000.0), ("sdpa_packed", None)):
        row[f"{v}_tokens_per_s"] = tok
        row[f"{v}_first_step_s"] = None if tok is None else 1.5
        row[f"{v}_peak_gib"] = None if tok is None else 10.0
    row["sdpa_packed_error"] = "CUDA out of memory: boom"
    return row


def bench_a():
    return dict(
        VERSIONS, date="2026-11-26",
        kernel=[kernel_row("causal", 8192, 300.0, 200.0, 400.0, 210.0, 140.0, None, 0.5, 3.0),
                kernel_row("softcap 50 + causal", 8192, None, None, None, None, None, None, None, None)],
        e2e=[e2e_row(4096, 30000.0, 0.5), e2e_row(16384, 11111.0, 0.9)],
        recompiles_over_50_lengths=0,
        recompiles={"variant": "recompiles", "steps": 50, "recompiles": 0, "recompiles_all_kernels": 0},
        block_tables=dict(device=VERSIONS["device"], S=16384, n_docs=24, hf_flex_from_position_ids_ms=0.25,
                          hf_flex_from_position_ids_gpu_ms=0.125, hf_flex_from_position_ids_host_ms=0.0625,
                          hf_flex_packed_ms=0.2, torch_create_block_mask_ms=10.0, speedup_from_position_ids=40.0),
    )


def bench_b():  # `--e2e-only --no-recompiles` at 16384 and 2048, plus one re-measured kernel case
    return dict(
        VERSIONS, date="2026-11-27",
        kernel=[kernel_row("causal", 8192, 360.0, 240.0, None, 210.0, 140.0, None, 0.5, 3.0)],
        e2e=[e2e_row(16384, 22222.0, 0.5), e2e_row(2048, 33333.0)],
        recompiles_over_50_lengths=None,
    )


def write(tmp_path, name, d):
    p = tmp_path / name
    p.write_text(json.dumps(d))
    return str(p)


def test_merge_ratios_and_markdown(tmp_path, capsys):
    a, b = write(tmp_path, "a.json", bench_a()), write(tmp_path, "b.json", bench_b())
    out, md = tmp_path / "res" / "h100.json", tmp_path / "h100.md"
    res = ar.main([a, b, "--out", str(out), "--markdown", str(md)])
    assert json.loads(out.read_text()) == res
    assert res["device"] == VERSIONS["device"] and res["python"] == "3.12.3"
    assert res["date"] == "2026-11-27" and res["dates"] == ["2026-11-26", "2026-11-27"]
    # e2e: merged by S, sorted, the later file wins at 16384
    assert [r["S"] for r in res["e2e"]] == [2048, 4096, 16384]
    assert [r["hf_flex_tokens_per_s"] for r in res["e2e"]] == [33333.0, 30000.0, 22222.0]
    # every row names the file it came from
    assert [r["source"] for r in res["e2e"]] == ["b.json", "a.json", "b.json"]
    # kernel: deduplicated, the later file wins; the null row kept
    assert [r["case"] for r in res["kernel"]] == ["causal", "softcap 50 + causal"]
    k, nul = res["kernel"]
    assert [r["source"] for r in res["kernel"]] == ["b.json", "a.json"]
    assert k["hf_flex_fwd_tflops"] == 360.0
    assert k["fwd_ratio_vs_torch_flex"] == 1.5 and k["fwdbwd_ratio_vs_torch_flex"] == 1.5
    assert k["fwd_ratio_vs_sdpa"] is None and k["block_mask_speedup"] == 6.0
    assert all(nul[f] is None for f in ("fwd_ratio_vs_torch_flex", "fwdbwd_ratio_vs_torch_flex",
                                        "fwd_ratio_vs_sdpa", "block_mask_speedup"))
    # extra fields of the inputs kept; the recompile count from the file that has it
    assert res["recompiles_over_50_lengths"] == 0 and res["recompiles"]["steps"] == 50
    assert res["block_tables"]["speedup_from_position_ids"] == 40.0

    text = md.read_text()
    assert capsys.readouterr().out == text
    lines = text.splitlines()
    assert lines[0] == ("### h100: NVIDIA H100 80GB HBM3 (torch 2.11.0+cu130, triton 3.6.0, transformers 5.17.0, "
                        "python 3.12.3), 2026-11-27")
    assert ("| causal | 2 | 16/16 | 8192 | 128 | 0.500 | 360 | 240 | – | 1.50 | 210 | 140 | – | 1.50 "
            "| 0.500 | 3.000 |") in lines
    assert "| softcap 50 + causal | 2 | 16/16 | 8192 | 128 | 0.500 |" + " – |" * 10 in lines
    assert "| 16384 | 40,000 | 22,222 | 20,000 | – | 0.500 | 0.250 | 1.50 | 1.50 | 10.00 | 10.00 | pass |" in lines
    assert "| 2048 | 40,000 | 33,333 | 20,000 | – | – | 0.250 | 1.50 | 1.50 | 10.00 | 10.00 | pass |" in lines
    assert "- S=4096 sdpa_packed_error: CUDA out of memory: boom" in lines
    assert ("block tables (S=16384, 24 docs): hf_flex from position_ids 0.250 ms, from ids 0.200 ms, "
            "torch create_block_mask 10.000 ms (40.0x from position_ids); GPU / host ms: "
            "from position_ids 0.125 / 0.062") in lines
    assert lines[-1] == "recompiles over 50 lengths: 0"


def test_e2e_only_null_safe(tmp_path):
    d = bench_b()
    d["kernel"] = []
    d["e2e"] = [{"S": 4096, "correctness_check_passed": None}]  # a row with nothing measured
    res = ar.main([write(tmp_path, "b.json", d), "--out", str(tmp_path / "x.json")])
    text = ar.render(res)
    assert "| 4096 | – | – | – | – | – | – | – | – | – | – | – |" in text.splitlines()
    assert "Kernels" not in text and "block tables" not in text
    assert text.splitlines()[-1] == "recompiles over 50 lengths: –"


def test_version_mismatch(tmp_path):
    a = write(tmp_path, "a.json", bench_a())
    b = write(tmp_path, "b.json", dict(bench_b(), triton="3.5.0"))
    with pytest.raises(SystemExit, match=r"'triton'.*a\.json: '3\.6\.0'.*b\.json: '3\.5\.0'"):
        ar.main([a, b, "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_recompiles_disagree(tmp_path):
    a = write(tmp_path, "a.json", bench_a())
    b = write(tmp_path, "b.json", dict(bench_b(), recompiles_over_50_lengths=3))
    with pytest.raises(SystemExit, match="recompiles_over_50_lengths"):
        ar.main([a, b, "--out", str(tmp_path / "x.json")])


def test_old_bench_file(tmp_path):
    """The first H100 bench output (kernel rows only, no e2e / recompiles keys) renders."""
    old = os.path.join(ROOT, "tests", "benchmarks", "results", "h100_first_bench_2026-11-25.json")
    res = ar.main([old, "--out", str(tmp_path / "h100.json")])
    assert len(res["kernel"]) == 8 and res["e2e"] == [] and res["recompiles_over_50_lengths"] is None
    soft = res["kernel"][-1]
    assert soft["case"] == "softcap 50 + causal" and soft["fwd_ratio_vs_sdpa"] is None
    assert soft["fwd_ratio_vs_torch_flex"] == soft["hf_flex_fwd_tflops"] / soft["torch_flex_fwd_tflops"]
    text = ar.render(res)
    assert "| softcap 50 + causal | 2 | 16/16 | 8192 | 128 | 0.500 | 219 | 191 | – | 1.15 |" in text
