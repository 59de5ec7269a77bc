"""Each mod's Triton function against its PyTorch twin, on random positions.

Tiny @triton.jit test kernels evaluate a mod's kernel form (``mod.kernel_fn(b, h, q, kv, args)``, the
exact function the attention kernels inline) on a [BQ, BK] grid of random query / key positions loaded
from tensors, for given b and h, and store the result; the twin runs on the same positions as int64
tensors. Masks must agree exactly; scores and their derivatives to float32 rounding (softcap's tanh is
computed differently on the two sides). Also: user-defined mods, the combinators' caching (same Triton
function whatever the values, so changing values never recompiles), and end-to-end use of user mods.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import hf_flex
from hf_flex import mods
from hf_flex.dispatch import triton_runs_on
from hf_flex.kernels import interpreted
from helpers import check_attention, make_param, rand_qkv, random_doc_ids

BQ, BK = 16, 32


@triton.jit
def _eval_mask_kernel(Q, KV, OUT, b, h, args, MASK: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr):
    rq = tl.arange(0, BQ)
    rk = tl.arange(0, BK)
    q = tl.load(Q + rq)[:, None]
    kv = tl.load(KV + rk)[None, :]
    allowed = MASK(b, h, q, kv, args)
    # broadcast to the tile (a mod may depend on q only or kv only)
    allowed = allowed & (q >= 0) & (kv >= 0)
    tl.store(OUT + rq[:, None] * BK + rk[None, :], allowed.to(tl.int8))


@triton.jit
def _eval_score_kernel(S, DS, Q, KV, OUT, DOUT, b, h, args, SCORE: tl.constexpr, GRAD: tl.constexpr,
                       BQ: tl.constexpr, BK: tl.constexpr):
    rq = tl.arange(0, BQ)
    rk = tl.arange(0, BK)
    q = tl.load(Q + rq)[:, None]
    kv = tl.load(KV + rk)[None, :]
    offs = rq[:, None] * BK + rk[None, :]
    s = tl.load(S + offs)
    ds = tl.load(DS + offs)
    tl.store(OUT + offs, SCORE(s, b, h, q, kv, args))
    if GRAD is not None:
        tl.store(DOUT + offs, GRAD(s, ds, b, h, q, kv, args))


@triton.jit
def _eval_param_grad_kernel(S, DS, Q, KV, b, h, args, grads, PGRAD: tl.constexpr, BQ: tl.constexpr,
                            BK: tl.constexpr):
    rq = tl.arange(0, BQ)
    rk = tl.arange(0, BK)
    q = tl.load(Q + rq)[:, None]
    kv = tl.load(KV + rk)[None, :]
    offs = rq[:, None] * BK + rk[None, :]
    PGRAD(tl.load(S + offs), tl.load(DS + offs), b, h, q, kv, args, grads)


def _positions(n, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, hi, (n,), generator=g, dtype=torch.int32)


def _idx(b, h, qp, kp, device):
    """The twin's broadcasting index tensors (int64), as the reference builds them."""
    return (
        torch.full((1, 1), b, dtype=torch.int64, device=device),
        torch.full((1, 1), h, dtype=torch.int64, device=device),
        qp.long().view(-1, 1),
        kp.long().view(1, -1),
    )


def eval_mask(mm: hf_flex.MaskMod, b, h, qp, kp, device, by_key=False):
    """(kernel result, twin result), both [BQ, BK] bool; by_key: the form the dK/dV pass calls."""
    qp, kp = qp.to(device), kp.to(device)
    out = torch.full((BQ, BK), 7, dtype=torch.int8, device=device)  # poison: 7 is neither 0 nor 1
    fn = mm.kernel_fn_by_key if by_key else mm.kernel_fn
    _eval_mask_kernel[(1,)](qp, kp, out, b, h, mm.args, MASK=fn, BQ=BQ, BK=BK)
    assert ((out == 0) | (out == 1)).all(), "the test kernel did not write every element"
    twin = mm(*_idx(b, h, qp, kp, device)).expand(BQ, BK)
    return out.bool(), twin


def eval_score(sm: hf_flex.ScoreMod, b, h, qp, kp, device, seed=0, scale=3.0):
    """(kernel score, twin score, kernel d/ds, autograd d/ds of the twin), float32 [BQ, BK]."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(BQ, BK, generator=g) * scale).to(device)
    ds = torch.randn(BQ, BK, generator=g).to(device)
    qp, kp = qp.to(device), kp.to(device)
    out = torch.full((BQ, BK), float("nan"), device=device)
    dout = torch.full((BQ, BK), float("nan"), device=device)
    grad = sm.kernel_grad_fn
    _eval_score_kernel[(1,)](s, ds, qp, kp, out, dout, b, h, sm.args, SCORE=sm.kernel_fn, GRAD=grad, BQ=BQ, BK=BK)
    if grad is None:  # documented: no grad_fn means the mod only adds to s (derivative 1)
        dout = ds.clone()
    s_t = s.clone().requires_grad_()
    twin = sm(s_t, *_idx(b, h, qp, kp, device))
    (dtwin,) = torch.autograd.grad(twin, s_t, ds)
    return out, twin.detach(), dout, dtwin


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6, msg=lambda m: f"{what}: {m}")


# --- masks -------------------------------------------------------------------------------------------

B_IDS, S_IDS = 3, 90


def _ids(device):
    return random_doc_ids(B_IDS, S_IDS, seed=3, max_docs=8).to(device)


def _valid(device):
    g = torch.Generator().manual_seed(4)
    return (torch.rand(B_IDS, S_IDS, generator=g) > 0.3).to(device)


MASKS = {
    "noop": lambda d: mods.noop(),
    "causal": lambda d: mods.causal(),
    "sliding_window": lambda d: mods.sliding_window(13),
    "chunked": lambda d: mods.chunked(17),
    "prefix_lm": lambda d: mods.prefix_lm(20),
    "prefix_lm(0)": lambda d: mods.prefix_lm(0),
    "document": lambda d: mods.document(_ids(d)),
    "document_int64": lambda d: mods.document(_ids(d).long()),
    "document_int16": lambda d: mods.document(_ids(d).to(torch.int16)),
    # packed ids take the span form (_packed_document), the others the ids' form (_document)
    "document(packed=False)": lambda d: mods.document(_ids(d), packed=False),
    "document(unsorted)": lambda d: mods.document(_ids(d) % 2),
    "padding_bool": lambda d: mods.padding(_valid(d)),
    "padding_int": lambda d: mods.padding(_valid(d).to(torch.int64) * 5),
    "and(causal,sliding)": lambda d: mods.and_masks(mods.causal(), mods.sliding_window(9)),
    "and(causal,document,padding)": lambda d: mods.and_masks(mods.causal(), mods.document(_ids(d)), mods.padding(_valid(d))),
    "or(sliding,chunked)": lambda d: mods.or_masks(mods.sliding_window(5), mods.chunked(16)),
    "or(and(causal,sliding),prefix)": lambda d: mods.or_masks(
        mods.and_masks(mods.causal(), mods.sliding_window(4)), mods.prefix_lm(10)
    ),
    "offset(causal)": lambda d: mods.offset(mods.causal(), 30, 0),
    "offset(causal,kv)": lambda d: mods.offset(mods.causal(), 0, 11),
    "offset(document)": lambda d: mods.offset(mods.document(_ids(d)), 5, 2),
    "offset(and(causal,chunked))": lambda d: mods.offset(mods.and_masks(mods.causal(), mods.chunked(8)), 7, 3),
    "offset(tensor offsets)": lambda d: mods.offset(mods.causal(), torch.tensor(4), torch.tensor(1)),
    "and(offset,or)": lambda d: mods.and_masks(
        mods.offset(mods.sliding_window(6), 2, 0), mods.or_masks(mods.causal(), mods.document(_ids(d)))
    ),
    "single and": lambda d: mods.and_masks(mods.chunked(5)),
    # packed documents under a causal mask take their one-bound forms (mods._packed_document_under_causal)
    "and(causal,document)": lambda d: mods.and_masks(mods.causal(), mods.document(_ids(d))),
    "and(document,causal)": lambda d: mods.and_masks(mods.document(_ids(d)), mods.causal()),
    "and(and(causal,sliding),document)": lambda d: mods.and_masks(
        mods.and_masks(mods.causal(), mods.sliding_window(7)), mods.document(_ids(d))
    ),
    "and(sliding,document)": lambda d: mods.and_masks(mods.sliding_window(7), mods.document(_ids(d))),
    "offset(and(causal,document))": lambda d: mods.offset(mods.and_masks(mods.causal(), mods.document(_ids(d))), 4, 1),
    # siblings built by the same combinator: compiled, they must stay two functions (Triton compiles
    # called functions by name; same-named siblings once ran the first body for both)
    "and(offset(sliding),offset(chunked))": lambda d: mods.and_masks(
        mods.offset(mods.sliding_window(6), 0, 0), mods.offset(mods.chunked(8), 0, 0)
    ),
    "and(and(causal),and(and(sliding)))": lambda d: mods.and_masks(
        mods.and_masks(mods.causal()), mods.and_masks(mods.and_masks(mods.sliding_window(5)))
    ),
}


@pytest.mark.parametrize("by_key", [False, True], ids=["by_query", "by_key"])
@pytest.mark.parametrize("name", list(MASKS))
def test_mask_kernel_fn_matches_twin(device, name, by_key):
    """Both forms of every mask (kernel_fn, and kernel_fn_by_key, which the dK/dV pass calls) equal
    the PyTorch twin at random positions, past the tensors' ends included."""
    assert triton_runs_on(device)
    mm = MASKS[name](device)
    for trial, (b, h) in enumerate([(0, 0), (1, 3), (2, 1)]):
        # positions up to S_IDS + 10: past the ids' end both sides read the documented fill value
        qp = _positions(BQ, S_IDS + 10, seed=10 * trial + 1)
        kp = _positions(BK, S_IDS + 10, seed=10 * trial + 2)
        got, want = eval_mask(mm, b, h, qp, kp, device, by_key)
        assert got.dtype == want.dtype == torch.bool
        n_bad = int((got != want).sum())
        assert n_bad == 0, f"{mm.name}: {n_bad} of {got.numel()} positions differ (b={b}, h={h})"


@pytest.mark.parametrize(
    "name,expect",
    [
        ("causal", lambda b, h, q, kv: kv <= q),
        ("sliding_window", lambda b, h, q, kv: q - 13 < kv),
        ("chunked", lambda b, h, q, kv: q // 17 == kv // 17),
        ("prefix_lm", lambda b, h, q, kv: (kv < 20) | (kv <= q)),
        ("offset(causal)", lambda b, h, q, kv: kv <= q + 30),
        ("offset(causal,kv)", lambda b, h, q, kv: kv + 11 <= q),
        ("and(causal,sliding)", lambda b, h, q, kv: (kv <= q) & (q - 9 < kv)),
        ("or(sliding,chunked)", lambda b, h, q, kv: (q - 5 < kv) | (q // 16 == kv // 16)),
    ],
)
def test_mask_semantics(device, name, expect):
    """The documented formulas (DESIGN.md), written out independently of the twins."""
    mm = MASKS[name](device)
    qp, kp = _positions(BQ, 80, 5), _positions(BK, 80, 6)
    got, _ = eval_mask(mm, 0, 0, qp, kp, device)
    want = expect(0, 0, qp.long().view(-1, 1), kp.long().view(1, -1)).to(device)
    assert torch.equal(got, want)


def test_document_and_padding_semantics(device):
    ids, valid = _ids(device), _valid(device)
    qp, kp = _positions(BQ, S_IDS, 7), _positions(BK, S_IDS, 8)
    q, kv = qp.long().to(device), kp.long().to(device)
    for b in range(B_IDS):
        got, _ = eval_mask(mods.document(ids), b, 0, qp, kp, device)
        assert torch.equal(got, ids[b, q][:, None] == ids[b, kv][None, :])
        got, _ = eval_mask(mods.padding(valid), b, 0, qp, kp, device)
        assert torch.equal(got, valid[b, kv][None, :].expand(BQ, BK))


# --- score mods --------------------------------------------------------------------------------------

H = 4


def _slopes(device, rg=False):
    return make_param((H,), 31, 0.3, device, "slopes").requires_grad_(rg)


def _table(device, L=7, rg=False):
    return make_param((H, 2 * L - 1), 32, 1.0, device, "table").requires_grad_(rg)


SCORES = {
    "softcap": lambda d: mods.softcap(2.5),
    "softcap_int_cap": lambda d: mods.softcap(4),
    "alibi": lambda d: mods.alibi(_slopes(d)),
    "alibi_fp16_slopes": lambda d: mods.alibi(_slopes(d).detach().half()),
    "relative_bias": lambda d: mods.relative_bias(_table(d)),
    "relative_bias_L1": lambda d: mods.relative_bias(_table(d, L=1)),
    "chain(softcap,alibi)": lambda d: mods.chain(mods.softcap(2.0), mods.alibi(_slopes(d))),
    "chain(alibi,softcap)": lambda d: mods.chain(mods.alibi(_slopes(d)), mods.softcap(2.0)),
    "chain(softcap,softcap)": lambda d: mods.chain(mods.softcap(5.0), mods.softcap(1.0)),
    "chain(relative_bias,softcap,alibi)": lambda d: mods.chain(
        mods.relative_bias(_table(d)), mods.softcap(3.0), mods.alibi(_slopes(d))
    ),
    "chain(softcap,sinks)": lambda d: mods.chain(mods.softcap(2.0), mods.sinks(torch.zeros(H, device=d))),
    "chain(single)": lambda d: mods.chain(mods.relative_bias(_table(d))),
}


@pytest.mark.parametrize("name", list(SCORES))
def test_score_kernel_fn_matches_twin(device, name):
    assert triton_runs_on(device)
    sm = SCORES[name](device)
    for trial, (b, h) in enumerate([(0, 0), (1, 3), (0, 2)]):
        qp = _positions(BQ, 60, seed=10 * trial + 1)
        kp = _positions(BK, 60, seed=10 * trial + 2)
        out, twin, dout, dtwin = eval_score(sm, b, h, qp, kp, device, seed=trial)
        _close(out, twin, f"{sm.name} score (b={b}, h={h})")
        _close(dout, dtwin, f"{sm.name} d/ds (b={b}, h={h})")


@pytest.mark.parametrize(
    "name,expect",
    [
        ("softcap", lambda s, h, q, kv, d: 2.5 * torch.tanh(s / 2.5)),
        ("alibi", lambda s, h, q, kv, d: s + _slopes(d).detach()[h] * (kv - q)),
        ("relative_bias", lambda s, h, q, kv, d: s + _table(d).detach()[h, (kv - q + 6).clamp(0, 12)]),
        ("chain(softcap,alibi)", lambda s, h, q, kv, d: 2.0 * torch.tanh(s / 2.0) + _slopes(d).detach()[h] * (kv - q)),
        ("chain(alibi,softcap)", lambda s, h, q, kv, d: 2.0 * torch.tanh((s + _slopes(d).detach()[h] * (kv - q)) / 2.0)),
    ],
)
def test_score_semantics(device, name, expect):
    """The documented formulas, written out independently of the twins (order of chain included)."""
    sm = SCORES[name](device)
    qp, kp = _positions(BQ, 60, 3), _positions(BK, 60, 4)
    h = 2
    out, _, _, _ = eval_score(sm, 0, h, qp, kp, device, seed=9)
    g = torch.Generator().manual_seed(9)
    s = (torch.randn(BQ, BK, generator=g) * 3.0).to(device)
    want = expect(s, h, qp.long().view(-1, 1).to(device), kp.long().view(1, -1).to(device), device)
    _close(out, want.float(), name)


def test_sinks_has_no_elementwise_part(device):
    sk = mods.sinks(torch.randn(H, device=device))
    assert not sk.has_elementwise and sk.sink is not None
    s = torch.randn(3, 3, device=device)
    assert torch.equal(sk(s, 0, 0, 0, 0), s)
    ch = mods.chain(mods.softcap(2.0), sk)
    assert ch.sink is sk.sink and ch.has_elementwise


# --- learnable tensors: param_grad_fn vs autograd of the twin ------------------------------------------

PARAM_SCORES = {
    "alibi": lambda d: mods.alibi(_slopes(d, rg=True)),
    "relative_bias": lambda d: mods.relative_bias(_table(d, rg=True)),
    "relative_bias_L3": lambda d: mods.relative_bias(_table(d, L=3, rg=True)),  # heavy clamping: many duplicates
    "chain(softcap,relative_bias)": lambda d: mods.chain(mods.softcap(2.0), mods.relative_bias(_table(d, rg=True))),
    "chain(relative_bias,softcap,alibi)": lambda d: mods.chain(
        mods.relative_bias(_table(d, rg=True)), mods.softcap(3.0), mods.alibi(_slopes(d, rg=True))
    ),
    "chain(alibi,softcap,relative_bias)": lambda d: mods.chain(
        mods.alibi(_slopes(d, rg=True)), mods.softcap(3.0), mods.relative_bias(_table(d, rg=True))
    ),
}


@pytest.mark.parametrize("name", list(PARAM_SCORES))
def test_param_grad_fn_matches_autograd(device, name):
    sm = PARAM_SCORES[name](device)
    params = sm.learnable_tensors()
    assert params and all(p.requires_grad for p in params) and sm.needs_param_grad()
    b, h = 1, 2
    qp, kp = _positions(BQ, 50, 41), _positions(BK, 50, 42)
    g = torch.Generator().manual_seed(43)
    s = (torch.randn(BQ, BK, generator=g) * 3.0).to(device)
    ds = torch.randn(BQ, BK, generator=g).to(device)
    grads = tuple(torch.zeros(p.shape, dtype=torch.float64, device=device) for p in params)  # as the backward allocates them
    _eval_param_grad_kernel[(1,)](
        s, ds, qp.to(device), kp.to(device), b, h, sm.args, grads, PGRAD=sm.kernel_param_grad_fn, BQ=BQ, BK=BK
    )
    twin = sm(s, *_idx(b, h, qp.to(device), kp.to(device), device))
    want = torch.autograd.grad(twin, params, ds)
    for p, got, w in zip(params, grads, want):
        assert w.abs().sum() > 0, "test setup: zero expected gradient"
        torch.testing.assert_close(got, w.double(), rtol=1e-5, atol=1e-5)
        # only head h may receive gradient
        others = [i for i in range(H) if i != h]
        assert (got[others] == 0).all()


# --- user-defined mods -------------------------------------------------------------------------------


@triton.jit
def _every_other(b, h, q, kv):
    return (kv <= q) & ((q - kv) % 2 == 0)


def every_other():
    return hf_flex.MaskMod(_every_other, lambda b, h, q, kv: (kv <= q) & ((q - kv) % 2 == 0), (), "every_other")


@triton.jit
def _scaled(s, b, h, q, kv, factor):
    return s * factor


@triton.jit
def _scaled_grad(s, ds, b, h, q, kv, factor):
    return ds * factor


def scaled(factor: float):
    """score * factor, with its derivative."""
    return hf_flex.ScoreMod(_scaled, lambda s, b, h, q, kv, f: s * f, (factor,), "scaled", grad_fn=_scaled_grad)


@triton.jit
def _head_bias(s, b, h, q, kv, bias):
    return s + tl.load(bias + h).to(tl.float32)


@triton.jit
def _head_bias_param_grad(s, ds, b, h, q, kv, bias, g_bias):
    tl.atomic_add(g_bias + h, tl.sum(tl.sum(ds, 1), 0))


def head_bias(bias):
    """score + bias[h], learnable."""
    return hf_flex.ScoreMod(
        _head_bias, lambda s, b, h, q, kv, t: s + t[h].to(s.dtype), (bias,), "head_bias",
        param_grad_fn=_head_bias_param_grad, learnable=(0,),
    )


def test_user_mask_mod(device):
    mm = every_other()
    qp, kp = _positions(BQ, 40, 51), _positions(BK, 40, 52)
    got, want = eval_mask(mm, 0, 0, qp, kp, device)
    assert torch.equal(got, want)
    assert torch.equal(got, ((kp.view(1, -1) <= qp.view(-1, 1)) & ((qp.view(-1, 1) - kp.view(1, -1)) % 2 == 0)).to(device))
    combo = mods.and_masks(mm, mods.sliding_window(6))
    got, want = eval_mask(combo, 0, 0, qp, kp, device)
    assert torch.equal(got, want)


def test_user_score_mod(device):
    sm = scaled(0.5)
    qp, kp = _positions(BQ, 40, 53), _positions(BK, 40, 54)
    out, twin, dout, dtwin = eval_score(sm, 0, 1, qp, kp, device)
    _close(out, twin, "scaled")
    _close(dout, dtwin, "scaled d/ds")
    out, twin, dout, dtwin = eval_score(mods.chain(sm, mods.softcap(1.0)), 0, 1, qp, kp, device)
    _close(out, twin, "chain(scaled, softcap)")
    _close(dout, dtwin, "chain(scaled, softcap) d/ds")


def test_user_mods_end_to_end(device):
    """A user mask, a user score mod with a derivative and a user learnable score mod, through the kernels."""
    q, k, v = rand_qkv(1, 2, 2, 40, 40, 16, device=device, seed=55)
    bias = make_param((2,), 56, 1.0, device, "head_bias")
    sm = mods.chain(scaled(1.7), mods.softcap(2.0), head_bias(bias))
    bm = hf_flex.create_block_mask(every_other(), None, None, 40, 40, device=device, BLOCK_SIZE=16)
    check_attention(q, k, v, sm, bm, params=(bias,))


# --- caching: same structure -> same Triton function (values never recompile) --------------------------


def test_same_combination_same_triton_fn():
    a = mods.and_masks(mods.causal(), mods.sliding_window(8))
    b = mods.and_masks(mods.causal(), mods.sliding_window(16))
    assert a.triton_fn is b.triton_fn
    assert a.kernel_fn is b.kernel_fn
    assert a.args != b.args
    assert mods.or_masks(mods.causal(), mods.chunked(4)).triton_fn is mods.or_masks(mods.causal(), mods.chunked(9)).triton_fn
    assert mods.offset(mods.causal(), 3, 0).triton_fn is mods.offset(mods.causal(), 9, 2).triton_fn
    d1 = mods.document(random_doc_ids(2, 30, seed=1))
    d2 = mods.document(random_doc_ids(3, 50, seed=2))
    assert d1.kernel_fn is d2.kernel_fn
    n1 = mods.and_masks(mods.offset(mods.and_masks(mods.causal(), d1), 1, 2), mods.padding(torch.ones(2, 30, dtype=torch.bool)))
    n2 = mods.and_masks(mods.offset(mods.and_masks(mods.causal(), d2), 5, 0), mods.padding(torch.ones(3, 50, dtype=torch.bool)))
    assert n1.kernel_fn is n2.kernel_fn


def test_different_structure_different_triton_fn():
    a = mods.and_masks(mods.causal(), mods.sliding_window(8))
    assert a.triton_fn is not mods.or_masks(mods.causal(), mods.sliding_window(8)).triton_fn
    assert a.triton_fn is not mods.and_masks(mods.sliding_window(8), mods.causal()).triton_fn
    assert a.triton_fn is not mods.and_masks(mods.causal(), mods.chunked(8)).triton_fn


def test_same_chain_same_triton_fn():
    s1, s2 = torch.randn(H), torch.randn(H)
    c1 = mods.chain(mods.softcap(1.0), mods.alibi(s1))
    c2 = mods.chain(mods.softcap(30.0), mods.alibi(s2))
    assert c1.triton_fn is c2.triton_fn and c1.kernel_fn is c2.kernel_fn
    assert c1.kernel_grad_fn is c2.kernel_grad_fn
    t1 = torch.randn(H, 5, requires_grad=True)
    t2 = torch.randn(H, 9, requires_grad=True)
    r1 = mods.chain(mods.relative_bias(t1), mods.softcap(2.0))
    r2 = mods.chain(mods.relative_bias(t2), mods.softcap(7.0))
    assert r1.kernel_param_grad_fn is r2.kernel_param_grad_fn
    assert mods.softcap(1.0).kernel_fn is mods.softcap(2.0).kernel_fn


def test_generated_functions_have_distinct_names():
    """Triton compiles a called function once per kernel by module + name: every generated function
    needs its own name, or one body runs for two functions."""
    combos = [
        mods.offset(mods.sliding_window(6), 0, 0), mods.offset(mods.chunked(8), 0, 0),
        mods.and_masks(mods.causal()), mods.and_masks(mods.sliding_window(3)),
        mods.or_masks(mods.causal()), mods.remap(mods.causal(), torch.zeros(1, 4, dtype=torch.int32)),
    ]
    fns = {m.triton_fn for m in combos}
    names = {f"{f.fn.__module__}.{f.fn.__qualname__}" for f in fns}
    assert len(fns) == len(combos) and len(names) == len(fns)


def _same_named_mask():
    @triton.jit
    def same_name(b, h, q, kv):
        return kv <= q

    return hf_flex.MaskMod(same_name, lambda b, h, q, kv: kv <= q, (), "same_name")


def test_two_user_functions_with_one_name_are_refused():
    a, b = _same_named_mask(), _same_named_mask()
    with pytest.raises(ValueError, match="both named"):
        mods.and_masks(a, b)
    with pytest.raises(ValueError, match="both named"):
        mods.or_masks(mods.offset(a, 1, 0), mods.and_masks(b, mods.causal()))
    mods.and_masks(a, mods.offset(a, 1, 0))  # one function used twice is fine


def test_changing_values_changes_results(device):
    """The cached function really reads the values as arguments (not baked in at first compile)."""
    a = mods.and_masks(mods.causal(), mods.sliding_window(3))
    b = mods.and_masks(mods.causal(), mods.sliding_window(11))
    qp, kp = _positions(BQ, 40, 61), _positions(BK, 40, 62)
    ga, wa = eval_mask(a, 0, 0, qp, kp, device)
    gb, wb = eval_mask(b, 0, 0, qp, kp, device)
    assert torch.equal(ga, wa) and torch.equal(gb, wb) and not torch.equal(ga, gb)


def test_mod_reprs_and_args():
    mm = mods.and_masks(mods.causal(), mods.sliding_window(8))
    assert "causal" in repr(mm) and "sliding_window(8)" in repr(mm)
    assert mm.args == (8,)
    assert mods.offset(mods.causal(), 2, 3).args[:2] == (2, 3)
    assert "softcap" in repr(mods.softcap(3.0))
    ids = random_doc_ids(2, 10, seed=0)
    assert mods.document(ids).tensors()[0].dtype == torch.int32


def test_softcap_approx_form_and_its_choice():
    """softcap carries an approximate form (tanh.approx.f32) with the same args; chains of mods carry
    one when any member has one; the kernels take it only for 16-bit inputs on the GPU."""
    from hf_flex.autograd import KernelSpec
    from hf_flex.modtypes import ScoreMod

    sc = mods.softcap(30.0)
    assert sc.approx is not None and sc.approx.args == sc.args and sc.approx.grad_fn is not None
    slopes = torch.tensor([0.1, 0.2])
    ch = mods.chain(mods.softcap(3.0), mods.alibi(slopes))
    assert ch.approx is not None and len(ch.approx.args) == len(ch.args)
    assert ch.approx.args[0] == ch.args[0] and ch.approx.args[1] is ch.args[1]
    assert mods.chain(mods.alibi(slopes)).approx is None
    bm = hf_flex.create_block_mask(mods.causal(), None, None, 32, 32, device="cpu", BLOCK_SIZE=16)
    spec = KernelSpec(bm, sc, 1.0)
    assert spec.elementwise(torch.zeros(1, dtype=torch.float32)) is sc  # fp32: exact
    # 16-bit on the CPU runs under Triton's interpreter (or the PyTorch path): exact there too, also on
    # a machine with a GPU (this test once assumed CPU meant interpreted and failed there)
    assert spec.elementwise(torch.zeros(1, dtype=torch.bfloat16)) is sc
    if torch.cuda.is_available() and not interpreted():
        assert spec.elementwise(torch.zeros(1, dtype=torch.bfloat16, device="cuda")) is sc.approx
        assert spec.elementwise(torch.zeros(1, dtype=torch.float32, device="cuda")) is sc
    two_args = ScoreMod(sc.triton_fn, sc.torch_fn, (1.0, 2.0), "two args")
    with pytest.raises(ValueError, match="approx"):
        ScoreMod(sc.triton_fn, sc.torch_fn, (1.0,), "bad", approx=two_args)


def test_packed_document_forms(device):
    """Which Triton functions the packed document mask runs: by query in the forward and dQ passes, by
    key (the keys' spans, loaded once per dK/dV program) in the dK/dV pass; under a causal mask, at
    any depth of and_masks, the one-bound forms; without one, the two-bound forms."""
    doc = mods.document(_ids(device))
    assert (doc.triton_fn, doc.by_key_fn) == (mods._packed_document, mods._packed_document_by_key)

    def child_fns(mm):
        # the and-combination's generated function calls its children as c0, c1, ...
        env = mm.triton_fn.fn.__globals__ if hasattr(mm.triton_fn, "fn") else mm.triton_fn.__globals__
        env_k = mm.by_key_fn.fn.__globals__ if hasattr(mm.by_key_fn, "fn") else mm.by_key_fn.__globals__
        return {env.get(f"c{i}") for i in range(4)}, {env_k.get(f"c{i}") for i in range(4)}

    under = mods.and_masks(mods.and_masks(mods.causal(), mods.sliding_window(5)), doc)
    q_fns, k_fns = child_fns(under)
    assert mods._packed_document_under_causal in q_fns and mods._packed_document_under_causal_by_key in k_fns
    plain = mods.and_masks(mods.sliding_window(5), doc)
    q_fns, k_fns = child_fns(plain)
    assert mods._packed_document in q_fns and mods._packed_document_by_key in k_fns
    assert doc.triton_fn is mods._packed_document  # the caller's mask itself is left as it was
