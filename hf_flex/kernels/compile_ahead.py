"""Compiling the backward's kernels while the forward runs.

From a cold Triton cache, the first training step of a new configuration compiles the forward's
kernels at the first layer's forward and the backward's (the largest) only when the first backward
starts, after every layer's forward and the loss: one after the other. The autograd glue
(hf_flex.autograd) hands the first forward of each configuration's backward, in its warm-up form
(``launch.flex_backward(..., warmup=True)``: compile, launch nothing), to :func:`start`, which runs it
in a background thread while the main thread compiles and runs the forward; the backward calls
:func:`wait` before it launches, and then finds its kernels compiled. Triton releases the GIL in its
native passes and in ptxas, so the two compilations overlap there.

A warm-up that fails (or compiles a variant the backward does not use: another layout of the gradient
than the forward's output) costs nothing but its own time: the backward compiles what it needs, as it
always did; the failure is kept in :data:`errors`.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Hashable

import torch

__all__ = ["enabled", "seen", "start", "wait", "errors"]

# off: the backward compiles its kernels at its first launch (as before this module)
enabled = True
# exceptions raised by warm-ups (a warm-up never raises into training)
errors: list = []

_lock = threading.Lock()
_seen: set = set()
_running: list = []


def seen(key: Hashable) -> bool:
    """Whether a warm-up was started for ``key`` (a configuration) in this process."""
    return key in _seen


def start(key: Hashable, device: torch.device, warmup: Callable[[], None]) -> bool:
    """Run ``warmup()`` in a background thread on ``device``, once per ``key``; returns whether it
    started one."""
    with _lock:
        if not enabled or key in _seen:
            return False
        _seen.add(key)

    def work():
        try:
            # the current CUDA device is per thread
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                warmup()
        except Exception as e:  # a failed warm-up is the backward's ordinary first compile, no more
            errors.append(e)

    thread = threading.Thread(target=work, name="hf_flex-compile-backward", daemon=True)
    with _lock:
        _running.append(thread)
    thread.start()
    return True


def wait() -> None:
    """Join every warm-up still running (the backward about to launch may need its kernels)."""
    if not _running:
        return
    with _lock:
        pending = list(_running)
        _running.clear()
    for thread in pending:
        thread.join()
