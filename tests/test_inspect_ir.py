"""scripts/inspect_ir.py's TTGIR reading: which global loads of each loop the pipeliner made asynchronous."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
    spec = importlib.util.spec_from_file_location("inspect_ir", os.path.join(ROOT, "scripts", "inspect_ir.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TTGIR = """
    %q = tt.load %q_ptr, %mask : tensor<128x64x!tt.ptr<bf16>>
    %r:3 = scf.for %i = %c0 to %n step %c1 iter_args(%a = %x) -> (f32) {
      %blk = tt.load %p, %m : !tt.ptr<i32>
      %k = ttg.async_copy_global_to_local %kp, %ks mask %km : tensor<64x64x!tt.ptr<bf16>>
      %s = scf.if %c -> (f32) {
        %v = ttg.async_copy_global_to_local %vp, %vs : tensor<64x64x!tt.ptr<bf16>>
      }
      scf.yield %a : f32
    }
    %r2:3 = scf.for %i = %c0 to %n step %c1 iter_args(%a = %x) -> (f32) {
      %blk2 = ttg.async_copy_global_to_local %bp, %bs : tensor<1x!tt.ptr<i32>>
      scf.yield %a : f32
    }
    %after = tt.load %o : !tt.ptr<i32>
"""


def test_loop_loads_per_loop():
    got = _module().loop_loads(TTGIR)
    assert got == [["sync", "async", "async"], ["async"]], got


TORCH_MODULE = '''
import triton
import triton.language as tl

from torch._inductor.runtime import triton_helpers, triton_heuristics
from torch._inductor.runtime.hints import AutotuneHint, ReductionHint, TileHint, DeviceProperties

@triton_heuristics.template(

num_stages=3,
num_warps=8,
triton_meta={'signature': {'arg_Q': '*bf16', 'in_ptr9': '*i32', 'out_ptr0': '*bf16'}, 'device': None},
inductor_meta={'kernel_name': 'triton_tem_fused_flex_attention_0', 'backend_hash': 'X'},

)
@triton.jit
def triton_tem_fused_flex_attention_0(arg_Q, in_ptr9, out_ptr0):
    pass
'''


def test_torch_module_stripped_of_inductor():
    """scripts/inspect_torch_kernels.py: Inductor's decorator and imports go, its signature, warps,
    stages and kernel name are read from it."""
    spec = importlib.util.spec_from_file_location("inspect_torch_kernels",
                                                  os.path.join(ROOT, "scripts", "inspect_torch_kernels.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    src, sig, warps, stages, name = mod.strip_module(TORCH_MODULE)
    assert sig == {"arg_Q": "*bf16", "in_ptr9": "*i32", "out_ptr0": "*bf16"}
    assert (warps, stages, name) == (8, 3, "triton_tem_fused_flex_attention_0")
    assert "triton_heuristics" not in src and "torch._inductor" not in src
    assert "@triton.jit\ndef triton_tem_fused_flex_attention_0(arg_Q, in_ptr9, out_ptr0):" in src
