"""BlockMask and create_block_mask against a dense classification.

The oracle: hf_flex.reference.dense_mask gives the element-level mask; each (query block, key block)
is EMPTY (no allowed position), FULL (every position inside the lengths allowed) or PARTIAL. Both
generic builders must reproduce it exactly: the Triton one (create_block_mask on device "cpu", for a
mask without block_fn, runs Triton's classification kernel through the interpreter) and the PyTorch
slab one (block_mask._classes_torch). The structural builder (block_fn) is tested in test_block_fn.py.
Then the tables: kv rows list exactly the partial / full blocks in ascending order, q tables are the
transpose, and the debugging helpers (to_dense, sparsity, density, to_string, repr, materialize, to).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl  # noqa: F401  (Triton wants it visible to the @triton.jit mask below)

import hf_flex
from hf_flex import mods, reference
from hf_flex.block_mask import EMPTY, FULL, PARTIAL, BlockMask, _classes_torch, block_mask_from_classes
from hf_flex.dispatch import triton_runs_on
from helpers import random_doc_ids


def dense_classes(mask_mod, Bm, Hm, q_len, kv_len, qb, kb, tables=False):
    """[Bm, Hm, nQ, nKV] int8 block classes (on the CPU) from the dense element mask (the oracle).

    ``tables=True``: the classes the tables list, where a block is full only when all its qb x kb
    pairs exist and are allowed (a ragged last block, past a length, is at most partial)."""
    dev = mask_mod.tensors()[0].device if mask_mod.tensors() else "cpu"
    m = reference.dense_mask(mask_mod, Bm, Hm, q_len, kv_len, device=dev).cpu()
    nq, nkv = -(-q_len // qb), -(-kv_len // kb)
    out = torch.empty((Bm, Hm, nq, nkv), dtype=torch.int8)
    for i in range(nq):
        for j in range(nkv):
            blk = m[:, :, i * qb : (i + 1) * qb, j * kb : (j + 1) * kb]
            n = blk.sum((-1, -2))
            whole = qb * kb if tables else blk[0, 0].numel()
            out[:, :, i, j] = torch.where(n == 0, EMPTY, torch.where(n == whole, FULL, PARTIAL)).to(torch.int8)
    return out


def _bs(bs):
    return (bs, bs) if isinstance(bs, int) else bs


def _ids(B, S, seed=0):
    return random_doc_ids(B, S, seed=seed, max_docs=6)


def _valid(B, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, S + 1, (B,), generator=g)
    return torch.arange(S)[None, :] < lens[:, None]




@triton.jit
def _per_head(b, h, q, kv, w):
    return (kv <= q) & (q - kv < w * (h + 1) + 3 * b)


def per_head(w=5):
    return hf_flex.MaskMod(_per_head, lambda b, h, q, kv, w: (kv <= q) & (q - kv < w * (h + 1) + 3 * b), (w,), "per_head")


# name -> (B, H) -> MaskMod  (B, H are the *given* create_block_mask dims; S the longest length)
def _mask(name, B, S, device="cpu"):
    Bm = B or 1
    return _on(device, {
        "noop": lambda: mods.noop(),
        "causal": lambda: mods.causal(),
        "sliding": lambda: mods.sliding_window(19),
        "causal&sliding": lambda: mods.and_masks(mods.causal(), mods.sliding_window(19)),
        "chunked": lambda: mods.chunked(20),
        "prefix_lm": lambda: mods.prefix_lm(33),
        "document": lambda: mods.document(_ids(Bm, S)),
        "causal&document": lambda: mods.and_masks(mods.causal(), mods.document(_ids(Bm, S, 1))),
        "padding": lambda: mods.padding(_valid(Bm, S)),
        "causal&padding": lambda: mods.and_masks(mods.causal(), mods.padding(_valid(Bm, S, 2))),
        "decode": lambda: mods.offset(mods.causal(), 40, 0),
        "kv_offset": lambda: mods.offset(mods.causal(), 0, 25),
        "or": lambda: mods.or_masks(mods.and_masks(mods.causal(), mods.sliding_window(7)), mods.chunked(32)),
        "per_head": lambda: per_head(),
        "empty": lambda: mods.offset(mods.causal(), 0, 10_000),
    }[name]())


def generic(mm):
    """The mask without its block_fn and structure: create_block_mask then takes the generic
    (element-wise) builder."""
    import dataclasses

    return dataclasses.replace(mm, block_fn=None, structure=None)


def _on(device, mm):
    """The mask with its tensors on ``device`` (the builders want them where the tables go)."""
    import dataclasses

    return dataclasses.replace(mm, args=tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in mm.args))


MASK_NAMES = [
    "noop", "causal", "sliding", "causal&sliding", "chunked", "prefix_lm", "document", "causal&document",
    "padding", "causal&padding", "decode", "kv_offset", "or", "per_head", "empty",
]
# (Q_LEN, KV_LEN, BLOCK_SIZE, B, H)
SHAPES = [
    (1, 1, 16, None, None),
    (17, 17, 16, 2, None),
    (70, 70, 32, None, 3),
    (33, 70, 16, 2, 2),
    (70, 33, (16, 32), None, None),
    (128, 128, 32, 2, None),
    (130, 1, (32, 16), None, 2),
    (100, 113, (32, 16), 3, None),
]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[0]}x{s[1]}-bs{s[2]}-B{s[3]}-H{s[4]}" for s in SHAPES])
@pytest.mark.parametrize("name", MASK_NAMES)
def test_builders_agree_with_dense(device, name, shape):
    q_len, kv_len, bs, B, H = shape
    qb, kb = _bs(bs)
    mm = _mask(name, B, max(q_len, kv_len), device)
    Bm, Hm = B or 1, H or 1
    want = dense_classes(mm, Bm, Hm, q_len, kv_len, qb, kb)
    want_tables = dense_classes(mm, Bm, Hm, q_len, kv_len, qb, kb, tables=True)
    assert triton_runs_on(device)  # without block_fn, create_block_mask takes the Triton builder (interpreted on CPU)
    bm = hf_flex.create_block_mask(generic(mm), B, H, q_len, kv_len, device=device, BLOCK_SIZE=bs)
    assert bm.builder == "triton"
    assert bm.shape == (Bm, Hm, q_len, kv_len)
    assert bm.BLOCK_SIZE == (qb, kb)
    assert bm.device.type == torch.device(device).type
    bm = bm.to("cpu")
    got_triton = bm.to_dense()
    got_torch = _classes_torch(mm, Bm, Hm, q_len, kv_len, qb, kb, torch.device(device)).cpu()
    assert torch.equal(got_torch, want), f"torch builder differs from dense:\n{got_torch}\n{want}"
    assert torch.equal(got_triton, want_tables), f"Triton builder differs from dense:\n{got_triton}\n{want_tables}"
    assert bm.tail_partial
    _check_tables(bm, want_tables)


def test_torch_builder_slabs():
    """The slab loop of the PyTorch builder: many small slabs give the same classes as one."""
    mm = mods.and_masks(mods.causal(), mods.document(_ids(2, 300, 3)))
    one = _classes_torch(mm, 2, 1, 300, 300, 16, 16, torch.device("cpu"))
    # rows = (1 << 24) // (Bm * Hm * qb * kv_pad): make Bm*Hm big enough that each slab is one block row
    many = _classes_torch(
        mods.and_masks(mods.causal(), mods.document(_ids(2, 300, 3))), 2, 2048, 300, 300, 16, 16, torch.device("cpu")
    )
    assert torch.equal(many[:, :1], one)
    assert torch.equal(one, dense_classes(mm, 2, 1, 300, 300, 16, 16))


def _check_tables(bm: BlockMask, classes: torch.Tensor):
    """kv tables: per row, exactly the partial / full blocks, ascending; q tables: the transpose."""
    Bm, Hm, nq, nkv = classes.shape
    for t in (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
              bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices):
        assert t.dtype == torch.int32 and t.is_contiguous()
    assert bm.kv_indices.shape == (Bm, Hm, nq, nkv) and bm.q_indices.shape == (Bm, Hm, nkv, nq)
    for cls, num, idx, qnum, qidx in (
        (PARTIAL, bm.kv_num_blocks, bm.kv_indices, bm.q_num_blocks, bm.q_indices),
        (FULL, bm.full_kv_num_blocks, bm.full_kv_indices, bm.full_q_num_blocks, bm.full_q_indices),
    ):
        sel = classes == cls
        for b in range(Bm):
            for h in range(Hm):
                for i in range(nq):
                    want = torch.nonzero(sel[b, h, i]).flatten().to(torch.int32)
                    n = int(num[b, h, i])
                    assert n == want.numel()
                    assert torch.equal(idx[b, h, i, :n], want), (b, h, i, idx[b, h, i], want)
                for j in range(nkv):
                    want = torch.nonzero(sel[b, h, :, j]).flatten().to(torch.int32)
                    n = int(qnum[b, h, j])
                    assert n == want.numel()
                    assert torch.equal(qidx[b, h, j, :n], want), (b, h, j, qidx[b, h, j], want)
        # every index in the table (valid prefix or not) is a real block: the kernels may prefetch
        assert ((idx >= 0) & (idx < nkv)).all() and ((qidx >= 0) & (qidx < nq)).all()


@pytest.mark.parametrize("ragged", [(False, False), (True, False), (False, True), (True, True)])
def test_block_mask_from_classes_roundtrip(device, ragged):
    """Classes come back as given, except that a full block reaching past a length (the last row when
    the query length does not divide 16, the last column when the key length does not divide 32) is
    listed partial: the kernels visit full blocks without checking positions past the end."""
    g = torch.Generator().manual_seed(0)
    classes = torch.randint(0, 3, (2, 3, 5, 7), generator=g, dtype=torch.int8)
    q_len, kv_len = 5 * 16 - 3 * ragged[0], 7 * 32 - ragged[1]
    bm = block_mask_from_classes(classes.to(device), q_len, kv_len, (16, 32), mods.noop())
    want = classes.clone()
    for i in range(5):
        for j in range(7):
            if (ragged[0] and i == 4) or (ragged[1] and j == 6):
                want[:, :, i, j] = torch.where(classes[:, :, i, j] == FULL, PARTIAL, classes[:, :, i, j])
    assert (want != classes).any() == any(ragged)
    bm = bm.to("cpu")
    assert bm.tail_partial
    assert torch.equal(bm.to_dense(), want)
    _check_tables(bm, want)


def test_tail_partial_flag():
    """Builders of this package set tail_partial; tables handed to the constructor keep the kernels'
    checks (tail_partial False) unless the caller says otherwise; to() keeps it."""
    bm = hf_flex.create_block_mask(mods.causal(), None, None, 70, 70, device="cpu", BLOCK_SIZE=32)
    assert bm.tail_partial and bm.to("cpu").tail_partial
    names = ("kv_num_blocks kv_indices full_kv_num_blocks full_kv_indices "
             "q_num_blocks q_indices full_q_num_blocks full_q_indices").split()
    raw = BlockMask(*(getattr(bm, n) for n in names), seq_lengths=(70, 70), block_size=(32, 32), mask_mod=bm.mask_mod)
    assert not raw.tail_partial and not raw.to("cpu").tail_partial


def test_tables_aligned():
    """Every table starts 16-byte aligned whatever the block counts: Triton specialises kernels on a
    pointer's alignment, so a misaligned table would compile new kernel variants for some lengths."""
    for q_len, kv_len, bs in ((3333, 3333, 128), (100, 70, (32, 16)), (1, 1, 16)):
        for mm in (mods.causal(), generic(mods.causal())):
            bm = hf_flex.create_block_mask(mm, 3, None, q_len, kv_len, device="cpu", BLOCK_SIZE=bs)
            for t in _tables_of(bm):
                assert t.data_ptr() % 16 == 0 and t.is_contiguous()


# --- debugging helpers --------------------------------------------------------------------------------


def test_sparsity_density_to_string_repr():
    bm = hf_flex.create_block_mask(mods.causal(), None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    # 4x4 blocks: 4 partial on the diagonal, 6 full below, 6 empty above
    d = bm.to_dense()[0, 0]
    assert (d == PARTIAL).sum() == 4 and (d == FULL).sum() == 6 and (d == EMPTY).sum() == 6
    assert bm.sparsity() == pytest.approx(100 * 6 / 16)
    assert bm.density() == pytest.approx(10 / 16)
    assert bm.to_string() == "~...\n#~..\n##~.\n###~"
    assert bm.to_string(max_blocks=2) == "~.\n#~"
    r = repr(bm)
    assert "B=1" in r and "H=1" in r and "Q_LEN=64" in r and "KV_LEN=64" in r
    assert "causal" in r and "37.50%" in r and "(16, 16)" in r
    assert "~...\n#~..\n##~.\n###~" in r


def test_repr_large_has_no_picture():
    bm = hf_flex.create_block_mask(mods.causal(), None, None, 40 * 16, 40 * 16, device="cpu", BLOCK_SIZE=16)
    assert "\n" not in repr(bm)


def test_to_string_per_batch_and_head():
    ids = torch.tensor([[0] * 32 + [1] * 32, [0] * 64])
    bm = hf_flex.create_block_mask(mods.document(ids), 2, None, 64, 64, device="cpu", BLOCK_SIZE=32)
    assert bm.to_string(b=0) == "#.\n.#"
    assert bm.to_string(b=1) == "##\n##"
    bm = hf_flex.create_block_mask(per_head(16), None, 2, 64, 64, device="cpu", BLOCK_SIZE=16)
    assert bm.to_string(h=0) != bm.to_string(h=1)


def test_materialize():
    for mm, B, H in ((mods.and_masks(mods.causal(), mods.document(_ids(2, 50))), 2, None), (per_head(), None, 3)):
        bm = hf_flex.create_block_mask(mm, B, H, 50, 37, device="cpu", BLOCK_SIZE=16)
        m = bm.materialize()
        assert m.dtype == torch.bool and m.shape == bm.shape
        assert torch.equal(m, reference.dense_mask(mm, B or 1, H or 1, 50, 37))


def test_to_device():
    bm = hf_flex.create_block_mask(mods.causal(), 2, None, 40, 40, device="cpu", BLOCK_SIZE=16)
    m = bm.to("meta")
    assert m is not bm and m.device.type == "meta"
    assert m.shape == bm.shape and m.BLOCK_SIZE == bm.BLOCK_SIZE and m.mask_mod is bm.mask_mod
    assert m.kv_indices.device.type == "meta" and m.full_q_indices.device.type == "meta"
    back = bm.to("cpu")
    assert back is not bm
    for n in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
              "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(back, n), getattr(bm, n))


# --- broadcast ----------------------------------------------------------------------------------------


def test_broadcast_none_dims():
    """B / H None: one [1, 1] table row, built from b = 0 / h = 0."""
    ids = torch.stack([_ids(1, 64, 5)[0], torch.zeros(64, dtype=torch.int32)])
    mm = mods.document(ids)
    bm_none = hf_flex.create_block_mask(mm, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    bm_two = hf_flex.create_block_mask(mm, 2, 4, 64, 64, device="cpu", BLOCK_SIZE=16)
    assert bm_none.shape[:2] == (1, 1) and bm_two.shape[:2] == (2, 4)
    assert torch.equal(bm_none.to_dense()[0, 0], bm_two.to_dense()[0, 0])
    assert not torch.equal(bm_two.to_dense()[0, 0], bm_two.to_dense()[1, 0])
    assert torch.equal(bm_two.to_dense()[1, 0], torch.full((4, 4), FULL, dtype=torch.int8))
    for h in range(1, 4):
        assert torch.equal(bm_two.to_dense()[:, h], bm_two.to_dense()[:, 0])


def test_mask_mod_none_is_full():
    bm = hf_flex.create_block_mask(None, None, None, 64, 96, device="cpu", BLOCK_SIZE=32)
    assert (bm.to_dense() == FULL).all() and bm.sparsity() == 0.0
    # ragged lengths: the last row and column are visited as partial blocks (checked past the end)
    cls = hf_flex.create_block_mask(None, None, None, 40, 70, device="cpu", BLOCK_SIZE=32).to_dense()[0, 0]
    assert (cls[:-1, :-1] == FULL).all() and (cls[-1] == PARTIAL).all() and (cls[:, -1] == PARTIAL).all()


# --- validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bs", [8, 24, 0, -16, 15.5, True, (16,), (16, 16, 16), (16, 8), "16", (32, 48)])
def test_block_size_validation(bs):
    with pytest.raises((ValueError, TypeError), match="BLOCK_SIZE"):
        hf_flex.create_block_mask(mods.causal(), None, None, 32, 32, device="cpu", BLOCK_SIZE=bs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(B=0), "B must be"),
        (dict(B=-1), "B must be"),
        (dict(B=1.5), "B must be"),
        (dict(B=True), "B must be"),
        (dict(H=0), "H must be"),
        (dict(H="2"), "H must be"),
        (dict(Q_LEN=0), "Q_LEN"),
        (dict(KV_LEN=-3), "KV_LEN"),
        (dict(KV_LEN=3.0), "KV_LEN"),
        (dict(Q_LEN=None), "Q_LEN"),
    ],
)
def test_create_block_mask_arg_validation(kwargs, match):
    args = dict(B=None, H=None, Q_LEN=32, KV_LEN=32)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        hf_flex.create_block_mask(mods.causal(), args["B"], args["H"], args["Q_LEN"], args["KV_LEN"], device="cpu", BLOCK_SIZE=16)


def test_create_block_mask_mask_mod_validation():
    with pytest.raises(TypeError, match="mask_mod"):
        hf_flex.create_block_mask(lambda b, h, q, kv: kv <= q, None, None, 32, 32, device="cpu")
    with pytest.raises(ValueError, match="mask_mod"):
        # the mask reads a tensor on another device than the tables
        hf_flex.create_block_mask(mods.document(torch.zeros(1, 32, dtype=torch.int32, device="meta")), None, None, 32, 32, device="cpu")


def _tables_of(bm):
    return [getattr(bm, n) for n in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                                     "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")]


@pytest.mark.parametrize("which", range(8))
def test_constructor_shape_validation(which):
    bm = hf_flex.create_block_mask(mods.causal(), None, None, 40, 70, device="cpu", BLOCK_SIZE=16)
    t = _tables_of(bm)
    kw = dict(seq_lengths=bm.seq_lengths, block_size=bm.BLOCK_SIZE, mask_mod=bm.mask_mod)
    BlockMask(*t, **kw)  # the unmodified tables are accepted
    bad = list(t)
    bad[which] = torch.cat([bad[which], bad[which][..., :1]], dim=-1)
    # kv_num_blocks fixes the number of query blocks, so its error says that instead of "shape"
    with pytest.raises(ValueError, match="query blocks" if which == 0 else "shape"):
        BlockMask(*bad, **kw)
    bad = list(t)
    bad[which] = bad[which].long()
    with pytest.raises(ValueError, match="int32"):
        BlockMask(*bad, **kw)
    if which:
        bad = list(t)
        bad[which] = bad[which].to("meta")
        with pytest.raises(ValueError, match="meta"):
            BlockMask(*bad, **kw)


def test_constructor_other_validation():
    bm = hf_flex.create_block_mask(mods.causal(), None, None, 40, 70, device="cpu", BLOCK_SIZE=16)
    t = _tables_of(bm)
    with pytest.raises(ValueError, match="query blocks"):
        BlockMask(*t, seq_lengths=(80, 70), block_size=(16, 16), mask_mod=bm.mask_mod)
    with pytest.raises(ValueError, match="shape"):
        BlockMask(*t, seq_lengths=(40, 200), block_size=(16, 16), mask_mod=bm.mask_mod)
    with pytest.raises(TypeError, match="mask_mod"):
        BlockMask(*t, seq_lengths=(40, 70), block_size=(16, 16), mask_mod=lambda b, h, q, kv: q >= kv)
    with pytest.raises(ValueError, match="classes"):
        block_mask_from_classes(torch.zeros(3, 3, dtype=torch.int8), 48, 48, 16, mods.noop())
