"""Compile dnir graphs with TVM for `llvm` and `cuda`, with a cache of executables.

The cache key is the hash of the graph's printed text (which includes every
type and attribute) and the target, so structurally equal graphs built twice
share one executable.

On llvm, `run_llvm` also keeps the compiled library on disk, in
`$DNIR_CACHE/tvm` (lowering/module_cache.py: keyed by the graph's hash, the
target with the host CPU, TVM's version and the sources of the kernels,
schedules and target passes): a second process loads it instead of compiling.
Arrays cross into TVM without a copy where TVM's kernels can read
them in place (contiguous, 64-byte aligned, or any alignment for an input that
only a kernel declared for it reads: a decode step's state) and the outputs come back as NumPy
views of TVM's tensors; an unaligned input is copied into an aligned buffer kept
for the next call (fresh memory costs a page fault per page: for a decode
step's 128 MiB state at B = 64 that was 56 ms, the step itself 10 ms).
"""
from __future__ import annotations

import threading
import warnings
import weakref
from pathlib import Path

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from dnir.errors import BackendError
from dnir.graph import Graph
from dnir.lowering.module_cache import graph_hash, module_path, write_atomically
from dnir.lowering.vulkan_program import shared_bytes as vulkan_shared_bytes
from dnir.types import numpy_dtype

from . import cpu_chunk_layer, cpu_token_step
from .translate import translate

DEFAULT_CUDA_ARCH = "sm_90"
_CACHE: dict[tuple[str, str], object] = {}
_VMS: dict[str, object] = {}          # library name -> its VM (loading a library runs no compiler)
_GRAPH_VMS: "weakref.WeakKeyDictionary[Graph, object]" = weakref.WeakKeyDictionary()   # no hashing per call
_LOCK = threading.Lock()
ALIGNMENT = 64      # bytes: TVM's compiled kernels assume tensors this aligned
_ARRAY_GET = tvm_ffi._ffi_api.ArrayGetItem


def make_target(target: str, arch: str = DEFAULT_CUDA_ARCH) -> tvm.target.Target:
    if target == "llvm":
        return tvm.target.Target(_llvm_target())
    if target == "cuda":
        # Always give arch: plain "cuda" means sm_50, which current nvcc rejects.
        return tvm.target.Target({"kind": "cuda", "arch": arch}, host=_llvm_target())
    if target == "webgpu":
        # the Vulkan device's workgroup memory: TVM checks kernels against it (its default is 32 KiB)
        return tvm.target.Target({"kind": "webgpu", "max_shared_memory_per_block": vulkan_shared_bytes()},
                                 host=_llvm_target())
    raise BackendError(f"unknown TVM target {target!r}; expected llvm, cuda or webgpu")


def _llvm_target() -> dict:
    """The host CPU by name ("-mcpu=native" is rejected by this LLVM), so LLVM uses its vector units."""
    from tvm.target.codegen import llvm_get_system_cpu
    return {"kind": "llvm", "mcpu": llvm_get_system_cpu(), "num-cores": _cores()}


def _cores() -> int:
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def relax_pipeline(target: tvm.target.Target):
    """TVM's default pipeline, with dnir's CPU schedules after fusion on llvm."""
    if target.kind.name != "llvm":
        return "default"  # LegalizeOps, FuseOps, FuseTIR, dlight GPU rules
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from .cpu_schedule import schedule_cpu

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            passes = (cpu.library_dispatch_passes(target) + cpu.legalize_passes(target) + [_serial_small_kernels()]
                      + [schedule_cpu(target)] + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))
            return tvm.transform.Sequential(passes)(mod)
    return _pipeline


# A kernel of at most this many loop iterations runs on one thread, as TVM writes it (LLVM
# vectorizes its loops): a parallel launch costs more than its work. A decode step at B = 1 has
# six such kernels (its vectors: exp of the gate, the rows times the decay, q . k, 4096 elements
# each) in front of token_step, with 19 parallel regions among them.
SERIAL_ITERATIONS = 1 << 15


def _serial_small_kernels():
    from tvm import s_tir

    @tvm.transform.module_pass(opt_level=0, name="dnir.SerialSmallKernels")
    def _pass(mod, _ctx):
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs is not None and "tirx.is_scheduled" in func.attrs):
                continue
            if _iterations(s_tir.Schedule(func)) <= SERIAL_ITERATIONS:
                mod[gv] = func.with_attr("tirx.is_scheduled", True)
        return mod
    return _pass


def _iterations(sch) -> int:
    """The loop iterations of a function's blocks together (more than SERIAL_ITERATIONS where a
    loop's extent is not a constant, or the function has no root block)."""
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except Exception:  # noqa: BLE001 - no block structure: left to the schedule
        return SERIAL_ITERATIONS + 1
    total = 0
    for block in blocks:
        n = 1
        for loop in sch.get_loops(block):
            extent = sch.get(loop).extent
            if not isinstance(extent, tvm.tirx.IntImm):
                return SERIAL_ITERATIONS + 1
            n *= int(extent)
        total += n
    return total


def build(graph: Graph, target: str = "llvm", arch: str = DEFAULT_CUDA_ARCH):
    """The compiled `relax.VMExecutable` for a graph (cached by graph hash and target)."""
    tgt = make_target(target, arch)
    key = (graph_hash(graph), str(tgt))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    mod = translate(graph, gpu=target != "llvm", target_name=target)
    ex = tvm.compile(mod, tgt, relax_pipeline=relax_pipeline(tgt))
    with _LOCK:
        _CACHE[key] = ex
    return ex


def cuda_source(ex) -> str:
    """The CUDA C source inside a module built for the cuda target."""
    mod = _find_module(ex.mod, "cuda")
    if mod is None:
        raise BackendError("the executable holds no CUDA module")
    return mod.inspect_source("")


def _find_module(mod, kind):
    if mod.kind == kind:
        return mod
    for sub in mod.imports:
        found = _find_module(sub, kind)
        if found is not None:
            return found
    return None


def library_path(graph: Graph) -> Path:
    """Where the llvm library of `graph` is kept between processes."""
    return module_path(graph, str(make_target("llvm")))


def _llvm_vm(graph: Graph):
    """The VM running `graph` on the CPU: its library loaded from the disk cache, compiled and
    exported there first when missing (kept in memory only, with a warning, when it cannot be
    written)."""
    with _LOCK:
        vm = _GRAPH_VMS.get(graph)
    if vm is not None:
        return vm
    path = library_path(graph)
    with _LOCK:
        vm = _VMS.get(path.name)
    if vm is not None:
        _GRAPH_VMS[graph] = vm
        return vm
    if path.exists():
        module = tvm.runtime.load_module(str(path))
    else:
        module = build(graph, "llvm")
        try:
            write_atomically(path, module.export_library)
        except Exception as e:  # noqa: BLE001 - no compiler or no space: run from memory, say so
            warnings.warn(f"dnir: the compiled module is not kept in {path.parent} ({e}); "
                          f"the next process compiles it again", RuntimeWarning, stacklevel=3)
    with _LOCK:
        # Loading an executable runs LLVM's code generation: keep one VM per library.
        vm = _GRAPH_VMS[graph] = _VMS.setdefault(path.name, relax.VirtualMachine(module, tvm.cpu()))
    return vm


def _aligned_empty(shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def unaligned_inputs(graph: Graph) -> frozenset[int]:
    """The graph inputs (by position) that only kernels reading any 4-byte alignment read."""
    readers: dict[int, set] = {id(x): set() for x in graph.inputs}
    for node in graph.topo_order():
        for k, operand in enumerate(node.inputs):
            if id(operand) in readers:
                readers[id(operand)].add((node.op, k))
    for out in graph.outputs:
        if id(out) in readers:
            readers[id(out)].add(("output", 0))
    tolerant = {(op, k) for op, ks in cpu_token_step.UNALIGNED_OPERANDS.items() for k in ks}
    return frozenset(i for i, x in enumerate(graph.inputs) if readers[id(x)] and readers[id(x)] <= tolerant) \
        | cpu_chunk_layer.loose_inputs(graph)


def _tensor_of(a: np.ndarray):
    """A TVM tensor on a's memory. DLPack has no bfloat16 for NumPy (ml_dtypes'): its bits cross
    as uint16 and TVM views them as bfloat16."""
    if a.dtype.name == "bfloat16":
        t = tvm_ffi.from_dlpack(a.view(np.uint16), require_alignment=0)
        return t._create_view(t.shape, "bfloat16")
    return tvm_ffi.from_dlpack(a, require_alignment=0)


def _array_of(t) -> np.ndarray:
    """A NumPy view of a TVM tensor (bfloat16 as ml_dtypes' bfloat16)."""
    if t.dtype == "bfloat16":
        return np.from_dlpack(t._create_view(t.shape, "uint16")).view(numpy_dtype("bf16"))
    return np.from_dlpack(t)


def run_llvm(graph: Graph, inputs) -> list[np.ndarray]:
    """Run on the CPU through TVM's LLVM backend; outputs as NumPy arrays."""
    from dnir.lowering.numpy_backend import prepare_inputs
    return llvm_call(graph)(prepare_inputs(graph, inputs))[0]


class LlvmCall:
    """`graph`'s compiled module, ready to run on arrays already checked against the graph's
    inputs (in its input order and dtypes): what a call does beyond running the module is kept
    out of the per-call path (the functional API's decode step, 50 us of kernel at B = 1, took
    0.3 ms through run_llvm). Returns (outputs, checks): checks[i] holds the kernel's checks of
    output i where the module computes them (a decode step's new state: token_step's column sums,
    decode_step's three-number report; cpu_token_step.checked_outputs)."""

    def __init__(self, graph: Graph):
        vm = _llvm_vm(graph)
        self.main = vm["main"]
        self.step = _DirectStep.of(graph, vm)
        loose = unaligned_inputs(graph)
        # per input: the alignment it must have (bytes), and whether it is bfloat16
        self.align = [ALIGNMENT if i not in loose else x.type.itemsize for i, x in enumerate(graph.inputs)]
        self.bf16 = [x.dtype == "bf16" for x in graph.inputs]
        self.count = len(graph.outputs)
        self.checked = cpu_token_step.checked_outputs(graph)
        kinds = [out.dtype == "bf16" for out in graph.outputs] + [False] * len(self.checked)
        self.out_bf16 = kinds
        # outputs that may be an input or a view of one (reshapes of it) are looked at every call
        self.may_alias = [i for i, out in enumerate(graph.outputs) if not _fresh(out)]
        self.spare: list[dict[int, np.ndarray]] = []     # input position -> aligned buffer, per set

    def __call__(self, arrays, state_into: np.ndarray | None = None) -> tuple[list[np.ndarray], dict[int, np.ndarray]]:
        """state_into: a writable C-contiguous array of the new state's shape and dtype, which a
        graph of one decode_step (_DirectStep) takes as that result (the state updated in place:
        the initial state itself, or any other); other graphs return a new state as always."""
        # aligned copies of the inputs that need them, one set per call in flight (a list's pop
        # and append are atomic: two threads never share a set)
        spare = self.spare.pop() if self.spare else {}
        tensors, staged = [], []
        try:
            for i, (a, align, bf16) in enumerate(zip(arrays, self.align, self.bf16)):
                if not a.flags.c_contiguous:
                    a = np.ascontiguousarray(a)
                if not a.size:
                    tensors.append(tvm.runtime.empty(a.shape, a.dtype.name))
                    continue
                t = _tensor_of(a) if bf16 else tvm_ffi.from_dlpack(a, require_alignment=0)
                if t.data_ptr() % align:
                    buffer = spare.get(i)
                    if buffer is None or buffer.shape != a.shape or buffer.dtype != a.dtype:
                        buffer = spare[i] = _aligned_empty(a.shape, a.dtype)
                    np.copyto(buffer, a)
                    staged.append(buffer)
                    t = _tensor_of(buffer) if bf16 else tvm_ffi.from_dlpack(buffer, require_alignment=0)
                tensors.append(t)
            if self.step is not None and state_into is not None:
                results = self.step(tensors, state_into)
            else:   # the results by index (tvm_ffi's Array iterates through Python: 2 us more per call)
                found = self.main(*tensors)
                results = [_array_of(_ARRAY_GET(found, i)) if bf16 else np.from_dlpack(_ARRAY_GET(found, i))
                           for i, bf16 in enumerate(self.out_bf16)]
            # an output that is an input or its view (a reshape) is copied: it must share no memory
            # with the caller's arrays or with a buffer kept for reuse
            for i in self.may_alias:
                if any(np.may_share_memory(results[i], b) for b in list(arrays) + staged):
                    results[i] = results[i].copy()
        finally:
            self.spare.append(spare)
        return results[:self.count], dict(zip(self.checked, results[self.count:]))


class _DirectStep:
    """A graph that is one decode_step on its own inputs, its outputs that step's results (through
    reshapes), can write its new state into a given array: the kernel is called on that array and
    on o and the report allocated here. In place (the initial state given as the new one) the
    step's kernel reads and writes each element of the state in the same iteration, one tile of
    columns at a time, so the update is safe; at B = 1 it took 36 us against 55-78 us into a new
    array (half the memory touched). A new state is left to the VM's main: NumPy's fresh 2 MiB
    page-faults in every call (120 us against 100), and even a reused one, with o and the report
    allocated here, made the call 12 us slower than the VM's."""

    def __init__(self, kernel, operands: list[int], results: list[tuple], outputs: list[tuple]):
        self.kernel, self.operands, self.results, self.outputs = kernel, operands, results, outputs

    @staticmethod
    def of(graph: Graph, vm) -> "_DirectStep | None":
        found = cpu_token_step.lone_step(graph)
        if found is None or any(x.op != "input" for x in found[0].inputs):
            return None
        step, outputs = found
        try:
            kernel = vm.module.imports[0].get_function(step.op)
        except Exception:  # noqa: BLE001 - a library without that symbol runs through its main
            return None
        position = {id(x): i for i, x in enumerate(graph.inputs)}
        # the kernel's results, aligned as TVM would allocate them: the new state, o, the report
        results = [(t.shape, numpy_dtype(t.dtype)) for t in step.type]
        results.append(((len(cpu_token_step.REPORT),), numpy_dtype(step.inputs[0].dtype)))
        return _DirectStep(kernel, [position[id(x)] for x in step.inputs], results, outputs)

    def __call__(self, tensors, state: np.ndarray) -> list[np.ndarray]:
        if (state.shape, state.dtype) != self.results[0] or not state.flags.c_contiguous:
            raise BackendError(f"decode_step writes a {self.results[0]} state; got {state.dtype} {list(state.shape)}")
        made = [state] + [_aligned_empty(shape, dtype) for shape, dtype in self.results[1:]]
        self.kernel(*[tensors[i] for i in self.operands],
                    *[tvm_ffi.from_dlpack(a, require_alignment=0) for a in made])
        return ([made[i] if made[i].shape == shape else made[i].reshape(shape) for i, shape in self.outputs]
                + made[-1:])    # then the report


# dnir's fused ops (dnir/fused.py): one kernel each, whose results TVM allocates
_KERNEL_OPS = ("token_step", "decode_step", "chunk_scan", "chunk_states", "chunk_output", "intra_chunk")


def _fresh(node) -> bool:
    """Whether a graph output is a new tensor of a fused op's kernel (or a reshape of one): memory
    that no input shares."""
    while node.op == "reshape":
        node = node.inputs[0]
    return node.op == "item" and node.inputs[0].op in _KERNEL_OPS


_CALLS: "weakref.WeakKeyDictionary[Graph, LlvmCall]" = weakref.WeakKeyDictionary()


def llvm_call(graph: Graph) -> LlvmCall:
    """The LlvmCall of `graph` (made once per graph object)."""
    call = _CALLS.get(graph)
    if call is None:
        call = LlvmCall(graph)
        with _LOCK:
            call = _CALLS.setdefault(graph, call)
    return call
