"""Reductions of half-precision values add in float32 and round once (dnir.types.accumulation_dtype),
on the reference, the arena executor and TVM, as GPUs compute with bf16/fp16 operands.

The inputs make the difference visible: ones summed in bf16 stop at 256 (256 + 1 rounds back
to 256 with 8 significant bits) and in fp16 at 2048, while a float32 sum reaches n, which
either dtype holds exactly for the n chosen here.
"""
import numpy as np
import pytest

import dnir
from dnir.lowering.numpy_arena import run_planned
from dnir.types import numpy_dtype

N = {"bf16": 1000, "f16": 4000}        # exact in the dtype, beyond where its own sums stall (256, 2048)
# The solve: one value where the dtype's own sums stall, then ones (a short solve, as a chunk's)
STALL, SOLVE = {"bf16": 256.0, "f16": 2048.0}, 65


def _reductions(dtype):
    n = N[dtype]
    b = dnir.Builder(dtype)
    x, row, col = b.input("x", (2, n)), b.input("row", (1, n)), b.input("col", (n, 1))
    a, rhs = b.input("a", (SOLVE, SOLVE)), b.input("rhs", (SOLVE, 1))
    graph = b.build([b.sum(x, axis=-1), b.cumsum(x, axis=1), b.matmul(row, col),
                     b.solve_tri(a, rhs, lower=True, unit_diagonal=True)], names=["sum", "cumsum", "dot", "solve"])
    # a unit lower solve whose last row is -1: x_j = rhs_j above it, the last x their sum
    a_val = np.zeros((SOLVE, SOLVE))
    a_val[-1, :-1] = -1.0
    rhs_val = np.ones((SOLVE, 1))
    rhs_val[0], rhs_val[-1] = STALL[dtype], 0.0
    inputs = {"x": np.ones((2, n)), "row": np.ones((1, n)), "col": np.ones((n, 1)), "a": a_val, "rhs": rhs_val}
    return graph, {k: v.astype(numpy_dtype(dtype)) for k, v in inputs.items()}


def _check(outs, dtype):
    n = N[dtype]
    assert all(o.dtype == numpy_dtype(dtype) for o in outs)
    total, running, dot, solve = (o.astype(np.float64) for o in outs)
    assert total.tolist() == [n, n] and dot.tolist() == [[n]]
    assert running[0, -1] == n and np.array_equal(running[0], np.arange(1, n + 1, dtype=np.float64)
                                                    .astype(numpy_dtype(dtype)).astype(np.float64))
    want = np.ones(SOLVE)
    want[0], want[-1] = STALL[dtype], STALL[dtype] + SOLVE - 2       # 256 + 63 -> 320, 2048 + 63 -> 2112
    want = want.astype(numpy_dtype(dtype)).astype(np.float64)
    assert np.array_equal(solve[:, 0], want)


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_reference_and_arena_add_half_values_in_float32(dtype):
    graph, inputs = _reductions(dtype)
    _check(dnir.run(graph, inputs), dtype)
    _check(run_planned(graph, inputs)[0], dtype)


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_llvm_adds_half_values_in_float32(dtype):
    graph, inputs = _reductions(dtype)
    _check(dnir.run(graph, inputs, target="llvm"), dtype)


def test_vulkan_adds_f16_values_in_float32_where_the_device_has_shader_f16():
    from dnir.errors import BackendError
    from dnir.lowering.vulkan import adapter_info, dtypes
    try:
        adapter_info()
    except BackendError as e:
        pytest.skip(f"no Vulkan adapter on this machine ({e})")
    if "f16" not in dtypes():
        pytest.skip("this Vulkan adapter has no shader-f16")
    graph, inputs = _reductions("f16")
    _check(dnir.run(graph, inputs, target="vulkan"), "f16")
