"""BlockMask: which key blocks each query block must visit, and whether the mask must be evaluated there.

A [Q_LEN, KV_LEN] mask is cut into blocks of Q_BLOCK x KV_BLOCK positions. Each block is

* empty   - the mask is False everywhere: the kernels never visit it;
* full    - True everywhere (inside the lengths): visited, mask_mod is *not* evaluated;
* partial - mixed: visited, mask_mod is evaluated on every element.

Tables (int32; the leading dims are [Bm, Hm] with Bm in {1, B} and Hm in {1, Hq}, 1 meaning broadcast):

==========================  ====================  ==========================================
kv_num_blocks               [Bm, Hm, nQ]           partial key blocks per query block
kv_indices                  [Bm, Hm, nQ, nKV]      their indices, ascending (row prefix valid)
full_kv_num_blocks          [Bm, Hm, nQ]           full key blocks per query block
full_kv_indices             [Bm, Hm, nQ, nKV]
q_num_blocks, q_indices     [Bm, Hm, nKV(, nQ)]    the transpose (key-major), for dK/dV
full_q_num_blocks, ...      [Bm, Hm, nKV(, nQ)]
==========================  ====================  ==========================================

The forward and dQ kernels walk rows of the kv tables; the dK/dV kernel walks rows of the q tables.

Optional half-block tables (the packed builder writes them, every other builder leaves them None):
``kv_half_num`` [Bm, 1, nQ] / ``kv_half_idx`` [Bm, 1, nQ, 2 nKV] list, per query block, the halves
(KV_BLOCK / 2 keys, numbered 2 j and 2 j + 1 in key block j) of its *partial* key blocks that hold at
least one allowed pair, ascending, then the other halves; ``q_half_num`` / ``q_half_idx`` the same per
key block over the halves of its partial query blocks. The kernels' partial-block loops, which walk
half-block tiles anyway, then skip the dead halves at document boundaries (full blocks stay whole).
Building costs O(number of blocks) memory. Three builders:

* packed (CUDA): packed documents AND causal / sliding window (``hf_flex.documents``): one Triton
  kernel reads the document ids at block edges;
* structural: the mask_mod's ``block_fn`` classifies blocks from their edges (every built-in mask and
  their combinations have one): a few torch ops on [nQ, nKV] tensors, no host sync;
* generic: the mask_mod is evaluated on every (q, kv), O(Q_LEN * KV_LEN) time: one Triton kernel on the
  GPU (no [Q, KV] tensor), slabs of the PyTorch twin on the CPU.

``BlockMask.builder`` says which one built a mask ("packed", "structural", "triton", "torch";
"classes" for :func:`block_mask_from_classes`). On CUDA one more Triton kernel turns block classes
into the eight tables (elsewhere two sorts).
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Tuple, Union

import torch

from . import mods as _mods
from .modtypes import MaskMod

__all__ = ["BlockMask", "create_block_mask", "block_mask_from_classes"]

EMPTY, PARTIAL, FULL = 0, 1, 2

logger = logging.getLogger(__name__)


def _carve(device, pieces):
    """Uninitialised int32 tables carved out of one allocation: per (shape, copies) of ``pieces``, a
    [copies, *shape] view whose copies are each contiguous and start 128-byte aligned (copies == 1:
    the [*shape] view itself).

    The kernels take each table as a pointer, and Triton specialises on a pointer's 16-byte alignment:
    a table starting mid-allocation would compile other kernel variants for some lengths. One
    allocation, because the packed path builds its tables once per training batch and host time is
    its cost."""
    rows = [-(-math.prod(shape) // 32) * 32 for shape, _ in pieces]
    buf = torch.empty(sum(k * row for (_, k), row in zip(pieces, rows)), dtype=torch.int32, device=device)
    out, off = [], 0
    for (shape, k), row in zip(pieces, rows):
        if k == 1:
            out.append(buf[off: off + math.prod(shape)].view(shape))
        else:  # one as_strided for the copies
            strides = [row] + [1] * len(shape)
            for i in range(len(shape) - 2, -1, -1):
                strides[i + 1] = strides[i + 2] * shape[i + 1]
            out.append(buf.as_strided((k, *shape), strides, off))
        off += k * row
    return tuple(out)


def _pair_shapes(Bm, Hm, nq, nkv):
    return ((Bm, Hm, nq), (Bm, Hm, nq, nkv), (Bm, Hm, nkv), (Bm, Hm, nkv, nq))


def _half_shapes(Bm, nq, nkv):
    return ((Bm, 1, nq), (Bm, 1, nq, 2 * nkv), (Bm, 1, nkv), (Bm, 1, nkv, 2 * nq))


def table_buffers(Bm: int, Hm: int, nq: int, nkv: int, device):
    """Uninitialised int32 (kv_num [2, Bm, Hm, nQ], kv_idx [2, Bm, Hm, nQ, nKV], q_num [2, Bm, Hm, nKV],
    q_idx [2, Bm, Hm, nKV, nQ]): the eight tables as pairs (half 0 partial, half 1 full), carved out of
    one allocation, each half contiguous and starting 128-byte aligned (:func:`_carve`)."""
    return _carve(device, [(shape, 2) for shape in _pair_shapes(Bm, Hm, nq, nkv)])


def half_buffers(Bm: int, nq: int, nkv: int, device):
    """Uninitialised int32 (kv_half_num [Bm, 1, nQ], kv_half_idx [Bm, 1, nQ, 2 nKV], q_half_num [Bm, 1, nKV],
    q_half_idx [Bm, 1, nKV, 2 nQ]) from one allocation, each contiguous and 128-byte aligned (see
    :func:`table_buffers`). An index table's strides are twice those of the whole-block table of its
    direction at Hm = 1: the kernels find a row at twice the whole-block row's offset."""
    return _carve(device, [(shape, 1) for shape in _half_shapes(Bm, nq, nkv)])


def tables_and_halves(Bm: int, nq: int, nkv: int, device):
    """(:func:`table_buffers` at Hm = 1, :func:`half_buffers`) carved out of one allocation."""
    got = _carve(device, [(shape, 2) for shape in _pair_shapes(Bm, 1, nq, nkv)]
                 + [(shape, 1) for shape in _half_shapes(Bm, nq, nkv)])
    return got[:4], got[4:]


def _tables(skip: torch.Tensor, num: torch.Tensor, idx: torch.Tensor) -> None:
    """Fill counts ``num`` [2, ..., R] and ascending indices ``idx`` [2, ..., R, C] of the zero entries
    of a [2, ..., R, C] uint8 tensor (the sort-based builder of the tables)."""
    num.copy_(skip.shape[-1] - skip.sum(-1, dtype=torch.int32))
    # a stable sort of "skip" puts the selected columns first, in ascending order, then the others
    # (also in range: the kernels may prefetch past a row's count)
    idx.copy_(torch.argsort(skip, dim=-1, stable=True))


# every table a BlockMask holds (the half-block ones may be None)
TABLE_NAMES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
               "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices",
               "kv_half_num", "kv_half_idx", "q_half_num", "q_half_idx")


class BlockMask:
    """Block-sparse description of an attention mask (see the module docstring for the tables).

    Build one with :func:`create_block_mask` (any mask_mod) or :func:`block_mask_from_classes`
    (block classes computed elsewhere, e.g. from document boundaries). Debug helpers: ``sparsity()``,
    ``to_dense()`` (block level), ``to_string()`` (an ASCII picture), ``materialize()`` (element level,
    small masks only).
    """

    # Half-block tables of the partial blocks (module docstring), kv_half_num, kv_half_idx, q_half_num,
    # q_half_idx, or None: the packed builder's only. Anything that makes a new BlockMask from this
    # one's whole-block tables leaves them None. Instance attributes (never class defaults), so that a
    # deferred BlockMask (:meth:`deferred`) builds them on first access like the other tables.

    def __init__(
        self,
        kv_num_blocks: torch.Tensor,
        kv_indices: torch.Tensor,
        full_kv_num_blocks: torch.Tensor,
        full_kv_indices: torch.Tensor,
        q_num_blocks: torch.Tensor,
        q_indices: torch.Tensor,
        full_q_num_blocks: torch.Tensor,
        full_q_indices: torch.Tensor,
        *,
        seq_lengths: Tuple[int, int],
        block_size: Tuple[int, int],
        mask_mod: MaskMod,
        builder: str = "classes",
        tail_partial: bool = False,
    ):
        Bm, Hm, nq = kv_num_blocks.shape
        q_len, kv_len = (int(x) for x in seq_lengths)
        qb, kb = (int(x) for x in block_size)
        nkv = -(-kv_len // kb)
        expect = {
            "kv_num_blocks": (Bm, Hm, nq),
            "kv_indices": (Bm, Hm, nq, nkv),
            "full_kv_num_blocks": (Bm, Hm, nq),
            "full_kv_indices": (Bm, Hm, nq, nkv),
            "q_num_blocks": (Bm, Hm, nkv),
            "q_indices": (Bm, Hm, nkv, nq),
            "full_q_num_blocks": (Bm, Hm, nkv),
            "full_q_indices": (Bm, Hm, nkv, nq),
        }
        got = dict(
            kv_num_blocks=kv_num_blocks,
            kv_indices=kv_indices,
            full_kv_num_blocks=full_kv_num_blocks,
            full_kv_indices=full_kv_indices,
            q_num_blocks=q_num_blocks,
            q_indices=q_indices,
            full_q_num_blocks=full_q_num_blocks,
            full_q_indices=full_q_indices,
        )
        if nq != -(-q_len // qb):
            raise ValueError(f"BlockMask: kv_num_blocks has {nq} query blocks, expected ceil({q_len}/{qb})")
        for name, t in got.items():
            if tuple(t.shape) != expect[name]:
                raise ValueError(f"BlockMask: {name} has shape {tuple(t.shape)}, expected {expect[name]}")
            if t.dtype != torch.int32:
                raise ValueError(f"BlockMask: {name} must be int32, got {t.dtype}")
            if t.device != kv_num_blocks.device:
                raise ValueError(f"BlockMask: {name} is on {t.device}, kv_num_blocks on {kv_num_blocks.device}")
        if not isinstance(mask_mod, MaskMod):
            raise TypeError(f"BlockMask: mask_mod must be a MaskMod, got {type(mask_mod).__name__}")
        for name, t in got.items():
            setattr(self, name, t.contiguous())
        self.kv_half_num = self.kv_half_idx = self.q_half_num = self.q_half_idx = None
        self.seq_lengths = (q_len, kv_len)
        self.BLOCK_SIZE = (qb, kb)
        self.mask_mod = mask_mod
        # which builder made the tables: "packed", "structural", "triton", "torch" or "classes" (debugging)
        self.builder = builder
        # True when no full block reaches past the lengths (the builders of this package list such a
        # ragged last block partial): the kernels then visit full blocks without checking keys or
        # queries past the end. Tables made elsewhere keep False, and the checks.
        self.tail_partial = bool(tail_partial)

    @classmethod
    def from_pairs(cls, kv_num, kv_idx, q_num, q_idx, seq_lengths, block_size, mask_mod, builder,
                   halves=None) -> "BlockMask":
        """From the table pairs of :func:`table_buffers`, filled by a builder of this package: no checks
        (the constructor's cost tens of microseconds, a per-batch cost on the packed path).
        ``halves``: the four tables of :func:`half_buffers`, filled, or None."""
        self = cls.__new__(cls)
        self.kv_num_blocks, self.full_kv_num_blocks = kv_num.unbind(0)
        self.kv_indices, self.full_kv_indices = kv_idx.unbind(0)
        self.q_num_blocks, self.full_q_num_blocks = q_num.unbind(0)
        self.q_indices, self.full_q_indices = q_idx.unbind(0)
        self.seq_lengths = seq_lengths
        self.BLOCK_SIZE = block_size
        self.mask_mod = mask_mod
        self.builder = builder
        self.tail_partial = True  # both builders list a full block past the lengths as partial
        self.kv_half_num, self.kv_half_idx, self.q_half_num, self.q_half_idx = halves if halves is not None else (None,) * 4
        return self

    @classmethod
    def deferred(cls, build, batch_heads, device, seq_lengths, block_size, mask_mod, builder) -> "BlockMask":
        """A BlockMask whose tables ``build()`` (a BlockMask of the same mask) makes on their first
        access, not before. The document-aligned kernels (hf_flex/kernels/varlen.py) read none of
        them: causal attention over packed documents then never builds them (their memory and the
        builder's launches saved); anything else that reads one (the block-sparse kernels, to_dense,
        ...) builds all at once. ``batch_heads`` (Bm, Hm) and ``device`` answer shape and device
        without building."""
        self = cls.__new__(cls)
        self.seq_lengths, self.BLOCK_SIZE, self.mask_mod, self.builder = seq_lengths, block_size, mask_mod, builder
        self.tail_partial = True
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # where "cuda" allocates: the current device
            device = torch.device("cuda", torch.cuda.current_device())
        self._deferred = (build, tuple(batch_heads), device)
        return self

    def __getattr__(self, name):
        # reached only where normal lookup fails: a table of a deferred BlockMask not built yet
        d = self.__dict__.get("_deferred")
        if d is None or name not in TABLE_NAMES:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        built = d[0]()
        for n in TABLE_NAMES:
            setattr(self, n, getattr(built, n))
        self.tail_partial = built.tail_partial
        del self.__dict__["_deferred"]
        return getattr(self, name)

    @property
    def tables_built(self) -> bool:
        """False for a :meth:`deferred` BlockMask none of whose tables was read yet."""
        return "_deferred" not in self.__dict__

    # --- shape and device -------------------------------------------------------------------------
    @property
    def shape(self) -> Tuple[int, int, int, int]:
        d = self.__dict__.get("_deferred")
        Bm, Hm = d[1] if d is not None else self.kv_num_blocks.shape[:2]
        return (Bm, Hm, self.seq_lengths[0], self.seq_lengths[1])

    @property
    def device(self) -> torch.device:
        d = self.__dict__.get("_deferred")
        return d[2] if d is not None else self.kv_num_blocks.device

    def to(self, device) -> "BlockMask":
        """A copy with the tables on ``device`` (the mask_mod's own tensors are not moved)."""
        names = (
            "kv_num_blocks kv_indices full_kv_num_blocks full_kv_indices "
            "q_num_blocks q_indices full_q_num_blocks full_q_indices"
        ).split()
        return BlockMask(
            *(getattr(self, n).to(device) for n in names),
            seq_lengths=self.seq_lengths,
            block_size=self.BLOCK_SIZE,
            mask_mod=self.mask_mod,
            builder=self.builder,
            tail_partial=self.tail_partial,
        )

    # --- debugging --------------------------------------------------------------------------------
    def to_dense(self) -> torch.Tensor:
        """Block classes [Bm, Hm, nQ, nKV] int8: 0 empty, 1 partial, 2 full (rebuilt from the kv tables)."""
        Bm, Hm, nq = self.kv_num_blocks.shape
        nkv = self.kv_indices.shape[-1]
        out = torch.zeros((Bm, Hm, nq, nkv), dtype=torch.int8, device=self.device)
        col = torch.arange(nkv, device=self.device)
        for num, idx, val in (
            (self.kv_num_blocks, self.kv_indices, PARTIAL),
            (self.full_kv_num_blocks, self.full_kv_indices, FULL),
        ):
            keep = col < num[..., None]
            src = torch.where(keep, torch.full_like(idx, val, dtype=torch.int8), torch.zeros_like(idx, dtype=torch.int8))
            out.scatter_add_(-1, idx.long(), src)
        return out

    def sparsity(self) -> float:
        """Percentage of blocks (over all [Bm, Hm] rows) that are skipped."""
        d = self.to_dense()
        return 100.0 * (1.0 - (d > 0).sum().item() / max(d.numel(), 1))

    def density(self) -> float:
        """Fraction of blocks visited (partial + full)."""
        return 1.0 - self.sparsity() / 100.0

    def to_string(self, max_blocks: int = 48, b: int = 0, h: int = 0) -> str:
        """ASCII picture of one [b, h] row: '#' full, '~' partial, '.' empty."""
        d = self.to_dense()[b, h].cpu()
        d = d[:max_blocks, :max_blocks]
        chars = {EMPTY: ".", PARTIAL: "~", FULL: "#"}
        return "\n".join("".join(chars[int(x)] for x in row) for row in d)

    def materialize(self) -> torch.Tensor:
        """The element-level mask [Bm, Hm, Q_LEN, KV_LEN] bool from the mask_mod's PyTorch twin.

        For debugging and tests on small shapes only: this is the S x S tensor the rest avoids.
        """
        Bm, Hm, q_len, kv_len = self.shape
        dev = self.device
        bi = torch.arange(Bm, device=dev).view(Bm, 1, 1, 1)
        hi = torch.arange(Hm, device=dev).view(1, Hm, 1, 1)
        qi = torch.arange(q_len, device=dev).view(1, 1, q_len, 1)
        ki = torch.arange(kv_len, device=dev).view(1, 1, 1, kv_len)
        m = self.mask_mod(bi, hi, qi, ki)
        return m.expand(Bm, Hm, q_len, kv_len)

    def __repr__(self):
        Bm, Hm, q_len, kv_len = self.shape
        head = (
            f"BlockMask(shape=(B={Bm}, H={Hm}, Q_LEN={q_len}, KV_LEN={kv_len}), "
            f"block_size={self.BLOCK_SIZE}, mask_mod={self.mask_mod.name}, "
            f"sparsity={self.sparsity():.2f}%)"
        )
        nq = self.kv_num_blocks.shape[-1]
        if nq <= 32 and self.kv_indices.shape[-1] <= 32:
            return head + "\n" + self.to_string()
        return head


def _check_block_size(BLOCK_SIZE) -> Tuple[int, int]:
    if isinstance(BLOCK_SIZE, int):
        bs = (BLOCK_SIZE, BLOCK_SIZE)
    elif isinstance(BLOCK_SIZE, (tuple, list)):
        bs = tuple(BLOCK_SIZE)
    else:
        raise ValueError(f"BLOCK_SIZE must be an int or a (Q_BLOCK, KV_BLOCK) pair, got {BLOCK_SIZE!r}")
    if len(bs) != 2:
        raise ValueError(f"BLOCK_SIZE must be an int or a (Q_BLOCK, KV_BLOCK) pair, got {BLOCK_SIZE!r}")
    for x in bs:
        if isinstance(x, bool) or not isinstance(x, int) or x < 16 or x & (x - 1):
            raise ValueError(f"BLOCK_SIZE must be powers of two >= 16, got {BLOCK_SIZE!r}")
    return bs


def _demote_ragged(classes: torch.Tensor, q_len: int, kv_len: int, qb: int, kb: int) -> torch.Tensor:
    """Classes with every full block that reaches past a length made partial (the torch form of
    kernels.block_tables.demote_ragged)."""
    from .kernels.block_tables import ragged_tail

    tail_q, tail_kv = ragged_tail(q_len, qb), ragged_tail(kv_len, kb)
    if tail_q < 0 and tail_kv < 0:
        return classes
    nq, nkv = classes.shape[-2:]
    row = torch.arange(nq, device=classes.device) == tail_q
    col = torch.arange(nkv, device=classes.device) == tail_kv
    past = row[:, None] | col[None, :]
    return torch.where((classes == FULL) & past, torch.full_like(classes, PARTIAL), classes)


def block_mask_from_classes(
    classes: torch.Tensor, q_len: int, kv_len: int, block_size, mask_mod: MaskMod
) -> BlockMask:
    """A BlockMask from block classes [Bm, Hm, nQ, nKV] (0 empty, 1 partial, 2 full).

    ``mask_mod`` must be the mask the classes describe: the kernels evaluate it in partial blocks.
    A full block that reaches past ``q_len`` or ``kv_len`` is listed partial (``tail_partial``).
    One Triton launch on CUDA (elsewhere two segmented sorts), O(blocks), no host sync.
    """
    qb, kb = _check_block_size(block_size)
    if classes.dim() != 4:
        raise ValueError(f"classes must be [Bm, Hm, nQ, nKV], got shape {tuple(classes.shape)}")
    kv_num, kv_idx, q_num, q_idx = table_buffers(*classes.shape, classes.device)
    if classes.device.type == "cuda":
        # one Triton launch fills all eight tables (the sorts below cost a dozen launches; under the
        # CPU interpreter the kernel is far slower than they are: tests run it on small shapes only)
        from .kernels.block_tables import tables_from_classes

        tables_from_classes(classes, q_len, kv_len, (qb, kb), kv_num, kv_idx, q_num, q_idx)
    else:
        classes = _demote_ragged(classes, q_len, kv_len, qb, kb)
        # [2, Bm, Hm, nQ, nKV], 0 where the partial (index 0) / full (index 1) tables list the block:
        # one sort per direction serves both kinds
        skip = torch.stack((classes != PARTIAL, classes != FULL)).view(torch.uint8)
        _tables(skip, kv_num, kv_idx)
        _tables(skip.transpose(-1, -2).contiguous(), q_num, q_idx)
    return BlockMask.from_pairs(kv_num, kv_idx, q_num, q_idx, (q_len, kv_len), (qb, kb), mask_mod, "classes")


def _kernels_runnable(device: torch.device) -> bool:
    from .dispatch import triton_runs_on

    return triton_runs_on(device)


def _classes_torch(mask_mod: MaskMod, Bm, Hm, q_len, kv_len, qb, kb, device) -> torch.Tensor:
    """Block classes from the PyTorch twin, a slab of query blocks at a time (bounded memory)."""
    nq, nkv = -(-q_len // qb), -(-kv_len // kb)
    out = torch.empty((Bm, Hm, nq, nkv), dtype=torch.int8, device=device)
    bi = torch.arange(Bm, device=device).view(Bm, 1, 1, 1)
    hi = torch.arange(Hm, device=device).view(1, Hm, 1, 1)
    kv_pad = nkv * kb
    ki = torch.arange(kv_pad, device=device)
    kv_valid = ki < kv_len
    ki = ki.clamp(max=kv_len - 1).view(1, 1, 1, kv_pad)
    rows = max(1, (1 << 24) // max(1, Bm * Hm * qb * kv_pad))  # query blocks per slab
    for s in range(0, nq, rows):
        e = min(nq, s + rows)
        qpos = torch.arange(s * qb, e * qb, device=device)
        q_valid = qpos < q_len
        qi = qpos.clamp(max=q_len - 1).view(1, 1, -1, 1)
        m = mask_mod(bi, hi, qi, ki).expand(Bm, Hm, qi.shape[2], kv_pad)
        valid = (q_valid[:, None] & kv_valid[None, :]).expand_as(m)
        m = m & valid
        shp = (Bm, Hm, e - s, qb, nkv, kb)
        n_allowed = m.reshape(shp).sum((3, 5))
        n_valid = valid.reshape(shp).sum((3, 5))
        cls = torch.where(n_allowed == 0, EMPTY, torch.where(n_allowed == n_valid, FULL, PARTIAL))
        out[:, :, s:e] = cls.to(torch.int8)
    return out


_edges_cache: dict = {}


def _block_edges(length: int, block: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """First and last position of each block of ``length`` positions: int64 [cdiv(length, block)] each.

    Cached per (length, block, device): building a mask every step then costs no op for them. The
    tensors are shared: block_fns must not modify their inputs.
    """
    key = (length, block, str(device))
    edges = _edges_cache.get(key)
    if edges is None:
        lo = torch.arange(0, length, block, dtype=torch.int64, device=device)
        edges = (lo, (lo + (block - 1)).clamp_(max=length - 1))
        if len(_edges_cache) > 64:
            _edges_cache.clear()
        _edges_cache[key] = edges
    return edges


def _classes_structural(mask_mod: MaskMod, B, H, q_len, kv_len, qb, kb, device) -> Optional[torch.Tensor]:
    """Block classes [Bm, Hm, nQ, nKV] (an expanded view) from ``mask_mod.block_fn``; None without one.

    A block_fn gives one row per batch entry when the mask depends on b, else one row that broadcasts;
    with ``B`` None the kernels read row 0 (the mask sees b = 0), and likewise for heads.
    """
    if mask_mod.block_fn is None:
        return None
    q_lo, q_hi = _block_edges(q_len, qb, device)
    kv_lo, kv_hi = _block_edges(kv_len, kb, device)
    classes = mask_mod.block_fn(q_lo[:, None], q_hi[:, None], kv_lo[None, :], kv_hi[None, :], *mask_mod.args)
    if classes is None:
        return None
    nq, nkv = q_lo.shape[0], kv_lo.shape[0]
    what = f"create_block_mask: block_fn of mask_mod {mask_mod.name}"
    if not isinstance(classes, torch.Tensor) or classes.dtype.is_floating_point or classes.dim() > 4:
        raise TypeError(f"{what} must return an integer tensor broadcastable to [B, H, {nq}, {nkv}] or None")
    classes = classes[(None,) * (4 - classes.dim())]
    if classes.shape[2] not in (1, nq) or classes.shape[3] not in (1, nkv):
        raise ValueError(f"{what} returned shape {tuple(classes.shape)}, expected [..., {nq}, {nkv}]")
    Bm, Hm = B or 1, H or 1
    for dim, (name, want) in enumerate((("B", Bm), ("H", Hm))):
        have = classes.shape[dim]
        if have != 1:
            if have < want:
                raise ValueError(f"{what} describes {have} rows along {name}, but {name}={want}")
            classes = classes.narrow(dim, 0, want)
    return classes.to(torch.int8).expand(Bm, Hm, nq, nkv)


@torch.compiler.disable  # Python-side building (codegen, caches): never traced
def create_block_mask(
    mask_mod: MaskMod,
    B: Optional[int],
    H: Optional[int],
    Q_LEN: int,
    KV_LEN: int,
    device: Union[str, torch.device, None] = None,
    BLOCK_SIZE: Union[int, Tuple[int, int]] = 128,
) -> BlockMask:
    """Build a BlockMask for any ``mask_mod``.

    Args:
        mask_mod: a :class:`MaskMod` (``hf_flex.mods`` or your own). ``None`` means no mask.
        B, H: batch size and number of *query* heads the mask varies over; ``None`` broadcasts
            (the mask_mod then sees b = 0 / h = 0).
        Q_LEN, KV_LEN: sequence lengths (any positive ints).
        device: where the tables live (default: CUDA if available, else CPU).
        BLOCK_SIZE: block size, or a (Q_BLOCK, KV_BLOCK) pair; powers of two >= 16.

    Packed documents (``document(ids)`` with non-decreasing ids) alone or AND causal / sliding window,
    on CUDA: one Triton kernel from the ids at block edges (see :mod:`hf_flex.documents`). Else,
    when the mask has a ``block_fn`` (the built-in masks and their combinations; ``document`` when its
    ids are packed), blocks are classified from their edges: O(blocks), a few torch ops, no host sync.
    Otherwise (the generic builder), on CUDA (or under TRITON_INTERPRET=1) the mask's Triton function
    is evaluated tile by tile by a Triton kernel, elsewhere its PyTorch twin over slabs of query blocks.
    None materialises the B*H*Q_LEN*KV_LEN mask. ``BlockMask.builder`` tells which one ran.
    """
    if mask_mod is None:
        mask_mod = _mods.noop()
    if not isinstance(mask_mod, MaskMod):
        raise TypeError(
            f"create_block_mask: mask_mod must be an hf_flex MaskMod (see hf_flex.mods), got {type(mask_mod).__name__}"
        )
    for name, v in (("B", B), ("H", H)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"create_block_mask: {name} must be a positive int or None, got {v!r}")
    for name, v in (("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"create_block_mask: {name} must be a positive int, got {v!r}")
    qb, kb = _check_block_size(BLOCK_SIZE)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    for t in mask_mod.tensors():
        if t.device.type != device.type:
            raise ValueError(
                f"create_block_mask: mask_mod {mask_mod.name} reads a tensor on {t.device}, but device={device}"
            )
    Bm, Hm = B or 1, H or 1
    from .documents import packed_tables  # (documents imports this module)

    bm = packed_tables(mask_mod, B, H, Q_LEN, KV_LEN, qb, kb, device)
    if bm is not None:
        return bm
    builder = "structural"
    classes = _classes_structural(mask_mod, B, H, Q_LEN, KV_LEN, qb, kb, device)
    if classes is None and _kernels_runnable(device):
        from .kernels.block_tables import classify_blocks

        builder = "triton"
        classes = classify_blocks(mask_mod.kernel_fn, mask_mod.args, Bm, Hm, Q_LEN, KV_LEN, qb, kb, device)
    elif classes is None:
        builder = "torch"
        classes = _classes_torch(mask_mod, Bm, Hm, Q_LEN, KV_LEN, qb, kb, device)
    logger.debug("create_block_mask: %s builder for %s", builder, mask_mod.name)
    bm = block_mask_from_classes(classes, Q_LEN, KV_LEN, (qb, kb), mask_mod)
    bm.builder = builder
    return bm


_full_cache: dict = {}


def full_block_mask(q_len: int, kv_len: int, device, block_size=(128, 128)) -> BlockMask:
    """Every block full (no mask), built directly and cached per (lengths, device)."""
    key = (q_len, kv_len, str(device), tuple(block_size))
    bm = _full_cache.get(key)
    if bm is None:
        qb, kb = block_size
        nq, nkv = -(-q_len // qb), -(-kv_len // kb)
        classes = torch.full((1, 1, nq, nkv), FULL, dtype=torch.int8, device=device)
        bm = block_mask_from_classes(classes, q_len, kv_len, block_size, _mods.noop())
        if len(_full_cache) > 64:
            _full_cache.clear()
        _full_cache[key] = bm
    return bm

