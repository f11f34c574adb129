"""Value names as the text format prints them (%q for inputs, %0, %1, ... in order)."""
from __future__ import annotations

from ..graph import Graph


def value_names(graph: Graph) -> dict[int, str]:
    """id(node) -> its printed name; the numbering matches dnir.print (a scan body numbers its own)."""
    names = {id(n): "%" + n.attrs["name"] for n in graph.inputs}
    counter = 0
    for node in graph.topo_order():
        if id(node) not in names:
            names[id(node)] = f"%{counter}"
            counter += 1
    return names
