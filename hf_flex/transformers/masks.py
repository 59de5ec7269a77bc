"""The mask interface: what Transformers' mask creators get back for attn_implementation="flex".

``flex_mask(**kwargs)`` is registered with ``AttentionMaskInterface``; Transformers calls it once per
forward and per layer type, and hands the result unchanged to every layer of that type. It returns a
:class:`FlexMask`: the BlockMask (built from the recognised structure, in O(blocks)), plus a cache of
variants the attention function derives from the batch (documents from ``position_ids``), so those
too are built once per batch rather than once per layer.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import mods
from ..block_mask import BlockMask, create_block_mask
from ..modtypes import MaskMod
from .recognize import recognize, translation_invariant

__all__ = ["FlexMask", "flex_mask", "dense_mask_mod"]


class SeveralDocuments:
    """Truthy when some row of doc_ids [B, S] holds several documents: rows non-decreasing from 0,
    document ids or each position's document start (the packed document mask's ``args[0]``).

    Evaluated on first use only (a device-to-host sync), and once: only family patches ask.
    """

    def __init__(self, doc_ids: torch.Tensor):
        self._ids, self._value = doc_ids, None

    def __bool__(self):
        if self._value is None:
            self._value = bool(self._ids[:, -1].any())
        return self._value


class FlexMask:
    """A BlockMask for one layer type of one forward pass, and the facts the attention function needs.

    Attributes:
        mask_mod: the hf_flex MaskMod in the layer's local coordinates (queries 0..q_len-1, keys
            0..kv_len-1), offsets already applied.
        block_mask: built from ``mask_mod`` for (q_len, kv_len), on first use.
        q_len, kv_len, batch_size: what Transformers asked for.
        has_documents: the mask already keeps packed documents apart.
        padding: the padding part (from a 2D attention_mask with zeros), or None: a padded batch is
            not a packed one, so the attention function derives no documents then.
        q_offset: absolute position of query 0 (0 in training; the cache length when decoding).
    """

    def __init__(self, mask_mod: MaskMod, batch_size: int, q_len: int, kv_len: int, device, *,
                 has_documents: bool, q_offset: int, per_batch: bool, positional: Optional[MaskMod] = None,
                 padding: Optional[MaskMod] = None):
        self.mask_mod = mask_mod
        # without offsets, mask_mod == positional AND padding when positional is given: positional is
        # the part that depends on absolute positions (chunks...), which documents derived later must
        # evaluate at in-document positions
        self.positional, self.padding = positional, padding
        self.batch_size = batch_size
        self.q_len = q_len
        self.kv_len = kv_len
        self.device = torch.device(device)
        self.has_documents = has_documents
        self.q_offset = q_offset
        self.per_batch = per_batch
        self._block_mask: Optional[BlockMask] = None
        self._derived: dict = {}

    @property
    def block_mask(self) -> BlockMask:
        """Built from ``mask_mod`` on first use: a packed batch whose documents the attention function
        derives (with_documents) never needs this one."""
        if self._block_mask is None:
            self._block_mask = create_block_mask(
                self.mask_mod, self.batch_size if self.per_batch else None, None, self.q_len, self.kv_len,
                device=self.device,
            )
        return self._block_mask

    def with_documents(self, key, build):
        """(BlockMask, packed) for this mask AND "same document", built once per ``key`` (one batch)
        and shared by the layers; packed (a :class:`SeveralDocuments`) = some row holds several
        documents. ``build()`` gives (doc_ids [B, q_len], non-decreasing rows from position_ids or
        cu_seqlens; positions in documents [B, q_len]; the documents' spans or None, see
        mods.document) and runs on a cache miss only."""
        hit = self._derived.get(key)
        if hit is None:
            doc_ids, positions, spans = build()
            doc = mods.document(doc_ids, packed=True, spans=spans)
            if self.positional is not None:
                parts = [mods.remap(self.positional, positions)] + ([self.padding] if self.padding is not None else [])
                mm = mods.and_masks(*parts, doc)
            else:
                mm = mods.and_masks(self.mask_mod, doc)
            bm = create_block_mask(mm, doc_ids.shape[0], None, self.q_len, self.kv_len, device=self.device)
            # the mask's own view of its documents (mods.document keeps the spans, not doc_ids)
            hit = (bm, SeveralDocuments(doc.args[0]))
            self._derived.clear()  # one batch at a time
            self._derived[key] = hit
        return hit

    # Transformers passes a prepared mask back into its mask creators (generate with a StaticCache):
    # they test `.ndim` / `.shape`, so a FlexMask presents itself as the 4-D mask it stands for
    ndim = 4

    @property
    def shape(self):
        return (self.batch_size, 1, self.q_len, self.kv_len)

    def __repr__(self):
        return f"FlexMask({self.mask_mod.name}, q_len={self.q_len}, kv_len={self.kv_len}, B={self.batch_size})"


def _uses_batch(mm: MaskMod) -> bool:
    # document / padding / chunked_padded read per-row tensors
    return any(isinstance(a, torch.Tensor) and a.dim() >= 1 for a in mm.args)


@torch.no_grad()
def _dense_from_transformers(kwargs: dict) -> torch.Tensor:
    """[B, Q, KV] bool from Transformers' own sdpa mask builder (the generic path for unknown masks)."""
    from transformers.masking_utils import sdpa_mask

    kw = dict(kwargs)
    kw["allow_is_causal_skip"] = False
    kw["allow_is_bidirectional_skip"] = False
    mask = sdpa_mask(**kw)
    if mask is None:  # cannot happen with the skips off; guard against a future default
        raise RuntimeError("hf_flex: transformers' sdpa_mask returned no mask with allow_*_skip=False")
    return mask[:, 0] if mask.dim() == 4 else mask


def dense_mask_mod(mask: torch.Tensor) -> MaskMod:
    """A MaskMod reading a dense bool mask [B, Q, KV] (local positions): the generic fallback."""
    return mods.dense(mask)


@torch.compiler.disable  # Python-side mask building and caching: never traced
def flex_mask(
    batch_size: int,
    q_length: Optional[int] = None,
    kv_length: Optional[int] = None,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Optional[torch.Tensor] = None,
    device="cpu",
    **kwargs,
) -> FlexMask:
    """AttentionMaskInterface entry for "flex" (same keyword arguments as Transformers' mask builders).

    Allowed (b, i, j) = mask_function(b, 0, q_offset + i, kv_offset + j) AND pad[b, kv_offset + j],
    with pad the 2D ``attention_mask`` (absolute key positions).
    """
    from transformers.masking_utils import causal_mask_function

    received = dict(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        mask_function=mask_function, attention_mask=attention_mask, device=device, **kwargs,
    )
    if q_length is None and kwargs.get("cache_position") is not None:  # older signatures
        received.pop("q_length"), received.pop("q_offset")
        q_length = kwargs["cache_position"].shape[0]
        q_offset = kwargs["cache_position"][0]
    if isinstance(q_offset, torch.Tensor):
        q_offset = int(q_offset.item())  # StaticCache mutates its tensor in place later: copy now
    mask_function = mask_function or causal_mask_function
    if isinstance(attention_mask, FlexMask):  # prepared earlier for this step (generate, StaticCache)
        if (attention_mask.q_len, attention_mask.kv_len) != (q_length, kv_length):
            raise ValueError(
                f"hf_flex: a prepared mask for (q, kv) = ({attention_mask.q_len}, {attention_mask.kv_len}) "
                f"was passed where ({q_length}, {kv_length}) is needed"
            )
        return attention_mask

    mm = recognize(mask_function, device)
    if mm is None:
        dense = _dense_from_transformers(received)
        return FlexMask(dense_mask_mod(dense), batch_size, q_length, kv_length, device,
                        has_documents=True, q_offset=q_offset, per_batch=True)
    has_docs = "document" in mm.name
    positional = None if translation_invariant(mask_function) else mm
    pad_mod = None
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        pad = attention_mask.to(device=device, dtype=torch.bool)
        need = kv_length + kv_offset
        if pad.shape[-1] < need:  # StaticCache: slots past the prompt are not written yet
            pad = torch.nn.functional.pad(pad, (0, need - pad.shape[-1]))
        pad_mod = mods.padding(pad)
        mm = mods.and_masks(mm, pad_mod)
    if q_offset or kv_offset:
        mm = mods.offset(mm, q_offset, kv_offset)
    return FlexMask(mm, batch_size, q_length, kv_length, device,
                    has_documents=has_docs, q_offset=q_offset, per_batch=_uses_batch(mm),
                    positional=positional, padding=pad_mod)
