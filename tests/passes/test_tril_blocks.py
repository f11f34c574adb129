"""block_tril's score patterns: either operand order, masked or not, broadcast gates, the three
forms; near misses stay as they are."""
import numpy as np
import pytest

import dnir
from dnir import passes
from dnir.passes.tril_blocks import block_tril


def scores(*, swap=False, masked=True, broadcast=False, k=0, transpose_b=True, gj_shape=(1, 8), form="plain"):
    """tril(X Y^T * exp(gi - gj), k) for C = 8: no group axis ('plain'), one ('unit'), two groups of
    4 channels ('sum') or 4 groups of one channel each ('channels')."""
    b = dnir.Builder()
    lead, d = {"plain": ((), 4), "unit": ((1,), 4), "sum": ((2,), 4), "channels": ((4,), 1)}[form]
    x, y = b.input("x", (*lead, 8, d)), b.input("y", (*lead, 8, d) if transpose_b else (*lead, d, 8))
    gi, gj = b.input("gi", (*lead, 8, 1)), b.input("gj", (*lead, *gj_shape))
    if broadcast:
        gi, gj = b.broadcast_to(gi, (*lead, 8, 8)), b.broadcast_to(gj, (*lead, 8, 8))
    diff = b.sub(gi, gj)
    decay = b.exp(b.tril(diff) if masked else diff)
    mm = b.matmul(x, y, transpose_b=transpose_b)
    prod = b.mul(decay, mm) if swap else b.mul(mm, decay)
    s = prod if form == "plain" else b.reshape(prod, (8, 8)) if form == "unit" else b.sum(prod, axis=0)
    return b.build(b.tril(s, k), names=["s"])


@pytest.mark.parametrize("case", [dict(), dict(swap=True), dict(masked=False), dict(broadcast=True), dict(k=-1),
                                  dict(form="unit"), dict(form="sum"), dict(form="sum", swap=True, masked=False),
                                  dict(form="channels"), dict(form="channels", masked=False, broadcast=True)],
                         ids=repr)
def test_decayed_scores_are_blocked(case):
    g = scores(**case)
    out, changed = block_tril(g, block=4)
    assert changed and out.op_histogram()["concat"] > 0, dnir.print(out)
    assert passes.validate.compare(g, out, np.random.default_rng(5)) == []


def test_either_operand_order_gives_the_same_blocks():
    out, _ = block_tril(scores(), block=4)
    swapped, _ = block_tril(scores(swap=True), block=4)
    assert dnir.print(out) == dnir.print(swapped)


@pytest.mark.parametrize("case", [dict(k=1), dict(transpose_b=False), dict(gj_shape=(8, 8))], ids=repr)
def test_near_misses_are_left_alone(case):
    g = scores(**case)
    assert block_tril(g, block=4) == (g, False)


def test_a_size_that_the_block_does_not_split_is_left_alone():
    g = scores()
    assert block_tril(g, block=3) == (g, False) and block_tril(g, block=8) == (g, False)
