"""Backend conformance cases, the way ggml's test-backend-ops works: every op
of the registry on a set of shapes, each case a small function of fresh
random inputs. All cases are merged into one graph so that a backend
compiles once for the whole table.
"""
from __future__ import annotations

import numpy as np

import dnir
from dnir import fused
from dnir.graph import Graph

# name -> (input specs {name: (shape, kind)}, build(b, inputs) -> output node)
# kinds: normal, positive (0.5..2), wide (-30..30), bool, int
CASES: dict[str, tuple[dict, object]] = {}


def case(name, **specs):
    def register(fn):
        CASES[name] = (specs, fn)
        return fn
    return register


def _spec(shape, kind="normal"):
    return (tuple(shape), kind)


# -- sources -------------------------------------------------------------------
case("const", x=_spec((2, 3)))(lambda b, x: x + b.const(np.arange(6.0).reshape(2, 3) - 2.5))
case("full", x=_spec((4, 5)))(lambda b, x: x * b.full((4, 5), 1.75))
case("eye", x=_spec((16, 16)))(lambda b, x: x + b.eye(16))

# -- elementwise ---------------------------------------------------------------
for _op in ("neg", "exp", "sigmoid"):
    case(_op, x=_spec((3, 5, 7)))(lambda b, x, _op=_op: getattr(b, _op)(x))
case("softplus", x=_spec((4, 33), "wide"))(lambda b, x: b.softplus(x))
for _op in ("log", "sqrt", "rsqrt"):
    case(_op, x=_spec((3, 5, 7), "positive"))(lambda b, x, _op=_op: getattr(b, _op)(x))
for _op in ("add", "sub", "mul", "maximum", "minimum"):
    case(_op, x=_spec((4, 1, 6)), y=_spec((5, 6)))(lambda b, x, y, _op=_op: getattr(b, _op)(x, y))
case("div", x=_spec((4, 1, 6)), y=_spec((5, 6), "positive"))(lambda b, x, y: b.div(x, y))
case("where", c=_spec((4, 6), "bool"), x=_spec((4, 6)), y=_spec((6,)))(lambda b, c, x, y: b.where(c, x, y))
case("cast_f32_i32", x=_spec((5, 7), "wide"))(lambda b, x: b.cast(x, "i32"))
case("cast_i32_f32", x=_spec((5, 7), "int"))(lambda b, x: b.cast(x, "f32") * 0.5)
case("clamp", x=_spec((6, 9)))(lambda b, x: b.clamp(x, -0.5, 0.75))
case("clamp_min", x=_spec((6, 9)))(lambda b, x: b.clamp(x, min=0.0))
case("tril_64", x=_spec((2, 64, 64)))(lambda b, x: b.tril(x))
case("tril_k", x=_spec((3, 16, 16)))(lambda b, x: b.tril(x, -1))
case("triu_k", x=_spec((16, 24)))(lambda b, x: b.triu(x, 2))

# -- layout ----------------------------------------------------------------------
case("reshape", x=_spec((4, 6, 8)))(lambda b, x: b.reshape(x, (8, 3, 8)))
case("permute_4d", x=_spec((2, 3, 4, 5)))(lambda b, x: b.permute(x, (2, 0, 3, 1)))
case("broadcast_to", x=_spec((4, 1, 6)))(lambda b, x: b.broadcast_to(x, (3, 4, 5, 6)))
case("pad", x=_spec((3, 5, 7)))(lambda b, x: b.pad(x, [(1, 0), (0, 2), (3, 1)], value=0.5))
case("slice", x=_spec((5, 64, 64)))(lambda b, x: x[1:4, 16:32, 0:48])
case("concat", x=_spec((2, 3, 4)), y=_spec((2, 5, 4)), z=_spec((2, 1, 4)))(
    lambda b, x, y, z: b.concat([x, y, z], axis=1))
case("cont", x=_spec((4, 6)))(lambda b, x: b.cont(b.permute(x, (1, 0))))

# -- reductions --------------------------------------------------------------------
case("sum_last", x=_spec((4, 5, 64)))(lambda b, x: b.sum(x, axis=-1))
case("sum_mid_keepdims", x=_spec((4, 5, 64)))(lambda b, x: b.sum(x, axis=1, keepdims=True))
case("sum_two_axes", x=_spec((4, 5, 6, 7)))(lambda b, x: b.sum(x, axis=(0, 2)))
case("sum_all", x=_spec((16, 16)))(lambda b, x: b.sum(x))
for _axis in range(4):
    case(f"cumsum_axis{_axis}", x=_spec((3, 4, 64, 5)))(lambda b, x, _axis=_axis: b.cumsum(x, axis=_axis))
case("cumsum_long", x=_spec((2, 1000)))(lambda b, x: b.cumsum(x, axis=-1))

# -- matrices ------------------------------------------------------------------------
case("matmul_64", x=_spec((64, 128)), y=_spec((128, 64)))(lambda b, x, y: b.matmul(x, y))
case("matmul_16_batched", x=_spec((4, 2, 16, 16)), y=_spec((4, 2, 16, 16)))(lambda b, x, y: b.matmul(x, y))
case("matmul_tb", x=_spec((3, 64, 32)), y=_spec((3, 64, 32)))(lambda b, x, y: b.matmul(x, y, transpose_b=True))
case("matmul_ta", x=_spec((3, 32, 64)), y=_spec((3, 32, 16)))(lambda b, x, y: b.matmul(x, y, transpose_a=True))
case("matmul_broadcast", x=_spec((2, 1, 16, 8)), y=_spec((3, 8, 24)))(lambda b, x, y: b.matmul(x, y))
case("matmul_vector", x=_spec((5, 1, 64)), y=_spec((5, 64, 64)))(lambda b, x, y: b.matmul(x, y))


def _unit_lower(b, a, n):
    """I + strictly lower part, scaled so that the solve stays well conditioned."""
    return b.eye(n) + b.tril(a, -1) * (1.0 / n)


for _n in (16, 32, 64, 128):
    case(f"solve_tri_unit_{_n}", a=_spec((2, _n, _n)), x=_spec((2, _n, 24)))(
        lambda b, a, x, _n=_n: b.solve_tri(_unit_lower(b, a, _n), x, unit_diagonal=True))
case("solve_tri_upper", a=_spec((3, 16, 16)), d=_spec((3, 16, 16), "positive"), x=_spec((3, 16, 8)))(
    lambda b, a, d, x: b.solve_tri(b.triu(a, 1) * (1.0 / 16) + b.triu(b.tril(d)), x, lower=False))
case("solve_tri_broadcast", a=_spec((16, 16)), x=_spec((2, 3, 16, 4)))(
    lambda b, a, x: b.solve_tri(_unit_lower(b, a, 16), x, unit_diagonal=True))

# -- assembly --------------------------------------------------------------------------
case("set_4d", d=_spec((3, 4, 16, 16)), s=_spec((2, 3, 8, 8)))(lambda b, d, s: b.set(d, s, (1, 1, 4, 8)))
case("acc_4d", d=_spec((3, 4, 16, 16)), s=_spec((2, 3, 8, 8)))(lambda b, d, s: b.acc(d, s, (0, 1, 8, 0)))
case("set_blocks_64", d=_spec((2, 64, 64)), s=_spec((2, 16, 16)))(
    lambda b, d, s: b.set(b.set(d, s, (0, 16, 0)), s * 2.0, (0, 48, 32)))


# -- control -----------------------------------------------------------------------------
def _scan_case(b, s0, xs, w):
    body = dnir.Builder()
    s = body.input("s", (8, 4))
    x = body.input("x", (8,))
    w_in = body.input("w", (8, 4))
    new = body.add(body.mul(s, 0.9), body.mul(body.reshape(x, (8, 1)), w_in))
    graph = body.build([new, body.sum(new, axis=0)])
    final, ys = b.scan(graph, [s0], [xs], [w])
    return b.concat([b.reshape(final, (32,)), b.reshape(ys, (24,))], axis=0)


case("scan", s0=_spec((8, 4)), xs=_spec((6, 8)), w=_spec((8, 4)))(_scan_case)


# -- fused (dnir/fused.py): the GPU targets run their kernels, the others their expansions ----------
def _both(b, results):
    return b.concat([b.reshape(r, (r.type.size,)) for r in results], axis=0)


_CHUNKS = dict(s0=_spec((2, 16, 16)), w=_spec((3, 2, 16, 16)), u=_spec((3, 2, 16, 16)), qd=_spec((3, 2, 16, 16)),
               aqk=_spec((3, 2, 16, 16)), kte=_spec((3, 2, 16, 16)), ld=_spec((3, 2, 16, 1), "positive"))
case("chunk_scan", **_CHUNKS)(lambda b, **x: _both(b, fused.chunk_scan(*x.values())))
_STATES = {k: _CHUNKS[k] for k in ("s0", "w", "u", "kte", "ld")}
case("chunk_states", **_STATES)(lambda b, **x: _both(b, fused.chunk_states(*x.values())))
_OUTPUT = dict(qd=_spec((3, 2, 32, 16)), starts=_spec((3, 2, 16, 32)), aqk=_spec((3, 2, 32, 32)),
               v_new=_spec((3, 2, 32, 32)))       # C=32, K=16, V=32: the GPU kernel takes it
case("chunk_output", **_OUTPUT)(lambda b, **x: fused.chunk_output(*x.values()))
_TOKENS = {k: _spec((3, 1) + shape[1:], kind) for k, (shape, kind) in _OUTPUT.items()}     # batch (R, HV)
case("chunk_output_token_major", **_TOKENS)(lambda b, **x: fused.chunk_output(*x.values(), token_major=True))
for _name, _Kg in (("intra_chunk", 16), ("intra_chunk_head_gate", 1)):     # a gate per key channel, per head
    case(_name, q=_spec((1, 32, 2, 16)), k=_spec((1, 32, 2, 16)), v=_spec((1, 32, 2, 16)),
         g=_spec((1, 32, 2, _Kg), "gate"), beta=_spec((1, 32, 2, 1), "positive"))(
        lambda b, **x: _both(b, fused.intra_chunk(*x.values(), chunk_size=16)))
_STEP = dict(s=_spec((2, 3, 16, 32)), a=_spec((2, 3, 1, 1), "positive"), kc=_spec((2, 3, 16, 1)),
             kr=_spec((2, 3, 1, 16)), qr=_spec((2, 3, 16)), v=_spec((2, 3, 32)), beta=_spec((2, 3, 1), "positive"),
             qk=_spec((2, 3)))
case("token_step", **_STEP)(lambda b, **x: _both(b, fused.token_step(*x.values())))
# the step on the layer's raw q, k [N, 1, H, K] (4 value heads read 2 q/k heads), a gate per head and per key channel
for _name, _Kg in (("decode_step", ()), ("decode_step_key_gate", (16,))):
    case(_name, s=_spec((2, 4, 16, 32)), q=_spec((2, 1, 2, 16)), k=_spec((2, 1, 2, 16)), v=_spec((2, 1, 4, 32)),
         g=_spec((2, 1, 4) + _Kg, "gate"), beta=_spec((2, 1, 4), "positive"))(
        lambda b, **x: _both(b, fused.decode_step(*x.values(), scale=0.25)))


def build_all(names=None) -> Graph:
    """One graph with every case: inputs named `<case>__<input>`, outputs named by case."""
    b = dnir.Builder()
    outputs, out_names = [], []
    for name in names or CASES:
        specs, fn = CASES[name]
        nodes = {k: b.input(f"{name}__{k}", shape, _dtype(kind)) for k, (shape, kind) in specs.items()}
        outputs.append(fn(b, **nodes))
        out_names.append(name)
    return b.build(outputs, names=out_names)


def _dtype(kind):
    return {"bool": "bool", "int": "i32"}.get(kind, "f32")


def random_inputs(graph: Graph, rng) -> dict[str, np.ndarray]:
    out = {}
    for node in graph.inputs:
        name = node.attrs["name"]
        case_name, arg = name.split("__")
        shape, kind = CASES[case_name][0][arg]
        if kind == "bool":
            out[name] = rng.random(shape) < 0.5
        elif kind == "int":
            out[name] = rng.integers(-50, 50, shape).astype(np.int32)
        elif kind == "positive":
            out[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        elif kind == "gate":          # a log decay, <= 0
            out[name] = -rng.uniform(0.0, 1.0, shape).astype(np.float32)
        elif kind == "wide":
            out[name] = rng.uniform(-30, 30, shape).astype(np.float32)
        else:
            out[name] = rng.standard_normal(shape).astype(np.float32)
    return out


def nmse(out: np.ndarray, ref: np.ndarray) -> float:
    """ggml's normalised mean squared error sum((a-b)^2) / sum(a^2), a the reference."""
    ref = ref.astype(np.float64)
    return float(np.sum((out.astype(np.float64) - ref) ** 2) / np.sum(ref ** 2))
