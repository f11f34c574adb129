"""A dnir graph as a self-contained C function that builds it with ggml.

`export_c(graph, name)` runs the same lowering as the ggml backend (lower.py)
with an emitter that writes each ggml call as one C statement, under a
comment naming the dnir node it lowers (its number and op, as `dnir print`
shows the graph, and the pass that made it: passes/manager.made_by). The function builds the graph in a caller's
`ggml_context` from the caller's input tensors, as llama.cpp's graph
builders do:

    void NAME(struct ggml_context * ctx, struct ggml_tensor * q, ...,
              struct ggml_tensor ** out_o, ...);

Inputs are contiguous tensors of the graph's shapes in ggml's order (a NumPy
[B, T, H, K] input is ggml [K, H, T, B]; an input of more than 4 axes is
flat; bool inputs are f32 0/1). The shapes are the graph's own: a scan is
unrolled, so the function is written for one T and B; it asserts them.
export_symbolic.py writes a layer for any T and B instead. The caller allocates the graph (e.g.
ggml_gallocr) and computes it; the outputs are marked as outputs.
"""
from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from dnir.errors import BackendError
from dnir.graph import Graph
from dnir.types import type_str

from .api import SIGNATURES, TRI_NAMES, TYPE_NAMES
from .build import ggml_build
from .lower import Lowerer, input_values

_TYPE_ARG = {"ggml_cast": 1, "ggml_new_tensor_1d": 0, "ggml_new_tensor_2d": 0, "ggml_new_tensor_3d": 0,
             "ggml_new_tensor_4d": 0}   # which argument (after ctx) is an enum ggml_type


class _Source:
    """An emitter that writes the lowering's ggml calls as C statements."""

    def __init__(self):
        self.lines: list[str] = []
        self.tensors = 0
        self.label = ""

    def call(self, fn, *args):
        name = f"t{self.tensors}"
        self.tensors += 1
        text = ", ".join(["ctx"] + [_arg(fn, i, kind, a) for i, (kind, a) in enumerate(zip(SIGNATURES[fn], args))])
        self.lines.append(f"    struct ggml_tensor * {name} = {fn}({text});")
        return name

    def input(self, node, gtype, ne):
        return c_name(node.attrs["name"])

    def constant(self, node, value, gtype, ne):
        raise BackendError(f"ggml-c export: node {self.label}: a const of {value.size} differing values "
                           f"has no ggml graph op (ggml fills one value); make it a graph input")

    def node(self, label):
        self.label = label
        self.lines.append(f"    // {label}")

    def loop_begin(self, count):     # a graph of one T and B: its loops stay unrolled
        pass

    def iteration(self, i):
        pass

    def loop_end(self):
        pass


_C_WORDS = set("""auto bool break case char const continue default do double else enum extern false float for goto
    if inline int long register restrict return short signed sizeof static struct switch true typedef union
    unsigned void volatile while ctx""".split())


def c_name(name: str) -> str:
    """An input's parameter name: its own, unless C or the function's other names take it."""
    clash = name in _C_WORDS or name.startswith("out_") or (name[:1] == "t" and name[1:].isdigit())
    return f"in_{name}" if clash else name


def _arg(fn, index, kind, value) -> str:
    if kind == "T":
        return value
    if kind == "i" and _TYPE_ARG.get(fn) == index:
        return TYPE_NAMES[value]
    if kind == "i" and fn == "ggml_tri" and index == 1:
        return TRI_NAMES[value]
    if kind == "b":
        return "true" if value else "false"
    if kind == "f":
        text = str(np.float32(value))          # the shortest text that reads back as this float32
        return {"inf": "INFINITY", "-inf": "-INFINITY", "nan": "NAN"}.get(text, text + "f")
    return str(int(value))


def lower_for_export(emitter, graph: Graph):
    """(input values, (output view, the tensor owning its memory) per output): the graph lowered
    through `emitter`, each output viewed in its own shape (flat beyond 4 axes)."""
    lowerer = Lowerer(emitter)
    inputs = input_values(emitter, graph)
    outputs = lowerer.lower(graph, inputs)
    emitter.node("outputs in the graph's shapes")
    return inputs, [(lowerer.view(v, v.shape if len(v.shape) <= 4 else (math.prod(v.shape),)), v.base)
                    for v in outputs]


def export_c(graph: Graph, name: str = "build_graph", source: str | None = None) -> str:
    """C source of a function `name` that builds `graph` with ggml (see the module docstring)."""
    if not name.isidentifier():
        raise BackendError(f"ggml-c export: function name {name!r} is not a C identifier")
    emitter = _Source()
    inputs, outputs = lower_for_export(emitter, graph)
    results = [(out_name, view, base) for out_name, (view, base) in zip(graph.output_names, outputs)]

    params = ["struct ggml_context * ctx"]
    checks = []
    for v, node in zip(inputs, graph.inputs):
        params.append(f"struct ggml_tensor * {v.t} /* {type_str(node.type)} */")
        same = " && ".join(f"{v.t}->ne[{i}] == {d}" for i, d in enumerate(v.ne))
        checks.append(f"    GGML_ASSERT({same} && ggml_is_contiguous({v.t}));")
    for out_name, _, _ in results:
        params.append(f"struct ggml_tensor ** out_{out_name}")
    lines = [
        f"// {name}: built by dnir from {source or 'a dnir graph'}; one statement per ggml call, each",
        "// under a comment naming the dnir node (%N = op, numbered as `dnir print` numbers them).",
        f"// Inputs: {', '.join(f'{n} {type_str(t)}' for n, t in zip(graph.input_names, graph.input_types))}"
        " (NumPy order; ggml order reversed).",
        f"// Outputs: {', '.join(f'{n} {type_str(t)}' for n, t in zip(graph.output_names, graph.output_types))}.",
        "#include <math.h>",
        "#include <stdbool.h>",
        '#include "ggml.h"',
        "",
        f"void {name}({(',' + chr(10) + '        ').join(params)}) {{",
        *checks,
        *emitter.lines,
    ]
    for out_name, t, base in results:
        lines.append(f"    ggml_set_output({base});" if base != t else "")
        lines.append(f"    ggml_set_output({t});")
        lines.append(f"    *out_{out_name} = {t};")
    lines.append("}")
    return "\n".join(line for line in lines if line != "") + "\n"


def compile_c(source_path, library_path) -> Path:
    """Compile an exported C file against this machine's ggml build into a shared library."""
    build = ggml_build()
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BackendError("compiling the exported C needs a C compiler (cc or gcc on PATH, or set CC)")
    cmd = [cc, "-O2", "-fPIC", "-shared", f"-I{build.include_dir}", str(source_path), "-o", str(library_path),
           f"-L{build.lib_dir}", "-lggml", "-lggml-base", f"-Wl,-rpath,{build.lib_dir}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise BackendError(f"compiling {source_path} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return Path(library_path)


def load_builder(library_path, name: str, graph: Graph, sizes: tuple[int, ...] = ()):
    """The compiled function `name` as a builder for run.GgmlGraph: (ctx, input tensors) -> output tensors.
    `sizes`: the values of a symbolic export's size parameters (n_tokens, n_seqs) for `graph`."""
    fn = getattr(ctypes.CDLL(str(library_path)), name)
    fn.restype = None
    fn.argtypes = ([ctypes.c_void_p] * (1 + len(graph.inputs)) + [ctypes.c_int64] * len(sizes)
                   + [ctypes.POINTER(ctypes.c_void_p)] * len(graph.outputs))

    def build(ctx, inputs):
        outs = [ctypes.c_void_p() for _ in graph.outputs]
        fn(ctx, *inputs, *sizes, *[ctypes.byref(o) for o in outs])
        return [o.value for o in outs]
    return build
