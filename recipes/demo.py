"""hf_flex demo: the Triton kernel against the float64 reference on packed documents.

    python recipes/demo.py            (CPU: Triton's interpreter runs the kernels; GPU: the real thing)

Builds a packed batch (documents of random lengths, causal within each document, softcap on the
scores), runs hf_flex.flex_attention forward and backward, and compares out / dq / dk / dv with the
float64 PyTorch reference. Prints the block mask, the errors and the time. Exits non-zero on a
mismatch. (The training recipes replace this demo as the main job once they exist.)
"""

import os
import sys
import time

import torch

if not torch.cuda.is_available():
    # must precede the first import of triton: the kernels then run on CPU tensors, interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hf_flex  # noqa: E402
from hf_flex import mods  # noqa: E402


def main():
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    B, Hq, Hkv, S, D = (2, 16, 4, 4096, 128) if cuda else (1, 4, 2, 200, 32)
    block = 128 if cuda else 32
    torch.manual_seed(0)

    # packed documents: random cut points, ids restart the causal window at every document
    lengths = torch.randint(S // 8, S // 3, (16,))
    ids = torch.repeat_interleave(torch.arange(16), lengths)[:S]
    ids = torch.cat([ids, ids.new_full((S - ids.numel(),), 16)]).to(dev)
    ids = ids.expand(B, S).contiguous()
    mask = mods.and_masks(mods.causal(), mods.document(ids))
    score = mods.softcap(30.0)

    t0 = time.perf_counter()
    bm = hf_flex.create_block_mask(mask, B, None, S, S, device=dev, BLOCK_SIZE=block)
    t_mask = time.perf_counter() - t0
    print(bm)

    q = torch.randn(B, Hq, S, D, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype, requires_grad=True)
    do = torch.randn(B, Hq, S, D, device=dev, dtype=dtype)

    t0 = time.perf_counter()
    out = hf_flex.flex_attention(q, k, v, score, bm, enable_gqa=True)
    grads = torch.autograd.grad(out, (q, k, v), do)
    if cuda:
        torch.cuda.synchronize()
    t_run = time.perf_counter() - t0

    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = hf_flex.reference.attention(*ref_in, score, mask, enable_gqa=True, mask_bh=bm.shape[:2])
    ref_grads = torch.autograd.grad(ref, ref_in, do.double())

    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    ok = True
    print(f"\nhf_flex on {dev} ({'Triton' if cuda else 'Triton interpreter'}), {dtype}, B={B} Hq={Hq} Hkv={Hkv} S={S} D={D}")
    for name, a, r in zip(("out", "dq", "dk", "dv"), (out,) + grads, (ref,) + ref_grads):
        rel = ((a.double() - r).norm() / r.norm()).item()
        ok &= rel < tol and bool(torch.isfinite(a).all())
        print(f"  {name}: relative error vs float64 reference {rel:.2e}  (limit {tol:g})")
    print(f"  block mask {t_mask * 1e3:.1f} ms, forward+backward {t_run:.2f} s (first call includes compilation)")
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
