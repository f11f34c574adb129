"""Bad input gets a DnirError subclass that names the op, the operand types and
what was expected, raised where the bad node is built (never from inside NumPy).

`fails(cls, lambda: ...)` keeps each bad call on one line so that the error's
"built at" site can be checked against that line of this file.
"""
import numpy as np
import pytest

import dnir
from dnir import AttrError, Builder, DnirError, DTypeError, InputError, ParseError, ShapeError, make_node


def fails(cls, call, *fragments, site=True):
    with pytest.raises(cls) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    if site:
        assert message.endswith(f"[built at {__file__}:{call.__code__.co_firstlineno}]"), message
    # the user sees one error, not the inference internals it came from
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)
    return message


@pytest.fixture
def b():
    return Builder()


def test_matmul_shapes(b):
    x, y, z = b.input("x", (2, 3)), b.input("y", (4, 5)), b.input("z", (3,))
    fails(ShapeError, lambda: b.matmul(x, y),
          "matmul(f32[2,3], f32[4,5])", "contracted dimensions differ: 3 (a) vs 4 (b)",
          "expected a [..., m, k] @ b [..., k, n]")
    fails(ShapeError, lambda: b.matmul(x, y, transpose_a=True), "2 (a^T) vs 4 (b)")
    fails(ShapeError, lambda: x @ z, "matmul(f32[2,3], f32[3])", "rank >= 2")
    p, q = b.input("p", (2, 3, 4)), b.input("q", (5, 4, 2))
    fails(ShapeError, lambda: b.matmul(p, q), "matmul(f32[2,3,4], f32[5,4,2])", "do not broadcast", "sizes [2, 5]")


def test_broadcasting(b):
    x, y, c = b.input("x", (2, 3)), b.input("y", (4,)), b.input("c", (5, 1), "bool")
    fails(ShapeError, lambda: b.add(x, y), "add(f32[2,3], f32[4])", "shapes [[2, 3], [4]] do not broadcast",
          "axis -1: sizes [3, 4]")
    fails(ShapeError, lambda: x * y, "mul(f32[2,3], f32[4])")
    fails(ShapeError, lambda: b.where(c, x, x), "where(bool[5,1], f32[2,3], f32[2,3])", "do not broadcast")
    fails(ShapeError, lambda: b.broadcast_to(x, (3, 3)), "broadcast_to(f32[2,3])", "[[2, 3], [3, 3]] do not broadcast")
    fails(ShapeError, lambda: b.broadcast_to(x, (3,)), "cannot broadcast [2, 3] to [3]")


def test_bad_axes(b):
    x, y = b.input("x", (2, 3)), b.input("y", (2, 4))
    fails(ShapeError, lambda: b.sum(x, axis=2), "sum(f32[2,3])", "axis 2 is out of range for rank 2 (expected -2..1)")
    fails(ShapeError, lambda: b.sum(x, axis=(1, -1)), "sum(f32[2,3])", "axes [1, -1] repeat an axis")
    fails(ShapeError, lambda: b.cumsum(x, axis=-3), "cumsum(f32[2,3])", "axis -3 is out of range for rank 2")
    fails(ShapeError, lambda: b.cumsum(b.sum(x), axis=0), "cumsum(f32[])", "rank >= 1")
    fails(ShapeError, lambda: b.concat([x, y], axis=2), "concat(f32[2,3], f32[2,4])", "axis 2 is out of range")
    fails(ShapeError, lambda: b.concat([x, y], axis=0), "operand shapes [[2, 3], [2, 4]] differ outside axis 0")
    fails(ShapeError, lambda: b.concat([], axis=0), "concat(): needs at least one operand")
    fails(ShapeError, lambda: b.permute(x, (0, 0)), "permute(f32[2,3])", "axes [0, 0] are not a permutation of 0..1")
    fails(ShapeError, lambda: b.permute(x, (0, 1, 2)), "axes [0, 1, 2] are not a permutation of 0..1")
    fails(ShapeError, lambda: b.transpose(x, 0, 2), "permute(f32[2,3])", "out of range for rank 2")
    fails(ShapeError, lambda: b.tril(b.sum(x, axis=0)), "tril(f32[3])", "rank >= 2")


def test_reshape(b):
    x = b.input("x", (2, 3))
    fails(ShapeError, lambda: b.reshape(x, (4, 2)),
          "reshape(f32[2,3])", "cannot reshape 6 elements to [4, 2] (8 elements)")
    fails(ShapeError, lambda: b.reshape(x, (-1, -1)), "reshape(f32[2,3])", "more than one -1")
    fails(ShapeError, lambda: b.reshape(x, (4, -1)), "reshape(f32[2,3])", "-1 in shape [4, -1] cannot be resolved")
    fails(ShapeError, lambda: make_node("reshape", (x,), {"shape": (-6,)}), "negative size")


def test_wrong_dtypes(b):
    x, h = b.input("x", (2, 3)), b.input("h", (2, 3), "f16")
    i, m = b.input("i", (3,), "i32"), b.input("m", (3,), "bool")
    fails(DTypeError, lambda: b.add(x, h),
          "add(f32[2,3], f16[2,3])", "different dtypes ['f32', 'f16']", "insert a cast")
    fails(DTypeError, lambda: b.matmul(x, b.input("w", (3, 2), "f64")),
          "matmul(f32[2,3], f64[3,2])", "different dtypes")
    fails(DTypeError, lambda: b.exp(i), "exp(i32[3])", "expected a floating-point operand, got i32")
    fails(DTypeError, lambda: b.sqrt(m), "sqrt(bool[3])", "floating-point")
    fails(DTypeError, lambda: b.div(i, i), "div(i32[3], i32[3])", "expected floating-point operands", "cast first")
    fails(DTypeError, lambda: b.where(x, x, x),
          "where(f32[2,3], f32[2,3], f32[2,3])", "condition must be bool, got f32")
    fails(DTypeError, lambda: b.where(m, i, b.cast(i, "f32")),
          "where(bool[3], i32[3], f32[3])", "branches have different dtypes")
    fails(DTypeError, lambda: b.add(m, m), "add(bool[3], bool[3])", "expected numeric operands, got bool")
    fails(DTypeError, lambda: b.cumsum(m, axis=0), "cumsum(bool[3])", "cannot cumsum bool")
    fails(DTypeError, lambda: b.solve_tri(b.cast(x[:, 0:2], "i32"), i[0:2]),
          "solve_tri(i32[2,2], i32[2])", "floating-point")
    fails(DTypeError, lambda: i + 0.5, "const()", "value 0.5 is not representable as i32")
    fails(DTypeError, lambda: i * 2**40, "value 1099511627776 is not representable as i32")
    fails(DTypeError, lambda: b.cast(x, "complex64"), "cast(f32[2,3])", "unsupported dtype 'complex64'")
    fails(DTypeError, lambda: b.input("z", (2,), "f7"), "input(): unsupported dtype 'f7'")
    fails(DTypeError, lambda: b.full((2,), 1.0, dtype="float128"), "full(): unsupported dtype")


def test_attribute_errors(b):
    x = b.input("x", (2, 3))
    fails(AttrError, lambda: make_node("cumsum", (x,), {}), "cumsum(f32[2,3])", "missing attribute 'axis' (int)")
    fails(AttrError, lambda: make_node("cumsum", (x,), {"axis": 0, "foo": 1}),
          "unknown attribute(s) ['foo']; expected ['axis']")
    fails(AttrError, lambda: make_node("cumsum", (x,), {"axis": 1.5}), "attribute axis=1.5 is not of kind int")
    fails(AttrError, lambda: make_node("matmul", (x, x), {"transpose_a": 1}),
          "attribute transpose_a=1 is not of kind bool")
    fails(AttrError, lambda: make_node("pad", (x,), {"pads": (1, 2)}), "attribute pads=(1, 2) is not of kind pads")
    fails(AttrError, lambda: make_node("frobnicate", (x,), {}),
          "frobnicate(f32[2,3]): unknown op 'frobnicate'", "cumsum")
    fails(AttrError, lambda: make_node("exp", (np.ones(3),), {}), "operand 0 is ndarray, expected a dnir Node")
    fails(ShapeError, lambda: make_node("exp", (x, x), {}), "exp(f32[2,3], f32[2,3]): takes 1 operand(s), got 2")
    fails(AttrError, lambda: b.clamp(x, 1.0, -1.0), "clamp(f32[2,3])", "min=1.0 > max=-1.0")
    fails(AttrError, lambda: b.input("x", (3,)), "input name 'x' is used twice")
    fails(AttrError, lambda: b.input("2x", (3,)), "input name '2x' is not an identifier")
    fails(DnirError, lambda: b.add(1.0, 2.0), "add(1.0, 2.0): expected at least one dnir Node operand")
    fails(DnirError, lambda: x + np.ones(3), "cannot use ndarray", site=False)
    m = b.input("m", (3,), "bool")
    fails(DnirError, lambda: b.where(m, 1.0, 0.0), "where(bool[3], 1.0, 0.0): expected at least one dnir Node branch")


def test_regions_out_of_bounds(b):
    x, s, v = b.input("x", (2, 3, 4, 5)), b.input("s", (1, 2, 2, 5)), b.input("v", (2, 5))
    fails(ShapeError, lambda: b.slice(x, (0, 0, 0, 0), (2, 3, 5, 5)),
          "slice(f32[2,3,4,5])", "axis 2: [0:5] is not within 0..4")
    fails(ShapeError, lambda: b.slice(x, (0, 2, 0, 0), (2, 1, 4, 5)), "axis 1: [2:1]", "start <= stop")
    fails(ShapeError, lambda: b.slice(x, (0, 0), (1, 1)), "starts/stops need one entry per axis (4)")
    fails(ShapeError, lambda: x[2], "slice(f32[2,3,4,5])", "index 2 is out of range for axis 0 of size 2")
    fails(ShapeError, lambda: x[:, -4], "index -4 is out of range for axis 1 of size 3")
    fails(ShapeError, lambda: x[::2], "only unit-step slices")
    fails(ShapeError, lambda: x[0, 0, 0, 0, 0], "has more entries than rank 4")
    fails(ShapeError, lambda: b.set(x, s, (1, 2, 0, 0)),
          "set(f32[2,3,4,5], f32[1,2,2,5])", "axis 1: block [2:4] does not fit in destination size 3")
    fails(ShapeError, lambda: b.acc(x, s, (0, 0, -1, 0)), "acc(f32[2,3,4,5], f32[1,2,2,5])", "axis 2: block [-1:1]")
    fails(ShapeError, lambda: b.acc(x, s, (0, 0, 3, 0)), "axis 2: block [3:5] does not fit in destination size 4")
    fails(ShapeError, lambda: b.set(x, v, (0, 0)), "block rank 2, destination rank 4 and 2 offsets must agree")
    fails(DTypeError, lambda: b.set(x, b.cast(s, "f64"), (0, 0, 0, 0)), "different dtypes ['f32', 'f64']")
    fails(ShapeError, lambda: b.pad(x, [(0, -1)]), "pad(f32[2,3,4,5])", "must be >= 0")


def _body(*input_types, outputs):
    bb = Builder()
    ins = [bb.input(f"p{i}", shape, dtype) for i, (shape, dtype) in enumerate(input_types)]
    return bb.build(outputs(bb, *ins))


def test_scan_body_signature(b):
    h, xs, hd = b.input("h", (2,)), b.input("xs", (5, 2)), b.input("hd", (2,), "f64")
    grows = _body(((2,), "f32"), ((2,), "f32"), outputs=lambda bb, c, x: [bb.concat([c, x], 0)])
    fails(ShapeError, lambda: b.scan(grows, [h], [xs]),
          "scan(f32[2], f32[5,2])", "carry 0: body returns f32[4], expected the carried type f32[2]")
    ok = _body(((2,), "f32"), ((2,), "f32"), outputs=lambda bb, c, x: [c + x])
    fails(ShapeError, lambda: b.scan(ok, [hd], [xs]),
          "scan(f64[2], f32[5,2])", "body input 0 (p0) has type f32[2], expected f64[2]")
    fails(ShapeError, lambda: b.scan(ok, [h], [b.input("ys", (5, 3))]),
          "body input 1 (p1) has type f32[2], expected f32[3]")
    fails(ShapeError, lambda: b.scan(ok, [h], [xs], length=4),
          "sequence operand 1 has shape [5, 2]; expected leading axis 4")
    fails(ShapeError, lambda: b.scan(ok, [h], [xs, xs]), "body takes 2 inputs, scan has 3 operands")
    two = _body(((2,), "f32"), ((2,), "f32"), ((2,), "f32"), outputs=lambda bb, c, d, x: [c + x])
    fails(ShapeError, lambda: b.scan(two, [h, h], [xs]), "body returns 1 values, expected at least the 2 carries")
    fails(AttrError, lambda: b.scan(ok, [h], []), "scan(f32[2]): without sequence operands needs length=")
    scan = b.scan(ok, [h], [xs])[0].inputs[0]
    fails(ShapeError, lambda: b.exp(scan), "exp((f32[2]))", "multi-result node; read one result with item()")
    fails(ShapeError, lambda: make_node("item", (scan,), {"index": 1}), "index 1 out of range for 1 results")


def test_errors_raise_where_built_not_when_run(b):
    x, y = b.input("x", (2, 3)), b.input("y", (3, 2))
    bad = lambda: b.add(b.matmul(x, y), y)  # noqa: E731 - one line, so the site is known
    fails(ShapeError, bad, "add(f32[2,2], f32[3,2])")


def test_runtime_inputs():
    b = Builder()
    x, i = b.input("x", (2, 3)), b.input("i", (3,), "i32")
    g = b.build([b.exp(x), i + 1])
    xv, iv = np.ones((2, 3), np.float32), np.arange(3, dtype=np.int32)
    run = lambda inputs: dnir.run(g, inputs)  # noqa: E731
    fails(InputError, lambda: run({"x": np.ones((3, 2)), "i": iv}),
          "input 'x': shape [3, 2], expected [2, 3]", site=False)
    fails(InputError, lambda: run({"x": np.ones((2, 3), np.int64), "i": iv}),
          "input 'x': dtype i64, expected f32", site=False)
    fails(InputError, lambda: run({"x": xv, "i": iv.astype(np.float32)}),
          "input 'i': dtype f32, expected i32", site=False)
    fails(InputError, lambda: run({"x": xv, "i": np.arange(3)}), "input 'i': dtype i64, expected i32", site=False)
    fails(InputError, lambda: run({"x": xv, "i": iv, "z": xv}),
          "unknown input name(s) ['z']; the graph takes ['x', 'i']", site=False)
    fails(InputError, lambda: run({"x": xv}), "missing input(s) ['i']", site=False)
    fails(InputError, lambda: run([xv]), "the graph takes 2 inputs ['x', 'i'], got 1", site=False)
    fails(InputError, lambda: run([xv, np.array(["a", "b", "c"])]), "input 'i': dtype <U1, expected i32", site=False)
    fails(dnir.BackendError, lambda: dnir.run(g, [xv, iv], target="abacus"), "unknown target 'abacus'", site=False)


GOOD = "graph(%x: f32[2,3]) {\n  %0: f32[2,3] = exp(%x)\n  return %0\n}\n"


@pytest.mark.parametrize("text, line, col, fragments", [
    # unknown op: at the op's name
    (GOOD.replace("exp(%x)", "frob(%x)"), 2, 18, ["unknown op 'frob'"]),
    # undefined value: at the value
    (GOOD.replace("exp(%x)", "exp(%y)"), 2, 22, ["%y is used before it is defined"]),
    (GOOD.replace("return %0", "return %7"), 3, 10, ["%7 is not defined"]),
    # bad types
    (GOOD.replace("%x: f32[2,3]", "%x: f33[2,3]"), 1, 11, ["unknown dtype 'f33'", "f32"]),
    (GOOD.replace("%x: f32[2,3]", "%x: f32[2,-3]"), 1, 17, ["dimension '-3' must be a non-negative integer"]),
    (GOOD.replace("%x: f32[2,3]", "%x: f32[2;3]"), 1, 16, ["unexpected character ';'"]),
    # the declared type disagrees with the op's: at the declared type
    (GOOD.replace("%0: f32[2,3]", "%0: f32[3,2]"), 2, 7, ["%0 is declared f32[3,2] but exp gives f32[2,3]"]),
    (GOOD.replace("%0: f32[2,3]", "%0: f64[2,3]"), 2, 7, ["declared f64[2,3]"]),
    # op errors are located at the op and keep their message
    (GOOD.replace("exp(%x)", "cumsum(%x) {axis=2}"), 2, 18, ["cumsum(f32[2,3]): axis 2 is out of range for rank 2"]),
    (GOOD.replace("exp(%x)", "cumsum(%x) {axis=1, axis=1}"), 2, 38, ["attribute 'axis' is given twice"]),
    # unterminated graph / trailing text / bad characters
    (GOOD[:GOOD.index("  return")], 3, 1, ["unterminated graph"]),
    (GOOD.replace("return %0\n}", "return %0\n"), 5, 1, ["expected '}', got end of input"]),
    (GOOD + "graph", 5, 1, ["expected eof, got 'graph'"]),
    (GOOD.replace("exp(%x)", "exp(%x) @"), 2, 26, ["unexpected character '@'"]),
    ("\n\n  grph(%x: f32[2]) {", 3, 3, ["expected 'graph', got 'grph'"]),
    (GOOD.replace("%0 = ", "%0: f32[2,3] = ").replace("%0: f32[2,3] = exp", "%0: f32[2,3] exp"), 2, 16,
     ["expected '=', got 'exp'"]),
    (GOOD.replace("%x: f32[2,3]", "%x: f32[2,3], %x: f32[2]"), 1, 21, ["input %x is declared twice"]),
])
def test_malformed_text_has_line_and_column(text, line, col, fragments):
    with pytest.raises(ParseError) as info:
        dnir.parse(text, "bad.dnir")
    err = info.value
    assert (err.line, err.col) == (line, col), str(err)
    assert str(err).startswith(f"bad.dnir:{line}:{col}: ")
    for fragment in fragments:
        assert fragment in str(err)
    assert "built at" not in str(err)     # the parser's own call site means nothing to the reader


def test_malformed_scan_body_text():
    text = """graph(%h: f32[2], %xs: f32[4,2]) {
  %r: (f32[2], f32[4,2]) = scan(%h, %xs) {length=4, num_carry=1, num_xs=1} body(%c: f32[2], %x: f32[3]) {
    return %c, %x
  }
  return %h
}
"""
    with pytest.raises(ParseError) as info:
        dnir.parse(text)
    assert (info.value.line, info.value.col) == (2, 28)
    assert "body input 1 (x) has type f32[3], expected f32[2]" in str(info.value)


@pytest.mark.parametrize("text, line, col, fragments", [
    # sizes nobody can mean: named with their bytes, before anything counts them
    (GOOD.replace("f32[2,3]", "f32[2000000,3000000]", 1), 1, 11,
     ["type f32[2000000,3000000] has 6e+12 elements, 21.8 TiB", "at most 2**40 elements"]),
    (GOOD.replace("f32[2,3]", "f32[" + "9" * 5000 + ",3]", 1), 1, 15, ["(5000 digits)", "2**40 elements"]),
    # integers beyond 64 bits, strings JSON cannot read, brackets without end
    (GOOD.replace("exp(%x)", "cumsum(%x) {axis=99999999999999999999}"), 2, 35, ["outside the 64-bit range"]),
    (GOOD.replace("exp(%x)", "cumsum(%x) {axis=" + "1" * 5000 + "}"), 2, 35, ["outside the 64-bit range"]),
    (GOOD.replace("exp(%x)", 'cumsum(%x) {axis="\\q"}'), 2, 35, ["bad string", "Invalid \\escape"]),
    (GOOD.replace("exp(%x)", "cumsum(%x) {axis=" + "[" * 100000 + "}"), 2, None, ["nested too deeply"]),
])
def test_text_beyond_the_format_s_bounds(text, line, col, fragments):
    with pytest.raises(ParseError) as info:
        dnir.parse(text, "big.dnir")
    assert info.value.line == line and col in (None, info.value.col), str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_files_are_read_up_to_a_size_limit(tmp_path, monkeypatch):
    import dnir.text
    path = tmp_path / "long.dnir"
    path.write_text(GOOD + "#" * 200 + "\n")
    assert dnir.parse_file(path).output_names == ("out0",)
    monkeypatch.setattr(dnir.text, "MAX_TEXT_BYTES", 100)
    fails(InputError, lambda: dnir.parse_file(path), f"{path}: larger than 100 B, too large for a .dnir graph",
          site=False)
