"""The verifier accepts what the builder and parser make and rejects broken graphs
built by hand (dnir.graph.Node skips all checks, as a buggy pass might)."""
import numpy as np
import pytest

import dnir
from dnir import Builder, Graph, Node, TensorType, VerifyError
from dnir.verify import is_valid


def f32(*shape):
    return TensorType(shape, "f32")


def raw_input(name, *shape):
    return Node("input", (), {"name": name, "shape": shape, "dtype": "f32"}, f32(*shape))


def scan_graph():
    bb = Builder()
    c, x, w = bb.input("c", (2,)), bb.input("x", (2,)), bb.input("w", (2,))
    body = bb.build([c * w + x, bb.sum(c)])
    b = Builder()
    c0, xs, w = b.input("c0", (2,)), b.input("xs", (4, 2)), b.input("w", (2,))
    unused = b.input("unused", (7,))
    del unused
    return b.build(b.scan(body, [c0], [xs], [w]), names=["c", "sums"])


def test_accepts_built_and_parsed_graphs():
    g = scan_graph()
    assert dnir.verify(g) is g and is_valid(g)
    assert is_valid(dnir.parse(dnir.print(g)))
    b = Builder("f64")
    x = b.input("x", (3, 3))
    assert is_valid(b.build([b.solve_tri(b.tril(x) + b.eye(3), x), x]))


def test_rejects_a_stored_type_that_the_operands_do_not_give():
    x = raw_input("x", 2, 3)
    bad = Node("exp", (x,), {}, f32(3, 2))
    with pytest.raises(VerifyError, match=r"%0 = exp\(f32\[2,3\]\) stores type f32\[3,2\] but its operands give f32\[2,3\]"):
        dnir.verify(Graph([x], [bad]))
    wrong_dtype = Node("sum", (x,), {"axes": (0,), "keepdims": False}, TensorType((3,), "f64"))
    with pytest.raises(VerifyError, match=r"%0 = sum\(f32\[2,3\]\) stores type f64\[3\] but its operands give f32\[3\]"):
        dnir.verify(Graph([x], [wrong_dtype]))
    assert not is_valid(Graph([x], [wrong_dtype]))


@pytest.mark.parametrize("half", ["bf16", "f16"])
def test_a_half_value_where_float32_is_inferred_names_the_value_and_both_dtypes(half):
    # a layer's widening cast stored as if it kept the half dtype
    q = Node("input", (), {"name": "q", "shape": (2, 3), "dtype": half}, TensorType((2, 3), half))
    widened = Node("cast", (q,), {"dtype": "f32"}, TensorType((2, 3), half))
    with pytest.raises(VerifyError, match=rf"%0 = cast\({half}\[2,3\]\) stores type {half}\[2,3\] but its "
                                          rf"operands give f32\[2,3\]"):
        dnir.verify(Graph([q], [widened]))
    # an op reading a half and a float32 operand: the builder's message, re-checked by the verifier
    mixed = Node("add", (q, raw_input("s", 2, 3)), {}, f32(2, 3))
    with pytest.raises(VerifyError, match=rf"%0 \(add\) fails to re-check: .*different dtypes \['{half}', 'f32'\]"):
        dnir.verify(Graph([q, mixed.inputs[1]], [mixed]))


def test_rejects_an_undeclared_input():
    x, y = raw_input("x", 2), raw_input("y", 2)
    with pytest.raises(VerifyError, match="input 'y' is used but not declared in the graph's inputs"):
        dnir.verify(Graph([x], [Node("add", (x, y), {}, f32(2))]))
    # the same mistake made with two builders: a value of one graph used in another
    b1, b2 = Builder(), Builder()
    p = b1.input("p", (2,))
    q = b2.input("q", (2,))
    with pytest.raises(VerifyError, match="input 'p' is used but not declared"):
        b2.build(q + p)


def test_rejects_duplicate_input_names():
    x1, x2 = raw_input("x", 2), raw_input("x", 2)
    with pytest.raises(VerifyError, match="input name 'x' is declared twice"):
        dnir.verify(Graph([x1, x2], [Node("add", (x1, x2), {}, f32(2))]))


def test_rejects_a_scan_body_with_the_wrong_signature():
    g = scan_graph()
    (scan,) = [n for n in g.topo_order() if n.op == "scan"]
    bb = Builder()
    c, x, w = bb.input("c", (3,)), bb.input("x", (2,)), bb.input("w", (2,))
    wrong_inputs = bb.build([c, bb.sum(x)])
    bb = Builder()
    c, x, w = bb.input("c", (2,)), bb.input("x", (2,)), bb.input("w", (2,))
    wrong_carry = bb.build([bb.concat([c, x], 0), bb.sum(x)])
    too_few = bb.build([c])
    for body, message in [(wrong_inputs, r"body input 0 \(c\) has type f32\[3\], expected f32\[2\]"),
                          (wrong_carry, r"carry 0: body returns f32\[4\], expected the carried type f32\[2\]"),
                          (too_few, r"= scan\(.*\) stores type .* but its operands give")]:
        broken = Node("scan", scan.inputs, {**scan.attrs, "body": body}, scan.type)
        items = [Node("item", (broken,), {"index": i}, t) for i, t in enumerate(scan.type)]
        with pytest.raises(VerifyError, match=message):
            dnir.verify(Graph(g.inputs, items[:1]))


def test_rejects_a_broken_node_inside_a_scan_body():
    g = scan_graph()
    (scan,) = [n for n in g.topo_order() if n.op == "scan"]
    body = scan.attrs["body"]
    c = body.inputs[0]
    broken_body = Graph(body.inputs, [Node("exp", (c,), {}, f32(2)), Node("neg", (c,), {}, f32(5))])
    broken = Node("scan", scan.inputs, {**scan.attrs, "body": broken_body},
                  (f32(2), f32(4, 5)))
    with pytest.raises(VerifyError, match=r"scan body: %1 = neg\(f32\[2\]\) stores type f32\[5\]"):
        dnir.verify(Graph(g.inputs, [Node("item", (broken,), {"index": 0}, f32(2))]))


def test_rejects_bad_arity_attributes_and_ops():
    x = raw_input("x", 2, 3)
    cases = [
        (Node("exp", (x, x), {}, f32(2, 3)), "takes 1 operand"),
        (Node("cumsum", (x,), {}, f32(2, 3)), "missing attribute 'axis'"),
        (Node("cumsum", (x,), {"axis": 0, "bogus": 1}, f32(2, 3)), r"unknown attribute\(s\) \['bogus'\]"),
        (Node("cumsum", (x,), {"axis": "0"}, f32(2, 3)), "is not of kind int"),
        (Node("frobnicate", (x,), {}, f32(2, 3)), "unknown op 'frobnicate'"),
        (Node("cumsum", (x,), {"axis": 5}, f32(2, 3)), "axis 5 is out of range"),
    ]
    for node, message in cases:
        with pytest.raises(VerifyError, match=message):
            dnir.verify(Graph([x], [node]))


def test_rejects_malformed_graphs():
    x = raw_input("x", 2)
    with pytest.raises(VerifyError, match="has no outputs"):
        dnir.verify(Graph([x], []))
    with pytest.raises(VerifyError, match=r"output names repeat: \['y', 'y'\]"):
        dnir.verify(Graph([x], [x, x], ["y", "y"]))
    with pytest.raises(VerifyError, match=r"output name\(s\) \['a-b', '0'\] are not identifiers"):
        dnir.verify(Graph([x], [x, x, x], ["a-b", "0", "ok_1"]))
    e = Node("exp", (x,), {}, f32(2))
    with pytest.raises(VerifyError, match="is not an input node"):
        dnir.verify(Graph([x, e], [e]))


def test_verified_graphs_run(rng):
    g = scan_graph()
    c0, xs, w = rng.standard_normal(2), rng.standard_normal((4, 2)), rng.standard_normal(2)
    c, sums = dnir.run(g, [c0, xs, w, rng.standard_normal(7)])
    want, want_sums = c0, []
    for t in range(4):
        want_sums.append(want.sum())
        want = want * w + xs[t]
    np.testing.assert_allclose(c, want, rtol=1e-5)
    np.testing.assert_allclose(sums, want_sums, rtol=1e-5, atol=1e-6)
