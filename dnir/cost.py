"""FLOP and byte counts; they live in dnir.analysis.cost (kept importable here)."""
from .analysis.cost import graph_bytes, graph_flops, node_bytes, node_flops  # noqa: F401
