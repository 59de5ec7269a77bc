"""hf_flex under torch.compile: a compiled model (or Transformers' generate with a static cache, which
compiles the forward on CUDA) runs hf_flex's functions as they are, behind a graph break, with the
same results. backend="eager" keeps these CPU tests quick; the inductor backend runs on the device
machine through Transformers' own generate (tests/test_transformers_parity.py, static cache)."""

import torch

import hf_flex
from hf_flex import mods
from helpers import rand_qkv


def test_flex_attention_inside_compiled_function(device):
    q, k, v = rand_qkv(1, 2, 2, 40, 40, 16, device=device, seed=3)
    bm = hf_flex.create_block_mask(mods.causal(), None, None, 40, 40, device=device, BLOCK_SIZE=16)

    def f(q, k, v):
        return torch.sin(hf_flex.flex_attention(q * 2, k, v, mods.softcap(5.0), bm)) + 1

    torch._dynamo.reset()
    want = f(q, k, v)
    got = torch.compile(f, backend="eager", fullgraph=False)(q, k, v)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_compiled_transformers_model(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=50, max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device).eval()
    model.set_attn_implementation("flex")
    ids = torch.randint(0, 50, (1, 30), device=device)
    pos = torch.cat([torch.arange(12), torch.arange(18)])[None].to(device)  # two packed documents
    with torch.no_grad():
        want = model(ids, position_ids=pos).logits
        torch._dynamo.reset()
        got = torch.compile(model, backend="eager")(ids, position_ids=pos).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_autocast_runs_in_the_autocast_dtype(device):
    """Mixed precision: float32 q/k/v (the residual stream under autocast) run in the autocast dtype,
    as SDPA's do, with gradients back to the float32 leaves."""
    import torch

    dt = torch.bfloat16 if device == "cuda" else torch.float16  # (the CPU interpreter's bf16 dot is wrong)
    q, k, v = rand_qkv(1, 2, 1, 50, 50, 16, device=device, seed=4)
    bm = hf_flex.create_block_mask(mods.causal(), None, None, 50, 50, device=device, BLOCK_SIZE=16)
    with torch.autocast(device, dtype=dt):
        out = hf_flex.flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
    assert out.dtype == dt
    want = hf_flex.flex_attention(q.to(dt), k.to(dt), v.to(dt), block_mask=bm, enable_gqa=True)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()
    # outside autocast nothing changes
    assert hf_flex.flex_attention(q, k, v, block_mask=bm, enable_gqa=True).dtype == torch.float32
