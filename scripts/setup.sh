#!/usr/bin/env bash
# Sets up dnir in a virtual environment: system packages where we can install
# them (Graphviz's `dot`, Mesa's lavapipe Vulkan driver), then the Python
# package with every optional dependency, then ggml from source (the CPU
# benchmark's peer and a backend; cached outside the repository, so a fresh
# clone on the same machine reuses it). Safe to run again.
set -euo pipefail
python=${1:-python3}
venv=${2:-.venv}

need_apt=()
command -v dot >/dev/null 2>&1 || need_apt+=(graphviz)
[ -e /usr/share/vulkan/icd.d/lvp_icd.x86_64.json ] || [ -e /usr/share/vulkan/icd.d/lvp_icd.json ] || need_apt+=(mesa-vulkan-drivers libvulkan1)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "note: install ${need_apt[*]} for graph pictures and the Vulkan backend (needs root)" >&2
  fi
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".[all]"
"$venv/bin/python" -c "import sys; from dnir.lowering.ggml.build import main; sys.exit(main())" \
  || echo "note: ggml was not built (see above): its backend and benchmark peer are unavailable" >&2
