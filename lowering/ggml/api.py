"""The part of ggml's C API the backend calls, as ctypes declarations.

`SIGNATURES` is the one list of the graph-building functions the lowering
uses, each with its argument kinds after the leading `ggml_context *`: it
types the ctypes calls (`lib()`) and formats the exported C source
(export_c.py) alike. Kinds: T tensor, i int, I int64_t, z size_t, f float,
b bool.

ggml checks its preconditions with GGML_ASSERT, which aborts the process:
the lowering checks them first and raises a BackendError instead.
"""
from __future__ import annotations

import ctypes
import os
from functools import lru_cache

from .build import ggml_build

# enum ggml_type (ggml.h)
F32, F16, I32, BF16 = 0, 1, 26, 30
TYPE_NAMES = {F32: "GGML_TYPE_F32", F16: "GGML_TYPE_F16", I32: "GGML_TYPE_I32", BF16: "GGML_TYPE_BF16"}
# enum ggml_tri_type: which triangle ggml_tri keeps
TRI_UPPER_DIAG, TRI_UPPER, TRI_LOWER_DIAG, TRI_LOWER = 0, 1, 2, 3
TRI_NAMES = {TRI_UPPER_DIAG: "GGML_TRI_TYPE_UPPER_DIAG", TRI_UPPER: "GGML_TRI_TYPE_UPPER",
             TRI_LOWER_DIAG: "GGML_TRI_TYPE_LOWER_DIAG", TRI_LOWER: "GGML_TRI_TYPE_LOWER"}

SIGNATURES: dict[str, str] = {
    "ggml_new_tensor_1d": "iI", "ggml_new_tensor_2d": "iII", "ggml_new_tensor_3d": "iIII",
    "ggml_new_tensor_4d": "iIIII",
    "ggml_add": "TT", "ggml_sub": "TT", "ggml_mul": "TT", "ggml_div": "TT",
    "ggml_neg": "T", "ggml_exp": "T", "ggml_log": "T", "ggml_sigmoid": "T", "ggml_softplus": "T",
    "ggml_sqrt": "T", "ggml_step": "T", "ggml_cont": "T", "ggml_sum_rows": "T", "ggml_cumsum": "T",
    "ggml_scale": "Tf", "ggml_scale_bias": "Tff", "ggml_clamp": "Tff", "ggml_cast": "Ti",
    "ggml_fill": "Tf", "ggml_fill_inplace": "Tf", "ggml_arange": "fff", "ggml_tri": "Ti",
    "ggml_reshape_4d": "TIIII", "ggml_view_1d": "TIz", "ggml_view_4d": "TIIIIzzzz",
    "ggml_permute": "Tiiii", "ggml_repeat_4d": "TIIII", "ggml_pad_ext": "Tiiiiiiii",
    "ggml_concat": "TTi", "ggml_mul_mat": "TT", "ggml_solve_tri": "TTbbb", "ggml_get_rows": "TT",
    "ggml_set": "TTzzzz", "ggml_set_inplace": "TTzzzz", "ggml_acc": "TTzzzz", "ggml_acc_inplace": "TTzzzz", "ggml_set_1d_inplace": "TTz",
    "ggml_gated_delta_net": "TTTTTTI",
}

_CTYPES = {"T": ctypes.c_void_p, "i": ctypes.c_int, "I": ctypes.c_int64, "z": ctypes.c_size_t,
           "f": ctypes.c_float, "b": ctypes.c_bool}


class InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


# Context, graph, backend and allocator functions: name -> (restype, argtypes).
_P, _Z = ctypes.c_void_p, ctypes.c_size_t
_RUNTIME = {
    "ggml_init": (_P, [InitParams]), "ggml_free": (None, [_P]),
    "ggml_tensor_overhead": (_Z, []), "ggml_graph_overhead_custom": (_Z, [_Z, ctypes.c_bool]),
    "ggml_new_graph_custom": (_P, [_P, _Z, ctypes.c_bool]), "ggml_build_forward_expand": (None, [_P, _P]),
    "ggml_graph_n_nodes": (ctypes.c_int, [_P]),
    "ggml_set_name": (_P, [_P, ctypes.c_char_p]), "ggml_set_input": (None, [_P]), "ggml_set_output": (None, [_P]),
    "ggml_nbytes": (_Z, [_P]),
    "ggml_backend_cpu_init": (_P, []), "ggml_backend_cpu_set_n_threads": (None, [_P, ctypes.c_int]),
    "ggml_backend_free": (None, [_P]), "ggml_backend_get_default_buffer_type": (_P, [_P]),
    "ggml_backend_alloc_ctx_tensors": (_P, [_P, _P]), "ggml_backend_buffer_free": (None, [_P]),
    "ggml_backend_tensor_set": (None, [_P, _P, _Z, _Z]), "ggml_backend_tensor_get": (None, [_P, _P, _Z, _Z]),
    "ggml_backend_graph_compute": (ctypes.c_int, [_P, _P]),
    "ggml_gallocr_new": (_P, [_P]), "ggml_gallocr_free": (None, [_P]),
    "ggml_gallocr_alloc_graph": (ctypes.c_bool, [_P, _P]), "ggml_gallocr_get_buffer_size": (_Z, [_P, ctypes.c_int]),
}


@lru_cache(maxsize=None)
def lib() -> ctypes.CDLL:
    """ggml's libraries loaded (built first if needed), every function used here typed.

    Raises build.GgmlUnavailable when ggml cannot be built on this machine.
    """
    # On a failed GGML_ASSERT ggml attaches gdb to print a backtrace before aborting (minutes);
    # the lowering checks ggml's preconditions itself, so an abort is a bug to report, not to trace.
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    build = ggml_build()
    handle = None
    for path in build.libraries:   # each needs the ones before it: load them globally, in order
        handle = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    for name, kinds in SIGNATURES.items():
        fn = getattr(handle, name)
        fn.restype = ctypes.c_void_p
        fn.argtypes = [ctypes.c_void_p] + [_CTYPES[k] for k in kinds]
    for name, (restype, argtypes) in _RUNTIME.items():
        fn = getattr(handle, name)
        fn.restype, fn.argtypes = restype, argtypes
    return handle
