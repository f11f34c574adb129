"""Time the prefill's three GPU kernels under other launch choices than their defaults.

The kernels (lowering/tvm/intra_chunk.py, chunk_scan.py's chunk_states, chunk_output.py)
have knobs whose best value is a property of the chip, not of the math: a block's
value columns and threads, the outputs per thread, the terms staged at once, tensor cores (TF32 or 3xTF32) or not, and how
many blocks an SM must hold (`__launch_bounds__`'s second argument, which caps the
registers a thread may use). This measures them on the device instead of guessing:

    python -m benchmarks.gpu_sweep build --out DIR     # here: every variant's library and fatbin
    python -m benchmarks.gpu_sweep run --dir DIR --out OUT   # on the GPU: times, checked outputs

Each variant runs on the same inputs (the layer's (1, 8192, 32, 128), GDA and KDA) as
its kernel's default, whose outputs it must match (max relative difference < 1e-4);
times are CUDA-event medians with L2 flushed before every call (benchmarks/gpu.py).
Writes sweep.json and sweep.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

R, T, HV, C, K, V = 1, 8192, 32, 64, 128, 128
NC = T // C
BATCH = (R, HV)
STATES = [(16, 16, 2), (16, 8, 1), (16, 8, 2), (16, 16, 1), (16, 16, 4), (8, 16, 2), (8, 8, 1), (32, 16, 2),
          (32, 8, 1), (32, 16, 4)]                       # (thread rows, value columns, columns per thread)
OUTPUTS = [((4, 4), 16, 64), ((4, 4), 32, 64), ((4, 4), 16, 128), ((8, 4), 16, 64), ((4, 8), 16, 64),
           ((8, 8), 16, 128), ((2, 4), 16, 64), ((4, 4), 8, 64)]   # (tile, kt, bv)
OUTPUTS_MMA = [(16, 64, True), (32, 64, True), (16, 128, True), (32, 128, True), (16, 64, False),
               (32, 128, False)]                          # tensor cores: (kt, bv, 3xTF32)
# tensor cores with each operand copied whole by cp.async (staging "async"): (bv, 3xTF32)
OUTPUTS_ASYNC = [(64, True), (128, True), (64, False)]
# as a bf16 layer at "tf32" runs it (`output_bf16`: q_decayed, starts and v_new bf16, aqk float32, o stored
# bf16; the first is its default): (staging, bv)
OUTPUTS_BF16 = [("slices", 64), ("async", 64), ("async", 128), ("slices", 128)]
BF16_OUTPUT = {"q_decayed": "bfloat16", "starts": "bfloat16", "v_new": "bfloat16"}
STATES_MMA = [(16, True), (8, True), (16, False)]       # tensor cores: (vt, 3xTF32)
# tensor cores with the staged operands fetched ahead: (vt, 3xTF32, prefetch, async's staged halves)
STATES_PREFETCH = [(vt, split, prefetch, 4) for vt in (16, 32) for split in (True, False)
                   for prefetch in ("registers", "async")] + [(16, True, "async", 2)]
# async prefetch with more accumulator sets, or 8 state columns a block (nt = 1: more blocks an SM):
# (vt, 3xTF32, staged halves, chains)
STATES_CHAINS = [(16, True, 4, 2), (16, False, 4, 2), (32, False, 4, 2), (8, False, 2, 1), (8, False, 3, 1),
                 (8, False, 2, 2)]
# as a bf16 layer at "tf32" runs it (`states_bf16`: w, u and k_to_end bf16, starts and v_new stored bf16;
# the first is its default): (vt, staged halves, chains, products: TF32 or bf16 m16n8k16)
STATES_BF16 = [(16, 4, 1, "tf32"), (16, 4, 2, "tf32"), (32, 4, 1, "tf32"), (32, 4, 2, "tf32"), (8, 4, 1, "tf32"),
               (8, 3, 1, "tf32"), (8, 4, 2, "tf32"), (16, 4, 1, "bf16"), (16, 4, 2, "bf16"), (32, 4, 1, "bf16"),
               (8, 4, 1, "bf16")]
BF16_LOOP = {"w": "bfloat16", "u": "bfloat16", "k_to_end": "bfloat16"}
# a variant matches its default within 1e-4 (relative), or where stored in bf16 within two rounding steps
# (one is up to 2^-7 of a value)
MATCH = {"states_bf16": 2 ** -6, "output_bf16": 2 ** -6}
# tensor-core scores: (3xTF32, blocks per SM, KDA halving, GDA through the decayed rows)
INTRA_MMA = [(True, 1, True, False), (True, 2, True, False), (True, 3, True, False), (True, 2, True, True),
             (True, 3, True, True), (False, 3, True, False), (False, 2, True, False), (False, 2, True, True),
             (False, 3, True, True)]
# GDA's steps the other way, at 2 blocks an SM: the solve by a thread per column (`_colsolve`, not by
# 16 x 16 blocks on tensor cores), q_decayed and k_to_end by a thread per channel (`_colops`, not by rows)
INTRA_GDN_STEPS = [(split, blocks, rows) for split in (True, False)
                   for blocks, rows in ((False, True), (True, False), (False, False))]
# what each step of intra_chunk_mma costs: its time as the bf16 layers run it (one TF32 product, 2 blocks
# per SM) without it (outputs then differ)
INTRA_SKIPS = {"gdn": ["operands", "scores", "solve"], "kda": ["operands", "scores", "diagonals", "solve"]}
MIN_BLOCKS = [1, 2, 3]                                    # intra_chunk's blocks per SM


def variants():
    """(name, kernel, kg, min_blocks, make) for every variant; the first of each kernel is its default."""
    from dnir.lowering.tvm import chunk_output, chunk_scan, chunk_states_mma, intra_chunk, intra_chunk_mma
    out = []
    for kg, layer in ((1, "gdn"), (K, "kda")):
        for m in MIN_BLOCKS:
            out.append((f"intra_{layer}_b{m}", "intra", kg, m,
                        lambda kg=kg: intra_chunk.intra_chunk_kernel(R, NC, HV, C, K, V, kg, "float32")))
        for split, m, halving, decayed in INTRA_MMA:
            if (halving or kg == K) and not (decayed and kg == K):
                name = f"intra_{layer}_mma{'3' if split else '1'}{'' if halving else '_threads'}" \
                    f"{'_decayed' if decayed else ''}_b{m}"
                out.append((name, "intra", kg, m, lambda kg=kg, split=split, halving=halving, decayed=decayed:
                            intra_chunk_mma.intra_chunk_mma_kernel(R, NC, HV, C, K, V, kg, "float32", split=split,
                                                                   halving=halving, decayed=decayed)))
        for split, blocks, rows in INTRA_GDN_STEPS if kg == 1 else ():
            name = f"intra_gdn_mma{'3' if split else '1'}{'' if blocks else '_colsolve'}{'' if rows else '_colops'}_b2"
            out.append((name, "intra", kg, 2, lambda kg=kg, split=split, blocks=blocks, rows=rows:
                        intra_chunk_mma.intra_chunk_mma_kernel(R, NC, HV, C, K, V, kg, "float32", split=split,
                                                               tensor_solve=blocks, row_operands=rows)))
        for step in INTRA_SKIPS[layer]:
            out.append((f"intra_{layer}_mma1_b2_no_{step}", "intra", kg, 2,
                        lambda kg=kg, step=step: intra_chunk_mma.intra_chunk_mma_kernel(
                            R, NC, HV, C, K, V, kg, "float32", split=False, skip=(step,))))
        for lay in STATES:
            out.append((f"states_{layer}_{'x'.join(map(str, lay))}", "states", kg, 1,
                        lambda kg=kg, lay=lay: chunk_scan.chunk_states_kernel(NC, BATCH, C, K, V, kg, lay, "float32")))
        for vt, split in STATES_MMA:
            out.append((f"states_{layer}_mma{'3' if split else '1'}_vt{vt}", "states", kg, 1,
                        lambda kg=kg, vt=vt, split=split: chunk_states_mma.chunk_states_mma_kernel(
                            NC, BATCH, C, K, V, kg, "float32", vt=vt, split=split)))
        for vt, split, prefetch, stages in STATES_PREFETCH:
            kind = "reg" if prefetch == "registers" else "async" + ("" if stages == chunk_states_mma.STAGES
                                                                    else str(stages))
            out.append((f"states_{layer}_mma{'3' if split else '1'}_vt{vt}_{kind}", "states", kg, 1,
                        lambda kg=kg, vt=vt, split=split, prefetch=prefetch, stages=stages:
                        chunk_states_mma.chunk_states_mma_kernel(NC, BATCH, C, K, V, kg, "float32", vt=vt,
                                                                 split=split, prefetch=prefetch, stages=stages)))
        for vt, split, stages, chains in STATES_CHAINS:
            out.append((f"states_{layer}_mma{'3' if split else '1'}_vt{vt}_async{stages}_c{chains}", "states", kg, 1,
                        lambda kg=kg, vt=vt, split=split, stages=stages, chains=chains:
                        chunk_states_mma.chunk_states_mma_kernel(NC, BATCH, C, K, V, kg, "float32", vt=vt, split=split,
                                                                 prefetch="async", stages=stages, chains=chains)))
        for vt, stages, chains, products in STATES_BF16:
            out.append((f"states_bf16_{layer}_vt{vt}_async{stages}_c{chains}{'_mma16' if products == 'bf16' else ''}",
                        "states_bf16", kg, 1,
                        lambda kg=kg, vt=vt, stages=stages, chains=chains, products=products:
                        chunk_states_mma.chunk_states_mma_kernel(
                            NC, BATCH, C, K, V, kg, "float32", vt=vt, split=False, prefetch="async", stages=stages,
                            chains=chains, stored="bfloat16", narrow=BF16_LOOP, products=products)))
    for tile, kt, bv in OUTPUTS:
        out.append((f"output_{tile[0]}x{tile[1]}_kt{kt}_bv{bv}", "output", 1, 1,
                    lambda tile=tile, kt=kt, bv=bv: chunk_output.chunk_output_kernel(
                        NC, BATCH, C, K, V, bv, "float32", token_major=True, tile=tile, kt=kt)))
    for kt, bv, split in OUTPUTS_MMA:
        out.append((f"output_mma{'3' if split else '1'}_kt{kt}_bv{bv}", "output", 1, 1,
                    lambda kt=kt, bv=bv, split=split: chunk_output.chunk_output_mma_kernel(
                        NC, BATCH, C, K, V, "float32", token_major=True, bv=bv, kt=kt, split=split)))
    for bv, split in OUTPUTS_ASYNC:
        out.append((f"output_mma{'3' if split else '1'}_async_bv{bv}", "output", 1, 1,
                    lambda bv=bv, split=split: chunk_output.chunk_output_mma_kernel(
                        NC, BATCH, C, K, V, "float32", token_major=True, bv=bv, split=split, staging="async")))
    for staging, bv in OUTPUTS_BF16:
        out.append((f"output_bf16_{staging}_bv{bv}", "output_bf16", 1, 1,
                    lambda staging=staging, bv=bv: chunk_output.chunk_output_mma_kernel(
                        NC, BATCH, C, K, V, "float32", token_major=True, bv=bv, split=False, out_dtype="bfloat16",
                        narrow=BF16_OUTPUT, staging=staging)))
    return out


def fatbin_key(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:24]


def build(out: Path, only: str | None = None) -> int:
    import subprocess

    import tvm

    from dnir.lowering.runtime_loader import with_launch_bounds
    from dnir.lowering.tvm.compile import cuda_source, make_target
    out.mkdir(parents=True, exist_ok=True)
    done = {}
    for name, kernel, kg, blocks, make in variants():
        if only and not re.search(only, name):
            continue
        try:
            func = make().with_attr("global_symbol", name)
            ex = tvm.compile(tvm.IRModule({name: func}), target=make_target("cuda"))
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is reported, not fatal
            print(f"{name}: not built ({type(e).__name__}: {str(e)[:200]})", flush=True)
            continue
        ex.export_library(str(out / f"{name}.so"))
        source = cuda_source(ex)
        if blocks > 1:                         # the variant's kernel is `<name>_kernel` in TVM's source
            source = with_launch_bounds(source, {f"{name}_kernel": blocks})
        (out / f"{name}.cu").write_text(source)
        fatbin = out / f"{fatbin_key(source)}.fatbin"
        proc = subprocess.run(["nvcc", "-O3", "--fatbin", "-arch=sm_90", "-Xptxas", "-v", "-o", str(fatbin),
                               str(out / f"{name}.cu")], capture_output=True, text=True)
        regs = re.findall(r"Used (\d+) registers", proc.stderr)
        spill = re.findall(r"(\d+) bytes spill stores", proc.stderr)
        done[name] = {"kernel": kernel, "kg": kg, "min_blocks": blocks, "ok": proc.returncode == 0,
                      "registers": int(regs[-1]) if regs else None, "spill_bytes": int(spill[-1]) if spill else None}
        print(name, done[name], flush=True)
    (out / "variants.json").write_text(json.dumps(done, indent=1))
    return 0


def run(folder: Path, out: Path) -> int:
    import torch
    import tvm
    import tvm_ffi

    from .checkout import import_loader
    from .gpu import cuda_time
    import_loader().load_cuda_support("sm_90")      # dnir from an install, or from the checkout (the GPU machine)

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _compile(code, *_):   # the variant's own fatbin: its source may carry other launch bounds
        return bytearray((folder / f"{fatbin_key(current['source'])}.fatbin").read_bytes())

    current = {}
    meta = json.loads((folder / "variants.json").read_text())
    torch.manual_seed(0)
    dev = "cuda"

    def unit(x):
        return x / x.norm(dim=-1, keepdim=True)

    inputs = {}
    for kg in (1, K):
        inputs[kg] = {"q": unit(torch.randn(R, T, HV, K, device=dev)), "k": unit(torch.randn(R, T, HV, K, device=dev)),
                      "v": torch.randn(R, T, HV, V, device=dev),
                      "g": -torch.nn.functional.softplus(torch.randn(R, T, HV, kg, device=dev) - 2),
                      "beta": torch.sigmoid(torch.randn(R, T, HV, 1, device=dev)),
                      "s0": 0.1 * torch.randn(R, HV, K, V, device=dev)}
    results, reference = [], {}
    for name, m in meta.items():
        if not m["ok"]:
            continue
        current["source"] = (folder / f"{name}.cu").read_text()
        func = tvm.runtime.load_module(str(folder / f"{name}.so"))[name]
        x = inputs[m["kg"]]
        key = (m["kernel"], m["kg"])
        if m["kernel"] == "intra":
            outs = [torch.empty(NC, R, HV, C, n, device=dev) for n in (K, V, K, C, K)] + \
                [torch.empty(NC, R, HV, m["kg"], 1, device=dev)]
            args = [x[n] for n in ("q", "k", "v", "g", "beta")] + outs
        elif m["kernel"] in ("states", "states_bf16"):
            w, u, _, _, kte, ld = x["intra"]
            loop = torch.bfloat16 if m["kernel"] == "states_bf16" else torch.float32   # starts, v_new and w, u, kte
            outs = [torch.empty(R, HV, K, V, device=dev), torch.empty(NC, R, HV, K, V, device=dev, dtype=loop),
                    torch.empty(NC, R, HV, C, V, device=dev, dtype=loop)]
            args = [x["s0"], w.to(loop), u.to(loop), kte.to(loop), ld] + outs
        else:
            _, _, qd, aqk, _, _ = x["intra"]
            _, starts, v_new = x["states"]            # the float32 loop's
            half = torch.bfloat16 if m["kernel"] == "output_bf16" else torch.float32   # q_decayed, starts, v_new, o
            outs = [torch.empty(R, T, HV, V, device=dev, dtype=half)]
            args = [qd.to(half), starts.to(half), aqk, v_new.to(half)] + outs
        targs = [tvm.runtime.from_dlpack(a) for a in args]
        func(*targs)
        torch.cuda.synchronize()
        if key not in reference:                 # the kernel's default: the reference of its variants
            reference[key] = [o.clone() for o in outs]
            x[m["kernel"]] = reference[key]
        diff = max(float((o.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-30))
                   for o, r in zip(outs, reference[key]))
        t = cuda_time(lambda: func(*targs))
        results.append({"name": name, **m, **t, "max_rel_diff": diff,
                        "matches": diff < MATCH.get(m["kernel"], 1e-4)})
        print(f"{name}: {t['median_ms']:.3f} ms, diff {diff:.1e}, regs {m['registers']}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "results": results}, indent=1))
    lines = [f"# Kernel variants on {torch.cuda.get_device_name()}, (1, 8192, 32, 128) float32", "",
             "| variant | ms (median) | min | registers | spill B | matches default |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['median_ms']:.3f} | {r['min_ms']:.3f} | {r['registers']} | {r['spill_bytes']} | "
              f"{'yes' if r['matches'] else 'NO (%.1e)' % r['max_rel_diff']} |" for r in results]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["build", "run"])
    p.add_argument("--dir", type=Path, help="run: the folder `build` wrote")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", help="build: the variants whose names match this regular expression (the first of "
                   "each kernel, its reference, among them)")
    a = p.parse_args(argv)
    return build(a.out, a.only) if a.mode == "build" else run(a.dir, a.out)


if __name__ == "__main__":
    sys.exit(main())
