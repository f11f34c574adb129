"""The verifier: checks the invariants every pass must keep."""
from __future__ import annotations

import re

import networkx as nx

from .errors import DnirError, VerifyError
from .graph import Graph, Node
from .ops import REGISTRY, make_node
from .types import type_str


def verify(graph: Graph, where: str = "graph") -> Graph:
    """Raise VerifyError naming the first broken invariant; return the graph."""
    if not graph.outputs:
        raise VerifyError(f"{where}: has no outputs")
    if len(set(graph.output_names)) != len(graph.output_names):
        raise VerifyError(f"{where}: output names repeat: {list(graph.output_names)}")
    unreadable = [n for n in graph.output_names if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(n))]
    if unreadable:  # the text format writes them as `return %v as NAME`
        raise VerifyError(f"{where}: output name(s) {unreadable} are not identifiers (letters, digits, _)")
    names = set()
    for node in graph.inputs:
        if node.op != "input":
            raise VerifyError(f"{where}: graph input {node!r} is not an input node")
        if node.attrs["name"] in names:
            raise VerifyError(f"{where}: input name {node.attrs['name']!r} is declared twice")
        names.add(node.attrs["name"])
    if not nx.is_directed_acyclic_graph(graph.to_networkx()):
        raise VerifyError(f"{where}: has a cycle")
    declared = {id(n) for n in graph.inputs}
    counter = 0     # values are numbered as the text format prints them: %0, %1, ... (inputs by name)
    for node in graph.topo_order():
        if node.op not in REGISTRY:
            raise VerifyError(f"{where}: unknown op {node.op!r}")
        if node.op == "input":
            if id(node) not in declared:
                raise VerifyError(f"{where}: input {node.attrs['name']!r} is used but not declared "
                                  f"in the graph's inputs")
            continue
        value, counter = f"%{counter}", counter + 1
        try:
            again = make_node(node.op, node.inputs, node.attrs)
        except DnirError as e:
            raise VerifyError(f"{where}: node {value} ({node.op}) fails to re-check: {e}") from None
        if again.type != node.type:
            operands = ", ".join(type_str(i.type) for i in node.inputs)
            raise VerifyError(f"{where}: {value} = {node.op}({operands}) stores type {type_str(node.type)} but "
                              f"its operands give {type_str(again.type)}")
        if node.op == "scan":
            verify(node.attrs["body"], f"{where}: scan body")
    return graph


def is_valid(graph: Graph) -> bool:
    try:
        verify(graph)
    except VerifyError:
        return False
    return True


__all__ = ["verify", "is_valid", "Node"]
