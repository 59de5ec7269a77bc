"""Per-family patches for hf_flex's Transformers adapter (one module per model family that needs more
than the generic adapter). Shipped as a top-level package in the wheel."""
