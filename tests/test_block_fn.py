"""Structural block masks (MaskMod.block_fn) against the generic, element-wise builder.

Oracles: the generic builders, which test_block_mask.py holds equal to the dense element mask:
create_block_mask on the same mask with its block_fn removed, which on the CPU runs Triton's
classification kernel through the interpreter, and block_mask._classes_torch (the PyTorch slabs). The
interpreter takes 0.1-0.6 s a call, so the bulk of the cases use the slabs and a spread of them (every
mask, offsets past the ids, both block-size pairs, B None and given) the Triton kernel as well. Block
classes are compared exactly (int8, 0 empty / 1 partial / 2 full).

What must hold:
* every built-in mask, and every offset of it, classifies each block exactly as the oracle: ragged
  lengths, Q_LEN != KV_LEN, blocks 16, 32 and (16, 32) pairs, B None or given, documents of random
  lengths, left and right padding, offsets that run past the end of the ids;
* and_masks / or_masks take the min / max of their children's classes. That is exact where it says
  empty or full, but an "and" of two partial children may in fact be empty, and an "or" of two partial
  ones full: it then says partial (safe; the kernels only pay a visit). Random nestings (hypothesis) are
  held to exactly that: never a class the oracle contradicts except partial, and equal to the min / max
  over the oracle's classes of the leaves (offsets pushed down). The combinations Transformers builds
  (causal with documents, windows, chunks; causal with padding on square blocks) are exact, and held to it;
* what cannot be classified from structure (document ids that are not packed, user masks without a
  block_fn, a block_fn that declines) takes the generic builder; ``BlockMask.builder``
  tells which builder ran, and every test asserts it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import triton
import triton.language as tl  # noqa: F401  (Triton wants it visible to the @triton.jit masks below)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hf_flex
from hf_flex.dispatch import triton_runs_on
from hf_flex import mods
from hf_flex.block_mask import EMPTY, FULL, PARTIAL, _classes_torch
from hf_flex.modtypes import block_classes
from helpers import listed_classes, random_doc_ids
from test_block_mask import generic

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))

# (Q_LEN, KV_LEN, BLOCK_SIZE, B)
SHAPES = [
    (1, 1, 16, None),
    (17, 17, 16, 2),
    (70, 70, 32, None),
    (33, 70, 16, 2),
    (70, 33, (16, 32), None),
    (100, 113, (32, 16), 3),
    (128, 128, 32, 2),
    (130, 1, (32, 16), None),
]
# (q_offset, kv_offset); the last two run past the ids / valid rows (length S = max(Q_LEN, KV_LEN))
OFFSETS = [(0, 0), (40, 0), (0, 25), (13, 7), (90, 95)]


def _bs(bs):
    return (bs, bs) if isinstance(bs, int) else bs


def _valid(R, S, seed, left):
    """[R, S] bool: each row valid on a random number (0..S) of tokens, at the end (left padding) or start."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(0, S + 1, (R,), generator=g)
    pos = torch.arange(S)[None, :]
    return pos >= (S - n)[:, None] if left else pos < n[:, None]


# name -> factory(R, S): the mask for id / valid rows R and length S
LEAVES = {
    "noop": lambda R, S: mods.noop(),
    "causal": lambda R, S: mods.causal(),
    "sliding_window(1)": lambda R, S: mods.sliding_window(1),
    "sliding_window(19)": lambda R, S: mods.sliding_window(19),
    "chunked(1)": lambda R, S: mods.chunked(1),
    "chunked(20)": lambda R, S: mods.chunked(20),
    "chunked(32)": lambda R, S: mods.chunked(32),
    "prefix_lm(0)": lambda R, S: mods.prefix_lm(0),
    "prefix_lm(33)": lambda R, S: mods.prefix_lm(33),
    "symmetric_window(0)": lambda R, S: mods.symmetric_window(0),
    "symmetric_window(7)": lambda R, S: mods.symmetric_window(7),
    "document": lambda R, S: mods.document(random_doc_ids(R, S, seed=1, max_docs=6)),
    "document(one doc, int64)": lambda R, S: mods.document(torch.full((R, S), 3, dtype=torch.int64)),
    "padding(right)": lambda R, S: mods.padding(_valid(R, S, 2, left=False)),
    "padding(left)": lambda R, S: mods.padding(_valid(R, S, 3, left=True)),
    "chunked_padded(16)": lambda R, S: mods.chunked_padded(16, torch.randint(0, S, (R,), generator=torch.Generator().manual_seed(4))),
}


def structural(mm, B, H, q_len, kv_len, bs):
    """Classes [Bm, Hm, nQ, nKV] from create_block_mask, asserting the structural builder ran."""
    bm = hf_flex.create_block_mask(mm, B, H, q_len, kv_len, device="cpu", BLOCK_SIZE=bs)
    assert bm.builder == "structural", f"{mm.name}: {bm.builder} builder ran"
    return bm.to_dense()


# The generic builder that CPU tensors get: the Triton one where the interpreter is on (CI), the PyTorch
# one on a CUDA machine (Triton there compiles for the GPU only; the GPU builders are tested in
# test_block_mask.py through the ``device`` fixture).
GENERIC = "triton" if triton_runs_on("cpu") else "torch"


def oracle(mm, B, H, q_len, kv_len, bs):
    """Classes from the generic builder (Triton, interpreted, on CI), asserting that it ran."""
    bm = hf_flex.create_block_mask(generic(mm), B, H, q_len, kv_len, device="cpu", BLOCK_SIZE=bs)
    assert bm.builder == GENERIC
    return bm.to_dense()


def slabs(mm, B, H, q_len, kv_len, bs):
    """Classes from the generic PyTorch builder (fast on the CPU)."""
    qb, kb = _bs(bs)
    # as the tables list them (a full block past a length is partial), like the builders' to_dense()
    return listed_classes(_classes_torch(mm, B or 1, H or 1, q_len, kv_len, qb, kb, torch.device("cpu")),
                          q_len, kv_len, qb, kb)


def check_exact(mm, B, H, q_len, kv_len, bs, triton_too):
    got = structural(mm, B, H, q_len, kv_len, bs)
    for name, fn in (("slabs", slabs), ("triton", oracle))[: 2 if triton_too else 1]:
        want = fn(mm, B, H, q_len, kv_len, bs)
        assert torch.equal(got, want), f"{mm.name} {q_len}x{kv_len} bs={bs} B={B} H={H} vs {name}" + _show(got, want)


# shapes and offsets that also run through the Triton oracle
TRITON_SHAPES = [SHAPES[1], SHAPES[4]]
TRITON_OFFSETS = [(0, 0), (90, 95)]


def _show(got, want):
    return f"\nstructural\n{got}\ngeneric\n{want}"


# --- every built-in mask, exactly -----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LEAVES))
def test_builtin_masks_exact(device, name):
    """Each built-in mask and its offsets: structural classes == generic classes, every shape."""
    assert device == "cpu" or torch.cuda.is_available()
    for shape in SHAPES:
        q_len, kv_len, bs, B = shape
        base = LEAVES[name](B or 2, max(q_len, kv_len))  # B None: two rows, the kernels read row 0
        assert base.block_fn is not None
        for off in OFFSETS:
            mm = mods.offset(base, *off) if any(off) else base
            check_exact(mm, B, None, q_len, kv_len, bs, shape in TRITON_SHAPES and off in TRITON_OFFSETS)
        check_exact(base, B, 2, q_len, kv_len, bs, False)  # H given: one row per head, all alike


def test_documents_random_lengths():
    """Packed documents of random lengths (1..S tokens each, up to 30 per row), B given and None."""
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        S = int(torch.randint(20, 150, (1,), generator=g))
        ids = random_doc_ids(3, S, seed=seed, max_docs=int(torch.randint(1, 30, (1,), generator=g)))
        for bs in (16, (16, 32), (32, 16)):
            for B in (None, 3):
                for mm in (mods.document(ids), mods.and_masks(mods.causal(), mods.document(ids))):
                    check_exact(mm, B, None, S, S, bs, seed == 0 and bs == (32, 16))


# --- combinations ---------------------------------------------------------------------------------------

# Exact by construction (see the module docstring of hf_flex.mods): where causal is partial the query and
# key ranges overlap, and the diagonal pair (x, x) is allowed by every one of these masks.
EXACT_COMBOS = {
    "causal&document": lambda R, S: mods.and_masks(mods.causal(), mods.document(random_doc_ids(R, S, seed=5, max_docs=8))),
    "causal&sliding": lambda R, S: mods.and_masks(mods.causal(), mods.sliding_window(19)),
    "causal&chunked": lambda R, S: mods.and_masks(mods.causal(), mods.chunked(20)),
    "causal&sliding&document": lambda R, S: mods.and_masks(
        mods.causal(), mods.sliding_window(23), mods.document(random_doc_ids(R, S, seed=6, max_docs=8))
    ),
    "or(causal, noop)": lambda R, S: mods.or_masks(mods.causal(), mods.noop()),
}
# causal with padding is exact on square blocks over equal lengths (a diagonal block's last key is its
# last query). Not so with a window as well: below the diagonal, the window and the padding may each
# allow some keys of a block, but not the same ones. (Q_LEN, BLOCK_SIZE, B)
SQUARE = [(17, 16, 2), (70, 32, None), (128, 32, 2), (100, 16, 3)]


@pytest.mark.parametrize("name", list(EXACT_COMBOS))
def test_transformers_combinations_exact(name):
    for shape in SHAPES:
        q_len, kv_len, bs, B = shape
        mm = EXACT_COMBOS[name](B or 2, max(q_len, kv_len))
        check_exact(mm, B, None, q_len, kv_len, bs, shape in TRITON_SHAPES)


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
def test_causal_padding_square_exact(left):
    for S, bs, B in SQUARE:
        mm = mods.and_masks(mods.causal(), mods.padding(_valid(B or 2, S, 7, left)))
        check_exact(mm, B, None, S, S, bs, S == 17)


def test_combinations_are_conservative_not_exact():
    """The known limit of min / max: an "and" of partial blocks that is empty, an "or" that is full.

    Pinned so that a change to the rule is a visible decision: partial is safe, a wrong empty / full is not.
    """
    # kv + 10 <= q and the same chunk of 8: in one 16 x 16 block both are partial, together empty
    mm = mods.and_masks(mods.offset(mods.causal(), 0, 10), mods.chunked(8))
    assert structural(mm, None, None, 16, 16, 16).flatten().tolist() == [PARTIAL]
    assert oracle(mm, None, None, 16, 16, 16).flatten().tolist() == [EMPTY]
    # kv <= q or kv >= q: every diagonal block is partial for each, full for the union
    mm = mods.or_masks(mods.causal(), mods.sliding_window(1))
    assert structural(mm, None, None, 32, 32, 16).flatten().tolist() == [PARTIAL, FULL, FULL, PARTIAL]
    assert oracle(mm, None, None, 32, 32, 16).flatten().tolist() == [FULL] * 4


def test_pairs_sound():
    """Every and / or of two built-in masks under random offsets: where the structural class differs
    from the generic one it is partial, never a wrong empty or full (the slabs as oracle: fast enough
    for all pairs). Also counts the inexact blocks, so that the check is not vacuous."""
    g = torch.Generator().manual_seed(12)
    names = list(LEAVES)
    inexact = 0
    for i, a in enumerate(names):
        for b in names[i:]:
            for op in (mods.and_masks, mods.or_masks):
                q_len, kv_len = (int(x) for x in torch.randint(1, 90, (2,), generator=g))
                S = max(q_len, kv_len)
                offs = [tuple(int(x) for x in torch.randint(0, 30, (2,), generator=g)) for _ in range(2)]
                mm = op(mods.offset(LEAVES[a](2, S), *offs[0]), mods.offset(LEAVES[b](2, S), *offs[1]))
                for bs, B in ((16, 2), ((32, 16), None)):
                    got = structural(mm, B, None, q_len, kv_len, bs)
                    want = slabs(mm, B, None, q_len, kv_len, bs)
                    wrong = got != want
                    assert (got[wrong] == PARTIAL).all(), f"{mm.name}: a wrong empty / full block" + _show(got, want)
                    inexact += int(wrong.sum())
    assert inexact > 0


# --- random nestings (hypothesis) -------------------------------------------------------------------------

leaves = st.one_of(
    st.just(("causal",)),
    st.just(("noop",)),
    st.tuples(st.just("sliding_window"), st.integers(1, 48)),
    st.tuples(st.just("symmetric_window"), st.integers(0, 24)),
    st.tuples(st.just("chunked"), st.integers(1, 48)),
    st.tuples(st.just("chunked_padded"), st.integers(1, 48), st.integers(0, 10_000)),
    st.tuples(st.just("prefix_lm"), st.integers(0, 48)),
    st.tuples(st.just("document"), st.integers(0, 10_000), st.integers(1, 12)),
    st.tuples(st.just("padding"), st.integers(0, 10_000), st.booleans()),
)


def _extend(children):
    return st.one_of(
        st.tuples(st.just("and"), st.lists(children, min_size=1, max_size=3)),
        st.tuples(st.just("or"), st.lists(children, min_size=1, max_size=3)),
        st.tuples(st.just("offset"), children, st.integers(0, 40), st.integers(0, 40)),
    )


trees = st.recursive(leaves, _extend, max_leaves=5)


def build(tree, R, S):
    """MaskMod of a tree, id / valid tensors with R rows of length S (rebuilding gives the same mask)."""
    kind = tree[0]
    if kind in ("and", "or"):
        return (mods.and_masks if kind == "and" else mods.or_masks)(*(build(t, R, S) for t in tree[1]))
    if kind == "offset":
        return mods.offset(build(tree[1], R, S), tree[2], tree[3])
    if kind == "document":
        return mods.document(random_doc_ids(R, S, seed=tree[1], max_docs=tree[2]))
    if kind == "padding":
        return mods.padding(_valid(R, S, tree[1], left=tree[2]))
    if kind == "chunked_padded":
        lp = torch.randint(0, S, (R,), generator=torch.Generator().manual_seed(tree[2]))
        return mods.chunked_padded(tree[1], lp)
    return getattr(mods, kind)(*tree[1:])


def min_max_oracle(tree, R, S, Bm, Hm, q_len, kv_len, qb, kb, qo=0, ko=0):
    """What the structural builder must give: min ("and") / max ("or") over the generic (PyTorch slab)
    classes of the leaves, each evaluated under the sum of the offsets above it."""
    kind = tree[0]
    if kind in ("and", "or"):
        parts = [min_max_oracle(t, R, S, Bm, Hm, q_len, kv_len, qb, kb, qo, ko) for t in tree[1]]
        out = parts[0]
        for p in parts[1:]:
            out = torch.minimum(out, p) if kind == "and" else torch.maximum(out, p)
        return out
    if kind == "offset":
        return min_max_oracle(tree[1], R, S, Bm, Hm, q_len, kv_len, qb, kb, qo + tree[2], ko + tree[3])
    mm = build(tree, R, S)
    if qo or ko:
        mm = mods.offset(mm, qo, ko)
    return _classes_torch(mm, Bm, Hm, q_len, kv_len, qb, kb, torch.device("cpu"))


def _has_combination(tree) -> bool:
    if tree[0] in ("and", "or"):
        return len(tree[1]) > 1 or _has_combination(tree[1][0])
    return tree[0] == "offset" and _has_combination(tree[1])


@settings(max_examples=40, **SETTINGS)
@given(
    tree=trees,
    R=st.integers(1, 3),
    given_B=st.booleans(),
    q_len=st.integers(1, 100),
    kv_len=st.integers(1, 100),
    bs=st.sampled_from([16, 32, (16, 32), (32, 16)]),
)
def test_random_nestings(tree, R, given_B, q_len, kv_len, bs):
    """Sound against the generic builder, equal to the min / max oracle, exact without and / or."""
    B = R if given_B else None
    S = max(q_len, kv_len) + 3  # ids a little longer than the lengths, as Transformers' caches have
    mm = build(tree, R, S)
    qb, kb = _bs(bs)
    got = structural(mm, B, None, q_len, kv_len, bs)
    want = oracle(mm, B, None, q_len, kv_len, bs)
    wrong = got != want
    assert (got[wrong] == PARTIAL).all(), f"{mm.name}: a wrong empty / full block" + _show(got, want)
    mm_oracle = listed_classes(min_max_oracle(tree, R, S, B or 1, 1, q_len, kv_len, qb, kb), q_len, kv_len, qb, kb)
    assert torch.equal(got, mm_oracle), mm.name
    if not _has_combination(tree):
        assert not wrong.any(), f"{mm.name}: not exact" + _show(got, want)


# --- what takes the generic builder -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "ids",
    [
        [[0, 0, 1, 1, 0, 0, 2, 2] * 5],  # a document id coming back (not packed)
        [[0] * 20 + [1] * 20, [1] * 20 + [0] * 20],  # the second row decreasing
        [[-1] * 10 + [0] * 30],  # a negative id (the Triton side reads -1 / -2 past the row's end)
    ],
    ids=["repeated", "decreasing-row", "negative"],
)
def test_unpacked_documents_fall_back(ids):
    ids = torch.tensor(ids, dtype=torch.int32)
    R, S = ids.shape
    doc = mods.document(ids)
    assert doc.block_fn is None
    for mm in (doc, mods.and_masks(mods.causal(), doc), mods.offset(mods.or_masks(doc, mods.causal()), 3, 0)):
        assert mm.block_fn is None
        for B in (None, R):
            bm = hf_flex.create_block_mask(mm, B, None, S, S, device="cpu", BLOCK_SIZE=16)
            assert bm.builder == GENERIC
            want = listed_classes(_classes_torch(mm, B or 1, 1, S, S, 16, 16, torch.device("cpu")), S, S, 16, 16)
            assert torch.equal(bm.to_dense(), want)
            assert (want == PARTIAL).any()


@triton.jit
def _every_other(b, h, q, kv):
    return (kv <= q) & ((q - kv) % 2 == 0)


def _every_other_twin(b, h, q, kv):
    return (kv <= q) & ((q - kv) % 2 == 0)


def _every_other_blocks(q_lo, q_hi, kv_lo, kv_hi):
    nonempty = kv_lo <= q_hi  # "partial" below the diagonal, which is always safe
    return block_classes(nonempty, torch.zeros_like(nonempty))


def test_user_mask_without_block_fn_is_generic():
    mm = hf_flex.MaskMod(_every_other, _every_other_twin, (), "every_other")
    assert mm.block_fn is None
    for m in (mm, mods.and_masks(mods.causal(), mm), mods.offset(mm, 5, 0)):
        assert m.block_fn is None
        bm = hf_flex.create_block_mask(m, None, None, 70, 50, device="cpu", BLOCK_SIZE=16)
        assert bm.builder == GENERIC
        assert torch.equal(bm.to_dense(), _classes_torch(m, 1, 1, 70, 50, 16, 16, torch.device("cpu")))


def test_user_block_fn():
    """A user's block_fn is used (and combined); one returning None hands over to the generic builder."""
    mm = hf_flex.MaskMod(_every_other, _every_other_twin, (), "every_other", _every_other_blocks)
    got = structural(mods.and_masks(mods.causal(), mm), None, None, 64, 64, 16)[0, 0]
    assert got.tolist() == [[PARTIAL if j <= i else EMPTY for j in range(4)] for i in range(4)]
    # with 1 x 1 blocks it is conservative (the generic builder finds odd diagonals empty), never wrong
    assert (oracle(mm, None, None, 64, 64, 16)[0, 0] == got).all()

    declines = dataclasses.replace(mm, block_fn=lambda *a: None)
    for m in (declines, mods.and_masks(mods.causal(), declines)):
        assert m.block_fn is not None
        bm = hf_flex.create_block_mask(m, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
        assert bm.builder == GENERIC


def test_negative_offsets_are_rejected():
    # the mods are defined on non-negative positions (Triton truncates integer division where PyTorch
    # floors, so a negative position would make the kernel and the reference disagree): refuse them
    for qo, ko in ((-5, 0), (0, -3)):
        with pytest.raises(ValueError, match="offset: (q_offset|kv_offset) must be >= 0"):
            mods.offset(mods.causal(), qo, ko)


def test_bad_block_fn_results():
    def make(fn):
        return hf_flex.MaskMod(_every_other, _every_other_twin, (), "bad", fn)

    cases = [
        (lambda q_lo, q_hi, kv_lo, kv_hi: (kv_lo <= q_hi).float(), TypeError, "integer tensor"),
        (lambda q_lo, q_hi, kv_lo, kv_hi: torch.zeros(3, 5, dtype=torch.int8), ValueError, "expected"),
        (lambda q_lo, q_hi, kv_lo, kv_hi: torch.zeros(1, 1, 1, 1, 1, dtype=torch.int8), TypeError, "integer tensor"),
        (lambda q_lo, q_hi, kv_lo, kv_hi: "full", TypeError, "integer tensor"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            hf_flex.create_block_mask(make(fn), None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    with pytest.raises(TypeError, match="block_fn"):
        hf_flex.MaskMod(_every_other, _every_other_twin, (), "bad", "not callable")


# --- batch rows -----------------------------------------------------------------------------------------


def test_batch_rows():
    """B None: row 0; B <= rows: the first B rows; B > rows: an error naming B (the kernels would read
    past the ids); masks over different row counts combine on their common rows."""
    ids = random_doc_ids(3, 90, seed=8, max_docs=5)
    valid = _valid(2, 90, 9, left=True)
    doc = mods.and_masks(mods.causal(), mods.document(ids))
    for B in (None, 1, 2, 3):
        check_exact(doc, B, None, 90, 90, 16, B is None)
    both = mods.and_masks(doc, mods.padding(valid))
    for B in (None, 1, 2):
        check_exact(both, B, 2, 90, 90, 16, B == 2)
    with pytest.raises(ValueError, match="B=3"):
        hf_flex.create_block_mask(both, 3, None, 90, 90, device="cpu", BLOCK_SIZE=16)
    # a mask that does not depend on b: one row, broadcast to B and H
    got = structural(mods.causal(), 3, 2, 40, 40, 16)
    assert got.shape == (3, 2, 3, 3) and torch.equal(got, oracle(mods.causal(), 3, 2, 40, 40, 16))


def test_tables_equal_generic():
    """Same classes, same eight tables, and the builder survives .to()."""
    mm = mods.and_masks(mods.causal(), mods.document(random_doc_ids(2, 77, seed=10)))
    a = hf_flex.create_block_mask(mm, 2, None, 77, 77, device="cpu", BLOCK_SIZE=(32, 16))
    b = hf_flex.create_block_mask(generic(mm), 2, None, 77, 77, device="cpu", BLOCK_SIZE=(32, 16))
    for n in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
              "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(a, n), getattr(b, n)), n
    assert a.to("cpu").builder == "structural" and b.to("cpu").builder == GENERIC
    assert hf_flex.block_mask_from_classes(a.to_dense(), 77, 77, (32, 16), mm).builder == "classes"


# --- GPU: no host sync on the structural path -----------------------------------------------------------


@pytest.mark.gpu
def test_structural_build_has_no_host_sync():
    S = 16384
    ids = random_doc_ids(1, S, seed=11, max_docs=24).cuda()
    mm = mods.and_masks(mods.causal(), mods.document(ids))  # the packed-ids check syncs once, here
    mm = dataclasses.replace(mm, structure=None)  # not the packed builder (tests/test_documents.py)
    hf_flex.create_block_mask(mm, 1, None, S, S)  # warm the edge cache
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        bm = hf_flex.create_block_mask(mm, 1, None, S, S)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bm.builder == "structural"
    want = hf_flex.create_block_mask(generic(mm), 1, None, S, S)
    assert torch.equal(bm.to_dense(), want.to_dense())
