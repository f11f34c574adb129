"""Run dnir graphs on a Vulkan device: the WGSL TVM emits for `webgpu`, run by wgpu.

TVM 0.27 has no Vulkan runtime in its wheel, so the host side is here:
  1. translate to Relax and run TVM's GPU legalisation (LegalizeOps, FuseOps,
     FuseTIR, dlight): `main` becomes calls of scheduled PrimFuncs;
  2. lower the PrimFuncs with TVM's TIR pipeline; each host function's
     `call_ffi_kernel` statements give the kernels it launches, in order,
     with their buffer arguments (by name) and grid extents; the device
     functions become WGSL through TVM's webgpu codegen;
  3. interpret `main` (call_tir, in-place calls, reshapes, calls of a scan's
     functions, tuples) and record one compute dispatch per kernel launch.
     A scan's loop function (translate.py: it halves its range with Relax
     recursion) is run here as a loop over its body.
     The buffers a function allocates are ranges of one arena per function,
     placed by the memory plan of `vulkan_plan` and kept by the executable
     from run to run; only the outputs of `main` get buffers of their own.

Binding rules of TVM's WGSL: storage buffers are numbered in alphabetical
order of buffer name, then one uniform struct whose last field `packGridDimX`
is the number of workgroups in x minus one (a kernel returns early past it,
which is how a grid wider than the 65535-workgroup limit is folded into z).
Every storage buffer is bound read_write: WebGPU tracks usage per buffer, not
per range, and a dispatch that reads one range of an arena and writes another
would otherwise use one buffer as read-only and writable storage at once.
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

import numpy as np
import tvm
import tvm.ir.expr as irx

from dnir.errors import BackendError
from dnir.graph import Graph
from dnir.types import numpy_dtype

from .vulkan_plan import loop_body_of
from .vulkan_program import (MAX_WORKGROUPS, Dispatch, Program, Runner, _device, _round4,  # noqa: F401
                             adapter_info, has_f16, offset_alignment, shared_bytes)

# WGSL has no 64-bit types; bool tensors are stored as int32 (WGSL storage has no bool or i8).
# f16 needs the device's shader-f16 feature; WGSL has no bfloat16 at all.
DTYPES = frozenset({"f32", "i32", "bool"})


def dtypes() -> frozenset[str]:
    """The dtypes this machine's Vulkan device runs."""
    return DTYPES | ({"f16"} if has_f16() else set())


@dataclass
class Launch:
    kernel: str
    args: list            # host buffer name per storage binding, in binding order
    grid: tuple           # workgroups (x, y, z) before folding x into z
    pod: list             # the uniform's fields before packGridDimX: an int, or the name of the
                          # kernel's scalar parameter that holds the value (a scan's step index)


# ---------------------------------------------------------------------------
# Compilation


class VulkanExecutable:
    def __init__(self, graph: Graph):
        import tvm
        from tvm import relax, tirx
        from tvm.relax.backend.gpu_generic import pipeline as gpu

        from .tvm.compile import make_target
        from .tvm.translate import translate
        from .vulkan_plan import plan_functions

        target = make_target("webgpu")
        half = [f"{n} {t.dtype}" for n, t in zip(graph.input_names + graph.output_names,
                                                  graph.input_types + graph.output_types)
                if t.dtype == "bf16" or (t.dtype == "f16" and not has_f16())]
        if half:
            raise BackendError(f"vulkan: {', '.join(half)}: WGSL has no bfloat16, and f16 needs the device's "
                               f"shader-f16 (this one {'has' if has_f16() else 'lacks'} it); build the graph "
                               f"in f32 (or f16), or run it on cuda or llvm")
        mod = translate(graph, gpu=True, dtypes=dtypes(), target_name="vulkan", bool_as_int=True)
        with target:
            mod = tvm.transform.Sequential(gpu.legalize_passes(target))(mod)
        self.functions = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, relax.Function)}
        prims = {gv.name_hint: _unique_param_names(f)
                 for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}
        self.launches, self.wgsl = _lower_kernels(prims, target)
        # Kernel arguments are named by the PrimFunc's buffers.
        self.params = {name: [p.name for p in f.params] for name, f in prims.items()}
        self.plans = plan_functions(self.functions, offset_alignment())
        self.program = _Recorder(self).record(graph)
        self._runner = None

    @property
    def runner(self) -> Runner:
        """The program on this machine's Vulkan device, made on the first call."""
        if self._runner is None:
            self._runner = Runner(self.program)
        return self._runner

    @property
    def arena_bytes(self) -> dict[str, int]:
        """Function name -> bytes of its arena (the buffers it allocates that do not escape it)."""
        return {name: plan.arena_bytes for name, plan in self.plans.items()}

    @property
    def intermediate_bytes(self) -> dict[str, int]:
        """Function name -> bytes of every buffer it allocates: what one buffer per value holds."""
        return {name: plan.intermediate_bytes for name, plan in self.plans.items()}


def _unique_param_names(func):
    """The PrimFunc with one name per parameter. Kernels bind their arguments by name, and TVM
    shares one PrimFunc between structurally equal calls: `multiply` made for mul(y, y) also
    serves mul(x, y), both of its parameters named y. TVMScript's printer gives a repeated name
    a suffix (y, y_1), so printing and parsing the function names every parameter once."""
    names = [p.name for p in func.params]
    if len(set(names)) == len(names):
        return func
    from tvm.script import from_source

    renamed = from_source(func.script())
    if len({p.name for p in renamed.params}) != len(names):
        raise BackendError(f"vulkan: parameters {names} of a kernel function could not be named apart")
    return renamed


def _lower_kernels(prims: dict, target):
    """PrimFunc name -> [Launch], and kernel name -> WGSL source."""
    import tvm
    from tvm import tirx
    from tvm.tirx.build import split_host_device_mods
    from tvm.tirx.compilation_pipeline import finalize_device_passes

    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in prims.items()})
    mod = tirx.transform.BindTarget(target)(mod)
    pipeline, _, _ = tvm.tirx.get_default_tir_pipeline(target)
    lowered = pipeline(mod)
    _, device_mods = split_host_device_mods(lowered)
    sources = {}
    for dev_target, dev_mod in device_mods.items():
        built = tvm.get_global_func("target.build.webgpu")(finalize_device_passes()(dev_mod), dev_target)
        sources.update(_split_wgsl(built.inspect_source("")))
    launches = {}
    for gv, func in lowered.functions.items():
        if gv.name_hint in prims:
            launches[gv.name_hint] = [_launch(call, sources, gv.name_hint) for call in _kernel_calls(func.body, gv)]
    return launches, sources


def _kernel_calls(stmt, gv, in_loop=False) -> list:
    """call_ffi_kernel calls of a host function in program order."""
    if stmt is None:
        return []
    if type(stmt).__name__ == "Call":
        if stmt.op.name == "tirx.call_ffi_kernel":
            if in_loop:
                raise BackendError(f"vulkan: {gv.name_hint} launches kernels from a host loop; not supported")
            return [stmt]
        return []
    in_loop = in_loop or type(stmt).__name__ == "For"
    found = []
    for attr in ("seq", "body", "then_case", "else_case", "value"):
        child = getattr(stmt, attr, None)
        if child is None:
            continue
        for c in (child if attr == "seq" else [child]):
            found += _kernel_calls(c, gv, in_loop)
    return found


_HEADER = re.compile(r"^// Function: (\w+)\n//-+\n", re.M)


def _split_wgsl(source: str) -> dict:
    """The webgpu module's text holds every kernel after a '// Function: name' header."""
    parts = _HEADER.split(source)
    out = {}
    for name, text in zip(parts[1::2], parts[2::2]):
        if f"fn {name}(" in text:
            out[name] = text
    return out


_BINDING = re.compile(r"@binding\((\d+)\) var<storage, (?:read|read_write)> (\w+)_ptr")
_POD = re.compile(r"struct PODArgs \{([^}]*)\}")


def _launch(call, sources, func_name) -> Launch:
    kernel = call.args[0].value
    wgsl = sources.get(kernel)
    if wgsl is None:
        raise BackendError(f"vulkan: no WGSL for kernel {kernel} of {func_name}")
    bindings = sorted((int(i), name) for i, name in _BINDING.findall(wgsl))
    pod_fields = [f.split(":")[0].strip() for f in _POD.search(wgsl).group(1).split(",") if f.strip()]
    params = call.attrs.launch_params
    n_values = len(call.args) - 1 - len(params)
    values, extents = call.args[1:1 + n_values], [int(e) for e in call.args[1 + n_values:]]
    buffers = [str(v).removesuffix(".data") for v in values if str(v).endswith(".data")]
    pods = [v.name if isinstance(v, tvm.ir.expr.Var) else int(v) for v in values if not str(v).endswith(".data")]
    if [b[1] for b in bindings] != sorted(buffers) or len(pods) != len(pod_fields) - 1:
        raise BackendError(f"vulkan: kernel {kernel} arguments {buffers} do not match its bindings "
                           f"{[b[1] for b in bindings]}")
    grid = [1, 1, 1]
    for name, ext in zip(params, extents):
        if name.startswith("blockIdx."):
            grid["xyz".index(name[-1])] = ext
    return Launch(kernel, [b[1] for b in bindings], tuple(grid), pods)


# ---------------------------------------------------------------------------
# Execution


class _Tensor:
    __slots__ = ("buffer", "offset", "shape", "dtype")

    def __init__(self, buffer, offset, shape, dtype):
        self.buffer, self.offset = buffer, offset
        self.shape, self.dtype = tuple(int(d) for d in shape), str(dtype)

    @property
    def nbytes(self) -> int:
        return max(math.prod(self.shape) * np.dtype(self.dtype).itemsize, 4)


class _Recorder:
    """Interprets the legalised Relax functions once and records the Program a run is: buffers by
    index (each function's arena made once), constants, and one Dispatch per kernel launch."""

    def __init__(self, ex: VulkanExecutable):
        self.ex = ex
        self.program = Program(wgsl=dict(ex.wgsl))
        self.arenas = {}    # function name -> its arena buffer
        self.consts = {}    # id of a Relax constant -> its buffer

    def record(self, graph: Graph) -> Program:
        p = self.program
        args = []
        for t in graph.input_types:
            dtype = "int32" if t.dtype == "bool" else numpy_dtype(t.dtype).name
            x = _Tensor(p.buffer(max(math.prod(t.shape) * np.dtype(dtype).itemsize, 4)), 0, t.shape, dtype)
            p.inputs.append((x.buffer, list(x.shape), dtype))
            args.append(x)
        outs = self.call_function("main", args)
        p.outputs = [(o.buffer, o.offset, list(o.shape), o.dtype) for o in outs]
        used = {d.kernel for d in p.dispatches}
        p.wgsl = {k: v for k, v in p.wgsl.items() if k in used}
        return p

    def arena(self, name: str):
        """The function's arena, one buffer for the whole run: every call's blocks die within the call."""
        if name not in self.arenas:
            size = self.ex.plans[name].arena_bytes
            self.arenas[name] = self.program.buffer(size) if size else None
        return self.arenas[name]

    def dispatch(self, launch: Launch, tensors: dict):
        x, y, z = launch.grid
        last = x - 1    # the kernel's packGridDimX: its last block of the whole grid, folded or not
        if z == 1 and x > MAX_WORKGROUPS:
            x, z = MAX_WORKGROUPS, -(-x // MAX_WORKGROUPS)
        bindings = [(tensors[name].buffer, tensors[name].offset, _round4(tensors[name].nbytes))
                    for name in launch.args]
        pod = [tensors[p] if isinstance(p, str) else p for p in launch.pod]
        uniform = np.array(pod + [last], dtype=np.int32).tobytes()
        self.program.dispatches.append(Dispatch(launch.kernel, bindings, uniform, (x, y, z)))

    # interpretation of the legalised Relax functions
    def call_function(self, name: str, args: list, dests=None):
        """Run a function; `dests` are the (buffer, offset) its returned blocks go to, in the order of
        its plan's escapes (None: buffers of their own, for the outputs of `main`)."""
        func, plan = self.ex.functions[name], self.ex.plans[name]
        if loop_body_of(func) is not None:
            return self.run_loop(name, args, dests)
        arena = self.arena(name)

        def place(block):
            if not block.escapes:
                return arena, block.offset
            if dests is not None:
                return dests[plan.escapes.index(block)]
            return self.program.buffer(block.size), 0

        env = {p: a for p, a in zip(func.params, args)}
        for block in func.body.blocks:
            for binding in block.bindings:
                places = [place(b) for b in plan.defs.get(binding.var, ())]
                env[binding.var] = self.eval(binding.value, env, places)
        return self.eval(func.body.body, env)

    def run_loop(self, name: str, args: list, dests):
        """A scan's loop function, `name(lo, hi, carries, xs, consts, ys)`: its body for i in lo..hi-1.
        Each iteration's new carries go alternately to the loop's own blocks and to `dests`, so that
        none writes the buffers it reads and the last one writes `dests`."""
        func, plan = self.ex.functions[name], self.ex.plans[name]
        body, nc = loop_body_of(func), int(func.attrs["num_carry"])
        if dests is None:   # the outputs of main: buffers of their own
            dests = [(self.program.buffer(b.size), 0) for b in plan.escapes]
        arena = self.arena(name)
        own = [(arena, b.offset) for b in plan.blocks if not b.escapes]
        lo, hi, state = args[0], args[1], list(args[2:])
        ys_at = len(state) - (len(func.ret_ty.fields) - nc)
        out = None
        for i in range(lo, hi):
            out = self.call_function(body, [i] + state, dests if (hi - 1 - i) % 2 == 0 else own)
            state = out[:nc] + state[nc:ys_at] + out[nc:]
        return out

    def eval(self, expr, env, places=()):
        from tvm import relax
        if isinstance(expr, relax.Var):
            return env[expr]
        if type(expr).__name__ in _INDEX_OPS or isinstance(expr, tvm.tirx.IntImm):   # a scan's step index
            return _index(expr, env)
        if isinstance(expr, (irx.Constant, irx.GenericConst)):
            key = id(expr)
            if key not in self.consts:
                array = expr.value.numpy()
                array = array.astype(np.int32) if array.dtype == bool else array
                buffer = self.program.buffer(array.nbytes)
                self.program.consts[buffer] = array
                self.consts[key] = (expr, _Tensor(buffer, 0, array.shape, array.dtype.name))
            return self.consts[key][1]
        if isinstance(expr, relax.Tuple):
            return [self.eval(f, env) for f in expr.fields]
        if isinstance(expr, relax.TupleGetItem):
            return self.eval(expr.tuple_value, env)[expr.index]
        return self.call(expr, env, places)

    def call(self, expr, env, places):
        """Evaluate a call whose new buffers the plan placed at `places` ((buffer, offset) each)."""
        from tvm import relax
        if not isinstance(expr, irx.Call):
            raise BackendError(f"vulkan: cannot run Relax expression {type(expr).__name__}")
        op = expr.op
        if isinstance(op, relax.GlobalVar):
            return self.call_function(op.name_hint, [self.eval(a, env) for a in expr.args], places)
        name = op.name
        if name in ("relax.call_tir", "relax.call_tir_inplace"):
            gv, args = expr.args[0], [self.eval(a, env) for a in expr.args[1].fields]
            if name == "relax.call_tir_inplace":
                outs = [args[i] for i in expr.attrs.inplace_indices]
                self.run_prim(gv.name_hint, args)
            else:
                out_ty = expr.ty_args[0]
                types = list(out_ty.fields) if isinstance(out_ty, relax.TupleType) else [out_ty]
                outs = [_Tensor(buf, offset, t.shape, t.dtype) for (buf, offset), t in zip(places, types)]
                self.run_prim(gv.name_hint, args + outs)
            return outs[0] if len(outs) == 1 else outs
        if name == "relax.builtin.alloc_tensor":
            return _Tensor(*places[0], expr.ty.shape, expr.ty.dtype)
        if name == "relax.call_pure_packed" and expr.args[0].global_symbol == "vm.builtin.reshape":
            src = self.eval(expr.args[1], env)
            return _Tensor(src.buffer, src.offset, expr.args[2].values, src.dtype)
        if name == "relax.reshape":
            src = self.eval(expr.args[0], env)
            return _Tensor(src.buffer, src.offset, expr.ty.shape, src.dtype)
        raise BackendError(f"vulkan: cannot run Relax call {name}")

    def run_prim(self, name: str, args: list):
        tensors = dict(zip(self.ex.params[name], args))
        for launch in self.ex.launches[name]:
            self.dispatch(launch, tensors)


_INDEX_OPS = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "FloorDiv": operator.floordiv}


def _index(expr, env) -> int:
    """The value of an integer expression of the scalar parameters in `env` (a scan's step index)."""
    if isinstance(expr, tvm.tirx.IntImm):
        return int(expr.value)
    if type(expr).__name__ in _INDEX_OPS:
        return _INDEX_OPS[type(expr).__name__](_index(expr.a, env), _index(expr.b, env))
    return env[expr]


_EXECUTABLES: dict[str, VulkanExecutable] = {}


def build(graph: Graph) -> VulkanExecutable:
    from .tvm.compile import graph_hash
    key = graph_hash(graph)
    if key not in _EXECUTABLES:
        _EXECUTABLES[key] = VulkanExecutable(graph)
    return _EXECUTABLES[key]


def run_vulkan(graph: Graph, inputs) -> list[np.ndarray]:
    """Run on the first Vulkan adapter (a GPU if there is one, else lavapipe)."""
    from .numpy_backend import prepare_inputs
    arrays = prepare_inputs(graph, inputs)
    outs = build(graph).runner(arrays)
    return [o.astype(bool) if t.dtype == "bool" else o for o, t in zip(outs, graph.output_types)]
