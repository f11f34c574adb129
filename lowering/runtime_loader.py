"""Run an exported CUDA artefact with the TVM runtime only (no compiler library).

This is how a compiled dnir model is deployed to a GPU server: the `.so` from
`dnir compile FILE.dnir --target cuda -o model.so` holds the host code and the
CUDA *source* of the kernels; TVM compiles that source when the module is
loaded, through the global function `tvm_callback_cuda_compile`. The default
callback needs TVM's compiler library, so this module registers one that
takes nvcc's fatbin from the module cache (lowering/module_cache.py:
`$DNIR_CACHE/tvm/cuda`, filled where the module was compiled) or runs nvcc,
loads the CUDA runtime itself, and drives the Relax VM through
`tvm.runtime.vm.VirtualMachine` (`tvm.relax` is not part of the runtime).

`cuda_layer` finds a delta-net layer's module in the same cache by the
layer's options, where the functional API looks (dnir/api.py with CUDA
tensors), without building its graph: compiled there first when TVM's
compiler is installed, else a BackendError that says how to fill the cache
(`dnir compile --cache`, scripts/gpu_bundle.sh). `run_layer` runs it on
tensors that cross by DLPack both ways, without a copy. `cuda_vm` does the
same for any graph, by the graph's hash.

Nothing here imports `tvm.relax`; it runs with `TVM_USE_RUNTIME_LIB=1` and a
TVM package stripped of `libtvm_compiler.so`.
"""
from __future__ import annotations

import ctypes
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dnir.errors import BackendError

from .registry import build as backend_build
from .module_cache import cache_dir, fatbin_path, layer_path, module_path, write_atomically

DEFAULT_ARCH = os.environ.get("DNIR_CUDA_ARCH", "sm_90")
_STATE = {"loaded": False, "arch": None, "nvcc_runs": 0}   # nvcc_runs: compiles the cache did not spare
_VMS: dict[tuple, object] = {}      # (library path, device) -> (VM, its main, device)
_LAYERS: dict[tuple, object] = {}   # (layer config, opt, arch, device) -> Layer
_LOCK = threading.Lock()


def _find_cudart() -> str | None:
    """libcudart from an installed nvidia pip package, CUDA_HOME, or the system."""
    patterns = [os.path.join(p, "nvidia", "**", "libcudart.so*") for p in sys.path if p]
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    patterns += [os.path.join(cuda_home, "lib64", "libcudart.so*"), os.path.join(cuda_home, "lib", "libcudart.so*")]
    for pattern in patterns:
        found = sorted(glob.glob(pattern, recursive=True))
        if found:
            return found[-1]
    import ctypes.util
    return ctypes.util.find_library("cudart")


# Blocks per SM a kernel asks nvcc for (__launch_bounds__'s second argument, which caps its
# registers). intra_chunk: 169-176 registers a thread left one 256-thread block per SM; at 3
# (80 registers, 300 B spilled) it ran 1.69 -> 1.16 ms (GDA) and 2.91 -> 2.16 ms (KDA) at
# (1, 8192, 32, 128) on an H200 (benchmarks/results/gpu_sweep.md). intra_chunk_mma (KDA) likewise on an
# H100: 1.83 (1 block), 1.44 (2), 1.40 ms (3); since its products run by rows of tiles, 2 blocks beat 3:
# 0.541 against 0.627 ms (GDA, TF32), 0.914 against 0.995 (KDA) (gpu_sweep_rows.md).
MIN_BLOCKS_PER_SM = {"intra_chunk_kernel": 3, "intra_chunk_mma_kernel": 2}


def with_launch_bounds(source: str, min_blocks: dict[str, int] = MIN_BLOCKS_PER_SM) -> str:
    """TVM's CUDA source with `min_blocks` (kernel name -> blocks per SM) in the named kernels'
    __launch_bounds__."""
    for name, blocks in min_blocks.items():
        source = re.sub(rf"__launch_bounds__\((\d+)\) {name}\(", rf"__launch_bounds__(\1, {blocks}) {name}(", source)
    return source


def nvcc_compile(source: str, arch: str = DEFAULT_ARCH) -> bytearray:
    """A fatbin of `source` for `arch` (with_launch_bounds applied), from the module cache when the
    same source was compiled before."""
    source = with_launch_bounds(source)
    cached = fatbin_path(source, arch)
    if cached.exists():
        return bytearray(cached.read_bytes())
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        src.write_text(source)
        cmd = ["nvcc", "-O3", "--fatbin", f"-arch={arch}", "-o", str(out), str(src)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError:
            raise BackendError("nvcc not found: add the CUDA toolkit's bin folder to PATH") from None
        if proc.returncode != 0:
            raise BackendError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
        data = out.read_bytes()
    _STATE["nvcc_runs"] += 1
    write_atomically(cached, lambda path: Path(path).write_bytes(data))
    return bytearray(data)


def load_cuda_support(arch: str = DEFAULT_ARCH):
    """Load libcudart and TVM's CUDA runtime, and compile kernels with nvcc for `arch`."""
    if _STATE["loaded"]:
        _STATE["arch"] = arch
        return
    import tvm
    import tvm_ffi

    cudart = _find_cudart()
    if cudart is None:
        raise BackendError("libcudart not found: install the CUDA runtime (e.g. the nvidia-cuda-runtime pip "
                           "package) or set CUDA_HOME")
    runtime_cuda = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    if not runtime_cuda.exists():
        raise BackendError(f"{runtime_cuda} is missing: this TVM install has no CUDA runtime")
    try:
        ctypes.CDLL(cudart, mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(runtime_cuda), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise BackendError(f"cannot load the CUDA runtime ({e}); is there an NVIDIA driver on this machine? "
                           f"`dnir compile FILE --target cuda -o model.so` exports a model for a GPU server") from None
    _STATE["arch"] = arch

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _compile(code, *_):
        return nvcc_compile(code, _STATE["arch"])

    _STATE["loaded"] = True


def load_executable(path: str, device: int = 0, arch: str = DEFAULT_ARCH):
    """A Relax VM for an exported CUDA artefact on GPU `device`."""
    import tvm
    load_cuda_support(arch)
    dev = tvm.cuda(device)
    if not dev.exist:
        raise BackendError(f"no CUDA device {device} on this machine")
    lib = tvm.runtime.load_module(str(path))
    from tvm.runtime.vm import VirtualMachine  # not imported by `tvm` itself in a runtime-only install
    return VirtualMachine(lib, dev), dev


def run_executable(vm, dev, arrays) -> list[np.ndarray]:
    import tvm
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays])
    return [o.numpy() for o in out]


def compiler_available() -> bool:
    """Whether TVM's compiler is installed here (a runtime-only install has no tvm.relax)."""
    try:
        import tvm.relax  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure to import it means: no compiler here
        return False
    return True


def cuda_target(arch: str) -> str:
    """The target part of a CUDA module's cache key."""
    return f"cuda {arch}"


def _export(path: Path, ex, arch: str):
    """The executable into the cache at `path`, with nvcc's fatbin of its kernels when nvcc is here
    (then loading it runs no compiler)."""
    from .tvm.compile import cuda_source
    write_atomically(path, ex.export_library)
    try:
        nvcc_compile(cuda_source(ex), arch)
    except BackendError as e:
        if "nvcc not found" not in str(e):
            raise


def _missing(path: Path, what: str, arch: str) -> BackendError:
    return BackendError(f"no compiled CUDA module for {what} ({arch}) in {path.parent}, and TVM's compiler is "
                        f"not installed here to make one: fill the cache where it is (`dnir compile LAYER.dnir "
                        f"--target cuda --arch {arch} --cache` for a layer from `dnir build`, or "
                        f"scripts/gpu_bundle.sh for the benchmark's layers) and copy that folder here, or point "
                        f"DNIR_CACHE at its parent (now {cache_dir().parent})")


def _load(path: Path, device: int, arch: str):
    with _LOCK:
        found = _VMS.get((path, device))
    if found is None:
        vm, dev = load_executable(path, device, arch)
        with _LOCK:
            found = _VMS.setdefault((path, device), (vm, vm["main"], dev))
    return found


def cuda_vm(graph, arch: str = DEFAULT_ARCH, device: int = 0, build=None):
    """(VM, its main function, TVM device) running `graph` on CUDA device `device`, its module from the
    cache, keyed by the graph (compiled into it first where TVM's compiler is installed, by `build`,
    default the cuda backend's); one VM per module and device."""
    path = module_path(graph, cuda_target(arch))
    if not path.exists():
        if not compiler_available():
            raise _missing(path, "this graph", arch)
        _export(path, build() if build is not None else backend_build(graph, "cuda", arch=arch), arch)
    return _load(path, device, arch)


@dataclass(frozen=True)
class Layer:
    """A delta-net layer's module loaded on a GPU, and its interface."""
    vm: object
    main: object
    device: object
    input_names: tuple
    input_dtypes: tuple     # dnir dtype names ("f32", "bf16")
    output_names: tuple


def prebuild_layer(cfg, opt: str, graph, arch: str = DEFAULT_ARCH) -> Path:
    """Compile the layer `cfg` at level `opt`, whose graph (built in the cuda target's context) is
    `graph`, into the module cache under the layer's key, with its interface beside it."""
    path = layer_path(cfg, opt, cuda_target(arch))
    if not path.exists():
        interface = {"input_names": list(graph.input_names), "input_dtypes": [t.dtype for t in graph.input_types],
                     "output_names": list(graph.output_names)}
        write_atomically(path.with_suffix(".json"), lambda p: Path(p).write_text(json.dumps(interface) + "\n"))
        _export(path, backend_build(graph, "cuda", arch=arch), arch)
    return path


def cuda_layer(cfg, opt: str, graph=None, arch: str = DEFAULT_ARCH, device: int = 0) -> Layer:
    """The layer `cfg` at level `opt` on CUDA device `device`, from the module cache by the layer's key:
    no graph is built for it. Missing there, it is compiled into the cache first where TVM's compiler
    is installed (`graph()` gives its graph), else a BackendError says how to fill the cache."""
    key = (cfg, opt, arch, device)
    found = _LAYERS.get(key)     # a call per decode step: no hashing, file or lock once loaded
    if found is not None:
        return found
    path = layer_path(cfg, opt, cuda_target(arch))
    if not path.exists():
        if graph is None or not compiler_available():
            raise _missing(path, f"the layer {cfg}", arch)
        prebuild_layer(cfg, opt, graph(), arch)
    vm, main, dev = _load(path, device, arch)
    interface = json.loads(path.with_suffix(".json").read_text())
    layer = Layer(vm, main, dev, tuple(interface["input_names"]), tuple(interface["input_dtypes"]),
                  tuple(interface["output_names"]))
    with _LOCK:
        return _LAYERS.setdefault(key, layer)


def run_layer(layer: Layer, tensors, stream: int | None = None) -> list:
    """Run a layer on tensors that support DLPack (contiguous, 64-byte aligned, on the layer's GPU),
    in its input order, on `stream` (a raw CUDA stream; None: TVM's current one). The outputs are
    TVM tensors: `torch.from_dlpack` takes them without a copy."""
    import tvm
    import tvm_ffi
    args = [tvm.runtime.from_dlpack(t) for t in tensors]
    if stream is None:
        return list(layer.main(*args))
    with tvm_ffi.use_raw_stream(layer.device, stream):
        return list(layer.main(*args))


def run_cuda(graph, inputs, arch: str = DEFAULT_ARCH) -> list[np.ndarray]:
    """Run `graph` (prepared for the cuda target) with the runtime, its module from the cache
    (compiled and exported there first; the compile needs the full TVM install)."""
    import tvm

    from .numpy_backend import prepare_inputs
    from .tvm.compile import build

    load_cuda_support(arch)
    if not tvm.cuda(0).exist:
        raise BackendError("no CUDA device on this machine; `dnir compile FILE --target cuda -o model.so` "
                           "exports the model for a GPU server")
    arrays = prepare_inputs(graph, inputs)
    vm, _, dev = cuda_vm(graph, arch, 0, build=lambda: build(graph, "cuda", arch))
    return run_executable(vm, dev, arrays)
