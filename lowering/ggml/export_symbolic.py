"""A layer as a ggml C function parametric in its sequence length and batch.

A dnir graph has static shapes; a layer is a family of graphs, one per (T, B).
`export_symbolic` lowers the family at a few sizes (the samples) with an emitter
that traces the ggml calls, checks that every sample makes the same calls on the
same tensors, and writes each integer argument (sizes, strides, offsets) as the
polynomial in the sizes that gives it at every sample: coefficients fitted on the
samples, then checked exactly at each. The unrolled loop over chunks (or over a
scan's steps) becomes a C `for` loop whose arguments are polynomials in its index
too; a tensor one iteration hands to the next is a variable declared before the
loop. The function takes `n_tokens` and `n_seqs`, as llama.cpp's graph builders
take theirs, and asserts the range the samples cover.

The sizes are n_chunks = n_tokens / chunk (a chunked layer: every size is a
polynomial in the number of chunks), n_tokens (a recurrent layer) and n_seqs;
a size that is no such polynomial (a pad to whole chunks, say) makes the export
fail, naming the call, and the layer is exported for its own shapes instead.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field

import numpy as np

from dnir.errors import BackendError
from dnir.graph import Graph

from .api import SIGNATURES
from .export_c import _arg, _Source, lower_for_export

# The symbols a size may depend on, and their names in C.
C_NAMES = {"u": "n_chunks", "t": "n_tokens", "B": "n_seqs", "i": "i"}


class _Handle:
    """A tensor a traced call made (compared by identity)."""
    __slots__ = ()


@dataclass
class _Call:
    handle: _Handle
    fn: str
    args: tuple


@dataclass
class _Loop:
    count: int
    iterations: list = field(default_factory=list)   # each a list of entries


class _Trace(_Source):
    """An emitter that records the lowering's calls, comments and loops (its inputs and constants
    as export_c's)."""

    def __init__(self):
        super().__init__()
        self.entries: list = []
        self.current = self.entries
        self.loops: list = []

    def call(self, fn, *args):
        handle = _Handle()
        self.current.append(_Call(handle, fn, args))
        return handle

    def node(self, label):
        self.label = label
        self.current.append(label)

    def loop_begin(self, count):
        if self.loops:
            raise BackendError("ggml-c export: a loop inside an unrolled loop has no symbolic form here")
        self.loops.append((_Loop(count), self.current))
        self.current.append(self.loops[-1][0])

    def iteration(self, i):
        loop = self.loops[-1][0]
        loop.iterations.append([])
        self.current = loop.iterations[-1]

    def loop_end(self):
        self.current = self.loops.pop()[1]


def fit(points: list[tuple[dict, int]], symbols: tuple[str, ...]) -> dict[tuple, int] | None:
    """Integer coefficients of monomials (of degree <= 2, none squared) in `symbols` giving every
    point's value exactly, or None. points: (symbol values, value)."""
    monomials = [()] + [(s,) for s in symbols] + list(itertools.combinations(symbols, 2))
    columns = [np.array([math.prod(env[s] for s in m) for env, _ in points], dtype=float) for m in monomials]
    chosen: list[int] = []
    for j in range(len(monomials)):        # the monomials the points tell apart
        trial = np.stack([columns[c] for c in chosen + [j]], axis=1)
        if np.linalg.matrix_rank(trial) > len(chosen):
            chosen.append(j)
    a = np.stack([columns[c] for c in chosen], axis=1)
    y = np.array([v for _, v in points], dtype=float)
    solution = np.linalg.lstsq(a, y, rcond=None)[0]
    coeffs = {monomials[c]: int(round(x)) for c, x in zip(chosen, solution) if round(x) != 0}
    exact = all(sum(k * math.prod(env[s] for s in m) for m, k in coeffs.items()) == v for env, v in points)
    return coeffs if exact else None


def c_expression(coeffs: dict[tuple, int]) -> str:
    if not coeffs:
        return "0"
    terms = []
    for m, k in sorted(coeffs.items(), key=lambda mk: (len(mk[0]), mk[0])):
        names = [C_NAMES[s] for s in m]
        if not names:
            terms.append(str(k))
        else:
            terms.append("*".join(([] if k == 1 else ["-" if k == -1 else str(k)]) + names).replace("-*", "-"))
    return " + ".join(terms).replace("+ -", "- ")


class _Writer:
    """Walks the aligned traces of every sample and writes one C statement per call."""

    def __init__(self, symbols):
        self.symbols = symbols
        self.lines: list[str] = []
        self.fresh = 0
        self.loops = 0

    def name(self, prefix="t") -> str:
        self.fresh += 1
        return f"{prefix}{self.fresh - 1}"

    def walk(self, blocks, envs, names, indent="    ", symbols=None):
        """blocks: one list of entries per point (sample, or sample and iteration), aligned."""
        symbols = symbols or self.symbols
        if len({len(b) for b in blocks}) != 1:
            raise BackendError("ggml-c export: the sizes give different numbers of ggml calls; the graph's "
                               "structure depends on T or B")
        for k, entries in enumerate(zip(*blocks)):
            first = entries[0]
            if isinstance(first, str):     # in a loop, the label of iteration 0 with its number as i
                label = re.sub(r"\b(chunk|step) 0\b", r"\1 i", first) if "i" in symbols else first
                self.lines.append(f"{indent}// {label}")
            elif isinstance(first, _Loop):
                self.loop(entries, blocks, k, envs, names, indent)
            else:
                self.call(entries, envs, names, indent, symbols)

    def call(self, calls, envs, names, indent, symbols):
        fn, kinds = calls[0].fn, SIGNATURES[calls[0].fn]
        if any(not isinstance(c, _Call) or c.fn != fn for c in calls):
            raise BackendError(f"ggml-c export: the sizes give different calls where one makes {fn}")
        args = []
        for a, kind in enumerate(kinds):
            values = [c.args[a] for c in calls]
            if kind == "T":
                refs = {n.get(v, v) for n, v in zip(names, values)}     # a handle, or an input's name
                if len(refs) != 1 or not all(isinstance(r, str) for r in refs):
                    raise BackendError(f"ggml-c export: argument {a} of {fn} is a different tensor at different sizes")
                args.append(refs.pop())
            elif kind in "iIz" and len(set(values)) > 1:
                coeffs = fit(list(zip(envs, values)), symbols)
                if coeffs is None:
                    raise BackendError(f"ggml-c export: argument {a} of {fn} ({sorted(set(values))[:4]}...) is no "
                                       f"polynomial in {', '.join(C_NAMES[s] for s in symbols)}")
                args.append(c_expression(coeffs))
            elif len(set(values)) > 1:
                raise BackendError(f"ggml-c export: argument {a} of {fn} differs with the sizes: {values[:4]}")
            else:
                args.append(_arg(fn, a, kind, values[0]))
        result = self.name("b" if "i" in symbols else "t")
        for n, c in zip(names, calls):
            n[c.handle] = result
        self.lines.append(f"{indent}struct ggml_tensor * {result} = {fn}({', '.join(['ctx'] + args)});")

    def loop(self, loops, blocks, k, envs, names, indent):
        if any(not isinstance(lp, _Loop) for lp in loops) or min(lp.count for lp in loops) < 2:
            raise BackendError("ggml-c export: a loop of fewer than 2 iterations at some size")
        count = fit([(env, lp.count) for env, lp in zip(envs, loops)], self.symbols)
        if count is None:
            raise BackendError("ggml-c export: a loop's trip count is no polynomial in the sizes")
        self.loops += 1
        var = f"c{self.loops}_"
        # Tensors one iteration hands to the next: an argument of iteration 1 made by iteration 0.
        first, second = loops[0].iterations[0], loops[0].iterations[1]
        made = {e.handle: j for j, e in enumerate(first) if isinstance(e, _Call)}
        carried: dict[int, list] = {}      # position in the body -> the tensor before the loop, per sample
        for j, e in enumerate(second):
            if not isinstance(e, _Call):
                continue
            for a, v in enumerate(e.args):
                if isinstance(v, _Handle) and v in made:
                    carried.setdefault(made[v], [lp.iterations[0][j].args[a] for lp in loops])
        later = _refs([b[k + 1:] for b in blocks])
        used_after = sorted(j for j, e in enumerate(loops[0].iterations[-1]) if isinstance(e, _Call) and e.handle in later)
        for j in sorted(set(carried) | set(used_after)):
            start = names[0].get(carried[j][0], carried[j][0]) if j in carried else "NULL"
            self.lines.append(f"{indent}struct ggml_tensor * {var}{j} = {start};")
        self.lines.append(f"{indent}for (int64_t i = 0; i < {c_expression(count)}; i++) {{")
        points, point_names, point_envs = [], [], []
        for sample, (lp, n, env) in enumerate(zip(loops, names, envs)):
            for i, body in enumerate(lp.iterations):
                inner = dict(n)
                for j, starts in carried.items():
                    before = starts[sample] if i == 0 else lp.iterations[i - 1][j].handle
                    inner[before] = f"{var}{j}"
                points.append(body)
                point_names.append(inner)
                point_envs.append({**env, "i": i})
        self.walk(points, point_envs, point_names, indent + "    ", self.symbols + ("i",))
        for j in sorted(set(carried) | set(used_after)):
            self.lines.append(f"{indent}    {var}{j} = {point_names[0][loops[0].iterations[0][j].handle]};")
        self.lines.append(f"{indent}}}")
        for lp, n in zip(loops, names):
            for j in used_after:
                n[lp.iterations[-1][j].handle] = f"{var}{j}"


def _refs(blocks) -> set:
    """Every tensor the entries of these blocks read (loops included)."""
    out = set()
    for block in blocks:
        for e in block:
            if isinstance(e, _Call):
                out.update(a for a in e.args if isinstance(a, _Handle))
            elif isinstance(e, _Loop):
                out |= _refs(e.iterations)
    return out


def _trace(graph: Graph):
    emitter = _Trace()
    inputs, outputs = lower_for_export(emitter, graph)
    return emitter.entries, inputs, outputs


def export_symbolic(samples: list[tuple[dict, Graph]], name: str, source: str, unit: int = 1) -> str:
    """C source of a function `name(ctx, <inputs>, <sizes>, <outputs>)` building, for any sizes in the
    samples' range, the graph the family gives there. samples: ({"t" or "u": ..., "B": ...}, graph
    prepared for the ggml target); unit: tokens per unit of "u" (the chunk size)."""
    envs = [env for env, _ in samples]
    symbols = tuple(s for s in ("u", "t", "B") if len({env.get(s) for env in envs}) > 1)
    traces = [_trace(graph) for _, graph in samples]
    graph0 = samples[0][1]
    writer = _Writer(symbols)
    names = [dict() for _ in samples]
    writer.walk([t[0] for t in traces], envs, names)

    params = ["struct ggml_context * ctx"]
    checks = []
    for k, (v, node) in enumerate(zip(traces[0][1], graph0.inputs)):
        params.append(f"struct ggml_tensor * {v.t} /* {node.dtype}{_symbolic_shape(samples, k, symbols)} */")
        dims = []
        for d in range(4):
            coeffs = fit([(env, t[1][k].ne[d]) for env, t in zip(envs, traces)], symbols)
            if coeffs is None:
                raise BackendError(f"ggml-c export: input {v.t}'s shape is no polynomial in the sizes")
            dims.append(f"{v.t}->ne[{d}] == {c_expression(coeffs)}")
        checks.append(f"    GGML_ASSERT({' && '.join(dims)} && ggml_is_contiguous({v.t}));")
    sizes = []
    if "u" in symbols:
        sizes.append("int64_t n_tokens")
        low = min(env["u"] for env in envs)
        checks.insert(0, f"    GGML_ASSERT(n_tokens % {unit} == 0 && n_tokens >= {low * unit});")
        checks.insert(1, f"    const int64_t n_chunks = n_tokens / {unit};")
    if "t" in symbols:
        sizes.append("int64_t n_tokens")
        checks.insert(0, f"    GGML_ASSERT(n_tokens >= {min(env['t'] for env in envs)});")
    if "B" in symbols:
        sizes.append("int64_t n_seqs")
        checks.insert(0, f"    GGML_ASSERT(n_seqs >= {min(env['B'] for env in envs)});")
    outs = []
    for out_name, (view, base) in zip(graph0.output_names, traces[0][2]):
        params.append(f"struct ggml_tensor ** out_{out_name}")
        view_name, base_name = names[0].get(view, view), names[0].get(base, base)
        if base_name != view_name:
            outs.append(f"    ggml_set_output({base_name});")
        outs += [f"    ggml_set_output({view_name});", f"    *out_{out_name} = {view_name};"]
    params[1 + len(graph0.inputs):1 + len(graph0.inputs)] = sizes
    shown = ", ".join(f"{C_NAMES[s]}" for s in symbols)
    lines = [
        f"// {name}: built by dnir from {source}, for any {shown} in the range asserted below (the",
        f"// lowering was traced at {len(samples)} sizes; every size, stride and offset is the polynomial",
        "// that gives it at all of them). One statement per ggml call, each under a comment naming the",
        "// dnir node it lowers (%N = op, as `dnir print` numbers them) and the pass that made the node.",
        f"// Inputs: {', '.join(f'{n} {node.dtype}{_symbolic_shape(samples, k, symbols)}' for k, (n, node) in enumerate(zip(graph0.input_names, graph0.inputs)))}"
        " (NumPy order; ggml order reversed).",
        "#include <math.h>",
        "#include <stdbool.h>",
        "#include <stddef.h>",
        '#include "ggml.h"',
        "",
        f"void {name}({(',' + chr(10) + '        ').join(params)}) {{",
        *checks,
        *writer.lines,
        *outs,
        "}",
    ]
    return "\n".join(lines) + "\n"


def _symbolic_shape(samples, k, symbols) -> str:
    """An input's NumPy shape with T and B by name where they vary."""
    dims = []
    for d in range(len(samples[0][1].inputs[k].shape)):
        points = [(env, g.inputs[k].shape[d]) for env, g in samples]
        coeffs = fit(points, symbols)
        dims.append(c_expression(coeffs) if coeffs is not None else "?")
    return "[" + ", ".join(dims) + "]"

