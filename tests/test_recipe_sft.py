"""recipes/sft.py on the CPU: end to end in subprocesses (plain python and accelerate launch), plus the
pieces that decide pass/fail (parity check, flags, data loading) in-process.

The recipe runs on tiny models (1 layer, hidden 64, 2 heads of 32) and tiny rows (64 tokens) so that
hf_flex's Triton kernels, run by Triton's interpreter, keep the whole file near a minute. Subprocesses
see no GPU (CUDA_VISIBLE_DEVICES=""), so they take the CPU defaults: fp32, TRITON_INTERPRET=1.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys

import pytest
import torch
from helpers import run_bounded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "recipes")
SFT = os.path.join(RECIPES, "sft.py")
if RECIPES not in sys.path:
    sys.path.insert(0, RECIPES)

import default_corpus  # noqa: E402
import sft  # noqa: E402
import sft_data  # noqa: E402

TINY = [
    "--model-config", "num_hidden_layers=1", "--model-config", "hidden_size=64",
    "--model-config", "intermediate_size=128", "--model-config", "num_attention_heads=2",
    "--model-config", "num_key_value_heads=1", "--seq-len", "64", "--batch-size", "2", "--max-docs", "60",
    "--eval-batches", "1", "--no-progress",
]


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), CUDA_VISIBLE_DEVICES="",
               TRITON_INTERPRET="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_DATASETS_OFFLINE="1",
               GLOO_SOCKET_IFNAME="lo")  # gloo on loopback: a host name need not resolve to a usable interface
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def _run(args, launcher=None, check=True, extra_env=None):
    cmd = (launcher or [sys.executable]) + [SFT] + args
    env = dict(_env(), **(extra_env or {}))
    p = run_bounded(cmd, 300, cwd=ROOT, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}")
    return p


def _log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _train(records):
    return {r["step"]: r for r in records if r["event"] == "train"}


# ------------------------------------------------------------------------------------------ end to end


def test_recipe_flex_check_parity_three_steps(tmp_path):
    """3 steps of the embedded default (tiny) with --check-parity: flex on packed rows vs eager on the
    unpacked documents passes in fp32, then training logs every field and saves a loadable model."""
    out = tmp_path / "run"
    p = _run(TINY + ["--output-dir", str(out), "--max-steps", "3", "--check-parity", "2", "--lr", "1e-2"])
    assert "--check-parity: flex on packed rows matches eager" in p.stdout
    recs = _log(out / "log.jsonl")
    parity = [r for r in recs if r["event"] == "parity"]
    assert len(parity) == 1 and parity[0]["ok"] and len(parity[0]["results"]) == 2
    for res in parity[0]["results"]:
        assert res["ok"] and res["documents"] >= 2  # rows of 64 tokens hold several documents
        assert res["loss_rel_diff"] < 1e-5 and res["grad_rel_diff"] < 1e-4
    train = _train(recs)
    assert sorted(train) == [1, 2, 3]
    for r in train.values():
        assert set(r) >= {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "peak_mem_gib", "time"}
        assert torch.isfinite(torch.tensor(r["loss"])) and r["tokens"] > 0 and r["mfu"] is None  # no MFU on CPU
    assert train[1]["lr"] == 0.0 and train[2]["lr"] > 0  # warmup from 0 (Transformers' cosine schedule)
    assert any(r["event"] == "eval" and r["step"] == 3 for r in recs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["first_loss"] == train[1]["loss"] and summary["last_loss"] == train[3]["loss"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert model.config.num_hidden_layers == 1 and model.config.vocab_size >= len(tok)


def test_resume_continues_with_the_same_losses(tmp_path):
    """An uninterrupted run of 9 steps (checkpoints at 3, 6, 9) against a fresh process resumed from the
    step-3 checkpoint: steps 4..9 log the same loss, lr and grad norm, and the same final eval loss.
    grad-accum 2 on a small dataset makes the resumed data position cross epoch boundaries. sdpa here:
    resume does not depend on the attention backend, and sdpa keeps the 15 steps fast on the CPU."""
    common = TINY + ["--attn", "sdpa", "--max-docs", "12", "--grad-accum", "2", "--max-steps", "9",
                     "--save-every", "3", "--keep-checkpoints", "3", "--eval-every", "3"]
    full = tmp_path / "full"
    p = _run(common + ["--output-dir", str(full)])
    start = [r for r in _log(full / "log.jsonl") if r["event"] == "start"][0]
    per_epoch = -(-start["train_rows"] // 2)
    assert per_epoch < 9 * 2 - 3 * 2, "the resumed part should cross an epoch boundary"

    resumed = tmp_path / "resumed"
    shutil.copytree(full / "tokenizer", resumed / "tokenizer")
    shutil.copytree(full / "checkpoints" / "step-0000003", resumed / "checkpoints" / "step-0000003")
    p = _run(common + ["--output-dir", str(resumed), "--resume"])
    assert "resumed from" in p.stdout and "step-0000003" in p.stdout

    a, b = _log(full / "log.jsonl"), _log(resumed / "log.jsonl")
    ta, tb = _train(a), _train(b)
    assert sorted(tb) == list(range(4, 10))
    for s in tb:
        for key in ("loss", "lr", "grad_norm", "tokens"):
            assert tb[s][key] == pytest.approx(ta[s][key], rel=1e-6, abs=1e-9), (s, key)
    ea = {r["step"]: r["eval_loss"] for r in a if r["event"] == "eval"}
    eb = {r["step"]: r["eval_loss"] for r in b if r["event"] == "eval"}
    assert eb == pytest.approx({s: ea[s] for s in eb}, rel=1e-6)
    # the checkpoint was really used: a fresh start differs at step 4
    assert ta[1]["loss"] != pytest.approx(ta[4]["loss"], rel=1e-3)


def test_dataset_from_local_jsonl_packed_and_padded(tmp_path):
    """--dataset on a local jsonl file with --text-column: its documents are what gets packed, and
    --padded (each batch's documents unpacked into right-padded rows with attention_mask) trains on the
    same documents with the same loss normalisation, so both runs log the same losses."""
    data = tmp_path / "docs.jsonl"
    docs = default_corpus.documents(40, seed=7)
    with open(data, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "body": d}) + "\n")
    common = TINY + ["--attn", "sdpa", "--dataset", str(data), "--text-column", "body", "--max-docs", "1000",
                     "--max-steps", "3"]
    out, pad = tmp_path / "packed", tmp_path / "padded"
    _run(common + ["--output-dir", str(out)])
    shutil.copytree(out / "tokenizer", pad / "tokenizer")
    _run(common + ["--output-dir", str(pad), "--padded"])
    a, b = _log(out / "log.jsonl"), _log(pad / "log.jsonl")
    ta, tb = _train(a), _train(b)
    for s in (1, 2, 3):
        assert tb[s]["tokens"] == ta[s]["tokens"]
        assert tb[s]["loss"] == pytest.approx(ta[s]["loss"], rel=1e-5)
        assert tb[s]["grad_norm"] == pytest.approx(ta[s]["grad_norm"], rel=1e-4)

    start = [r for r in a if r["event"] == "start"][0]
    assert start["args"]["dataset"] == str(data)
    # every token of the 40 documents lands in a row: the rows' documents add up to the tokenized corpus
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    n_tokens = sum(len(tok(d)["input_ids"]) + 1 for d in docs)
    ds = sft_data.load_documents(str(data), text_column="body")
    tokens = sft_data.tokenize(ds, tok)
    assert sum(len(x) for x in tokens["input_ids"]) == n_tokens
    train, evals = sft_data.split_and_pack(tokens, 64, 0.02, 0)
    assert sum(sum(x) for x in train["seq_lens"]) + sum(sum(x) for x in evals["seq_lens"]) == n_tokens
    assert start["train_rows"] == len(train) and start["eval_rows"] == len(evals)


def test_accelerate_launch_one_cpu_process(tmp_path):
    """`accelerate launch --num_processes 1 --cpu recipes/sft.py ...` runs the flex recipe."""
    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                "--cpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    p = _run(TINY + ["--output-dir", str(out), "--max-steps", "2"], launcher=launcher)
    assert "1 process(es) on cpu" in p.stdout
    assert sorted(_train(_log(out / "log.jsonl"))) == [1, 2]
    assert (out / "final" / "config.json").exists()


def test_two_processes_match_one_process_with_the_global_batch(tmp_path):
    """DDP on 2 CPU processes (torchrun, gloo) x 2 rows == 1 process x 4 rows: the same rows per step
    (accelerate deals batches round-robin), and the loss is the token-weighted mean over all processes'
    tokens, so losses and gradient norms agree. The 2-process run also takes --padded with chunks of
    at most 64 padded tokens (several model calls per micro-batch, equal in number across processes,
    only the last one syncing gradients) and grad-accum 2 against 1; each rank runs --check-parity."""
    common = TINY + ["--attn", "sdpa", "--max-steps", "3"]
    one = tmp_path / "one"
    _run(common + ["--output-dir", str(one), "--batch-size", "4"])
    two = tmp_path / "two"
    env_launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    p = _run(common + ["--output-dir", str(two), "--batch-size", "1", "--grad-accum", "2", "--padded",
                       "--check-parity", "1"], launcher=env_launcher, extra_env={"ACCELERATE_USE_CPU": "true"})
    assert "2 process(es) on cpu" in p.stdout
    assert "[parity rank 0 batch 0]" in p.stdout and "[parity rank 1 batch 0]" in p.stdout
    parity = [r for r in _log(two / "log.jsonl") if r["event"] == "parity"][0]
    assert parity["ok"] and sorted(r["rank"] for r in parity["results"]) == [0, 1]
    a, b = _train(_log(one / "log.jsonl")), _train(_log(two / "log.jsonl"))
    assert sorted(b) == [1, 2, 3]
    for s in b:
        assert b[s]["tokens"] == a[s]["tokens"]
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5)
        assert b[s]["grad_norm"] == pytest.approx(a[s]["grad_norm"], rel=1e-4)


# ------------------------------------------------------------------------------------------ in-process


def _tiny_setup(tmp_path, attn, batch_size=2, seq_len=64, n_batches=2):
    args = sft.parse_args(TINY + ["--attn", attn, "--output-dir", str(tmp_path), "--seq-len", str(seq_len),
                                  "--batch-size", str(batch_size)], gpu=False)
    docs = sft_data.load_documents(None, max_docs=60)
    tok = sft.get_tokenizer(args, docs)
    train, _ = sft_data.split_and_pack(sft_data.tokenize(docs, tok), seq_len, 0.02, 0)
    torch.manual_seed(0)
    model = sft.build_model(args, tok)
    loader = sft_data.epoch_loader(train, 0, 0, batch_size, sft_data.collator(seq_len, tok.pad_token_id))
    batches = [b for _, b in zip(range(n_batches), loader)]
    return args, model, tok, batches


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_check_parity_sdpa_batches_of_several_packed_rows(tmp_path, dtype):
    """sdpa on [4, 64] packed rows (position_ids, no attention_mask, use_cache=False): Transformers'
    mask creators find the documents row by row, so the check passes for batch size > 1. bf16 (CPU
    autocast): both bf16 runs are measured against the fp32 eager run and compared with each other."""
    args, model, tok, batches = _tiny_setup(tmp_path, "sdpa", batch_size=4)
    args.dtype = dtype
    for b in batches:  # several documents per batch, some rows hold more than one
        lens = sft_data.doc_lengths(b["cu_seq_lens"])
        assert (lens > 0).sum(1).max() >= 2
    ok, res = sft.check_parity(model, batches, args, tok.pad_token_id, 0)
    assert ok, res
    if dtype == "fp32":
        assert all(r["loss_rel_diff"] < 1e-6 for r in res)
    else:
        assert all(0 < r["grad_err_attn"] < 2e-2 and 0 < r["grad_err_eager_bf16"] < 2e-2 for r in res)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_check_parity_catches_leaking_documents(tmp_path, dtype):
    """A backend that lets packed documents attend to each other (causal over the whole row) must fail
    the check: the check can fail. At random init the leak moves the loss by ~1e-4 only (under bf16's
    floor) but the gradients by ~10%."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def leaky(module, q, k, v, attention_mask, **kw):
        kw.pop("position_ids", None)
        return sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kw)

    AttentionInterface.register("leaky_test", leaky)
    AttentionMaskInterface.register("leaky_test", sdpa_mask)
    args, model, tok, batches = _tiny_setup(tmp_path, "sdpa", n_batches=1)
    args = copy.copy(args)
    args.attn, args.dtype = "leaky_test", dtype
    model.set_attn_implementation("leaky_test")
    ok, res = sft.check_parity(model, batches, args, tok.pad_token_id, 0)
    assert not ok
    assert {"grad", "param_grad"} <= set(res[0]["failed"])
    if dtype == "fp32":
        assert "loss" in res[0]["failed"]
    assert "FAIL" in sft.format_parity(res[0], bf16=dtype == "bf16")


def test_flop_counter(tmp_path):
    """6 N T + 12 L H D sum n(n+1)/2, N without the input embedding (the LM head counts, tied too)."""
    args, model, tok, _ = _tiny_setup(tmp_path, "sdpa", n_batches=0)
    fc = sft.FlopCounter(model)
    V, d = model.config.vocab_size, 64
    assert fc.n_non_embedding == fc.n_params - V * d
    assert (fc.layers, fc.heads, fc.head_dim) == (1, 2, 32)
    assert fc(10, 55) == 6 * fc.n_non_embedding * 10 + 12 * 1 * 2 * 32 * 55
    args.model_overrides["tie_word_embeddings"] = True
    tied = sft.FlopCounter(sft.build_model(args, tok))
    assert tied.n_non_embedding == tied.n_params  # the shared matrix counts once, as the LM head
    lens = sft_data.doc_lengths(torch.tensor([[0, 3, 5, 5, 8], [0, 8, 8, 8, 8]], dtype=torch.int32))
    assert lens.tolist() == [[3, 2, 0], [8, 0, 0]]


def test_defaults_per_device():
    cpu, gpu = sft.parse_args([], gpu=False), sft.parse_args([], gpu=True)
    assert (cpu.seq_len, cpu.batch_size, cpu.max_steps, cpu.dtype, cpu.warmup) == (128, 2, 20, "fp32", 2)
    assert (gpu.seq_len, gpu.batch_size, gpu.max_steps, gpu.dtype, gpu.warmup) == (1024, 8, 300, "bf16", 30)
    assert cpu.model == "default" and cpu.dataset is None and cpu.attn == "flex"


def test_model_from_a_checkpoint_dir(tmp_path):
    """--model DIR loads the checkpoint (and its tokenizer) with the chosen attn_implementation."""
    args, model, tok, _ = _tiny_setup(tmp_path / "a", "sdpa", n_batches=0)
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    args = sft.parse_args(["--model", str(tmp_path / "ckpt"), "--attn", "eager"], gpu=False)
    tok2 = sft.get_tokenizer(args, None)
    loaded = sft.build_model(args, tok2)
    assert len(tok2) == len(tok) and loaded.config._attn_implementation == "eager"
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    os.remove(tmp_path / "ckpt" / "tokenizer.json")
    os.remove(tmp_path / "ckpt" / "tokenizer_config.json")
    with pytest.raises(SystemExit, match="--tokenizer: .* holds no tokenizer files"):
        sft.get_tokenizer(args, None)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--seq-len", "0"], "--seq-len"),
        (["--seq-len", "abc"], "--seq-len"),
        (["--batch-size", "-2"], "--batch-size"),
        (["--attn", "flash"], "--attn"),
        (["--attn", "flex_attention"], "--attn flex_attention"),
        (["--lr", "-1"], "--lr"),
        (["--max-steps", "5", "--warmup", "6"], "--warmup"),
        (["--eval-fraction", "1.5"], "--eval-fraction"),
        (["--model", "nonexistent-model"], "--model"),
        (["--model-config", "num_hidden_layers"], "--model-config"),
        (["--dtype", "fp8"], "--dtype"),
        (["--check-parity", "-1"], "--check-parity"),
    ],
)
def test_bad_flags_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        sft.parse_args(argv, gpu=False)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_bad_data_and_resume_errors_name_the_flag(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(3)))
    with pytest.raises(SystemExit, match=r"--text-column: column 'text' is not in the dataset; its columns: \['body"):
        sft_data.load_documents(str(data))
    with pytest.raises(SystemExit, match="--dataset: .* does not exist"):
        sft_data.load_documents(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.bin").write_text("?")
    with pytest.raises(SystemExit, match="--dataset: .* is not one of"):
        sft_data.load_documents(str(tmp_path / "x.bin"))
    args = sft.parse_args(["--output-dir", str(tmp_path), "--resume"], gpu=False)
    with pytest.raises(SystemExit, match="--resume: no checkpoint in"):
        sft.find_checkpoint(args)
    args = sft.parse_args(["--model-config", "not_a_field=3"], gpu=False)
    with pytest.raises(SystemExit, match="--model-config: LlamaConfig has no field 'not_a_field'"):
        sft.build_model(args, sft_data.train_tokenizer(["a b c"] * 4, 300, str(tmp_path / "tok")))


@pytest.mark.parametrize("name", ["one_gpu", "ddp_2gpu", "fsdp2_2gpu"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(os.path.join(RECIPES, "configs", f"{name}.yaml"))
    assert cfg.mixed_precision == "bf16" and cfg.num_machines == 1
    assert cfg.num_processes == (1 if name == "one_gpu" else 2)
    if name == "fsdp2_2gpu":
        assert cfg.distributed_type == "FSDP" and cfg.fsdp_config["fsdp_version"] == 2
        assert cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
        assert cfg.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_default_corpus_is_fixed():
    """The embedded corpus is the same on every machine (numbers stay comparable across runs)."""
    docs = default_corpus.documents()
    assert len(docs) == 10000 and docs == default_corpus.documents()
    digest = hashlib.sha256("\x00".join(docs).encode()).hexdigest()[:16]
    assert digest == GOLDEN_CORPUS_SHA256, digest


GOLDEN_CORPUS_SHA256 = "6eedae08415d1039"
