"""The fused delta-rule ops' OpDefs (dnir/fused.py): type inference with located errors, FLOPs
equal to their expansions', and the expansions' own types."""
import numpy as np
import pytest

import dnir
from dnir import Builder, fused
from dnir.errors import DTypeError, ShapeError
from dnir.ops import REGISTRY, OpClass, graph_flops, op_flops

CHUNK = dict(state=(2, 3, 8, 6), w=(5, 2, 3, 4, 8), u=(5, 2, 3, 4, 6), q_decayed=(5, 2, 3, 4, 8),
             aqk=(5, 2, 3, 4, 4), k_to_end=(5, 2, 3, 4, 8), last_decay=(5, 2, 3, 8, 1))
STEP = dict(state=(2, 3, 8, 6), decay=(2, 3, 1, 1), k_col=(2, 3, 8, 1), k_row=(2, 3, 1, 8), q_row=(2, 3, 8),
            v=(2, 3, 6), beta=(2, 3, 1), qk=(2, 3))
# the layer's raw vectors: 2 sequences of 3 value heads reading one q/k head (GQA), a gate per key channel
DECODE = dict(state=(2, 3, 8, 6), q=(2, 1, 1, 8), k=(2, 1, 1, 8), v=(2, 1, 3, 6), g=(2, 1, 3, 8), beta=(2, 1, 3))


def _decode_step(*operands):
    return fused.decode_step(*operands, scale=0.5)


def _build(make, shapes, dtype="f32"):
    b = Builder(dtype)
    return make(*[b.input(name, shape) for name, shape in shapes.items()])


@pytest.mark.parametrize("make,shapes", [(fused.chunk_scan, CHUNK), (fused.token_step, STEP), (_decode_step, DECODE)])
def test_types_flops_and_expansion(make, shapes):
    first, second = _build(make, shapes)
    node = first.inputs[0]
    assert REGISTRY[node.op].op_class is OpClass.FUSED
    assert first.type == node.inputs[0].type                                     # the new state
    assert second.shape == ((5, 2, 3, 4, 6) if node.op == "chunk_scan" else (2, 3, 6))
    results = REGISTRY[node.op].expand(node)
    assert tuple(r.type for r in results) == node.type
    expansion = dnir.Graph(node.inputs, list(results))
    assert op_flops(node) == graph_flops(expansion) > 0


@pytest.mark.parametrize("make,shapes,role,bad,message", [
    (fused.chunk_scan, CHUNK, "aqk", (5, 2, 3, 4, 8), r"aqk has shape \[5, 2, 3, 4, 8\]; expected \[5, 2, 3, 4, 4\]"),
    (fused.chunk_scan, CHUNK, "last_decay", (5, 2, 3, 2, 1), "last_decay has 2 rows; expected 1"),
    (fused.token_step, STEP, "v", (2, 3, 7), r"v has shape \[2, 3, 7\]; expected the state's batch axes \[2, 3\] "
                                            r"first, then 6 element"),
    (fused.token_step, STEP, "qk", (3, 2), r"qk has shape \[3, 2\]"),
    (_decode_step, DECODE, "q", (2, 1, 2, 5), r"q has shape \[2, 1, 2, 5\]; expected 16 element\(s\)"),
    (_decode_step, DECODE, "k", (2, 1, 2, 8), r"k has shape \[2, 1, 2, 8\]; expected 16 element\(s\)"),
    (_decode_step, DECODE, "g", (2, 1, 3, 2), r"g has 2 values per head; expected 1 or K=8"),
])
def test_bad_operand_is_named_with_the_call_site(make, shapes, role, bad, message):
    with pytest.raises(ShapeError, match=message) as e:
        _build(make, dict(shapes, **{role: bad}))
    assert "test_fused_ops.py" in str(e.value)           # where the op was built


def _typed(make, shapes, dtypes):
    b = Builder()
    return make(*[b.input(name, shape, dtypes.get(name, "f32")) for name, shape in shapes.items()])


def test_dtypes_are_floating_with_the_state_the_widest():
    with pytest.raises(DTypeError, match="expected floating-point dtypes"):
        _build(fused.token_step, STEP, "i32")
    with pytest.raises(DTypeError, match=r"dtypes \['f32', 'f32', 'f32', 'f32', 'f32', 'f32', 'f64', 'f32'\]; "
                                         r"the state must be the widest operand \(f64\)"):
        _typed(fused.token_step, STEP, {"beta": "f64"})
    with pytest.raises(DTypeError, match="the state must be the widest"):
        _typed(fused.chunk_scan, CHUNK, {"state": "bf16"})
    mixed = r"\['bf16', 'f16', 'bf16', 'f16'\]; expected floating-point dtypes, the widest"
    with pytest.raises(DTypeError, match=mixed):
        _typed(fused.chunk_output, dict(q_decayed=(5, 4, 8), starts=(5, 8, 6), aqk=(5, 4, 4), v_new=(5, 4, 6)),
               {"q_decayed": "bf16", "starts": "f16", "aqk": "bf16", "v_new": "f16"})


@pytest.mark.parametrize("make,shapes,narrow", [(fused.chunk_scan, CHUNK, ("w", "u", "aqk")),
                                                (fused.token_step, STEP, ("k_col", "v", "beta")),
                                                (_decode_step, DECODE, ("q", "k", "v", "beta"))])
def test_narrower_operands_are_widened_as_loaded(make, shapes, narrow):
    """bf16 operands with a float32 state: the op computes in float32 and its expansion casts them."""
    first, second = _typed(make, shapes, {n: "bf16" for n in narrow})
    node = first.inputs[0]
    assert first.dtype == second.dtype == "f32"
    results = REGISTRY[node.op].expand(node)
    assert tuple(r.type for r in results) == node.type
    expansion = dnir.Graph(node.inputs, list(results))
    casts = [n for n in expansion.topo_order() if n.op == "cast"]
    assert sorted(n.inputs[0].attrs["name"] for n in casts) == sorted(narrow) and {n.dtype for n in casts} == {"f32"}
    x = {n.attrs["name"]: np.random.default_rng(1).uniform(0.1, 1, n.shape).astype(dnir.types.numpy_dtype(n.dtype))
         for n in node.inputs}
    graph = dnir.Graph(node.inputs, [first, second])
    for a, b in zip(dnir.run(graph, x), dnir.run(expansion, x)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)      # reference kernel vs its expansion


def test_text_round_trip_of_a_graph_with_both_ops():
    b = Builder()
    chunk = fused.chunk_scan(*[b.input(f"c_{n}", s) for n, s in CHUNK.items()])
    step = fused.token_step(*[b.input(f"s_{n}", s) for n, s in STEP.items()])
    g = b.build([*chunk, *step])
    again = dnir.parse(dnir.print(g))
    assert dnir.structurally_equal(again, g) and "= chunk_scan(%c_state," in dnir.print(g)
    x = {n.attrs["name"]: np.random.default_rng(0).uniform(0.1, 1, n.shape) for n in g.inputs}
    for p, q in zip(dnir.run(g, x), dnir.run(again, x)):
        np.testing.assert_array_equal(p, q)


def test_a_decode_step_with_half_vectors_counts_its_widened_expansion():
    """bf16 q, k, v, beta beside a float32 gate and state: the FLOPs are those of the expansion on the
    widened operands (the op's own expansion casts them first), not a failed build of mixed dtypes."""
    first, _ = _typed(_decode_step, DECODE, dict(q="bf16", k="bf16", v="bf16", beta="bf16"))
    node = first.inputs[0]
    expansion = dnir.Graph(node.inputs, list(REGISTRY[node.op].expand(node)))
    assert op_flops(node) == graph_flops(expansion) > 0
