"""hf_flex: a Triton flex-attention backend for Hugging Face Transformers.

Public API::

    out = hf_flex.flex_attention(q, k, v, score_mod=None, block_mask=None, *, scale=None,
                                 enable_gqa=False, return_lse=False)
    bm = hf_flex.create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device=None, BLOCK_SIZE=128)
    bm = hf_flex.packed_block_mask(position_ids=pos)  # packed documents (+ causal / window): the fast path
    hf_flex.mods.causal() / sliding_window(w) / chunked(c) / prefix_lm(p) / document(ids) / padding(valid)
    hf_flex.mods.and_masks / or_masks / offset;  softcap(c) / alibi(slopes) / relative_bias(t) / sinks(l) / chain
    hf_flex.MaskMod / hf_flex.ScoreMod: your own mods (a Triton function plus its PyTorch twin)
    hf_flex.reference.attention: the dense PyTorch oracle
"""

from . import mods, reference
from .attention import flex_attention
from .block_mask import BlockMask, block_mask_from_classes, create_block_mask
from .documents import packed_block_mask
from .modtypes import MaskMod, ScoreMod

from .transformers import register as _register_with_transformers

__version__ = "0.1.0"

_register_with_transformers()

__all__ = [
    "flex_attention",
    "create_block_mask",
    "block_mask_from_classes",
    "packed_block_mask",
    "BlockMask",
    "MaskMod",
    "ScoreMod",
    "mods",
    "reference",
]
