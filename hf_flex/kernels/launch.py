"""Launch helpers: tile choice, grids and strides for the forward and backward kernels.

Tensors in, tensors out; no autograd here (that is hf_flex.autograd).
Shapes: q [B, Hq, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv], o / do [B, Hq, Sq, Dv],
lse / delta [B, Hq, Sq] float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import _cuda_major, cuda_index, gluon_causal, gluon_forward, launcher
from . import cdiv as _cdiv
from .backward import attn_bwd_delta_kernel, attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_kernel
from .forward import LN2, attn_fwd_kernel


@dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int  # in the forward: the key tile of partial blocks (mask evaluated)
    num_warps: int
    num_stages: int
    block_n_full: int = 0  # forward only: the key tile of full blocks (0 = block_n)
    # register cap per thread (ptxas .maxnreg), 0 = none: 128 keeps two 8-warp programs on an SM
    maxnreg: int = 0
    # K/V (forward, dQ) or Q/dO (dK/dV) tiles through tensor descriptors where SCHEDULE allows TMA
    tma: bool = True


def _pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


def _fit(t: Tiles, sparse_q: int, sparse_kv: int) -> Tiles:
    # kernel tiles must divide the block-table blocks
    return Tiles(
        min(t.block_m, sparse_q),
        min(t.block_n, sparse_kv),
        t.num_warps,
        t.num_stages,
        min(t.block_n_full or t.block_n, sparse_kv),
        t.maxnreg,
        t.tma,
    )


# Tile choices per pass, keyed by (padded head dim bucket, element size). Measured on an H100 with
# torch 2.11 / triton 3.6 (scripts/tune_tiles.py, causal, S=8192; notes in tests/benchmarks/NOTES.md).
# OVERRIDES (pass -> Tiles) lets a tuning script try others.
OVERRIDES: dict = {}

# Scheduling choices, as knobs a tuning script may flip (defaults: measured, tests/benchmarks/NOTES.md).
# reverse_m: forward and dQ programs take query tiles last to first (the long ones of causal masks first).
# fused_bwd: dK/dV and dQ programs in one launch when both passes use the same warps and stages.
# one_variant: every length runs the kernel variant whose partial-block loops check keys/queries past
#   the end, so a length that divides the block (e.g. 4224 among packed lengths) compiles nothing new:
#   no recompile when packed lengths change. Off, such a length runs a variant without those checks,
#   compiled when the first one comes (one recompile per pass), 2-5 % faster on the lengths that divide
#   the block (H200, NOTES.md): worth it for a fixed length that divides 128. Full-block loops never
#   check where the tables list a ragged last block partial (MaskTables.tail_partial, every builder of
#   this package).
# approx_mods: 16-bit inputs on the GPU run a score mod's approximate form where it has one
#   (ScoreMod.approx; softcap: tanh.approx.f32), with errors within 16-bit rounding (NOTES.md).
# index_ahead: "none" | "full" | "both": which forward loops (full blocks, or partial ones too) load the
#   next key block's index at the end of each iteration (as torch flex does) instead of at the start of
#   the iteration that needs it. bwd_index_ahead: the same for the backward's full-block loops (not
#   where bwd_flat_group's loop applies: the two exclude each other, and the flat loop wins).
# bwd_interleave: the fused backward launches, per (batch, key head), its dK/dV programs then its dQ
#   programs (torch flex's order) instead of every dK/dV program first. Both on since the fifteenth
#   round: together +2-4 % forward+backward on the block-sparse D=128 cases (causal 2k 310 -> 321,
#   8k 387 -> 398, sliding 290 -> 297, softcap 298 -> 305, GQA 390 -> 419 TFLOP/s), D=64 341 -> 337
#   (H100, two runs; Nsight Compute had our backward at causal 2k stalled on long scoreboards 1.46
#   cycles an instruction against torch flex's 0.52). NOTES.md, fifteenth round.
# atomic_dq: the dK/dV programs also add dQ into a float32 accumulator with atomics, and no dQ pass
#   runs (five tile products per tile pair instead of seven; dQ's summation order, hence its last
#   bits, then varies between runs). Never while torch.use_deterministic_algorithms(True) holds, nor
#   for score mods with learnable tensors (their gradients come from the dQ pass).
# atomic_dq_tma: where descriptors apply (Hopper, TMA-able tensors), the dK/dV programs add dQ by the
#   tensor-memory accelerator's bulk reduction (cp.reduce.async.bulk.tensor: one asynchronous request
#   per tile) instead of per-thread atomics. varlen_atomic_dq: atomic_dq for the document-aligned
#   kernels (their dK/dV programs add dQ; no dQ programs). Measured in NOTES.md (thirteenth round).
# bwd_dp_first (block-sparse kernels), varlen_dp_first (document-aligned): the dK/dV loops issue
#   dP^T = V dO^T right after S^T = K Q^T, so that P^T dO runs under dS's elementwise work
#   (backward._dkdv_inner's DP_FIRST): True, False, or a head dim up to which it applies (bwd_dp_first's
#   default 64: measured +5-7 % forward+backward at D = 64, -7-8 % on causal GQA at D = 128, within
#   noise elsewhere; NOTES.md, thirteenth round).
# row_select (block-sparse kernels), varlen_row_select (document-aligned): the dK/dV loops that may
#   reach queries past the end read LSE and delta unmasked (a slack past their last row: row_buffer)
#   and select +inf / 0 for those queries, instead of masked loads (backward.row_inputs' SELECT).
#   Offline, sm_90: the document-aligned diagonal loop 858 -> 627 instructions a step, the
#   block-sparse partial loops 693 -> 552 (causal) and 761 -> 636 (documents). Measured (H100,
#   NOTES.md, fourteenth round): +4 % forward+backward on the 24-document case, +2 % on the
#   12-document one, -1..-3 % on the block-sparse causal cases; but the slack put the end-to-end
#   step's peak memory 6 KB (4k) and 7 MiB (16k) higher, above flex_attention's: off by default.
# bwd_full_stages, bwd_dq_full_stages (block-sparse kernels): the software-pipelining depth of the
#   dK/dV programs' (dQ programs') full-block loop where it should differ from the kernel's num_stages
#   (0: the kernel's). The partial-block loops spill at 3 stages (sm_90, D=128: 645 -> 807 instructions
#   a step with 13 spill accesses), the full-block loop does not (400 -> 451 with the whole kernel at 3,
#   404 with this knob); a standalone copy of the document kernels' loop without mask read 495 TFLOP/s
#   at 2 stages, 561 at 3 (H100, scripts/gluon_dkdv_proto.py). Measured (H100, NOTES.md, fifteenth
#   round): nothing outside the noise but softcap (+4-5 %): both 0.
# tma: "none" | "full" | "both": on Hopper and later (and in Triton's interpreter), which forward loops
#   (full blocks, or partial ones too) load their K/V tiles through tensor descriptors (the
#   tensor-memory accelerator), where the tensors and the pass's Tiles.tma allow (_tma_descriptors).
#   bwd_tma: the same for the backward's loops (Q/dO tiles of the dK/dV pass, K/V tiles of the dQ
#   pass). Measured in NOTES.md.
# bwd_one_loop: each backward program walks its partial and full blocks in one pipelined loop (the mask
#   evaluated in both) instead of a loop each: one pipeline fill and drain instead of two per query
#   head, for masks whose rows list few blocks (packed documents). fwd_one_loop: the same for the
#   forward, in the partial blocks' key tiles (Tiles.block_n). Not measured yet (NOTES.md).
# heads_first (forward), bwd_heads_first (both backward forms): programs start every (batch, head)'s
#   tile t before any head's next tile (grids (B * H, tiles)), so with reverse_m the longest programs
#   of causal masks run first across all heads (longest-first scheduling), not head by head. The
#   forward's takes True, False or "documents" (the default: heads first where the mask holds packed
#   documents, measured +2-10 % there and -3..-15 % on causal and sliding masks; NOTES.md).
# bwd_flat_group: GQA with tables shared by every head: each dK/dV loop walks its blocks for all the
#   query heads of its key head in one pipelined loop instead of a loop per head. True, False or
#   "documents" (the default: where the mask packs documents, whose rows list few blocks: measured +3 %
#   f+b there and -3 % on causal GQA, whose long loops amortise their fills; NOTES.md, ninth round).
# halves: where a block mask has half-block tables (the packed builder's), every partial-block loop
#   walks the live halves of its partial blocks (MaskTables.partial_unit) and skips the dead ones at
#   document boundaries; full blocks stay whole. Measured in NOTES.md (ninth round).
# varlen: causal attention over packed documents (and_masks(causal(), document(ids))) runs the
#   document-aligned kernels (kernels/varlen.py: tiles from each document's start, no partial block
#   but the diagonal, no block table read) instead of the block-sparse ones. varlen_one_loop: their
#   programs walk all their keys (queries) in one masked loop instead of the diagonal's loop and a
#   loop without mask: one pipeline fill and drain per tile. varlen_bwd_stages: their backward's
#   software-pipelining depth (0: the dK/dV tiles'); 3 measured +5 % forward+backward over 2 on both
#   document anchor cases. NOTES.md, twelfth round.
# gluon_bwd: a mask that is exactly causal over S x S, without score mod, runs its backward's dK/dV and
#   dQ passes as the Gluon kernels of kernels/gluon_causal.py where their applies() holds (Hopper,
#   16-bit [B, H, S, D] inputs, contiguous or Transformers' transposed [B, S, H, D] projections, no
#   GQA, S a multiple of 128, D in gluon_bwd_head_dims): each
#   pass 13-16 % faster than the block-sparse kernels' at causal 2k and 8k; forward+backward +4-7 % at
#   D = 128, +8 % at D = 64 (H100, NOTES.md, sixteenth round). gluon_bwd_streams: its dQ launch on a
#   second stream, concurrent with the dK/dV launch (+3 % at 2k, within noise at 8k).
#   gluon_bwd_sliding: causal masks within a sliding window take it too (its window edge's steps
#   masked; NOTES.md, seventeenth round). gluon_varlen: the document-aligned backward (causal packed
#   documents, launch_varlen.varlen_backward) as the Gluon kernels of kernels/gluon_varlen.py where
#   their applies() holds (as gluon_bwd's, with GQA and any S; gluon_bwd_head_dims and
#   gluon_bwd_streams apply), for query-head groups of at least gluon_varlen_min_group heads: 24 docs
#   GQA (groups of 4) +4.5 % forward+backward; 12 docs without GQA, its kernels 6 % faster (818 against
#   874 us) but the call 35 % slower: host-bound, the three Gluon launches and eight descriptors cost
#   the host more than the Triton kernels' one launch (NOTES.md, seventeenth round).
# gluon_token_major: both Gluon backwards take Transformers' layout too (q, k, v transposed views of
#   contiguous [B, S, H, D] projections, read in place and their gradients written in it; 24 docs GQA
#   on such inputs, forward+backward 251 against 241 TFLOP/s in groups of 4, 242 against 229 in groups
#   of 2); off, such inputs run the Triton kernels. gluon_min_rows: a call takes a Gluon backward only
#   where B * Hq * S reaches it: the smallest anchor call where they measured faster (causal 2k, 8
#   x 16 heads); the 4k end-to-end step's calls (16 heads x 4096) are host-bound, and read 12.6
#   against 7.7 ms of overhead with them (NOTES.md, eighteenth round).
# gluon_fwd: a mask that is exactly causal over S x S, alone or within a sliding window, without score
#   mod or sink, runs its forward as the Gluon kernel of kernels/gluon_forward.py where its applies()
#   holds (Hopper, 16-bit inputs of either layout, GQA, S a multiple of 128, D 64 or 128): two programs
#   an SM; forward TFLOP/s on the H100 against the Triton forward, sliding window 1024 at 8k 352 against
#   336, D=64 causal 8k 410 against 369, causal 8k 499 against 470, 2k 372 against 361 (prototype,
#   NOTES.md, nineteenth round). gluon_varlen_fwd: the document-aligned forward (causal packed documents)
#   as kernels/gluon_varlen.py's Gluon forward, in the same form, where gluon_varlen.applies and
#   gluon_allowed hold: 24 docs GQA at 16k, forward 315 against 274 TFLOP/s (token-major 313 against
#   271), forward+backward +3 %; 12 docs (host-bound) within its runs' spread (NOTES.md, nineteenth round).
# gluon_bwd_tiles: (tile, step, warps) of the Gluon causal backward's programs (gluon_causal.check_tiles):
#   (64, 64, 4), one warpgroup, 254 registers and 96 KB for dK/dV, 161 for dQ: two programs an SM, the
#   Gluon forward's form; forward+backward on the H200 against (128, 64, 8) (one program an SM, 252
#   registers), 3 interleaved rounds: causal 2k 372 against 343 TFLOP/s, 8k 458 against 431, D=64 387
#   against 369, sliding 1024 350 against 323; (64, 32, 4) no better than (128, 64, 8) (NOTES.md,
#   twentieth round). gluon_varlen_bwd_tiles: the same for the document-aligned Gluon backward, whose
#   programs then take halves of the 128-position listed tiles: (64, 64, 4) on the H200, 24 docs GQA at
#   16k token-major forward+backward 293 against 268 TFLOP/s (head-major within its runs' 17 % spread),
#   the 16k end-to-end step's attention overhead 12.6 against 14.1 ms (NOTES.md, twentieth round).
SCHEDULE: dict = {
    "reverse_m": True, "fused_bwd": True, "one_variant": True, "approx_mods": True,
    "index_ahead": "full", "bwd_index_ahead": True, "bwd_interleave": True, "atomic_dq": False,
    "tma": "both", "bwd_tma": True, "bwd_one_loop": False, "fwd_one_loop": False, "heads_first": "documents",
    "bwd_heads_first": False, "halves": True, "bwd_flat_group": "documents", "varlen": True,
    "varlen_one_loop": False, "varlen_bwd_stages": 3, "atomic_dq_tma": True, "varlen_atomic_dq": False,
    "bwd_dp_first": 64, "varlen_dp_first": False, "row_select": False, "varlen_row_select": False,
    "bwd_full_stages": 0, "bwd_dq_full_stages": 0, "gluon_bwd": True,
    "gluon_bwd_streams": True, "gluon_bwd_head_dims": (64, 128), "gluon_bwd_sliding": True,
    "gluon_varlen": True, "gluon_varlen_min_group": 2, "gluon_token_major": True, "gluon_min_rows": 1 << 18,
    "gluon_fwd": True, "gluon_varlen_fwd": True, "gluon_bwd_tiles": (64, 64, 4),
    "gluon_varlen_bwd_tiles": (64, 64, 4),
}


def _grid(tiles: int, heads: int, heads_first: bool) -> tuple:
    """A 2-D launch grid: (tiles, B * H), or (B * H, tiles) with SCHEDULE["heads_first"] (forward) or
    ["bwd_heads_first"] (the kernels' tile_and_head reads it the same way)."""
    return (heads, tiles) if heads_first else (tiles, heads)


def _per_mask(knob: str, packed_documents: bool) -> bool:
    """SCHEDULE[knob] for this call: True / False as set, or "documents": whether the mask holds packed
    documents (KernelSpec.packs_documents)."""
    value = SCHEDULE[knob]
    if value == "documents":
        return bool(packed_documents)
    if not isinstance(value, bool):
        raise ValueError(f'SCHEDULE["{knob}"] must be True, False or "documents", got {value!r}')
    return value


def _divides(n: int, block: int) -> bool:
    """Whether the partial-block loops may skip the checks for positions past the end ``n``."""
    return not SCHEDULE["one_variant"] and n % block == 0

_TABLE = {
    # (d <= 64, 2-byte):   fwd                 dkdv (block_m = query sub-tile, block_n = keys)   dq
    # fwd: the variant that checks keys past the end needs 131 registers, one program per SM instead
    # of two (-33 % on the H200, NOTES.md): capped at 128. Its K/V tiles through TMA measured 1-2 %
    # slower (H100, NOTES.md): pointer loads
    (64, 2): (Tiles(128, 64, 8, 3, 0, 128, False), Tiles(32, 128, 4, 3), Tiles(64, 64, 4, 3)),
    # fwd: 128-key tiles pay off in full blocks (399 vs 376 TFLOP/s causal) but not where the mask is
    # evaluated (document masks: 150 vs 191), hence 64 there
    (128, 2): (Tiles(128, 64, 8, 3, 128), Tiles(64, 128, 8, 2), Tiles(128, 64, 8, 2)),
    (256, 2): (Tiles(64, 32, 4, 2), Tiles(32, 32, 4, 1), Tiles(32, 32, 4, 1)),
    # fp32 tiles hold twice the bytes: smaller tiles keep them in shared memory
    (64, 4): (Tiles(64, 64, 4, 2), Tiles(32, 64, 4, 2), Tiles(64, 32, 4, 2)),
    (128, 4): (Tiles(64, 32, 4, 2), Tiles(32, 64, 4, 1), Tiles(32, 32, 4, 1)),
    (256, 4): (Tiles(32, 32, 4, 1), Tiles(16, 32, 4, 1), Tiles(16, 32, 4, 1)),
}


_picked: dict = {}


def _pick(pass_index: int, name: str, dp: int, dvp: int, elt: int, sparse_q: int, sparse_kv: int) -> Tiles:
    if name in OVERRIDES:
        return _fit(OVERRIDES[name], sparse_q, sparse_kv)
    key = (pass_index, dp, dvp, elt, sparse_q, sparse_kv)
    t = _picked.get(key)  # asked three times per layer and call: a dict hit instead of building Tiles
    if t is None:
        d = max(dp, dvp)
        bucket = 64 if d <= 64 else 128 if d <= 128 else 256
        t = _picked[key] = _fit(_TABLE[(bucket, 4 if elt >= 4 else 2)][pass_index], sparse_q, sparse_kv)
    return t


def fwd_tiles(dp, dvp, elt, sparse_q, sparse_kv) -> Tiles:
    """block_m queries per program, walking block_n keys at a time."""
    return _pick(0, "fwd", dp, dvp, elt, sparse_q, sparse_kv)


def dkdv_tiles(dp, dvp, elt, sparse_q, sparse_kv) -> Tiles:
    """block_n keys per program, walking block_m queries at a time."""
    return _pick(1, "dkdv", dp, dvp, elt, sparse_q, sparse_kv)


def dq_tiles(dp, dvp, elt, sparse_q, sparse_kv) -> Tiles:
    return _pick(2, "dq", dp, dvp, elt, sparse_q, sparse_kv)


@dataclass
class MaskTables:
    """Block tables with broadcast strides, as the kernels read them.

    ``tail_partial``: no full block reaches past the lengths (BlockMask.tail_partial), so the kernels
    walk full blocks without checking for keys or queries past the end, whatever the lengths."""

    num: torch.Tensor
    idx: torch.Tensor
    full_num: torch.Tensor
    full_idx: torch.Tensor
    tail_partial: bool = False
    # the live halves of the partial blocks (BlockMask.kv_half_num ...), or None
    half_num: Optional[torch.Tensor] = None
    half_idx: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, bm, transposed: bool = False) -> "MaskTables":
        """The query-major tables of BlockMask ``bm`` (forward, dQ), or its key-major ones (dK/dV)."""
        if transposed:
            return cls(bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices, bm.tail_partial,
                       bm.q_half_num, bm.q_half_idx)
        return cls(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices, bm.tail_partial,
                   bm.kv_half_num, bm.kv_half_idx)

    def partial_unit(self, sparse: int, tile: int, one_loop: bool) -> int:
        """Positions per entry of the list the partial-block loop walks: ``sparse`` (whole blocks), or
        ``sparse // 2`` where the live-half tables exist and SCHEDULE["halves"] allows, the loop's
        ``tile`` fits a half and the loop does not also walk full blocks (one_loop)."""
        if (self.half_num is None or not SCHEDULE["halves"] or one_loop or sparse % 2 or tile > sparse // 2
                or self.num.shape[1] != 1):
            return sparse
        return sparse // 2

    def half_tables(self):
        """(half_num, half_idx) for the kernels' arguments: the whole-block tables stand in where
        there are none (then never read)."""
        if self.half_num is None:
            return self.num, self.idx
        return self.half_num, self.half_idx

    def strides(self):
        Bm, Hm, R = self.num.shape
        C = self.idx.shape[-1]
        s_nb = Hm * R if Bm > 1 else 0
        s_nh = R if Hm > 1 else 0
        s_ib = Hm * R * C if Bm > 1 else 0
        s_ih = R * C if Hm > 1 else 0
        return s_nb, s_nh, s_ib, s_ih, C


def _dot_prec(dtype):
    # fp32 inputs: full-precision products (Triton would use tf32 by default)
    return "ieee" if dtype == torch.float32 else None


def _common(q, k, v):
    B, HQ, SQ, D = q.shape
    HKV, SKV, DV = k.shape[1], k.shape[2], v.shape[3]
    return B, HQ, HKV, SQ, SKV, D, DV, _pow2(max(D, 16)), _pow2(max(DV, 16))


def out_like(q: torch.Tensor, dv: int) -> torch.Tensor:
    """Uninitialised [B, Hq, Sq, Dv] in q's layout: a [B, Sq, Hq, Dv] buffer seen transposed when q is
    one (Transformers' q is a transposed [B, S, H, D] projection). The caller's transpose back to
    [B, S, H, Dv] is then free, and the tensor autograd saves for the backward is the very one the
    output projection saves too, not a second copy of every layer's attention output."""
    B, H, S, _ = q.shape
    if q.stride(1) < q.stride(2):
        return torch.empty((B, S, H, dv), dtype=q.dtype, device=q.device).transpose(1, 2)
    return torch.empty((B, H, S, dv), dtype=q.dtype, device=q.device)


def has_tma(device: torch.device) -> bool:
    """Whether kernels on ``device`` can load through tensor descriptors: CUDA of compute capability 9
    (Hopper) or later, or Triton's interpreter (CPU tensors), which emulates them."""
    if device.type == "cuda":
        return _cuda_major(cuda_index(device)) >= 9
    from . import interpreted

    return interpreted()


def _tma_descriptors(a, b, d, dp, db, dbp, rows):
    """Tensor descriptors of a [B, H, S, d] and b [B, H, S, db] (K and V, or Q and dO) with
    [1, 1, rows, head dim] boxes, or (None, None) where TMA does not apply: not a device with TMA
    (has_tma), head dims that are not already a power of two, or strides TMA cannot take (last not 1,
    others not positive multiples of 16 bytes, base not 16-byte aligned)."""
    if d != dp or db != dbp or not has_tma(a.device):
        return None, None
    out = []
    for t, width in ((a, d), (b, db)):
        es, st = t.element_size(), t.stride()
        s0, s1, s2, s3 = st
        if s3 != 1 or t.data_ptr() % 16 or min(s0, s1, s2) <= 0 or (s0 * es) % 16 or (s1 * es) % 16 or (s2 * es) % 16:
            return None, None
        out.append(_descriptor(t, list(t.shape), list(st), [1, 1, rows, width]))
    return out[0], out[1]


_descriptor_protos: dict = {}


def _descriptor(t, shape, strides, block):
    """triton.tools.tensor_descriptor.TensorDescriptor(t, shape, strides, block), built without its
    per-object validation: the first descriptor of each (dtype, block) is built and validated by its
    own constructor, later ones copy its fields and set the four that differ. The caller has checked
    what that validation checks of the tensor (base 16-byte aligned, strides multiples of 16 bytes,
    last stride 1); the lengths are positive (validation.check_inputs). A forward+backward builds
    eight of these, and the validation was a third of our host time per call (scripts/probe_glue.py)."""
    key = (t.dtype, block[2], block[3])
    proto = _descriptor_protos.get(key)
    if proto is None:
        from triton.tools.tensor_descriptor import TensorDescriptor

        desc = TensorDescriptor(t, shape, strides, block)  # validated
        if hasattr(desc, "__dict__"):  # a dataclass with __slots__ (another Triton) stays on the slow path
            proto = _descriptor_protos[key] = object.__new__(TensorDescriptor)
            proto.__dict__.update(desc.__dict__)
            proto.base = proto.shape = proto.strides = proto.block_shape = None  # keeps none of the caller's
        return desc
    desc = object.__new__(proto.__class__)
    desc.__dict__.update(proto.__dict__)
    desc.base, desc.shape, desc.strides, desc.block_shape = t, shape, strides, block
    return desc


def forward_descriptors(q, k, v, t: Tiles):
    """Tensor descriptors (or None) of K and V for the forward's loop without mask (``t.block_n_full``
    keys per box) and for its masked loop (``t.block_n``), where SCHEDULE["tma"] ("full": the first
    only, "both") and the tiles allow TMA."""
    B, HQ, HKV, SQ, SKV, D, DV, DP, DVP = _common(q, k, v)
    tma = SCHEDULE["tma"]
    if tma not in ("none", "full", "both"):
        raise ValueError(f'SCHEDULE["tma"] must be "none", "full" or "both", got {tma!r}')
    k_desc = v_desc = k_desc_p = v_desc_p = None
    if tma != "none" and t.tma:
        k_desc, v_desc = _tma_descriptors(k, v, D, DP, DV, DVP, t.block_n_full)
    if tma == "both" and k_desc is not None:
        k_desc_p, v_desc_p = _tma_descriptors(k, v, D, DP, DV, DVP, t.block_n)
    return k_desc, v_desc, k_desc_p, v_desc_p


def flex_forward(
    q, k, v, tables: MaskTables, sparse, mask_fn, mask_args, score_fn, score_args, sink, sm_scale,
    packed_documents: bool = False, causal_window: Optional[int] = None,
):
    """Returns (out [B, Hq, Sq, Dv] in q's dtype, lse2 [B, Hq, Sq] float32): the log-sum-exp of each row
    in the form the backward reads, log2 units and +inf for a row with no allowed key (natural_lse
    gives the user's form). The backward needs no per-row buffer of its own beside delta.

    ``packed_documents``: the mask holds packed documents (KernelSpec.packs_documents), for
    SCHEDULE["heads_first"] == "documents". ``causal_window``: as flex_backward's; with
    SCHEDULE["gluon_fwd"], inputs gluon_forward.applies accepts run the Gluon forward."""
    B, HQ, HKV, SQ, SKV, D, DV, DP, DVP = _common(q, k, v)
    sq, skv = sparse
    if bool_knob("gluon_fwd") and gluon_forward.applies(q, k, v, causal_window, score_fn, sink, sm_scale):
        out = out_like(q, DV)
        lse = row_buffer(B, HQ, SQ, q.device, row_slack(sq, bool_knob("row_select")))
        gluon_forward.causal_forward(q, k, v, out, lse, sm_scale, causal_window)
        return out, lse
    ahead = SCHEDULE["index_ahead"]
    if ahead not in ("none", "full", "both"):
        raise ValueError(f'SCHEDULE["index_ahead"] must be "none", "full" or "both", got {ahead!r}')
    t = fwd_tiles(DP, DVP, q.element_size(), sq, skv)
    out = out_like(q, DV)
    lse = row_buffer(B, HQ, SQ, q.device, row_slack(sq, bool_knob("row_select")))
    s_nb, s_nh, s_ib, s_ih, _ = tables.strides()
    k_desc, v_desc, k_desc_p, v_desc_p = forward_descriptors(q, k, v, t)
    heads_first = _per_mask("heads_first", packed_documents)
    attn_fwd_kernel[_grid(_cdiv(SQ, t.block_m), B * HQ, heads_first)](
        q, k, v, out, lse, sink if sink is not None else lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), lse.stride(0), lse.stride(1),
        tables.num, tables.idx, tables.full_num, tables.full_idx,
        s_nb, s_nh, s_ib, s_ih, tables.idx.shape[-1], *tables.half_tables(),
        SQ, SKV, HQ, HQ // HKV, sm_scale,
        mask_args, score_args,
        MASK_MOD=mask_fn,
        SCORE_MOD=score_fn,
        HAS_SINK=sink is not None,
        KV_DIVISIBLE=_divides(SKV, skv),
        TAIL_PARTIAL=tables.tail_partial,
        SPARSE_Q=sq,
        SPARSE_KV=skv,
        PARTIAL_KV=tables.partial_unit(skv, t.block_n, SCHEDULE["fwd_one_loop"]),
        BLOCK_M=t.block_m,
        BLOCK_N=t.block_n,
        BLOCK_N_FULL=t.block_n_full,
        D=D,
        DP=DP,
        DV=DV,
        DVP=DVP,
        DOT_PREC=_dot_prec(q.dtype),
        REVERSE_M=SCHEDULE["reverse_m"],
        AHEAD_PARTIAL=ahead == "both",
        AHEAD_FULL=ahead in ("both", "full"),
        K_DESC=k_desc,
        V_DESC=v_desc,
        K_DESC_PARTIAL=k_desc_p,
        V_DESC_PARTIAL=v_desc_p,
        ONE_LOOP=SCHEDULE["fwd_one_loop"],
        HEADS_FIRST=heads_first,
        num_warps=t.num_warps,
        num_stages=t.num_stages,
        **({"maxnreg": t.maxnreg} if t.maxnreg else {}),
    )
    return out, lse


def row_slack(sparse_q: int, selects: bool) -> int:
    """Elements the backward may read past the last row of LSE and delta where it reads them unmasked
    and selects past the end (``selects``: SCHEDULE row_select / varlen_row_select, backward.row_inputs),
    else 0: a tile of rows is at most the block mask's query block (block-sparse kernels) or 128 (the
    document-aligned tiles)."""
    return max(sparse_q, 128) if selects else 0


def row_buffer(B: int, H: int, S: int, device, slack: int) -> torch.Tensor:
    """An uninitialised, contiguous float32 [B, H, S] buffer (LSE, delta) with ``slack`` readable
    elements past its last row (0: a plain [B, H, S] tensor). The slack costs more than its bytes: the
    caching allocator rounds every block to 512 bytes and moves a 1 MiB buffer (16k tokens, 16 heads)
    to its large pool, and a 16k training step's peak grew by 7 MiB (NOTES.md, fourteenth round)."""
    if not slack:
        return torch.empty((B, H, S), dtype=torch.float32, device=device)
    return torch.empty(B * H * S + slack, dtype=torch.float32, device=device).as_strided((B, H, S), (H * S, S, 1))


def _has_slack(t: torch.Tensor, slack: int) -> bool:
    # t contiguous: its storage holds ``slack`` more elements past its last
    return t.untyped_storage().nbytes() >= (t.storage_offset() + t.numel() + slack) * t.element_size()


def backward_buffers(q, lse, dout, dlse, warmup: bool, slack: int):
    """(lse, dout, dlse, delta) as the backward kernels read them: dout and dlse with unit last
    strides, lse contiguous (the loops read lse and delta with lse's strides) with ``slack`` readable
    elements past its last row (row_buffer: the forwards allocate it so; any other is copied), and
    delta, the one per-row buffer, as torch's flex backward allocates, with the same slack (lse itself
    stands in for it in a warm-up, which launches nothing). ``slack`` 0: no slack needed."""
    B, HQ, SQ = q.shape[:3]
    dout = dout.contiguous() if dout.stride(-1) != 1 else dout
    if lse.stride() != (HQ * SQ, SQ, 1) or not (warmup or _has_slack(lse, slack)):
        lse = row_buffer(B, HQ, SQ, lse.device, slack).copy_(lse)
    delta = lse if warmup else row_buffer(B, HQ, SQ, q.device, slack)
    if dlse is not None and dlse.stride(-1) != 1:
        dlse = dlse.contiguous()
    return lse, dout, dlse, delta


def backward_descriptors(q, k, v, dout, t: Tiles, t2: Tiles):
    """Tensor descriptors (or None) of Q and dO for the dK/dV programs' tiles ``t`` and of K and V for
    the dQ programs' tiles ``t2``, where SCHEDULE["bwd_tma"] and the tiles allow TMA."""
    B, HQ, HKV, SQ, SKV, D, DV, DP, DVP = _common(q, k, v)
    q_desc = do_desc = k_desc = v_desc = None
    if SCHEDULE["bwd_tma"] and t.tma:
        q_desc, do_desc = _tma_descriptors(q, dout, D, DP, DV, DVP, t.block_m)
    if SCHEDULE["bwd_tma"] and t2.tma:
        k_desc, v_desc = _tma_descriptors(k, v, D, DP, DV, DVP, t2.block_n)
    return q_desc, do_desc, k_desc, v_desc


def dp_first(knob: str, dp: int, dvp: int) -> bool:
    """SCHEDULE[knob] (bwd_dp_first, varlen_dp_first) for padded head dims dp, dvp: True / False as
    set, or an int: whether both are at most that."""
    value = SCHEDULE[knob]
    if isinstance(value, bool):
        return value
    if not isinstance(value, int):
        raise ValueError(f'SCHEDULE["{knob}"] must be True, False or a head dim, got {value!r}')
    return max(dp, dvp) <= value


def loop_stages(knob: str):
    """SCHEDULE[knob] (bwd_full_stages, bwd_dq_full_stages) as a loop's num_stages constexpr: None for 0
    (the kernel's depth), else the depth (an int from 1 to 6)."""
    value = SCHEDULE[knob]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 6:
        raise ValueError(f'SCHEDULE["{knob}"] must be an int from 0 (the kernel\'s depth) to 6, got {value!r}')
    return value or None


def bool_knob(knob: str) -> bool:
    """SCHEDULE[knob], which must be True or False (it becomes a kernel's constexpr)."""
    value = SCHEDULE[knob]
    if not isinstance(value, bool):
        raise ValueError(f'SCHEDULE["{knob}"] must be True or False, got {value!r}')
    return value


def use_atomic_dq(knob: str, score_param_grad_fn) -> bool:
    """Whether the backward adds dQ with atomics (SCHEDULE[knob]): never for learnable score-mod
    tensors (their gradients come from the dQ programs) nor under torch.use_deterministic_algorithms."""
    return bool(SCHEDULE[knob]) and score_param_grad_fn is None and not torch.are_deterministic_algorithms_enabled()


def atomic_dq_buffer(q, d: int, dp: int, rows: int):
    """(float32 zeros [B, Hq, Sq, d], its tensor descriptor with [1, 1, rows, d] boxes or None): the
    accumulator the dK/dV programs add dQ into; the descriptor where SCHEDULE["atomic_dq_tma"] holds and
    TMA applies (has_tma, not Triton's interpreter; the buffer is contiguous and new)."""
    from . import interpreted

    acc = torch.zeros((*q.shape[:3], d), dtype=torch.float32, device=q.device)
    desc = None
    # not in Triton's interpreter, which has no bulk reduction (its CPU tests take the pointer atomics)
    if SCHEDULE["atomic_dq_tma"] and d == dp and has_tma(q.device) and not interpreted():
        desc = _descriptor(acc, list(acc.shape), list(acc.stride()), [1, 1, rows, d])
    return acc, desc


def delta_pass(go, out, dout, dlse, delta) -> None:
    """delta = rowsum(dO * O) - dLSE ([B, Hq, Sq] float32), through ``go`` (kernels.launcher)."""
    B, HQ, SQ, DV = out.shape
    dm = 64
    go(attn_bwd_delta_kernel, (_cdiv(SQ, dm), B * HQ))(
        out, dout, dlse if dlse is not None else delta, delta,
        *out.stride(), *dout.stride(),
        *(dlse.stride()[:2] if dlse is not None else (0, 0)), delta.stride(0), delta.stride(1),
        SQ, HQ, BLOCK_M=dm, DV=DV, DVP=_pow2(max(DV, 16)), HAS_DLSE=dlse is not None,
    )


def gluon_allowed(q) -> bool:
    """Whether SCHEDULE lets this call take a Gluon backward: B * Hq * S of q at least
    SCHEDULE["gluon_min_rows"], and q contiguous or (the token-major layout gluon_causal.layout accepts)
    SCHEDULE["gluon_token_major"] on."""
    min_rows = SCHEDULE["gluon_min_rows"]
    if isinstance(min_rows, bool) or not isinstance(min_rows, int) or min_rows < 0:
        raise ValueError(f'SCHEDULE["gluon_min_rows"] must be an int >= 0, got {min_rows!r}')
    B, H, S = q.shape[:3]
    if B * H * S < min_rows:
        return False
    return q.is_contiguous() or bool_knob("gluon_token_major")


def gluon_row_inputs(q, out, lse, dout, dlse, warmup: bool = False):
    """(lse2, dout, delta) as the Gluon backwards (gluon_causal, gluon_varlen) read them: backward_buffers
    without slack (their row loads are exact) and delta = rowsum(dO O) - dLSE by delta_pass (``warmup``:
    its kernel compiled, not launched; lse stands in for delta)."""
    lse, dout, dlse, delta = backward_buffers(q, lse, dout, dlse, warmup, 0)
    delta_pass(launcher(warmup), out, dout, dlse, delta)
    return lse, dout, delta


def flex_backward(
    q, k, v, out, lse, dout, fwd_tables: MaskTables, bwd_tables: MaskTables, sparse,
    mask_fn, mask_args, score_fn, score_args, score_grad_fn, score_param_grad_fn, score_grads, sm_scale,
    dlse=None, mask_fn_by_key=None, packed_documents: bool = False, causal_window: Optional[int] = None,
    warmup: bool = False,
):
    """Returns (dq, dk, dv, delta); adds learnable score-mod gradients into ``score_grads`` (float64).

    ``warmup``: compile the backward's kernels for these arguments and launch nothing (Triton's
    ``JITFunction.warmup``; returns None): ``dout`` may then be a stand-in of the real gradient's layout
    (the forward's output), and the outputs are not allocated (q, k, v and lse stand in for dq, dk, dv
    and delta: the same dtypes, strides and alignment, which is what the compiled variant depends on).

    ``lse``: flex_forward's lse2 (log2 units, +inf for a row with no allowed key).

    ``mask_fn_by_key``: the dK/dV pass's form of ``mask_fn`` (MaskMod.kernel_fn_by_key); None: mask_fn.
    ``packed_documents``: the mask holds packed documents, for SCHEDULE["bwd_flat_group"] == "documents".
    ``causal_window``: the mask is causal over S x S, within a sliding window of that many keys (S:
    plain causal; KernelSpec.causal_window); None: any other mask. With SCHEDULE["gluon_bwd"] (and
    SCHEDULE["gluon_bwd_sliding"] for a window shorter than S), inputs gluon_causal.applies accepts run
    the Gluon passes instead (a warm-up compiles them: the Gluon kernels' compile is seconds of a first
    training step, NOTES.md, eighteenth round).

    ``dlse`` [B, Hq, Sq] (the gradient reaching the returned LSE) folds into delta: since
    d lse / d s = P, dS = P * (dP - (delta - dlse)). The returned delta includes it.
    """
    if causal_window is not None and causal_window < k.shape[2] and not SCHEDULE["gluon_bwd_sliding"]:
        causal_window = None
    if (SCHEDULE["gluon_bwd"] and score_param_grad_fn is None and gluon_allowed(q)
            and gluon_causal.applies(q, k, v, causal_window, score_fn, SCHEDULE["gluon_bwd_head_dims"])):
        lse, dout, delta = gluon_row_inputs(q, out, lse, dout, dlse, warmup)
        grads = gluon_causal.causal_backward(q, k, v, dout, lse, delta, sm_scale, causal_window,
                                             concurrent=SCHEDULE["gluon_bwd_streams"], warmup=warmup,
                                             tiles=SCHEDULE["gluon_bwd_tiles"])
        return None if warmup else (*grads, delta)
    B, HQ, HKV, SQ, SKV, D, DV, DP, DVP = _common(q, k, v)
    sq, skv = sparse
    t = dkdv_tiles(DP, DVP, q.element_size(), sq, skv)
    t2 = dq_tiles(DP, DVP, q.element_size(), sq, skv)
    row_select = bool_knob("row_select")
    lse, dout, dlse, delta = backward_buffers(q, lse, dout, dlse, warmup, row_slack(sq, row_select))

    go = launcher(warmup)
    delta_pass(go, out, dout, dlse, delta)
    atomic = use_atomic_dq("atomic_dq", score_param_grad_fn)
    q_desc, do_desc, k_desc, v_desc = backward_descriptors(q, k, v, dout, t, t2)
    dq, dk, dv = (q, k, v) if warmup else (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    prec = _dot_prec(q.dtype)
    c_nb, c_nh, c_ib, c_ih, c_ik = bwd_tables.strides()
    r_nb, r_nh, r_ib, r_ih, r_iq = fwd_tables.strides()
    n_kv, n_q = _cdiv(SKV, t.block_n), _cdiv(SQ, t2.block_m)
    heads_first = SCHEDULE["bwd_heads_first"]
    one_loop = SCHEDULE["bwd_one_loop"]
    # the flat GQA loop (measured +3 % on packed documents) and the index loaded a step ahead exclude
    # each other (_dkdv_inner's FLAT): where the flat loop applies, it wins
    flat_group = (_per_mask("bwd_flat_group", packed_documents) and HQ > HKV and bwd_tables.num.shape[1] == 1
                  and not one_loop)
    common = dict(
        MASK_MOD=mask_fn, SCORE_MOD=score_fn, SCORE_GRAD=score_grad_fn,
        KV_DIVISIBLE=_divides(SKV, skv), SPARSE_Q=sq, SPARSE_KV=skv,
        # both tables come from one BlockMask: full blocks past the end in neither or both
        TAIL_PARTIAL=fwd_tables.tail_partial and bwd_tables.tail_partial,
        D=D, DP=DP, DV=DV, DVP=DVP, DOT_PREC=prec, num_warps=t.num_warps, num_stages=t.num_stages,
        AHEAD_FULL=bool_knob("bwd_index_ahead") and not flat_group, ONE_LOOP=one_loop, HEADS_FIRST=heads_first,
    )
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    by_key = mask_fn_by_key if mask_fn_by_key is not None else mask_fn
    dpf = dp_first("bwd_dp_first", DP, DVP)
    full_stages, dq_full_stages = loop_stages("bwd_full_stages"), loop_stages("bwd_dq_full_stages")
    partial_q = bwd_tables.partial_unit(sq, t.block_m, one_loop)  # dK/dV: query halves

    def dkdv_pass(dq_out, atomic_dq: bool, dq_desc=None):
        # the dK/dV launch of the two-launch form; ATOMIC_DQ: it also adds dQ into dq_out (float32)
        go(attn_bwd_dkdv_kernel, _grid(n_kv, B * HKV, heads_first))(
            q, k, v, dout, dk, dv, lse, delta,
            *strides, *dk.stride(), *dv.stride(), lse.stride(0), lse.stride(1),
            bwd_tables.num, bwd_tables.idx, bwd_tables.full_num, bwd_tables.full_idx, c_nb, c_nh, c_ib, c_ih, c_ik,
            *bwd_tables.half_tables(),
            SQ, SKV, HKV, HQ // HKV, sm_scale,
            mask_args, score_args, dq_out, *dq_out.stride(),
            Q_DIVISIBLE=_divides(SQ, sq), BLOCK_M=t.block_m, BLOCK_N=t.block_n, ATOMIC_DQ=atomic_dq, PARTIAL_Q=partial_q,
            Q_DESC=q_desc, DO_DESC=do_desc, FLAT_GROUP=flat_group, DQ_DESC=dq_desc, DP_FIRST=dpf,
            ROW_SELECT=row_select, FULL_STAGES=full_stages, **dict(common, MASK_MOD=by_key),
        )

    if atomic:
        if warmup:
            return None  # its float32 accumulator is not worth allocating to compile ahead
        dq_acc, dq_desc = atomic_dq_buffer(q, D, DP, t.block_m)
        dkdv_pass(dq_acc, True, dq_desc)
        return dq.copy_(dq_acc), dk, dv, delta
    if SCHEDULE["fused_bwd"] and (t.num_warps, t.num_stages) == (t2.num_warps, t2.num_stages):
        n_dkdv = n_kv * B * HKV
        go(attn_bwd_kernel, (n_dkdv + n_q * B * HQ,))(
            q, k, v, dout, dq, dk, dv, lse, delta,
            *strides, *dq.stride(), *dk.stride(), *dv.stride(), lse.stride(0), lse.stride(1),
            bwd_tables.num, bwd_tables.idx, bwd_tables.full_num, bwd_tables.full_idx, c_nb, c_nh, c_ib, c_ih, c_ik,
            fwd_tables.num, fwd_tables.idx, fwd_tables.full_num, fwd_tables.full_idx, r_nb, r_nh, r_ib, r_ih, r_iq,
            *bwd_tables.half_tables(), *fwd_tables.half_tables(),
            SQ, SKV, HQ, HKV, HQ // HKV, sm_scale,
            n_dkdv, n_kv, n_q,
            mask_args, score_args, score_grads,
            SCORE_PARAM_GRAD=score_param_grad_fn, Q_DIVISIBLE=_divides(SQ, sq),
            PARTIAL_Q=partial_q, PARTIAL_KV=fwd_tables.partial_unit(skv, t2.block_n, one_loop),
            DKDV_BLOCK_M=t.block_m, DKDV_BLOCK_N=t.block_n, DQ_BLOCK_M=t2.block_m, DQ_BLOCK_N=t2.block_n,
            REVERSE_M=SCHEDULE["reverse_m"], INTERLEAVE=SCHEDULE["bwd_interleave"], MASK_MOD_BY_KEY=by_key,
            Q_DESC=q_desc, DO_DESC=do_desc, K_DESC=k_desc, V_DESC=v_desc, FLAT_GROUP=flat_group,
            DP_FIRST=dpf, ROW_SELECT=row_select, FULL_STAGES=full_stages, DQ_FULL_STAGES=dq_full_stages, **common,
        )
        return None if warmup else (dq, dk, dv, delta)
    dkdv_pass(dq, False)  # dq: not written here (the dQ launch below writes it)
    common.update(num_warps=t2.num_warps, num_stages=t2.num_stages)
    go(attn_bwd_dq_kernel, _grid(n_q, B * HQ, heads_first))(
        q, k, v, dout, dq, lse, delta,
        *strides, *dq.stride(), lse.stride(0), lse.stride(1),
        fwd_tables.num, fwd_tables.idx, fwd_tables.full_num, fwd_tables.full_idx, r_nb, r_nh, r_ib, r_ih, r_iq,
        *fwd_tables.half_tables(),
        SQ, SKV, HQ, HQ // HKV, sm_scale,
        mask_args, score_args, score_grads,
        SCORE_PARAM_GRAD=score_param_grad_fn, BLOCK_M=t2.block_m, BLOCK_N=t2.block_n,
        PARTIAL_KV=fwd_tables.partial_unit(skv, t2.block_n, one_loop),
        REVERSE_M=SCHEDULE["reverse_m"], K_DESC=k_desc, V_DESC=v_desc, **common,
    )
    return None if warmup else (dq, dk, dv, delta)


def natural_lse(lse2: torch.Tensor) -> torch.Tensor:
    """flex_forward's lse2 as the user sees it: natural log, -inf for a row with no allowed key."""
    return torch.where(lse2 == float("inf"), float("-inf"), lse2 * LN2)


def count_variants(kernels) -> int:
    """How many compiled variants of these Triton kernels exist in this process (for recompile checks)."""
    return sum(len(entry[0]) for fn in kernels for entry in getattr(fn, "device_caches", {}).values())


def compiled_variants() -> int:
    """How many compiled variants of the attention kernels (block-sparse, document-aligned, the Gluon
    forward and backwards) exist in this process."""
    from . import gluon_varlen
    from .varlen import attn_bwd_varlen_kernel, attn_fwd_varlen_kernel

    kernels = [attn_fwd_kernel, attn_bwd_delta_kernel, attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_kernel,
               attn_fwd_varlen_kernel, attn_bwd_varlen_kernel]
    if gluon_causal.AVAILABLE:
        kernels += [gluon_causal.attn_bwd_dkdv_causal_kernel, gluon_causal.attn_bwd_dq_causal_kernel,
                    gluon_varlen.attn_bwd_dkdv_varlen_kernel, gluon_varlen.attn_bwd_dq_varlen_kernel,
                    gluon_forward.attn_fwd_causal_kernel, gluon_varlen.attn_fwd_varlen_gluon_kernel]
    return count_variants(kernels)
