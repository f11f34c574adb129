"""Static analyses of a graph: FLOP and byte counts, the compute-buffer memory plan,
value ranges (overflow checking)."""
