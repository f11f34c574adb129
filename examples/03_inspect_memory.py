"""Inspect a graph's memory: the planned compute buffer, its lower bound, the biggest values.

`dnir.analysis.memory.plan(graph)` places every intermediate value of a graph
at an offset in one buffer (reusing the space of values that are dead, writing
in place where an operand dies, keeping views as views). `peak_bytes` is that
buffer's size; `lower_bound` is the most bytes live at any one time, which no
placement can beat; `dominant()` lists the largest values live at the peak. The
arena executor then runs the graph inside exactly that buffer.

Kimi Delta Attention, written by hand, builds [chunks, heads, C, C, K] decay
tensors (one gate per key channel); O2 computes them block by block.

    python examples/03_inspect_memory.py
"""
import numpy as np

from dnir.analysis import memory
from dnir.lowering.numpy_arena import run_planned
from dnir.lowering.numpy_backend import run
from dnir.models import build_delta_net, preset, random_inputs
from dnir.passes import optimize


def mib(nbytes):
    return f"{nbytes / 2**20:.1f} MiB"


cfg = preset("kimi-linear", seq_len=256, heads=4, value_heads=4)   # K = V = 128, 4 heads
layers = {"O0": build_delta_net(cfg)}
layers["O2"] = optimize(layers["O0"], "O2")
inputs = random_inputs(cfg, rng=0)

for name, graph in layers.items():
    mp = memory.plan(graph)
    print(f"{name}: {graph.node_count()} nodes, compute buffer {mib(mp.peak_bytes)} "
          f"(lower bound {mib(mp.lower_bound)})")
    print("  largest values live at the peak:")
    for block in mp.dominant(4):
        print(f"    {mib(block.nbytes):>10}  {block.what}")
    # Run inside the planned buffer and compare with the plain NumPy backend.
    (o_arena,), used = run_planned(graph, inputs, mp)
    (o_plain,) = run(graph, inputs)
    assert used <= mp.peak_bytes and np.array_equal(o_arena, o_plain)
    print(f"  ran inside the arena ({mib(used)} used), same result as the NumPy backend\n")

saved = memory.plan(layers["O0"]).peak_bytes / memory.plan(layers["O2"]).peak_bytes
print(f"O2 needs {saved:.1f}x less compute buffer than O0")
