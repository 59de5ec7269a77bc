"""Llama 4 text: position_ids never reach the attention layers, and the NoPE layers' temperature
tuning scales queries by their absolute index in the row.

- Documents: the decoder layer gets ``position_ids`` but does not pass them on; the wrapper below
  forwards them (as ``hf_flex_position_ids``) so the attention function can keep packed documents
  apart even when Transformers' mask creators did not see the packing (a cache left on).
- Temperature: ``scale(p) = log1p(floor((p + 1) / floor_scale)) * attn_scale + 1`` with p the index in
  the row; in a packed row the documents after the first would get their scales from the wrong
  positions. For packed batches the query is rescaled to use each token's position inside its
  document (``position_ids``), which is what running each document alone computes.
"""

from __future__ import annotations

import functools

import torch

MODEL_TYPES = ("llama4_text", "llama4")


def _uses_flex(module) -> bool:
    cfg = getattr(module, "config", None)
    return getattr(cfg, "_attn_implementation", None) == "flex"


def install() -> None:
    try:
        from transformers.models.llama4 import modeling_llama4 as ml
    except ImportError:
        return
    layer_cls = ml.Llama4TextDecoderLayer
    if getattr(layer_cls.forward, "_hf_flex_patched", False):
        return
    orig = layer_cls.forward

    @functools.wraps(orig)
    def forward(self, *args, **kwargs):
        if _uses_flex(self.self_attn) and kwargs.get("position_ids") is not None:
            kwargs["hf_flex_position_ids"] = kwargs["position_ids"]
        return orig(self, *args, **kwargs)

    forward._hf_flex_patched = True
    layer_cls.forward = forward


def _scale(pos: torch.Tensor, floor_scale, attn_scale) -> torch.Tensor:
    return torch.log1p(torch.floor((pos.float() + 1.0) / floor_scale)) * attn_scale + 1.0


def prepare_query(module, query: torch.Tensor, packed: bool, kwargs) -> torch.Tensor:
    """query [B, H, S, D]: swap the row-index temperature for the in-document one (packed batches)."""
    if not packed or not getattr(module, "attn_temperature_tuning", False) or getattr(module, "use_rope", True):
        return query
    pos = kwargs.get("position_ids", kwargs.get("hf_flex_position_ids"))
    if pos is None:
        return query
    S = query.shape[2]
    row = torch.arange(S, device=query.device)  # packed training batches have no cache before them
    pos = pos.expand(query.shape[0], -1).to(query.device)
    ratio = _scale(pos, module.floor_scale, module.attn_scale) / _scale(row, module.floor_scale, module.attn_scale)[None]
    return (query.float() * ratio[:, None, :, None]).to(query.dtype)
