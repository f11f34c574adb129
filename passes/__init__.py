"""Graph -> graph rewrites and the pass manager."""
