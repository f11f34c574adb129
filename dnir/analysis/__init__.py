"""Static analyses of a graph: FLOP and byte counts, view arithmetic, the compute-buffer
memory plan, value ranges (overflow checking), and values computed from constants.

The analyses sit above the IR (types, graph, ops, fused, builder, text, verify) and
below the passes; tests/test_layering.py keeps them there."""
