"""torch.autograd glue between flex_attention() and the Triton kernels (hf_flex.kernels.launch).

Shape checks live in hf_flex.validation; this module only saves what backward needs, calls the
launchers and hands back gradients: dq, dk, dv, the sink logits' and the learnable score-mod tensors'.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Optional

import torch

from .block_mask import TABLE_NAMES, BlockMask
from .kernels import compile_ahead, interpreted
from .kernels.forward import LOG2E
from .kernels.launch import OVERRIDES, SCHEDULE, MaskTables, _pow2, out_like, flex_backward, flex_forward, natural_lse
from .kernels.launch_varlen import varlen_backward, varlen_forward, varlen_tile, varlen_tiles
from .modtypes import ScoreMod, and_holds, and_leaves


def _per_mask_mod(bm: BlockMask, attr: str, compute):
    """compute(bm), kept on the block mask under ``attr`` for as long as its mask_mod stays the same:
    every layer of a batch shares one block mask, so a walk of the mask's structure runs once per batch."""
    cached = bm.__dict__.get(attr)
    if cached is None or cached[0] is not bm.mask_mod:
        cached = (bm.mask_mod, compute(bm))
        setattr(bm, attr, cached)
    return cached[1]


@dataclass(frozen=True)
class KernelSpec:
    """Everything non-tensor the kernels need for one call."""

    block_mask: BlockMask
    score_mod: Optional[ScoreMod]
    scale: float
    # whether the caller wants the log-sum-exp (flex_attention's return_lse): then the forward also
    # returns it in natural log (one more [B, Hq, Sq] float32 tensor); else that output is None
    return_lse: bool = False

    def fwd_tables(self) -> MaskTables:
        return MaskTables.of(self.block_mask)

    def bwd_tables(self) -> MaskTables:
        return MaskTables.of(self.block_mask, transposed=True)

    def mask(self):
        mm = self.block_mask.mask_mod
        return mm.kernel_fn, mm.args

    def mask_by_key(self):
        """The mask's form for the dK/dV pass (MaskMod.kernel_fn_by_key)."""
        return self.block_mask.mask_mod.kernel_fn_by_key

    def packs_documents(self) -> bool:
        """Whether the mask holds packed documents, alone or in an "and" (flex_forward's and
        flex_backward's ``packed_documents``): its rows list few, unevenly many blocks. Every layer of
        a batch shares one block mask: the walk of the mask's structure runs once per block mask."""
        return _per_mask_mod(self.block_mask, "_packs_documents",
                             lambda bm: and_holds(bm.mask_mod.structure, ("packed_documents",)))

    def causal_window(self) -> Optional[int]:
        """Where the mask is causal, alone or within sliding windows (causal() in an "and" of causal() and
        sliding_window(w) only, at any nesting), over queries and keys of one length S: the window in
        keys (the smallest w; S for plain causal, whose window of S keys changes nothing); else None.
        flex_backward's ``causal_window`` (the Gluon backward for Hopper, kernels/gluon_causal.py,
        takes such masks). As for the document-aligned kernels, the mask_mod defines the mask: the
        kernels then read no table. Cached per block mask."""
        def window_of(bm) -> Optional[int]:
            leaves = and_leaves(bm.mask_mod.structure)
            S, S_kv = bm.seq_lengths
            if leaves is None or S != S_kv:
                return None
            kinds = {leaf[0] for _, leaf in leaves}
            if "causal" not in kinds or not kinds <= {"causal", "window"}:
                return None
            return min([S] + [leaf[1] for _, leaf in leaves if leaf[0] == "window"])

        return _per_mask_mod(self.block_mask, "_causal_window", window_of)

    def varlen(self, q: torch.Tensor, v: torch.Tensor):
        """(tiles, n_tiles, spans, tile) where the document-aligned kernels (kernels/varlen.py) run this
        call: SCHEDULE["varlen"], a mask that is exactly causal AND packed documents (and_masks of
        causal() and document(ids) of non-decreasing ids, in any order or nesting), queries and keys
        of one length, and head dims whose passes agree on a tile (launch_varlen.varlen_tile); else
        None. The tile list is built once per block mask (every layer of a batch shares it)."""
        if not SCHEDULE["varlen"]:
            return None
        bm = self.block_mask
        cached = bm.__dict__.get("_varlen")
        if cached is not None and cached[0] is bm.mask_mod:
            return cached[1]
        found = None
        leaves = and_leaves(bm.mask_mod.structure)
        S = q.shape[2]
        if leaves is not None and {leaf for _, leaf in leaves} == {("causal",), ("packed_documents",)} \
                and bm.seq_lengths == (S, S):
            at = next(off for off, leaf in leaves if leaf == ("packed_documents",))
            spans = bm.mask_mod.args[at + 2]  # mods.document: (starts, meta, spans)
            if bm.shape[0] == 1:
                spans = spans[:1]  # a block mask built for B = None: every row takes row 0's documents
            tile = varlen_tile(_pow2(max(q.shape[-1], 16)), _pow2(max(v.shape[-1], 16)), q.element_size())
            if tile is not None and spans.shape[1] == S and spans.shape[0] in (1, q.shape[0]):
                found = (*varlen_tiles(spans, tile), spans, tile)
        bm._varlen = (bm.mask_mod, found)
        return found

    def elementwise(self, q: torch.Tensor):
        """The score mod whose Triton functions run on ``q``: its approximate form (ScoreMod.approx)
        for 16-bit inputs on the GPU, when SCHEDULE["approx_mods"] allows; the exact one otherwise."""
        sm = self.score_mod
        if sm is None or not sm.has_elementwise:
            return None
        on_gpu = q.device.type == "cuda" and not interpreted()
        if sm.approx is not None and SCHEDULE["approx_mods"] and q.element_size() == 2 and on_gpu:
            return sm.approx
        return sm

    def score(self, q: torch.Tensor):
        sm = self.elementwise(q)
        if sm is None:
            return None, ()
        return sm.kernel_fn, sm.args


_TABLES = TABLE_NAMES  # the last four may be None


def _hollow(spec: KernelSpec, with_tables: bool = True):
    """(tensors, hollow spec): the block mask's tables and its mask_mod's tensors, and a spec holding
    neither (their places empty) for :func:`_fill`. The tensors go through save_for_backward: autograd
    frees them after the backward, as it does q, k, v, while a spec kept on ctx would keep the tables
    and the mask's per-token tensors (document spans) alive as long as the graph's outputs are, e.g.
    through the next step's forward when a training loop keeps the last step's output.
    ``with_tables`` False (the document-aligned kernels, which read none): the tables' places hold
    None, and a deferred block mask's tables stay unbuilt."""
    bm, mm = spec.block_mask, spec.block_mask.mask_mod
    # every layer of a batch shares one block mask: its hollow copy is made once, on the first layer
    key = (mm, bm.seq_lengths, bm.BLOCK_SIZE, bm.tail_partial)
    cached = bm.__dict__.get("_hollow")
    if cached is None or cached[0] != key:
        where = tuple(i for i, a in enumerate(mm.args) if isinstance(a, torch.Tensor))
        hollow_mm = copy.copy(mm)
        object.__setattr__(hollow_mm, "args", tuple(None if i in where else a for i, a in enumerate(mm.args)))
        hollow_bm = copy.copy(bm)
        hollow_bm.__dict__.pop("_hollow", None)
        hollow_bm.__dict__.pop("_packs_documents", None)  # it holds the full mask_mod
        hollow_bm.__dict__.pop("_varlen", None)  # and this one the tile list
        hollow_bm.__dict__.pop("_deferred", None)  # and this one the tables' builder (with the ids)
        for n in _TABLES:
            setattr(hollow_bm, n, None)
        hollow_bm.mask_mod = hollow_mm
        cached = bm._hollow = (key, hollow_bm, where)
    _, hollow_bm, where = cached
    tables = [getattr(bm, n) for n in _TABLES] if with_tables else [None] * len(_TABLES)
    tensors = tables + [mm.args[i] for i in where]
    return tensors, (replace(spec, block_mask=hollow_bm), where)


def _fill(hollow, tensors):
    """What the backward needs of the spec :func:`_hollow` emptied, its tensors back: (the hollow spec,
    the query-major MaskTables, the key-major MaskTables, the mask_mod's args). Nothing is copied: the
    hollow spec answers everything else (BLOCK_SIZE, the mask's Triton functions, the score mod)."""
    spec, where = hollow
    tables = SimpleNamespace(tail_partial=spec.block_mask.tail_partial, **dict(zip(_TABLES, tensors)))
    args = list(spec.block_mask.mask_mod.args)
    for i, a in zip(where, tensors[len(_TABLES):]):
        args[i] = a
    return spec, MaskTables.of(tables), MaskTables.of(tables, transposed=True), tuple(args)


def _compiles(q: torch.Tensor) -> bool:
    """Whether kernels for ``q`` are compiled (CUDA, not Triton's interpreter)."""
    return q.device.type == "cuda" and not interpreted()


def _compile_backward_ahead(ctx, spec: KernelSpec, q, k, v, mask_fn, mask_args, score_fn, score_args, varlen) -> None:
    """On the first forward of a configuration that will need a backward (CUDA kernels, gradients
    wanted), start compiling the backward's kernels in the background (kernels.compile_ahead), for the
    arguments the backward will get: the forward's output layout for the gradient, no LSE gradient, no
    learnable score-mod tensors (other calls compile at their backward, as before)."""
    if (not compile_ahead.enabled or not _compiles(q) or spec.return_lse or OVERRIDES or ctx.n_learnables
            or not any(ctx.needs_input_grad[:4])):
        return
    by_key = spec.mask_by_key()
    # (q's layout too: the Gluon backwards compile apart for head- and token-major inputs)
    key = (q.device, q.dtype, q.shape[-1], v.shape[-1], q.shape[1] == k.shape[1], q.is_contiguous(), mask_fn, by_key,
           score_fn, spec.block_mask.BLOCK_SIZE, ctx.packed_documents, varlen is not None and varlen[3],
           tuple(SCHEDULE.values()))
    if compile_ahead.seen(key):
        return
    B, H, S = q.shape[:3]
    out = out_like(q, v.shape[-1])  # stand-ins with the layouts the backward will see
    lse = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    score_grad_fn = spec.elementwise(q).kernel_grad_fn if score_fn is not None else None
    if varlen is not None:
        compile_ahead.start(key, q.device, functools.partial(
            varlen_backward, q, k, v, out, lse, out, *varlen, score_fn, score_args, score_grad_fn, None, (),
            spec.scale, warmup=True,
        ))
        return
    compile_ahead.start(key, q.device, functools.partial(
        flex_backward, q, k, v, out, lse, out, spec.fwd_tables(), spec.bwd_tables(), spec.block_mask.BLOCK_SIZE,
        mask_fn, mask_args, score_fn, score_args, score_grad_fn, None, (),
        spec.scale, mask_fn_by_key=by_key, packed_documents=ctx.packed_documents, causal_window=spec.causal_window(),
        warmup=True,
    ))


class FlexAttentionFunction(torch.autograd.Function):
    """forward(q, k, v, sink, spec, *learnables) -> (out, lse [B, Hq, Sq] natural log, or None unless
    spec.return_lse).

    ``learnables`` are the score mod's learnable tensors (also inside ``spec.score_mod.args``), passed
    here so autograd routes their gradients.
    """

    @staticmethod
    def forward(ctx, q, k, v, sink, spec: KernelSpec, *learnables):
        mask_fn, mask_args = spec.mask()
        score_fn, score_args = spec.score(q)
        ctx.packed_documents = spec.packs_documents()  # the backward's launch choices read it too
        ctx.n_learnables = len(learnables)
        varlen = spec.varlen(q, v)
        _compile_backward_ahead(ctx, spec, q, k, v, mask_fn, mask_args, score_fn, score_args, varlen)
        if varlen is not None:
            out, lse2 = varlen_forward(q, k, v, *varlen, score_fn, score_args, sink, spec.scale)
        else:
            out, lse2 = flex_forward(
                q, k, v, spec.fwd_tables(), spec.block_mask.BLOCK_SIZE, mask_fn, mask_args, score_fn, score_args,
                sink, spec.scale, packed_documents=ctx.packed_documents, causal_window=spec.causal_window(),
            )
        spec_tensors, ctx.hollow_spec = _hollow(spec, with_tables=varlen is None)
        # the document-aligned backward's tile list, its count and the spans (a view of the mask's)
        ctx.varlen = None
        if varlen is not None:
            ctx.varlen = varlen[3]
            spec_tensors = spec_tensors + list(varlen[:3])
        # lse2 (log2 units, the backward's form) is saved; the natural-log LSE exists only for a caller
        # that asked for it
        ctx.save_for_backward(q, k, v, out, lse2, sink, *spec_tensors)
        ctx.set_materialize_grads(False)
        return out, natural_lse(lse2) if spec.return_lse else None

    @staticmethod
    def backward(ctx, dout, dlse):
        compile_ahead.wait()  # kernels compiling in the background since the first forward
        q, k, v, out, lse2, sink, *spec_tensors = ctx.saved_tensors
        varlen = None
        if ctx.varlen is not None:
            *_, tiles, n_tiles, spans = spec_tensors
            varlen = (tiles, n_tiles, spans, ctx.varlen)
            spec = ctx.hollow_spec[0]  # the document-aligned kernels read no table and no mask function
        else:
            spec, fwd_tables, bwd_tables, mask_args = _fill(ctx.hollow_spec, spec_tensors)
        none = (None,) * (4 + 1 + ctx.n_learnables)
        if dout is None and dlse is None:
            return none
        if dout is None:
            dout = torch.zeros_like(out)
        score_fn, score_args = spec.score(q)
        sm = spec.score_mod
        em = spec.elementwise(q)  # the form whose functions the forward ran
        want_params = sm is not None and ctx.n_learnables > 0 and any(ctx.needs_input_grad[5:])
        # float64 accumulators: each entry sums one atomic per score element in no fixed order; in float64
        # that order no longer shows in the float32 result (float32 atomics drifted run to run, past
        # the float32 reference's own error, on relative_bias tables)
        grads = tuple(torch.zeros(t.shape, dtype=torch.float64, device=t.device) for t in sm.learnable_tensors()) if want_params else ()
        score_grad_fn = em.kernel_grad_fn if score_fn is not None else None
        score_param_grad_fn = em.kernel_param_grad_fn if want_params else None
        if varlen is not None:
            dq, dk, dv, delta = varlen_backward(
                q, k, v, out, lse2, dout, *varlen, score_fn, score_args, score_grad_fn, score_param_grad_fn,
                grads, spec.scale, dlse=dlse,
            )
        else:
            dq, dk, dv, delta = flex_backward(
                q, k, v, out, lse2, dout, fwd_tables, bwd_tables, spec.block_mask.BLOCK_SIZE,
                spec.block_mask.mask_mod.kernel_fn, mask_args, score_fn, score_args, score_grad_fn, score_param_grad_fn,
                grads, spec.scale, dlse=dlse, mask_fn_by_key=spec.mask_by_key(),
                packed_documents=ctx.packed_documents, causal_window=spec.causal_window(),
            )
        dsink = None
        if sink is not None and ctx.needs_input_grad[3]:
            # d sink_h = -sum_{b,q} p_sink * delta, p_sink = exp(sink_h - lse) = exp2(sink_h log2(e) - lse2)
            # (delta already holds -dlse)
            p_sink = torch.exp2(sink.float().view(1, -1, 1) * LOG2E - lse2)
            dsink = (-(p_sink * delta).sum(dim=(0, 2))).to(sink.dtype)
        dparams = tuple(g.to(t.dtype) for g, t in zip(grads, sm.learnable_tensors())) if want_params else (None,) * ctx.n_learnables
        return (dq, dk, dv, dsink, None) + dparams
