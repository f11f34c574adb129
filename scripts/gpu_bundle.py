"""Build what the conformance run needs on a GPU machine into `.gpu/` (git-ignored).

    .venv/bin/python scripts/gpu_bundle.py            # then carry `.gpu` to the GPU machine
                                                      # (scripts/gpu_bundle.sh calls it)

The GPU machine has Python 3.12, numpy and nvcc but no TVM and no network, so
the run uses TVM's runtime only:
  - the apache-tvm-ffi wheel for cp312 (the version installed here);
  - tvmrt.tgz: the `tvm` package without libtvm_compiler.so;
  - <name>.so: dnir graphs compiled here for CUDA sm_90 (`export_library`),
    with <name>.npz: their inputs, the NumPy backend's outputs (of the graph as
    prepared for cuda, for the CUDA-only ones) and the names;
    nvcc's fatbins of their kernels go to the module cache (--fatbins, the
    folder that $DNIR_CACHE names on the GPU machine), so loading them there
    compiles nothing;
  - <name>.vulkan.npz: the same graphs compiled for the vulkan target and
    recorded as programs (lowering/vulkan_program.py), which wgpu runs there
    on the NVIDIA Vulkan driver without TVM.

Graphs: the whole op conformance table, the GDA/KDA chunked and
recurrent layers merged into one graph per optimisation level (O0, O2),
bf16 and fp16 layers (chunked, recurrent, decode) at O2, whose float32
inputs are rounded to the half dtype on the device (bf16: CUDA only), and
float32 and bf16 GDA/KDA chunked layers sized for the tensor-core kernels (C = 64,
K = 128) at precision "tf32" (CUDA only). A merged graph's metadata carries
its layers' precision (tf32 for the half layers, their default), which the
.npz records for the conformance run's tolerance.
On the GPU machine (from the repository root):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/*.whl
    tar -C /tmp/site -xzf .gpu/tvmrt.tgz
    export PYTHONPATH=/tmp/site:$PWD TVM_USE_RUNTIME_LIB=1 PATH=$PATH:/usr/local/cuda/bin
    python3 scripts/gpu_conformance.py --bundle .gpu --out $OUT
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "lowering"))


def graphs(seed: int):
    """name -> (graph, inputs by name)."""
    import cases
    import dnir.passes
    from backends import merge_graphs
    from dnir.lowering.registry import target_context
    from dnir.models import DeltaNetConfig, build
    from test_backend_models import LAYERS, SIZES

    rng = np.random.default_rng(seed)
    table = cases.build_all()
    out = {"conformance": (table, cases.random_inputs(table, rng))}
    layers = {key: build(o["variant"], mode=o["mode"], **SIZES) for key, o in LAYERS.items()}
    for level in ("O0", "O2"):
        from dnir.models import random_inputs
        merged = merge_graphs({key: dnir.passes.optimize(g, level) for key, g in layers.items()})
        inputs = {f"{key}__{n}": v for key, g in layers.items()
                  for n, v in random_inputs(DeltaNetConfig.from_meta(g.meta), rng).items()}
        out[f"models_{level}"] = (merged, inputs)
    # bf16 and fp16 layers at O2, sized for the fused GPU kernels (V a multiple of 32), with a decode
    # layer; their float32 interface rounds the inputs to the half dtype on the device.
    half_layers = dict(LAYERS, gdn_decode=dict(variant="gdn", mode="decode"), kda_decode=dict(variant="kda", mode="decode"))
    for dtype in ("bf16", "f16"):
        layers = {key: build(o["variant"], mode=o["mode"], dtype=dtype,
                             **dict(SIZES, head_dim=32, value_dim=32, **HALF_DECODE if o["mode"] == "decode" else {}))
                  for key, o in half_layers.items()}
        with target_context("cuda"):     # O2 puts in the GPU's intra-chunk kernel where it applies
            merged = merge_graphs({key: float32_interface(dnir.passes.optimize(g, "O2")) for key, g in layers.items()})
        inputs = {f"{key}__{n}": v.astype(np.float32) for key, g in layers.items()
                  for n, v in random_inputs(DeltaNetConfig.from_meta(g.meta), rng).items()}
        out[f"models_{dtype}_O2"] = (with_precision(merged, "tf32"), inputs)
    # float32 layers whose products run as one TF32 mma each (precision "tf32"): sizes the three
    # tensor-core kernels take (C = 64, K = 128, V a multiple of 64), three chunks, the last partial
    tf32 = {key: build(o["variant"], precision="tf32", **TF32_SIZES)
            for key, o in LAYERS.items() if o["mode"] == "chunked"}
    # and bf16 ones at those sizes: the tensor-core chunk_output storing a bf16 o (fold_narrowing_casts)
    tf32.update({f"{key}_bf16": build(o["variant"], dtype="bf16", **TF32_SIZES)
                 for key, o in LAYERS.items() if o["mode"] == "chunked"})
    with target_context("cuda"):
        merged = merge_graphs({key: float32_interface(dnir.passes.optimize(g, "O2")) for key, g in tf32.items()})
    inputs = {f"{key}__{n}": v.astype(np.float32) for key, g in tf32.items()
              for n, v in random_inputs(DeltaNetConfig.from_meta(g.meta), rng).items()}
    out["models_tf32_O2"] = (with_precision(merged, "tf32"), inputs)
    return out


HALF_DECODE = dict(seq_len=1, batch=3)
TF32_SIZES = dict(seq_len=160, batch=2, heads=1, value_heads=2, head_dim=128, value_dim=64, chunk_size=64,
                  initial_state=True, final_state=True)
CUDA_ONLY = {"models_bf16_O2": "WGSL has no bfloat16",
             "models_tf32_O2": "precision changes CUDA's tensor-core products only; Vulkan computes in float32"}


def with_precision(graph, precision: str):
    """`graph` with `precision` in its metadata: the cuda translator reads the main graph's (merged
    layers have no delta-net metadata of their own)."""
    from dnir.graph import Graph
    return Graph(graph.inputs, graph.outputs, graph.output_names, {**graph.meta, "precision": precision})


def float32_interface(graph):
    """`graph` with float32 inputs and outputs around its half ones: a cast rounds each input to its
    half dtype on the device and one widens a half output, so the bundle's arrays are NumPy dtypes
    that a machine without ml_dtypes reads (bfloat16 is not one)."""
    from dnir.graph import Graph, Node
    from dnir.ops import make_node
    new, inputs = {}, []
    for node in graph.inputs:
        x = make_node("input", (), dict(node.attrs, dtype="f32"))
        inputs.append(x)
        new[id(node)] = x if node.dtype == "f32" else make_node("cast", (x,), {"dtype": node.dtype})
    for node in graph.topo_order():
        if id(node) not in new:
            new[id(node)] = Node(node.op, [new[id(i)] for i in node.inputs], node.attrs, node.type)
    outputs = [new[id(n)] if n.dtype == "f32" else make_node("cast", (new[id(n)],), {"dtype": "f32"})
               for n in graph.outputs]
    return Graph(inputs, outputs, graph.output_names)


def tvm_runtime_tarball(dest: Path):
    import tvm
    pkg = Path(tvm.__file__).parent

    def keep(info):
        name = info.name
        return None if name.endswith("lib/libtvm_compiler.so") or "__pycache__" in name else info
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(pkg, arcname="tvm", filter=keep)


def ffi_wheel(dest_dir: Path):
    import tvm_ffi
    for old in dest_dir.glob("apache_tvm_ffi-*.whl"):
        old.unlink()
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp",
                    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                    "-d", str(dest_dir), f"apache-tvm-ffi=={tvm_ffi.__version__}"], check=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / ".gpu"))
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fatbins", help="the module cache's parent folder ($DNIR_CACHE) for nvcc's fatbins")
    args = parser.parse_args(argv)
    if args.fatbins:
        os.environ["DNIR_CACHE"] = args.fatbins
    from dnir.lowering import run
    from dnir.lowering.registry import build, prepare
    from dnir.lowering.runtime_loader import nvcc_compile
    from dnir.lowering.tvm.compile import cuda_source

    out = Path(args.out)
    out.mkdir(exist_ok=True)
    ffi_wheel(out)
    tvm_runtime_tarball(out / "tvmrt.tgz")
    for name, (graph, inputs) in graphs(args.seed).items():
        ex = build(graph, "cuda", arch=args.arch)
        ex.export_library(str(out / f"{name}.so"))
        nvcc_compile(cuda_source(ex), args.arch)
        if name in CUDA_ONLY:
            print(f"{name}: no Vulkan program ({CUDA_ONLY[name]})")
        else:
            build(graph, "vulkan").program.save(out / f"{name}.vulkan.npz")
        # the CUDA-only artefacts' reference: NumPy's kernels of the ops the CUDA module runs, with the
        # intermediates stored as narrow as it stores them (passes/narrow_loop_results.py, precision tf32)
        refs = run(prepare(graph, "cuda") if name in CUDA_ONLY else graph, inputs)
        np.savez(out / f"{name}.npz", input_names=np.array(graph.input_names),
                 output_names=np.array(graph.output_names), arch=np.array(args.arch),
                 precision=np.array(graph.meta.get("precision", "highest")),
                 **{f"in:{k}": v for k, v in inputs.items()},
                 **{f"ref:{k}": v for k, v in zip(graph.output_names, refs)})
        print(f"{out / name}.so: {len(graph.outputs)} outputs")
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"{out}: {total / 2**20:.1f} MiB (a device call carries at most 64 MiB)")
    return 0 if total < 64 * 2**20 else 1


if __name__ == "__main__":
    raise SystemExit(main())
