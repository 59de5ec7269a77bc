"""Property-based tests: random nestings of and/or/offset over the built-in masks, random lengths.

(a) both generic block-mask builders (Triton through the interpreter, and the PyTorch slabs) classify
    every block exactly as the dense mask from reference.dense_mask says (the structural builder:
    test_block_fn.py);
(b) the kernel forward (fp32) agrees with the fp64 reference (helpers.assert_close_to_fp64), with
    fewer examples because the interpreter is slow.

Hypothesis runs derandomized with no example database, so CI sees the same examples every run.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hf_flex
from hf_flex import mods, reference
from hf_flex.block_mask import _classes_torch
from hf_flex.dispatch import triton_runs_on
from helpers import check_attention, rand_qkv, random_doc_ids
from test_block_mask import dense_classes, generic

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))

# --- a random mask tree: tuples, turned into MaskMods once the batch size and lengths are known ----------

leaves = st.one_of(
    st.just(("causal",)),
    st.tuples(st.just("sliding_window"), st.integers(1, 48)),
    st.tuples(st.just("chunked"), st.integers(1, 48)),
    st.tuples(st.just("prefix_lm"), st.integers(0, 48)),
    st.tuples(st.just("document"), st.integers(0, 10_000)),
    st.tuples(st.just("padding"), st.integers(0, 10_000)),
)


def _extend(children):
    return st.one_of(
        st.tuples(st.just("and"), st.lists(children, min_size=1, max_size=3)),
        st.tuples(st.just("or"), st.lists(children, min_size=1, max_size=3)),
        st.tuples(st.just("offset"), children, st.integers(0, 40), st.integers(0, 40)),
    )


trees = st.recursive(leaves, _extend, max_leaves=5)


def build(tree, B, S):
    """MaskMod for a tree; ``S`` the id/valid length (>= every position the mask is asked about)."""
    kind = tree[0]
    if kind == "causal":
        return mods.causal()
    if kind == "sliding_window":
        return mods.sliding_window(tree[1])
    if kind == "chunked":
        return mods.chunked(tree[1])
    if kind == "prefix_lm":
        return mods.prefix_lm(tree[1])
    if kind == "document":
        return mods.document(random_doc_ids(B, S, seed=tree[1], max_docs=6))
    if kind == "padding":
        g = torch.Generator().manual_seed(tree[1])
        lens = torch.randint(0, S + 1, (B,), generator=g)
        left = bool(torch.randint(0, 2, (1,), generator=g))
        pos = torch.arange(S)
        valid = pos[None, :] >= (S - lens)[:, None] if left else pos[None, :] < lens[:, None]
        return mods.padding(valid)
    if kind == "and":
        return mods.and_masks(*(build(t, B, S) for t in tree[1]))
    if kind == "or":
        return mods.or_masks(*(build(t, B, S) for t in tree[1]))
    if kind == "offset":
        return mods.offset(build(tree[1], B, S), tree[2], tree[3])
    raise KeyError(kind)


block_sizes = st.sampled_from([16, 32, (16, 32), (32, 16)])


@settings(max_examples=40, **SETTINGS)
@given(
    tree=trees,
    B=st.integers(1, 2),
    H=st.sampled_from([None, 1, 2]),
    q_len=st.integers(1, 100),
    kv_len=st.integers(1, 100),
    bs=block_sizes,
)
def test_builders_match_dense(device, tree, B, H, q_len, kv_len, bs):
    assert triton_runs_on(device)
    mm = _to(build(tree, B, max(q_len, kv_len)), device)
    qb, kb = (bs, bs) if isinstance(bs, int) else bs
    Hm = H or 1
    want = dense_classes(mm, B, Hm, q_len, kv_len, qb, kb)
    bm = hf_flex.create_block_mask(generic(mm), B, H, q_len, kv_len, device=device, BLOCK_SIZE=bs)
    assert bm.builder == "triton"
    got = bm.to_dense().cpu()
    want_tables = dense_classes(mm, B, Hm, q_len, kv_len, qb, kb, tables=True)  # no full block past the end
    assert torch.equal(got, want_tables), f"{mm.name}: Triton builder\n{got}\nvs dense\n{want_tables}"
    got = _classes_torch(mm, B, Hm, q_len, kv_len, qb, kb, torch.device(device)).cpu()
    assert torch.equal(got, want), f"{mm.name}: torch builder\n{got}\nvs dense\n{want}"


@settings(max_examples=12, **SETTINGS)
@given(
    tree=trees,
    B=st.integers(1, 2),
    q_len=st.integers(1, 80),
    kv_len=st.integers(1, 80),
    bs=block_sizes,
    seed=st.integers(0, 1000),
)
def test_kernel_forward_matches_reference(device, tree, B, q_len, kv_len, bs, seed):
    assert triton_runs_on(device)
    mm = _to(build(tree, B, max(q_len, kv_len)), device)
    bm = hf_flex.create_block_mask(mm, B, None, q_len, kv_len, device=device, BLOCK_SIZE=bs)
    q, k, v = rand_qkv(B, 2, 2, q_len, kv_len, 16, device=device, seed=seed)
    check_attention(q, k, v, None, bm, backward=False)


def _to(mm, device):
    import dataclasses

    return dataclasses.replace(
        mm, args=tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in mm.args)
    )


def test_dense_classes_oracle_is_not_trivial():
    """The oracle sees all three classes on a simple mask (guards the oracle itself)."""
    c = dense_classes(mods.causal(), 1, 1, 64, 64, 16, 16)
    assert set(torch.unique(c).tolist()) == {0, 1, 2}
    assert torch.equal(reference.dense_mask(mods.causal(), 1, 1, 3, 3)[0, 0], torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]]).bool())
