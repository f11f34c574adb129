"""Build a delta-net layer, optimise it and check it against the oracle.

Shows the basic loop of dnir: `build_delta_net` turns a layer's options into a
graph (here Qwen3-Next's Gated DeltaNet at its real head sizes), `optimize`
runs a pass pipeline over it, `dnir.run` executes it on a backend, and
`delta_rule_reference` (the delta rule token by token, in float64) says
whether the answer is right.

    python examples/01_build_and_check.py
"""
import time

import dnir
from dnir.models import build_delta_net, delta_rule_reference, preset, random_inputs, relative_rms_error
from dnir.passes import optimize

# Qwen3-Next's linear-attention layer: 16 q/k heads, 32 value heads, K = V = 128.
cfg = preset("qwen3-next", seq_len=300, initial_state=True, final_state=True)
graph = build_delta_net(cfg)                      # chunked (prefill) form, chunk size 64
print(f"built {cfg.variant} layer, T={cfg.seq_len}: {graph.node_count()} nodes, "
      f"inputs {list(graph.input_names)}, outputs {list(graph.output_names)}")
print("first lines of the graph in the .dnir text format:")
for line in dnir.print(graph).splitlines()[:6]:
    print(line if len(line) <= 110 else line[:107] + "...")

optimized = optimize(graph, "O2")                 # the same computation, rewritten to be cheaper
print(f"after O2: {optimized.node_count()} nodes")

inputs = random_inputs(cfg, rng=0)                # q, k, v, g (log-decay <= 0), beta, initial_state
o_ref, state_ref = delta_rule_reference(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"],
                                        scale=cfg.scale, initial_state=inputs["initial_state"])
for name, g in (("O0", graph), ("O2", optimized)):
    start = time.perf_counter()
    o, final_state = dnir.run(g, inputs)          # NumPy backend; target="llvm" compiles with TVM
    seconds = time.perf_counter() - start
    print(f"{name}: {seconds * 1e3:6.0f} ms on numpy, error vs float64 oracle: "
          f"o {relative_rms_error(o, o_ref):.1e}, final_state {relative_rms_error(final_state, state_ref):.1e}")
    assert relative_rms_error(o, o_ref) < 1e-5 and relative_rms_error(final_state, state_ref) < 1e-5
