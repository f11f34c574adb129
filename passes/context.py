"""The pass context: which target a pipeline prepares a graph for, and that target's limits.

    with PassContext(target):
        graph = optimize(graph, ["fuse_delta_steps", "expand_fused"])

As TVM's PassContext, it is entered with `with` and read by the passes that
depend on the target (`current().target`); a pipeline without a target (O0, O1,
O2) runs in the default context, whose target is None. A `Target` says which
fused ops (dnir/fused.py) the target has kernels for, and each kernel's check
of a node against the target's limits (shared memory per thread block, the
dtypes the kernel is written for), so that a pass in passes/ can ask the
lowering layer's question without importing it. Passes leave remarks on the
context (what matched, what almost did and why not), which `dnir opt --report`
prints.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

from dnir.graph import Node

# kernel check: (fused node, target) -> None when the kernel takes the node, else why not
KernelCheck = Callable[[Node, "Target"], "str | None"]


@dataclass(frozen=True)
class Target:
    name: str
    kernels: Mapping[str, KernelCheck] = field(default_factory=dict)   # fused op -> its kernel's check
    shared_bytes: int | None = None          # shared memory of one GPU thread block
    dtypes: frozenset[str] | None = None     # dtypes the fused kernels are written for (None: any)
    # fused ops whose kernels load operands narrower than the op (bf16/fp16) and widen them themselves
    narrow_operands: frozenset[str] = frozenset()
    # fused ops whose kernels store their result narrower than they compute (the op's `dtype`
    # attribute, bf16/fp16), rounding as they store it
    narrow_results: frozenset[str] = frozenset()

    def __post_init__(self):
        object.__setattr__(self, "kernels", MappingProxyType(dict(self.kernels)))

    def rejects(self, node: Node) -> str | None:
        """None when this target runs `node` (a fused op) with its own kernel, else why not."""
        if node.op not in self.kernels:
            return f"target {self.name!r} has no {node.op} kernel"
        narrow = sorted({i.dtype for i in node.inputs} - _wide_dtypes(node))
        if narrow and node.op not in self.narrow_operands:
            return f"the {node.op} kernel of {self.name!r} loads no {', '.join(narrow)} operands"
        if node.attrs.get("dtype") and node.op not in self.narrow_results:
            return f"the {node.op} kernel of {self.name!r} stores no {node.attrs['dtype']} results"
        return self.kernels[node.op](node, self)


def _wide_dtypes(node: Node) -> set[str]:
    """What a fused node computes in (dnir.fused.compute_dtype): its results' dtypes, or where it
    stores its result narrower (its `dtype` attribute), its widest operand's."""
    if node.attrs.get("dtype"):
        return {max((i.type for i in node.inputs), key=lambda t: t.itemsize).dtype}
    return {t.dtype for t in (node.type if isinstance(node.type, tuple) else (node.type,))}


def any_node(node: Node, target: Target) -> None:
    """The check of a kernel that takes every node of its op (e.g. a reference kernel)."""
    return None


class PassContext:
    def __init__(self, target: Target | None = None):
        self.target = target
        self.remarks: list[tuple[str, str]] = []    # (pass name, remark)

    def remark(self, pass_name: str, text: str):
        """Note what a pass found (once: a rule may see the same node in every sweep)."""
        if (pass_name, text) not in self.remarks:
            self.remarks.append((pass_name, text))

    def __enter__(self) -> "PassContext":
        _stack().append(self)
        return self

    def __exit__(self, *exc):
        _stack().pop()


_LOCAL = threading.local()      # each thread enters its own contexts (two may prepare graphs at once)


def _stack() -> list[PassContext]:
    if not hasattr(_LOCAL, "stack"):
        _LOCAL.stack = []
    return _LOCAL.stack


def current() -> PassContext:
    """The innermost context this thread entered, or a fresh one without a target."""
    stack = _stack()
    return stack[-1] if stack else PassContext()
