"""Recognise Transformers' mask functions and rebuild them as hf_flex mods.

Transformers hands the mask interface a tree of closures from ``transformers.masking_utils``
(``and_masks(causal_mask_function, sliding_window_overlay(w), padding_mask_function(pad), ...)``).
Each factory's inner function has one code object, so calling every factory once gives a table
{code object: kind}; a closure's parameters are its cells (``co_freevars`` zipped with
``__closure__``). This reads private structure: ``tests/test_transformers_recognize.py`` fails loudly
when a Transformers release changes it. Anything not recognised returns ``None`` and the caller takes
the generic (dense) path: slower, still right.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import mods
from ..modtypes import MaskMod

__all__ = ["recognize", "translation_invariant", "closure_cells", "KINDS"]


def _code(fn: Callable):
    return getattr(fn, "__code__", None)


def _build_kinds() -> dict:
    """{code object: kind name} for every masking_utils factory this module understands."""
    from transformers import masking_utils as mu

    dummy = torch.zeros(1, 1, dtype=torch.long)
    kinds = {}

    def add(kind, fn):
        if fn is not None and _code(fn) is not None:
            kinds[_code(fn)] = kind

    # factories are looked up by name: a release that lacks one (older Transformers) simply never
    # hands it to us
    def factory(name, *args):
        f = getattr(mu, name, None)
        return f(*args) if f is not None else None

    add("causal", getattr(mu, "causal_mask_function", None))
    add("bidirectional", getattr(mu, "bidirectional_mask_function", None))
    add("and", factory("and_masks", mu.causal_mask_function))
    add("or", factory("or_masks", mu.causal_mask_function))
    add("sliding_window", factory("sliding_window_overlay", 4))
    add("chunked", factory("chunked_overlay", 4, torch.zeros(1, dtype=torch.long)))
    add("padding", factory("padding_mask_function", dummy.bool()))
    add("packed", factory("packed_sequence_mask_function", dummy))
    add("remap", factory("remap_positions_for_packed_sequence", mu.causal_mask_function, dummy))
    add("offset", factory("add_offsets_to_mask_function", mu.causal_mask_function, 0, 0))
    add("sliding_window_bidirectional", factory("sliding_window_bidirectional_overlay", 4))
    return kinds


KINDS: dict = {}


def _kinds() -> dict:
    if not KINDS:
        KINDS.update(_build_kinds())
    return KINDS


def closure_cells(fn: Callable) -> dict:
    """{free variable name: value} of a closure."""
    code = _code(fn)
    cells = getattr(fn, "__closure__", None) or ()
    return dict(zip(code.co_freevars, (c.cell_contents for c in cells))) if code is not None else {}


# Mods whose value depends only on q - kv: evaluating them at per-document positions (what
# remap_positions_for_packed_sequence does) equals evaluating them at absolute positions inside one
# document, where positions grow by one per token.
_TRANSLATION_INVARIANT = {"causal", "bidirectional", "sliding_window", "sliding_window_bidirectional", "padding", "packed"}


def _as_int(v, name):
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            return None
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, int):
        return None
    return v


def translation_invariant(fn: Callable) -> bool:
    """True when ``fn`` depends on q and kv only through q - kv (and on per-row tensors of keys only
    through padding): then evaluating it inside one packed document at absolute positions equals
    evaluating it at the document's own positions."""
    kind = _kinds().get(_code(fn))
    if kind in ("and", "or"):
        return all(translation_invariant(f) for f in closure_cells(fn)["mask_functions"])
    if kind in ("offset", "remap"):
        return translation_invariant(closure_cells(fn)["mask_function"])
    return kind in _TRANSLATION_INVARIANT


def positions_in_documents(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] position of each token inside its document (doc_ids [B, S], documents contiguous)."""
    S = doc_ids.shape[-1]
    idx = torch.arange(S, device=doc_ids.device).expand_as(doc_ids)
    first = torch.ones_like(doc_ids, dtype=torch.bool)
    first[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start = torch.where(first, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    return idx - start


def _per_document(fns, children):
    """In and(..., packed_sequence(ids)), evaluate position-dependent siblings (chunks) at in-document
    positions, as running each document alone does. Transformers >= 5.2x wraps them in
    remap_positions_for_packed_sequence itself; older releases hand them over as they are."""
    kinds = [_kinds().get(_code(f)) for f in fns]
    if "packed" not in kinds:
        return children
    ids = closure_cells(fns[kinds.index("packed")])["packed_sequence_mask"]
    pos = None
    out = []
    for f, k, c in zip(fns, kinds, children):
        if k not in ("packed", "remap") and not translation_invariant(f):
            pos = positions_in_documents(ids) if pos is None else pos
            c = mods.remap(c, pos)
        out.append(c)
    return out


def recognize(fn: Callable, device=None) -> Optional[MaskMod]:
    """The hf_flex MaskMod equal to Transformers mask function ``fn`` (absolute positions), or None."""
    kind = _kinds().get(_code(fn))
    if kind is None:
        return None
    cells = closure_cells(fn)
    if kind == "causal":
        return mods.causal()
    if kind == "bidirectional":
        return mods.noop()
    if kind in ("and", "or"):
        fns = cells["mask_functions"]
        children = [recognize(f, device) for f in fns]
        if any(c is None for c in children):
            return None
        if kind == "and":
            children = _per_document(fns, children)
        if len(children) == 1:
            return children[0]
        return (mods.and_masks if kind == "and" else mods.or_masks)(*children)
    if kind == "sliding_window":
        w = _as_int(cells["sliding_window"], "sliding_window")
        return mods.sliding_window(w) if w is not None and w > 0 else None
    if kind == "sliding_window_bidirectional":
        w = _as_int(cells["sliding_window"], "sliding_window")
        return mods.symmetric_window(w) if w is not None and w >= 0 else None
    if kind == "chunked":
        c = _as_int(cells["chunk_size"], "chunk_size")
        lp = cells["left_padding"]
        if c is None or c <= 0:
            return None
        if isinstance(lp, torch.Tensor):
            return mods.chunked_padded(c, lp)
        lp = _as_int(lp, "left_padding")
        return mods.chunked(c) if lp == 0 else None
    if kind == "padding":
        pad = cells["padding_mask"]
        return mods.padding(pad) if isinstance(pad, torch.Tensor) and pad.dim() == 2 else None
    if kind == "packed":
        ids = cells["packed_sequence_mask"]
        # Transformers' find_packed_sequence_indices makes these ids by a cumulative sum: non-decreasing
        # from 0 (no need to check them, which would cost a host sync per mask)
        return mods.document(ids, packed=True) if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None
    if kind == "remap":
        # wraps the mask that packed_sequence_mask_function then restricts to one document: inside a
        # document, a translation-invariant mask needs no remapping (and keeps its fast block tables)
        inner = recognize(cells["mask_function"], device)
        if inner is None or translation_invariant(cells["mask_function"]):
            return inner
        pos = cells["position_ids"]
        return mods.remap(inner, pos) if isinstance(pos, torch.Tensor) and pos.dim() == 2 else None
    if kind == "offset":
        inner = recognize(cells["mask_function"], device)
        qo, ko = _as_int(cells["q_offset"], "q_offset"), _as_int(cells["kv_offset"], "kv_offset")
        if inner is None or qo is None or ko is None:
            return None
        return mods.offset(inner, qo, ko) if (qo or ko) else inner
    return None
