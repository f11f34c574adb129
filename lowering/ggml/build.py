"""ggml 0.25.3 as shared libraries for this machine, built once from source.

The source is the one llama-cpp-python 0.3.36 vendors (its source distribution
holds llama.cpp with ggml 0.25.3). It is built CPU-only, Release, for the host
CPU (GGML_NATIVE), with OpenMP, as shared libraries that Python loads with
ctypes and that C code links against. The build lives outside the repository,
in `$DNIR_CACHE` (default `~/.cache/dnir`) under a folder named for the ggml
version and the host's CPU features, so that a fresh clone on the same machine
reuses it and a different CPU gets its own. A file lock serialises the build
between processes (pytest -n 2 starts two at once).

    make ggml     # build if needed, print the paths (build.main)
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from dnir.errors import BackendError

GGML_VERSION = "0.25.3"
SDIST = "llama-cpp-python==0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
GGML_IN_SDIST = "llama_cpp_python-0.3.36/vendor/llama.cpp/ggml"
# Loading order: each library needs the ones before it.
LIBRARIES = ("ggml-base", "ggml-cpu", "ggml")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=ON", "-DGGML_OPENMP=ON",
    "-DGGML_BUILD_TESTS=OFF", "-DGGML_BUILD_EXAMPLES=OFF",
    # CPU only, whatever else the machine has.
    "-DGGML_CUDA=OFF", "-DGGML_VULKAN=OFF", "-DGGML_METAL=OFF", "-DGGML_BLAS=OFF",
    # llama.cpp's own build turns on the llamafile sgemm for float32 matrix products (ggml alone
    # leaves it off): the ggml that users run.
    "-DGGML_LLAMAFILE=ON",
)


class GgmlUnavailable(BackendError):
    """ggml cannot be built here; the message names what is missing (a tool, the network)."""


@dataclass(frozen=True)
class GgmlBuild:
    root: Path                    # this build's cache folder
    include_dir: Path             # ggml.h, ggml-backend.h, ggml-cpu.h
    lib_dir: Path
    libraries: tuple[Path, ...]   # the shared libraries, in LIBRARIES' loading order


def cache_root() -> Path:
    return Path(os.environ.get("DNIR_CACHE") or Path.home() / ".cache" / "dnir")


def _cpu_key() -> str:
    """A short hash of what a native build depends on: architecture, CPU feature flags, cmake flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        flags = platform.processor()
    return hashlib.sha256(f"{platform.machine()} {flags} {CMAKE_FLAGS}".encode()).hexdigest()[:12]


def build_dir() -> Path:
    return cache_root() / f"ggml-{GGML_VERSION}-{_cpu_key()}"


def _library_file(lib_dir: Path, name: str) -> Path:
    suffix = {"Darwin": ".dylib", "Windows": ".dll"}.get(platform.system(), ".so")
    return lib_dir / f"lib{name}{suffix}"


def _found(root: Path) -> GgmlBuild | None:
    lib_dir = root / "build" / "src"
    if not (root / "complete").exists():
        return None
    return GgmlBuild(root, root / "src" / "include", lib_dir, tuple(_library_file(lib_dir, n) for n in LIBRARIES))


C_COMPILER = ("CC", ("cc", "gcc", "clang"), "a C compiler (cc, gcc or clang; or set CC)")
CXX_COMPILER = ("CXX", ("c++", "g++", "clang++"), "a C++ compiler (c++, g++ or clang++; or set CXX)")


def _find(tool) -> str | None:
    variable, names, _ = tool
    chosen = os.environ.get(variable) or next((n for n in names if shutil.which(n)), None)
    return chosen if chosen is not None and shutil.which(chosen) else None


def c_compiler(purpose: str) -> str:
    """The C compiler to build with (CC, else cc, gcc or clang); GgmlUnavailable naming `purpose` if none."""
    cc = _find(C_COMPILER)
    if cc is None:
        raise GgmlUnavailable(f"{purpose} needs {C_COMPILER[2]}: none found on PATH")
    return cc


def _require_tools() -> tuple[str, str]:
    cc, cxx = _find(C_COMPILER), _find(CXX_COMPILER)
    missing = [what for what, found in (("cmake", shutil.which("cmake")), (C_COMPILER[2], cc), (CXX_COMPILER[2], cxx))
               if found is None]
    if missing:
        raise GgmlUnavailable(f"building ggml {GGML_VERSION} needs {' and '.join(missing)}: none found on PATH")
    return cc, cxx


def _run(step: str, cmd: list[str], log: Path):
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise GgmlUnavailable(f"{step} failed (exit {done.returncode}); full log {log}:\n{tail}")


def _download(root: Path, log: Path) -> Path:
    sdist = root / SDIST_FILE
    if sdist.exists():
        return sdist
    partial = root / "download"
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", SDIST, "-d", str(partial)]
    try:
        _run(f"downloading the {SDIST} source distribution (needs the network or a package index)", cmd, log)
    except GgmlUnavailable as e:
        raise GgmlUnavailable(f"{e}\nor place {SDIST_FILE} in {root}") from None
    (partial / SDIST_FILE).replace(sdist)
    shutil.rmtree(partial)
    return sdist


def _unpack(sdist: Path, src: Path):
    """Only ggml's folder of the source distribution, as `src`."""
    shutil.rmtree(src, ignore_errors=True)
    staging = src.parent / "unpack"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(GGML_IN_SDIST + "/")]
        if not members:
            raise GgmlUnavailable(f"{sdist} holds no {GGML_IN_SDIST}/: not the expected source distribution")
        tar.extractall(staging, members=members, filter="data")
    (staging / GGML_IN_SDIST).replace(src)
    shutil.rmtree(staging)
    # ggml's CMakeLists configures a pkg-config file from this template, which the sdist leaves out.
    (src / "ggml.pc.in").touch()


def _build(root: Path):
    cc, cxx = _require_tools()
    root.mkdir(parents=True, exist_ok=True)
    log = root / "build.log"
    log.write_text("")
    src, build = root / "src", root / "build"
    _unpack(_download(root, log), src)
    shutil.rmtree(build, ignore_errors=True)
    _run("configuring ggml with cmake", ["cmake", "-S", str(src), "-B", str(build), f"-DCMAKE_C_COMPILER={cc}",
                                         f"-DCMAKE_CXX_COMPILER={cxx}", *CMAKE_FLAGS], log)
    _run("building ggml", ["cmake", "--build", str(build), "--parallel", str(os.cpu_count() or 1),
                           "--target", *LIBRARIES], log)
    for name in LIBRARIES:
        if not _library_file(build / "src", name).exists():
            raise GgmlUnavailable(f"the ggml build made no {_library_file(build / 'src', name)}; log {log}")
    (root / "complete").touch()


_failed: list[GgmlUnavailable] = []   # a build that failed is not tried again by the same process


def ggml_build() -> GgmlBuild:
    """This machine's ggml build, built first if needed (about 2 minutes on 2 cores).

    Raises GgmlUnavailable, naming the missing tool or the failed step, when it cannot be built.
    """
    if _failed:
        raise _failed[0]
    try:
        return _ggml_build()
    except GgmlUnavailable as e:
        _failed.append(e)
        raise


@lru_cache(maxsize=None)
def _ggml_build() -> GgmlBuild:
    root = build_dir()
    found = _found(root)
    if found is not None:
        return found
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # another process may be building it: wait, then use its build
        found = _found(root)
        if found is None:
            _build(root)
            found = _found(root)
    return found


def main() -> int:
    try:
        b = ggml_build()
    except GgmlUnavailable as e:
        print(f"ggml: {e}", file=sys.stderr)
        return 1
    print(f"ggml {GGML_VERSION} in {b.root}\ninclude {b.include_dir}")
    for lib in b.libraries:
        print(f"library {lib}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
