"""Export an optimised delta-net layer as ggml C code, compile it and run it.

The loop a llama.cpp developer takes home: build the Gated DeltaNet layer,
optimise it (O2), let dnir write the graph as one C function that builds it
with ggml (`dnir export FILE --format ggml-c`), compile that file against
ggml, run the compiled graph on ggml's CPU backend at two sequence lengths and
batches (the function takes n_tokens and n_seqs, as llama.cpp's graph builders
do) and check it against the float64 oracle, with the compute buffer ggml's
allocator needs next to the one dnir planned.

    python examples/07_ggml_export.py
"""
import dataclasses
import tempfile
from pathlib import Path

import dnir
from dnir.analysis.memory import plan
from dnir.cli import main
from dnir.lowering.ggml.export_c import compile_c, load_builder
from dnir.lowering.ggml.run import GgmlGraph
from dnir.lowering.registry import prepare
from dnir.models import build_delta_net, delta_rule_reference, preset, random_inputs, relative_rms_error
from dnir.passes import optimize

cfg = preset("qwen3-next", seq_len=192, batch=2, heads=4, value_heads=8, initial_state=True, final_state=True)

with tempfile.TemporaryDirectory() as tmp:
    layer = Path(tmp) / "gdn.dnir"
    layer.write_text(dnir.print(optimize(build_delta_net(cfg), "O2")))
    main(["export", str(layer), "--format", "ggml-c", "-o", str(Path(tmp) / "delta_net.c")])
    source = (Path(tmp) / "delta_net.c").read_text()
    signature = source[source.index("void delta_net("):source.index(") {")]
    print(signature + ")")
    loop = source.index("    for (int64_t i")
    print(source[loop:loop + 400] + "...")
    library = compile_c(Path(tmp) / "delta_net.c", Path(tmp) / "delta_net.so")   # cc -shared ... -lggml

    for seq_len, batch in ((192, 2), (320, 3)):        # one compiled function, two shapes
        sized = dataclasses.replace(cfg, seq_len=seq_len, batch=batch)
        graph = prepare(optimize(build_delta_net(sized), "O2"), "ggml")
        compiled = GgmlGraph(graph, builder=load_builder(library, "delta_net", graph, (seq_len, batch)))
        inputs = random_inputs(sized, rng=0)
        o, final_state = compiled(inputs)
        o_ref, state_ref = delta_rule_reference(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"],
                                                scale=sized.scale, initial_state=inputs["initial_state"])
        error = max(relative_rms_error(o, o_ref), relative_rms_error(final_state, state_ref))
        assert error < 1e-5, error
        print(f"T={seq_len} B={batch}: compute buffer: ggml's allocator {compiled.compute_buffer_bytes / 2**20:.1f} "
              f"MiB, dnir's plan {plan(graph).peak_bytes / 2**20:.1f} MiB; vs the float64 oracle: rms error "
              f"{error:.1e}")
