"""Fused ops: the delta rule's units of work, for backends with a kernel for each.

    chunk_scan(state, w, u, q_decayed, aqk, k_to_end, last_decay) -> (final state, o)
        The loop over chunks. Per chunk n, with S the state [*batch, K, V]:
            v_new = u[n] - w[n] S
            o[n]  = q_decayed[n] S + aqk[n] v_new
            S     = S * last_decay[n] + k_to_end[n]^T v_new
        w, q_decayed, k_to_end [n, *batch, C, K]; u [n, *batch, C, V];
        aqk [n, *batch, C, C]; last_decay [n, *batch, Kg, 1] with Kg 1 (one gate per
        head) or K (one per key channel). o is stacked per chunk: [n, *batch, C, V].

    chunk_states(state, w, u, k_to_end, last_decay) {dtype} -> (final state, starts, v_new)
        The part of the loop over chunks that must run in order. Per chunk n:
            starts[n] = S
            v_new[n]  = u[n] - w[n] S
            S         = S * last_decay[n] + k_to_end[n]^T v_new[n]
        Operands as chunk_scan's; starts [n, *batch, K, V], v_new [n, *batch, C, V].
        dtype: starts and v_new stored narrower (bf16/fp16, each value rounded once as it is
        stored: passes/narrow_loop_results.py); the loop carries S and v_new wide, so the final
        state is the same either way. "" (the default): in the dtype the op computes in.

    chunk_output(q_decayed, starts, aqk, v_new) {token_major, dtype} -> o
        chunk_scan's output from chunk_states' results, every chunk at once:
            o[n] = q_decayed[n] starts[n] + aqk[n] v_new[n]
        token_major (batch axes (R, HV) only): o [R, n C, HV, V], the layer's token-major
        layout (token n C + i is row i of chunk n), instead of [n, R, HV, C, V].
        dtype: o stored narrower than the op computes (bf16/fp16, each value rounded once as
        it is stored, as a `cast` after it would: passes/fold_narrowing_casts.py); "" (the
        default): in the dtype it computes in.
        A GPU runs the two as a sequential kernel (one thread block per head and value
        columns: the fewer products inside the loop, the shorter the critical path) and
        a chunk-parallel one; passes/fuse_delta_steps.py splits a chunk_scan into them
        where the target has kernels for both.

    intra_chunk(q, k, v, g, beta) {chunk_size, dtype} -> (w, u, q_decayed, aqk, k_to_end, last_decay)
        The work local to each chunk (dnir/intra_chunk.py): the decay-masked scores, the
        solve by I + Akk, W, U and the decays, from q, k [R, Tp, HV, K], v [R, Tp, HV, V],
        g [R, Tp, HV, Kg] and beta [R, Tp, HV, 1] (Tp whole chunks); the results are the
        operands of the loop over chunks, chunk-major ([NC, R, HV, C, ...]). Every decay
        is the exp of a sum of gates over its own segment. Its expansion is the chunked
        model's own construction, so passes/fuse_intra_chunk.py recognises it by building
        it again. dtype: w, u, q_decayed and k_to_end stored narrower (bf16/fp16, each value
        rounded once as it is stored: passes/narrow_loop_results.py); aqk and last_decay, and
        everything the op computes, stay wide. "" (the default): in the dtype it computes in.

    token_step(state, decay, k_col, k_row, q_row, v, beta, qk) -> (new state, o)
        One decode step:
            u  = (v - k_row S) beta
            o  = q_row S + u qk
            S' = S * decay + k_col^T u
        state [*batch, K, V]; every other operand holds, per head (the leading axes
        are `batch`), decay Kg values, k_col, k_row, q_row K, v V, beta and qk one,
        in any shape with that many elements (a kernel reads them flat, so the
        graph's own reshapes need no copy); o is [*batch, V].

    decode_step(state, q, k, v, g, beta) {scale} -> (new state, o)
        token_step on the layer's own inputs, its prologue folded in (passes/fold_step_prologue.py):
            a = exp(g),  q_s = q scale,  value head j reads q/k head j // group (GQA)
            token_step(state, a, k, k a, q_s a, v, beta, q_s . k)
        state [*batch, K, V] with batch = (..., HV); q and k hold H K values per sequence
        (H dividing HV, group = HV / H), v V per head, g one or K per head, beta one, each in
        any shape with that many elements (the layer's [B, T, H, K] as they come).

Each op is multi-result, like `scan`: its results are read with `item`. Its
`expand` rewrites it into primitive ops (the chunk scan into the `scan` whose
step body it stands for), for a backend without a kernel for it; NumPy's
reference kernels (lowering/numpy_backend.py) are the ops' meaning in code.
passes/fuse_delta_steps.py recognises them in the pipelines of the targets with kernels for them (GPUs, llvm).

dtypes: an op computes in its widest operand's dtype and returns that (`compute_dtype`; the state
is always of it). Other operands may be narrower, bf16 or fp16 as a layer's inputs hold them: the
op widens them as it loads them. That is how "the input is bf16, the arithmetic float32" reaches a
kernel: the layer widens each half input with an explicit `cast`, and where a target's kernel loads
half operands itself (`Target.narrow_operands`), passes/fold_widening_casts.py folds the cast into
the op's operand; elsewhere the cast stays a node of its own.
"""
from __future__ import annotations

import math

from .builder import Builder
from .errors import DTypeError
from .graph import Graph, Node
from .intra_chunk import chunk_operands
from .ops import REQUIRED, OpDef, fail, graph_flops, make_node, register
from .types import FLOAT_DTYPES, TensorType

CHUNK_ROLES = ("w", "u", "q_decayed", "aqk", "k_to_end", "last_decay")
STEP_ROLES = ("state", "decay", "k_col", "k_row", "q_row", "v", "beta", "qk")


def compute_dtype(ins, roles=()) -> str:
    """The dtype a fused op computes in and returns: its widest operand's. An operand may be
    narrower (a bf16/fp16 q, k, v or beta as the layer's input holds it): the op widens it as it
    loads it, which is the `cast` it replaced (passes/fold_widening_casts.py), and the op's
    expansion casts it again. Operands as wide as the widest share its dtype."""
    widest = max(ins, key=lambda t: t.itemsize)
    if any(t.dtype not in FLOAT_DTYPES or (t.itemsize == widest.itemsize and t.dtype != widest.dtype) for t in ins):
        fail(f"operands ({', '.join(roles)}) have dtypes {[t.dtype for t in ins]}; expected floating-point "
             f"dtypes, the widest one the op's (narrower ones are widened to it)", DTypeError)
    return widest.dtype


def _state_dtype(ins, roles) -> str:
    """compute_dtype of an op with a state (its first operand), which is never narrow: a half
    state would be rounded at every step."""
    dtype = compute_dtype(ins, roles)
    if ins[0].dtype != dtype:
        fail(f"operands ({', '.join(roles)}) have dtypes {[t.dtype for t in ins]}; the state must be the "
             f"widest operand ({dtype}): it is carried and returned in the dtype the op computes in", DTypeError)
    return dtype


def _widening(expand):
    """An op's expansion, on its operands in its own dtype: narrower ones cast first, as it loads them."""
    def expand_widened(node: Node):
        dtype = compute_dtype([i.type for i in node.inputs])
        inputs = tuple(x if x.dtype == dtype else make_node("cast", (x,), {"dtype": dtype}) for x in node.inputs)
        return expand(node if all(a is b for a, b in zip(inputs, node.inputs))
                      else make_node(node.op, inputs, node.attrs))
    return expand_widened


# ---------------------------------------------------------------------------
# The loop over chunks


def _chunk_sizes(ins, roles=CHUNK_ROLES):
    """(n, batch, C, K, V, Kg) of a chunk scan's operands (the state, then one per role, in the
    order `roles` names them: all of CHUNK_ROLES or some), or fail naming the operand."""
    state, *xs = ins
    if state.rank < 2:
        fail(f"state must be [*batch, K, V], got {list(state.shape)}")
    *batch, K, V = state.shape
    batch = tuple(batch)
    got = dict(zip(roles, xs))
    n = got["w"].shape[0] if got["w"].rank else 0
    C = got["u"].shape[-2] if got["u"].rank >= 2 else 0       # u [n, *batch, C, V]
    Kg = got["last_decay"].shape[-2] if got["last_decay"].rank >= 2 else 0
    want = dict(w=(C, K), u=(C, V), q_decayed=(C, K), aqk=(C, C), k_to_end=(C, K), last_decay=(Kg, 1))
    for role, t in got.items():
        expected = (n, *batch, *want[role])
        if t.shape != expected:
            fail(f"{role} has shape {list(t.shape)}; expected {list(expected)} "
                 f"([chunks, *batch, ...] with the state [*batch, K={K}, V={V}], chunk C={C})")
    if Kg not in (1, K):
        fail(f"last_decay has {Kg} rows; expected 1 (one gate per head) or K={K} (one per key channel)")
    return n, batch, C, K, V, Kg


def _infer_chunk_scan(ins, attrs):
    dtype = _state_dtype(ins, ("state",) + CHUNK_ROLES)
    n, batch, C, K, V, Kg = _chunk_sizes(ins)
    return ins[0], TensorType((n, *batch, C, V), dtype)


def _chunk_scan_flops(ins, out, attrs):
    n, batch, C, K, V, Kg = _chunk_sizes(ins)
    products = 2 * C * K * V * 3 + 2 * C * C * V      # w S, q_decayed S, k_to_end^T v_new; aqk v_new
    elementwise = 2 * C * V + 2 * K * V               # the sub, the output's add; the decay and its add
    return n * math.prod(batch) * (products + elementwise)


def _chunk_step_body(state: TensorType, xs) -> Graph:
    """The scan body of one chunk: (state, w, u, q_decayed, aqk, k_to_end, last_decay) -> (state, o)."""
    def param(name, t):
        return make_node("input", (), {"name": name, "shape": t.shape, "dtype": t.dtype})
    s = param("state", state)
    w, u, qd, aqk, kte, ld = (param(r, t.with_shape(t.shape[1:])) for r, t in zip(CHUNK_ROLES, xs))

    def mm(a, b, ta=False):
        return make_node("matmul", (a, b), {"transpose_a": ta, "transpose_b": False})
    decayed = make_node("mul", (s, ld), {})
    v_new = make_node("sub", (u, mm(w, s)), {})
    new_state = make_node("add", (decayed, mm(kte, v_new, ta=True)), {})
    o = make_node("add", (mm(qd, s), mm(aqk, v_new)), {})
    return Graph([s, w, u, qd, aqk, kte, ld], [new_state, o], ["state", "o"])


def _expand_chunk_scan(node: Node) -> tuple[Node, ...]:
    state, *xs = node.inputs
    body = _chunk_step_body(state.type, [x.type for x in xs])
    scan = make_node("scan", node.inputs, {"body": body, "length": xs[0].shape[0], "num_carry": 1,
                                           "num_xs": len(xs)})
    return _items(scan)


def chunk_scan(state: Node, w: Node, u: Node, q_decayed: Node, aqk: Node, k_to_end: Node,
               last_decay: Node) -> tuple[Node, Node]:
    """(final state, stacked o) of the loop over chunks."""
    return _items(make_node("chunk_scan", (state, w, u, q_decayed, aqk, k_to_end, last_decay), {}))


def _items(node: Node) -> tuple[Node, ...]:
    return tuple(make_node("item", (node,), {"index": i}) for i in range(len(node.type)))


register(OpDef("chunk_scan", 7, _infer_chunk_scan, flops=_chunk_scan_flops, op_class="fused",
               expand=_widening(_expand_chunk_scan)))


STATES_ROLES = ("w", "u", "k_to_end", "last_decay")
OUTPUT_ROLES = ("q_decayed", "starts", "aqk", "v_new")


def _infer_chunk_states(ins, attrs):
    stored = _stored_dtype(_state_dtype(ins, ("state",) + STATES_ROLES), attrs["dtype"])
    n, batch, C, K, V, Kg = _chunk_sizes(ins, STATES_ROLES)
    return ins[0], TensorType((n, *batch, K, V), stored), TensorType((n, *batch, C, V), stored)


def _chunk_states_flops(ins, out, attrs):
    n, batch, C, K, V, Kg = _chunk_sizes(ins, STATES_ROLES)
    return n * math.prod(batch) * (2 * C * K * V * 2 + C * V + 2 * K * V)   # w S, k_to_end^T v_new


def _expand_chunk_states(node: Node) -> tuple[Node, ...]:
    state, w, u, kte, ld = node.inputs
    s = make_node("input", (), {"name": "state", "shape": state.shape, "dtype": state.dtype})
    wi, ui, ki, li = (make_node("input", (), {"name": r, "shape": t.shape[1:], "dtype": t.dtype})
                      for r, t in zip(STATES_ROLES, (w, u, kte, ld)))
    v_new = make_node("sub", (ui, make_node("matmul", (wi, s), {"transpose_a": False, "transpose_b": False})), {})
    grown = make_node("matmul", (ki, v_new), {"transpose_a": True, "transpose_b": False})
    new_state = make_node("add", (make_node("mul", (s, li), {}), grown), {})
    # the state a chunk starts from, as a result of its own (a body's output node is not its input)
    start = make_node("reshape", (s,), {"shape": s.shape})
    stored = [start, v_new]
    if node.attrs["dtype"]:           # stored narrower: the casts it stands for
        stored = [make_node("cast", (x,), {"dtype": node.attrs["dtype"]}) for x in stored]
    body = Graph([s, wi, ui, ki, li], [new_state, *stored], ["state", "start", "v_new"])
    scan = make_node("scan", node.inputs, {"body": body, "length": w.shape[0], "num_carry": 1, "num_xs": 4})
    return _items(scan)


def chunk_states(state: Node, w: Node, u: Node, k_to_end: Node, last_decay: Node,
                 dtype: str = "") -> tuple[Node, Node, Node]:
    """(final state, each chunk's starting state, each chunk's v_new) of the loop over chunks; dtype:
    starts and v_new stored narrower ("": in the dtype the op computes in)."""
    return _items(make_node("chunk_states", (state, w, u, k_to_end, last_decay), {"dtype": dtype}))


register(OpDef("chunk_states", 5, _infer_chunk_states, {"dtype": ("dtype", "")}, flops=_chunk_states_flops,
               op_class="fused", expand=_widening(_expand_chunk_states)))


def output_sizes(ins):
    """(n, batch, C, K, V) of a chunk_output's operands, or fail naming the operand."""
    qd, starts, aqk, v_new = ins
    if starts.rank < 3:
        fail(f"starts must be [n, *batch, K, V], got {list(starts.shape)}")
    n, *batch, K, V = starts.shape
    C = qd.shape[-2] if qd.rank >= 2 else 0
    want = dict(q_decayed=(C, K), aqk=(C, C), v_new=(C, V))
    for role, t in (("q_decayed", qd), ("aqk", aqk), ("v_new", v_new)):
        expected = (n, *batch, *want[role])
        if t.shape != expected:
            fail(f"{role} has shape {list(t.shape)}; expected {list(expected)} (with starts "
                 f"{list(starts.shape)} and chunk C={C})")
    return n, tuple(batch), C, K, V


def _infer_chunk_output(ins, attrs):
    dtype = _stored_dtype(compute_dtype(ins, OUTPUT_ROLES), attrs["dtype"])
    n, batch, C, K, V = output_sizes(ins)
    if not attrs["token_major"]:
        return TensorType((n, *batch, C, V), dtype)
    if len(batch) != 2:
        fail(f"token_major needs two batch axes (R, HV); starts has {list(ins[1].shape)}")
    R, HV = batch
    return TensorType((R, n * C, HV, V), dtype)


def _stored_dtype(dtype: str, stored: str) -> str:
    """The dtype an op computing in `dtype` returns when asked to store `stored` ("": its own)."""
    if not stored:
        return dtype
    narrower = stored in FLOAT_DTYPES and TensorType((), stored).itemsize <= TensorType((), dtype).itemsize
    if not narrower:
        fail(f"attribute dtype={stored!r}; expected a floating-point dtype no wider than {dtype}, "
             f"the dtype the op computes in (or \"\" for that dtype)", DTypeError)
    return stored


def _chunk_output_flops(ins, out, attrs):
    n, batch, C, K, V = output_sizes(ins)
    return n * math.prod(batch) * (2 * C * K * V + 2 * C * C * V + C * V)


def _expand_chunk_output(node: Node) -> Node:
    qd, starts, aqk, v_new = node.inputs
    plain = {"transpose_a": False, "transpose_b": False}
    o = make_node("add", (make_node("matmul", (qd, starts), plain), make_node("matmul", (aqk, v_new), plain)), {})
    if node.attrs["dtype"]:           # stored narrower: the cast it replaced
        o = make_node("cast", (o,), {"dtype": node.attrs["dtype"]})
    if not node.attrs["token_major"]:
        return o
    return make_node("reshape", (make_node("permute", (o,), {"axes": TOKEN_MAJOR}),), {"shape": node.shape})


TOKEN_MAJOR = (1, 0, 3, 2, 4)      # [n, R, HV, C, V] -> [R, n, C, HV, V], then a reshape to [R, n C, HV, V]


def chunk_output(q_decayed: Node, starts: Node, aqk: Node, v_new: Node, token_major: bool = False,
                 dtype: str = "") -> Node:
    """Every chunk's output from its starting state and its v_new (chunk_states); dtype: o stored
    narrower ("": in the dtype the op computes in)."""
    return make_node("chunk_output", (q_decayed, starts, aqk, v_new), {"token_major": token_major, "dtype": dtype})


register(OpDef("chunk_output", 4, _infer_chunk_output, {"token_major": ("bool", False), "dtype": ("dtype", "")},
               flops=_chunk_output_flops, op_class="fused", expand=_widening(_expand_chunk_output)))


# ---------------------------------------------------------------------------
# The work local to each chunk


INTRA_ROLES = ("q", "k", "v", "g", "beta")


def intra_sizes(ins, attrs):
    """(R, NC, HV, C, K, V, Kg) of an intra_chunk's operands, or fail naming the operand."""
    q = ins[0]
    C = attrs["chunk_size"]
    if q.rank != 4 or q.shape[1] % C:
        fail(f"q has shape {list(q.shape)}; expected [R, Tp, HV, K] with Tp whole chunks of {C}")
    R, Tp, HV, K = q.shape
    V, Kg = ins[2].shape[-1] if ins[2].rank else 0, ins[3].shape[-1] if ins[3].rank else 0
    want = dict(q=K, k=K, v=V, g=Kg, beta=1)
    for role, t in zip(INTRA_ROLES, ins):
        if t.shape != (R, Tp, HV, want[role]):
            fail(f"{role} has shape {list(t.shape)}; expected {[R, Tp, HV, want[role]]} (q's [R, Tp, HV, K])")
    if Kg not in (1, K):
        fail(f"g has {Kg} channels; expected 1 (one gate per head) or K={K} (one per key channel)")
    return R, Tp // C, HV, C, K, V, Kg


# intra_chunk's results that its `dtype` stores narrower: the [C, K] and [C, V] operands of the loop
NARROW_INTRA = ("w", "u", "q_decayed", "k_to_end")


def _infer_intra_chunk(ins, attrs):
    dtype = compute_dtype(ins, INTRA_ROLES)
    stored = _stored_dtype(dtype, attrs["dtype"])
    R, NC, HV, C, K, V, Kg = intra_sizes(ins, attrs)
    last = dict(w=K, u=V, q_decayed=K, aqk=C, k_to_end=K)
    return tuple(TensorType((NC, R, HV, C, last[r]), stored if r in NARROW_INTRA else dtype)
                 for r in CHUNK_ROLES[:5]) + (TensorType((NC, R, HV, Kg, 1), dtype),)


def _intra_chunk_flops(ins, out, attrs):
    R, NC, HV, C, K, V, Kg = intra_sizes(ins, attrs)
    scores = 2 * 2 * C * C * K                 # k k^T and q k^T, decay-masked
    solve = C * C * (K + V)                    # W and U by substitution (a triangle of C x C)
    decays = 6 * C * K + C * V                 # the scaled operands
    return NC * R * HV * (scores + solve + decays)


def _expand_intra_chunk(node: Node) -> tuple[Node, ...]:
    results = chunk_operands(Builder(node.inputs[0].dtype), *node.inputs, node.attrs["chunk_size"])
    if not node.attrs["dtype"]:
        return results
    # stored narrower: the casts it stands for
    return tuple(make_node("cast", (x,), {"dtype": node.attrs["dtype"]}) if role in NARROW_INTRA else x
                 for role, x in zip(CHUNK_ROLES, results))


def intra_chunk(q: Node, k: Node, v: Node, g: Node, beta: Node, chunk_size: int, dtype: str = "") -> tuple[Node, ...]:
    """(w, u, q_decayed, aqk, k_to_end, last_decay) of every chunk, chunk-major; dtype: the loop's
    operands (NARROW_INTRA) stored narrower ("": in the dtype the op computes in)."""
    return _items(make_node("intra_chunk", (q, k, v, g, beta), {"chunk_size": chunk_size, "dtype": dtype}))


register(OpDef("intra_chunk", 5, _infer_intra_chunk, attrs={"chunk_size": ("int", REQUIRED), "dtype": ("dtype", "")},
               flops=_intra_chunk_flops, op_class="fused", expand=_widening(_expand_intra_chunk)))


# ---------------------------------------------------------------------------
# One decode step


def step_sizes(ins):
    """(batch, K, V, Kg) of a token step's operands, or fail naming the operand."""
    state = ins[0]
    if state.rank < 3:
        fail(f"state must be [*batch, K, V] with at least one batch axis, got {list(state.shape)}")
    *batch, K, V = state.shape
    batch, nb = tuple(batch), len(batch)
    decay = ins[1]
    Kg = math.prod(decay.shape[nb:])
    per_head = dict(decay=Kg, k_col=K, k_row=K, q_row=K, v=V, beta=1, qk=1)
    for role, t in zip(STEP_ROLES[1:], ins[1:]):
        if t.shape[:nb] != batch or math.prod(t.shape[nb:]) != per_head[role]:
            fail(f"{role} has shape {list(t.shape)}; expected the state's batch axes {list(batch)} first, "
                 f"then {per_head[role]} element(s) per head")
    if Kg not in (1, K):
        fail(f"decay has {Kg} values per head; expected 1 or K={K}")
    return batch, K, V, Kg


def _infer_token_step(ins, attrs):
    dtype = _state_dtype(ins, STEP_ROLES)
    batch, K, V, Kg = step_sizes(ins)
    return ins[0], TensorType((*batch, V), dtype)


def _token_step_flops(ins, out, attrs):
    batch, K, V, Kg = step_sizes(ins)
    # two rows times S; the decay, k^T u and their add; the sub, the two scalings, the output's add
    return math.prod(batch) * (4 * K * V + 3 * K * V + 4 * V)


def _expand_token_step(node: Node) -> tuple[Node, ...]:
    state, decay, k_col, k_row, q_row, v, beta, qk = node.inputs
    batch, K, V, Kg = step_sizes([i.type for i in node.inputs])

    def shaped(x, *shape):
        shape = (*batch, *shape)
        return x if x.shape == shape else make_node("reshape", (x,), {"shape": shape})

    def row_times_state(row):
        product = make_node("matmul", (shaped(row, 1, K), state), {"transpose_a": False, "transpose_b": False})
        return shaped(product, V)
    error = make_node("sub", (shaped(v, V), row_times_state(k_row)), {})
    u = make_node("mul", (error, shaped(beta, 1)), {})
    o = make_node("add", (row_times_state(q_row), make_node("mul", (u, shaped(qk, 1)), {})), {})
    decayed = make_node("mul", (state, shaped(decay, Kg, 1)), {})
    new_state = make_node("add", (decayed, make_node("mul", (shaped(u, 1, V), shaped(k_col, K, 1)), {})), {})
    return new_state, o


def token_step(state: Node, decay: Node, k_col: Node, k_row: Node, q_row: Node, v: Node, beta: Node,
               qk: Node) -> tuple[Node, Node]:
    """(new state, o) of one decode step."""
    return _items(make_node("token_step", (state, decay, k_col, k_row, q_row, v, beta, qk), {}))


register(OpDef("token_step", 8, _infer_token_step, flops=_token_step_flops, op_class="fused",
               expand=_widening(_expand_token_step)))


# ---------------------------------------------------------------------------
# One decode step from the layer's own inputs


DECODE_ROLES = ("state", "q", "k", "v", "g", "beta")


def decode_sizes(ins):
    """(batch, K, V, Kg, group) of a decode step's operands, or fail naming the operand: the state
    [*batch, K, V] (batch = (..., HV)), q and k with H K values per sequence (the batch axes but the
    last: HV value heads, H dividing HV), v V values per head, g Kg and beta one, in any shapes with
    that many elements (a kernel reads them flat)."""
    state = ins[0]
    if state.rank < 3:
        fail(f"state must be [*batch, HV, K, V] with at least one batch axis, got {list(state.shape)}")
    *batch, K, V = state.shape
    batch = tuple(batch)
    heads, HV = math.prod(batch), batch[-1]
    qk_heads = ins[1].size // max(heads // max(HV, 1) * K, 1)
    Kg = ins[4].size // max(heads, 1)
    want = dict(q=qk_heads * K * (heads // HV), k=ins[1].size, v=heads * V, g=heads * Kg, beta=heads)
    for role, t in zip(DECODE_ROLES[1:], ins[1:]):
        if t.size != want[role] or t.size == 0:
            fail(f"{role} has shape {list(t.shape)}; expected {want[role]} element(s) with the state "
                 f"{list(state.shape)} (q and k: H K per sequence, H dividing HV={HV}; v: V per head; "
                 f"g: 1 or K per head; beta: one per head)")
    if qk_heads == 0 or HV % qk_heads:
        fail(f"q has {qk_heads} heads per sequence; expected a divisor of the state's HV={HV} value heads")
    if Kg not in (1, K):
        fail(f"g has {Kg} values per head; expected 1 or K={K}")
    return batch, K, V, Kg, HV // qk_heads


def _infer_decode_step(ins, attrs):
    dtype = _state_dtype(ins, DECODE_ROLES)
    batch, K, V, Kg, group = decode_sizes(ins)
    return ins[0], TensorType((*batch, V), dtype)


def _decode_step_flops(ins, out, attrs):
    """Its expansion's: token_step's and the prologue's (the scale, the exp, the decayed rows, q . k)."""
    operands = [make_node("input", (), {"name": r, "shape": t.shape, "dtype": t.dtype})
                for r, t in zip(DECODE_ROLES, ins)]
    return graph_flops(Graph(operands, list(_widening(_expand_decode_step)(make_node("decode_step", operands, attrs)))))


def _expand_decode_step(node: Node) -> tuple[Node, ...]:
    """The layer's own prologue (scale, exp of the gate, the GQA repeat, q . k) and a token_step,
    which expands in its turn."""
    state, q, k, v, g, beta = node.inputs
    batch, K, V, Kg, group = decode_sizes([i.type for i in node.inputs])
    HV = batch[-1]
    heads = (*batch[:-1], HV // group)

    def repeated(x):            # [*heads, K] -> [*batch, K]: value head j reads q/k head j // group
        x = make_node("reshape", (x,), {"shape": (*heads, 1, K)})
        x = make_node("broadcast_to", (x,), {"shape": (*heads, group, K)})
        return make_node("reshape", (x,), {"shape": (*batch, K)})
    scale = make_node("const", (), {"value": [node.attrs["scale"]], "shape": (), "dtype": q.dtype})
    qs = repeated(make_node("mul", (q, scale), {}))
    kr = repeated(k)
    decay = make_node("exp", (make_node("reshape", (g,), {"shape": (*batch, Kg)}),), {})
    qk = make_node("sum", (make_node("mul", (qs, kr), {}),), {"axes": (-1,), "keepdims": True})
    v, beta = (make_node("reshape", (x,), {"shape": (*batch, n)}) for x, n in ((v, V), (beta, 1)))
    step = make_node("token_step", (state, decay, kr, make_node("mul", (kr, decay), {}),
                                    make_node("mul", (qs, decay), {}), v, beta, qk), {})
    return _expand_token_step(step)


def decode_step(state: Node, q: Node, k: Node, v: Node, g: Node, beta: Node, scale: float) -> tuple[Node, Node]:
    """(new state, o) of one decode step on the layer's inputs before their scaling, gate exp and GQA repeat."""
    return _items(make_node("decode_step", (state, q, k, v, g, beta), {"scale": float(scale)}))


register(OpDef("decode_step", 6, _infer_decode_step, {"scale": ("float", REQUIRED)}, flops=_decode_step_flops,
               op_class="fused", expand=_widening(_expand_decode_step)))
