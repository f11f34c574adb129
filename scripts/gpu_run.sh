#!/usr/bin/env bash
# The GPU benchmark and conformance run on the lent GPU machine (benchmarks/README.md "GPU"),
# from the repository root there, with .gpu (scripts/gpu_bundle.sh) and .gl carried:
#   scripts/gpu_run.sh 1    # bf16 and tf32 cases                                   -> $OUT/part1
#   scripts/gpu_run.sh 2    # float32 cases at their default precision, conformance -> $OUT/part2, $OUT
# Two calls, as one call may run 10 minutes at most; then, here:
#   python -m benchmarks.gpu --merge part1/gpu.json part2/gpu.json --out benchmarks/results
# The first call on a machine installs the bundle (a warm machine keeps it for the second).
set -u
part=$1
R=$PWD
B=$R/.gpu
if [ ! -f /tmp/dnir-gpu-ready ]; then
  for f in "$R"/.gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$B"/*.whl
  mkdir -p /tmp/src /tmp/bench
  tar -C /tmp/site -xzf "$B/tvmrt.tgz" && tar -C /tmp/src -xzf "$B/src.tgz" && tar -C /tmp/bench -xzf "$B/bench.tgz" \
    && touch /tmp/dnir-gpu-ready
fi
# the sources the artefacts were compiled from (the module cache's keys hash them): nothing compiles there
export PYTHONPATH=/tmp/site:/tmp/src TVM_USE_RUNTIME_LIB=1 PATH=$PATH:/usr/local/cuda/bin DNIR_CACHE=/tmp/bench/cache \
  PYTHONUNBUFFERED=1
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
[ ! -f $icd ] || export VK_DRIVER_FILES=$icd
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader
cd /tmp/src
cases() {   # the benchmark's cases, those whose name ends in _f32 (the float32 default) or the others
  python3 -c "from benchmarks.gpu_artefacts import CASES; print(*[c for c in CASES if c.endswith('_f32') == ($1)])"
}
# each step under a timeout that leaves the call's 10 minutes to the next; the benchmark writes after every case
if [ "$part" = 1 ]; then
  timeout 450 python3 -m benchmarks.gpu --bundle /tmp/bench --out "$OUT/part1" --cases $(cases False) | tail -n 40
else
  timeout 380 python3 -m benchmarks.gpu --bundle /tmp/bench --out "$OUT/part2" --cases $(cases True) | tail -n 40
  timeout 150 python3 scripts/gpu_conformance.py --bundle "$B" --out "$OUT" --vulkan | tail -n 8
fi
