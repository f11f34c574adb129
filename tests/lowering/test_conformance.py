"""Every op of the registry on every backend against the NumPy backend
(ggml's test-backend-ops): normalised MSE below 1e-7 for float32, exact for
integers and bools."""
import numpy as np
import pytest

import dnir
from dnir.lowering import run

from cases import CASES, build_all, nmse, random_inputs
from backends import vulkan_available

TOLERANCE = 1e-7


@pytest.fixture(scope="session")
def table():
    graph = build_all()
    inputs = random_inputs(graph, np.random.default_rng())
    return graph, inputs, dict(zip(graph.output_names, run(graph, inputs)))


@pytest.fixture(scope="session")
def backend_outputs(table):
    graph, inputs, _ = table
    results = {}

    def get(target):
        if target == "vulkan" and not vulkan_available():
            pytest.skip("no Vulkan adapter on this machine")
        if target not in results:
            results[target] = dict(zip(graph.output_names, run(graph, inputs, target=target)))
        return results[target]
    return get


def test_cases_cover_the_registry():
    used = build_all().op_histogram()
    assert set(dnir.REGISTRY) - {"input"} <= set(used), sorted(set(dnir.REGISTRY) - set(used) - {"input"})


@pytest.mark.parametrize("target", ["llvm", "vulkan"])
@pytest.mark.parametrize("name", list(CASES))
def test_op_matches_numpy(backend_outputs, table, target, name):
    ref = table[2][name]
    out = backend_outputs(target)[name]
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if ref.dtype.kind == "f":
        assert np.isfinite(out).all()
        assert nmse(out, ref) < TOLERANCE
    else:
        np.testing.assert_array_equal(out, ref)
