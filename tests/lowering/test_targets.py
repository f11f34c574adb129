"""Target registration, errors a user can act on, the CUDA path up to PTX, and the CLI."""
import re

import numpy as np
import pytest

import dnir
from dnir.errors import BackendError
from dnir.lowering import run
from dnir.ops import REGISTRY, OpDef

from backends import sm90_ptx, vulkan_available
from cases import build_all


def test_unknown_target_lists_the_available_ones():
    b = dnir.Builder()
    g = b.build(b.exp(b.input("x", (2,))))
    with pytest.raises(BackendError, match="unknown target 'tpu'.*numpy, llvm, cuda, vulkan"):
        run(g, {"x": np.ones(2)}, target="tpu")


def test_every_op_a_target_cannot_lower_is_named_in_one_error(monkeypatch):
    # Two ops that no backend table knows, one inside a scan body.
    for name in ("mystery", "enigma"):
        monkeypatch.setitem(REGISTRY, name, OpDef(name, 1, lambda ins, attrs: ins[0], op_class="elementwise"))
    body = dnir.Builder()
    s = body.input("s", (3,))
    body_graph = body.build([dnir.make_node("enigma", (s,), {})])
    b = dnir.Builder()
    x = b.input("x", (3,))
    (final,) = b.scan(body_graph, [dnir.make_node("mystery", (x,), {})], length=2)
    graph = dnir.Graph(b.inputs, [final])
    from dnir.lowering.tvm.translate import translate
    with pytest.raises(BackendError, match="cannot lower: enigma, mystery"):
        translate(graph, target_name="llvm")


@pytest.mark.skipif(not vulkan_available(), reason="no Vulkan adapter on this machine")
def test_vulkan_names_every_op_with_a_dtype_wgsl_lacks():
    b = dnir.Builder()
    x = b.input("x", (4,), "f64")
    y = b.input("y", (4,), "i64")
    g = b.build([b.exp(x), b.cumsum(y, axis=0)])
    with pytest.raises(BackendError, match=r"'vulkan' cannot lower: cumsum \(i64\), exp \(f64\)"):
        run(g, {"x": np.ones(4), "y": np.ones(4, np.int64)}, target="vulkan")


def test_cuda_without_a_gpu_is_a_backend_error():
    import tvm
    if tvm.cuda(0).exist:
        pytest.skip("this machine has a GPU")
    b = dnir.Builder()
    g = b.build(b.exp(b.input("x", (2,))))
    with pytest.raises(BackendError):
        run(g, {"x": np.ones(2, np.float32)}, target="cuda")


def _fused_delta_kernels():
    """A chunked layer (its loop over chunks), a decode layer (its step) and a recurrent one (a step
    per token, inside its loop), each unit one kernel on GPUs. The chunked layer twice: its work local
    to each chunk on tensor cores (intra_chunk_mma), and at a head size that kernel does not take
    (K = 24, not whole quarters of 32 channels) on CUDA cores (intra_chunk.py)."""
    from backends import merge_graphs
    from dnir.lowering.registry import target_context
    from dnir.models import build
    from dnir.passes import optimize
    sizes = dict(heads=2, value_heads=4, head_dim=32, value_dim=32, initial_state=True, final_state=True)
    with target_context("cuda"):         # O2 for the GPU: the work local to each chunk is a fused op too
        prefill = optimize(build("gdn", seq_len=100, **sizes), "O2")
        odd = optimize(build("kda", seq_len=100, **dict(sizes, head_dim=24)), "O2")
    return merge_graphs({"prefill": prefill, "prefill_k24": odd,
                         "decode": optimize(build("kda", mode="decode", seq_len=1, batch=3,
                                                  **dict(sizes, value_heads=2)), "O2"),
                         "recurrent": optimize(build("gdn", mode="recurrent", seq_len=5, **sizes), "O2")})


FUSED_KERNELS = ["intra_chunk_mma_kernel", "intra_chunk_kernel", "chunk_states_kernel", "chunk_output_kernel", "decode_step_kernel"]


@pytest.mark.parametrize("graph,kernels", [(build_all, ["solve_tri"]), (_fused_delta_kernels, FUSED_KERNELS)],
                         ids=["conformance-table", "fused-delta-kernels"])
def test_cuda_source_for_sm90_compiles_to_ptx(graph, kernels, tmp_path):
    """The graph compiled for sm_90; nvcc (where present) turns it into PTX."""
    from dnir.lowering.registry import build
    from dnir.lowering.tvm.compile import cuda_source
    source = cuda_source(build(graph(), "cuda", arch="sm_90"))     # the cuda pipeline fuses the delta steps
    assert "__global__" in source and all(k in source for k in kernels)
    ptx = sm90_ptx(source, tmp_path)
    found = set(re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", source))
    assert ".target sm_90" in ptx and found and set(re.findall(r"\.entry (\w+)\(", ptx)) == found


def test_compile_cli_exports_llvm_and_cuda_libraries(tmp_path):
    from dnir.cli import main
    b = dnir.Builder()
    x = b.input("x", (8, 16))
    g = b.build([b.cumsum(b.matmul(x, x, transpose_b=True), axis=1)], names=["y"])
    path = tmp_path / "g.dnir"
    path.write_text(dnir.print(g))
    for target in ("llvm", "cuda"):
        out = tmp_path / f"g_{target}.so"
        assert main(["compile", str(path), "--target", target, "-o", str(out)]) == 0
        assert out.stat().st_size > 0
    # The exported CPU library runs with the VM alone and matches NumPy.
    import tvm
    lib = tvm.runtime.load_module(str(tmp_path / "g_llvm.so"))
    vm = tvm.runtime.vm.VirtualMachine(lib, tvm.cpu())
    xs = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    (out,) = vm["main"](tvm.runtime.tensor(xs))
    np.testing.assert_allclose(out.numpy(), np.cumsum(xs @ xs.T, axis=1), rtol=1e-5, atol=1e-5)


def test_compile_cli_rejects_a_bad_output_name(tmp_path, capsys):
    from dnir.cli import main
    path = tmp_path / "g.dnir"
    b = dnir.Builder()
    path.write_text(dnir.print(b.build(b.exp(b.input("x", (2,))))))
    assert main(["compile", str(path), "--target", "llvm", "-o", str(tmp_path / "g.bin")]) == 2
    assert "must end with .so" in capsys.readouterr().err
