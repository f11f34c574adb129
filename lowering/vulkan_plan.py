"""Memory plan of the Relax functions the Vulkan runner interprets.

Every buffer a function allocates (a `call_tir` output, an `alloc_tensor`, or
the buffer a called function returns) is a `Block` with a lifetime
[first definition, last use] in binding positions. Aliases do not allocate:
a reshape, a tuple field, an in-place call's result and a called function's
result that is one of its parameters name the buffer of their source, so a
use of any alias extends the source's lifetime. Blocks that are returned by
the function escape it: the caller decides where they live (a range of its
own arena, or a buffer of their own for the outputs of `main`), which gives
the carried state of a scan a ping-pong pair in the caller's arena instead of
one buffer per step. All other blocks share one arena per function, placed
by the offline allocator so that blocks live at the same position never
share bytes. A scan's loop function is not interpreted but run as a loop
over its body, the function it names in `loop_body` (vulkan._Run.run_loop);
its plan is its body's, with a second set of the body's returned blocks in its
arena for the carries to alternate between.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import tvm.ir.expr as irx

from dnir.analysis.allocate import assign_offsets
from dnir.errors import BackendError


@dataclass(eq=False)
class Block:
    size: int       # bytes of the tensor (at least 4, a multiple of 4: WGSL arrays hold 4-byte words)
    nbytes: int     # size rounded up to the storage-binding offset alignment: what the arena reserves
    start: int
    end: int
    offset: int = 0
    escapes: bool = False


@dataclass(frozen=True)
class _Param:
    index: int      # position among the function's parameters, tuples flattened


@dataclass
class FunctionPlan:
    name: str
    blocks: list                    # every Block the function allocates, in order of definition
    escapes: list                   # the returned Blocks, in order of first appearance in the result
    defs: dict                      # binding var -> the Blocks its value defines
    result: object = field(repr=False)   # the result's structure: leaves are _Param, Block or None
    arena_bytes: int = 0

    @property
    def intermediate_bytes(self) -> int:
        """Bytes of every buffer the function allocates: what a frame without a plan holds at its end."""
        return sum(b.size for b in self.blocks)


def _tensor_bytes(ty) -> int:
    n = math.prod(int(d) for d in ty.shape) * np.dtype(str(ty.dtype)).itemsize
    return max(4, -(-n // 4) * 4)


def plan_functions(functions: dict, align: int) -> dict[str, FunctionPlan]:
    """A plan for every function, callees before their callers; offsets are multiples of `align`."""
    plans: dict[str, FunctionPlan] = {}

    def plan(name: str) -> FunctionPlan:
        if name not in plans:
            plans[name] = None   # marks the function as being planned
            body = loop_body_of(functions[name])
            plans[name] = (_plan_function(name, functions[name], align, plan) if body is None
                           else _plan_loop(name, plan(body), int(functions[name].attrs["num_carry"])))
        elif plans[name] is None:
            raise BackendError(f"vulkan: {name} calls itself; recursion is not supported")
        return plans[name]

    for name in functions:
        plan(name)
    return plans


def loop_body_of(func) -> str | None:
    """The function a scan's loop function repeats (None for any other function)."""
    attrs = func.attrs
    return str(attrs["loop_body"]) if attrs is not None and "loop_body" in attrs else None


def _plan_loop(name: str, body: FunctionPlan, num_carry: int) -> FunctionPlan:
    """The loop's parameters are its body's with (lo, hi) in place of the index: one more in front."""
    for i, leaf in enumerate(body.result[:num_carry]):
        # The body's parameters: the index, then the carries. A carry that the body sets to another
        # carry, unchanged, would leave the loop's result in a buffer that depends on the trip count.
        if isinstance(leaf, _Param) and 1 <= leaf.index <= num_carry and leaf.index != 1 + i:
            raise BackendError(f"vulkan: {name}: carry {i} is carry {leaf.index - 1} of the iteration "
                               f"before, unchanged; the runner cannot place such a loop's result")
    escapes = [Block(b.size, b.nbytes, 0, 0, escapes=True) for b in body.escapes]
    own = [Block(b.size, b.nbytes, 0, 0) for b in body.escapes]
    of = {id(b): e for b, e in zip(body.escapes, escapes)}
    result = _map(body.result, lambda leaf: _Param(leaf.index + 1) if isinstance(leaf, _Param)
                  else of[id(leaf)] if isinstance(leaf, Block) else None)
    plan = FunctionPlan(name, escapes + own, escapes, {}, result)
    plan.arena_bytes = assign_offsets(own)
    return plan


def _plan_function(name, func, align, plan_of) -> FunctionPlan:
    from tvm import relax
    env, blocks, defs = {}, [], {}
    n_params = 0

    def param_struct(ty):
        nonlocal n_params
        if isinstance(ty, relax.TupleType):
            return [param_struct(t) for t in ty.fields]
        n_params += 1
        return _Param(n_params - 1)

    def new_block(size, pos) -> Block:
        blocks.append(Block(size, -(-size // align) * align, pos, pos))
        return blocks[-1]

    def struct(expr):
        if isinstance(expr, relax.Var):
            return env[expr]
        if isinstance(expr, relax.Tuple):
            return [struct(f) for f in expr.fields]
        if isinstance(expr, relax.TupleGetItem):
            return struct(expr.tuple_value)[expr.index]
        if isinstance(expr, irx.Call):
            raise BackendError(f"vulkan: {name} has a call nested in an argument; the runner needs "
                               f"A-normal form")
        return None   # a constant or a shape: no buffer of the function

    def use(s, pos):
        for leaf in _leaves(s):
            if isinstance(leaf, Block):
                leaf.end = max(leaf.end, pos)

    for v in func.params:
        env[v] = param_struct(v.ty)
    bindings = [b for block in func.body.blocks for b in block.bindings]
    for pos, binding in enumerate(bindings):
        value = binding.value
        if not isinstance(value, irx.Call):
            env[binding.var] = struct(value)
            continue
        op = value.op
        if isinstance(op, relax.GlobalVar):
            callee = plan_of(op.name_hint)
            args = [struct(a) for a in value.args]
            use(args, pos)
            arg_leaves = [leaf for a in args for leaf in _leaves(a)]
            slots = [new_block(b.size, pos) for b in callee.escapes]
            slot_of = {id(b): s for b, s in zip(callee.escapes, slots)}
            defs[binding.var] = slots
            env[binding.var] = _map(callee.result, lambda leaf: arg_leaves[leaf.index] if isinstance(leaf, _Param)
                                    else slot_of[id(leaf)] if isinstance(leaf, Block) else None)
            continue
        kind = op.name
        if kind in ("relax.call_tir", "relax.call_tir_inplace"):
            args = [struct(a) for a in value.args[1].fields]
            use(args, pos)
            if kind == "relax.call_tir_inplace":
                outs = [args[i] for i in value.attrs.inplace_indices]
            else:
                out_ty = value.ty_args[0]
                types = list(out_ty.fields) if isinstance(out_ty, relax.TupleType) else [out_ty]
                outs = defs[binding.var] = [new_block(_tensor_bytes(t), pos) for t in types]
            env[binding.var] = outs[0] if len(outs) == 1 else outs
        elif kind == "relax.builtin.alloc_tensor":
            defs[binding.var] = [new_block(_tensor_bytes(value.ty), pos)]
            env[binding.var] = defs[binding.var][0]
        elif kind == "relax.call_pure_packed" and value.args[0].global_symbol == "vm.builtin.reshape":
            env[binding.var] = struct(value.args[1])
        elif kind == "relax.reshape":
            env[binding.var] = struct(value.args[0])
        else:
            raise BackendError(f"vulkan: cannot run Relax call {kind} in {name}")

    result = struct(func.body.body)
    escapes = []
    for leaf in _leaves(result):
        if isinstance(leaf, Block) and not leaf.escapes:
            leaf.escapes = True
            escapes.append(leaf)
    plan = FunctionPlan(name, blocks, escapes, defs, result)
    planned = [b for b in blocks if not b.escapes]
    plan.arena_bytes = assign_offsets(planned)
    assert all(b.offset % align == 0 for b in planned), "offsets of aligned sizes are aligned"
    return plan


def _leaves(s):
    if isinstance(s, list):
        for x in s:
            yield from _leaves(x)
    else:
        yield s


def _map(s, fn):
    return [_map(x, fn) for x in s] if isinstance(s, list) else fn(s)
