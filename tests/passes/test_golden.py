"""Golden Before/Expected tests: each pass on a small hand-written graph in the text format."""
from __future__ import annotations

import numpy as np
import pytest

import dnir
from dnir import passes

OPTIONS = {"block_tril": {"block": 2}, "block_solve": {"block": 2}}

CASES = {
    "dce": (
"""graph(%x: f32[3,4], %w: f32[4,4]) {
  %0: f32[4,4] = full() {value=0.0, shape=[4, 4], dtype=f32}
  %1: (f32[4,4], f32[3,4], f32[3,4]) = scan(%0, %x, %w) {length=3, num_carry=1, num_xs=1} body(%s: f32[4,4], %xi: f32[4], %wc: f32[4,4]) {
    %0: f32[4,4] = add(%s, %wc)
    %1: f32[4] = exp(%xi)
    %2: f32[4] = neg(%xi)
    return %0 as s, %1 as y, %2 as z
  }
  %2: f32[3,4] = item(%1) {index=2}
  return %2 as z
}""",
"""graph(%x: f32[3,4], %w: f32[4,4]) {
  %0: (f32[3,4]) = scan(%x) {length=3, num_carry=0, num_xs=1} body(%xi: f32[4]) {
    %0: f32[4] = neg(%xi)
    return %0 as z
  }
  %1: f32[3,4] = item(%0) {index=0}
  return %1 as z
}"""),
    "cse": (
"""graph(%x: f32[4,8]) {
  %0: f32[4,8] = exp(%x)
  %1: f32[4,8] = exp(%x)
  %2: f32[4,8] = add(%0, %1)
  return %2
}""",
"""graph(%x: f32[4,8]) {
  %0: f32[4,8] = exp(%x)
  %1: f32[4,8] = add(%0, %0)
  return %1
}"""),
    "fold_constants": (
"""graph(%x: f32[2,2]) {
  %0: f32[2,2] = full() {value=2.0, shape=[2, 2], dtype=f32}
  %1: f32[2,2] = full() {value=3.0, shape=[2, 2], dtype=f32}
  %2: f32[2,2] = mul(%0, %1)
  %3: f32[2,2] = eye() {n=2, dtype=f32}
  %4: f32[2,2] = add(%3, %2)
  %5: f32[2,2] = mul(%x, %4)
  return %5
}""",
"""graph(%x: f32[2,2]) {
  %0: f32[2,2] = const() {value=[7.0, 6.0, 6.0, 7.0], shape=[2, 2], dtype=f32}
  %1: f32[2,2] = mul(%x, %0)
  return %1
}"""),
    "remove_identities": (
"""graph(%x: f32[4,8]) {
  %0: f32[4,8] = permute(%x) {axes=[0, 1]}
  %1: f32[32] = reshape(%0) {shape=[32]}
  %2: f32[8,4] = reshape(%1) {shape=[8, 4]}
  %3: f32[8,4] = exp(%2)
  %4: f32[8,4] = cont(%3)
  %5: f32[8,4] = full() {value=1.0, shape=[8, 4], dtype=f32}
  %6: f32[8,4] = mul(%4, %5)
  return %6
}""",
"""graph(%x: f32[4,8]) {
  %0: f32[8,4] = reshape(%x) {shape=[8, 4]}
  %1: f32[8,4] = exp(%0)
  return %1
}"""),
    "eliminate_transposes": (
"""graph(%a: f32[2,4,8], %b: f32[2,4,8], %c: f32[5,1]) {
  %0: f32[2,8,4] = permute(%a) {axes=[0, 2, 1]}
  %1: f32[2,8,4] = cont(%0)
  %2: f32[2,4,8] = permute(%1) {axes=[0, 2, 1]}
  %3: f32[2,8,4] = permute(%b) {axes=[0, 2, 1]}
  %4: f32[2,4,4] = matmul(%2, %3) {transpose_a=false, transpose_b=false}
  %5: f32[1,5] = permute(%c) {axes=[1, 0]}
  return %4, %5
}""",
"""graph(%a: f32[2,4,8], %b: f32[2,4,8], %c: f32[5,1]) {
  %0: f32[2,4,4] = matmul(%a, %b) {transpose_a=false, transpose_b=true}
  %1: f32[1,5] = reshape(%c) {shape=[1, 5]}
  return %0, %1
}"""),
    "cumsum_axis": (
"""graph(%g: f32[2,16,3]) {
  %0: f32[2,3,16] = permute(%g) {axes=[0, 2, 1]}
  %1: f32[2,3,16] = cont(%0)
  %2: f32[2,3,16] = cumsum(%1) {axis=2}
  %3: f32[2,16,3] = permute(%2) {axes=[0, 2, 1]}
  return %3
}""",
"""graph(%g: f32[2,16,3]) {
  %0: f32[2,16,3] = cumsum(%g) {axis=1}
  return %0
}"""),
    "hoist_broadcasts": (
"""graph(%g: f32[4,1], %x: f32[4,8]) {
  %0: f32[4,8] = broadcast_to(%g) {shape=[4, 8]}
  %1: f32[4,8] = exp(%0)
  %2: f32[4,8] = mul(%x, %1)
  %3: f32[4,8] = broadcast_to(%g) {shape=[4, 8]}
  %4: f32[4,8] = add(%2, %3)
  return %4
}""",
"""graph(%g: f32[4,1], %x: f32[4,8]) {
  %0: f32[4,1] = exp(%g)
  %1: f32[4,8] = mul(%x, %0)
  %2: f32[4,8] = add(%1, %g)
  return %2
}"""),
    "hoist_loop_invariants": (
"""graph(%s: f32[4], %x: f32[3,4], %w: f32[4]) {
  %0: (f32[4], f32[3,4]) = scan(%s, %x, %w) {length=3, num_carry=1, num_xs=1} body(%c: f32[4], %xi: f32[4], %wi: f32[4]) {
    %0: f32[4] = exp(%wi)
    %1: f32[4] = mul(%c, %0)
    %2: f32[4] = add(%1, %xi)
    return %2 as c, %1 as y
  }
  %1: f32[4] = item(%0) {index=0}
  return %1
}""",
"""graph(%s: f32[4], %x: f32[3,4], %w: f32[4]) {
  %0: f32[4] = exp(%w)
  %1: (f32[4], f32[3,4]) = scan(%s, %x, %w, %0) {length=3, num_carry=1, num_xs=1} body(%c: f32[4], %xi: f32[4], %wi: f32[4], %inv0_0: f32[4]) {
    %0: f32[4] = mul(%c, %inv0_0)
    %1: f32[4] = add(%0, %xi)
    return %1 as c, %0 as y
  }
  %2: f32[4] = item(%1) {index=0}
  return %2
}"""),
    "sum_mul_to_matmul": (
"""graph(%s: f32[2,8,4], %k: f32[2,1,4]) {
  %0: f32[2,8,4] = mul(%s, %k)
  %1: f32[2,8] = sum(%0) {axes=[2], keepdims=false}
  return %1
}""",
"""graph(%s: f32[2,8,4], %k: f32[2,1,4]) {
  %0: f32[2,8,1] = matmul(%s, %k) {transpose_a=false, transpose_b=true}
  %1: f32[2,8] = reshape(%0) {shape=[2, 8]}
  return %1
}"""),
    "reassociate_scales": (
"""graph(%x: f32[2,8,4], %beta: f32[2,8,1], %gam: f32[2,8,1]) {
  %0: f32[2,8,4] = mul(%x, %beta)
  %1: f32[2,8,1] = exp(%gam)
  %2: f32[2,8,4] = mul(%0, %1)
  return %2
}""",
"""graph(%x: f32[2,8,4], %beta: f32[2,8,1], %gam: f32[2,8,1]) {
  %0: f32[2,8,1] = exp(%gam)
  %1: f32[2,8,1] = mul(%beta, %0)
  %2: f32[2,8,4] = mul(%x, %1)
  return %2
}"""),
    "block_tril": (
"""graph(%x: f32[4,8], %y: f32[4,8], %gi: f32[4,1], %gj: f32[1,4]) {
  %0: f32[4,4] = matmul(%x, %y) {transpose_a=false, transpose_b=true}
  %1: f32[4,4] = sub(%gi, %gj)
  %2: f32[4,4] = tril(%1) {k=0}
  %3: f32[4,4] = exp(%2)
  %4: f32[4,4] = mul(%0, %3)
  %5: f32[4,4] = tril(%4) {k=0}
  return %5
}""",
"""graph(%x: f32[4,8], %y: f32[4,8], %gi: f32[4,1], %gj: f32[1,4]) {
  %0: f32[1,4,8] = reshape(%x) {shape=[1, 4, 8]}
  %1: f32[1,2,8] = slice(%0) {starts=[0, 0, 0], stops=[1, 2, 8]}
  %2: f32[1,4,8] = reshape(%y) {shape=[1, 4, 8]}
  %3: f32[1,2,8] = slice(%2) {starts=[0, 0, 0], stops=[1, 2, 8]}
  %4: f32[1,2,2] = matmul(%1, %3) {transpose_a=false, transpose_b=true}
  %5: f32[1,4,1] = reshape(%gi) {shape=[1, 4, 1]}
  %6: f32[1,2,1] = slice(%5) {starts=[0, 0, 0], stops=[1, 2, 1]}
  %7: f32[1,1,4] = reshape(%gj) {shape=[1, 1, 4]}
  %8: f32[1,1,2] = slice(%7) {starts=[0, 0, 0], stops=[1, 1, 2]}
  %9: f32[1,2,2] = sub(%6, %8)
  %10: f32[1,2,2] = tril(%9) {k=0}
  %11: f32[1,2,2] = exp(%10)
  %12: f32[1,2,2] = mul(%4, %11)
  %13: f32[2,2] = reshape(%12) {shape=[2, 2]}
  %14: f32[2,2] = tril(%13) {k=0}
  %15: f32[2,2] = full() {value=0.0, shape=[2, 2], dtype=f32}
  %16: f32[2,4] = concat(%14, %15) {axis=1}
  %17: f32[1,2,8] = slice(%0) {starts=[0, 2, 0], stops=[1, 4, 8]}
  %18: f32[1,4,8] = slice(%2) {starts=[0, 0, 0], stops=[1, 4, 8]}
  %19: f32[1,2,4] = matmul(%17, %18) {transpose_a=false, transpose_b=true}
  %20: f32[1,2,1] = slice(%5) {starts=[0, 2, 0], stops=[1, 4, 1]}
  %21: f32[1,1,4] = slice(%7) {starts=[0, 0, 0], stops=[1, 1, 4]}
  %22: f32[1,2,4] = sub(%20, %21)
  %23: f32[1,2,4] = tril(%22) {k=2}
  %24: f32[1,2,4] = exp(%23)
  %25: f32[1,2,4] = mul(%19, %24)
  %26: f32[2,4] = reshape(%25) {shape=[2, 4]}
  %27: f32[2,4] = tril(%26) {k=2}
  %28: f32[4,4] = concat(%16, %27) {axis=0}
  return %28
}"""),
    "block_solve": (
"""graph(%l: f32[4,4], %b: f32[4,3]) {
  %0: f32[4,3] = solve_tri(%l, %b) {lower=true, unit_diagonal=false}
  return %0
}""",
"""graph(%l: f32[4,4], %b: f32[4,3]) {
  %0: f32[2,2] = slice(%l) {starts=[0, 0], stops=[2, 2]}
  %1: f32[2,3] = slice(%b) {starts=[0, 0], stops=[2, 3]}
  %2: f32[2,3] = solve_tri(%0, %1) {lower=true, unit_diagonal=false}
  %3: f32[2,2] = slice(%l) {starts=[2, 2], stops=[4, 4]}
  %4: f32[2,3] = slice(%b) {starts=[2, 0], stops=[4, 3]}
  %5: f32[2,2] = slice(%l) {starts=[2, 0], stops=[4, 2]}
  %6: f32[2,3] = matmul(%5, %2) {transpose_a=false, transpose_b=false}
  %7: f32[2,3] = sub(%4, %6)
  %8: f32[2,3] = solve_tri(%3, %7) {lower=true, unit_diagonal=false}
  %9: f32[4,3] = concat(%2, %8) {axis=0}
  return %9
}"""),
    "set_vs_acc": (
"""graph(%a: f32[2,2], %b: f32[2,2], %c: f32[2,2]) {
  %0: f32[4,4] = full() {value=0.0, shape=[4, 4], dtype=f32}
  %1: f32[4,4] = acc(%0, %a) {offsets=[0, 0]}
  %2: f32[4,4] = acc(%1, %b) {offsets=[2, 0]}
  %3: f32[4,4] = acc(%2, %c) {offsets=[2, 2]}
  return %3
}""",
"""graph(%a: f32[2,2], %b: f32[2,2], %c: f32[2,2]) {
  %0: f32[2,2] = full() {value=0.0, shape=[2, 2], dtype=f32}
  %1: f32[2,4] = concat(%a, %0) {axis=1}
  %2: f32[2,4] = concat(%b, %c) {axis=1}
  %3: f32[4,4] = concat(%1, %2) {axis=0}
  return %3
}"""),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_pass_rewrites_to_expected(name):
    before, expected = (dnir.parse(text) for text in CASES[name])
    after, changed = passes.PASSES[name].fn(before, **OPTIONS.get(name, {}))
    assert changed
    assert dnir.structurally_equal(after, dnir.parse(dnir.print(after)))
    assert dnir.structurally_equal(after, expected), dnir.print(after)
    dnir.verify(after)


@pytest.mark.parametrize("name", sorted(CASES))
def test_pass_keeps_results(name):
    before = dnir.parse(CASES[name][0])
    rng = np.random.default_rng(7)
    after, _ = passes.PASSES[name].fn(before, **OPTIONS.get(name, {}))
    assert passes.validate.compare(before, after, rng) == []


@pytest.mark.parametrize("name", sorted(CASES))
def test_pass_is_idempotent_on_its_result(name):
    expected = dnir.parse(CASES[name][1])
    again, changed = passes.PASSES[name].fn(expected, **OPTIONS.get(name, {}))
    assert not changed and again is expected


def test_reassociate_scales_keeps_an_intermediate_that_is_read_elsewhere():
    g = dnir.parse("""graph(%x: f32[2,8,4], %beta: f32[2,8,1], %gam: f32[2,8,1]) {
  %0: f32[2,8,4] = mul(%x, %beta)
  %1: f32[2,8,4] = mul(%0, %gam)
  %2: f32[2,8,4] = add(%0, %1)
  return %2
}""")
    after, changed = passes.PASSES["reassociate_scales"].fn(g)
    assert not changed and after is g
