"""The core's layers point one way: IR <- analysis <- passes <- lowering <- models/api/cli.

A module may import its own layer and the layers below it, never one above. The
check reads the modules' own import statements (at any depth, so an import inside a
function counts: it would only hide a cycle), and each layer is also imported first in
a fresh interpreter, so that no import order is needed for it to load.

Package __init__ files: a package's __init__ re-exports its own modules and belongs
to that package's layer (dnir.analysis, dnir.passes, dnir.lowering, ...), except the
top package `dnir`, whose __init__ is the public facade that assembles every layer
(it re-exports api, runs lowering): it is in the top layer. Importing dnir.ops runs
dnir/__init__.py first, as Python runs every parent package; that is the interpreter
loading the facade, not an import of dnir.ops, so the graph has no edge for it.
"""
import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"dnir": ROOT / "dnir", "dnir.passes": ROOT / "passes", "dnir.lowering": ROOT / "lowering"}
IR = ("dnir.types", "dnir.graph", "dnir.ops", "dnir.fused", "dnir.intra_chunk", "dnir.builder", "dnir.text", "dnir.verify",
      "dnir.errors", "dnir.limits", "dnir.files")
LAYERS = ("IR", "analysis", "passes", "lowering", "models/api/cli")

# An import inside a function is legitimate, not a cycle-dodge, when the module it loads
# needs an optional install (pyproject's extras: TVM and its WebGPU runtime, torch, graphviz,
# the benchmarks' peers) when imported: dnir runs without them until that feature is used.
OPTIONAL = {"tvm", "wgpu", "torch", "graphviz", "fla", "einops", "matplotlib", "threadpoolctl"}

# Imports still to remove, each named with what has to move; the tests fail when one goes
# (delete its entry then) or a new one comes.
NO_OPTIONAL_DEPENDENCY = "needs no optional install and closes no cycle: it belongs at the top of the module"
KNOWN: dict[tuple[str, str], str] = {
    ("dnir.lowering.runtime_loader", "dnir.lowering.numpy_backend"): NO_OPTIONAL_DEPENDENCY,
    ("dnir.lowering.tvm.backends", "dnir.lowering.runtime_loader"): NO_OPTIONAL_DEPENDENCY,
    ("dnir.lowering.tvm.compile", "dnir.lowering.numpy_backend"): NO_OPTIONAL_DEPENDENCY,
    ("dnir.lowering.vulkan", "dnir.lowering.numpy_backend"): NO_OPTIONAL_DEPENDENCY,
}


def layer_of(module: str) -> int:
    if module in IR or any(module.startswith(m + ".") for m in IR):
        return 0
    for i, package in enumerate(("dnir.analysis", "dnir.passes", "dnir.lowering"), 1):
        if module == package or module.startswith(package + "."):
            return i
    return 4


def source_modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            if package == "dnir" and parts[:1] in (("passes",), ("lowering",)):
                continue    # not a source folder of its own (the packages map to passes/, lowering/)
            modules[name] = path
    return modules


def imports_of(module: str, path: Path, known) -> list[tuple[str, int, bool]]:
    """(imported dnir module, line, inside a function) for each import statement."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import name` imports the submodule pkg.name when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "dnir":
                found.append((target, node.lineno, id(node) in nested))
    return found


def import_graph() -> nx.DiGraph:
    """dnir's modules, an edge per import; a module's `optional` says whether it imports an
    optional install at its top level."""
    modules = source_modules()
    graph = nx.DiGraph()
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        top |= {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and not n.level and n.module}
        graph.add_node(module, optional=any(name.split(".")[0] in OPTIONAL for name in top))
        for target, line, lazy in imports_of(module, path, modules):
            graph.add_edge(module, target, line=line, lazy=lazy)
    return graph


def needs_optional_install(graph: nx.DiGraph, module: str) -> bool:
    """Importing `module` imports an optional install (itself or through top-level imports)."""
    eager = graph.edge_subgraph((a, b) for a, b, d in graph.edges(data=True) if not d["lazy"])
    reached = {module} | (nx.descendants(eager, module) if module in eager else set())
    return any(graph.nodes[m].get("optional") for m in reached if m in graph)


def test_no_module_imports_a_higher_layer():
    graph = import_graph()
    offending = [f"{a} (layer {LAYERS[layer_of(a)]}) imports {b} (higher layer {LAYERS[layer_of(b)]}) "
                 f"at line {d['line']}"
                 for a, b, d in graph.edges(data=True) if layer_of(b) > layer_of(a) and (a, b) not in KNOWN]
    assert not offending, "\n".join(offending)


def test_the_core_has_no_import_cycle_and_no_function_level_import_of_dnir():
    graph = import_graph()
    core = graph.subgraph(m for m in graph if layer_of(m) < 4)
    lazy = {(a, b): f"{a} imports {b} inside a function (line {d['line']})" for a, b, d in core.edges(data=True)
            if d["lazy"] and not needs_optional_install(graph, b)}
    assert set(lazy) == set(KNOWN), "\n".join(
        [lazy[e] for e in set(lazy) - set(KNOWN)] + [f"{a} -> {b} is gone: delete it from KNOWN" for a, b in
                                                     set(KNOWN) - set(lazy)])
    cycles = list(nx.simple_cycles(core.edge_subgraph(e for e in core.edges if e not in KNOWN)))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles)


def test_the_check_reads_relative_and_function_level_imports(tmp_path):
    source = tmp_path / "memory.py"
    source.write_text("from ..ops import REGISTRY\n\ndef f():\n    from dnir.passes import rewrite\n")
    found = imports_of("dnir.analysis.memory", source, {"dnir.passes.rewrite"})
    assert found == [("dnir.ops", 1, False), ("dnir.passes.rewrite", 4, True)]
    assert layer_of("dnir.passes.rewrite") > layer_of("dnir.analysis.memory") > layer_of("dnir.ops")
    graph = import_graph()
    assert needs_optional_install(graph, "dnir.lowering.tvm.translate")      # imports tvm at its top
    assert not needs_optional_install(graph, "dnir.lowering.numpy_backend")


@pytest.mark.parametrize("module", ["dnir.ops", "dnir.analysis.memory", "dnir.analysis.ranges",
                                    "dnir.passes.manager", "dnir.lowering.numpy_arena"])
def test_each_layer_imports_first_in_a_fresh_interpreter(module):
    done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
