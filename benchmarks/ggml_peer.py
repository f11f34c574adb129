"""ggml's fused delta-rule op (`ggml_gated_delta_net`, ggml 0.25.3) as a CPU peer.

llama.cpp runs the Qwen3-Next and Kimi Linear layers through this op by default:
a token-by-token recurrent scan, split across (head, sequence) pairs. The C
harness (ggml_harness.c) builds the one-op graph on ggml's CPU backend; it is
compiled here, against lowering/ggml/build.py's build, into that build's cache
folder, and called with ctypes.

Layouts, from dnir's (those of flash-linear-attention) to ggml's:
- ggml lists dimensions innermost first: a C-order [B, T, H, K] array is ggml's
  [K, H, T, B], so q, k, v and the KDA gate pass as they are; the GDA gate and
  beta get a trailing axis of 1.
- ggml keeps each head's state transposed ([V, K] in C order): the state is
  transposed on the way in and on the way out.
- GQA: ggml's value head j reads q/k head j % H, dnir's reads j // (HV // H).
  The value heads (v, g, beta, state) are reordered so that both pair the same
  heads, and the outputs are put back in dnir's order.
- The op scales q by 1 / sqrt(K) itself (dnir's default scale) and needs K = V.

Reordering and copying into ggml's buffer happen once, before the timed calls,
as a llama.cpp graph finds its activations already in ggml's memory; a timed
call is one `ggml_backend_graph_compute`.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
from functools import lru_cache
from pathlib import Path

import numpy as np

from dnir.errors import BackendError, InputError

HARNESS_SOURCE = Path(__file__).with_name("ggml_harness.c")


def compile_against_ggml(source: Path, internal: bool = False) -> Path:
    """`source` compiled against lowering/ggml/build.py's build into a shared library in that build's
    cache folder (again only when the source changed); `internal`: with ggml's internal headers too.

    Raises lowering.ggml.build.GgmlUnavailable (a BackendError) naming what is missing.
    """
    from dnir.lowering.ggml.build import GgmlUnavailable, c_compiler, ggml_build
    build = ggml_build()
    text = source.read_bytes()
    library = build.root / f"{source.stem}-{hashlib.sha256(text).hexdigest()[:12]}.so"
    if not library.exists():
        cc = c_compiler(f"compiling {source.name}")
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        includes = [f"-I{build.include_dir}"] + ([f"-I{build.include_dir.parent / 'src'}"] if internal else [])
        cmd = [cc, "-O2", "-shared", "-fPIC", "-o", str(partial), str(source), *includes,
               f"-L{build.lib_dir}", "-lggml", "-lggml-cpu", "-lggml-base", f"-Wl,-rpath,{build.lib_dir}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise GgmlUnavailable(f"compiling {source.name} failed:\n{' '.join(cmd)}\n{done.stderr}")
        partial.replace(library)   # atomic: a second process never loads a half-written file
    return library


@lru_cache(maxsize=None)
def harness() -> ctypes.CDLL:
    """The compiled harness, loaded (compiled first when its source changed).

    Raises lowering.ggml.build.GgmlUnavailable (a BackendError) naming what is missing.
    """
    library = compile_against_ggml(HARNESS_SOURCE)
    lib = ctypes.CDLL(str(library))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.gdn_new.argtypes = [i64, i64, i64, i64, i64, ctypes.c_int, ctypes.c_int]
    lib.gdn_new.restype = ptr
    lib.gdn_set_inputs.argtypes = [ptr] * 7
    lib.gdn_set_inputs.restype = None
    lib.gdn_compute.argtypes = [ptr]
    lib.gdn_compute.restype = ctypes.c_int
    lib.gdn_outputs.argtypes = [ptr] * 3
    lib.gdn_outputs.restype = None
    lib.gdn_free.argtypes = [ptr]
    lib.gdn_free.restype = None
    return lib


def _pointer(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


class GgmlDeltaNet:
    """One `ggml_gated_delta_net` graph holding these inputs; `compute()` runs it.

    q, k [B, T, H, K]; v [B, T, HV, K]; g [B, T, HV] (GDA) or [B, T, HV, K] (KDA);
    beta [B, T, HV]; initial_state [B, HV, K, K] or None (zeros). Any float dtype
    (converted to float32).
    """

    def __init__(self, q, k, v, g, beta, initial_state=None, *, threads: int = 1):
        q, k, v, g, beta = (np.asarray(a, dtype=np.float32) for a in (q, k, v, g, beta))
        if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:2] != q.shape[:2]:
            raise InputError(f"q {q.shape}, k {k.shape}, v {v.shape}: expected q, k [B, T, H, K], v [B, T, HV, V]")
        B, T, H, D = q.shape
        HV = v.shape[2]
        if v.shape[3] != D or HV % H:
            raise InputError(f"ggml_gated_delta_net needs K = V and HV a multiple of H; got K={D}, V={v.shape[3]}, "
                             f"H={H}, HV={HV}")
        per_channel = g.ndim == 4
        if g.shape != (B, T, HV, D)[:g.ndim] or g.ndim not in (3, 4) or beta.shape != (B, T, HV):
            raise InputError(f"g {g.shape}, beta {beta.shape}: expected g [B, T, HV] or [B, T, HV, K], beta [B, T, HV]")
        state = (np.zeros((B, HV, D, D), np.float32) if initial_state is None
                 else np.asarray(initial_state, dtype=np.float32))
        if state.shape != (B, HV, D, D):
            raise InputError(f"initial_state {state.shape}: expected {(B, HV, D, D)}")
        if threads < 1:
            raise InputError(f"threads={threads}: expected a positive number")

        heads = np.arange(HV)
        self._order = (heads % H) * (HV // H) + heads // H      # ggml's value head j is dnir's head _order[j]
        o = self._order
        inputs = [q, k, v[:, :, o], g[:, :, o, None] if not per_channel else g[:, :, o], beta[:, :, o, None],
                  state[:, o].swapaxes(-1, -2)]
        inputs = [np.ascontiguousarray(a) for a in inputs]
        self._shape = (B, T, HV, D)
        self._lib = harness()
        self._run = self._lib.gdn_new(B, T, H, HV, D, int(per_channel), threads)
        if not self._run:
            raise MemoryError(f"ggml could not allocate the tensors of a {(B, T, HV, D)} gated_delta_net graph")
        self._lib.gdn_set_inputs(self._run, *map(_pointer, inputs))

    def compute(self):
        status = self._lib.gdn_compute(self._run)
        if status != 0:
            raise BackendError(f"ggml_backend_graph_compute returned status {status}")

    def outputs(self) -> tuple[np.ndarray, np.ndarray]:
        """(o [B, T, HV, V], final_state [B, HV, K, V]) of the last compute(), in dnir's layout and head order."""
        B, T, HV, D = self._shape
        o_ggml = np.empty((B, T, HV, D), np.float32)
        state_ggml = np.empty((B, HV, D, D), np.float32)
        self._lib.gdn_outputs(self._run, _pointer(o_ggml), _pointer(state_ggml))
        o, state = np.empty_like(o_ggml), np.empty_like(state_ggml)
        o[:, :, self._order] = o_ggml
        state[:, self._order] = state_ggml.swapaxes(-1, -2)
        return o, state

    def close(self):
        if self._run:
            self._lib.gdn_free(self._run)
            self._run = None

    def __del__(self):
        if getattr(self, "_run", None):
            self.close()


def gated_delta_net(q, k, v, g, beta, initial_state=None, *, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """One call of the op: (o, final_state), as dnir's functional API returns them."""
    run = GgmlDeltaNet(q, k, v, g, beta, initial_state, threads=threads)
    try:
        run.compute()
        return run.outputs()
    finally:
        run.close()
