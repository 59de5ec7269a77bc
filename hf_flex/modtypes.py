"""MaskMod and ScoreMod: one attention variant as a Triton function plus its PyTorch twin.

A mod is *what* to compute; the kernels decide *where*. Each mod holds

* ``triton_fn``: a ``@triton.jit`` function the kernels inline into their tile loop,
* ``torch_fn``: its PyTorch twin, used by :mod:`hf_flex.reference` and the CPU paths,
* ``args``: the tensors and numbers it reads, passed to both as trailing positional arguments.

Signatures (``b``, ``h`` are scalars; ``q``, ``kv`` are absolute positions, int tiles or int64 tensors
that broadcast against each other; every function must be elementwise)::

    mask:   fn(b, h, q, kv, *args) -> bool
    score:  fn(score, b, h, q, kv, *args) -> score          (score is the *scaled* q.k, float32)

Because tensors arrive as arguments, changing their *values* never recompiles anything; only the
identity of the Triton functions (and the dtypes of the tensors) is part of the compiled kernel.

A mask may also carry ``block_fn``, a PyTorch function that classifies whole blocks from their first and
last positions (block classes: 0 empty, 1 partial, 2 full). With it, :func:`hf_flex.create_block_mask`
costs a few torch ops on [nQ, nKV] tensors instead of evaluating the mask on every (q, kv)::

    block:  block_fn(q_lo, q_hi, kv_lo, kv_hi, *args) -> int8 classes [B or 1, 1, nQ, nKV] (broadcastable), or None

Combinators (``and_masks``, ``or_masks``, ``offset``, ``chain``) write a small Triton function that calls
their children and register its source with :mod:`linecache`, so Triton can read and compile it like
any other. Generated functions are cached by structure: building the same combination again (for
example once per training batch) returns the same function and so never recompiles.
"""

from __future__ import annotations

import hashlib
import itertools
import linecache
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import triton
import triton.language as tl

__all__ = ["MaskMod", "ScoreMod", "generate_jit", "call_with_tuple", "block_classes"]

_counter = itertools.count()
_lock = threading.Lock()
_cache: dict = {}


def _full_name(fn) -> str:
    """The name Triton mangles a called function by: its module and qualified name."""
    f = getattr(fn, "fn", fn)
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', getattr(f, '__name__', '?'))}"


def _reached(fn) -> dict:
    """Full name -> object of every Triton function ``fn`` calls, itself included (generated functions
    carry theirs; any other is a leaf)."""
    return getattr(fn, "_hf_flex_reaches", None) or {_full_name(fn): fn}


def generate_jit(name: str, src: str, env: dict) -> Any:
    """Compile ``src`` (which defines ``name``) as a ``@triton.jit`` function with globals ``env``.

    The function is renamed ``name_<digest>`` (digest of ``src`` and of the full names of the functions
    it calls). Triton compiles each called function once per kernel *by name* (module, qualified name,
    argument types), so two different generated functions sharing a name would silently run one body
    for both: ``and(offset(a), offset(b))`` would evaluate ``a`` twice. The digest keeps names stable
    across processes, so Triton's on-disk cache still hits. Two different *user* functions with the same
    module and qualified name (e.g. made by one factory) cannot be told apart by Triton: combining them
    raises a ValueError instead of computing a wrong mask.

    The source is registered in :mod:`linecache` under a unique file name because Triton reads a
    function's source with :func:`inspect.getsource`.
    """
    reaches: dict = {}
    for key in sorted(env):
        if not is_jit(env[key]):
            continue
        for full, obj in _reached(env[key]).items():
            if reaches.setdefault(full, obj) is not obj:
                raise ValueError(
                    f"two different Triton functions are both named {full!r}; Triton compiles calls by "
                    "module and function name, so one would run in place of the other. Give them distinct "
                    "names (e.g. do not build several @triton.jit functions in one factory)"
                )
    deps = repr([(k, _full_name(v) if is_jit(v) else repr(v)) for k, v in sorted(env.items())])
    unique = f"{name}_{hashlib.sha1((src + deps).encode()).hexdigest()[:12]}"
    src, n = re.subn(rf"^def {re.escape(name)}\(", f"def {unique}(", src, flags=re.M)
    if n != 1:
        raise AssertionError(f"generate_jit: src must define {name} once")
    filename = f"<hf_flex generated {unique} #{next(_counter)}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    # a real module name: Triton inspects fn.__module__ of every function it compiles
    namespace = {"__name__": "hf_flex.generated", "triton": triton, "tl": tl, **env}
    exec(compile(src, filename, "exec"), namespace)
    fn = namespace[unique]
    reaches[_full_name(fn)] = fn
    fn._hf_flex_reaches = reaches
    return fn


def _cached(key, build: Callable[[], Any]):
    with _lock:
        fn = _cache.get(key)
        if fn is None:
            fn = build()
            _cache[key] = fn
        return fn


def call_with_tuple(fn, nargs: int, kind: str):
    """A Triton function taking ``(..., args)`` with ``args`` a tuple, that calls ``fn(..., *args)``.

    The kernels call every mod with one tuple argument; this adapter unpacks it. ``kind`` is
    "mask" (``b, h, q, kv``), "score" (``s, b, h, q, kv``), "score_grad" (``s, ds, b, h, q, kv``) or
    "score_param_grad" (``s, ds, b, h, q, kv, args, grads`` with two tuples).
    """

    def build():
        if kind == "score_param_grad":
            nargs_, ngrads = nargs
            a = ", ".join([f"args[{i}]" for i in range(nargs_)] + [f"grads[{i}]" for i in range(ngrads)])
            src = (
                "@triton.jit\n"
                "def score_param_grad_call(s, ds, b, h, q, kv, args, grads):\n"
                f"    fn(s, ds, b, h, q, kv{', ' + a if a else ''})\n"
            )
            return generate_jit("score_param_grad_call", src, {"fn": fn})
        lead = {"mask": "b, h, q, kv", "score": "s, b, h, q, kv", "score_grad": "s, ds, b, h, q, kv"}[kind]
        a = "".join(f", args[{i}]" for i in range(nargs))
        name = f"{kind}_call"
        src = f"@triton.jit\ndef {name}({lead}, args):\n    return fn({lead}{a})\n"
        return generate_jit(name, src, {"fn": fn})

    return _cached(("tuple", kind, fn, nargs), build)


def _check_args(args: Sequence, what: str) -> tuple:
    args = tuple(args)
    for i, a in enumerate(args):
        if isinstance(a, bool) or not isinstance(a, (torch.Tensor, int, float)):
            raise TypeError(f"{what}: args[{i}] must be a torch.Tensor, int or float, got {type(a).__name__}")
    return args


def block_classes(nonempty: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """int8 block classes (0 empty, 1 partial, 2 full) from two broadcasting bool tensors.

    ``nonempty``: the mask is True somewhere in the block; ``full``: True everywhere (implies nonempty).
    """
    return nonempty.to(torch.int8) + full


@dataclass(frozen=True, eq=False)
class MaskMod:
    """``mask_mod(b, h, q, kv) -> bool``: True where query ``q`` may attend to key ``kv``.

    Args:
        triton_fn: ``@triton.jit`` function ``(b, h, q, kv, *args) -> bool`` (elementwise).
        torch_fn: PyTorch twin with the same signature on broadcasting int64 tensors.
        args: tensors / ints / floats read by both functions (never baked into the compiled kernel).
        name: shown in ``repr`` and in block-mask pictures.
        block_fn: optional, the mask classified a block at a time, in PyTorch:
            ``block_fn(q_lo, q_hi, kv_lo, kv_hi, *args) -> classes``. ``q_lo``, ``q_hi`` are int64
            [nQ, 1]: the first and last absolute query position of each query block (already clipped to
            the length); ``kv_lo``, ``kv_hi`` [1, nKV] the same for key blocks. ``classes`` is int8,
            broadcastable to [Bm, 1, nQ, nKV] (Bm = 1 unless the mask depends on b, then one row per
            batch entry): 0 empty (False on every (q, kv) of the block), 2 full (True on every one), 1
            partial (anything else, or not sure). Empty and full must be exact: the kernels skip an
            empty block and do not evaluate the mask in a full one, so a wrong one is a silent wrong
            answer; partial is always safe. Return ``None`` to decline (the generic builder runs). It
            must not modify its inputs nor synchronise with the device. Without it (``None``),
            :func:`hf_flex.create_block_mask` evaluates the mask element by element.

    Example (a mask of your own in a few lines)::

        @triton.jit
        def _every_other(b, h, q, kv):
            return (kv <= q) & ((q - kv) % 2 == 0)

        every_other = MaskMod(_every_other, lambda b, h, q, kv: (kv <= q) & ((q - kv) % 2 == 0))

        # optional, for O(blocks) block masks: empty above the diagonal, "partial" (always safe) elsewhere
        def _every_other_blocks(q_lo, q_hi, kv_lo, kv_hi):
            nonempty = kv_lo <= q_hi
            return block_classes(nonempty, torch.zeros_like(nonempty))

        every_other = dataclasses.replace(every_other, block_fn=_every_other_blocks)
    """

    triton_fn: Any
    torch_fn: Callable
    args: tuple = ()
    name: str = "mask_mod"
    block_fn: Optional[Callable] = None
    # what the library's own mods are, for builders that specialise (hf_flex.documents): ("causal",),
    # ("window", w), ("noop",), ("packed_documents",) (its ids: args[0]) or ("and", (offset, child)...)
    # with each child's first argument at args[offset]; None for anything else. Tensors are never held
    # here, only positions in args: a copy with its args moved (dataclasses.replace) stays right.
    structure: Optional[tuple] = None
    # optional: the same predicate as triton_fn, written to read per-key data where triton_fn reads
    # per-query data. The dK/dV pass calls it: its loops fix a tile of keys and walk query tiles, so what
    # it reads by key is loaded once per program instead of once per tile (packed documents: measured in
    # tests/benchmarks/NOTES.md). It must equal triton_fn wherever both are defined.
    by_key_fn: Any = None

    def __post_init__(self):
        for nm in ("triton_fn", "by_key_fn"):
            f = getattr(self, nm)
            if (f is not None or nm == "triton_fn") and not isinstance(f, triton.runtime.jit.JITFunction) \
                    and not _is_interpreted(f):
                raise TypeError(f"MaskMod: {nm} must be a @triton.jit function, got {type(f).__name__}")
        if not callable(self.torch_fn):
            raise TypeError("MaskMod: torch_fn must be callable (the PyTorch twin)")
        if self.block_fn is not None and not callable(self.block_fn):
            raise TypeError("MaskMod: block_fn must be callable or None")
        object.__setattr__(self, "args", _check_args(self.args, f"MaskMod {self.name!r}"))

    def __call__(self, b, h, q, kv):
        """Evaluate the PyTorch twin on broadcasting index tensors."""
        return self.torch_fn(b, h, q, kv, *self.args)

    @property
    def kernel_fn(self):
        """The Triton function the kernels call, as ``fn(b, h, q, kv, args_tuple)``."""
        return call_with_tuple(self.triton_fn, len(self.args), "mask")

    @property
    def kernel_fn_by_key(self):
        """:attr:`kernel_fn` for loops over queries with the keys fixed (the dK/dV pass): by_key_fn's
        adapter where there is one, else kernel_fn itself."""
        return call_with_tuple(self.by_key_fn or self.triton_fn, len(self.args), "mask")

    def tensors(self) -> list[torch.Tensor]:
        return [a for a in self.args if isinstance(a, torch.Tensor)]

    def __repr__(self):
        return f"MaskMod({self.name})"


@dataclass(frozen=True, eq=False)
class ScoreMod:
    """``score_mod(score, b, h, q, kv) -> score`` on the scaled score, applied before the mask.

    Args:
        triton_fn: ``@triton.jit`` ``(s, b, h, q, kv, *args) -> s``; ``None`` for a mod that only adds
            sinks.
        torch_fn: PyTorch twin, same signature.
        args: tensors / ints / floats both read.
        name: for ``repr``.
        grad_fn: ``@triton.jit`` ``(s, ds, b, h, q, kv, *args) -> ds_in``: the derivative through the mod
            (``ds * d fn / d s``). ``None`` means the mod adds something to ``s`` (derivative 1).
        param_grad_fn: ``@triton.jit`` ``(s, ds, b, h, q, kv, *args, *grads)``: adds the gradient of the
            learnable tensors in ``args`` to their float64 buffers ``grads`` (one per learnable tensor, in
            order), with atomics. Required when any learnable tensor requires grad.
        learnable: indices into ``args`` of the tensors that may receive gradients.
        sink: per-head sink logits ``[Hq]`` (gpt-oss): one extra logit in each row's softmax
            denominator, carrying no value. Not an elementwise mod: the kernels handle it apart.
        approx: the same mod with faster Triton functions whose error stays within 16-bit rounding
            (softcap: the GPU's tanh.approx.f32), same ``args``. The kernels use it for 16-bit inputs
            on the GPU (``hf_flex.kernels.launch.SCHEDULE["approx_mods"]``); fp32 inputs and Triton's
            interpreter use the exact functions.
    """

    triton_fn: Any
    torch_fn: Optional[Callable]
    args: tuple = ()
    name: str = "score_mod"
    grad_fn: Any = None
    param_grad_fn: Any = None
    learnable: tuple = ()
    sink: Optional[torch.Tensor] = None
    approx: Optional["ScoreMod"] = None

    def __post_init__(self):
        object.__setattr__(self, "args", _check_args(self.args, f"ScoreMod {self.name!r}"))
        object.__setattr__(self, "learnable", tuple(self.learnable))
        if self.triton_fn is not None and not callable(self.torch_fn):
            raise TypeError("ScoreMod: torch_fn must be callable (the PyTorch twin)")
        for i in self.learnable:
            if not isinstance(self.args[i], torch.Tensor):
                raise TypeError(f"ScoreMod {self.name!r}: learnable index {i} is not a tensor")
        if self.sink is not None:
            if not isinstance(self.sink, torch.Tensor) or self.sink.dim() != 1:
                raise ValueError(f"ScoreMod {self.name!r}: sink must be a 1-D tensor [Hq]")
        if self.approx is not None and (not isinstance(self.approx, ScoreMod) or len(self.approx.args) != len(self.args)):
            raise ValueError(f"ScoreMod {self.name!r}: approx must be a ScoreMod taking the same args")

    def __call__(self, score, b, h, q, kv):
        """Evaluate the PyTorch twin (sinks are not elementwise and are not applied here)."""
        if self.torch_fn is None:
            return score
        return self.torch_fn(score, b, h, q, kv, *self.args)

    @property
    def has_elementwise(self) -> bool:
        return self.triton_fn is not None

    def learnable_tensors(self) -> list[torch.Tensor]:
        return [self.args[i] for i in self.learnable]

    def needs_param_grad(self) -> bool:
        return any(self.args[i].requires_grad for i in self.learnable)

    @property
    def kernel_fn(self):
        return call_with_tuple(self.triton_fn, len(self.args), "score")

    @property
    def kernel_grad_fn(self):
        """``fn(s, ds, b, h, q, kv, args)`` or None when the derivative is 1."""
        if self.grad_fn is None:
            return None
        return call_with_tuple(self.grad_fn, len(self.args), "score_grad")

    @property
    def kernel_param_grad_fn(self):
        if self.param_grad_fn is None:
            return None
        return call_with_tuple(self.param_grad_fn, (len(self.args), len(self.learnable)), "score_param_grad")

    def __repr__(self):
        return f"ScoreMod({self.name})"


def _is_interpreted(fn) -> bool:
    interp = getattr(triton.runtime, "interpreter", None)
    cls = getattr(interp, "InterpretedFunction", None)
    return cls is not None and isinstance(fn, cls)


def is_jit(fn) -> bool:
    return isinstance(fn, triton.runtime.jit.JITFunction) or _is_interpreted(fn)


# ---------------------------------------------------------------------------------------------------
def and_holds(structure, leaf: tuple) -> bool:
    """Whether a mask of this ``MaskMod.structure`` is ``leaf`` (e.g. ("causal",)) or an "and" holding it
    at any depth: then the mask allows nothing the leaf forbids."""
    if not structure:
        return False
    if structure == leaf:
        return True
    return structure[0] == "and" and any(and_holds(child, leaf) for _, child in structure[1:])


def and_leaves(structure, offset: int = 0) -> Optional[list]:
    """[(position in args of the leaf's first argument, leaf)] of a mask of this ``MaskMod.structure``
    that is a leaf or nested "and"s of leaves; None where the structure is unknown."""
    if not structure:
        return None
    if structure[0] != "and":
        return [(offset, structure)]
    out = []
    for off, child in structure[1:]:
        sub = and_leaves(child, offset + off)
        if sub is None:
            return None
        out += sub
    return out


# Combinators: generated Triton functions that call their children, cached by structure.


def combine_masks(op: str, masks: Sequence[MaskMod]) -> MaskMod:
    """``op`` is "and" or "or": the elementwise conjunction / disjunction of ``masks``."""
    masks = tuple(masks)
    if not masks:
        raise ValueError(f"{op}_masks: give at least one MaskMod")
    for i, m in enumerate(masks):
        if not isinstance(m, MaskMod):
            raise TypeError(f"{op}_masks: argument {i} must be a MaskMod, got {type(m).__name__}")
    arities = tuple(len(m.args) for m in masks)
    sym = " & " if op == "and" else " | "

    def combined(fns):
        def build():
            env, calls, params, k = {}, [], [], 0
            for i, (f, n) in enumerate(zip(fns, arities)):
                env[f"c{i}"] = f
                p = [f"a{k + j}" for j in range(n)]
                k += n
                params += p
                calls.append(f"c{i}(b, h, q, kv{''.join(', ' + x for x in p)})")
            name = f"{op}_masks_{len(fns)}"
            src = (
                f"@triton.jit\ndef {name}(b, h, q, kv{''.join(', ' + x for x in params)}):\n"
                f"    return {sym.join('(' + c + ')' for c in calls)}\n"
            )
            return generate_jit(name, src, env)

        return _cached((op, tuple(fns), arities), build)

    fn = combined(tuple(m.triton_fn for m in masks))
    # the by-key form: each child's own where it has one
    by_key = combined(tuple(m.by_key_fn or m.triton_fn for m in masks)) if any(m.by_key_fn for m in masks) else None
    torch_fns = tuple(m.torch_fn for m in masks)

    def torch_fn(b, h, q, kv, *args):
        out, k = None, 0
        for f, n in zip(torch_fns, arities):
            r = f(b, h, q, kv, *args[k : k + n])
            k += n
            out = r if out is None else (out & r if op == "and" else out | r)
        return out

    args = tuple(a for m in masks for a in m.args)
    block_fn = _combine_block_fns(op, tuple(m.block_fn for m in masks), arities)
    structure = None
    if op == "and" and all(m.structure is not None for m in masks):
        offsets = [sum(arities[:i]) for i in range(len(masks))]
        structure = ("and",) + tuple((o, m.structure) for o, m in zip(offsets, masks))
    return MaskMod(fn, torch_fn, args, f"{op}({', '.join(m.name for m in masks)})", block_fn, structure, by_key)


def _as_4d(classes: torch.Tensor) -> torch.Tensor:
    return classes[(None,) * (4 - classes.dim())]


def _align_rows(a: torch.Tensor, b: torch.Tensor):
    """Two block-class tensors made to broadcast over their leading (batch) dim.

    Masks that read per-row tensors give one row per row of their tensor; when two such counts differ,
    rows past the smaller one cannot be read by a valid mask (the kernels would read past that
    tensor), so both keep the first rows only and create_block_mask rejects a larger B.
    """
    a, b = _as_4d(a), _as_4d(b)
    n = min(a.shape[0], b.shape[0])
    if a.shape[0] != b.shape[0] and n > 1:
        a, b = a[:n], b[:n]
    return a, b


def _combine_block_fns(op: str, fns: tuple, arities: tuple) -> Optional[Callable]:
    """The block_fn of and_masks / or_masks, or None unless every child has one.

    With classes encoded 0 empty < 1 partial < 2 full, "and" is the minimum over the children and "or"
    the maximum. Exact where it says empty or full; conservative otherwise: an "and" of two partial
    blocks may in fact be empty (their True parts need not meet), an "or" of two partial ones full.
    Such a block is reported partial, which only costs the kernels a visit.
    """
    if any(f is None for f in fns):
        return None
    reduce = torch.minimum if op == "and" else torch.maximum

    def block_fn(q_lo, q_hi, kv_lo, kv_hi, *args):
        out, k = None, 0
        for f, n in zip(fns, arities):
            c = f(q_lo, q_hi, kv_lo, kv_hi, *args[k : k + n])
            k += n
            if c is None:
                return None
            out = c if out is None else reduce(*_align_rows(out, c))
        return out

    return block_fn


def offset_mask(mask: MaskMod, q_offset, kv_offset) -> MaskMod:
    """``mask`` evaluated at ``(q + q_offset, kv + kv_offset)``; offsets are ints or 0-d int tensors."""
    if not isinstance(mask, MaskMod):
        raise TypeError(f"offset: mask must be a MaskMod, got {type(mask).__name__}")
    offs = []
    for nm, o in (("q_offset", q_offset), ("kv_offset", kv_offset)):
        if isinstance(o, torch.Tensor):
            if o.numel() != 1 or o.dtype.is_floating_point:
                raise ValueError(f"offset: {nm} must be an int or a one-element integer tensor")
            o = int(o.item())
        if isinstance(o, bool) or not isinstance(o, int):
            raise TypeError(f"offset: {nm} must be an int, got {type(o).__name__}")
        if o < 0:
            # mods are defined on positions >= 0 (Triton truncates where PyTorch floors)
            raise ValueError(f"offset: {nm} must be >= 0, got {o}")
        offs.append(o)
    n = len(mask.args)

    def wrapped(child):
        def build():
            p = "".join(f", a{j}" for j in range(n))
            src = (
                "@triton.jit\n"
                f"def offset_mask(b, h, q, kv, qo, ko{p}):\n"
                f"    return c(b, h, q + qo, kv + ko{p})\n"
            )
            return generate_jit("offset_mask", src, {"c": child})

        return _cached(("offset", child, n), build)

    fn = wrapped(mask.triton_fn)
    by_key = wrapped(mask.by_key_fn) if mask.by_key_fn is not None else None
    inner = mask.torch_fn

    def torch_fn(b, h, q, kv, qo, ko, *args):
        return inner(b, h, q + qo, kv + ko, *args)

    name = f"offset({mask.name}, {offs[0]}, {offs[1]})"
    return MaskMod(fn, torch_fn, (offs[0], offs[1]) + mask.args, name, _offset_block_fn(mask.block_fn, *offs),
                   by_key_fn=by_key)


def _offset_block_fn(inner: Optional[Callable], q_offset: int, kv_offset: int) -> Optional[Callable]:
    """The block_fn of offset(): the child's, on shifted block edges.

    None for a negative offset: the mods are defined on non-negative positions, and there the Triton
    functions and their twins part ways (truncating vs floor division, loads before a row's start), so
    such a mask is left to the generic builder, which evaluates the very function the kernels run.
    """
    if inner is None or q_offset < 0 or kv_offset < 0:
        return None

    def block_fn(q_lo, q_hi, kv_lo, kv_hi, qo, ko, *args):
        if qo:
            q_lo, q_hi = q_lo + qo, q_hi + qo
        if ko:
            kv_lo, kv_hi = kv_lo + ko, kv_hi + ko
        return inner(q_lo, q_hi, kv_lo, kv_hi, *args)

    return block_fn


def remap_mask(mask: MaskMod, positions: torch.Tensor) -> MaskMod:
    """``mask`` evaluated at (positions[b, q], positions[b, kv]) instead of (q, kv).

    positions: [B, S] integer tensor (e.g. position_ids of a packed row, restarting per document).
    Indices past S read position 0 (never reached when S covers both lengths).
    """
    if not isinstance(mask, MaskMod):
        raise TypeError(f"remap: mask must be a MaskMod, got {type(mask).__name__}")
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.dtype.is_floating_point:
        raise ValueError("remap: positions must be an integer tensor of shape [B, S]")
    pos = positions.to(torch.int32).contiguous()
    # stride and length as data (ints would specialise the kernel per length)
    meta = torch.tensor([pos.stride(0), pos.shape[1]], dtype=torch.int32).to(pos.device)
    n = len(mask.args)

    def build():
        p = "".join(f", a{j}" for j in range(n))
        src = (
            "@triton.jit\n"
            f"def remap_mask(b, h, q, kv, pos, meta{p}):\n"
            "    stride_b = tl.load(meta)\n"
            "    S = tl.load(meta + 1)\n"
            "    pq = tl.load(pos + b * stride_b + q, mask=q < S, other=0)\n"
            "    pk = tl.load(pos + b * stride_b + kv, mask=kv < S, other=0)\n"
            f"    return c(b, h, pq, pk{p})\n"
        )
        return generate_jit("remap_mask", src, {"c": mask.triton_fn})

    fn = _cached(("remap", mask.triton_fn, n), build)
    inner = mask.torch_fn

    def torch_fn(b, h, q, kv, pos, meta, *args):
        S = pos.shape[1]
        pq = torch.where(q < S, pos[b, q.clamp(max=S - 1)], torch.zeros((), dtype=pos.dtype, device=pos.device))
        pk = torch.where(kv < S, pos[b, kv.clamp(max=S - 1)], torch.zeros((), dtype=pos.dtype, device=pos.device))
        return inner(b, h, pq.long(), pk.long(), *args)

    return MaskMod(fn, torch_fn, (pos, meta) + mask.args, f"remap({mask.name})")


def chain_scores(mods: Sequence[ScoreMod]) -> ScoreMod:
    """Apply score mods left to right: ``chain(f, g)(s) = g(f(s))``; at most one may carry sinks."""
    mods = tuple(mods)
    for i, m in enumerate(mods):
        if not isinstance(m, ScoreMod):
            raise TypeError(f"chain: argument {i} must be a ScoreMod, got {type(m).__name__}")
    sinks = [m.sink for m in mods if m.sink is not None]
    if len(sinks) > 1:
        raise ValueError("chain: at most one score mod may carry sinks")
    sink = sinks[0] if sinks else None
    elem = tuple(m for m in mods if m.has_elementwise)
    name = f"chain({', '.join(m.name for m in mods)})"
    if not elem:
        return ScoreMod(None, None, (), name, sink=sink)
    if len(elem) == 1 and sink is None:
        return elem[0]
    if len(elem) == 1:
        m = elem[0]
        return ScoreMod(m.triton_fn, m.torch_fn, m.args, name, m.grad_fn, m.param_grad_fn, m.learnable, sink, m.approx)
    # the approximate chain: each mod's approximate form where it has one (same args, same order)
    approx = chain_scores([m.approx or m for m in elem]) if any(m.approx is not None for m in elem) else None

    arities = tuple(len(m.args) for m in elem)
    offs = list(itertools.accumulate((0,) + arities))
    nlearn = tuple(len(m.learnable) for m in elem)
    loffs = list(itertools.accumulate((0,) + nlearn))
    learnable = tuple(offs[i] + j for i, m in enumerate(elem) for j in m.learnable)
    args = tuple(a for m in elem for a in m.args)
    key_fns = tuple((m.triton_fn, m.grad_fn, m.param_grad_fn) for m in elem)

    def pstr(i):
        return "".join(f", a{offs[i] + j}" for j in range(arities[i]))

    def gstr(i):
        return "".join(f", g{loffs[i] + j}" for j in range(nlearn[i]))

    allp = "".join(f", a{j}" for j in range(offs[-1]))
    allg = "".join(f", g{j}" for j in range(loffs[-1]))
    env = {}
    for i, m in enumerate(elem):
        env[f"f{i}"] = m.triton_fn
        if m.grad_fn is not None:
            env[f"d{i}"] = m.grad_fn
        if m.param_grad_fn is not None:
            env[f"p{i}"] = m.param_grad_fn
    n = len(elem)

    def fwd_src():
        body = "".join(f"    s = f{i}(s, b, h, q, kv{pstr(i)})\n" for i in range(n))
        return f"@triton.jit\ndef chain_score(s, b, h, q, kv{allp}):\n{body}    return s\n"

    def forward_inputs():
        # s0 .. s{n-1}: the input of each mod, recomputed (cheap elementwise work, no storage)
        lines = ["    s0 = s\n"]
        for i in range(1, n):
            lines.append(f"    s{i} = f{i - 1}(s{i - 1}, b, h, q, kv{pstr(i - 1)})\n")
        return "".join(lines)

    def grad_src():
        body = forward_inputs()
        for i in reversed(range(n)):
            if elem[i].grad_fn is not None:
                body += f"    ds = d{i}(s{i}, ds, b, h, q, kv{pstr(i)})\n"
        return f"@triton.jit\ndef chain_score_grad(s, ds, b, h, q, kv{allp}):\n{body}    return ds\n"

    def pgrad_src():
        body = forward_inputs()
        for i in reversed(range(n)):
            if elem[i].param_grad_fn is not None and nlearn[i]:
                body += f"    p{i}(s{i}, ds, b, h, q, kv{pstr(i)}{gstr(i)})\n"
            if elem[i].grad_fn is not None:
                body += f"    ds = d{i}(s{i}, ds, b, h, q, kv{pstr(i)})\n"
        return f"@triton.jit\ndef chain_score_param_grad(s, ds, b, h, q, kv{allp}{allg}):\n{body}    return ds\n"

    fwd = _cached(("chain", key_fns, arities), lambda: generate_jit("chain_score", fwd_src(), env))
    has_grad = any(m.grad_fn is not None for m in elem)
    grad = (
        _cached(("chain_grad", key_fns, arities), lambda: generate_jit("chain_score_grad", grad_src(), env))
        if has_grad
        else None
    )
    has_pg = any(m.param_grad_fn is not None and m.learnable for m in elem)
    pgrad = (
        _cached(
            ("chain_pgrad", key_fns, arities, nlearn),
            lambda: generate_jit("chain_score_param_grad", pgrad_src(), env),
        )
        if has_pg
        else None
    )
    torch_fns = tuple(m.torch_fn for m in elem)

    def torch_fn(s, b, h, q, kv, *a):
        for i, f in enumerate(torch_fns):
            s = f(s, b, h, q, kv, *a[offs[i] : offs[i + 1]])
        return s

    return ScoreMod(fwd, torch_fn, args, name, grad, pgrad, learnable, sink, approx)
