"""Store the loop's intermediates at o's width: chunk_states' starts and v_new in bf16 where its
chunk_output stores a bf16 o, at precision "tf32".

Split for a GPU (passes/fuse_delta_steps.py), the loop over chunks writes each chunk's starting
state and v_new to memory and chunk_output reads them back, the largest traffic of a layer: at
(1, 8192) with 32 heads of 128 x 128, the starts alone are 268 MB in float32. Where o itself is
stored in bf16 (passes/fold_narrowing_casts.py gave chunk_output that `dtype`),

    item(chunk_states(...), 1), item(chunk_states(...), 2)       read by chunk_output {dtype=bf16}
    become the items of chunk_states(...) {dtype=bf16}

so that chunk_states rounds each start and v_new once as it stores them (the loop goes on with
the float32 values: the final state does not change) and chunk_output widens them as it loads
them. This is not exact: o gains the rounding of its two terms' operands, of o's own size (bf16's
8 bits; TF32's products already keep 11). So the pass runs only where the layer asks for
precision "tf32" (a bf16 layer's default; "highest" keeps them float32), and only for bf16, whose
range is float32's: an fp16 start could overflow where the float32 state does not. Validation
runs in float64, where the rounding is not done: it checks the rewrite's wiring; the rounding's
size is checked against the float64 oracle (tests/passes/test_narrow_loop_results.py, and on the
device by the conformance run and benchmarks/gpu.py's rms errors). The folded nodes are offered to
the target (`Target.rejects`): only targets whose kernels store and load them narrow take them.
The registry runs this pass after fold_narrowing_casts, before `expand_fused`.
"""
from __future__ import annotations

from dnir.graph import Graph
from dnir.ops import make_node
from dnir.types import precision_of

from .context import current
from .manager import register_pass
from .rewrite import P, Rule, apply_rules

PASS = "narrow_loop_results"
STORED = "bf16"


def narrow(m):
    out = m.node
    qd, starts, aqk, v_new = out.inputs
    if out.attrs["dtype"] != STORED or starts.op != "item" or v_new.op != "item" \
            or (starts.attrs["index"], v_new.attrs["index"]) != (1, 2) or starts.inputs[0] is not v_new.inputs[0]:
        return None
    states = starts.inputs[0]
    if states.op != "chunk_states" or states.attrs["dtype"] or m.uses(starts) != 1 or m.uses(v_new) != 1:
        return None                  # not chunk_states' results, already narrow, or read elsewhere too
    narrowed = make_node("chunk_states", states.inputs, {**states.attrs, "dtype": STORED})
    items = [make_node("item", (narrowed,), {"index": i}) for i in range(3)]
    folded = make_node("chunk_output", (qd, items[1], aqk, items[2]), out.attrs)
    why = current().target.rejects(narrowed) or current().target.rejects(folded)
    current().remark(PASS, f"chunk_states: {'starts and v_new kept wide: ' + why if why else 'stores ' + STORED}")
    if why is not None:
        return None
    for use in m.users(states):      # the final state, from the narrowed op
        if use.node.op == "item" and use.node.attrs["index"] == 0:
            m.replace(use.node, items[0])
    return folded


@register_pass(PASS)
def narrow_loop_results(graph: Graph) -> tuple[Graph, bool]:
    """chunk_states' starts and v_new stored in bf16 where chunk_output stores a bf16 o, at precision "tf32"."""
    if current().target is None or precision_of(graph.meta) != "tf32":
        return graph, False
    return apply_rules(graph, [Rule(P("chunk_output"), narrow, PASS)])
