"""The tensor-core variants of chunk_states, chunk_output and intra_chunk (lowering/tvm/mma.py) compile to
sm_90 PTX with their mma instructions, and the cuda target's layer uses them; benchmarks/gpu_sweep.py runs them
on a GPU against the CUDA-core kernels."""
import re

import pytest
from backends import sm90_ptx

tvm = pytest.importorskip("tvm")


def _source(func):
    from dnir.lowering.tvm.compile import cuda_source, make_target
    return cuda_source(tvm.compile(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}), target=make_target("cuda")))


@pytest.mark.parametrize("kernel,split,products", [("states", True, 3), ("states", False, 1),
                                                  ("output", True, 3), ("output", False, 1)])
def test_mma_kernels_compile_to_ptx(kernel, split, products, tmp_path):
    from dnir.lowering.tvm.chunk_output import MMA_BV, MMA_KT, chunk_output_mma_kernel
    from dnir.lowering.tvm.chunk_states_mma import chunk_states_mma_kernel
    steps, batch, C, K, V = 3, (2, 4), 64, 128, 128
    if kernel == "states":
        func = chunk_states_mma_kernel(steps, batch, C, K, V, K, "float32", split=split)
        # per half of K (the loop over halves is not unrolled): v_new's and the update's k-steps, 2 tiles
        expected = products * (K // 2 // 8) * 2 * 2
    else:
        func = chunk_output_mma_kernel(steps, batch, C, K, V, "float32", token_major=True, split=split)
        expected = products * (MMA_KT // 8) * (MMA_BV // 8) * 2
    source = _source(func)
    assert source.count("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32") == expected
    ptx = sm90_ptx(source, tmp_path)
    assert len(re.findall(r"mma\.sync\.aligned\.m16n8k8\.row\.col\.f32\.tf32\.tf32\.f32", ptx)) >= expected


@pytest.mark.parametrize("prefetch,vt,split,kg,stages", [("registers", 16, True, 1, 4), ("async", 16, True, 128, 4),
                                                        ("registers", 32, False, 128, 4), ("async", 32, False, 1, 4),
                                                        ("async", 16, True, 1, 2), ("async", 16, False, 128, 3)])
def test_chunk_states_prefetch_compiles_to_ptx(prefetch, vt, split, kg, stages, tmp_path):
    """The prefetching variants of chunk_states_mma: the same products, one barrier a staged half and
    none that TVM added (3 in the source: one in each loop over halves, one after the loop), the async
    variant's operands by cp.async."""
    from dnir.lowering.tvm.chunk_states_mma import chunk_states_mma_kernel
    steps, batch, C, K, V = 3, (2, 4), 64, 128, 128
    source = _source(chunk_states_mma_kernel(steps, batch, C, K, V, kg, "float32", vt=vt, split=split,
                                             prefetch=prefetch, stages=stages))
    assert source.count(MMA) == (3 if split else 1) * (K // 2 // 8) * (vt // 8) * 2
    assert source.count("__syncthreads()") == 3
    assert ("cp.async.cg.shared.global" in source) == (prefetch == "async")
    ptx = sm90_ptx(source, tmp_path)
    assert len(re.findall(re.escape(MMA), ptx)) >= source.count(MMA)
    if prefetch == "async":
        assert re.search(r"cp\.async\.cg\.shared\.global \[%r\d+\], \[%rd\d+\], 16;", ptx)
        assert f"cp.async.wait_group {stages - 2};" in ptx and "cp.async.commit_group;" in ptx
    else:
        assert "cp.async" not in ptx and re.search(r"ld\.global(\.nc)?\.v4\.f32", ptx)


def test_chunk_states_default_is_unchanged_by_prefetch_options():
    """prefetch=None (the default) builds the kernel without a ring or copies, whatever `stages` says;
    unknown options are errors naming the argument."""
    from dnir.errors import AttrError, DTypeError
    from dnir.lowering.tvm.chunk_states_mma import chunk_states_mma_kernel
    args = (3, (2, 4), 64, 128, 128, 128, "float32")
    source = _source(chunk_states_mma_kernel(*args))
    assert source == _source(chunk_states_mma_kernel(*args, prefetch=None, stages=2))
    assert "cp.async" not in source and "extern __shared__" not in source
    with pytest.raises(AttrError, match="prefetch"):
        chunk_states_mma_kernel(*args, prefetch="tma")
    with pytest.raises(AttrError, match="stages"):
        chunk_states_mma_kernel(*args, prefetch="async", stages=5)
    with pytest.raises(DTypeError, match="dtype"):
        chunk_states_mma_kernel(*args[:-1], "float16", prefetch="registers")
    with pytest.raises(AttrError, match="chains"):
        chunk_states_mma_kernel(*args, chains=3)
    with pytest.raises(AttrError, match="products"):
        chunk_states_mma_kernel(*args, products="fp8")
    with pytest.raises(AttrError, match="split"):
        chunk_states_mma_kernel(*args, products="bf16", split=True)


@pytest.mark.parametrize("vt,chains,products", [(16, 2, "tf32"), (16, 1, "bf16"), (32, 2, "bf16"), (8, 1, "bf16")])
def test_chunk_states_chains_and_bf16_products_compile_to_ptx(vt, chains, products, tmp_path):
    """chunk_states_mma as a bf16 layer runs it (w, u, k_to_end bf16, async staging), its products split
    over `chains` accumulator sets (each added into the first once) or as bf16 m16n8k16, whose fragment
    places cover the 16 x 16 and 16 x 8 tiles once each."""
    import numpy as np

    from dnir.lowering.tvm import mma
    from dnir.lowering.tvm.chunk_states_mma import chunk_states_mma_kernel
    cover_a, cover_b = np.zeros((16, 16), int), np.zeros((16, 8), int)
    for lane in range(32):
        for i in range(8):
            cover_a[mma.a16_at(lane, i)] += 1
        for i in range(4):
            cover_b[mma.b16_at(lane, i)] += 1
    assert (cover_a == 1).all() and (cover_b == 1).all()
    narrow = {"w": "bfloat16", "u": "bfloat16", "k_to_end": "bfloat16"}
    steps, batch, C, K, V = 3, (2, 4), 64, 128, 128
    source = _source(chunk_states_mma_kernel(steps, batch, C, K, V, 1, "float32", vt=vt, split=False,
                                             prefetch="async", stored="bfloat16", narrow=narrow, chains=chains,
                                             products=products))
    bf16 = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
    instruction, terms = (bf16, 16) if products == "bf16" else (MMA, 8)
    assert source.count(instruction) == (K // 2 // terms) * (vt // 8) * 2
    assert (bf16 in source) == (products == "bf16") and (MMA in source) == (products == "tf32")
    # the sets after the first start at zero and are added into it: in v_new's sum and the update's
    assert len(re.findall(r"acc(_ptr)?\[\d+\] = \(acc(_ptr)?\[\d+\] \+ acc", source)) == 2 * 4 * (vt // 8) * (chains - 1)
    ptx = sm90_ptx(source, tmp_path)
    assert len(re.findall(re.escape(instruction), ptx)) >= source.count(instruction)


@pytest.mark.parametrize("bv,split,narrow", [(64, True, False), (64, False, True), (128, False, True)])
def test_chunk_output_async_staging_compiles_to_ptx(bv, split, narrow, tmp_path):
    """staging "async": each operand copied whole by cp.async as it is stored (a bf16 layer's q_decayed,
    starts and v_new as bf16, aqk float32), in two groups, one barrier before each product; the same
    products as the sliced kernel, whose source the option leaves as it was."""
    from dnir.errors import AttrError
    from dnir.lowering.tvm.chunk_output import MMA_BV, chunk_output_mma_kernel
    steps, batch, C, K, V = 3, (2, 4), 64, 128, 128
    options = dict(token_major=True, bv=bv, split=split)
    if narrow:
        options.update(narrow={"q_decayed": "bfloat16", "starts": "bfloat16", "v_new": "bfloat16"},
                       out_dtype="bfloat16")
    source = _source(chunk_output_mma_kernel(steps, batch, C, K, V, "float32", staging="async", **options))
    assert source.count(MMA) == (3 if split else 1) * ((K + C) // 8) * (bv // 8)
    assert source.count("__syncthreads()") == 2 and "extern __shared__" in source
    # 16-byte copies: 8 bf16 or 4 float32 values each, of q_decayed [C, K], starts [K, bv], aqk [C, C], v_new [C, bv]
    per = 8 if narrow else 4
    copies = (C * K + K * bv + C * bv) // per + C * C // 4
    ptx = sm90_ptx(source, tmp_path)
    assert len(re.findall(r"cp\.async\.cg\.shared\.global \[%r\d+\], \[%rd\d+\], 16;", ptx)) == copies // (32 * C // 16)
    assert len(re.findall(re.escape(MMA), ptx)) >= source.count(MMA)
    assert "cp.async.wait_group 1;" in ptx and "cp.async.wait_group 0;" in ptx
    sliced = (steps, batch, C, K, V, "float32")
    assert _source(chunk_output_mma_kernel(*sliced, bv=MMA_BV)) == _source(chunk_output_mma_kernel(*sliced,
                                                                                              staging="slices"))
    with pytest.raises(AttrError, match="staging='tma'; expected one of slices, async"):
        chunk_output_mma_kernel(*sliced, staging="tma")


@pytest.mark.parametrize("kg,split", [(1, True), (128, True), (1, False)])
def test_intra_chunk_mma_compiles_to_ptx(kg, split, tmp_path):
    from dnir.lowering.tvm import intra_chunk_mma as m
    R, NC, HV, C, K, V = 2, 3, 4, 64, 128, 128
    source = _source(m.intra_chunk_mma_kernel(R, NC, HV, C, K, V, kg, "float32", group=2, scale=0.5, split=split))
    # per quarter of K (that loop is not unrolled): each warp's row of tiles over KQ / 8 k-steps, those
    # right of its row block's diagonal block (GDA) or left of it (KDA) skipped at run time
    tiles = C // 8 if kg == 1 else (C - 16) // 8
    # GDA's solve by blocks, a warp's tiles of 16 columns of [W | U] each: row block a's products with
    # the a blocks before it (2 k-steps x 2 n-tiles each) and with M_a (3 of its 4 8 x 8 blocks)
    solve = sum(4 * a + 3 for a in range(C // 16)) * -(-(K + V) // 16 // m.WARPS) if kg == 1 and m.TENSOR_SOLVE else 0
    expected = (3 if split else 1) * (tiles * (m.KQ // 8) + solve)
    assert source.count("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32") == expected
    ptx = sm90_ptx(source, tmp_path)
    assert len(re.findall(r"mma\.sync\.aligned\.m16n8k8\.row\.col\.f32\.tf32\.tf32\.f32", ptx)) >= expected


@pytest.mark.parametrize("layer", ["gdn", "kda"])
def test_cuda_layer_uses_the_tensor_core_kernels(layer):
    from dnir.lowering.registry import build, target_context
    from dnir.lowering.tvm import chunk_states_mma
    from dnir.lowering.tvm.compile import cuda_source
    from dnir.models import build as build_layer
    from dnir.passes import optimize
    with target_context("cuda"):
        graph = optimize(build_layer(layer, seq_len=130, batch=2, heads=2, value_heads=4, head_dim=128,
                                     value_dim=128, initial_state=True, final_state=True), "O2")
    source = cuda_source(build(graph, "cuda", arch="sm_90"))
    assert "mma.sync.aligned.m16n8k8" in source and "chunk_states_kernel" in source
    # the loop over chunks as chunk_states_mma.CHOSEN fetches its operands: by cp.async or not
    states = _kernels(source)["chunk_states_kernel"]
    assert ("cp_async_cg" in states and "wait_group" in states) == (chunk_states_mma.CHOSEN == "async")
    # intra_chunk on tensor cores for both gate variants (intra_chunk_mma.chosen)
    assert "intra_chunk_mma_kernel" in source and "intra_chunk_kernel(" not in source


MMA = "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32"


def _kernels(source: str) -> dict[str, str]:
    """kernel name -> its definition in the CUDA source (declarations, which have no body, left out)."""
    kernels = re.split(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?', source)[1:]
    return {k.split("(", 1)[0]: k for k in kernels if "{" in k}


def _mma_per_kernel(source: str) -> dict[str, int]:
    """kernel name -> its mma instructions in the CUDA source."""
    return {name: k.count(MMA) for name, k in _kernels(source).items() if MMA in k}


@pytest.mark.parametrize("layer,value_dim", [("gdn", 128), ("kda", 64)])
def test_precision_picks_one_tf32_product_or_three(layer, value_dim, tmp_path):
    """A layer's precision reaches all three tensor-core kernels, intra_chunk_mma for either gate
    (intra_chunk_mma.chosen): "tf32" runs each product as one mma, a third of "highest"'s (3xTF32);
    bf16 layers take "tf32" by default."""
    from dnir.lowering.registry import build, target_context
    from dnir.lowering.tvm.compile import cuda_source
    from dnir.models import build as build_layer
    from dnir.passes import optimize
    counts = {}
    for dtype, precision in (("f32", "highest"), ("f32", "tf32"), ("bf16", None)):
        with target_context("cuda"):
            graph = optimize(build_layer(layer, seq_len=130, heads=1, value_heads=2, head_dim=128,
                                         value_dim=value_dim, dtype=dtype, precision=precision, final_state=True), "O2")
        source = cuda_source(build(graph, "cuda", arch="sm_90"))
        assert "intra_chunk_kernel" not in _kernels(source)
        counts[dtype, precision] = _mma_per_kernel(source)
        ptx = sm90_ptx(source, tmp_path)
        assert len(re.findall(re.escape(MMA), ptx)) >= sum(counts[dtype, precision].values())
    highest, tf32 = counts["f32", "highest"], counts["f32", "tf32"]
    assert sorted(highest) == ["chunk_output_kernel", "chunk_states_kernel", "intra_chunk_mma_kernel"]
    assert {k: 3 * n for k, n in tf32.items()} == highest
    assert counts["bf16", None] == tf32


def test_intra_chunk_kernels_ask_for_blocks_per_sm():
    from dnir.lowering.runtime_loader import with_launch_bounds
    src = 'extern "C" __global__ void __launch_bounds__(256) intra_chunk_kernel(float* a) {}\n' \
          'extern "C" __global__ void __launch_bounds__(128) chunk_output_kernel(float* a) {}'
    out = with_launch_bounds(src)
    assert "__launch_bounds__(256, 3) intra_chunk_kernel(" in out
    assert "__launch_bounds__(128) chunk_output_kernel(" in out
    assert "__launch_bounds__(256, 2) intra_chunk_mma_kernel(" in with_launch_bounds(
        src.replace("intra_chunk_kernel", "intra_chunk_mma_kernel"))


def test_a_bf16_layers_loop_stores_and_loads_its_intermediates_in_bf16(tmp_path):
    """passes/narrow_loop_results.py on cuda: intra_chunk writes w, u, q_decayed and k_to_end as
    nv_bfloat16, chunk_states reads them so (by cp.async) and writes starts and v_new so, chunk_output
    reads those; the state, the scores and the decays stay float32."""
    from dnir.lowering.registry import build, target_context
    from dnir.lowering.tvm.compile import cuda_source
    from dnir.models import build as build_layer
    from dnir.passes import optimize
    with target_context("cuda"):
        graph = optimize(build_layer("gdn", seq_len=130, heads=1, value_heads=2, head_dim=128, value_dim=128,
                                     dtype="bf16", initial_state=True, final_state=True), "O2")
    source = cuda_source(build(graph, "cuda", arch="sm_90"))
    kernels = _kernels(source)
    params = {name: {v: t for t, v in re.findall(r"(\w+)\* __restrict__ (\w+)_ptr", k.split(")", 1)[0])}
              for name, k in kernels.items()}
    bf, f = "nv_bfloat16", "float"
    assert {v: params["intra_chunk_mma_kernel"][v] for v in ("W", "U", "Qd", "A", "Ke", "LD")} == dict(
        W=bf, U=bf, Qd=bf, A=f, Ke=bf, LD=f)
    assert params["chunk_states_kernel"] == dict(S0=f, W=bf, U=bf, Kte=bf, LD=f, S1=f, St=bf, N=bf)
    assert params["chunk_output_kernel"] == dict(Qd=bf, St=bf, A=f, N=bf, O=bf)
    assert "cp_async" in kernels["chunk_states_kernel"] and _mma_per_kernel(source)["chunk_output_kernel"] > 0
    assert "mma.sync" in sm90_ptx(source, tmp_path)


def test_block_solve_fragments_solve_the_unit_triangular_system():
    """intra_chunk_mma's solve_by_blocks on tensor cores, emulated lane by lane in NumPy with the kernel's
    own fragment places (mma.a_at, b_at, d_at, intra_chunk_mma.z_at, a_of_d): a warp's 16 columns of
    X = (I + L)^-1 R, the results of one row block read back from the accumulators as the next
    product's left operand, match a float64 solve."""
    import numpy as np

    from dnir.lowering.tvm import intra_chunk_mma as m
    from dnir.lowering.tvm.mma import a_at, b_at, d_at
    C, S, lanes = 64, 16, range(32)
    rng = np.random.default_rng(3)
    L = np.tril(rng.standard_normal((C, C)) * 0.3, -1)
    R = rng.standard_normal((C, 16))
    Z = np.full(C * (C + 4), np.nan)              # as block_inverses leaves it: -L^T below, M_a^T on the diagonal
    for a in range(C // S):
        blk = slice(S * a, S * a + S)
        for c in range(a):
            Z.reshape(C, C + 4)[S * c:S * c + S, blk] = -L[blk, S * c:S * c + S].T
        Z.reshape(C, C + 4)[blk, blk] = np.linalg.inv(np.eye(S) + L[blk, blk]).T

    def mma(acc, fa, fb):                         # acc[lane, 4] += A B from the lanes' fragments
        A, B = np.zeros((16, 8)), np.zeros((8, 8))
        for lane in lanes:
            for i in range(4):
                A[a_at(lane, i)] = fa[lane][i]
            for e in range(2):
                B[b_at(lane, e)] = fb[lane][e]
        D = A @ B
        return [[acc[lane][i] + D[d_at(lane, i)] for i in range(4)] for lane in lanes]

    xs = {}
    for a in range(C // S):
        ys = [[[R[S * a + 8 * nt + d_at(lane, i)[1], d_at(lane, i)[0]] for i in range(4)] for lane in lanes]
              for nt in range(2)]
        for c in range(a):
            for ks in range(2):
                fa = [[xs[2 * c + ks][lane][m.a_of_d(i)] for i in range(4)] for lane in lanes]
                for nt in range(2):
                    fb = [[Z[m.z_at(C, c, ks, a, nt, lane, e)] for e in range(2)] for lane in lanes]
                    ys[nt] = mma(ys[nt], fa, fb)
        for nt in range(2):
            xs[2 * a + nt] = [[0.0] * 4 for _ in lanes]
        for ks in range(2):
            fa = [[ys[ks][lane][m.a_of_d(i)] for i in range(4)] for lane in lanes]
            for nt in range(ks, 2):               # M_a's upper 8 x 8 block is zero: skipped as the kernel does
                fb = [[Z[m.z_at(C, a, ks, a, nt, lane, e)] for e in range(2)] for lane in lanes]
                xs[2 * a + nt] = mma(xs[2 * a + nt], fa, fb)
    X = np.zeros((C, 16))
    for nt, tile in xs.items():
        for lane in lanes:
            for i in range(4):
                X[8 * nt + d_at(lane, i)[1], d_at(lane, i)[0]] = tile[lane][i]
    assert np.abs(X - np.linalg.solve(np.eye(C) + L, R)).max() < 1e-10
