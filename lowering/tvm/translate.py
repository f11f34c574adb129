"""dnir Graph -> TVM IRModule.

Relax where Relax has the op; hand-written TIR (kernels.py) for the triangular
solve, cumsum and the scan's stacked outputs; TE for set/acc regions.

A scan becomes private Relax functions. `scanN_step(t, carries, xs, consts,
ys)` reads slice t of every sequence, runs the body, writes row t of every
stacked output in place and returns (carries, ys); t is a scalar (an int64
Relax value), so the same kernels serve every step. `scanN_block(b, ...)` runs
the LOOP_LEAF steps of block b one after the other, and `scanN_loop(lo, hi,
...)` runs blocks lo..hi-1: block lo when there is one, else the two halves of
the range one after the other. `main` calls the loop once and the last
length % LOOP_LEAF steps itself, so the module and its compile time do not grow
with the number of steps, and the recursion is about log2(length / LOOP_LEAF)
calls deep.

Why this loop: Relax has no loop construct, only `If` and calls, and TVM's VM
has no builtin that repeats a function. A recursion of one call per step runs
the VM out of native stack (it crashed at 4000 steps); a loop in a packed
function of dnir's own would have to be registered in every process that runs
an exported module (`dnir compile`; a plain TVM runtime has none); a loop in TIR
would need the whole step body as TIR with its memory planned by hand. Halving
needs nothing beyond Relax, so it runs wherever the VM runs (llvm, and cuda
with the TVM runtime only). The Vulkan runner (lowering/vulkan.py) interprets
Relax itself and runs a loop function, tagged with its `loop_body`, as a loop.

The fused ops (dnir/fused.py) that a GPU target's pipeline put in the graph
are lowered through this table too, each to one hand-written kernel: the
delta rule's loop over chunks (chunk_scan.py; on GPUs split into its sequential part,
chunk_scan.py, and a chunk-parallel output, chunk_output.py) and a decode step (token_step.py).
"""
from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax, te
from tvm.ir import PrimType

from dnir.errors import BackendError
from dnir.fused import INTRA_ROLES, OUTPUT_ROLES, STATES_ROLES, STEP_ROLES, compute_dtype, intra_sizes
from dnir.graph import Graph, Node
from dnir.lowering.head_reads import head_reads
from dnir.ops import table_entry
from dnir.types import DTYPES, HALF_DTYPES, TensorType, precision_of

from . import (chunk_output, chunk_scan, chunk_states_mma, cpu_chunk_layer, cpu_chunk_scan, cpu_intra_chunk,
               cpu_token_step, intra_chunk, intra_chunk_mma, kernels, token_step)

# dnir dtype -> TVM dtype
TVM_DTYPES = dict(DTYPES)
# Steps of a scan's loop block. The VM checks every argument of every call: against one main call per
# step, a recurrent layer (Qwen3-Next sizes, T=512, H100) took 13% longer with a loop call per step,
# 4.1% with blocks of 4 steps and 2.3% with blocks of 8 (28.9 -> 29.6 ms); on 16 Xeon cores (T=256)
# blocks of 8 cost 1.0% (41.95 -> 42.38 ms).
LOOP_LEAF = 8


def _const(value, dtype: str) -> relax.Constant:
    return relax.const(value, TVM_DTYPES[dtype])


class Translator:
    """Builds one IRModule; `gpu` selects the thread-bound variants of the TIR kernels;
    `bool_as_int` stores bool tensors as int32 (WGSL has no byte-sized storage); `tensor_cores`
    (CUDA) the fused kernels' variants whose products run as mma (mma.py), as three TF32 products
    each (split, 3xTF32) or one, as the main graph's metadata asks (`precision`, models/config.py)."""

    def __init__(self, gpu: bool, bool_as_int: bool = False, tensor_cores: bool = False):
        self.gpu = gpu
        self.tensor_cores = tensor_cores
        self.bool_as_int = bool_as_int
        self.bb = relax.BlockBuilder()
        self.steps: dict[tuple[int, int], tuple] = {}    # (id(body), length) -> (loop, step) functions
        self.prims: dict[tuple, relax.GlobalVar] = {}
        self.main_values: dict[int, relax.Expr] = {}   # id(node) -> its value, in main
        self.token_major: dict[int, relax.Expr] = {}   # id(chunk_scan node) -> its o, token-major (CPU)
        self.checksums: dict[int, relax.Expr] = {}      # id(token_step node) -> its state's column sums (CPU)
        self.main_graph: Graph | None = None
        self.split = True       # 3xTF32; module() reads the main graph's precision

    def dtype(self, dtype: str) -> str:
        return "int32" if dtype == "bool" and self.bool_as_int else TVM_DTYPES[dtype]

    def tensor_type(self, t) -> relax.TensorType:
        return relax.TensorType(t.shape, self.dtype(t.dtype))

    # -- module assembly ------------------------------------------------------
    def module(self, graph: Graph) -> tvm.IRModule:
        self.split = precision_of(graph.meta) == "highest"
        self._declare_scans(graph)
        params = [relax.Var(n.attrs["name"], self.tensor_type(n.type)) for n in graph.inputs]
        self.main_graph = graph
        with self.bb.function("main", params):
            outputs = self._emit_function_body(graph, params)
            self.bb.emit_func_output(relax.Tuple(outputs))
        mod = self.bb.finalize()
        # the CPU chunk layer kernel leaves its intra_chunk's call unused, and the copies of its
        # operands (GQA, q's scaling, a half input's cast on cuda) and of its o (chunk-major)
        # where nothing else reads them
        return relax.transform.DeadCodeElimination(["main"])(mod)

    def _emit_function_body(self, graph: Graph, params) -> list:
        with self.bb.dataflow():
            values = {id(n): p for n, p in zip(graph.inputs, params)}
            if graph is self.main_graph:
                self.main_values = values
            for node in graph.topo_order():
                if id(node) not in values:
                    values[id(node)] = LOWER[node.op](self, node, [values[id(i)] for i in node.inputs])
            outputs = [self.bb.emit_output(values[id(n)]) for n in graph.outputs]
            if graph is self.main_graph:     # the CPU decode step's checksums follow
                outputs += [self.bb.emit_output(self.checksums[id(graph.outputs[i].inputs[0])])
                            for i in cpu_token_step.checked_outputs(graph) if not self.gpu]
        return outputs

    def emit(self, expr):
        return self.bb.emit(expr)

    def prim(self, key: tuple, make) -> relax.GlobalVar:
        """A TIR kernel added once per distinct key."""
        if key not in self.prims:
            self.prims[key] = self.bb.add_func(make(), key[0])
        return self.prims[key]

    # -- scans ----------------------------------------------------------------
    def _declare_scans(self, graph: Graph):
        """Build every scan's step, block and loop functions (innermost scans first) before main."""
        for node in graph.topo_order():
            if node.op != "scan":
                continue
            body, length = node.attrs["body"], node.attrs["length"]
            key = (id(body), length)
            if key in self.steps:
                continue
            self._declare_scans(body)
            step = self._step_function(node)
            self.steps[key] = (self._loop_function(node, step), step)

    def _step_function(self, node: Node) -> relax.GlobalVar:
        body: Graph = node.attrs["body"]
        nc, nx = node.attrs["num_carry"], node.attrs["num_xs"]
        operands = [i.type for i in node.inputs]
        stacked = node.type[nc:]
        step = relax.Var("t", PrimType("int64"))
        params = ([step] + [relax.Var(f"c{i}", self.tensor_type(t)) for i, t in enumerate(operands[:nc])]
                  + [relax.Var(f"x{i}", self.tensor_type(t)) for i, t in enumerate(operands[nc:nc + nx])]
                  + [relax.Var(f"k{i}", self.tensor_type(t)) for i, t in enumerate(operands[nc + nx:])]
                  + [relax.Var(f"y{i}", self.tensor_type(t)) for i, t in enumerate(stacked)])
        carries, xs = params[1:1 + nc], params[1 + nc:1 + nc + nx]
        consts, ys = params[1 + nc + nx:1 + len(operands)], params[1 + len(operands):]
        name = f"scan{len(self.steps)}_step"
        with self.bb.function(name, params, private=True):
            with self.bb.dataflow():
                slices = [self.emit(relax.op.take(x, step, axis=0, mode="clip")) for x in xs]
                inner = list(carries) + slices + list(consts)
                values = {id(n): p for n, p in zip(body.inputs, inner)}
                for n in body.topo_order():
                    if id(n) not in values:
                        values[id(n)] = LOWER[n.op](self, n, [values[id(i)] for i in n.inputs])
                results = [values[id(n)] for n in body.outputs]
                new_ys = []
                for y_all, y_row, t in zip(ys, results[nc:], stacked):
                    gv = self.prim(("put_row", t.shape, t.dtype),
                                   lambda t=t: kernels.put_row(t.shape, self.dtype(t.dtype), self.gpu))
                    new_ys.append(self.emit(relax.op.call_tir_inplace(gv, [y_all, y_row, step], 0,
                                                                      self.tensor_type(t))))
                out = self.bb.emit_output(relax.Tuple(results[:nc] + new_ys))
            # The builder may return an equal function added before (another scan of the same body).
            return self.bb.emit_func_output(out)

    def _next_state(self, node: Node, out, state: list) -> list:
        """The arguments of the next step after a call that returned `out`: its carries and stacked
        outputs, with the sequences and invariants as they were."""
        nc, ys_at = node.attrs["num_carry"], len(state) - (len(node.type) - node.attrs["num_carry"])
        new = [self.emit(relax.TupleGetItem(out, i)) for i in range(len(node.type))]
        return new[:nc] + state[nc:ys_at] + new[nc:]

    def _loop_function(self, node: Node, step_gv: relax.GlobalVar) -> relax.GlobalVar:
        """`scanN_loop(lo, hi, carries, xs, consts, ys)`: blocks lo..hi-1 (hi > lo) of LOOP_LEAF steps each,
        by halving the range. A block is a function of its own, `scanN_block(b, ...)`, whose steps are
        straight-line code: the VM frees a step's result once the next step has read it only there
        (a value used inside an If branch lives to the end of the enclosing function)."""
        step_params = self.bb.get()[step_gv].params
        prefix = step_gv.name_hint.removesuffix("_step")

        def params(*indices):
            return ([relax.Var(i, PrimType("int64")) for i in indices]
                    + [relax.Var(p.name, p.ty) for p in step_params[1:]])

        block = params("b")
        with self.bb.function(f"{prefix}_block", block, private=True):
            state = block[1:]
            for i in range(LOOP_LEAF):
                if i:
                    state = self._next_state(node, out, state)
                out = self.emit(relax.Call(step_gv, [block[0] * LOOP_LEAF + i] + state))
            block_gv = self.bb.emit_func_output(out)

        # Declared first as one block, so that the loop's body can call the loop itself.
        stub = params("lo", "hi")
        with self.bb.function(f"{prefix}_loop", stub, private=True):
            gv = self.bb.emit_func_output(self.emit(relax.Call(block_gv, [stub[0]] + stub[2:])))

        ps = params("lo", "hi")
        lo, hi, rest = ps[0], ps[1], ps[2:]
        self.bb.begin_scope(ps)
        self.bb._begin_binding_block()
        one = self.emit(relax.Call(block_gv, [lo] + rest))
        leaf = relax.SeqExpr([self.bb._end_block()], one)
        self.bb._begin_binding_block()
        mid = self.emit(lo + (hi - lo) // 2)
        state = self._next_state(node, self.emit(relax.Call(gv, [lo, mid] + rest)), rest)
        second = self.emit(relax.Call(gv, [mid, hi] + state))
        halves = relax.SeqExpr([self.bb._end_block()], second)
        self.bb._begin_binding_block()
        out = self.emit(relax.If(hi - lo == 1, leaf, halves))
        body = relax.SeqExpr([self.bb._end_block()], out)
        self.bb.end_scope()
        # loop_body and num_carry tell the Vulkan runner, which runs the loop itself, what to repeat.
        func = relax.Function(ps, body, self.bb.get()[step_gv].ret_ty).with_attrs(
            {"loop_body": block_gv.name_hint, "num_carry": node.attrs["num_carry"]})
        self.bb.update_func(gv, func)
        return gv

    def scan(self, node: Node, args):
        nc, length = node.attrs["num_carry"], node.attrs["length"]
        loop_gv, step_gv = self.steps[(id(node.attrs["body"]), length)]
        # Stacked outputs start uninitialised: every row is written by its step.
        ys = [self.emit(relax.op.builtin.alloc_tensor(relax.ShapeExpr(t.shape), self.dtype(t.dtype), 0))
              for t in node.type[nc:]]
        state = list(args) + ys
        blocks = length // LOOP_LEAF
        if blocks:
            out = self.emit(relax.Call(loop_gv, [relax.prim_value(0), relax.prim_value(blocks)] + state))
            state = self._next_state(node, out, state)
        for t in range(blocks * LOOP_LEAF, length):     # fewer than LOOP_LEAF: the module's size is bounded
            state = self._next_state(node, self.emit(relax.Call(step_gv, [relax.prim_value(t)] + state)), state)
        return state[:nc] + state[len(state) - len(ys):]


# ---------------------------------------------------------------------------
# Lowering rules: fn(translator, node, operand exprs) -> relax expr (or list for scan)

LOWER = {}
lowers = table_entry(LOWER)


def _emit(tr, expr):
    return tr.emit(expr)


@lowers("const")
def _lower_const(tr, node, args):
    dtype = tr.dtype(node.dtype)
    arr = np.asarray(node.attrs["value"], dtype=dtype if node.dtype != "bf16" else "float32")
    return relax.const(arr.reshape(node.shape), dtype)


@lowers("full")
def _lower_full(tr, node, args):
    dtype = tr.dtype(node.dtype)
    return _emit(tr, relax.op.full(node.shape, relax.const(node.attrs["value"], dtype), dtype))


@lowers("eye")
def _lower_eye(tr, node, args):
    return _emit(tr, relax.op.eye(node.attrs["n"], dtype=tr.dtype(node.dtype)))


_UNARY = {"neg": relax.op.negative, "exp": relax.op.exp, "log": relax.op.log, "sigmoid": relax.op.sigmoid,
          "sqrt": relax.op.sqrt, "rsqrt": relax.op.rsqrt}
_BINARY = {"add": relax.op.add, "sub": relax.op.subtract, "mul": relax.op.multiply, "div": relax.op.divide,
           "maximum": relax.op.maximum, "minimum": relax.op.minimum}


@lowers(*_UNARY)
def _lower_unary(tr, node, args):
    return _emit(tr, _UNARY[node.op](args[0]))


@lowers(*_BINARY)
def _lower_binary(tr, node, args):
    return _emit(tr, _BINARY[node.op](args[0], args[1]))


@lowers("softplus")
def _lower_softplus(tr, node, args):
    # max(x, 0) + log(1 + exp(-|x|)): never overflows, unlike log(1 + exp(x)).
    (x,) = args
    zero, one = _const(0.0, node.dtype), _const(1.0, node.dtype)
    tail = relax.op.log(relax.op.add(one, relax.op.exp(relax.op.negative(relax.op.abs(x)))))
    return _emit(tr, relax.op.add(relax.op.maximum(x, zero), tail))


@lowers("cast")
def _lower_cast(tr, node, args):
    x = args[0]
    if node.dtype == "bool" and tr.bool_as_int:
        x = relax.op.not_equal(x, relax.const(0, tr.dtype(node.inputs[0].dtype)))
    return _emit(tr, relax.op.astype(x, tr.dtype(node.dtype)))


@lowers("clamp")
def _lower_clamp(tr, node, args):
    x = args[0]
    if math.isfinite(node.attrs["min"]):
        x = relax.op.maximum(x, _const(node.attrs["min"], node.dtype))
    if math.isfinite(node.attrs["max"]):
        x = relax.op.minimum(x, _const(node.attrs["max"], node.dtype))
    return _emit(tr, x) if x is not args[0] else x


@lowers("where")
def _lower_where(tr, node, args):
    cond, a, b = args
    if tr.bool_as_int:
        cond = relax.op.not_equal(cond, relax.const(0, "int32"))
    return _emit(tr, relax.op.where(cond, a, b))


@lowers("reshape")
def _lower_reshape(tr, node, args):
    o = _token_major_o(tr, node)
    return o if o is not None else _emit(tr, relax.op.reshape(args[0], node.shape))


def _token_major_o(tr, node):
    """The CPU chunk layer kernel's o where `node` reshapes the chunk scan's o, chunk-major, to the
    layer's token-major layout (permute [1, 0, 3, 2, 4], reshape): the kernel wrote that already."""
    x = node.inputs[0]
    if x.op != "permute" or list(x.attrs["axes"]) != [1, 0, 3, 2, 4] or x.inputs[0].op != "item":
        return None
    scan = x.inputs[0].inputs[0]
    if x.inputs[0].attrs["index"] != 1 or id(scan) not in tr.token_major:
        return None
    NC, R, HV, C, V = x.inputs[0].shape
    return tr.token_major[id(scan)] if node.shape == (R, NC * C, HV, V) else None


@lowers("permute")
def _lower_permute(tr, node, args):
    rank = node.rank
    return _emit(tr, relax.op.permute_dims(args[0], [a % rank for a in node.attrs["axes"]]))


@lowers("broadcast_to")
def _lower_broadcast_to(tr, node, args):
    return _emit(tr, relax.op.broadcast_to(args[0], node.shape))


@lowers("pad")
def _lower_pad(tr, node, args):
    if node.rank == 0:
        return args[0]
    flat = [p for pair in node.attrs["pads"] for p in pair]
    return _emit(tr, relax.op.nn.pad(args[0], flat, "constant", node.attrs["value"]))


@lowers("slice")
def _lower_slice(tr, node, args):
    if node.rank == 0:
        return args[0]
    axes = list(range(node.rank))
    return _emit(tr, relax.op.strided_slice(args[0], axes, list(node.attrs["starts"]), list(node.attrs["stops"])))


@lowers("concat")
def _lower_concat(tr, node, args):
    if len(args) == 1:
        return args[0]
    return _emit(tr, relax.op.concat(relax.Tuple(args), node.attrs["axis"] % node.rank))


@lowers("cont")
def _lower_cont(tr, node, args):
    return args[0]  # a copy has no meaning in a value semantics IR


def _adds_in_float32(lower):
    """A reduction of bf16/fp16 values adds in float32 and rounds once (dnir.types.accumulation_dtype),
    as the NumPy reference does: the operands widened, the float32 lowering, the result narrowed."""
    def lower_half(tr, node, args):
        if node.dtype not in HALF_DTYPES:
            return lower(tr, node, args)
        wide = Node(node.op, tuple(Node(i.op, i.inputs, i.attrs, i.type.with_dtype("f32")) for i in node.inputs),
                    node.attrs, node.type.with_dtype("f32"))
        result = lower(tr, wide, [_emit(tr, relax.op.astype(a, "float32")) for a in args])
        return _emit(tr, relax.op.astype(result, tr.dtype(node.dtype)))
    return lower_half


@lowers("sum")
@_adds_in_float32
def _lower_sum(tr, node, args):
    (x,) = args
    src = node.inputs[0]
    axes = sorted(a % src.rank for a in node.attrs["axes"]) if src.rank else []
    if not axes:
        return x
    return _emit(tr, relax.op.sum(x, axes, node.attrs["keepdims"]))


@lowers("cumsum")
@_adds_in_float32
def _lower_cumsum(tr, node, args):
    axis = node.attrs["axis"] % node.rank
    outer, length, inner = math.prod(node.shape[:axis]), node.shape[axis], math.prod(node.shape[axis + 1:])
    dtype = TVM_DTYPES[node.dtype]
    gv = tr.prim(("cumsum", outer, length, inner, dtype),
                 lambda: kernels.cumsum(outer, length, inner, dtype, tr.gpu))
    x = _emit(tr, relax.op.reshape(args[0], (outer, length, inner)))
    y = _emit(tr, relax.op.call_tir(gv, [x], relax.TensorType((outer, length, inner), dtype)))
    return _emit(tr, relax.op.reshape(y, node.shape))


@lowers("matmul")
@_adds_in_float32
def _lower_matmul(tr, node, args):
    a, b = args
    if node.attrs["transpose_a"]:
        a = relax.op.permute_dims(a, _swap_last(node.inputs[0].rank))
    if node.attrs["transpose_b"]:
        b = relax.op.permute_dims(b, _swap_last(node.inputs[1].rank))
    return _emit(tr, relax.op.matmul(a, b))


def _swap_last(rank):
    axes = list(range(rank))
    axes[-1], axes[-2] = axes[-2], axes[-1]
    return axes


@lowers("tril", "triu")
def _lower_tri(tr, node, args):
    op = relax.op.tril if node.op == "tril" else relax.op.triu
    return _emit(tr, op(args[0], node.attrs["k"]))


@lowers("solve_tri")
@_adds_in_float32
def _lower_solve_tri(tr, node, args):
    a, b = args
    batch_shape, (n, m) = node.shape[:-2], node.shape[-2:]
    batch = math.prod(batch_shape)
    dtype = TVM_DTYPES[node.dtype]
    if node.inputs[0].shape[:-2] != batch_shape:
        a = relax.op.broadcast_to(a, batch_shape + (n, n))
    if node.inputs[1].shape[:-2] != batch_shape:
        b = relax.op.broadcast_to(b, batch_shape + (n, m))
    a = _emit(tr, relax.op.reshape(a, (batch, n, n)))
    b = _emit(tr, relax.op.reshape(b, (batch, n, m)))
    lower, unit = node.attrs["lower"], node.attrs["unit_diagonal"]
    gv = tr.prim(("solve_tri", batch, n, m, dtype, lower, unit),
                 lambda: kernels.solve_tri(batch, n, m, dtype, lower, unit, tr.gpu))
    x = _emit(tr, relax.op.call_tir(gv, [a, b], relax.TensorType((batch, n, m), dtype)))
    return _emit(tr, relax.op.reshape(x, node.shape))


@lowers("set", "acc")
def _lower_region(tr, node, args):
    offsets, block = node.attrs["offsets"], node.inputs[1].shape
    add = node.op == "acc"

    def region(dst, src):
        def value(*idx):
            inside = tvm.tirx.const(True, "bool")
            for i, o, s in zip(idx, offsets, block):
                inside = tvm.tirx.all(inside, i >= o, i < o + s)
            # Clamp the block index so that it stays in bounds where it is not selected.
            src_idx = [tvm.tirx.max(tvm.tirx.min(i - o, s - 1), 0) for i, o, s in zip(idx, offsets, block)]
            new = src[tuple(src_idx)] + dst[idx] if add else src[tuple(src_idx)]
            return tvm.tirx.if_then_else(inside, new, dst[idx])
        return te.compute(dst.shape, value, name=node.op)

    return tr.bb.emit_te(region, *args)


@lowers("scan")
def _lower_scan(tr, node, args):
    return tr.scan(node, args)


@lowers("chunk_scan")
def _lower_chunk_scan(tr, node, args):
    """The whole loop over chunks as one kernel (chunk_scan.py; cpu_chunk_scan.py on llvm): [final state,
    stacked o]."""
    steps, batch, C, K, V, Kg = chunk_scan.sizes(node)
    dtype = TVM_DTYPES[node.inputs[0].dtype]
    if not tr.gpu and cpu_chunk_layer.pairs(node):   # with its intra_chunk: one kernel (cpu_chunk_layer.py)
        return _lower_chunk_layer(tr, node, args)
    if not tr.gpu:
        gv = tr.prim(("chunk_scan", steps, batch, C, K, V, Kg, dtype),
                     lambda: cpu_chunk_scan.chunk_scan_kernel(steps, batch, C, K, V, Kg, dtype))
        return _call_fused(tr, node, gv, args)
    layout = chunk_scan.layout(C, K, V)
    gv = tr.prim(("chunk_scan", steps, batch, C, K, V, Kg, layout, dtype),
                 lambda: chunk_scan.chunk_scan_kernel(steps, batch, C, K, V, Kg, layout, dtype))
    return _call_fused(tr, node, gv, args)


def _lower_chunk_layer(tr, node, args):
    """The chunk scan and the intra_chunk whose results it reads as one CPU kernel: [final state, o
    chunk-major]; o token-major, as the kernel writes it, goes to tr.token_major (_token_major_o)."""
    source = node.inputs[1].inputs[0]
    R, NC, HV, C, K, V, Kg = intra_sizes([i.type for i in source.inputs], source.attrs)
    dtype = TVM_DTYPES[node.inputs[0].dtype]
    *reads, group, scale = cpu_chunk_layer.operands(source)
    gv = tr.prim(("chunk_layer", R, NC, HV, C, K, V, Kg, dtype, group, scale),
                 lambda: cpu_chunk_layer.chunk_layer_kernel(R, NC, HV, C, K, V, Kg, dtype, group, scale))
    types = [tr.tensor_type(node.type[0]), relax.TensorType((R, NC * C, HV, V), dtype)]
    out = tr.emit(relax.op.call_tir(gv, [args[0]] + [tr.main_values[id(x)] for x in reads], types))
    state, o = tr.emit(relax.TupleGetItem(out, 0)), tr.emit(relax.TupleGetItem(out, 1))
    tr.token_major[id(node)] = o
    chunks = tr.emit(relax.op.reshape(o, (R, NC, C, HV, V)))
    return [state, tr.emit(relax.op.permute_dims(chunks, [1, 0, 3, 2, 4]))]


def _narrow_operands(tr, node, roles, dtype: str) -> dict:
    """role -> TVM dtype of each operand of `node` narrower than `dtype`, which its kernel widens
    (`roles`: the op's operand names after the state, or all of them for an op without one)."""
    xs = node.inputs[len(node.inputs) - len(roles):]
    return {role: tr.dtype(x.dtype) for role, x in zip(roles, xs) if tr.dtype(x.dtype) != dtype}


@lowers("chunk_states")
def _lower_chunk_states(tr, node, args):
    """The sequential part of the loop over chunks as one GPU kernel (chunk_scan.py): [final state,
    starting states, v_new]."""
    steps, batch, C, K, V, Kg = chunk_scan.sizes(node)
    dtype, layout = TVM_DTYPES[node.inputs[0].dtype], chunk_scan.layout(C, K, V)
    stored = tr.dtype(node.attrs["dtype"]) if node.attrs["dtype"] else ""
    narrow = _narrow_operands(tr, node, STATES_ROLES, dtype)
    key = (stored, tuple(sorted(narrow.items())))
    if tr.tensor_cores and dtype == "float32" and chunk_states_mma.takes(C, K, V):
        gv = tr.prim(("chunk_states", steps, batch, C, K, V, Kg, "mma", dtype, tr.split, chunk_states_mma.CHOSEN, key),
                     lambda: chunk_states_mma.chunk_states_mma_kernel(steps, batch, C, K, V, Kg, dtype, split=tr.split,
                                                                      prefetch=chunk_states_mma.CHOSEN, stored=stored,
                                                                      narrow=narrow))
        return _call_fused(tr, node, gv, args)
    gv = tr.prim(("chunk_states", steps, batch, C, K, V, Kg, layout, dtype, key),
                 lambda: chunk_scan.chunk_states_kernel(steps, batch, C, K, V, Kg, layout, dtype, stored, narrow))
    return _call_fused(tr, node, gv, args)


@lowers("chunk_output")
def _lower_chunk_output(tr, node, args):
    """Every chunk's output at once, one GPU kernel (chunk_output.py); o in the node's dtype, which
    is narrower than the kernel computes in where o's cast was folded into it (its `dtype`)."""
    steps, batch, C, K, V = chunk_output.sizes(node)
    dtype, bv = TVM_DTYPES[compute_dtype([x.type for x in node.inputs])], chunk_output.layout(C, K, V)
    token_major, out = node.attrs["token_major"], tr.dtype(node.dtype)
    narrow = _narrow_operands(tr, node, OUTPUT_ROLES, dtype)
    key = tuple(sorted(narrow.items()))
    if tr.tensor_cores and dtype == "float32" and chunk_output.mma_layout(C, K, V):
        gv = tr.prim(("chunk_output", steps, batch, C, K, V, "mma", dtype, out, token_major, tr.split, key),
                     lambda: chunk_output.chunk_output_mma_kernel(steps, batch, C, K, V, dtype, token_major,
                                                                  split=tr.split, out_dtype=out, narrow=narrow))
        return tr.emit(relax.op.call_tir(gv, list(args), tr.tensor_type(node.type)))
    gv = tr.prim(("chunk_output", steps, batch, C, K, V, bv, dtype, out, token_major, key),
                 lambda: chunk_output.chunk_output_kernel(steps, batch, C, K, V, bv, dtype, token_major,
                                                          out_dtype=out, narrow=narrow))
    return tr.emit(relax.op.call_tir(gv, list(args), tr.tensor_type(node.type)))


@lowers("intra_chunk")
def _lower_intra_chunk(tr, node, args):
    """The work local to each chunk as one kernel (intra_chunk.py, on cuda in float32 where it is chosen
    intra_chunk_mma.py; cpu_intra_chunk.py on llvm): its six results."""
    sizes, dtype = intra_sizes([i.type for i in node.inputs], node.attrs), TVM_DTYPES[node.inputs[0].dtype]
    if not tr.gpu:
        gv = tr.prim(("intra_chunk", tr.gpu, *sizes, dtype), lambda: cpu_intra_chunk.intra_chunk_kernel(*sizes, dtype))
        return _call_fused(tr, node, gv, args)
    reads, narrow, group, scale = _intra_reads(tr, node, args)
    stored = tr.dtype(node.attrs["dtype"]) if node.attrs["dtype"] else ""
    if tr.tensor_cores and dtype == "float32" and intra_chunk_mma.chosen(*sizes[3:]):
        gv = tr.prim(("intra_chunk_mma", *sizes, dtype, group, scale, tuple(sorted(narrow.items())), tr.split, stored),
                     lambda: intra_chunk_mma.intra_chunk_mma_kernel(*sizes, dtype, group, scale, narrow,
                                                                    split=tr.split, stored=stored))
        return _call_fused(tr, node, gv, reads)
    gv = tr.prim(("intra_chunk", tr.gpu, *sizes, dtype, group, scale, tuple(sorted(narrow.items())), stored),
                 lambda: intra_chunk.intra_chunk_kernel(*sizes, dtype, group, scale, narrow, stored))
    return _call_fused(tr, node, gv, reads)


def _intra_reads(tr, node, args):
    """(values, narrow, group, scale): what the GPU intra_chunk kernel reads for `node`'s operands. q
    and k before their GQA repeat, q before its constant scaling (lowering/head_reads.py), and on
    cuda a half input before its widening cast (narrow: role -> its dtype; a reshape of it as a
    view): none of those copies is made (the module's dead-code pass drops them where nothing else
    reads them)."""
    q, k, v, g, beta = node.inputs
    q, k, group, scale = head_reads(q, k)
    nodes = (q, k, v, g, beta)
    if not all(id(x) in tr.main_values for x in nodes):      # inside a scan's body: as the op has them
        return list(args), {}, 1, None
    reads, narrow = [], {}
    for role, x in zip(INTRA_ROLES, nodes):
        source = x.inputs[0] if x.op == "reshape" else x
        if tr.tensor_cores and source.op == "cast" and source.inputs[0].type.is_float \
                and source.inputs[0].type.itemsize < source.type.itemsize:
            half = source.inputs[0]
            narrow[role] = tr.dtype(half.dtype)
            value = tr.main_values[id(half)]
            reads.append(value if source is x else tr.emit(relax.op.reshape(value, x.shape)))
        else:
            reads.append(tr.main_values[id(x)])
    return reads, narrow, group, scale


@lowers("token_step")
def _lower_token_step(tr, node, args):
    """A decode step's new state and output from one kernel (token_step.py; cpu_token_step.py on llvm)."""
    batch, K, V, Kg = token_step.sizes(node)
    shapes, dtype = token_step.operand_shapes(node), TVM_DTYPES[node.inputs[0].dtype]
    # its vectors may be narrower than the state (bf16/fp16): the kernel widens them
    narrow = {r: TVM_DTYPES[x.dtype] for r, x in zip(STEP_ROLES, node.inputs) if x.dtype != node.inputs[0].dtype}
    kernel = token_step.token_step_kernel if tr.gpu else cpu_token_step.token_step_kernel
    make = lambda *sizes: kernel(*sizes, narrow=narrow)  # noqa: E731
    gv = tr.prim(("token_step", tuple(sorted(shapes.items())), K, V, Kg, dtype,
                  tuple(i.dtype for i in node.inputs)), lambda: make(batch, shapes, K, V, Kg, dtype))
    return _fused_step(tr, node, gv, args)


def _fused_step(tr, node, gv, args) -> list:
    if tr.gpu:
        return _call_fused(tr, node, gv, args)
    # the CPU kernel's third output: token_step's new state's column sums, decode_step's report
    # (cpu_token_step.checked_outputs, REPORT)
    types = [tr.tensor_type(t) for t in node.type]
    check = types[1] if node.op == "token_step" else tr.tensor_type(
        TensorType((len(cpu_token_step.REPORT),), node.inputs[0].dtype))
    out = tr.emit(relax.op.call_tir(gv, list(args), types + [check]))
    tr.checksums[id(node)] = tr.emit(relax.TupleGetItem(out, 2))
    return [tr.emit(relax.TupleGetItem(out, i)) for i in range(len(node.type))]


@lowers("decode_step")
def _lower_decode_step(tr, node, args):
    """A decode step with its prologue (scale, gate exp, GQA repeat) from one kernel, as token_step."""
    batch, K, V, Kg, group = token_step.decode_sizes(node)
    shapes, dtype = token_step.decode_shapes(node), TVM_DTYPES[node.inputs[0].dtype]
    narrow = {r: TVM_DTYPES[x.dtype] for r, x in zip(token_step.DECODE_ROLES, node.inputs)
              if x.dtype != node.inputs[0].dtype}
    kernel = token_step.decode_step_kernel if tr.gpu else cpu_token_step.decode_step_kernel
    sizes = (batch, shapes, K, V, Kg, group, node.attrs["scale"], dtype)
    gv = tr.prim(("decode_step", tr.gpu, tuple(sorted(shapes.items())), *sizes[2:],
                  tuple(i.dtype for i in node.inputs)), lambda: kernel(*sizes, narrow=narrow))
    return _fused_step(tr, node, gv, args)


def _call_fused(tr, node, gv, args) -> list:
    out = tr.emit(relax.op.call_tir(gv, list(args), [tr.tensor_type(t) for t in node.type]))
    return [tr.emit(relax.TupleGetItem(out, i)) for i in range(len(node.type))]


@lowers("item")
def _lower_item(tr, node, args):
    return args[0][node.attrs["index"]]


def unsupported(graph: Graph, dtypes=None) -> list[str]:
    """Every op (recursively) that cannot be lowered, as 'op' or 'op (dtype)' strings."""
    found = set()
    for node in graph.topo_order():
        if node.op == "input":
            continue
        if node.op not in LOWER:
            found.add(node.op)
        types = node.type if isinstance(node.type, tuple) else (node.type,)
        if dtypes is not None:
            for t in types + tuple(i.type for i in node.inputs if not isinstance(i.type, tuple)):
                if t.dtype not in dtypes:
                    found.add(f"{node.op} ({t.dtype})")
        if node.op == "scan":
            found.update(unsupported(node.attrs["body"], dtypes))
    return sorted(found)


def translate(graph: Graph, gpu: bool = False, dtypes=None, target_name: str = "tvm",
              bool_as_int: bool = False) -> tvm.IRModule:
    """The IRModule of `graph`, or a BackendError naming every op (and dtype) the target lacks.
    A GPU target's graph comes prepared by its pipeline (lowering/registry.py: fused ops where
    the kernels take them, broadcast expansions recomputed inside reductions)."""
    missing = unsupported(graph, dtypes)
    if missing:
        raise BackendError(f"target {target_name!r} cannot lower: {', '.join(missing)}")
    return Translator(gpu, bool_as_int, tensor_cores=target_name == "cuda").module(graph)
