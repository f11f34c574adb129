"""Recognise the delta rule's units of work as fused ops, where the target has kernels for them.

Two rules, each replacing a subgraph by an op of dnir/fused.py when the pass
context's target has a kernel that takes it (`Target.rejects`: e.g. a thread
block of the chunk scan must fit the shared memory, the kernels are float32):

- the loop over chunks: a scan with the state as its only carry whose body is
  the chunk step (any operand order of the adds and of the decay product)

      v_new = u - w S;   o = q_decayed S + aqk v_new;   S' = S last_decay + k_to_end^T v_new

  and whose other operands are the per-chunk slices, becomes `chunk_scan`;
- a chunk_scan whose output is read, on a target with kernels for both halves: its sequential
  part `chunk_states` (each chunk's starting state and v_new) and `chunk_output` (every chunk's
  output at once, o = q_decayed starts + aqk v_new), so that the loop carries only what must
  be sequential; the output's item is replaced by chunk_output, the final state's by
  chunk_states' first result (Match.replace);
- the layer's transpose of a chunk_output back to token-major ([n, R, HV, C, V] -> [R, n, C,
  HV, V] -> [R, n C, HV, V]): chunk_output writing that layout itself (token_major), where the
  kernel takes it (a reshape of an op's result may be a copy on TVM's targets: none is left);
- a decode step as the O2 graph writes it (reshapes between the vectors' shapes)

      u = (v - (k a) S) beta;   o = (q a) S + u (q . k);   S' = S a + k^T u

  becomes `token_step`: the new state's add is replaced by the op's first result,
  and the output's add (found among the readers of u) by its second (Match.replace). A decode
  layer is one such step; a recurrent layer's loop body is one per token.

Without a target in the context nothing is fused. Each match, and each subgraph
that has the shape of a unit but that the target's kernel declines, leaves a
remark on the context (`dnir opt --report` prints them).
"""
from __future__ import annotations

from dnir.errors import DnirError
from dnir.fused import CHUNK_ROLES, TOKEN_MAJOR, chunk_output, chunk_scan, chunk_states, token_step
from dnir.graph import Graph, Node

from .context import current
from .manager import register_pass
from .rewrite import P, Rule, apply_rules

PASS = "fuse_delta_steps"


def _mm(a: P, b: P, ta=False) -> P:
    return P("matmul", a, b, transpose_a=ta, transpose_b=False)


# The chunk step's two results, with the state captured before matching (as "s").
V_NEW = P("sub", P.any("u"), _mm(P.any("w"), P.any("s")), name="v_new")
NEW_STATE = P("add", P("mul", P.any("s"), P.any("last_decay")), _mm(P.any("k_to_end"), V_NEW, ta=True))
CHUNK_O = P("add", _mm(P.any("q_decayed"), P.any("s")), _mm(P.any("aqk"), P.any("v_new")))


def _through_reshapes(node: Node) -> Node:
    while node.op == "reshape":
        node = node.inputs[0]
    return node


def _offer(node: Node, what: str) -> Node | None:
    """`node` when the context's target has a kernel that takes it (with a remark either way), else None."""
    ctx = current()
    why = ctx.target.rejects(node)
    ctx.remark(PASS, f"{node.op} {'not fused: ' + why if why else 'fused'} ({what})")
    return node if why is None else None


def _build(make, operands, what: str):
    """The fused op on `operands`, or None (with a remark) when they do not fit its signature."""
    try:
        return make(*operands)
    except DnirError as e:
        current().remark(PASS, f"not fused ({what}): {e}")
        return None


def fuse_chunk_scan(m) -> Node | None:
    scan = m.node
    body: Graph = scan.attrs["body"]
    if len(body.inputs) != 1 + len(CHUNK_ROLES) or len(body.outputs) != 2:
        return None
    s, slot = body.inputs[0], {id(x): i for i, x in enumerate(body.inputs)}
    for caps in NEW_STATE.matches(body.outputs[0], {"s": s}):
        for found in CHUNK_O.matches(body.outputs[1], caps):
            roles = [found[r] for r in CHUNK_ROLES]
            if any(id(x) not in slot for x in roles) or len({id(x) for x in roles}) != len(roles) \
                    or s in roles:
                continue        # every role is a per-chunk slice of its own
            operands = [scan.inputs[0]] + [scan.inputs[slot[id(x)]] for x in roles]
            items = _build(chunk_scan, operands, f"scan of {scan.attrs['length']} chunks")
            return items and _offer(items[0].inputs[0], f"the scan over {scan.attrs['length']} chunks")
    return None


def split_chunk_scan(m) -> Node | None:
    scan = m.node.inputs[0]
    if scan.op != "chunk_scan" or "chunk_states" not in current().target.kernels:
        return None
    state, w, u, q_decayed, aqk, k_to_end, last_decay = scan.inputs
    what = f"the sequential part of {w.shape[0]} chunks"
    states = _build(chunk_states, (state, w, u, k_to_end, last_decay), what)
    if not states or not _offer(states[0].inputs[0], what):
        return None
    final, starts, v_new = states
    o = _build(chunk_output, (q_decayed, starts, aqk, v_new), f"the output of {w.shape[0]} chunks")
    if o is None or not _offer(o, f"the output of {w.shape[0]} chunks"):
        return None
    for use in m.users(scan):
        if use.node.op == "item" and use.node.attrs["index"] == 0:
            m.replace(use.node, final)
    return o


def token_major_output(m) -> Node | None:
    permuted = m.node.inputs[0]
    o = permuted.inputs[0]
    R, n, C, HV, V = permuted.shape
    if (o.op != "chunk_output" or o.attrs["token_major"] or m.node.shape != (R, n * C, HV, V)
            or m.uses(o) != 1 or m.uses(permuted) != 1):
        return None
    new = _build(lambda *x: chunk_output(*x, token_major=True), o.inputs, "the output, token-major")
    return new if new is not None and _offer(new, "the output, token-major") else None


# A decode step: S' = S a + u_row k_col, anchored at the new state's add.
STEP_STATE = P("add", P("mul", P.any("state"), P.any("decay")), P("mul", P.any("u_row"), P.any("k_col")),
               rank=lambda r: r >= 3)
STEP_U = P("mul", P("sub", P.any("v"), P.any("pred")), P.any("beta"))


def _row_times(x: Node, state: Node, row_shape) -> Node | None:
    """r when x is r [*batch, 1, K] @ state, through reshapes, else None."""
    mm = _through_reshapes(x)
    if (mm.op == "matmul" and not mm.attrs["transpose_a"] and not mm.attrs["transpose_b"]
            and mm.inputs[1] is state and mm.inputs[0].shape == row_shape):
        return mm.inputs[0]
    return None


def _step_output(m, u: Node, state: Node, batch, K, V):
    """(o, q_row, qk) with o = q_row S + u qk among the readers of u, else None."""
    for use in m.users(u):
        correction = use.node
        if correction.op != "mul" or correction.shape != batch + (V,):
            continue
        qk = correction.inputs[1 - use.operand]
        for use2 in m.users(correction):
            o = use2.node
            if o.op == "add" and o.shape == batch + (V,):
                q_row = _row_times(o.inputs[1 - use2.operand], state, batch + (1, K))
                if q_row is not None:
                    return o, q_row, qk
    return None


def fuse_token_step(m) -> Node | None:
    *batch, K, V = m.node.shape
    batch = tuple(batch)
    state, decay, u_row, k_col = m.state, m.decay, m.u_row, m.k_col
    if (state.shape != m.node.shape or decay.shape not in (batch + (1, 1), batch + (K, 1))
            or u_row.shape != batch + (1, V) or k_col.shape != batch + (K, 1)):
        return None
    u = _through_reshapes(u_row)
    if u.shape != batch + (V,):
        return None
    for caps in STEP_U.matches(u):
        k_row = _row_times(caps["pred"], state, batch + (1, K))
        found = k_row is not None and _step_output(m, u, state, batch, K, V)
        if found:
            o, q_row, qk = found
            operands = (state, decay, k_col, k_row, q_row, caps["v"], caps["beta"], qk)
            items = _build(token_step, operands, "decode step")
            if items and _offer(items[0].inputs[0], "decode step"):
                m.replace(o, items[1])          # the output's add takes the op's second result
                return items[0]
    return None


@register_pass(PASS)
def fuse_delta_steps(graph: Graph) -> tuple[Graph, bool]:
    """The delta rule's loop over chunks and decode step: fused ops, where the target has kernels."""
    ctx = current()
    if ctx.target is None:
        return graph, False
    remarks = len(ctx.remarks)
    graph, changed = apply_rules(graph, [Rule(P("scan", num_carry=1, num_xs=len(CHUNK_ROLES)), fuse_chunk_scan,
                                              "chunk_scan"),
                                         Rule(P("item", P.any(), index=1), split_chunk_scan, "chunk_states"),
                                         Rule(P("reshape", P("permute", P.any(), axes=TOKEN_MAJOR)),
                                              token_major_output, "chunk_output"),
                                         Rule(STEP_STATE, fuse_token_step, "token_step")])
    if len(ctx.remarks) == remarks:
        ctx.remark(PASS, "no loop over chunks or decode step in the graph")
    return graph, changed
