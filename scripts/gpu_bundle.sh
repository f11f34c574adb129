#!/usr/bin/env bash
# Builds .gpu/ (git-ignored) for one benchmark call on the GPU machine, which has
# no TVM and no network (recipe: ../shared/reference/gpu-device.md):
#   - the apache-tvm-ffi wheel for cp312, the version installed here;
#   - tvmrt.tgz: the tvm package without libtvm_compiler.so (runtime only);
#   - the fla-core wheel (flash-linear-attention's Triton kernels, the peer);
#   - bench/: the benchmark's dnir O2 graphs compiled here for CUDA sm_90
#     (benchmarks/gpu_artefacts.py; minutes).
# scripts/gpu_bundle.py adds the CUDA conformance artefacts to the same folder
# (same wheel and tarball names). A device call carries at most 64 MiB: this
# fails when the folder is over 60 MiB.
#
#   scripts/gpu_bundle.sh [OUT_DIR]        # default .gpu
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=${1:-.gpu}
fla_version=0.6.0
mkdir -p "$out"

ffi_version=$("$py" -c "import tvm_ffi; print(tvm_ffi.__version__)")
rm -f "$out"/apache_tvm_ffi-*.whl "$out"/fla_core-*.whl
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$out" "apache-tvm-ffi==$ffi_version"
"$py" -m pip download -q --no-deps --only-binary=:all: -d "$out" "fla-core==$fla_version"

site=$("$py" -c "import os, tvm; print(os.path.dirname(os.path.dirname(tvm.__file__)))")
tar -C "$site" --exclude=tvm/lib/libtvm_compiler.so --exclude=__pycache__ -czf "$out/tvmrt.tgz" tvm

"$py" -m benchmarks.gpu_artefacts --out "$out/bench"

bytes=$(du -sb "$out" | cut -f1)
echo "$out: $((bytes / 1048576)) MiB"
if [ "$bytes" -ge $((60 * 1048576)) ]; then
  echo "error: $out is over 60 MiB; a device call carries at most 64 MiB" >&2
  exit 1
fi
