"""Helpers shared by the lowering tests."""
from __future__ import annotations

import pytest

from dnir.graph import Graph, Node
from dnir.ops import make_node


def vulkan_available() -> bool:
    from dnir.errors import BackendError
    from dnir.lowering.vulkan import adapter_info
    try:
        adapter_info()
    except BackendError:
        return False
    return True


needs_vulkan = pytest.mark.skipif(not vulkan_available(), reason="no Vulkan adapter on this machine")


def sm90_ptx(source: str, tmp_path) -> str:
    """nvcc's PTX of CUDA source for sm_90 (the test skips where nvcc is not installed)."""
    import shutil
    import subprocess
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed: the CUDA source was generated but not compiled")
    (tmp_path / "k.cu").write_text(source)
    proc = subprocess.run([nvcc, "--ptx", "-arch=sm_90", "-o", str(tmp_path / "k.ptx"), str(tmp_path / "k.cu")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return (tmp_path / "k.ptx").read_text()


def merge_graphs(graphs: dict[str, Graph]) -> Graph:
    """Several graphs side by side in one (inputs and outputs prefixed `<key>__`), so that a
    backend compiles them once."""
    inputs, outputs, names = [], [], []
    for key, graph in graphs.items():
        new = {}
        for node in graph.inputs:
            attrs = dict(node.attrs, name=f"{key}__{node.attrs['name']}")
            new[id(node)] = make_node("input", (), attrs)
            inputs.append(new[id(node)])
        for node in graph.topo_order():
            if id(node) not in new:
                new[id(node)] = Node(node.op, [new[id(i)] for i in node.inputs], node.attrs, node.type)
        outputs += [new[id(n)] for n in graph.outputs]
        names += [f"{key}__{n}" for n in graph.output_names]
    return Graph(inputs, outputs, names)


def assert_vulkan_matches_numpy(graph: Graph, inputs: dict, gate_scales=(1.0, 8.0)):
    """Every output of `graph` on Vulkan against the NumPy backend, with the gates as drawn
    and then scaled up (strong gates). A half output is both float32 results rounded once: they
    may round apart, by one unit in the last place of the half dtype."""
    import numpy as np

    from cases import nmse
    from dnir.lowering import run
    for scale in gate_scales:
        x = dict(inputs, g=inputs["g"] * scale)
        for name, out, ref in zip(graph.output_names, run(graph, x, target="vulkan"), run(graph, x)):
            assert np.isfinite(out).all(), name
            if out.itemsize == 2:
                apart = np.abs(out.astype(np.float64) - ref) - np.spacing(np.abs(ref))
                assert out.dtype == ref.dtype and apart.max() <= 0, (name, scale, apart.max())
            else:
                assert nmse(out, ref) < 1e-10, (name, scale, nmse(out, ref))
