"""The .dnir text format: print -> parse round-trips, and hand-written text parses."""
import math

import numpy as np
import pytest

import dnir
from dnir import Builder, fused, structurally_equal


def roundtrip(g):
    text = dnir.print(g)
    again = dnir.parse(text)
    assert structurally_equal(again, g), text
    assert dnir.print(again) == text          # printing is a fixed point too
    dnir.verify(again)
    return again


def every_op_graph():
    b = Builder()
    x, y = b.input("x", (2, 3, 4)), b.input("y", (4, 3))
    mask = b.input("mask", (3, 1), "bool")
    a = b.input("a", (3, 3))
    u = b.exp(b.neg(x)) + b.log(b.sigmoid(x)) - b.softplus(x)
    u = b.maximum(b.div(b.sqrt(b.clamp(x, 0.1, 9.0)), b.rsqrt(b.full((4,), 2.0))), b.minimum(u, 1.5))
    v = b.where(mask, b.matmul(u, y), b.const(np.array([[1.0, -2.0, 3.0]])))          # [2, 3, 3]
    v = b.solve_tri(b.tril(a, -1) + b.eye(3), b.triu(v), lower=True, unit_diagonal=True)
    w = b.permute(b.reshape(b.cumsum(v, axis=-1), (3, 2, 3)), (2, 0, 1))
    w = b.concat([b.slice(b.pad(w, [(1, 0), (0, 0), (0, 2)], value=-1.0), (0, 0, 0), (3, 3, 4)), w[:, :, 0:1]], -1)
    w = b.acc(b.set(b.cont(w), b.broadcast_to(b.full((1,), 0.5), (1, 3, 5)), (1, 0, 0)), x[0:1, :, 0:1], (2, 0, 4))
    bb = Builder()
    c, xt = bb.input("c", (3, 5)), bb.input("xt", (3, 5))
    body = bb.build([c * xt, bb.sum(c, axis=0)])
    c_fin, ys = b.scan(body, [b.cast(b.cast(b.reshape(w[0], (3, 5)), "i32"), "f32")], [w])
    # the fused delta-rule ops: a loop over 2 chunks of 2 (K=3, V=4) and a decode step of 2 heads
    chunks = fused.chunk_scan(b.reshape(x[0:1], (3, 4)), x[:, 0:2, 0:3], x[:, 0:2, :], x[:, 1:3, 1:4],
                              x[:, 0:2, 2:4], x[:, 1:3, 0:3], x[:, 0:1, 0:1])
    step = fused.token_step(x, x[:, 0:1, 0:1], x[:, :, 0:1], x[:, 0:1, 0:3], b.reshape(x[:, 1:2, 0:3], (2, 3)),
                            b.reshape(x[:, 2:3, :], (2, 4)), b.reshape(x[:, 0:1, 1:2], (2, 1)),
                            b.reshape(x[:, 0:1, 2:3], (2,)))
    # the same step on raw vectors: 2 value heads reading one q/k head
    raw = fused.decode_step(x, x[0, 0:1, 0:3], x[1, 0:1, 0:3], x[:, 2:3, :], x[:, 0:1, 0:1], x[:, 1:2, 0:1], 0.5)
    # the same loop split in two, and the work local to each chunk (one chunk of 2 tokens, 3 heads)
    s0, w, u, qd, aqk, kte, ld = (b.reshape(x[0:1], (3, 4)), x[:, 0:2, 0:3], x[:, 0:2, :], x[:, 1:3, 1:4],
                                  x[:, 0:2, 2:4], x[:, 1:3, 0:3], x[:, 0:1, 0:1])
    final, starts, v_new = fused.chunk_states(s0, w, u, kte, ld)
    out = fused.chunk_output(qd, starts, aqk, v_new)
    tokens = b.reshape(x, (1, 2, 3, 4))
    intra = fused.intra_chunk(tokens, tokens, tokens, b.neg(b.exp(tokens[:, :, :, 0:1])), b.sigmoid(tokens[:, :, :, 1:2]), 2)
    return b.build([c_fin, ys, *chunks, *step, *raw, final, out, *intra],
                   names=["c", "ys", "chunk_state", "chunk_o", "step_state", "step_o", "raw_state", "raw_o",
                          "states_final", "output_o", *(f"intra_{i}" for i in range(len(intra)))])


def test_every_op_round_trips():
    g = every_op_graph()
    assert set(g.op_histogram()) == set(dnir.REGISTRY), "add the new op to every_op_graph"
    roundtrip(g)


def test_round_trip_keeps_the_computation(rng):
    g = every_op_graph()
    again = roundtrip(g)
    inputs = {"x": rng.uniform(0.2, 2, (2, 3, 4)), "y": rng.standard_normal((4, 3)),
              "mask": np.array([[True], [False], [True]]), "a": rng.standard_normal((3, 3))}
    for p, q in zip(dnir.run(g, inputs), dnir.run(again, inputs)):
        np.testing.assert_array_equal(p, q)


def test_consts_with_special_values_and_kinds():
    b = Builder()
    x = b.input("x", (3,))
    special = b.const(np.array([np.inf, -np.inf, np.nan]))
    negs = b.const(np.array([-1.5, -0.0, -1e-30]))
    g = b.build([special + x, negs * x, b.const(np.array([[True, False]])), b.const(np.array([-7, 0, 2**40])),
                 b.const(np.array([-3], np.int32)), b.const(1e300, "f64"), b.full((2,), -np.inf)],
                meta={"note": "consts"})
    again = roundtrip(g)
    values = {n.op + str(n.attrs.get("value")) for n in again.topo_order() if n.op in ("const", "full")}
    assert "full-inf" in values
    nodes = [n for n in again.topo_order() if n.op == "const"]
    assert math.isnan(nodes[0].attrs["value"][2]) and nodes[0].attrs["value"][:2] == (math.inf, -math.inf)
    assert [n.dtype for n in nodes] == ["f32", "f32", "bool", "i64", "i32", "f64"]
    assert nodes[2].attrs["value"] == (True, False) and nodes[3].attrs["value"] == (-7, 0, 2**40)
    assert math.copysign(1.0, nodes[1].attrs["value"][1]) == -1.0      # -0.0 keeps its sign


def test_graph_metadata_round_trips():
    b = Builder()
    x = b.input("x", (2,))
    meta = {"model": "gdn", "chunk": 64, "scale": 0.125, "flags": [True, False], "dtype": "f32", "eps": 1e-6,
            "empty": [], "label": "a \"quoted\" name"}
    again = roundtrip(b.build(b.exp(x), meta=meta))
    assert again.meta == {**meta, "flags": (True, False), "empty": ()}


def test_meta_differences_are_seen():
    b = Builder()
    x = b.input("x", (2,))
    g1, g2 = b.build(x, meta={"chunk": 64}), b.build(x, meta={"chunk": 32})
    assert not structurally_equal(g1, g2)


def test_structural_equality_sees_every_difference():
    def build(value=2.0, axis=0, name="y", shape=(2, 3)):
        b = Builder()
        x = b.input("x", shape)
        return b.build(b.cumsum(x * value, axis=axis), names=[name])
    base = build()
    assert structurally_equal(base, build())
    for other in (build(value=3.0), build(axis=1), build(name="z"), build(shape=(2, 4))):
        assert not structurally_equal(base, other)


def _nested(T, U, with_meta=False):
    inner = Builder()
    h, x = inner.input("h", (2,)), inner.input("x", (2,))
    inner_body = inner.build([h + x, h * x], meta={"level": 2} if with_meta else None)
    outer = Builder()
    h, xs, w = outer.input("h", (2,)), outer.input("xs", (U, 2)), outer.input("w", (2,))
    h_fin, ys = outer.scan(inner_body, [h], [xs])
    outer_body = outer.build([h_fin * w, ys])
    b = Builder()
    h0, xss, w = b.input("h0", (2,)), b.input("xss", (T, U, 2)), b.input("w", (2,))
    return b.build(b.scan(outer_body, [h0], [xss], [w]), names=["h", "ys"])


def test_nested_scans_round_trip():
    again = roundtrip(_nested(3, 4, with_meta=True))
    (scan,) = [n for n in again.topo_order() if n.op == "scan"]
    (inner,) = [n for n in scan.attrs["body"].topo_order() if n.op == "scan"]
    assert inner.attrs["body"].meta == {"level": 2}
    assert not structurally_equal(_nested(3, 4), _nested(3, 5))


HAND_WRITTEN = """
# the README's example, written by hand; attributes at their defaults may be left out
graph(%x: f32[4,8], %w: f32[8,8]) meta {source="hand"} {
  %0: f32[4,8] = matmul(%x, %w) {transpose_b=true}
  %1: f32[4,8] = cumsum(%0) {axis=1}   # along the rows
  %s: f32[4] = sum(%1) {axes=[-1]}
  return %1 as y, %s
}
"""


def test_hand_written_text_parses_to_the_built_graph(rng):
    g = dnir.parse(HAND_WRITTEN)
    b = Builder()
    x, w = b.input("x", (4, 8)), b.input("w", (8, 8))
    y = b.cumsum(b.matmul(x, w, transpose_b=True), axis=1)
    built = b.build([y, b.sum(y, axis=-1)], names=["y", "out1"], meta={"source": "hand"})
    assert structurally_equal(g, built)
    assert g.output_names == ("y", "out1")
    matmul = g.topo_order()[2]
    assert dict(matmul.attrs) == {"transpose_a": False, "transpose_b": True}
    xv, wv = rng.standard_normal((4, 8)), rng.standard_normal((8, 8))
    y_out, s_out = dnir.run(g, {"x": xv, "w": wv})
    np.testing.assert_allclose(y_out, np.cumsum(xv @ wv.T, axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s_out, np.cumsum(xv @ wv.T, axis=1).sum(-1), rtol=1e-5, atol=1e-4)


BEFORE = """
graph(%a: f32[2,3]) {
  %t: f32[3,2] = permute(%a) {axes=[1, 0]}
  %tt: f32[2,3] = permute(%t) {axes=[1, 0]}
  return %tt
}
"""
EXPECTED = """
graph(%a: f32[2,3]) {
  return %a
}
"""


def test_before_expected_style():
    before, expected = dnir.parse(BEFORE), dnir.parse(EXPECTED)
    assert [n.op for n in before.topo_order()] == ["input", "permute", "permute"]
    # what a rewrite that cancels a transpose pair would return
    rewritten = before.with_outputs([before.outputs[0].inputs[0].inputs[0]])
    assert structurally_equal(rewritten, expected) and not structurally_equal(before, expected)


def test_hand_written_scan():
    text = """
    graph(%s0: f32[3], %xs: f32[5,3]) {
      %r: (f32[3], f32[5]) = scan(%s0, %xs) {length=5, num_carry=1, num_xs=1} body(%s: f32[3], %x: f32[3]) {
        %0: f32[3] = add(%s, %x)
        %1: f32[] = sum(%0) {axes=[0]}
        return %0, %1
      }
      %last: f32[3] = item(%r) {index=0}
      %sums: f32[5] = item(%r) {index=1}
      return %last, %sums
    }
    """
    g = dnir.parse(text)
    xs = np.arange(15, dtype=np.float32).reshape(5, 3)
    last, sums = dnir.run(g, [np.ones(3, np.float32), xs])
    np.testing.assert_array_equal(last, 1 + xs.sum(0))
    np.testing.assert_array_equal(sums, [(1 + xs[:t + 1].sum(0)).sum() for t in range(5)])


def test_parse_file_with_dnir_suffix(tmp_path):
    g = every_op_graph()
    path = tmp_path / "layer.dnir"
    path.write_text(dnir.print(g), encoding="utf-8")
    assert structurally_equal(dnir.parse_file(path), g)
    assert structurally_equal(dnir.parse_file(str(path)), g)
    bad = tmp_path / "bad.dnir"
    bad.write_text("graph(%x: f32[2]) {\n  return %y\n}\n")
    with pytest.raises(dnir.ParseError) as e:
        dnir.parse_file(bad)
    assert (e.value.line, e.value.col) == (2, 10) and str(e.value).startswith(f"{bad}:2:10:")
