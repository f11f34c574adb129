"""Where compiled TVM modules are kept on disk: one folder for every target.

`$DNIR_CACHE/tvm` (default `~/.cache/dnir/tvm`) holds `<key>.so`, one
exported library per graph and target; `layers/<key>.so` with `<key>.json`
(its inputs' names and dtypes, its outputs' names), one per delta-net layer
as the functional API runs it on a GPU; and `cuda/<hash>.fatbin`, the kernels
of CUDA libraries compiled by nvcc (by hash of the source and the
architecture). A module's key is the hash of

  - the graph's printed text (its every op, type and attribute), or for a
    layer its `DeltaNetConfig` (sizes, dtype, options) and optimisation level:
    a GPU server finds a layer without building its graph, which the target's
    pass context can only do where TVM's compiler is (the kernels' checks);
  - the target (llvm: with the host CPU; cuda: with the architecture);
  - TVM's version and the sources that decide what a graph compiles to
    (`code_hash`: the IR and models, dnir/, the passes and the kernels and
    schedules, lowering/tvm/).

Nothing here imports TVM's compiler, so a machine with the TVM runtime only
finds what another filled: a deployment copies the folder (the GPU bundle,
scripts/gpu_bundle.sh, carries one) and points `DNIR_CACHE` at its parent.
"""
from __future__ import annotations

import functools
import hashlib
import os
import threading
import weakref
from pathlib import Path

from dnir.graph import Graph
from dnir.text import print_graph

from .ggml.build import cache_root

_ROOT = Path(__file__).resolve().parent.parent
_HASHES: "weakref.WeakKeyDictionary[Graph, str]" = weakref.WeakKeyDictionary()


def graph_hash(graph: Graph) -> str:
    """The hash of the graph's printed text, printed once per graph object."""
    found = _HASHES.get(graph)
    if found is None:
        found = _HASHES[graph] = hashlib.sha256(print_graph(graph).encode()).hexdigest()
    return found


@functools.lru_cache(maxsize=None)
def code_hash(root: Path = _ROOT) -> str:
    """The hash of the sources that turn a graph into a module (in the checkout at `root`): a
    library made by other kernels, schedules or target passes is not reused."""
    digest = hashlib.sha256()
    sources = [*sorted((root / "lowering" / "tvm").glob("*.py")), *sorted((root / "passes").glob("*.py")),
               *sorted((root / "dnir").rglob("*.py"))]
    for source in sources:
        digest.update(str(source.relative_to(root)).encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def tvm_version() -> str:
    import tvm
    return tvm.__version__


def cache_dir() -> Path:
    return cache_root() / "tvm"


def module_path(graph: Graph, target: str) -> Path:
    """Where the library of `graph` compiled for `target` (a description naming everything the
    code depends on: "cuda sm_90", or llvm's target string with the CPU) is kept."""
    key = f"{graph_hash(graph)} {target} tvm-{tvm_version()} {code_hash()}"
    return cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.so"


def layer_path(cfg, opt: str, target: str) -> Path:
    """Where the module of the delta-net layer `cfg` at optimisation level `opt` compiled for
    `target` ("cuda sm_90") is kept (`.so`, and `.json` beside it: its interface)."""
    key = f"{cfg!r} opt={opt} {target} tvm-{tvm_version()} {code_hash()}"
    return cache_dir() / "layers" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.so"


def fatbin_path(source: str, arch: str) -> Path:
    """Where nvcc's fatbin of a CUDA library's kernel source for `arch` is kept."""
    digest = hashlib.sha256(f"{arch}\n".encode() + source.encode()).hexdigest()
    return cache_dir() / "cuda" / f"{digest}.fatbin"


def write_atomically(path: Path, write) -> None:
    """`write(partial_path)`, then the file renamed into place: another process never reads half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.partial{path.suffix}")
    write(str(partial))
    partial.replace(path)
