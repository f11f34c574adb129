"""set_vs_acc: a chain of sets is tiled from its end, found by the end's readers in the match."""
import numpy as np

import dnir
from dnir import passes
from dnir.passes.set_vs_acc import set_vs_acc


def nested_chains():
    """An 8 x 4 block assembled by two sets, the second block itself two sets into zeros:
    tiling the inner chain rebuilds the outer chain's end in the same sweep."""
    b = dnir.Builder()
    top, a, c = b.input("top", (4, 4)), b.input("a", (2, 4)), b.input("c", (2, 4))
    inner = b.set(b.set(b.zeros((4, 4)), a, (0, 0)), c, (2, 0))
    outer = b.set(b.set(b.zeros((8, 4)), top, (0, 0)), inner, (4, 0))
    return b.build(b.exp(outer), names=["y"]), (top, a, c)


def test_a_chain_end_rebuilt_in_the_same_run_is_still_tiled():
    g, (top, a, c) = nested_chains()
    out, changed = set_vs_acc(g)
    assert changed and out.op_histogram()["set"] == 0, dnir.print(out)
    outer = out.outputs[0].inputs[0]
    assert outer.op == "concat" and outer.inputs[0] is top
    assert outer.inputs[1].op == "concat" and outer.inputs[1].inputs == (a, c)
    assert passes.validate.compare(g, out, np.random.default_rng(3)) == []


def test_a_set_that_a_later_set_writes_into_is_not_a_chain_end_even_when_read_elsewhere():
    b = dnir.Builder()
    a, c, d = b.input("a", (2, 4)), b.input("c", (2, 4)), b.input("d", (2, 4))
    first = b.set(b.set(b.zeros((4, 4)), a, (0, 0)), c, (2, 0))
    last = b.set(first, d, (2, 0))            # overwrites c's rows: the chain does not tile
    g = b.build([last, b.exp(first)], names=["y", "z"])
    # `first` tiles on its own, but `last` writes into it: it is part of a chain that overlaps, and
    # stays (a concat for `first` next to the chain would assemble its blocks twice).
    assert set_vs_acc(g) == (g, False)
