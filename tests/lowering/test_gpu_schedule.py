"""GPU legalisation: many short reductions get one thread per output, long rows keep dlight's rules."""
import numpy as np
import pytest
import tvm
from tvm import tirx

import dnir
from dnir.lowering.tvm.compile import make_target
from dnir.lowering.tvm.gpu_schedule import MAX_REDUCTION, MIN_OUTPUTS, legalize_passes
from dnir.lowering.tvm.translate import translate

from backends import vulkan_available


def _reduction_kernel(rows: int, length: int) -> str:
    """The scheduled CUDA PrimFunc of exp(x) summed along rows, as TVMScript."""
    b = dnir.Builder()
    g = b.build(b.sum(b.exp(b.input("x", (rows, length))), axis=-1))
    target = make_target("cuda")
    with target:
        mod = tvm.transform.Sequential(legalize_passes(target))(translate(g, gpu=True))
    (func,) = [f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc) and "sum" in gv.name_hint]
    return func.script()


def test_many_short_rows_run_one_thread_per_output():
    script = _reduction_kernel(MIN_OUTPUTS * 2, MAX_REDUCTION // 2)
    assert 'thread="threadIdx.x"' in script
    assert "_rf" not in script and "allreduce" not in script     # no row split across threads


def test_few_long_rows_keep_dlights_cross_thread_reduction():
    script = _reduction_kernel(64, 4096)
    assert "_rf" in script or "allreduce" in script              # rows split across threads (rfactor)


@pytest.mark.skipif(not vulkan_available(), reason="no Vulkan adapter (install mesa-vulkan-drivers)")
def test_many_short_rows_compute_the_reference_sums_on_vulkan(rng):
    b = dnir.Builder()
    x = b.input("x", (MIN_OUTPUTS, 96))
    g = b.build(b.sum(b.mul(b.exp(x), x), axis=-1))
    data = rng.standard_normal((MIN_OUTPUTS, 96)).astype(np.float32)
    (got,), (want,) = dnir.run(g, {"x": data}, target="vulkan"), dnir.run(g, {"x": data})
    assert np.sum((got - want) ** 2) / np.sum(want ** 2) < 1e-7
