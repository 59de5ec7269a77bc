"""End-to-end benchmark: one packed training step of a Llama-shaped model, per attention implementation.

    python -m hf_flex.bench --e2e-only [--e2e-S 4096,16384] [--e2e-steps 10] [--json out.json]
    python -m hf_flex.bench --tiny            # CPU self-check: tiny model, Triton's interpreter

What is measured (notes/anchors.md, "End to end"): the 0.67B Llama-shaped model (hidden 2048, 12
layers, 16 heads, 8 KV heads, intermediate 5632, vocab 32000) built from a LlamaConfig with random
init (seed 0, identical in every process), **bf16 weights** (the model is cast to bfloat16; no
autocast; AdamW on the bf16 parameters), one packed row of S tokens: documents of uniform random
length 64-2047 (the last one cut to fit), position_ids restarting at every document, labels -100 at
every document start, ``use_cache=False``. A training step is zero_grad + forward with labels +
backward + ``torch.optim.AdamW.step()``, synchronised.

Variants, each in its own fresh subprocess (clean compile caches, clean CUDA memory statistics; a
crash, OOM or timeout of one is recorded as null with its reason and does not stop the others):

- ``floor``: attention replaced by a registered function ("free_attention") that costs ~nothing but
  keeps the graph: output = query (plus 0 * sum of key and value, so the K/V projections still get
  their backward). No attention implementation can beat it; overhead = step time - floor step time.
- ``hf_flex``: attn_implementation="flex" (this package).
- ``flex_attention``: Transformers' own torch FlexAttention path (torch.compile inside). CUDA only.
- ``sdpa_packed``: attn_implementation="sdpa" with position_ids: Transformers detects the packed
  row and builds a dense S x S mask.

Then, by default, one more process takes the floor's and every passing variant's training steps in
turn on one model (``interleaved``: the order rotated each round; compile caches copied from the
variants' processes): the row's step times and overheads come from it, the overhead of a variant being
the median over rounds of its step minus the floor's step of the same round, so that a slow or noisy
moment of the machine weighs on both sides of the difference. The separate processes' step times stay
in the row as ``<variant>_step_ms_isolated``; ``step_times`` says which the headline fields hold.

Per variant: ``first_step_s`` (wall time of the first training step from a cold start in that
process: model built and on the device, nothing run yet; for hf_flex it includes Triton compilation
unless the Triton cache was warm, for flex_attention torch.compile/inductor), then ``step_s`` = the
median of ``steps`` further steps, ``tokens_per_s`` = S / step_s, ``peak_gib`` =
torch.cuda.max_memory_allocated from just before the first step to the end / 2**30 (null on CPU), and ``loss`` of the
first step (computed on the initial weights). Cold caches: by default (``cache="fresh"``) every
subprocess gets a new empty TRITON_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR; ``cache="inherit"`` keeps
the environment's (``triton_cache_empty`` records what the process found before importing triton).
To reproduce a cold first step by hand: ``TRITON_CACHE_DIR=$(mktemp -d) TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)``.
``HF_FLEX_E2E_SCHEDULE='{"varlen": false}'`` (JSON) sets hf_flex.kernels.launch.SCHEDULE knobs in every
worker, for an end-to-end A/B of launch schedules; the rows record it (``schedule``).

Correctness (a wrong fast run is not a result): a separate ``reference`` subprocess computes, on the
same initial weights and row, the truth -- eager attention run on each document separately, the
token-weighted mean of the per-document losses (== what a correct packed loss is, see
notes/transformers.md) -- and a known-wrong "leak" loss: sdpa with the cache left on, which skips
packed-sequence detection and attends across documents. A variant passes when its first-step loss is
within ``tol`` (relative; 3e-4 in bf16, ~20x the spread measured between correct implementations in
notes/anchors.md, and below the 8e-4 a document leak moved the loss at 16k there; 1e-5 in fp32) of
the truth and closer to it than the leak is (the latter is enforced only
where the leak is itself farther than ``tol``: ``check_sensitive`` says whether it was). A variant that
fails has its numbers nulled and the reason recorded.

Recompiles (``recompiles_over_50_lengths``): 50 training steps of hf_flex on a small model (2 layers,
same head shapes) whose packed lengths (3000-5000) and document counts all differ; the number of
compiled variants of hf_flex's attention kernels (hf_flex.kernels.launch.compiled_variants) after the
last step minus after the first. Also reported: the same over every hf_flex Triton kernel (block
tables too) and the step times (a recompile shows as a step of seconds). Under Triton's interpreter
nothing is compiled: the count is null there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# ---------------------------------------------------------------- configuration (no torch needed)

BIG = dict(
    hidden_size=2048, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=8,
    intermediate_size=5632, vocab_size=32000,
)
RECOMPILE_MODEL = dict(BIG, num_hidden_layers=2)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=256)

VARIANTS = ("floor", "hf_flex", "flex_attention", "sdpa_packed")
CUDA_ONLY = {"flex_attention": "Transformers' flex_attention path needs CUDA (torch.compile of FlexAttention)"}
ATTN = {"floor": "free_attention", "hf_flex": "flex", "flex_attention": "flex_attention", "sdpa_packed": "sdpa"}
DOC_RANGE = (64, 2047)
TINY_DOC_RANGE = (8, 60)
TINY_S = (256,)


def _default_cache_dirs():
    triton = os.environ.get("TRITON_CACHE_DIR") or os.path.join(
        os.environ.get("TRITON_HOME") or os.path.expanduser("~"), ".triton", "cache"
    )
    return triton


def _dir_empty(path) -> bool:
    return not os.path.isdir(path) or not any(os.scandir(path))


# ---------------------------------------------------------------- data


def packed_row(S: int, seed: int, vocab: int, doc_range=DOC_RANGE, n_docs=None):
    """One packed row: (input_ids [1, S], position_ids [1, S], labels [1, S], document lengths).

    Documents of uniform random length in doc_range (the last cut to fit), or, given n_docs, n_docs
    documents at distinct random cut points. position_ids restart at 0 in each document; labels are the
    input ids with -100 at each document start (ForCausalLMLoss shifts them left, so no prediction
    crosses a document boundary).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    if n_docs is None:
        lens, tot = [], 0
        while tot < S:
            n = int(torch.randint(doc_range[0], doc_range[1] + 1, (1,), generator=g))
            n = min(n, S - tot)
            lens.append(n)
            tot += n
    else:
        cuts = torch.sort(torch.randperm(S - 1, generator=g)[: n_docs - 1] + 1).values.tolist()
        b = [0] + cuts + [S]
        lens = [b[i + 1] - b[i] for i in range(n_docs)]
    ids = torch.randint(0, vocab, (1, S), generator=g)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    labels = ids.clone()
    labels[pos == 0] = -100
    return ids, pos, labels, lens


# ---------------------------------------------------------------- worker side (runs in a subprocess)


def _free_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The floor: output = query ([B, Hq, S, D] -> [B, S, Hq, D]); 0 * (sum k + sum v) keeps K/V in the graph."""
    out = query.transpose(1, 2).contiguous()
    return out + (key.sum() + value.sum()) * 0.0, None


def _build_model(cfg: dict, attn: str, device, dtype):
    import copy

    import torch
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

    AttentionInterface.register("free_attention", _free_attention)
    config = LlamaConfig(**copy.deepcopy(cfg), max_position_embeddings=32768, attention_dropout=0.0)
    torch.manual_seed(0)  # same weights in every process (the attention implementation draws nothing)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(dtype)
    model.set_attn_implementation(attn)
    assert model.config._attn_implementation == attn, model.config._attn_implementation
    return model


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _train_steps(model, batches, device, on_step=None):
    """Run one training step per batch; returns (times in s, losses)."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    times, losses = [], []
    for i, (ids, pos, labels) in enumerate(batches):
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, position_ids=pos, labels=labels, use_cache=False)
        out.loss.backward()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(out.loss.item())
        if on_step is not None:
            on_step(i)
    return times, losses


def _kernel_variants_all() -> int:
    """Compiled variants of every Triton kernel in hf_flex.kernels (attention and block tables)."""
    import triton

    from hf_flex.kernels import backward, block_tables, document_tables, forward, varlen
    from hf_flex.kernels.launch import count_variants

    return count_variants(obj for mod in (forward, backward, varlen, block_tables, document_tables)
                          for obj in vars(mod).values() if isinstance(obj, triton.runtime.jit.JITFunction))


def worker(spec: dict, before_steps=None) -> dict:
    """One measurement in this (fresh) process; ``spec`` from :func:`_spawn`. Returns a JSON-able dict.

    ``before_steps``: called (no arguments) in a timed variant right after the peak-memory statistics are
    reset, just before the first step (scripts/trace_peak.py starts its allocator trace there)."""
    res = {"variant": spec["variant"], "S": spec.get("S")}
    res["triton_cache_dir"] = _default_cache_dirs()
    res["triton_cache_empty"] = _dir_empty(res["triton_cache_dir"])  # before triton is imported
    import torch

    device = torch.device(spec["device"])
    dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32
    cfg = spec["model"]
    variant = spec["variant"]
    if variant in ("hf_flex", "recompiles"):
        import hf_flex  # noqa: F401  (registers attn_implementation="flex")
    if os.environ.get("HF_FLEX_E2E_SCHEDULE"):  # an A/B of launch schedules (tests/benchmarks/NOTES.md)
        from hf_flex.kernels.launch import SCHEDULE

        knobs = json.loads(os.environ["HF_FLEX_E2E_SCHEDULE"])
        unknown = set(knobs) - set(SCHEDULE)
        if unknown:
            raise ValueError(f"HF_FLEX_E2E_SCHEDULE: unknown SCHEDULE keys {sorted(unknown)}")
        # (JSON has no tuples: a list stands for a tuple-valued knob, such as gluon_bwd_tiles)
        SCHEDULE.update({k: tuple(x) if isinstance(x, list) else x for k, x in knobs.items()})
        res["schedule"] = knobs
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    if variant == "reference":
        ids, pos, labels, lens = packed_row(spec["S"], spec["seed"], cfg["vocab_size"], tuple(spec["doc_range"]))
        ids, pos, labels = ids.to(device), pos.to(device), labels.to(device)
        model = _build_model(cfg, "eager", device, dtype)
        model.eval()
        tot, n_tok, start = 0.0, 0, 0
        with torch.no_grad():
            for n in lens:
                if n >= 2:
                    sl = slice(start, start + n)
                    lo = model(input_ids=ids[:, sl], labels=labels[:, sl], use_cache=False).loss.item()
                    tot += lo * (n - 1)
                    n_tok += n - 1
                start += n
            res["ref_loss"] = tot / n_tok
            # the known-wrong answer: sdpa with the cache on skips packed detection -> cross-document attention
            model.set_attn_implementation("sdpa")
            res["leak_loss"] = model(input_ids=ids, position_ids=pos, labels=labels, use_cache=True).loss.item()
        res["n_docs"] = len(lens)
        return res

    if variant == "recompiles":
        from hf_flex.kernels.launch import compiled_variants

        n = spec["steps"]
        lo, hi = spec["S_range"]
        g = torch.Generator().manual_seed(1)
        lengths = [lo + (hi - lo) * i // max(n - 1, 1) for i in range(n)]
        lengths = [lengths[i] for i in torch.randperm(n, generator=g).tolist()]
        counts = [2 + i for i in torch.randperm(n, generator=g).tolist()]
        batches = []
        for i, (S, d) in enumerate(zip(lengths, counts)):
            ids, pos, labels, _ = packed_row(S, 100 + i, cfg["vocab_size"], n_docs=min(d, S // 2))
            batches.append((ids.to(device), pos.to(device), labels.to(device)))
        model = _build_model(cfg, "flex", device, dtype)
        marks = {}

        def on_step(i):
            if i == 0:
                marks["attn0"], marks["all0"] = compiled_variants(), _kernel_variants_all()

        times, losses = _train_steps(model, batches, device, on_step)
        attn1, all1 = compiled_variants(), _kernel_variants_all()
        from hf_flex.kernels import interpreted

        res.update(
            steps=n, lengths=lengths, doc_counts=counts,
            attn_variants_after_first=marks["attn0"], attn_variants_after_last=attn1,
            all_variants_after_first=marks["all0"], all_variants_after_last=all1,
            first_step_s=times[0], later_step_s_median=statistics.median(times[1:]) if n > 1 else None,
            later_step_s_max=max(times[1:]) if n > 1 else None,
            interpreted=interpreted(), losses_finite=all(x == x and abs(x) < 1e4 for x in losses),
        )
        if interpreted():
            res["recompiles"] = None
            res["reason"] = "Triton interpreter: nothing is compiled, no variants to count"
        else:
            res["recompiles"] = attn1 - marks["attn0"]
            res["recompiles_all_kernels"] = all1 - marks["all0"]
        return res

    if variant == "interleaved":
        return _interleaved(spec, res, device, dtype)

    # a timed variant
    S = spec["S"]
    ids, pos, labels, lens = packed_row(S, spec["seed"], cfg["vocab_size"], tuple(spec["doc_range"]))
    ids, pos, labels = ids.to(device), pos.to(device), labels.to(device)
    model = _build_model(cfg, ATTN[variant], device, dtype)
    _sync(device)
    if device.type == "cuda":  # the peak of training, not of the fp32 init before the cast
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if before_steps is not None:
        before_steps()
    times, losses = _train_steps(model, [(ids, pos, labels)] * (1 + spec["steps"]), device)
    step = statistics.median(times[1:])
    res.update(
        n_docs=len(lens), loss=losses[0], first_step_s=times[0], step_s=step, step_times_s=times[1:],
        tokens_per_s=S / step,
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        losses_finite=all(x == x and abs(x) < 1e4 for x in losses),
    )
    if variant == "hf_flex":
        from hf_flex.kernels import compile_ahead, interpreted

        res["interpreted"] = interpreted()
        # warm-ups of the backward's kernels that failed (the backward then compiled them itself)
        res["compile_ahead_errors"] = [repr(e) for e in compile_ahead.errors]
    return res


def kernel_times(fn, calls: int = 1) -> dict:
    """{kernel name (90 chars): GPU microseconds per call of ``fn``} over ``calls`` calls (torch.profiler,
    CUDA), largest first. scripts/profile_kernels.py uses it too."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out: dict = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:  # a kernel, memcpy or memset on the GPU
            out[e.name[:90]] = out.get(e.name[:90], 0.0) + e.time_range.elapsed_us() / calls
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _interleaved(spec: dict, res: dict, device, dtype) -> dict:
    """The variants' training steps taken in turn on one model in one process (see :func:`run_e2e`).

    First each variant's forward+backward on the initial weights (no update: its loss is checked against
    the reference, and its kernels compile), then ``warm`` rounds, then ``rounds`` timed rounds of ``turn_steps``
    (default 2) steps per variant, the order rotated every round so that no variant always follows the
    same one. The floor and the variant share the machine's state of the moment (clocks, host load,
    allocator cache): ``overhead_ms`` of a variant is the median over rounds of (its last step of the
    turn - the floor's in the same round). The first step of a turn follows a switch of attention
    implementation (set_attn_implementation, another variant's memory pattern in the allocator), which
    no training run has: those steps are kept apart (``switch_step_times_s``,
    ``overhead_ms_after_switch``; fifteenth round, NOTES.md). With ``profile``, one more step per variant
    under torch.profiler: GPU time per kernel name."""
    import torch

    names = list(spec["variants"])
    if "hf_flex" in names:
        import hf_flex  # noqa: F401  (registers attn_implementation="flex")
    cfg, S = spec["model"], spec["S"]
    ids, pos, labels, lens = packed_row(S, spec["seed"], cfg["vocab_size"], tuple(spec["doc_range"]))
    ids, pos, labels = ids.to(device), pos.to(device), labels.to(device)
    model = _build_model(cfg, ATTN[names[0]], device, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def use(v):
        if model.config._attn_implementation != ATTN[v]:
            model.set_attn_implementation(ATTN[v])

    def step(update=True):
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, position_ids=pos, labels=labels, use_cache=False)
        out.loss.backward()
        if update:
            opt.step()
        return out.loss

    def timed(v, update=True):
        use(v)
        _sync(device)
        t0 = time.perf_counter()
        loss = step(update)
        _sync(device)
        return time.perf_counter() - t0, loss.item()

    loss0 = {v: timed(v, update=False)[1] for v in names}  # initial weights: the parent checks these
    for _ in range(spec["warm"]):
        for v in names:
            timed(v)
    turn = spec.get("turn_steps", 2)
    if turn < 1:
        raise ValueError(f"turn_steps must be at least 1, got {turn}")
    times = {v: [] for v in names}
    after_switch = {v: [] for v in names}
    for r in range(spec["rounds"]):
        for v in names[r % len(names):] + names[: r % len(names)]:
            turn_times = [timed(v)[0] for _ in range(turn)]
            after_switch[v].append(turn_times[0])
            times[v].append(turn_times[-1])
    res.update(n_docs=len(lens), variants=names, rounds=spec["rounds"], warm=spec["warm"], turn_steps=turn)
    for v in names:
        step_s = statistics.median(times[v])
        res[v] = {"loss": loss0[v], "step_s": step_s, "step_times_s": times[v], "tokens_per_s": S / step_s,
                  "switch_step_times_s": after_switch[v]}
        if "floor" in names and v != "floor":
            res[v]["overhead_ms"] = 1e3 * statistics.median([a - b for a, b in zip(times[v], times["floor"])])
            res[v]["overhead_ms_after_switch"] = 1e3 * statistics.median(
                [a - b for a, b in zip(after_switch[v], after_switch["floor"])])
    if spec.get("profile") and device.type == "cuda":
        for v in names:
            use(v)
            res[v]["kernels_us"] = kernel_times(step)
    return res


# ---------------------------------------------------------------- parent side


def _spawn(spec: dict, timeout: float, cache: str, tiny: bool, seed_caches=()) -> dict:
    """Run :func:`worker` in a fresh subprocess; never raises: failures come back as {"error": reason}.

    With ``cache="fresh"`` the subprocess gets new compile caches under a new directory (returned as
    ``cache_root``), first filled with copies of the ``seed_caches`` (earlier results' ``cache_root``)."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    tmp = tempfile.mkdtemp(prefix="hf_flex_e2e_")
    if cache == "fresh":
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton")
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")
        import shutil

        for seed in seed_caches:
            for sub in ("triton", "inductor"):
                if os.path.isdir(os.path.join(seed, sub)):
                    shutil.copytree(os.path.join(seed, sub), os.path.join(tmp, sub), dirs_exist_ok=True)
    if tiny:
        env["TRITON_INTERPRET"] = "1"  # read when triton is first imported, in the worker
        env["CUDA_VISIBLE_DEVICES"] = ""
    out = os.path.join(tmp, "result.json")
    cmd = [sys.executable, "-m", "hf_flex.bench_e2e", "--worker", json.dumps(spec), "--out", out]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    if p.returncode != 0 or not os.path.exists(out):
        tail = (p.stderr or p.stdout or "").strip().splitlines()
        msg = next((ln for ln in reversed(tail) if "Error" in ln or "error" in ln), tail[-1] if tail else "")
        if "out of memory" in (p.stderr or "").lower():
            msg = "CUDA out of memory: " + msg
        return {"error": f"exit {p.returncode}: {msg[-400:]}", "wall_s": wall}
    with open(out) as fh:
        r = json.load(fh)
    r["wall_s"] = wall
    r["cache_root"] = tmp
    return r


def _check(r: dict, ref: dict, tol: float) -> dict:
    """Correctness of a variant's first-step loss against the per-document eager truth."""
    truth, leak, loss = ref["ref_loss"], ref["leak_loss"], r["loss"]
    err = abs(loss - truth)
    leak_err = abs(leak - truth)
    sensitive = leak_err / abs(truth) > tol
    ok = r.get("losses_finite", True) and err / abs(truth) <= tol and (err < leak_err or not sensitive)
    return dict(
        passed=bool(ok), rel_err=err / abs(truth), leak_rel_err=leak_err / abs(truth), check_sensitive=sensitive
    )


def run_e2e(S_list=(4096, 16384), steps=10, tiny=False, timeout=300.0, cache="fresh", tol=None,
            variants=VARIANTS, log=print, on_row=None, jobs=1, interleave=True):
    """The e2e rows (one per S); see the module docstring. ``on_row(rows)`` is called after each row.

    ``interleave``: after the variants' own processes, the floor and every variant that passed take
    their steps in turn on one model in one more process (:func:`_interleaved`, ``steps`` rounds, its
    compile caches copied from theirs); the row's step times, tokens/s and overheads are then that
    run's (the overhead: median over rounds of the step minus the floor's step of the same round), and
    the separate processes' step times stay as ``<variant>_step_ms_isolated`` / ``_tokens_per_s_isolated``.
    Separate processes on a busy or noisy host can differ by more than the overhead being measured (the
    4096-token row moved 3.5 -> 22.5 ms between two runs of one code on one machine, tests/benchmarks/
    NOTES.md); steps taken in turn share the machine's state of the moment."""
    import torch

    cuda = not tiny and torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = "bfloat16" if cuda else "float32"
    tol = tol if tol is not None else (3e-4 if dtype == "bfloat16" else 1e-5)
    cfg = TINY if tiny else BIG
    doc_range = TINY_DOC_RANGE if tiny else DOC_RANGE
    rows = []
    for S in S_list:
        base = dict(S=S, seed=S, device=device, dtype=dtype, model=cfg, doc_range=list(doc_range), steps=steps)
        row = {"S": S, "device_kind": device, "dtype": dtype, "weights": f"{dtype} weights, no autocast"}
        # jobs > 1 (only for the CPU self-check: timings then mean nothing) runs the subprocesses side by side
        todo = ["reference"] + [v for v in VARIANTS if v in variants and (cuda or v not in CUDA_ONLY)]
        if jobs > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(jobs) as ex:
                futs = {v: ex.submit(_spawn, dict(base, variant=v), timeout, cache, tiny) for v in todo}
                got = {v: f.result() for v, f in futs.items()}
        else:
            got = {}
            for v in todo:
                got[v] = _spawn(dict(base, variant=v), timeout, cache, tiny)
                if v == "reference":
                    log(f"  e2e S={S} reference: {got[v].get('ref_loss', got[v].get('error'))}  "
                        f"leak {got[v].get('leak_loss')}")
        ref = got["reference"]
        row["ref_loss"], row["leak_loss"] = ref.get("ref_loss"), ref.get("leak_loss")
        row["n_docs"] = ref.get("n_docs")
        if "error" in ref:
            row["reference_error"] = ref["error"]
        res = {}
        for v in VARIANTS:
            if v not in variants:
                res[v] = {"error": "not requested"}
                continue
            if not cuda and v in CUDA_ONLY:
                res[v] = {"error": "skipped: " + CUDA_ONLY[v]}
                continue
            r = got[v]
            if "error" not in r and v != "floor":
                if "error" in ref:
                    r["check"] = {"passed": False, "reason": "no reference: " + ref["error"]}
                else:
                    r["check"] = _check(r, ref, tol)
                if not r["check"]["passed"]:
                    r["error"] = f"correctness check failed: {r['check']}"
            res[v] = r
            log(f"  e2e S={S} {v}: " + (r["error"] if "error" in r else
                f"{r['tokens_per_s']:,.0f} tok/s, first step {r['first_step_s']:.2f} s, loss {r['loss']:.5f}"))
        ok = lambda v: "error" not in res[v]  # noqa: E731
        inter = None
        together = [v for v in VARIANTS if v in variants and ok(v)]
        if interleave and "floor" in together and len(together) > 1:
            inter = _spawn(dict(base, variant="interleaved", variants=together, warm=2, rounds=steps,
                                profile=not tiny), 2 * timeout, cache, tiny,
                           seed_caches=[res[v]["cache_root"] for v in together])
            if "error" not in inter:
                for v in together:
                    chk = _check(inter[v], ref, tol) if v != "floor" else {"passed": True}
                    if not chk["passed"]:
                        inter = {"error": f"interleaved run: {v}'s loss failed the check: {chk}"}
                        break
            if "error" in inter:
                row["interleaved_error"] = inter["error"]
                inter = None
            log(f"  e2e S={S} interleaved ({', '.join(together)}): " + (row.get("interleaved_error") or ", ".join(
                f"{v} {inter[v]['step_s'] * 1e3:.1f} ms" for v in together)))
        for v in VARIANTS:
            r = res[v]
            row[f"{v}_tokens_per_s"] = r["tokens_per_s"] if ok(v) else None
            row[f"{v}_step_ms"] = r["step_s"] * 1e3 if ok(v) else None
            row[f"{v}_first_step_s"] = r["first_step_s"] if ok(v) else None
            row[f"{v}_peak_gib"] = r.get("peak_gib") if ok(v) else None
            row[f"{v}_loss"] = r.get("loss")
            row[f"{v}_triton_cache_empty"] = r.get("triton_cache_empty")
            if "check" in r:
                row[f"{v}_check"] = r["check"]
            if not ok(v):
                row[f"{v}_error"] = r["error"]
        fl = row["floor_step_ms"]
        for v in ("hf_flex", "flex_attention", "sdpa_packed"):
            s = row[f"{v}_step_ms"]
            row[f"{v}_overhead_ms"] = s - fl if s is not None and fl is not None else None
        if inter is not None:
            row["step_times"] = "interleaved"
            row["interleaved_rounds"] = inter["rounds"]
            row["interleaved_turn_steps"] = inter["turn_steps"]
            for v in together:
                for k in ("step_ms", "tokens_per_s", "overhead_ms"):
                    if f"{v}_{k}" in row:
                        row[f"{v}_{k}_isolated"] = row[f"{v}_{k}"]
                row[f"{v}_step_ms"] = inter[v]["step_s"] * 1e3
                row[f"{v}_tokens_per_s"] = inter[v]["tokens_per_s"]
                row[f"{v}_step_times_ms_interleaved"] = [t * 1e3 for t in inter[v]["step_times_s"]]
                row[f"{v}_step_times_ms_after_switch"] = [t * 1e3 for t in inter[v]["switch_step_times_s"]]
                if v != "floor":
                    row[f"{v}_overhead_ms"] = inter[v]["overhead_ms"]
                    row[f"{v}_overhead_ms_after_switch"] = inter[v]["overhead_ms_after_switch"]
                if "kernels_us" in inter[v]:
                    row[f"{v}_kernels_us"] = {k: round(t, 1) for k, t in list(inter[v]["kernels_us"].items())[:40]}
        else:
            row["step_times"] = "isolated"
        oh = row["hf_flex_overhead_ms"]
        for v in ("flex_attention", "sdpa_packed"):
            o = row[f"{v}_overhead_ms"]
            # target (issue 5): <= 0.6 vs flex_attention at 16k, <= 0.6 vs sdpa_packed at 4k
            row[f"hf_flex_overhead_over_{v}"] = oh / o if oh is not None and o not in (None, 0) else None
        # True / False over the variants that ran; None when none ran (nothing was checked)
        checks = [r["check"]["passed"] for v, r in res.items() if "check" in r]
        row["correctness_check_passed"] = all(checks) if checks else None
        row["triton_cache"] = cache
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    return rows


def run_recompiles(tiny=False, steps=50, timeout=300.0, cache="fresh"):
    """50 hf_flex training steps with all-different packed lengths and document counts (small model)."""
    import torch

    cuda = not tiny and torch.cuda.is_available()
    spec = dict(
        variant="recompiles", device="cuda" if cuda else "cpu", dtype="bfloat16" if cuda else "float32",
        model=TINY if tiny else RECOMPILE_MODEL, steps=steps, S_range=[96, 160] if tiny else [3000, 5000],
    )
    return _spawn(spec, timeout, cache, tiny)


def table(rows, rec) -> str:
    f = lambda x, fmt: "-" if x is None else format(x, fmt)  # noqa: E731
    out = [f"{'S':>6s} | {'tokens/s: floor':>15s} {'hf_flex':>9s} {'flex_attn':>9s} {'sdpa_pk':>9s} | "
           f"{'first step s: hf_flex':>21s} {'flex_attn':>9s} | {'peak GiB: hf_flex':>17s} {'flex_attn':>9s} "
           f"{'sdpa_pk':>7s} {'floor':>6s} | {'overhead ratio vs flex_attn':>27s} {'vs sdpa_pk':>10s} | check"]
    for r in rows:
        out.append(
            f"{r['S']:6d} | {f(r['floor_tokens_per_s'], ',.0f'):>15s} {f(r['hf_flex_tokens_per_s'], ',.0f'):>9s} "
            f"{f(r['flex_attention_tokens_per_s'], ',.0f'):>9s} {f(r['sdpa_packed_tokens_per_s'], ',.0f'):>9s} | "
            f"{f(r['hf_flex_first_step_s'], '.2f'):>21s} {f(r['flex_attention_first_step_s'], '.2f'):>9s} | "
            f"{f(r['hf_flex_peak_gib'], '.2f'):>17s} {f(r['flex_attention_peak_gib'], '.2f'):>9s} "
            f"{f(r['sdpa_packed_peak_gib'], '.2f'):>7s} {f(r['floor_peak_gib'], '.2f'):>6s} | "
            f"{f(r['hf_flex_overhead_over_flex_attention'], '.3f'):>27s} "
            f"{f(r['hf_flex_overhead_over_sdpa_packed'], '.3f'):>10s} | "
            f"{ {True: 'pass', False: 'FAIL', None: '-'}[r['correctness_check_passed']]}"
        )
    for r in rows:
        out.append(f"  S={r['S']} step times: {r.get('step_times', 'isolated')}"
                   + (f" ({r['interleaved_rounds']} rounds of {r.get('interleaved_turn_steps', 1)} steps a variant,"
                      " overhead = median of the turn's last step - the floor's per round)"
                      if r.get("step_times") == "interleaved" else "")
                   + "; overhead ms: " + ", ".join(f"{v} {f(r.get(f'{v}_overhead_ms'), '.1f')}"
                                                  for v in ("hf_flex", "flex_attention", "sdpa_packed"))
                   + ("; first step after a switch: " + ", ".join(
                       f"{v} {f(r.get(f'{v}_overhead_ms_after_switch'), '.1f')}" for v in ("hf_flex", "flex_attention",
                                                                                         "sdpa_packed"))
                      if r.get("step_times") == "interleaved" else ""))
        for k, v in r.items():
            if k.endswith("_error"):
                out.append(f"  S={r['S']} {k}: {v}")
    if rec is not None:
        out.append(f"recompiles over {rec.get('steps', '?')} lengths: {rec.get('recompiles', rec.get('error'))}"
                   + (f" ({rec['reason']})" if rec.get("reason") else ""))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True, help="internal: JSON spec of one measurement")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    r = worker(json.loads(a.worker))
    with open(a.out, "w") as fh:
        json.dump(r, fh)


if __name__ == "__main__":
    main()
