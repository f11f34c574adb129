"""Whole delta-net layers (GDA and KDA, chunked and recurrent, O0 and O2) on
llvm and vulkan against the NumPy backend. The eight layers of one
optimisation level are merged into one graph: one compile per backend."""
import numpy as np
import pytest

import dnir.passes
from dnir.lowering import run
from dnir.models import DeltaNetConfig, build, random_inputs

from backends import merge_graphs, vulkan_available
from cases import nmse

# Small layers: a sequence length that is not a multiple of the chunk, GQA, an initial state.
LAYERS = {f"{variant}_{mode}": dict(variant=variant, mode=mode)
          for variant in ("gdn", "kda") for mode in ("chunked", "recurrent")}
SIZES = dict(seq_len=40, heads=2, value_heads=4, head_dim=16, value_dim=16, chunk_size=16,
             initial_state=True, final_state=True)


@pytest.fixture(scope="module")
def layers():
    return {key: build(opts["variant"], mode=opts["mode"], **SIZES) for key, opts in LAYERS.items()}


@pytest.mark.parametrize("target", ["llvm", "vulkan"])
@pytest.mark.parametrize("level", ["O0", "O2"])
def test_layers_match_numpy(layers, target, level, rng):
    if target == "vulkan" and not vulkan_available():
        pytest.skip("no Vulkan adapter on this machine")
    graph = merge_graphs({key: dnir.passes.optimize(g, level) for key, g in layers.items()})
    inputs = {}
    for key, g in layers.items():
        for name, value in random_inputs(DeltaNetConfig.from_meta(g.meta), rng).items():
            inputs[f"{key}__{name}"] = value
    refs = run(graph, inputs)
    outs = run(graph, inputs, target=target)
    for name, out, ref in zip(graph.output_names, outs, refs):
        assert np.isfinite(out).all(), name
        assert nmse(out, ref) < 1e-7, (name, nmse(out, ref))
