"""Export an optimised delta-net layer as ggml C code, compile it and run it.

The loop a llama.cpp developer takes home: build the Gated DeltaNet layer,
optimise it (O2), let dnir write the graph as one C function that builds it
with ggml (`export_c`, as `dnir export FILE --format ggml-c` does), compile
that file against ggml, run the compiled graph on ggml's CPU backend and check
it against the float64 oracle, with the compute buffer ggml's allocator needs
next to the one dnir planned.

    python examples/07_ggml_export.py
"""
import tempfile
from pathlib import Path

from dnir.analysis.memory import plan
from dnir.lowering.ggml.export_c import compile_c, export_c, load_builder
from dnir.lowering.ggml.run import GgmlGraph
from dnir.models import build_delta_net, delta_rule_reference, preset, random_inputs, relative_rms_error
from dnir.passes import optimize

cfg = preset("qwen3-next", seq_len=200, heads=4, value_heads=8, initial_state=True, final_state=True)
graph = optimize(build_delta_net(cfg), "O2")
source = export_c(graph, "build_delta_net", "qwen3-next O2, T=200")
calls = [line for line in source.splitlines() if "= ggml_" in line]
print(f"exported {len(calls)} ggml calls for {graph.node_count()} dnir nodes; the first node:")
body = source.splitlines()
first = next(i for i, line in enumerate(body) if line.strip().startswith("// %0"))
print("\n".join(body[first:first + 6]))

with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "delta_net.c"
    path.write_text(source)
    library = compile_c(path, Path(tmp) / "delta_net.so")      # cc -shared ... -lggml -lggml-base
    compiled = GgmlGraph(graph, builder=load_builder(library, "build_delta_net", graph))

inputs = random_inputs(cfg, rng=0)
o, final_state = compiled(inputs)
o_ref, state_ref = delta_rule_reference(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"],
                                        scale=cfg.scale, initial_state=inputs["initial_state"])
print(f"compute buffer: ggml's allocator {compiled.compute_buffer_bytes / 2**20:.1f} MiB, "
      f"dnir's plan {plan(graph).peak_bytes / 2**20:.1f} MiB")
error = max(relative_rms_error(o, o_ref), relative_rms_error(final_state, state_ref))
assert error < 1e-5, error
print(f"the compiled ggml graph vs the float64 oracle: rms error {error:.1e}")
