"""The GPU benchmark's cases, and their dnir graphs compiled here into the GPU bundle.

    .venv/bin/python -m benchmarks.gpu_artefacts --out .gpu            # every case (many minutes)
    .venv/bin/python -m benchmarks.gpu_artefacts --out .gpu --cases gdn_prefill_b1_t8192_f32

Each case's layer (dnir O2) is compiled with TVM for cuda sm_90 into the
module cache under <out>/cache, by the layer's options (lowering/module_cache.py:
the functional API on the GPU machine finds it there with the TVM runtime only,
without building the graph, and so does benchmarks/gpu.py), with nvcc's fatbin
of its kernels beside it. With
--vulkan, the float32 cases' graphs are also compiled for the vulkan target
and recorded as programs (lowering/vulkan_program.py: run there by wgpu,
without TVM): <out>/vulkan/<case>.npz for the NVIDIA driver's workgroup
memory (the fused delta-rule kernels) and <case>.portable.npz for this
adapter's, or a .skipped file saying why not (WGSL indexes with 32-bit
integers: KDA's unfused per-channel [.., C, C, K] products pass 2^31
elements at these sizes). Inputs are drawn on the GPU, so nothing large
travels. A case whose layer cannot be built here (a dtype the kernels do not
take yet) is left out and reported "not built" by the benchmark.

Cases (flash-linear-attention's shapes, K = V = 128, an initial state in and
the final state out): prefill (B, T) = (1, 8192), (4, 4096), (1, 32768) with
32 heads for both layers, and Qwen3-Next's GQA layer (16 q/k heads, 32 value
heads) at (1, 8192); decode (T = 1) of the gated delta rule at B = 64 and 256;
each in float32 and in bf16 (q, k, v, beta and o; the gate and the state
float32). The float32 prefill cases run again as `<case>_tf32` with
precision="tf32" (one TF32 product per tensor-core mma: flash-linear-attention's
own float32 arithmetic) beside the default 3xTF32; bf16 layers take tf32 by default.
No Vulkan program is recorded for those: Vulkan computes in float32 either way.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

HEAD_DIM = 128
OPT = "O2"
PREFILL = {     # name -> (B, T, H, HV)
    "b1_t8192": (1, 8192, 32, 32),
    "b4_t4096": (4, 4096, 32, 32),
    "b1_t32768": (1, 32768, 32, 32),
    "gqa_b1_t8192": (1, 8192, 16, 32),
}
DECODE_BATCHES = (64, 256)
DTYPES = ("f32", "bf16")
TF32_SUFFIX = "_tf32"       # a float32 prefill case with precision="tf32"


def _cases() -> dict[str, dict]:
    cases = {}
    for dtype in DTYPES:
        for shape, (B, T, H, HV) in PREFILL.items():
            for variant in ("gdn", "kda"):
                if H != HV and variant == "kda":    # the GQA shape is Qwen3-Next's, a gated delta rule layer
                    continue
                name = f"{variant}_prefill_{shape}_{dtype}"
                cases[name] = dict(variant=variant, kind="prefill", batch=B, seq_len=T, heads=H, value_heads=HV,
                                   dtype=dtype)
                if dtype == "f32":
                    cases[name + TF32_SUFFIX] = dict(cases[name], precision="tf32")
        for B in DECODE_BATCHES:
            cases[f"gdn_decode_b{B}_{dtype}"] = dict(variant="gdn", kind="decode", batch=B, seq_len=1, heads=32,
                                                     value_heads=32, dtype=dtype)
    return cases


CASES = _cases()


def precision(case: dict) -> str:
    """The case's tensor-core precision: its own, else its dtype's default (models/config.py)."""
    from dnir.types import default_precision
    return case.get("precision") or default_precision(case["dtype"])


def config(case: dict):
    from dnir.models import DeltaNetConfig
    return DeltaNetConfig(case["variant"], batch=case["batch"], seq_len=case["seq_len"], heads=case["heads"],
                          value_heads=case["value_heads"], head_dim=HEAD_DIM, value_dim=HEAD_DIM,
                          mode="chunked" if case["kind"] == "prefill" else "decode",
                          initial_state=True, final_state=True, dtype=case["dtype"], precision=case.get("precision"))


def layer_graph(case: dict):
    """The graph the functional API runs for this case (the same object key in the module cache):
    O2 in the cuda target's context, where the work local to each chunk is its kernel."""
    from dnir.api import compiled_graph
    return compiled_graph(config(case), OPT, "cuda")


def costs(graph) -> dict:
    """FLOPs of the layer, and FLOPs and bytes of each fused op of its cuda-prepared graph (by op
    name, summed over its nodes): the benchmark's achieved TFLOP/s and GB/s of those kernels."""
    from dnir.analysis.cost import node_flops
    from dnir.lowering.registry import prepare
    from dnir.ops import REGISTRY, graph_flops
    kernels = {}
    for node in prepare(graph, "cuda").topo_order():
        if REGISTRY[node.op].expand is not None:
            entry = kernels.setdefault(node.op, {"flops": 0, "bytes": 0, "nodes": 0})
            entry["flops"] += node_flops(node)
            results = node.type if isinstance(node.type, tuple) else (node.type,)    # fused ops may give several
            entry["bytes"] += sum(t.nbytes for t in results) + sum(i.type.nbytes for i in node.inputs)
            entry["nodes"] += 1
    return {"flops": graph_flops(graph), "kernels": kernels}


def compile_all(out: Path, arch: str, names=None, vulkan: bool = False):
    os.environ["DNIR_CACHE"] = str(out / "cache")     # lowering/module_cache.py reads it per call
    from dnir.lowering.module_cache import code_hash
    from dnir.lowering.runtime_loader import prebuild_layer
    stamp = out / "code_hash"
    if not stamp.exists() or stamp.read_text() != code_hash():     # every key changed: start afresh
        shutil.rmtree(out / "cache", ignore_errors=True)
        shutil.rmtree(out / "vulkan", ignore_errors=True)
        (out / "bench_costs.json").unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        stamp.write_text(code_hash())
    costs_path = out / "bench_costs.json"
    table = json.loads(costs_path.read_text()) if costs_path.exists() else {"layers": {}, "kernels": {}}
    for name, case in CASES.items():
        if names and name not in names:
            continue
        start = time.perf_counter()
        try:
            graph = layer_graph(case)
            path = prebuild_layer(config(case), OPT, graph, arch)
        except Exception as e:  # noqa: BLE001 - a layer the kernels do not take yet: the benchmark says "not built"
            print(f"{name}: not built ({type(e).__name__}: {str(e)[:200]})", flush=True)
            continue
        print(f"{name}: {path.name} {path.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - start:.0f} s",
              flush=True)
        counted = costs(graph)
        table["layers"][name] = {"flops": counted["flops"]}
        table["kernels"][name] = counted["kernels"]
        costs_path.write_text(json.dumps(table, indent=1) + "\n")
        if vulkan and case["dtype"] == "f32" and "precision" not in case:
            record_vulkan(name, case, out / "vulkan")


# The workgroup memory of the GPU machine's NVIDIA Vulkan driver: with it the fused delta-rule
# kernels take the layer (lavapipe's 32 KiB does not: KDA's unfused per-channel products pass
# 2^31 elements there, past WGSL's 32-bit indices). The portable program is recorded for the
# limits of the adapter here, the benchmark's fallback.
NVIDIA_SHARED_BYTES = 49152


def record_vulkan(name: str, case: dict, folder: Path):
    """<name>.npz (for the NVIDIA driver's limits) and <name>.portable.npz (this adapter's), or a
    .skipped file saying why a program could not be made."""
    from dnir.api import compiled_graph
    from dnir.lowering.registry import build
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, shared in ((".npz", str(NVIDIA_SHARED_BYTES)), (".portable.npz", None)):
        path, skipped = folder / f"{name}{suffix}", folder / f"{name}{suffix}.skipped"
        if path.exists() or skipped.exists():
            continue
        start = time.perf_counter()
        if shared:
            os.environ["DNIR_VULKAN_SHARED_BYTES"] = shared
        try:   # a graph object of its own: the target's preparation is kept per graph object
            program = build(compiled_graph.__wrapped__(config(case), OPT, "cuda"), "vulkan").program
        except Exception as e:  # noqa: BLE001 - e.g. an index past int32, WGSL's widest: the benchmark says so
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
            skipped.write_text(reason + "\n")
            print(f"{name}: no vulkan program{suffix} ({reason})", flush=True)
            continue
        finally:
            os.environ.pop("DNIR_VULKAN_SHARED_BYTES", None)
        program.save(path)
        print(f"{name}: vulkan program{suffix}, {len(program.dispatches)} dispatches, "
              f"{time.perf_counter() - start:.0f} s", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(".gpu"))
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--cases", nargs="*", choices=sorted(CASES), help="only these cases (default: all)")
    p.add_argument("--vulkan", action="store_true", help="also record the float32 cases as Vulkan programs")
    args = p.parse_args(argv)
    compile_all(args.out, args.arch, args.cases, args.vulkan)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
