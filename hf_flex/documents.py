"""Block masks for packed documents, from position_ids or cu_seqlens: the training fast path.

Packed training batches change every step, so their block mask is rebuilt every step. Here it costs
two launches on the GPU (one Triton kernel for the document ids, a running sum, and each position's
document span; one that classifies the blocks from the ids at block edges and writes all eight
tables), reads O(blocks) values, never an S x S tensor, and never synchronises with the host::

    bm = hf_flex.packed_block_mask(position_ids=pos)               # causal, documents restart at pos == 0
    bm = hf_flex.packed_block_mask(cu_seqlens=cu, window=4096)     # + sliding window (q - 4096 < kv)
    out = hf_flex.flex_attention(q, k, v, block_mask=bm)

Documents are what Transformers' packing detection and its FlashAttention path use: a new document
starts wherever the position does not grow by exactly one (position_ids), or at each cu_seqlens entry.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple, Union

import torch

from . import mods
from .block_mask import BlockMask, create_block_mask, table_buffers, tables_and_halves
from .modtypes import and_leaves

__all__ = [
    "packed_block_mask", "packed_parts", "packed_tables", "document_ids_from_position_ids",
    "document_ids_and_spans_from_position_ids", "document_ids_from_cu_seqlens",
]


def document_ids_from_position_ids(position_ids: torch.Tensor, batch_size: Optional[int] = None) -> torch.Tensor:
    """int32 [B, S] document ids, non-decreasing from 0 in each row, from position_ids [B or 1, S] (or [S]).

    A new document wherever the position does not grow by exactly one: Transformers'
    ``find_packed_sequence_indices`` rule and its FlashAttention path's.
    """
    return _ids_from_positions(position_ids, batch_size, with_spans=False)[0]


def document_ids_and_spans_from_position_ids(position_ids: torch.Tensor, batch_size: Optional[int] = None):
    """(ids, spans): :func:`document_ids_from_position_ids` and, on CUDA from the same launch,
    ``mods.document_spans(ids)`` (None elsewhere: ``mods.document`` computes them), for
    ``mods.document(ids, packed=True, spans=spans)``."""
    return _ids_from_positions(position_ids, batch_size, with_spans=True)


def _ids_from_positions(position_ids, batch_size, with_spans: bool):
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype.is_floating_point or position_ids.dim() not in (1, 2):
        raise ValueError("position_ids must be an integer tensor of shape [B, S] or [S]")
    pos = position_ids if position_ids.dim() == 2 else position_ids[None]
    if batch_size is not None:
        pos = pos.expand(batch_size, -1)
    if pos.device.type == "cuda" and pos.shape[1] > 0:
        from .kernels.document_tables import document_ids_kernel

        if pos.stride(1) != 1:
            pos = pos.contiguous()
        if with_spans:
            return document_ids_kernel(pos, with_spans=True)
        return document_ids_kernel(pos), None  # one launch instead of four
    step = torch.diff(pos, dim=-1, prepend=pos[:, :1] - 1)
    return (step != 1).cumsum(-1, dtype=torch.int32), None


def document_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int32 [1, total] document ids from cumulative sequence lengths [n_docs + 1] (0 first).

    Positions at or past ``cu_seqlens[-1]`` form one last document of their own.
    """
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype.is_floating_point or cu_seqlens.dim() != 1:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [n_docs + 1]")
    if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
        raise ValueError(f"seq_len / total must be a positive int, got {total!r}")
    pos = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(torch.int64), pos, right=True).to(torch.int32)[None]


def packed_parts(mask_mod) -> Optional[Tuple[torch.Tensor, bool, Optional[int]]]:
    """(ids, causal, window) when ``mask_mod`` is an "and" of packed document(ids) with causal(),
    sliding_window(w) and noop() (each any number of times, nested or not), else None.

    Read from ``MaskMod.structure``, which only the library's own mods set: a mask of your own never
    matches, whatever its name.
    """
    # and_leaves walks the structure by module-level recursion: a nested recursive function here (the
    # earlier form) sat in a reference cycle with its closure, which held the mask's args (a batch's
    # document spans) until the cyclic garbage collector ran: measured at a training step's peak, two
    # earlier steps' spans (tests/benchmarks/NOTES.md, twelfth round)
    leaves = and_leaves(getattr(mask_mod, "structure", None))
    if leaves is None:
        return None
    docs, causal, window = [], False, None
    for offset, leaf in leaves:
        kind = leaf[0]
        if kind == "causal":
            causal = True
        elif kind == "window":
            window = leaf[1] if window is None else min(window, leaf[1])
        elif kind == "packed_documents":
            docs.append(mask_mod.args[offset])  # the document mask's ids: its first argument
        elif kind != "noop":
            return None
    if len(docs) != 1:
        return None
    if not isinstance(docs[0], torch.Tensor) or docs[0].dim() != 2:
        return None
    if window is not None and not causal:
        return None  # a window alone is not Transformers' (causal) sliding window: leave it to block_fn
    return docs[0], causal, window


def packed_tables(mask_mod, B, H, q_len, kv_len, qb, kb, device) -> Optional[BlockMask]:
    """The BlockMask of a packed-documents mask (see :func:`packed_parts`) built by one Triton launch
    from the ids at block edges, or None where that does not apply (another mask, not CUDA, lengths
    past the ids' rows, B above their rows): the other builders run then."""
    if device.type != "cuda":
        return None
    parts = packed_parts(mask_mod)
    if parts is None:
        return None
    ids, causal, window = parts
    rows, S = ids.shape
    if ids.device.type != "cuda" or q_len > S or kv_len > S or (B is not None and B > rows):
        return None
    build = functools.partial(_packed_tables_now, ids, B, H, q_len, kv_len, qb, kb, device, mask_mod, causal, window)
    if causal and window is None:
        # causal attention over packed documents: the document-aligned kernels read no table, so the
        # tables are built only if something else reads them (BlockMask.deferred)
        return BlockMask.deferred(build, (B or 1, H or 1), device, (q_len, kv_len), (qb, kb), mask_mod, "packed")
    return build()


def _packed_tables_now(ids, B, H, q_len, kv_len, qb, kb, device, mask_mod, causal, window) -> BlockMask:
    from .kernels.document_tables import document_tables

    ids = ids[: B or 1]
    if ids.dtype != torch.int32:
        ids = ids.to(torch.int32)
    Bm, Hm = B or 1, H or 1
    nq, nkv = -(-q_len // qb), -(-kv_len // kb)
    # the live halves of the partial blocks too (BlockMask.kv_half_num), from the same allocation: the
    # kernels' partial-block loops then skip the dead halves at document boundaries. Tables of one head
    # only: kernels read them at twice the whole-block tables' offsets, which holds while those
    # broadcast over heads
    if Hm == 1 and qb % 2 == 0 and kb % 2 == 0:
        (kv_num, kv_idx, q_num, q_idx), halves = tables_and_halves(Bm, nq, nkv, device)
    else:
        (kv_num, kv_idx, q_num, q_idx), halves = table_buffers(Bm, 1, nq, nkv, device), None
    document_tables(ids, q_len, kv_len, qb, kb, causal, window, kv_num, kv_idx, q_num, q_idx, halves=halves)
    if Hm > 1:  # the same tables for every head
        per_head = table_buffers(Bm, Hm, nq, nkv, device)
        for dst, src in zip(per_head, (kv_num, kv_idx, q_num, q_idx)):
            dst.copy_(src.expand_as(dst))
        kv_num, kv_idx, q_num, q_idx = per_head
    return BlockMask.from_pairs(kv_num, kv_idx, q_num, q_idx, (q_len, kv_len), (qb, kb), mask_mod, "packed",
                                halves=halves)


def packed_block_mask(
    *,
    position_ids: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    causal: bool = True,
    window: Optional[int] = None,
    batch_size: Optional[int] = None,
    seq_len: Optional[int] = None,
    BLOCK_SIZE: Union[int, tuple] = 128,
) -> BlockMask:
    """BlockMask of "same document" AND (``causal``: kv <= q) AND (``window``: q - window < kv).

    Args:
        position_ids: [B, S] (or [1, S] / [S] with ``batch_size``) positions restarting per document.
        cu_seqlens: or [n_docs + 1] cumulative lengths of one packed row (B = 1), with ``seq_len``
            its length (not read back from cu_seqlens[-1], which would synchronise); exactly one of
            the two.
        batch_size: with position_ids of one row, the batch size to broadcast it to.
        causal: kv <= q inside each document (False: each document attends to itself both ways).
        window: sliding window (needs ``causal``), or None.
        BLOCK_SIZE: as in :func:`create_block_mask`.

    The same as ``create_block_mask(and_masks(causal(), sliding_window(w), document(ids, packed=True)),
    B, None, S, S)``, which on CUDA takes the same path: one Triton launch for the document ids (a
    running sum; cu_seqlens: a searchsorted), one for the eight tables, no host sync
    (``builder == "packed"``); elsewhere the structural builder.
    """
    if (position_ids is None) == (cu_seqlens is None):
        raise ValueError("packed_block_mask: pass exactly one of position_ids and cu_seqlens")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            raise ValueError(f"packed_block_mask: window must be a positive int or None, got {window!r}")
        if not causal:
            raise ValueError("packed_block_mask: window needs causal=True (Transformers' sliding window is causal)")
    spans = None
    if position_ids is not None:
        ids, spans = document_ids_and_spans_from_position_ids(position_ids, batch_size)
    else:
        if seq_len is None:
            raise ValueError("packed_block_mask: with cu_seqlens, pass seq_len (the packed row's length)")
        ids = document_ids_from_cu_seqlens(cu_seqlens, seq_len)
    B, S = ids.shape
    parts = ([mods.causal()] if causal else []) + ([mods.sliding_window(window)] if window is not None else [])
    doc = mods.document(ids, packed=True, spans=spans)
    mm = mods.and_masks(*parts, doc) if parts else doc
    return create_block_mask(mm, B, None, S, S, device=ids.device, BLOCK_SIZE=BLOCK_SIZE)
