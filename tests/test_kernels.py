"""The Triton kernels (through hf_flex.flex_attention on the ``device`` fixture) against the reference.

Every case runs forward (out and lse, return_lse=True) and backward (dq, dk, dv and learnable score-mod
tensors, via torch.autograd.grad with random upstream gradients on out and on lse) and compares with
hf_flex.reference.attention in float64, with the FlashAttention tolerance of helpers.assert_close_to_fp64:
kernel error <= fudge * (same-precision reference error) + a few ulps. It also checks that rows with no
allowed key give out exactly 0 and lse -inf (the sink logit with sinks), with no NaN anywhere.

On CPU the kernels run in Triton's interpreter (conftest.py), which costs ~1 s per small fwd+bwd, so
shapes are small: B*H <= 8, lengths <= 130, head dim 16/32 except in the head-dim cases.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import triton
import triton.language as tl  # noqa: F401  (Triton wants it visible to the @triton.jit mask below)

import hf_flex
from hf_flex import mods
from hf_flex.dispatch import triton_runs_on
from helpers import LaunchSpy, check_attention, device_only, make_param, poison_row_buffers, rand_qkv, random_doc_ids


@pytest.fixture(autouse=True)
def _kernels_really_run(device):
    # the comparison is only meaningful if the Triton path, not the reference, produced the result
    assert triton_runs_on(device)


# --- mask builders: (B, Sq, Skv, device, seed) -> MaskMod --------------------------------------------


def _valid(B, S, seed, left):
    """[B, S] bool: row b has a random number of real tokens, padding on the left or right."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(S // 3, S + 1, (B,), generator=g)
    lens[0] = max(1, S - 7)  # at least one row padded, whatever the draw
    pos = torch.arange(S)
    if left:
        return pos[None, :] >= (S - lens)[:, None]
    return pos[None, :] < lens[:, None]


MASKS = {
    "noop": lambda B, Sq, Skv, dev, seed: mods.noop(),
    "causal": lambda B, Sq, Skv, dev, seed: mods.causal(),
    "sliding_window": lambda B, Sq, Skv, dev, seed: mods.sliding_window(20),
    "chunked": lambda B, Sq, Skv, dev, seed: mods.chunked(24),
    "prefix_lm": lambda B, Sq, Skv, dev, seed: mods.prefix_lm(21),
    "document": lambda B, Sq, Skv, dev, seed: mods.document(random_doc_ids(B, max(Sq, Skv), seed).to(dev)),
    "padding_right": lambda B, Sq, Skv, dev, seed: mods.padding(_valid(B, Skv, seed, left=False).to(dev)),
    "padding_left": lambda B, Sq, Skv, dev, seed: mods.padding(_valid(B, Skv, seed, left=True).to(dev)),
    "decode": lambda B, Sq, Skv, dev, seed: mods.offset(mods.causal(), Skv - Sq, 0),
    "causal&sliding": lambda B, Sq, Skv, dev, seed: mods.and_masks(mods.causal(), mods.sliding_window(16)),
    "causal&document": lambda B, Sq, Skv, dev, seed: mods.and_masks(
        mods.causal(), mods.document(random_doc_ids(B, max(Sq, Skv), seed).to(dev))
    ),
    "causal&padding_left": lambda B, Sq, Skv, dev, seed: mods.and_masks(
        mods.causal(), mods.padding(_valid(B, Skv, seed, left=True).to(dev))
    ),
    "causal&padding_right": lambda B, Sq, Skv, dev, seed: mods.and_masks(
        mods.causal(), mods.padding(_valid(B, Skv, seed, left=False).to(dev))
    ),
    "or(causal&sliding,chunked)": lambda B, Sq, Skv, dev, seed: mods.or_masks(
        mods.and_masks(mods.causal(), mods.sliding_window(10)), mods.chunked(32)
    ),
    "or(document,prefix_lm)": lambda B, Sq, Skv, dev, seed: mods.or_masks(
        mods.document(random_doc_ids(B, max(Sq, Skv), seed).to(dev)), mods.prefix_lm(5)
    ),
    "and(or,offset)": lambda B, Sq, Skv, dev, seed: mods.and_masks(
        mods.or_masks(mods.causal(), mods.chunked(16)), mods.offset(mods.sliding_window(40), 3, 0)
    ),
}


def _block_mask(name, B, Hq, Sq, Skv, device, bs, seed=0, bm_B="B"):
    if name == "none":
        return None
    mm = MASKS[name](B, Sq, Skv, device, seed)
    kw = {} if bs is None else dict(BLOCK_SIZE=bs)  # None: create_block_mask's default (128)
    return hf_flex.create_block_mask(mm, B if bm_B == "B" else None, None, Sq, Skv, device=device, **kw)


# --- every built-in mask and combinations -------------------------------------------------------------

# (mask, B, Sq, Skv, BLOCK_SIZE)
MASK_CASES = [
    ("none", 1, 70, 70, 32),
    ("noop", 1, 70, 70, 32),
    ("causal", 2, 70, 70, 16),
    ("sliding_window", 1, 70, 70, 16),
    ("chunked", 1, 113, 113, 32),
    ("prefix_lm", 1, 70, 70, 16),
    ("document", 2, 113, 113, 32),
    ("padding_right", 2, 70, 70, 32),
    ("padding_left", 2, 70, 70, 16),
    ("decode", 2, 17, 113, 16),
    ("causal&sliding", 1, 113, 113, 16),
    ("causal&document", 2, 70, 70, 16),
    ("causal&padding_left", 2, 70, 70, 32),
    ("causal&padding_right", 2, 70, 70, 16),
    ("or(causal&sliding,chunked)", 1, 113, 113, 32),
    ("or(document,prefix_lm)", 2, 70, 70, 32),
    ("and(or,offset)", 1, 70, 70, 16),
]


@pytest.mark.parametrize("mask,B,Sq,Skv,bs", MASK_CASES, ids=[c[0] for c in MASK_CASES])
def test_mask_mods(device, mask, B, Sq, Skv, bs):
    q, k, v = rand_qkv(B, 2, 2, Sq, Skv, 32, dtype=torch.float32, device=device, seed=zlib.crc32(mask.encode()) % 1000)
    bm = _block_mask(mask, B, 2, Sq, Skv, device, bs, seed=7)
    check_attention(q, k, v, None, bm)


# --- score mods, learnable tensors --------------------------------------------------------------------


def _score_case(name, H, device):
    """(score_mod, learnable params) for a score-mod case name."""
    if name == "softcap":
        return mods.softcap(1.5), ()
    if name == "alibi":
        slopes = make_param((H,), 11, 0.2, device, "slopes")
        return mods.alibi(slopes), (slopes,)
    if name == "alibi_frozen":
        return mods.alibi(torch.tensor([2.0 ** -(i + 1) for i in range(H)], device=device)), ()
    if name == "relative_bias":
        table = make_param((H, 2 * 20 - 1), 12, 1.0, device, "table")  # L=20 < S: clamping is exercised
        return mods.relative_bias(table), (table,)
    if name == "sinks":
        logit = make_param((H,), 13, 1.0, device, "sinks")
        return mods.sinks(logit), (logit,)
    if name == "chain(softcap,alibi)":
        slopes = make_param((H,), 14, 0.2, device, "slopes")
        return mods.chain(mods.softcap(2.0), mods.alibi(slopes)), (slopes,)
    if name == "chain(relative_bias,sinks)":
        table = make_param((H, 2 * 9 - 1), 15, 1.0, device, "table")
        logit = make_param((H,), 16, 1.0, device, "sinks")
        return mods.chain(mods.relative_bias(table), mods.sinks(logit)), (table, logit)
    if name == "chain(softcap,relative_bias,softcap)":
        table = make_param((H, 2 * 33 - 1), 17, 1.0, device, "table")
        return mods.chain(mods.softcap(3.0), mods.relative_bias(table), mods.softcap(1.0)), (table,)
    if name == "chain(alibi,relative_bias)":
        slopes = make_param((H,), 18, 0.2, device, "slopes")
        table = make_param((H, 2 * 5 - 1), 19, 1.0, device, "table")
        return mods.chain(mods.alibi(slopes), mods.relative_bias(table)), (slopes, table)
    raise KeyError(name)


# (score mod, mask, B, H, S, BLOCK_SIZE)
SCORE_CASES = [
    ("softcap", "causal", 1, 2, 70, 32),
    ("softcap", "none", 1, 2, 70, 32),
    ("alibi", "causal", 1, 2, 70, 16),
    ("alibi_frozen", "none", 1, 2, 70, 32),
    ("relative_bias", "causal", 1, 2, 70, 32),
    ("relative_bias", "none", 2, 2, 113, 32),
    ("sinks", "causal", 1, 2, 70, 32),
    ("sinks", "none", 1, 2, 70, 32),
    ("chain(softcap,alibi)", "causal&sliding", 1, 2, 70, 16),
    ("chain(relative_bias,sinks)", "causal", 1, 2, 70, 32),
    ("chain(softcap,relative_bias,softcap)", "document", 2, 2, 70, 32),
    ("chain(alibi,relative_bias)", "causal", 1, 2, 70, 32),
]


@pytest.mark.parametrize(
    "score,mask,B,H,S,bs", SCORE_CASES, ids=[f"{c[0]}-{c[1]}" for c in SCORE_CASES]
)
def test_score_mods(device, score, mask, B, H, S, bs):
    q, k, v = rand_qkv(B, H, H, S, S, 32, dtype=torch.float32, device=device, seed=3)
    sm, params = _score_case(score, H, device)
    bm = _block_mask(mask, B, H, S, S, device, bs, seed=5)
    r = check_attention(q, k, v, sm, bm, params=params)
    if params:
        for p in params:
            assert f"d{p._test_name}" in r["grads"]


def test_learnable_grads_are_not_trivial(device):
    """The parameter gradients compared above are non-zero (a zero gradient on both sides would pass)."""
    q, k, v = rand_qkv(1, 2, 2, 40, 40, 16, device=device, seed=4)
    sm, (slopes, table, ) = _score_case("chain(alibi,relative_bias)", 2, device)
    bm = _block_mask("causal", 1, 2, 40, 40, device, 16)
    out = hf_flex.flex_attention(q, k, v, sm, bm)
    gs, gt = torch.autograd.grad((out * torch.randn_like(out)).sum(), (slopes, table))
    assert gs.abs().min() > 0
    # causal: only distances kv - q <= 0 (table columns 0..4 of 9, the first clamped) are used
    assert (gt[:, :5].abs() > 0).all()
    assert (gt[:, 5:] == 0).all()


def test_sinks_only_lse_loss(device):
    """A loss on lse alone (no gradient reaches out): dsink and dq/dk through dlse only."""
    q, k, v = rand_qkv(1, 2, 2, 40, 40, 16, device=device, seed=8)
    sm, params = _score_case("sinks", 2, device)
    bm = _block_mask("causal", 1, 2, 40, 40, device, 16)
    check_attention(q, k, v, sm, bm, params=params, use_dout=False, use_dlse=True)


# --- GQA ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("Hkv", [4, 2, 1])
@pytest.mark.parametrize("mask", ["causal&document", "causal&sliding"])
def test_gqa(device, Hkv, mask):
    q, k, v = rand_qkv(1, 4, Hkv, 70, 70, 16, dtype=torch.float32, device=device, seed=Hkv)
    bm = _block_mask(mask, 1, 4, 70, 70, device, 32, seed=Hkv)
    check_attention(q, k, v, None, bm, enable_gqa=True)


def test_gqa_with_per_head_score_mods(device):
    """Slopes / tables / sinks index query heads, not key heads."""
    q, k, v = rand_qkv(1, 4, 2, 70, 70, 16, device=device, seed=21)
    slopes = make_param((4,), 22, 0.2, device, "slopes")
    logit = make_param((4,), 23, 1.0, device, "sinks")
    sm = mods.chain(mods.alibi(slopes), mods.sinks(logit))
    bm = _block_mask("causal", 1, 4, 70, 70, device, 32)
    check_attention(q, k, v, sm, bm, enable_gqa=True, params=(slopes, logit))


# --- launch schedules: one fused backward launch or two, query tiles in either order ----------------


def _schedule_case(reverse, fused, one_variant):
    name = (f"{'reverse_m' if reverse else 'forward_m'}-{'fused_bwd' if fused else 'two_launches'}-"
            f"{'one_variant' if one_variant else 'divisible_variant'}")
    # on the CPU: the default schedule, and two launches (the default where the passes' tiles differ)
    if reverse and one_variant:
        return pytest.param(reverse, fused, one_variant, id=name)
    return device_only(reverse, fused, one_variant, id=name)


@pytest.mark.parametrize("reverse,fused,one_variant", [
    _schedule_case(r, f, o) for r in (True, False) for f in (True, False) for o in (True, False)])
def test_schedules(device, fused, reverse, one_variant, monkeypatch):
    from hf_flex.kernels import launch

    monkeypatch.setitem(launch.SCHEDULE, "fused_bwd", fused)
    monkeypatch.setitem(launch.SCHEDULE, "reverse_m", reverse)
    monkeypatch.setitem(launch.SCHEDULE, "one_variant", one_variant)
    # ragged lengths (no tile divides them), GQA, a score mod with a learnable tensor and its derivative
    # lengths that no block divides, lengths that both divide, and 128-key blocks walked in several
    # key tiles each
    for Sq, Skv, bs in ((113, 70, (32, 16)), (64, 96, (32, 16)), (50, 300, (32, 128))):
        q, k, v = rand_qkv(2, 4, 2, Sq, Skv, 16, dtype=torch.float32, device=device, seed=31)
        slopes = make_param((4,), 32, 0.2, device, "slopes")
        bm = _block_mask("causal&document", 2, 4, Sq, Skv, device, bs, seed=33)
        check_attention(q, k, v, mods.chain(mods.alibi(slopes), mods.softcap(3.0)), bm, enable_gqa=True, params=(slopes,))


@pytest.mark.parametrize("fwd,bwd,interleave", [device_only("none", False, False), device_only("both", True, True)])
def test_load_order_and_program_order(device, fwd, bwd, interleave, monkeypatch):
    """The block-index load order of the loops (SCHEDULE index_ahead / bwd_index_ahead; the defaults,
    "full" forward and the backward's full-block loops, run in every other test) and the fused
    backward's program order (bwd_interleave, on by default; with GQA): the same answer, with 128-key blocks walked in several tiles (the next
    index is loaded only when the next tile starts a block) and empty rows."""
    from hf_flex.kernels import launch

    monkeypatch.setitem(launch.SCHEDULE, "index_ahead", fwd)
    monkeypatch.setitem(launch.SCHEDULE, "bwd_index_ahead", bwd)
    monkeypatch.setitem(launch.SCHEDULE, "bwd_interleave", interleave)
    for Sq, Skv, bs, mask in ((113, 70, (32, 16), "causal&document"), (50, 300, (32, 128), "causal&sliding")):
        q, k, v = rand_qkv(2, 4, 2, Sq, Skv, 16, dtype=torch.float32, device=device, seed=41)
        bm = _block_mask(mask, 2, 4, Sq, Skv, device, bs, seed=43)
        check_attention(q, k, v, mods.softcap(3.0), bm, enable_gqa=True)


@pytest.mark.parametrize("knob,fused", [device_only("bwd_one_loop", True, id="bwd_fused"),
                                        device_only("bwd_one_loop", False, id="bwd_two_launches"),
                                        device_only("fwd_one_loop", True, id="fwd")])
def test_one_loop(device, knob, fused, monkeypatch):
    """SCHEDULE["bwd_one_loop"] / ["fwd_one_loop"]: every backward (forward) program walks its partial,
    then its full blocks in one loop. The same answers: ragged lengths and lengths that divide the
    blocks, GQA, 128-key blocks walked in several tiles, empty rows and rows with only partial or only
    full blocks, a learnable score-mod tensor and a mod's derivative."""
    from hf_flex.kernels import launch

    monkeypatch.setitem(launch.SCHEDULE, knob, True)
    monkeypatch.setitem(launch.SCHEDULE, "fused_bwd", fused)
    cases = ((113, 70, (32, 16), "causal&document"), (64, 96, (32, 16), "causal&document"),
             (50, 300, (32, 128), "causal&sliding"), (96, 96, (32, 32), "causal"))
    for Sq, Skv, bs, mask in cases:
        q, k, v = rand_qkv(2, 4, 2, Sq, Skv, 16, dtype=torch.float32, device=device, seed=61)
        slopes = make_param((4,), 62, 0.2, device, "slopes")
        bm = _block_mask(mask, 2, 4, Sq, Skv, device, bs, seed=63)
        check_attention(q, k, v, mods.chain(mods.alibi(slopes), mods.softcap(3.0)), bm, enable_gqa=True, params=(slopes,))


@pytest.mark.parametrize("fused,reverse", [pytest.param(True, True, id="fused_reverse_m"),
                                           device_only(False, True, id="two_launches_reverse_m"),
                                           device_only(True, False, id="fused_forward_m")])
def test_heads_first(device, fused, reverse, monkeypatch):
    """SCHEDULE["heads_first"] and ["bwd_heads_first"]: grids (B * H, tiles), every head's tile t before any head's next tile,
    in the forward and both backward forms. Every (tile, batch, head) still runs exactly once: the
    same answers with GQA, two batch rows of different documents, ragged lengths and Sq != Skv."""
    from hf_flex.kernels import launch

    monkeypatch.setitem(launch.SCHEDULE, "heads_first", True)
    monkeypatch.setitem(launch.SCHEDULE, "bwd_heads_first", True)
    monkeypatch.setitem(launch.SCHEDULE, "fused_bwd", fused)
    monkeypatch.setitem(launch.SCHEDULE, "reverse_m", reverse)
    for Sq, Skv, bs in ((113, 70, (32, 16)), (50, 300, (32, 128))):
        q, k, v = rand_qkv(2, 4, 2, Sq, Skv, 16, dtype=torch.float32, device=device, seed=71)
        bm = _block_mask("causal&document", 2, 4, Sq, Skv, device, bs, seed=73)
        check_attention(q, k, v, mods.softcap(3.0), bm, enable_gqa=True)


def test_heads_first_for_documents(device, monkeypatch):
    """SCHEDULE["heads_first"] == "documents" (the default): the forward launches heads first exactly
    when the mask holds packed documents, alone or inside an "and"; True / False force it; anything
    else is an error naming the key."""
    from hf_flex.kernels import launch

    monkeypatch.setitem(launch.SCHEDULE, "heads_first", "documents")
    monkeypatch.setitem(launch.SCHEDULE, "varlen", False)  # causal & document: the block-sparse forward
    fwd = LaunchSpy(launch.attn_fwd_kernel)
    monkeypatch.setattr(launch, "attn_fwd_kernel", fwd)
    q, k, v = rand_qkv(2, 2, 2, 70, 70, 16, dtype=torch.float32, device=device, seed=81)
    want = {"document": True, "causal&document": True, "causal": False, "causal&sliding": False,
            "or(document,prefix_lm)": False, "none": False}
    for name in want:
        hf_flex.flex_attention(q, k, v, None, _block_mask(name, 2, 2, 70, 70, device, 32, seed=83))
    assert [c["HEADS_FIRST"] for c in fwd.calls] == list(want.values())
    for forced in (True, False):
        monkeypatch.setitem(launch.SCHEDULE, "heads_first", forced)
        hf_flex.flex_attention(q, k, v, None, _block_mask("causal", 2, 2, 70, 70, device, 32))
        assert fwd.calls[-1]["HEADS_FIRST"] is forced
    monkeypatch.setitem(launch.SCHEDULE, "heads_first", "docs")
    with pytest.raises(ValueError, match=r'SCHEDULE\["heads_first"\]'):
        hf_flex.flex_attention(q, k, v, None, _block_mask("causal", 2, 2, 70, 70, device, 32))


def _spy_dkdv_launches(monkeypatch, fused: bool) -> LaunchSpy:
    """The block-sparse backward in its fused form (one launch, attn_bwd_kernel) or its two launches
    (SCHEDULE["fused_bwd"]), with a spy on the launch that runs the dK/dV programs."""
    from hf_flex.kernels import launch

    monkeypatch.setitem(launch.SCHEDULE, "fused_bwd", fused)
    name = "attn_bwd_kernel" if fused else "attn_bwd_dkdv_kernel"
    spy = LaunchSpy(getattr(launch, name))
    monkeypatch.setattr(launch, name, spy)
    return spy


@pytest.mark.parametrize("fused", [pytest.param(True, id="fused_bwd"), device_only(False, id="two_launches")])
def test_bwd_flat_group(device, fused, monkeypatch):
    """SCHEDULE["bwd_flat_group"]: with tables shared by every head, each dK/dV loop walks its blocks
    for all the query heads of its key head in one loop. The same gradients (three query heads per key
    head, ragged lengths, a score mod's derivative, empty rows); per-head tables and one query head per
    key head keep the loop per head; where the flat loop applies it wins over bwd_index_ahead (the two
    exclude each other), which applies elsewhere; "documents" takes it where the mask packs documents;
    anything else is an error naming the key."""
    from hf_flex.kernels import launch

    monkeypatch.setitem(launch.SCHEDULE, "bwd_flat_group", True)
    spy = _spy_dkdv_launches(monkeypatch, fused)
    q, k, v = rand_qkv(2, 6, 2, 113, 90, 16, dtype=torch.float32, device=device, seed=61)
    for mask, bs in (("causal&document", (32, 16)), ("causal&sliding", (32, 64))):
        check_attention(q, k, v, mods.softcap(3.0), _block_mask(mask, 2, None, 113, 90, device, bs, seed=63),
                        enable_gqa=True)
    assert [c["FLAT_GROUP"] for c in spy.calls] == [True, True]
    per_head = hf_flex.create_block_mask(MASKS["causal"](2, 113, 90, device, 0), 2, 6, 113, 90, device=device,
                                         BLOCK_SIZE=32)
    check_attention(q, k, v, None, per_head, enable_gqa=True)
    q1 = q[:, :2].contiguous()
    check_attention(q1, k, v, None, _block_mask("causal", 2, None, 113, 90, device, 32))  # one head per key head
    monkeypatch.setitem(launch.SCHEDULE, "bwd_index_ahead", True)
    check_attention(q, k, v, None, _block_mask("causal", 2, None, 113, 90, device, 32), enable_gqa=True)
    assert [c["FLAT_GROUP"] for c in spy.calls[2:]] == [False, False, True]
    assert [c["AHEAD_FULL"] for c in spy.calls] == [False, False, True, True, False]
    # "documents" (the default): the flat loop where the mask packs documents
    monkeypatch.setitem(launch.SCHEDULE, "bwd_index_ahead", False)
    monkeypatch.setitem(launch.SCHEDULE, "bwd_flat_group", "documents")
    for mask in ("causal&document", "causal"):
        check_attention(q, k, v, None, _block_mask(mask, 2, None, 113, 90, device, 32, seed=65), enable_gqa=True)
    assert [c["FLAT_GROUP"] for c in spy.calls[5:]] == [True, False]
    monkeypatch.setitem(launch.SCHEDULE, "bwd_flat_group", "docs")
    with pytest.raises(ValueError, match=r'SCHEDULE\["bwd_flat_group"\]'):
        check_attention(q, k, v, None, _block_mask("causal", 2, None, 113, 90, device, 32), enable_gqa=True)


@pytest.mark.parametrize("fused", [device_only(True, id="fused_bwd"), device_only(False, id="two_launches")])
def test_atomic_dq(device, fused, monkeypatch):
    """SCHEDULE["atomic_dq"]: dQ added by the dK/dV programs with float32 atomics, no dQ pass. The same
    answers (ragged lengths, several query heads per key head, a score mod's derivative, 128-key
    blocks in several tiles, empty rows); the dQ pass still runs for learnable score-mod tensors and
    under torch.use_deterministic_algorithms."""
    from hf_flex.kernels import launch

    monkeypatch.setitem(launch.SCHEDULE, "atomic_dq", True)
    monkeypatch.setitem(launch.SCHEDULE, "fused_bwd", fused)
    dkdv = LaunchSpy(launch.attn_bwd_dkdv_kernel)
    monkeypatch.setattr(launch, "attn_bwd_dkdv_kernel", dkdv)
    for Sq, Skv, bs, mask in ((113, 70, (32, 16), "causal&document"), (50, 300, (32, 128), "causal&sliding")):
        q, k, v = rand_qkv(2, 4, 2, Sq, Skv, 16, dtype=torch.float32, device=device, seed=51)
        bm = _block_mask(mask, 2, 4, Sq, Skv, device, bs, seed=53)
        check_attention(q, k, v, mods.softcap(3.0), bm, enable_gqa=True)
    assert [c.get("ATOMIC_DQ") for c in dkdv.calls] == [True, True]

    dkdv.calls.clear()
    q, k, v = rand_qkv(2, 4, 2, 70, 70, 16, dtype=torch.float32, device=device, seed=55)
    slopes = make_param((4,), 32, 0.2, device, "slopes")
    bm = _block_mask("causal&document", 2, 4, 70, 70, device, (32, 16), seed=57)
    check_attention(q, k, v, mods.alibi(slopes), bm, enable_gqa=True, params=(slopes,))
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    check_attention(q, k, v, mods.softcap(3.0), bm, enable_gqa=True)
    assert not any(c.get("ATOMIC_DQ") for c in dkdv.calls)


@pytest.mark.parametrize("fused,setting,expect", [
    pytest.param(True, 64, True, id="fused_bwd-64-True"),  # the default
    *(device_only(f, s, e, id=f"{'fused_bwd' if f else 'two_launches'}-{s}-{e}")
      for f in (True, False) for s, e in ((True, True), (False, False), (64, True), (8, False)) if not (f and s == 64)),
])
def test_dp_first(device, setting, expect, fused, monkeypatch):
    """SCHEDULE["bwd_dp_first"]: the dK/dV loops issue dP^T before the softmax or after dV's product
    (the default at head dims up to 64, so the tests' 16; the other order past 64): the same answers either way
    (ragged lengths, GQA, a score mod's derivative, documents and a sliding window); an int bounds
    the head dims it applies to; anything else is refused by name."""
    from hf_flex.kernels import launch

    monkeypatch.setitem(launch.SCHEDULE, "bwd_dp_first", setting)
    spy = _spy_dkdv_launches(monkeypatch, fused)
    for Sq, Skv, bs, mask in ((113, 70, (32, 16), "causal&document"), (50, 300, (32, 128), "causal&sliding")):
        q, k, v = rand_qkv(2, 4, 2, Sq, Skv, 16, dtype=torch.float32, device=device, seed=61)
        check_attention(q, k, v, mods.softcap(3.0), _block_mask(mask, 2, 4, Sq, Skv, device, bs, seed=63),
                        enable_gqa=True)
    assert [c["DP_FIRST"] for c in spy.calls] == [expect, expect]
    monkeypatch.setitem(launch.SCHEDULE, "bwd_dp_first", "yes")
    with pytest.raises(ValueError, match=r'SCHEDULE\["bwd_dp_first"\]'):
        check_attention(q, k, v, None, _block_mask("causal", 2, 4, Sq, Skv, device, bs), enable_gqa=True)


@pytest.mark.parametrize("fused", [device_only(True, id="fused_bwd"), device_only(False, id="two_launches")])
def test_full_loop_stages(device, fused, monkeypatch):
    """SCHEDULE["bwd_full_stages"] / ["bwd_dq_full_stages"]: the full-block loops pipelined 3 deep while
    the kernel's other loops keep its depth (on a GPU the pipeliner runs; Triton's interpreter has
    none, so on the CPU this checks what reaches the launches): the same answers (ragged lengths, GQA,
    a score mod's derivative, documents and a sliding window, 128-key blocks walked in tiles); 0
    passes no depth; anything but an int from 0 to 6 is refused by name."""
    from hf_flex.kernels import launch

    monkeypatch.setitem(launch.SCHEDULE, "bwd_full_stages", 3)
    monkeypatch.setitem(launch.SCHEDULE, "bwd_dq_full_stages", 3)
    spy = _spy_dkdv_launches(monkeypatch, fused)
    for Sq, Skv, bs, mask in ((113, 70, (32, 16), "causal&document"), (50, 300, (32, 128), "causal&sliding")):
        q, k, v = rand_qkv(2, 4, 2, Sq, Skv, 16, dtype=torch.float32, device=device, seed=71)
        check_attention(q, k, v, mods.softcap(3.0), _block_mask(mask, 2, 4, Sq, Skv, device, bs, seed=73),
                        enable_gqa=True)
    want = [(3, 3)] * 2 if fused else [(3, None)] * 2  # the two-launch dQ kernel keeps its depth
    assert [(c["FULL_STAGES"], c.get("DQ_FULL_STAGES")) for c in spy.calls] == want
    monkeypatch.setitem(launch.SCHEDULE, "bwd_full_stages", 0)
    monkeypatch.setitem(launch.SCHEDULE, "bwd_dq_full_stages", 0)
    check_attention(q, k, v, None, _block_mask("causal", 2, 4, Sq, Skv, device, bs), enable_gqa=True)
    assert spy.calls[-1]["FULL_STAGES"] is None
    for bad in (True, 7, "3"):
        monkeypatch.setitem(launch.SCHEDULE, "bwd_full_stages", bad)
        with pytest.raises(ValueError, match=r'SCHEDULE\["bwd_full_stages"\]'):
            check_attention(q, k, v, None, _block_mask("causal", 2, 4, Sq, Skv, device, bs), enable_gqa=True)


@pytest.mark.parametrize("row_select", [True, False], ids=["selects", "masked_loads"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused_bwd", "two_launches"])
def test_row_slack_never_reaches_the_gradients(device, fused, row_select, monkeypatch):
    """SCHEDULE["row_select"] (off by default, as varlen_row_select, test_varlen): the backward reads
    LSE and delta up to a block past the end unmasked (backward.row_inputs; launch.row_buffer's
    slack) and selects there. With every LSE / delta allocation NaN before the kernels write it,
    lengths that end inside a block still match float64 (each head's rows read the next head's, the
    last head's the slack), with the selects and with masked loads; the knob is checked."""
    from hf_flex.kernels import launch

    made = poison_row_buffers(monkeypatch)
    monkeypatch.setitem(launch.SCHEDULE, "row_select", row_select)
    spy = _spy_dkdv_launches(monkeypatch, fused)
    for Sq, Skv, bs, mask in ((113, 70, (32, 16), "causal&document"), (50, 90, (64, 32), "causal&sliding")):
        q, k, v = rand_qkv(2, 4, 2, Sq, Skv, 16, dtype=torch.float32, device=device, seed=67)
        check_attention(q, k, v, None, _block_mask(mask, 2, 4, Sq, Skv, device, bs, seed=69), enable_gqa=True)
    assert [c["ROW_SELECT"] for c in spy.calls] == [row_select, row_select]
    assert len(made) >= 4
    monkeypatch.setitem(launch.SCHEDULE, "row_select", 1)
    with pytest.raises(ValueError, match=r'SCHEDULE\["row_select"\]'):
        check_attention(q, k, v, None, _block_mask("causal", 2, 4, Sq, Skv, device, bs), enable_gqa=True)


def test_row_buffer_slack(device):
    """launch.row_buffer: a contiguous float32 [B, H, S] with the slack asked for readable past its
    last row (none: a plain tensor); backward_buffers keeps an LSE that has the slack the backward
    needs and copies one that has not; row_slack is 0 without the selects."""
    from hf_flex.kernels import launch

    t = launch.row_buffer(2, 3, 40, device, 128)
    assert t.shape == (2, 3, 40) and t.dtype == torch.float32 and t.is_contiguous()
    assert launch._has_slack(t, 128) and not launch._has_slack(t, 10**6)
    plain = launch.row_buffer(2, 3, 40, device, 0)
    assert plain.untyped_storage().nbytes() == plain.numel() * 4 and not launch._has_slack(plain, 1)
    q = torch.randn(2, 3, 40, 16, device=device)
    t.copy_(torch.randn(2, 3, 40))
    kept, *_ = launch.backward_buffers(q, t, q, None, False, 128)
    assert kept is t
    copied, *_ = launch.backward_buffers(q, plain.copy_(t), q, None, False, 128)
    assert copied.data_ptr() != plain.data_ptr() and torch.equal(copied, t) and launch._has_slack(copied, 128)
    assert launch.backward_buffers(q, plain, q, None, False, 0)[0] is plain
    assert launch.row_slack(64, launch.SCHEDULE["row_select"]) == (128 if launch.SCHEDULE["row_select"] else 0)


@pytest.mark.parametrize("fused,tma,bwd_tma", [
    pytest.param(True, "both", True, id="fused_bwd-both-True"),  # the default
    *(device_only(f, t, b, id=f"{'fused_bwd' if f else 'two_launches'}-{t}-{b}")
      for f in (True, False) for t, b in (("none", False), ("full", False), ("both", True)) if not (f and t == "both")),
])
def test_tma_loads(device, tma, bwd_tma, fused, monkeypatch):
    """SCHEDULE["tma"] / ["bwd_tma"]: the forward's K/V tiles, the dK/dV pass's Q/dO tiles and the dQ
    pass's K/V tiles through tensor descriptors (TMA on Hopper, emulated by Triton's interpreter; the
    default, so most tests run it) or pointer loads (GPUs before Hopper): the same answers and
    gradients with ragged lengths (rows past the end arrive as zeros),
    GQA, a transposed [B, S, H, D] layout, 128-key blocks in several tiles and empty rows; tensors TMA
    cannot take (a head dim that is not a power of two) take the pointer loads."""
    from hf_flex.kernels import launch

    if device == "cuda" and not launch.has_tma(torch.device("cuda")):
        pytest.skip("no TMA before compute capability 9")
    monkeypatch.setitem(launch.SCHEDULE, "tma", tma)
    monkeypatch.setitem(launch.SCHEDULE, "bwd_tma", bwd_tma)
    monkeypatch.setitem(launch.SCHEDULE, "fused_bwd", fused)
    for Sq, Skv, bs, mask in ((113, 70, (32, 16), "causal&document"), (50, 300, (32, 128), "causal&sliding")):
        q, k, v = rand_qkv(2, 4, 2, Sq, Skv, 16, dtype=torch.float32, device=device, seed=61)
        k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))  # Transformers' layout
        bm = _block_mask(mask, 2, 4, Sq, Skv, device, bs, seed=63)
        check_attention(q, k, v, mods.softcap(3.0), bm, enable_gqa=True)
    assert launch._tma_descriptors(k, v, 16, 16, 16, 16, 32)[0] is not None
    q, k, v = rand_qkv(1, 2, 2, 40, 40, 24, dtype=torch.float32, device=device, seed=65)
    assert launch._tma_descriptors(k, v, 24, 32, 24, 32, 32) == (None, None)
    check_attention(q, k, v, None, _block_mask("causal", 1, 2, 40, 40, device, (16, 16)))


def test_descriptors_built_without_validation_equal_validated_ones(monkeypatch):
    """launch._descriptor copies a validated prototype per (dtype, block) instead of validating every
    descriptor: each field equals what TensorDescriptor's own constructor makes, for tensors of other
    shapes, strides and layouts than the prototype's, and the prototype keeps no caller tensor."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from hf_flex.kernels import launch

    monkeypatch.setattr(launch, "_descriptor_protos", {})
    monkeypatch.setattr(launch, "has_tma", lambda device: True)
    made = [torch.randn(2, 4, 50, 16), torch.randn(1, 70, 2, 16).transpose(1, 2), torch.randn(3, 2, 9, 16)]
    for t in made + made:
        for rows in (16, 32):
            a, b = launch._tma_descriptors(t, t, 16, 16, 16, 16, rows)
            ref = TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, 16])
            for d in (a, b):
                assert type(d) is type(ref) and vars(d).keys() == vars(ref).keys()
                for name, value in vars(ref).items():
                    got = getattr(d, name)
                    assert (got is value) if isinstance(value, torch.Tensor) else got == value, name
    assert len(launch._descriptor_protos) == 2
    for proto in launch._descriptor_protos.values():
        assert proto.base is None and proto.shape is None and proto.strides is None


def test_tile_choice_cached_and_overridable(monkeypatch):
    """The tiles per (pass, head dims, element size, block sizes) are picked once; OVERRIDES still win."""
    from hf_flex.kernels import launch
    from hf_flex.kernels.launch import Tiles

    monkeypatch.setattr(launch, "_picked", {})
    first = launch.fwd_tiles(128, 128, 2, 128, 128)
    assert launch.fwd_tiles(128, 128, 2, 128, 128) is first
    assert launch.fwd_tiles(128, 128, 2, 64, 64).block_m == 64  # fitted to smaller blocks: another entry
    assert launch.dq_tiles(64, 64, 4, 128, 128) == launch._fit(launch._TABLE[(64, 4)][2], 128, 128)
    monkeypatch.setitem(launch.OVERRIDES, "fwd", Tiles(32, 32, 4, 2))
    assert launch.fwd_tiles(128, 128, 2, 128, 128) == Tiles(32, 32, 4, 2, 32)


def test_has_tma_per_device(monkeypatch):
    """TMA from compute capability 9, asked once per CUDA device (the answer is cached); a device
    without an index means the current one."""
    from hf_flex.kernels import launch

    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: asked.append(i) or ((9, 0) if i == 0 else (8, 0)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    launch._cuda_major.cache_clear()
    try:
        assert launch.has_tma(torch.device("cuda", 0)) and launch.has_tma(torch.device("cuda", 0))
        assert not launch.has_tma(torch.device("cuda", 1)) and not launch.has_tma(torch.device("cuda"))
        assert asked == [0, 1]
    finally:
        launch._cuda_major.cache_clear()


def test_tma_value_checked(device, monkeypatch):
    from hf_flex.kernels import launch

    monkeypatch.setitem(launch.SCHEDULE, "tma", True)
    q, k, v = rand_qkv(1, 1, 1, 16, 16, 16, dtype=torch.float32, device=device, seed=1)
    with pytest.raises(ValueError, match="tma"):
        hf_flex.flex_attention(q, k, v)


@pytest.mark.parametrize("varlen", [False, True], ids=["block_sparse", "document_aligned"])
def test_backward_frees_the_block_mask(device, monkeypatch, varlen):
    """The graph holds the block mask's tables (the document-aligned kernels': its tile lists instead,
    and no table) and its mask's tensors (document spans: per token) only until its backward ran, as
    it holds q, k, v (save_for_backward): a training loop that keeps the last step's output must not
    keep them through the next step. retain_graph=True keeps them for a second backward, which then
    gives the same gradients."""
    import gc
    import weakref

    from hf_flex.kernels import launch

    monkeypatch.setitem(launch.SCHEDULE, "varlen", varlen)
    ids = random_doc_ids(1, 100, seed=71, max_docs=4).to(device)
    q, k, v = rand_qkv(1, 2, 2, 100, 100, 16, dtype=torch.float32, device=device, seed=73)
    bm = hf_flex.create_block_mask(mods.and_masks(mods.causal(), mods.document(ids, packed=True)), 1, None, 100, 100,
                                   device=device, BLOCK_SIZE=32)
    per_token = [t for t in bm.mask_mod.tensors() if t.dim() == 2]  # spans and their starts (not the shared meta)
    assert len(per_token) == 2
    tables = [weakref.ref(t) for t in [bm.kv_indices, bm.full_q_indices]]
    held = [weakref.ref(t) for t in per_token] + ([] if varlen else tables)
    del per_token
    out = hf_flex.flex_attention(q, k, v, block_mask=bm)
    if varlen:
        tile_lists = bm.__dict__["_varlen"][1][:2]
        held += [weakref.ref(t) for t in tile_lists]
        del tile_lists
    del bm
    gc.collect()
    assert not varlen or all(r() is None for r in tables)  # the document-aligned graph holds no table
    out.sum().backward(retain_graph=True)
    first = [t.grad.clone() for t in (q, k, v)]
    gc.collect()
    assert all(r() is not None for r in held)  # retained for another backward
    for t in (q, k, v):
        t.grad = None
    out.sum().backward()
    assert all(torch.equal(t.grad, g) for t, g in zip((q, k, v), first))
    gc.collect()
    assert out.grad_fn is not None and all(r() is None for r in held)


def test_index_ahead_value_checked(device, monkeypatch):
    from hf_flex.kernels import launch

    monkeypatch.setitem(launch.SCHEDULE, "index_ahead", True)
    q, k, v = rand_qkv(1, 1, 1, 16, 16, 16, dtype=torch.float32, device=device, seed=1)
    with pytest.raises(ValueError, match="index_ahead"):
        hf_flex.flex_attention(q, k, v)


@pytest.mark.parametrize("one_variant", [True, False], ids=["one_variant", "divisible_variant"])
@pytest.mark.parametrize("Sq,Skv", [(70, 50), (64, 96)])
def test_tables_with_full_blocks_past_the_end(device, Sq, Skv, one_variant, monkeypatch):
    """Tables handed to BlockMask() may list a ragged last block full (tail_partial False): the
    kernels then check positions past the end in full blocks too. Builders of this package list such
    blocks partial and the full-block loops skip the checks (tail_partial True): the same answer."""
    from hf_flex.block_mask import BlockMask, _tables, table_buffers
    from hf_flex.kernels import launch

    monkeypatch.setitem(launch.SCHEDULE, "one_variant", one_variant)
    nq, nkv = -(-Sq // 32), -(-Skv // 16)
    classes = torch.full((1, 1, nq, nkv), 2, dtype=torch.int8)  # every block full (noop mask)
    classes[0, 0, 0, -1] = 1
    skip = torch.stack((classes != 1, classes != 2)).view(torch.uint8)
    kv_num, kv_idx, q_num, q_idx = table_buffers(1, 1, nq, nkv, "cpu")
    _tables(skip, kv_num, kv_idx)
    _tables(skip.transpose(-1, -2).contiguous(), q_num, q_idx)
    tables = [t.to(device) for pair in (kv_num, kv_idx, q_num, q_idx) for t in pair.unbind(0)]
    order = [tables[i] for i in (0, 2, 1, 3, 4, 6, 5, 7)]  # num, idx, full_num, full_idx per direction
    raw = BlockMask(*order, seq_lengths=(Sq, Skv), block_size=(32, 16), mask_mod=mods.noop())
    assert not raw.tail_partial
    built = hf_flex.create_block_mask(None, None, None, Sq, Skv, device=device, BLOCK_SIZE=(32, 16))
    assert built.tail_partial
    q, k, v = rand_qkv(2, 2, 2, Sq, Skv, 16, dtype=torch.float32, device=device, seed=Sq)
    for bm in (raw, built):
        check_attention(q, k, v, None, bm)


# --- ragged lengths, Sq != Skv -------------------------------------------------------------------------

# (Sq, Skv, mask, BLOCK_SIZE)
LENGTH_CASES = [
    (1, 1, "causal", 16),
    (1, 17, "none", 16),
    (1, 130, "decode", 32),
    (17, 17, "causal", 16),
    (17, 113, "decode", 16),
    (113, 17, "causal", 32),
    (113, 113, "causal", 32),
    (130, 130, "causal", 32),
    (130, 70, "document", 32),
    (70, 130, "causal&sliding", (16, 32)),
    (113, 70, "prefix_lm", (32, 16)),
    (130, 130, "causal&document", 16),
]


@pytest.mark.parametrize("Sq,Skv,mask,bs", LENGTH_CASES, ids=[f"{c[0]}x{c[1]}-{c[2]}-{c[3]}" for c in LENGTH_CASES])
def test_lengths(device, Sq, Skv, mask, bs):
    q, k, v = rand_qkv(1, 2, 2, Sq, Skv, 16, dtype=torch.float32, device=device, seed=Sq + Skv)
    bm = _block_mask(mask, 1, 2, Sq, Skv, device, bs, seed=3)
    check_attention(q, k, v, None, bm)


# --- fully masked rows -------------------------------------------------------------------------------


def _empty_row_mask(kind, B, Sq, Skv, device):
    if kind == "padding_all_of_batch_1":
        valid = torch.ones(B, Skv, dtype=torch.bool)
        valid[1] = False  # batch row 1 has no real key: every query of it is fully masked
        return mods.padding(valid.to(device))
    if kind == "causal&left_padding":
        valid = torch.arange(Skv)[None, :] >= torch.tensor([23, 5])[:, None]
        return mods.and_masks(mods.causal(), mods.padding(valid.to(device)))
    if kind == "kv_offset_causal":
        return mods.offset(mods.causal(), 0, 40)  # kv + 40 <= q: queries < 40 see nothing
    if kind == "document_missing_in_kv":
        ids = torch.zeros(B, max(Sq, Skv), dtype=torch.int32)
        ids[:, 30:] = 1
        ids[:, 50:] = 2  # with Skv = 45, queries of document 2 find no key
        return mods.document(ids.to(device))
    raise KeyError(kind)


# (kind, B, Sq, Skv, BLOCK_SIZE, dtype, score)
EMPTY_CASES = [
    ("padding_all_of_batch_1", 2, 40, 40, 16, torch.float32, None),
    ("causal&left_padding", 2, 70, 70, 16, torch.float32, None),
    ("causal&left_padding", 2, 70, 70, 32, torch.float16, None),
    ("kv_offset_causal", 1, 70, 70, 16, torch.float32, None),
    ("kv_offset_causal", 1, 70, 70, 32, torch.float32, "sinks"),
    ("kv_offset_causal", 1, 70, 70, 16, torch.float32, "chain(softcap,alibi)"),
    ("document_missing_in_kv", 1, 70, 45, 16, torch.float32, None),
    ("padding_all_of_batch_1", 2, 40, 40, 32, torch.float32, "relative_bias"),
]


@pytest.mark.parametrize(
    "kind,B,Sq,Skv,bs,dtype,score", EMPTY_CASES, ids=[f"{c[0]}-{c[4]}-{c[5]}-{c[6]}" for c in EMPTY_CASES]
)
def test_fully_masked_rows(device, kind, B, Sq, Skv, bs, dtype, score):
    q, k, v = rand_qkv(B, 2, 2, Sq, Skv, 16, dtype=dtype, device=device, seed=31)
    mm = _empty_row_mask(kind, B, Sq, Skv, device)
    bm = hf_flex.create_block_mask(mm, B, None, Sq, Skv, device=device, BLOCK_SIZE=bs)
    sm, params = _score_case(score, 2, device) if score else (None, ())
    r = check_attention(q, k, v, sm, bm, params=params)
    assert r["n_empty"] > 0, "test setup: the case has no fully masked row"


def test_fully_masked_rows_lse_only_loss(device):
    """Backward with dout = None and dlse != 0 on a mask with empty rows: no NaN, grads agree."""
    q, k, v = rand_qkv(2, 2, 2, 70, 70, 16, device=device, seed=32)
    bm = hf_flex.create_block_mask(
        _empty_row_mask("causal&left_padding", 2, 70, 70, device), 2, None, 70, 70, device=device, BLOCK_SIZE=16
    )
    r = check_attention(q, k, v, None, bm, use_dout=True, use_dlse=False)
    assert r["n_empty"] > 0
    check_attention(q, k, v, None, bm, use_dout=False, use_dlse=True)


def test_every_row_masked(device):
    """A mask that allows nothing: out 0, lse -inf, zero gradients (not NaN)."""
    q, k, v = rand_qkv(1, 2, 2, 40, 40, 16, device=device, seed=33)
    bm = hf_flex.create_block_mask(mods.offset(mods.causal(), 0, 100), None, None, 40, 40, device=device, BLOCK_SIZE=16)
    assert bm.density() == 0.0
    out, lse = hf_flex.flex_attention(q, k, v, block_mask=bm, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()
    dq, dk, dv = torch.autograd.grad((out, lse), (q, k, v), (torch.randn_like(out), torch.randn_like(lse)))
    for g in (dq, dk, dv):
        assert torch.equal(g, torch.zeros_like(g))


# --- head dims, Dv != D ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "D,Dv,bs",
    [(64, 64, 32), (80, 80, 16), (96, 96, 32), (128, 128, 32), (256, 256, 32), (32, 16, 16), (16, 64, 32), (80, 48, 32)],
)
def test_head_dims(device, D, Dv, bs):
    q, k, v = rand_qkv(1, 2, 2, 45, 45, D, Dv, dtype=torch.float32, device=device, seed=D + Dv)
    bm = _block_mask("causal&sliding", 1, 2, 45, 45, device, bs)
    check_attention(q, k, v, None, bm)


# --- fp16 --------------------------------------------------------------------------------------------

# (mask, score, Hkv, D, Dv, BLOCK_SIZE)
FP16_CASES = [
    ("causal", None, 2, 32, 32, 32),
    ("causal&document", None, 2, 16, 16, 16),
    ("none", None, 2, 64, 64, 32),
    ("causal", "softcap", 2, 32, 32, 32),
    ("causal", "alibi", 2, 32, 32, 32),
    ("document", "relative_bias", 2, 16, 16, 32),
    ("causal&sliding", "sinks", 2, 32, 32, 16),
    ("causal", None, 1, 32, 32, 32),
    ("decode", None, 2, 80, 48, 16),
    ("causal", None, 2, 128, 128, None),
    ("causal&sliding", None, 2, 256, 256, 32),
    ("causal&padding_left", "sinks", 1, 32, 32, 16),
]


@pytest.mark.parametrize(
    "mask,score,Hkv,D,Dv,bs", FP16_CASES, ids=[f"{c[0]}-{c[1]}-hkv{c[2]}-d{c[3]}x{c[4]}" for c in FP16_CASES]
)
def test_fp16(device, mask, score, Hkv, D, Dv, bs):
    Sq = 17 if mask == "decode" else 70
    q, k, v = rand_qkv(1, 2, Hkv, Sq, 70, D, Dv, dtype=torch.float16, device=device, seed=41)
    sm, params = _score_case(score, 2, device) if score else (None, ())
    bm = _block_mask(mask, 1, 2, Sq, 70, device, bs, seed=4)
    check_attention(q, k, v, sm, bm, enable_gqa=Hkv != 2, params=params)


# --- block sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask,S,bs,dtype",
    [
        ("causal", 200, None, torch.float32),
        ("causal&document", 260, 128, torch.float32),
        ("causal&document", 260, None, torch.float16),
        ("causal", 70, (16, 32), torch.float32),
        ("document", 70, (32, 16), torch.float32),
        ("causal&padding_left", 130, (16, 32), torch.float16),
    ],
)
def test_block_sizes(device, mask, S, bs, dtype):
    q, k, v = rand_qkv(1, 1, 1, S, S, 16, dtype=dtype, device=device, seed=51)
    bm = _block_mask(mask, 1, 1, S, S, device, bs, seed=2)
    check_attention(q, k, v, None, bm)


def test_block_size_does_not_change_the_result(device):
    """The same mask with BLOCK_SIZE 16, 32 and 128 gives the same output (to fp32 rounding)."""
    q, k, v = rand_qkv(1, 2, 2, 70, 70, 16, device=device, seed=52)
    mm = mods.and_masks(mods.causal(), mods.sliding_window(20))
    outs = [
        hf_flex.flex_attention(q, k, v, block_mask=hf_flex.create_block_mask(mm, None, None, 70, 70, device=device, BLOCK_SIZE=bs))
        for bs in (16, 32, 128)
    ]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=2e-6)
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=2e-6)


# --- broadcast and per-batch / per-head block masks ---------------------------------------------------


@triton.jit
def _head_window(b, h, q, kv, base):
    return (kv <= q) & (q - kv < base * (h + 1))


def head_window(base):
    """A per-head mask: head h sees a causal window of base * (h + 1) keys."""
    return hf_flex.MaskMod(
        _head_window, lambda b, h, q, kv, base: (kv <= q) & (q - kv < base * (h + 1)), (base,), "head_window"
    )


def test_per_batch_block_mask(device):
    """document ids that differ per batch row, block mask built with B=2."""
    q, k, v = rand_qkv(2, 2, 2, 70, 70, 16, device=device, seed=61)
    ids = random_doc_ids(2, 70, seed=9).to(device)
    assert not torch.equal(ids[0], ids[1])
    bm = hf_flex.create_block_mask(mods.document(ids), 2, None, 70, 70, device=device, BLOCK_SIZE=16)
    assert bm.shape[:2] == (2, 1)
    assert not torch.equal(bm.to_dense()[0], bm.to_dense()[1])
    check_attention(q, k, v, None, bm)


def test_per_head_block_mask(device):
    """A custom MaskMod that uses h, block mask built with H=Hq, with GQA (Hq=4, Hkv=2)."""
    q, k, v = rand_qkv(1, 4, 2, 70, 70, 16, device=device, seed=62)
    bm = hf_flex.create_block_mask(head_window(8), None, 4, 70, 70, device=device, BLOCK_SIZE=16)
    assert bm.shape[:2] == (1, 4)
    check_attention(q, k, v, None, bm, enable_gqa=True)


def test_broadcast_B_equals_per_batch_when_rows_agree(device):
    """B=None and B=2 give the same result when the mask is the same for every batch row."""
    q, k, v = rand_qkv(2, 2, 2, 70, 70, 16, device=device, seed=63)
    ids = random_doc_ids(2, 70, seed=10, same_rows=True).to(device)
    mm = mods.and_masks(mods.causal(), mods.document(ids))
    b1 = hf_flex.create_block_mask(mm, None, None, 70, 70, device=device, BLOCK_SIZE=16)
    b2 = hf_flex.create_block_mask(mm, 2, 2, 70, 70, device=device, BLOCK_SIZE=16)
    o1 = hf_flex.flex_attention(q, k, v, block_mask=b1)
    o2 = hf_flex.flex_attention(q, k, v, block_mask=b2)
    torch.testing.assert_close(o1, o2, rtol=0, atol=1e-6)
    check_attention(q, k, v, None, b1)


def test_broadcast_B_with_per_batch_mask_mod(device):
    """Block mask built with B=None for a mask_mod that differs per batch row.

    Documented semantics (create_block_mask: "None broadcasts (the mask_mod then sees b = 0)";
    reference.attention's mask_bh): every batch row uses row 0's mask. The kernel must agree with the
    reference (and with flex_attention's own CPU path, which is that reference).
    """
    q, k, v = rand_qkv(2, 2, 2, 70, 70, 16, device=device, seed=64)
    ids = random_doc_ids(2, 70, seed=9).to(device)
    assert not torch.equal(ids[0], ids[1])
    bm = hf_flex.create_block_mask(
        mods.and_masks(mods.causal(), mods.document(ids)), None, None, 70, 70, device=device, BLOCK_SIZE=16
    )
    check_attention(q, k, v, None, bm)


def test_broadcast_H_with_per_head_mask_mod(device):
    """Block mask built with H=None for a per-head mask_mod: every head uses head 0's mask."""
    q, k, v = rand_qkv(1, 4, 4, 70, 70, 16, device=device, seed=65)
    bm = hf_flex.create_block_mask(head_window(8), None, None, 70, 70, device=device, BLOCK_SIZE=16)
    check_attention(q, k, v, None, bm)


# --- misc: scale, strides, determinism ---------------------------------------------------------------


def test_custom_scale(device):
    q, k, v = rand_qkv(1, 2, 2, 70, 70, 32, device=device, seed=71)
    bm = _block_mask("causal", 1, 2, 70, 70, device, 32)
    check_attention(q, k, v, mods.softcap(5.0), bm, scale=0.7)


def test_non_contiguous_inputs(device):
    """Transformers' layout [B, S, H, D] transposed to [B, H, S, D], and a v with a non-unit last stride."""
    g = torch.Generator().manual_seed(72)
    q = torch.randn(1, 70, 2, 32, generator=g).to(device).transpose(1, 2).detach().requires_grad_()
    k = torch.randn(1, 70, 2, 32, generator=g).to(device).transpose(1, 2).detach().requires_grad_()
    v = torch.randn(1, 2, 32, 70, generator=g).to(device).transpose(2, 3).detach().requires_grad_()
    assert not q.is_contiguous() and v.stride(-1) != 1
    bm = _block_mask("causal&sliding", 1, 2, 70, 70, device, 32)
    check_attention(q, k, v, None, bm)


def test_output_follows_the_query_layout(device):
    """q seen as a transposed [B, S, H, D] gives out in that layout (Transformers transposes it back for
    free, and autograd keeps no second copy); a contiguous q gives a contiguous out; same values."""
    g = torch.Generator().manual_seed(73)
    q, k, v = (torch.randn(2, 70, 4, 32, generator=g).to(device).transpose(1, 2) for _ in range(3))
    bm = _block_mask("causal", 2, 4, 70, 70, device, 32)
    out = hf_flex.flex_attention(q, k, v, None, bm)
    assert out.shape == (2, 4, 70, 32) and out.transpose(1, 2).is_contiguous()
    out_c = hf_flex.flex_attention(q.contiguous(), k.contiguous(), v.contiguous(), None, bm)
    assert out_c.is_contiguous()
    assert torch.equal(out, out_c)
    check_attention(*(t.detach().requires_grad_() for t in (q, k, v)), None, bm)


def test_deterministic(device):
    """Two runs give bitwise-identical out, lse and dq/dk/dv (no atomics on them)."""
    q, k, v = rand_qkv(1, 4, 2, 70, 70, 16, device=device, seed=73)
    bm = _block_mask("causal&document", 1, 4, 70, 70, device, 16)
    res = []
    for _ in range(2):
        out, lse = hf_flex.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True)
        g = torch.Generator().manual_seed(0)
        do = torch.randn(out.shape, generator=g).to(device)
        res.append((out, lse) + torch.autograd.grad(out, (q, k, v), do))
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_outputs_do_not_depend_on_garbage(device):
    """Poisoned memory around the inputs (padding rows past Sq/Skv in a larger buffer) does not leak."""
    g = torch.Generator().manual_seed(74)
    big = [torch.randn(1, 2, 96, 32, generator=g).to(device) for _ in range(3)]
    for t in big:
        t[:, :, 70:] = float("nan")
    q, k, v = (t[:, :, :70].detach().requires_grad_() for t in big)
    bm = _block_mask("causal", 1, 2, 70, 70, device, 32)
    check_attention(q, k, v, None, bm)
