"""The compute-buffer memory plan: where every value a graph computes lives in one arena.

What the arena holds. Like llama.cpp's compute buffer, the arena holds every
value an op writes: intermediates and the graph's outputs (which stay live to
the end, for the caller to read). It does not hold the graph's inputs (weights,
activations, the initial state: the caller's arrays) nor views of them.

Storage. The topological order is walked once; each value either
- is a view that shares its operand's bytes: `reshape` of a dense value, a
  `slice` whose region is one contiguous run of its operand's bytes (leading
  axes of extent 1, then one partial axis, then full axes), an `item` (a
  result of a scan);
- is a strided view of its operand's bytes (`MemoryPlan.views` holds its
  element strides): any `slice` or `permute`, and a `reshape` of a strided
  value that needs no copy, as long as its rows stay contiguous (last stride 1:
  matmul and elementwise kernels read such operands at full speed). A strided
  value is never a graph output or a scan operand (those are read as dense
  bytes), and nothing is written in place over it;
- is written in place over an operand that dies at this op: an elementwise op
  whose output has exactly the operand's type (its OpDef's `inplace` lists which operands),
  and `set`/`acc` over their destination; the operand must own its whole block
  and no other operand may read that block;
- or gets a new block.
A block's lifetime is the inclusive range of topological positions from the op
that creates it to the last read of any value living in it (the graph's
outputs: one past the last op). Two blocks whose lifetimes intersect never share
a byte (see allocate.py for how offsets are chosen).

Scans. A scan's body is planned once, in its own small arena that is reused
every step; that arena is one block of the enclosing plan, live only at the
scan. The carried values live in the scan's final-carry results (a new block,
or the initial value's block when that dies at the scan: then the loop updates
it in place); the stacked outputs are blocks of the enclosing plan, one
step-sized slot per step. Inside the body these are external regions
(`carry:K`, `ys:J`, and the read-only `xs:I`, `const:I` slices of the
operands): a body value that becomes a stacked output is written straight into
its step's slot, and one that becomes a new carry is written straight into the
carry when the old carry is dead by then; any other output is copied there at
the end of the step (through a staging block when a carry is copied from
another carry that is itself overwritten).

`plan(graph).peak_bytes` is the arena size; `.lower_bound` is the most bytes
live at one position, which no placement can beat. `check_plan` proves a plan
from the graph alone: no two values live at the same time share a byte unless
one is a view of the other or was legally overwritten in place.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from ..errors import VerifyError
from ..graph import Graph, Node
from ..ops import REGISTRY
from .allocate import ALIGN, assign_offsets, lower_bound
from .names import value_names
from .schedule import candidate_orders
from .views import is_planned_view, nbytes, view_layout, view_offset



class PlanError(VerifyError):
    """A memory plan lets two live values share bytes, or is inconsistent with its graph."""


@dataclass(eq=False)
class Block:
    """A contiguous range of the arena, live over positions [start, end] of its plan."""
    nbytes: int
    start: int
    end: int
    what: str
    offset: int = 0

    def __repr__(self):
        return f"<Block {self.what}: {self.nbytes} B at {self.offset}, live {self.start}..{self.end}>"


@dataclass(frozen=True)
class Loc:
    """Where a value's bytes start: a Block of the plan's arena, or an external region
    ('input:NAME' at the top; 'carry:K', 'xs:I', 'const:I', 'ys:J' in a scan body)."""
    base: Block | str
    offset: int = 0


@dataclass(eq=False)
class ScanPlan:
    body: "MemoryPlan"
    arena: Block                  # the body's arena, live only at the scan
    carries: list[Loc]            # the carried values during the loop = the final-carry results
    ys: list[Loc | None]          # stacked outputs; None when nothing reads one

    def result(self, index: int) -> Loc | None:
        return (self.carries + self.ys)[index]


@dataclass(eq=False)
class MemoryPlan:
    graph: Graph
    order: list[Node]                             # the execution order the plan is for
    blocks: list[Block]
    locs: dict[int, Loc]                          # id(node) -> location, every value of the graph
    scans: dict[int, ScanPlan] = field(default_factory=dict)
    stages: dict[int, Block] = field(default_factory=dict)   # carry index -> staging block (bodies)
    peak_bytes: int = 0
    lower_bound: int = 0
    views: dict[int, tuple | None] = field(default_factory=dict)  # id(node) -> strides of a view (None: dense)
    results: dict[int, list[Loc]] = field(default_factory=dict)   # id(multi-result op, not a scan) -> its results

    def loc(self, node: Node) -> Loc:
        return self.locs[id(node)]

    def result(self, node: Node, index: int) -> Loc | None:
        """Where result `index` of a multi-result node (a scan, a fused op) lives."""
        if node.op == "scan":
            return self.scans[id(node)].result(index)
        return self.results[id(node)][index]

    def offset(self, node: Node) -> int | None:
        """A value's byte offset in the arena; None for a value outside it (an input or a view of one)."""
        loc = self.locs[id(node)]
        return loc.base.offset + loc.offset if isinstance(loc.base, Block) else None

    def offsets(self) -> dict[str, int | None]:
        """Printed value name (%3, %q) -> arena offset, for reports."""
        names = value_names(self.graph)
        return {names[k]: self.offset(n) for n in self.graph.topo_order() if (k := id(n)) in self.locs}

    def dominant(self, count: int = 5) -> list[Block]:
        """The largest blocks live at the position where the most bytes are live."""
        at = max(range(max((b.end for b in self.blocks), default=0) + 1),
                 key=lambda p: sum(b.nbytes for b in self.blocks if b.start <= p <= b.end), default=0)
        live = [b for b in self.blocks if b.start <= at <= b.end]
        return sorted(live, key=lambda b: -b.nbytes)[:count]


def plan(graph: Graph) -> MemoryPlan:
    """Plan the compute buffer of `graph`; `plan(g).peak_bytes` is its size in bytes."""
    inputs = {id(n): Loc(f"input:{n.attrs['name']}") for n in graph.inputs}
    return _best_plan(graph, inputs, {}, 0)


def _best_plan(graph, input_locs, targets, num_carry) -> MemoryPlan:
    """The smallest arena over the candidate execution orders (schedule.py)."""
    plans = [_Planner(graph, input_locs, targets, num_carry, order).run() for order in candidate_orders(graph)]
    return min(plans, key=lambda mp: (mp.peak_bytes, mp.lower_bound))


def peak_bytes(graph: Graph) -> int:
    return plan(graph).peak_bytes


def _live_ranges(graph: Graph, order):
    """(position of each node in order, last position reading each value; outputs: len(order))."""
    pos = {id(n): i for i, n in enumerate(order)}
    last = dict(pos)
    for n in order:
        for i in n.inputs:
            last[id(i)] = max(last[id(i)], pos[id(n)])
    for o in graph.outputs:
        last[id(o)] = len(order)
    return pos, last


def _target_root(out: Node) -> Node | None:
    """The value whose bytes an output is (through reshapes), when it is a fresh op result."""
    node = out
    while node.op == "reshape":
        node = node.inputs[0]
    if node.op in ("input", "item", "scan") or view_offset(node) is not None:
        return None
    return node


class _Planner:
    def __init__(self, graph: Graph, input_locs: dict, targets: dict, num_carry: int, order):
        self.graph, self.order = graph, order
        self.pos, self.last = _live_ranges(graph, order)
        self.end = len(self.order)
        self.users = graph.uses()
        self.targets = targets                    # id(node) -> external region it is written into
        self.num_carry = num_carry
        self.locs: dict[int, Loc] = {}
        self.members: dict = defaultdict(list)    # base -> ids of the values living there
        self.blocks: list[Block] = []
        self.scans: dict[int, ScanPlan] = {}
        self.results: dict[int, list[Loc]] = {}
        self.views: dict[int, tuple | None] = {}  # id(node) -> strides of a view (None: dense)
        self.outputs = {id(o) for o in graph.outputs}
        self.names = value_names(graph)
        for n in graph.inputs:
            self._put(n, input_locs[id(n)])

    def _put(self, node, loc):
        self.locs[id(node)] = loc
        self.members[loc.base].append(id(node))

    def _new_block(self, nbytes, start, what) -> Loc:
        block = Block(nbytes, start, start, what)
        self.blocks.append(block)
        return Loc(block)

    def _base_end(self, base) -> int:
        default = base.start if isinstance(base, Block) else -1
        return max((self.last[m] for m in self.members[base]), default=default)

    def _free_at(self, p, node, loc) -> bool:
        """May `node` (at position p) write its result at `loc` (a whole region)?
        Yes when everything living there is dead before p, or dies at p and is read
        only as an operand the op may overwrite."""
        end = self._base_end(loc.base)
        if end < p:
            return True
        if end > p:
            return False
        for i in REGISTRY[node.op].inplace:
            u = node.inputs[i]
            if u.type == node.type and self.locs[id(u)] == loc and self._dense(u) and all(
                    o is u or self.locs[id(o)].base is not loc.base for o in node.inputs):
                return True
        return False

    def run(self) -> MemoryPlan:
        for p, node in enumerate(self.order):
            if id(node) in self.locs:
                continue
            if node.op == "scan":
                self._scan(p, node)
            elif node.op == "item":
                src = node.inputs[0]
                self._put(node, (self.scans[id(src)].result if src.op == "scan" else
                                 self.results[id(src)].__getitem__)(node.attrs["index"]))
            elif isinstance(node.type, tuple):      # a fused op: each result a block of its own
                self.results[id(node)] = [
                    self._new_block(nbytes(t), p, f"{self.names[id(node)]} = {node.op}: result {j} {t}")
                    for j, t in enumerate(node.type)]
            elif (layout := self._view(node)) is not None:
                src = self.locs[id(node.inputs[0])]
                self._put(node, Loc(src.base, src.offset + layout[0]))
                self.views[id(node)] = layout[1]
            else:
                self._put(node, self._place(p, node))
        stages = self._stages()
        for block in self.blocks:
            block.end = max(block.start, self._base_end(block))
        peak = assign_offsets(self.blocks)
        return MemoryPlan(self.graph, self.order, self.blocks, self.locs, self.scans, stages, peak,
                          lower_bound(self.blocks), self.views, self.results)

    def _view(self, node):
        """view_layout of `node`, unless it is strided and read as dense bytes (an output,
        a scan operand)."""
        layout = view_layout(node, self.views.get(id(node.inputs[0]))) if is_planned_view(node) else None
        if layout is not None and layout[1] is not None and (
                id(node) in self.outputs or any(u.op == "scan" for u in self.users[id(node)])):
            return None
        return layout

    def _dense(self, node) -> bool:
        return self.views.get(id(node)) is None

    def _place(self, p, node) -> Loc:
        target = self.targets.get(id(node))
        if target is not None and self._free_at(p, node, Loc(target)):
            return Loc(target)
        for i in REGISTRY[node.op].inplace:
            loc = self.locs[id(node.inputs[i])]
            if (isinstance(loc.base, Block) and loc.offset == 0 and loc.base.nbytes == nbytes(node.type)
                    and node.inputs[i].type == node.type and self._dense(node.inputs[i])
                    and self._free_at(p, node, loc)):
                return loc
        return self._new_block(nbytes(node.type), p, f"{self.names[id(node)]} = {node.op} {node.type}")

    def _scan(self, p, node):
        body: Graph = node.attrs["body"]
        nc, nx = node.attrs["num_carry"], node.attrs["num_xs"]
        ops = node.inputs
        name = self.names[id(node)]
        used = {u.attrs["index"] for u in self.users[id(node)]}
        carries = []
        for k, u in enumerate(ops[:nc]):
            loc = self.locs[id(u)]
            # The loop may update the initial value in place when nothing else needs it.
            if (isinstance(loc.base, Block) and loc.offset == 0 and loc.base.nbytes == nbytes(u.type)
                    and self._dense(u) and sum(o is u for o in ops) == 1 and self._base_end(loc.base) == p
                    and all(o is u or self.locs[id(o)].base is not loc.base for o in ops)):
                carries.append(loc)
            else:
                carries.append(self._new_block(nbytes(u.type), p, f"{name} = scan: carry {k} {u.type}"))
        ys = [self._new_block(nbytes(t), p, f"{name} = scan: stacked output {j} {t}") if nc + j in used else None
              for j, t in enumerate(node.type[nc:])]
        kinds = ["carry"] * nc + ["xs"] * nx + ["const"] * (len(ops) - nc - nx)
        starts = {"carry": 0, "xs": nc, "const": nc + nx}
        inputs = {id(b): Loc(f"{kind}:{i - starts[kind]}") for i, (b, kind) in enumerate(zip(body.inputs, kinds))}
        targets = {}
        for i, out in enumerate(body.outputs):
            region = f"carry:{i}" if i < nc else (f"ys:{i - nc}" if ys[i - nc] is not None else None)
            root = _target_root(out)
            if region and root is not None and id(root) not in targets:
                targets[id(root)] = region
        body_plan = _best_plan(body, inputs, targets, nc)
        arena = self._new_block(body_plan.peak_bytes, p, f"{name} = scan: body arena")
        self.scans[id(node)] = ScanPlan(body_plan, arena.base, carries, ys)

    def _stages(self) -> dict[int, Block]:
        """Carries copied at the end of a step from another carry that is itself overwritten
        go through a staging block (a swap would otherwise read a clobbered value)."""
        outs = self.graph.outputs[:self.num_carry]
        copied = {k for k, o in enumerate(outs) if self.locs[id(o)] != Loc(f"carry:{k}")}
        stages = {}
        for k in sorted(copied):
            base = self.locs[id(outs[k])].base
            if isinstance(base, str) and base.startswith("carry:") and int(base[6:]) in copied:
                stages[k] = self._new_block(nbytes(outs[k].type), self.end, f"staging copy of carry {k}").base
        return stages


# ---------------------------------------------------------------------------
# The checker


class _Groups:
    """Values that legitimately share bytes (views, in-place chains, a scan's results and their items)."""

    def __init__(self):
        self.of: dict = {}        # value key -> group id
        self.extent: dict = {}    # group id -> [first position, last position]
        self.loc: dict = {}       # group id -> (space, first byte, end byte)

    def new(self, key, space, lo, hi, start, end):
        gid = len(self.extent)
        self.of[key] = gid
        self.extent[gid] = [start, end]
        self.loc[gid] = (space, lo, hi)
        return gid

    def join(self, key, gid, start, end):
        self.of[key] = gid
        ext = self.extent[gid]
        ext[0], ext[1] = min(ext[0], start), max(ext[1], end)


def check_plan(mp: MemoryPlan) -> MemoryPlan:
    """Prove the plan from its graph: raise PlanError naming the two values that share
    bytes while both are live, or the value placed where it cannot be. Returns the plan."""
    for block in mp.blocks:
        if block.offset % ALIGN or block.offset < 0 or block.offset + block.nbytes > mp.peak_bytes:
            raise PlanError(f"{block!r} is not an aligned range inside the {mp.peak_bytes}-byte arena")
    _check_graph(mp, {}, "graph")
    return mp


def _check_graph(mp: MemoryPlan, region_sizes: dict, where: str):
    graph, order = mp.graph, mp.order
    _check_order(graph, order, where)
    pos, last = _live_ranges(graph, order)
    names = value_names(graph)
    end_pos = len(order)
    groups = _Groups()
    # A region outside the arena is its own address space.
    space_of = lambda loc: "arena" if isinstance(loc.base, Block) else loc.base  # noqa: E731
    start_of = lambda loc: loc.base.offset + loc.offset if isinstance(loc.base, Block) else loc.offset  # noqa: E731

    def fail(message):
        raise PlanError(f"{where}: {message}")

    def loc_of(node):
        if id(node) not in mp.locs:
            fail(f"value {names[id(node)]} ({node.op}) has no location")
        return mp.locs[id(node)]

    def bounds(key, loc, nbytes):
        lo = start_of(loc)
        if isinstance(loc.base, Block):
            if loc.offset < 0 or loc.offset + nbytes > loc.base.nbytes:
                fail(f"{key} ({nbytes} B at +{loc.offset}) does not fit its {loc.base!r}")
        elif loc.base in region_sizes and (loc.offset < 0 or loc.offset + nbytes > region_sizes[loc.base]):
            fail(f"{key} ({nbytes} B at +{loc.offset}) does not fit region {loc.base} "
                 f"({region_sizes[loc.base]} B)")
        return lo, lo + nbytes

    def fresh(key, loc, nbytes, start, end):
        if not isinstance(loc.base, Block):
            fail(f"{key} is written into {loc.base}, outside the arena, without being a view of it")
        lo, hi = bounds(key, loc, nbytes)
        return groups.new(key, "arena", lo, hi, start, end)

    def may_overwrite(gid, p, node, loc):
        """Joining group gid at position p by writing: the group must be dead, or die at p
        and be read only as an operand the op may overwrite."""
        if groups.extent[gid][1] < p:
            return True
        if groups.extent[gid][1] > p:
            return False
        for i in REGISTRY[node.op].inplace:
            u = node.inputs[i]
            if u.type == node.type and loc_of(u) == loc and groups.of[id(u)] == gid and \
                    mp.views.get(id(u)) is None and all(
                    o is u or groups.of[id(o)] != gid for o in node.inputs):
                return True
        return False

    # External regions (inputs, the scan's carries, slices, invariants) start as one group each.
    for n in graph.inputs:
        loc = loc_of(n)
        if isinstance(loc.base, Block):
            fail(f"input {names[id(n)]} is placed in the arena; inputs live outside it")
        lo, hi = bounds(names[id(n)], loc, nbytes(n.type))
        groups.new(id(n), space_of(loc), lo, hi, -1, last[id(n)])
    region_group = {mp.locs[id(n)].base: groups.of[id(n)] for n in graph.inputs}
    for region, size in region_sizes.items():
        if region.startswith("ys:"):
            region_group[region] = groups.new(region, region, 0, size, -1, -1)

    results: dict = {}                     # (id(scan), index) -> group of that result
    for p, node in enumerate(order):
        if node.op == "input":
            continue
        key, span = names[id(node)], (p, last[id(node)])
        if node.op == "scan":
            _check_scan(mp, node, p, groups, results, fresh, loc_of, bounds, names, where)
            continue
        if isinstance(node.type, tuple):
            if len(mp.results.get(id(node), ())) != len(node.type):
                fail(f"{key} = {node.op} has no location for each of its {len(node.type)} results")
            for j, (loc, t) in enumerate(zip(mp.results[id(node)], node.type)):
                results[(id(node), j)] = fresh((key, j), loc, nbytes(t), p, p)
            continue
        loc = loc_of(node)
        if node.op == "item":
            gid = results.get((id(node.inputs[0]), node.attrs["index"]))
            if gid is None or loc != mp.result(node.inputs[0], node.attrs["index"]):
                fail(f"{key} = item is not placed at its result")
            groups.join(id(node), gid, *span)
            continue
        if id(node) in mp.views:
            src = loc_of(node.inputs[0])
            layout = view_layout(node, mp.views.get(id(node.inputs[0])))
            if layout is None or layout[1] != mp.views[id(node)]:
                fail(f"{key} = {node.op} is planned as a view with strides {mp.views[id(node)]}, "
                     f"but its layout is {layout and layout[1]}")
            if loc != Loc(src.base, src.offset + layout[0]):
                fail(f"{key} = {node.op} is a view but is not placed at its operand's bytes (+{layout[0]})")
            if layout[1] is not None and any(o is node for o in graph.outputs):
                fail(f"{key} = {node.op} is a strided view and an output (outputs are dense)")
            groups.join(id(node), groups.of[id(node.inputs[0])], *span)
            continue
        # Written: into a dead or dying group's whole bytes, or fresh bytes.
        target = None
        if not isinstance(loc.base, Block):
            if not loc.base.startswith(("carry:", "ys:")) or loc.offset != 0:
                fail(f"{key} = {node.op} writes into {loc.base}, which is read-only here")
            target = region_group[loc.base]
        for i in REGISTRY[node.op].inplace:
            u = node.inputs[i]
            if loc_of(u) == loc and u.type == node.type:
                target = groups.of[id(u)]
        if target is not None:
            space, lo, hi = groups.loc[target]
            if (space, lo, hi) != (space_of(loc), *bounds(key, loc, nbytes(node.type))):
                fail(f"{key} = {node.op} overlaps part of another value's bytes")
            if not may_overwrite(target, p, node, loc):
                fail(f"{key} = {node.op} overwrites bytes still live (until position "
                     f"{groups.extent[target][1]}; written at {p})")
            groups.join(id(node), target, *span)
        else:
            fresh(id(node), loc, nbytes(node.type), *span)

    carries = [r for r in region_sizes if r.startswith("carry:")]
    copied = {r for r in carries if mp.locs[id(graph.outputs[int(r[6:])])] != Loc(r)}
    for r in sorted(copied):
        k = int(r[6:])
        if mp.locs[id(graph.outputs[k])].base in copied and k not in mp.stages:
            fail(f"carry {k} is copied from another carry that is overwritten too, without a staging block")
    for k, block in mp.stages.items():
        groups.new(("stage", k), "arena", *bounds(f"staging of carry {k}", Loc(block), block.nbytes),
                   end_pos, end_pos)
    _no_overlap(groups, names, fail)


def _check_order(graph: Graph, order, where: str):
    """The plan's order runs every op of the graph once, after its operands, inputs first."""
    if {id(n) for n in order} != {id(n) for n in graph.topo_order()} or len(order) != len(graph.topo_order()):
        raise PlanError(f"{where}: the plan's order does not hold exactly the graph's ops")
    if [id(n) for n in order[:len(graph.inputs)]] != [id(n) for n in graph.inputs]:
        raise PlanError(f"{where}: the plan's order does not start with the graph's inputs")
    seen = set()
    for n in order:
        if any(id(i) not in seen for i in n.inputs):
            raise PlanError(f"{where}: the plan runs {n.op} before one of its operands")
        seen.add(id(n))


def _check_scan(mp, node, p, groups, results, fresh, loc_of, bounds, names, where):
    sp = mp.scans.get(id(node))
    key = names[id(node)]
    if sp is None:
        raise PlanError(f"{where}: scan {key} has no plan")
    nc = node.attrs["num_carry"]
    ops = node.inputs
    if any(mp.views.get(id(o)) is not None for o in ops):
        raise PlanError(f"{where}: scan {key} reads a strided view as an operand (operands are dense)")
    if sp.arena.nbytes < sp.body.peak_bytes:
        raise PlanError(f"{where}: scan {key}: body arena {sp.arena.nbytes} B < body peak {sp.body.peak_bytes} B")
    fresh(("arena", key), Loc(sp.arena), sp.arena.nbytes, p, p)
    for k, loc in enumerate(sp.carries):
        u = ops[k]
        if loc == loc_of(u):
            gid = groups.of[id(u)]
            if groups.extent[gid][1] > p or sum(o is u for o in ops) != 1 or any(
                    o is not u and groups.of[id(o)] == gid for o in ops):
                raise PlanError(f"{where}: scan {key} updates carry {k} in place while its initial value "
                                f"is still needed")
            groups.join((key, k), gid, p, p)
            results[(id(node), k)] = gid
        else:
            results[(id(node), k)] = fresh((key, k), loc, nbytes(u.type), p, p)
    for j, loc in enumerate(sp.ys):
        if loc is not None:
            t = node.type[nc + j]
            results[(id(node), nc + j)] = fresh((key, nc + j), loc, nbytes(t), p, p)
    body: Graph = node.attrs["body"]
    nx = node.attrs["num_xs"]
    sizes = {}
    for i, t in enumerate(node.type[:nc]):
        sizes[f"carry:{i}"] = nbytes(t)
    for i, x in enumerate(ops[nc:nc + nx]):
        sizes[f"xs:{i}"] = nbytes(x.type) // max(node.attrs["length"], 1)
    for i, c in enumerate(ops[nc + nx:]):
        sizes[f"const:{i}"] = nbytes(c.type)
    for j, loc in enumerate(sp.ys):
        if loc is not None:
            sizes[f"ys:{j}"] = nbytes(body.outputs[nc + j].type)
    if sp.body.graph is not body:
        raise PlanError(f"{where}: scan {key}: the body plan is for another graph")
    _check_graph(sp.body, sizes, f"{where}: scan {key} body")


def _no_overlap(groups: _Groups, names, fail):
    """No two groups of one address space overlap in bytes while both are live."""
    by_space = defaultdict(list)
    for gid, (space, lo, hi) in groups.loc.items():
        if hi > lo:
            by_space[space].append((lo, hi, gid))
    key_of = defaultdict(list)
    for key, gid in groups.of.items():
        key_of[gid].append(key)

    def label(gid):
        k = key_of[gid][0]
        return names.get(k, str(k)) if isinstance(k, int) else str(k)

    for items in by_space.values():
        items.sort()
        for i, (lo, hi, g) in enumerate(items):
            s, e = groups.extent[g]
            for lo2, hi2, g2 in items[i + 1:]:
                if lo2 >= hi:
                    break
                s2, e2 = groups.extent[g2]
                if s <= e2 and s2 <= e:
                    fail(f"{label(g)} (bytes {lo}..{hi}, live {s}..{e}) and {label(g2)} "
                         f"(bytes {lo2}..{hi2}, live {s2}..{e2}) overlap")
