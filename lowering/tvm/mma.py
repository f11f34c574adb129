"""Tensor-core products for the fused kernels: mma.sync m16n8k8 with TF32 operands (and m16n8k16 with bf16).

A warp multiplies a 16 x 8 tile of A by an 8 x 8 tile of B into a 16 x 8 float32
accumulator; each lane holds its part of every tile in registers, at the places
the PTX ISA fixes for .tf32 (g = lane / 4, t = lane % 4):

    A a0..a3 at (g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4)
    B b0, b1 at (t, g), (t + 4, g)
    D d0..d3 at (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1)

The `*_at` functions give those places; a kernel loads its fragments from shared
memory through them (into `fa` [8]: a0..a3, then their low parts; `fb` [4]: b0, b1,
then their low parts) and calls `mma`.

TF32 keeps 10 of float32's 23 mantissa bits. With split (3xTF32) each operand is
x = hi + lo, hi = x truncated to TF32 (the bits the tensor core reads) and
lo = x - hi (exact in float32), and a b ~ hi_a hi_b + hi_a lo_b + lo_a hi_b: three
products for about float32's accuracy (the dropped lo_a lo_b is 2^-22 of a b).
Without split, one product: TF32's accuracy.

m16n8k16 with bf16 operands (`mma_bf16`) takes twice the terms a product; its A
holds a0..a7 at (g, 2t + i % 2 + 8 (i // 4)) and 8 rows lower for i // 2 odd, its
B b0..b3 at (2t + i % 2 + 8 (i // 2), g), two values a 32-bit register.
"""
from __future__ import annotations

from tvm.script import tirx as T

M, N, K8 = 16, 8, 8          # the product's tile: M x K8 times K8 x N
K16 = 16                     # bf16 products: M x K16 times K16 x N (m16n8k16)


def a_at(lane, i):
    """(row, column) of element i of A's fragment in the 16 x 8 tile."""
    return lane // 4 + 8 * (i % 2), lane % 4 + 4 * (i // 2)


def b_at(lane, i):
    """(row, column) of element i of B's fragment in the 8 x 8 tile."""
    return lane % 4 + 4 * i, lane // 4


def d_at(lane, i):
    """(row, column) of element i of the accumulator's fragment in the 16 x 8 tile."""
    return lane // 4 + 8 * (i // 2), 2 * (lane % 4) + i % 2


def low_part(x):
    """x minus x truncated to TF32: what a TF32 product of x drops."""
    return x - T.reinterpret("float32", T.bitwise_and(T.reinterpret("uint32", x), T.uint32(0xFFFFE000)))


def a16_at(lane, i):
    """(row, column) of element i of A's fragment in the 16 x 16 bf16 tile (a register: i, i + 1)."""
    return lane // 4 + 8 * (i // 2 % 2), 2 * (lane % 4) + i % 2 + 8 * (i // 4)


def b16_at(lane, i):
    """(row, column) of element i of B's fragment in the 16 x 8 bf16 tile."""
    return 2 * (lane % 4) + i % 2 + 8 * (i // 2), lane // 4


@T.macro
def mma_bf16(acc, offset, fa, fb):
    """acc[offset : offset + 4] += A B, bf16 fragments fa [8] and fb [4] (float32 accumulation)."""
    T.ptx_legacy.mma("float32", "m16n8k16", "row", "col", "bf16", "bf16", "fp32", fa, 0, fb, 0, acc, offset, False)


@T.macro
def mma(acc, offset, fa, fb, split: bool):
    """acc[offset : offset + 4] += A B for the fragments in fa and fb (and their low parts)."""
    for p in T.unroll(3 if split else 1):     # hi hi, then hi lo and lo hi
        T.ptx_legacy.mma("float32", "m16n8k8", "row", "col", "tf32", "tf32", "fp32",
                         fa, 4 * (p // 2), fb, 2 * (p % 2), acc, offset, False)
