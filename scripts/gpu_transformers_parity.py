"""GPU parity of attn_implementation="flex" on a ~124M-parameter Llama-shaped model (bf16).

    python scripts/gpu_transformers_parity.py [--json out.json]

1. Packed row (documents of 64-1024 tokens, position_ids restarting) with "flex" against each document
   run alone with "eager": logits and every parameter's gradient. "bf16 noise" is measured, not
   assumed: both are compared with the float32 eager model on the same per-document inputs, and the
   flex error must be within 2x the bf16 eager error (+ a small floor).
2. 50 AdamW steps on the same packed batches, "flex" vs "eager" (use_cache=False so eager's mask
   creators see the packing), from the same initial weights: the loss curves.
3. Block tables from documents at 16k tokens: hf_flex (structural) vs torch's create_block_mask.
"""

import argparse
import copy
import json
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_flex

CFG = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=8192, rms_norm_eps=1e-5)


_SUCC = {}


def successors(vocab):
    """A fixed random "language" over 512 of the tokens (all of a smaller vocabulary), each with 4 possible successors: learnable in
    a few dozen steps (loss from ln(vocab) towards ln(4))."""
    if vocab not in _SUCC:
        g = torch.Generator().manual_seed(1234)
        n = min(512, vocab)
        used = torch.randperm(vocab, generator=g)[:n]
        table = torch.full((vocab, 4), -1, dtype=torch.long)
        table[used] = used[torch.randint(0, n, (n, 4), generator=g)]
        _SUCC[vocab] = (table, used)
    return _SUCC[vocab]


def packed_batch(S, g, vocab):
    lens = []
    while sum(lens) < S:
        lens.append(int(torch.randint(min(64, S // 4), min(1025, S // 2), (1,), generator=g)))
    lens[-1] -= sum(lens) - S
    if lens[-1] < 2:
        lens[-2] += lens.pop()
    # learnable data: a random walk over the fixed successor table
    succ, used = successors(vocab)
    docs = []
    for n in lens:
        tok = [int(used[torch.randint(0, len(used), (1,), generator=g)])]
        pick = torch.randint(0, 4, (n,), generator=g)
        for i in range(1, n):
            tok.append(int(succ[tok[-1], pick[i]]))
        docs.append(torch.tensor(tok))
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    labels = ids.clone()
    labels[0, torch.cumsum(torch.tensor([0] + lens[:-1]), 0)] = -100  # no prediction across documents
    return ids, pos, labels, lens


def per_doc_forward(model, ids, lens):
    out, s = [], 0
    for n in lens:
        out.append(model(ids[:, s : s + n], use_cache=False).logits)
        s += n
    return torch.cat(out, 1)


def loss_sum(logits, labels):
    return torch.nn.functional.cross_entropy(
        logits[0, :-1].float(), labels[0, 1:], ignore_index=-100, reduction="sum"
    )


def grads_of(model):
    return torch.cat([p.grad.float().flatten() for p in model.parameters()])


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--S", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script itself")
    a = ap.parse_args()
    torch.manual_seed(0)
    dev = "cpu" if a.tiny else "cuda"
    cfg = LlamaConfig(**(dict(CFG, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=256) if a.tiny else CFG))
    m32 = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").to(dev)
    n_params = sum(p.numel() for p in m32.parameters())
    mk = lambda impl: AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl, dtype=torch.bfloat16).to(dev)  # noqa: E731
    m_eager, m_flex = mk("eager"), mk("flex")
    m_eager.load_state_dict(m32.state_dict())
    m_flex.load_state_dict(m32.state_dict())

    g = torch.Generator().manual_seed(1)
    ids, pos, labels, lens = (t.to(dev) if isinstance(t, torch.Tensor) else t for t in packed_batch(a.S, g, cfg.vocab_size))
    n_tok = int((labels[0, 1:] != -100).sum())
    res = {"params": n_params, "S": a.S, "documents": len(lens), "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}

    # 1. packed flex vs per-document eager, both against the fp32 per-document eager reference
    for m in (m32, m_eager, m_flex):
        m.zero_grad(set_to_none=True)
    ref_logits = per_doc_forward(m32, ids, lens)
    (loss_sum(ref_logits, labels) / n_tok).backward()
    e_logits = per_doc_forward(m_eager, ids, lens)
    (loss_sum(e_logits, labels) / n_tok).backward()
    t0 = time.perf_counter()
    f_logits = m_flex(ids, position_ids=pos, use_cache=True).logits  # a cache left on: must not matter
    f_loss = loss_sum(f_logits, labels) / n_tok
    f_loss.backward()
    if dev == "cuda":
        torch.cuda.synchronize()
    res["flex_first_step_s"] = time.perf_counter() - t0
    g32, ge, gf = grads_of(m32), grads_of(m_eager), grads_of(m_flex)
    res["logits_rel_err_flex"] = rel(f_logits, ref_logits)
    res["logits_rel_err_eager_bf16"] = rel(e_logits, ref_logits)
    res["grad_rel_err_flex"] = rel(gf, g32)
    res["grad_rel_err_eager_bf16"] = rel(ge, g32)
    res["loss_fp32"] = (loss_sum(ref_logits, labels) / n_tok).item()
    res["loss_flex"] = f_loss.item()
    ok_logits = res["logits_rel_err_flex"] <= 2 * res["logits_rel_err_eager_bf16"] + 1e-3
    ok_grads = res["grad_rel_err_flex"] <= 2 * res["grad_rel_err_eager_bf16"] + 1e-3
    res["parity_ok"] = bool(ok_logits and ok_grads)

    # 2. training curves on packed data: float32 weights, bf16 autocast (how models are trained),
    # AdamW with warmup, the same batches and initial weights for both
    init = copy.deepcopy(m32.state_dict())
    del m32, m_eager, m_flex
    curves = {}
    for name in ("flex", "eager"):
        m = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=name).to(dev)
        m.load_state_dict(init)
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=a.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 10))
        gg = torch.Generator().manual_seed(2)
        losses = []
        for _ in range(a.steps):
            b_ids, b_pos, b_lab, _ = packed_batch(a.S, gg, cfg.vocab_size)
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
                out = m(b_ids.to(dev), position_ids=b_pos.to(dev), labels=b_lab.to(dev), use_cache=False)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(out.loss.item())
        curves[name] = losses
        del m, opt
    diffs = [abs(x - y) for x, y in zip(curves["flex"], curves["eager"])]
    res["curve_flex"], res["curve_eager"] = curves["flex"], curves["eager"]
    res["curve_max_abs_diff"] = max(diffs)
    res["curve_first_last"] = {k: (v[0], v[-1]) for k, v in curves.items()}
    tail = max(1, a.steps // 5)
    mean_tail = {k: sum(v[-tail:]) / tail for k, v in curves.items()}
    res["curve_tail_rel_diff"] = abs(mean_tail["flex"] - mean_tail["eager"]) / mean_tail["eager"]
    res["curves_agree"] = bool(res["curve_tail_rel_diff"] < 0.02 and curves["flex"][-1] < curves["flex"][0] - 1.0)

    if a.json:  # what is measured so far survives a failure below
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)

    # 3. block tables from documents at 16k tokens
    from hf_flex.bench import block_mask_timings

    res["block_mask_16k"] = block_mask_timings(S=16384, n_docs=24) if dev == "cuda" else "needs CUDA"

    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)
    print(f"\n{res['device']}  model {n_params / 1e6:.0f}M params, packed row of {a.S} tokens, {len(lens)} documents")
    print(f"logits rel err vs fp32 eager: flex(bf16, packed) {res['logits_rel_err_flex']:.2e}  eager(bf16, per doc) {res['logits_rel_err_eager_bf16']:.2e}")
    print(f"grads  rel err vs fp32 eager: flex {res['grad_rel_err_flex']:.2e}  eager {res['grad_rel_err_eager_bf16']:.2e}  -> parity {'OK' if res['parity_ok'] else 'FAIL'}")
    print(f"{a.steps} steps: flex {curves['flex'][0]:.4f} -> {curves['flex'][-1]:.4f}, eager {curves['eager'][0]:.4f} -> {curves['eager'][-1]:.4f}, max |diff| {res['curve_max_abs_diff']:.4f}")
    print(f"block tables 16k: {res['block_mask_16k']}")
    print(f"curves: last-{tail}-step means differ by {100 * res['curve_tail_rel_diff']:.2f}% -> {'OK' if res['curves_agree'] else 'FAIL'}")
    if not res["parity_ok"]:
        raise SystemExit("parity FAILED: flex's bf16 error is beyond eager's bf16 noise")
    if not res["curves_agree"]:
        raise SystemExit("loss curves FAILED: flex and eager disagree, or the loss did not fall")


if __name__ == "__main__":
    main()
