"""The document-aligned kernels (hf_flex/kernels/varlen.py): causal attention over packed documents in
tiles that start at each document's first position.

Against float64 on random inputs: documents of every length class relative to the tile (1 position,
shorter than a key step, exactly one tile, one more than a tile, several tiles, the row's end inside a
tile), several rows with different documents, one row of documents broadcast over the batch, GQA,
score mods with and without learnable tensors, sinks, the LSE's gradient. Each case checks that the
document-aligned kernels ran (and the block-sparse ones did not), and that masks other than causal AND
packed documents keep the block-sparse kernels.
"""

from __future__ import annotations

import pytest
import torch

import hf_flex
from hf_flex import autograd, mods
from hf_flex.kernels import launch
from hf_flex.kernels.launch_varlen import varlen_tile, varlen_tiles
from helpers import LaunchSpy, check_attention, device_only, make_param, poison_row_buffers, rand_qkv

TILE = 32


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 32 queries / keys (the interpreter's speed), key steps of 16, query steps of 16."""
    monkeypatch.setitem(launch.OVERRIDES, "fwd", launch.Tiles(TILE, 16, 4, 2, TILE))
    monkeypatch.setitem(launch.OVERRIDES, "dkdv", launch.Tiles(16, TILE, 4, 2))
    monkeypatch.setitem(launch.OVERRIDES, "dq", launch.Tiles(TILE, 16, 4, 2))
    monkeypatch.setitem(launch.SCHEDULE, "varlen", True)


@pytest.fixture
def calls(monkeypatch):
    """Which launchers ran: "varlen_forward" / "varlen_backward" / "flex_forward" / "flex_backward"."""
    seen = []
    for name in ("varlen_forward", "varlen_backward", "flex_forward", "flex_backward"):
        real = getattr(autograd, name)

        def spy(*a, _real=real, _name=name, **kw):
            seen.append(_name)
            return _real(*a, **kw)

        monkeypatch.setattr(autograd, name, spy)
    return seen


def _ids(lengths_per_row):
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths_per_row]).int()


# rows of document lengths (each row sums to S = 150): with TILE 32 and key steps of 16
LAYOUTS = {
    "short_and_exact": [[1, 15, 16, 17, 32, 33, 36]],  # 1, < step, = step, > step, = tile, tile + 1
    "long_and_ragged_end": [[70, 80]],  # several tiles; the row ends inside a tile
    "one_document": [[150]],
    "rows_differ": [[1, 31, 32, 33, 20, 33], [64, 40, 46]],
}


def _mask(ids, device):
    return mods.and_masks(mods.causal(), mods.document(ids.to(device), packed=True))


def test_tile_list():
    """Every position starts at most one tile; the tiles start where (p - document start) % tile == 0;
    both lists hold them first, the query-major one by more keys before the tile (larger index in the
    document) first, the key-major one by more of the document after the tile first; and their count."""
    ids = _ids(LAYOUTS["rows_differ"])
    spans = mods.document_spans(ids)
    tiles, n = varlen_tiles(spans, TILE)
    assert tiles.dtype == torch.int16 and n.dtype == torch.int32 and tiles.shape == (ids.shape[0], 2, ids.shape[1])
    for b, lengths in enumerate(LAYOUTS["rows_differ"]):
        want, lo = {}, 0
        for L in lengths:
            for i in range(-(-L // TILE)):
                want[lo + i * TILE] = (i, (L - 1 - i * TILE) // TILE)  # (tiles before, tiles after)
            lo += L
        assert int(n[b]) == len(want)
        for order in (0, 1):
            got = tiles[b, order, : int(n[b])].tolist()
            assert sorted(got) == sorted(want)
            rank = [want[p][order] for p in got]
            assert rank == sorted(rank, reverse=True), (order, rank)
            assert sorted(tiles[b, order].tolist()) == list(range(ids.shape[1]))  # a permutation


def test_tile_size_follows_the_passes(monkeypatch):
    assert varlen_tile(128, 128, 2) == 128  # the H100 tiles of bf16 at head dim 128
    monkeypatch.setitem(launch.OVERRIDES, "dq", launch.Tiles(64, 64, 8, 2))
    assert varlen_tile(128, 128, 2) is None  # dK/dV and dQ programs would need two tile lists


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
def test_matches_fp64(device, small_tiles, calls, layout, gqa):
    ids = _ids(LAYOUTS[layout])
    B, S = ids.shape
    q, k, v = rand_qkv(B, 4, 2 if gqa else 4, S, S, 16, dtype=torch.float32, device=device, seed=len(layout))
    bm = hf_flex.create_block_mask(_mask(ids, device), B, None, S, S, device=device, BLOCK_SIZE=TILE)
    check_attention(q, k, v, None, bm, enable_gqa=gqa)
    assert calls == ["varlen_forward", "varlen_backward"], calls


@pytest.mark.parametrize("score", ["softcap", "relative_bias", "sinks"])
def test_score_mods(device, small_tiles, calls, score):
    ids = _ids(LAYOUTS["rows_differ"])
    B, S = ids.shape
    H = 2
    params = ()
    if score == "softcap":
        sm = mods.softcap(1.5)
    elif score == "relative_bias":
        table = make_param((H, 2 * 40 - 1), 12, 1.0, device, "table")  # clamped past 39: exercised
        sm, params = mods.relative_bias(table), (table,)
    else:
        logit = make_param((H,), 13, 1.0, device, "sinks")
        sm, params = mods.sinks(logit), (logit,)
    q, k, v = rand_qkv(B, H, H, S, S, 16, dtype=torch.float32, device=device, seed=3)
    bm = hf_flex.create_block_mask(_mask(ids, device), B, None, S, S, device=device, BLOCK_SIZE=TILE)
    check_attention(q, k, v, sm, bm, params=params)
    assert calls == ["varlen_forward", "varlen_backward"], calls


def test_documents_broadcast_over_the_batch(device, small_tiles, calls):
    """One row of documents for a batch of 2 (block mask of B = 1): the tile list is read with stride 0."""
    ids = _ids(LAYOUTS["short_and_exact"])
    S = ids.shape[1]
    q, k, v = rand_qkv(2, 2, 1, S, S, 16, dtype=torch.float32, device=device, seed=9)
    bm = hf_flex.create_block_mask(_mask(ids, device), None, None, S, S, device=device, BLOCK_SIZE=TILE)
    check_attention(q, k, v, None, bm, enable_gqa=True)
    assert calls == ["varlen_forward", "varlen_backward"], calls


def test_the_same_as_the_block_sparse_kernels(device, small_tiles, monkeypatch):
    """SCHEDULE["varlen"] off gives the block-sparse kernels' results, to float32 rounding."""
    ids = _ids(LAYOUTS["rows_differ"])
    B, S = ids.shape
    q, k, v = rand_qkv(B, 4, 2, S, S, 16, dtype=torch.float32, device=device, seed=4)
    bm = hf_flex.create_block_mask(_mask(ids, device), B, None, S, S, device=device, BLOCK_SIZE=TILE)
    dout = torch.randn(B, 4, S, 16, generator=torch.Generator().manual_seed(2)).to(device)

    def run():
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = hf_flex.flex_attention(qq, kk, vv, block_mask=bm, enable_gqa=True)
        return (out, *torch.autograd.grad(out, (qq, kk, vv), dout))

    a = run()
    monkeypatch.setitem(launch.SCHEDULE, "varlen", False)
    bm.__dict__.pop("_varlen", None)
    b = run()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("other", ["window", "no_causal", "schedule_off"])
def test_other_masks_keep_the_block_sparse_kernels(device, small_tiles, calls, monkeypatch, other):
    ids = _ids(LAYOUTS["rows_differ"])
    B, S = ids.shape
    doc = mods.document(ids.to(device), packed=True)
    mm = {"window": mods.and_masks(mods.causal(), mods.sliding_window(20), doc), "no_causal": doc,
          "schedule_off": mods.and_masks(mods.causal(), doc)}[other]
    if other == "schedule_off":
        monkeypatch.setitem(launch.SCHEDULE, "varlen", False)
    q, k, v = rand_qkv(B, 2, 2, S, S, 16, dtype=torch.float32, device=device, seed=6)
    bm = hf_flex.create_block_mask(mm, B, None, S, S, device=device, BLOCK_SIZE=TILE)
    check_attention(q, k, v, None, bm)
    assert calls == ["flex_forward", "flex_backward"], calls


@pytest.mark.parametrize("knob", ["varlen_one_loop", "varlen_dp_first"])
@pytest.mark.parametrize("layout", ["short_and_exact", "rows_differ"])
def test_schedule_variants(device, small_tiles, calls, monkeypatch, layout, knob):
    """SCHEDULE["varlen_one_loop"] (every program's steps in one masked loop) and ["varlen_dp_first"]
    (the dK/dV loops issue dP^T before the softmax): the same results."""
    monkeypatch.setitem(launch.SCHEDULE, knob, True)
    ids = _ids(LAYOUTS[layout])
    B, S = ids.shape
    q, k, v = rand_qkv(B, 4, 2, S, S, 16, dtype=torch.float32, device=device, seed=8)
    bm = hf_flex.create_block_mask(_mask(ids, device), B, None, S, S, device=device, BLOCK_SIZE=TILE)
    check_attention(q, k, v, mods.softcap(2.0), bm, enable_gqa=True)
    assert calls == ["varlen_forward", "varlen_backward"], calls


@pytest.mark.parametrize("layout,one_loop", [("short_and_exact", False), device_only("rows_differ", False),
                                             device_only("long_and_ragged_end", False),
                                             device_only("rows_differ", True)])
def test_atomic_dq(device, small_tiles, calls, monkeypatch, layout, one_loop):
    """SCHEDULE["varlen_atomic_dq"]: the dK/dV programs add dQ (float32 atomics; the bulk reduction on
    Hopper), no dQ programs run: the same results; the dQ programs still run for learnable score-mod
    tensors and under torch.use_deterministic_algorithms."""
    monkeypatch.setitem(launch.SCHEDULE, "varlen_atomic_dq", True)
    monkeypatch.setitem(launch.SCHEDULE, "varlen_one_loop", one_loop)
    from hf_flex.kernels import launch_varlen

    spy = LaunchSpy(launch_varlen.attn_bwd_varlen_kernel)
    monkeypatch.setattr(launch_varlen, "attn_bwd_varlen_kernel", spy)

    def launches():  # (programs, ATOMIC_DQ) of each backward launch
        return [(g[0], kw["ATOMIC_DQ"]) for g, kw in zip(spy.grids, spy.calls)]

    ids = _ids(LAYOUTS[layout])
    B, S = ids.shape
    q, k, v = rand_qkv(B, 4, 2, S, S, 16, dtype=torch.float32, device=device, seed=21)
    bm = hf_flex.create_block_mask(_mask(ids, device), B, None, S, S, device=device, BLOCK_SIZE=TILE)
    check_attention(q, k, v, mods.softcap(2.0), bm, enable_gqa=True)
    slots = -(-S // TILE)
    slots += -(-slots // 4)  # the slots of the tiles past the first cdiv(S, TILE) (varlen_backward)
    assert launches() == [(slots * B * 2, True)], launches()  # dK/dV programs only: (tile slots) x B x Hkv

    spy.grids.clear()
    spy.calls.clear()
    table = make_param((4, 2 * 40 - 1), 12, 1.0, device, "table")
    check_attention(q, k, v, mods.relative_bias(table), bm, enable_gqa=True, params=(table,))
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    check_attention(q, k, v, mods.softcap(2.0), bm, enable_gqa=True)
    assert [a for _, a in launches()] == [False, False], launches()
    assert calls.count("varlen_backward") == 3, calls


@pytest.mark.parametrize("row_select", [True, False], ids=["selects", "masked_loads"])
def test_row_slack_never_reaches_the_gradients(device, small_tiles, calls, monkeypatch, row_select):
    """SCHEDULE["varlen_row_select"] (off by default: the slack's cost in peak memory): the backward
    reads LSE and delta a tile past a document's (and the row's) end unmasked (backward.row_inputs;
    launch.row_buffer's slack) and selects there. With every LSE / delta allocation NaN before the
    kernels write it, the results still match float64 (the last tile ends past the row: it reads the
    slack), with the selects and with masked loads."""
    from hf_flex.kernels import launch_varlen

    monkeypatch.setitem(launch.SCHEDULE, "varlen_row_select", row_select)
    made = poison_row_buffers(monkeypatch, launch_varlen)
    spy = LaunchSpy(launch_varlen.attn_bwd_varlen_kernel)
    monkeypatch.setattr(launch_varlen, "attn_bwd_varlen_kernel", spy)
    ids = _ids(LAYOUTS["long_and_ragged_end"])
    B, S = ids.shape
    q, k, v = rand_qkv(B, 4, 2, S, S, 16, dtype=torch.float32, device=device, seed=23)
    bm = hf_flex.create_block_mask(_mask(ids, device), B, None, S, S, device=device, BLOCK_SIZE=TILE)
    check_attention(q, k, v, mods.softcap(2.0), bm, enable_gqa=True)
    assert calls == ["varlen_forward", "varlen_backward"], calls
    assert len(made) == 2  # LSE and delta
    assert [c["ROW_SELECT"] for c in spy.calls] == [row_select]


def test_deferred_tables_stay_unbuilt(device, small_tiles, monkeypatch):
    """A deferred BlockMask (what the packed builder returns on CUDA for causal + packed documents)
    answers shape and device without building; the document-aligned kernels, forward and backward,
    read no table, so none is built; the block-sparse kernels' first read builds them all, once."""
    from hf_flex.block_mask import TABLE_NAMES, BlockMask

    ids = _ids(LAYOUTS["rows_differ"]).to(device)
    B, S = ids.shape
    mm = _mask(ids, device)
    eager = hf_flex.create_block_mask(mm, B, None, S, S, device=device, BLOCK_SIZE=TILE)
    built = []

    def build():
        built.append(1)
        return hf_flex.create_block_mask(mm, B, None, S, S, device=device, BLOCK_SIZE=TILE)

    bm = BlockMask.deferred(build, (B, 1), device, (S, S), (TILE, TILE), mm, "packed")
    assert bm.shape == eager.shape and bm.device == eager.device and not bm.tables_built
    q, k, v = rand_qkv(B, 4, 2, S, S, 16, dtype=torch.float32, device=device, seed=10)
    dout = torch.randn(B, 4, S, 16, generator=torch.Generator().manual_seed(3)).to(device)

    def run(m):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = hf_flex.flex_attention(qq, kk, vv, block_mask=m, enable_gqa=True)
        return (out, *torch.autograd.grad(out, (qq, kk, vv), dout))

    got, want = run(bm), run(eager)
    assert built == [] and not bm.tables_built
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    monkeypatch.setitem(launch.SCHEDULE, "varlen", False)
    bm.__dict__.pop("_varlen", None)
    for x, y in zip(run(bm), want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert built == [1] and bm.tables_built
    for n in TABLE_NAMES:
        a, b = getattr(bm, n), getattr(eager, n)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), n


def test_tile_list_past_int16():
    """Past 2**15 positions the lists are int32 (int16 would wrap)."""
    ids = _ids([[40000, 1000]])
    tiles, n = varlen_tiles(mods.document_spans(ids), 128)
    assert tiles.dtype == torch.int32 and int(n[0]) == 313 + 8
    assert int(tiles[0, 0, 0]) == 312 * 128  # the last tile of the long document first
