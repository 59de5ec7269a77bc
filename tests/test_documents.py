"""Packed documents: document ids from position_ids / cu_seqlens, the Triton block-class kernel, the
Triton table kernel, and the "packed" builder that create_block_mask takes for them on CUDA.

Every kernel result is compared with an independent answer: block classes with the brute-force count
of allowed pairs per block (exact: full and empty must match everywhere), tables with the sort-based
tables. On CPU the kernels run through Triton's interpreter (small shapes: it is slow); on the device
machine the same tests run on CUDA, where create_block_mask must report the "packed" builder.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import hf_flex
from hf_flex import mods
from hf_flex.block_mask import FULL, PARTIAL, BlockMask, _tables, half_buffers, table_buffers
from hf_flex.documents import (
    document_ids_from_cu_seqlens,
    document_ids_from_position_ids,
    packed_block_mask,
    packed_parts,
)
from hf_flex.kernels.block_tables import tables_from_classes
from hf_flex.kernels.document_tables import document_tables

from helpers import check_attention, listed_classes, rand_qkv, random_doc_ids


def random_positions(B, S, seed, max_len=80):
    """[B, S] position_ids of random packed documents (lengths 1..max_len, the last one cut to fit)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        lens = []
        while sum(lens) < S:
            lens.append(int(torch.randint(1, max_len + 1, (1,), generator=g)))
        lens[-1] -= sum(lens) - S
        rows.append(torch.cat([torch.arange(n) for n in lens if n > 0]))
    return torch.stack(rows)


def brute_classes(mm, B, S, qb, kb):
    """[B, 1, nQ, nKV] classes from the dense mask: 2 all allowed, 0 none, 1 otherwise."""
    b = torch.arange(B).view(B, 1, 1, 1)
    q = torch.arange(S).view(1, 1, S, 1)
    kv = torch.arange(S).view(1, 1, 1, S)
    dense = mm(b, torch.zeros(1, 1, 1, 1, dtype=torch.long), q, kv).expand(B, 1, S, S)
    nq, nkv = -(-S // qb), -(-S // kb)
    pad = (0, nkv * kb - S, 0, nq * qb - S)
    allowed = torch.nn.functional.pad(dense, pad).reshape(B, 1, nq, qb, nkv, kb).sum((3, 5))
    valid = torch.nn.functional.pad(torch.ones(1, 1, S, S, dtype=torch.bool), pad).reshape(1, 1, nq, qb, nkv, kb).sum((3, 5))
    return torch.where(allowed == 0, 0, torch.where(allowed == valid, 2, 1)).to(torch.int8)


# --- document ids ---------------------------------------------------------------------------------------


def test_ids_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 5, 6, 0]])
    assert document_ids_from_position_ids(pos).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3, 4]]
    assert document_ids_from_position_ids(pos[0], batch_size=2).shape == (2, 9)
    assert document_ids_from_position_ids(pos).dtype == torch.int32
    # a row that starts mid-document (position 7) is one document until the next restart
    assert document_ids_from_position_ids(torch.tensor([[7, 8, 0, 1]])).tolist() == [[0, 0, 1, 1]]


@pytest.mark.parametrize("S", [1, 7, 1030])
def test_ids_kernel(device, S):
    """The one-launch kernel (CUDA's path) against the torch formula, on positions with restarts, jumps
    up and down, and a broadcast batch (stride 0)."""
    from hf_flex.kernels.document_tables import document_ids_kernel

    g = torch.Generator().manual_seed(S)
    pos = random_positions(2, S, seed=S, max_len=40)
    jumps = torch.rand(2, S, generator=g) < 0.05
    pos = pos + jumps.long() * torch.randint(-3, 9, (2, S), generator=g)
    step = torch.diff(pos, dim=-1, prepend=pos[:, :1] - 1)
    want = (step != 1).cumsum(-1, dtype=torch.int32)
    assert torch.equal(document_ids_kernel(pos.to(device)).cpu(), want)
    assert torch.equal(document_ids_kernel(pos[:1].to(device).expand(3, -1)).cpu(), want[:1].expand(3, -1))
    # the same launch also gives the documents' spans (several chunks: the carries both ways)
    for chunk in (16, 1024):
        ids, spans = document_ids_kernel(pos.to(device), with_spans=True, chunk=chunk)
        assert torch.equal(ids.cpu(), want) and torch.equal(spans.cpu(), mods.document_spans(want))


@pytest.mark.parametrize("S", [1, 7, 70])
def test_spans_kernel(device, S):
    """document_spans' one-launch kernel (CUDA's path) against its torch form and against a direct
    reading of the ids (first and last position of each position's id), over several chunks (the
    carries both ways) and a broadcast batch (stride 0)."""
    from hf_flex.kernels.document_tables import document_spans_kernel

    ids = random_doc_ids(3, S, seed=S, max_docs=9)
    want = mods.document_spans(ids)
    for p in range(S):
        for b in range(3):
            same = (ids[b] == ids[b, p]).nonzero().flatten()
            assert (int(want[b, p]) & 0xFFFFFFFF, int(want[b, p]) >> 32) == (int(same.min()), int(same.max()))
    for chunk in (16, 1024):
        assert torch.equal(document_spans_kernel(ids.to(device), chunk=chunk).cpu(), want)
    assert torch.equal(document_spans_kernel(ids[:1].to(device).expand(3, -1)).cpu(), want[:1].expand(3, -1))
    # columns not contiguous (a transposed view): document_spans makes the rows contiguous first
    assert torch.equal(mods.document_spans(ids.t().contiguous().t().to(device)).cpu(), want)
    with pytest.raises(ValueError, match="ids"):
        mods.document_spans(ids[0])


def test_document_spans_argument():
    """document(spans=...) takes precomputed spans of packed ids, and says what is wrong otherwise."""
    ids = torch.tensor([[0, 0, 1, 1, 2]], dtype=torch.int32)
    spans = mods.document_spans(ids)
    assert mods.document(ids, packed=True, spans=spans).args[2] is spans
    for bad in (spans.int(), spans[:, :4], spans.float()):
        with pytest.raises(ValueError, match="spans"):
            mods.document(ids, packed=True, spans=bad)
    with pytest.raises(ValueError, match="spans"):
        mods.document(ids, packed=False, spans=spans)


def test_packed_document_mask_kinds():
    """Packed ids take the span form, the others the ids' form. The first argument identifies the
    documents (packed_parts relies on it): the ids themselves, or for the span form each position's
    document start, a view of the spans, so the caller's ids are not held."""
    ids = torch.tensor([[0, 0, 1, 1, 2], [0, 1, 1, 1, 1]], dtype=torch.int32)
    packed, unpacked = mods.document(ids), mods.document(ids.flip(1))
    assert packed.triton_fn is mods._packed_document and unpacked.triton_fn is mods._document
    assert torch.equal(unpacked.args[0], ids.flip(1))
    assert packed.args[0].tolist() == [[0, 0, 2, 2, 4], [0, 1, 1, 1, 1]]
    spans = packed.args[2]
    assert packed.args[0].untyped_storage().data_ptr() == spans.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() != ids.untyped_storage().data_ptr() for t in packed.tensors())
    assert packed_parts(mods.and_masks(mods.causal(), packed)) is not None


def test_ids_and_spans_from_position_ids(device):
    """The packed paths' (ids, spans): the ids of document_ids_from_position_ids and, on CUDA from
    the same launch, their document_spans (None elsewhere: mods.document computes them)."""
    from hf_flex.documents import document_ids_and_spans_from_position_ids

    pos = random_positions(2, 70, seed=5, max_len=20).to(device)
    ids, spans = document_ids_and_spans_from_position_ids(pos[:1], batch_size=2)
    assert torch.equal(ids.cpu(), document_ids_from_position_ids(pos[:1], batch_size=2).cpu())
    if device == "cuda":
        assert torch.equal(spans.cpu(), mods.document_spans(ids.cpu()))
    else:
        assert spans is None
    assert mods.document(ids, packed=True, spans=spans).args[2].shape == ids.shape


def test_ids_from_cu_seqlens():
    cu = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    assert document_ids_from_cu_seqlens(cu, 9).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2]]
    # past cu_seqlens[-1]: one more document
    assert document_ids_from_cu_seqlens(cu, 11).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "exactly one"),
        (dict(position_ids=torch.zeros(1, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 4])), "exactly one"),
        (dict(position_ids=torch.zeros(1, 4)), "position_ids"),
        (dict(position_ids=torch.zeros(1, 1, 4, dtype=torch.long)), "position_ids"),
        (dict(cu_seqlens=torch.tensor([0, 4])), "seq_len"),
        (dict(cu_seqlens=torch.tensor([[0, 4]]), seq_len=4), "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 4]), seq_len=0), "seq_len"),
        (dict(position_ids=torch.zeros(1, 4, dtype=torch.long), window=0), "window"),
        (dict(position_ids=torch.zeros(1, 4, dtype=torch.long), window=3, causal=False), "causal"),
    ],
)
def test_packed_block_mask_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        packed_block_mask(**kwargs)


# --- which masks the packed builder takes ---------------------------------------------------------------


def test_packed_parts():
    ids = torch.zeros(1, 8, dtype=torch.int32)
    doc = mods.document(ids, packed=True)
    assert packed_parts(doc)[1:] == (False, None)
    assert packed_parts(mods.and_masks(mods.causal(), doc))[1:] == (True, None)
    nested = mods.and_masks(mods.and_masks(mods.causal(), mods.sliding_window(4)), mods.sliding_window(6), doc)
    got = packed_parts(nested)
    assert got[0] is doc.args[0] and got[1:] == (True, 4)  # the mask's document ids (starts, all 0 here)
    # not packed (checked: decreasing), not an "and", a second document, a window without causal,
    # an offset, a mask of one's own named like a built-in one: all left to the other builders
    assert packed_parts(mods.and_masks(mods.causal(), mods.document(torch.tensor([[1, 0]])))) is None
    assert packed_parts(mods.or_masks(mods.causal(), doc)) is None
    assert packed_parts(mods.and_masks(doc, mods.document(ids, packed=True))) is None
    assert packed_parts(mods.and_masks(mods.sliding_window(3), doc)) is None
    assert packed_parts(mods.offset(mods.and_masks(mods.causal(), doc), 2, 2)) is None
    impostor = dataclasses.replace(mods.causal(), structure=None, name="causal")
    assert packed_parts(mods.and_masks(impostor, doc)) is None
    # the checked form is packed too when the ids are
    assert packed_parts(mods.and_masks(mods.causal(), mods.document(torch.tensor([[0, 0, 1]])))) is not None


def _dense_from_q_tables(bm):
    """Block classes rebuilt from the transposed (q) tables."""
    Bm, Hm, nkv = bm.q_num_blocks.shape
    nq = bm.q_indices.shape[-1]
    out = torch.zeros((Bm, Hm, nkv, nq), dtype=torch.int8)
    col = torch.arange(nq)
    for num, idx, code in ((bm.q_num_blocks, bm.q_indices, 1), (bm.full_q_num_blocks, bm.full_q_indices, 2)):
        listed = col < num[..., None]
        out.scatter_add_(-1, torch.where(listed, idx, 0).long(), torch.where(listed, code, 0).to(torch.int8))
    return out.transpose(-1, -2)


# --- the kernels ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 64)])
def test_document_tables_exact(device, seed, blocks):
    qb, kb = blocks
    g = torch.Generator().manual_seed(100 + seed)
    B, S = 1 + seed % 2, int(torch.randint(1, 200, (1,), generator=g))
    ids = document_ids_from_position_ids(random_positions(B, S, seed))
    w = int(torch.randint(1, 90, (1,), generator=g))
    for causal, window in ((True, None), (True, w), (False, None)):
        parts = ([mods.causal()] if causal else []) + ([mods.sliding_window(window)] if window else [])
        mm = mods.and_masks(*parts, mods.document(ids)) if parts else mods.document(ids)
        tables = table_buffers(B, 1, -(-S // qb), -(-S // kb), device)
        document_tables(ids.to(device), S, S, qb, kb, causal, window, *tables)
        bm = BlockMask.from_pairs(*tables, (S, S), (qb, kb), mm, "packed").to("cpu")
        # rows and columns are listed by different programs: both must give the same classes
        want = listed_classes(brute_classes(mm, B, S, qb, kb), S, S, qb, kb)  # no full block past S
        assert torch.equal(bm.to_dense(), want), (B, S, blocks, causal, window)
        assert torch.equal(_dense_from_q_tables(bm), bm.to_dense())


def _sorted_tables(classes):
    skip = torch.stack((classes != PARTIAL, classes != FULL)).view(torch.uint8)
    kv_num, kv_idx, q_num, q_idx = table_buffers(*classes.shape, "cpu")
    _tables(skip, kv_num, kv_idx)
    _tables(skip.transpose(-1, -2).contiguous(), q_num, q_idx)
    return kv_num, kv_idx, q_num, q_idx


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 1, 3, 5), (2, 3, 9, 7), (1, 1, 5, 1100)])
def test_tables_kernel_equals_sorts(device, shape):
    Bm, Hm, nq, nkv = shape
    if nkv > 1024 and device == "cpu":
        pytest.skip("rows past one chunk of the kernel: too slow for Triton's interpreter, runs on CUDA")
    g = torch.Generator().manual_seed(nq * 31 + nkv)
    classes = torch.randint(0, 3, shape, generator=g, dtype=torch.int8)
    for cls in (classes, classes[:, :1].expand(shape)):  # contiguous, and an expanded view
        want = _sorted_tables(cls.contiguous())
        got = table_buffers(Bm, Hm, nq, nkv, device)
        tables_from_classes(cls.to(device), nq * 16, nkv * 32, (16, 32), *got)
        for name, a, b in zip(("kv_num", "kv_idx", "q_num", "q_idx"), got, want):
            assert torch.equal(a.cpu(), b), name
    # ragged lengths: full blocks of the last row and column are listed partial
    demoted = classes.clone()
    demoted[:, :, -1][demoted[:, :, -1] == FULL] = PARTIAL
    demoted[..., -1][demoted[..., -1] == FULL] = PARTIAL
    want = _sorted_tables(demoted)
    got = table_buffers(Bm, Hm, nq, nkv, device)
    tables_from_classes(classes.to(device), nq * 16 - 5, nkv * 32 - 1, (16, 32), *got)
    for name, a, b in zip(("kv_num", "kv_idx", "q_num", "q_idx"), got, want):
        assert torch.equal(a.cpu(), b), f"ragged {name}"


# --- the builder, end to end ----------------------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 40])
def test_packed_block_mask_equals_structural(device, window):
    pos = random_positions(2, 300, seed=7)
    bm = packed_block_mask(position_ids=pos.to(device), window=window, BLOCK_SIZE=(32, 16))
    assert bm.builder == ("packed" if device == "cuda" else "structural")
    ids = document_ids_from_position_ids(pos)
    parts = [mods.causal()] + ([mods.sliding_window(window)] if window else [])
    ref = hf_flex.create_block_mask(mods.and_masks(*parts, mods.document(ids)), 2, None, 300, 300,
                                    device="cpu", BLOCK_SIZE=(32, 16))
    assert ref.builder == "structural"
    for n in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
              "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(bm, n).cpu(), getattr(ref, n)), n


def test_packed_block_mask_from_cu_seqlens(device):
    cu = torch.tensor([0, 50, 51, 130, 200], dtype=torch.int32, device=device)
    bm = packed_block_mask(cu_seqlens=cu, seq_len=200, BLOCK_SIZE=16)
    pos = torch.cat([torch.arange(n) for n in (50, 1, 79, 70)])[None].to(device)
    ref = packed_block_mask(position_ids=pos, BLOCK_SIZE=16)
    assert torch.equal(bm.to_dense(), ref.to_dense())


def test_attention_over_packed_block_mask(device):
    """The kernels read the packed builder's tables right: forward and backward against fp64."""
    S = 150
    pos = random_positions(1, S, seed=3, max_len=60).to(device)
    bm = packed_block_mask(position_ids=pos, window=50, BLOCK_SIZE=32)
    q, k, v = rand_qkv(1, 2, 1, S, S, 16, device=device, seed=5)
    check_attention(q, k, v, None, bm, enable_gqa=True)


def test_no_host_sync_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pos = random_positions(1, 4096, seed=1).cuda()
    packed_block_mask(position_ids=pos)  # compile first
    torch.cuda.set_sync_debug_mode("error")
    try:
        bm = packed_block_mask(position_ids=pos, window=512)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert bm.builder == "packed"


def test_packed_builder_with_default_device():
    """create_block_mask(device=None) on ids at cuda:0 (torch.device("cuda") != ids.device) still
    takes the packed builder."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ids = document_ids_from_position_ids(random_positions(1, 500, seed=2).cuda())
    mm = mods.and_masks(mods.causal(), mods.document(ids, packed=True))
    assert hf_flex.create_block_mask(mm, 1, None, 500, 500).builder == "packed"
    assert hf_flex.create_block_mask(mm, None, None, 500, 500, device="cuda:0").builder == "packed"


@pytest.mark.parametrize("H", [None, 3])
def test_packed_builder_heads_and_rows(device, H):
    """H > 1 (the same tables for every head) and B below the ids' rows, against the structural builder."""
    ids = document_ids_from_position_ids(random_positions(3, 200, seed=9))
    mm = mods.and_masks(mods.causal(), mods.sliding_window(70), mods.document(ids.to(device), packed=True))
    got = hf_flex.create_block_mask(mm, 2, H, 200, 200, device=device, BLOCK_SIZE=32)
    assert got.builder == ("packed" if device == "cuda" else "structural")
    ref = hf_flex.create_block_mask(dataclasses.replace(mm, structure=None), 2, H, 200, 200, device=device, BLOCK_SIZE=32)
    assert ref.builder == "structural"
    for n in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
              "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(got, n), getattr(ref, n)), n


def test_structure_follows_moved_args(device):
    """A copy of the mask with its args moved (dataclasses.replace, as tests and users do) gives the
    packed builder the moved ids, never the originals (the structure holds positions, not tensors)."""
    ids = document_ids_from_position_ids(random_positions(1, 120, seed=4))
    mm = mods.and_masks(mods.sliding_window(50), mods.and_masks(mods.causal(), mods.document(ids, packed=True)))
    moved = dataclasses.replace(mm, args=tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in mm.args))
    got = packed_parts(moved)
    starts = (mods.document_spans(ids) & 0xFFFFFFFF).to(torch.int32)  # the packed form's document ids
    assert got[0].device.type == torch.device(device).type and torch.equal(got[0].cpu(), starts)
    assert got[1:] == (True, 50)
    bm = hf_flex.create_block_mask(moved, 1, None, 120, 120, device=device, BLOCK_SIZE=16)
    ref = hf_flex.create_block_mask(dataclasses.replace(mm, structure=None), 1, None, 120, 120, device="cpu",
                                    BLOCK_SIZE=16)
    assert torch.equal(bm.to_dense().cpu(), ref.to_dense())


# --- half-block tables (the live halves of partial blocks) ----------------------------------------------


def _live_halves(dense, nums, idx, blocks, transposed):
    """The half lists the kernel should write, from the dense mask [B, Q_LEN, KV_LEN] and the
    whole-block partial lists (``nums`` / ``idx``: query-major, or key-major when ``transposed``)."""
    qb, kb = blocks
    B = dense.shape[0]
    out = []
    for b in range(B):
        rows = []
        for r in range(nums.shape[-1]):
            live = []
            for j in idx[b, 0, r, : nums[b, 0, r]].tolist():
                for t in range(2):
                    h = 2 * j + t
                    if transposed:  # halves of query block j against key block r
                        tile = dense[b, h * (qb // 2): (h + 1) * (qb // 2), r * kb: (r + 1) * kb]
                    else:
                        tile = dense[b, r * qb: (r + 1) * qb, h * (kb // 2): (h + 1) * (kb // 2)]
                    if tile.any():
                        live.append(h)
            rows.append(live)
        out.append(rows)
    return out


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 64)])
def test_half_tables_exact(device, seed, blocks):
    """The live halves of every partial block, against the dense mask: listed in order, first; every
    half number once per row (the rest after the count). Seed 1: fewer queries than keys."""
    qb, kb = blocks
    g = torch.Generator().manual_seed(200 + seed)
    B, S = 1 + seed % 2, int(torch.randint(40, 200, (1,), generator=g))
    QL, KL = S - 37 * seed, S
    ids = document_ids_from_position_ids(random_positions(B, S, seed))
    w = int(torch.randint(1, 90, (1,), generator=g))
    for causal, window in ((True, None), (True, w), (False, None)):
        parts = ([mods.causal()] if causal else []) + ([mods.sliding_window(window)] if window else [])
        mm = mods.and_masks(*parts, mods.document(ids)) if parts else mods.document(ids)
        nq, nkv = -(-QL // qb), -(-KL // kb)
        tables = table_buffers(B, 1, nq, nkv, device)
        halves = half_buffers(B, nq, nkv, device)
        document_tables(ids.to(device), QL, KL, qb, kb, causal, window, *tables, halves=halves)
        bm = BlockMask.from_pairs(*tables, (QL, KL), (qb, kb), mm, "packed", halves=halves).to("cpu")
        kvh_num, kvh_idx, qh_num, qh_idx = (t.cpu() for t in halves)
        dense = mm(torch.arange(B).view(B, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long),
                   torch.arange(QL).view(1, QL, 1), torch.arange(KL).view(1, 1, KL)).expand(B, QL, KL)
        for num, idx, whole, n_half, trans in (
            (kvh_num, kvh_idx, (bm.kv_num_blocks, bm.kv_indices), 2 * nkv, False),
            (qh_num, qh_idx, (bm.q_num_blocks, bm.q_indices), 2 * nq, True),
        ):
            want = _live_halves(dense, *whole, (qb, kb), trans)
            for b in range(B):
                for r, live in enumerate(want[b]):
                    row = idx[b, 0, r].tolist()
                    assert int(num[b, 0, r]) == len(live) and row[: len(live)] == live, (S, blocks, causal, window, trans, b, r)
                    assert sorted(row) == list(range(n_half))


def test_half_tables_need_even_blocks(device):
    ids = document_ids_from_position_ids(random_positions(1, 40, 0))
    with pytest.raises(ValueError, match="even block sizes"):
        document_tables(ids.to(device), 40, 40, 15, 16, True, None, *table_buffers(1, 1, 3, 3, device),
                        halves=half_buffers(1, 3, 3, device))


@pytest.mark.parametrize("causal, window", [(True, None), (True, 50), (False, None)])
def test_attention_over_half_tables(device, monkeypatch, causal, window):
    """Every partial-block loop walks the live halves (kernel tiles of half a block): forward and
    backward against fp64; and the kernels do read both half tables (with their counts zeroed, the
    partial blocks are skipped: the output, and dK/dV, change)."""
    from hf_flex.kernels import launch

    monkeypatch.setitem(launch.OVERRIDES, "fwd", launch.Tiles(32, 16, 4, 2, 32))
    monkeypatch.setitem(launch.OVERRIDES, "dkdv", launch.Tiles(16, 32, 4, 2))
    monkeypatch.setitem(launch.OVERRIDES, "dq", launch.Tiles(32, 16, 4, 2))
    monkeypatch.setitem(launch.SCHEDULE, "varlen", False)  # causal & documents: the block-sparse kernels
    S, blk = 150, 32
    ids = document_ids_from_position_ids(random_positions(1, S, seed=3, max_len=60)).to(device)
    parts = ([mods.causal()] if causal else []) + ([mods.sliding_window(window)] if window else [])
    mm = mods.and_masks(*parts, mods.document(ids, packed=True)) if parts else mods.document(ids, packed=True)
    n = -(-S // blk)
    tables, halves = table_buffers(1, 1, n, n, device), half_buffers(1, n, n, device)
    document_tables(ids, S, S, blk, blk, causal, window, *tables, halves=halves)
    bm = BlockMask.from_pairs(*tables, (S, S), (blk, blk), mm, "packed", halves=halves)
    assert launch.MaskTables.of(bm).partial_unit(blk, 16, False) == 16
    assert launch.MaskTables.of(bm, transposed=True).partial_unit(blk, 16, False) == 16
    assert int(halves[0].sum()) < 2 * int(bm.kv_num_blocks.sum())  # some halves are dead
    q, k, v = rand_qkv(1, 2, 1, S, S, 16, device=device, seed=5)
    check_attention(q, k, v, None, bm, enable_gqa=True)

    def grads(halves_):
        m = BlockMask.from_pairs(*tables, (S, S), (blk, blk), mm, "packed", halves=halves_)
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = hf_flex.flex_attention(qq, kk, vv, block_mask=m, enable_gqa=True)
        out.sum().backward()
        return out.detach(), kk.grad

    out, dk = grads(halves)
    out_bad, _ = grads((torch.zeros_like(halves[0]), *halves[1:]))
    _, dk_bad = grads((halves[0], halves[1], torch.zeros_like(halves[2]), halves[3]))
    assert not torch.allclose(out, out_bad)
    assert not torch.allclose(dk, dk_bad)


def test_packed_builder_writes_half_tables():
    """On CUDA the packed builder fills the half tables (one head), the kernels take them with the
    default tiles at 128 x 128 blocks, and SCHEDULE["halves"] = False turns them off."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from hf_flex.kernels import launch

    pos = random_positions(1, 1000, seed=4, max_len=300).cuda()
    bm = packed_block_mask(position_ids=pos)
    assert bm.kv_half_num is not None and bm.q_half_idx.shape == (1, 1, 8, 16)
    tables = launch.MaskTables.of(bm)
    assert tables.partial_unit(128, launch.fwd_tiles(128, 128, 2, 128, 128).block_n, False) == 64
    launch.SCHEDULE["halves"] = False
    try:
        assert tables.partial_unit(128, 64, False) == 128
    finally:
        launch.SCHEDULE["halves"] = True
    assert hf_flex.create_block_mask(bm.mask_mod, 1, 4, 1000, 1000).kv_half_num is None  # heads: no halves


def test_packed_parts_holds_nothing_after_it_returns():
    """packed_parts leaves no reference cycle behind: the mask's tensors die with their last reference,
    without the cyclic garbage collector (a recursive closure once kept each batch's document spans
    until a collection: two earlier steps' spans at a training step's peak, on the GPU)."""
    import gc
    import weakref

    from hf_flex.documents import packed_parts

    ids = document_ids_from_position_ids(random_positions(1, 90, seed=4))
    mm = mods.and_masks(mods.causal(), mods.sliding_window(30), mods.document(ids, packed=True))
    spans = weakref.ref(mm.args[-1])
    was = gc.isenabled()
    gc.disable()
    try:
        parts = packed_parts(mm)
        assert parts is not None and parts[1:] == (True, 30)
        del parts, mm
        assert spans() is None
    finally:
        if was:
            gc.enable()
