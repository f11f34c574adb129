"""Graph pictures through Graphviz: `to_dot(graph)`, `diff_dot(before, after)`, `render(...)`.

Nodes carry their op, key attributes and result type; colours say what class
of work an op is (from the op registry's `op_class`; fused ops, which a GPU
target's pipeline puts in place of the delta rule's units, are also drawn as
3-d boxes with a heavy border); scan bodies are clusters;
inputs and outputs have their own shapes. `collapse=True` folds scan bodies
and chains of layout ops so that a real model's graph stays readable.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from .errors import DnirError
from .graph import Graph, Node
from .ops import REGISTRY
from .types import type_str

# Fill colours by op class (ColorBrewer Pastel1-like, readable with black text).
CLASS_COLOURS = {
    "source": "#e5e5e5", "elementwise": "#b3cde3", "layout": "#fed9a6", "matmul": "#fbb4ae",
    "reduction": "#ccebc5", "assembly": "#decbe4", "control": "#ffffcc", "fused": "#f781bf",
}
DIFF_COLOURS = {"removed": "#e41a1c", "added": "#4daf4a", "unchanged": "#999999"}
_HIDDEN_ATTRS = {"body", "value", "name", "shape", "dtype"}


def _label(node: Node) -> str:
    parts = []
    for key, value in node.attrs.items():
        if key in _HIDDEN_ATTRS and node.op not in ("full",):
            continue
        if isinstance(value, bool):
            if value:
                parts.append(key)
            continue
        text = str(list(value) if isinstance(value, tuple) else value).replace(" ", "")
        parts.append(f"{key}={text if len(text) <= 28 else text[:25] + '...'}")
    lines = [node.op if node.op != "input" else f"input {node.attrs['name']}"]
    if parts:
        lines.append(", ".join(parts))
    lines.append(type_str(node.type))
    return "\n".join(lines)


def _signature(node: Node, memo: dict) -> str:
    """A structural hash: equal for nodes that compute the same thing."""
    key = id(node)
    if key not in memo:
        attrs = {k: (_graph_hash(v) if isinstance(v, Graph) else v) for k, v in node.attrs.items()}
        text = repr((node.op, sorted(attrs.items()), type_str(node.type),
                     [_signature(i, memo) for i in node.inputs]))
        memo[key] = hashlib.sha1(text.encode()).hexdigest()[:16]
    return memo[key]


def _graph_hash(graph: Graph) -> str:
    from .text import print_graph
    return hashlib.sha1(print_graph(graph).encode()).hexdigest()[:16]


def _digraph(name="dnir"):
    try:
        import graphviz
    except ImportError as e:  # pragma: no cover - graphviz is a declared dependency of [viz]
        raise DnirError("pictures need the graphviz Python package: pip install graphviz") from e
    dot = graphviz.Digraph(name)
    dot.attr(rankdir="TB", fontname="Helvetica", fontsize="11", nodesep="0.25", ranksep="0.35")
    dot.attr("node", shape="box", style="rounded,filled", fontname="Helvetica", fontsize="10")
    dot.attr("edge", arrowsize="0.6", color="#555555")
    return dot


def _fold_layout_chains(graph: Graph) -> dict[int, Node]:
    """Map each layout node inside a single-use chain of >= 2 layout ops to the chain's head."""
    users = graph.uses()
    head_of: dict[int, Node] = {}
    for node in graph.topo_order():
        if REGISTRY[node.op].op_class != "layout" or not node.inputs:
            continue
        src = node.inputs[0]
        if (REGISTRY[src.op].op_class == "layout" and src.op != "input" and len(users[id(src)]) == 1):
            head_of[id(node)] = head_of.get(id(src), src)
    return head_of


def _add_graph(dot, graph: Graph, prefix: str, collapse: bool, colour_of=None, ids=None):
    """Draw `graph` into `dot`; returns {id(node): dot node name}."""
    names = {} if ids is None else ids
    head_of = _fold_layout_chains(graph) if collapse else {}
    chain_len: dict[int, int] = {}
    for hid in head_of.values():
        chain_len[id(hid)] = chain_len.get(id(hid), 1) + 1
    for i, node in enumerate(graph.topo_order()):
        if id(node) in head_of:
            names[id(node)] = names[id(head_of[id(node)])]
            continue
        name = f"{prefix}n{i}"
        names[id(node)] = name
        style = {"fillcolor": CLASS_COLOURS.get(REGISTRY[node.op].op_class, "white")}
        label = _label(node)
        if node.op == "input":
            style.update(shape="invhouse", fillcolor="#a6d854")
        if REGISTRY[node.op].op_class == "fused":     # a unit a target runs as one kernel: drawn apart
            style.update(shape="box3d", penwidth="2")
        if id(node) in chain_len:
            label = f"layout chain x{chain_len[id(node)]}\n{label}"
        if colour_of is not None:
            status = colour_of(node)
            style.update(color=DIFF_COLOURS[status], penwidth="3" if status != "unchanged" else "1")
            if status == "removed":
                style["style"] = "rounded,filled,dashed"
            label = f"[{status}] {label}" if status != "unchanged" else label
        if node.op == "scan":
            body: Graph = node.attrs["body"]
            if collapse:
                hist = body.op_histogram()
                top = ", ".join(f"{op} x{n}" for op, n in hist.most_common(4))
                label += f"\nbody: {body.node_count()} nodes ({top})"
                dot.node(name, label, **style)
            else:
                dot.node(name, label, **style)
                with dot.subgraph(name=f"cluster_{name}") as sub:
                    sub.attr(label=f"scan body (x{node.attrs['length']})", style="rounded,dashed",
                             color="#888888", fontname="Helvetica")
                    body_names = _add_graph(sub, body, f"{name}_", collapse, None)
                    sub.node(f"{name}_ret", "return", shape="house", fillcolor="#fc8d62")
                    for out in body.outputs:
                        sub.edge(body_names[id(out)], f"{name}_ret")
                dot.edge(name, body_names[id(body.inputs[0])] if body.inputs else f"{name}_ret",
                         style="dotted", arrowhead="none", constraint="false")
        else:
            dot.node(name, label, **style)
        for inp in node.inputs:
            dot.edge(names[id(inp)], name)
    return names


def _add_outputs(dot, graph: Graph, names: dict, prefix: str = "out"):
    for i, (node, oname) in enumerate(zip(graph.outputs, graph.output_names)):
        dot.node(f"{prefix}{i}", f"output {oname}\n{type_str(node.type)}", shape="house", fillcolor="#fc8d62")
        dot.edge(names[id(node)], f"{prefix}{i}")


def to_dot(graph: Graph, collapse: bool = False):
    """A graphviz.Digraph of the graph (`.source` is the DOT text)."""
    dot = _digraph()
    names = _add_graph(dot, graph, "", collapse)
    _add_outputs(dot, graph, names)
    return dot


def diff_dot(before: Graph, after: Graph, collapse: bool = True):
    """One picture of two graphs: nodes only in `before` (removed, red, dashed),
    only in `after` (added, green), in both (unchanged, grey). Nodes match by
    structure (op, attributes, type and the same for their inputs)."""
    memo_b, memo_a = {}, {}
    sig_b = {_signature(n, memo_b) for n in before.topo_order()}
    sig_a = {_signature(n, memo_a) for n in after.topo_order()}
    dot = _digraph("diff")
    ids: dict[int, str] = {}
    a_names = _add_graph(dot, after, "a", collapse,
                         lambda n: "unchanged" if _signature(n, memo_a) in sig_b else "added", ids)
    removed = [n for n in before.topo_order() if _signature(n, memo_b) not in sig_a]
    by_sig = {_signature(n, memo_a): a_names[id(n)] for n in after.topo_order()}
    for i, node in enumerate(removed):
        name = f"r{i}"
        ids[id(node)] = name
        dot.node(name, f"[removed] {_label(node)}", color=DIFF_COLOURS["removed"], penwidth="3",
                 style="rounded,filled,dashed", fillcolor=CLASS_COLOURS.get(REGISTRY[node.op].op_class, "white"))
    for node in removed:
        for inp in node.inputs:
            src = ids.get(id(inp)) or by_sig.get(_signature(inp, memo_b))
            if src:
                dot.edge(src, ids[id(node)], color=DIFF_COLOURS["removed"], style="dashed")
    _add_outputs(dot, after, a_names)
    legend = ", ".join(f"{k}: {sum(1 for _ in v)}" for k, v in (
        ("removed", removed), ("added", [n for n in after.topo_order() if _signature(n, memo_a) not in sig_b])))
    dot.attr(label=f"pass diff ({legend})", labelloc="t")
    return dot


def dot_available() -> bool:
    return shutil.which("dot") is not None


def render(dot, path) -> Path:
    """Write `dot` to `path`; the suffix picks the format (.svg .png .pdf .dot).

    Without Graphviz's `dot` program, writes the .dot file next to `path` and
    raises DnirError saying how to render it.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in ("svg", "png", "pdf", "dot", "gv"):
        raise DnirError(f"unknown picture format {path.suffix!r}; expected .svg, .png, .pdf or .dot")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt in ("dot", "gv"):
        path.write_text(dot.source)
        return path
    if not dot_available():
        dot_path = path.with_suffix(".dot")
        dot_path.write_text(dot.source)
        raise DnirError(f"Graphviz's `dot` program is not installed; wrote {dot_path}. Install graphviz "
                        f"(apt-get install graphviz) or render it elsewhere: dot -T{fmt} {dot_path} -o {path}")
    path.write_bytes(dot.pipe(format=fmt))
    return path
