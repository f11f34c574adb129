"""Value ranges: which exp, div, log, sqrt, rsqrt can overflow or be undefined.

Every value gets an interval [lo, hi] that holds all of its elements, propagated
from declared input ranges (`DEFAULT_INPUT_RANGES` for the delta-net inputs;
any other input is unbounded) with interval arithmetic: a matmul or sum bounds a
sum of k products by k times the product interval, cumsum by the axis length, a
triangular solve by the worst growth of substitution, a scan by iterating its
body over the union of the carries seen so far (widened to infinity when they
keep growing) until nothing changes or every step is covered.

Intervals alone cannot see that an exponent is <= 0 below a diagonal, which is
why masking before exp is safe. Two refinements make the analysis exact enough
for that:

- Prefix sums. A value may carry a `Prefix` form: each element is
  S[p1] - S[p2] where S = cumsum(x) and p1, p2 are positions along the
  cumsum axis, each an index of one of the value's axes plus an offset, or a
  constant (-1 is the empty prefix, so cumsum itself is S[i] - S[-1]). Such
  an element is a sum of m = p1 - p2 elements of x, so it lies in
  m * [lo(x), hi(x)] (negated for m < 0). The form follows the value through
  reshapes that add or drop size-1 axes, permutes, broadcasts, slices, copies
  and negation; a difference of two such values with a common end becomes
  another form (gam_i - gam_j, gam_last - gam, gam_i - gam_r).
- Masks. tril/triu, and `where` with a condition that is known (computed from
  constants only), bound a form over the kept positions only: for
  tril(gam_i - gam_j) the kept elements have m = i - j >= 0.
Small values computed from constants only are evaluated (analysis/evaluate.py)
and carried as arrays.

Every op has a rule in `RULES` (checked at import: a new op without one fails,
naming it); a fused op's ranges are those of its expansion.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..graph import Graph, Node
from ..ops import REGISTRY, OpClass, check_table, make_node, matmul_dims, table_entry
from ..types import numpy_dtype
from .evaluate import evaluate
from .names import value_names

INF = math.inf
DEFAULT_INPUT_RANGES = {"g": (-20.0, 0.0), "beta": (0.0, 1.0), "q": (-1.0, 1.0), "k": (-1.0, 1.0)}
CONCRETE_LIMIT = 1 << 16        # elements: constant-only values up to this size are evaluated
WIDEN_AFTER = 4                 # scan iterations before growing carry bounds jump to infinity
NARROW_STEPS = 3                # iterations that shrink a widened scan invariant again
CHECKED_OPS = ("exp", "div", "log", "sqrt", "rsqrt")


@dataclass(frozen=True)
class Prefix:
    """Every element is S[p1] - S[p2], S = cumsum of a value x (elements in `term`) along
    one axis; the other axes of S are indexed by `common`. A position is
    ("axis", a, offset): this value's index on axis a plus offset, or ("const", c)."""
    source: int                                # id of the cumsum node
    term: tuple[float, float]
    common: tuple
    p1: tuple
    p2: tuple


@dataclass
class Abstract:
    lo: float
    hi: float
    prefix: Prefix | None = None
    value: np.ndarray | None = None            # the exact array, for small constant-only values


@dataclass
class Finding:
    """An op whose input range can overflow or is undefined in the value's dtype."""
    node: Node
    name: str          # printed value name, with the scan bodies it is in
    op: str
    dtype: str
    ranges: list       # the operands' (lo, hi)
    problem: str

    def to_json(self) -> dict:
        return {"value": self.name, "op": self.op, "dtype": self.dtype,
                "ranges": [[_json_float(lo), _json_float(hi)] for lo, hi in self.ranges], "problem": self.problem}

    def __str__(self):
        spans = ", ".join(f"[{_fmt(lo)}, {_fmt(hi)}]" for lo, hi in self.ranges)
        return f"{self.name} = {self.op} {self.node.type}: {self.problem} (operand range {spans})"


@dataclass
class RangeReport:
    ranges: dict[int, Abstract]               # id(node) -> range, top-level graph
    findings: list[Finding] = field(default_factory=list)

    def range_of(self, node: Node) -> tuple[float, float]:
        a = self.ranges[id(node)]
        return a.lo, a.hi


def _fmt(x: float) -> str:
    return "inf" if x == INF else "-inf" if x == -INF else f"{x + 0.0:.6g}"


def _json_float(x: float):
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def analyze(graph: Graph, input_ranges: dict | None = None) -> RangeReport:
    """Ranges of every value of `graph` and the findings. `input_ranges`: name -> (lo, hi),
    over the defaults for delta-net inputs; an input in neither is unbounded."""
    declared = dict(DEFAULT_INPUT_RANGES)
    declared.update(input_ranges or {})
    args = []
    for n in graph.inputs:
        lo, hi = declared.get(n.attrs["name"], (-INF, INF))
        args.append(Abstract(float(lo), float(hi)))
    findings: list[Finding] = []
    values = _Interpreter(findings).run(graph, args, "")
    return RangeReport(values, findings)


# ---------------------------------------------------------------------------
# Interval helpers (extended reals; a bound of +-inf means "unbounded")


def _mul(a: float, b: float) -> float:
    return 0.0 if a == 0 or b == 0 else a * b


def _hull(*pairs) -> tuple[float, float]:
    pairs = [p for p in pairs if p is not None]
    return min(p[0] for p in pairs), max(p[1] for p in pairs)


def _products(a, b) -> tuple[float, float]:
    ps = [_mul(x, y) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
    return min(ps), max(ps)


def _scale(n: int, lo: float, hi: float) -> tuple[float, float]:
    """The range of a sum of n terms in [lo, hi]."""
    return _mul(n, lo), _mul(n, hi)


def _clean(lo, hi) -> tuple[float, float]:
    """NaN bounds (inf - inf) become unbounded."""
    return (-INF if lo != lo else float(lo)), (INF if hi != hi else float(hi))


def _monotone(fn, lo, hi) -> tuple[float, float]:
    with np.errstate(all="ignore"):
        return _clean(float(fn(np.float64(lo))), float(fn(np.float64(hi))))


def _dtype_max(dtype: str) -> float:
    if dtype == "bf16":
        return 3.3895313892515355e38
    return float(np.finfo(numpy_dtype(dtype)).max)


# ---------------------------------------------------------------------------
# Prefix forms


def _normalize(p: Prefix, shape) -> Prefix:
    """A position on an axis of size 1 is a constant (broadcasting may not vary it)."""
    def fix(pos):
        if pos[0] == "axis" and shape[pos[1]] == 1:
            return ("const", pos[2])
        return pos
    return Prefix(p.source, p.term, tuple(fix(c) for c in p.common), fix(p.p1), fix(p.p2))


def _remap(p: Prefix | None, mapping: dict, shape) -> Prefix | None:
    """Move a form to new axes: mapping old axis -> (new axis, offset added)."""
    if p is None:
        return None

    def move(pos):
        if pos[0] != "axis":
            return pos
        if pos[1] not in mapping:
            raise KeyError
        a, add = mapping[pos[1]]
        return ("axis", a, pos[2] + add)
    try:
        moved = Prefix(p.source, p.term, tuple(move(c) for c in p.common), move(p.p1), move(p.p2))
    except KeyError:
        return None
    return _normalize(moved, shape)


def _aligned(p: Prefix | None, rank_from: int, rank_to: int, shape) -> Prefix | None:
    """An operand's form seen through broadcasting to rank_to axes."""
    return _remap(p, {a: (a + rank_to - rank_from, 0) for a in range(rank_from)}, shape)


def _m_values(p: Prefix, shape, keep=None):
    """The counts m = p1 - p2 over the value's positions (those where `keep`, a boolean
    array broadcastable to shape, is true); None when no position is kept."""
    rank = len(shape)
    axes = sorted({pos[1] for pos in (p.p1, p.p2) if pos[0] == "axis"})
    if any(shape[a] == 0 for a in axes):
        return None
    if keep is None:      # m is p1 - p2, each linear in one index: extremes at the ends
        def span(pos):
            return (pos[1], pos[1]) if pos[0] == "const" else (pos[2], shape[pos[1]] - 1 + pos[2])
        if p.p1[0] == p.p2[0] == "axis" and p.p1[1] == p.p2[1]:
            return p.p1[2] - p.p2[2], p.p1[2] - p.p2[2]
        (a, b), (c, d) = span(p.p1), span(p.p2)
        return a - d, b - c
    grids = np.meshgrid(*[np.arange(shape[a]) for a in axes], indexing="ij")

    def at(pos):
        if pos[0] == "const":
            return pos[1]
        return grids[axes.index(pos[1])] + pos[2]
    m = np.broadcast_to(np.asarray(at(p.p1) - at(p.p2)), tuple(shape[a] for a in axes))
    if keep is not None:
        k = np.asarray(keep, dtype=bool).reshape((1,) * (rank - np.ndim(keep)) + np.shape(keep))
        other = tuple(a for a in range(rank) if a not in axes)
        k = np.broadcast_to(np.any(k, axis=other), m.shape) if other else np.broadcast_to(k, m.shape)
        m = m[k]
    return (int(m.min()), int(m.max())) if m.size else None


def _prefix_range(p: Prefix, shape, keep=None):
    ms = _m_values(p, shape, keep)
    if ms is None:
        return None
    lo, hi = p.term
    return _hull(*[tuple(sorted((_mul(m, lo), _mul(m, hi)))) for m in ms])


# ---------------------------------------------------------------------------
# The interpreter

# op -> rule(interpreter, node, *operand ranges) -> Abstract (a tuple for a multi-result op)
RULES: dict = {}
rule = table_entry(RULES)


class _Interpreter:
    def __init__(self, findings: list):
        self.findings = findings

    def run(self, graph: Graph, args: list, where: str, report: bool = True) -> dict[int, Abstract]:
        names = value_names(graph)
        values: dict[int, Abstract] = {id(n): a for n, a in zip(graph.inputs, args)}
        for node in graph.topo_order():
            if id(node) in values:
                continue
            ins = [values[id(i)] for i in node.inputs]
            label = f"{names[id(node)]}{where}"
            if node.op == "scan":
                values[id(node)] = self.scan(node, ins, label, report)
                continue
            if report and node.op in CHECKED_OPS:
                self.check(node, ins, label)
            values[id(node)] = self.evaluate(node, ins)
        return values

    # -- findings ---------------------------------------------------------
    def check(self, node: Node, ins, label: str):
        dtype = node.dtype
        if dtype not in ("f16", "bf16", "f32", "f64"):
            return
        top = _dtype_max(dtype)
        x = ins[0]
        problem = None
        if node.op == "exp" and x.hi > math.log(top):
            problem = f"exp overflows {dtype} for inputs above {math.log(top):.6g}"
        elif node.op == "log" and x.lo <= 0:
            problem = "log is undefined (-inf or nan) for inputs <= 0"
        elif node.op == "sqrt" and x.lo < 0:
            problem = "sqrt is undefined (nan) for inputs < 0"
        elif node.op == "rsqrt" and x.lo <= 0:
            problem = "rsqrt is undefined (inf or nan) for inputs <= 0"
        elif node.op == "div":
            d = ins[1]
            if d.lo <= 0 <= d.hi:
                problem = "division by a range that contains 0"
            elif all(math.isfinite(v) for v in (x.lo, x.hi, d.lo, d.hi)):
                q = _products(x, Abstract(1 / d.hi, 1 / d.lo))
                if max(-q[0], q[1]) > top:
                    problem = f"the quotient can exceed the largest {dtype} ({top:.6g})"
        if problem:
            self.findings.append(Finding(node, label, node.op, dtype, [(a.lo, a.hi) for a in ins], problem))

    # -- transfer functions -----------------------------------------------
    def evaluate(self, node: Node, ins) -> Abstract:
        op_class = REGISTRY[node.op].op_class
        if op_class is OpClass.FUSED:
            return self.expanded(node, ins)
        if op_class is not OpClass.CONTROL and node.type.size <= CONCRETE_LIMIT and (
                (ins and all(a.value is not None for a in ins)) or op_class is OpClass.SOURCE):
            concrete = self.concrete(node, ins)
            if concrete is not None:
                return concrete
        return RULES[node.op](self, node, *ins)

    def concrete(self, node: Node, ins) -> Abstract | None:
        value = evaluate(node, [a.value for a in ins])
        if value is None:
            return None
        flat = np.asarray(value, dtype=np.float64)
        if flat.size == 0:
            return Abstract(0.0, 0.0, value=value)
        if np.isnan(flat).any():
            return Abstract(-INF, INF, value=value)
        return Abstract(float(flat.min()), float(flat.max()), value=value)

    def expanded(self, node: Node, ins):
        """A fused op's ranges: those of its expansion, on stand-in inputs with the operands' ranges."""
        stand_ins = [make_node("input", (), {"name": f"x{i}", "shape": x.shape, "dtype": x.dtype})
                     for i, x in enumerate(node.inputs)]
        results = REGISTRY[node.op].expand(make_node(node.op, stand_ins, node.attrs))
        results = results if isinstance(results, tuple) else (results,)
        values = self.run(Graph(stand_ins, list(results)), [Abstract(a.lo, a.hi) for a in ins],
                          f" in the expansion of {node.op}", report=False)
        out = tuple(values[id(r)] for r in results)
        return out if isinstance(node.type, tuple) else out[0]

    @rule("item")
    def op_item(self, node, results):
        return results[node.attrs["index"]]

    @rule("const")
    def op_const(self, node):
        return Abstract(float(min(node.attrs["value"])), float(max(node.attrs["value"])))

    @rule("eye")
    def op_eye(self, node):
        return Abstract(0.0, 1.0)

    @rule("full")
    def op_full(self, node):
        v = float(node.attrs["value"])
        return Abstract(v, v)

    @rule("neg")
    def op_neg(self, node, x):
        p = x.prefix
        return Abstract(-x.hi, -x.lo, None if p is None else Prefix(p.source, p.term, p.common, p.p2, p.p1))

    @rule("exp")
    def op_exp(self, node, x):
        return Abstract(*_monotone(np.exp, x.lo, x.hi))

    @rule("log")
    def op_log(self, node, x):
        return Abstract(*_monotone(np.log, max(x.lo, 0.0), max(x.hi, 0.0)))

    @rule("sigmoid")
    def op_sigmoid(self, node, x):
        return Abstract(*_monotone(lambda t: 1 / (1 + np.exp(-t)), x.lo, x.hi))

    @rule("softplus")
    def op_softplus(self, node, x):
        return Abstract(*_monotone(lambda t: np.logaddexp(0.0, t), x.lo, x.hi))

    @rule("sqrt")
    def op_sqrt(self, node, x):
        return Abstract(*_monotone(np.sqrt, max(x.lo, 0.0), max(x.hi, 0.0)))

    @rule("rsqrt")
    def op_rsqrt(self, node, x):
        hi, lo = _monotone(lambda t: 1 / np.sqrt(t), max(x.lo, 0.0), max(x.hi, 0.0))
        return Abstract(lo, hi)

    @rule("cast")
    def op_cast(self, node, x):
        if node.dtype == "bool":
            return Abstract(0.0, 1.0)
        if node.dtype in ("i32", "i64"):
            return Abstract(math.floor(x.lo) if math.isfinite(x.lo) else x.lo,
                            math.ceil(x.hi) if math.isfinite(x.hi) else x.hi)
        return Abstract(x.lo, x.hi)

    @rule("clamp")
    def op_clamp(self, node, x):
        lo, hi = node.attrs["min"], node.attrs["max"]
        return Abstract(min(max(x.lo, lo), hi), min(max(x.hi, lo), hi))

    @rule("add")
    def op_add(self, node, a, b):
        return Abstract(*_clean(a.lo + b.lo, a.hi + b.hi))

    @rule("sub")
    def op_sub(self, node, a, b):
        rank = node.rank
        pa = _aligned(a.prefix, node.inputs[0].rank, rank, node.shape)
        pb = _aligned(b.prefix, node.inputs[1].rank, rank, node.shape)
        prefix = None
        if pa and pb and (pa.source, pa.term, pa.common) == (pb.source, pb.term, pb.common):
            if pa.p2 == pb.p2:                 # (S[i] - S[c]) - (S[j] - S[c]) = S[i] - S[j]
                prefix = Prefix(pa.source, pa.term, pa.common, pa.p1, pb.p1)
            elif pa.p1 == pb.p1:               # (S[c] - S[i]) - (S[c] - S[j]) = S[j] - S[i]
                prefix = Prefix(pa.source, pa.term, pa.common, pb.p2, pa.p2)
        lo, hi = _clean(a.lo - b.hi, a.hi - b.lo)
        if prefix is not None:
            lo, hi = _prefix_range(prefix, node.shape) or (0.0, 0.0)
        return Abstract(lo, hi, prefix)

    @rule("mul")
    def op_mul(self, node, a, b):
        if node.inputs[0] is node.inputs[1]:   # a square is never negative
            top = max(_mul(a.lo, a.lo), _mul(a.hi, a.hi))
            return Abstract(0.0 if a.lo <= 0 <= a.hi else min(_mul(a.lo, a.lo), _mul(a.hi, a.hi)), top)
        for i, (form, mask) in enumerate(((a, b), (b, a))):
            # A form times a known array of few values (a 0/1 mask): bound the form
            # separately where the array holds each value.
            if form.prefix is not None and mask.value is not None:
                levels = np.unique(np.asarray(mask.value, dtype=np.float64))
                if len(levels) <= 16 and not np.isnan(levels).any():
                    parts = []
                    for w in levels:
                        r = self.restricted(node, i, form, np.asarray(mask.value) == w)
                        if r is not None:
                            parts.append(tuple(sorted((_mul(float(w), r[0]), _mul(float(w), r[1])))))
                    return Abstract(*_hull(*parts))
        return Abstract(*_products(a, b))

    @rule("div")
    def op_div(self, node, a, b):
        if b.lo <= 0 <= b.hi:
            return Abstract(-INF, INF)
        return Abstract(*_products(a, Abstract(1 / b.hi, 1 / b.lo)))

    @rule("maximum")
    def op_maximum(self, node, a, b):
        return Abstract(max(a.lo, b.lo), max(a.hi, b.hi))

    @rule("minimum")
    def op_minimum(self, node, a, b):
        return Abstract(min(a.lo, b.lo), min(a.hi, b.hi))

    @rule("where")
    def op_where(self, node, c, a, b):
        if c.value is None:
            return Abstract(*_hull((a.lo, a.hi), (b.lo, b.hi)))
        keep = np.asarray(c.value, dtype=bool)
        return Abstract(*_hull(self.restricted(node, 1, a, keep), self.restricted(node, 2, b, ~keep)))

    def restricted(self, node: Node, i: int, x: Abstract, keep):
        """The range of operand i (broadcast to the node's shape) over the positions where keep."""
        if not keep.any():
            return None
        p = _aligned(x.prefix, node.inputs[i].rank, node.rank, node.shape)
        if p is not None:
            return _prefix_range(p, node.shape, keep)
        return x.lo, x.hi

    def _tri(self, node, x, keep):
        kept = self.restricted(node, 0, x, keep)
        return Abstract(*_hull(kept, (0.0, 0.0) if not keep.all() else None))

    @rule("tril")
    def op_tril(self, node, x):
        rows, cols = node.shape[-2:]
        return self._tri(node, x, np.tri(rows, cols, node.attrs["k"], dtype=bool))

    @rule("triu")
    def op_triu(self, node, x):
        rows, cols = node.shape[-2:]
        return self._tri(node, x, ~np.tri(rows, cols, node.attrs["k"] - 1, dtype=bool))

    # layout: the same elements, so the same interval; forms follow the axes
    @rule("cont")
    def op_cont(self, node, x):
        return Abstract(x.lo, x.hi, x.prefix)

    @rule("reshape")
    def op_reshape(self, node, x):
        old = [a for a, d in enumerate(node.inputs[0].shape) if d != 1]
        new = [a for a, d in enumerate(node.shape) if d != 1]
        prefix = None
        if [node.inputs[0].shape[a] for a in old] == [node.shape[a] for a in new]:
            prefix = _remap(x.prefix, {a: (b, 0) for a, b in zip(old, new)}, node.shape)
        return Abstract(x.lo, x.hi, prefix)

    @rule("permute")
    def op_permute(self, node, x):
        axes = [a % node.rank for a in node.attrs["axes"]]
        return Abstract(x.lo, x.hi, _remap(x.prefix, {a: (i, 0) for i, a in enumerate(axes)}, node.shape))

    @rule("broadcast_to")
    def op_broadcast_to(self, node, x):
        return Abstract(x.lo, x.hi, _aligned(x.prefix, node.inputs[0].rank, node.rank, node.shape))

    @rule("slice")
    def op_slice(self, node, x):
        starts = node.attrs["starts"]
        return Abstract(x.lo, x.hi, _remap(x.prefix, {a: (a, s) for a, s in enumerate(starts)}, node.shape))

    @rule("pad")
    def op_pad(self, node, x):
        v = float(node.attrs["value"])
        padded = any(a or b for a, b in node.attrs["pads"])
        return Abstract(*_hull((x.lo, x.hi), (v, v) if padded else None))

    @rule("concat")
    def op_concat(self, node, *xs):
        return Abstract(*_hull(*[(x.lo, x.hi) for x, n in zip(xs, node.inputs) if n.type.size]))

    @rule("sum")
    def op_sum(self, node, x):
        shape = node.inputs[0].shape
        n = math.prod(shape[a % len(shape)] for a in node.attrs["axes"])
        return Abstract(*_scale(n, x.lo, x.hi))

    @rule("cumsum")
    def op_cumsum(self, node, x):
        axis = node.attrs["axis"] % node.rank
        length = node.shape[axis]
        if not (math.isfinite(x.lo) and math.isfinite(x.hi)) or length == 0:
            return Abstract(*_hull(_scale(1, x.lo, x.hi), _scale(max(length, 1), x.lo, x.hi)))
        common = tuple(("axis", a, 0) for a in range(node.rank) if a != axis)
        prefix = _normalize(Prefix(id(node), (x.lo, x.hi), common, ("axis", axis, 0), ("const", -1)), node.shape)
        return Abstract(*_prefix_range(prefix, node.shape), prefix)

    @rule("matmul")
    def op_matmul(self, node, a, b):
        k = matmul_dims(tuple(i.type for i in node.inputs), node.attrs)[2]
        return Abstract(*_scale(k, *_products(a, b)))

    @rule("solve_tri")
    def op_solve_tri(self, node, a, b):
        """|x_i| <= (|b|max / d) (1 + |a|max / d)^i by induction on the substitution,
        with d the smallest |diagonal| (1 when unit)."""
        n = node.inputs[0].shape[-1]
        bmax = max(abs(b.lo), abs(b.hi))
        amax = max(abs(a.lo), abs(a.hi))
        if node.attrs["unit_diagonal"]:
            d = 1.0
        elif a.lo > 0 or a.hi < 0:
            d = min(abs(a.lo), abs(a.hi))
        else:
            return Abstract(-INF, INF)
        with np.errstate(all="ignore"):
            bound = float(np.float64(bmax) / d * np.power(1 + np.float64(amax) / d, max(n - 1, 0)))
        if bmax == 0:
            bound = 0.0
        if bound != bound:
            bound = INF
        return Abstract(-bound, bound)

    @rule("set")
    def op_set(self, node, dst, src):
        covers = node.inputs[1].shape == node.shape
        return Abstract(*(_hull((src.lo, src.hi)) if covers else _hull((dst.lo, dst.hi), (src.lo, src.hi))))

    @rule("acc")
    def op_acc(self, node, dst, src):
        summed = _clean(dst.lo + src.lo, dst.hi + src.hi)
        covers = node.inputs[1].shape == node.shape
        return Abstract(*(summed if covers else _hull((dst.lo, dst.hi), summed)))

    # -- scan: iterate the body over the union of carries seen so far ------
    def scan(self, node: Node, ins, label: str, report: bool):
        """Iterate the body on the hull of the carries seen so far: each iteration's
        input holds the real carry of that step. Stop after the last step, or at a
        post-fixpoint c (holding the initial carry, body(c) within c), which holds
        every step's carry; bounds still growing after WIDEN_AFTER iterations jump to
        infinity, and a post-fixpoint is then narrowed again (hull(init, body(c)) is
        one too)."""
        body: Graph = node.attrs["body"]
        nc, nx, length = node.attrs["num_carry"], node.attrs["num_xs"], node.attrs["length"]
        # Forms and arrays do not cross the loop boundary, except arrays of loop invariants.
        xs = [Abstract(a.lo, a.hi) for a in ins[nc:nc + nx]]
        consts = [Abstract(a.lo, a.hi, value=a.value) for a in ins[nc + nx:]]
        where = f" in body of scan {label}"

        def step(carries, report=False):
            values = self.run(body, [Abstract(*c) for c in carries] + xs + consts, where, report)
            outs = [(values[id(o)].lo, values[id(o)].hi) for o in body.outputs]
            return outs[:nc], outs[nc:]

        init = [(a.lo, a.hi) for a in ins[:nc]]
        carries, ys, fixpoint = list(init), [(0.0, 0.0)] * (len(node.type) - nc), False
        for i in range(length):
            new, out_ys = step(carries)
            ys = out_ys if i == 0 else [_hull(y, o) for y, o in zip(ys, out_ys)]
            grown = [_hull(c, n) for c, n in zip(carries, new)]
            if grown == carries:
                fixpoint = True
                break
            if WIDEN_AFTER <= i < length - 1:
                grown = [(c[0] if g[0] >= c[0] else -INF, c[1] if g[1] <= c[1] else INF)
                         for c, g in zip(carries, grown)]
            carries = grown
        if fixpoint:
            for _ in range(NARROW_STEPS):
                narrowed = [_hull(c0, n) for c0, n in zip(init, step(carries)[0])]
                if narrowed == carries:
                    break
                carries = narrowed
            ys = step(carries)[1]
        if report and length:   # findings once, on the widest inputs the body sees
            step(carries, report=True)
        return tuple(Abstract(*c) for c in carries) + tuple(Abstract(*y) for y in ys)


# input: declared ranges; scan: iterated by the interpreter itself.
check_table("the range analysis' RULES (dnir/analysis/ranges.py)", set(RULES) | {"input", "scan"},
            fused="the fused op's expansion (_Interpreter.expanded)")
