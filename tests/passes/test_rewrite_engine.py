"""The rewrite engine: commutative operands, alternatives, shape constraints, a node's users, a
rule that replaces a sibling beside its own node."""
import pytest

import dnir
from dnir.ops import make_node
from dnir.passes import P, Rule, apply_rules
from dnir.passes.rewrite import RewriteError, Use, commutes


def op(name, *inputs, **attrs):
    return make_node(name, inputs, attrs)


def leaves():
    b = dnir.Builder()
    return b.input("u", (4, 8)), b.input("v", (4, 8))


def test_commutative_operands_match_in_either_order_and_others_in_theirs():
    u, v = leaves()
    pattern = P("add", P("exp", P.any("e")), P.any("x"))
    for node in (op("add", op("exp", u), v), op("add", v, op("exp", u))):
        caps = {}
        assert pattern.match(node, caps) and caps == {"e": u, "x": v}
    assert commutes("mul") and commutes("maximum") and not commutes("sub") and not commutes("matmul")
    assert P("sub", P("exp"), P.any()).match(op("sub", op("exp", u), v), {})
    assert not P("sub", P("exp"), P.any()).match(op("sub", v, op("exp", u)), {})
    assert not P("mul", P("exp"), P("neg")).match(op("mul", op("exp", u), op("exp", v)), {})


def test_a_failed_order_leaves_no_captures_behind():
    u, v = leaves()
    pattern = P("add", P.any("a"), P("exp", P.any("b")))
    # First order: a = exp(u), then neg(v) is not an exp. The second order starts afresh: a = neg(v).
    neg = op("neg", v)
    caps = {}
    assert pattern.match(op("add", op("exp", u), neg), caps) and caps == {"a": neg, "b": u}
    caps = {"kept": u}
    assert not pattern.match(op("add", v, op("neg", u)), caps) and caps == {"kept": u}


def test_a_name_captured_twice_must_agree_across_nested_orders():
    u, v = leaves()
    # add(mul(u, v), v): x must be v (the add's other operand), so the mul matches swapped, y = u.
    node = op("add", op("mul", u, v), v)
    caps = {}
    assert P("add", P.any("x"), P("mul", P.any("x"), P.any("y"))).match(node, caps)
    assert caps == {"x": v, "y": u}
    assert not P("add", P.any("x"), P("mul", P.any("x"), P.any("x"))).match(node, {})
    same = op("mul", u, u)
    assert P("mul", P.any("x"), P.any("x")).match(same, {})


def test_each_distinct_match_once():
    u, v = leaves()
    named, unnamed = P("mul", P.any("a"), P.any("b")), P("mul", P.any(), P.any())
    assert [(c["a"], c["b"]) for c in named.matches(op("mul", u, v))] == [(u, v), (v, u)]
    assert len(list(named.matches(op("mul", u, u)))) == 1       # both orders capture the same nodes
    assert len(list(unnamed.matches(op("mul", u, v)))) == 1
    assert len(list(named.matches(op("sub", u, v)))) == 0


def test_a_rule_that_declines_one_order_is_offered_the_other():
    b = dnir.Builder()
    x, y = b.input("x", (4, 8)), b.input("y", (4, 8))
    g = b.build(b.add(x, b.neg(y)), names=["z"])
    seen = []

    def add_neg(m):      # a + (-b) -> a - b, declining when the captured b is not a neg
        seen.append((m.a.op, m.b.op))
        return op("sub", m.a, m.b.inputs[0]) if m.b.op == "neg" else None

    out, changed = apply_rules(g, [Rule(P("add", P.any("a"), P.any("b")), add_neg, "add_neg")])
    assert changed and out.outputs[0].op == "sub" and out.outputs[0].inputs == (x, y)
    assert seen == [("input", "neg")]
    g2 = b.build(b.add(b.neg(y), x), names=["z"])
    seen.clear()
    out, changed = apply_rules(g2, [Rule(P("add", P.any("a"), P.any("b")), add_neg, "add_neg")])
    assert changed and out.outputs[0].inputs == (x, y) and seen == [("neg", "input"), ("input", "neg")]


def test_shape_and_rank_constraints():
    b = dnir.Builder()
    a, s = b.input("a", (2, 4, 1)), b.input("s", (2, 4, 8))
    prod = b.mul(s, a)
    assert P("mul", shape=(2, 4, 8)).match(prod, {})
    assert not P("mul", shape=(2, 4, 1)).match(prod, {})
    assert P("mul", rank=3).match(prod, {}) and not P("mul", rank=2).match(prod, {})
    column = P("mul", P.any("s", rank=lambda r: r >= 3), P.any("col", shape=lambda t: t[-1] == 1))
    caps = {}
    assert column.match(b.mul(a, s), caps) and caps == {"s": s, "col": a}      # the order found by shape
    assert not column.match(b.mul(s, s), {})
    mm = b.matmul(s, s, transpose_b=True)
    assert P("matmul", P.any(), P.any(), shape=lambda t: t[-2:] == (4, 4), transpose_b=True).match(mm, {})
    # reshape's `shape` attribute is its result shape: one meaning for the keyword
    assert P("reshape", P.any(), shape=(8, 8)).match(b.reshape(s, (8, 8)), {})
    # a node of several results has no one shape
    body = dnir.Builder()
    c = body.input("c", (4,))
    final, = b.scan(body.build([body.exp(c)], names=["c"]), [b.input("c0", (4,))], [], length=3)
    assert not P("scan", rank=1).match(final.inputs[0], {}) and P("scan").match(final.inputs[0], {})


def test_users_name_the_readers_and_their_operand_and_the_outputs():
    b = dnir.Builder()
    x, y = b.input("x", (4, 8)), b.input("y", (4, 8))
    e = b.exp(x)
    n = b.neg(e)
    m2 = b.mul(n, e)
    g = b.build([b.add(m2, y), e], names=["z", "e"])
    seen = {}

    def look(m):
        seen.update(users=m.users(m.e), out=m.is_output(m.e), uses=m.uses(m.e), neg=m.users(m.node),
                    mine=m.is_output(m.node))
        return None

    apply_rules(g, [Rule(P("neg", P("exp", name="e")), look, "look")])
    assert set(seen["users"]) == {Use(n, 0), Use(m2, 1)} and seen["out"] and seen["uses"] == 3
    assert seen["neg"] == (Use(m2, 0),) and not seen["mine"]


def test_a_rebuilt_node_answers_for_the_node_it_replaces():
    b = dnir.Builder()
    x = b.input("x", (4, 8))
    e = b.exp(b.neg(b.neg(x)))         # the double neg goes, so e is rebuilt in the same sweep
    g = b.build([b.add(e, x), b.mul(e, x)], names=["a", "m"])
    seen = []

    def look(m):
        readers_of_x = [u.node for u in m.users(m.y)]
        seen.append((m.node is not e, sorted(u.node.op for u in m.users(m.node)), m.uses(m.node),
                     sorted(r.op for r in readers_of_x), any(r is m.node for r in readers_of_x)))
        return None

    apply_rules(g, [Rule(P("neg", P("neg", P.any("x"))), lambda m: m.x, "double_neg"),
                    Rule(P("exp", P.any("y")), look, "look")])
    # First sweep: the graph as it began (x read by a neg, the add and the mul), the exp rebuilt;
    # second sweep: the exp reads x, and is named as itself among x's readers.
    assert seen == [(True, ["add", "mul"], 2, ["add", "mul", "neg"], False),
                    (True, ["add", "mul"], 2, ["add", "exp", "mul"], True)]


def test_either_offers_each_alternative_with_its_own_captures():
    u, v = leaves()
    gate = P.either(P("broadcast_to", P.any("g")), P.any("g", pred=lambda n: n.op != "broadcast_to"))
    wide = op("broadcast_to", op("reshape", u, shape=(4, 1, 8)), shape=(4, 3, 8))
    caps = {}
    assert gate.match(wide, caps) and caps["g"].op == "reshape"
    caps = {}
    assert gate.match(u, caps) and caps == {"g": u}
    root = P.either(P("exp", P.any("a"), name="e"), P("neg", P.any("b")))
    assert root.ops == ("exp", "neg")
    assert [sorted(c) for c in root.matches(op("neg", u))] == [["b"]]
    b = dnir.Builder()
    x = b.input("x", (4, 8))
    g = b.build([b.exp(b.neg(x))], names=["y"])
    out, changed = apply_rules(g, [Rule(root, lambda m: m.a if "a" in m.caps and m.a.op == "neg" else None, "r")])
    assert changed and out.outputs[0].op == "neg"      # dispatched on exp through the either


def pair_rule(seen=None, decline=False):
    """On neg(c): a stand-in for a fused op of two results, sqrt(c) for the neg and log(c) for
    the mul that reads c beside it (found among c's readers)."""
    def fuse(m):
        siblings = [u.node for u in m.users(m.c) if u.node.op == "mul"]
        if not siblings:
            return None
        m.replace(siblings[0], op("log", op("add", m.c, m.c)))
        return None if decline else op("sqrt", m.c)
    return Rule(P("neg", P.any("c")), fuse, "pair")


def sibling_graph(order, rebuilt=False):
    b = dnir.Builder()
    x, y = b.input("x", (4, 8)), b.input("y", (4, 8))
    c = b.exp(x)
    sibling = b.mul(c, b.cont(y) if rebuilt else y)
    outs = {"neg": b.neg(c), "mul": sibling}
    return b.build([outs[k] for k in order], names=list(order))


def ops_out(g):
    return [(o.op, o.inputs[0].op) for o in g.outputs]


def test_a_rule_replaces_a_sibling_after_or_before_its_node():
    for order in (("neg", "mul"), ("mul", "neg")):        # the mul visited after the neg, or before it
        out, changed = apply_rules(sibling_graph(order), [pair_rule()])
        want = {"neg": ("sqrt", "exp"), "mul": ("log", "add")}
        assert changed and ops_out(out) == [want[k] for k in order], dnir.print(out)


def test_a_sibling_rebuilt_earlier_in_the_sweep_is_still_replaced():
    drop_cont = Rule(P("cont", P.any("x")), lambda m: m.x, "drop_cont")
    out, _ = apply_rules(sibling_graph(("mul", "neg"), rebuilt=True), [drop_cont, pair_rule()])
    assert ops_out(out) == [("log", "add"), ("sqrt", "exp")], dnir.print(out)


def test_a_declined_rule_replaces_nothing_and_a_wrong_type_is_refused():
    g = sibling_graph(("neg", "mul"))
    assert apply_rules(g, [pair_rule(decline=True)]) == (g, False)

    def bad(m):
        m.replace(m.node, op("sum", m.c, axes=(0,)))
    with pytest.raises(RewriteError, match="cannot replace"):
        apply_rules(g, [Rule(P("neg", P.any("c")), bad, "bad")])
