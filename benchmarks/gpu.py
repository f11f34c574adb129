"""dnir O2 through TVM-CUDA (and Vulkan) against flash-linear-attention's Triton kernels, on one GPU.

Runs on the GPU machine with the bundle that scripts/gpu_bundle.sh builds here
(runtime-only TVM, the module cache with every case's compiled layer, the
fla-core and wgpu wheels, the Vulkan programs); benchmarks/README.md has the
one command. For every case of benchmarks/gpu_artefacts.CASES:

- the same inputs (drawn on the GPU; bf16 cases round q, k, v and beta to
  bf16, the gate and the state stay float32) go to dnir's module (loaded from
  the module cache by dnir.lowering.runtime_loader, TVM runtime only), to the
  functional API (`dnir.chunk_gated_delta_rule(..., target="cuda")`: the same
  module, by DLPack, with the API's checks) and to the peer
  (`chunk_gated_delta_rule`, `chunk_kda`, `fused_recurrent_gated_delta_rule`);
- o and the final state of both are compared with a float64 oracle computed
  there: the recurrent form, token by token in torch float64 on the GPU;
- times are CUDA-event times of whole calls after a warm-up, L2 flushed
  before each call: median, min and max; the API's overhead over the raw
  module call is its difference;
- decode reports the state traffic (read once, written once) as a bandwidth
  next to the measured copy bandwidth;
- the kernels dnir launches are listed by time (torch.profiler), with the
  FLOPs and bytes of the fused delta-rule kernels (counted here, where the
  bundle was built: bench_costs.json) as achieved TFLOP/s and GB/s;
- the (1, 8192) prefill cases run again with strong gates (g = -20 per token)
  for dnir and the peer: finite, and their error against the oracle;
- float32 cases with a Vulkan program in the bundle run it through wgpu on
  the NVIDIA Vulkan driver: time per run and error against the oracle;
- the float32 prefill cases run at both tensor-core precisions: the default
  (3xTF32, float32's accuracy) and `<case>_tf32` (one TF32 product, fla's own
  arithmetic: its Triton dots use TF32), each against the same oracle.

A case whose layer is not in the module cache is listed as "not built".
Writes gpu.json and gpu.md to --out after every case.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from .checkout import import_loader

ROOT = Path(__file__).resolve().parent.parent
ARCH = "sm_90"
PREFILL_LIMIT = {"f32": 1.5, "bf16": 2.0}   # dnir O2 prefill time over fla's, per dtype
PREFILL_GOAL = 1.0
DECODE_BANDWIDTH_SHARE = 0.75               # bf16 decode state traffic over the copy bandwidth
ERROR_LIMIT = 2.0                           # dnir's error over fla's, against the float64 oracle
ERROR_FLOOR = 1e-6                          # errors below this are both exact enough: no ratio taken
STRONG_GATE = -20.0
L2_FLUSH_BYTES = 256 << 20                  # larger than the H100's 50 MB and the H200's 60 MB L2
TORCH_DTYPES = {"f32": "float32", "bf16": "bfloat16"}


def make_inputs(cfg, seed: int, device) -> dict:
    """Inputs by graph input name, drawn as dnir.models.random_inputs draws them: unit-norm q and
    k, g = -softplus(n - 2), beta = sigmoid(n), a random initial state; q, k, v and beta rounded
    to the layer's dtype, g and the state float32."""
    import torch
    import torch.nn.functional as F
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = cfg.input_shapes()
    half = getattr(torch, TORCH_DTYPES[cfg.dtype])

    def normal(name):
        return torch.randn(shapes[name], generator=gen, device=device, dtype=torch.float32)

    def unit(x):
        return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)

    x = {"q": unit(normal("q")), "k": unit(normal("k")), "v": normal("v"), "g": -F.softplus(normal("g") - 2.0),
         "beta": torch.sigmoid(normal("beta")), "initial_state": 0.5 * normal("initial_state")}
    return {n: t.to(half) if n in ("q", "k", "v", "beta") else t for n, t in x.items()}


def oracle(x: dict, scale: float):
    """o and the final state in float64, the recurrent form token by token on x's device: the
    state decays, the delta rule writes v - S^T k along k, o reads q (batched products, a few
    launches a token). Value head j reads q/k head j // (HV / H)."""
    import torch
    q, k, v, g, beta = (x[n].double() for n in ("q", "k", "v", "g", "beta"))
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    q, k = (t.repeat_interleave(HV // H, dim=2).reshape(B, T, HV, 1, K) for t in (q, k))
    S = x["initial_state"].double().clone()                   # [B, HV, K, V]
    decay = torch.exp(g).reshape(B, T, HV, -1, 1)               # per head [.., 1, 1] or per channel [.., K, 1]
    v, beta = v.reshape(B, T, HV, 1, V), beta.reshape(B, T, HV, 1, 1)
    o = torch.empty(B, T, HV, 1, V, dtype=torch.float64, device=q.device)
    for t in range(T):
        S.mul_(decay[:, t])
        u = beta[:, t] * (v[:, t] - k[:, t] @ S)               # [B, HV, 1, V]
        S.add_(k[:, t].transpose(-1, -2) @ u)
        o[:, t] = q[:, t] @ S
    return o.reshape(B, T, HV, V) * scale, S


def cuda_time(fn) -> dict:
    """Milliseconds per call of `fn` with CUDA events: warm-up, L2 flushed before every call,
    as many calls as fit about a second (10 to 200)."""
    import torch
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    runs = max(10, min(200, int(1.0 / max(time.perf_counter() - start, 1e-6))))
    events = []
    for _ in range(runs):
        flush.zero_()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        events.append((begin, end))
    torch.cuda.synchronize()
    times = [b.elapsed_time(e) for b, e in events]
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "runs": runs}


def copy_bandwidth() -> dict:
    """Device copy bandwidth: bytes read + written by a 1 GiB tensor copy, per second."""
    import torch
    src = torch.randn(1 << 28, device="cuda")   # 1 GiB of float32
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src))
    moved = 2 * src.numel() * src.element_size()
    return {"bytes": moved, **t, "gbps": moved / (t["median_ms"] * 1e-3) / 1e9}


def rms_error(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float(((out - ref) ** 2).mean().sqrt() / (((ref ** 2).mean().sqrt()) + 1e-30))


def peer_call(case: dict, x: dict):
    """(name, call) of flash-linear-attention's kernel for the case. Its chunked kernels get one q/k
    head per value head where they take no GQA layer: q and k repeated inside the call."""
    import torch
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    from fla.ops.kda import chunk_kda
    state = {"initial_state": x["initial_state"], "output_final_state": True}
    if case["kind"] == "decode":
        return "fused_recurrent_gated_delta_rule", lambda: fused_recurrent_gated_delta_rule(
            x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], **state)
    fn = chunk_gated_delta_rule if case["variant"] == "gdn" else chunk_kda
    group = case["value_heads"] // case["heads"]
    if group > 1:
        try:
            fn(x["q"], x["k"], x["v"], x["g"], x["beta"], **state)
        except Exception:  # noqa: BLE001 - this version of the kernel takes no GQA layer
            return f"{fn.__name__} (q, k repeated)", lambda: fn(
                torch.repeat_interleave(x["q"], group, 2), torch.repeat_interleave(x["k"], group, 2), x["v"],
                x["g"], x["beta"], **state)
    return fn.__name__, lambda: fn(x["q"], x["k"], x["v"], x["g"], x["beta"], **state)


def api_call(case: dict, x: dict, check_values: bool = True):
    import dnir
    precision = case.get("precision")
    fn = {("gdn", "prefill"): dnir.chunk_gated_delta_rule, ("kda", "prefill"): dnir.chunk_kda,
          ("gdn", "decode"): dnir.fused_recurrent_gated_delta_rule}[case["variant"], case["kind"]]
    return lambda: fn(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"],
                      output_final_state=True, target="cuda", precision=precision, check_values=check_values)


KERNEL_ROWS = 12      # a case's kernel table: its costliest kernels


def kernel_profile(fn, costs: dict) -> list[dict]:
    """The CUDA kernels of three calls of `fn`, by total device time; TFLOP/s and GB/s where the
    kernel is one of the fused ops whose FLOPs and bytes were counted (`costs`, by op name)."""
    import re

    import torch
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    rows = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            row = rows.setdefault(e.name, {"kernel": e.name, "ms": 0.0, "launches": 0})
            row["ms"] += e.time_range.elapsed_us() / 1e3 / 3
            row["launches"] += 1
    for row in rows.values():
        row["launches"] //= 3
        op = re.sub(r"(_mma)?\d*_kernel$", "", row["kernel"])    # intra_chunk_mma_kernel: the op intra_chunk
        if op in costs and row["ms"] > 0:
            row.update(op=op, gflop=costs[op]["flops"] / 1e9,
                       tflops=costs[op]["flops"] / (row["ms"] * 1e-3) / 1e12,
                       gbps=costs[op]["bytes"] / (row["ms"] * 1e-3) / 1e9)
    return sorted(rows.values(), key=lambda r: -r["ms"])


def vulkan_case(program_path: Path, x: dict, names, ref, runs: int = 5) -> dict:
    """The case's Vulkan program on this machine's Vulkan adapter: ms per run, error of o and state."""
    import numpy as np
    import torch

    from dnir.lowering.vulkan_program import Program, Runner, adapter_info
    info = adapter_info()
    runner = Runner(Program.load(program_path))
    outs = runner([x[n].float().cpu().numpy() for n in names])
    o, s = (torch.from_numpy(np.ascontiguousarray(a)) for a in outs)
    return {"adapter": f"{info.get('device')} ({info.get('backend_type')}, {info.get('description', '')})",
            "ms": runner.time(runs), "runs": runs, "dispatches": len(runner.steps),
            "err_o": rms_error(o, ref[0].cpu()), "err_state": rms_error(s, ref[1].cpu())}


def vulkan_runs(folder: Path, name: str, x: dict, names, ref) -> dict | None:
    """The case's Vulkan program for the NVIDIA driver's limits, else the portable one; None when
    the bundle has neither, else the result or why none ran."""
    tried = []
    for suffix in (".npz", ".portable.npz"):
        program, skipped = folder / f"{name}{suffix}", folder / f"{name}{suffix}.skipped"
        if skipped.exists():
            tried.append(f"{suffix}: not compiled: {skipped.read_text().strip()}")
        elif program.exists():
            try:
                return {**vulkan_case(program, x, names, ref), "program": program.name, "not_run": tried}
            except Exception as e:  # noqa: BLE001 - the next program, or the row says why none ran
                tried.append(f"{suffix}: {type(e).__name__}: {e}"[:300])
    return {"error": "; ".join(tried)[:600]} if tried else None


def run_case(name: str, case: dict, loader, bundle: Path, costs: dict, copy_gbps: float, seed: int) -> dict:
    import torch
    import tvm

    from .gpu_artefacts import OPT, config
    cfg = config(case)
    start = time.perf_counter()
    layer = loader.cuda_layer(cfg, OPT, arch=ARCH)      # raises BackendError when the cache lacks it
    main = layer.main
    load_s = time.perf_counter() - start
    x = make_inputs(cfg, seed, "cuda")
    args = [tvm.runtime.from_dlpack(x[n]) for n in layer.input_names]

    def dnir_fn():
        return main(*args)

    o, s = (torch.from_dlpack(t).clone() for t in dnir_fn())
    api_fn, unchecked_fn = api_call(case, x), api_call(case, x, check_values=False)
    api_o, api_s = api_fn()
    peer_name, peer_fn = peer_call(case, x)
    fla_o, fla_s = peer_fn()
    start = time.perf_counter()
    ref = oracle(x, cfg.scale)
    oracle_s = time.perf_counter() - start
    c = {"name": name, **case, "precision": cfg.precision, "K": cfg.head_dim, "V": cfg.value_dim,
         "peer": peer_name, "load_s": load_s, "oracle_s": oracle_s, "dnir": cuda_time(dnir_fn),
         "api": cuda_time(api_fn), "api_unchecked": cuda_time(unchecked_fn), "fla": cuda_time(peer_fn),
         "api_same_as_module": bool(torch.equal(api_o, o.to(api_o.dtype)) and torch.equal(api_s, s)),
         "err": {"dnir": {"o": rms_error(o, ref[0]), "state": rms_error(s, ref[1])},
                 "fla": {"o": rms_error(fla_o, ref[0]), "state": rms_error(fla_s, ref[1])}}}
    c["ratio"] = c["dnir"]["median_ms"] / c["fla"]["median_ms"]
    c["api_overhead_ms"] = c["api"]["median_ms"] - c["dnir"]["median_ms"]
    c["api_unchecked_overhead_ms"] = c["api_unchecked"]["median_ms"] - c["dnir"]["median_ms"]
    counted = costs.get("layers", {}).get(name)
    if counted:
        c["tflops"] = counted["flops"] / (c["dnir"]["median_ms"] * 1e-3) / 1e12
    if case["kind"] == "decode":
        c["state_bytes"] = 2 * x["initial_state"].numel() * x["initial_state"].element_size()
        for impl in ("dnir", "fla"):
            gbps = c["state_bytes"] / (c[impl]["median_ms"] * 1e-3) / 1e9
            c[impl].update(state_gbps=gbps, share_of_copy=gbps / copy_gbps)
    try:
        c["dnir_kernels"] = kernel_profile(dnir_fn, costs.get("kernels", {}).get(name, {}))
        c["api_kernels"] = kernel_profile(api_fn, {})
    except Exception as e:  # noqa: BLE001 - the profile explains a miss; its absence must not lose the timings
        c["dnir_kernels_error"] = f"{type(e).__name__}: {e}"
    if case["kind"] == "prefill" and case["batch"] == 1 and case["seq_len"] == 8192 and case["heads"] == 32:
        c["strong_gates"] = strong_gates(case, x, layer.input_names, main, cfg.scale)
    c["vulkan"] = vulkan_runs(bundle / "vulkan", name, x, layer.input_names, ref)
    err = c["err"]
    print(f"{name}: dnir {c['dnir']['median_ms']:.3f} ms (API {c['api']['median_ms']:.3f}), {peer_name} "
          f"{c['fla']['median_ms']:.3f} ms ({c['ratio']:.2f}x); rms err o dnir {err['dnir']['o']:.1e} fla "
          f"{err['fla']['o']:.1e}, state dnir {err['dnir']['state']:.1e} fla {err['fla']['state']:.1e}"
          + (f"; vulkan {c['vulkan'].get('ms', float('nan')):.2f} ms" if c["vulkan"] else ""), flush=True)
    return c


def strong_gates(case: dict, x: dict, names, main, scale: float) -> dict:
    """g = -20 per token (every channel for KDA): dnir's and fla's outputs finite, and their error."""
    import torch
    import tvm
    strong = dict(x, g=torch.full_like(x["g"], STRONG_GATE))
    o, s = (torch.from_dlpack(t).clone() for t in main(*[tvm.runtime.from_dlpack(strong[n]) for n in names]))
    fla_o, fla_s = peer_call(case, strong)[1]()
    ref = oracle(strong, scale)
    out = {}
    for impl, (oo, ss) in (("dnir", (o, s)), ("fla", (fla_o, fla_s))):
        out[impl] = {"finite": bool(torch.isfinite(oo).all() and torch.isfinite(ss).all()),
                     "err_o": rms_error(oo, ref[0]), "err_state": rms_error(ss, ref[1])}
    return out


def targets(cases: list[dict]) -> list[dict]:
    from .gpu_artefacts import precision
    out = []

    def add(target, case, measured, limit, met, factor):
        out.append({"target": target, "case": case, "measured": measured, "limit": limit, "met": met,
                    "factor_to_go": factor})

    for c in cases:
        if c["kind"] == "prefill":
            limit, kind = PREFILL_LIMIT[c["dtype"]], f"{c['dtype']}, {precision(c)}"
            add(f"dnir O2 prefill <= {limit:g}x fla ({kind})", c["name"], c["ratio"], limit,
                c["ratio"] <= limit, c["ratio"] / limit)
            if c["dtype"] == "f32":
                add(f"goal: dnir O2 prefill <= {PREFILL_GOAL:g}x fla ({kind})", c["name"], c["ratio"], PREFILL_GOAL,
                    c["ratio"] <= PREFILL_GOAL, c["ratio"] / PREFILL_GOAL)
        elif c["dtype"] == "bf16":
            share = c["dnir"]["share_of_copy"]
            add(f"decode state traffic >= {DECODE_BANDWIDTH_SHARE:.0%} of copy bandwidth (bf16)", c["name"], share,
                DECODE_BANDWIDTH_SHARE, share >= DECODE_BANDWIDTH_SHARE, DECODE_BANDWIDTH_SHARE / share)
        for what in ("o", "state"):
            mine, peer = c["err"]["dnir"][what], max(c["err"]["fla"][what], ERROR_FLOOR)
            ratio = mine / peer
            add(f"rms error of {what} vs float64 <= {ERROR_LIMIT:g}x fla's", c["name"], ratio, ERROR_LIMIT,
                ratio <= ERROR_LIMIT, ratio / ERROR_LIMIT)
        if "strong_gates" in c:
            finite = c["strong_gates"]["dnir"]["finite"]
            add("strong gates (g = -20) finite", c["name"], float(finite), 1, finite, 1.0 if finite else float("inf"))
    return out


def _ms(t: dict) -> str:
    return f"{t['median_ms']:.3f}"


def markdown(doc: dict) -> str:
    from .gpu_artefacts import precision
    m = doc["machine"]
    lines = [
        "# dnir GPU benchmark", "",
        f"- date: {m['date']}; GPU: {m['gpu']} (sm_{m['capability']}); Python {m['python']}, torch {m['torch']} "
        f"(CUDA {m['cuda']}), triton {m['triton']}, flash-linear-attention (fla-core) {m['fla']}, "
        f"TVM runtime {m['tvm']}",
        "- (B, T, H q/k heads, HV value heads, K = V = 128); inputs drawn on the GPU (seed "
        f"{doc['seed']}); bf16 cases: q, k, v, beta and o bf16, the gate and the state float32; an initial "
        "state in, the final state out; CUDA-event time per call, median of the runs after warm-up, L2 "
        "flushed before each call",
        "- precision: CUDA's tensor-core products, `highest` = 3xTF32 (float32's accuracy), `tf32` = one TF32 "
        "product (fla's float32 arithmetic; the default for bf16); `_tf32` cases are the float32 layers at tf32",
        "- `dnir`: the compiled module called directly (TVM runtime, from the module cache); `API`: "
        "`dnir.chunk_gated_delta_rule(..., target=\"cuda\")` etc. on the same torch tensors (DLPack both ways, "
        "the API's checks, one synchronisation); `unchecked`: the same call with `check_values=False` (no "
        "reduction, no synchronisation); overhead = API - dnir",
        f"- errors: rms(x - oracle) / rms(oracle) of o and of the final state, oracle = the recurrent form in "
        f"float64 on the GPU; measured copy bandwidth (1 GiB copy, read + write): {doc['copy']['gbps']:.0f} GB/s",
        "",
        "| case | dtype | precision | B | T | H / HV | peer | dnir ms | API ms (overhead) | unchecked ms (overhead) "
        "| fla ms | dnir / fla | err o dnir / fla | err state dnir / fla | TFLOP/s | Vulkan ms (dnir, wgpu) | load s |",
        "|" + "---|" * 17]
    for c in doc["cases"]:
        e = c["err"]
        vk = c.get("vulkan")
        vulkan = "-" if vk is None else (f"{vk['ms']:.2f}" if "ms" in vk else f"failed: {vk['error'][:80]}")
        tflops = f"{c['tflops']:.1f}" if "tflops" in c else "-"
        unchecked = (f"{_ms(c['api_unchecked'])} ({c['api_unchecked_overhead_ms']:+.3f})" if "api_unchecked" in c
                     else "-")                       # runs before check_values timed none
        lines.append(
            f"| {c['name']} | {c['dtype']} | {precision(c)} | {c['batch']} | {c['seq_len']} | "
            f"{c['heads']} / {c['value_heads']} | "
            f"{c['peer']} | {_ms(c['dnir'])} | {_ms(c['api'])} ({c['api_overhead_ms']:+.3f}) | {unchecked} | "
            f"{_ms(c['fla'])} | "
            f"{c['ratio']:.2f}x | {e['dnir']['o']:.1e} / {e['fla']['o']:.1e} | "
            f"{e['dnir']['state']:.1e} / {e['fla']['state']:.1e} | {tflops} | {vulkan} | {c['load_s']:.1f} |")
    for f in doc.get("not_built", []):
        lines.append(f"| {f['name']} | not built: {f['reason'][:200]} |")
    for f in doc.get("failed", []):
        lines.append(f"| {f['name']} | FAILED: {f['error'][:300]} |")
    decode = [c for c in doc["cases"] if c["kind"] == "decode"]
    if decode:
        lines += ["", "## Decode state traffic", "", "| case | state bytes (read + write) | dnir GB/s | dnir share "
                  "of copy | fla GB/s | fla share of copy |", "|---|---|---|---|---|---|"]
        for c in decode:
            lines.append(f"| {c['name']} | {c['state_bytes'] / 2**20:.0f} MiB | {c['dnir']['state_gbps']:.0f} | "
                         f"{c['dnir']['share_of_copy']:.0%} | {c['fla']['state_gbps']:.0f} | "
                         f"{c['fla']['share_of_copy']:.0%} |")
    strong = [c for c in doc["cases"] if "strong_gates" in c]
    if strong:
        lines += ["", f"## Strong gates (g = {STRONG_GATE:g} per token)", "",
                  "| case | dnir finite | dnir err o / state | fla finite | fla err o / state |",
                  "|---|---|---|---|---|"]
        for c in strong:
            d, f = c["strong_gates"]["dnir"], c["strong_gates"]["fla"]
            lines.append(f"| {c['name']} | {'yes' if d['finite'] else 'NO'} | {d['err_o']:.1e} / {d['err_state']:.1e} "
                         f"| {'yes' if f['finite'] else 'NO'} | {f['err_o']:.1e} / {f['err_state']:.1e} |")
    ran = [c for c in doc["cases"] if c.get("vulkan") and "ms" in c["vulkan"]]
    if ran:
        lines += ["", "## Vulkan: dnir's recorded programs through wgpu, next to CUDA", "",
                  f"Adapter: {ran[0]['vulkan']['adapter']}", "",
                  "| case | program | dispatches | Vulkan ms | CUDA ms | Vulkan / CUDA | err o | err state |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in ran:
            v = c["vulkan"]
            lines.append(f"| {c['name']} | {v['program']} | {v['dispatches']} | {v['ms']:.2f} | {_ms(c['dnir'])} | "
                         f"{v['ms'] / c['dnir']['median_ms']:.1f}x | {v['err_o']:.1e} | {v['err_state']:.1e} |")
    lines += ["", "## Targets", "", "| target | case | measured | limit | met | factor to go |",
              "|---|---|---|---|---|---|"]
    for t in doc["targets"]:
        to_go = "-" if t["met"] else f"{t['factor_to_go']:.2f}x"
        lines.append(f"| {t['target']} | {t['case']} | {t['measured']:.2f} | {t['limit']:g} | "
                     f"{'yes' if t['met'] else 'no'} | {to_go} |")
    for c in doc["cases"]:
        lines += ["", f"## Kernels of dnir: {c['name']} (per call)", ""]
        if "dnir_kernels" not in c:
            lines.append(f"profile unavailable: {c.get('dnir_kernels_error')}")
            continue
        lines += ["| kernel | ms | launches | GFLOP | TFLOP/s | GB/s |", "|---|---|---|---|---|---|"]
        for k in c["dnir_kernels"][:KERNEL_ROWS]:
            counted = (f"{k['gflop']:.1f} | {k['tflops']:.1f} | {k['gbps']:.0f}" if "gflop" in k else "- | - | -")
            lines.append(f"| `{k['kernel'][:80]}` | {k['ms']:.3f} | {k['launches']} | {counted} |")
        if "api_kernels" in c:
            launches, ms = (sum(k[f] for k in c["api_kernels"]) - sum(k[f] for k in c["dnir_kernels"])
                            for f in ("launches", "ms"))
            lines += ["", f"The API call adds {launches} kernel launches (its checks and conversions) taking {ms:.3f} "
                      f"ms on the GPU, of its {c['api_overhead_ms']:+.3f} ms overhead over the module."]
    return "\n".join(lines) + "\n"


def machine() -> dict:
    import datetime
    from importlib.metadata import version

    import torch
    import triton
    import tvm
    major, minor = torch.cuda.get_device_capability()
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "host": platform.node(),
            "gpu": torch.cuda.get_device_name(), "capability": f"{major}{minor}", "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "fla": version("fla-core"), "tvm": getattr(tvm, "__version__", "unknown")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=ROOT / ".gpu", help="the folder scripts/gpu_bundle.sh built")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", nargs="*", help="only these cases (default: every case of gpu_artefacts.CASES)")
    p.add_argument("--merge", nargs="+", type=Path, metavar="GPU_JSON",
                   help="no run: join the gpu.json of runs over parts of the cases (one device call is at most "
                        "10 minutes) into one gpu.json and gpu.md in --out")
    args = p.parse_args(argv)
    if args.merge:
        write(merge([json.loads(f.read_text()) for f in args.merge]), args.out)
        return 0
    loader = import_loader()
    from .gpu_artefacts import CASES
    costs_path = args.bundle / "bench_costs.json"
    costs = json.loads(costs_path.read_text()) if costs_path.exists() else {}
    copy = copy_bandwidth()
    print(f"copy bandwidth: {copy['gbps']:.0f} GB/s", flush=True)
    doc = {"benchmark": "gpu", "machine": machine(), "seed": args.seed, "copy": copy, "cases": [],
           "not_built": [], "failed": [], "targets": []}
    for name, case in CASES.items():
        if args.cases and name not in args.cases:
            continue
        try:
            doc["cases"].append(run_case(name, case, loader, args.bundle, costs, copy["gbps"], args.seed))
        except Exception as e:  # noqa: BLE001 - one device call: a failing case must not lose the others
            if isinstance(e, loader.BackendError) and "no compiled CUDA module" in str(e):
                doc["not_built"].append({"name": name, "reason": "no module in the bundle's cache"})
                print(f"{name}: not built", flush=True)
            else:
                doc["failed"].append({"name": name, "error": f"{type(e).__name__}: {e}"[-2000:]})
                print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
        doc["targets"] = targets(doc["cases"])
        doc["nvcc_runs"] = loader._STATE["nvcc_runs"]
        write(doc, args.out)
    print(markdown(doc))
    return 0 if not doc["failed"] else 1


def merge(docs: list[dict]) -> dict:
    """One document from runs over parts of the cases, on one card: the cases in gpu_artefacts.CASES'
    order (a case run again: the later run's), the targets again, the first run's machine and copy
    bandwidth (each run's date kept)."""
    from .gpu_artefacts import CASES
    cards = {d["machine"]["gpu"] for d in docs}
    if len(cards) > 1:
        raise SystemExit(f"--merge: the runs are on different cards ({', '.join(sorted(cards))}); rerun on one")
    doc = dict(docs[0], machine=dict(docs[0]["machine"], date=", ".join(d["machine"]["date"] for d in docs)))
    order = list(CASES)
    latest = {c["name"]: c for d in docs for c in d["cases"]}
    doc["cases"] = sorted(latest.values(), key=lambda c: order.index(c["name"]))
    for key in ("not_built", "failed"):
        doc[key] = [x for d in docs for x in d[key]]
    doc["targets"] = targets(doc["cases"])
    return doc


def write(doc: dict, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "gpu.md").write_text(markdown(doc))


if __name__ == "__main__":
    sys.exit(main())
