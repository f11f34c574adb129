"""The functional API, drop-in for flash-linear-attention's:

    o, final_state = dnir.chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)

q, k [B, T, H, K]; v [B, T, HV, V]; g [B, T, HV] (gated delta rule) or
[B, T, HV, K] (KDA); beta [B, T, HV]; states [N, HV, K, V] float32; o
[B, T, HV, V]. With `cu_seqlens` the batch is packed along T (B = 1) and
N = len(cu_seqlens) - 1. NumPy arrays in give NumPy arrays out; torch tensors
in give torch tensors out (o in q's dtype, and device for torch; the final
state in float32).
The graph is built, optimised with the pipeline `opt` and cached per shapes
and options; `target` names the backend that runs it. On "numpy" it runs in
its memory-planned compute buffer (lowering/numpy_arena: the reference
executor's arithmetic, bit for bit, without fresh memory per op); the buffer
is kept between calls, and `dnir.lowering.numpy_arena.release_compute_buffer()`
frees it. On "cuda", torch CUDA tensors stay on the GPU: they cross into TVM and
back by DLPack, without a copy (a tensor that is not contiguous, or not 64-byte
aligned, or in another dtype than the graph reads is converted on the GPU first),
on torch's current stream. The compiled module comes from the module cache
(lowering/module_cache.py, `$DNIR_CACHE/tvm`), so a machine with the TVM runtime
alone runs the layers a machine with TVM's compiler put there; without the
compiler a layer missing from it is a BackendError that says how to add it.

Inputs are checked before anything runs (the README's "What dnir checks and
guarantees" lists it all): shapes, dtypes, finite values, and the model's domain.
A gate g > 0 is a growing state, outside the model (a log-decay is <= 0): an
`InputError` naming the first such position, unless `allow_positive_gates=True`.
beta * |k|^2 >= 2 makes the delta rule unstable: one `InputWarning` per call naming
the worst token. An output that is not finite although every input is (a float32
overflow) is a `NumericError`, never returned. On the GPU the checks are reductions
there, read back once with the outputs' (one synchronisation per call): a bad input
still raises its error, and no output is returned. `check_values=False` drops the checks of values
(finiteness, the gate's sign, the stability warning, the outputs' overflow) and keeps those of
shapes, dtypes and options: on "cuda" the call then launches the module and returns, with no
reduction and no synchronisation (what an engine that overlaps its host with the GPU, or captures
its calls in a CUDA graph, needs), as flash-linear-attention's calls do. `precision` picks the tensor-core products on
"cuda": "highest" (3xTF32, float32's accuracy) or "tf32" (one TF32 product each, about 1e-3
relative, faster: flash-linear-attention's float32 arithmetic); None is "tf32" for bf16/fp16 inputs
(exact in TF32) and "highest" for float32. A bf16 layer at "tf32" also keeps the chunked loop's
intermediates in bf16 on "cuda", as flash-linear-attention does (passes/narrow_loop_results.py).
NumPy, llvm, ggml and Vulkan compute in float32 either way. The recurrent functions' `inplace_final_state=True` writes the new state into initial_state
(_in_place). dnir computes the forward pass only:
torch tensors that require grad while autograd is on are refused (under
`torch.no_grad()` they are read as values).
"""
from __future__ import annotations

import math
import numbers
import sys
import warnings
from functools import lru_cache

import numpy as np

from .errors import InputError, InputWarning, NumericError
from .limits import check_fits_memory
from .models.config import DeltaNetConfig, check_cu_seqlens
from .models.delta import build_delta_net
from .types import numpy_dtype


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, cu_seqlens=None, *, chunk_size=64,
                           target="numpy", opt="O2", allow_positive_gates=False, precision=None,
                           check_values=True):
    """Gated DeltaNet (one gate per value head), chunked form. Returns (o, final_state or None)."""
    return _delta_rule("gdn", "chunked", "chunk_gated_delta_rule", locals())


def chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
              use_qk_l2norm_in_kernel=False, cu_seqlens=None, *, chunk_size=64, target="numpy", opt="O2",
              allow_positive_gates=False, precision=None, check_values=True):
    """Kimi Delta Attention (one gate per key channel), chunked form. Returns (o, final_state or None)."""
    return _delta_rule("kda", "chunked", "chunk_kda", locals())


def fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
                                     output_final_state=False, use_qk_l2norm_in_kernel=False,
                                     cu_seqlens=None, *, chunk_size=64, target="numpy", opt="O2",
                                     allow_positive_gates=False, precision=None, inplace_final_state=False,
                                     check_values=True):
    """Gated DeltaNet, token by token (one step without a loop when every sequence has
    one token: decode). chunk_size is accepted for a uniform signature and unused.
    inplace_final_state: the new state is written into initial_state (see _in_place)."""
    return _in_place("gdn", "fused_recurrent_gated_delta_rule", locals())


def fused_recurrent_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                        use_qk_l2norm_in_kernel=False, cu_seqlens=None, *, chunk_size=64,
                        target="numpy", opt="O2", allow_positive_gates=False, precision=None,
                        inplace_final_state=False, check_values=True):
    """Kimi Delta Attention, token by token (decode when every sequence has one token).
    chunk_size is accepted for a uniform signature and unused.
    inplace_final_state: the new state is written into initial_state (see _in_place)."""
    return _in_place("kda", "fused_recurrent_kda", locals())


def _in_place(variant: str, fn: str, args: dict):
    """A recurrent call; with inplace_final_state=True (as an inference engine's state cache is
    updated, and the keyword of flash-linear-attention's serving variants) the new state is
    written into initial_state, a writable C-contiguous float32 array or tensor, which comes
    back as the final state (when output_final_state). On llvm a decode step's kernel writes it
    there as it computes: the call moves the state once each way, with no fresh state (at B = 1
    half the kernel's time), and when a check then fails, initial_state holds that step's
    result. Elsewhere the state is computed, checked, then copied in."""
    if not args.pop("inplace_final_state"):
        return _delta_rule(variant, "recurrent", fn, args)
    state = args["initial_state"]
    if not _writable_state(state):
        raise InputError(f"{fn}: inplace_final_state=True writes the new state into initial_state; expected "
                         f"a writable C-contiguous float32 NumPy array or torch tensor, got "
                         f"{_describe(state)}")
    keep = args["output_final_state"]
    o, new = _delta_rule(variant, "recurrent", fn, dict(args, output_final_state=True, into=state))
    if new is not state:
        if isinstance(state, np.ndarray):
            np.copyto(state, new)
        else:
            import torch
            state.copy_(new if isinstance(new, torch.Tensor) else torch.from_numpy(new))
    return o, (state if keep else None)


def _writable_state(x) -> bool:
    if isinstance(x, np.ndarray):
        return x.dtype == np.float32 and x.flags.c_contiguous and x.flags.writeable
    return type(x).__module__.startswith("torch") and str(x.dtype) == "torch.float32" and x.is_contiguous()


def _describe(x) -> str:
    if x is None:
        return "None"
    if isinstance(x, np.ndarray):
        flags = "" if x.flags.c_contiguous else ", not contiguous"
        return f"a {x.dtype} array{flags}{'' if x.flags.writeable else ', read-only'}"
    return f"{type(x).__name__} of dtype {getattr(x, 'dtype', '?')}"


@lru_cache(maxsize=64)
def compiled_graph(cfg: DeltaNetConfig, opt: str, target: str = "numpy"):
    """The optimised layer graph for these options and the target that runs it (built once per
    shapes, options and target). The pipeline runs in the target's pass context, where a pass
    may put in an op the target has a kernel for (llvm: the work local to each chunk,
    passes/fuse_intra_chunk.py); not NumPy's, whose context keeps every fused op for its reference
    kernel, while the arena runs the optimised primitives."""
    from .lowering.registry import target_context
    from .passes import optimize
    if target == "numpy":
        return optimize(build_delta_net(cfg), opt)
    with target_context(target):
        return optimize(build_delta_net(cfg), opt)


def _delta_rule(variant: str, form: str, fn: str, args: dict):
    key = _signature(fn, args)
    prepared = _PREPARED.get(key) if key is not None else None
    if prepared is not None:        # the same call as before, but for the arrays' values
        return prepared(args)
    torch_like = _torch_reference(args)
    for name in ("q", "k", "v", "g", "beta"):
        if args[name] is None:
            raise InputError(f"{fn}: {name} is None; expected an array (q, k, v, g and beta are required)")
    _refuse_autograd(args, fn)
    if args["target"] == "cuda" and torch_like is not None and _on_gpu(torch_like):
        return _delta_rule_on_device(variant, form, fn, args)
    arrays = {name: _to_numpy(args[name], name, fn)
              for name in ("q", "k", "v", "g", "beta", "initial_state") if args[name] is not None}
    cu = None if args["cu_seqlens"] is None else _cu_seqlens(args["cu_seqlens"], fn)
    cfg = _config(variant, form, fn, arrays, cu, args)
    if key is not None:
        prepared = _Prepared(fn, cfg, args)
        result = prepared(args)
        if len(_PREPARED) >= _PREPARED_MAX:
            _PREPARED.pop(next(iter(_PREPARED)), None)
        _PREPARED[key] = prepared           # kept once a call went through
        return result
    if args["check_values"]:
        _host_checks(arrays, cfg, fn, args["allow_positive_gates"])
    if args["target"] == "cuda":        # by the layer's options from the module cache: no graph needed
        from .lowering.runtime_loader import cuda_layer, run_executable
        layer = cuda_layer(cfg, args["opt"], lambda: compiled_graph(cfg, args["opt"], "cuda"))
        outputs = run_executable(layer.vm, layer.device, [arrays[n] for n in layer.input_names])
        output_names = layer.output_names
    else:
        graph = compiled_graph(cfg, args["opt"], args["target"])
        output_names = graph.output_names
        if args["target"] == "numpy":
            from .lowering.numpy_arena import graph_plan, run_planned
            check_fits_memory(fn, graph_plan(graph).peak_bytes, sum(a.nbytes for a in arrays.values()))
            outputs = run_planned(graph, arrays)[0]
        else:
            from .lowering import run
            outputs = run(graph, arrays, target=args["target"])
    if args["check_values"]:
        for name, out in zip(output_names, outputs):
            _check_output(out, name, fn, arrays)
    o = outputs[0]
    state = outputs[1] if cfg.final_state else None
    if torch_like is None:
        o = o.astype(np.asarray(args["q"]).dtype, copy=False)
    else:
        o = _to_torch(o, torch_like).to(dtype=torch_like.dtype)
        if state is not None:
            state = _to_torch(state, torch_like)
    return o, state


# A call on float32 NumPy arrays, on a CPU target, whose shapes and options were seen before is
# run by the _Prepared kept for them: its configuration, graph and compiled module are looked up
# once by a key of the shapes and the options, instead of derived again from the arguments (a
# decode step's kernel takes 50 us at B = 1; the derivation took longer). Every value check
# still runs on every call (a prefill's partly through its outputs: _Prepared._scan_call), and a
# failing one goes through the same functions, with the same errors, as the first call's.
_ARRAYS = ("q", "k", "v", "g", "beta", "initial_state")
_OPTIONS = ("scale", "output_final_state", "use_qk_l2norm_in_kernel", "chunk_size", "target", "opt",
            "allow_positive_gates", "precision", "check_values")
_F32 = np.dtype(np.float32)
_PREPARED: dict[tuple, "_Prepared"] = {}
_PREPARED_MAX = 64


def _signature(fn: str, args: dict) -> tuple | None:
    """The key of a call's _Prepared: the function, every array's shape and every option with its
    type (scale=True is refused where scale=1 is not); None for a call the key cannot describe
    (an array that is not a native float32 ndarray, cu_seqlens, the cuda target)."""
    if args["cu_seqlens"] is not None or args["target"] == "cuda":
        return None
    key = [fn]
    for name in _ARRAYS:
        a = args[name]
        if a is None:
            key.append(None)
        elif type(a) is np.ndarray and a.dtype is _F32:
            key.append(a.shape)
        else:
            return None
    for name in _OPTIONS:
        key += (type(args[name]), args[name])
    key = tuple(key)
    try:
        hash(key)
    except TypeError:
        return None
    return key


class _Prepared:
    """A call's configuration, graph and runner, for arrays of the shapes and options it was
    made for (_signature): a call checks the values (as _host_checks and _check_output, through
    them when one fails) and runs the graph. On llvm the module returns a decode step's checks
    with its outputs (lowering/tvm/cpu_token_step.py): token_step's column sums of the new state,
    whose finite sum stands for the state's own (the 128 MiB state of a B = 64 step is not read
    again), or decode_step's report, three numbers that stand for every check of the call."""

    def __init__(self, fn: str, cfg: DeltaNetConfig, args: dict):
        self.fn, self.cfg, self.target, self.opt = fn, cfg, args["target"], args["opt"]
        self.allow_positive_gates, self.check_values = args["allow_positive_gates"], args["check_values"]
        self.names = [n for n in _ARRAYS if args[n] is not None]
        self.graph = None       # built on the first call, once its inputs passed the checks
        self.report = None      # llvm decode: the output whose kernel report stands for every check

    def _build(self):
        self.graph = compiled_graph(self.cfg, self.opt, self.target)
        self.run = {"llvm": self._run_llvm, "numpy": self._run_numpy}.get(self.target, self._run_backend)
        if self.target == "llvm":
            from .lowering.registry import prepare
            from .lowering.tvm.compile import llvm_call
            from .lowering.tvm.cpu_token_step import step_report
            prepared = prepare(self.graph, "llvm")
            self.llvm = llvm_call(prepared)
            self.inputs = prepared.input_names
            self.report = step_report(prepared)

    def __call__(self, args: dict):
        arrays = {n: args[n] for n in self.names}
        ran = None
        if not self.check_values:
            if self.graph is None:
                self._build()
            outputs = self.run(arrays, args.get("into"))[0]
            return outputs[0], (outputs[1] if self.cfg.final_state else None)
        if self.report is not None:     # a decode step whose kernel reports its checks
            ran = self.run(arrays, args.get("into"))
            if self._report_passes(ran[1][self.report]):
                outputs = ran[0]
                return outputs[0], (outputs[1] if self.cfg.final_state else None)
        return self._scan_call(arrays, ran)

    def _report_passes(self, report: np.ndarray) -> bool:
        """Whether decode_step's report (cpu_token_step.REPORT: a sum of o, the new state and g,
        finite only when all of them are; the largest gate; the largest beta |k|^2) passes every
        check of _scan_call; when it does not, _scan_call runs them all, raising or warning as it
        does."""
        total, gate, stiffness = report.tolist()
        return (total < np.inf and (gate <= 0 or self.allow_positive_gates)
                and (stiffness < 2 or self.cfg.l2norm))

    def _scan_call(self, arrays: dict, ran=None):
        """A call (a prefill, or a decode step: its one token), its inputs checked through its
        outputs: a NaN or inf in q, k, v, beta or the initial state reaches o or the final state through products
        and sums, where it stays non-finite (an inf times 0 is NaN), so one pass over the outputs
        stands for five over the inputs (9-20 ms a call at (1, 4096, 32, 128) on 2 cores). g is
        checked first, as exp(-inf) = 0 would hide a gate of -inf. When one fails, the first
        call's checks run in their order and say which input and where (_host_checks, then
        _check_output: an overflow of finite inputs is a NumericError); the first call of all
        checks its inputs before the graph is built. The unstable-keys warning comes once the
        outputs passed, as it came after the inputs' checks. ran: the module's (outputs, checks)
        when the call was already run (a decode step whose report did not pass)."""
        fn, cfg, g = self.fn, self.cfg, arrays["g"]
        checked = self.graph is None
        with np.errstate(over="ignore", invalid="ignore"):
            if not checked and not (np.isfinite(np.add.reduce(g, axis=None))
                                    and (self.allow_positive_gates or g.max() <= 0)):
                checked = True
        if checked:     # raises on a bad input (an overflowing sum of good gates passes)
            _host_checks(arrays, cfg, fn, self.allow_positive_gates)
            if self.graph is None:
                self._build()
        outputs, sums = self.run(arrays) if ran is None else ran
        with np.errstate(over="ignore", invalid="ignore"):
            finite = all(np.isfinite(np.add.reduce(sums.get(i, out), axis=None)) for i, out in enumerate(outputs))
        if not finite:
            if not checked:
                _host_checks(arrays, cfg, fn, self.allow_positive_gates)
                checked = True
            for name, out in zip(self.graph.output_names, outputs):
                _check_output(out, name, fn, arrays)
        if not checked and not cfg.l2norm:
            _warn_unstable(arrays["k"], arrays["beta"], fn)
        return outputs[0], (outputs[1] if cfg.final_state else None)

    def _run_llvm(self, arrays, into=None):
        return self.llvm([arrays[n] for n in self.inputs], state_into=into)

    def _run_numpy(self, arrays, into=None):
        from .lowering.numpy_arena import graph_plan, run_planned
        check_fits_memory(self.fn, graph_plan(self.graph).peak_bytes, sum(a.nbytes for a in arrays.values()))
        return run_planned(self.graph, arrays)[0], {}

    def _run_backend(self, arrays, into=None):
        from .lowering import run
        return run(self.graph, arrays, target=self.target), {}


def _delta_rule_on_device(variant: str, form: str, fn: str, args: dict):
    """torch tensors on a GPU: checked, converted and run there, by DLPack both ways. The layer's
    module comes from the module cache by its options; its graph is built only to compile it."""
    import torch

    from .lowering.runtime_loader import cuda_layer, run_layer
    q = args["q"]
    tensors = {name: _on_device(args[name], name, fn, q.device)
               for name in ("q", "k", "v", "g", "beta", "initial_state") if args[name] is not None}
    cu = None if args["cu_seqlens"] is None else _cu_seqlens(args["cu_seqlens"], fn)
    cfg = _device_config(variant, form, fn, tensors, cu, args)
    opt = args["opt"]
    layer = cuda_layer(cfg, opt, lambda: compiled_graph(cfg, opt, "cuda"), device=q.device.index or 0)
    inputs = [_aligned(tensors[n].to(_TORCH_DTYPES[d])) for n, d in zip(layer.input_names, layer.input_dtypes)]
    stream = torch.cuda.current_stream(q.device).cuda_stream if q.device.type == "cuda" else None
    outputs = [torch.from_dlpack(o) for o in run_layer(layer, inputs, stream)]
    if args["check_values"] and not _device_checks(tensors, outputs, cfg, args["allow_positive_gates"]):
        # the host checks find what failed and say it; they raise or warn
        arrays = {name: _to_numpy(t, name, fn) for name, t in tensors.items()}
        _host_checks(arrays, cfg, fn, args["allow_positive_gates"])
        for name, out in zip(layer.output_names, outputs):
            _check_output(_to_numpy(out, name, fn), name, fn, arrays)
    o = outputs[0].to(q.dtype)
    return o, (outputs[1] if cfg.final_state else None)


# A GPU call whose shapes, dtypes and options were seen before takes the configuration made for
# them: a decode step is called once per token, and making and checking its DeltaNetConfig took
# half the host's time of an unchecked call (50 of 90 us here).
_DEVICE_CONFIGS: dict[tuple, DeltaNetConfig] = {}


def _device_config(variant, form, fn, tensors, cu, args) -> DeltaNetConfig:
    key = (fn, cu, *((n, tuple(t.shape), t.dtype) for n, t in tensors.items()),
           *((type(args[n]), args[n]) for n in _OPTIONS))
    try:
        cfg = _DEVICE_CONFIGS.get(key)
    except TypeError:               # an option that cannot be a key (a list): made each call
        return _config(variant, form, fn, tensors, cu, args)
    if cfg is None:
        cfg = _config(variant, form, fn, tensors, cu, args)
        if len(_DEVICE_CONFIGS) >= _PREPARED_MAX:
            _DEVICE_CONFIGS.pop(next(iter(_DEVICE_CONFIGS)), None)
        _DEVICE_CONFIGS[key] = cfg
    return cfg


def _on_gpu(tensor) -> bool:
    return tensor.device.type != "cpu"


_TORCH_DTYPES = {}      # dnir dtype -> torch dtype, filled when torch is first imported here
ALIGNMENT = 64          # bytes: TVM's kernels assume their tensors this aligned


def _on_device(x, name, fn, device):
    """A tensor of the call on q's device, in the dtype the graph reads (half q, k, v and beta
    stay half; every other float is read as float32)."""
    import torch
    if not _TORCH_DTYPES:
        _TORCH_DTYPES.update(f32=torch.float32, bf16=torch.bfloat16, f16=torch.float16)
    if type(x).__module__.startswith("torch"):
        if x.device != device:
            raise InputError(f"{fn}: {name} is on {x.device}, q on {device}; expected every tensor on one device")
    else:
        x = torch.as_tensor(np.asarray(x), device=device)
    if not x.dtype.is_floating_point:
        raise InputError(f"{fn}: {name} has dtype {x.dtype}; expected a floating-point tensor")
    half = x.dtype in (torch.bfloat16, torch.float16) and name in ("q", "k", "v", "beta")
    return x.detach() if half or x.dtype == torch.float32 else x.detach().float()


def _aligned(x):
    """x contiguous and 64-byte aligned (a copy on its device only when it is not)."""
    x = x.contiguous()
    return x if x.data_ptr() % ALIGNMENT == 0 else x.clone()


def _device_checks(tensors: dict, outputs: list, cfg: DeltaNetConfig, allow_positive_gates: bool) -> bool:
    """Whether the host checks would pass, from a few reductions on the GPU and one read back (the
    call's synchronisation): every input and output finite, no gate above zero, beta * |k|^2
    below 2. Its cost is the API's overhead over the module, so it reads each tensor once, in
    few launches: one multi-tensor norm for finiteness (an inf or NaN anywhere makes the norm
    so; a huge finite tensor whose norm overflows only sends the call to the host checks, which
    then pass), one min-max of the gate, and |k|^2 by one norm, which also stands for k's
    finiteness. The initial state is left to the final state's check when that is returned (a
    non-finite entry reaches it): one pass over the state, the most memory a decode step reads,
    instead of two."""
    import torch
    skip = {"initial_state"} if cfg.final_state else set()
    finite, bounds = [], []             # 0-d tensors that must be finite; (0-d tensor, test of its value)
    if not allow_positive_gates:
        skip.add("g")
        low, high = torch.aminmax(tensors["g"])
        finite.append(low)
        bounds.append((high, lambda x: x <= 0))
    if not cfg.l2norm:
        skip.add("k")
        k, beta = tensors["k"], tensors["beta"]
        ksq = torch.linalg.vector_norm(k, dim=-1, dtype=torch.float32).square()
        group = beta.shape[2] // k.shape[2]
        finite.append(ksq.sum())
        bounds.append(((beta.reshape(*ksq.shape, group) * ksq[..., None]).amax(), lambda x: x < 2))
    checked = [t for name, t in tensors.items() if name not in skip] + list(outputs)
    finite += torch._foreach_norm(checked, 2, dtype=torch.float32)
    values = torch.stack([t for t, _ in bounds] + finite).tolist()
    return (all(test(x) for (_, test), x in zip(bounds, values))
            and all(map(math.isfinite, values[len(bounds):])))


def _host_checks(arrays: dict, cfg: DeltaNetConfig, fn: str, allow_positive_gates: bool):
    """Raise on a non-finite input or a gate above zero, warn on unstable keys (at the user's
    line, _caller_level). The initial state is not read here when the final state is returned:
    a non-finite entry of it is one of the final state (scaled by its decay, inf * d is inf or
    NaN), which _check_output traces back to it; one pass over the state (128 MiB at B = 64
    decode) instead of two."""
    for name, a in arrays.items():
        if not (name == "initial_state" and cfg.final_state):
            _check_finite(a, name, fn)
    if not allow_positive_gates:
        _check_gates(arrays["g"], fn)
    if not cfg.l2norm:
        _warn_unstable(arrays["k"], arrays["beta"], fn)


def _config(variant, form, fn, arrays, cu, args) -> DeltaNetConfig:
    q, k, v, g, beta = (arrays[n] for n in ("q", "k", "v", "g", "beta"))
    if q.ndim != 4:
        raise InputError(f"{fn}: q has shape {list(q.shape)}; expected rank 4 [B, T, H, K]")
    B, T, H, K = q.shape
    if T < 1:
        raise InputError(f"{fn}: q has shape {list(q.shape)}; expected at least one token (T >= 1)")
    if k.shape != q.shape:
        raise InputError(f"{fn}: k has shape {list(k.shape)}; expected q's shape [B, T, H, K] = {list(q.shape)}")
    if v.ndim != 4 or v.shape[:2] != (B, T):
        raise InputError(f"{fn}: v has shape {list(v.shape)}; expected [B, T, HV, V] = [{B}, {T}, HV, V]")
    HV, V = v.shape[2:]
    if HV % H:
        raise InputError(f"{fn}: v has HV={HV} value heads, not a multiple of the H={H} q/k heads "
                         f"(value head j reads q/k head j // (HV // H))")
    gdn_shape, kda_shape = [B, T, HV], [B, T, HV, K]
    want, other, other_fn = ((gdn_shape, kda_shape, "a KDA (per key channel) gate: use chunk_kda")
                             if variant == "gdn" else
                             (kda_shape, gdn_shape, "a per-head gate of the gated delta rule: use "
                                                    "chunk_gated_delta_rule"))
    if list(g.shape) != want:
        hint = f" ({list(g.shape)} is {other_fn})" if list(g.shape) == other else ""
        kind = "[B, T, HV]" if variant == "gdn" else "[B, T, HV, K]"
        raise InputError(f"{fn}: g has shape {list(g.shape)}; expected {kind} = {want}{hint}")
    if list(beta.shape) != gdn_shape:
        raise InputError(f"{fn}: beta has shape {list(beta.shape)}; expected [B, T, HV] = {gdn_shape}")
    if cu is not None:
        try:
            check_cu_seqlens(cu, T, B)
        except InputError as e:
            raise InputError(f"{fn}: {e}") from None
    N = B if cu is None else len(cu) - 1
    state = arrays.get("initial_state")
    if state is not None and list(state.shape) != [N, HV, K, V]:
        raise InputError(f"{fn}: initial_state has shape {list(state.shape)}; expected [N, HV, K, V] = "
                         f"{[N, HV, K, V]} (N = {'len(cu_seqlens) - 1' if cu is not None else 'B'})")
    chunk_size = args["chunk_size"]
    if not isinstance(chunk_size, numbers.Integral) or isinstance(chunk_size, bool) or chunk_size not in (16, 32, 64):
        raise InputError(f"{fn}: chunk_size={chunk_size!r}; expected the integer 16, 32 or 64")
    chunk_size = int(chunk_size)
    for name, expected in (("opt", "a pipeline O0, O1 or O2, or comma-separated pass names"),
                           ("target", "a backend name: numpy, llvm, cuda or vulkan")):
        if not isinstance(args[name], str) or not args[name].strip(" ,"):
            raise InputError(f"{fn}: {name}={args[name]!r}; expected {expected}")
    if not isinstance(args["check_values"], bool):
        raise InputError(f"{fn}: check_values={args['check_values']!r}; expected True or False")
    scale = args["scale"]
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (np.isfinite(scale) and scale > 0):
            raise InputError(f"{fn}: scale={scale!r}; expected a positive number (default K ** -0.5)")
        scale = float(scale)
    mode = form
    longest = T if cu is None else max(b - a for a, b in zip(cu, cu[1:]))
    if form == "recurrent" and longest == 1:
        mode = "decode"
    try:
        return DeltaNetConfig(variant, batch=B, seq_len=T, heads=H, value_heads=HV, head_dim=K, value_dim=V,
                              mode=mode, chunk_size=chunk_size, l2norm=bool(args["use_qk_l2norm_in_kernel"]),
                              scale=scale, initial_state=state is not None,
                              final_state=bool(args["output_final_state"]), cu_seqlens=cu, dtype=_layer_dtype(q),
                              precision=args["precision"])
    except InputError as e:
        raise InputError(f"{fn}: {e}") from None


def _torch_reference(args):
    """q when it is a torch tensor (the kind and device of what we return), else None."""
    q = args["q"]
    return q if type(q).__module__.startswith("torch") else None


# dtypes: q's dtype is the layer's (bf16 and fp16 stay half: the graph reads them as they are and
# computes in float32; anything else runs in float32). g and the state are float32 always, as in
# flash-linear-attention; o comes back in q's dtype, the state in float32.
_HALF = {"bfloat16": "bf16", "float16": "f16"}


def _to_numpy(x, name, fn) -> np.ndarray:
    """x as a NumPy array: half precision (ml_dtypes' bfloat16 for torch.bfloat16) kept, other
    floating-point dtypes as float32."""
    if type(x).__module__.startswith("torch"):
        import torch
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:       # NumPy has no bfloat16: the same 16 bits, viewed as ml_dtypes'
            x = x.view(torch.int16).numpy().view(numpy_dtype("bf16"))
        else:
            x = (x.float() if x.dtype.is_floating_point and x.dtype != torch.float16 else x).numpy()
    a = np.asarray(x)
    if a.dtype.name not in _HALF and a.dtype.kind != "f":
        raise InputError(f"{fn}: {name} has dtype {a.dtype}; expected a floating-point array")
    return a if a.dtype.name in _HALF and name in ("q", "k", "v", "beta") else a.astype(np.float32, copy=False)


def _to_torch(a: np.ndarray, like):
    """A result as a torch tensor on `like`'s device (o in `like`'s dtype; a float32 state stays so)."""
    import torch
    a = np.ascontiguousarray(a)
    t = (torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if a.dtype.name == "bfloat16"
         else torch.from_numpy(a))
    return t.to(device=like.device)


def _layer_dtype(q) -> str:
    """The layer's dtype from q's (a NumPy array's, or a torch tensor's: torch.bfloat16)."""
    return _HALF.get(getattr(q.dtype, "name", str(q.dtype).removeprefix("torch.")), "f32")


def _cu_seqlens(cu, fn) -> tuple[int, ...]:
    if type(cu).__module__.startswith("torch"):
        cu = cu.detach().cpu().numpy()
    a = np.asarray(cu)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise InputError(f"{fn}: cu_seqlens has shape {list(a.shape)} and dtype {a.dtype}; "
                         f"expected a 1-D integer array [N + 1]")
    return tuple(int(x) for x in a)


def _check_finite(a: np.ndarray, name: str, fn: str):
    # A finite sum means every term is finite (inf and NaN propagate): one pass, no temporary.
    # A sum that is not finite (a bad value, or an overflow of large ones) is looked at closely.
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.sum(a)):
            return
    bad = ~np.isfinite(a)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        what = "NaN" if np.isnan(a[index]) else "inf"
        raise InputError(f"{fn}: {name} contains {what} (first at index {list(index)}, "
                         f"{int(bad.sum())} non-finite value(s)); inputs must be finite")


def _refuse_autograd(args, fn):
    """dnir computes the forward pass only. A tensor that requires grad while autograd
    records would lose its graph silently, so it is refused; under torch.no_grad() (or
    inference_mode) nothing is recorded anyway and the values are used as they are."""
    grads = [n for n in ("q", "k", "v", "g", "beta", "initial_state")
             if getattr(args[n], "requires_grad", False)]
    if grads:
        import torch
        if torch.is_grad_enabled():
            raise InputError(f"{fn}: {', '.join(grads)} require(s) grad, but dnir computes the forward pass "
                             f"only (no backward); call it under torch.no_grad() or pass .detach()ed tensors")


def _check_gates(g: np.ndarray, fn: str):
    """g is a log-decay (<= 0); above zero the state grows without bound. One reduction."""
    if np.max(g) > 0:
        index = [int(i) for i in np.unravel_index(np.argmax(g > 0), g.shape)]
        raise InputError(f"{fn}: g has {int(np.count_nonzero(g > 0))} value(s) above zero (first at index {index}: "
                         f"{float(g[tuple(index)]):.4g}); g is a log-decay, expected g <= 0 (pass "
                         f"allow_positive_gates=True to run a growing state anyway)")


def _caller_level() -> int:
    """warnings.warn's stacklevel, called from where this is called, of the first frame outside
    this module: the user's call, however many of the API's functions lie between."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


def _warn_unstable(k: np.ndarray, beta: np.ndarray, fn: str):
    """The delta rule contracts the state along k only while beta * |k|^2 < 2 (the step
    is I - beta k k^T); one warning per call, naming the worst token."""
    k, beta = k.astype(np.float32, copy=False), beta.astype(np.float32, copy=False)   # einsum has no bfloat16
    ksq = np.einsum("bthk,bthk->bth", k, k)
    group = beta.shape[2] // k.shape[2]          # value head j reads key head j // group
    stiffness = beta.reshape(*ksq.shape, group) * ksq[..., None]
    if not stiffness.max() >= 2:        # the usual case, without locating the worst token
        return
    worst = np.unravel_index(np.argmax(stiffness), stiffness.shape)
    value = float(stiffness[worst])
    if value >= 2:
        b, t, h, j = (int(i) for i in worst)
        warnings.warn(f"{fn}: beta * |k|^2 = {value:.4g} >= 2 at batch {b}, token {t}, value head {h * group + j} "
                      f"(the worst of {int(np.count_nonzero(stiffness >= 2))}): the delta rule is unstable there; "
                      f"normalise k (use_qk_l2norm_in_kernel=True) or keep beta * |k|^2 < 2",
                      InputWarning, stacklevel=_caller_level())


def _check_output(out: np.ndarray, name: str, fn: str, arrays: dict):
    """An output that is not finite comes from an input that is not (the initial state, whose
    check _host_checks leaves to this one) or else from an overflow of the arithmetic (float32
    above 3.4e38); either is reported rather than returned."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.sum(out)):
            return
    for input_name, a in arrays.items():
        _check_finite(a, input_name, fn)
    bad = ~np.isfinite(out)
    if bad.any():
        index = [int(i) for i in np.argwhere(bad)[0]]
        largest = max(arrays, key=lambda n: float(np.max(np.abs(arrays[n]))))
        raise NumericError(f"{fn}: output {name} is not finite ({int(bad.sum())} value(s), first at index {index}) "
                           f"although every input is finite: the result overflows float32 (the largest input "
                           f"magnitude is {float(np.max(np.abs(arrays[largest]))):.3g} in {largest})")
