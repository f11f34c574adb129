"""Store the loop's intermediates at o's width: where a chunk_output stores a bf16 o, at precision
"tf32", the loop's operands and results in bf16.

Split for a GPU (passes/fuse_delta_steps.py), the chunked layer is three kernels, and what passes
between them is the layer's largest traffic: at (1, 8192) with 32 heads of 128 x 128, intra_chunk
writes w, u, q_decayed and k_to_end (134 MB each in float32), chunk_states reads three of them and
writes each chunk's starting state (268 MB) and v_new, and chunk_output reads those back. Where o
itself is stored in bf16 (passes/fold_narrowing_casts.py gave chunk_output that `dtype`),

    chunk_output(item(intra, 2), item(states, 1), item(intra, 3), item(states, 2)) {dtype=bf16}
        with states = chunk_states(S0, item(intra, 0), item(intra, 1), item(intra, 4), item(intra, 5))
    becomes the same ops with intra_chunk {dtype=bf16} and chunk_states {dtype=bf16}

so that intra_chunk rounds w, u, q_decayed and k_to_end once as it stores them, chunk_states its
starts and v_new, and the readers widen them as they load them; the scores aqk, the decays and
everything the kernels compute stay float32 (the loop goes on with its float32 v_new). This is
not exact: o and the final state gain roundings of o's own size (bf16's 8 bits; TF32's products
already keep 11), as the peers' kernels round the same intermediates. So the pass runs only where
the layer asks for precision "tf32" (a bf16 layer's default; "highest" keeps them float32), and only
for bf16, whose range is float32's: an fp16 start could overflow where the float32 state does not.
intra_chunk is narrowed only where the loop alone reads its results. Validation runs in float64,
where no rounding is done: it checks the rewrite's wiring; the rounding's size is checked against
the float64 oracle (tests/passes/test_narrow_loop_results.py, and on the device by the conformance
run and benchmarks/gpu.py's rms errors). The rebuilt nodes are offered to the target
(`Target.rejects`): only targets whose kernels store and load them narrow take them. The registry
runs this pass after fold_narrowing_casts, before `expand_fused`.
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


def _item(x, op: str, index: int):
    """The `op` node whose result `index` x is (an item of it), else None."""
    return x.inputs[0] if x.op == "item" and x.attrs["index"] == index and x.inputs[0].op == op else None


def _items(node):
    return [make_node("item", (node,), {"index": i}) for i in range(len(node.type))]


def _narrow_intra(m, w, u, qd, aqk, kte, ld):
    """The six results of the intra_chunk making the loop's operands, rebuilt storing them narrow, where
    they are its results, read by the loop alone, and the target takes it; else None."""
    intra = _item(w, "intra_chunk", 0)
    results = (w, u, qd, aqk, kte, ld)
    if intra is None or intra.attrs["dtype"] or any(_item(x, "intra_chunk", i) is not intra or m.uses(x) != 1
                                                    for i, x in enumerate(results)):
        return None
    narrowed = make_node("intra_chunk", intra.inputs, {**intra.attrs, "dtype": STORED})
    why = current().target.rejects(narrowed)
    current().remark(PASS, f"intra_chunk: {'the loop operands kept wide: ' + why if why else 'stores ' + STORED}")
    return None if why else _items(narrowed)


def narrow(m):
    out = m.node
    qd, starts, aqk, v_new = out.inputs
    states = _item(starts, "chunk_states", 1)
    if out.attrs["dtype"] != STORED or states is None or _item(v_new, "chunk_states", 2) is not states \
            or states.attrs["dtype"] or m.uses(starts) != 1 or m.uses(v_new) != 1:
        return None                  # not chunk_states' results, already narrow, or read elsewhere too
    state, w, u, kte, ld = states.inputs
    w, u, qd, aqk, kte, ld = _narrow_intra(m, w, u, qd, aqk, kte, ld) or (w, u, qd, aqk, kte, ld)
    narrowed = make_node("chunk_states", (state, w, u, kte, ld), {**states.attrs, "dtype": STORED})
    final, starts, v_new = _items(narrowed)
    folded = make_node("chunk_output", (qd, starts, aqk, v_new), out.attrs)
    why = current().target.rejects(narrowed) or current().target.rejects(folded)
    current().remark(PASS, f"chunk_states: {'starts and v_new kept wide: ' + why if why else 'stores ' + STORED}")
    if why is not None:
        return None
    for use in m.users(states):      # the final state, from the narrowed op
        if use.node.op == "item" and use.node.attrs["index"] == 0:
            m.replace(use.node, final)
    return folded


@register_pass(PASS)
def narrow_loop_results(graph: Graph) -> tuple[Graph, bool]:
    """The loop's intermediates stored in bf16 where chunk_output stores a bf16 o, at precision "tf32"."""
    if current().target is None or precision_of(graph.meta) != "tf32":
        return graph, False
    return apply_rules(graph, [Rule(P("chunk_output"), narrow, PASS)])
