"""The CPU benchmark: dnir and its peers side by side, in one process and one run.

For every case (a layer preset at a batch and sequence length) every
implementation gets the same float32 inputs, is timed (timing.measure), and
its output and final state are compared with every other implementation's.
Ratios are against the peer's chunked PyTorch reference for prefill and
against its recurrent reference for decode (the chunked reference needs whole
chunks of 64 tokens), and against ggml's fused op (llama.cpp's default path,
ggml_peer.py), the peer that CPU users run.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import time
from dataclasses import dataclass

import numpy as np

from . import machine, peers
from .timing import measure

FULL = dict(prefill_lens=(1024, 4096, 16384), decode_batches=(1, 64, 256), budget_s=12.0, max_runs=7)
QUICK = dict(prefill_lens=(64, 128), decode_batches=(4,), budget_s=0.3, max_runs=3)
# Small layers for --quick: the presets' structure (GQA for gdn), few heads, small head size.
QUICK_SIZES = {"qwen3-next": dict(heads=2, value_heads=4, head_dim=32, value_dim=32),
               "kimi-linear": dict(heads=4, value_heads=4, head_dim=32, value_dim=32)}
PRESETS = ("qwen3-next", "kimi-linear")

GGML = "ggml-gated-delta-net"
# dnir-O{0,2}-numpy is the functional API's NumPy path: the graph in its memory-planned
# compute buffer (lowering/numpy_arena.py). dnir-O2-numpy-reference runs the same O2 graph
# on the reference executor (lowering/numpy_backend.py), which allocates a fresh array per
# op: the difference is what the compute buffer saves.
# dnir-O{0,2}-ggml: dnir's graph lowered to ggml (lowering/ggml/) on the same ggml build as GGML.
# dnir-O2-tvm-llvm-inplace (decode only): the llvm path with inplace_final_state=True, the new state
# written into the caller's array as an engine's state cache is (its timed calls step one array on).
INPLACE = "dnir-O2-tvm-llvm-inplace"
IMPLS = ("dnir-O0-numpy", "dnir-O2-numpy", "dnir-O2-numpy-reference", "dnir-O2-tvm-llvm", INPLACE, GGML,
         "dnir-O0-ggml", "dnir-O2-ggml", "fla-chunk-ref", "fla-recurrent-ref", "torch-loop")
BACKEND_TARGETS = {"numpy": "numpy", "tvm-llvm": "llvm", "ggml": "ggml"}
PEER_FUNCS = {"fla-chunk-ref": peers.fla_chunk, "fla-recurrent-ref": peers.fla_recurrent,
              "torch-loop": peers.torch_loop}
# rms(a - b) / rms(b) above which two float32 implementations disagree.
TOLERANCE = 1e-4
# A case needing more than this share of the available memory is not started.
MEMORY_SHARE = 0.75
TARGET_SHAPE_T = 4096


@dataclass(frozen=True)
class Case:
    preset: str
    kind: str          # "prefill" (chunked) or "decode" (one token per sequence)
    batch: int
    seq_len: int
    sizes: tuple       # ((name, value), ...) overriding the preset's sizes (--quick)
    only: tuple = ()   # the implementations to run (all when empty)

    def config(self):
        """The layer's options exactly as dnir's functional API derives them, so that
        graphs prepared here are the ones its cache hands back."""
        from dnir.models import preset
        mode = "chunked" if self.kind == "prefill" else "decode"
        return preset(self.preset, batch=self.batch, seq_len=self.seq_len, mode=mode, initial_state=True,
                      final_state=True, **dict(self.sizes))

    @property
    def baseline(self) -> str:
        return "fla-chunk-ref" if self.kind == "prefill" else "fla-recurrent-ref"

    @property
    def impls(self) -> tuple[str, ...]:
        # flash-linear-attention's chunked references need whole chunks (its KDA one asserts it).
        return tuple(i for i in IMPLS if not (self.kind == "decode" and i == "fla-chunk-ref")
                     and not (self.kind == "prefill" and i == INPLACE) and (not self.only or i in self.only))

    def label(self) -> str:
        return f"{self.preset} {self.kind} B={self.batch} T={self.seq_len}"


def cases(quick: bool, settings: dict | None = None) -> list[Case]:
    settings = settings or (QUICK if quick else FULL)
    out = []
    for name in PRESETS:
        sizes = tuple(QUICK_SIZES[name].items()) if quick else ()
        out += [Case(name, "prefill", 1, t, sizes) for t in settings["prefill_lens"]]
        out += [Case(name, "decode", b, 1, sizes) for b in settings["decode_batches"]]
    return out


def numpy_executor_bytes(graph) -> int:
    """Bytes the NumPy executor holds at its peak: it runs the topological order
    and drops each top-level value after its last reader (views counted as copies)."""
    from dnir.lowering.numpy_backend import release_plan
    order = graph.topo_order()
    size = {id(n): sum(t.nbytes for t in (n.type if isinstance(n.type, tuple) else (n.type,)))
            for n in order if n.op != "input"}
    live = peak = 0
    for node, dead in zip(order, release_plan(graph)):
        live += size.get(id(node), 0)
        peak = max(peak, live)
        live -= sum(size.get(key, 0) for key in dead)
    return peak


def _dnir_call(case: Case, opt: str, target: str, x: dict, **options):
    import dnir
    variant = case.config().variant
    fn = {("prefill", "gdn"): dnir.chunk_gated_delta_rule, ("prefill", "kda"): dnir.chunk_kda,
          ("decode", "gdn"): dnir.fused_recurrent_gated_delta_rule,
          ("decode", "kda"): dnir.fused_recurrent_kda}[case.kind, variant]
    return lambda: fn(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"],
                      output_final_state=True, opt=opt, target=target, **options)


def _prepare_dnir(case: Case, opt: str, target: str, x: dict):
    """Build, optimise, and plan (NumPy) or compile (TVM) the graph the API will use, so
    that the timed calls only run it; returns (graph, seconds). TVM also loads the compiled
    module into a VM on its first call (LLVM code generation): that call is made here."""
    from dnir.api import compiled_graph
    start = time.perf_counter()
    graph = compiled_graph(case.config(), opt, target)
    if target == "numpy":
        from dnir.lowering.numpy_arena import graph_plan
        graph_plan(graph)
    if target == "llvm":
        from dnir.lowering.registry import build
        build(graph, "llvm")
        _dnir_call(case, opt, target, x)()
    return graph, time.perf_counter() - start


def _prepare_ggml_graph(record: dict, case: Case, opt: str, x: dict, settings: dict):
    """dnir's graph lowered to ggml and placed by ggml's allocator, on the benchmark's threads (the
    object the API's calls then run); None, the record marked skipped, when it would not fit."""
    from dnir.api import compiled_graph
    from dnir.lowering.ggml.build import GgmlUnavailable
    from dnir.lowering.ggml.run import compile_ggml
    from dnir.lowering.registry import prepare
    start = time.perf_counter()
    try:
        compiled = compile_ggml(prepare(compiled_graph(case.config(), opt, "ggml"), "ggml"))
    except GgmlUnavailable as e:
        record.update(status="skipped", reason=f"ggml unavailable: {e}")
        return None
    compiled.set_threads(settings.get("threads", 1))
    record["prepare_s"] = time.perf_counter() - start
    record["compute_buffer_bytes"] = compiled.compute_buffer_bytes
    return None if _too_big(record, compiled.compute_buffer_bytes, "ggml's compute buffer") else compiled


def _prepare_reference(case: Case, x: dict):
    """The O2 graph on the reference executor; returns (call, graph, seconds)."""
    from dnir.api import compiled_graph
    from dnir.lowering.numpy_backend import run
    start = time.perf_counter()
    graph = compiled_graph(case.config(), "O2")
    return lambda: run(graph, x), graph, time.perf_counter() - start


def _too_big(record: dict, need: int, why: str) -> bool:
    """Marks the record skipped when `need` bytes would not fit the available memory."""
    have = machine.available_memory_bytes()
    if have is None or need <= MEMORY_SHARE * have:
        return False
    record.update(status="skipped", reason=f"needs ~{need / 2**30:.1f} GiB ({why}), "
                                           f"{have / 2**30:.1f} GiB available")
    return True


def _prepare_ggml(record: dict, x: dict, settings: dict):
    """ggml's fused op on these inputs, copied into ggml's buffer once (a timed call is one graph
    compute); None, with the record marked skipped and why, when ggml cannot be built here."""
    from dnir.lowering.ggml.build import GgmlUnavailable

    from .ggml_peer import GgmlDeltaNet, harness
    try:
        harness()    # builds ggml and the harness on first use (minutes), not part of the graph's preparation
    except GgmlUnavailable as e:
        record.update(status="skipped", reason=f"ggml unavailable: {e}")
        return None
    # ggml's copy of the inputs and the outputs, and the reordered value heads on their way in.
    if _too_big(record, 2 * sum(a.nbytes for a in x.values()), "ggml's tensors"):
        return None
    start = time.perf_counter()
    run = GgmlDeltaNet(x["q"], x["k"], x["v"], x["g"], x["beta"], x["initial_state"],
                       threads=settings.get("threads", 1))
    record["prepare_s"] = time.perf_counter() - start
    return run


def run_impl(impl: str, case: Case, x: dict, xt: dict, settings: dict) -> tuple[dict, tuple | None]:
    """One implementation on one case: its record and its (o, final_state) as NumPy arrays."""
    record = {"impl": impl}
    ggml_run = None
    try:
        if impl == GGML:
            ggml_run = _prepare_ggml(record, x, settings)
            if ggml_run is None:
                return record, None
            fn = ggml_run.compute
        elif impl == "dnir-O2-numpy-reference":
            fn, graph, record["prepare_s"] = _prepare_reference(case, x)
            if _too_big(record, numpy_executor_bytes(graph), "the reference executor's live values"):
                return record, None
        elif impl.startswith("dnir-") and impl.endswith("-ggml"):
            opt = impl.split("-")[1]
            if _prepare_ggml_graph(record, case, opt, x, settings) is None:
                return record, None
            fn = _dnir_call(case, opt, "ggml", x)
        elif impl == INPLACE:     # checked on a step from a copy of the state, timed stepping another on
            graph, record["prepare_s"] = _prepare_dnir(case, "O2", "llvm", x)
            first = _dnir_call(case, "O2", "llvm", dict(x, initial_state=x["initial_state"].copy()),
                               inplace_final_state=True)()
            fn = _dnir_call(case, "O2", "llvm", dict(x, initial_state=x["initial_state"].copy()),
                            inplace_final_state=True)
        elif impl.startswith("dnir-"):
            from dnir.lowering.numpy_arena import graph_plan
            _, opt, backend = impl.split("-", 2)
            target = BACKEND_TARGETS[backend]
            graph, record["prepare_s"] = _prepare_dnir(case, opt, target, x)
            if target == "numpy" and _too_big(record, graph_plan(graph).peak_bytes, "the compute buffer"):
                return record, None
            fn = _dnir_call(case, opt, target, x)
        else:
            variant = case.config().variant
            peer = PEER_FUNCS[impl]
            fn = lambda: peer(variant, xt["q"], xt["k"], xt["v"], xt["g"], xt["beta"], xt["initial_state"])  # noqa: E731
        timing, out = measure(fn, settings["budget_s"], settings["max_runs"])
        o, state = ggml_run.outputs() if ggml_run is not None else first if impl == INPLACE else out
    except Exception as e:  # noqa: BLE001 - one failing implementation must not end the whole run
        record.update(status="failed", reason=f"{type(e).__name__}: {e}")
        return record, None
    finally:    # the next implementation starts without this one's compute buffer
        from dnir.lowering.numpy_arena import release_compute_buffer
        release_compute_buffer()
        if ggml_run is not None:
            ggml_run.close()
    record.update(status="ok", timing=timing.to_json(), note=timing.note)
    return record, (_as_numpy(o), _as_numpy(state))


def _as_numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def compare(outputs: dict) -> tuple[dict, dict]:
    """Pairwise rms(a - b) / rms(b) of the outputs o and of the final states."""
    from dnir.models import relative_rms_error
    err_o, err_s = {}, {}
    for a, (oa, sa) in outputs.items():
        err_o[a] = {b: relative_rms_error(oa, ob) for b, (ob, _) in outputs.items() if b != a}
        err_s[a] = {b: relative_rms_error(sa, sb) for b, (_, sb) in outputs.items() if b != a}
    return err_o, err_s


def run_case(case: Case, settings: dict, seed: int, progress) -> dict:
    import torch
    from dnir.models import random_inputs
    x = random_inputs(case.config(), seed)
    xt = {name: torch.from_numpy(a) for name, a in x.items()}
    cfg = case.config()
    result = {"preset": case.preset, "variant": cfg.variant, "kind": case.kind, "B": case.batch,
              "T": case.seq_len, "H": cfg.heads, "HV": cfg.value_heads, "K": cfg.head_dim, "V": cfg.value_dim,
              "baseline": case.baseline, "results": []}
    outputs = {}
    for impl in case.impls:
        progress.set_description(f"{case.label()}: {impl}")
        record, out = run_impl(impl, case, x, xt, settings)
        result["results"].append(record)
        if out is not None:
            outputs[impl] = out
        progress.update(1)
        gc.collect()
    result["errors_o"], result["errors_state"] = compare(outputs)
    base = next((r for r in result["results"] if r["impl"] == case.baseline and r["status"] == "ok"), None)
    ggml = next((r for r in result["results"] if r["impl"] == GGML and r["status"] == "ok"), None)
    for r in result["results"]:
        if r["status"] != "ok":
            continue
        if ggml is not None:
            r["ratio_vs_ggml"] = r["timing"]["median_s"] / ggml["timing"]["median_s"]
        others = result["errors_o"][r["impl"]]
        r["max_err_o_vs_others"] = max(others.values(), default=None)
        r["max_err_state_vs_others"] = max(result["errors_state"][r["impl"]].values(), default=None)
        if base is not None:
            r["ratio_vs_baseline"] = r["timing"]["median_s"] / base["timing"]["median_s"]
            r["err_o_vs_baseline"] = others.get(case.baseline, 0.0)
            r["err_state_vs_baseline"] = result["errors_state"][r["impl"]].get(case.baseline, 0.0)
        r["checked"] = bool(others) and max(max(others.values()), r["max_err_state_vs_others"]) <= TOLERANCE
    return result


def targets(results: list[dict]) -> list[dict]:
    """The CPU targets as measured ratios: against fla's chunked reference and ggml's fused op
    at (1, 4096, 32 heads, 128), and against ggml's fused op at every decode batch."""
    limits = {"gdn": 0.5, "kda": 0.25}
    out = []
    for case in results:
        by = {r["impl"]: r for r in case["results"] if r["status"] == "ok"}
        ggml = by.get(GGML)
        if ggml and (case["kind"] == "decode" or case["T"] == TARGET_SHAPE_T):
            limit = 0.5 if case["kind"] == "prefill" else 1.0
            for impl in ("dnir-O2-numpy", "dnir-O2-tvm-llvm", INPLACE):
                if impl in by:
                    ratio = by[impl]["timing"]["median_s"] / ggml["timing"]["median_s"]
                    out.append({"target": f"{impl} <= {limit}x {GGML} ({case['kind']}, B={case['B']})",
                                "variant": case["variant"], "T": case["T"], "ratio": ratio, "limit": limit,
                                "met": ratio <= limit, "factor_to_go": ratio / limit})
        if case["kind"] != "prefill":
            continue
        o2, o0, ref = by.get("dnir-O2-numpy"), by.get("dnir-O0-numpy"), by.get("fla-chunk-ref")
        for impl in ("dnir-O2-numpy",):
            if case["T"] == TARGET_SHAPE_T and impl in by and ref:
                ratio = by[impl]["timing"]["median_s"] / ref["timing"]["median_s"]
                limit = limits[case["variant"]]
                out.append({"target": f"{impl} <= {limit}x fla-chunk-ref", "variant": case["variant"],
                            "T": case["T"], "ratio": ratio, "limit": limit, "met": ratio <= limit,
                            "factor_to_go": ratio / limit})
        if o2 and o0:
            ratio = o2["timing"]["median_s"] / o0["timing"]["median_s"]
            out.append({"target": "dnir O2 faster than O0 (NumPy)", "variant": case["variant"], "T": case["T"],
                        "ratio": ratio, "limit": 1.0, "met": ratio < 1.0, "factor_to_go": ratio})
        g2, g0 = by.get("dnir-O2-ggml"), by.get("dnir-O0-ggml")
        if g2 and g0 and case["T"] == TARGET_SHAPE_T:
            ratio = g2["timing"]["median_s"] / g0["timing"]["median_s"]
            out.append({"target": "dnir-O2-ggml >= 2x faster than dnir-O0-ggml (same ggml build)",
                        "variant": case["variant"], "T": case["T"], "ratio": ratio, "limit": 0.5,
                        "met": ratio <= 0.5, "factor_to_go": ratio / 0.5})
    return out


def profile_o2(case: Case, seed: int, top: int = 15) -> dict:
    """Per-node and per-op time of the O2 graph on the NumPy executor, one run."""
    from dnir.api import compiled_graph
    from dnir.models import random_inputs

    from .profile_ops import by_op, profile
    graph = compiled_graph(case.config(), "O2")
    cpu_before, start = os.times(), time.perf_counter()
    rows = profile(graph, random_inputs(case.config(), seed))
    total, cpu_after = time.perf_counter() - start, os.times()
    return {"case": case.label(), "variant": case.config().variant, "total_s": total,
            "system_s": cpu_after.system - cpu_before.system,
            "by_op": [{"op": op, "seconds": s, "nodes": n} for op, s, n in by_op(rows)],
            "top_nodes": [{"node": r.name, "op": r.op, "shape": list(r.shape), "seconds": r.seconds,
                           "calls": r.calls} for r in rows[:top]]}


def run_benchmark(quick: bool, seed: int, threads: int, impls: tuple[str, ...] | None = None,
                  shapes: dict | None = None) -> dict:
    """The whole benchmark, or a subset: only `impls`, and `shapes` (prefill_lens, decode_batches)
    replacing the mode's cases (a subset runs and reports like a full run, its mode "subset")."""
    from tqdm import tqdm

    from dnir.lowering.ggml.build import GGML_VERSION, SDIST
    settings = {**(QUICK if quick else FULL), **(shapes or {}), "threads": threads}
    todo = cases(quick, settings)
    if impls:
        todo = [dataclasses.replace(c, only=tuple(impls)) for c in todo]
    meta = machine.describe(threads)
    meta["versions"]["ggml"] = f"{GGML_VERSION} (from the {SDIST} source distribution)"
    results = []
    start = time.perf_counter()
    with tqdm(total=sum(len(c.impls) for c in todo), unit="run", dynamic_ncols=True) as progress:
        for case in todo:
            results.append(run_case(case, settings, seed, progress))
    prefill = [c for c in todo if c.kind == "prefill"]
    profile_t = prefill[-1].seq_len if quick else TARGET_SHAPE_T
    profiles = [profile_o2(c, seed) for c in prefill if c.seq_len == profile_t]
    meta["load_average_end"] = machine.load_average()
    meta["wall_s"] = round(time.perf_counter() - start, 1)
    mode = "quick" if quick else "subset" if impls or shapes else "full"
    return {"benchmark": "cpu", "mode": mode, "machine": meta,
            "settings": {**settings, "tolerance": TOLERANCE, "seed": seed,
                         "metric": "rms(a - b) / rms(b)", "dtype": "float32"},
            "cases": results, "targets": [] if quick else targets(results), "profiles": profiles}
