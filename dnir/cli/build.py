"""dnir build gdn|kda: write a delta-net layer graph in the .dnir text format."""
from __future__ import annotations

import argparse

EXAMPLE = """examples:
  dnir build gdn --preset qwen3-next --seq-len 4096 -o gdn.dnir
  dnir build kda --heads 2 --value-heads 2 --head-dim 16 --value-dim 16 --seq-len 300 \\
      --cu-seqlens 0,15,100,300 --block-size 16 --initial-state --final-state -o kda.dnir
  dnir run kda.dnir --target numpy --check
  dnir build gdn --preset qwen3-next --seq-len 4096 --dtype bf16 -o gdn.bf16.dnir

Without --preset the variant's real layer sizes are the defaults
(gdn: qwen3-next, H=16, HV=32, K=V=128; kda: kimi-linear, H=HV=32, K=V=128);
--heads/--value-heads/--head-dim/--value-dim override them.
"""

DEFAULT_PRESET = {"gdn": "qwen3-next", "kda": "kimi-linear"}


def register(sub):
    p = sub.add_parser("build", help="build a Gated DeltaNet (gdn) or KDA layer graph", epilog=EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variant", choices=["gdn", "kda"],
                   help="gdn: one gate per value head (Qwen3-Next); kda: one gate per key channel (Kimi Linear)")
    p.add_argument("--preset", choices=["qwen3-next", "kimi-linear"], help="a real layer's head sizes")
    p.add_argument("--batch", type=int, help="B (default 1)")
    p.add_argument("--seq-len", type=int, help="T, packed length with --cu-seqlens (default: the last "
                                               "--cu-seqlens entry, 1 for decode, else 64)")
    p.add_argument("--mode", choices=["chunked", "recurrent", "decode"], default="chunked")
    p.add_argument("--chunk-size", type=int, choices=[16, 32, 64], default=64)
    p.add_argument("--block-size", type=int, help="build the C x C chunk matrices from blocks of this size")
    p.add_argument("--heads", type=int, help="H, q/k heads")
    p.add_argument("--value-heads", type=int, help="HV, value heads (a multiple of H)")
    p.add_argument("--head-dim", type=int, help="K")
    p.add_argument("--value-dim", type=int, help="V")
    p.add_argument("--scale", type=float, help="q scale (default K ** -0.5)")
    p.add_argument("--l2norm", action="store_true", help="l2-normalise q and k in the graph")
    p.add_argument("--initial-state", action="store_true", help="take an initial_state input")
    p.add_argument("--final-state", action="store_true", help="return the final_state output")
    p.add_argument("--cu-seqlens", help="packed sequences, e.g. 0,15,100,300 (batch 1)")
    p.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32",
                   help="q, k, v, beta and o (g and the states stay f32; the graph computes in f32)")
    p.add_argument("--precision", choices=["highest", "tf32"],
                   help="CUDA's tensor-core products: 3xTF32 (float32's accuracy) or one TF32 product "
                        "(faster); default tf32 for bf16/f16, highest for f32")
    p.add_argument("--factorized-decay", action="store_true",
                   help="write the overflowing exp(gam_i) * exp(-gam_j) decay (for range analysis)")
    p.add_argument("-o", "--output", required=True, help="the .dnir file to write")
    p.set_defaults(func=run)


def run(args) -> int:
    from dnir.analysis.memory import plan
    from dnir.cli import UsageError, write_text
    from dnir.limits import check_graph_sizes, format_bytes
    from dnir.models import build_delta_net, preset
    from dnir.text import print_graph

    cu = None
    if args.cu_seqlens is not None:
        try:
            cu = tuple(int(x) for x in args.cu_seqlens.split(","))
        except ValueError:
            raise UsageError(f"--cu-seqlens {args.cu_seqlens!r}: expected comma-separated integers, "
                             f"e.g. 0,15,100,300") from None
    options = {
        "batch": args.batch if args.batch is not None else 1,
        "seq_len": args.seq_len if args.seq_len is not None else (
            cu[-1] if cu else 1 if args.mode == "decode" else 64),
        "mode": args.mode, "chunk_size": args.chunk_size, "block_size": args.block_size,
        "scale": args.scale, "l2norm": args.l2norm, "initial_state": args.initial_state,
        "final_state": args.final_state, "cu_seqlens": cu, "factorized_decay": args.factorized_decay,
        "dtype": args.dtype, "precision": args.precision,
    }
    for name in ("heads", "value_heads", "head_dim", "value_dim"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    cfg = preset(args.preset or DEFAULT_PRESET[args.variant], variant=args.variant, **options)
    graph = build_delta_net(cfg)
    sizes = (f"B={cfg.batch} T={cfg.seq_len} H={cfg.heads} HV={cfg.value_heads} K={cfg.head_dim} "
             f"V={cfg.value_dim}")
    check_graph_sizes(graph, f"{args.variant} {cfg.mode} {sizes}")    # the inputs are bounded; intermediates too
    write_text(args.output, print_graph(graph))
    print(f"wrote {args.output}: {args.variant} {cfg.mode}, {sizes}, {graph.node_count()} nodes, "
          f"planned compute buffer {format_bytes(plan(graph).peak_bytes)}")
    return 0
