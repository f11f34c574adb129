"""The fused ops' CPU kernels on the llvm target (lowering/tvm/cpu_token_step.py, cpu_chunk_scan.py,
cpu_intra_chunk.py, cpu_chunk_layer.py): which graphs
the llvm pipeline fuses, that the compiled module runs them as one kernel, and their results
against the NumPy backend and the float64 recurrent oracle on fresh random inputs (GQA, a
gate per key channel, one and several sequences, an initial state, strong gates); and how
llvm runs cross the boundary: outputs of their own, compiled libraries kept on disk."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dnir import passes
from dnir.builder import Builder
from dnir.lowering import registry
from dnir.lowering.tvm.compile import build, unaligned_inputs
from dnir.lowering.tvm.translate import translate
from dnir.models import build_delta_net, delta_rule_reference, preset, random_inputs, relative_rms_error

VALUE_HEADS = {"qwen3-next": 4, "kimi-linear": 2}     # GQA for gdn
GATE_SCALES = (1.0, 8.0)        # as drawn, and strong gates (decays near 0)


def _decode(name, batch):
    cfg = preset(name, heads=2, value_heads=VALUE_HEADS[name], head_dim=32, value_dim=64, batch=batch,
                 seq_len=1, mode="decode", initial_state=True, final_state=True)
    return cfg, passes.optimize(build_delta_net(cfg), "O2")


def _ops(graph, op):
    return [n for n in graph.topo_order() if n.op == op]


@pytest.mark.parametrize("name", ["qwen3-next", "kimi-linear"])
def test_decode_step_is_one_kernel_on_llvm(name):
    _, graph = _decode(name, 3)
    prepared = registry.prepare(graph, "llvm")
    # the step with its prologue (the scale, the gate's exp, the GQA repeat): the inputs as given
    assert len(_ops(prepared, "decode_step")) == 1 and not _ops(prepared, "matmul") and not _ops(prepared, "exp")
    main = translate(prepared, gpu=False)["main"].script()
    assert main.count("R.call_tir(") == 1 and "R.call_tir(decode_step, (initial_state, q, k, v, g, beta)" in main
    # the compiled library holds the kernel, a parallel loop over heads
    assert "__tvm_ffi_decode_step" in build(prepared, "llvm").mod.imports[0].inspect_source("asm")


@pytest.mark.parametrize("scale", GATE_SCALES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", ["qwen3-next", "kimi-linear"])
def test_decode_on_llvm_matches_numpy_and_the_oracle(name, batch, scale, rng):
    cfg, graph = _decode(name, batch)
    x = random_inputs(cfg, rng)
    x["g"] = x["g"] * scale
    got = registry.run(graph, x, target="llvm")
    want = registry.run(graph, x, target="numpy")
    o, state = delta_rule_reference(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=cfg.scale,
                                    initial_state=x["initial_state"])
    oracle = dict(o=o, final_state=state)
    for out_name, out, ref in zip(graph.output_names, got, want):
        assert out.shape == ref.shape and out.dtype == np.float32
        assert relative_rms_error(out, ref) < 1e-6, out_name
        assert relative_rms_error(out, oracle[out_name]) < 1e-5, out_name


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", ["qwen3-next", "kimi-linear"])
def test_half_decode_on_llvm_matches_numpy_and_the_oracle(name, batch, dtype, rng):
    """Half q, k, v and beta read by the step itself (widened as loaded), strong gates, GQA."""
    cfg = preset(name, heads=2, value_heads=VALUE_HEADS[name], head_dim=32, value_dim=64, batch=batch,
                 seq_len=1, mode="decode", initial_state=True, final_state=True, dtype=dtype)
    graph = passes.optimize(build_delta_net(cfg), "O2")
    (step,) = _ops(registry.prepare(graph, "llvm"), "decode_step")
    assert [x.dtype for x in step.inputs] == ["f32", dtype, dtype, dtype, "f32", dtype]
    x = random_inputs(cfg, rng)
    x["g"] = x["g"] * 8.0
    got, want = registry.run(graph, x, target="llvm"), registry.run(graph, x, target="numpy")
    wide = {n: np.asarray(a, np.float64) for n, a in x.items()}
    o, state = delta_rule_reference(wide["q"], wide["k"], wide["v"], wide["g"], wide["beta"], scale=cfg.scale,
                                    initial_state=wide["initial_state"])
    oracle = dict(o=o, final_state=state)
    for out_name, out, ref in zip(graph.output_names, got, want):
        assert out.dtype == ref.dtype and out.shape == ref.shape
        tol = 1e-6 if out_name == "final_state" else 1e-2       # o is rounded to the half dtype
        assert relative_rms_error(np.asarray(out, np.float64), np.asarray(ref, np.float64)) < tol, out_name
        assert relative_rms_error(np.asarray(out, np.float64), oracle[out_name]) < max(tol, 1e-5), out_name


@pytest.mark.parametrize("name", ["qwen3-next", "kimi-linear"])
def test_the_decode_module_returns_its_steps_report(name, rng):
    """After the graph's outputs the module returns decode_step's report (the functional API's
    checks, cpu_token_step.REPORT): the heads' |sum of o, the new state and g| added up, the
    largest gate, and the largest beta |k|^2; run_llvm returns the graph's outputs."""
    from dnir.lowering.tvm.compile import llvm_call
    from dnir.lowering.tvm.cpu_token_step import step_report
    from dnir.lowering.numpy_backend import prepare_inputs
    cfg, graph = _decode(name, 3)
    prepared = registry.prepare(graph, "llvm")
    x = random_inputs(cfg, rng)
    (o, state), checks = llvm_call(prepared)(prepare_inputs(prepared, x))
    at = graph.output_names.index("final_state")
    assert list(checks) == [at] and step_report(prepared) == at
    B, HV, group = cfg.batch, cfg.value_heads, cfg.value_heads // cfg.heads
    g = x["g"].astype(np.float64).reshape(B, HV, -1)
    k = np.repeat(x["k"].astype(np.float64).reshape(B, cfg.heads, -1), group, axis=1)
    per_head = np.abs(o.astype(np.float64).reshape(B, HV, -1).sum(-1) + state.sum((-2, -1)) + g.sum(-1))
    want = [per_head.sum(), g.max(), (x["beta"].reshape(B, HV) * (k * k).sum(-1)).max()]
    assert checks[at].shape == (3,) and checks[at].dtype == np.float32
    assert np.allclose(checks[at], want, rtol=1e-5, atol=1e-4)
    assert len(registry.run(graph, x, target="llvm")) == 2


def test_small_kernels_run_on_one_thread():
    """A decode step of one sequence: its vector kernels (a few thousand elements) run on the
    calling thread; token_step alone is a parallel region (compile.SERIAL_ITERATIONS)."""
    _, graph = _decode("qwen3-next", 1)
    ir = build(registry.prepare(graph, "llvm"), "llvm").mod.imports[0].inspect_source("ll")
    assert len(re.findall(r"^define .*@__tvm_parallel_lambda", ir, re.M)) == 1


def test_a_decode_step_in_another_dtype_stays_op_by_op():
    _, graph = _decode("kimi-linear", 1)
    (step,) = _ops(registry.prepare(graph, "llvm"), "decode_step")
    target = registry.backend_for("llvm").context("llvm")
    assert target.rejects(step) is None
    narrow = type(target)(target.name, target.kernels, dtypes=frozenset({"f64"}))
    assert narrow.rejects(step) == "the kernel is written for f64, not f32"


SMALL = dict(heads=2, head_dim=32, value_dim=32, initial_state=True, final_state=True)
LAYERS = {
    "gqa-partial-chunk": ("qwen3-next", dict(seq_len=150)),
    "gqa-whole-chunks": ("qwen3-next", dict(seq_len=128)),
    "gate-per-channel": ("kimi-linear", dict(seq_len=150)),
    "varlen": ("qwen3-next", dict(seq_len=100, cu_seqlens=(0, 37, 100))),
    "two-sequences-chunk-32": ("kimi-linear", dict(seq_len=96, batch=2, chunk_size=32, value_dim=48)),
}


@pytest.mark.parametrize("scale", GATE_SCALES)
@pytest.mark.parametrize("case", sorted(LAYERS))
@pytest.mark.parametrize("in_context", [False, True])
def test_chunked_layer_on_llvm_matches_numpy_and_the_oracle(in_context, case, scale, rng):
    """O2 alone, or inside llvm's pass context (as the functional API runs it): the work local to
    each chunk is then one kernel too (cpu_intra_chunk.py)."""
    name, options = LAYERS[case]
    cfg = preset(name, value_heads=VALUE_HEADS[name], **dict(SMALL, **options))
    if in_context:
        with registry.target_context("llvm"):
            graph = passes.optimize(build_delta_net(cfg), "O2")
    else:
        graph = passes.optimize(build_delta_net(cfg), "O2")
    prepared = registry.prepare(graph, "llvm")
    assert len(_ops(prepared, "chunk_scan")) == (cfg.num_sequences if cfg.cu_seqlens else 1)   # a loop per sequence
    assert not _ops(prepared, "scan")
    assert len(_ops(prepared, "intra_chunk")) == in_context
    if in_context:
        assert not _ops(prepared, "matmul") and not _ops(prepared, "exp")
    x = random_inputs(cfg, rng)
    x["g"] = x["g"] * scale
    got = registry.run(graph, x, target="llvm")
    want = registry.run(graph, x, target="numpy")
    o, state = delta_rule_reference(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=cfg.scale,
                                    initial_state=x["initial_state"], cu_seqlens=cfg.cu_seqlens)
    oracle = dict(o=o, final_state=state)
    for out_name, out, ref in zip(graph.output_names, got, want):
        assert out.shape == ref.shape and out.dtype == np.float32
        assert relative_rms_error(out, ref) < 1e-5, out_name
        assert relative_rms_error(out, oracle[out_name]) < 1e-5, out_name


@pytest.mark.parametrize("case", ["gqa-partial-chunk", "gqa-whole-chunks", "gate-per-channel",
                                  "two-sequences-chunk-32"])
def test_chunk_local_work_runs_inside_the_loop_over_chunks(case):
    """Inside llvm's context, the intra_chunk and the chunk_scan reading its results compile to one
    kernel (cpu_chunk_layer.py): neither runs on its own (its results, above, match both references),
    and q's scaling, q and k repeated over value heads (GQA) and o's reordering to token-major are
    done by the kernel as it reads and writes, not as copies of their own (where the chunks are whole:
    a partial last chunk pads the operands and slices o)."""
    name, options = LAYERS[case]
    cfg = preset(name, value_heads=VALUE_HEADS[name], **dict(SMALL, **options))
    with registry.target_context("llvm"):
        graph = passes.optimize(build_delta_net(cfg), "O2")
    prepared = registry.prepare(graph, "llvm")
    main = translate(prepared, gpu=False)["main"].script()
    assert main.count("R.call_tir(") == 1, main
    if cfg.seq_len % cfg.chunk_size == 0:
        assert not any(op in main for op in ("R.permute_dims", "R.broadcast_to", "R.multiply", "R.nn.pad")), main
    asm = build(prepared, "llvm").mod.imports[0].inspect_source("asm")
    assert "__tvm_ffi_chunk_layer" in asm
    assert "__tvm_ffi_intra_chunk" not in asm and "__tvm_ffi_chunk_scan" not in asm


def test_outputs_own_their_memory(rng):
    """Arrays cross into TVM without a copy where aligned (else through a buffer kept for the next
    call): an output that is an input's reshape is still a copy, and a later call changes no
    earlier result."""
    b = Builder()
    x = b.input("x", (3, 50))
    graph = b.build([b.reshape(x, (50, 3)), b.add(x, x)])
    raw = np.empty(4 * 150 + 128, np.uint8)
    start = -raw.ctypes.data % 64
    inputs = [raw[start + offset:start + offset + 600].view(np.float32).reshape(3, 50) for offset in (0, 4, 4)]
    assert [a.ctypes.data % 64 for a in inputs] == [0, 4, 4]    # aligned (no copy), then staged twice
    runs, values = [], []
    for a in inputs:
        a[...] = rng.standard_normal(a.shape)
        values.append(a.copy())
        runs.append(registry.run(graph, {"x": a}, target="llvm"))
    for a, value, (view, twice) in zip(inputs, values, runs):
        assert np.array_equal(view, value.reshape(50, 3)) and np.array_equal(twice, 2 * value)
        assert not np.may_share_memory(view, raw) and not np.may_share_memory(twice, raw)


def test_a_second_process_loads_the_compiled_library(tmp_path):
    script = (
        "import numpy as np\n"
        "from dnir import passes\n"
        "from dnir.lowering import module_cache, registry\n"
        "from dnir.lowering.tvm import compile\n"
        "from dnir.models import build_delta_net, preset, random_inputs\n"
        "cfg = preset('kimi-linear', heads=2, value_heads=2, head_dim=32, value_dim=64, batch=2, seq_len=1,\n"
        "             mode='decode', initial_state=True, final_state=True)\n"
        "graph = passes.optimize(build_delta_net(cfg), 'O2')\n"
        "o, state = registry.run(graph, random_inputs(cfg, 0), target='llvm')\n"
        "path = compile.library_path(registry.prepare(graph, 'llvm'))\n"
        "print(len(compile._CACHE), path.parent == module_cache.cache_dir(), path.exists(), float(o.sum()))\n")
    env = dict(os.environ, DNIR_CACHE=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
            for _ in range(2)]
    first, second = (r.stdout.split() for r in runs)
    assert first[:3] == ["1", "True", "True"]          # compiled, and kept in $DNIR_CACHE/tvm
    assert second[:3] == ["0", "True", "True"]         # loaded: nothing compiled
    assert first[3] == second[3]
    assert [p.name for p in (tmp_path / "tvm").iterdir()] == [Path(p).name for p in (tmp_path / "tvm").glob("*.so")]


@pytest.mark.parametrize("name", ["qwen3-next", "kimi-linear"])
def test_decode_reads_unaligned_inputs_in_place(name, rng):
    """The decode step's kernel reads its operands at any alignment of their elements: the layer's
    inputs, read only there, cross into TVM as they are (no aligned copies), and the results are
    the same."""
    cfg, graph = _decode(name, 3)
    prepared = registry.prepare(graph, "llvm")
    assert unaligned_inputs(prepared) == set(range(len(prepared.inputs)))
    x = random_inputs(cfg, rng)
    want = registry.run(graph, x, target="numpy")
    given = {n: _off_a_line(a) for n, a in x.items()}
    for out, ref in zip(registry.run(graph, given, target="llvm"), want):
        assert relative_rms_error(out, ref) < 1e-6
    assert all(np.array_equal(given[n], a) for n, a in x.items())        # read, never written


def _off_a_line(a: np.ndarray) -> np.ndarray:
    """A copy of a whose data starts 4 bytes past a 64-byte boundary."""
    raw = np.empty(a.nbytes + 128, np.uint8)
    start = -raw.ctypes.data % 64 + 4
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    assert out.ctypes.data % 64 == 4
    return out


@pytest.mark.parametrize("T, loose", [(128, True), (100, False)])
@pytest.mark.parametrize("name", ["qwen3-next", "kimi-linear"])
def test_the_chunk_layer_reads_unaligned_inputs_in_place(name, T, loose, rng):
    """The CPU chunk layer declares its operands aligned to their elements only: a layer's inputs
    that only it reads (through the GQA repeat and q's scaling it reads past) cross into TVM as
    they are, 4 bytes off a cache line here, and the results are NumPy's. A length that is not a
    multiple of the chunk pads its inputs first (a kernel of its own): those are copied aligned."""
    from dnir.api import compiled_graph
    cfg = preset(name, heads=2, value_heads=VALUE_HEADS[name], head_dim=32, value_dim=64, batch=2, seq_len=T,
                 initial_state=True, final_state=True)
    prepared = registry.prepare(compiled_graph(cfg, "O2", "llvm"), "llvm")
    assert _ops(prepared, "chunk_scan") and (unaligned_inputs(prepared) == set(range(6))) == loose
    x = random_inputs(cfg, rng)
    want = registry.run(build_delta_net(cfg), x, target="numpy")
    given = {n: _off_a_line(a) for n, a in x.items()}
    for _ in range(2):
        for out, ref in zip(registry.run(prepared, given, target="llvm"), want):
            assert relative_rms_error(out, ref) < 1e-5
    assert all(np.array_equal(given[n], a) for n, a in x.items())
