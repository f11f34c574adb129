"""Lower a graph to TVM, look at the generated code, and run it.

The graph is the intra-chunk step of the gated delta rule for one 64-token
chunk: the decayed key products A = tril(beta_i k_i.k_j exp(gam_i - gam_j), -1)
and the triangular solve (I + A) U = beta V (the WY form).

`translate` turns a dnir graph into a TVM IRModule: a Relax `main` that calls
operators, plus hand-written TIR kernels where Relax has no op (here the
triangular solve and cumsum). `build(graph, "llvm")` compiles it for this CPU
(cached by graph and target); the executable holds the LLVM module, whose
assembly we search for vector instructions. `dnir.run(..., target="llvm")`
runs it.

    python examples/04_tvm_codegen.py
"""
import re
import time

import numpy as np

import dnir
from dnir.lowering.tvm.compile import build
from dnir.lowering.tvm.translate import translate
from dnir.models import relative_rms_error

H, C, K, V = 4, 64, 128, 128                 # heads, chunk length, key and value head sizes
b = dnir.Builder()
k, v = b.input("k", (H, C, K)), b.input("v", (H, C, V))
g, beta = b.input("g", (H, C)), b.input("beta", (H, C, 1))
gam = b.cumsum(g, axis=1)
decay = b.tril(b.exp(b.tril(b.reshape(gam, (H, C, 1)) - b.reshape(gam, (H, 1, C)))))   # mask before exp
a = b.tril(b.matmul(k, k, transpose_b=True) * decay * beta, k=-1)
u = b.solve_tri(a, v * beta, lower=True, unit_diagonal=True)      # (I + A) U = beta V
graph = b.build(u, names=["u"])

mod = translate(graph, target_name="llvm")
print("IRModule functions:", ", ".join(sorted(gv.name_hint for gv in mod.get_global_vars())))
print("\nRelax main (first lines):")
print("\n".join(mod["main"].script().splitlines()[4:14]))
print("\nthe TIR kernel solve_tri (first lines):")
print("\n".join(mod["solve_tri"].script().splitlines()[4:22]))

start = time.perf_counter()
executable = build(graph, "llvm")
print(f"\ncompiled for llvm in {time.perf_counter() - start:.1f} s")
llvm = next(m for m in [executable.mod, *executable.mod.imports] if m.kind == "llvm")
asm = llvm.inspect_source("asm")
vector = [line.strip() for line in asm.splitlines() if re.match(r"\s+v(fmadd|mul|add|sub)\w*ps\s", line)]
print(f"assembly: {len(asm.splitlines())} lines, {len(vector)} packed float multiply/add instructions, e.g.")
for line in vector[:4]:
    print(f"    {line}")

rng = np.random.default_rng(0)
unit = rng.standard_normal((H, C, K))
inputs = {"k": unit / np.linalg.norm(unit, axis=-1, keepdims=True), "v": rng.standard_normal((H, C, V)),
          "g": -rng.uniform(0.01, 0.5, (H, C)), "beta": rng.uniform(0.1, 0.9, (H, C, 1))}
inputs = {name: x.astype(np.float32) for name, x in inputs.items()}
(u_tvm,) = dnir.run(graph, inputs, target="llvm")
(u_ref,) = dnir.run(graph, inputs, float64=True)                  # NumPy in float64
error = relative_rms_error(u_tvm, u_ref)
print(f"\nllvm vs NumPy float64: rms error {error:.1e}")
assert error < 1e-5
