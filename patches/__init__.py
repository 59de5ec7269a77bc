"""Per-family patches for the "flex" attention implementation: one module per family that needs more
than the generic adapter (hf_flex.transformers). Shipped as a top-level package in the wheel.

A family module may define
  - ``MODEL_TYPES``: the ``config.model_type`` values it serves;
  - ``install()``: one-time, class-level wrappers, installed when hf_flex is imported. A wrapper must
    delegate unchanged to the original unless the model's ``config._attn_implementation == "flex"``,
    so models that do not use "flex" behave exactly as before;
  - ``prepare_query(module, query, packed, kwargs) -> query``: called by the attention function before
    the kernel (``packed``: the batch holds several documents per row).

Families verified without a patch (generic path): see the README's table.
"""

from __future__ import annotations

import importlib

FAMILIES = ("llama4",)
_by_type: dict = {}
_installed = False


def _load():
    if not _by_type:
        for name in FAMILIES:
            mod = importlib.import_module(f"{__name__}.{name}")
            for t in getattr(mod, "MODEL_TYPES", ()):
                _by_type[t] = mod
    return _by_type


def install() -> None:
    """Install every family's class-level wrappers (idempotent)."""
    global _installed
    if _installed:
        return
    for mod in set(_load().values()):
        if hasattr(mod, "install"):
            mod.install()
    _installed = True


def for_module(module):
    """The patch module for this attention module's family, or None."""
    cfg = getattr(module, "config", None)
    return _load().get(getattr(cfg, "model_type", None))
