"""The work local to each chunk as one GPU kernel (lowering/tvm/intra_chunk.py): O2 in a GPU
target's context puts in the fused op intra_chunk (passes/fuse_intra_chunk.py), the prepared layer
is three kernels and no products in primitive ops, and its results on Vulkan match the NumPy
backend (CUDA: compiled to PTX by test_targets, run on the GPU by scripts/gpu_conformance.py)."""
import pytest

from dnir import passes
from dnir.lowering import registry
from dnir.lowering.registry import target_context
from dnir.models import build_delta_net, preset, random_inputs

from backends import assert_vulkan_matches_numpy, needs_vulkan

SMALL = dict(heads=2, head_dim=32, value_dim=32, initial_state=True, final_state=True)
VALUE_HEADS = {"qwen3-next": 4, "kimi-linear": 2}     # GQA for gdn


def _layer(name, target, **options):
    cfg = preset(name, value_heads=VALUE_HEADS[name], **SMALL, **options)
    with target_context(target) as ctx:
        graph = passes.optimize(build_delta_net(cfg), "O2")
    return cfg, graph, ctx.remarks


@pytest.mark.parametrize("name", ["qwen3-next", "kimi-linear"])
def test_a_chunked_layer_is_three_kernels_on_gpus(name):
    cfg, graph, remarks = _layer(name, "cuda", seq_len=150)
    ops = registry.prepare(graph, "cuda").op_histogram()
    assert ops["intra_chunk"] == ops["chunk_states"] == ops["chunk_output"] == 1
    assert not {"matmul", "solve_tri", "scan", "chunk_scan", "cumsum", "exp", "permute"} & set(ops)
    (output,) = [n for n in registry.prepare(graph, "cuda").topo_order() if n.op == "chunk_output"]
    # written token-major ([R, n C, HV, V]): no transpose of o follows, no reshape either
    assert output.attrs["token_major"] and output.shape == (1, 3 * 64, VALUE_HEADS[name], 32)
    assert {"permute", "reshape"}.isdisjoint(n.op for n in registry.prepare(graph, "cuda").topo_order()
                                             if output in n.inputs)
    assert ("fuse_intra_chunk", "intra_chunk fused (chunks of 64)") in remarks


def test_a_head_too_wide_for_the_block_keeps_the_primitive_ops():
    cfg = preset("qwen3-next", **dict(SMALL, head_dim=256, value_dim=256), seq_len=70)
    with target_context("cuda") as ctx:
        graph = passes.optimize(build_delta_net(cfg), "O2")
    assert "intra_chunk" not in graph.op_histogram()
    assert ("fuse_intra_chunk", "intra_chunk not fused: C=64, K=256, V=256: the kernel takes chunks of whole "
                                "16-token blocks up to 64 and K + V <= 256 (chunks of 64)") in ctx.remarks


@needs_vulkan
@pytest.mark.parametrize("name,options", [
    ("qwen3-next", dict(seq_len=150)),                              # GQA, a partial last chunk
    ("qwen3-next", dict(seq_len=128, batch=2)),                     # GQA and q's scale read raw by the kernel
    ("kimi-linear", dict(seq_len=96, batch=2, chunk_size=32)),      # a decay per key channel
    ("qwen3-next", dict(seq_len=100, cu_seqlens=(0, 37, 100))),     # packed sequences
])
def test_intra_chunk_on_vulkan_matches_numpy(name, options, rng):
    cfg, graph, _ = _layer(name, "vulkan", **options)
    assert registry.prepare(graph, "vulkan").op_histogram()["intra_chunk"] == 1
    assert_vulkan_matches_numpy(graph, random_inputs(cfg, rng))


def test_o2_for_cuda_runs_without_tvms_compiler():
    """Where only TVM's runtime is installed (a GPU server running a shipped module cache), the API
    still optimises the layer in the cuda context to find its module: the kernel's check imports no
    TVM."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['tvm'] = None\n"
            "from dnir.api import compiled_graph\nfrom dnir.models import preset\n"
            "g = compiled_graph(preset('kimi-linear', value_heads=2, heads=2, head_dim=32, value_dim=32, "
            "seq_len=70), 'O2', 'cuda')\nassert 'intra_chunk' in g.op_histogram()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_the_cuda_layer_reads_raw_q_k_v_beta(dtype):
    """intra_chunk reads q and k before their GQA repeat and q before its scaling (and on cuda a
    bf16 input before its cast): the cuda module launches no kernel for those copies, only the
    three fused ones (chunk_output stores a bf16 o itself: passes/fold_narrowing_casts.py); Vulkan
    runs the same kernel code (matched to NumPy above, GQA included). Whole chunks: a partial last
    chunk's padding is still a copy."""
    from dnir.lowering.tvm.translate import translate
    cfg = preset("qwen3-next", value_heads=4, **SMALL, seq_len=128, dtype=dtype)
    with target_context("cuda"):
        graph = passes.optimize(build_delta_net(cfg), "O2")
    main = translate(registry.prepare(graph, "cuda"), gpu=True, target_name="cuda")["main"].script()
    calls = [line for line in main.splitlines() if "R.call_tir(" in line]
    # intra_chunk on tensor cores (intra_chunk_mma.chosen)
    assert [c.split("R.call_tir(")[1].split(",")[0] for c in calls] == ["intra_chunk_mma", "chunk_states", "chunk_output"]
    assert "R.multiply" not in main and "R.broadcast_to" not in main
    assert "R.astype" not in main                                       # no cast of o, no kernel for it
    assert f'R.Tensor((1, 128, 4, 32), dtype="{"bfloat16" if dtype == "bf16" else "float32"}")' in calls[2]
    intra = calls[0].split("(", 2)[2]
    assert intra.startswith("q, k, v, ")                                # the layer's own q, k, v


@pytest.mark.parametrize("name,dtype,width", [("kimi-linear", "bf16", 128), ("qwen3-next", "f16", 32),
                                              ("qwen3-next", "bf16", 32)])
def test_a_half_layers_o_is_stored_by_chunk_output(name, dtype, width, tmp_path):
    """A bf16/fp16 layer on cuda: chunk_output (on tensor cores at width 128, on CUDA cores at 32)
    rounds its float32 sums as it stores o in the layer's dtype (passes/fold_narrowing_casts.py),
    so the module of whole chunks has no cast kernel (its inputs read raw, o stored half); it compiles to
    sm_90 PTX, the stores converting with round-to-nearest-even (cvt.rn)."""
    import re

    from backends import sm90_ptx
    from dnir.lowering.tvm.compile import cuda_source
    cfg = preset(name, value_heads=VALUE_HEADS[name], **dict(SMALL, head_dim=width, value_dim=width), seq_len=128,
                 dtype=dtype)
    with target_context("cuda"):
        graph = passes.optimize(build_delta_net(cfg), "O2")
    source = cuda_source(registry.build(graph, "cuda", arch="sm_90"))
    kernels = set(re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", source))
    assert {"chunk_states_kernel", "chunk_output_kernel"} <= kernels and not any("cast" in k for k in kernels)
    half = {"bf16": "nv_bfloat16", "f16": "half"}[dtype]
    start = re.search(r"void (?:__launch_bounds__\(\d+\) )?chunk_output_kernel\([^)]*\) \{", source).start()
    output = source[start:source.index("\n}\n", start)]                   # its definition
    assert f"{half}* __restrict__ O_ptr" in output
    stores = 4 * (64 // 8) if width == 128 else 4 * 4       # mma: 4 per 8-column tile of 64; else a 4 x 4 tile
    assert len(re.findall(rf"O_ptr\[[^;]*\] = \(\({half}\)acc_ptr\[\d+\]\);", output)) == stores
    ptx = sm90_ptx(source, tmp_path)
    entry = ptx[ptx.index(".entry chunk_output_kernel("):]
    entry = entry[:entry.index("\n}\n")]
    assert entry.count(f"cvt.rn.{'bf16' if dtype == 'bf16' else 'f16'}.f32") == stores
