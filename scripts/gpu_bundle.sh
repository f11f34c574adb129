#!/usr/bin/env bash
# Builds .gpu/ (git-ignored) for one call on the GPU machine, which has no TVM and
# no network. What scripts/gpu_bundle.py puts there (the apache-tvm-ffi cp312
# wheel, the TVM package without its compiler library, the CUDA conformance
# artefacts), plus what benchmarks/gpu.py needs: the fla-core wheel (the peer's
# Triton kernels) and the benchmark's dnir O2 graphs compiled here for CUDA sm_90.
# A device call carries at most 64 MiB: fails above 60 MiB.
#
#   scripts/gpu_bundle.sh [OUT_DIR]        # default .gpu; compiling takes minutes
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=${1:-.gpu}
fla_version=0.6.0

"$py" scripts/gpu_bundle.py --out "$out"
rm -f "$out"/fla_core-*.whl
"$py" -m pip download -q --no-deps --only-binary=:all: -d "$out" "fla-core==$fla_version"
"$py" -m benchmarks.gpu_artefacts --out "$out/bench"

bytes=$(du -sb "$out" | cut -f1)
echo "$out: $((bytes / 1048576)) MiB"
if [ "$bytes" -ge $((60 * 1048576)) ]; then
  echo "error: the bundle is over 60 MiB; a device call carries at most 64 MiB" >&2
  exit 1
fi
