"""The `.dnir` text format: a type on every value, jaxpr-like, round-trips.

    graph(%x: f32[4,8], %w: f32[8,8]) {
      %0: f32[4,8] = matmul(%x, %w) {transpose_a=false, transpose_b=true}
      %1: f32[4,8] = cumsum(%0) {axis=1}
      return %1 as y
    }

A scan's body follows its attributes as `body(%params) { ... return ... }`;
it sees only its own parameters (loop-invariant values are scan operands).
"""
from __future__ import annotations

import json
import math
import re

from .errors import DnirError, InputError, ParseError
from .graph import Graph, Node, install
from .limits import MAX_TEXT_BYTES, format_bytes, oversize
from .ops import make_node
from .types import DTYPES, TensorType, type_str

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


# ---------------------------------------------------------------------------
# Printing

def print_graph(graph: Graph) -> str:
    return "\n".join(_print_lines(graph, "")) + "\n"


def _print_lines(graph: Graph, indent: str, header: str = "graph") -> list[str]:
    names: dict[int, str] = {}
    params = []
    for node in graph.inputs:
        names[id(node)] = "%" + node.attrs["name"]
        params.append(f"{names[id(node)]}: {node.type}")
    meta = ""
    if graph.meta:
        meta = " meta {" + ", ".join(f"{k}={_value(v)}" for k, v in graph.meta.items()) + "}"
    lines = [f"{indent}{header}({', '.join(params)}){meta} {{"]
    inner = indent + "  "
    counter = 0
    for node in graph.topo_order():
        if id(node) in names:
            continue
        if node.op == "input":
            raise DnirError(f"input {node.attrs['name']!r} is used but is not one of the graph's inputs")
        names[id(node)] = f"%{counter}"
        counter += 1
        args = ", ".join(names[id(i)] for i in node.inputs)
        attrs = {k: v for k, v in node.attrs.items() if not isinstance(v, Graph)}
        attr_text = " {" + ", ".join(f"{k}={_value(v)}" for k, v in attrs.items()) + "}" if attrs else ""
        head = f"{inner}{names[id(node)]}: {type_str(node.type)} = {node.op}({args}){attr_text}"
        bodies = [v for v in node.attrs.values() if isinstance(v, Graph)]
        if bodies:
            body_lines = _print_lines(bodies[0], inner, "body")
            lines.append(head + " " + body_lines[0].lstrip())
            lines.extend(body_lines[1:])
        else:
            lines.append(head)
    rets = []
    for i, (node, name) in enumerate(zip(graph.outputs, graph.output_names)):
        rets.append(names[id(node)] + ("" if name == f"out{i}" else f" as {name}"))
    lines.append(f"{inner}return {', '.join(rets)}")
    lines.append(f"{indent}}}")
    return lines


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return v if v in DTYPES else json.dumps(v)
    if isinstance(v, tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise DnirError(f"cannot print attribute value {v!r}")


# ---------------------------------------------------------------------------
# Parsing

_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r\n]+|\#[^\n]*)
  | (?P<value>%[A-Za-z0-9_]+)
  | (?P<number>-?(?:inf\b|nan\b|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<punct>[()\[\]{},:=])
""", re.VERBOSE)


class _Tokens:
    def __init__(self, text: str, source_name: str):
        self.source_name = source_name
        self.toks: list[tuple[str, str, int, int]] = []
        line, line_start, pos = 1, 0, 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m:
                raise ParseError(f"unexpected character {text[pos]!r}", line, pos - line_start + 1, source_name)
            kind, tok = m.lastgroup, m.group()
            if kind != "ws":
                self.toks.append((kind, tok, line, m.start() - line_start + 1))
            for i, ch in enumerate(tok):
                if ch == "\n":
                    line, line_start = line + 1, m.start() + i + 1
            pos = m.end()
        self.toks.append(("eof", "", line, pos - line_start + 1))
        self.i = 0

    def peek(self):
        return self.toks[self.i]

    def next(self):
        tok = self.toks[self.i]
        self.i = min(self.i + 1, len(self.toks) - 1)
        return tok

    def error(self, message, tok=None):
        _, _, line, col = tok or self.peek()
        return ParseError(message, line, col, self.source_name)

    def expect(self, text=None, kind=None):
        tok = self.next()
        if (text is not None and tok[1] != text) or (kind is not None and tok[0] != kind):
            want = repr(text) if text is not None else kind
            got = repr(tok[1]) if tok[0] != "eof" else "end of input"
            raise self.error(f"expected {want}, got {got}", tok)
        return tok

    def accept(self, text):
        if self.peek()[1] == text and self.peek()[0] != "string":
            return self.next()
        return None


def parse(text: str, source_name: str = "<text>") -> Graph:
    """Parse `.dnir` text into a Graph; errors carry line and column."""
    toks = _Tokens(text, source_name)
    toks.expect("graph")
    try:
        graph = _parse_graph(toks)
    except RecursionError:
        raise toks.error("brackets or scan bodies nested too deeply") from None
    toks.expect(kind="eof")
    return graph


def parse_file(path) -> Graph:
    """Read and parse a .dnir file of at most MAX_TEXT_BYTES (a device or a stray
    huge file is refused after that many bytes, not read to the end)."""
    with open(path, "rb") as f:
        data = f.read(MAX_TEXT_BYTES + 1)
    if len(data) > MAX_TEXT_BYTES:
        raise InputError(f"{path}: larger than {format_bytes(MAX_TEXT_BYTES)}, too large for a .dnir graph "
                         f"(a graph's text does not grow with the sequence length)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    return parse(text, str(path))


def _parse_graph(toks: _Tokens) -> Graph:
    env: dict[str, Node] = {}
    inputs = []
    toks.expect("(")
    if not toks.accept(")"):
        while True:
            tok = toks.expect(kind="value")
            name = tok[1][1:]
            if not _IDENT.match(name):
                raise toks.error(f"input name {name!r} must be an identifier", tok)
            if tok[1] in env:
                raise toks.error(f"input {tok[1]} is declared twice", tok)
            toks.expect(":")
            t = _parse_type(toks)
            if isinstance(t, tuple):
                raise toks.error("a graph input must be a tensor type", tok)
            node = Node("input", (), {"name": name, "shape": t.shape, "dtype": t.dtype}, t)
            env[tok[1]] = node
            inputs.append(node)
            if toks.accept(")"):
                break
            toks.expect(",")
    meta = {}
    if toks.peek()[1] == "meta" and toks.peek()[0] == "ident":
        toks.next()
        meta = _parse_attrs(toks)
    toks.expect("{")
    while toks.peek()[1] != "return" or toks.peek()[0] != "ident":
        if toks.peek()[0] == "eof":
            raise toks.error("unterminated graph: expected a statement or 'return', got end of input")
        _parse_stmt(toks, env)
    toks.expect("return")
    outputs, names = [], []
    while True:
        tok = toks.expect(kind="value")
        if tok[1] not in env:
            raise toks.error(f"{tok[1]} is not defined", tok)
        outputs.append(env[tok[1]])
        names.append(toks.expect(kind="ident")[1] if toks.accept("as") else f"out{len(names)}")
        if not toks.accept(","):
            break
    toks.expect("}")
    return Graph(inputs, outputs, names, meta)


def _parse_type(toks: _Tokens):
    if toks.accept("("):
        types = [_parse_type(toks)]
        while toks.accept(","):
            types.append(_parse_type(toks))
        toks.expect(")")
        return tuple(types)
    tok = toks.expect(kind="ident")
    if tok[1] not in DTYPES:
        raise toks.error(f"unknown dtype {tok[1]!r}; expected one of {', '.join(DTYPES)}", tok)
    toks.expect("[")
    dims = []
    if not toks.accept("]"):
        while True:
            d = toks.expect(kind="number")
            if not d[1].isdigit():
                raise toks.error(f"dimension {d[1]!r} must be a non-negative integer", d)
            if len(d[1]) > 15:      # beyond the bound below; int() refuses thousands of digits
                raise toks.error(f"dimension {d[1][:15]}... ({len(d[1])} digits) is beyond the size of any "
                                 f"tensor (at most 2**40 elements)", d)
            dims.append(int(d[1]))
            if toks.accept("]"):
                break
            toks.expect(",")
    t = TensorType(dims, tok[1])
    why = oversize(t)
    if why:
        raise toks.error(f"type {t} has {why}", tok)
    return t


def _parse_stmt(toks: _Tokens, env: dict):
    name_tok = toks.expect(kind="value")
    if name_tok[1] in env:
        raise toks.error(f"{name_tok[1]} is defined twice", name_tok)
    toks.expect(":")
    type_tok = toks.peek()
    declared = _parse_type(toks)
    toks.expect("=")
    op_tok = toks.expect(kind="ident")
    toks.expect("(")
    args = []
    if not toks.accept(")"):
        while True:
            tok = toks.expect(kind="value")
            if tok[1] not in env:
                raise toks.error(f"{tok[1]} is used before it is defined", tok)
            args.append(env[tok[1]])
            if toks.accept(")"):
                break
            toks.expect(",")
    attrs = _parse_attrs(toks) if toks.peek()[1] == "{" else {}
    if toks.peek()[1] == "body" and toks.peek()[0] == "ident":
        toks.next()
        attrs["body"] = _parse_graph(toks)
    try:
        node = make_node(op_tok[1], args, attrs)
    except DnirError as e:
        raise toks.error(str(e).split(" [built at ")[0], op_tok) from None
    if node.type != declared:
        raise toks.error(f"{name_tok[1]} is declared {type_str(declared)} but {op_tok[1]} gives "
                         f"{type_str(node.type)}", type_tok)
    env[name_tok[1]] = node


def _parse_attrs(toks: _Tokens) -> dict:
    toks.expect("{")
    attrs = {}
    if not toks.accept("}"):
        while True:
            tok = toks.expect(kind="ident")
            if tok[1] in attrs:
                raise toks.error(f"attribute {tok[1]!r} is given twice", tok)
            toks.expect("=")
            attrs[tok[1]] = _parse_value(toks)
            if toks.accept("}"):
                break
            toks.expect(",")
    return attrs


def _parse_value(toks: _Tokens):
    tok = toks.next()
    kind, text = tok[0], tok[1]
    if kind == "number":
        if any(c in text for c in ".eEn") or "inf" in text:
            return float(text)
        # Attributes are 64-bit integers everywhere they are used (NumPy, TVM); the length
        # test first, as int() refuses strings of thousands of digits.
        if len(text) > 20 or not -2**63 <= int(text) < 2**63:
            raise toks.error(f"integer {text if len(text) <= 20 else text[:20] + '...'} is outside the "
                             f"64-bit range", tok)
        return int(text)
    if kind == "string":
        try:
            return json.loads(text)
        except ValueError as e:
            raise toks.error(f"bad string {text}: {e.msg}", tok) from None
    if kind == "ident":
        return {"true": True, "false": False}.get(text, text)
    if text == "[":
        items = []
        if not toks.accept("]"):
            while True:
                items.append(_parse_value(toks))
                if toks.accept("]"):
                    break
                toks.expect(",")
        return tuple(items)
    raise toks.error(f"expected an attribute value, got {text!r}", tok)


install(print=print_graph)   # str(graph) is its text
