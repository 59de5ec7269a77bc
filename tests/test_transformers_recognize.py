"""The adapter's mask side: the recogniser reproduces Transformers' own masks, and fails loudly when a
Transformers release changes the closures it reads.

Oracle: ``transformers.masking_utils.sdpa_mask`` (Transformers' dense boolean mask) on the same
arguments. Compared: the element-level mask of the rebuilt MaskMod (its PyTorch twin) and the block
tables (no allowed element in an empty block, no disallowed element in a full block).
"""

import sys

import pytest
import torch
from transformers import masking_utils as mu

import hf_flex
from helpers import run_bounded
from hf_flex.transformers.masks import FlexMask, flex_mask
from hf_flex.transformers.recognize import KINDS, _kinds, closure_cells, recognize

# What recognize() reads of each factory: (kind, factory call, free variables it uses)
EXPECTED_CELLS = {
    "and": (lambda: mu.and_masks(mu.causal_mask_function), {"mask_functions"}),
    "or": (lambda: mu.or_masks(mu.causal_mask_function), {"mask_functions"}),
    "sliding_window": (lambda: mu.sliding_window_overlay(3), {"sliding_window"}),
    "chunked": (lambda: mu.chunked_overlay(3, torch.zeros(1, dtype=torch.long)), {"chunk_size", "left_padding"}),
    "padding": (lambda: mu.padding_mask_function(torch.ones(1, 2, dtype=torch.bool)), {"padding_mask"}),
    "packed": (lambda: mu.packed_sequence_mask_function(torch.zeros(1, 2, dtype=torch.long)), {"packed_sequence_mask"}),
    "remap": (
        lambda: mu.remap_positions_for_packed_sequence(mu.causal_mask_function, torch.zeros(1, 2, dtype=torch.long)),
        {"mask_function", "position_ids"},
    ),
    "offset": (lambda: mu.add_offsets_to_mask_function(mu.causal_mask_function, 1, 2), {"mask_function", "q_offset", "kv_offset"}),
}


# factories that only some supported releases have (5.17 has no remap_positions_for_packed_sequence)
OPTIONAL = {"remap": "remap_positions_for_packed_sequence"}


def test_transformers_internals_the_recogniser_reads_are_unchanged():
    kinds = _kinds()
    required = {"causal", "bidirectional", *EXPECTED_CELLS} - {k for k, n in OPTIONAL.items() if not hasattr(mu, n)}
    assert set(kinds.values()) >= required, (
        f"transformers.masking_utils changed: mask factories the recogniser knows are missing: "
        f"{required - set(kinds.values())}"
    )
    for kind, (make, cells) in EXPECTED_CELLS.items():
        if kind in OPTIONAL and not hasattr(mu, OPTIONAL[kind]):
            continue
        fn = make()
        assert KINDS.get(fn.__code__) == kind, f"{kind}: its inner function is no longer recognised"
        got = set(closure_cells(fn))
        assert cells <= got, f"masking_utils.{kind}: closure variables changed: expected {cells}, found {got}"


def _dense_oracle(**kw):
    kw = dict(kw, allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return mu.sdpa_mask(**kw)[:, 0]


def _check_against_transformers(fm: FlexMask, expect: torch.Tensor):
    B, Q, KV = expect.shape
    bm = fm.block_mask
    got = bm.materialize().expand(B if bm.shape[0] > 1 else 1, -1, -1, -1)[:, 0]
    if bm.shape[0] == 1:
        got = got.expand(B, Q, KV)
    assert torch.equal(got, expect), f"element mask differs at {(got != expect).nonzero()[:5].tolist()}"
    # block tables agree with the element mask
    classes = bm.to_dense()[:, 0]  # [Bm, nQ, nKV]
    qb, kb = bm.BLOCK_SIZE
    for b in range(B):
        cls = classes[b if classes.shape[0] > 1 else 0]
        for i in range(cls.shape[0]):
            for j in range(cls.shape[1]):
                blk = expect[b, i * qb : (i + 1) * qb, j * kb : (j + 1) * kb]
                c = int(cls[i, j])
                if c == 0:
                    assert not blk.any(), f"block ({i},{j}) of row {b} is empty in the tables but has allowed keys"
                if c == 2:
                    assert blk.all(), f"block ({i},{j}) of row {b} is full in the tables but has masked keys"


def _pad(B, S, left, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(S // 2, S, (B,), generator=g)
    pos = torch.arange(S)
    return (pos[None] >= (S - lens)[:, None]) if left else (pos[None] < lens[:, None])


def _packed_ids(S, seed=0):
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(S - 2, generator=g)[:3].add(1).tolist())
    pos = torch.cat([torch.arange(b - a) for a, b in zip([0] + cuts, cuts + [S])])[None]
    return pos, mu.find_packed_sequence_indices(pos)


SCENARIOS = {}


def _remap(f, pos):
    # Transformers >= 5.2x wraps the causal part of a packed mask in remap_positions_for_packed_sequence
    r = getattr(mu, "remap_positions_for_packed_sequence", None)
    return r(f, pos) if r is not None else f


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


@scenario
def causal():
    return dict(batch_size=2, q_length=70, kv_length=70, mask_function=mu.causal_mask_function)


@scenario
def causal_left_padding():
    return dict(batch_size=3, q_length=70, kv_length=70, mask_function=mu.causal_mask_function, attention_mask=_pad(3, 70, True))


@scenario
def causal_right_padding():
    return dict(batch_size=3, q_length=50, kv_length=50, mask_function=mu.causal_mask_function, attention_mask=_pad(3, 50, False))


@scenario
def sliding_window():
    return dict(batch_size=2, q_length=90, kv_length=90, mask_function=mu.sliding_window_causal_mask_function(13),
                attention_mask=_pad(2, 90, True))


@scenario
def chunked_with_left_padding():
    am = _pad(2, 80, True)
    lp = (~am).sum(-1)
    return dict(batch_size=2, q_length=80, kv_length=80, mask_function=mu.chunked_causal_mask_function(16, lp),
                attention_mask=am)


@scenario
def packed_documents():
    pos, ids = _packed_ids(96)
    f = mu.and_masks(_remap(mu.causal_mask_function, pos), mu.packed_sequence_mask_function(ids))
    return dict(batch_size=1, q_length=96, kv_length=96, mask_function=f)


@scenario
def packed_sliding():
    pos, ids = _packed_ids(96, seed=3)
    f = mu.and_masks(
        _remap(mu.sliding_window_causal_mask_function(10), pos),
        mu.packed_sequence_mask_function(ids),
    )
    return dict(batch_size=1, q_length=96, kv_length=96, mask_function=f)


@scenario
def decode_dynamic_cache():
    am = _pad(2, 41, True)
    return dict(batch_size=2, q_length=1, kv_length=41, q_offset=40, kv_offset=0, mask_function=mu.causal_mask_function,
                attention_mask=am)


@scenario
def decode_sliding_cache():
    # sliding DynamicCache: kv_len = min(W-1, past) + q, kv_offset = max(past - W + 1, 0)
    W, past = 8, 30
    am = torch.ones(2, past + 1, dtype=torch.bool)
    return dict(batch_size=2, q_length=1, kv_length=W - 1 + 1, q_offset=past, kv_offset=past - W + 1,
                mask_function=mu.sliding_window_causal_mask_function(W), attention_mask=am)


@scenario
def static_cache_prefill():
    am = _pad(2, 20, True)
    return dict(batch_size=2, q_length=20, kv_length=64, q_offset=torch.tensor(0), kv_offset=0,
                mask_function=mu.causal_mask_function, attention_mask=am)


@scenario
def static_cache_decode():
    am = torch.cat([_pad(2, 20, True), torch.ones(2, 5, dtype=torch.bool)], 1)
    return dict(batch_size=2, q_length=1, kv_length=64, q_offset=torch.tensor(24), kv_offset=0,
                mask_function=mu.causal_mask_function, attention_mask=am)


@scenario
def bidirectional_padded():
    return dict(batch_size=2, q_length=40, kv_length=40, mask_function=mu.bidirectional_mask_function,
                attention_mask=_pad(2, 40, False))


@scenario
def or_and_combination():
    f = mu.or_masks(mu.sliding_window_causal_mask_function(5), mu.chunked_causal_mask_function(16, torch.zeros(2, dtype=torch.long)))
    return dict(batch_size=2, q_length=64, kv_length=64, mask_function=f)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_recogniser_reproduces_transformers_mask(name):
    kw = SCENARIOS[name]()
    kw.setdefault("device", "cpu")
    expect = _dense_oracle(**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    fm = flex_mask(**kw)
    assert recognize(kw["mask_function"]) is not None, f"{name}: not recognised (would take the dense path)"
    assert fm.mask_mod.name != "dense"
    _check_against_transformers(fm, expect)


def test_unrecognised_mask_takes_the_dense_path_and_is_right():
    tokens = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0, 1, 1] * 4])  # "image" tokens see each other

    def image_overlay(b, h, q, kv):
        return (tokens[b, q] == 1) & (tokens[b, kv] == 1)

    f = mu.or_masks(mu.causal_mask_function, image_overlay)
    kw = dict(batch_size=1, q_length=40, kv_length=40, mask_function=f, device="cpu", use_vmap=True)
    assert recognize(f) is None
    fm = flex_mask(**kw)
    assert fm.mask_mod.name == "dense"
    _check_against_transformers(fm, _dense_oracle(**kw))


def test_registered_with_both_interfaces():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert "flex" in AttentionInterface._global_mapping
    assert "flex" in AttentionMaskInterface._global_mapping


def test_fresh_process_needs_the_import():
    code = (
        "import torch, transformers\n"
        "cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,"
        " num_attention_heads=2, num_key_value_heads=1, vocab_size=32)\n"
        "try:\n"
        "    transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation='flex')\n"
        "    print('loaded-without-import')\n"
        "except ValueError:\n"
        "    print('refused')\n"
        "import hf_flex\n"
        "m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation='flex')\n"
        "print(m.config._attn_implementation)\n"
    )
    out = run_bounded([sys.executable, "-c", code], 300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["refused", "flex"], out.stdout


def test_dropout_in_training_is_refused_with_the_field_to_set():
    import copy

    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=32, attention_dropout=0.1)
    m = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="flex").train()
    with pytest.raises(ValueError, match="attention_dropout"):
        m(torch.randint(0, 32, (1, 8)))
    m.eval()
    assert m(torch.randint(0, 32, (1, 8))).logits.isfinite().all()  # eval: dropout is off, fine


def test_documents_are_built_once_per_batch(monkeypatch):
    """Packed batch with a cache left on: documents come from position_ids, one build for all layers."""
    import copy

    from transformers import AutoModelForCausalLM, LlamaConfig

    import hf_flex.transformers.masks as masks_mod

    calls = []
    real = masks_mod.create_block_mask

    def counting(*a, **k):
        calls.append(a[0].name)
        return real(*a, **k)

    monkeypatch.setattr(masks_mod, "create_block_mask", counting)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=32)
    m = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="flex").eval()
    pos = torch.cat([torch.arange(7), torch.arange(9), torch.arange(6)])[None]
    with torch.no_grad():
        m(torch.randint(0, 32, (1, 22)), position_ids=pos, use_cache=True)
    with_docs = [c for c in calls if "document" in c]
    assert len(with_docs) == 1, f"expected one document mask build for 4 layers, got {calls}"
