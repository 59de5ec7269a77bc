"""Built-in mods: each factory returns a MaskMod / ScoreMod holding a Triton function and its PyTorch twin.

Positions ``q`` and ``kv`` are absolute (use :func:`offset` to shift them). Semantics:

==================  =============================================================
causal()            kv <= q
sliding_window(w)   q - w < kv   (an overlay: with causal, Transformers' q - w < kv <= q)
chunked(c)          q // c == kv // c
prefix_lm(p)        kv < p  or  kv <= q
document(ids)       ids[b, q] == ids[b, kv]                 ids [B, S] int
padding(valid)      valid[b, kv]                            valid [B, KV] bool / int
and_masks(*m)       all of m;   or_masks(*m): any of m
offset(m, qo, ko)   m evaluated at (q + qo, kv + ko)
softcap(c)          c * tanh(s / c)
alibi(slopes)       s + slopes[h] * (kv - q)                slopes [H]
relative_bias(t)    s + t[h, kv - q + L - 1]                t [H, 2L-1]; |kv - q| > L-1 clamps
sinks(logit)        one extra logit[h] in each row's softmax denominator, no value   logit [H]
chain(*s)           score mods applied left to right
==================  =============================================================

Positions are non-negative. ``alibi``, ``relative_bias`` and ``sinks`` get gradients when their tensor
requires grad.

Every mask here except ``dense`` and ``remap`` also carries a ``block_fn`` that classifies whole blocks
from their first and last positions (see :class:`~hf_flex.modtypes.MaskMod`), exactly: for rules on
``q - kv`` (causal, windows) the differences in a block form one integer interval; chunk indices and
packed-document ids are non-decreasing in position, so a block's first and last give their range.
``document`` keeps it only when every row of ids is non-decreasing (packed samples).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .modtypes import MaskMod, ScoreMod, and_holds, block_classes, chain_scores, combine_masks, offset_mask, remap_mask

__all__ = [
    "noop",
    "causal",
    "sliding_window",
    "chunked",
    "chunked_padded",
    "symmetric_window",
    "prefix_lm",
    "document",
    "padding",
    "dense",
    "and_masks",
    "or_masks",
    "offset",
    "remap",
    "softcap",
    "alibi",
    "relative_bias",
    "sinks",
    "chain",
]


def _positive_int(name: str, v) -> int:
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.dtype.is_floating_point:
        v = int(v.item())
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


# --- masks --------------------------------------------------------------------------------------------


@triton.jit
def _noop(b, h, q, kv):
    return (q >= 0) | (kv >= 0)


def _noop_blocks(q_lo, q_hi, kv_lo, kv_hi):
    return torch.full((q_lo.shape[0], kv_lo.shape[1]), 2, dtype=torch.int8, device=q_lo.device)


def noop() -> MaskMod:
    """Every position allowed (full attention)."""
    return MaskMod(_noop, lambda b, h, q, kv: (q >= 0) | (kv >= 0), (), "noop", _noop_blocks, ("noop",))


@triton.jit
def _causal(b, h, q, kv):
    return kv <= q


def _causal_blocks(q_lo, q_hi, kv_lo, kv_hi):
    return block_classes(kv_lo <= q_hi, kv_hi <= q_lo)


def causal() -> MaskMod:
    """kv <= q."""
    return MaskMod(_causal, lambda b, h, q, kv: kv <= q, (), "causal", _causal_blocks, ("causal",))


@triton.jit
def _sliding_window(b, h, q, kv, w):
    return q - w < kv


def _sliding_window_blocks(q_lo, q_hi, kv_lo, kv_hi, w):
    # allowed somewhere iff the block's last key passes its first query, everywhere iff the first key
    # passes the last query
    return block_classes(kv_hi > q_lo - w, kv_lo > q_hi - w)


def sliding_window(window: int) -> MaskMod:
    """q - window < kv (combine with causal() for Transformers' sliding-window rule)."""
    w = _positive_int("sliding_window: window", window)
    return MaskMod(
        _sliding_window, lambda b, h, q, kv, w: q - w < kv, (w,), f"sliding_window({w})", _sliding_window_blocks,
        ("window", w),
    )


@triton.jit
def _chunked(b, h, q, kv, c):
    return (q // c) == (kv // c)


def _chunk_classes(q_lo, q_hi, kv_lo, kv_hi, c):
    """Classes of "same chunk" from block edges. A block's positions are consecutive, so its chunk
    indices are all of [lo // c, hi // c]: some pair matches iff the query and key ranges meet."""
    qa, qb, ka, kb = q_lo // c, q_hi // c, kv_lo // c, kv_hi // c
    return block_classes((qa <= kb) & (ka <= qb), (qa == qb) & (ka == kb) & (qa == ka))


def _chunked_blocks(q_lo, q_hi, kv_lo, kv_hi, c):
    return _chunk_classes(q_lo, q_hi, kv_lo, kv_hi, c)


def chunked(chunk_size: int) -> MaskMod:
    """q // chunk_size == kv // chunk_size."""
    c = _positive_int("chunked: chunk_size", chunk_size)
    return MaskMod(
        _chunked, lambda b, h, q, kv, c: (q // c) == (kv // c), (c,), f"chunked({c})", _chunked_blocks
    )


@triton.jit
def _chunked_padded(b, h, q, kv, c, left_padding, shift):
    p = tl.load(left_padding + b)
    # shift (a multiple of c larger than any position) keeps both operands >= 0, where Triton's
    # truncating division equals Python's floor division
    return ((q - p + shift) // c) == ((kv - p + shift) // c)


def chunked_padded(chunk_size: int, left_padding: torch.Tensor) -> MaskMod:
    """(q - lp[b]) // c == (kv - lp[b]) // c: chunks counted from each row's first real token.

    Llama 4's chunked attention under left padding. ``left_padding`` [B] integer tensor.
    """
    c = _positive_int("chunked_padded: chunk_size", chunk_size)
    if not isinstance(left_padding, torch.Tensor) or left_padding.dim() != 1 or left_padding.dtype.is_floating_point:
        raise ValueError("chunked_padded: left_padding must be an integer tensor of shape [B]")
    lp = left_padding.contiguous()
    shift = ((1 << 30) // c) * c

    def twin(b, h, q, kv, c, lp, shift):
        p = lp[b]
        return torch.div(q - p, c, rounding_mode="floor") == torch.div(kv - p, c, rounding_mode="floor")

    return MaskMod(_chunked_padded, twin, (c, lp, shift), f"chunked_padded({c})", _chunked_padded_blocks)


def _chunked_padded_blocks(q_lo, q_hi, kv_lo, kv_hi, c, lp, shift):
    # chunked() per row on positions counted from the row's first real token, with floor division (what
    # the Triton side's shift amounts to): [B, 1, nQ, nKV]
    p = lp.to(torch.int64).view(-1, 1, 1)
    return _chunk_classes(q_lo - p, q_hi - p, kv_lo - p, kv_hi - p, c)[:, None]


@triton.jit
def _symmetric_window(b, h, q, kv, w):
    return (q - kv <= w) & (kv - q <= w)


def symmetric_window(window: int) -> MaskMod:
    """|q - kv| <= window (bidirectional sliding window)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"symmetric_window: window must be an int >= 0, got {window!r}")
    return MaskMod(
        _symmetric_window,
        lambda b, h, q, kv, w: (q - kv <= w) & (kv - q <= w),
        (window,),
        f"symmetric_window({window})",
        _symmetric_window_blocks,
    )


def _symmetric_window_blocks(q_lo, q_hi, kv_lo, kv_hi, w):
    # q - kv takes every value of [q_lo - kv_hi, q_hi - kv_lo]: allowed somewhere iff that meets [-w, w],
    # everywhere iff it lies inside
    nonempty = (kv_lo <= q_hi + w) & (kv_hi >= q_lo - w)
    return block_classes(nonempty, (kv_lo >= q_hi - w) & (kv_hi <= q_lo + w))


@triton.jit
def _prefix_lm(b, h, q, kv, p):
    return (kv < p) | (kv <= q)


def prefix_lm(prefix_len: int) -> MaskMod:
    """kv < prefix_len or kv <= q (bidirectional over the prefix, causal after it)."""
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 0:
        raise ValueError(f"prefix_lm: prefix_len must be an int >= 0, got {prefix_len!r}")
    return MaskMod(
        _prefix_lm,
        lambda b, h, q, kv, p: (kv < p) | (kv <= q),
        (prefix_len,),
        f"prefix_lm({prefix_len})",
        _prefix_lm_blocks,
    )


def _prefix_lm_blocks(q_lo, q_hi, kv_lo, kv_hi, p):
    # a key is allowed for every query of the block iff kv < p or kv <= q_lo, for some iff kv < p or
    # kv <= q_hi; both are "kv <= a bound", so the block's last key decides full, its first nonempty
    return block_classes((kv_lo < p) | (kv_lo <= q_hi), (kv_hi < p) | (kv_hi <= q_lo))


def _row_meta(t: torch.Tensor) -> torch.Tensor:
    """[row stride, length] of a [B, S] tensor, as int32 data on its device.

    Passed as a tensor, not as ints, because Triton specialises int arguments (divisibility by 16):
    as ints they would compile a new variant when the length changes.
    """
    key = (t.stride(0), t.shape[1], t.device)
    meta = _row_meta_cache.get(key)
    if meta is None:  # cached: training batches repeat their shapes, and a copy to the GPU costs a launch
        if len(_row_meta_cache) > 256:
            _row_meta_cache.clear()
        meta = torch.tensor([t.stride(0), t.shape[1]], dtype=torch.int32).to(t.device, non_blocking=True)
        _row_meta_cache[key] = meta
    return meta


_row_meta_cache: dict = {}


@triton.jit
def _document(b, h, q, kv, ids, meta):
    stride_b = tl.load(meta)
    S = tl.load(meta + 1)
    base = ids + b * stride_b
    qd = tl.load(base + q, mask=q < S, other=-1)
    kd = tl.load(base + kv, mask=kv < S, other=-2)
    return qd == kd


@triton.jit
def _packed_document(b, h, q, kv, starts, meta, spans):
    # the same predicate for non-decreasing ids, from q's document span [lo, hi]: kv in it. Only the
    # query side is read, so a loop over key tiles (forward, dQ) loads nothing per key tile. meta: the
    # spans' row stride and length
    lo, hi = _doc_span(spans, meta, b, q)
    return (kv >= lo) & (kv <= hi)


@triton.jit
def _doc_span(spans, meta, b, i):
    """(lo, hi): the first and last position of position i's document, from spans (``lo | hi << 32``);
    past the row's end lo 2**31 - 1 > hi 0: an empty span, past every position on its own too (the
    forms under a causal mask read one bound only)."""
    stride_b = tl.load(meta)
    S = tl.load(meta + 1)
    sp = tl.load(spans + b * stride_b + i, mask=i < S, other=0x7FFFFFFF)
    return (sp & 0xFFFFFFFF).to(tl.int32), (sp >> 32).to(tl.int32)


@triton.jit
def _packed_document_by_key(b, h, q, kv, starts, meta, spans):
    # the same predicate from kv's document span: q in it (by_key_fn: the dK/dV pass, keys fixed)
    lo, hi = _doc_span(spans, meta, b, kv)
    return (q >= lo) & (q <= hi)


# The packed document mask next to a causal one (and_masks): kv <= q, and q and kv in one document of
# a non-decreasing row, is kv >= lo[q] (kv <= q <= hi[q] already), or by key q <= hi[kv] (q >= kv >=
# lo[kv]): one comparison per score fewer, and each form reads one side only.
@triton.jit
def _packed_document_under_causal(b, h, q, kv, starts, meta, spans):
    lo, hi = _doc_span(spans, meta, b, q)
    return kv >= lo


@triton.jit
def _packed_document_under_causal_by_key(b, h, q, kv, starts, meta, spans):
    lo, hi = _doc_span(spans, meta, b, kv)
    return q <= hi


def document_spans(ids: torch.Tensor) -> torch.Tensor:
    """int64 [B, S] ``lo | hi << 32``: the first (lo) and last (hi) position of each position's
    document, for non-decreasing rows of integer ids [B, S]. One Triton launch on CUDA."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError("document_spans: ids must be an integer tensor of shape [B, S]")
    if ids.stride(-1) != 1:
        ids = ids.contiguous()  # the kernel reads rows of consecutive ids
    B, S = ids.shape
    if ids.device.type == "cuda" and S > 0:
        from .kernels.document_tables import document_spans_kernel

        return document_spans_kernel(ids)
    ar = torch.arange(S, device=ids.device).expand(B, S)
    change = ids[:, 1:] != ids[:, :-1]
    first = torch.cat([torch.ones_like(ids[:, :1], dtype=torch.bool), change], 1)
    last = torch.cat([change, torch.ones_like(ids[:, :1], dtype=torch.bool)], 1)
    lo = torch.where(first, ar, 0).cummax(1).values
    hi = torch.where(last, ar, S).flip(1).cummin(1).values.flip(1)
    return lo | (hi << 32)


def _gather_rows(t: torch.Tensor, b, pos, fill):
    """t[b, pos] with positions past the end reading ``fill`` (the Triton side's masked load)."""
    S = t.shape[1]
    val = t[b, pos.clamp(max=S - 1)]
    return torch.where(pos < S, val, torch.full_like(val, fill))


# the sentinels of _document_blocks: int32's largest values (also for int64 ids: F.pad passes its value
# as a double, exact up to 2**53)
_DOC_TOP = 2**31 - 1


def _is_packed(ids: torch.Tensor) -> bool:
    """Every row non-decreasing, ids >= 0 and below the two sentinels of _document_blocks.

    One device-to-host sync (on the GPU), paid once per document() rather than per block mask.
    """
    if ids.shape[1] == 0 or ids.device.type == "meta":  # a meta tensor has no values to check
        return False
    top = _DOC_TOP
    ok = (ids[:, 1:] >= ids[:, :-1]).all() & (ids[:, 0] >= 0).all() & (ids[:, -1] < top - 1).all()
    return bool(ok)


def _document_blocks(q_lo, q_hi, kv_lo, kv_hi, ids, meta, spans=None):
    """Block classes [B, 1, nQ, nKV] of "same document" for non-decreasing rows of ids [B, S].

    In such a row a block's ids run from its first to its last, and two blocks share an id iff those
    ranges meet (between two positions of the row lie all the ids between theirs); every pair matches
    iff both blocks hold one id, the same: first(q) == last(kv) and last(q) == first(kv).
    Past the row's end the Triton mod reads -1 for a query and -2 for a key, matching nothing: here a
    block starting there gets the first id ``top`` and one running there the last id ``top - 1``, two
    values above every real id that keep both rules exact.
    """
    B, S = ids.shape
    top = _DOC_TOP
    first = F.pad(ids, (0, 1), value=top)
    last = F.pad(ids, (0, 1), value=top - 1)

    def edge(table, pos):
        return table.index_select(1, pos.reshape(-1).clamp(max=S))

    q_first, q_last = edge(first, q_lo).view(B, 1, -1, 1), edge(last, q_hi).view(B, 1, -1, 1)
    kv_first, kv_last = edge(first, kv_lo).view(B, 1, 1, -1), edge(last, kv_hi).view(B, 1, 1, -1)
    nonempty = (q_first <= kv_last) & (kv_first <= q_last)
    return block_classes(nonempty, (q_first == kv_last) & (q_last == kv_first))


def document(doc_ids: torch.Tensor, *, packed: Optional[bool] = None, spans: Optional[torch.Tensor] = None) -> MaskMod:
    """ids[b, q] == ids[b, kv]: packed samples attend only within their own document.

    Args:
        doc_ids: [B, S] integer tensor, one document id per position (S >= the sequence length).
        packed: whether every row is non-decreasing with ids >= 0 (packed samples). ``None`` checks,
            at the cost of one device-to-host sync; ``True`` is the caller's promise (ids from
            position_ids or cu_seqlens are, by construction; a false promise gives wrong blocks);
            ``False`` takes the generic builder.
        spans: packed ids only, ``document_spans(doc_ids)`` computed already (the packed path gets it
            from the launch that makes the ids); None computes it (one launch on CUDA).

    Packed ids give the mask a ``block_fn``: block masks are built from document boundaries in
    O(blocks); otherwise the generic builder runs.
    """
    if not isinstance(doc_ids, torch.Tensor) or doc_ids.dim() != 2 or doc_ids.dtype.is_floating_point:
        raise ValueError("document: doc_ids must be an integer tensor of shape [B, S]")
    if doc_ids.dtype not in (torch.int32, torch.int64):
        doc_ids = doc_ids.to(torch.int32)
    ids = doc_ids.contiguous()

    def twin(b, h, q, kv, ids, meta, spans=None):
        return _gather_rows(ids, b, q, -1) == _gather_rows(ids, b, kv, -2)

    if spans is not None and (packed is False or not isinstance(spans, torch.Tensor) or spans.dtype != torch.int64
                              or spans.shape != ids.shape or spans.device != ids.device):
        raise ValueError("document: spans must be document_spans(doc_ids) (int64, doc_ids' shape and device) "
                         "and needs packed ids")
    if packed is None:
        packed = _is_packed(ids)
    if not packed:
        return MaskMod(_document, twin, (ids, _row_meta(ids)), "document", None, None)
    if spans is None:
        spans = document_spans(ids)
    elif spans.stride(-1) != 1:
        spans = spans.contiguous()  # the kernel reads rows of consecutive spans
    # packed: the kernels read each query's document span instead of the keys' ids (measured in
    # tests/benchmarks/NOTES.md: the keys' ids cost a load per key tile). The mask holds the spans
    # alone: the first position of each position's document (lo, a view of the spans) stands for its
    # id wherever ids are compared (same document, same lo; non-decreasing), so the caller's ids are
    # not kept alive through a training step next to the spans (measured: its peak memory, NOTES.md)
    return MaskMod(_packed_document, twin, (_span_starts(spans), _row_meta(spans), spans), "document",
                   _document_blocks, ("packed_documents",), _packed_document_by_key)


def _span_starts(spans: torch.Tensor) -> torch.Tensor:
    """int32 [B, S]: lo of each ``lo | hi << 32`` in spans [B, S], as a view where the byte order allows."""
    if sys.byteorder == "little":
        return spans.view(torch.int32)[:, 0::2]
    return (spans & 0xFFFFFFFF).to(torch.int32)


@triton.jit
def _padding(b, h, q, kv, valid, meta):
    stride_b = tl.load(meta)
    S = tl.load(meta + 1)
    return tl.load(valid + b * stride_b + kv, mask=kv < S, other=0) != 0


def padding(kv_valid: torch.Tensor) -> MaskMod:
    """valid[b, kv]: keys marked False (padding) are never attended to.

    Args:
        kv_valid: [B, KV] bool or integer tensor; nonzero = a real token.
    """
    if not isinstance(kv_valid, torch.Tensor) or kv_valid.dim() != 2 or kv_valid.dtype.is_floating_point:
        raise ValueError("padding: kv_valid must be a bool or integer tensor of shape [B, KV]")
    valid = (kv_valid != 0).to(torch.int8).contiguous()

    def twin(b, h, q, kv, valid, meta):
        return _gather_rows(valid, b, kv, 0) != 0

    return MaskMod(_padding, twin, (valid, _row_meta(valid)), "padding", _padding_blocks)


def _padding_blocks(q_lo, q_hi, kv_lo, kv_hi, valid, meta):
    """Block classes [B, 1, 1, nKV] from the number of valid keys in each key block.

    One cumulative sum over valid [B, KV] (keys past its end are not valid), read at the block edges.
    """
    B, S = valid.shape
    counts = F.pad(torch.cumsum(valid != 0, dim=1, dtype=torch.int32), (1, 0))  # [B, S + 1]: valid in [0, i)
    lo, hi = kv_lo.reshape(-1), kv_hi.reshape(-1)
    n = counts.index_select(1, (hi + 1).clamp(max=S)) - counts.index_select(1, lo.clamp(max=S))
    return block_classes(n > 0, n == hi - lo + 1).view(B, 1, 1, -1)


@triton.jit
def _dense(b, h, q, kv, mask, meta):
    stride_b = tl.load(meta)
    stride_q = tl.load(meta + 1)
    Q = tl.load(meta + 2)
    KV = tl.load(meta + 3)
    return tl.load(mask + b * stride_b + q * stride_q + kv, mask=(q < Q) & (kv < KV), other=0) != 0


def dense(mask: torch.Tensor) -> MaskMod:
    """mask[b, q, kv] from a materialised [B, Q, KV] bool mask (positions are local: 0..Q-1, 0..KV-1).

    The fallback for masks no mod describes (O(B*Q*KV) memory); prefer structured mods.
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 3 or mask.dtype.is_floating_point:
        raise ValueError("dense: mask must be a bool or integer tensor of shape [B, Q, KV]")
    m = (mask != 0).to(torch.int8).contiguous()
    meta = torch.tensor([m.stride(0), m.stride(1), m.shape[1], m.shape[2]], dtype=torch.int32).to(m.device)

    def twin(b, h, q, kv, m, meta):
        Q, KV = m.shape[1], m.shape[2]
        val = m[b, q.clamp(max=Q - 1), kv.clamp(max=KV - 1)] != 0
        return val & (q < Q) & (kv < KV)

    return MaskMod(_dense, twin, (m, meta), "dense")


def and_masks(*masks: MaskMod) -> MaskMod:
    """Allowed where every mask allows."""
    if any(and_holds(getattr(m, "structure", None), ("causal",)) for m in masks):
        # a packed document mask under a causal one takes its shorter forms (_packed_document_under_causal)
        masks = tuple(
            dataclasses.replace(m, triton_fn=_packed_document_under_causal, by_key_fn=_packed_document_under_causal_by_key)
            if isinstance(m, MaskMod) and m.triton_fn is _packed_document and m.structure == ("packed_documents",) else m
            for m in masks
        )
    return combine_masks("and", masks)


def or_masks(*masks: MaskMod) -> MaskMod:
    """Allowed where any mask allows."""
    return combine_masks("or", masks)


def offset(mask: MaskMod, q_offset: int = 0, kv_offset: int = 0) -> MaskMod:
    """``mask`` evaluated at (q + q_offset, kv + kv_offset), e.g. a decode step after a KV cache."""
    return offset_mask(mask, q_offset, kv_offset)


def remap(mask: MaskMod, positions: torch.Tensor) -> MaskMod:
    """``mask`` evaluated at (positions[b, q], positions[b, kv]): e.g. chunks counted inside each packed
    document (positions = position_ids restarting per document). positions [B, S] int."""
    return remap_mask(mask, positions)


# --- score mods ---------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # exact in fp32 (no libdevice needed, also under the interpreter); saturates to +-1 for large |x|
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _softcap(s, b, h, q, kv, cap):
    return cap * _tanh(s / cap)


@triton.jit
def _softcap_grad(s, ds, b, h, q, kv, cap):
    t = _tanh(s / cap)
    return ds * (1.0 - t * t)


@triton.jit
def _tanh_approx(x):
    # one MUFU instruction, relative error at most 2^-10.99 (PTX ISA): under bf16's rounding (2^-9),
    # where the exact form costs an exp and a full-precision division per score
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _softcap_approx(s, b, h, q, kv, cap):
    return cap * _tanh_approx(s * (1.0 / cap))


@triton.jit
def _softcap_approx_grad(s, ds, b, h, q, kv, cap):
    t = _tanh_approx(s * (1.0 / cap))
    return ds * (1.0 - t * t)


def softcap(cap: float) -> ScoreMod:
    """cap * tanh(score / cap) (Gemma 2's attention logit softcapping).

    16-bit inputs on the GPU use the hardware tanh approximation (``ScoreMod.approx``); its error
    against float64 is measured in tests/benchmarks/NOTES.md."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
        raise ValueError(f"softcap: cap must be a positive number, got {cap!r}")
    cap = float(cap)
    twin = lambda s, b, h, q, kv, c: c * torch.tanh(s / c)  # noqa: E731
    name = f"softcap({cap:g})"
    approx = ScoreMod(_softcap_approx, twin, (cap,), name + "~", grad_fn=_softcap_approx_grad)
    return ScoreMod(_softcap, twin, (cap,), name, grad_fn=_softcap_grad, approx=approx)


@triton.jit
def _alibi(s, b, h, q, kv, slopes):
    return s + tl.load(slopes + h).to(tl.float32) * (kv - q).to(tl.float32)


@triton.jit
def _alibi_param_grad(s, ds, b, h, q, kv, slopes, g_slopes):
    contrib = ds * (kv - q).to(tl.float32)
    tl.atomic_add(g_slopes + h, tl.sum(tl.sum(contrib, 1), 0))


def alibi(slopes: torch.Tensor) -> ScoreMod:
    """score + slopes[h] * (kv - q). ``slopes`` [H] (query heads); learnable if it requires grad."""
    if not isinstance(slopes, torch.Tensor) or slopes.dim() != 1 or not slopes.dtype.is_floating_point:
        raise ValueError("alibi: slopes must be a floating tensor of shape [H]")
    sl = slopes.contiguous()

    def twin(s, b, h, q, kv, sl):
        return s + sl[h].to(s.dtype) * (kv - q).to(s.dtype)

    return ScoreMod(_alibi, twin, (sl,), "alibi", param_grad_fn=_alibi_param_grad, learnable=(0,))


@triton.jit
def _rel_index(q, kv, L):
    r = kv - q + L - 1
    return tl.minimum(tl.maximum(r, 0), 2 * L - 2)


@triton.jit
def _relative_bias(s, b, h, q, kv, table, L):
    return s + tl.load(table + h * (2 * L - 1) + _rel_index(q, kv, L)).to(tl.float32)


@triton.jit
def _relative_bias_param_grad(s, ds, b, h, q, kv, table, L, g_table):
    idx = _rel_index(q, kv, L) + (q - q) + (kv - kv)  # broadcast to the tile's shape
    tl.atomic_add(g_table + h * (2 * L - 1) + idx, ds)


def relative_bias(table: torch.Tensor) -> ScoreMod:
    """score + table[h, kv - q + L - 1], table [H, 2L-1] (distances past L-1 use the edge entries).

    Learnable when ``table`` requires grad (its gradient is accumulated with float64 atomics).
    """
    if (
        not isinstance(table, torch.Tensor)
        or table.dim() != 2
        or table.shape[1] % 2 != 1
        or not table.dtype.is_floating_point
    ):
        raise ValueError("relative_bias: table must be a floating tensor of shape [H, 2L-1]")
    t = table.contiguous()
    L = (t.shape[1] + 1) // 2

    def twin(s, b, h, q, kv, t, L):
        return s + t[h, (kv - q + L - 1).clamp(0, 2 * L - 2)].to(s.dtype)

    return ScoreMod(
        _relative_bias, twin, (t, L), "relative_bias", param_grad_fn=_relative_bias_param_grad, learnable=(0,)
    )


def sinks(logit: torch.Tensor) -> ScoreMod:
    """One extra per-head logit in every row's softmax denominator, with no value (gpt-oss sinks).

    Args:
        logit: [Hq] floating tensor; learnable when it requires grad. A row with every key masked
        then puts all its weight on the sink: output 0, LSE = logit[h].
    """
    if not isinstance(logit, torch.Tensor) or logit.dim() != 1 or not logit.dtype.is_floating_point:
        raise ValueError("sinks: logit must be a floating tensor of shape [Hq]")
    return ScoreMod(None, None, (), "sinks", sink=logit)


def chain(*score_mods: ScoreMod) -> ScoreMod:
    """Score mods applied left to right: chain(f, g)(s) == g(f(s)); at most one may be sinks()."""
    if not score_mods:
        raise ValueError("chain: give at least one ScoreMod")
    return chain_scores(score_mods)
