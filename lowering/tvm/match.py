"""Structural matching of small dnir subgraphs, for the pattern-lowered GPU kernels
(chunk_scan.py, token_step.py). The rewrite engine's patterns (passes/rewrite.py) fix
the operand order; these helpers accept either order of a commutative op."""
from __future__ import annotations

from dnir.graph import Node


def commuted(n: Node, op: str, test):
    """(x, y) with n = op(x, y) or op(y, x) and test(x, y) true, else None."""
    if n.op == op:
        for x, y in (n.inputs, n.inputs[::-1]):
            if test(x, y):
                return x, y
    return None


def is_matmul(n: Node, ta=False, tb=False) -> bool:
    return n.op == "matmul" and n.attrs["transpose_a"] == ta and n.attrs["transpose_b"] == tb


def through_reshapes(n: Node) -> Node:
    while n.op == "reshape":
        n = n.inputs[0]
    return n
