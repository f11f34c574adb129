"""bf16 and fp16 layers: half q, k, v, beta and o; float32 g and states; float32 arithmetic.

The graph widens each half input with one `cast` and narrows o with one, so everything in
between is float32 on every backend, as a GPU computes with half operands (a product of two
bf16 or fp16 values is exact in float32 and the sums accumulate in float32). Against the
float64 oracle run on the same half-rounded inputs, then:

- the final state (float32) is held to the float32 bound, 1e-5;
- o is the float32 result rounded once into its dtype: per element within u |ref| of the
  oracle (u = 2**-8 for bf16, 2**-11 for fp16: round to nearest) plus the float32 error,
  taken as 1e-5 rms(ref).
"""
import re

import numpy as np
import pytest

import dnir
from dnir import passes
from dnir.errors import BackendError
from dnir.lowering import registry
from dnir.models import DeltaNetConfig, build_delta_net, random_inputs
from dnir.types import UNIT_ROUNDOFF, numpy_dtype
from delta_helpers import assert_close, draw, oracle

HALVES = ["bf16", "f16"]
ACTIVATIONS = ("q", "k", "v", "beta")
# T = 100: a partial last chunk for every chunk size; two sequences; GQA; an initial state.
SMALL = dict(batch=2, seq_len=100, heads=2, value_heads=4, head_dim=16, value_dim=16, initial_state=True,
             final_state=True)


def half_inputs(cfg, rng, gates=None):
    x = draw(cfg, rng)
    if gates is not None:
        x["g"][...] = gates
    return {n: a.astype(numpy_dtype(cfg.dtype_of(n))) for n, a in x.items()}


def assert_rounded_from(o, ref, dtype):
    """o is ref (float64) computed in float32 and rounded once into `dtype`."""
    assert o.dtype == numpy_dtype(dtype)
    o = o.astype(np.float64)
    assert np.isfinite(o).all()
    rms = np.sqrt(np.mean(ref ** 2))
    excess = np.abs(o - ref) - (UNIT_ROUNDOFF[dtype] * np.abs(ref) + 1e-5 * rms)
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess[worst] <= 0, f"o{list(worst)} = {o[worst]} vs {ref[worst]}: beyond one {dtype} rounding"


def run_layer(cfg, x, opt="O0", target="numpy"):
    graph = passes.optimize(build_delta_net(cfg), opt)
    return dnir.run(graph, x, target=target)


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("variant", ["gdn", "kda"])
@pytest.mark.parametrize("mode,chunk", [("chunked", 64), ("chunked", 16), ("recurrent", 64)])
def test_layer_is_float32_arithmetic_on_half_inputs(dtype, variant, mode, chunk, rng):
    cfg = DeltaNetConfig(variant, mode=mode, chunk_size=chunk, dtype=dtype, **SMALL)
    x = half_inputs(cfg, rng)
    o_ref, state_ref = oracle(cfg, x)
    results = {opt: run_layer(cfg, x, opt) for opt in ("O0", "O2")}
    for opt, (o, state) in results.items():
        assert state.dtype == np.float32
        assert_close(state, state_ref, what=f"{opt} final state")
        assert_rounded_from(o, o_ref, dtype)
    # O0 and O2 differ only in float32 rounding: at most one step of the half dtype apart
    o0, o2 = (results[opt][0].astype(np.float64) for opt in ("O0", "O2"))
    assert np.all(np.abs(o0 - o2) <= 2 * UNIT_ROUNDOFF[dtype] * np.abs(o_ref) + 2e-5 * np.sqrt(np.mean(o_ref ** 2)))


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("variant", ["gdn", "kda"])
def test_strong_gates_stay_finite_and_exact(dtype, variant, rng):
    """g = -20 on every token: each step keeps e^-20 of the state, every chunk's decays
    underflow to 0 far from the diagonal; nothing overflows in any dtype."""
    cfg = DeltaNetConfig(variant, dtype=dtype, **SMALL)
    x = half_inputs(cfg, rng, gates=-20.0)
    o_ref, state_ref = oracle(cfg, x)
    for opt in ("O0", "O2"):
        o, state = run_layer(cfg, x, opt)
        assert_close(state, state_ref, what=f"{opt} final state")
        assert_rounded_from(o, o_ref, dtype)


@pytest.mark.parametrize("dtype", HALVES)
def test_graph_reads_half_and_computes_in_float32(dtype):
    """One cast after each half input, one before o; the gate and the states float32."""
    cfg = DeltaNetConfig("gdn", dtype=dtype, **SMALL)
    g = build_delta_net(cfg)
    assert {n: t.dtype for n, t in zip(g.input_names, g.input_types)} == {
        "q": dtype, "k": dtype, "v": dtype, "g": "f32", "beta": dtype, "initial_state": "f32"}
    assert [t.dtype for t in g.output_types] == [dtype, "f32"]
    for graph in (g, passes.optimize(g, "O2")):
        half_values = [n for n in graph.topo_order()
                       if n.op != "input" and isinstance(n.type, dnir.TensorType) and n.dtype == dtype]
        assert [n.op for n in half_values] == ["cast"] and half_values[0] is graph.outputs[0]
        for x in graph.inputs[:5]:
            readers = [n for n in graph.topo_order() if x in n.inputs]
            assert x.dtype == "f32" or [(n.op, n.dtype) for n in readers] == [("cast", "f32")]
    # the config, its metadata and the printed graph agree
    again = dnir.parse(dnir.print(g))
    assert dnir.print(again) == dnir.print(g) and DeltaNetConfig.of_graph(again) == cfg


def test_metadata_that_disagrees_with_the_graph_names_the_dtypes():
    g = build_delta_net(DeltaNetConfig("gdn", dtype="bf16", **SMALL))
    header, rest = dnir.print(g).split("\n", 1)
    text = header.replace("dtype=bf16,", "dtype=f16,") + "\n" + rest       # the metadata only
    with pytest.raises(dnir.InputError, match=r"meta describes input q as f16\[2,100,2,16\], the graph has "
                                              r"bf16\[2,100,2,16\]"):
        DeltaNetConfig.of_graph(dnir.parse(text))
    with pytest.raises(dnir.InputError, match="dtype='f64'; expected one of f32, bf16, f16"):
        DeltaNetConfig("gdn", dtype="f64")
    assert DeltaNetConfig("gdn", dtype="bfloat16").dtype == "bf16"


def test_random_inputs_are_in_the_graphs_dtypes():
    cfg = DeltaNetConfig("kda", dtype="bf16", **SMALL)
    x = random_inputs(cfg, 0)
    assert {n: a.dtype.name for n, a in x.items()} == {
        "q": "bfloat16", "k": "bfloat16", "v": "bfloat16", "g": "float32", "beta": "bfloat16",
        "initial_state": "float32"}


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("variant", ["gdn", "kda"])
def test_decode_step_fused_on_llvm_with_half_inputs(dtype, variant, rng):
    """Decode with half q, k, v and a float32 state: one kernel on llvm (decode_step, the step with
    its prologue), which loads q, k, v and beta in the half dtype."""
    cfg = DeltaNetConfig(variant, mode="decode", seq_len=1, batch=3, heads=2, value_heads=4, head_dim=16,
                         value_dim=32, initial_state=True, final_state=True, dtype=dtype)
    graph = passes.optimize(build_delta_net(cfg), "O2")
    (step,) = [n for n in registry.prepare(graph, "llvm").topo_order() if n.op == "decode_step"]
    assert [r for r, x in zip(dnir.fused.DECODE_ROLES, step.inputs) if x.dtype == dtype] == ["q", "k", "v", "beta"]
    x = half_inputs(cfg, rng)
    o_ref, state_ref = oracle(cfg, x)
    for target in ("numpy", "llvm"):
        o, state = dnir.run(graph, x, target=target)
        assert_close(state, state_ref, what=f"{target} state")
        assert_rounded_from(o, o_ref, dtype)


@pytest.mark.parametrize("dtype", HALVES)
def test_llvm_prefill_matches_numpy(dtype, rng):
    cfg = DeltaNetConfig("kda", dtype=dtype, **SMALL)
    graph = passes.optimize(build_delta_net(cfg), "O2")
    x = half_inputs(cfg, rng)
    (o, state), (o_np, state_np) = dnir.run(graph, x, target="llvm"), dnir.run(graph, x)
    assert o.dtype == o_np.dtype == numpy_dtype(dtype) and state.dtype == np.float32
    assert_close(state, state_np, tol=1e-6, what="state")
    o, o_np = o.astype(np.float64), o_np.astype(np.float64)       # the same float32 up to rounding, then one step
    assert np.all(np.abs(o - o_np) <= UNIT_ROUNDOFF[dtype] * 2 * np.abs(o_np) + 1e-6)


def _vulkan_or_skip():
    """The dtypes this machine's Vulkan device runs; skipped only where there is no adapter."""
    from dnir.lowering.vulkan import adapter_info, dtypes
    try:
        adapter_info()
    except BackendError as e:
        pytest.skip(f"no Vulkan adapter on this machine ({e})")
    return dtypes()


def test_vulkan_decode_step_loads_f16_vectors(rng):
    have = _vulkan_or_skip()
    if "f16" not in have:
        pytest.skip("this Vulkan adapter has no shader-f16")
    cfg = DeltaNetConfig("kda", mode="decode", seq_len=1, batch=3, heads=2, value_heads=4, head_dim=16,
                         value_dim=32, initial_state=True, final_state=True, dtype="f16")
    graph = passes.optimize(build_delta_net(cfg), "O2")
    (step,) = [n for n in registry.prepare(graph, "vulkan").topo_order() if n.op == "decode_step"]
    assert [r for r, x in zip(dnir.fused.DECODE_ROLES, step.inputs) if x.dtype == "f16"] == ["q", "k", "v", "beta"]
    x = half_inputs(cfg, rng)
    o_ref, state_ref = oracle(cfg, x)
    o, state = dnir.run(graph, x, target="vulkan")
    assert_close(state, state_ref, what="final state")
    assert_rounded_from(o, o_ref, "f16")


def test_vulkan_runs_f16_with_shader_f16_and_refuses_bf16(rng):
    have = _vulkan_or_skip()
    cfg = DeltaNetConfig("gdn", dtype="bf16", **SMALL)
    with pytest.raises(BackendError, match=r"vulkan: q bf16, k bf16, v bf16, beta bf16, o bf16: WGSL has no "
                                           r"bfloat16"):
        run_layer(cfg, half_inputs(cfg, rng), target="vulkan")
    if "f16" not in have:
        pytest.skip("this Vulkan adapter has no shader-f16")
    cfg = DeltaNetConfig("kda", dtype="f16", **SMALL)
    x = half_inputs(cfg, rng)
    o_ref, state_ref = oracle(cfg, x)
    o, state = run_layer(cfg, x, "O2", target="vulkan")
    assert_close(state, state_ref, what="final state")
    assert_rounded_from(o, o_ref, "f16")


# ---------------------------------------------------------------------------
# The functional API: half in, o in the input's dtype, the state in float32 (as fla)


def _api_args(cfg, x, lib):
    """x as `lib` arrays: torch tensors, or NumPy (ml_dtypes' bfloat16 for bf16)."""
    if lib == "numpy":
        return dict(x)
    torch = pytest.importorskip("torch")
    wanted = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
    return {n: torch.from_numpy(a.astype(np.float32)).to(wanted[cfg.dtype_of(n)]) for n, a in x.items()}


@pytest.mark.parametrize("lib", ["torch", "numpy"])
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("fn,variant,mode", [(dnir.chunk_gated_delta_rule, "gdn", "chunked"),
                                             (dnir.chunk_kda, "kda", "chunked"),
                                             (dnir.fused_recurrent_gated_delta_rule, "gdn", "decode")])
def test_api_returns_o_in_the_input_dtype_and_a_float32_state(lib, dtype, fn, variant, mode, rng):
    sizes = dict(SMALL, seq_len=1) if mode == "decode" else SMALL
    cfg = DeltaNetConfig(variant, mode=mode, dtype=dtype, **sizes)
    x = half_inputs(cfg, rng)
    args = _api_args(cfg, x, lib)
    o, state = fn(**args, output_final_state=True)
    if lib == "torch":
        torch = pytest.importorskip("torch")
        assert o.dtype == {"bf16": torch.bfloat16, "f16": torch.float16}[dtype] and state.dtype == torch.float32
        o, state = (o.float().numpy().astype(numpy_dtype(dtype)), state.numpy())
    assert o.dtype == numpy_dtype(dtype) and state.dtype == np.float32
    o_ref, state_ref = oracle(cfg, x)
    assert_close(state, state_ref, what="final state")
    assert_rounded_from(o, o_ref, dtype)


@pytest.mark.parametrize("fn,variant", [(dnir.chunk_kda, "kda"), (dnir.fused_recurrent_gated_delta_rule, "gdn")])
def test_api_on_llvm_takes_and_returns_bf16(fn, variant, rng):
    torch = pytest.importorskip("torch")
    cfg = DeltaNetConfig(variant, dtype="bf16", **(dict(SMALL, seq_len=1, mode="decode") if "recurrent" in fn.__name__
                                                   else SMALL))
    x = half_inputs(cfg, rng)
    o, state = fn(**_api_args(cfg, x, "torch"), output_final_state=True, target="llvm")
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    o_ref, state_ref = oracle(cfg, x)
    assert_close(state.numpy(), state_ref, what="final state")
    assert_rounded_from(o.float().numpy().astype(numpy_dtype("bf16")), o_ref, "bf16")


def test_api_takes_a_float32_gate_with_bf16_activations(rng):
    """Qwen3-Next computes its gate in float32 and its q, k, v in bf16: the layer is bf16,
    the gate read as float32 (not rounded), and a bf16 gate widens exactly."""
    torch = pytest.importorskip("torch")
    cfg = DeltaNetConfig("gdn", dtype="bf16", **SMALL)
    x = half_inputs(cfg, rng)
    args = _api_args(cfg, x, "torch")
    o32, _ = dnir.chunk_gated_delta_rule(**args)
    o16, _ = dnir.chunk_gated_delta_rule(**dict(args, g=args["g"].to(torch.bfloat16)))
    assert o32.dtype == o16.dtype == torch.bfloat16
    o_ref, _ = oracle(cfg, x)
    assert_rounded_from(o32.float().numpy().astype(numpy_dtype("bf16")), o_ref, "bf16")
    assert not torch.equal(o32, o16)        # the bf16 gate is another input: rounded, then read exactly


def test_cli_builds_and_checks_a_bf16_layer(tmp_path, capsys):
    from dnir.cli import main
    path = tmp_path / "gdn.bf16.dnir"
    assert main(["build", "gdn", "--heads", "2", "--value-heads", "4", "--head-dim", "16", "--value-dim", "16",
                 "--seq-len", "100", "--dtype", "bf16", "--initial-state", "--final-state", "-o", str(path)]) == 0
    assert "%q: bf16[1,100,2,16]" in path.read_text()
    capsys.readouterr()
    assert main(["run", str(path), "--target", "llvm", "--check"]) == 0
    out = capsys.readouterr().out
    assert "o bfloat16[1, 100, 4, 16]; final_state float32[1, 4, 16, 16]" in out
    assert "o 3.9e-03 for its dtype's rounding): ok" in out


def test_cuda_compiles_half_layers_to_ptx(tmp_path):
    """bf16 prefill and decode for sm_90: kernels read the half inputs (the decode step its q, k, v
    and beta); nvcc makes PTX."""
    import shutil
    import subprocess
    from dnir.lowering.registry import build
    from dnir.lowering.tvm.compile import cuda_source
    sizes = dict(heads=2, value_heads=4, head_dim=32, value_dim=32, initial_state=True, final_state=True)
    for cfg in (DeltaNetConfig("gdn", seq_len=100, dtype="bf16", **sizes),
                DeltaNetConfig("kda", mode="decode", seq_len=1, batch=3, dtype="bf16", **sizes)):
        source = cuda_source(build(passes.optimize(build_delta_net(cfg), "O2"), "cuda", arch="sm_90"))
        # a kernel takes the half input itself (the widening cast is fused into its reader)
        assert re.search(r"\bnv_bfloat16\* __restrict__ \w+", source)
        if cfg.mode == "decode":
            assert re.search(r"decode_step_kernel\([^)]*nv_bfloat16\* __restrict__ Q_ptr", source)
        nvcc = shutil.which("nvcc")
        if nvcc is None:
            pytest.skip("nvcc not installed: the CUDA source was generated but not compiled")
        cu = tmp_path / f"{cfg.mode}.cu"
        cu.write_text(source)
        proc = subprocess.run([nvcc, "--ptx", "-arch=sm_90", "-o", str(cu.with_suffix(".ptx")), str(cu)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert ".target sm_90" in cu.with_suffix(".ptx").read_text()


@pytest.mark.parametrize("dtype", HALVES)
def test_ggml_runs_half_layers(dtype, rng):
    from dnir.lowering.ggml.build import GgmlUnavailable, ggml_build
    try:
        ggml_build()
    except GgmlUnavailable as e:
        pytest.skip(f"ggml cannot be built here: {e}")
    cfg = DeltaNetConfig("gdn", dtype=dtype, **SMALL)
    x = half_inputs(cfg, rng)
    o_ref, state_ref = oracle(cfg, x)
    o, state = run_layer(cfg, x, "O2", target="ggml")
    assert_close(state, state_ref, what="final state")
    assert_rounded_from(o, o_ref, dtype)
