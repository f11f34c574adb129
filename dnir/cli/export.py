"""dnir export FILE.dnir --format ggml-c -o delta_net.c: the graph as source another project builds."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

EXAMPLE = """examples:
  dnir opt gdn.dnir -o gdn.O2.dnir && dnir export gdn.O2.dnir --format ggml-c -o delta_net.c
  dnir export kda.dnir --format ggml-c -o kda.c --name build_kda

ggml-c: one C function that builds the graph with ggml in a caller's
ggml_context from its input tensors, as llama.cpp's graph builders do
(void NAME(struct ggml_context * ctx, <inputs>, int64_t n_tokens, int64_t n_seqs,
struct ggml_tensor ** out_<output>, ...)), one statement per ggml call under a
comment naming the dnir node and the pass that made it. A layer (a graph with
delta-net metadata that dnir build, then O0, O1 or O2, makes) is written for
any sequence length and batch (n_tokens a multiple of the chunk; n_seqs as the
file's: 1, or any from 2); any other graph, or with --fixed-shapes, for its own
shapes. Compile it against ggml (ggml.h); the caller allocates and computes the
graph. It also prints the compute buffer ggml's allocator needs next to dnir's
own plan.
"""

# Sizes the symbolic export traces a layer at: units of the sequence (chunks, or tokens) and batches.
UNITS = (2, 3, 5)


def register(sub):
    p = sub.add_parser("export", help="write a graph as source for another project (ggml C)",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="graph in the .dnir text format")
    p.add_argument("--format", required=True, choices=["ggml-c"], help="what to write")
    p.add_argument("-o", "--output", required=True, help="path of the C file to write")
    p.add_argument("--name", help="the C function's name (default: the output file's name, e.g. delta_net)")
    p.add_argument("--fixed-shapes", action="store_true",
                   help="write the function for the file's own T and B only (no n_tokens, n_seqs parameters)")
    p.set_defaults(func=run)


def layer_family(graph):
    """(the layer's config, the pipeline that made the file from it), or (None, why the graph is not
    a layer that dnir build and O0, O1 or O2 make: then only its own shapes can be exported)."""
    from dnir.graph import Graph
    from dnir.models import DeltaNetConfig, build_delta_net
    from dnir.passes import optimize
    from dnir.text import print_graph
    if graph.meta.get("model") != "delta_net":
        return None, "no delta-net metadata"
    cfg = DeltaNetConfig.from_meta(graph.meta)
    if cfg.cu_seqlens is not None:
        return None, "packed sequences (cu_seqlens) fix the lengths"
    text = print_graph(graph)
    # a file written before the layers had a precision: read with its dtype's default (from_meta), the
    # graph is the same but for that key of the metadata
    legacy = "precision" not in graph.meta
    for level in ("O0", "O1", "O2"):
        built = optimize(build_delta_net(cfg), level)
        if legacy:
            built = Graph(built.inputs, built.outputs, built.output_names,
                          {k: v for k, v in built.meta.items() if k != "precision"})
        if print_graph(built) == text:
            return cfg, level
    return None, "not the layer its metadata describes as built and optimised by O0, O1 or O2"


def symbolic_source(cfg, level, name, source):
    """The layer's C function for any T and B around the file's (export_symbolic), or raise BackendError."""
    import dataclasses

    from dnir.errors import BackendError
    from dnir.lowering.ggml.export_symbolic import export_symbolic
    from dnir.lowering.registry import prepare
    from dnir.models import build_delta_net
    from dnir.passes import optimize
    if cfg.mode == "chunked":
        key, unit = "u", cfg.chunk_size
        if cfg.seq_len % unit or cfg.seq_len // unit < min(UNITS):
            raise BackendError(f"T={cfg.seq_len} is not a whole number of at least {min(UNITS)} chunks of {unit}")
    else:
        key, unit = ("t", 1) if cfg.mode == "recurrent" else (None, 1)
        if key and cfg.seq_len < min(UNITS):
            raise BackendError(f"T={cfg.seq_len} is below {min(UNITS)} tokens")
    # n_seqs from 1 where one graph serves all batches; else the file's 1, or any from 2 (a batch of
    # one lets the passes choose other layouts).
    batch_sets = [(1, 2, 3), (1,) if cfg.batch == 1 else (2, 3, 4)]
    why = None
    for batches in batch_sets:
        samples = []
        for units in (UNITS if key else (1,)):
            for b in batches:
                env = {"B": b, **({key: units} if key else {})}
                sized = dataclasses.replace(cfg, seq_len=units * unit if key else cfg.seq_len, batch=b)
                samples.append((env, prepare(optimize(build_delta_net(sized), level), "ggml")))
        try:
            return export_symbolic(samples, name, source, unit)
        except BackendError as e:
            why = e
    raise why


def run(args) -> int:
    from dnir.analysis.memory import plan
    from dnir.cli import UsageError, load_graph
    from dnir.files import check_output, write_text
    from dnir.lowering.ggml.export_c import export_c
    from dnir.errors import BackendError
    from dnir.lowering.ggml.run import compile_ggml
    from dnir.lowering.registry import prepare
    from dnir.models import build_delta_net
    from dnir.passes import optimize

    name = args.name or re.sub(r"\W", "_", Path(args.output).stem)
    if not name.isidentifier():
        raise UsageError(f"function name {name!r} is not a C identifier; give one with --name")
    check_output(args.output)
    graph = load_graph(args.file)
    cfg, level = (None, "--fixed-shapes") if args.fixed_shapes else layer_family(graph)
    if cfg is not None:     # the file rebuilt, so that each node knows the pass that made it
        graph = optimize(build_delta_net(cfg), level)
    graph = prepare(graph, "ggml")     # the graph as the ggml target runs it
    source, shapes = None, (f"for its own shapes ({level})" if cfg is None else "")
    if cfg is not None:
        try:
            source, shapes = symbolic_source(cfg, level, name, args.file), "for any n_tokens, n_seqs (see its asserts)"
        except BackendError as e:
            shapes = f"for its own shapes (not symbolic: {e})"
    write_text(args.output, source or export_c(graph, name, args.file))
    ggml_bytes = compile_ggml(graph).compute_buffer_bytes
    print(f"{args.output}: function {name} {shapes}, inputs {', '.join(graph.input_names)}; outputs "
          f"{', '.join(graph.output_names)}; compute buffer at the file's shapes: ggml {ggml_bytes / 2**20:.1f} MiB, "
          f"dnir's plan {plan(graph).peak_bytes / 2**20:.1f} MiB")
    return 0
