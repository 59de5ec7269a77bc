"""Causal-LM training on packed samples with attn_implementation="flex" (or sdpa / eager / flex_attention).

    python recipes/sft.py                                   # the embedded default: no download
    accelerate launch recipes/sft.py --model llama-1b ...   # one or several GPUs (recipes/configs/)

Loads documents (the embedded corpus, local json/jsonl/text/parquet/csv files, or a hub dataset),
tokenizes them, packs them into fixed [batch, seq_len] rows (hf_flex.packing: best-fit decreasing,
position_ids restarting per document, labels -100 at each document start, no attention_mask), and
trains with AdamW, a cosine schedule with warmup, gradient accumulation and clipping (accelerate), bf16
mixed precision on GPU, periodic eval loss on held-out documents, checkpoints (accelerator.save_state)
with exact resume (--resume), and save_pretrained at the end. recipes/README.md has the commands.

--check-parity N: before training, each process takes its first N batches and compares, on identical
weights, the loss and the gradients of --attn on the packed rows with those of eager attention on the
unpacked documents (a right-padded batch with attention_mask; loss normalised the same way: the
token-weighted mean over all documents). It exits non-zero when they differ beyond the dtype's noise.

Packed rows under sdpa / eager: Transformers' mask creators find the documents from position_ids
when attention_mask is None and no cache is used (use_cache=False here), row by row, so batches of
several packed rows are right (transformers 5.17 and 5.24: ``find_packed_sequence_indices``). They then
build a dense [B, 1, S, S] mask; "flex" builds block tables instead. --check-parity verifies it.
--padded is the baseline packing replaces: the same documents per step, unpacked into right-padded
rows with attention_mask (the same loss in exact arithmetic, more tokens to compute).

Throughput: tokens/s counts the documents' tokens (not the filler that pads a row). MFU = model
FLOPs / (elapsed time * peak FLOP/s * processes), with model FLOPs per step
    6 * N * T + 12 * L * H * D * sum over documents of n (n + 1) / 2
(N: parameters without the input embedding (the LM head counts, tied or not), T: the documents'
tokens, L layers, H query heads, D head_dim, n each document's length: the causal pairs it attends;
backward = 2x forward). Peak: --peak-tflops, else a table by device name (bf16 dense: H100 SXM / H200
989 TFLOP/s); unknown device or fp32: "-".
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    # before anything imports triton: hf_flex's kernels then run on CPU tensors through Triton's
    # interpreter (slow, but the real kernels). TRITON_INTERPRET=0 takes hf_flex's PyTorch reference
    # path instead (much faster on CPU).
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # sft_data / default_corpus, and hf_flex from this checkout

import argparse  # noqa: E402
import contextlib  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import datasets  # noqa: E402
import hf_flex  # noqa: E402,F401  (registers attn_implementation="flex")
from hf_flex.packing import unpack_rows  # noqa: E402

import sft_data  # noqa: E402

ATTN_CHOICES = ("flex", "sdpa", "eager", "flex_attention")

# Llama-shaped configs for a from-config random init; vocab_size comes from the tokenizer
MODEL_CONFIGS = {
    # ~3.2M non-embedding parameters: minutes on a CPU, seconds on a GPU
    "default": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2),
    # the shape of notes/anchors.md's 0.67B model (0.57B without embeddings)
    "llama-0.5b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=12, num_attention_heads=16,
                       num_key_value_heads=8),
    # Llama 3.2 1B's shape (0.97B without embeddings)
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True),
}

# dense bf16 tensor-core peak FLOP/s per device, by a substring of torch.cuda.get_device_name()
PEAK_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("A100", 312e12))

# --check-parity tolerances. fp32: relative differences (the two paths differ only by summation order).
# bf16: the error against an fp32 eager reference may be at most FACTOR x bf16 eager's own error + FLOOR.
FP32_TOL = {"loss": 1e-5, "grad_norm": 1e-4, "grad": 1e-4, "param_grad": 1e-3}
BF16_FACTOR = {"loss": 2.0, "grad_norm": 2.0, "grad": 2.0, "param_grad": 4.0}
BF16_FLOOR = {"loss": 1e-3, "grad_norm": 2e-3, "grad": 2e-3, "param_grad": 2e-2}


# ------------------------------------------------------------------------------------------------ flags


def _checked(flag, cast, ok, need):
    """An argparse type: ``cast(s)``, refused with a message naming ``flag`` unless ``ok(value)``."""
    def conv(s):
        try:
            v = cast(s)
        except ValueError:
            what = "an integer" if cast is int else "a number"
            raise argparse.ArgumentTypeError(f"{flag} must be {what}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{flag} must be {need}, got {v if cast is int else s}")
        return v
    return conv


def _positive_int(flag):
    return _checked(flag, int, lambda v: v >= 1, ">= 1")


def _nonneg_int(flag):
    return _checked(flag, int, lambda v: v >= 0, ">= 0")


def _positive_float(flag):
    return _checked(flag, float, lambda v: v > 0 and math.isfinite(v), "> 0")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sft.py", description="Causal-LM training on packed samples (hf_flex). See recipes/README.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="default",
                   help=f"a local checkpoint directory (or a hub name org/model), or a config for a random init: "
                        f"{', '.join(MODEL_CONFIGS)}")
    g.add_argument("--model-config", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the named config (repeatable), e.g. num_hidden_layers=2")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer dir or name; default: the checkpoint's, else a byte-level BPE trained on "
                        "the documents and cached in OUTPUT_DIR/tokenizer")
    g.add_argument("--vocab-size", type=_positive_int("--vocab-size"), default=2048,
                   help="vocabulary of the locally trained BPE")
    g.add_argument("--attn", default="flex", choices=ATTN_CHOICES, help="attn_implementation")
    g.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 mixed precision on GPU, fp32 on CPU")
    g.add_argument("--gradient-checkpointing", action="store_true")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default=None,
                   help="local json/jsonl/text/parquet/csv file(s), a directory or glob of them, or a hub dataset; "
                        "default: the embedded corpus (recipes/default_corpus.py)")
    d.add_argument("--dataset-config", default=None, help="hub dataset configuration name")
    d.add_argument("--split", default="train", help="hub dataset split")
    d.add_argument("--text-column", default="text")
    d.add_argument("--max-docs", type=_positive_int("--max-docs"), default=None, help="use the first N documents")
    d.add_argument("--eval-fraction", type=float, default=0.02, help="documents held out for the eval loss")
    d.add_argument("--padded", action="store_true",
                   help="the baseline that packing replaces: each batch's documents unpacked, one right-padded "
                        "row per document with attention_mask, in chunks of at most batch x seq-len tokens "
                        "(same documents and loss as packed)")
    d.add_argument("--num-proc", type=_positive_int("--num-proc"), default=None, help="processes for datasets.map")
    t = p.add_argument_group("training")
    t.add_argument("--seq-len", type=_positive_int("--seq-len"), default=None, help="tokens per packed row "
                   "(default 1024 on GPU, 128 on CPU)")
    t.add_argument("--batch-size", type=_positive_int("--batch-size"), default=None,
                   help="rows per process per micro-batch (default 8 on GPU, 2 on CPU)")
    t.add_argument("--grad-accum", type=_positive_int("--grad-accum"), default=1,
                   help="micro-batches per optimizer step")
    t.add_argument("--max-steps", type=_positive_int("--max-steps"), default=None,
                   help="optimizer steps (default 300 on GPU, 20 on CPU)")
    t.add_argument("--lr", type=_positive_float("--lr"), default=2e-3, help="peak learning rate")
    t.add_argument("--warmup", type=_nonneg_int("--warmup"), default=None,
                   help="warmup steps of the cosine schedule (default: 10%% of --max-steps)")
    t.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (not on 1-D parameters)")
    t.add_argument("--max-grad-norm", type=_positive_float("--max-grad-norm"), default=1.0)
    t.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("evaluation, checkpoints, logs")
    o.add_argument("--eval-every", type=_nonneg_int("--eval-every"), default=100,
                   help="eval loss every N steps (0: only at the end)")
    o.add_argument("--eval-batches", type=_positive_int("--eval-batches"), default=None,
                   help="at most this many eval batches per process (default 8 on GPU, 2 on CPU)")
    o.add_argument("--save-every", type=_nonneg_int("--save-every"), default=0,
                   help="accelerator.save_state every N steps into OUTPUT_DIR/checkpoints (0: never)")
    o.add_argument("--keep-checkpoints", type=_positive_int("--keep-checkpoints"), default=2,
                   help="keep the last N checkpoints")
    o.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in OUTPUT_DIR/checkpoints (or this one)")
    o.add_argument("--check-parity", nargs="?", type=_nonneg_int("--check-parity"), const=2, default=0, metavar="N",
                   help="before training: --attn on the packed batch vs eager on the unpacked documents, "
                        "first N batches per process (N defaults to 2 when the flag is given bare)")
    o.add_argument("--output-dir", default="runs/sft")
    o.add_argument("--log-file", default=None, help="JSON lines, one per step (default OUTPUT_DIR/log.jsonl)")
    o.add_argument("--peak-tflops", type=_positive_float("--peak-tflops"), default=None,
                   help="peak FLOP/s of one device (TFLOP/s) for MFU, when the device is not in the table")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv=None, gpu=None):
    p = build_parser()
    a = p.parse_args(argv)
    gpu = _use_gpu() if gpu is None else gpu
    a.seq_len = a.seq_len or (1024 if gpu else 128)
    a.batch_size = a.batch_size or (8 if gpu else 2)
    a.max_steps = a.max_steps or (300 if gpu else 20)
    a.eval_batches = a.eval_batches or (8 if gpu else 2)
    a.warmup = max(1, a.max_steps // 10) if a.warmup is None else a.warmup
    a.dtype = ("bf16" if gpu else "fp32") if a.dtype == "auto" else a.dtype
    if a.seq_len < 2:
        p.error(f"--seq-len must be >= 2 (a row needs a token to predict), got {a.seq_len}")
    if a.warmup > a.max_steps:
        p.error(f"--warmup ({a.warmup}) must not exceed --max-steps ({a.max_steps})")
    if not 0 < a.eval_fraction < 1:
        p.error(f"--eval-fraction must be in (0, 1), got {a.eval_fraction}")
    if a.weight_decay < 0:
        p.error(f"--weight-decay must be >= 0, got {a.weight_decay}")
    if a.dtype == "bf16" and not gpu and a.attn == "flex" and os.environ.get("TRITON_INTERPRET") == "1":
        p.error("--dtype bf16 with --attn flex needs a GPU: Triton's interpreter (CPU) computes bf16 dot "
                "products wrongly; use --dtype fp32 on CPU")
    if a.attn == "flex_attention" and not gpu:
        p.error("--attn flex_attention needs a GPU: torch's FlexAttention has no backward on CPU (use --attn flex)")
    if a.model not in MODEL_CONFIGS and not os.path.isdir(a.model) and a.model.count("/") != 1:
        p.error(f"--model: {a.model!r} is neither a directory, a hub name (org/model), nor a config "
                f"({', '.join(MODEL_CONFIGS)})")
    if a.model_config and a.model not in MODEL_CONFIGS:
        p.error("--model-config only applies to a config model (--model " + " | ".join(MODEL_CONFIGS) + ")")
    a.model_overrides = {}
    for item in a.model_config:
        key, sep, val = item.partition("=")
        if not sep or not key:
            p.error(f"--model-config takes KEY=VALUE, got {item!r}")
        try:
            a.model_overrides[key] = json.loads(val)
        except json.JSONDecodeError:
            a.model_overrides[key] = val
    a.log_file = a.log_file or os.path.join(a.output_dir, "log.jsonl")
    return a


def _use_gpu() -> bool:
    cpu_forced = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    return torch.cuda.is_available() and not cpu_forced


# ------------------------------------------------------------------------------------------------ model


def build_model(args, tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if args.model in MODEL_CONFIGS:
        fields = dict(MODEL_CONFIGS[args.model])
        fields.update(
            vocab_size=64 * math.ceil(len(tokenizer) / 64),  # a multiple of 64 keeps the LM head's matmul fast
            max_position_embeddings=max(4096, args.seq_len), rms_norm_eps=1e-5, attention_dropout=0.0,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, use_cache=False)
        known = set(LlamaConfig().to_dict()) | set(fields)
        for k in args.model_overrides:
            if k not in known:
                raise SystemExit(f"--model-config: LlamaConfig has no field {k!r}")
        fields.update(args.model_overrides)
        try:
            cfg = LlamaConfig(**fields)
        except (TypeError, ValueError) as e:
            raise SystemExit(f"--model-config: {e}") from e
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=args.attn)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation=args.attn,
                                                         dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--model: could not load {args.model!r}: {e}") from e
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            raise SystemExit(f"--tokenizer: {len(tokenizer)} tokens, but the model's embedding has "
                             f"{model.get_input_embeddings().num_embeddings} rows")
    model.config.use_cache = False
    return model


def get_tokenizer(args, docs):
    from transformers import AutoTokenizer

    src = args.tokenizer
    if src is None and args.model not in MODEL_CONFIGS:
        if os.path.isdir(args.model) and not glob.glob(os.path.join(args.model, "tokenizer*")):
            raise SystemExit(f"--tokenizer: {args.model!r} holds no tokenizer files; name one with --tokenizer")
        src = args.model
    if src is not None:
        try:
            tok = AutoTokenizer.from_pretrained(src)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--tokenizer: could not load {src!r}: {e}") from e
    else:
        texts = (t for i, t in enumerate(docs["text"]) if i < 200_000)
        tok = sft_data.train_tokenizer(texts, args.vocab_size, os.path.join(args.output_dir, "tokenizer"))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


class FlopCounter:
    """Model FLOPs of a step (see the module docstring): 6 N T + 12 L H D sum n (n + 1) / 2."""

    def __init__(self, model):
        cfg = model.config
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings()
        total = sum(p.numel() for p in model.parameters())
        tied = head is not None and head.weight is emb
        self.n_params = total
        self.n_non_embedding = total - emb.numel() + (head.weight.numel() if tied else 0)
        self.layers = cfg.num_hidden_layers
        self.heads = cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def __call__(self, tokens, causal_pairs):
        return 6 * self.n_non_embedding * tokens + 12 * self.layers * self.heads * self.head_dim * causal_pairs


def peak_flops(args, device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type != "cuda" or args.dtype != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16 if k in name), None)


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: peak RSS


# ------------------------------------------------------------------------------------------------ parity


def _unpacked_chunks(docs, budget_tokens):
    """Groups of documents (longest first) for right-padded eager batches: at most ``budget_tokens``
    padded tokens (the packed batch's rows * seq_len) and rows * longest^2 <= budget_tokens * 1024, so
    eager's dense [rows, H, L, L] scores stay bounded (a single longer document goes alone)."""
    order = sorted(range(len(docs)), key=lambda i: -docs[i].numel())
    chunk = []
    for i in order:
        n, longest = len(chunk) + 1, docs[chunk[0]].numel() if chunk else 0
        if chunk and (n * longest > budget_tokens or n * longest**2 > budget_tokens * 1024):
            yield chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield chunk


def pad_documents(docs, pad_id, device):
    """One right-padded row per document: input_ids, attention_mask, labels (-100 on the padding)."""
    L = max(d.numel() for d in docs)
    ids = torch.full((len(docs), L), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(docs), L), dtype=torch.long, device=device)
    for r, d in enumerate(docs):
        ids[r, : d.numel()] = d
        mask[r, : d.numel()] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _grads(model):
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, attn, batch, docs, n_targets, autocast_dtype, pad_id):
    """(loss, grads): --attn on the packed batch (docs None) or eager on the padded documents."""
    model.set_attn_implementation(attn)
    model.zero_grad(set_to_none=True)
    dev = batch["input_ids"].device
    ctx = torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    total = torch.zeros((), dtype=torch.float64, device=dev)
    with ctx:
        if docs is None:
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                        use_cache=False, num_items_in_batch=n_targets)
            out.loss.backward()
            total += out.loss.detach().double()
        else:
            for chunk in _unpacked_chunks(docs, batch["input_ids"].numel()):
                out = model(**pad_documents([docs[i] for i in chunk], pad_id, dev), use_cache=False,
                            num_items_in_batch=n_targets)
                out.loss.backward()
                total += out.loss.detach().double()
    g = _grads(model)
    model.zero_grad(set_to_none=True)
    return total.item(), g


def _errors(loss, grads, ref_loss, ref_grads):
    names = list(ref_grads)
    g = torch.cat([grads[n].flatten() for n in names])
    r = torch.cat([ref_grads[n].flatten() for n in names])
    per = {n: ((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm().clamp_min(1e-30)).item() for n in names}
    worst = max(per, key=per.get)
    return {
        "loss": abs(loss - ref_loss) / max(abs(ref_loss), 1e-30),
        "grad_norm": abs(g.norm().item() - r.norm().item()) / max(r.norm().item(), 1e-30),
        "grad": ((g - r).norm() / r.norm().clamp_min(1e-30)).item(),
        "param_grad": per[worst],
        "worst_param": worst,
        "_per": per,
    }


def check_parity(model, batches, args, pad_id, rank) -> tuple[bool, list]:
    """--attn on packed rows vs eager on the unpacked documents, same weights; see the module docstring."""
    bf16 = args.dtype == "bf16"
    model.train()
    results, ok = [], True
    for k, batch in enumerate(batches):
        docs = unpack_rows({"input_ids": batch["input_ids"], "cu_seq_lens": batch["cu_seq_lens"]})
        n_targets = int((batch["labels"][:, 1:] != -100).sum())
        if n_targets != sum(d.numel() - 1 for d in docs):
            raise SystemExit(f"--check-parity: the packed batch has {n_targets} targets, its documents "
                             f"{sum(d.numel() - 1 for d in docs)}: packing lost or leaked tokens")
        run = lambda attn, unpacked, ac: _run(model, attn, batch, docs if unpacked else None,  # noqa: E731
                                              n_targets, ac, pad_id)
        loss_a, g_a = run(args.attn, False, torch.bfloat16 if bf16 else None)
        loss_e, g_e = run("eager", True, torch.bfloat16 if bf16 else None)
        res = {"batch": k, "rank": rank, "documents": len(docs), "targets": n_targets,
               "loss_attn": loss_a, "loss_eager": loss_e}
        if bf16:
            # noise is measured: both bf16 runs against the fp32 eager run on the unpacked documents
            loss_r, g_r = run("eager", True, None)
            ea, ee = _errors(loss_a, g_a, loss_r, g_r), _errors(loss_e, g_e, loss_r, g_r)
            res["loss_eager_fp32"] = loss_r
            fails = [m for m in ("loss", "grad_norm", "grad") if ea[m] > BF16_FACTOR[m] * ee[m] + BF16_FLOOR[m]]
            over = {n: ea["_per"][n] / (BF16_FACTOR["param_grad"] * ee["_per"][n] + BF16_FLOOR["param_grad"])
                    for n in ea["_per"]}
            worst = max(over, key=over.get)
            if over[worst] > 1:
                fails.append("param_grad")
            for m in ("loss", "grad_norm", "grad"):
                res[f"{m}_err_attn"], res[f"{m}_err_eager_bf16"] = ea[m], ee[m]
            res["param_grad_err_attn"], res["param_grad_err_eager_bf16"] = ea["_per"][worst], ee["_per"][worst]
            res["worst_param"] = worst
        else:
            ea = _errors(loss_a, g_a, loss_e, g_e)
            fails = [m for m in FP32_TOL if ea[m] > FP32_TOL[m]]
            res.update({f"{m}_rel_diff": ea[m] for m in FP32_TOL})
            res["worst_param"] = ea["worst_param"]
        res["ok"] = not fails
        res["failed"] = fails
        ok &= not fails
        results.append(res)
    model.set_attn_implementation(args.attn)
    return ok, results


def format_parity(res, bf16) -> str:
    head = (f"[parity rank {res['rank']} batch {res['batch']}] {res['documents']} docs, {res['targets']} targets: "
            f"loss {res['loss_attn']:.6f} (packed) vs {res['loss_eager']:.6f} (eager, unpacked)")
    if bf16:
        body = "; ".join(f"{m} err vs fp32 {res[f'{m}_err_attn']:.2e} (eager bf16 {res[f'{m}_err_eager_bf16']:.2e})"
                         for m in ("loss", "grad_norm", "grad", "param_grad"))
    else:
        body = "; ".join(f"{m} rel diff {res[f'{m}_rel_diff']:.2e} (limit {FP32_TOL[m]:g})" for m in FP32_TOL)
    verdict = "OK" if res["ok"] else f"FAIL ({', '.join(res['failed'])})"
    return f"{head}\n    {body}; worst parameter {res['worst_param']} -> {verdict}"


# ------------------------------------------------------------------------------------------------ checkpoints

RESUME_KEYS = ("seq_len", "batch_size", "grad_accum", "dataset", "dataset_config", "split", "text_column",
               "max_docs", "eval_fraction", "seed", "model", "num_processes")


def _flag(key):
    return "--" + key.replace("_", "-") if key != "num_processes" else "the number of processes"


def find_checkpoint(args) -> str:
    root = os.path.join(args.output_dir, "checkpoints")
    if args.resume != "latest":
        if not os.path.exists(os.path.join(args.resume, "trainer_state.json")):
            raise SystemExit(f"--resume: {args.resume!r} is not a complete checkpoint (no trainer_state.json)")
        return args.resume
    done = [d for d in glob.glob(os.path.join(root, "step-*")) if os.path.exists(os.path.join(d, "trainer_state.json"))]
    if not done:
        raise SystemExit(f"--resume: no checkpoint in {root} (write some with --save-every N)")
    return max(done, key=lambda d: json.load(open(os.path.join(d, "trainer_state.json")))["step"])


def save_checkpoint(acc, args, step, run_keys, tokens_seen):
    root = os.path.join(args.output_dir, "checkpoints")
    path = os.path.join(root, f"step-{step:07d}")
    acc.save_state(path)
    acc.wait_for_everyone()
    if acc.is_main_process:
        # written last: a checkpoint without it (an interrupted save) is never resumed from
        with open(os.path.join(path, "trainer_state.json"), "w") as f:
            json.dump({"step": step, "tokens_seen": tokens_seen, "run": run_keys}, f, indent=1)
        done = sorted(d for d in glob.glob(os.path.join(root, "step-*"))
                      if os.path.exists(os.path.join(d, "trainer_state.json")))
        for old in done[: -args.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


# ------------------------------------------------------------------------------------------------ main


class JsonLog:
    def __init__(self, path, enabled):
        self.f = None
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.f = open(path, "a")

    def __call__(self, **rec):
        if self.f:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()


def _fsdp2_precision(acc, args):
    """FSDP2 with bf16: bf16 compute, gradients reduced in fp32, outputs left as computed.

    accelerate's bf16 policy also reduce-scatters gradients in bf16 and casts the model's outputs to
    bf16, the loss included (it was logged as 7.8984375). DDP all-reduces fp32 gradients; torchtitan's
    FSDP2 default reduces in fp32 too. Without an output cast, the loss stays the fp32 value the model
    computes from bf16 logits (the logits are not upcast: [B, S, vocab] in fp32 costs memory).
    """
    plugin = getattr(acc.state, "fsdp_plugin", None)
    if plugin is None or getattr(plugin, "fsdp_version", 1) != 2 or args.dtype != "bf16":
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def main(argv=None):
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, gather_object, set_seed
    from transformers import get_cosine_schedule_with_warmup

    args = parse_args(argv)
    acc = Accelerator(
        mixed_precision="bf16" if args.dtype == "bf16" else "no",
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=args.grad_accum, sync_with_dataloader=False),
    )
    _fsdp2_precision(acc, args)
    dev, P, main_proc = acc.device, acc.num_processes, acc.is_main_process
    if main_proc:
        os.makedirs(args.output_dir, exist_ok=True)
    say = acc.print
    if not acc.is_local_main_process:
        datasets.disable_progress_bars()
    log = JsonLog(args.log_file, main_proc)
    set_seed(args.seed)  # the same initial weights in every process

    # ---- data (the main process first: it trains the tokenizer and fills datasets' caches)
    t_setup = time.perf_counter()
    with acc.main_process_first():
        docs = sft_data.load_documents(args.dataset, config_name=args.dataset_config, split=args.split,
                                       text_column=args.text_column, max_docs=args.max_docs)
        tokenizer = get_tokenizer(args, docs)
        tokens = sft_data.tokenize(docs, tokenizer, args.num_proc)
        train_rows, eval_rows = sft_data.split_and_pack(tokens, args.seq_len, args.eval_fraction, args.seed,
                                                        args.num_proc)
    pad_id = tokenizer.pad_token_id
    collate = sft_data.collator(args.seq_len, pad_id)
    if len(train_rows) < args.batch_size * P:
        raise SystemExit(f"--batch-size: {len(train_rows)} packed rows of {args.seq_len} tokens cannot fill one "
                         f"batch of {args.batch_size} rows in each of {P} processes; lower --batch-size or --seq-len")

    # ---- model
    set_seed(args.seed)
    model = build_model(args, tokenizer)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(dev)
    flops = FlopCounter(model)
    peak = peak_flops(args, dev)
    run_keys = {k: getattr(args, k, None) for k in RESUME_KEYS if k != "num_processes"} | {"num_processes": P}
    say(f"model {args.model}: {flops.n_params / 1e6:.2f}M parameters ({flops.n_non_embedding / 1e6:.2f}M "
        f"without the input embedding), attn {args.attn}, {args.dtype}, {P} process(es) on {dev.type} "
        f"({acc.distributed_type.value})")
    say(f"data: {len(train_rows)} train rows / {len(eval_rows)} eval rows of {args.seq_len} tokens "
        f"(vocab {len(tokenizer)}), {args.batch_size} x {args.grad_accum} rows per process per step "
        f"[setup {time.perf_counter() - t_setup:.1f} s]")

    # ---- --check-parity (before prepare: each process checks its own batches on its full model)
    parity = None
    if args.check_parity:
        loader0 = sft_data.epoch_loader(train_rows, 0, args.seed, args.batch_size, collate)
        batches = []
        for i, b in enumerate(loader0):  # process r gets batches r, r + P, ... as accelerate shards them
            if i % P == acc.process_index:
                batches.append({k: v.to(dev) for k, v in b.items()})
            if len(batches) == args.check_parity:
                break
        ok, parity = check_parity(model, batches, args, pad_id, acc.process_index)
        for r in parity:
            print(format_parity(r, args.dtype == "bf16"), flush=True)
        all_ok = acc.reduce(torch.tensor([0.0 if ok else 1.0], device=dev), "sum").item() == 0
        parity = gather_object(parity)  # every rank's results, for the log and summary.json
        log(event="parity", results=parity, ok=all_ok)
        if not all_ok:
            raise SystemExit(f"--check-parity FAILED: --attn {args.attn} on packed rows differs from eager on the "
                             f"unpacked documents beyond {args.dtype} noise (see the lines above)")
        say(f"--check-parity: {args.attn} on packed rows matches eager on the unpacked documents ({args.dtype})")

    # ---- optimizer, schedule, accelerate
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    # stepped once per optimizer step by this loop (not prepared: accelerate would step it once per process)
    sched = get_cosine_schedule_with_warmup(opt, args.warmup, args.max_steps)
    model, opt = acc.prepare(model, opt)
    acc.register_for_checkpointing(sched)
    n_eval_rows = min(len(eval_rows), args.eval_batches * args.batch_size * P)
    eval_dl = acc.prepare(torch.utils.data.DataLoader(eval_rows.select(range(n_eval_rows)), batch_size=args.batch_size,
                                                      collate_fn=collate))
    per_epoch = math.ceil(len(train_rows) / (args.batch_size * P))  # batches per process (even_batches)

    start_step, tokens_seen = 0, 0
    if args.resume:
        ckpt = find_checkpoint(args)
        state = json.load(open(os.path.join(ckpt, "trainer_state.json")))
        for k, v in state["run"].items():
            if run_keys.get(k) != v:
                raise SystemExit(f"--resume: {_flag(k)} was {v!r} when {ckpt} was written, now {run_keys.get(k)!r}; "
                                 "exact resume needs the same data order")
        acc.load_state(ckpt)
        # the optimizer holds the lr the checkpoint's schedule set; recompute it from this run's schedule
        # (the same value unless --max-steps / --warmup changed)
        sched._last_lr = [base * lam(sched.last_epoch) for base, lam in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(opt.param_groups, sched._last_lr):
            group["lr"] = lr
        start_step, tokens_seen = state["step"], state["tokens_seen"]
        acc.step = start_step * args.grad_accum
        say(f"resumed from {ckpt} at step {start_step}")
    log(event="start", args={k: v for k, v in vars(args).items()}, n_params=flops.n_params,
        n_non_embedding=flops.n_non_embedding, processes=P, device=str(dev),
        device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", train_rows=len(train_rows),
        eval_rows=len(eval_rows), start_step=start_step, torch=torch.__version__,
        transformers=__import__("transformers").__version__)

    def micro_batches(consumed):
        epoch, skip = divmod(consumed, per_epoch)
        while True:
            dl = acc.prepare(sft_data.epoch_loader(train_rows, epoch, args.seed, args.batch_size, collate))
            if skip:
                dl = acc.skip_first_batches(dl, skip)
            yield from dl
            epoch, skip = epoch + 1, 0

    def model_inputs(batches):
        """Per micro-batch, the list of model calls: the packed batch itself, or (--padded) its documents
        unpacked into right-padded chunks of at most the packed batch's tokens, longest first. Every
        process makes the same number of calls (FSDP's forward is collective): the short lists get
        calls on one pad token that predict nothing."""
        out = []
        for b in batches:
            cu = b.pop("cu_seq_lens")
            if not args.padded:
                out.append([b])
                continue
            docs = unpack_rows({"input_ids": b["input_ids"], "cu_seq_lens": cu})
            out.append([pad_documents([docs[i] for i in ch], pad_id, dev)
                        for ch in _unpacked_chunks(docs, b["input_ids"].numel())])
        if args.padded:
            n = int(acc.reduce(torch.tensor(max(map(len, out)), device=dev), "max"))
            idle = {"input_ids": torch.full((1, 1), pad_id, device=dev), "labels": torch.full((1, 1), -100, device=dev),
                    "attention_mask": torch.ones((1, 1), dtype=torch.long, device=dev)}
            out = [calls + [idle] * (n - len(calls)) for calls in out]
        return out

    def evaluate():
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=dev)
        with torch.no_grad():
            for b in eval_dl:
                for call in model_inputs([b])[0]:
                    out = model(**call, use_cache=False, num_items_in_batch=1)  # the loss is then a sum
                    sums += torch.stack([out.loss.double(), (call["labels"][:, 1:] != -100).sum().double()])
        model.train()
        sums = acc.reduce(sums, "sum")
        return (sums[0] / sums[1]).item()

    # ---- training
    from tqdm.auto import tqdm

    bar = tqdm(total=args.max_steps, initial=start_step, desc="sft", dynamic_ncols=True,
               disable=args.no_progress or not acc.is_local_main_process)
    model.train()
    stream = micro_batches(start_step * args.grad_accum)
    history, evals, t_train = [], [], time.perf_counter()
    scale = args.grad_accum * P  # accelerate divides by grad_accum, DDP/FSDP average over processes
    for step in range(start_step + 1, args.max_steps + 1):
        t0 = time.perf_counter()
        mbs = [next(stream) for _ in range(args.grad_accum)]
        lens = torch.cat([sft_data.doc_lengths(mb["cu_seq_lens"]).flatten() for mb in mbs]).double()
        targets = sum((mb["labels"][:, 1:] != -100).sum() for mb in mbs)
        n_targets = acc.reduce(targets.clone(), "sum")  # over processes: the loss is a token-weighted mean
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        for calls in model_inputs(mbs):
            with acc.accumulate(model):
                for j, call in enumerate(calls):
                    # several calls (--padded) in the syncing micro-batch: only the last one syncs
                    last = j == len(calls) - 1
                    with acc.no_sync(model) if acc.sync_gradients and not last else contextlib.nullcontext():
                        out = model(**call, use_cache=False, num_items_in_batch=n_targets)
                        acc.backward(out.loss * scale)
                    loss_sum += out.loss.detach().double() * n_targets
                if acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
                        grad_norm = grad_norm.full_tensor()
                    lr = sched.get_last_lr()[0]
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
        stats = acc.reduce(torch.stack([loss_sum, lens.sum(), (lens * (lens + 1) / 2).sum()]).to(dev), "sum")
        mem = acc.reduce(torch.tensor([peak_memory_gib(dev)], device=dev), "max").item()
        loss, tokens, pairs = (stats[0] / n_targets).item(), stats[1].item(), stats[2].item()
        dt = time.perf_counter() - t0
        tokens_seen += int(tokens)
        tok_s = tokens / dt
        mfu = flops(tokens, pairs) / dt / (peak * P) if peak else None
        rec = dict(step=step, loss=loss, lr=lr, grad_norm=float(grad_norm), tokens=int(tokens), tokens_per_s=tok_s,
                   mfu=mfu, peak_mem_gib=mem, step_time=dt, time=time.perf_counter() - t_train)
        history.append(rec)
        log(event="train", **rec)
        mfu_s = f"{100 * mfu:.1f}%" if mfu else "-"
        bar.set_postfix_str(f"loss {loss:.4f} | {tok_s:,.0f} tok/s | MFU {mfu_s} | mem {mem:.2f} GiB", refresh=False)
        bar.update(1)
        if (args.eval_every and step % args.eval_every == 0) or step == args.max_steps:
            ev = evaluate()
            evals.append((step, ev))
            log(event="eval", step=step, eval_loss=ev)
            if acc.is_local_main_process:
                bar.write(f"step {step}: eval loss {ev:.4f}")
        if args.save_every and step % args.save_every == 0:
            save_checkpoint(acc, args, step, run_keys, tokens_seen)
    bar.close()

    # ---- save_pretrained (a full state dict also under FSDP)
    final = os.path.join(args.output_dir, "final")
    state_dict = acc.get_state_dict(model)
    acc.unwrap_model(model).save_pretrained(final, is_main_process=main_proc, save_function=acc.save,
                                            state_dict=state_dict)
    if main_proc:
        tokenizer.save_pretrained(final)
    acc.wait_for_everyone()

    summary = {"steps": len(history), "start_step": start_step, "final_dir": final, "parity": parity}
    if history:
        steady = history[1:] or history  # the first step includes Triton's compilation
        summary.update(
            first_loss=history[0]["loss"], last_loss=history[-1]["loss"], eval_loss=evals[-1][1] if evals else None,
            tokens_per_s=statistics.median(r["tokens_per_s"] for r in steady),
            mfu=statistics.median(r["mfu"] for r in steady) if peak else None,
            peak_mem_gib=max(r["peak_mem_gib"] for r in history), first_step_s=history[0]["step_time"],
            train_s=time.perf_counter() - t_train)
        mfu_s = f"{100 * summary['mfu']:.1f}%" if summary["mfu"] else "-"
        say(f"loss {summary['first_loss']:.4f} (step {start_step + 1}) -> {summary['last_loss']:.4f} "
            f"(step {args.max_steps}); eval loss {summary['eval_loss']:.4f}; "
            f"{summary['tokens_per_s']:,.0f} tokens/s (median), MFU {mfu_s}, "
            f"peak memory {summary['peak_mem_gib']:.2f} GiB, {summary['train_s']:.1f} s")
    say(f"saved {final}")
    log(event="end", **summary)
    if main_proc:
        with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    # the prepared (DDP / FSDP) model goes before the process group: torn down after
    # destroy_process_group, DDP's reducer can hang the process on its way out (seen with gloo)
    del model, opt
    acc.free_memory()
    acc.end_training()
    return summary


if __name__ == "__main__":
    main()
