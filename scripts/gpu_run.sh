#!/usr/bin/env bash
# The GPU benchmark and conformance run on the lent GPU machine (benchmarks/README.md "GPU"),
# from the repository root there, with .gpu (scripts/gpu_bundle.sh) and .gl carried:
#   scripts/gpu_run.sh bench [CASE ...]   # the benchmark's cases (default: all)  -> $OUT/bench
#   scripts/gpu_run.sh conformance        # every op and model against NumPy      -> $OUT
# One call may run 10 minutes at most: the benchmark stops after 9 and keeps the cases it ran (it
# writes after each); a second call runs the conformance and the cases left, named. Then, here:
#   python -m benchmarks.gpu --merge bench/gpu.json [bench2/gpu.json] --out benchmarks/results
# The first call on a machine installs the bundle (a warm machine keeps it for the next).
# STEP_TIMEOUT (seconds, default 540): to run both in one call.
set -u
what=$1
shift
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
if [ "$what" = bench ]; then
  timeout "${STEP_TIMEOUT:-540}" python3 -m benchmarks.gpu --bundle /tmp/bench --out "$OUT/bench" ${1:+--cases "$@"} \
    | tail -n 40
else
  timeout "${STEP_TIMEOUT:-540}" python3 scripts/gpu_conformance.py --bundle "$B" --out "$OUT" --vulkan | tail -n 8
fi
