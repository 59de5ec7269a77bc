"""hf_flex's Transformers adapter: attn_implementation="flex".

``import hf_flex`` calls :func:`register`, which registers the attention function and the mask
function under the name "flex" (both are needed: without the mask function Transformers hands the
layers no mask and padding would be silently ignored). Every process that builds a model must import
hf_flex first (DDP/FSDP workers too: the recipes do).
"""

from __future__ import annotations

NAME = "flex"
_registered = False


def register() -> bool:
    """Register "flex" with Transformers' AttentionInterface and AttentionMaskInterface (idempotent).

    Returns False when Transformers is not importable.
    """
    global _registered
    if _registered:
        return True
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    from .attention import flex_attention_forward
    from .masks import flex_mask

    import patches

    AttentionInterface.register(NAME, flex_attention_forward)
    AttentionMaskInterface.register(NAME, flex_mask)
    patches.install()
    _registered = True
    return True
