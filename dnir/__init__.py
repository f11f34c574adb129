"""dnir: a small tensor-graph compiler for delta-net (linear attention) layers."""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import (AttrError, BackendError, DnirError, DTypeError, InputError, ParseError, ShapeError,
                     VerifyError)
from .types import TensorType
from .graph import Graph, Node, structurally_equal
from .ops import REGISTRY, OpDef, make_node
from . import fused  # noqa: F401  (registers the fused ops)
from .builder import Builder
from .text import parse, parse_file, print_graph
from .verify import verify
from .api import chunk_gated_delta_rule, chunk_kda, fused_recurrent_gated_delta_rule, fused_recurrent_kda
from .lowering.numpy_backend import run as _reference_run
from .models import DeltaNetConfig as _DeltaNetConfig, random_inputs as _model_inputs
from .passes.validate import use_reference as _use_reference

# Numeric validation of passes runs the NumPy reference and draws a delta-net graph's inputs as the
# model does; both live above the passes, which cannot import them, so they are handed in here.
_use_reference(_reference_run,
               {"delta_net": lambda meta, rng: _model_inputs(_DeltaNetConfig.from_meta(meta), rng)})

print = print_graph  # noqa: A001  - `dnir.print(g)` is the text format's printer


def run(graph: Graph, inputs, *, target: str = "numpy", float64: bool = False):
    """Run a graph on a target; returns the outputs as NumPy arrays."""
    from .lowering import run as _run
    return _run(graph, inputs, target=target, float64=float64)


__all__ = [
    "AttrError", "BackendError", "Builder", "DnirError", "DTypeError", "Graph", "InputError", "Node", "OpDef",
    "ParseError", "REGISTRY", "ShapeError", "TensorType", "VerifyError", "make_node", "parse", "parse_file",
    "print", "print_graph", "run", "structurally_equal", "verify",
    "chunk_gated_delta_rule", "chunk_kda", "fused_recurrent_gated_delta_rule", "fused_recurrent_kda",
]
