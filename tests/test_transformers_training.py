"""attn_implementation="flex" where users train: transformers.Trainer with DataCollatorWithFlattening,
and DDP workers (two CPU processes, gloo) that build the model themselves.

Both compare with eager on the same data and weights: Trainer's logged losses step by step, DDP's
averaged gradients against one eager process over both shards. Tiny fp32 models: the kernels run
through Triton's interpreter on CPU.
"""

import copy
import datetime
import os
import socket
import time
import warnings

import pytest
import torch
import torch.multiprocessing as mp

import hf_flex  # noqa: F401  (registers "flex")

CFG = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=64, max_position_embeddings=256)


def _samples(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (int(torch.randint(5, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _model(impl, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(LlamaConfig(**copy.deepcopy(CFG)), attn_implementation=impl)


def test_trainer_with_flattening_collator(tmp_path):
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    data = [{"input_ids": s, "labels": s} for s in _samples(8, seed=1)]
    losses = {}
    for impl in ("flex", "eager"):
        args = TrainingArguments(
            output_dir=str(tmp_path / impl), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
            dataloader_num_workers=0, disable_tqdm=True,
        )
        model = _model(impl)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorWithFlattening())
        trainer.train()
        assert model.config._attn_implementation == impl
        losses[impl] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses["flex"]) == 3
    # eager sees the packing from position_ids (one row, no attention_mask): the same losses
    torch.testing.assert_close(torch.tensor(losses["flex"]), torch.tensor(losses["eager"]), rtol=1e-4, atol=1e-4)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, shards, path):
    # gloo on loopback: the machine's host name need not resolve to an interface the ranks can reach
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch.distributed as dist

    import hf_flex  # noqa: F401  (a worker imports the package itself, as every worker must)

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model("flex"))
        docs = shards[rank]
        ids = torch.tensor([t for d in docs for t in d])[None]
        pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
        labels = ids.clone()
        labels[0, torch.cumsum(torch.tensor([0] + [len(d) for d in docs[:-1]]), 0)] = -100
        loss = model(input_ids=ids, position_ids=pos, labels=labels).loss
        loss.backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.module.named_parameters()}, path + ".part")
            os.replace(path + ".part", path)  # whole or absent, should the parent have to kill this process
        # DDP's reducer goes before its process group: torn down after destroy_process_group, it hung
        # now and then here (the main thread in the worker's frame teardown, gloo on the CPU)
        del model, loss
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_workers(tmp_path):
    docs = _samples(6, seed=2)
    shards = [docs[:3], docs[3:]]
    path = str(tmp_path / "grads.pt")
    workers = mp.start_processes(_ddp_worker, args=(2, _free_port(), shards, path), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 300  # a stuck rendezvous or collective fails the test, not the whole run
    saved_at = None
    while not workers.join(timeout=2):  # join raises if a worker failed
        now = time.monotonic()
        if saved_at is None and os.path.exists(path):
            saved_at = now
        if now > deadline or (saved_at is not None and now > saved_at + 60):
            for p in workers.processes:
                p.kill()
            if saved_at is None:
                pytest.fail("DDP workers still running after 300 s, no gradients written (killed)")
            # the work is done (rank 0 saved after both backwards): a process stuck on its way out is the
            # platform's teardown, not the attention's, and the gradients below are still checked
            warnings.warn("DDP workers wrote their gradients but had not exited 60 s later (killed)")
            break
    got = torch.load(path)

    # one eager process: each shard's loss (a mean over its own tokens), the two averaged, as DDP does
    model = _model("eager")
    total = 0
    for shard in shards:
        for_loss = []
        for d in shard:
            t = torch.tensor(d)[None]
            logits = model(input_ids=t).logits[0, :-1]
            for_loss.append(torch.nn.functional.cross_entropy(logits, t[0, 1:], reduction="sum"))
        n = sum(len(d) - 1 for d in shard)
        total = total + torch.stack(for_loss).sum() / n / len(shards)
    total.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
