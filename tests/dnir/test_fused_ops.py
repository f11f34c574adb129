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


def _build(make, shapes, dtype="f32"):
    b = Builder(dtype)
    return make(*[b.input(name, shape) for name, shape in shapes.items()])


@pytest.mark.parametrize("make,shapes", [(fused.chunk_scan, CHUNK), (fused.token_step, STEP)])
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
])
def test_bad_operand_is_named_with_the_call_site(make, shapes, role, bad, message):
    with pytest.raises(ShapeError, match=message) as e:
        _build(make, dict(shapes, **{role: bad}))
    assert "test_fused_ops.py" in str(e.value)           # where the op was built


def test_dtypes_must_agree_and_be_floating():
    with pytest.raises(DTypeError, match="expected one floating-point dtype"):
        _build(fused.token_step, STEP, "i32")
    b = Builder()
    ins = [b.input(name, shape, "f64" if name == "beta" else "f32") for name, shape in STEP.items()]
    with pytest.raises(DTypeError, match=r"dtypes \['f32', 'f32', 'f32', 'f32', 'f32', 'f32', 'f64', 'f32'\]"):
        fused.token_step(*ins)


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
