"""dnir run FILE.dnir: run a graph on random inputs; --check compares a delta-net
layer with the float64 recurrent oracle rebuilt from the graph's metadata."""
from __future__ import annotations

import argparse
import json

import numpy as np

from . import non_negative_int

EXAMPLE = """examples:
  dnir build gdn --heads 2 --value-heads 4 --head-dim 16 --value-dim 16 --seq-len 200 -o gdn.dnir
  dnir run gdn.dnir --target numpy --check
  dnir run gdn.dnir --check --seed 3 --json

Exit codes: 0 ok, 1 the error against the oracle is above the tolerance
(rms(out - ref) / rms(ref) > 1e-5 in float32), 2 usage or input error.
"""

# rms(err) / rms(ref) allowed for a float32 graph against the float64 oracle.
TOLERANCE = 1e-5
# ... added on cuda for a graph whose tensor-core products are one TF32 product each (precision
# "tf32"): TF32 keeps 11 significant bits (unit roundoff 2**-11 = 4.9e-4) and the layer's float32
# operands (w, u, the decayed keys, the state) are rounded to it; 1.2e-3 measured at T = 8192.
TF32_TOLERANCE = 4e-3


def register(sub):
    p = sub.add_parser("run", help="run a graph on random inputs, optionally checked against the oracle",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="graph in the .dnir text format")
    p.add_argument("--target", default="numpy", help="backend to run on (default numpy)")
    p.add_argument("--check", action="store_true",
                   help="compare with the float64 recurrent oracle; exit 1 above the tolerance")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random inputs (>= 0)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from dnir.analysis.memory import plan
    from dnir.cli import UsageError, load_graph
    from dnir.limits import check_fits_memory
    from dnir.lowering import run as run_graph
    from dnir.models import DeltaNetConfig, random_inputs

    from .progress import compile_for

    graph = load_graph(args.file)
    cfg = DeltaNetConfig.from_meta(graph.meta) if graph.meta.get("model") == "delta_net" else None
    # Before any input is drawn: the inputs live on the host; on a CPU target the
    # planned compute buffer too (a GPU's is on the device).
    check_fits_memory(args.file, plan(graph).peak_bytes if args.target in ("numpy", "llvm", "ggml") else 0,
                      sum(t.nbytes for t in graph.input_types))
    if cfg is None:
        if args.check:
            raise UsageError(f"{args.file} has no delta-net model metadata, so there is no oracle to "
                             f"check against; build it with `dnir build gdn|kda`")
        inputs = _generic_inputs(graph, args.seed)
    else:
        inputs = random_inputs(cfg, args.seed)
    compile_for(graph, args.target)
    outputs = run_graph(graph, inputs, target=args.target)
    result = {"file": args.file, "target": args.target, "seed": args.seed,
              "outputs": [{"name": name, "shape": list(out.shape), "dtype": str(out.dtype),
                           "finite": bool(np.isfinite(out).all())}
                          for name, out in zip(graph.output_names, outputs)]}
    if args.target == "ggml":    # the compute buffer ggml's allocator placed, next to dnir's plan of that graph
        from dnir.lowering.registry import build, prepare
        result["compute_buffer"] = {"ggml_bytes": build(graph, "ggml").compute_buffer_bytes,
                                    "plan_bytes": plan(prepare(graph, "ggml")).peak_bytes}
    ok = True
    if args.check:
        errors = _oracle_errors(cfg, graph, inputs, outputs)
        tf32 = args.target == "cuda" and cfg.precision == "tf32"
        tolerances = {name: _tolerance(t.dtype, tf32) for name, t in zip(graph.output_names, graph.output_types)}
        ok = all(e is not None and e <= tolerances[name] for name, e in errors.items())
        result["check"] = {"oracle": "float64 recurrent", "metric": "rms(out - ref) / rms(ref)",
                           "tolerance": TOLERANCE, "tolerances": tolerances, "errors": errors, "ok": ok}
    _report(result, args.json)
    return 0 if ok else 1


def _tolerance(dtype: str, tf32: bool = False) -> float:
    """TOLERANCE, plus for a half output the rounding of every element into it (the computation
    is float32 throughout; storing o in bf16 alone costs up to 2**-8 of each value), plus
    TF32_TOLERANCE where the products run in TF32."""
    from dnir.types import UNIT_ROUNDOFF
    half = UNIT_ROUNDOFF[dtype] if dtype in ("bf16", "f16") else 0.0
    return TOLERANCE + half + (TF32_TOLERANCE if tf32 else 0.0)


def _oracle_errors(cfg, graph, inputs, outputs) -> dict[str, float | None]:
    """rms(out - ref) / rms(ref) per output; None where the output is not finite."""
    from dnir.models import delta_rule_reference, relative_rms_error
    o_ref, state_ref = delta_rule_reference(
        inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"], scale=cfg.scale,
        initial_state=inputs.get("initial_state"), l2norm=cfg.l2norm, cu_seqlens=cfg.cu_seqlens)
    refs = {"o": o_ref, "final_state": state_ref}
    errors = {}
    for name, out in zip(graph.output_names, outputs):
        if name in refs:
            err = relative_rms_error(out, refs[name])
            errors[name] = err if np.isfinite(err) else None
    return errors


def _generic_inputs(graph, seed) -> dict[str, np.ndarray]:
    from dnir.types import numpy_dtype
    rng = np.random.default_rng(seed)
    return {node.attrs["name"]: rng.standard_normal(node.shape).astype(numpy_dtype(node.dtype))
            for node in graph.inputs}


def _report(result, as_json: bool):
    if as_json:
        print(json.dumps(result))
        return
    outs = "; ".join(f"{o['name']} {o['dtype']}{o['shape']}{'' if o['finite'] else ' (NOT FINITE)'}"
                     for o in result["outputs"])
    print(f"{result['file']} on {result['target']} (seed {result['seed']}): {outs}")
    buffer = result.get("compute_buffer")
    if buffer:
        print(f"compute buffer: ggml {buffer['ggml_bytes'] / 2**20:.1f} MiB, dnir's plan "
              f"{buffer['plan_bytes'] / 2**20:.1f} MiB")
    check = result.get("check")
    if check:
        errs = ", ".join(f"{name} {'not finite' if err is None else f'{err:.2e}'}"
                         for name, err in check["errors"].items())
        verdict = "ok" if check["ok"] else "ABOVE TOLERANCE"
        loose = {n: t for n, t in check["tolerances"].items() if t != check["tolerance"]}
        also = "".join(f"; {n} {t:.1e} for its dtype's rounding" for n, t in loose.items())
        print(f"error vs float64 recurrent oracle, rms(out - ref) / rms(ref): {errs} "
              f"(tolerance {check['tolerance']:.0e}{also}): {verdict}")
