#!/usr/bin/env bash
# Builds .gpu/ (git-ignored) for one call on the GPU machine, which has no TVM and
# no network (recipe: benchmarks/README.md "GPU"):
#   - wheels for cp312: apache-tvm-ffi (the version installed here), fla-core
#     (flash-linear-attention's Triton kernels, the peer), wgpu with cffi and
#     pycparser (the Vulkan runner);
#   - tvmrt.tgz: the tvm package without libtvm_compiler.so (runtime only), and the
#     conformance artefacts, CUDA and Vulkan (scripts/gpu_bundle.py);
#   - bench.tgz: the benchmark's module cache (every case's layer compiled here for
#     CUDA sm_90, with nvcc's fatbins, and the conformance artefacts' fatbins), its
#     float32 cases as Vulkan programs and the FLOP counts (benchmarks/gpu_artefacts.py;
#     built in build/gpu, kept between runs: a case already there is not compiled again);
#   - src.tgz: the sources the artefacts were compiled from (the module cache's keys
#     hash them), so the GPU machine runs exactly those.
# A device call carries at most 64 MiB: this fails when .gpu is over 60 MiB.
#
#   scripts/gpu_bundle.sh [--cases NAME ...]        # default: every case (about 40 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=.gpu
work=build/gpu
mkdir -p "$out" "$work"

# The sources first: what the artefacts are compiled from, checked again at the end.
git ls-files -co --exclude-standard dnir lowering passes benchmarks scripts tests pyproject.toml \
  | tar -czf "$work/src.tgz" -T -

rm -f "$out"/*.whl
"$py" -m pip download -q --no-deps --only-binary=:all: -d "$out" "fla-core==0.6.0"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$out" wgpu==0.32.0 cffi==2.1.1 pycparser==3.12

"$py" -m benchmarks.gpu_artefacts --out "$work" --vulkan "$@"          # first: it empties a stale cache
"$py" scripts/gpu_bundle.py --out "$out" --fatbins "$work/cache"       # ffi wheel, tvmrt.tgz, conformance
mkdir -p "$work/vulkan" && tar -C "$work" -czf "$out/bench.tgz" cache vulkan bench_costs.json
rm -rf "$work/src" && mkdir "$work/src" && tar -C "$work/src" -xzf "$work/src.tgz"
if ! "$py" -c "import sys; from pathlib import Path; from dnir.lowering.module_cache import code_hash
sys.exit(code_hash(Path('$work/src').resolve()) != Path('$work/code_hash').read_text())"; then
  echo "error: the sources changed while compiling (the module cache's keys would not match); run again" >&2
  exit 1
fi
cp "$work/src.tgz" "$out/src.tgz"

bytes=$(du -sb "$out" | cut -f1)
echo "$out: $((bytes / 1048576)) MiB"
if [ "$bytes" -ge $((60 * 1048576)) ]; then
  echo "error: $out is over 60 MiB; a device call carries at most 64 MiB" >&2
  exit 1
fi
