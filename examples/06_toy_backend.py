"""Add a backend through the registry: a toy that writes a graph as a plain Python function.

A backend is one `register(Backend(...))` call (lowering/registry.py): a name,
the target names it serves, a run function, and a `Target` that says which
fused ops it has kernels for. This toy's lowering table turns each primitive op
into one line of NumPy; it has no kernel for a fused op, so before it sees a
graph the registry expands every fused op back into primitives through the
op's own `expand`. Here the decode step of a Gated DeltaNet layer, fused into
one `token_step` op by the NumPy target's recogniser, runs on the toy as the
primitives it stands for, and is checked against the float64 oracle.

    python examples/06_toy_backend.py
"""
import numpy as np

import dnir
from dnir.errors import BackendError
from dnir.lowering import registry
from dnir.lowering.numpy_backend import prepare_inputs
from dnir.models import build_delta_net, delta_rule_reference, preset, random_inputs, relative_rms_error
from dnir.passes import optimize
from dnir.passes.context import Target
from dnir.types import numpy_dtype


def _matmul(node, a, b):
    a = f"np.swapaxes({a}, -1, -2)" if node.attrs["transpose_a"] else a
    b = f"np.swapaxes({b}, -1, -2)" if node.attrs["transpose_b"] else b
    return f"np.matmul({a}, {b})"


# The toy's lowering table: op -> (node, operand names) -> a Python expression.
LINES = {
    "const": lambda n, a: f"np.array({list(n.attrs['value'])}, '{numpy_dtype(n.dtype)}').reshape({n.shape})",
    "exp": lambda n, a: f"np.exp({a[0]})",
    "add": lambda n, a: f"{a[0]} + {a[1]}",
    "sub": lambda n, a: f"{a[0]} - {a[1]}",
    "mul": lambda n, a: f"{a[0]} * {a[1]}",
    "reshape": lambda n, a: f"{a[0]}.reshape({n.shape})",
    "broadcast_to": lambda n, a: f"np.broadcast_to({a[0]}, {n.shape})",
    "sum": lambda n, a: f"{a[0]}.sum(axis={n.attrs['axes']}, keepdims={n.attrs['keepdims']})",
    "matmul": lambda n, a: _matmul(n, *a),
}


def to_python(graph) -> str:
    """The graph as the source of `def layer(inputs...)`, one line per op."""
    missing = sorted({n.op for n in graph.topo_order()} - set(LINES) - {"input"})
    if missing:
        raise BackendError(f"the toy backend lacks op(s): {', '.join(missing)}")
    names = {id(n): n.attrs["name"] for n in graph.inputs}
    lines = [f"def layer({', '.join(graph.input_names)}):"]
    for i, node in enumerate(graph.topo_order()):
        if id(node) not in names:
            names[id(node)] = f"v{i}"
            lines.append(f"    v{i} = {LINES[node.op](node, [names[id(x)] for x in node.inputs])}")
    lines.append(f"    return {', '.join(names[id(o)] for o in graph.outputs)},")
    return "\n".join(lines)


def run_python(graph, inputs, target):
    scope = {"np": np}
    exec(to_python(graph), scope)
    return [np.asarray(out) for out in scope["layer"](*prepare_inputs(graph, inputs))]


# Target("python") has no kernels: every fused op reaches run_python expanded.
registry.register(registry.Backend("toy-python", ("python",), run_python, Target))

cfg = preset("qwen3-next", batch=2, seq_len=1, mode="decode", heads=2, value_heads=4, head_dim=16,
             value_dim=16, initial_state=True, final_state=True)
graph = optimize(build_delta_net(cfg), "O2")
with registry.target_context("numpy") as ctx:         # NumPy has a reference kernel for each fused op
    fused = optimize(graph, ["fuse_delta_steps"])
print(f"O2 graph: {graph.node_count()} nodes; with the decode step fused: {fused.node_count()} nodes "
      f"({ctx.remarks[0][1]})")
assert fused.op_histogram()["token_step"] == 1

prepared = registry.prepare(fused, "python")
assert "token_step" not in prepared.op_histogram()
source = to_python(prepared)
print(f"what the toy backend runs ({len(source.splitlines())} lines):")
print("\n".join(source.splitlines()[:6] + ["    ..."] + source.splitlines()[-2:]))

x = random_inputs(cfg, rng=0)
o, final_state = dnir.run(fused, x, target="python")
o_ref, state_ref = delta_rule_reference(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=cfg.scale,
                                        initial_state=x["initial_state"])
errors = relative_rms_error(o, o_ref), relative_rms_error(final_state, state_ref)
assert max(errors) < 1e-5, errors
print(f"the toy python backend vs the float64 oracle: rms error o {errors[0]:.1e}, final state {errors[1]:.1e}")
