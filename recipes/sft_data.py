"""Data for recipes/sft.py: documents (embedded corpus, local files or a hub dataset), a tokenizer,
tokenization, packing (hf_flex.packing) and the per-epoch data loaders.

Every function here is deterministic for the same arguments: a resumed run rebuilds exactly the rows
and the order the interrupted run had.
"""

from __future__ import annotations

import glob
import os
from typing import Optional

import datasets
import torch

from hf_flex.packing import PackedCollator, pack_dataset

import default_corpus

# file extensions -> datasets builder
BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".text": "text", ".parquet": "parquet",
            ".csv": "csv"}
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


class DataError(SystemExit):
    """A user-facing data problem (SystemExit: printed without a traceback, exit status 1)."""


def _local_files(path: str) -> tuple[str, list[str]]:
    """(builder, files) for a local file or a directory of files of one kind."""
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if os.path.isfile(f) and os.path.splitext(f)[1].lower() in BUILDERS)
        if not files:
            raise DataError(f"--dataset: directory {path!r} holds no {'/'.join(sorted(BUILDERS))} files")
    else:
        files = [path]
    kinds = {BUILDERS.get(os.path.splitext(f)[1].lower()) for f in files}
    if None in kinds:
        raise DataError(f"--dataset: {path!r} is not one of {'/'.join(sorted(BUILDERS))} (by its extension)")
    if len(kinds) > 1:
        raise DataError(f"--dataset: {path!r} mixes file kinds {sorted(kinds)}; use one kind")
    return kinds.pop(), files


def load_documents(dataset: Optional[str], *, config_name: Optional[str] = None, split: str = "train",
                   text_column: str = "text", max_docs: Optional[int] = None) -> datasets.Dataset:
    """A Dataset with one column "text": the embedded corpus (``dataset`` None), local files
    (a json/jsonl/text/parquet/csv file or a directory of them) or a hub dataset name."""
    if dataset is None:
        ds = datasets.Dataset.from_dict({"text": default_corpus.documents()})
        text_column = "text"
    else:
        paths = sorted(glob.glob(dataset)) if any(c in dataset for c in "*?[") else [dataset]
        if paths and all(os.path.exists(p) for p in paths):
            found = [_local_files(p) for p in paths]
            kinds = {k for k, _ in found}
            if len(kinds) > 1:
                raise DataError(f"--dataset: {dataset!r} mixes file kinds {sorted(kinds)}; use one kind")
            files = [f for _, fs in found for f in fs]
            try:
                ds = datasets.load_dataset(kinds.pop(), data_files=files, split="train")
            except Exception as e:  # a malformed file: say which flag pointed at it
                raise DataError(f"--dataset: could not read {dataset!r}: {type(e).__name__}: {e}") from e
        elif dataset.startswith(("/", ".", "~")) or os.path.splitext(dataset)[1].lower() in BUILDERS or not paths:
            raise DataError(f"--dataset: {dataset!r} does not exist")
        else:
            try:
                ds = datasets.load_dataset(dataset, config_name, split=split)
            except Exception as e:
                raise DataError(
                    f"--dataset: could not load {dataset!r} (split {split!r}) as a local path or a hub dataset: "
                    f"{type(e).__name__}: {e}") from e
    if text_column not in ds.column_names:
        raise DataError(f"--text-column: column {text_column!r} is not in the dataset; its columns: {ds.column_names}")
    if max_docs is not None:
        ds = ds.select(range(min(max_docs, len(ds))))
    ds = ds.select_columns([text_column])
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    if len(ds) < 2:
        raise DataError(f"--dataset: {len(ds)} document(s); need at least 2 (one to train on, one held out)")
    return ds


def train_tokenizer(texts, vocab_size: int, save_dir: str):
    """A byte-level BPE trained on ``texts`` (a second or two for the embedded corpus), saved to
    ``save_dir`` as a Transformers tokenizer; loaded from there when it exists (resume, other ranks)."""
    from transformers import PreTrainedTokenizerFast

    if os.path.exists(os.path.join(save_dir, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(save_dir)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL_TOKENS[0], pad_token=SPECIAL_TOKENS[1])
    hf_tok.save_pretrained(save_dir)
    return hf_tok


def tokenize(docs: datasets.Dataset, tokenizer, num_proc: Optional[int] = None) -> datasets.Dataset:
    """Column "input_ids": each document's tokens (with the tokenizer's own BOS, if it adds one) + EOS.
    Documents of fewer than 2 tokens are dropped (nothing to predict)."""
    eos = tokenizer.eos_token_id

    def enc(batch):
        ids = tokenizer(batch["text"], add_special_tokens=True)["input_ids"]
        if eos is not None:
            ids = [x if (x and x[-1] == eos) else x + [eos] for x in ids]
        return {"input_ids": ids}

    out = docs.map(enc, batched=True, remove_columns=docs.column_names, num_proc=num_proc, desc="tokenizing")
    return out.filter(lambda x: len(x) >= 2, input_columns="input_ids", num_proc=num_proc)


def split_and_pack(tokens: datasets.Dataset, seq_len: int, eval_fraction: float, seed: int,
                   num_proc: Optional[int] = None) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train rows, eval rows): documents held out by ``eval_fraction`` (at least one), then each part
    packed into rows of ``seq_len`` tokens (documents longer than that are split into pieces)."""
    if len(tokens) < 2:
        raise DataError(f"--dataset: {len(tokens)} non-empty document(s) after tokenizing; need at least 2")
    n_eval = min(len(tokens) - 1, max(1, round(eval_fraction * len(tokens))))
    parts = tokens.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    train = pack_dataset(parts["train"], seq_len, overlong="split", num_proc=num_proc)
    evals = pack_dataset(parts["test"], seq_len, overlong="split", num_proc=num_proc)
    return train, evals


def collator(seq_len: int, pad_token_id: int) -> PackedCollator:
    """[B, seq_len] batches, with ``cu_seq_lens`` (exact document bounds, filler excluded): the recipe
    pops it before the model call and uses it for FLOPs and for --check-parity's unpacking."""
    return PackedCollator(seq_len, pad_token_id, return_cu_seqlens=True)


def epoch_loader(rows: datasets.Dataset, epoch: int, seed: int, batch_size: int,
                 collate) -> torch.utils.data.DataLoader:
    """The training rows of one epoch, shuffled by ``seed + epoch`` (the same order in every process
    and in a resumed run; accelerate then gives each process its share)."""
    shuffled = rows.shuffle(seed=seed + epoch, keep_in_memory=True)
    return torch.utils.data.DataLoader(shuffled, batch_size=batch_size, shuffle=False, collate_fn=collate,
                                       drop_last=False)


def doc_lengths(cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """The real documents' lengths (zeros where a row has fewer documents), [B, D] from cu_seq_lens."""
    return (cu_seq_lens[:, 1:-1] - cu_seq_lens[:, :-2]).to(torch.int64)
