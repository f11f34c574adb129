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

`cuda_vm` finds a graph's module in the same cache, where the functional API
looks (dnir/api.py with CUDA tensors): compiled there first when TVM's
compiler is installed, else a BackendError that says how to fill the cache
(`dnir compile --cache`, scripts/gpu_bundle.sh). `run_dlpack` runs it on
tensors that cross by DLPack both ways, without a copy.

Nothing here imports `tvm.relax`; it runs with `TVM_USE_RUNTIME_LIB=1` and a
TVM package stripped of `libtvm_compiler.so`.
"""
from __future__ import annotations

import ctypes
import glob
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from dnir.errors import BackendError

from .module_cache import fatbin_path, module_path, write_atomically

DEFAULT_ARCH = os.environ.get("DNIR_CUDA_ARCH", "sm_90")
_STATE = {"loaded": False, "arch": None, "nvcc_runs": 0}   # nvcc_runs: compiles the cache did not spare
_VMS: dict[tuple, object] = {}      # (library path, device) -> (VM, its main, device)
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


def nvcc_compile(source: str, arch: str = DEFAULT_ARCH) -> bytearray:
    """A fatbin of `source` for `arch`, from the module cache when the same source was compiled before."""
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


def prebuild(graph, arch: str = DEFAULT_ARCH, build=None) -> Path:
    """Compile `graph` for CUDA into the module cache, with nvcc's fatbin of its kernels when
    nvcc is here (then loading it runs no compiler); its path. `build` makes the executable
    (default: the cuda backend's, which runs the target's pipeline on the graph first)."""
    from .registry import build as backend_build
    from .tvm.compile import cuda_source
    path = module_path(graph, cuda_target(arch))
    if path.exists():
        return path
    ex = build() if build is not None else backend_build(graph, "cuda", arch=arch)
    write_atomically(path, ex.export_library)
    try:
        nvcc_compile(cuda_source(ex), arch)
    except BackendError as e:
        if "nvcc not found" not in str(e):
            raise
    return path


def cuda_vm(graph, arch: str = DEFAULT_ARCH, device: int = 0, build=None):
    """(VM, its main function, TVM device) running `graph` on CUDA device `device`, its module from the
    cache (compiled into it first where TVM's compiler is installed); one VM per module and device."""
    path = module_path(graph, cuda_target(arch))
    with _LOCK:
        found = _VMS.get((path, device))
    if found is not None:
        return found
    if not path.exists():
        if not compiler_available():
            raise BackendError(f"no compiled CUDA module for this graph ({arch}) in {path.parent}, and TVM's "
                               f"compiler is not installed here to make one: fill the cache where it is "
                               f"(`dnir compile FILE.dnir --target cuda --arch {arch} --cache`, or "
                               f"scripts/gpu_bundle.sh for the benchmark's layers) and copy that folder here, "
                               f"or point DNIR_CACHE at its parent (now {path.parent.parent})")
        prebuild(graph, arch, build)
    vm, dev = load_executable(path, device, arch)
    with _LOCK:
        found = _VMS.setdefault((path, device), (vm, vm["main"], dev))
    return found


def run_dlpack(graph, tensors, arch: str = DEFAULT_ARCH, device: int = 0, stream: int | None = None) -> list:
    """Run `graph` on CUDA on tensors that support DLPack (contiguous, 64-byte aligned, on GPU
    `device`), in the graph's input order, on `stream` (a raw CUDA stream; None: TVM's current one).
    The outputs are TVM tensors: `torch.from_dlpack` takes them without a copy."""
    import tvm
    import tvm_ffi
    _, main, dev = cuda_vm(graph, arch, device)
    args = [tvm.runtime.from_dlpack(t) for t in tensors]
    if stream is None:
        return list(main(*args))
    with tvm_ffi.use_raw_stream(dev, stream):
        return list(main(*args))


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
