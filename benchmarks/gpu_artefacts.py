"""Compile the GPU benchmark's dnir graphs here, for CUDA, into the GPU bundle.

    .venv/bin/python -m benchmarks.gpu_artefacts --out .gpu/bench

Each case becomes <name>.so (dnir O2 compiled with TVM for cuda sm_90, host
code plus CUDA source, loaded on the GPU by dnir.lowering.runtime_loader) and
<name>.json (the layer's sizes and the graph's input and output names, in
order). Inputs are drawn on the GPU by benchmarks/gpu.py, so nothing large
travels. Shapes: flash-linear-attention's published (B, T, H, K=V) =
(1, 8192, 32, 128) prefill for both layers, and decode (T=1) of the gated
delta rule at B=64 and 256 with 32 heads of 128 x 128 states.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HEADS, HEAD_DIM = 32, 128
CASES = {
    "gdn_prefill_b1_t8192": dict(variant="gdn", kind="prefill", batch=1, seq_len=8192),
    "kda_prefill_b1_t8192": dict(variant="kda", kind="prefill", batch=1, seq_len=8192),
    "gdn_decode_b64": dict(variant="gdn", kind="decode", batch=64, seq_len=1),
    "gdn_decode_b256": dict(variant="gdn", kind="decode", batch=256, seq_len=1),
}
OPT = "O2"


def config(case: dict):
    from dnir.models import DeltaNetConfig
    return DeltaNetConfig(case["variant"], batch=case["batch"], seq_len=case["seq_len"], heads=HEADS,
                          value_heads=HEADS, head_dim=HEAD_DIM, value_dim=HEAD_DIM,
                          mode="chunked" if case["kind"] == "prefill" else "decode",
                          initial_state=True, final_state=True)


def compile_all(out: Path, arch: str, names=None):
    from dnir.api import compiled_graph
    from dnir.lowering.registry import build
    out.mkdir(parents=True, exist_ok=True)
    for name, case in CASES.items():
        if names and name not in names:
            continue
        start = time.perf_counter()
        cfg = config(case)
        graph = compiled_graph(cfg, OPT)
        build(graph, "cuda", arch=arch).export_library(str(out / f"{name}.so"))
        meta = {**case, "heads": cfg.heads, "value_heads": cfg.value_heads, "head_dim": cfg.head_dim,
                "value_dim": cfg.value_dim, "chunk_size": cfg.chunk_size, "scale": cfg.scale, "opt": OPT,
                "arch": arch, "input_names": list(graph.input_names), "output_names": list(graph.output_names),
                "input_shapes": {k: list(v) for k, v in cfg.input_shapes().items()}}
        (out / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
        size = (out / f"{name}.so").stat().st_size
        print(f"{out / name}.so: {size / 2**20:.1f} MiB, compiled in {time.perf_counter() - start:.0f} s", flush=True)


def chunk_scan_tile():
    from dnir.lowering.tvm import chunk_scan
    return chunk_scan.TILE


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(".gpu") / "bench")
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--cases", nargs="*", choices=sorted(CASES), help="only these cases (default: all)")
    p.add_argument("--chunk-scan-tile", metavar="VTxTC",
                   help="state columns per thread block and per thread of the fused loop over chunks "
                        "(lowering/tvm/chunk_scan.py; default %sx%s), to compare schedules" % chunk_scan_tile())
    args = p.parse_args(argv)
    if args.chunk_scan_tile:
        from dnir.lowering.tvm import chunk_scan
        chunk_scan.TILE = tuple(int(x) for x in args.chunk_scan_tile.split("x"))
    compile_all(args.out, args.arch, args.cases)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
