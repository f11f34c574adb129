"""Write your own pass as rewrite rules.

A pass is a list of `Rule(pattern, fn)`: the pattern `P(op, *operands, name=...)`
matches a node and captures parts of it by name, `fn` gets the match and returns
a replacement node (same type) or None to leave it. `apply_rules` rewrites the
graph to a fixpoint, scan bodies included; `register_pass` makes the pass usable
by name in pipelines and in `dnir opt --passes`.

The three rules here make a chunk's decay matrix safe. Written by hand as
exp(gam_i) * exp(-gam_j), it overflows float32 once the cumulative log-gate gam
passes about -88 (exp(-gam_j) > 3e38). Merged to exp(gam_i - gam_j) and masked
to i >= j before the exp, every exponent is <= 0 and the decay stays in [0, 1].
The value-range analysis sees the difference.

    python examples/02_write_a_pass.py
"""
import numpy as np

import dnir
from dnir.analysis.ranges import analyze
from dnir.ops import make_node
from dnir.passes import P, Rule, apply_rules, register_pass, run_pipeline


def merge_exps(m):
    # Only when nothing else reads the two exps: otherwise they stay and the rule adds work.
    if m.uses(m.ea) != 1 or m.uses(m.eb) != 1:
        return None
    return make_node("exp", (make_node("add", (m.a, m.b), {}),), {})


def mask_before_exp(m):
    # tril(exp(x)) == tril(exp(tril(x))): the upper triangle becomes exp(0) = 1, then 0,
    # and exp never sees the large positive values above the diagonal.
    k = m.node.attrs["k"]
    return make_node("tril", (make_node("exp", (make_node("tril", (m.x,), {"k": k}),), {}),), {"k": k})


RULES = [
    Rule(P("mul", P("exp", P.any("a"), name="ea"), P("exp", P.any("b"), name="eb")), merge_exps, "merge_exps"),
    # The pattern leaves out an x that is already masked, so the rule cannot fire on its own output.
    Rule(P("tril", P("exp", P.any("x", pred=lambda n: n.op != "tril"))), mask_before_exp, "mask_before_exp"),
    # a + (-b) -> a - b, the form the range analysis knows as a difference of prefix sums.
    Rule(P("add", P.any("a"), P("neg", P.any("b"))), lambda m: make_node("sub", (m.a, m.b), {}), "add_neg"),
]


@register_pass("stable_decay")
def stable_decay(graph):
    """exp(a) * exp(b) -> exp(a + b) where the exps have no other use; mask before exp; a + -b -> a - b."""
    return apply_rules(graph, RULES)


# One chunk's decay matrix, written the factorised way: exp(gam_i) * exp(-gam_j), lower triangle.
C = 16
b = dnir.Builder()
g = b.input("g", (4, C))                                   # log-gates of 4 heads (g <= 0)
gam = b.cumsum(g, axis=1)
decay = b.exp(b.reshape(gam, (4, C, 1))) * b.exp(b.neg(b.reshape(gam, (4, 1, C))))
graph = b.build(b.tril(decay), names=["decay"])

# validate=True runs NumPy before and after each pass on random inputs and compares.
merged, records = run_pipeline(graph, ["stable_decay", "cse", "dce"], validate=True)
print(f"ops before: {dict(graph.op_histogram())}")
print(f"ops after:  {dict(merged.op_histogram())}")
print(dnir.print(merged))

for name, gr in (("before", graph), ("after", merged)):
    findings = analyze(gr, {"g": (-20.0, 0.0)}).findings  # gates as low as -20 per token
    print(f"{name}: {len(findings)} op(s) can overflow" + "".join(f"\n  {f}" for f in findings))

# A sequence where the cumulative gate reaches -160: the factorised form gives inf * 0 = nan.
inputs = {"g": np.full((4, C), -10.0, dtype=np.float32)}
(before,) = dnir.run(graph, inputs)
(after,) = dnir.run(merged, inputs)
print(f"strong gates: before has {np.isnan(before).sum()} NaNs, after has {np.isnan(after).sum()}; "
      f"after is within [0, 1]: {bool(((after >= 0) & (after <= 1)).all())}")
assert merged.op_histogram()["exp"] == 1 and not analyze(merged).findings and not np.isnan(after).any()
