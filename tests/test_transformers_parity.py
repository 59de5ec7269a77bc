"""attn_implementation="flex" against "eager", same weights, on tiny random-init models of each family.

User-facing behaviour only: after ``import hf_flex``, ``AutoModelForCausalLM.from_config(cfg,
attn_implementation="flex")`` (or ``model.set_attn_implementation("flex")``) must give eager's results:

- logits on right- and left-padded batches (compared at real tokens only);
- a packed row (DataCollatorWithFlattening: documents concatenated, position_ids restarting at 0, no
  attention_mask) against each document run alone under eager, at every position, with use_cache=False
  and with use_cache=True (Transformers then skips packing detection; flex must still separate documents);
- the packed loss and every parameter's gradient against an eager right-padded batch of the same
  documents (see test_packed_loss_and_grads for the normalisation);
- greedy generation with DynamicCache and StaticCache on a left-padded batch of 2 prompts;
- set_attn_implementation both ways.

Families and their configs: tests/transformers_models.py. Every test also checks, through a spy on the
registered attention function, that the flex path really ran (a model silently left on eager passes
nothing). Set HF_FLEX_PARITY_LOG=<file> to get one line per comparison with its max error.

Under TRITON_INTERPRET=1 (CPU, tests/conftest.py) the kernels run in Triton's interpreter: inputs are
kept short (<= 48 tokens, batch <= 2).
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

pytest.importorskip("transformers")

import hf_flex  # noqa: F401  (registers "flex" with Transformers)
import transformers_models as tm
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

IMPL = "flex"
LOGITS_ATOL = 1e-4  # fp32 logits (std ~1.6); eager vs eager reorderings alone reach ~2e-5
LOSS_ATOL = 1e-5
GRAD_RTOL = 1e-4  # per parameter: max|g - g_ref| / max|g_ref| (floored, see _grad_err)

FAMILIES = list(tm.FAMILIES)


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) % (2**31)


def _log(key: str, value: float) -> None:
    path = os.environ.get("HF_FLEX_PARITY_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{key}\t{value:.3e}\n")


def _max_err(got: torch.Tensor, ref: torch.Tensor):
    """(max abs error, index of it) between two same-shaped tensors; NaN counts as infinite."""
    diff = (got.double() - ref.double()).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    flat = int(diff.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    return float(diff.max()), idx


def _assert_close(key, got, ref, atol, where=""):
    assert got.shape == ref.shape, f"{key}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err, idx = _max_err(got, ref)
    _log(key, err)
    assert err <= atol, f"{key}: max abs error {err:.3e} > {atol:.0e} at {where}{idx}"
    return err


@pytest.fixture
def impl_calls():
    """Counts calls of the registered IMPL attention function (wrapped through the public registry).

    When IMPL is not registered, nothing is wrapped: from_config then fails with Transformers' own
    "not supported" error, which is the right failure.
    """
    calls = {"n": 0}
    if IMPL not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        yield calls
        return
    orig = ALL_ATTENTION_FUNCTIONS[IMPL]

    def spy(*args, **kwargs):
        calls["n"] += 1
        return orig(*args, **kwargs)

    AttentionInterface.register(IMPL, spy)
    try:
        yield calls
    finally:
        AttentionInterface.register(IMPL, orig)


def _pair(name, device, seed=0):
    fam = tm.family(name)
    eager, other = tm.build_pair(fam, IMPL, seed=seed, device=device)
    return fam, eager, other


# --------------------------------------------------------------------------------------------------
# Padded batches


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", FAMILIES)
def test_padded_logits(name, side, device, impl_calls):
    fam, eager, flex = _pair(name, device)
    seed = _seed(name, "padded", side)
    lengths = tm.random_lengths(seed, 2, 20, 36)  # two different lengths: one row is padded
    ids, mask, pos = tm.pad_batch(tm.random_docs(seed, lengths), side)
    kw = dict(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    if pos is not None:
        kw["position_ids"] = pos.to(device)
    with torch.no_grad():
        ref = eager(**kw).logits
        got = flex(**kw).logits
    assert impl_calls["n"] >= eager.config.num_hidden_layers
    assert torch.isfinite(got).all(), f"{name}/{side}: non-finite logits (padding positions included)"
    real = mask.bool().to(device)
    _assert_close(f"{name}/padded-{side}", got[real], ref[real], LOGITS_ATOL, "real token #")


# --------------------------------------------------------------------------------------------------
# Packed rows


def _packed_docs(name, scenario):
    seed = _seed(name, scenario)
    lengths = tm.random_lengths(seed, 3, 9, 16)  # 27..48 tokens, every document longer than the window
    return tm.random_docs(seed, lengths)


@pytest.mark.parametrize("use_cache", [False, True], ids=["no_cache", "use_cache"])
@pytest.mark.parametrize("name", FAMILIES)
def test_packed_logits(name, use_cache, device, impl_calls):
    """One packed row (no attention_mask) == each document alone under eager, at every position."""
    fam, eager, flex = _pair(name, device)
    docs = _packed_docs(name, "packed")
    batch, spans = tm.pack(docs)
    with torch.no_grad():
        refs = [eager(input_ids=d[None].to(device), use_cache=False).logits[0] for d in docs]
        got = flex(
            input_ids=batch["input_ids"].to(device),
            position_ids=batch["position_ids"].to(device),
            use_cache=use_cache,
        ).logits[0]
    assert impl_calls["n"] >= eager.config.num_hidden_layers
    errs = []
    for i, ((s, e), ref) in enumerate(zip(spans, refs)):
        errs.append(_max_err(got[s:e], ref)[0])
    _log(f"{name}/packed-{'use_cache' if use_cache else 'no_cache'}", max(errs))
    bad = [(i, spans[i], err) for i, err in enumerate(errs) if not err <= LOGITS_ATOL]
    assert not bad, (
        f"{name}: packed row (use_cache={use_cache}) differs from documents run alone: "
        + ", ".join(f"doc {i} at {s}:{e} max err {err:.3e}" for i, (s, e), err in bad)
        + f" (tolerance {LOGITS_ATOL:.0e}; doc lengths {[e - s for s, e in spans]})"
    )


def _grad_err(g, g_ref, floor):
    """max|g - g_ref| / max(max|g_ref|, floor); both None is no error, one None is an infinite one."""
    if g is None and g_ref is None:
        return 0.0
    if g is None or g_ref is None:
        return float("inf")
    d = (g.double() - g_ref.double()).abs().max()
    d = float("inf") if torch.isnan(d) else float(d)
    return d / max(float(g_ref.abs().max()), floor)


@pytest.mark.parametrize("name", FAMILIES)
def test_packed_loss_and_grads(name, device, impl_calls):
    """Packed loss and gradients (flex) == the same documents as an eager right-padded batch.

    Normalisation: ForCausalLMLoss shifts labels left; the collator's -100 at each document start
    masks the cross-document prediction, so the packed loss is sum(token CE) / N with N = sum over
    documents of (len - 1): the token-weighted mean over documents, not the mean of per-document means.
    The eager padded batch is run with ``num_items_in_batch=N`` (reduction sum, divided by N), so both
    losses are the same sum divided by the same N and their gradients are directly comparable. The
    reference loss is also recomputed by hand, as per-document CE sums over N.
    """
    fam, eager, flex = _pair(name, device)
    docs = _packed_docs(name, "loss")
    batch, spans = tm.pack(docs, return_flash_attn_kwargs=True)
    n = tm.n_targets(batch["labels"])
    assert n == sum(len(d) - 1 for d in docs)

    # flex, packed (everything the collator returns goes to the model, as the Trainer does)
    flex.zero_grad(set_to_none=True)
    out = flex(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}, use_cache=False)
    out.loss.backward()
    assert impl_calls["n"] >= eager.config.num_hidden_layers

    # eager, right-padded
    ids, mask, _ = tm.pad_batch(docs, "right")
    labels = ids.masked_fill(mask == 0, -100)
    assert tm.n_targets(labels) == n
    eager.zero_grad(set_to_none=True)
    ref = eager(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        labels=labels.to(device),
        num_items_in_batch=torch.tensor(n, device=device),
        use_cache=False,
    )
    ref.loss.backward()
    with torch.no_grad():
        by_hand = sum(
            torch.nn.functional.cross_entropy(ref.logits[i, : len(d) - 1].double(), d[1:].to(device), reduction="sum")
            for i, d in enumerate(docs)
        ) / n
    assert abs(float(ref.loss.detach()) - float(by_hand)) <= LOSS_ATOL, (float(ref.loss), float(by_hand))

    loss_err = abs(float(out.loss.detach()) - float(by_hand))
    _log(f"{name}/packed-loss", loss_err)
    assert loss_err <= LOSS_ATOL, f"{name}: packed loss {float(out.loss.detach()):.6f} != reference {float(by_hand):.6f} (token-weighted mean)"

    eager_params = dict(eager.named_parameters())
    flex_params = dict(flex.named_parameters())
    assert eager_params.keys() == flex_params.keys()
    gmax = max(float(p.grad.abs().max()) for p in eager_params.values() if p.grad is not None)
    assert gmax > 0
    errs = {k: _grad_err(flex_params[k].grad, eager_params[k].grad, 1e-3 * gmax) for k in eager_params}
    worst = max(errs, key=errs.get)
    _log(f"{name}/packed-grads", errs[worst])
    bad = {k: e for k, e in errs.items() if not e <= GRAD_RTOL}
    assert not bad, f"{name}: gradients differ (relative error > {GRAD_RTOL:.0e}): " + ", ".join(
        f"{k} {e:.2e}" for k, e in sorted(bad.items(), key=lambda kv: -kv[1])
    )


# --------------------------------------------------------------------------------------------------
# Generation


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", FAMILIES)
def test_generate_greedy(name, cache, device, impl_calls):
    fam, eager, flex = _pair(name, device)
    seed = _seed(name, "generate")
    ids, mask, _ = tm.pad_batch(tm.random_docs(seed, tm.random_lengths(seed, 2, 10, 20)), "left")
    kw = dict(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=8,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        try:
            ref = eager.generate(**kw)
        except TypeError as e:
            if "block_sequence_ids" in str(e):  # Transformers 5.17's create_masks_for_generate, eager too
                pytest.skip(f"{name}/{cache}: eager itself fails in this Transformers release: {e}")
            raise
        got = flex.generate(**kw)
    assert impl_calls["n"] >= 8 * eager.config.num_hidden_layers
    assert ref.sequences.shape[1] == ids.shape[1] + 8, "eager did not generate 8 tokens"
    # Logits step by step (the steps see the same inputs as long as the tokens agree), then tokens.
    errs = []
    for step, (g, r) in enumerate(zip(got.logits, ref.logits)):
        err, idx = _max_err(g, r)
        errs.append(err)
        if not err <= LOGITS_ATOL:
            top2 = r[idx[0]].topk(2).values
            pytest.fail(
                f"{name}/{cache}: step {step} logits differ by {err:.3e} (row {idx[0]}, token {idx[1]}); "
                f"eager top-2 margin there {float(top2[0] - top2[1]):.3e}; "
                f"tokens flex {got.sequences[:, ids.shape[1]:].tolist()} eager {ref.sequences[:, ids.shape[1]:].tolist()}"
            )
    _log(f"{name}/generate-{cache}", max(errs))
    assert torch.equal(got.sequences, ref.sequences), (
        f"{name}/{cache}: tokens flex {got.sequences[:, ids.shape[1]:].tolist()} "
        f"eager {ref.sequences[:, ids.shape[1]:].tolist()}"
    )


# --------------------------------------------------------------------------------------------------
# set_attn_implementation


@pytest.mark.parametrize("name", FAMILIES)
def test_set_attn_implementation(name, device, impl_calls):
    fam = tm.family(name)
    seed = _seed(name, "set_attn")
    eager = tm.make_model(fam, "eager", seed=seed, device=device)
    sd = eager.state_dict()
    ids, mask, pos = tm.pad_batch(tm.random_docs(seed, tm.random_lengths(seed, 2, 20, 36)), "left")
    kw = dict(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device), use_cache=False)
    real = mask.bool().to(device)
    with torch.no_grad():
        ref = eager(**kw).logits
    assert impl_calls["n"] == 0

    # eager -> flex
    switched = tm.make_model(fam, "eager", state_dict=sd, device=device)
    switched.set_attn_implementation(IMPL)
    assert switched.config._attn_implementation == IMPL
    with torch.no_grad():
        got = switched(**kw).logits
    assert impl_calls["n"] >= switched.config.num_hidden_layers, "set_attn_implementation: flex never ran"
    _assert_close(f"{name}/set-eager-to-flex", got[real], ref[real], LOGITS_ATOL, "real token #")

    # flex -> eager
    back = tm.make_model(fam, IMPL, state_dict=sd, device=device)
    back.set_attn_implementation("eager")
    assert back.config._attn_implementation == "eager"
    impl_calls["n"] = 0
    with torch.no_grad():
        again = back(**kw).logits
    assert impl_calls["n"] == 0, "set back to eager, the flex attention function still ran"
    _assert_close(f"{name}/set-flex-to-eager", again[real], ref[real], 1e-6, "real token #")
