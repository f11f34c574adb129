"""Run a dnir graph on ggml's CPU backend from Python.

`compile_ggml(graph)` lowers the graph once (lower.py) into a ggml graph,
places the inputs and constants in one backend buffer and every other
tensor with ggml's graph allocator (`ggml_gallocr`), whose buffer size is
the compute buffer llama.cpp reports; calling the result copies the inputs
in once, computes, and copies the outputs out once.
"""
from __future__ import annotations

import math
import os
import weakref

import numpy as np

from dnir.errors import BackendError
from dnir.graph import Graph
from dnir.lowering.numpy_backend import prepare_inputs
from dnir.types import numpy_dtype

from . import api
from .lower import STORAGE, Lowerer, input_values

_NUMPY = {api.F32: np.float32, api.I32: np.int32, api.F16: np.float16, api.BF16: numpy_dtype("bf16")}


class _Counter:
    """An emitter that only counts the tensors a lowering makes (to size ggml's context); it
    ignores comments and loop structure, as _Calls, which builds the graph, does."""

    def __init__(self):
        self.tensors = 0

    def call(self, fn, *args):
        self.tensors += 1
        return self.tensors

    def input(self, node, gtype, ne):
        return self.call("input")

    def constant(self, node, value, gtype, ne):
        return self.call("constant")

    def node(self, label):
        pass

    def loop_begin(self, count):
        pass

    def iteration(self, i):
        pass

    def loop_end(self):
        pass


class _Calls(_Counter):
    """An emitter that builds the graph through ggml's API. Inputs and constants go in
    `data_ctx` (allocated in a backend buffer after the lowering), the rest in `ctx`."""

    def __init__(self, lib, ctx, data_ctx, limit):
        self.lib, self.ctx, self.data_ctx, self.limit = lib, ctx, data_ctx, limit
        self.tensors = 0
        self.constants: dict[int, tuple[int, np.ndarray]] = {}   # id(node) -> (tensor, data)
        self.labels: dict[int, str] = {}      # tensor -> the dnir node it lowers (a profile's rows)
        self.label = ""

    def node(self, label):
        self.label = label

    def call(self, fn, *args):
        self.tensors += 1
        if self.tensors > self.limit:   # ggml would abort the process on a full context
            raise BackendError(f"ggml: the lowering made more than the {self.limit} tensors counted")
        tensor = getattr(self.lib, fn)(self.ctx, *args)
        self.labels[tensor] = self.label
        return tensor

    def _data_tensor(self, name, gtype, ne):
        t = self.lib.ggml_new_tensor_4d(self.data_ctx, gtype, *ne)
        self.lib.ggml_set_name(t, name.encode()[:63])
        return t

    def input(self, node, gtype, ne):
        t = self._data_tensor(node.attrs["name"], gtype, ne)
        self.lib.ggml_set_input(t)
        return t

    def constant(self, node, value, gtype, ne):
        if id(node) not in self.constants:    # a scan body's constant is made once for every step
            self.constants[id(node)] = (self._data_tensor(f"const{len(self.constants)}", gtype, ne), value)
        return self.constants[id(node)][0]


class GgmlGraph:
    """A dnir graph built as a ggml graph on the CPU backend, ready to run.

    `builder`, if given, builds the graph instead of the lowering: a function
    (ctx, input tensors) -> output tensors, such as the C function that
    export_c.py writes, compiled and loaded with ctypes.
    """

    def __init__(self, graph: Graph, threads: int | None = None, builder=None):
        if any(math.prod(n.shape) == 0 for n in graph.inputs):
            raise BackendError("ggml: a graph input has no elements (ggml has no empty tensors)")
        lib = api.lib()
        # The graph's signature, not the graph: compile_ggml keeps this object per graph in a weak
        # dictionary, which a reference back to its key would keep alive forever.
        self.signature, self._lib = Graph(graph.inputs, graph.outputs, graph.output_names), lib
        counter = _Counter()
        Lowerer(counter).lower(graph, input_values(counter, graph))
        n_data = len(graph.inputs) + sum(1 for _ in _const_nodes(graph))
        size = counter.tensors + 2 * len(graph.outputs) + 16
        held = self._held = {}     # what _free releases, filled as it is made
        held["ctx"] = lib.ggml_init(api.InitParams(size * lib.ggml_tensor_overhead()
                                                   + lib.ggml_graph_overhead_custom(size, False), None, True))
        held["data_ctx"] = lib.ggml_init(api.InitParams((n_data + 1) * lib.ggml_tensor_overhead(), None, True))
        self._finalizer = weakref.finalize(self, _free, lib, held)
        emitter = _Calls(lib, held["ctx"], held["data_ctx"], size - len(graph.outputs))
        self._inputs = input_values(emitter, graph)
        if builder is None:
            outputs = Lowerer(emitter).lower(graph, self._inputs)
            for v in outputs:
                lib.ggml_set_output(v.base)     # a view's memory must outlive the graph too
            self._outputs = [v.t for v in outputs]
        else:
            self._outputs = list(builder(held["ctx"], [v.t for v in self._inputs]))
        self.labels = emitter.labels
        self._cgraph = lib.ggml_new_graph_custom(held["ctx"], size, False)
        for t in self._outputs:
            lib.ggml_set_output(t)
            lib.ggml_build_forward_expand(self._cgraph, t)
        self.nodes = lib.ggml_graph_n_nodes(self._cgraph)

        self._backend = held["backend"] = lib.ggml_backend_cpu_init()
        lib.ggml_backend_cpu_set_n_threads(self._backend, threads or os.cpu_count() or 1)
        held["data_buffer"] = lib.ggml_backend_alloc_ctx_tensors(held["data_ctx"], self._backend)
        for t, value in emitter.constants.values():
            lib.ggml_backend_tensor_set(t, value.ctypes.data, 0, value.nbytes)
        galloc = held["galloc"] = lib.ggml_gallocr_new(lib.ggml_backend_get_default_buffer_type(self._backend))
        if not lib.ggml_gallocr_alloc_graph(galloc, self._cgraph):
            raise BackendError("ggml: the graph allocator could not place the graph")
        self.compute_buffer_bytes = lib.ggml_gallocr_get_buffer_size(galloc, 0)

    @property
    def cgraph(self):
        """ggml's graph (struct ggml_cgraph *), for tools that walk its nodes (benchmarks/ggml_profile.py)."""
        return self._cgraph

    @property
    def backend(self):
        return self._backend

    def set_threads(self, threads: int):
        """Compute on `threads` threads from the next call on (the default: every core)."""
        self._lib.ggml_backend_cpu_set_n_threads(self._backend, threads)

    def __call__(self, inputs) -> list[np.ndarray]:
        lib = self._lib
        for v, array in zip(self._inputs, prepare_inputs(self.signature, inputs)):
            data = np.ascontiguousarray(array, dtype=_NUMPY[v.gtype])
            lib.ggml_backend_tensor_set(v.t, data.ctypes.data, 0, data.nbytes)
        status = lib.ggml_backend_graph_compute(self._backend, self._cgraph)
        if status != 0:
            raise BackendError(f"ggml: computing the graph failed (ggml_status {status})")
        outs = []
        for t, out_type in zip(self._outputs, self.signature.output_types):
            out = np.empty(out_type.shape, dtype=_NUMPY[STORAGE[out_type.dtype]])
            lib.ggml_backend_tensor_get(t, out.ctypes.data, 0, out.nbytes)
            outs.append(out != 0 if out_type.dtype == "bool" else out)
        return outs


def _free(lib, held):
    for key, free in (("galloc", lib.ggml_gallocr_free), ("data_buffer", lib.ggml_backend_buffer_free),
                      ("backend", lib.ggml_backend_free), ("data_ctx", lib.ggml_free), ("ctx", lib.ggml_free)):
        if held.get(key):
            free(held[key])


def _const_nodes(graph: Graph):
    for node in graph.topo_order():
        if node.op == "const":
            yield node
        elif node.op == "scan":
            yield from _const_nodes(node.attrs["body"])


_COMPILED: "weakref.WeakKeyDictionary[Graph, GgmlGraph]" = weakref.WeakKeyDictionary()


def compile_ggml(graph: Graph) -> GgmlGraph:
    """The graph lowered to ggml, kept per graph object for later calls."""
    compiled = _COMPILED.get(graph)
    if compiled is None:
        compiled = _COMPILED[graph] = GgmlGraph(graph)
    return compiled


def run_ggml(graph: Graph, inputs) -> list[np.ndarray]:
    """Run `graph` on ggml's CPU backend; outputs as NumPy arrays."""
    return compile_ggml(graph)(inputs)
