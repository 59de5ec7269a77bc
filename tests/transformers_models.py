"""Tiny random-init Transformers models per family, and input builders, for tests/test_transformers_parity.py.

Each family has a small factory returning ``(config, model_class)``: the config is built fresh on every
call (``from_config`` mutates the config it is given and shares it with the model, so a config must
never be reused across models: :func:`build_pair` deep-copies it once more for each model).

The configs are tiny (hidden 64, 2-4 layers (gemma3: 6, for its 5:1 pattern), 4 query heads, 2 KV
heads, vocab 128, fp32, dropout 0), but they keep what makes each family's attention special:

==========  ======================================================================================
llama       causal
mistral     sliding window on every layer (window 8)
qwen2       use_sliding_window=True; layer_types full, sliding, sliding (window 8)
qwen3       use_sliding_window=True; layer_types full, sliding, sliding (window 8); head_dim 32
gemma2      sliding/full alternating (window 8), attn softcap 3 (real: 50, a no-op on these tiny
            scores; 3 moves the logits by ~1.9), query_pre_attn_scalar 144 != head_dim 256,
            final softcap 30
gemma3      Gemma3ForCausalLM + Gemma3TextConfig, 5 sliding : 1 full (6 layers, window 8),
            query_pre_attn_scalar 48 != head_dim 64
phi3        head_dim 96 (hidden 192, 2 heads, 1 KV head), sliding window 8 on every layer
gpt_oss     sliding/full alternating (window 8), sinks (re-drawn with std 1 so they matter),
            4 tiny experts, head_dim 64
olmo2       causal (q/k norm)
cohere2     3 sliding : 1 full (window 8), parallel block (logit_scale 1 so errors are not scaled down)
llama4      Llama4ForCausalLM + Llama4TextConfig: chunked (chunk 8) RoPE layers and full NoPE
            layers alternating, NoPE temperature tuning active (floor_scale 4), tiny MoE
==========  ======================================================================================

Windows and chunks (8) are smaller than every sequence and document the tests use (>= 9 tokens),
so they always matter. Weights are drawn with initializer_range 0.2 (not 0.02) so that attention
is peaked and a wrong mask moves the logits by far more than the tolerance.

Families whose classes are missing from the installed Transformers raise ``pytest.skip`` with the
reason, from :meth:`Family.load`. Sensitivity, measured with eager on these configs (max logit change at
real tokens of a left-padded batch): window -> none 3.6-14, chunk -> none 8.2, gemma softcap off 1.9,
gpt-oss sinks off 4.3, query_pre_attn_scalar -> head_dim 0.5-0.8; documents leaking into each other in
a packed row 5-12 (gpt-oss's own eager packing, which ignores position_ids: 5.9). All far above the
1e-4 tolerance.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from typing import Callable, Sequence

import pytest
import torch

VOCAB = 128
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
WINDOW = 8  # sliding window / attention chunk of the families that have one
INIT_STD = 0.2

# Shared by every family (fields every PreTrainedConfig accepts).
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=INIT_STD,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    attention_dropout=0.0,
)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    module: str  # transformers.models.<module>
    model_class: str
    config_class: str
    kwargs: Callable[[], dict]  # family-specific config fields (over _COMMON)
    # Re-draw some parameters after init (name substring -> std), e.g. gpt-oss sinks.
    redraw: tuple = ()
    # Expected layer types (checked on the built config so that a Transformers release that derives
    # them differently cannot silently turn a sliding test into a causal one).
    layer_types: tuple | None = None

    def load(self):
        """(config_class, model_class), or pytest.skip when the installed Transformers lacks them."""
        try:
            mod = importlib.import_module(f"transformers.models.{self.module}")
        except ImportError as e:  # pragma: no cover - depends on the installed release
            pytest.skip(f"{self.name}: transformers.models.{self.module} not importable ({e})")
        missing = [c for c in (self.model_class, self.config_class) if not hasattr(mod, c)]
        if missing:
            import transformers

            pytest.skip(f"{self.name}: {', '.join(missing)} missing in transformers {transformers.__version__}")
        return getattr(mod, self.config_class), getattr(mod, self.model_class)

    def config_and_class(self):
        """A fresh tiny config (deep-copied) and the model class it is for."""
        config_cls, model_cls = self.load()
        kw = dict(_COMMON)
        kw.update(self.kwargs())
        cfg = config_cls(**kw)
        if self.layer_types is not None:
            got = tuple(getattr(cfg, "layer_types", None) or ())
            assert got == self.layer_types, f"{self.name}: layer_types {got}, expected {self.layer_types}"
        return copy.deepcopy(cfg), model_cls


def _llama():
    return dict(num_hidden_layers=2)


def _mistral():
    return dict(num_hidden_layers=2, sliding_window=WINDOW)


def _qwen2():
    return dict(
        num_hidden_layers=3,
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=1,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
    )


def _qwen3():
    return dict(_qwen2(), head_dim=32)


def _gemma2():
    return dict(
        num_hidden_layers=2,
        head_dim=256,
        query_pre_attn_scalar=144,
        sliding_window=WINDOW,
        # Real Gemma 2 uses 50; with tiny random weights the scores stay far below 50, so the cap
        # would be a no-op. 3 makes tanh clearly non-linear for these scores (|score| ~ 1-10).
        attn_logit_softcapping=3.0,
        final_logit_softcapping=30.0,
        layer_types=["sliding_attention", "full_attention"],
        hidden_activation="gelu_pytorch_tanh",
    )


def _gemma3():
    return dict(
        num_hidden_layers=6,
        head_dim=64,
        query_pre_attn_scalar=48,
        sliding_window=WINDOW,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
        hidden_activation="gelu_pytorch_tanh",
    )


def _phi3():
    return dict(
        num_hidden_layers=2,
        hidden_size=192,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=WINDOW,
    )


def _gpt_oss():
    return dict(
        num_hidden_layers=2,
        # its default YaRN rope (factor 32 over 4096) expects this; only silences a warning
        max_position_embeddings=131072,
        head_dim=64,
        intermediate_size=32,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
    )


def _olmo2():
    return dict(num_hidden_layers=2)


def _cohere2():
    return dict(
        num_hidden_layers=4,
        logit_scale=1.0,  # default 0.0625 shrinks logits (and so every error) 16x below the tolerance
        sliding_window=WINDOW,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
    )


def _llama4():
    return dict(
        num_hidden_layers=2,
        head_dim=16,
        intermediate_size=64,  # experts
        intermediate_size_mlp=128,  # dense MLP layers
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,  # layer 1 is MoE, layer 0 dense
        attention_chunk_size=WINDOW,
        no_rope_layers=[1, 0],  # layer 0: RoPE + chunked; layer 1: NoPE + full
        layer_types=["chunked_attention", "full_attention"],
        # NoPE temperature tuning: scale = log1p(floor((p + 1) / floor_scale)) * attn_scale + 1. With
        # the default floor_scale (8192) it is 1 on short rows; 4 makes it vary along these rows, and
        # eager computes it from the index in the row, not position_ids: in a packed row flex must use
        # in-document positions (what each document alone gets).
        floor_scale=4,
    )


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("llama", "llama", "LlamaForCausalLM", "LlamaConfig", _llama),
        Family("mistral", "mistral", "MistralForCausalLM", "MistralConfig", _mistral),
        Family(
            "qwen2", "qwen2", "Qwen2ForCausalLM", "Qwen2Config", _qwen2,
            layer_types=("full_attention", "sliding_attention", "sliding_attention"),
        ),
        Family(
            "qwen3", "qwen3", "Qwen3ForCausalLM", "Qwen3Config", _qwen3,
            layer_types=("full_attention", "sliding_attention", "sliding_attention"),
        ),
        Family(
            "gemma2", "gemma2", "Gemma2ForCausalLM", "Gemma2Config", _gemma2,
            layer_types=("sliding_attention", "full_attention"),
        ),
        Family(
            "gemma3", "gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig", _gemma3,
            layer_types=("sliding_attention",) * 5 + ("full_attention",),
        ),
        Family("phi3", "phi3", "Phi3ForCausalLM", "Phi3Config", _phi3),
        Family(
            "gpt_oss", "gpt_oss", "GptOssForCausalLM", "GptOssConfig", _gpt_oss,
            redraw=(("sinks", 1.0),),
            layer_types=("sliding_attention", "full_attention"),
        ),
        Family("olmo2", "olmo2", "Olmo2ForCausalLM", "Olmo2Config", _olmo2),
        Family(
            "cohere2", "cohere2", "Cohere2ForCausalLM", "Cohere2Config", _cohere2,
            layer_types=("sliding_attention",) * 3 + ("full_attention",),
        ),
        Family(
            "llama4", "llama4", "Llama4ForCausalLM", "Llama4TextConfig", _llama4,
            layer_types=("chunked_attention", "full_attention"),
        ),
    ]
}


def family(name: str) -> Family:
    return FAMILIES[name]


# --------------------------------------------------------------------------------------------------
# Models


def make_model(fam: Family, attn_implementation: str, state_dict=None, seed: int = 0, device="cpu"):
    """A tiny fp32 eval-mode model of ``fam`` with ``attn_implementation``, from a fresh deep-copied config.

    Without ``state_dict`` the weights are drawn from ``seed``; with it they are copied (strictly).
    """
    from transformers import AutoModelForCausalLM

    cfg, model_cls = fam.config_and_class()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=attn_implementation)
    assert type(model) is model_cls, f"{fam.name}: AutoModelForCausalLM built {type(model).__name__}, not {model_cls.__name__}"
    model = model.to(dtype=torch.float32, device=device)
    if state_dict is None:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                for sub, std in fam.redraw:
                    if sub in pname:
                        p.copy_(torch.randn(p.shape, generator=g) * std)
    else:
        model.load_state_dict(state_dict, strict=True)
    model.eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens tokens
    model.generation_config.pad_token_id = PAD_ID
    return model


def build_pair(fam: Family, impl: str, seed: int = 0, device="cpu"):
    """(eager model, ``impl`` model) with the same weights, each from its own deep copy of the config."""
    eager = make_model(fam, "eager", seed=seed, device=device)
    other = make_model(fam, impl, state_dict=eager.state_dict(), device=device)
    assert eager.config is not other.config
    assert eager.config._attn_implementation == "eager", eager.config._attn_implementation
    assert other.config._attn_implementation == impl, other.config._attn_implementation
    return eager, other


# --------------------------------------------------------------------------------------------------
# Inputs


def random_lengths(seed: int, n: int, lo: int, hi: int) -> list[int]:
    """n lengths in [lo, hi], all different when the range allows (documents of unequal length)."""
    g = torch.Generator().manual_seed(seed)
    if hi - lo + 1 >= n:
        perm = torch.randperm(hi - lo + 1, generator=g)[:n]
        return [lo + int(i) for i in perm]
    return [int(x) for x in torch.randint(lo, hi + 1, (n,), generator=g)]


def random_docs(seed: int, lengths: Sequence[int]) -> list[torch.Tensor]:
    """Random token ids in [3, VOCAB) (never pad/bos/eos, never all equal), one 1-D tensor per length."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]


def pad_batch(docs: Sequence[torch.Tensor], side: str):
    """Pad ``docs`` to one batch. Returns (input_ids, attention_mask, position_ids or None).

    Right padding: default positions (arange) are already right for the real tokens: None.
    Left padding: the positions ``generate`` uses (cumsum of the mask - 1, pads set to 1), so the real
    tokens of every row start at position 0 as they would alone.
    """
    assert side in ("left", "right")
    L = max(len(d) for d in docs)
    ids = torch.full((len(docs), L), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(docs), L), dtype=torch.long)
    for i, d in enumerate(docs):
        sl = slice(L - len(d), L) if side == "left" else slice(0, len(d))
        ids[i, sl] = d
        mask[i, sl] = 1
    if side == "right":
        return ids, mask, None
    pos = mask.cumsum(-1) - 1
    pos = pos.masked_fill(mask == 0, 1)
    return ids, mask, pos


def pack(docs: Sequence[torch.Tensor], **collator_kwargs):
    """One packed row through DataCollatorWithFlattening: input_ids, labels, position_ids [1, N] (+ extras).

    Also returns ``spans``: the (start, end) of each document in the row. The collator's format is
    checked (labels -100 at each document start, positions restarting at 0), so a Transformers
    release that changes it fails here rather than in a parity assertion.
    """
    from transformers import DataCollatorWithFlattening

    collator = DataCollatorWithFlattening(return_tensors="pt", **collator_kwargs)
    batch = collator([{"input_ids": d.tolist()} for d in docs])
    spans, start = [], 0
    for d in docs:
        spans.append((start, start + len(d)))
        start += len(d)
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    assert ids.shape == (1, start) and labels.shape == (1, start) and pos.shape == (1, start)
    for (s, e), d in zip(spans, docs):
        assert torch.equal(ids[0, s:e], d)
        assert torch.equal(pos[0, s:e], torch.arange(e - s))
        assert labels[0, s] == -100 and torch.equal(labels[0, s + 1 : e], d[1:])
    return dict(batch), spans


def n_targets(labels: torch.Tensor) -> int:
    """Number of tokens that ForCausalLMLoss counts: labels shifted left, -100 ignored."""
    return int((labels[..., 1:] != -100).sum())
