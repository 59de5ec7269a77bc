"""The attention interface: Transformers calls ``flex_attention_forward`` in every attention layer.

Call: ``fn(module, query, key, value, attention_mask, dropout=..., scaling=..., **kwargs)`` with
query [B, Hq, Sq, D], key/value [B, Hkv, Skv, D] (after RoPE and the cache update). Returns
``(out [B, Sq, Hq, Dv] contiguous, None)``.

Documents: when the batch is packed (``position_ids`` restarting, or ``cu_seq_lens_q``) and the mask
does not already keep documents apart, the documents are derived here, as the FlashAttention-2 path
does. That covers a cache left on during training (Transformers then skips packing detection) and
families whose mask creators never see position_ids (gpt-oss). The derived mask is built once per
batch and shared by all layers of a type (cached on the FlexMask).
"""

from __future__ import annotations

from typing import Optional

import torch

import patches

from .. import mods
from ..attention import flex_attention
from ..block_mask import BlockMask, create_block_mask
from ..documents import document_ids_and_spans_from_position_ids, document_ids_from_cu_seqlens
from .masks import FlexMask, SeveralDocuments, dense_mask_mod

__all__ = ["flex_attention_forward"]

_fallback_cache: dict = {}


def _batch_key(t: torch.Tensor):
    return (t.data_ptr(), t._version, tuple(t.shape), t.device)


def _documents(kwargs, batch_size, q_len, kv_len) -> Optional[tuple]:
    """(cache key, build) for a packed batch without cache offset, else None; ``build()`` gives
    (doc_ids [B, S], positions in documents [B, S], the documents' spans or None: see
    mods.document). Every layer asks; only a cache miss (the first layer of a batch) builds, so the
    ids cost their launches once per batch."""
    if q_len != kv_len:
        return None  # decoding after a cache: the keys' documents are not in this call's position_ids
    pos = kwargs.get("position_ids")
    if pos is None:
        pos = kwargs.get("hf_flex_position_ids")  # forwarded by a family patch (patches/llama4.py)
    if isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.shape[-1] == q_len:
        def build_from_positions():
            ids, spans = document_ids_and_spans_from_position_ids(pos, batch_size)  # one launch on CUDA
            return ids, pos.expand(batch_size, -1), spans

        return ("pos",) + _batch_key(pos), build_from_positions
    cu = kwargs.get("cu_seq_lens_q")
    # cu_seqlens[-1] is not checked against q_len (a host sync per layer): positions past it would
    # form one more document, which is what "documents" means there
    if isinstance(cu, torch.Tensor) and batch_size == 1 and cu.dim() == 1:
        def build():
            ids = document_ids_from_cu_seqlens(cu, q_len)
            starts = cu[:-1].to(torch.int64)[ids[0].long()]
            return ids, (torch.arange(q_len, device=cu.device) - starts)[None], None

        return ("cu",) + _batch_key(cu), build
    return None


def _block_mask_for(module, attention_mask, batch_size, q_len, kv_len, device, kwargs):
    """(BlockMask, packed): packed = the rows hold several documents that the mask keeps apart."""
    docs = None
    if isinstance(attention_mask, FlexMask):
        if attention_mask.q_len != q_len or attention_mask.kv_len != kv_len:
            raise ValueError(
                f"hf_flex: the mask was built for (q, kv) = ({attention_mask.q_len}, {attention_mask.kv_len}) "
                f"but the layer has ({q_len}, {kv_len})"
            )
        # packed rows come without padding (DataCollatorWithFlattening); a padded batch's position_ids
        # (generate: 1 on the pads) must not be read as document starts
        if not attention_mask.has_documents and attention_mask.q_offset == 0 and attention_mask.padding is None:
            docs = _documents(kwargs, batch_size, q_len, kv_len)
        if docs is None:
            return attention_mask.block_mask, attention_mask.has_documents
        return attention_mask.with_documents(*docs)

    if isinstance(attention_mask, BlockMask):
        return attention_mask, False
    if isinstance(attention_mask, torch.Tensor):
        if attention_mask.dim() != 4:
            raise ValueError(f"hf_flex: a tensor attention_mask must be 4-D [B, 1, Q, KV], got {tuple(attention_mask.shape)}")
        m = attention_mask
        if m.dtype.is_floating_point:
            keep = m > torch.finfo(m.dtype).min / 2
            if bool(((m != 0) & keep).any()):
                raise ValueError(
                    "hf_flex: a float attention_mask with additive values other than 0 / -inf is a bias, "
                    "not a mask; express it as a score_mod"
                )
            m = keep
        if m.shape[1] != 1:
            raise ValueError("hf_flex: a 4-D attention_mask must have one head dimension (shape [B, 1, Q, KV])")
        m = m[:, 0, :q_len, :kv_len].expand(batch_size, q_len, kv_len)
        return create_block_mask(dense_mask_mod(m), batch_size, None, q_len, kv_len, device=device), False
    if attention_mask is not None:
        raise TypeError(f"hf_flex: unsupported attention_mask of type {type(attention_mask).__name__}")

    # No mask at all (a custom mask path returned none): causal, aligned to the last query
    causal = getattr(module, "is_causal", True)
    base = mods.offset(mods.causal(), kv_len - q_len, 0) if causal else mods.noop()
    docs = _documents(kwargs, batch_size, q_len, kv_len)
    key = ("none", causal, batch_size, q_len, kv_len, device) + (docs[0] if docs else ())
    hit = _fallback_cache.get(key)
    if hit is None:
        if docs is not None:
            ids, _, spans = docs[1]()
            doc = mods.document(ids, packed=True, spans=spans)
            mm = mods.and_masks(base, doc)
            hit = (create_block_mask(mm, batch_size, None, q_len, kv_len, device=device), SeveralDocuments(doc.args[0]))
        else:
            hit = (create_block_mask(base, None, None, q_len, kv_len, device=device), False)
        _fallback_cache.clear()
        _fallback_cache[key] = hit
    return hit


@torch.compiler.disable  # see hf_flex.attention.flex_attention
def flex_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    softcap: Optional[float] = None,
    s_aux: Optional[torch.Tensor] = None,
    **kwargs,
):
    """Transformers attention function for attn_implementation="flex" (see the module docstring)."""
    if dropout and module.training:
        raise ValueError(
            f"hf_flex: attention dropout ({dropout}) is not implemented; set the model config's attention "
            "dropout field (attention_dropout / attn_pdrop) to 0.0"
        )
    if kwargs.get("output_attentions"):
        raise ValueError("hf_flex: output_attentions=True needs attn_implementation='eager'")
    B, Hq, Sq, _ = query.shape
    Hkv, Skv = key.shape[1], key.shape[2]
    bm, packed = _block_mask_for(module, attention_mask, B, Sq, Skv, query.device, kwargs)
    patch = patches.for_module(module)
    if patch is not None and hasattr(patch, "prepare_query"):
        query = patch.prepare_query(module, query, packed, kwargs)

    score_mod = None
    if softcap:
        score_mod = mods.softcap(float(softcap))
    if s_aux is not None:
        sink = mods.sinks(s_aux.reshape(-1))
        score_mod = mods.chain(score_mod, sink) if score_mod is not None else sink
    if value.dtype != query.dtype or key.dtype != query.dtype:
        key, value = key.to(query.dtype), value.to(query.dtype)
    out = flex_attention(query, key, value, score_mod, bm, scale=scaling, enable_gqa=Hq != Hkv)
    return out.transpose(1, 2).contiguous(), None
