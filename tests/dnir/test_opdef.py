"""The facts an OpDef states about its op hold: its class is checked, commutative ops
commute, views share their operand's bytes, in-place operands are overwritten."""
import numpy as np
import pytest

import dnir
from dnir.analysis.memory import check_plan, plan
from dnir.analysis.views import PLANNED_VIEWS
from dnir.errors import AttrError
from dnir.graph import Graph
from dnir.ops import REGISTRY, OpClass, OpDef, make_node


def identity(ins, attrs):
    return ins[0]


def inputs(*types):
    return [make_node("input", (), {"name": f"x{i}", "shape": s, "dtype": d}) for i, (s, d) in enumerate(types)]


def test_the_op_class_is_one_of_the_known_classes():
    with pytest.raises(AttrError, match=r"op 'odd': op_class='elementwize'; expected one of .*'fused'"):
        OpDef("odd", 1, identity, op_class="elementwize")
    with pytest.raises(AttrError, match="op 'odd': op_class=None"):
        OpDef("odd", 1, identity)
    assert OpDef("odd", 1, identity, op_class="layout").op_class is OpClass.LAYOUT
    for name, opdef in REGISTRY.items():
        assert isinstance(opdef.op_class, OpClass), name
        assert opdef.elementwise == (opdef.op_class is OpClass.ELEMENTWISE), name


def test_facts_that_cannot_hold_are_refused_at_registration():
    with pytest.raises(AttrError, match="commutative needs two operands"):
        OpDef("odd", 1, identity, op_class="elementwise", commutative=True)
    with pytest.raises(AttrError, match="view='transpose'; expected None or one of"):
        OpDef("odd", 1, identity, op_class="layout", view="transpose")
    with pytest.raises(AttrError, match=r"inplace operands \[1\] out of range for arity 1"):
        OpDef("odd", 1, identity, op_class="elementwise", inplace=(1,))


BINARY = sorted(n for n, d in REGISTRY.items() if d.arity == 2 and d.elementwise)


@pytest.mark.parametrize("op", BINARY)
def test_an_op_commutes_exactly_when_its_opdef_says_so(op, rng):
    a, b = inputs(((3, 1), "f32"), ((4,), "f32"))
    graph = Graph([a, b], [make_node(op, (a, b), {}), make_node(op, (b, a), {})])
    x = {"x0": rng.uniform(0.5, 2.0, (3, 1)).astype(np.float32), "x1": rng.uniform(-2.0, -0.5, (4,)).astype(np.float32)}
    ab, ba = dnir.run(graph, x)
    assert np.array_equal(ab, ba) == REGISTRY[op].commutative


VIEW_CASES = {   # op -> attrs on a [2, 3, 4] f32 operand
    "reshape": {"shape": (6, 4)},
    "slice": {"starts": (1, 0, 0), "stops": (2, 3, 4)},
    "permute": {"axes": (1, 0, 2)},
    "broadcast_to": {"shape": (5, 2, 3, 4)},
}


def test_every_view_op_has_a_case():
    assert {n for n, d in REGISTRY.items() if d.view} == set(VIEW_CASES)


@pytest.mark.parametrize("op", sorted(VIEW_CASES))
def test_a_planned_view_shares_its_operands_bytes(op):
    (x,) = inputs(((2, 3, 4), "f32"))
    value = make_node("exp", (x,), {})
    view = make_node(op, (value,), VIEW_CASES[op])
    mp = check_plan(plan(Graph([x], [make_node("exp", (view,), {})])))
    shares = mp.loc(view).base is mp.loc(value).base
    assert shares == (REGISTRY[op].view in PLANNED_VIEWS)


INPLACE_CASES = {   # op -> (operand types, attrs)
    **{op: ([((2, 3), "f32")], {}) for op in ("neg", "exp", "log", "sigmoid", "softplus", "sqrt", "rsqrt",
                                              "clamp")},
    "cast": ([((2, 3), "f32")], {"dtype": "f32"}),
    **{op: ([((3, 3), "f32")], {}) for op in ("tril", "triu")},
    "cumsum": ([((2, 3), "f32")], {"axis": 0}),
    **{op: ([((2, 3), "f32"), ((2, 3), "f32")], {}) for op in ("add", "sub", "mul", "div", "maximum", "minimum")},
    "where": ([((2, 3), "bool"), ((2, 3), "f32"), ((2, 3), "f32")], {}),
    **{op: ([((4, 4), "f32"), ((2, 2), "f32")], {"offsets": (1, 2)}) for op in ("set", "acc")},
}


def test_every_op_with_inplace_operands_has_a_case():
    assert {n for n, d in REGISTRY.items() if d.inplace} == set(INPLACE_CASES)


@pytest.mark.parametrize("op,operand", [(op, i) for op in sorted(INPLACE_CASES) for i in REGISTRY[op].inplace])
def test_the_result_overwrites_an_inplace_operand_that_dies_there(op, operand):
    types, attrs = INPLACE_CASES[op]
    xs = inputs(*types)
    operands = list(xs)
    operands[operand] = make_node("exp", (xs[operand],), {})      # a value of the arena, read only here
    node = make_node(op, operands, attrs)
    mp = check_plan(plan(Graph(xs, [make_node("neg", (node,), {})])))
    assert mp.loc(node) == mp.loc(operands[operand])
