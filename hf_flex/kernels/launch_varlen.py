"""Launch helpers for the document-aligned kernels (kernels/varlen.py): the tile list, the forward,
the backward. Tensors in, tensors out; shapes as in launch.py, spans [B or 1, S] int64
(mods.document_spans)."""

from __future__ import annotations

from typing import Optional

import torch

from . import cdiv as _cdiv, launcher
from .launch import (
    SCHEDULE, _common, _dot_prec, _per_mask, atomic_dq_buffer, backward_buffers, backward_descriptors,
    bool_knob, delta_pass, dkdv_tiles, dp_first, dq_tiles, forward_descriptors, fwd_tiles, gluon_allowed,
    gluon_row_inputs, out_like, row_buffer, row_slack, use_atomic_dq,
)
from . import gluon_varlen
from .varlen import attn_bwd_varlen_kernel, attn_fwd_varlen_kernel

__all__ = ["varlen_tile", "varlen_tiles", "varlen_forward", "varlen_backward"]

# a sort key past every tile's
_NOT_A_TILE = 1 << 40


def varlen_tile(dp: int, dvp: int, element_size: int) -> Optional[int]:
    """Positions per tile of the document-aligned kernels for these head dims and element size: the
    forward's and dQ pass's query tile and the dK/dV pass's key tile, where the three agree (the
    dK/dV and dQ programs share one tile list); None where they do not (the block-sparse kernels run)."""
    f = fwd_tiles(dp, dvp, element_size, 128, 128)
    if f.block_m == dkdv_tiles(dp, dvp, element_size, 128, 128).block_n == dq_tiles(dp, dvp, element_size, 128, 128).block_m:
        return f.block_m
    return None


def varlen_tiles(spans: torch.Tensor, tile: int):
    """(tiles [Bs, 2, S] int16 (int32 past 2**15 positions), n_tiles [Bs] int32): per row of ``spans``,
    the first position of every
    document-aligned tile (positions p with (p - lo[p]) % tile == 0) in two orders, then the row's
    positions that start no tile (never read): tiles[:, 0] more keys before the tile first (the
    forward's and dQ pass's longest programs first), tiles[:, 1] more of the document after it first
    (the dK/dV pass's); and how many tiles the row has. Built on the device, no host sync."""
    if spans.dim() != 2 or spans.dtype != torch.int64:
        raise ValueError("varlen_tiles: spans must be int64 [B, S] (mods.document_spans)")
    S = spans.shape[1]
    pos = torch.arange(S, device=spans.device)
    off = pos - (spans & 0xFFFFFFFF)
    starts = off % tile == 0
    keys = torch.stack([torch.where(starts, -(off // tile), _NOT_A_TILE),
                        torch.where(starts, -(((spans >> 32) - pos) // tile), _NOT_A_TILE)], 1)
    # int16 positions where they fit: the lists live as long as the batch's activations (peak memory)
    tiles = torch.sort(keys, dim=2, stable=True).indices.to(torch.int16 if S <= 2**15 else torch.int32)
    return tiles, starts.sum(1, dtype=torch.int32)


def _list_args(tiles, n_tiles, spans, key_major: bool = False):
    # a one-row list (spans of B = 1) serves every batch row: stride 0
    stride_b = tiles.stride(0) if tiles.shape[0] > 1 else 0
    return (tiles, n_tiles, spans, stride_b, *((tiles.stride(1),) if key_major else ()),
            spans.stride(0) if spans.shape[0] > 1 else 0, n_tiles.stride(0) if n_tiles.shape[0] > 1 else 0)


def varlen_forward(q, k, v, tiles, n_tiles, spans, tile: int, score_fn, score_args, sink, sm_scale):
    """(out [B, Hq, S, Dv], lse2 [B, Hq, S] float32 in log2 units) as launch.flex_forward returns
    them, for and_masks(causal(), document(ids)) with spans = document_spans(ids). With
    SCHEDULE["gluon_varlen_fwd"], calls without score mod or sink that gluon_varlen.applies accepts (and
    launch.gluon_allowed lets through) run its Gluon forward instead."""
    B, HQ, HKV, SQ, SKV, D, DV, DP, DVP = _common(q, k, v)
    out = out_like(q, DV)
    lse = row_buffer(B, HQ, SQ, q.device, row_slack(tile, bool_knob("varlen_row_select")))
    if (bool_knob("gluon_varlen_fwd") and score_fn is None and sink is None and sm_scale > 0 and gluon_allowed(q)
            and gluon_varlen.applies(q, k, v, tile, score_fn, (128,))):
        gluon_varlen.varlen_forward(q, k, v, out, lse, tiles, n_tiles, spans, sm_scale)
        return out, lse
    t = fwd_tiles(DP, DVP, q.element_size(), 128, 128)
    k_desc, v_desc, k_desc_p, v_desc_p = forward_descriptors(q, k, v, t)
    n_programs = _cdiv(SQ, tile)
    heads_first = _per_mask("heads_first", True)  # the mask packs documents
    grid = (B * HQ, n_programs) if heads_first else (n_programs, B * HQ)
    attn_fwd_varlen_kernel[grid](
        q, k, v, out, lse, sink if sink is not None else lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), lse.stride(0), lse.stride(1),
        *_list_args(tiles, n_tiles, spans), n_programs,
        SQ, HQ, HQ // HKV, sm_scale, score_args,
        SCORE_MOD=score_fn, HAS_SINK=sink is not None, TILE=tile, BLOCK_N=t.block_n,
        BLOCK_N_FULL=t.block_n_full, D=D, DP=DP, DV=DV, DVP=DVP, DOT_PREC=_dot_prec(q.dtype),
        HEADS_FIRST=heads_first, ONE_LOOP=SCHEDULE["varlen_one_loop"], K_DESC=k_desc, V_DESC=v_desc, K_DESC_PARTIAL=k_desc_p, V_DESC_PARTIAL=v_desc_p,
        num_warps=t.num_warps, num_stages=t.num_stages, **({"maxnreg": t.maxnreg} if t.maxnreg else {}),
    )
    return out, lse


def varlen_backward(q, k, v, out, lse, dout, tiles, n_tiles, spans, tile: int, score_fn, score_args,
                    score_grad_fn, score_param_grad_fn, score_grads, sm_scale, dlse=None, warmup: bool = False):
    """(dq, dk, dv, delta) as launch.flex_backward returns them (``warmup``: compile, launch nothing,
    return None), for the mask of :func:`varlen_forward`. One launch of dK/dV and dQ programs, no
    atomics (deterministic); with SCHEDULE["varlen_atomic_dq"] (use_atomic_dq), dK/dV programs alone
    that add dQ into a float32 accumulator (its compile-ahead is skipped). With SCHEDULE["gluon_varlen"],
    inputs gluon_varlen.applies accepts run its Gluon passes instead (a warm-up compiles them), for
    query-head groups of at least SCHEDULE["gluon_varlen_min_group"] heads."""
    if (SCHEDULE["gluon_varlen"] and score_param_grad_fn is None and gluon_allowed(q)
            and q.shape[1] >= SCHEDULE["gluon_varlen_min_group"] * k.shape[1]
            and gluon_varlen.applies(q, k, v, tile, score_fn, SCHEDULE["gluon_bwd_head_dims"])):
        lse, dout, delta = gluon_row_inputs(q, out, lse, dout, dlse, warmup)
        grads = gluon_varlen.varlen_backward(q, k, v, dout, lse, delta, tiles, n_tiles, spans, sm_scale,
                                             concurrent=SCHEDULE["gluon_bwd_streams"], warmup=warmup,
                                             programs=SCHEDULE["gluon_varlen_bwd_tiles"])
        return None if warmup else (*grads, delta)
    B, HQ, HKV, SQ, SKV, D, DV, DP, DVP = _common(q, k, v)
    t = dkdv_tiles(DP, DVP, q.element_size(), 128, 128)
    t2 = dq_tiles(DP, DVP, q.element_size(), 128, 128)
    atomic = use_atomic_dq("varlen_atomic_dq", score_param_grad_fn)
    if atomic and warmup:
        return None
    row_select = bool_knob("varlen_row_select")
    lse, dout, dlse, delta = backward_buffers(q, lse, dout, dlse, warmup, row_slack(tile, row_select))
    go = launcher(warmup)
    delta_pass(go, out, dout, dlse, delta)
    q_desc, do_desc, k_desc, v_desc = backward_descriptors(q, k, v, dout, t, t2)
    dk, dv = (k, v) if warmup else (torch.empty_like(k), torch.empty_like(v))
    dq_desc = None
    if atomic:
        dq, dq_desc = atomic_dq_buffer(q, D, DP, t.block_m)
    else:
        dq = q if warmup else torch.empty_like(q)
    n_programs = _cdiv(SQ, tile)
    # dK/dV: a program per tile for the first n_programs tiles of a row's list, then n_over programs
    # walking the rest (each document adds at most one partial tile past S / tile)
    n_over = _cdiv(n_programs, 4)
    n_dkdv = (n_programs + n_over) * B * HKV
    go(attn_bwd_varlen_kernel, (n_dkdv + (0 if atomic else n_programs * B * HQ),))(
        q, k, v, dout, dq, dk, dv, lse, delta,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), *dk.stride(), *dv.stride(),
        lse.stride(0), lse.stride(1),
        *_list_args(tiles, n_tiles, spans, key_major=True), n_programs, n_over,
        SQ, HQ, HKV, HQ // HKV, sm_scale, n_dkdv, score_args, score_grads,
        SCORE_MOD=score_fn, SCORE_GRAD=score_grad_fn, SCORE_PARAM_GRAD=score_param_grad_fn, TILE=tile,
        DKDV_BLOCK_M=t.block_m, DQ_BLOCK_N=t2.block_n, D=D, DP=DP, DV=DV, DVP=DVP, DOT_PREC=_dot_prec(q.dtype),
        FLAT_GROUP=HQ > HKV and SCHEDULE["bwd_flat_group"] is not False, ONE_LOOP=SCHEDULE["varlen_one_loop"],
        Q_DESC=q_desc, DO_DESC=do_desc, K_DESC=k_desc, V_DESC=v_desc, ATOMIC_DQ=atomic, DQ_DESC=dq_desc,
        DP_FIRST=dp_first("varlen_dp_first", DP, DVP), ROW_SELECT=row_select,
        num_warps=t.num_warps, num_stages=SCHEDULE["varlen_bwd_stages"] or t.num_stages,
    )
    if warmup:
        return None
    return (dq.to(q.dtype) if atomic else dq), dk, dv, delta
