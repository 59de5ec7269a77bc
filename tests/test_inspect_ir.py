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
