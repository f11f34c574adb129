"""Run an exported CUDA artefact with the TVM runtime only (no compiler library).

This is how a compiled dnir model is deployed to a GPU server: the `.so` from
`dnir compile FILE.dnir --target cuda -o model.so` holds the host code and the
CUDA *source* of the kernels; TVM compiles that source when the module is
loaded, through the global function `tvm_callback_cuda_compile`. The default
callback needs TVM's compiler library, so this module registers one that
runs nvcc (cached by source hash), loads the CUDA runtime itself, and drives
the Relax VM through `tvm.runtime.vm.VirtualMachine` (`tvm.relax` is not part
of the runtime).

Nothing here imports `tvm.relax`; it runs with `TVM_USE_RUNTIME_LIB=1` and a
TVM package stripped of `libtvm_compiler.so`.
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from dnir.errors import BackendError

DEFAULT_ARCH = os.environ.get("DNIR_CUDA_ARCH", "sm_90")
CACHE_DIR = Path(os.environ.get("DNIR_CUDA_CACHE", Path(tempfile.gettempdir()) / "dnir-cuda-cache"))
_STATE = {"loaded": False, "arch": None}


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
    """A fatbin of `source` for `arch`, from the cache when the same source was compiled before."""
    key = hashlib.sha256(f"{arch}\n{source}".encode()).hexdigest()
    cached = CACHE_DIR / f"{key}.fatbin"
    if cached.exists():
        return bytearray(cached.read_bytes())
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
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
    tmp_path = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp_path.write_bytes(data)
    tmp_path.replace(cached)
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


def run_cuda(graph, inputs, arch: str = DEFAULT_ARCH) -> list[np.ndarray]:
    """Compile `graph` for CUDA (needs the full TVM install), export it and run it with the runtime."""
    import tvm

    from .numpy_backend import prepare_inputs
    from .tvm.compile import build, graph_hash

    load_cuda_support(arch)
    if not tvm.cuda(0).exist:
        raise BackendError("no CUDA device on this machine; `dnir compile FILE --target cuda -o model.so` "
                           "exports the model for a GPU server")
    arrays = prepare_inputs(graph, inputs)
    path = CACHE_DIR / f"{graph_hash(graph)}-{arch}.so"
    if not path.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        build(graph, "cuda", arch).export_library(str(path))
    vm, dev = load_executable(path, 0, arch)
    return run_executable(vm, dev, arrays)
